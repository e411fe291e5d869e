"""The mode protocol and the registry: a mode is one small file in ``bilevel/modes/``.

A mode is a dataclass whose fields are its options (with their defaults), registered under a
name with :func:`register_mode`. It implements ``hypergradient(problem, stats)``, which
returns the hypergradient as a tuple aligned with ``problem.phi0`` and fills ``stats``; an
implicit mode is a linear solve handed to :func:`bilevel.implicit.implicit_hypergradient`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from .._src.problem import BilevelProblem
from .._src.products import ProductRule
from .._src.stats import Stats
from .._src.tied import tied_refusal
from .._src.typing import Tensors

__all__ = [
    "ImplicitMode",
    "Mode",
    "available_modes",
    "check_flag",
    "check_positive",
    "get_mode",
    "register_mode",
]

_REGISTRY: dict[str, type[Mode]] = {}

M = TypeVar("M", bound=type["Mode"])


class Mode:
    """Base class of the modes. Subclasses are dataclasses; their fields are the options."""

    name: ClassVar[str] = ""
    #: whether the mode can solve the non-symmetric systems of non-gradient stationarity maps
    supports_nonsymmetric: ClassVar[bool] = False
    #: whether the mode can start the inner run at tied hparams (the same tensors as params: MAML)
    supports_tied: ClassVar[bool] = False

    #: warnings about the chosen options (an unavailable fast path) that ``HyperGradient``
    #: issues once it is built; an instance sets its own
    notes: tuple[str, ...] = ()

    @classmethod
    def option_names(cls) -> list[str]:
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]  # every mode class is a dataclass
        ordered = sorted(fields, key=lambda f: f.kw_only is True)  # a mode's own options first
        return [f.name for f in ordered if f.init and not f.name.startswith("_")]

    @classmethod
    def from_options(cls, **options: Any) -> Mode:
        """Build the mode from user keywords; unknown ones raise a ``TypeError`` naming the valid ones."""
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise TypeError(
                f"mode {cls.name!r} got unknown option(s) {', '.join(unknown)}; "
                f"its options are: {', '.join(cls.option_names())}"
            )
        return cls(**options)

    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        raise NotImplementedError

    def check_problem(self, problem: BilevelProblem) -> None:
        """Refuse problems the mode cannot solve correctly."""
        if getattr(problem, "tied", None) and not self.supports_tied:  # adapters may build their own
            raise ValueError(tied_refusal(self.name))
        if not problem.symmetric and not self.supports_nonsymmetric:
            capable = [n for n, c in _REGISTRY.items() if c.supports_nonsymmetric]
            raise ValueError(
                f"mode {self.name!r} needs a symmetric inner Hessian, but this problem's "
                "stationarity map is not the gradient of one loss; use one of: "
                f"{', '.join(capable)}"
            )

    # Stateful modes (warm starts, optimizer state, random generators) override these.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"mode {self.name!r} has no state, got keys {sorted(state)}")

    def random_seed(self) -> int:
        """A seed drawn from the mode's own random generator (0 without one); with
        ``distributed=...`` every rank then :meth:`reseed` s with rank 0's draw."""
        return 0

    def reseed(self, seed: int) -> None:
        """Seed the mode's own random generator (no-op without one)."""

    def state_signature(self) -> dict[str, str]:
        """The options the state's meaning depends on (an unrolled mode's inner optimizer and
        backend), as strings: a checkpoint loads only into a mode with the same signature."""
        return {}

    def state_fits_one_layout(self) -> bool:
        """Whether the current state is shaped like one problem's params/hparams (a warm
        start, optimizer state) and used by the next call, which then must have the same
        structure. A state that fits any problem (a random generator) or that the options
        leave unused (a loaded warm start with ``warm_start=False``) does not count."""
        return bool(self.state_dict())


@dataclasses.dataclass(kw_only=True)
class ImplicitMode(Mode):
    """Options shared by the implicit modes (keyword-only, after each mode's own).

    hvp: how the Hessian (and mixed) products are differentiated. ``"autograd"`` (default):
        exactly, through the graph of the inner gradient (a double backward).
        ``"finite-difference"``: central differences of first-order gradients,
        ``H x ≈ [∇θ f(θ + hx) − ∇θ f(θ − hx)] / 2h`` and the mixed product likewise from
        ``∇φ f``, two gradient evaluations each and no second derivative anywhere: for ops
        without a double backward (fused attention kernels, cuDNN RNNs, first-order custom
        Functions) and compiled first-order programs. The step is ``‖hx‖ = c·(1 + Σ|θᵢ||uᵢ|)``
        along ``u = x/‖x‖``; the relative error of a product is about ``c²`` (third
        derivatives) plus ``ε/c`` (rounding), exact for quadratic losses. The random numbers
        of every gradient evaluation of a call are the same (dropout draws one mask per call).
        Only for gradient stationarity maps.
    fd_eps: the relative step ``c`` (default ``∛ε`` of the dtype: 6e-6 in float64, 5e-3 in
        float32).
    """

    hvp: str = "autograd"
    fd_eps: float | None = None

    def __post_init__(self) -> None:
        self.rule = ProductRule(self.hvp, self.fd_eps)


def register_mode(cls: M) -> M:
    """Class decorator: make ``cls`` available as ``HyperGradient(mode=cls.name)``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a mode named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_modes() -> list[str]:
    """The names of the registered modes."""
    return sorted(_REGISTRY)


def get_mode(name: str) -> type[Mode]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown mode {name!r}; available modes: {', '.join(available_modes())}")
    return _REGISTRY[name]


def check_positive(name: str, value: Any, integer: bool = False, allow_zero: bool = False) -> None:
    """Validate a numeric option with a readable error."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"option {name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"option {name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_flag(name: str, value: Any) -> None:
    """Validate a True/False option (a string such as ``"false"`` would read as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"option {name} must be True or False, got {value!r}")
