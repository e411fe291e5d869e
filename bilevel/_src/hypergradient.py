"""``HyperGradient``: one interface over every registered mode."""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from ..modes.base import Mode, get_mode
from .checkpoint import check_state_devices, differences, layout_of, pack, upgrade
from .conditions import Condition, make_problem
from .distributed import Channel, resolve_group, unwrap_pair
from .errors import HypergradientWarning, SolverBreakdownError, user_stacklevel
from .implicit import FAR_FROM_STATIONARY
from .parallel_call import (
    agree_on_problem,
    note_collectives,
    refuse_data_parallel,
    warn_if_sharded,
)
from .problem import BilevelProblem
from .recompute import recompute_guard
from .sharded import has_sharded, sharded_modules_refusal
from .solvers import BREAKDOWNS, MESSAGES
from .stats import Stats, not_converged
from .typing import Closure, Tensors

__all__ = ["HyperGradient"]


_RANDOM = (
    "the closures drew random numbers during the call (dropout, or another module in training "
    "mode that samples): every call is then the hypergradient of another random draw, and the "
    "global generator advances. The products of one call share one draw (one graph; "
    "hvp='finite-difference' replays the call's random numbers). For a reproducible "
    "hypergradient call model.eval() for it, or seed with torch.manual_seed before each call"
)


class HyperGradient:
    """Hypergradients ``dg/dφ`` of ``g(θ*(φ), φ)`` where ``θ*(φ)`` minimises ``f(·, φ)``.

    Args:
        mode: a name from :func:`bilevel.available_modes` (default ``"implicit-cg"``), or a
            mode object such as ``ImplicitCG(iters=20)`` (then ``options`` must be empty).
        strict: raise :class:`~bilevel.errors.SolverBreakdownError` instead of warning when a
            solver diverges, meets negative curvature or a singular system, or stops above
            its tolerance (``stats.converged`` False).
        distributed: ``True`` (the default process group) or a ``ProcessGroup``: data-parallel
            ranks, each holding an equal shard of the data, whose closures return mean losses
            over their shard. Every rank then returns the hypergradient of the losses averaged
            over the ranks (what one process computes on the concatenated batches), identical
            on all ranks, in every mode: every derivative of a closure is averaged over the
            ranks (one all-reduce per gradient or Hessian product). Each call first checks, in
            one collective, that the ranks hold the same params, hparams and state, and any
            error raises on every rank (:class:`~bilevel.errors.PeerError` on those whose peer
            failed). Uneven shards: make each closure return ``shard_sum * W / N_global``.
            ``False``: this rank's data alone; ``None`` (default): the same, with a warning
            when a multi-process group is initialised. ``DistributedDataParallel`` modules are
            evaluated through the module they wrap, FSDP2 (``fully_shard``) modules at full
            copies of their parameters gathered once per call (README, "Distributed").
        local_solves: with ``distributed``, each rank computes the hypergradient of its own
            shard and the ranks average the results (one all-reduce per call): the mean of
            local solves, an approximation of the exact (default) answer that Betty and SAMA
            use; ``stats.extra["local_solves"]`` says so.
        **options: the mode's options (see each mode's docstring); unknown ones raise
            ``TypeError``.

    Every call fills :attr:`stats`. A call never modifies ``params``, ``hparams``, module
    buffers or ``.grad`` fields, except that :meth:`backward` accumulates into the hparams'
    ``.grad`` (and modes that document an ``update_params`` option). A call that raises
    leaves the mode's state (warm start, generator, optimizer state) as it was.
    """

    def __init__(
        self,
        mode: str | Mode = "implicit-cg",
        *,
        strict: bool = False,
        distributed: bool | Any | None = None,
        local_solves: bool = False,
        **options: Any,
    ) -> None:
        if isinstance(mode, Mode):
            if options:
                raise TypeError(
                    f"options ({', '.join(sorted(options))}) go to the mode: pass them to "
                    f"{type(mode).__name__}(...), or name the mode by its string"
                )
            self.mode: Mode = mode
        elif isinstance(mode, type) and issubclass(mode, Mode):
            self.mode = mode.from_options(**options)
        else:
            self.mode = get_mode(mode).from_options(**options)
        for note in self.mode.notes:
            warnings.warn(note, HypergradientWarning, stacklevel=user_stacklevel())
        self.strict = strict
        self.distributed = distributed
        self.group = resolve_group(distributed)
        if local_solves and self.group is None:
            raise ValueError("local_solves=True averages the ranks' solves: pass distributed=True too")
        self.local_solves = bool(local_solves)
        self.stats = Stats(mode=self.mode.name)
        self._warned: set[str] = set()
        self._screened: set[int] = set()  # closure sets run with the recompute guard (recompute.py)
        self._layout: dict[str, Any] | None = None  # of the last call (or of a loaded checkpoint)
        self._layout_source = "the last call"
        self._loaded = False  # a loaded state whose devices the next call checks

    def __repr__(self) -> str:
        return f"HyperGradient({self.mode!r})"

    def compute(self, inner_loss: Closure | Condition, outer_loss: Closure, params: Any, hparams: Any) -> Any:
        """The hypergradient, detached, in the structure of ``hparams`` (a module gives a
        name -> tensor dict of its trainable parameters).

        Args:
            inner_loss: ``f(params, hparams) -> scalar`` (the training loss), or the inner
                solution stated as :class:`~bilevel.Root` ``(F)`` (``F(θ*, φ) = 0``) or
                :class:`~bilevel.FixedPoint` ``(T)`` (``θ* = T(θ*, φ)``); these are solved by
                the implicit modes for non-symmetric systems, and a ``FixedPoint`` also by the
                unrolled modes, which run ``θ ← T(θ, φ)``.
            outer_loss: ``g(params, hparams) -> scalar`` (the validation loss).
            params: θ: a tensor, an ``nn.Module``, or a pytree of them (tuples, lists, dicts,
                named tuples, ...: the containers ``torch.utils._pytree`` knows). Implicit
                modes assume it is (close to) a minimiser of ``inner_loss``.
            hparams: φ: same kinds as ``params``; its tensors must require grad. The same
                tensors (or module) as ``params`` make the initialisation a hyperparameter
                (MAML; unrolled modes: the inner run starts at φ).

        A non-leaf hparam (``raw.exp()``) gets its own gradient here; :meth:`backward`
        carries it on to the leaves it was computed from.
        """
        problem, grads = self._call(inner_loss, outer_loss, params, hparams)
        return problem.hparams_structure.unflatten(grads)

    def backward(
        self, inner_loss: Closure | Condition, outer_loss: Closure, params: Any, hparams: Any
    ) -> None:
        """Like :meth:`compute`, then accumulate the result as ``loss.backward()`` would: into
        the ``.grad`` of leaf hparams, and through a non-leaf hparam (``raw.exp()``) into the
        leaves it was computed from (``raw.grad``; that graph is freed, as by
        ``loss.backward()``). Nothing is written if the computation fails."""
        problem, grads = self._call(inner_loss, outer_loss, params, hparams)
        computed = [(t, g) for t, g in zip(problem.phi0, grads) if t.grad_fn is not None]
        if computed:
            torch.autograd.backward([t for t, _ in computed], [g for _, g in computed])
        with torch.no_grad():
            for leaf, grad in zip(problem.phi0, grads):
                if leaf.grad_fn is not None:
                    continue
                if leaf.grad is None:
                    leaf.grad = grad.clone()
                else:
                    leaf.grad.add_(grad)

    def solve(self, problem: BilevelProblem) -> Tensors:
        """The hypergradient of a prepared :class:`~bilevel.BilevelProblem` (one with a
        ``stationarity`` map, say), flat and aligned with ``problem.phi0``; for adapters that
        build their own problems."""
        return self._run(problem)

    def _call(
        self, inner_loss: Closure | Condition, outer_loss: Closure, params: Any, hparams: Any
    ) -> tuple[BilevelProblem, Tensors]:
        if self.group is None:
            warning = warn_if_sharded(self.distributed)
            if warning:
                self._warn_once("sharded", warning)
            if self.distributed is None:
                refuse_data_parallel(params, hparams)
            else:
                params, hparams = unwrap_pair(params, hparams)
            problem = make_problem(inner_loss, outer_loss, params, hparams)
            if has_sharded(problem.theta0 + problem.phi0):
                raise ValueError(sharded_modules_refusal())
            return problem, self._run(problem)
        channel = Channel(self.group)
        saved = self.mode.state_dict()  # before the agreement draws the call's random seed
        try:
            problem = agree_on_problem(
                channel,
                lambda p, h: make_problem(inner_loss, outer_loss, p, h),
                params,
                hparams,
                self._check_layout,
                self.mode,
            )
            if not self.local_solves:
                problem.channel = channel
            return problem, self._run(problem, channel)
        except BaseException:
            self.mode.load_state_dict(saved)
            raise

    def _run(self, problem: BilevelProblem, channel: Channel | None = None) -> Tensors:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "HyperGradient was called inside torch.inference_mode(), where autograd is off and "
                "no hypergradient can be computed; call it outside that block (torch.no_grad() "
                "around it is fine: the library enables grad where it needs it)"
            )
        if channel is None:  # a distributed call checked the layout while agreeing
            self._check_layout(problem)
        stats = Stats(mode=self.mode.name)
        self.stats = stats
        saved = self.mode.state_dict()
        random_state = torch.get_rng_state()
        try:
            start = time.perf_counter()
            try:
                with recompute_guard(problem, self._screened):  # the first call with these closures
                    grads = self.mode.hypergradient(problem, stats)
            except BaseException:  # also KeyboardInterrupt: the others must not wait
                if channel is not None:
                    channel.fail()  # the others stop at their next collective, with this rank
                raise
            grads = tuple(g.detach() for g in grads)
            if channel is not None:
                grads = self._finish(channel, stats, grads)
            if problem.device.type == "cuda":
                torch.cuda.synchronize(problem.device)
            stats.wall_time = time.perf_counter() - start
            if not torch.equal(random_state, torch.get_rng_state()):
                self._warn_once("random", _RANDOM)
            self._report(stats)
        except BaseException:
            # a call that raises (also strict=True on a breakdown) leaves the mode's state as it
            # was: no half-advanced warm start, generator or optimizer state; stats say what ran
            self.mode.load_state_dict(saved)
            raise
        return grads

    def _finish(self, channel: Channel, stats: Stats, grads: Tensors) -> Tensors:
        """The distributed call's last collective: a strict stop on any rank stops all."""
        stop = self.strict and bool(self._breakdowns(stats))
        count, mean = channel.finish(int(stop), grads if self.local_solves else None)
        grads = grads if mean is None else mean  # local_solves: the mean of the ranks' own
        note_collectives(stats, channel, self.local_solves)
        if count and not stop:
            raise SolverBreakdownError(
                f"{stats.mode}: the solver broke down or did not converge on {count} of "
                f"{channel.world} ranks (strict=True); see their error"
            )
        return grads

    def _breakdowns(self, stats: Stats) -> list[str]:
        # the solver's own account of what went wrong; a mode of one's own may set only the flags
        kinds = [stats.breakdown] if stats.breakdown else [k for k in BREAKDOWNS if getattr(stats, k)]
        if not kinds and stats.converged is False:  # measured above its tolerance
            kinds = ["not_converged"]
        return kinds

    def _check_layout(self, problem: BilevelProblem) -> None:
        """A mode whose state is shaped like the problem (a warm start, optimizer state) needs
        the same structure, shapes and dtype every call; other modes accept any problem."""
        layout = layout_of(problem)
        if self.mode.state_fits_one_layout():
            if self._layout is not None and layout != self._layout:
                raise ValueError(
                    f"params/hparams changed structure, shapes or dtype since {self._layout_source} "
                    f"({differences(self._layout, layout)}), but mode {self.mode.name!r} carries "
                    f"state (from {self._layout_source}) that fits only that layout; use a new "
                    "HyperGradient for the new problem"
                )
            if self._loaded:
                check_state_devices(self.mode.state_dict(), problem.device)
        self._loaded = False
        self._layout, self._layout_source = layout, "the last call"

    def _report(self, stats: Stats) -> None:
        for kind in self._breakdowns(stats):
            explanation = stats.breakdown_message if kind == stats.breakdown else ""
            fallback = not_converged(stats.residual) if kind == "not_converged" else MESSAGES.get(kind, kind)
            message = f"{stats.mode}: {explanation or fallback}"
            if self.strict:
                raise SolverBreakdownError(message)
            self._warn_once(kind, f"{message} (warned once per HyperGradient; pass strict=True to raise)")
        if stats.extra.get("hparams_unused_by_inner"):
            self._warn_once(
                "unused",
                "no hparam affects the gradient of inner_loss, so the "
                "hypergradient is only the direct term ∂outer_loss/∂hparams",
            )
        if stats.extra.get("stationarity", 0.0) > FAR_FROM_STATIONARY:
            self._warn_once(
                "stationary",
                f"{stats.mode}: params look far from a minimum of inner_loss (‖∇θ inner_loss‖ = "
                f"{stats.extra['inner_gradient_norm']:.1e}; the estimated Newton step s to it "
                f"gives s/(‖params‖ + s) = {stats.extra['stationarity']:.2f}, "
                "stats.extra['stationarity']), "
                "but implicit modes assume params minimise it: train the inner problem further "
                "before the call, or use an unrolled mode",
            )
        unreached = stats.extra.get("hparams_unreached")  # unrolled modes (implicit: "unused")
        if unreached and stats.extra.get("hparams_all_unreached"):
            self._warn_once(
                "zero",
                f"{stats.mode}: the hypergradient is zero: no hparam reaches outer_loss, "
                "through the inner problem or directly. Check that the closures use the hparams "
                "they receive; to learn an initialisation (MAML), pass the same tensors or module "
                "as params and hparams, not a copy of it as params",
            )
        elif unreached:
            self._warn_once(
                "zero-some",
                f"{stats.mode}: {', '.join(unreached)} reach(es) neither the inner steps nor "
                "outer_loss, so its hypergradient is zero: pass the hparam itself where it acts "
                "(an optimizer setting as momentum=hparams['momentum'], not as a number)",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, HypergradientWarning, stacklevel=user_stacklevel())

    def state_dict(self) -> dict[str, Any]:
        """The mode's state (warm-start solutions, optimizer state, generator state), with
        what it belongs to: the mode, its configuration (``signature``, e.g. the inner
        optimizer and backend) and the layout of the problem it was computed for.

        Saved with ``torch.save``; torchopt's optimizer states are named tuples, so reading a
        checkpoint of an unrolled mode needs ``torch.load(path, weights_only=False)``. The
        dict carries its ``"format"`` number (2); :meth:`load_state_dict` also reads the
        checkpoints of bilevel 0.1.0, which had none."""
        fits = self.mode.state_fits_one_layout()
        return pack(
            self.mode.name,
            self.mode.state_signature(),
            self._layout if fits else None,
            self.mode.state_dict(),
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. It must come from the same mode, and a state this
        HyperGradient will use from the same configuration (``ValueError`` otherwise, and
        nothing is loaded); the next call must then have the checkpoint's structure,
        shapes, dtype, and the device its tensors were loaded to (``torch.load(...,
        map_location=...)`` moves them). Checkpoints written by bilevel 0.1.0 load as they are."""
        state = upgrade(state)  # a checkpoint of any format this version reads, as a new dict
        if state["mode"] != self.mode.name:
            raise ValueError(f"state_dict is for mode {state['mode']!r}, not {self.mode.name!r}")
        previous = self.mode.state_dict()
        self.mode.load_state_dict(state["state"])
        saved, here = state["signature"], self.mode.state_signature()
        # a state this mode will use must come from its configuration (checkpoints written
        # before signatures are not checked; an empty or unused state fits any configuration)
        if saved is not None and saved != here and self.mode.state_fits_one_layout():
            self.mode.load_state_dict(previous)
            differ = ", ".join(
                f"{k} {saved.get(k)!r} there, {here.get(k)!r} here"
                for k in sorted(set(saved) | set(here))
                if saved.get(k) != here.get(k)
            )
            raise ValueError(
                f"state_dict was saved by a {self.mode.name!r} HyperGradient configured "
                f"otherwise ({differ}); its state does not fit this one. Build the "
                "HyperGradient with the checkpoint's configuration, or start without it"
            )
        self._layout = state["layout"]
        self._layout_source = "the loaded checkpoint"
        self._loaded = True
