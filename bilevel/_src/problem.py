"""The bilevel problem as the modes see it: flat tuples of tensors and pure closures.

``BilevelProblem`` takes the user's closures and structures once, checks them, and offers
``inner(θ, φ)``, ``outer(θ, φ)`` and ``stationarity(θ, φ)`` on flat tuples, evaluating
``nn.Module`` arguments at the given tensors without touching the modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NoReturn

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call

from .binding import bind_modules, bound_modules
from .errors import (
    check_finite,
    check_loss,
    closure_runtime_error,
    closure_type_error,
    second_order_guard,
)
from .graph import code_of, custom_functions, screen_once
from .pytree import flatten
from .tied import find_ties, hparams_modules_tied
from .typing import Closure, Tensors

__all__ = ["BilevelProblem"]


class _ClosureCall(nn.Module):
    """Holds the user's modules as children so ``functional_call`` can rebind all of them,
    calling the closure its first argument names: for a traced evaluation, and for modules
    that redefine how they list their members (binding.py)."""

    def __init__(self, problem: BilevelProblem, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.problem = problem
        self.bound = nn.ModuleList(modules)

    def forward(self, name: str, params: Any, hparams: Any, *extra: Any) -> Tensor:
        return self.problem.run_closure(name, (params, hparams, *extra))


class BilevelProblem:
    """``min_φ g(θ*(φ), φ)`` with ``θ*(φ) = argmin_θ f(θ, φ)``, in flat form.

    Args:
        inner_loss: ``f(params, hparams) -> scalar``; may be None when ``stationarity`` is given.
        outer_loss: ``g(params, hparams) -> scalar``.
        params: θ: a tensor, an ``nn.Module``, or a pytree of them (see ``HyperGradient.compute``).
        hparams: φ: same kinds as ``params``.
        stationarity: the extension hook for inner problems whose solution is not the
            minimiser of one loss: ``G(params, hparams)``, with ``θ*(φ)`` defined by
            ``G(θ*, φ) = 0``, returning one tensor per params tensor (in the structure of
            ``params``, or as a flat sequence in its order) with its graph
            (``create_graph=True``). It is evaluated like the losses: a module argument is the
            module with its parameters bound to the point of evaluation, so
            ``dict(model.named_parameters())`` are the tensors to differentiate. Default:
            ``G = ∇θ f``. The implicit modes for non-symmetric systems differentiate through
            it (``Jᵀ x = ∂g/∂θ`` with ``J = ∂G/∂θ``); the others refuse.
        symmetric: whether ``∂G/∂θ`` is symmetric (default: True for ``∇θ f``, False for a
            ``stationarity`` map).

    ``theta0`` and ``phi0`` are the user's tensors (never modified here). Module buffers
    (BatchNorm statistics) are evaluated on private copies in ``buffers``, so calling the
    closures leaves the modules exactly as they were. A tensor in both params and hparams is
    tied (``tied``, {hparams index: params index}): the unrolled modes start the inner run at
    it (MAML), the others refuse; a tied module is bound to θ, and the closures' hparams
    argument holds its φ tensors as a name -> tensor dict (``tied.py``). Subclasses may also
    override :meth:`stationarity`; such a problem runs on the eager path (``traceable`` is False).
    """

    symmetric = True  # the stationarity map is a gradient, so its Jacobian is symmetric
    channel: Any = None  # data parallel: the call's collectives (distributed.py)
    #: the evaluation methods a subclass redefines (then a compiled program cannot rebuild it)
    redefined: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = tuple(
            n
            for n in ("stationarity", "call", "_evaluate", "leaf_copies", "inner", "outer")
            if n in cls.__dict__
        )
        cls.redefined = tuple(dict.fromkeys(cls.redefined + own))

    def __init__(
        self,
        inner_loss: Closure | None,
        outer_loss: Closure,
        params: Any,
        hparams: Any,
        *,
        stationarity: Callable[[Any, Any], Any] | None = None,
        symmetric: bool | None = None,
    ) -> None:
        if stationarity is not None and not callable(stationarity):
            raise TypeError(
                "stationarity: expected a callable (params, hparams) -> one tensor per params "
                f"tensor, got {type(stationarity).__name__}"
            )
        if inner_loss is None and stationarity is not None:
            inner_loss = _no_scalar_inner
        for name, fn in (("inner_loss", inner_loss), ("outer_loss", outer_loss)):
            if not callable(fn):
                raise TypeError(
                    f"{name}: expected a callable (params, hparams) -> scalar tensor, got {type(fn).__name__}"
                )
        assert inner_loss is not None  # checked above: callable
        self.inner_loss: Closure = inner_loss
        self.outer_loss: Closure = outer_loss
        self.theta0, self.params_structure = flatten(params, "params")
        # MAML passes one module as both: flatten it once (a call costs ~30 µs of a ~2 ms step)
        same = hparams is params
        self.phi0, self.hparams_structure = (
            (self.theta0, self.params_structure) if same else flatten(hparams, "hparams")
        )
        self._check_tensors()
        #: {hparams index: params index} of the tensors passed as both (the inner run starts at φ)
        self.tied = find_ties(self.theta0, self.phi0)
        self._phi_as_dicts = hparams_modules_tied(self.hparams_structure, self.tied)
        self._bound = bound_modules(self.params_structure, self.hparams_structure, self._phi_as_dicts)
        self._closures: dict[str, Callable[..., Any]] = {}
        self._call: _ClosureCall | None = None  # what functional_call runs, built when needed
        #: around every evaluation of a closure (sharded.py suspends the forward hooks)
        self.context: Callable[[], contextlib.AbstractContextManager] | None = None
        self.add_closure("inner_loss", inner_loss)
        self.add_closure("outer_loss", outer_loss)
        self.stationarity_map = stationarity
        if stationarity is not None:
            self.add_closure("stationarity", stationarity)
        if symmetric is not None or stationarity is not None:
            self.symmetric = bool(symmetric)
        #: private copies of the modules' buffers, and how the modules are rebound (binding.py)
        self.buffers, self._binding = bind_modules([s for _, s, _ in self._bound])

    # ------------------------------------------------------------------ checks
    def _check_tensors(self) -> None:
        reference = self.phi0[0]
        device, dtype = reference.device, reference.dtype
        sides = [("params", self.theta0)]
        if self.phi0 is not self.theta0:  # MAML's one module is checked once
            sides.append(("hparams", self.phi0))
        for argument, tensors in sides:
            for i, t in enumerate(tensors):
                if not (t.requires_grad and t.is_floating_point() and t.dtype == dtype) or t.device != device:
                    self._refuse_tensor(argument, tensors, i)  # raises, naming what is wrong
        seen: dict[int, tuple[str, int]] = {}  # each tensor's first place
        for argument, tensors in (("params", self.theta0), ("hparams", self.phi0)):
            for j, t in enumerate(tensors):
                where, i = seen.setdefault(id(t), (argument, j))
                if (where, i) == (argument, j) or where != argument:
                    continue  # in params and hparams: a tie, recorded by find_ties
                # twice on one side: each entry would get its own copy, and the tie would be lost
                raise ValueError(
                    f"{argument}[{i}] and {argument}[{j}] are the same tensor (shape {tuple(t.shape)}); "
                    f"pass each tensor once. Modules that share a weight: put them in one module "
                    f"(an nn.ModuleList), whose parameters() lists the shared weight once"
                )

    def _refuse_tensor(self, argument: str, tensors: Tensors, i: int) -> NoReturn:
        """The error for ``tensors[i]`` of ``argument`` (a check that failed above)."""
        t, reference = tensors[i], self.phi0[0]
        where = f"{argument}[{i}]" if len(tensors) > 1 else argument
        if not t.is_floating_point():
            raise TypeError(f"{where}: expected a floating-point tensor, got {t.dtype}")
        if not t.requires_grad:
            raise ValueError(
                f"{where} does not require grad; call .requires_grad_() on it "
                "(hparams receive the hypergradient, params are differentiated)"
            )
        if t.device != reference.device:
            raise ValueError(
                f"{where} is on {t.device} but hparams[0] is on "
                f"{reference.device}; move params and hparams to one device"
            )
        raise ValueError(
            f"{where} has dtype {t.dtype} but hparams[0] has "
            f"{reference.dtype}; use one floating dtype for params and hparams"
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.phi0[0].dtype

    @property
    def device(self) -> torch.device:
        return self.phi0[0].device

    # ------------------------------------------------------------ evaluation
    def leaf_copies(
        self, theta: Tensors | None = None, phi: Tensors | None = None
    ) -> tuple[Tensors, Tensors]:
        """Fresh leaves (detached, requiring grad) at θ and φ (by default the user's values)."""
        theta = self.theta0 if theta is None else theta
        phi = self.phi0 if phi is None else phi
        return (
            tuple(t.detach().requires_grad_() for t in theta),
            tuple(t.detach().requires_grad_() for t in phi),
        )

    def add_closure(self, name: str, closure: Callable[..., Any]) -> None:
        """Register another closure ``(params, hparams, *extra)`` evaluated like the losses
        (modules rebound), for subclasses that need more than the two losses."""
        self._closures[name] = closure

    def hparams_names(self, indices: list[int]) -> list[str]:
        """How the user would write hparams' flat entries ``indices``: ``hparams['lr']``."""
        paths = pytree.tree_flatten_with_path(self.hparams_structure.unflatten(self.phi0))[0]
        return [f"hparams{pytree.keystr(paths[i][0])}" for i in indices]

    def closures(self) -> dict[str, Callable[..., Any]]:
        return dict(self._closures)  # the registered closures, by name

    def closure_call(self) -> _ClosureCall:
        """The module that ``functional_call`` rebinds (built once, outside any trace)."""
        if self._call is None:
            self._call = _ClosureCall(self, [s.module for _, s, _ in self._bound])
        return self._call

    def run_closure(self, name: str, args: tuple) -> Any:
        """The closure ``name`` on ``args``, inside ``context`` (modules already rebound)."""
        if self.context is None:
            return self._closures[name](*args)
        with self.context():
            return self._closures[name](*args)

    def evaluate(self, name: str, theta: Tensors, phi: Tensors, *extra: Any) -> Any:
        """The closure registered as ``name`` at (θ, φ), unchecked."""
        return self._evaluate(name, theta, phi, extra, check=False)

    def _evaluate(
        self, name: str, theta: Tensors, phi: Tensors, extra: tuple = (), check: bool = True
    ) -> Any:
        try:
            loss = self.call(name, theta, phi, extra)
        except TypeError as error:
            clearer = closure_type_error(name, error)
            if clearer is None:
                raise
            raise clearer from error
        except RuntimeError as error:
            mixture = closure_runtime_error(name, error, self.dtype, self.device)
            if mixture is None:
                raise
            raise mixture from error
        return check_loss(loss, name) if check else loss

    def call(
        self,
        name: str,
        theta: Tensors,
        phi: Tensors,
        extra: tuple = (),
        buffers: dict[str, Tensor] | None = None,
    ) -> Any:
        """The closure ``name`` at (θ, φ), modules rebound to them and to ``buffers`` (by
        default the private copies), with no checks or error translation: a pure function
        that ``torch.func`` transforms and ``torch.compile`` can trace."""
        if self.channel is not None:  # every derivative of a closure averaged over the ranks
            theta, phi = self.channel.synchronize(theta, phi)
        p_arg = self.params_structure.call_form(theta)  # modules as objects, bound below
        # a tied module is bound to θ: the hparams argument holds its φ tensors (see tied.py)
        hparams = self.hparams_structure
        h_arg = hparams.unflatten(phi) if self._phi_as_dicts else hparams.call_form(phi)
        if not self._bound:
            return self.run_closure(name, (p_arg, h_arg, *extra))
        buffers = self.buffers if buffers is None else buffers
        sources = {"theta": theta, "phi": phi}
        values = [buffers[k] for k in self.buffers]
        for source, s, offset in self._bound:
            values.extend(sources[source][offset : offset + len(s.names)])
        if self._binding is None or torch.compiler.is_compiling():
            names = (f"bound.{i}.{k}" for i, (_, s, _) in enumerate(self._bound) for k in s.names)
            bindings = dict(zip([*self.buffers, *names], values))
            return functional_call(self.closure_call(), bindings, (name, p_arg, h_arg, *extra))
        replaced = self._binding.swap(values)
        try:
            return self.run_closure(name, (p_arg, h_arg, *extra))
        finally:
            self._binding.restore(replaced)

    def inner(self, theta: Tensors, phi: Tensors, *extra: Any, second_order: bool = True) -> Tensor:
        """f(θ, φ) as a scalar tensor; ``extra`` arguments (a mini-batch) are passed on.
        ``second_order``: the caller differentiates f twice, so the first evaluation of a
        closure screens its graph for ``@once_differentiable`` Functions, whose second
        derivative PyTorch silently drops (a caller of first-order gradients passes False)."""
        loss = self._evaluate("inner_loss", theta, phi, extra)
        if second_order:
            screen_once(self.inner_loss, loss)
        return loss

    def outer(self, theta: Tensors, phi: Tensors) -> Tensor:
        """g(θ, φ) as a scalar tensor."""
        return self._evaluate("outer_loss", theta, phi)

    def suspects(self, theta: Tensors, phi: Tensors) -> str:
        """The custom ``autograd.Function`` nodes in the graph of ``inner_loss`` at (θ, φ), as a
        clause for an error about a missing second derivative ("" if none, or if this problem
        has no scalar inner loss). Evaluates the loss anew: it is for error messages only, so
        that no call pays for the graph walk or keeps a graph alive for it."""
        try:
            with torch.enable_grad():
                return custom_functions(self.inner(theta, phi))
        except Exception:  # noqa: BLE001 (a clause for a message about another error)
            return ""

    def signature(self) -> tuple:
        """What a compiled program of this problem depends on besides tensor values: the
        closures' code (a closure made anew each step with the same code counts as the same),
        the structures (modules by identity), and the tensors' shapes and dtypes."""
        return (
            code_of(self.inner_loss),
            code_of(self.outer_loss),
            self.params_structure,
            self.hparams_structure,
            tuple(sorted(self.tied.items())),
            tuple((t.shape, t.dtype) for t in self.theta0 + self.phi0),
            tuple((k, b.shape, b.dtype) for k, b in self.buffers.items()),
        )

    def write_back(self, theta: Tensors, buffers: dict[str, Tensor] | None = None) -> None:
        """Copy ``theta`` (detached) into the user's params, and ``buffers`` (by default the
        private buffer copies) into the modules' buffers: for modes documented to update the
        user's model."""
        with torch.no_grad():
            for leaf, value in zip(self.theta0, theta):
                leaf.copy_(value)
            modules = [s.module for _, s, _ in self._bound]
            for key, value in (self.buffers if buffers is None else buffers).items():
                _, index, name = key.split(".", 2)
                modules[int(index)].get_buffer(name).copy_(value)

    @property
    def traceable(self) -> bool:
        """Whether a compiled program may rebuild the problem from its closures alone, with
        ``G = ∇θ f``: False for a ``stationarity`` map, or a subclass that redefines how
        the problem is evaluated."""
        return self.stationarity_map is None and not self.redefined

    def stationarity(self, theta: Tensors, phi: Tensors) -> Tensors:
        """G(θ, φ) with its graph (``create_graph=True``), one tensor per θ leaf: ``∇θ f``, or
        the ``stationarity`` map the problem was given.

        Raises if ``inner_loss`` does not depend on some parameter, or if its gradient has no
        graph (an op without double backward): the implicit system would be singular or wrong.
        """
        if self.stationarity_map is not None:
            return self._given_stationarity(theta, phi)
        with torch.enable_grad():
            f = self.inner(theta, phi)
            check_finite((f,), "the value of inner_loss")
            with second_order_guard("the gradient of inner_loss"):
                grads = torch.autograd.grad(f, theta, create_graph=True, allow_unused=True)
        for i, (g, t) in enumerate(zip(grads, theta)):
            where = f"params[{i}]" if len(theta) > 1 else "params"
            if g is None:
                raise ValueError(
                    f"{where} (shape {tuple(t.shape)}) does not affect inner_loss, so the "
                    "inner Hessian is singular; leave it out of params, or make sure "
                    "inner_loss uses the params it receives"
                )
            if g.grad_fn is None:
                raise ValueError(
                    f"the gradient of inner_loss w.r.t. {where} has no graph, so its Hessian "
                    "cannot be differentiated: inner_loss is linear in it, or it passes through "
                    f"an op without double backward{custom_functions(f)}. Replace that op by a "
                    "twice-differentiable one"
                )
        check_finite(grads, "the gradient of inner_loss w.r.t. params")
        return grads

    def _given_stationarity(self, theta: Tensors, phi: Tensors) -> Tensors:
        """The user's map ``G`` at (θ, φ), flattened in the order of params and checked."""
        with torch.enable_grad(), second_order_guard("the stationarity map"):
            out = self.evaluate("stationarity", theta, phi)
        leaves = (out,) if isinstance(out, Tensor) else tuple(torch.utils._pytree.tree_leaves(out))
        shapes = [tuple(t.shape) for t in theta]
        if len(leaves) != len(theta) or any(
            not isinstance(g, Tensor) or tuple(g.shape) != shape for g, shape in zip(leaves, shapes)
        ):
            got = [tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__ for g in leaves]
            raise ValueError(
                f"the stationarity map must return one tensor per params tensor, shaped "
                f"like them ({shapes}), got {got}"
            )
        check_finite(leaves, "the stationarity map")
        return leaves


def _no_scalar_inner(*args: Any) -> Tensor:
    raise ValueError(
        "this problem is defined by a stationarity map, not by one inner loss (its "
        "update is not a gradient), so only implicit modes for non-symmetric systems apply"
    )
