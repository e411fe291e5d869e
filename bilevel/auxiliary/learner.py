"""``AuxiliaryLearner``: one object that runs the primary/auxiliary training loop with any mode."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._src.hypergradient import HyperGradient

__all__ = ["AuxiliaryLearner"]


class AuxiliaryLearner:
    """Train a primary model on a loss combined by an auxiliary model, and the auxiliary
    model by hypergradients of the main-task loss on a held-out auxiliary set.

    Args:
        primary: the primary model θ.
        auxiliary: the auxiliary model φ (loss weights, a combiner network, ...).
        train_loss: ``(primary, auxiliary, batch) -> scalar``, the combined training objective.
        main_loss: ``(primary, batch) -> scalar``, the main-task loss on the auxiliary set.
        primary_optimizer, auxiliary_optimizer: torch optimizers over each model's parameters.
        hypergradient: a :class:`~bilevel.HyperGradient` with any registered mode (default
            ``HyperGradient("implicit-cg")``). Implicit modes assume the primary model is near
            a minimum of the training loss for the current auxiliary model; unrolled modes run
            their own differentiable inner steps from the current primary parameters (on the
            current training batch, or on their ``inner_batches``) without changing the model.
        update_every: one auxiliary step every this many primary steps.

    Primary parameters that ``train_loss`` does not use (an unused head) are constants of the
    inner problem: they get no primary gradient, and the auxiliary step holds them fixed
    (``requires_grad`` is switched off for that call only), as their values cannot depend on
    the auxiliary model. If that set changes between auxiliary steps (a head trained only on
    some batches), a mode whose state is shaped like the last problem (``warm_start``,
    ``update_params``) cannot follow, and the step raises before changing anything.

    ``step(train_batch, aux_batch)`` takes one primary step, and on every ``update_every``-th
    call also one auxiliary step; it returns a dict of what it did. ``state_dict()`` holds
    everything a run needs to resume exactly (models, optimizers, step counter, mode state);
    the data order and random number generators are the caller's.
    """

    def __init__(
        self,
        primary: nn.Module,
        auxiliary: nn.Module,
        train_loss: Callable[[nn.Module, nn.Module, Any], Tensor],
        main_loss: Callable[[nn.Module, Any], Tensor],
        primary_optimizer: torch.optim.Optimizer,
        auxiliary_optimizer: torch.optim.Optimizer,
        hypergradient: HyperGradient | None = None,
        update_every: int = 10,
    ) -> None:
        for name, module in (("primary", primary), ("auxiliary", auxiliary)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(module).__name__}")
        for name, fn in (("train_loss", train_loss), ("main_loss", main_loss)):
            if not callable(fn):
                raise TypeError(f"{name} must be a function, got {type(fn).__name__}")
        for name, opt in (
            ("primary_optimizer", primary_optimizer),
            ("auxiliary_optimizer", auxiliary_optimizer),
        ):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"{name} must be a torch.optim.Optimizer, got {type(opt).__name__}")
        if hypergradient is not None and not isinstance(hypergradient, HyperGradient):
            raise TypeError(
                f"hypergradient must be a bilevel.HyperGradient, got {type(hypergradient).__name__}"
            )
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
        self.primary, self.auxiliary = primary, auxiliary
        self.train_loss, self.main_loss = train_loss, main_loss
        self.primary_optimizer, self.auxiliary_optimizer = primary_optimizer, auxiliary_optimizer
        self.hypergradient = hypergradient if hypergradient is not None else HyperGradient("implicit-cg")
        self.update_every = update_every
        self.steps = 0
        self._unused: list[str] | None = None  # primary parameters held fixed at the last auxiliary step

    def step(self, train_batch: Any, aux_batch: Any) -> dict[str, Any]:
        """One primary optimizer step on ``train_batch``; on every ``update_every``-th call
        also an auxiliary step whose hypergradient uses ``train_batch`` (inner problem, at the
        updated primary parameters) and ``aux_batch`` (main-task loss).

        Returns ``step``, ``train_loss`` (before the primary step), ``auxiliary_updated``, and
        after an auxiliary step ``hypergradient_norm`` and ``stats`` (the mode's
        :class:`~bilevel.Stats`).
        """
        named = [(n, p) for n, p in self.primary.named_parameters() if p.requires_grad]
        loss = self.train_loss(self.primary, self.auxiliary, train_batch)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        auxiliary_step = (self.steps + 1) % self.update_every == 0
        unused = [n for (n, _), g in zip(named, grads) if g is None]
        if auxiliary_step:  # before anything moves, so that a refused step changes nothing
            self._check_unused(unused)
        self.steps += 1
        self.primary_optimizer.zero_grad()
        for (_, p), g in zip(named, grads):  # the auxiliary model's .grad stays untouched
            p.grad = None if g is None else g.detach()
        self.primary_optimizer.step()
        info: dict[str, Any] = {
            "step": self.steps,
            "train_loss": float(loss.detach()),
            "auxiliary_updated": False,
        }
        if auxiliary_step:
            held = [p for (_, p), g in zip(named, grads) if g is None]
            info.update(self._auxiliary_step(train_batch, aux_batch, held))
            self._unused = unused
        return info

    def _auxiliary_step(self, train_batch: Any, aux_batch: Any, held: Sequence[Tensor]) -> dict[str, Any]:
        """The hypergradient of the main-task loss into the auxiliary ``.grad``, and a step."""
        self.auxiliary_optimizer.zero_grad()
        try:  # parameters the training loss does not use are constants of the inner problem
            for p in held:
                p.requires_grad_(False)
            self.hypergradient.backward(
                lambda primary, auxiliary, *batch: self.train_loss(
                    primary, auxiliary, batch[0] if batch else train_batch
                ),
                lambda primary, auxiliary: self.main_loss(primary, aux_batch),
                self.primary,
                self.auxiliary,
            )
        finally:
            for p in held:
                p.requires_grad_(True)
        norm = torch.linalg.vector_norm(
            torch.stack(
                [torch.linalg.vector_norm(p.grad) for p in self.auxiliary.parameters() if p.grad is not None]
            )
        )
        self.auxiliary_optimizer.step()
        return {
            "auxiliary_updated": True,
            "hypergradient_norm": float(norm),
            "stats": self.hypergradient.stats,
        }

    def _check_unused(self, unused: list[str]) -> None:
        """Holding other parameters fixed than at the last auxiliary step changes the inner
        problem's layout, which a mode carrying state shaped by it cannot follow."""
        if (
            self._unused is None
            or unused == self._unused
            or not self.hypergradient.mode.state_fits_one_layout()
        ):
            return
        raise ValueError(
            f"train_loss uses other primary parameters than at the last auxiliary step (unused "
            f"now: {unused or 'none'}; then: {self._unused or 'none'}), and those it does not use "
            f"are held fixed, so the inner problem changed shape; mode "
            f"{self.hypergradient.mode.name!r} carries state shaped by the last one (warm_start, "
            "update_params). Turn that option off, or make train_loss use the same parameters "
            "at every auxiliary step"
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: models, optimizers, step counter, mode state."""
        return {
            "primary": self.primary.state_dict(),
            "auxiliary": self.auxiliary.state_dict(),
            "primary_optimizer": self.primary_optimizer.state_dict(),
            "auxiliary_optimizer": self.auxiliary_optimizer.state_dict(),
            "steps": self.steps,
            "unused": self._unused,
            "hypergradient": self.hypergradient.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; if any part is refused, the learner stays as it was."""
        missing = {
            "primary",
            "auxiliary",
            "primary_optimizer",
            "auxiliary_optimizer",
            "steps",
            "hypergradient",
        } - set(state)
        if missing:
            raise ValueError(
                f"state is missing {sorted(missing)}; pass a dict from AuxiliaryLearner.state_dict()"
            )
        previous = copy.deepcopy(self.state_dict())
        try:
            self._load(state)
        except BaseException:
            self._load(previous)
            raise

    def _load(self, state: dict[str, Any]) -> None:
        self.hypergradient.load_state_dict(state["hypergradient"])  # the part most likely refused
        self.primary.load_state_dict(state["primary"])
        self.auxiliary.load_state_dict(state["auxiliary"])
        self.primary_optimizer.load_state_dict(state["primary_optimizer"])
        self.auxiliary_optimizer.load_state_dict(state["auxiliary_optimizer"])
        self.steps = state["steps"]
        self._unused = state.get("unused")  # (absent from checkpoints of earlier versions)
