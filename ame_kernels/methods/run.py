"""Run one method on one tensor: statistics, plan, combine pass, on a backend.

``TorchOps`` adapts a torch backend (reference, cpu, triton, cuda) to the statistics
drivers and the combine pass; ``BufferOps`` does the same for the cpu backend's numpy
buffer functions (the checkpoint engine's torch-free path), where a chunk handle is an
``(array, dtype_name)`` pair. ``merge_tensor`` is the whole per-tensor sequence; the
engine calls ``plan_tensor`` and ``combine_chunk`` separately to stream the chunks.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np

from .base import Method, TensorContext
from .combine import CombinePlan, KeepBits
from .params import Params


class TorchOps:
    """Chunk handles are flat torch tensors on the backend's device."""

    draws_bits = False  # no della_bits: DELLA's masks come from della_probs

    def __init__(self, backend: Any, threads: Optional[int] = None):
        self.backend, self.threads = backend, threads

    def hist(self, x, b, prefix_mask: int, prefix: int, shift: int, nbins: int) -> np.ndarray:
        return self.backend.magnitude_histogram(x, b, prefix_mask, prefix, shift, nbins)

    def bracket(self, xs, b, which, lo, hi, cap: int, shift=None):
        return self.backend.magnitude_bracket(xs, b, which, lo, hi, cap, shift)

    def sample(self, x, b, positions: np.ndarray) -> np.ndarray:
        from .stats import magnitude_sample_torch

        return magnitude_sample_torch(x, b, positions)

    def gram(self, xs, b) -> np.ndarray:
        return self.backend.gram(xs, b)

    def kept_l1(self, xs, b, plan: CombinePlan, offset: int, probs) -> np.ndarray:
        return self.backend.kept_l1(xs, b, plan, offset, probs)

    @staticmethod
    def length(x) -> int:
        return x.numel()

    @staticmethod
    def slice(x, a: int, b: int):
        return x[a:b]

    def magnitudes(self, x, b) -> np.ndarray:
        from .stats import magnitudes_torch

        return magnitudes_torch(x, b)

    def della_probs(self, x, b, shape: tuple, density: float, epsilon: float, slot: Optional[int] = None):
        """DELLA's fp32 keep probabilities of a chunk of whole rows, on x's device (the backend's);
        a fresh tensor each call (``slot`` is BufferOps' buffer hint; torch's allocator caches)."""
        return self.backend.della_probs(x, b, shape, density, epsilon, threads=self.threads)

    def wrap(self, a: np.ndarray, like):
        import torch

        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(like.device)

    def row_gram(self, xs, b, row: int) -> np.ndarray:
        """float64[R, N, N]: the gram matrix of each row of ``row`` elements of a row-aligned chunk."""
        import torch

        taus = torch.stack([(x.float() - b.float()) if b is not None else x.float() for x in xs]).double()
        taus = taus.reshape(len(xs), -1, row)
        return torch.einsum("irc,jrc->rij", taus, taus).cpu().numpy()

    @staticmethod
    def cut(h, a: int, z: int):
        return h[a:z]

    @staticmethod
    def size(h) -> int:
        return int(h.numel())

    def combine(self, xs, b, out, plan: CombinePlan, offset: int, probs) -> Optional[int]:
        """The combine pass; the count of Inf/NaN written where the backend reports it, else None."""
        rows = combine_rows(self, xs, b, out, plan, offset, probs)
        if rows is not False:
            return rows
        return self.backend.combine(xs, b, out, plan, offset, probs, threads=self.threads)

    def transform(self, xs, b, outs, plan: CombinePlan, offset: int) -> Optional[int]:
        """The transform pass into ``outs`` (float32 tensors); the count of Inf/NaN written where the
        backend reports it, else None."""
        return self.backend.transform(xs, b, outs, plan, offset, threads=self.threads)


class BufferOps:
    """Chunk handles are (numpy array, dtype name) pairs; the cpu backend's buffer kernels."""

    def __init__(self, threads: Optional[int] = None):
        from ..backends import cpu

        self.cpu, self.threads = cpu, threads
        self._probs = {}  # della_probs' output per slot, reused: fresh pages cost a fault each
        self._bits = {}   # della_bits', likewise

    @staticmethod
    def handle(t):
        """A contiguous host torch tensor of a float dtype as a chunk handle: a numpy view of its
        memory (bf16 as 16-bit integers), no copy; None stays None."""
        if t is None:
            return None
        import torch

        from ..checks import DTYPE_BY_NAME

        name = next(n for n, d in DTYPE_BY_NAME.items() if d == t.dtype)
        return (t.view(torch.int16) if name == "bfloat16" else t).detach().numpy(), name

    @staticmethod
    def _split(b):
        return (None, None) if b is None else b

    def hist(self, x, b, prefix_mask: int, prefix: int, shift: int, nbins: int) -> np.ndarray:
        bb, bd = self._split(b)
        return self.cpu.magnitude_histogram_buffers(x[0], x[1], bb, bd, prefix_mask, prefix, shift, nbins,
                                                    threads=self.threads)

    def bracket(self, xs, b, which, lo, hi, cap: int, shift=None):
        bb, bd = self._split(b)
        return self.cpu.magnitude_bracket_buffers([x[0] for x in xs], [x[1] for x in xs], bb, bd, which, lo, hi, cap,
                                                  shift, threads=self.threads)

    def sample(self, x, b, positions: np.ndarray) -> np.ndarray:
        bb, bd = self._split(b)
        return self.cpu.magnitude_sample_buffers(x[0], x[1], bb, bd, positions, threads=self.threads)

    def gram(self, xs, b) -> np.ndarray:
        bb, bd = self._split(b)
        return self.cpu.gram_buffers([x[0] for x in xs], [x[1] for x in xs], bb, bd, threads=self.threads)

    def kept_l1(self, xs, b, plan: CombinePlan, offset: int, probs) -> np.ndarray:
        """The L1 sums; the drawn keep masks of this chunk are kept on the plan (``notes['keep_masks']``,
        the last chunk's only: N x chunk / 8 bytes at most), so that the combine pass of the same chunk
        reads them instead of drawing Philox a second time (the same bits). ``KeepBits`` entries of
        probs are read as they are."""
        bb, bd = self._split(b)
        c = self.length(xs[0])
        if probs is not None and all(isinstance(p, KeepBits) and p.l1 is not None for p in probs):
            # every ingredient's bits came with their sums (della_masks): no second read of the chunk
            plan.notes["keep_masks"] = (offset, c, [p.bits for p in probs])
            return np.stack([p.l1 for p in probs])
        probs, given = _split_bits(probs, plan.n)
        draws = [(given is None or given[i] is None) and (plan.density[i] < 1 or (probs is not None and probs[i] is not None))
                 for i in range(plan.n)]
        masks = [np.empty(-(-c // 8), dtype=np.uint8) if d else None for d in draws] if any(draws) else None
        l1 = self.cpu.kept_l1_buffers([x[0] for x in xs], [x[1] for x in xs], bb, bd, plan, offset, probs,
                                      threads=self.threads, masks=masks, masks_in=given)
        if masks is not None or given is not None:
            kept = [(given[i] if given is not None and given[i] is not None else (masks[i] if masks else None))
                    for i in range(plan.n)]
            plan.notes["keep_masks"] = (offset, c, kept)
        return l1

    @staticmethod
    def _masks(plan: CombinePlan, offset: int, c: int):
        km = plan.notes.get("keep_masks")
        return km[2] if km is not None and km[0] == offset and km[1] == c else None

    @staticmethod
    def length(x) -> int:
        return x[0].size if x[0].dtype != np.uint8 else x[0].size // {"float32": 4}.get(x[1], 2)

    @staticmethod
    def slice(x, a: int, b: int):
        arr, dtype = x
        if arr.dtype == np.uint8:  # raw bytes: slice by element size
            size = {"float32": 4}.get(dtype, 2)
            return arr[a * size:b * size], dtype
        return arr[a:b], dtype

    def magnitudes(self, x, b) -> np.ndarray:
        m = to_f32(*x)
        if b is not None:
            m = m - to_f32(*b)
        return np.abs(m)

    draws_bits = True  # della_bits: the cpu kernel's keep bits without probabilities

    def della_bits(self, x, b, shape: tuple, density: float, epsilon: float, seed: int, key: int, ingredient: int,
                   offset: int) -> KeepBits:
        """DELLA's keep bits of ingredient ``ingredient`` on a chunk of whole contiguous rows (what the
        pass would draw from ``della_probs`` under a plan of this seed and name key), in that
        ingredient's reused buffer."""
        bb, bd = self._split(b)
        out = _slot_buffer(self._bits, ingredient, -(-self.length(x) // 8), np.uint8)
        bits, l1 = self.cpu.della_masks_buffers(x[0], x[1], bb, bd, shape, density, epsilon, seed, key, ingredient,
                                                offset, threads=self.threads, out=out, sums=True)
        return KeepBits(bits, l1)

    def della_probs(self, x, b, shape: tuple, density: float, epsilon: float, slot: Optional[int] = None) -> np.ndarray:
        """DELLA's fp32 keep probabilities of a chunk of whole rows (the native rank kernel). With
        a ``slot``, written into that slot's buffer, valid until the slot's next call (the methods
        pass the ingredient's index: a tensor's probabilities are used before the next tensor's)."""
        bb, bd = self._split(b)
        out = None if slot is None else _slot_buffer(self._probs, slot, self.length(x), np.float32)
        return self.cpu.della_probs_buffers(x[0], x[1], bb, bd, shape, density, epsilon, threads=self.threads, out=out)

    def wrap(self, a: np.ndarray, like):
        return np.ascontiguousarray(a, dtype=np.float32)

    def row_gram(self, xs, b, row: int) -> np.ndarray:
        taus = np.stack([to_f32(*x).astype(np.float64) - (to_f32(*b) if b is not None else 0.0) for x in xs])
        taus = taus.reshape(len(xs), -1, row)
        return np.einsum("irc,jrc->rij", taus, taus)

    @staticmethod
    def cut(h, a: int, z: int):
        return (h[0][a:z], h[1])

    @staticmethod
    def size(h) -> int:
        return int(h[0].shape[0])

    def combine(self, xs, b, out, plan: CombinePlan, offset: int, probs) -> int:
        """The combine pass; the count of Inf/NaN written to out."""
        rows = combine_rows(self, xs, b, out, plan, offset, probs)
        if rows is not False:
            return rows
        bb, bd = self._split(b)
        probs, given = _split_bits(probs, plan.n)
        masks = self._masks(plan, offset, self.length(xs[0]))
        if given is not None:
            masks = [g if g is not None else (masks[i] if masks else None) for i, g in enumerate(given)]
        return self.cpu.combine_buffers([x[0] for x in xs], [x[1] for x in xs], bb, bd, out[0], out[1], plan, offset,
                                        probs, threads=self.threads, masks=masks)

    def transform(self, xs, b, outs, plan: CombinePlan, offset: int) -> int:
        """The transform pass into ``outs`` (float32 numpy arrays); the count of Inf/NaN written."""
        bb, bd = self._split(b)
        return self.cpu.transform_buffers([x[0] for x in xs], [x[1] for x in xs], bb, bd, outs, plan, offset,
                                          threads=self.threads, masks=self._masks(plan, offset, self.length(xs[0])))


def _slot_buffer(store: dict, slot: int, n: int, dtype) -> np.ndarray:
    """The first n entries of ``store[slot]``, an array reused across calls (grown when short)."""
    buf = store.get(slot)
    if buf is None or buf.size < n:
        buf = store[slot] = np.empty(n, dtype=dtype)
    return buf[:n]


def _split_bits(probs, n: int):
    """(probs with None for the KeepBits entries, the KeepBits' arrays or None where an entry has
    none; None when no entry is KeepBits)."""
    if probs is None or not any(isinstance(p, KeepBits) for p in probs):
        return probs, None
    return ([None if isinstance(p, KeepBits) else p for p in probs],
            [p.bits if isinstance(p, KeepBits) else None for p in probs])


def combine_rows(ops, xs, b, out, plan: CombinePlan, offset: int, probs):
    """A plan with per-row weights (``plan.notes['row_weight'] = (row, W[R, N])``, model_stock
    filter_wise) runs as one combine pass per row of the (row-aligned) chunk, each with that row's
    weights: the CombinePlan contract (per-ingredient scalars) is unchanged. False otherwise; else
    the rows' count of Inf/NaN written (None where a row's backend does not report it)."""
    rw = plan.notes.get("row_weight")
    if rw is None:
        return False
    import dataclasses

    row, W = rw
    size = ops.size(xs[0])
    r0 = offset // row
    total: Optional[int] = 0
    for r in range(size // row):
        a, z = r * row, (r + 1) * row
        sub = dataclasses.replace(plan, weight=W[r0 + r], notes={})
        bad = ops.combine([ops.cut(x, a, z) for x in xs], None if b is None else ops.cut(b, a, z), ops.cut(out, a, z),
                          sub, offset + a, None if probs is None else [p[a:z] for p in probs])
        total = None if (total is None or bad is None) else total + bad
    return total


def to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    """An fp32 copy/view of ``a`` holding ``dtype`` (bf16 as 16-bit integers)."""
    if dtype == "float32":
        return a.view(np.float32) if a.dtype != np.float32 else a
    if dtype == "bfloat16":
        return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "float16":
        return a.view(np.float16).astype(np.float32)
    return a.astype(np.float32)


def plan_tensor(method: Method, params: Params, name: str, shape: Tuple[int, ...], n: int, has_base: bool,
                chunks: Callable, ops: Any, check_finite: bool = False) -> Tuple[CombinePlan, Optional[Callable], TensorContext]:
    """The tensor's CombinePlan (after its streamed statistics), its per-chunk probs function and
    the context (``ctx.seen``: the ingredients a statistics pass checked in full for NaN/Inf;
    with ``check_finite`` a NaN/Inf met raises ``stats.NonFinite``)."""
    ctx = TensorContext(name, tuple(shape), n, has_base, chunks, ops, check_finite)
    params = params.for_tensor(name, tuple(shape))  # per-tensor values (filters, layer gradients)
    return method.plan(ctx, params), method.probs_for(ctx, params), ctx


def unseen_hidden(plan: CombinePlan, ctx: TensorContext) -> list:
    """The ingredients whose NaN/Inf could vanish unseen: a mask or an election may drop their
    entries (``plan.hides``) and no statistics pass read them in full (``ctx.seen``). A finite
    check needs to look at these itself; the combine pass's count covers the others."""
    return [i for i in range(plan.n) if plan.hides(i) and i not in ctx.seen]


def merge_tensor(method: Method, params: Params, name: str, shape, xs: Sequence, base, out, ops) -> CombinePlan:
    """Statistics, plan and combine pass of one in-memory tensor (one chunk)."""
    chunks = lambda: [(0, xs, base)]  # noqa: E731
    plan, probs_fn, _ = plan_tensor(method, params, name, shape, len(xs), base is not None, chunks, ops)
    ops.combine(xs, base, out, plan, 0, probs_fn(0, xs, base) if probs_fn else None)
    return plan
