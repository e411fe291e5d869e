"""The opt-in compiled fast path (``compile=True``) of ``implicit-cg``, ``implicit-neumann``
and the unrolled modes with SGD.

A call is one pure function of tensors: for the implicit modes
:func:`bilevel._src.implicit.implicit_program` (the engine's traced linearization, a solve
without host synchronisation, and the IFT combination); for unrolled SGD, the mode's own
``torch.func`` program. :class:`CompiledPath` compiles it with
``torch.compile(fullgraph=True)``; on CUDA with ``mode="reduce-overhead"``, which replays the
compiled call as a CUDA graph. The host reads the solver's diagnostics once, after the call.

Contract:

- The first call with a pair of closures and a params/hparams/buffers layout runs the eager
  path, with all its input checks; later calls with the same closure code, modules and
  layout run the compiled program (the first of them compiles it, which takes minutes on a
  CPU: ``benchmarks/README.md``). New tensor values (a new mini-batch of the same shape), also
  in closures made anew each step, reuse the program and are read afresh;
  ``torch.compile``'s guards recompile it when the closures read something else.
- If capture fails (an op ``torch.compile`` cannot trace, a graph break, a backend
  error), one warning names the reason and that ``HyperGradient`` stays eager. A Python
  number read from a tensor in a closure (``float(t)``) is specialised: each new value
  recompiles, and at ``torch._dynamo.config.recompile_limit`` the call fails over to eager
  the same way.
- The solver always makes its full budget of products (``stats.hvps``); an iteration that
  starts converged takes a zero step, so the result is the eager one up to rounding.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .errors import HypergradientWarning, user_stacklevel
from .problem import BilevelProblem

__all__ = ["CompiledPath", "compiled_path"]


class CompiledPath:
    """Runs a pure ``program(problem, theta, phi, buffers, *args)`` compiled, for one mode
    instance (see the module docstring for the contract).

    ``options``: ``True`` for the defaults, or a dict of ``torch.compile`` keywords
    (``backend``, ``mode``, ``options``, ...) that replace them. Each instance compiles its
    own copy of ``program``: ``torch.compile`` keeps its cache, and its limit of
    ``torch._dynamo.config.recompile_limit`` programs, per code object. Layouts beyond that
    limit run eagerly (with one warning) rather than through an uncompiled program.
    """

    def __init__(self, program: Callable[..., Any], options: bool | dict[str, Any]) -> None:
        self.program = _private_copy(program)
        self.options: dict[str, Any] = dict(options) if isinstance(options, dict) else {}
        self.failure: str | None = None
        self.limit = int(getattr(torch._dynamo.config, "recompile_limit", 8))
        self._layouts: set[tuple] = set()  # signatures seen, at most `limit`
        self._compiled: Callable[..., Any] | None = None
        self._warned: set[str] = set()

    def __call__(self, problem: BilevelProblem, *args: Any) -> Any | None:
        """The program's outputs, or None where the caller must run the eager path: the first
        call of a layout (it checks the inputs), a layout over the limit, or after a failure."""
        if self.failure is not None:
            return None
        if problem.channel is not None:
            self._warn_once(
                "distributed",
                "with distributed=..., the call runs on the eager path: the compiled programs "
                "carry no collectives",
            )
            return None
        if not problem.traceable:
            # the programs rebuild the problem from its closures and ∇θ f; a problem with its
            # own stationarity map or evaluation would be silently misread
            what = ", ".join(problem.redefined) or "stationarity"
            self._warn_once(
                "subclass",
                f"{type(problem).__name__} defines its own {what}, which "
                "the compiled program does not reproduce; it runs on the eager path",
            )
            return None
        signature = problem.signature()
        if signature not in self._layouts:
            if len(self._layouts) < self.limit:
                self._layouts.add(signature)
            else:
                self._warn_once(
                    "limit",
                    f"this HyperGradient has met {self.limit} layouts (closure "
                    "code, modules, shapes, dtypes), torch.compile's recompile limit; new "
                    "layouts run on the eager path",
                )
            return None
        if self._compiled is None:
            self._compiled = torch.compile(self.program, **self._compile_options(problem.device))
        cuda = problem.device.type == "cuda"
        theta = tuple(t.detach() for t in problem.theta0)
        phi = tuple(t.detach() for t in problem.phi0)
        if cuda and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()
        problem.closure_call()  # functional_call's module, built outside the trace
        try:
            out = self._compiled(problem, theta, phi, problem.buffers, *args)
        except Exception as error:  # noqa: BLE001 - any capture or backend failure falls back
            self.failure = _describe(error)
            self._warn_once(
                "failure",
                f"torch.compile could not capture the hypergradient call "
                f"({self.failure}); this HyperGradient uses the eager path from now on",
            )
            return None
        if cuda:  # CUDA-graph outputs live in memory that the next replay overwrites
            out = torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, out)
        return out

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"compile=True: {message}", HypergradientWarning, stacklevel=user_stacklevel())

    def _compile_options(self, device: torch.device) -> dict[str, Any]:
        options: dict[str, Any] = {"fullgraph": True, "dynamic": False}
        if device.type == "cuda" and "backend" not in self.options and "mode" not in self.options:
            options["mode"] = "reduce-overhead"  # inductor's kernels replayed as a CUDA graph
        options.update(self.options)
        return options


def _describe(error: Exception) -> str:
    """A short account of a capture failure: the error's first line, dynamo's explanation
    and the innermost line of user code it names, when the message has them."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    parts = [f"{type(error).__name__}: {lines[0] if lines else ''}"]
    parts += [line for line in lines if line.startswith("Explanation:")][:1]
    if "from user code:" in lines:
        frames = [i for i, line in enumerate(lines) if line.startswith("File ")]
        if frames:
            last = frames[-1]
            code = lines[last + 1] if last + 1 < len(lines) and not lines[last + 1].startswith("Set ") else ""
            parts.append(f"at {lines[last]}" + (f": {code}" if code else ""))
    return "; ".join(parts)[:600]


def _private_copy(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with a code object of its own (same bytecode, globals and defaults)."""
    code = function.__code__.replace(co_name=function.__code__.co_name)
    copy = types.FunctionType(
        code, function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
    copy.__kwdefaults__, copy.__qualname__ = function.__kwdefaults__, function.__qualname__
    return copy


def compiled_path(program: Callable[..., Any], option: Any) -> CompiledPath | None:
    """The compiled path of ``program`` for a mode's ``compile`` option: None for False,
    a :class:`CompiledPath` for True or a dict of ``torch.compile`` keywords."""
    if option is False or option is None:
        return None
    if option is not True and not isinstance(option, dict):
        raise TypeError(
            f"option compile must be True, False or a dict of torch.compile keywords, got {option!r}"
        )
    return CompiledPath(program, option)
