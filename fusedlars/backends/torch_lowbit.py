"""The ``torch`` backend's step of buckets with low-bit state (issue #26: ``state_dtype`` bf16 or int8),
vectorized over the bucket.

The reference (:mod:`fusedlars.backends.reference`) states the step one param at a time; this module
computes the same values over the whole bucket at once (LARS's element math in fp32 with the
reference's :func:`~fusedlars.backends.reference.lars_update32` and
:func:`~fusedlars.backends.reference.lamb_update32`, csrc/lars_math.h NOTE [Low-bit element math in
fp32]), so that the stored state is the reference's bit for bit
(fusedlars.backends.lowbit_state, NOTE [Low-bit state: where values become fp32]):

* the active segments are taken in chunks of consecutive whole segments (about ``CHUNK_ELEMS``
  elements each, a larger segment alone): a chunk's weights, grads and dequantized state are gathered
  into flat float64 tensors (one ``cat`` each, elements in each param's memory order), and every
  elementwise operation of the reference runs once over them, in the reference's order of operations
  (each a correctly rounded IEEE op, so the values are the reference's wherever its inputs are, and
  the chunking changes no value);
* per-layer values (norms, trust ratio, bias corrections) are taken per segment with the reference's
  own functions (:func:`~fusedlars.backends.reference.lars_layer_scalars` and friends) on the same
  inputs, and gathered per element with one index op;
* the new state is rounded to fp32 once and quantized over the chunk: bf16 with the random bits of
  every element from one Philox call per P elements (lowbit.sr_bits_runs; LAMB's two buffers take two
  halves of the same call), int8 over a padded
  ``[blocks, 256]`` view whose rows are the quantization blocks (a block never spans two params);
* results go back to the user's tensors with ``torch._foreach_copy_``.

So params, masters, state and the per-layer outputs equal the reference's bitwise, except where a
norm differs in its last float64 bit (the norm is the same ATen reduction over the same values in
the same order here, so in practice never). The price is ~100 int64 ops per
Philox call (one per 8 elements for LARS, 4 for LAMB) for the random bits: this is the portable path; the fused kernels are the fast one (issue
#26 part 2). Chunks bound the temporaries by the chunk (or the largest param), not the bucket, and
keep them cache-sized.
Sharded (FSDP2) buckets and compiled steps with low-bit state are not supported yet (``supports``).
"""

from __future__ import annotations

import torch

from ..buckets import Bucket
from . import lowbit, lowbit_state
from . import reference as ref
from .config import LambConfig, LarsConfig

_f64 = torch.float64
_flat = lowbit_state.mem_flat

#: elements per chunk of whole segments (a larger segment is a chunk alone): temporaries of a few MB
CHUNK_ELEMS = 1 << 18


class _Plan:
    """One chunk of active segments (their positions ``idx`` in the bucket) and its layout; the
    per-element tables are built when a step asks for them (not cached: they would be 40 B/element)."""

    def __init__(self, bucket: Bucket, idx: tuple[int, ...]) -> None:
        dev = bucket.device
        self.bucket = bucket
        self.idx = idx
        self.n = len(idx)
        self.sel = torch.tensor(idx, dtype=torch.int64, device=dev)
        self.numels = [bucket.numels[i] for i in idx]
        self.offsets = []
        off = 0
        for k in self.numels:
            self.offsets.append(off)
            off += k
        self.total = off
        self.counts = torch.tensor(self.numels, dtype=torch.int64, device=dev)
        self.starts = torch.tensor(self.offsets, dtype=torch.int64, device=dev)
        nb = [lowbit.num_blocks(k) for k in self.numels]
        self.blocks = nb
        bstart = []
        b = 0
        for k in nb:
            bstart.append(b)
            b += k
        self.num_blocks = b
        self.bstart = torch.tensor(bstart, dtype=torch.int64, device=dev)
        self.pidx_seg = torch.tensor([bucket.param_indices[i] for i in idx], dtype=torch.int64, device=dev)
        self.strides = [tuple(bucket.param_tensors[i].stride()) for i in idx]
        self.shapes = [bucket.shapes[i] for i in idx]
        self._seg = self._elem = None

    @property
    def seg(self) -> torch.Tensor:
        """local segment (0..n-1) of each element"""
        if self._seg is None:
            self._seg = torch.repeat_interleave(torch.arange(self.n, device=self.sel.device), self.counts)
        return self._seg

    @property
    def elem(self) -> torch.Tensor:
        """index of each element inside its param (memory order)"""
        if self._elem is None:
            dev = self.sel.device
            self._elem = torch.arange(self.total, dtype=torch.int64, device=dev) - self.starts[self.seg]
        return self._elem

    def padded(self) -> torch.Tensor:
        """position of each element in the padded [num_blocks * QBLOCK] layout of the int8 quantization"""
        return self.bstart[self.seg] * lowbit.QBLOCK + self.elem

    def block(self) -> torch.Tensor:
        """the quantization block of each element"""
        return self.bstart[self.seg] + self.elem // lowbit.QBLOCK

    def release(self) -> None:
        """Drop the per-element tables (the step is done with this chunk)."""
        self._seg = self._elem = None

    def view(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        """Segment k of a flat tensor as a tensor of its param's shape (memory order -> logical)."""
        return flat.as_strided(self.shapes[k], self.strides[k], flat.storage_offset() + self.offsets[k])

    def per_elem(self, v: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Per-segment 0-dim values (or an [n] vector) as one value per element."""
        if isinstance(v, list):
            v = torch.stack(v) if v else torch.zeros(0, dtype=_f64)
        if self.n == 1:  # one segment: a broadcast, no gather
            return v.reshape(1).expand(self.total)
        return v[self.seg]


def _plans(bucket: Bucket) -> list[_Plan]:
    """The chunks of this step's active segments (cached per set of active segments)."""
    cache = bucket.cache.setdefault("torch_lowbit", {})
    key = bucket.active_idx
    p = cache.get(key)
    if p is None:
        if len(cache) >= 8:
            cache.clear()
        chunks, cur, size = [], [], 0
        for i in key:
            k = bucket.numels[i]
            if cur and size + k > CHUNK_ELEMS:
                chunks.append(tuple(cur))
                cur, size = [], 0
            cur.append(i)
            size += k
        if cur:
            chunks.append(tuple(cur))
        p = cache[key] = [_Plan(bucket, c) for c in chunks]
    return p


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' elements, flat in memory order (a view of a single tensor: read it, never write)."""
    if len(ts) == 1:
        return _flat(ts[0])
    return torch.cat([_flat(t) for t in ts]) if ts else torch.zeros(0)


def _weights(bucket: Bucket, P: _Plan) -> torch.Tensor:
    """The weights the math reads, flat float64: fp32 masters, rebuilt remainder masters, or params."""
    params = [bucket.param_tensors[i] for i in P.idx]
    if bucket.remainder_tensors is not None:
        rem = [bucket.remainder_tensors[i] for i in P.idx]
        return lowbit.master_rebuild(_cat(params), _cat(rem)).to(_f64)
    if bucket.master_tensors is not None:
        return _cat([bucket.master_tensors[i] for i in P.idx]).to(_f64)
    return _cat(params).to(_f64)


def _grads(bucket: Bucket, P: _Plan, cfg) -> torch.Tensor:
    """The reference's ``_grad``: float64, times inv_scale, over clip_coef, negated for maximize."""
    g = _cat([bucket.grad_tensors[i] for i in P.idx]).to(_f64)
    if cfg.inv_scale is not None:
        g = g * ref._f64(cfg.inv_scale).to(g.device)
    if getattr(cfg, "clip_coef", None) is not None:
        g = g / ref._f64(cfg.clip_coef).to(g.device)
    if cfg.maximize:
        g = -g
    return g


def _state(bucket: Bucket, P: _Plan, name: str) -> torch.Tensor:
    """Stored buffer ``name`` of the active segments, dequantized exactly, flat float64."""
    codes = _cat([bucket.state_tensors[name][i] for i in P.idx])
    if bucket.state_storage == "bfloat16":
        return codes.to(_f64)
    scales = torch.cat([bucket.scale_tensors[name][i] for i in P.idx]) if P.n else torch.zeros(0)
    cmap = lowbit.dynamic_map(lowbit_state.SIGNED[name]).to(codes.device)
    return (cmap[codes.to(torch.int64)] * scales[P.block()]).to(_f64)


def _scatter(dst: list[torch.Tensor], flat: torch.Tensor, numels: list[int]) -> None:
    if dst:
        torch._foreach_copy_([_flat(t) for t in dst], list(flat.split(numels)))


def _words(bucket: Bucket, P: _Plan, buffers: int) -> tuple[torch.Tensor, ...] | None:
    """bf16 state: the 16 random bits of every element of the chunk at this step for each of the
    step's ``buffers`` rounded buffers (one Philox call per P elements serves all buffers:
    lowbit.sr_bits_runs, bitwise lowbit.sr_bits; buffer ``name`` takes entry
    lowbit_state.BUFFER[name][0]); None for int8."""
    if bucket.state_storage != "bfloat16":
        return None
    step = bucket.step.index_select(0, P.sel).to(torch.int64) + 1  # the count once this step is done
    return lowbit.sr_bits_runs(bucket.seed, step, P.pidx_seg, P.numels, buffers, P.counts)


def _store(bucket: Bucket, P: _Plan, name: str, new: torch.Tensor, keep: torch.Tensor, words) -> None:
    """The reference's ``_store`` over the chunk: fp32, then stochastic bf16 (``words``: :func:`_words`)
    or int8 codes; nothing changes where ``keep``."""
    x32 = new.to(torch.float32)
    bufs = [bucket.state_tensors[name][i] for i in P.idx]
    old = _cat(bufs)
    if bucket.state_storage == "bfloat16":
        h = lowbit.round_bf16_stochastic(x32, words[lowbit_state.BUFFER[name][0]])
        _scatter(bufs, torch.where(keep, old, h), P.numels)
        return
    if P.n == 1 and P.total % lowbit.QBLOCK == 0:  # whole blocks of one param: no padding
        codes, scales = lowbit_state.quantize_padded(x32.view(-1, lowbit.QBLOCK), lowbit_state.SIGNED[name])
        codes = codes.view(-1)
    else:
        pos = P.padded()
        padded = x32.new_zeros(P.num_blocks * lowbit.QBLOCK)
        padded[pos] = x32
        codes, scales = lowbit_state.quantize_padded(padded.view(-1, lowbit.QBLOCK), lowbit_state.SIGNED[name])
        codes = codes.view(-1)[pos]
    sbufs = [bucket.scale_tensors[name][i] for i in P.idx]
    old_s = torch.cat(sbufs) if sbufs else scales
    _scatter(bufs, torch.where(keep, old, codes), P.numels)
    _scatter(sbufs, torch.where(keep, old_s, scales), P.blocks)


def _write(bucket: Bucket, P: _Plan, w_old: torch.Tensor, w_new: torch.Tensor, keep: torch.Tensor) -> None:
    """The reference's ``_write`` over the bucket."""
    params = [bucket.param_tensors[i] for i in P.idx]
    if bucket.remainder_tensors is not None:
        p, r = lowbit.master_split(torch.where(keep, w_old, w_new).to(torch.float32))
        _scatter(params, p, P.numels)
        _scatter([bucket.remainder_tensors[i] for i in P.idx], r, P.numels)
    elif bucket.master_tensors is not None:
        m = torch.where(keep, w_old, w_new).to(torch.float32)
        _scatter([bucket.master_tensors[i] for i in P.idx], m, P.numels)
        _scatter(params, m.to(bucket.dtype), P.numels)
    else:
        old = _cat(params).to(_f64)
        _scatter(params, torch.where(keep, old, w_new).to(bucket.dtype), P.numels)


def _keep(bucket: Bucket, cfg) -> torch.Tensor:
    keep = torch.zeros((), dtype=torch.bool, device=bucket.device)
    if cfg.found_inf is not None:
        keep = keep | (cfg.found_inf.reshape(()).to(bucket.device) != 0)
    return keep


def _norms(P: _Plan, x: torch.Tensor) -> list[torch.Tensor]:
    """Per-segment 2-norms of flat ``x``, each the reference's ``_norm`` of the same values in the same
    (logical) order."""
    return [ref._norm(P.view(x, k)) for k in range(P.n)]


def _finish(bucket: Bucket, keep, n_w, n_g, n_u, r) -> None:
    """The reference's ``_finish`` for every active segment (per-segment values in active order)."""
    sd = bucket.state_dtype
    sel = torch.tensor(bucket.active_idx, dtype=torch.int64, device=bucket.device)
    for dst, vals in ((bucket.w_norm, n_w), (bucket.g_norm, n_g), (bucket.u_norm, n_u), (bucket.trust_ratio, r)):
        old = dst.index_select(0, sel).to(_f64)
        dst.index_copy_(0, sel, torch.where(keep, old, torch.stack(vals)).to(sd))
    hs = bucket.has_state.index_select(0, sel)
    bucket.has_state.index_copy_(0, sel, torch.where(keep, hs, torch.ones_like(hs)))
    st = bucket.step.index_select(0, sel)
    bucket.step.index_copy_(0, sel, torch.where(keep, st, st + 1))


def _run(bucket: Bucket, cfg, chunk_step) -> None:
    """``chunk_step(P, lr, keep)`` over every chunk (each returns its segments' norms and ratios), then
    the per-segment tables once. Steps are read before any is advanced, as in the reference."""
    plans = _plans(bucket)
    if not plans:
        return
    lr = ref._f64(cfg.lr).to(bucket.device)
    keep = _keep(bucket, cfg)
    out = ([], [], [], [])
    for P in plans:
        try:
            for acc, vals in zip(out, chunk_step(P, lr, keep)):
                acc.extend(vals)
        finally:
            P.release()
    _finish(bucket, keep, *out)


def lars_step(bucket: Bucket, cfg: LarsConfig) -> None:
    """LARS over a bucket with low-bit state: the reference's step, vectorized (module docstring)."""

    def chunk(P: _Plan, lr, keep):
        w = _weights(bucket, P)
        g = _grads(bucket, P, cfg)
        lam_s = [cfg.weight_decay * bucket.wd_mask[i].to(_f64) for i in P.idx]
        lam = P.per_elem(lam_s)
        n_w, n_g, n_u = _norms(P, w), _norms(P, g), _norms(P, g + lam * w)
        r_s, lam_eff_s = [], []
        for k, i in enumerate(P.idx):
            adapt = bool(cfg.adapt_enabled) & (bucket.adapt_mask[i] != 0)
            t = bucket.step[i].to(_f64)
            r_k, le_k = ref.lars_layer_scalars(cfg, lr, lam_s[k], adapt, n_w[k], n_g[k], n_u[k], t)
            r_s.append(r_k)
            lam_eff_s.append(le_k)
        # the element math in fp32 (csrc/lars_math.h NOTE [Low-bit element math in fp32])
        has = P.per_elem(bucket.has_state.index_select(0, P.sel) != 0)
        c = ref.lars_coef32(cfg, lr, P.per_elem(r_s), P.per_elem(lam_eff_s), has)
        g32 = _cat([bucket.grad_tensors[i] for i in P.idx]).to(torch.float32) * ref.gscale32(cfg, w.device)
        b = _state(bucket, P, "momentum_buffer").to(torch.float32) if cfg.momentum != 0 else None
        w_new, b_new = ref.lars_update32(cfg, c, w.to(torch.float32), g32, b)
        if b_new is not None:
            _store(bucket, P, "momentum_buffer", b_new, keep, _words(bucket, P, 1))
        _write(bucket, P, w, w_new.to(_f64), keep)
        return n_w, n_g, n_u, r_s

    _run(bucket, cfg, chunk)


def lamb_step(bucket: Bucket, cfg: LambConfig) -> None:
    """LAMB over a bucket with low-bit state: the reference's step, vectorized (module docstring)."""

    def chunk(P: _Plan, lr, keep):
        w = _weights(bucket, P)
        g = _grads(bucket, P, cfg)
        n_g = _norms(P, g)
        lam_s = [cfg.weight_decay * bucket.wd_mask[i].to(_f64) for i in P.idx]
        ts = [bucket.step[i].to(_f64) + 1 for i in P.idx]
        # the element math in fp32 (csrc/lars_math.h NOTE [Low-bit element math in fp32]); coefficients
        # per segment on 0-dim tensors with the reference's own function, then per element
        cs = [ref.lamb_coef32(cfg, lr, lam_s[k], ts[k]) for k in range(P.n)]
        c = {key: P.per_elem([x[key] for x in cs]) for key in cs[0]}
        g32 = _cat([bucket.grad_tensors[i] for i in P.idx]).to(torch.float32) * ref.gscale32(cfg, w.device)
        m, v = _state(bucket, P, "exp_avg").to(torch.float32), _state(bucket, P, "exp_avg_sq").to(torch.float32)
        w_d, m, v, u = ref.lamb_update32(cfg, c, w.to(torch.float32), g32, m, v)
        n_w, n_u = _norms(P, w_d.to(_f64)), _norms(P, u.to(_f64))
        r_s, coef_s = [], []
        for k, i in enumerate(P.idx):
            adapt = bool(cfg.adapt_enabled and not cfg.adam) & (bucket.adapt_mask[i] != 0)
            r_k, s_k = ref.lamb_layer_scalars(cfg, lr, adapt, n_w[k], n_u[k], ts[k])
            r_s.append(r_k)
            coef_s.append(lr * s_k * r_k)
        w_new = w_d - P.per_elem(coef_s).to(torch.float32) * u
        words = _words(bucket, P, 2)
        _store(bucket, P, "exp_avg", m, keep, words)
        _store(bucket, P, "exp_avg_sq", v, keep, words)
        _write(bucket, P, w, w_new.to(_f64), keep)
        return n_w, n_g, n_u, r_s

    _run(bucket, cfg, chunk)
