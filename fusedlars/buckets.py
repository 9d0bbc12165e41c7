"""Buckets: segment, tile and address tables over the user's own tensors.

A :class:`Bucket` describes the parameters of one param group that share a device, a dtype and
a shard layout. It owns no copy of them: params and grads stay the user's tensors (never
re-pointed, never made views of a buffer of ours), as with torch.optim's fused optimizers.
Kernels see one *logical* flat element space::

    segment s = parameter tensor s (the unit of a trust ratio), numel[s] elements
    element (s, k) lives at base_X[s] + k for every buffer X (param, grad, master, state)

A *tile* is a fixed-size slice ``[start, start + len)`` of ONE segment (``start`` is an offset
inside the segment). Kernels write one partial sum of squares per tile; every consumer reduces a
segment's tiles in a fixed order, so norms are bitwise reproducible whatever the thread, block
or program count.

What a backend reads, per step (:meth:`Bucket.refresh` builds it on the host):

* ``param_tensors[s]``: the local tensor of param s (a DTensor's local shard), updated in place;
* ``grad_tensors[s]``: its local grad, or None: the segment is inactive this step (skipped,
  exactly as torch.optim skips a param whose ``.grad`` is None);
* ``master_tensors[s]`` (fp32 master weights of bf16/fp16 params, when enabled) and
  ``state_tensors[name][s]``: ours, created zero-filled the first time param s has a grad
  (torch semantics: a frozen param never gets state). They are the tensors of the optimizer's
  ``state[p]`` (:meth:`refresh` adopts loaded or replaced ones);
* ``active_idx``: the active segments; per-segment device tables ``wd_mask``, ``adapt_mask``,
  ``active``, ``has_state``, ``step`` and the outputs ``w_norm``, ``g_norm``, ``u_norm``,
  ``trust_ratio``;
* :meth:`address_table`: the same tensors as a device table of base addresses (CUDA, Triton).

// NOTE: [Dense segments]
// Kernels walk a segment as ``numel`` consecutive elements from its base address. That is exact
// for any non-overlapping and dense tensor (contiguous, channels_last, transposed) provided every
// buffer of the segment walks its elements in the param's order (:func:`same_order`: equal strides
// on every dim of size > 1; a size-1 dim's stride moves no address, e.g. a tensor-parallel shard
// (1, n) of a (k, n) weight with strides (k, 1) pairs with a contiguous grad). State and masters
// are created in the param's order (``empty_like``); a grad in another order (autograd's layout
// contract makes this rare) is copied into a scratch tensor for that step. A param that is not
// dense itself (an ``nn.Parameter`` over a strided slice, as torch.optim accepts) is stepped
// through a dense scratch copy of its own: copied in by :meth:`Bucket.refresh`, written back by
// :meth:`Bucket.write_back` after the kernels; every other segment is stepped in place.

// NOTE: [Low-bit buckets]
// Whether a bucket's state is fp32, bf16 or int8 (``state_storage``, the param group's ``state_dtype``)
// and whether its fp32 masters are kept whole or as a remainder (``uses_masters`` /
// ``uses_remainder``) are properties of the bucket: every segment of a bucket has the same layout,
// so a kernel walks one format. ``state_tensors[name][s]`` is the stored tensor (fp32, bf16, or uint8
// codes), ``scale_tensors[name][s]`` its int8 block scales, ``remainder_tensors[s]`` the int16
// remainder; their keys and formats are fusedlars.backends.lowbit_state's. The random bits of a
// stochastic rounding are keyed by the optimizer's ``seed``, the segment's ``param_indices[s]`` (its
// position in the optimizer's flat param order: its state_dict id, stable across a resume) and its
// step count. State found in another format (loaded, or ``state_dtype`` changed) is converted when
// the bucket adopts it, rounding to nearest (lowbit_state NOTE [Low-bit state: where values become
// fp32]). A remainder never goes stale: whatever the param holds, param + remainder is a master that
// rounds to the param (lowbit NOTE [Master split]); only where the user wrote a zero, infinite or NaN
// param over a remainder of the other sign is the remainder dropped (it would make a NaN master).

// NOTE: [Versions]
// Kernels write params through raw addresses, which autograd's version counters do not see, so
// :meth:`publish` bumps the counters of the params a fused step wrote (as an in-place op would):
// a tensor saved for backward and then stepped still raises in backward instead of silently
// using the new values. The counters after the step are recorded; a different counter (or data
// pointer) at the next step means the user wrote the param: its carried weight norm is dropped
// (NOTE [Carried weight norms], csrc/cpu/optim_cpu.cpp) and its fp32 master re-synced.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from . import host
from .backends import lowbit, lowbit_state
from .distributed import as_dtensor_like, dtensor_class, is_dtensor, local_tensor

__all__ = ["Bucket", "TileTable", "state_dtype_for", "grad_mismatch", "same_order"]


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Optimizer state is fp32 for fp32/bf16/fp16 params and fp64 for fp64 params."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill ``numel`` consecutive slots from ``data_ptr``."""
    if t.is_contiguous():
        return True
    expected = 1  # the strides, smallest first, must be those of a contiguous permutation
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Are ``a`` and ``b`` (same shape) dense and walked in the same memory order (NOTE [Dense
    segments]): equal strides on every dim of size > 1?"""
    if a.numel() <= 1:
        return True
    if not (_is_dense(a) and _is_dense(b)):
        return False
    return all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


@dataclass(frozen=True)
class TileTable:
    """Tiles of ``tile_elems`` elements; tiles of segment s are ``seg_tile_ptr[s]:seg_tile_ptr[s+1]``."""

    tile_elems: int
    tile_seg: torch.Tensor  # int32 [T]
    tile_start: torch.Tensor  # int64 [T] element offset inside the tile's segment
    tile_len: torch.Tensor  # int32 [T] number of valid elements (<= tile_elems)
    seg_tile_ptr: torch.Tensor  # int64 [S+1]
    num_tiles: int


def grad_mismatch(g: torch.Tensor, shape, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why grad ``g`` cannot be stepped for a param of ``shape``/``dtype``/``device`` (None if it can).
    The text follows the parameter's name in the error."""
    if g.is_sparse:
        return " has a sparse gradient; fusedlars needs dense gradients (e.g. nn.Embedding(sparse=False))."
    if g.device != device or tuple(g.shape) != tuple(shape) or g.dtype != dtype:
        return (
            f": grad ({tuple(g.shape)}, {g.dtype}, {g.device}) does not match the param "
            f"({tuple(shape)}, {dtype}, {device}); fusedlars needs grads of the param's shape, dtype and device."
        )
    return None


#: address_table kinds besides the state names
ADDRESS_KINDS = ("param", "grad", "master")


class Bucket:
    """Tables over the params of one (param group, device, dtype, shard layout).

    Static: ``params`` (the user's tensors, DTensors under FSDP2), ``names``, ``shapes`` and
    ``numels`` (local), ``num_segments``, ``device``, ``dtype``, ``state_dtype``, ``shard``,
    ``state_names``, ``uses_masters``, the state's format ``state_storage`` and the masters' form
    (NOTE [Low-bit buckets]); device tables ``seg_numel`` (int64), ``wd_mask`` /
    ``adapt_mask`` (1 where decay / a ratio applies), ``has_state`` (1 once the segment stepped),
    ``step`` (float32 completed steps, whose 0-dim views are ``state[p]["step"]``), and the last
    step's ``w_norm``, ``g_norm``, ``u_norm``, ``trust_ratio``. Per step: see the module docstring.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        names: list[str | None],
        *,
        state_names: tuple[str, ...],
        master_weights: bool,
        wd_excluded: list[bool],
        adapt_excluded: list[bool],
        shard=None,
        state_storage: str = "float32",
        seed: int = lowbit_state.DEFAULT_SEED,
        param_indices: list[int] | None = None,
    ) -> None:
        """``shard``: the :class:`fusedlars.distributed.ShardSpec` of a bucket of DTensor params, else None.
        ``master_weights``: False, True (fp32 masters of bf16/fp16 params) or ``"remainder"`` (bf16
        params: an int16 remainder each); ``state_storage``, ``seed``, ``param_indices``: NOTE [Low-bit
        buckets] (``param_indices`` default to 0..S-1)."""
        assert params
        self.params = list(params)
        self.names = list(names)
        self.shard = shard
        locs = [local_tensor(p) for p in params]
        self.device = locs[0].device
        self.dtype = locs[0].dtype
        self.state_dtype = state_dtype_for(self.dtype)
        self.shapes = [tuple(t.shape) for t in locs]  # local shapes (== global shapes unless sharded)
        self.numels = [t.numel() for t in locs]
        self.num_segments = S = len(params)
        self.state_names = tuple(state_names)
        #: fp32 master tensors (master_weights=True); bf16 params with master_weights="remainder" keep
        #: an int16 remainder instead (``uses_remainder``, ``remainder_tensors``)
        self.uses_remainder = master_weights == "remainder" and self.dtype == torch.bfloat16
        low = self.dtype in (torch.float16, torch.bfloat16)
        self.uses_masters = bool(master_weights) and not self.uses_remainder and low
        self.state_storage = lowbit_state.storage_name(state_storage)
        self.seed = int(seed)
        self.param_indices = list(range(S)) if param_indices is None else [int(i) for i in param_indices]
        dev, sdt = self.device, self.state_dtype
        self.seg_numel = torch.tensor(self.numels, dtype=torch.int64, device=dev)
        self.set_exclusions(wd_excluded, adapt_excluded)
        self.has_state = torch.zeros(S, dtype=sdt, device=dev)
        self.step = torch.zeros(S, dtype=torch.float32, device=dev)
        self.w_norm = torch.zeros(S, dtype=sdt, device=dev)
        self.g_norm = torch.zeros(S, dtype=sdt, device=dev)
        self.u_norm = torch.zeros(S, dtype=sdt, device=dev)
        self.trust_ratio = torch.ones(S, dtype=sdt, device=dev)
        with torch.enable_grad():  # views of a table, written in place under any grad mode
            self._step_views = [self.step[i] for i in range(S)]
        # per step (refresh)
        #: the user's tensors (a DTensor's local shard), and what the kernels step: the same tensor,
        #: or a dense scratch copy of a param that is not dense (NOTE [Dense segments])
        self.local_tensors: list[torch.Tensor] = list(locs)
        self.param_tensors: list[torch.Tensor] = list(locs)
        self._param_scratch: dict[int, torch.Tensor] = {}
        self.grad_tensors: list[torch.Tensor | None] = [None] * S
        self.master_tensors: list[torch.Tensor | None] | None = [None] * S if self.uses_masters else None
        self.state_tensors: dict[str, list[torch.Tensor | None]] = {n: [None] * S for n in self.state_names}
        #: int8 state: the per-block fp32 scales of each buffer (NOTE [Low-bit buckets])
        self.scale_tensors: dict[str, list[torch.Tensor | None]] = self._scale_lists()
        self.remainder_tensors: list[torch.Tensor | None] | None = [None] * S if self.uses_remainder else None
        self.active_idx: tuple[int, ...] = ()
        self.active = torch.zeros(S, dtype=sdt, device=dev)
        self.all_active = False
        self._active_key: tuple[int, ...] | None = None
        self._grad_scratch: dict[int, torch.Tensor] = {}
        self._tiles: dict[int, TileTable] = {}
        self._addr: dict[tuple[str, ...], tuple[tuple[int, ...], torch.Tensor]] = {}
        self._ids: dict[tuple[int, ...], torch.Tensor] = {}
        self._seen_state: list[tuple | None] = [None] * S  # ids of the state tensors last adopted
        self._versions: list[tuple[int, int] | None] = [None] * S  # (data_ptr, _version) after our last step
        self._scanned: tuple | None = None  # (state, the C walk's result) from check() for refresh()
        #: (records, code, sums) of this step's check(): the walk's answer for BackwardNorms.grad_sums
        self.scanned_sums: tuple | None = None
        # NOTE [Carried weight norms] (csrc/cpu/optim_cpu.cpp): per-segment ||w||^2 written by the
        # last step, -1 where unknown; None when the last step did not carry them.
        self.w_sumsq: torch.Tensor | None = None
        #: backend caches (lists, scratch, launch tables), keyed by the backend's name
        self.cache: dict[str, Any] = {}

    # -- tables ---------------------------------------------------------------------------------
    def set_exclusions(self, wd_excluded: list[bool], adapt_excluded: list[bool]) -> None:
        """Per-segment masks: ``wd_mask`` 1 where weight decay applies, ``adapt_mask`` 1 where a ratio does."""
        sdt, dev = self.state_dtype, self.device
        self.wd_mask = torch.tensor([0.0 if e else 1.0 for e in wd_excluded], dtype=sdt, device=dev)
        self.adapt_mask = torch.tensor([0.0 if e else 1.0 for e in adapt_excluded], dtype=sdt, device=dev)
        self.any_wd_excluded = any(wd_excluded)

    def set_state_names(self, names: tuple[str, ...], storage: str | None = None) -> None:
        """The state buffers the group's options need now (momentum switched on or off after the
        buckets were built): missing ones are created at the next refresh, as at a first step.
        ``storage``: the group's state format now (its ``state_dtype`` changed: the state is converted
        at the next refresh, NOTE [Low-bit buckets])."""
        names = tuple(names)
        storage = self.state_storage if storage is None else lowbit_state.storage_name(storage)
        if names == self.state_names and storage == self.state_storage:
            return
        self.state_names = names
        self.state_storage = storage
        self.state_tensors = {n: [None] * self.num_segments for n in names}
        self.scale_tensors = self._scale_lists()
        self._seen_state = [None] * self.num_segments
        self.cache.clear()

    def _scale_lists(self) -> dict[str, list[torch.Tensor | None]]:
        if self.state_storage != "int8":
            return {}
        return {n: [None] * self.num_segments for n in self.state_names}

    @property
    def lowbit_state(self) -> bool:
        """Is the state stored in bf16 or int8 (NOTE [Low-bit buckets])?"""
        return self.state_storage != "float32" and bool(self.state_names)

    @property
    def exact_elements(self) -> bool:
        """Does this bucket step through the exact element math (low-bit state or remainder masters:
        every backend stores the same bits, csrc/lars_math.h NOTE [Low-bit element math in fp32])?"""
        return self.lowbit_state or self.uses_remainder

    def fused_unsupported(self) -> str | None:
        """Why the fused kernels (cpu, cuda, triton) cannot step this bucket yet, or None: low-bit state
        and remainder masters run on the torch and reference backends only (issue #26, part 1)."""
        what = []
        if self.lowbit_state:
            what.append(f"state_dtype={self.state_storage!r} (low-bit optimizer state)")
        if self.uses_remainder:
            what.append('master_weights="remainder"')
        if not what:
            return None
        return (
            f"{' and '.join(what)} is not fused yet: the torch and reference backends step it "
            "(backend='auto' picks torch)"
        )

    def tiles(self, tile_elems: int) -> TileTable:
        """The tile table for ``tile_elems`` (cached), over every segment. Empty segments have no tiles."""
        t = self._tiles.get(tile_elems)
        if t is not None:
            return t
        seg, start, ln, ptr = [], [], [], [0]
        for s, n in enumerate(self.numels):
            for a in range(0, n, tile_elems):
                seg.append(s)
                start.append(a)
                ln.append(min(tile_elems, n - a))
            ptr.append(len(seg))
        dev = self.device
        t = TileTable(
            tile_elems=tile_elems,
            tile_seg=torch.tensor(seg, dtype=torch.int32, device=dev),
            tile_start=torch.tensor(start, dtype=torch.int64, device=dev),
            tile_len=torch.tensor(ln, dtype=torch.int32, device=dev),
            seg_tile_ptr=torch.tensor(ptr, dtype=torch.int64, device=dev),
            num_tiles=len(seg),
        )
        self._tiles[tile_elems] = t
        return t

    def tensors_of(self, kind: str) -> list[torch.Tensor | None]:
        """This step's tensors of one address kind: 'param', 'grad', 'master' or a state name."""
        if kind == "param":
            return self.param_tensors
        if kind == "grad":
            return self.grad_tensors
        if kind == "master":
            return self.master_tensors if self.master_tensors is not None else [None] * self.num_segments
        if kind == "remainder":
            return self.remainder_tensors if self.remainder_tensors is not None else [None] * self.num_segments
        if kind.endswith("_absmax") and kind[: -len("_absmax")] in self.scale_tensors:
            return self.scale_tensors[kind[: -len("_absmax")]]
        return self.state_tensors[kind]

    def address_table(self, kinds: tuple[str, ...]) -> torch.Tensor:
        """int64 ``[len(kinds), S]`` device table of this step's base addresses (0 where a segment has
        no such tensor: inactive, or no master). The same tensor object every call; its contents are
        rewritten (one small host-to-device copy) only when an address changed, which the caching
        allocator makes rare. Under CUDA-graph capture addresses must stay the same (capturable)."""
        ptrs = tuple(0 if t is None else t.data_ptr() for k in kinds for t in self.tensors_of(k))
        hit = self._addr.get(kinds)
        if hit is not None and hit[0] == ptrs:
            return hit[1]
        host = torch.tensor(ptrs, dtype=torch.int64).view(len(kinds), self.num_segments)
        if hit is None:
            table = host.to(self.device)
        else:
            table = hit[1]
            table.copy_(host, non_blocking=False)
        self._addr[kinds] = (ptrs, table)
        return table

    def active_ids(self) -> torch.Tensor:
        """int64 device tensor of ``active_idx`` (cached per set of active segments)."""
        t = self._ids.get(self.active_idx)
        if t is None:
            if len(self._ids) >= 16:
                self._ids.clear()
            t = self._ids[self.active_idx] = torch.tensor(self.active_idx, dtype=torch.int64, device=self.device)
        return t

    # -- per step -------------------------------------------------------------------------------
    def check(self, state: MutableMapping[torch.Tensor, dict] | None = None, records: dict | None = None) -> None:
        """Validation that must pass before anything is mutated: every param still has its shape,
        dtype, device and a dense layout; every grad matches its param.

        ``state`` (the optimizer's ``state``): a plain bucket's common case is then checked and
        walked at once in C (fusedlars.host: csrc/host.cpp), writing nothing but this step's tensor
        lists, and the next :meth:`refresh` of the same ``state`` finishes from that walk.
        ``records`` (a BackwardNorms' records): the walk also reads this step's recorded gradient sums
        (``scanned_sums``, which BackwardNorms.grad_sums takes)."""
        self._scanned = self.scanned_sums = None
        if self.shard is None:
            scan = host.bucket_scan
            if state is not None and scan is not None:
                sums = None if records is None else torch.zeros(self.num_segments, dtype=torch.float64)
                r = scan(self.params, self.shapes, self.dtype, self.device, self.local_tensors, self.param_tensors,
                         self.grad_tensors, self._versions, state, self._keys(), self._seen_state, records, sums)  # fmt: skip
                if r is not None:
                    self._scanned = (state, r)
                    if records is not None and r[3] >= 0:
                        self.scanned_sums = (records, r[3], sums)
                    return
            if self._plain_ok():
                return
        for i, p in enumerate(self.params):
            loc = local_tensor(p)
            if tuple(loc.shape) != self.shapes[i] or loc.dtype != self.dtype or loc.device != self.device:
                raise RuntimeError(
                    f"parameter {self.names[i] or i} changed shape, dtype or device after the optimizer "
                    f"built its buckets ({self.shapes[i]}, {self.dtype}, {self.device} -> "
                    f"{tuple(loc.shape)}, {loc.dtype}, {loc.device}). Create the optimizer after moving the model."
                )
            g = p.grad
            if g is None:
                continue
            if is_dtensor(g) != (self.shard is not None):
                raise RuntimeError(
                    f"parameter {self.names[i] or f'#{i}'}: the param is {'a' if self.shard else 'not a'} DTensor "
                    f"but its grad is {'a' if is_dtensor(g) else 'not a'} DTensor."
                )
            why = grad_mismatch(local_tensor(g), self.shapes[i], self.dtype, self.device)
            if why:
                raise RuntimeError(f"parameter {self.names[i] or f'#{i}'}{why}")

    def _plain_ok(self) -> bool:
        """The common case of :meth:`check` for plain (not sharded) params, cheaply: True when all is
        well; False sends :meth:`check` through its full walk, which names what is wrong. This is
        per-step host time on every step (161 params of ResNet-50: ~0.1 ms instead of ~0.4)."""
        dt_cls = dtensor_class()
        dtype, dev, strided, plain = self.dtype, self.device, torch.strided, torch.Tensor
        for p, shape in zip(self.params, self.shapes):
            if p.shape != shape or p.dtype is not dtype or p.device != dev:
                return False
            g = p.grad
            if g is None:
                continue
            if g.layout is not strided or g.shape != shape or g.dtype is not dtype or g.device != dev:
                return False
            # (type(g) is Tensor: the common case without an isinstance walk; a Parameter is no DTensor)
            if dt_cls is not None and (type(g) is not plain and isinstance(g, dt_cls) or isinstance(p, dt_cls)):
                return False
        return True

    def refresh(self, state: MutableMapping[torch.Tensor, dict]) -> None:
        """This step's tensors (host side, after :meth:`check`): locals and grads of the params,
        state from ``state`` (the optimizer's ``state``), created zero-filled for a segment that has
        a grad and none yet (NOTE [Dense segments]); masters re-synced where the user wrote a param
        (NOTE [Versions]). After a :meth:`check` of the same ``state`` whose C walk succeeded, only its
        results are applied (the same as this walk's, csrc/host.cpp)."""
        scanned, self._scanned = self._scanned, None
        if scanned is not None and scanned[0] is state:
            active_idx, changed, adopt, _ = scanned[1]
            for i in changed:
                self._versions[i] = None
            if adopt:
                keys = self._keys()
                for i in adopt:
                    self._adopt(i, self.params[i], self.param_tensors[i], state,
                                create=self.grad_tensors[i] is not None, keys=keys)  # fmt: skip
            self._after_walk(active_idx, changed)
            return
        active = []
        changed = []  # params written outside our steps: drop their carried norm, re-sync masters
        plain = self.shard is None
        # NOTE: [Host time per param] this loop runs for every param at every step (ResNet-50: 161,
        # many small layers: thousands), so its common case is kept to a few builtin calls per param:
        # one keys tuple per call, the contiguous test before the general dense one, and the state
        # adopted only when its tensors are not the ones seen last time (Bucket._adopt).
        keys = self._keys()
        seen_state = self._seen_state
        local_tensors, param_tensors, grad_tensors, versions = (
            self.local_tensors, self.param_tensors, self.grad_tensors, self._versions
        )  # fmt: skip
        for i, p in enumerate(self.params):
            loc = p if plain else local_tensor(p)
            local_tensors[i] = loc
            kc = loc.is_contiguous()  # (then kp is loc, and contiguous)
            kp = loc if kc or loc.numel() <= 1 or _is_dense(loc) else self._scratch_param(i, loc)
            param_tensors[i] = kp
            seen = versions[i]
            if seen is not None and (loc.data_ptr(), loc._version) != seen:
                changed.append(i)
                versions[i] = None
            g = p.grad
            if g is not None:
                if not plain:
                    g = local_tensor(g)
                # both contiguous: the same element order (no stride tuples to compare)
                if not (g.is_contiguous() and (kc or kp.is_contiguous())) and not same_order(g, kp):
                    scratch = self._grad_scratch.get(i)
                    if scratch is None:
                        scratch = self._grad_scratch[i] = torch.empty_like(kp)
                    scratch.copy_(g)
                    g = scratch
                active.append(i)
            grad_tensors[i] = g
            st = state.get(p)
            if st is not None and tuple(map(id, map(st.get, keys))) == seen_state[i]:
                continue  # the state tensors of last time (Bucket._adopt's first test)
            self._adopt(i, p, kp, state, create=g is not None, keys=keys)
        self._after_walk(tuple(active), changed)

    def _after_walk(self, key: tuple[int, ...], changed: list[int]) -> None:
        """The end of :meth:`refresh`: forget what the user's writes made stale (``changed``), and the
        active set ``key`` into the tables."""
        if changed:
            if self.w_sumsq is not None:
                self.w_sumsq.index_fill_(0, torch.tensor(changed, dtype=torch.int64, device=self.device), -1.0)
            if self.master_tensors is not None:
                for i in changed:
                    m = self.master_tensors[i]
                    if m is not None:
                        loc = self.param_tensors[i]  # (a scratch param holds the user's values now)
                        # keep the fp32 master where the param still holds its rounding (no host sync)
                        m.copy_(torch.where(loc != m.to(loc.dtype), loc.to(m.dtype), m))
            if self.remainder_tensors is not None:
                for i in changed:
                    r = self.remainder_tensors[i]
                    if r is not None:  # NOTE [Low-bit buckets]: a remainder that would make a NaN master
                        r.masked_fill_(~torch.isfinite(self.weights(i)) & torch.isfinite(self.param_tensors[i]), 0)
        if key != self._active_key:
            self._active_key = self.active_idx = key
            mask = [0.0] * self.num_segments
            for i in key:
                mask[i] = 1.0
            self.active.copy_(torch.tensor(mask, dtype=self.state_dtype))  # same tensor: static for graphs
            self.all_active = len(key) == self.num_segments

    def _scratch_param(self, i: int, loc: torch.Tensor) -> torch.Tensor:
        """Segment i's dense stand-in for a param that is not dense, holding the param's values now."""
        scratch = self._param_scratch.get(i)
        if scratch is None:
            scratch = self._param_scratch[i] = torch.empty(loc.shape, dtype=loc.dtype, device=loc.device)
        with torch.no_grad():
            scratch.copy_(loc)
        return scratch

    def copy_in(self) -> None:
        """Refresh the scratch params from the user's params (a compiled step, which does not refresh)."""
        for i in self._param_scratch:
            if self.param_tensors[i] is self._param_scratch[i]:
                self._param_scratch[i].copy_(self.local_tensors[i])

    def write_back(self) -> None:
        """After the kernels: the stepped values of scratch params into the user's params (NOTE [Dense
        segments]); params without a grad this step are not touched."""
        if self._param_scratch:
            for i in self.active_idx:
                kp = self.param_tensors[i]
                if kp is self._param_scratch.get(i):
                    self.local_tensors[i].copy_(kp)

    def _wrap(self, i: int, local: torch.Tensor) -> torch.Tensor:
        return local if self.shard is None else as_dtensor_like(local, self.params[i])

    def _keys(self) -> tuple[str, ...]:
        """The state keys segment state is adopted from (NOTE [Low-bit buckets])."""
        keys = self.state_names + tuple(lowbit_state.absmax_key(n) for n in self.scale_tensors)
        if self.uses_masters:
            keys += ("master_weight",)
        if self.uses_remainder:
            keys += (lowbit_state.REMAINDER_KEY,)
        return keys + ("step",)

    def _adopt(
        self, i: int, p: torch.Tensor, loc: torch.Tensor, state: MutableMapping, create: bool, keys=None
    ) -> None:
        """Point segment i's state at ``state[p]``'s tensors; create them when missing and ``create``.
        ``keys``: :meth:`_keys` (passed by a caller that has it)."""
        st = state.get(p)
        if st is None:
            if not create:
                for name in self.state_names:
                    self.state_tensors[name][i] = None
                for lst in self.scale_tensors.values():
                    lst[i] = None
                if self.master_tensors is not None:
                    self.master_tensors[i] = None
                if self.remainder_tensors is not None:
                    self.remainder_tensors[i] = None
                return
            st = state[p] = {}
        if keys is None:
            keys = self._keys()
        if tuple(map(id, map(st.get, keys))) == self._seen_state[i]:  # builtins only: per-step host time
            return
        sdt = self.state_dtype
        fresh = False
        with torch.no_grad():
            for name in self.state_names:
                v = st.get(name)
                if v is None:
                    if not create:
                        self.state_tensors[name][i] = None
                        if name in self.scale_tensors:
                            self.scale_tensors[name][i] = None
                        continue
                    loc_v, scale = lowbit_state.fresh(name, loc, self.state_storage, sdt)
                    fresh = True
                else:
                    loc_v, scale = self._adopt_buffer(i, name, st, local_tensor(v), loc)
                if loc_v is not st.get(name) and (v is None or loc_v is not local_tensor(v)):
                    st[name] = self._wrap(i, loc_v)
                akey = lowbit_state.absmax_key(name)
                if scale is not None:
                    if st.get(akey) is not scale:
                        st[akey] = scale
                    self.scale_tensors[name][i] = scale
                else:
                    st.pop(akey, None)
                self.state_tensors[name][i] = loc_v
            if self.master_tensors is not None:
                v = st.get("master_weight")
                if v is None and create:
                    m = torch.empty_like(loc, dtype=torch.float32).copy_(loc)
                    st["master_weight"] = self._wrap(i, m)
                elif v is not None:
                    m = local_tensor(v)
                    if m.stride() != loc.stride() or m.dtype != torch.float32:
                        m = torch.empty_like(loc, dtype=torch.float32).copy_(m)
                        st["master_weight"] = self._wrap(i, m)
                    loc.copy_(m)  # a loaded master is the truth: the param is its rounding
                    if loc is not self.local_tensors[i]:
                        self.local_tensors[i].copy_(m)
                else:
                    m = None
                self.master_tensors[i] = m
            if self.remainder_tensors is not None:
                key = lowbit_state.REMAINDER_KEY
                v = st.get(key)
                if v is None and create:
                    r = torch.zeros_like(loc, dtype=torch.int16)  # master = the param exactly
                    st[key] = self._wrap(i, r)
                elif v is not None:
                    r = local_tensor(v)
                    if r.stride() != loc.stride() or r.dtype != torch.int16 or r.device != loc.device:
                        r = torch.empty_like(loc, dtype=torch.int16).copy_(r)
                        st[key] = self._wrap(i, r)
                else:
                    r = None
                self.remainder_tensors[i] = r
            s = st.get("step")
            if s is not self._step_views[i]:
                if s is not None:
                    self.step[i] = torch.as_tensor(s, dtype=torch.float32).reshape(()).to(self.device)
                elif not create:
                    return
                else:
                    self.step[i] = 0.0
                st["step"] = self._step_views[i]
            # a segment whose state came from outside (load_state_dict) has stepped; fresh state has not
            self.has_state[i] = (
                0.0 if fresh else (1.0 if any(n in st for n in self.state_names) or s is not None else 0.0)
            )
        self._seen_state[i] = tuple(map(id, map(st.get, keys)))

    def _adopt_buffer(
        self, i: int, name: str, st: dict, v: torch.Tensor, loc: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Segment i's stored buffer ``name`` (local tensor ``v``) in this bucket's format, layout and
        device: ``v`` itself when it is, else a converted copy (NOTE [Low-bit buckets]); and its scales."""
        akey = lowbit_state.absmax_key(name)
        scale = st.get(akey)
        scale = None if scale is None else local_tensor(scale)
        fmt = lowbit_state.format_of(v)
        want = self.state_storage
        sdt = self.state_dtype
        nblocks = lowbit.num_blocks(loc.numel())
        same_fmt = fmt == want and (want != "float32" or v.dtype == sdt)
        if same_fmt and v.stride() == loc.stride() and v.device == loc.device:
            if want != "int8":
                return v, None
            if (
                scale is not None
                and scale.dtype == torch.float32
                and scale.device == loc.device
                and (tuple(scale.shape) == (nblocks,))
            ):
                return v, scale
        if fmt == "int8" and scale is None:
            raise ValueError(f"parameter {self.names[i] or '#' + str(i)}: int8 state {name!r} has no {akey!r} scales")
        if same_fmt:  # only the layout or device differs: move it, bit for bit
            out = torch.empty_like(loc, dtype=v.dtype).copy_(v)
            return out, (None if want != "int8" else scale.to(device=loc.device, dtype=torch.float32).clone())
        x = lowbit_state.decode(name, v.to(loc.device), None if scale is None else scale.to(loc.device))
        return lowbit_state.encode_nearest(name, torch.empty_like(loc, dtype=x.dtype).copy_(x), want, sdt)

    def loaded(self, state: MutableMapping[torch.Tensor, dict]) -> None:
        """After ``load_state_dict`` (NOTE [Loading in place], fusedlars/optim/base.py): adopt the
        state, mark the segments that have some as stepped and the others as fresh, and make each
        param the rounding of its loaded fp32 master."""
        has = []
        with torch.no_grad():
            for i, p in enumerate(self.params):
                st = state.get(p) or {}
                has.append(1.0 if any(n in st for n in self.state_names) or "step" in st else 0.0)
                if "step" not in st:
                    self.step[i] = 0.0
                if self.uses_masters and "master_weight" in st:
                    local_tensor(p).copy_(local_tensor(st["master_weight"]))
                self._versions[i] = None
            self.has_state.copy_(torch.tensor(has, dtype=self.state_dtype))
            self.drop_carry()
            for i, p in enumerate(self.params):  # adopt replaced state; this step's grads stay as they are
                self._adopt(i, p, local_tensor(p), state, create=False)

    def publish(self, wrote_raw: bool) -> None:
        """After a step: bump the version counters of the params a kernel wrote through raw
        addresses (``wrote_raw``) and record every active param's (data_ptr, version) (NOTE [Versions])."""
        idx = self.active_idx
        if host.bucket_publish is not None:
            host.bucket_publish(self.param_tensors, self.local_tensors, idx, self._versions, wrote_raw)
            return
        if wrote_raw and idx:
            torch.autograd.graph.increment_version([self.param_tensors[i] for i in idx])
        for i in idx:
            loc = self.local_tensors[i]
            self._versions[i] = (loc.data_ptr(), loc._version)

    def carry_buffer(self) -> torch.Tensor:
        """The carried ||w||^2 buffer (NOTE [Carried weight norms]), allocated as 'unknown' (-1)."""
        if self.w_sumsq is None:
            self.w_sumsq = torch.full((self.num_segments,), -1.0, dtype=torch.float64, device=self.device)
        return self.w_sumsq

    def drop_carry(self) -> None:
        """Forget the carried norms (the next step is not done by a kernel that carries them)."""
        self.w_sumsq = None

    def any_active(self) -> bool:
        return bool(self.active_idx)

    def weights(self, i: int) -> torch.Tensor:
        """The tensor the math reads segment i's weights from: its fp32 master if any (a new tensor
        rebuilt from the param and its remainder for ``master_weights="remainder"``), else the param."""
        if self.master_tensors is not None and self.master_tensors[i] is not None:
            return self.master_tensors[i]
        if self.remainder_tensors is not None and self.remainder_tensors[i] is not None:
            return lowbit.master_rebuild(self.param_tensors[i], self.remainder_tensors[i]).view(self.shapes[i])
        return self.param_tensors[i]

    def tables(self) -> list[torch.Tensor]:
        """The per-segment device tables a kernel reads or writes (static across steps)."""
        return [self.seg_numel, self.wd_mask, self.adapt_mask, self.active, self.has_state, self.step,
                self.w_norm, self.g_norm, self.u_norm, self.trust_ratio]  # fmt: skip
