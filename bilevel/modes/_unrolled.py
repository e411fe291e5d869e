"""Unrolled differentiation: run T differentiable inner-optimizer steps and backpropagate.

θ_{t+1} = Φ(θ_t, φ) for t < T from θ_0 = params; the hypergradient is d g(θ_T, φ)/dφ through
the steps. Truncation keeps the graph of the last K steps only (θ_{T−K} is detached), so
memory grows with K, not T. Shared by the ``unroll`` and ``truncated-unroll`` modes; the
loop and the plain backward pass are in ``_steps.py``, the checkpointed backward pass in
``_checkpointed.py``, forward mode in ``_forward.py``, the backends (torchopt's functional
optimizers, higher's differentiable ones) in ``_torchopt_backend.py`` and
``_higher_backend.py``, the compiled SGD program in ``_sgd_program.py``, the option handling
in ``_optimizer_options.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._src.compiled import CompiledPath, compiled_path
from .._src.conditions import ConditionProblem
from .._src.errors import check_finite, deferred_finite_checks, second_order_guard
from .._src.memory import SavedTensorMemory
from .._src.problem import BilevelProblem
from .._src.stats import Stats
from .._src.typing import Tensors
from ._backends import (
    Stepper,
    backend_notes,
    check_loaded_state,
    check_supported,
    differentiates,
    make_stepper,
)
from ._checkpointed import CheckpointedRun, check_checkpoint, segment_length, segment_starts
from ._fixed_point_unroll import unroll_condition
from ._forward import ForwardRun, check_direction, check_tangents
from ._optimizer_options import (
    BACKENDS,
    DEFAULT_LR,
    check_inner_optimizer,
    is_transformation,
    optimizer_class,
    split_mode_options,
    split_settings,
)
from ._sgd_program import not_compilable, program_settings, sgd_unroll_program
from ._steps import PlainRun
from ._tied import check_tied
from .base import Mode, check_flag, check_positive

__all__ = ["UnrolledMode"]


@dataclass
class UnrolledMode(Mode):
    """Options shared by the unrolled modes.

    steps: inner optimizer steps T (default 10).
    inner_optimizer: a torch optimizer class (or a ``functools.partial`` of one) whose own
        keyword arguments (``lr``, ``momentum``, ``betas``, ...) are passed to
        ``HyperGradient`` directly, or a torchopt ``GradientTransformation``. Default
        ``torch.optim.SGD`` with ``lr=0.1``.
    backend: ``"torchopt"`` (default) or ``"higher"``.
    inner_batches: an iterable of mini-batches; then each step calls
        ``inner_loss(params, hparams, batch)`` with the next batch (the iterator persists
        across calls and restarts when a re-iterable such as a DataLoader is exhausted).
        ``state_dict()`` does not record the position in it: a resumed run gets bit-exact
        results only if its batches are fed from the same point.
    update_params: write the final inner parameters (and module buffers) back into the
        user's params after the call, detached, and keep the optimizer state for the next
        call, so one call is one step of an online bilevel loop (default False).
    measure_memory: record in ``stats.extra["saved_bytes_peak"]`` the peak bytes that the
        graph of the unrolled steps holds (any device; costs a hook per saved tensor). What
        is held outside the graph is always recorded: the stored segment starts of
        ``checkpoint`` (``"checkpoint_bytes"``), the tangents of ``direction="forward"``
        (``"tangent_bytes"``).
    checkpoint: bound the graph's memory by recomputation (default None: keep every graph
        step's graph). An int k cuts the graph steps into segments of k (the first one shorter
        when k does not divide them); ``"auto"`` takes k ≈ √G for G graph steps. The forward
        pass keeps θ and the optimizer state at each segment's start and the last segment's
        graph; the backward pass reruns each earlier segment with graph, one at a time, and
        carries the adjoint of θ and of the optimizer state through it. Memory
        O(G/k·P + k·graph) instead of O(G·graph), for one extra pass without graph over
        the first G − k steps; the result is the plain unroll's to rounding. ``stats.extra``
        records ``"checkpoint_segment"`` (k). Assumes deterministic steps: a loss that draws
        random numbers (dropout) draws others when a segment is rerun.
    direction: ``"reverse"`` (default) backpropagates through the steps; ``"forward"``
        carries dθ_t/dφ forward, one tangent per hyperparameter entry (forward-mode AD
        through the inner gradient), so memory is O(P·n) for n entries whatever the steps,
        and time about n times the reverse unroll's: for a few learning rates, momenta or
        decays. ``checkpoint`` applies to ``"reverse"`` only; a torchopt transformation built
        with a hparams tensor is refused (pass the optimizer class with that tensor).
    max_tangents: the most hyperparameter entries ``direction="forward"`` accepts (default
        64); more raise ``ValueError``, and as many as the graph steps warn that reverse is
        likely cheaper.
    compile: run the call as one compiled program (``torch.compile``; a CUDA graph on CUDA)
        after a first eager call; ``True`` or a dict of ``torch.compile`` keywords (see
        :mod:`bilevel._src.compiled`). For ``torch.optim.SGD`` (``lr``, ``momentum``,
        ``dampening``, ``weight_decay``, ``nesterov``, ``maximize``, as numbers or
        hyperparameters), written directly in ``torch.func`` on either backend; other
        optimizers, ``measure_memory``, ``checkpoint``, ``direction="forward"`` and
        ``update_params`` with momentum run eagerly, with a warning when the
        ``HyperGradient`` is built.

    On the torchopt backend, plain SGD (no momentum, weight decay or ``maximize``; ``lr`` a
    number) is stepped directly as θ − lr·g, torchopt's own update, in one fused call per step.

    Backends differ in one place: higher's Adam adds ``eps`` to √v before the bias correction
    (as torch.optim.Adam once did), torchopt after (as torch.optim.Adam does now), an
    O(eps/√v) difference; SGD (with momentum, Nesterov, weight decay) agrees to rounding.
    A class's options take torch's defaults on both backends (``torch.optim.SGD`` alone:
    ``lr=1e-3``). torchopt keeps its momentum's first-update flag inside a
    ``GradientTransformation``; it is reset at each fresh start, so a transformation (with
    ``dampening≠0`` too) gives the same steps on every call. A transformation built with a
    tensor of ``hparams`` (``torchopt.sgd(lr=lr_tensor)``) is differentiated through it.
    An optimizer class the backend has no differentiable version of is refused at
    construction, naming the backend that has one.

    The same tensors (or module) as params and hparams are the initialisation as a
    hyperparameter (MAML): the run starts at θ_0 = φ and the hypergradient flows through it;
    the closures' hparams argument is the init (a tied module as a name -> tensor dict).

    A scalar optimizer setting can be a hyperparameter, in two ways: the very tensor that is
    in ``hparams`` (``lr=lr_tensor``), or a callable of the hparams, called with them in the
    structure of ``hparams`` at every call (``lr=lambda h: h["log_lr"].exp()``; a module gives
    a name -> tensor dict). torchopt differentiates ``lr``, ``momentum`` and Adam's ``eps``;
    higher also ``weight_decay``, ``dampening`` and RMSprop's ``alpha``; a setting the chosen
    backend cannot differentiate raises ``ValueError`` naming the backend that can.
    """

    supports_nonsymmetric: ClassVar[bool] = False
    supports_tied: ClassVar[bool] = True  # MAML: the run starts at tied hparams (_tied.py)
    steps: int = 10
    inner_optimizer: Any = None
    backend: str = "torchopt"
    inner_batches: Iterable | None = None
    update_params: bool = False
    measure_memory: bool = False
    compile: bool | dict = False
    checkpoint: int | str | None = None
    direction: str = "reverse"
    max_tangents: int = 64
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    _state: Any = field(default=None, init=False, repr=False)
    _fast: CompiledPath | None = field(default=None, init=False, repr=False)
    _batches: Iterator | None = field(default=None, init=False, repr=False)
    _probed: dict[tuple[str, str], bool] = field(default_factory=dict, init=False, repr=False)
    _unverified: bool = field(default=False, init=False, repr=False)  # a loaded optimizer state

    # ------------------------------------------------------------------ options and checks
    def __post_init__(self) -> None:
        check_positive("steps", self.steps, integer=True)
        check_flag("update_params", self.update_params)
        check_flag("measure_memory", self.measure_memory)
        check_checkpoint(self.checkpoint)
        check_direction(self.direction, self.checkpoint)
        check_positive("max_tangents", self.max_tangents, integer=True)
        if self.inner_batches is not None and not isinstance(self.inner_batches, Iterable):
            raise TypeError(
                "option inner_batches must be an iterable of mini-batches (a list, a "
                f"generator or a DataLoader), got {type(self.inner_batches).__name__}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"option backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.inner_optimizer is None:
            self.inner_optimizer = torch.optim.SGD
            self.optimizer_options.setdefault("lr", DEFAULT_LR)
        self._check_optimizer()
        self._fast = compiled_path(sgd_unroll_program, self.compile)
        reason = self._not_compilable() if self._fast is not None else None
        if reason:
            self.notes = (f"compile=True: {self.name} runs eagerly because {reason}",)
            self._fast = None
        self.notes += backend_notes(self.backend, self.inner_optimizer)

    def _check_optimizer(self) -> None:
        """Refuse an inner optimizer that is neither a torch class nor a transformation, or
        that the chosen backend cannot run."""
        check_inner_optimizer(self.inner_optimizer)
        if self.backend == "higher" and is_transformation(self.inner_optimizer):
            raise TypeError(
                "a torchopt GradientTransformation cannot run on backend='higher'; use "
                "backend='torchopt', or pass a torch optimizer class"
            )
        check_supported(self.inner_optimizer, self.backend)

    def _not_compilable(self) -> str | None:
        """Why the compiled SGD program cannot run this configuration (None if it can)."""
        if self.direction == "forward":
            return "direction='forward' steps tangents eagerly"
        if self.checkpoint is not None:
            return "checkpoint recomputes segments eagerly"
        return not_compilable(
            self.inner_optimizer, self.optimizer_options, self.measure_memory, self.update_params
        )

    @classmethod
    def option_names(cls) -> list[str]:
        return [n for n in super().option_names() if n != "optimizer_options"]

    @classmethod
    def from_options(cls, **options: Any) -> UnrolledMode:
        own, rest = split_mode_options(cls.name, cls.option_names(), options)
        return cls(**own, optimizer_options=rest)

    # the number of final steps that carry the graph
    def graph_steps(self) -> int:
        raise NotImplementedError

    def _next_batch(self) -> tuple:
        if self.inner_batches is None:
            return ()
        if self._batches is None:
            self._batches = iter(self.inner_batches)
        try:
            return (next(self._batches),)
        except StopIteration:
            self._batches = iter(self.inner_batches)  # a DataLoader or list starts over
        try:
            return (next(self._batches),)
        except StopIteration:
            raise ValueError(
                "inner_batches ran out of batches; pass a re-iterable (a list or a "
                "DataLoader) or an endless iterator"
            ) from None

    def _check_differentiable(self, options: dict[str, Any], hyper: dict[str, Tensor]) -> None:
        """Refuse a hyperparameter setting that the backend would not differentiate (its
        gradient would silently be zero), naming a backend that can; probes are cached. A
        probe sees the other hyperparameter settings as their values (SGD's ``nesterov``
        needs its ``momentum``)."""
        for name, value in hyper.items():
            options = {**options, **{k: float(v.detach()) for k, v in hyper.items() if k != name}}
            if (self.backend, name) not in self._probed:
                self._probed[(self.backend, name)] = differentiates(
                    self.backend, self.inner_optimizer, options, name, value
                )
            if not self._probed[(self.backend, name)]:
                others = [
                    b
                    for b in BACKENDS
                    if b != self.backend
                    and not (b == "higher" and is_transformation(self.inner_optimizer))
                    and differentiates(b, self.inner_optimizer, options, name, value)
                ]
                fix = f"use backend={others[0]!r}, which can" if others else "no backend can: pass a number"
                raise ValueError(
                    f"backend={self.backend!r} cannot differentiate the inner optimizer's "
                    f"{name} (a hyperparameter here); {fix}"
                )

    # ------------------------------------------------------------------------- the call
    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        if isinstance(problem, ConditionProblem):  # Root/FixedPoint: _fixed_point_unroll.py
            return unroll_condition(self, problem, stats)
        self.check_problem(problem)
        check_tied(problem, self.steps - self.graph_steps(), self.update_params)
        stats.iters = self.steps
        stats.extra["graph_steps"] = self.graph_steps()
        batches, result = self._compiled_call(problem)
        if result is not None:
            stats.extra["compiled"] = True
            return result
        return self._eager_call(problem, stats, batches)

    def _compiled_call(self, problem: BilevelProblem) -> tuple[list[tuple] | None, Tensors | None]:
        """The batches drawn for the compiled program (None if it does not run) and its
        result (None if it does not run or hands the call back to the eager path, which then
        uses the same batches)."""
        fast = self._fast
        if fast is None:
            return None, None
        settings = program_settings(problem, self.inner_optimizer, self.optimizer_options)
        if settings is None:
            return None, None
        batches = [self._next_batch() for _ in range(self.steps)]
        out = fast(
            problem,
            self.steps,
            self.steps - self.graph_steps(),
            settings,
            tuple(batches) if self.inner_batches is not None else None,
        )
        if out is None:
            return batches, None
        result, theta = out
        check_finite(result, "the unrolled hypergradient")
        if self.update_params:
            problem.write_back(theta)
        return batches, result

    def _eager_call(self, problem: BilevelProblem, stats: Stats, batches: list[tuple] | None) -> Tensors:
        """The steps with autograd: configuration checks, the unrolled loop (plain,
        checkpointed or forward mode), then the hypergradient from outer_loss at θ_T."""
        theta, phi = problem.leaf_copies()
        options, hyper = split_settings(problem, phi, self.optimizer_options)
        stepper = make_stepper(self.backend, self.inner_optimizer, options, hyper, theta)  # errors first
        self._check_differentiable(options, hyper)
        if self.direction == "forward":
            check_tangents(sum(p.numel() for p in phi), self.graph_steps(), self.max_tangents)
        if batches is None:  # after the configuration checks: a refused call consumes none
            batches = [self._next_batch() for _ in range(self.steps)]
        # steps without graph use the settings' values only
        cheap = (
            make_stepper(
                self.backend, self.inner_optimizer, options, {k: v.detach() for k, v in hyper.items()}, theta
            )
            if hyper
            else stepper
        )
        state, fresh_state = self._initial_state(stepper, theta)
        run = self._run(problem, (stepper, cheap), phi, batches, bool(hyper))
        meter = SavedTensorMemory() if self.measure_memory else None
        measuring = contextlib.nullcontext() if meter is None else meter
        # NaN/inf checks are read once, after the backward pass: no host sync per step
        with deferred_finite_checks(), torch.enable_grad(), measuring:
            theta, state = run.forward(theta, state, fresh_state)
            inner_buffers = {k: v.clone() for k, v in problem.buffers.items()}  # before outer_loss runs
            outer = problem.outer(theta, phi)
            check_finite((outer,), "the value of outer_loss after the unrolled steps")
            with second_order_guard("backpropagating through the unrolled steps"):
                result = run.backward(outer)
            check_finite(result, "the unrolled hypergradient")
        if self.update_params:
            problem.write_back(theta, inner_buffers)
            self._state = stepper.detach_state(state)
        self._record(stats, run, meter)
        return result

    def _run(
        self,
        problem: BilevelProblem,
        steppers: tuple[Stepper, Stepper],
        phi: Tensors,
        batches: list[tuple],
        hyper: bool,
    ) -> PlainRun | CheckpointedRun | ForwardRun:
        """The loop this configuration runs: forward mode, checkpointed (segments shorter than
        the graph steps) or plain; ``hyper``: some optimizer setting is a hyperparameter."""
        graph_from = self.steps - self.graph_steps()

        def stepper_at(at: Tensors) -> Stepper:  # the settings evaluated at φ = ``at``
            options, settings = split_settings(problem, at, self.optimizer_options)
            return make_stepper(self.backend, self.inner_optimizer, options, settings, problem.theta0)

        remake = stepper_at if hyper else None
        if self.direction == "forward":
            return ForwardRun(problem, steppers, remake, phi, batches, graph_from)
        k = segment_length(self.checkpoint, self.graph_steps())
        if k is not None and k < self.graph_steps():
            starts = segment_starts(graph_from, self.steps, k)
            return CheckpointedRun(problem, *steppers, phi, batches, starts, remake)
        return PlainRun(problem, *steppers, phi, batches, graph_from)

    @staticmethod
    def _record(stats: Stats, run: PlainRun | CheckpointedRun | ForwardRun, meter: Any) -> None:
        """What ``stats.extra`` reports of the run: the segment length, the bytes held."""
        if isinstance(run, CheckpointedRun):
            stats.extra["checkpoint_segment"] = run.segment
            stats.extra["checkpoint_bytes"] = run.stored_bytes()
        elif isinstance(run, ForwardRun):
            stats.extra["tangent_bytes"] = run.tangent_bytes()
        if meter is not None:
            stats.extra["saved_bytes_peak"] = meter.peak
        if isinstance(run, PlainRun) and run.unreached:
            stats.extra["hparams_unreached"] = run.problem.hparams_names(run.unreached)
            stats.extra["hparams_all_unreached"] = len(run.unreached) == len(run.problem.phi0)

    def _initial_state(self, stepper: Stepper, theta: Tensors) -> tuple[Any, bool]:
        """The optimizer state the steps start from, and whether it is fresh: the state kept
        by ``update_params`` (a loaded one checked against this optimizer first), else a new one."""
        carried = self.update_params and self._state is not None
        if carried and self._unverified:
            check_loaded_state(self._state, stepper, theta)
            self._unverified = False
        return (self._state, False) if carried else (stepper.init(theta), True)

    # ------------------------------------------------------------------------- the state
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer_state": self._state} if self._state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = state.get("optimizer_state")
        self._unverified = self._state is not None  # checked against a fresh state on first use

    def state_signature(self) -> dict[str, str]:
        cls = optimizer_class(self.inner_optimizer)
        if is_transformation(self.inner_optimizer) or cls is None:
            optimizer = "a torchopt GradientTransformation"
        else:
            optimizer = cls.__name__
        return {"inner_optimizer": optimizer, "backend": self.backend}

    def state_fits_one_layout(self) -> bool:
        return self.update_params and self._state is not None  # unused otherwise
