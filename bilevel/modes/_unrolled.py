"""Unrolled differentiation: run T differentiable inner-optimizer steps and backpropagate.

θ_{t+1} = Φ(θ_t, φ) for t < T from θ_0 = params; the hypergradient is d g(θ_T, φ)/dφ through
the steps. Truncation keeps the graph of the last K steps only (θ_{T−K} is detached), so
memory grows with K, not T. Backends: torchopt's functional optimizers (default) and
higher's differentiable optimizers. Shared by the ``unroll`` and ``truncated-unroll`` modes.
"""
from __future__ import annotations

import collections.abc
import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import Tensor

from .._src.compiled import CompiledPath, compiled_path
from .._src.errors import check_finite, deferred_finite_checks, second_order_guard
from .._src.memory import SavedTensorMemory
from .base import Mode, check_flag, check_positive
from .._src.problem import BilevelProblem, reached
from .._src.tree_math import axpy
from .._src.typing import Tensors
from .._src.stats import Stats

BACKENDS = ("torchopt", "higher")
_NO_PARAMS_REACHED = (
    "inner_loss does not depend on params: the inner steps would leave them unchanged and the "
    "hypergradient would be only the direct term. If the closures call an nn.Module, pass the "
    "module itself as params (the library evaluates a module at the values it needs), not "
    "list(module.parameters()); otherwise compute inner_loss from the params it receives")
# torch optimizer options that higher's differentiable optimizers do not implement
_HIGHER_IGNORES = ("maximize", "decoupled_weight_decay")
DEFAULT_LR = 0.1  # for the default inner optimizer, torch.optim.SGD


def _torchopt_factories() -> dict[type, Callable]:
    import torchopt

    return {torch.optim.SGD: torchopt.sgd, torch.optim.Adam: torchopt.adam,
            torch.optim.AdamW: torchopt.adamw, torch.optim.RMSprop: torchopt.rmsprop,
            torch.optim.Adagrad: torchopt.adagrad}


def _is_transformation(optimizer: Any) -> bool:
    return hasattr(optimizer, "init") and hasattr(optimizer, "update") and not isinstance(optimizer, type)


def _optimizer_class(optimizer: Any) -> type | None:
    """The torch optimizer class behind a class or a ``functools.partial`` of one."""
    base = optimizer.func if isinstance(optimizer, functools.partial) else optimizer
    return base if isinstance(base, type) and issubclass(base, torch.optim.Optimizer) else None


def optimizer_option_names(optimizer: Any) -> list[str]:
    """Keyword arguments a torch optimizer class accepts (none for a GradientTransformation)."""
    cls = _optimizer_class(optimizer)
    if cls is None:
        return []
    return [n for n in _parameters(cls.__init__) if n not in ("self", "params")]


@functools.lru_cache(maxsize=64)
def _parameters(function: Callable) -> Any:
    """``inspect.signature(function).parameters``, cached (a stepper is built at every call)."""
    return inspect.signature(function).parameters


def _check_supported(optimizer: Any, backend: str) -> None:
    """Refuse, at construction, a torch optimizer class that ``backend`` has no differentiable
    version of, naming the backend that has one (or both lists when neither has)."""
    import higher.optim

    cls = _optimizer_class(optimizer)
    if cls is None:
        return  # a GradientTransformation
    supported = {"torchopt": list(_torchopt_factories()), "higher": list(higher.optim._opt_mapping)}
    if cls in supported[backend]:
        return
    other = next(b for b in BACKENDS if b != backend)
    names = {b: ", ".join(c.__name__ for c in classes) for b, classes in supported.items()}
    fix = (f"use backend={other!r}, which has it" if cls in supported[other] else
           f"neither backend has it: use one of {names['torchopt']} (torchopt) or {names['higher']} (higher)")
    raise TypeError(f"inner_optimizer {cls.__name__} has no differentiable version on backend={backend!r}; "
                    f"{fix}")


def _set_first_call(function: Any, value: bool, seen: set[int] | None = None) -> None:
    """Set every ``first_call`` flag in the closures of a torchopt update function to ``value``.

    torchopt's momentum keeps "this is the first update" (torch's first-step rule: buffer = g,
    no dampening) in a closure of the transformation, not in its state. A run from a fresh
    state needs it True, a run that continues from an advanced state False, whatever earlier
    calls did with the transformation."""
    seen = set() if seen is None else seen
    if id(function) in seen:
        return
    seen.add(id(function))
    if isinstance(function, (tuple, list)):
        for item in function:
            _set_first_call(item, value, seen)
        return
    code, cells = getattr(function, "__code__", None), getattr(function, "__closure__", None)
    if code is None or not cells:
        return
    for name, cell in zip(code.co_freevars, cells):
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if name == "first_call" and isinstance(content, bool):
            cell.cell_contents = value
        elif callable(content) or isinstance(content, (tuple, list)):
            _set_first_call(content, value, seen)


def _is_plain_sgd(settings: dict[str, Any]) -> bool:
    """Whether torchopt.sgd with these settings (numbers) is θ ← θ − lr·g with an empty state."""
    lr = settings.get("lr")
    return (isinstance(lr, (int, float)) and not isinstance(lr, bool)
            and all(_is_zero(settings.get(name, 0.0)) for name in ("momentum", "weight_decay"))
            and not settings.get("maximize", False) and not settings.get("nesterov", False))


def _optimizer_kwargs(optimizer: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The class's keywords: those of a ``partial`` overridden by the user's options."""
    kwargs = dict(optimizer.keywords) if isinstance(optimizer, functools.partial) else {}
    kwargs.update(options)
    return kwargs


# --------------------------------------------------------------------------- steppers
class _TorchoptStepper:
    """θ, state ↦ θ', state' with a torchopt GradientTransformation (out of place)."""

    def __init__(self, optimizer: Any, options: dict[str, Any], hyper: dict[str, Tensor]) -> None:
        self.unused = True  # no update has run through this stepper yet
        self.plain_lr: float | None = None  # set for plain SGD: θ − lr·g, computed directly
        if _is_transformation(optimizer):
            self.transform = optimizer
            return
        cls = _optimizer_class(optimizer)
        factories = _torchopt_factories()
        if cls not in factories:
            raise TypeError(f"inner_optimizer {cls.__name__ if cls else repr(optimizer)} has no torchopt "
                            f"equivalent; use one of {', '.join(c.__name__ for c in factories)}, a "
                            "torchopt GradientTransformation, or backend='higher'")
        factory = factories[cls]
        accepted = _parameters(factory)
        kwargs = {**_optimizer_kwargs(optimizer, options), **hyper}
        defaults = {n: p.default for n, p in _parameters(cls.__init__).items()}
        # the torch class's defaults where torchopt has none or another (torchopt.sgd needs lr)
        passed = {n: d for n, d in defaults.items() if n in accepted and d is not inspect.Parameter.empty}
        for name, value in kwargs.items():
            if name in accepted:
                passed[name] = value
            elif name in ("foreach", "fused", "differentiable", "capturable"):
                continue  # implementation switches of torch.optim, meaningless here
            elif value != defaults.get(name, inspect.Parameter.empty):
                raise TypeError(f"torchopt's {factory.__name__} has no option {name}={value!r}; "
                                "use backend='higher' or leave it at its default")
        self.transform = factory(**passed)
        if cls is torch.optim.SGD and not hyper and _is_plain_sgd(passed):
            self.plain_lr = float(passed["lr"])

    def init(self, theta: Tensors) -> Any:
        import torchopt

        state = self.transform.init(theta)
        if theta[0].dtype != torch.float64:
            return state
        # torchopt keeps step counts as int64 tensors, and `decay ** count` then comes out in
        # the default dtype (float32): Adam's bias correction would cap float64 runs at float32
        # accuracy. Counts stored in float64 are exact (below 2**53) and keep float64 throughout.
        return torchopt.pytree.tree_map(
            lambda t: t.to(torch.float64) if isinstance(t, Tensor) and t.dtype == torch.int64 else t, state)

    def advance(self, loss: Tensor, theta: Tensors, state: Any, graph: bool,
                fresh_state: bool) -> tuple[Tensors, Any]:
        """One step on ``loss``; ``graph``: keep the step differentiable."""
        import torchopt

        grads = torch.autograd.grad(loss, theta, create_graph=graph, allow_unused=True)
        grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, theta))
        if self.plain_lr is not None:
            # torchopt.sgd's update without momentum, weight decay or maximize is −lr·g and its
            # state is empty: one fused launch on CUDA instead of a multiply and an add per tensor
            return axpy(-self.plain_lr, grads, theta), state
        if self.unused:  # the transformation may be new, or the user's, used by earlier calls
            _set_first_call(self.transform.update, fresh_state)
            self.unused = False
        updates, state = self.transform.update(grads, state, params=theta, inplace=False)
        return tuple(torchopt.apply_updates(theta, updates, inplace=False)), state

    @staticmethod
    def detach_state(state: Any) -> Any:
        import torchopt

        return torchopt.pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, state)


class _HigherStepper:
    """θ, state ↦ θ', state' with higher's differentiable version of a torch optimizer."""

    def __init__(self, optimizer: Any, options: dict[str, Any], hyper: dict[str, Tensor],
                 theta: Tensors) -> None:
        import higher.optim

        if _is_transformation(optimizer):
            raise TypeError("a torchopt GradientTransformation cannot run on backend='higher'; use "
                            "backend='torchopt', or pass a torch optimizer class such as torch.optim.SGD")
        cls = _optimizer_class(optimizer)
        if cls is None or cls not in higher.optim._opt_mapping:
            supported = ", ".join(c.__name__ for c in higher.optim._opt_mapping)
            raise TypeError(f"higher has no differentiable version of {optimizer!r}; supported: {supported}")
        kwargs = _optimizer_kwargs(optimizer, options)
        signature = _parameters(cls.__init__)
        for name in _HIGHER_IGNORES:
            if name in kwargs and name in signature and kwargs[name] != signature[name].default:
                raise TypeError(f"higher's differentiable {cls.__name__} ignores {name}={kwargs[name]!r}; "
                                "use backend='torchopt' or leave it at its default")
        kwargs.update({k: float(v.detach()) for k, v in hyper.items()})  # real values come via override
        self.placeholders = [torch.zeros_like(t) for t in theta]
        self.optimizer = cls(self.placeholders, **kwargs)
        self.override = {k: [v] for k, v in hyper.items()}
        self._diffopts: dict[bool, Any] = {}

    def diffopt(self, graph: bool) -> Any:
        import higher.optim

        if graph not in self._diffopts:
            self._diffopts[graph] = higher.optim.get_diff_optim(
                self.optimizer, self.placeholders, override=self.override or None,
                track_higher_grads=graph)
        return self._diffopts[graph]

    def init(self, theta: Tensors) -> list[dict[str, Any]]:
        """The state torch's constructor sets up (Adagrad's sums; empty for most optimizers),
        with a tensor step count as a number: higher increments it in place."""
        return [{k: (float(v) if k == "step" else v.clone()) if isinstance(v, Tensor) else v
                 for k, v in self.optimizer.state[p].items()} for p in self.placeholders]

    def advance(self, loss: Tensor, theta: Tensors, state: list[dict[str, Any]], graph: bool,
                fresh_state: bool) -> tuple[Tensors, list[dict[str, Any]]]:
        """One step on ``loss``; ``graph``: keep the step differentiable (``fresh_state``
        does not matter here: higher's optimizers keep everything in their state)."""
        opt = self.diffopt(graph)
        for i, entry in enumerate(state):
            opt.state[0][i] = dict(entry)
        new = opt.step(loss, params=list(theta))
        return tuple(new), [dict(opt.state[0][i]) for i in range(len(theta))]

    @staticmethod
    def detach_state(state: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v.detach() if isinstance(v, Tensor) else v for k, v in entry.items()} for entry in state]


def _total_gradient(outer: Tensor, phi: Tensors, originals: Tensors) -> Tensors:
    """d outer / dφ through the copies ``phi`` plus any path through the user's own hparams
    tensors ``originals``: a torchopt transformation built with one of them
    (``torchopt.sgd(lr=lr_tensor)``) holds the original, not the copy, so both paths count."""
    extra = [i for i, (t, c) in enumerate(zip(originals, phi)) if t is not c]
    grads = torch.autograd.grad(outer, tuple(phi) + tuple(originals[i] for i in extra), allow_unused=True)
    total = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, phi)]
    for i, g in zip(extra, grads[len(phi):]):
        if g is not None:
            total[i] = total[i] + g
    return tuple(total)


# ------------------------------------------------------------------- compiled SGD program
#: torch.optim.SGD's settings that the compiled program implements, with torch's defaults
_SGD_SETTINGS = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                 "nesterov": False, "maximize": False}
_SGD_SWITCHES = ("foreach", "fused", "differentiable")  # implementation switches, no math


def sgd_unroll_program(problem: BilevelProblem, theta: Tensors, phi: Tensors, buffers: dict[str, Tensor],
                       steps: int, graph_from: int, settings: dict[str, tuple[str, Any]],
                       batches: tuple | None) -> tuple[Tensors, Tensors]:
    """``(dg(θ_T, φ)/dφ, θ_T)`` through ``steps`` steps of ``torch.optim.SGD``, as one pure
    function (``torch.func``) for the compiled path; steps before ``graph_from`` carry no
    graph (truncation). ``settings`` maps an SGD option to ``("value", number)``,
    ``("hparam", index into φ)`` or ``("callable", fn of the hparams)``. Torch's rule:
    g ← ∇f + wd·θ; b ← g at the first step, else μ·b + (1 − dampening)·g; g ← g + μ·b
    (Nesterov) or b; θ ← θ − lr·g (+ with ``maximize``).
    """

    def setting(name: str, ph: Tensors) -> Any:
        kind, value = settings.get(name, ("value", _SGD_SETTINGS[name]))
        if kind == "hparam":
            return ph[value].reshape(())
        if kind == "callable":
            return value(problem.hparams_structure.unflatten(ph)).reshape(())
        return value

    def unrolled_outer(ph: Tensors) -> tuple[Tensor, Tensors]:
        th, buf = theta, None
        for step in range(steps):
            if step == graph_from:
                th = tuple(t.detach() for t in th)
                buf = None if buf is None else tuple(b.detach() for b in buf)
            at = ph if step >= graph_from else tuple(t.detach() for t in ph)
            extra = batches[step] if batches is not None else ()
            grads = torch.func.grad(
                lambda t: problem.call("inner_loss", t, at, extra, buffers).reshape(()))(th)
            lr, momentum = setting("lr", at), setting("momentum", at)
            decay, dampening = setting("weight_decay", at), setting("dampening", at)
            if not _is_zero(decay):
                grads = tuple(g + decay * t for g, t in zip(grads, th))
            if not _is_zero(momentum):
                buf = grads if buf is None else tuple(momentum * b + (1 - dampening) * g
                                                      for b, g in zip(buf, grads))
                grads = tuple(g + momentum * b for g, b in zip(grads, buf)) if setting("nesterov", at) else buf
            sign = 1.0 if setting("maximize", at) else -1.0
            th = tuple(t + sign * lr * g for t, g in zip(th, grads))
        return problem.call("outer_loss", th, ph, (), buffers).reshape(()), th

    hypergradient, theta_final = torch.func.grad(unrolled_outer, has_aux=True)(phi)
    return hypergradient, tuple(t.detach() for t in theta_final)


def _hparam_index(problem: BilevelProblem, value: Tensor) -> int | None:
    """The position of the very tensor ``value`` among the user's hparams (None if absent)."""
    return next((i for i, t in enumerate(problem.phi0) if t is value), None)


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == 0


# ------------------------------------------------------------------------------ mode base
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
        graph of the unrolled steps holds (any device; costs a hook per saved tensor).
    compile: run the call as one compiled program (``torch.compile``; a CUDA graph on CUDA)
        after a first eager call; ``True`` or a dict of ``torch.compile`` keywords (see
        :mod:`bilevel.compiled`). For ``torch.optim.SGD`` (``lr``, ``momentum``,
        ``dampening``, ``weight_decay``, ``nesterov``, ``maximize``, as numbers or
        hyperparameters), written directly in ``torch.func`` on either backend; other
        optimizers, ``measure_memory`` and ``update_params`` with momentum run eagerly, with
        a warning when the ``HyperGradient`` is built.

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

    A scalar optimizer setting can be a hyperparameter, in two ways: the very tensor that is
    in ``hparams`` (``lr=lr_tensor``), or a callable of the hparams, called with them in the
    structure of ``hparams`` at every call (``lr=lambda h: h["log_lr"].exp()``; a module gives
    a name -> tensor dict). torchopt differentiates ``lr``, ``momentum`` and Adam's ``eps``;
    higher also ``weight_decay``, ``dampening`` and RMSprop's ``alpha``; a setting the chosen
    backend cannot differentiate raises ``ValueError`` naming the backend that can.
    """

    supports_nonsymmetric: ClassVar[bool] = False
    steps: int = 10
    inner_optimizer: Any = None
    backend: str = "torchopt"
    inner_batches: Iterable | None = None
    update_params: bool = False
    measure_memory: bool = False
    compile: bool | dict = False
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    _state: Any = field(default=None, init=False, repr=False)
    _fast: CompiledPath | None = field(default=None, init=False, repr=False)
    _batches: Iterator | None = field(default=None, init=False, repr=False)
    _probed: dict[tuple[str, str], bool] = field(default_factory=dict, init=False, repr=False)
    _unverified: bool = field(default=False, init=False, repr=False)  # a loaded optimizer state

    def __post_init__(self) -> None:
        check_positive("steps", self.steps, integer=True)
        check_flag("update_params", self.update_params)
        check_flag("measure_memory", self.measure_memory)
        if self.inner_batches is not None and not isinstance(self.inner_batches, collections.abc.Iterable):
            raise TypeError("option inner_batches must be an iterable of mini-batches (a list, a "
                            f"generator or a DataLoader), got {type(self.inner_batches).__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(f"option backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.inner_optimizer is None:
            self.inner_optimizer = torch.optim.SGD
            self.optimizer_options.setdefault("lr", DEFAULT_LR)
        if not _is_transformation(self.inner_optimizer) and _optimizer_class(self.inner_optimizer) is None:
            raise TypeError("option inner_optimizer must be a torch optimizer class (or a "
                            "functools.partial of one) or a torchopt GradientTransformation, got "
                            f"{self.inner_optimizer!r}")
        if self.backend == "higher" and _is_transformation(self.inner_optimizer):
            raise TypeError("a torchopt GradientTransformation cannot run on backend='higher'; use "
                            "backend='torchopt', or pass a torch optimizer class")
        _check_supported(self.inner_optimizer, self.backend)
        self._fast = compiled_path(sgd_unroll_program, self.compile)
        reason = self._not_compilable() if self._fast is not None else None
        if reason:
            self.notes = (f"compile=True: {self.name} runs eagerly because {reason}",)
            self._fast = None

    def _not_compilable(self) -> str | None:
        """Why the compiled SGD program cannot run this configuration (None if it can)."""
        if _optimizer_class(self.inner_optimizer) is not torch.optim.SGD:
            return "the compiled program implements torch.optim.SGD only"
        kwargs = _optimizer_kwargs(self.inner_optimizer, self.optimizer_options)
        unknown = sorted(set(kwargs) - set(_SGD_SETTINGS) - set(_SGD_SWITCHES))
        if unknown:
            return f"it does not implement SGD's {', '.join(unknown)}"
        if self.measure_memory:
            return "measure_memory=True needs the eager graph"
        if self.update_params and not _is_zero(kwargs.get("momentum", 0.0)):
            return "update_params=True with momentum carries a backend's optimizer state"
        return None

    def _program_settings(self, problem: BilevelProblem) -> dict[str, tuple[str, Any]] | None:
        """The SGD options as :func:`sgd_unroll_program` takes them; None (run eagerly, which
        explains the error) for a tensor that requires grad but is not in the hparams."""
        spec = {}
        for name, value in _optimizer_kwargs(self.inner_optimizer, self.optimizer_options).items():
            if name in _SGD_SWITCHES:
                continue
            if callable(value) and not isinstance(value, (Tensor, type)):
                spec[name] = ("callable", value)
            elif isinstance(value, Tensor):
                index = _hparam_index(problem, value)
                if index is None and value.requires_grad:
                    return None
                spec[name] = ("value", value.item()) if index is None else ("hparam", index)
            else:
                spec[name] = ("value", value)
        return spec

    @classmethod
    def option_names(cls) -> list[str]:
        return [n for n in super().option_names() if n != "optimizer_options"]

    @classmethod
    def from_options(cls, **options: Any) -> "UnrolledMode":
        own = {k: v for k, v in options.items() if k in cls.option_names()}
        rest = {k: v for k, v in options.items() if k not in own}
        optimizer = own.get("inner_optimizer") or torch.optim.SGD
        valid = optimizer_option_names(optimizer)
        unknown = sorted(set(rest) - set(valid))
        if unknown:
            raise TypeError(f"mode {cls.name!r} got unknown option(s) {', '.join(unknown)}; its options "
                            f"are: {', '.join(cls.option_names())}" +
                            (f"; the inner optimizer's are: {', '.join(valid)}" if valid else ""))
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
            raise ValueError("inner_batches ran out of batches; pass a re-iterable (a list or a "
                             "DataLoader) or an endless iterator") from None

    def _settings(self, problem: BilevelProblem, phi: Tensors) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The optimizer's options split into numbers and hyperparameter settings: a tensor of
        ``hparams`` (mapped to its differentiable copy in ``phi``) or a callable of the hparams
        (evaluated at ``phi``) that returns a scalar tensor requiring grad."""
        options, hyper = {}, {}
        view = None
        for name, value in self.optimizer_options.items():
            if callable(value) and not isinstance(value, (Tensor, type)):
                if view is None:
                    view = problem.hparams_structure.unflatten(phi)
                value = value(view)
            elif isinstance(value, Tensor):
                index = _hparam_index(problem, value)
                if index is not None:
                    value = phi[index]
                elif value.requires_grad:
                    raise ValueError(
                        f"option {name} is a tensor that requires grad but is not one of the hparams "
                        f"tensors; pass that very tensor (in hparams), a callable of the hparams such "
                        f"as {name}=lambda h: h['log_{name}'].exp(), or a float")
            elif isinstance(value, (tuple, list)) and any(
                    isinstance(v, Tensor) and v.requires_grad for v in value):
                raise ValueError(f"option {name} holds a tensor that requires grad; only scalar "
                                 "settings (lr, momentum, ...) can be hyperparameters: pass numbers")
            if isinstance(value, Tensor) and value.requires_grad:
                if value.numel() != 1:
                    raise ValueError(f"option {name} must be a scalar tensor to be a hyperparameter, "
                                     f"got shape {tuple(value.shape)}")
                hyper[name] = value.reshape(())
            else:
                options[name] = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
        return options, hyper

    def _stepper(self, backend: str, options: dict[str, Any], hyper: dict[str, Tensor],
                 theta: Tensors) -> _TorchoptStepper | _HigherStepper:
        if backend == "higher":
            return _HigherStepper(self.inner_optimizer, options, hyper, theta)
        return _TorchoptStepper(self.inner_optimizer, options, hyper)

    def _differentiates(self, backend: str, options: dict[str, Any], name: str, value: Tensor) -> bool:
        """Whether ``backend`` carries gradients from the setting ``name`` to the parameters:
        two steps on ½θ² from θ = 1 with the setting as a fresh leaf, then look for a graph path."""
        setting = value.detach().clone().requires_grad_()
        theta = (torch.ones(1, dtype=value.dtype, device=value.device, requires_grad=True),)
        try:
            stepper = self._stepper(backend, options, {name: setting}, theta)
            state = stepper.init(theta)
            with torch.enable_grad():
                for fresh in (True, False):
                    theta, state = stepper.advance(0.5 * (theta[0] ** 2).sum(), theta, state, True, fresh)
                return torch.autograd.grad(theta[0].sum(), setting, allow_unused=True)[0] is not None
        except (TypeError, ValueError, RuntimeError, KeyError):
            return False

    def _check_differentiable(self, options: dict[str, Any], hyper: dict[str, Tensor]) -> None:
        for name, value in hyper.items():
            if (self.backend, name) not in self._probed:
                self._probed[(self.backend, name)] = self._differentiates(self.backend, options, name, value)
            if not self._probed[(self.backend, name)]:
                others = [b for b in BACKENDS if b != self.backend
                          and not (b == "higher" and _is_transformation(self.inner_optimizer))
                          and self._differentiates(b, options, name, value)]
                fix = f"use backend={others[0]!r}, which can" if others else "no backend can: pass a number"
                raise ValueError(f"backend={self.backend!r} cannot differentiate the inner optimizer's "
                                 f"{name} (a hyperparameter here); {fix}")

    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        self.check_problem(problem)
        stats.iters = self.steps
        stats.extra["graph_steps"] = self.graph_steps()
        settings = self._program_settings(problem) if self._fast is not None else None
        batches = None
        if settings is not None:
            batches = [self._next_batch() for _ in range(self.steps)]
            out = self._fast(problem, self.steps, self.steps - self.graph_steps(), settings,
                             tuple(batches) if self.inner_batches is not None else None)
            if out is not None:
                result, theta = out
                check_finite(result, "the unrolled hypergradient")
                if self.update_params:
                    problem.write_back(theta)
                stats.extra["compiled"] = True
                return result
        theta, phi = problem.leaf_copies()
        options, hyper = self._settings(problem, phi)
        stepper = self._stepper(self.backend, options, hyper, theta)  # configuration errors first
        self._check_differentiable(options, hyper)
        if batches is None:  # after the configuration checks: a refused call consumes none
            batches = [self._next_batch() for _ in range(self.steps)]
        # steps without graph use the settings' values only
        cheap = self._stepper(self.backend, options, {k: v.detach() for k, v in hyper.items()},
                              theta) if hyper else stepper
        carried = self.update_params and self._state is not None
        if carried and self._unverified:
            _check_loaded_state(self._state, stepper, theta)
            self._unverified = False
        state = self._state if carried else stepper.init(theta)
        fresh_state = not carried
        first_graph_step = self.steps - self.graph_steps()
        phi_constant = tuple(t.detach() for t in phi)
        meter = SavedTensorMemory() if self.measure_memory else contextlib.nullcontext()
        # NaN/inf checks are read once, after the backward pass: no host sync per step
        with deferred_finite_checks(), torch.enable_grad(), meter:
            for step in range(self.steps):
                graph = step >= first_graph_step
                if step == first_graph_step:
                    theta = tuple(t.detach().requires_grad_() for t in theta)
                    state = stepper.detach_state(state)
                loss = problem.inner(theta, phi if graph else phi_constant, *batches[step])
                if step == 0 and not any(reached(loss, theta)):
                    raise ValueError(_NO_PARAMS_REACHED)
                check_finite((loss,), f"the value of inner_loss at unrolled step {step}")
                with second_order_guard("differentiating through an inner optimizer step"):
                    theta, state = (stepper if graph else cheap).advance(loss, theta, state, graph, fresh_state)
                fresh_state = False
                if not graph:
                    theta = tuple(t.detach().requires_grad_() for t in theta)
                    state = stepper.detach_state(state)
            inner_buffers = {k: v.clone() for k, v in problem.buffers.items()}  # before outer_loss runs
            outer = problem.outer(theta, phi)
            check_finite((outer,), "the value of outer_loss after the unrolled steps")
            with second_order_guard("backpropagating through the unrolled steps"):
                result = _total_gradient(outer, phi, problem.phi0)
            check_finite(result, "the unrolled hypergradient")
        if self.update_params:
            problem.write_back(theta, inner_buffers)
            self._state = stepper.detach_state(state)
        if self.measure_memory:
            stats.extra["saved_bytes_peak"] = meter.peak
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer_state": self._state} if self._state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = state.get("optimizer_state")
        self._unverified = self._state is not None  # checked against a fresh state on first use

    def state_signature(self) -> dict[str, str]:
        optimizer = ("a torchopt GradientTransformation" if _is_transformation(self.inner_optimizer)
                     else _optimizer_class(self.inner_optimizer).__name__)
        return {"inner_optimizer": optimizer, "backend": self.backend}

    def state_fits_one_layout(self) -> bool:
        return self.update_params and self._state is not None  # unused otherwise


def _check_loaded_state(loaded: Any, stepper: Any, theta: Tensors) -> None:
    """A loaded optimizer state must have the form of this call's optimizer state (another
    optimizer, or other options such as momentum or amsgrad, differ) and tensors shaped like
    the params. higher's optimizers create their state at the first step, so there the form
    is that after one step on zero-valued copies of the params."""
    import torchopt

    fresh = stepper.init(theta)
    if isinstance(stepper, _HigherStepper):
        probe = tuple(torch.zeros_like(t, requires_grad=True) for t in theta)
        with torch.enable_grad():
            _, fresh = stepper.advance(sum((t * t).sum() for t in probe), probe, fresh, False, True)
    (leaves, form), (fresh_leaves, fresh_form) = (torchopt.pytree.tree_flatten(s) for s in (loaded, fresh))
    if form != fresh_form:
        raise ValueError(
            f"the loaded optimizer state does not fit this HyperGradient's inner optimizer: it is "
            f"{form}, but the optimizer with these options keeps {fresh_form}. Build the "
            "HyperGradient with the options the checkpoint was saved with (momentum, betas, "
            "amsgrad, ...), or start without the checkpoint")
    for a, b in zip(leaves, fresh_leaves):
        if isinstance(a, Tensor) or isinstance(b, Tensor):
            if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype):
                raise ValueError("the loaded optimizer state holds tensors whose shapes or dtypes differ "
                                 f"from the params' ({', '.join(f'{tuple(t.shape)} {t.dtype}' for t in theta)}); "
                                 "load a checkpoint saved for these params")
