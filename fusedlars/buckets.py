"""Flat parameter buckets: memory layout, views, segment and tile tables.

A :class:`Bucket` holds the parameters of one param group that share a device
and a dtype in contiguous storage. Each user parameter becomes a view into
``flat_param`` and its ``.grad`` a view into ``flat_grad``, so backward writes
straight into the bucket and a kernel sees one pointer per buffer.

Layout (element offsets, identical for every flat buffer of the bucket)::

    | seg 0 data | 0-pad | seg 1 data | 0-pad | ... | seg S-1 data | 0-pad |
      ^ offset[0]          ^ offset[1]

A *segment* is one parameter tensor: the unit of a trust ratio. Every segment
starts on a 64-byte boundary of the param buffer and of the (fp32) state
buffers. Pads are zero in every buffer and never written by an update, so they
never change a norm.

A *tile* is a fixed-size slice of one segment (never crossing segments).
Kernels write one partial sum of squares per tile; every consumer reduces a
segment's tiles in a fixed order, so norms are bitwise reproducible whatever
the thread or block count.

// NOTE: [Views stay exact]
// Anything that breaks a view (``model.zero_grad(set_to_none=True)``, a grad
// replaced by user code, ``p.data = ...``) is detected at the start of the next
// step by a pointer comparison, and repaired by copying the tensor into the
// bucket and re-pointing the view. The copy costs one pass; results stay exact.

// NOTE: [External segments]
// Some tensors must not be re-pointed (see fusedlars.distributed, NOTE [Foreign storage]):
// DTensor parameters (FSDP2 all-gathers from its own sharded storage), and parameters or
// grads that live inside a larger buffer we do not own (ZeRO parameter buckets, DDP
// gradient buckets). For such a segment ``external[i]`` is True: ``sync_views`` copies
// the (local) values in before the step and ``publish`` copies the new values back
// after it; the segment's views in the bucket are ordinary bucket memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .distributed import is_dtensor, local_tensor

__all__ = ["Bucket", "TileTable", "state_dtype_for", "SEGMENT_ALIGN_BYTES"]

SEGMENT_ALIGN_BYTES = 64


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Optimizer state is fp32 for fp32/bf16/fp16 params and fp64 for fp64 params."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _foreign(t: torch.Tensor, own: set[int]) -> bool:
    """True if ``t`` lives inside a larger buffer that is not one of ours (``own``: storage pointers)."""
    st = t.untyped_storage()
    return st.nbytes() > t.numel() * t.element_size() and st.data_ptr() not in own


def _shared_param(p: torch.Tensor, own: set[int]) -> bool:
    """True if ``p``'s storage belongs to someone else: a larger buffer, or (in a distributed job) a
    buffer of exactly its size that another tensor also holds (ZeRO's one-parameter bucket). A false
    positive (the user holds a ``p.detach()``) only costs a copy in and out per step and writes the
    new values through to that storage, as torch.optim does."""
    if _foreign(p, own):
        return True
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    st = p.untyped_storage()
    if st.data_ptr() in own or st.nbytes() == 0:
        return False
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    # references: p's TensorImpl and the temporary Python storage object ``st``
    return use_count is not None and use_count(st._cdata) > 2


def _align_elems(dtype: torch.dtype) -> int:
    # Aligned for the param dtype and for the state dtype (>= 4 bytes) at once.
    item = torch.empty((), dtype=dtype).element_size()
    return max(SEGMENT_ALIGN_BYTES // item, SEGMENT_ALIGN_BYTES // 4)


@dataclass(frozen=True)
class TileTable:
    """Tiles of ``tile_elems`` elements; tiles of segment s are ``seg_tile_ptr[s]:seg_tile_ptr[s+1]``."""

    tile_elems: int
    tile_seg: torch.Tensor  # int32 [T]
    tile_start: torch.Tensor  # int64 [T] element offset into the flat buffers
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


class Bucket:
    """Contiguous storage of one (param group, device, dtype) and its per-segment tables.

    Attributes used by the kernels (all on ``device``):
      ``flat_param``, ``flat_grad`` (param dtype), ``flat_master`` (fp32 or None),
      ``state[name]`` (state dtype), ``seg_offset`` / ``seg_numel`` / ``seg_len``
      (int64 [S]; ``seg_len`` includes the pad), per-segment float tensors of the
      state dtype ``wd_mask`` (1 where weight decay applies), ``adapt_mask`` (1 where a
      trust ratio applies), ``active`` (1 where the param has a grad this step),
      ``has_state`` (1 once the segment's momentum / moments exist), ``step``
      (float32, completed steps), and the outputs of the last step ``w_norm``,
      ``g_norm``, ``u_norm``, ``trust_ratio``.
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
        own_storages: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        """``shard``: the :class:`fusedlars.distributed.ShardSpec` of a bucket of DTensor params
        (whose local shards the bucket holds), else None. ``own_storages``: storage pointers of
        buffers of earlier buckets of the same optimizer (not foreign when params still point there)."""
        assert params
        self.params = list(params)
        self.names = list(names)
        self.shard = shard
        locs = [local_tensor(p) for p in params]
        self.device = locs[0].device
        self.dtype = locs[0].dtype
        self.state_dtype = state_dtype_for(self.dtype)
        align = _align_elems(self.dtype)
        self.shapes = [tuple(t.shape) for t in locs]  # local shapes (== global shapes unless sharded)
        self.numels = [t.numel() for t in locs]
        offsets, off = [], 0
        for n in self.numels:
            offsets.append(off)
            off += -(-n // align) * align if n else 0
        self.offsets = offsets
        self.total = off
        self.num_segments = len(params)
        dev, dt, sdt = self.device, self.dtype, self.state_dtype

        with torch.no_grad():
            self.flat_param = torch.zeros(self.total, dtype=dt, device=dev)
            self.flat_grad = torch.zeros(self.total, dtype=dt, device=dev)
            self.param_views = [self._view(self.flat_param, i) for i in range(len(params))]
            self.grad_views = [self._view(self.flat_grad, i) for i in range(len(params))]
            # constant: the fast path of check_grads compares against these
            self._pv_ptr = [v.data_ptr() for v in self.param_views]
            self._gv_ptr = [v.data_ptr() for v in self.grad_views]
            self._gv_stride = [v.stride() for v in self.grad_views]
            self._size = [v.shape for v in self.param_views]
            for t, v in zip(locs, self.param_views):
                v.copy_(t.detach())
            self._own = set(own_storages) | {self.flat_param.untyped_storage().data_ptr()}
            self.external = [shard is not None or is_dtensor(p) or _shared_param(p, self._own) for p in params]
            self.any_external = any(self.external)
            self.flat_master = None
            if master_weights and dt in (torch.float16, torch.bfloat16):
                self.flat_master = self.flat_param.to(torch.float32)
            self.master_views = (
                [self._view(self.flat_master, i) for i in range(len(params))] if self.flat_master is not None else None
            )
        self.state: dict[str, torch.Tensor] = {}
        self.state_views: dict[str, list[torch.Tensor]] = {}
        for name in state_names:
            self.ensure_state(name)

        lens = [(offsets[i + 1] if i + 1 < len(offsets) else self.total) - offsets[i] for i in range(len(offsets))]
        self.seg_offset = torch.tensor(offsets, dtype=torch.int64, device=dev)
        self.seg_numel = torch.tensor(self.numels, dtype=torch.int64, device=dev)
        self.seg_len = torch.tensor(lens, dtype=torch.int64, device=dev)
        S = self.num_segments
        self.set_exclusions(wd_excluded, adapt_excluded)
        self.has_state = torch.zeros(S, dtype=sdt, device=dev)
        self.step = torch.zeros(S, dtype=torch.float32, device=dev)
        self.w_norm = torch.zeros(S, dtype=sdt, device=dev)
        self.g_norm = torch.zeros(S, dtype=sdt, device=dev)
        self.u_norm = torch.zeros(S, dtype=sdt, device=dev)
        self.trust_ratio = torch.ones(S, dtype=sdt, device=dev)
        self._active_key: tuple[bool, ...] | None = None
        self.active = torch.ones(S, dtype=sdt, device=dev)
        self.all_active = True
        self._tiles: dict[int, TileTable] = {}
        self._elem_seg: torch.Tensor | None = None
        # NOTE [Carried weight norms] (csrc/cpu/optim_cpu.cpp): per-segment ||w||^2 written by the last
        # step, -1 where unknown; None when the last step did not carry them. _versions: the params'
        # version counters after that step (an in-place write through a param bumps its counter).
        self.w_sumsq: torch.Tensor | None = None
        self._versions: list[int] | None = None
        # point the user's params at the bucket (external ones keep their storage)
        with torch.no_grad():
            for p, v, ext in zip(params, self.param_views, self.external):
                if not ext:
                    p.data = v
            for i, p in enumerate(params):
                if p.grad is not None:
                    g = local_tensor(p.grad)
                    self.grad_views[i].copy_(g)
                    if self._may_adopt_grad(i, p.grad, g):
                        p.grad = self.grad_views[i]

    # -- layout helpers -------------------------------------------------------------------------
    def _view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        o, n = self.offsets[i], self.numels[i]
        return flat[o : o + n].view(self.shapes[i])

    def set_exclusions(self, wd_excluded: list[bool], adapt_excluded: list[bool]) -> None:
        """Per-segment masks: ``wd_mask`` 1 where weight decay applies, ``adapt_mask`` 1 where a ratio does."""
        sdt, dev = self.state_dtype, self.device
        self.wd_mask = torch.tensor([0.0 if e else 1.0 for e in wd_excluded], dtype=sdt, device=dev)
        self.adapt_mask = torch.tensor([0.0 if e else 1.0 for e in adapt_excluded], dtype=sdt, device=dev)
        self.any_wd_excluded = any(wd_excluded)

    def ensure_state(self, name: str) -> bool:
        """Allocate the zero flat state buffer ``name`` (and its views) if missing; True if it was."""
        if name in self.state:
            return False
        self.state[name] = torch.zeros(self.total, dtype=self.state_dtype, device=self.device)
        self.state_views[name] = [self._view(self.state[name], i) for i in range(self.num_segments)]
        return True

    def tiles(self, tile_elems: int) -> TileTable:
        """The tile table for ``tile_elems`` (cached). Empty segments have no tiles."""
        t = self._tiles.get(tile_elems)
        if t is not None:
            return t
        seg, start, ln, ptr = [], [], [], [0]
        for s, (o, n) in enumerate(zip(self.offsets, self.numels)):
            for a in range(0, n, tile_elems):
                seg.append(s)
                start.append(o + a)
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

    def elem_seg(self) -> torch.Tensor:
        """int32 [total]: the segment of every element (pads belong to the segment before them)."""
        if self._elem_seg is None:
            self._elem_seg = torch.repeat_interleave(
                torch.arange(self.num_segments, dtype=torch.int32, device=self.device),
                self.seg_len,
                output_size=self.total,
            )
        return self._elem_seg

    # -- per-step bookkeeping ------------------------------------------------------------------
    def _may_adopt_grad(self, i: int, g: torch.Tensor, g_local: torch.Tensor) -> bool:
        """May ``p.grad`` be re-pointed into the bucket? Not for a DTensor grad (its local shard is
        FSDP2's) nor for a grad that is a view of someone else's buffer (DDP gradient_as_bucket_view)."""
        return not (self.shard is not None or is_dtensor(g) or _foreign(g_local, self._own))

    def copy_in_param(self, i: int, src: torch.Tensor) -> None:
        """Copy ``src`` into segment ``i``'s param (and master) view."""
        pv = self.param_views[i]
        if self.master_views is not None:
            # keep the fp32 master where the param still holds what we wrote (no host sync)
            mv = self.master_views[i]
            mv.copy_(torch.where(src != pv, src.to(mv.dtype), mv))
        pv.copy_(src)

    def sync_views(self, clean: list[bool] | None = None, adopt_grads: bool = True) -> list[bool]:
        """Repair broken param / grad views, copy external segments in; return which segments have a grad.

        Runs on the host only (pointer comparisons); copies happen only for broken views and
        for external segments (NOTE [External segments]). ``clean``: what check_grads() returned just
        before (segments whose views are intact need no repair). ``adopt_grads=False`` copies a grad
        that is not a view without re-pointing ``p.grad`` at the bucket (NOTE [Compiled steps]).
        """
        versions = self._versions if self.w_sumsq is not None else None
        active, changed = [], []  # changed: weights may differ from what the last step wrote
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if versions is not None and p._version != versions[i]:
                    changed.append(i)
                if clean is None or not clean[i]:
                    self._repair(i, p, adopt_grads, changed)
                active.append(p.grad is not None)
        if changed and versions is not None:
            self.w_sumsq.index_fill_(0, torch.tensor(changed, dtype=torch.int64, device=self.device), -1.0)
        key = tuple(active)
        if key != self._active_key:
            self._active_key = key
            self.active = torch.tensor([1.0 if a else 0.0 for a in active], dtype=self.state_dtype, device=self.device)
            self.all_active = all(active)
        return active

    def grad_is_view(self, i: int, g: torch.Tensor) -> bool:
        """Is ``g`` (a local grad tensor) segment ``i``'s grad view of the bucket?"""
        return g.data_ptr() == self._gv_ptr[i] and g.shape == self._size[i] and g.stride() == self._gv_stride[i]

    def _repair(self, i: int, p: torch.Tensor, adopt_grads: bool, changed: list[int]) -> None:
        """sync_views for one segment whose param or grad is not (or may not be) our view."""
        pv = self.param_views[i]
        if self.external[i]:
            changed.append(i)
            self.copy_in_param(i, local_tensor(p).detach())
        elif p.data_ptr() != pv.data_ptr():
            changed.append(i)
            if _shared_param(p, self._own):
                # someone else's buffer now owns it (e.g. ZeRO re-pointed p.data): follow it
                self.external[i] = self.any_external = True
                self.copy_in_param(i, p.detach())
            else:
                pv.copy_(p.detach())
                if self.master_views is not None:
                    self.master_views[i].copy_(pv)
                p.data = pv
        g = p.grad
        if g is None:
            return
        gl = g if self.shard is None else local_tensor(g)
        if not self.grad_is_view(i, gl):
            gv = self.grad_views[i]
            gv.copy_(gl)
            if adopt_grads and self._may_adopt_grad(i, g, gl):
                p.grad = gv

    def carry_buffer(self) -> torch.Tensor:
        """The carried ||w||^2 buffer (NOTE [Carried weight norms]), allocated as 'unknown' (-1)."""
        if self.w_sumsq is None:
            self.w_sumsq = torch.full((self.num_segments,), -1.0, dtype=torch.float64, device=self.device)
            self._versions = None
        return self.w_sumsq

    def drop_carry(self) -> None:
        """Forget the carried norms (the next step is not done by a kernel that carries them)."""
        self.w_sumsq = None
        self._versions = None

    def publish(self) -> None:
        """After a step: copy the new values of external segments back to their owners' storage,
        and note the params' version counters when weight norms are carried."""
        if self.w_sumsq is not None:
            self._versions = [p._version for p in self.params]
        if not self.any_external:
            return
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if self.external[i]:
                    local_tensor(p).detach().copy_(self.param_views[i])

    def any_active(self) -> bool:
        return bool(self._active_key) and any(self._active_key)

    def zero_grad_(self) -> None:
        """Zero the flat grad buffer in one operation; grads that are views stay views."""
        self.flat_grad.zero_()

    def check_grads(self) -> list[bool]:
        """Validation that must pass before anything is mutated (sparse, complex, dtype, device).
        Returns which segments still have both views intact (for the sync_views() that follows)."""
        plain = self.shard is None
        clean = []
        for i, p in enumerate(self.params):
            if plain and not self.external[i]:
                # fast path: param and grad are still our views, so nothing about them can be wrong
                g = p.grad
                if p.data_ptr() == self._pv_ptr[i] and p.shape == self._size[i] and (g is None or self.grad_is_view(i, g)):
                    clean.append(True)
                    continue
            clean.append(False)
            p = local_tensor(p)
            if tuple(p.shape) != self.shapes[i] or p.dtype != self.dtype or p.device != self.device:
                raise RuntimeError(
                    f"parameter {self.names[i] or i} changed shape, dtype or device after the optimizer "
                    f"built its buckets ({self.shapes[i]}, {self.dtype}, {self.device} -> "
                    f"{tuple(p.shape)}, {p.dtype}, {p.device}). Create the optimizer after moving the model."
                )
            g = self.params[i].grad
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
        return clean

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a kernel reads or writes (flat buffers, state, per-segment tables and outputs)."""
        out = [self.flat_param, self.flat_grad, *self.state.values(), self.seg_offset, self.seg_numel,
               self.seg_len, self.wd_mask, self.adapt_mask, self.active, self.has_state, self.step,
               self.w_norm, self.g_norm, self.u_norm, self.trust_ratio]  # fmt: skip
        if self.flat_master is not None:
            out.append(self.flat_master)
        return out

    def weights(self) -> torch.Tensor:
        """The buffer the math reads weights from: the fp32 master if present, else the params."""
        return self.flat_master if self.flat_master is not None else self.flat_param
