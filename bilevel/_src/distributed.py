"""Data-parallel hypergradients: ranks that hold shards of the data and the same θ and φ.

With W ranks whose closures return mean losses over equal shards, the global losses are

    f(θ, φ) = (1/W) Σ_r f_r(θ, φ),   g(θ, φ) = (1/W) Σ_r g_r(θ, φ),

so every derivative the modes take of them (gradients, Hessian and mixed products, and
their derivatives through unrolled steps) is the mean over ranks of the local derivatives.
:class:`Channel` evaluates each closure at *synchronized* copies of θ and φ: the identity
forward, and a backward that replaces the local cotangent by its mean over the ranks (one
all-reduce). Every gradient of a closure is then the global one, exactly, on every rank, in
every mode, whatever the mode does with it; the values that follow (solver vectors, steps,
decisions) are identical on all ranks, because an all-reduce leaves the same sum everywhere.
The mean's own backward is the identity: the cotangents it meets are identical on all ranks
(they are derivatives of the global loss), and for identical cotangents ȳ the adjoint of
``y = (1/W) Σ_s x_s`` is ``x̄_r = ȳ``. So a Hessian product is one all-reduce, not two.

Collective decisions. Each call of a rank is: one fixed-size all-gather (:meth:`Channel.agree`:
the layout, a hash of every θ and φ bit, the random seeds, and whether the rank could set
up the call), the computation, whose every all-reduce has one size for the whole call (θ's
and φ's cotangents together, a used flag per tensor, a one-hot tag saying which kind of
all-reduce it is, and a failure flag per rank), and one closing all-reduce of that size
(:meth:`Channel.finish`).
A rank that raises anywhere joins the others' next all-reduce with its failure flag set, at
whatever point they are, and then raises its own error; the others raise :class:`PeerError`
there. Every rank thus makes the same number of collectives of the same sizes and stops in
the same call, and none waits for a rank that has left.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import PeerError
from .tree_math import flat, unflat
from .typing import Tensors

__all__ = [
    "Channel",
    "Synchronize",
    "collective_device",
    "contains_data_parallel",
    "fingerprint",
    "resolve_group",
    "shard_weight",
    "unwrap_data_parallel",
    "unwrap_pair",
]

SYNCHRONIZE, CLOSE, VALUE = 1, 2, 3  # the tags of the call's all-reduces
_TAGS = 3
#: the agreement's entries per rank: failed, layout hash, θ, φ and mode-state hashes (3 each), seed
_AGREEMENT = 12


def resolve_group(distributed: Any) -> Any:
    """The process group of a ``distributed`` option (True: the default group), or None."""
    if distributed is None or distributed is False:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=... needs an initialised process group: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up its environment)"
        )
    if distributed is True:
        return dist.group.WORLD
    if distributed is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            "distributed=: this rank is not a member of the process group passed (new_group "
            "returns a placeholder on the ranks it leaves out); build the distributed "
            "HyperGradient on the group's ranks only"
        )
    if isinstance(distributed, dist.ProcessGroup):
        return distributed
    raise TypeError(f"distributed must be True, False, None or a ProcessGroup, got {distributed!r}")


def unwrap_data_parallel(tree: Any) -> Any:
    """A ``DistributedDataParallel`` (or ``DataParallel``) module as the module it wraps:
    the library evaluates that one and averages the gradients itself (DDP averages only
    inside ``.backward()``, which the library never calls)."""
    from torch.nn import DataParallel
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(tree, (DistributedDataParallel, DataParallel)):
        return tree.module
    if isinstance(tree, (tuple, list)) and not hasattr(tree, "_fields"):
        return type(tree)(unwrap_data_parallel(t) for t in tree)
    if isinstance(tree, dict):
        return {k: unwrap_data_parallel(v) for k, v in tree.items()}
    return tree


def unwrap_pair(params: Any, hparams: Any) -> tuple[Any, Any]:
    """params and hparams through :func:`unwrap_data_parallel`, one object still one (MAML)."""
    unwrapped = unwrap_data_parallel(params)
    return unwrapped, unwrapped if hparams is params else unwrap_data_parallel(hparams)


def contains_data_parallel(tree: Any) -> bool:
    from torch.nn import DataParallel
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(tree, (DistributedDataParallel, DataParallel)):
        return True
    if isinstance(tree, (tuple, list)):
        return any(contains_data_parallel(t) for t in tree)
    if isinstance(tree, dict):
        return any(contains_data_parallel(v) for v in tree.values())
    return False


def _bits_hash(tensors: Tensors) -> list[float]:
    """A 63-bit hash of every bit of ``tensors`` (values, positions, shapes), as three exact
    21-bit floats: two ranks whose tensors differ in one bit disagree."""
    if not tensors:
        return [0.0, 0.0, 0.0]
    total = torch.zeros((), dtype=torch.int64, device=tensors[0].device)
    for i, t in enumerate(tensors):  # on the tensors' device: one host read in all
        x = t.detach().reshape(-1)
        width = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[x.element_size()]
        bits = x.contiguous().view(width).to(torch.int64)
        weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=x.device) * 2654435761 + i
        total = total + (bits * weights).sum().to(total.device)  # wraps modulo 2⁶⁴: a hash
    h = int(total.item()) & (2**63 - 1)
    return [float((h >> s) & (2**21 - 1)) for s in (0, 21, 42)]


def fingerprint(layout: Any, theta: Tensors, phi: Tensors, state: Sequence[Tensor], seed: int) -> list[float]:
    """This rank's entries of the agreement (``failed`` = 0)."""
    crc = float(zlib.crc32(repr(layout).encode()))
    return [0.0, crc, *_bits_hash(theta), *_bits_hash(phi), *_bits_hash(tuple(state)), float(seed)]


class _MeanAcrossRanks(torch.autograd.Function):
    """``(1/W) Σ_r x_r``, one all-reduce; the backward is the identity (module docstring)."""

    @staticmethod
    def forward(ctx: Any, channel: Channel, buffer: Tensor) -> Tensor:
        ctx.channel, ctx.flags = channel, buffer[channel.payload :].detach().clone()
        return channel.all_reduce_mean(buffer)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad

    @staticmethod
    def jvp(ctx: Any, _: None, tangent: Tensor) -> Tensor:
        # forward-mode AD (direction="forward"): the tangent of a mean is the mean of tangents,
        # one all-reduce of the same kind (the forward's used flags, tag and failure flags,
        # whose tangents are 0: the tail it leaves in the channel is the forward's)
        start = ctx.channel.payload
        out = ctx.channel.all_reduce_mean(torch.cat([tangent[:start], ctx.flags]))
        return torch.cat([out[:start], torch.zeros_like(ctx.flags)])


class Synchronize(torch.autograd.Function):
    """The identity on the tensors, whose backward averages their cotangents over the ranks
    in one all-reduce (a tensor no rank's cotangent reaches gets None, as if unused)."""

    @staticmethod
    def forward(ctx: Any, channel: Channel, tag: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.channel, ctx.tag = channel, tag
        ctx.shapes = [t.shape for t in tensors]
        ctx.dtype, ctx.device = tensors[0].dtype, tensors[0].device
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        return (None, None, *ctx.channel.mean(grads, ctx.shapes, ctx.tag))

    @staticmethod
    def jvp(ctx: Any, _: None, __: None, *tangents: Tensor) -> tuple[Tensor, ...]:
        # the identity's; an input without a tangent gets a zero one (not None, which the
        # view outputs cannot take)
        return tuple(
            torch.zeros(shape, dtype=ctx.dtype, device=ctx.device) if t is None else t.view_as(t)
            for t, shape in zip(tangents, ctx.shapes)
        )


class Channel:
    """One call's collectives over ``group`` (see the module docstring)."""

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.collectives = 0
        self.bytes = 0
        self.peer_failed = False  # this rank has seen a failure flag: it makes no more collectives
        self.payload = 0  # set by bind: the payload of every all-reduce
        self.tail: list[float] = []  # the last all-reduce's mean after its payload
        self.slots = 0
        self.dtype = torch.float64
        self.device = torch.device("cpu")

    # ------------------------------------------------------------------ raw collectives
    def _all_reduce(self, buffer: Tensor) -> Tensor:
        import torch.distributed as dist

        out = buffer.detach().clone()
        dist.all_reduce(out, group=self.group)
        self.collectives += 1
        self.bytes += out.numel() * out.element_size()
        return out

    def agree(self, entries: list[float] | None, device: torch.device) -> Tensor:
        """All ranks' agreement entries as a ``(W, 12)`` float64 tensor (None: this rank
        failed to set up the call). One fixed-size all-gather, the first collective of a call."""
        import torch.distributed as dist

        local = torch.tensor(entries if entries is not None else [1.0] + [0.0] * (_AGREEMENT - 1))
        local = local.to(torch.float64).to(device)
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local, group=self.group)
        self.collectives += 1
        self.bytes += self.world * local.numel() * local.element_size()
        return torch.stack(gathered).cpu()

    def bind(self, theta: Tensors, phi: Tensors) -> None:
        """Fix the size of the call's all-reduces from θ and φ (the same on every rank: the
        agreement checked the layout): one all-reduce carries the cotangents of θ and φ
        together, so every rank takes part in it whichever of them its own graph reaches
        (a rank whose closures ignore φ still joins the others' mixed product)."""
        self.payload = sum(t.numel() for t in theta) + sum(t.numel() for t in phi)
        self.slots = len(theta) + len(phi)
        self.dtype, self.device = phi[0].dtype, phi[0].device

    def _buffer(self, tag: int, failed: bool = False) -> Tensor:
        """[payload | a used flag per slot | the tag, one-hot | a failure flag per rank]"""
        size = self.payload + self.slots + _TAGS + self.world
        buffer = torch.zeros(size, dtype=self.dtype, device=self.device)
        if tag:
            buffer[self.payload + self.slots + tag - 1] = 1.0
        buffer[-self.world + self.rank] = float(failed)
        return buffer

    def all_reduce_mean(self, buffer: Tensor) -> Tensor:
        """The mean of ``buffer`` over the ranks, after checking every rank's flags: a peer's
        failure raises :class:`PeerError`, a peer at another kind of all-reduce (its program
        took another path) raises ``RuntimeError``; both on every rank, which all read the
        same sums (the mean of one-hot tags is a unit vector only if all ranks agree)."""
        out = self._all_reduce(buffer)
        # the part after the payload, in one host read: used flags, tags, failure flags
        self.tail = (out[self.payload :] / self.world).tolist()
        flags = self.tail[-self.world :]
        tags = self.tail[self.slots : self.slots + _TAGS]
        if any(flags):
            self.peer_failed = True
            ranks = ", ".join(str(r) for r, f in enumerate(flags) if f)
            raise PeerError(
                f"rank(s) {ranks} of the process group raised an error in this call (see "
                "their traceback); every rank stops here"
            )
        if max(tags) != 1.0:
            self.peer_failed = True
            raise RuntimeError(
                "the ranks reached different collectives of one call (their closures took "
                "different paths, e.g. through data-dependent control flow): every rank must "
                "differentiate the same functions of params and hparams"
            )
        return out / self.world

    # ------------------------------------------------------------------ the call's operations
    def synchronize(self, theta: Tensors, phi: Tensors) -> tuple[Tensors, Tensors]:
        """θ and φ as synchronized copies (identity forward; averaged cotangents)."""
        if not torch.is_grad_enabled():
            return theta, phi
        both = Synchronize.apply(self, SYNCHRONIZE, *theta, *phi)
        return tuple(both[: len(theta)]), tuple(both[len(theta) :])

    def mean(
        self, grads: Sequence[Tensor | None], shapes: Sequence[torch.Size], tag: int
    ) -> list[Tensor | None]:
        """The cotangents averaged over the ranks in one all-reduce (differentiable, for
        gradients taken with ``create_graph=True``); None where no rank has one."""
        pieces = [
            torch.zeros(s, dtype=self.dtype, device=self.device).reshape(-1) if g is None else g.reshape(-1)
            for g, s in zip(grads, shapes)
        ]
        vector = torch.cat(pieces).to(self.dtype)
        # the buffer's layout: [payload | a used flag per slot | tag | a failure flag per rank]
        rest = self._buffer(tag)
        rest[self.payload : self.payload + len(grads)] = torch.tensor([float(g is not None) for g in grads])
        out = _MeanAcrossRanks.apply(self, torch.cat([vector, rest[vector.numel() :]]))
        anywhere = self.tail[: len(grads)]  # read with the flags
        result: list[Tensor | None] = []
        offset = 0
        for s, u in zip(shapes, anywhere):
            n = s.numel()
            result.append(out[offset : offset + n].view(s) if u else None)
            offset += n
        return result

    def fail(self) -> None:
        """Join the others' next all-reduce with this rank's failure flag (then raise)."""
        if self.peer_failed or not self.payload:
            return
        try:
            self._all_reduce(self._buffer(0, failed=True))
        finally:
            self.peer_failed = True

    def finish(self, flags: int = 0, grads: Tensors | None = None) -> tuple[int, Tensors | None]:
        """The closing all-reduce: how many ranks raised ``flags`` (a local decision, such as
        a strict breakdown), and the mean over the ranks of ``grads`` if given (the local
        solves' hypergradients), in the same collective."""
        buffer = self._buffer(CLOSE)
        buffer[self.payload] = float(bool(flags))  # in the first used-flag slot
        if grads is not None:
            vector = flat(grads).to(self.dtype)
            buffer[: vector.numel()] = vector
        out = self.all_reduce_mean(buffer)
        count = round(self.tail[0] * self.world)  # read with the flags
        if grads is None:
            return count, None
        return count, unflat(out[: sum(g.numel() for g in grads)], grads)


def shard_weight(local_size: int, group: Any = None) -> float:
    """``W · n_local / N_global``: the factor that turns a closure's mean over an uneven
    shard into what ``distributed=...`` expects, ``shard_sum · W / N_global`` (one
    all-reduce of the sizes; call it once per batch, on every rank, outside the closures)::

        weight = shard_weight(len(x_val))
        outer = lambda model, h: weight * loss_fn(model(x_val), y_val)  # mean × weight
    """
    import torch.distributed as dist

    group = resolve_group(True) if group is None else group
    sizes = torch.tensor([float(local_size)], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(sizes, group=group)
    return dist.get_world_size(group) * local_size / float(sizes.item())


def collective_device(group: Any) -> torch.device:
    """Where the group's collectives take their tensors: CUDA for NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
