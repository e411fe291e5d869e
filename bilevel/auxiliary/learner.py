"""``AuxiliaryLearner``: one object that runs the primary/auxiliary training loop with any mode."""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._src.distributed import collective_device, unwrap_data_parallel
from .._src.errors import PeerError
from .._src.hypergradient import HyperGradient
from .._src.parallel_call import refuse_data_parallel

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
        check_shards: with a distributed ``hypergradient``, refuse ranks whose batches differ
            in size (below). ``False`` for closures that weight their shards themselves
            (returning ``shard_sum * W / N_global``).

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

    Data parallel. With ``hypergradient=HyperGradient(..., distributed=True)`` (or a
    ``ProcessGroup``), W ranks each pass ``step`` their equal shard of the global batches, and
    ``train_loss`` and ``main_loss`` return means over the shard. The primary step then uses
    the gradient averaged over the ranks, and the auxiliary step the global hypergradient, so
    every rank's models stay identical and equal to one process's on the concatenated batches
    (``train_loss`` in the result is the global one too). Each step makes one all-reduce of
    ``4W + 1 + T + N`` entries (``T`` trainable primary tensors of ``N`` entries in all): per
    rank a failure flag, the sizes of its ``train_batch`` and ``aux_batch`` and its step count
    (ranks at different steps raise), the mean loss, a used flag per tensor (one no rank uses
    gets no gradient) and the gradients. A rank whose ``train_loss`` raises joins it with its
    flag set and raises its error; the others raise :class:`~bilevel.PeerError`; nothing moves
    on any rank. The size of a batch is the leading dimension of its first tensor (a batch
    without one is not compared); ranks with different sizes raise ``ValueError`` on every
    rank before anything moves, unless ``check_shards=False``. A ``DistributedDataParallel``
    primary or auxiliary model is evaluated through the module it wraps (DDP's forward, hence
    its buffer broadcast, never runs: keep buffers identical yourself), and parameter names
    (``unused`` above) carry no ``module.`` prefix. ``state_dict()`` saves the models as they
    are wrapped (a DDP's keys start with ``module.``); ``load_state_dict`` also loads a
    checkpoint of the unwrapped module into a DDP and the reverse.
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
        *,
        check_shards: bool = True,
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
        self.check_shards = bool(check_shards)
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
        group = self.hypergradient.group
        primary, auxiliary = self._models()
        named = [(n, p) for n, p in primary.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        if group is None:
            value, grads = self._local_gradients(primary, auxiliary, params, train_batch)
        else:
            value, grads = self._averaged_gradients(group, primary, auxiliary, params, train_batch, aux_batch)
        auxiliary_step = (self.steps + 1) % self.update_every == 0
        unused = [n for (n, _), g in zip(named, grads) if g is None]
        if auxiliary_step:  # before anything moves, so that a refused step changes nothing
            self._check_unused(unused)
        self.steps += 1
        self.primary_optimizer.zero_grad()
        for (_, p), g in zip(named, grads):  # the auxiliary model's .grad stays untouched
            p.grad = None if g is None else g.detach()
        self.primary_optimizer.step()
        info: dict[str, Any] = {"step": self.steps, "train_loss": value, "auxiliary_updated": False}
        if auxiliary_step:
            held = [p for (_, p), g in zip(named, grads) if g is None]
            info.update(self._auxiliary_step(primary, auxiliary, train_batch, aux_batch, held))
            self._unused = unused
        return info

    def _models(self) -> tuple[nn.Module, nn.Module]:
        """The primary and auxiliary models the closures see: a DDP module's wrapped module.
        A DDP model with a HyperGradient that did not say ``distributed=...`` is refused
        before the primary step moves (its hypergradient call would refuse it)."""
        if self.hypergradient.group is None and self.hypergradient.distributed is None:
            refuse_data_parallel(self.primary, self.auxiliary)
        return unwrap_data_parallel(self.primary), unwrap_data_parallel(self.auxiliary)

    def _local_gradients(
        self, primary: nn.Module, auxiliary: nn.Module, params: Sequence[Tensor], batch: Any
    ) -> tuple[float, list[Tensor | None]]:
        """This process's training loss and its gradients (None for an unused parameter)."""
        loss = self.train_loss(primary, auxiliary, batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return float(loss.detach()), list(grads)

    def _averaged_gradients(
        self,
        group: Any,
        primary: nn.Module,
        auxiliary: nn.Module,
        params: Sequence[Tensor],
        train_batch: Any,
        aux_batch: Any,
    ) -> tuple[float, list[Tensor | None]]:
        """The loss and primary gradients averaged over the ranks, in one all-reduce (class
        docstring); raises on every rank alike, before anything moves, if any rank failed
        or the ranks' shards differ in size."""
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        failure: BaseException | None = None
        value = 0.0  # what a failed rank sends
        grads: list[Tensor | None] = [None] * len(params)
        try:
            value, grads = self._local_gradients(primary, auxiliary, params, train_batch)
        except BaseException as error:  # noqa: BLE001 - every rank must hear of it before any raises
            failure = error
        head = [0.0] * (4 * world + 1)  # failure flags, train and aux batch sizes, step counts, loss
        head[rank] = float(failure is not None)
        head[world + rank], head[2 * world + rank] = _shard_size(train_batch), _shard_size(aux_batch)
        head[3 * world + rank] = float(self.steps)
        head[-1] = value
        out = _all_reduce_sum(group, head, params, grads)
        if failure is not None:
            raise failure
        sums = out[: len(head)].tolist()
        failed = [r for r in range(world) if sums[r]]
        if failed:
            raise PeerError(
                f"rank(s) {', '.join(map(str, failed))} of the process group raised an error in "
                "AuxiliaryLearner.step (see their traceback); every rank stops here, and no "
                "rank's models or optimizers changed"
            )
        counts = sums[3 * world : 4 * world]
        if len(set(counts)) > 1:  # resumed from different checkpoints: update steps would differ
            shown = ", ".join(f"rank {r}: {int(c)}" for r, c in enumerate(counts))
            raise ValueError(
                f"distributed: the ranks' learners are at different steps ({shown}); load the same "
                "checkpoint on every rank (AuxiliaryLearner.load_state_dict); nothing was changed"
            )
        if self.check_shards:
            for name, start in (("train_batch", world), ("aux_batch", 2 * world)):
                _check_equal_shards(name, sums[start : start + world])
        return sums[-1] / world, _unflatten(out[len(head) :] / world, params)

    def _auxiliary_step(
        self,
        primary: nn.Module,
        auxiliary: nn.Module,
        train_batch: Any,
        aux_batch: Any,
        held: Sequence[Tensor],
    ) -> dict[str, Any]:
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
                primary,
                auxiliary,
            )
        finally:
            for p in held:
                p.requires_grad_(True)
        norm = torch.linalg.vector_norm(
            torch.stack(
                [torch.linalg.vector_norm(p.grad) for p in auxiliary.parameters() if p.grad is not None]
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
        """Everything needed to resume exactly: models, optimizers, step counter, mode state.
        The models' states are those of the modules as passed (a ``DistributedDataParallel``'s
        keys start with ``module.``), so the checkpoint loads into the same wrapping."""
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
        _load_module(self.primary, state["primary"])
        _load_module(self.auxiliary, state["auxiliary"])
        self.primary_optimizer.load_state_dict(state["primary_optimizer"])
        self.auxiliary_optimizer.load_state_dict(state["auxiliary_optimizer"])
        self.steps = state["steps"]
        self._unused = state.get("unused")  # (absent from checkpoints of earlier versions)


def _all_reduce_sum(
    group: Any, head: list[float], params: Sequence[Tensor], grads: Sequence[Tensor | None]
) -> Tensor:
    """The sum over the ranks of ``head``, a used flag per parameter and the flattened
    gradients (zeros where None), in one all-reduce, in the parameters' (promoted) dtype, on
    the group's device (the CPU for gloo, this process's GPU for NCCL)."""
    import torch.distributed as dist

    dtype = functools.reduce(torch.promote_types, [p.dtype for p in params], torch.float32)
    device = collective_device(group)
    used = [float(g is not None) for g in grads]
    pieces = [
        torch.zeros(p.numel(), dtype=dtype, device=device)
        if g is None
        else g.detach().reshape(-1).to(device, dtype)
        for p, g in zip(params, grads)
    ]
    buffer = torch.cat([torch.tensor(head + used, dtype=dtype, device=device), *pieces])
    dist.all_reduce(buffer, group=group)
    return buffer


def _unflatten(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor | None]:
    """The gradients of ``params`` from used flags followed by the flattened gradients."""
    result: list[Tensor | None] = []
    offset = len(params)
    for p, used in zip(params, flat[: len(params)].tolist()):
        piece = flat[offset : offset + p.numel()]
        result.append(piece.view(p.shape).to(p.device, p.dtype) if used else None)
        offset += p.numel()
    return result


def _shard_size(batch: Any) -> float:
    """The leading dimension of the first tensor of ``batch`` with one (0: cannot tell)."""
    for leaf in torch.utils._pytree.tree_leaves(batch):
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return float(leaf.shape[0])
    return 0.0


def _check_equal_shards(name: str, sizes: list[float]) -> None:
    """Raise, on every rank alike, if the ranks' batches (those whose size is known) differ."""
    known = {s for s in sizes if s}
    if len(known) <= 1:
        return
    shown = ", ".join(f"rank {r}: {int(s)}" if s else f"rank {r}: ?" for r, s in enumerate(sizes))
    raise ValueError(
        f"distributed: the ranks' {name} shards differ in size ({shown} rows, the leading "
        "dimension of each batch's first tensor). The losses return means over each rank's "
        "shard and the ranks' gradients and hypergradients are averaged with equal weights, "
        "so the result would not be the global batch's. Give every rank an equal shard (e.g. "
        "DistributedSampler(..., drop_last=True) with a batch size the same on every rank), "
        "or make train_loss and main_loss return shard_sum * W / N_global and pass "
        "check_shards=False; nothing was changed"
    )


def _load_module(module: nn.Module, state: dict[str, Any]) -> None:
    """``module.load_state_dict(state)``, also across a ``DistributedDataParallel`` wrapping:
    the bare module's state loads into a DDP around it, and a DDP's (``module.`` keys) into
    the bare module. Keys that fit ``module`` as they are load as they are."""
    inner = unwrap_data_parallel(module)
    keys, own = set(state), set(module.state_dict())
    if keys == own:
        module.load_state_dict(state)
    elif inner is not module and keys == set(inner.state_dict()):
        inner.load_state_dict(state)
    elif inner is module and {k.removeprefix("module.") for k in keys} == own:
        stripped: OrderedDict[str, Any] = OrderedDict(state)
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            stripped._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
        torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(stripped, "module.")
        module.load_state_dict(stripped)
    else:
        module.load_state_dict(state)  # its own error names the missing and unexpected keys
