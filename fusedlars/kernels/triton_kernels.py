"""Triton kernels of the ``triton`` backend (the launch logic lives in :mod:`.triton`).

Layout contract (see :mod:`fusedlars.buckets`): every flat buffer of a bucket shares
the same element offsets; a *tile* is ``TILE`` consecutive elements of one segment,
described by the integer tables ``tile_seg`` (int32), ``tile_start`` (int64),
``tile_len`` (int32) and ``seg_tile_ptr`` (int64 [S+1]). No pointer tables, no
float atomics.

Reduction (linear in the number of tiles): every tile program of launch 1 writes one
partial sum of squares per quantity into ``part`` (fp32 [3, num_tiles]), then counts
itself into its segment's int32 arrival counter ``count[s]``; the program that arrives
last reduces the segment's partials in a fixed order (chunks of ``RBLOCK`` partials
added element-wise in tile order, then one ``tl.sum``) into ``ssq`` (fp32 [3, S]) and
resets ``count[s]`` to 0. Launch 2 reads the three sums of its segment. Each partial
is read once per step; which program reduces depends on scheduling, the bits do not
(NOTE [Last-arriving program] below; tests/test_triton_order.py runs every launch with
its programs reversed and shuffled and requires the natural order's bits).

Grid of every kernel: ``num_tiles + cdiv(S, SBLOCK)`` programs. Programs below
``num_tiles`` work on a tile; the others handle segments ``SBLOCK`` at a time:

* launch 1 (partials): they snapshot ``step`` and ``has_state`` into ``snap``
  (fp32 [2, S]), so that launch 2 can read the values of *before* the step while
  its programs advance them (no read/write race inside a launch);
* launch 2 (update): they finish the segments that have no tiles (empty params):
  norms 0, trust ratio, ``has_state``, ``step``. For the others the program of the
  segment's first tile writes the per-segment outputs.

Per-step values are pointers to 1-element tensors: ``lr_ptr``, ``inv_scale_ptr``
(GradScaler's 1/scale, a 1.0 tensor when absent), ``found_inf_ptr`` (0.0 when
absent), ``clip_ptr`` (LAMB's global clip divisor, 1.0 when absent). Hyper-parameters
are fp32 scalars. Only the element dtypes (from the pointers), ``HAS_MASTER``,
the momentum mode ``MOM`` and the tile geometry are compile-time; the per-segment
option modes (denominator, zero-norm rule, clip, TV factor, ...) are runtime
integers, because they cost one scalar branch per program and would otherwise
multiply the number of compiled variants.

All per-element arithmetic is fp32 (the state dtype of fp32/fp16/bf16 params);
per-segment scalars that suffer cancellation (Adam bias corrections) use fp64.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

#: Whether the kernels below were decorated in interpreter mode (fixed at import).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Runtime mode codes: triton.py passes those of fusedlars.kernels.packing (the C++ option enums);
# the kernels below test the literal values.
DEN_SUM_OF_NORMS, DEN_NORM_OF_SUM, DEN_GRAD_ONLY = 0, 1, 2
WD_L2, WD_RATIO_ONLY, WD_DECOUPLED = 0, 1, 2  # LARS
LWD_IN_UPDATE, LWD_L2, LWD_DECOUPLED = 0, 1, 2  # LAMB
CHECK_RAW_GRAD, CHECK_UPDATE, CHECK_DENOMINATOR = 0, 1, 2
CLIP_NONE, CLIP_LARC, CLIP_LAMBC, CLIP_RANGE = 0, 1, 2, 3
BC_BOTH, BC_NONE, BC_FIRST_OUTSIDE = 0, 1, 2
MOM_NONE, MOM_TORCH, MOM_CLASSIC = 0, 1, 2


# ------------------------------------------------------------------------------------------
# helpers (inlined)
# ------------------------------------------------------------------------------------------
@triton.jit
def _clamp(x, lo, hi):
    # NaN in -> NaN out, as torch.clamp
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clip(r, lr, clip_mode, clip_lo, clip_hi):
    out = r
    if clip_mode == 1:  # larc: min(r/lr, 1)
        out = tl.minimum(r / lr, 1.0, propagate_nan=tl.PropagateNan.ALL)
    elif clip_mode == 2:  # lambc: min(r, 1)
        out = tl.minimum(r, 1.0, propagate_nan=tl.PropagateNan.ALL)
    elif clip_mode == 3:
        out = _clamp(r, clip_lo, clip_hi)
    return out


@triton.jit
def _seg_sum3(part_ptr, num_tiles, lo, hi, RBLOCK: tl.constexpr):
    """Sums of the three partial rows over tiles [lo, hi) in a fixed order: chunks of RBLOCK partials
    added element-wise in tile order, then one ``tl.sum``. The bits depend only on the partials,
    ``lo``, ``hi`` and RBLOCK, not on which program runs it. Loads bypass L1 (``.cg``): the partials
    were written by other programs of this launch."""
    a0 = tl.zeros([RBLOCK], dtype=tl.float32)
    a1 = tl.zeros([RBLOCK], dtype=tl.float32)
    a2 = tl.zeros([RBLOCK], dtype=tl.float32)
    for j in range(lo, hi, RBLOCK):
        idx = j + tl.arange(0, RBLOCK)
        m = idx < hi
        a0 += tl.load(part_ptr + idx, mask=m, other=0.0, cache_modifier=".cg")
        a1 += tl.load(part_ptr + num_tiles + idx, mask=m, other=0.0, cache_modifier=".cg")
        a2 += tl.load(part_ptr + 2 * num_tiles + idx, mask=m, other=0.0, cache_modifier=".cg")
    return tl.sum(a0, axis=0), tl.sum(a1, axis=0), tl.sum(a2, axis=0)


@triton.jit
def _store_partials_and_reduce(part_ptr, ssq_ptr, count_ptr, seg_tile_ptr, num_tiles, num_segs, pid, s,
                               acc0, acc1, acc2, RBLOCK: tl.constexpr):
    """Launch 1's tile epilogue: store this tile's partials; the segment's last-arriving tile program
    then reduces all of the segment's partials (:func:`_seg_sum3`) into ``ssq[:, s]`` and re-arms
    the segment's arrival counter for the next step.

    NOTE: [Last-arriving program] ``count[s]`` (int32, zero between steps) counts the tiles of
    segment s that have stored their partials. Each tile program stores its partials, waits at a
    CTA barrier (every thread's stores precede the atomic in program order), then increments the
    counter with an acq_rel, gpu-scope integer atomic. The release publishes the partials; the
    program that sees ``tiles - 1`` (the last to arrive) has, by the acquire, every other tile's
    partials visible, and reads them with L1-bypassing loads. Which program that is depends on
    scheduling; the sum does not: it is always the same fixed-order reduction over [lo, hi).
    Every partial is read exactly once per step (O(tiles), not O(tiles^2)). The counter is an
    integer; no float atomics anywhere.
    """
    _store_partials(part_ptr, num_tiles, pid, acc0, acc1, acc2)
    tl.debug_barrier()
    lo = tl.load(seg_tile_ptr + s)
    hi = tl.load(seg_tile_ptr + s + 1)
    arrived = tl.atomic_add(count_ptr + s, 1, sem="acq_rel", scope="gpu")
    if arrived == (hi - lo - 1).to(tl.int32):
        ssq0, ssq1, ssq2 = _seg_sum3(part_ptr, num_tiles, lo, hi, RBLOCK)
        tl.store(ssq_ptr + s, ssq0)
        tl.store(ssq_ptr + num_segs + s, ssq1)
        tl.store(ssq_ptr + 2 * num_segs + s, ssq2)
        tl.store(count_ptr + s, 0)


@triton.jit
def _load_seg_sums(ssq_ptr, num_segs, s):
    """Segment s's three sums of squares, reduced in launch 1."""
    return tl.load(ssq_ptr + s), tl.load(ssq_ptr + num_segs + s), tl.load(ssq_ptr + 2 * num_segs + s)


@triton.jit
def _lars_ratio(ssq_w, ssq_g, ssq_u, lam, adapt, t, lr,
                eta, eps, clamp_lo, clamp_hi, clip_lo, clip_hi,
                tv_lmbda, tv_alpha, tv_shift, tv_gamma_min, tv_gate,
                den_mode, check_mode, zero_skip, clip_mode, use_tv):
    """Per-segment LARS scalars (scalars or [SBLOCK] vectors): (r, lam_eff, ||w||, ||g||, ||g+lam w||)."""
    n_w_raw = tl.sqrt(ssq_w)
    n_g_raw = tl.sqrt(ssq_g)
    n_u_raw = tl.sqrt(ssq_u)
    n_w = _clamp(n_w_raw, clamp_lo, clamp_hi)
    if den_mode == 1:
        side_raw = n_u_raw
    else:
        side_raw = n_g_raw
    side = _clamp(side_raw, clamp_lo, clamp_hi)
    if den_mode == 0:
        den = side + lam * n_w + eps
    else:
        den = side + eps
    ratio = eta * n_w / den
    if use_tv != 0:
        tt = t.to(tl.float64)
        e = tl.exp(tv_lmbda * (tt - tv_shift))  # fp64: fp32 scalars promote
        phi = 1.0 / (tv_alpha + e) + tv_gamma_min
        phi = tl.where(tt < tv_gate, 1.0, phi)
        ratio = ratio * phi.to(tl.float32)
    if check_mode == 0:
        ok = (n_w_raw > 0) & (n_g_raw > 0)
    elif check_mode == 1:
        ok = (n_w_raw > 0) & (side_raw > 0)
    else:
        ok = (n_w_raw > 0) & (den > 0)
    lam_eff = lam
    if zero_skip != 0:
        r_adapt = tl.where(ok, _clip(ratio, lr, clip_mode, clip_lo, clip_hi), 1.0)
        lam_eff = tl.where(ok | (adapt == 0), lam, 0.0)
    else:
        r_adapt = _clip(tl.where(ok, ratio, 1.0), lr, clip_mode, clip_lo, clip_hi)
    r = tl.where(adapt != 0, r_adapt, 1.0)
    return r, lam_eff, n_w_raw, n_g_raw, n_u_raw


@triton.jit
def _bias_corr(t, omb):
    """1 - b^t in fp64 from omb = 1 - b (no cancellation for b close to 1)."""
    lb = tl.log(tl.full([], 1.0, tl.float64) - omb)
    return (1.0 - tl.exp(t.to(tl.float64) * lb)).to(tl.float32)


@triton.jit
def _lamb_ratio(ssq_w, ssq_u, adapt, lr, clamp_lo, clamp_hi, clip_lo, clip_hi, tr_eps, clip_mode):
    n_w_raw = tl.sqrt(ssq_w)
    n_u = tl.sqrt(ssq_u)
    n_w = _clamp(n_w_raw, clamp_lo, clamp_hi)
    ratio = tl.where((n_w > 0) & (n_u > 0), n_w / (n_u + tr_eps), 1.0)
    r = tl.where(adapt != 0, _clip(ratio, lr, clip_mode, clip_lo, clip_hi), 1.0)
    return r, n_w_raw, n_u


@triton.jit
def _load_w(param_ptr, master_ptr, off, m, HAS_MASTER: tl.constexpr):
    """fp32 weights of a block: the master copy when there is one, else the params."""
    if HAS_MASTER:
        w = tl.load(master_ptr + off, mask=m, other=0.0)
    else:
        w = tl.load(param_ptr + off, mask=m, other=0.0).to(tl.float32)
    return w


@triton.jit
def _store_partials(part_ptr, num_tiles, pid, acc0, acc1, acc2):
    """This tile's three partial sums of squares, one per row of ``part`` ([3, num_tiles])."""
    tl.store(part_ptr + pid, tl.sum(acc0, axis=0))
    tl.store(part_ptr + num_tiles + pid, tl.sum(acc1, axis=0))
    tl.store(part_ptr + 2 * num_tiles + pid, tl.sum(acc2, axis=0))


@triton.jit
def _store_seg_outputs(w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr, has_ptr, step_ptr, idx, mask,
                       n_w, n_g, n_u, r, one, t_new):
    """A segment's (or a block of empty segments') outputs of the step: norms, ratio, has_state = 1 and
    the new step count, stored where ``mask`` holds."""
    tl.store(w_norm_ptr + idx, n_w, mask=mask)
    tl.store(g_norm_ptr + idx, n_g, mask=mask)
    tl.store(u_norm_ptr + idx, n_u, mask=mask)
    tl.store(ratio_ptr + idx, r, mask=mask)
    tl.store(has_ptr + idx, one, mask=mask)
    tl.store(step_ptr + idx, t_new, mask=mask)


@triton.jit
def _empty_segs(pid, num_tiles, num_segs, seg_numel_ptr, active_ptr, SBLOCK: tl.constexpr):
    """Segment-program lanes of launch 2: (segment indices, mask of the active empty segments)."""
    offs = (pid - num_tiles).to(tl.int64) * SBLOCK + tl.arange(0, SBLOCK)
    m = offs < num_segs
    numel = tl.load(seg_numel_ptr + offs, mask=m, other=1)
    act = tl.load(active_ptr + offs, mask=m, other=0.0)
    return offs, m & (numel == 0) & (act != 0)


@triton.jit
def _snapshot(step_ptr, has_ptr, snap_ptr, sblk, num_segs, SBLOCK: tl.constexpr):
    offs = sblk.to(tl.int64) * SBLOCK + tl.arange(0, SBLOCK)
    m = offs < num_segs
    tl.store(snap_ptr + offs, tl.load(step_ptr + offs, mask=m, other=0.0).to(tl.float32), mask=m)
    tl.store(snap_ptr + num_segs + offs, tl.load(has_ptr + offs, mask=m, other=0.0).to(tl.float32), mask=m)


# ------------------------------------------------------------------------------------------
# LARS
# ------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["num_tiles", "num_segs"])
def lars_partials_kernel(
    param_ptr, master_ptr, grad_ptr,
    wd_mask_ptr, active_ptr, step_ptr, has_ptr,
    inv_scale_ptr, found_inf_ptr,
    part_ptr, snap_ptr, ssq_ptr, count_ptr,
    tile_seg_ptr, tile_start_ptr, tile_len_ptr, seg_tile_ptr,
    num_tiles, num_segs,
    weight_decay, sign,
    HAS_MASTER: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
    SBLOCK: tl.constexpr,
):
    """Launch 1: per tile, sums of w^2, g^2 and (g + lam*w)^2 (g unscaled, signed); per segment
    their totals, reduced by the segment's last-arriving tile program."""
    pid = tl.program_id(0)
    go = tl.load(found_inf_ptr).to(tl.float32) == 0
    if pid >= num_tiles:
        _snapshot(step_ptr, has_ptr, snap_ptr, pid - num_tiles, num_segs, SBLOCK)
    else:
        s = tl.load(tile_seg_ptr + pid)
        if go & (tl.load(active_ptr + s) != 0):
            start = tl.load(tile_start_ptr + pid)  # int64
            n = tl.load(tile_len_ptr + pid)
            inv_scale = tl.load(inv_scale_ptr).to(tl.float32) * sign
            lam = weight_decay * tl.load(wd_mask_ptr + s).to(tl.float32)
            acc_w = tl.zeros([BLOCK], dtype=tl.float32)
            acc_g = tl.zeros([BLOCK], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK], dtype=tl.float32)
            for k in range(0, TILE, BLOCK):
                offs = k + tl.arange(0, BLOCK)
                m = offs < n
                ptr_off = start + offs
                w = _load_w(param_ptr, master_ptr, ptr_off, m, HAS_MASTER)
                g = tl.load(grad_ptr + ptr_off, mask=m, other=0.0).to(tl.float32) * inv_scale
                u = g + lam * w
                acc_w += w * w
                acc_g += g * g
                acc_u += u * u
            _store_partials_and_reduce(part_ptr, ssq_ptr, count_ptr, seg_tile_ptr, num_tiles, num_segs, pid, s,
                                       acc_w, acc_g, acc_u, RBLOCK)


@triton.jit(do_not_specialize=["num_tiles", "num_segs", "tv_gate", "den_mode", "wd_mode", "check_mode", "zero_skip",
                               "clip_mode", "adapt_enabled", "use_tv", "nesterov", "clone_first"])
def lars_update_kernel(
    param_ptr, master_ptr, grad_ptr, mom_ptr,
    wd_mask_ptr, adapt_mask_ptr, active_ptr, seg_numel_ptr,
    step_ptr, has_ptr, w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr,
    lr_ptr, inv_scale_ptr, found_inf_ptr,
    ssq_ptr, snap_ptr,
    tile_seg_ptr, tile_start_ptr, tile_len_ptr, seg_tile_ptr,
    num_tiles, num_segs,
    weight_decay, sign, eta, eps, clamp_lo, clamp_hi, clip_lo, clip_hi,
    momentum, dampening,
    tv_lmbda, tv_alpha, tv_shift, tv_gamma_min, tv_gate,
    den_mode, wd_mode, check_mode, zero_skip, clip_mode, adapt_enabled, use_tv, nesterov, clone_first,
    HAS_MASTER: tl.constexpr, MOM: tl.constexpr,
    TILE: tl.constexpr, BLOCK: tl.constexpr, SBLOCK: tl.constexpr,
):
    """Launch 2: the segment's sums of squares (from launch 1), trust ratio, momentum update, store."""
    pid = tl.program_id(0)
    go = tl.load(found_inf_ptr).to(tl.float32) == 0
    lr = tl.load(lr_ptr).to(tl.float32)
    if go:
        if pid >= num_tiles:
            # segments without tiles (empty params): norms are 0
            offs, m = _empty_segs(pid, num_tiles, num_segs, seg_numel_ptr, active_ptr, SBLOCK)
            lam = weight_decay * tl.load(wd_mask_ptr + offs, mask=m, other=0.0).to(tl.float32)
            adapt = tl.load(adapt_mask_ptr + offs, mask=m, other=0.0).to(tl.float32) * adapt_enabled
            t = tl.load(step_ptr + offs, mask=m, other=0.0)
            zero = tl.zeros([SBLOCK], dtype=tl.float32)
            r, lam_eff, n_w, n_g, n_u = _lars_ratio(
                zero, zero, zero, lam, adapt, t, lr, eta, eps, clamp_lo, clamp_hi, clip_lo, clip_hi,
                tv_lmbda, tv_alpha, tv_shift, tv_gamma_min, tv_gate,
                den_mode, check_mode, zero_skip, clip_mode, use_tv)
            _store_seg_outputs(w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr, has_ptr, step_ptr, offs, m, n_w, n_g, n_u, r, zero + 1.0, t + 1.0)
        else:
            s = tl.load(tile_seg_ptr + pid)
            if tl.load(active_ptr + s) != 0:
                lo = tl.load(seg_tile_ptr + s)
                ssq_w, ssq_g, ssq_u = _load_seg_sums(ssq_ptr, num_segs, s)
                t = tl.load(snap_ptr + s)
                has = tl.load(snap_ptr + num_segs + s) != 0
                lam = weight_decay * tl.load(wd_mask_ptr + s).to(tl.float32)
                adapt = tl.load(adapt_mask_ptr + s).to(tl.float32) * adapt_enabled
                r, lam_eff, n_w, n_g, n_u = _lars_ratio(
                    ssq_w, ssq_g, ssq_u, lam, adapt, t, lr, eta, eps, clamp_lo, clamp_hi, clip_lo, clip_hi,
                    tv_lmbda, tv_alpha, tv_shift, tv_gamma_min, tv_gate,
                    den_mode, check_mode, zero_skip, clip_mode, use_tv)
                # the segment's first tile writes its outputs
                _store_seg_outputs(w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr, has_ptr, step_ptr, s, pid == lo, n_w, n_g, n_u, r, 1.0, t + 1.0)
                start = tl.load(tile_start_ptr + pid)  # int64
                n = tl.load(tile_len_ptr + pid)
                inv_scale = tl.load(inv_scale_ptr).to(tl.float32) * sign
                # momentum coefficient of the new gradient, and whether the old buffer counts
                if MOM == 1:
                    c_new = tl.where(has | (clone_first == 0), 1.0 - dampening, 1.0)
                else:
                    c_new = lr
                mu_old = momentum
                for k in range(0, TILE, BLOCK):
                    offs = k + tl.arange(0, BLOCK)
                    m = offs < n
                    ptr_off = start + offs
                    w = _load_w(param_ptr, master_ptr, ptr_off, m, HAS_MASTER)
                    g = tl.load(grad_ptr + ptr_off, mask=m, other=0.0).to(tl.float32) * inv_scale
                    if wd_mode == 0:
                        gp = r * (g + lam_eff * w)
                    else:
                        gp = r * g
                    if MOM == 0:
                        w_new = w - lr * gp
                    else:
                        b = tl.load(mom_ptr + ptr_off, mask=m, other=0.0)
                        b_new = mu_old * tl.where(has, b, 0.0) + c_new * gp
                        tl.store(mom_ptr + ptr_off, b_new, mask=m)
                        if MOM == 1:
                            if nesterov != 0:
                                w_new = w - lr * (gp + momentum * b_new)
                            else:
                                w_new = w - lr * b_new
                        else:
                            if nesterov != 0:
                                w_new = w - (lr * gp + momentum * b_new)
                            else:
                                w_new = w - b_new
                    if wd_mode == 2:
                        w_new = w_new - lr * lam_eff * w
                    if HAS_MASTER:
                        tl.store(master_ptr + ptr_off, w_new, mask=m)
                    tl.store(param_ptr + ptr_off, w_new.to(param_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------
# LAMB
# ------------------------------------------------------------------------------------------
@triton.jit
def _adam_dir(m, v, bc1, bc2, eps, eps_root, BC: tl.constexpr):
    if BC == 0:
        u = (m / bc1) / (tl.sqrt(v / bc2 + eps_root) + eps)
    else:
        u = m / (tl.sqrt(v + eps_root) + eps)
    return u


@triton.jit(do_not_specialize=["num_tiles", "num_segs", "wd_mode"])
def lamb_moments_kernel(
    param_ptr, master_ptr, grad_ptr, m_ptr, v_ptr,
    wd_mask_ptr, active_ptr, step_ptr, has_ptr,
    lr_ptr, inv_scale_ptr, found_inf_ptr, clip_ptr,
    part_ptr, snap_ptr, ssq_ptr, count_ptr,
    tile_seg_ptr, tile_start_ptr, tile_len_ptr, seg_tile_ptr,
    num_tiles, num_segs,
    weight_decay, sign, beta1, beta2, beta3, omb1, omb2, eps, eps_root,
    wd_mode,
    HAS_MASTER: tl.constexpr, BC: tl.constexpr,
    TILE: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr, SBLOCK: tl.constexpr,
):
    """Launch 1: new m, v (stored); per tile sums of w_d^2, g^2 (before L2) and u^2; per segment their
    totals, reduced by the segment's last-arriving tile program."""
    pid = tl.program_id(0)
    go = tl.load(found_inf_ptr).to(tl.float32) == 0
    if pid >= num_tiles:
        _snapshot(step_ptr, has_ptr, snap_ptr, pid - num_tiles, num_segs, SBLOCK)
    else:
        s = tl.load(tile_seg_ptr + pid)
        if go & (tl.load(active_ptr + s) != 0):
            start = tl.load(tile_start_ptr + pid)
            n = tl.load(tile_len_ptr + pid)
            lr = tl.load(lr_ptr).to(tl.float32)
            gscale = tl.load(inv_scale_ptr).to(tl.float32) * sign
            clip = tl.load(clip_ptr).to(tl.float32)
            lam = weight_decay * tl.load(wd_mask_ptr + s).to(tl.float32)
            t = tl.load(step_ptr + s).to(tl.float32) + 1.0
            bc1 = _bias_corr(t, omb1)
            bc2 = _bias_corr(t, omb2)
            acc_g = tl.zeros([BLOCK], dtype=tl.float32)
            acc_w = tl.zeros([BLOCK], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK], dtype=tl.float32)
            for k in range(0, TILE, BLOCK):
                offs = k + tl.arange(0, BLOCK)
                msk = offs < n
                ptr_off = start + offs
                w = _load_w(param_ptr, master_ptr, ptr_off, msk, HAS_MASTER)
                g = tl.load(grad_ptr + ptr_off, mask=msk, other=0.0).to(tl.float32) * gscale / clip
                acc_g += g * g
                if wd_mode == 1:
                    g = g + lam * w
                m = beta1 * tl.load(m_ptr + ptr_off, mask=msk, other=0.0) + beta3 * g
                v = beta2 * tl.load(v_ptr + ptr_off, mask=msk, other=0.0) + omb2 * g * g
                tl.store(m_ptr + ptr_off, m, mask=msk)
                tl.store(v_ptr + ptr_off, v, mask=msk)
                u = _adam_dir(m, v, bc1, bc2, eps, eps_root, BC)
                if wd_mode == 0:
                    u = u + lam * w
                if wd_mode == 2:
                    w = w * (1.0 - lr * lam)
                acc_w += w * w
                acc_u += u * u
            _store_partials_and_reduce(part_ptr, ssq_ptr, count_ptr, seg_tile_ptr, num_tiles, num_segs, pid, s,
                                       acc_w, acc_g, acc_u, RBLOCK)


@triton.jit(do_not_specialize=["num_tiles", "num_segs", "wd_mode", "clip_mode", "adapt_enabled"])
def lamb_update_kernel(
    param_ptr, master_ptr, m_ptr, v_ptr,
    wd_mask_ptr, adapt_mask_ptr, active_ptr, seg_numel_ptr,
    step_ptr, has_ptr, w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr,
    lr_ptr, found_inf_ptr,
    ssq_ptr, snap_ptr,
    tile_seg_ptr, tile_start_ptr, tile_len_ptr, seg_tile_ptr,
    num_tiles, num_segs,
    weight_decay, omb1, omb2, eps, eps_root, clamp_lo, clamp_hi, clip_lo, clip_hi, tr_eps,
    wd_mode, clip_mode, adapt_enabled,
    HAS_MASTER: tl.constexpr, BC: tl.constexpr,
    TILE: tl.constexpr, BLOCK: tl.constexpr, SBLOCK: tl.constexpr,
):
    """Launch 2: the segment's sums of squares (from launch 1), trust ratio, w <- w_d - lr*s*r*u (u from
    the new m, v)."""
    pid = tl.program_id(0)
    go = tl.load(found_inf_ptr).to(tl.float32) == 0
    lr = tl.load(lr_ptr).to(tl.float32)
    if go:
        if pid >= num_tiles:
            offs, m = _empty_segs(pid, num_tiles, num_segs, seg_numel_ptr, active_ptr, SBLOCK)
            adapt = tl.load(adapt_mask_ptr + offs, mask=m, other=0.0).to(tl.float32) * adapt_enabled
            t = tl.load(step_ptr + offs, mask=m, other=0.0)
            zero = tl.zeros([SBLOCK], dtype=tl.float32)
            r, n_w, n_u = _lamb_ratio(zero, zero, adapt, lr, clamp_lo, clamp_hi, clip_lo, clip_hi, tr_eps,
                                      clip_mode)
            _store_seg_outputs(w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr, has_ptr, step_ptr, offs, m, n_w, zero, n_u, r, zero + 1.0, t + 1.0)
        else:
            s = tl.load(tile_seg_ptr + pid)
            if tl.load(active_ptr + s) != 0:
                lo = tl.load(seg_tile_ptr + s)
                ssq_w, ssq_g, ssq_u = _load_seg_sums(ssq_ptr, num_segs, s)
                t0 = tl.load(snap_ptr + s)
                t = t0 + 1.0
                lam = weight_decay * tl.load(wd_mask_ptr + s).to(tl.float32)
                adapt = tl.load(adapt_mask_ptr + s).to(tl.float32) * adapt_enabled
                r, n_w, n_u = _lamb_ratio(ssq_w, ssq_u, adapt, lr, clamp_lo, clamp_hi, clip_lo, clip_hi, tr_eps,
                                          clip_mode)
                # the segment's first tile writes its outputs
                _store_seg_outputs(w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr, has_ptr, step_ptr, s, pid == lo, n_w, tl.sqrt(ssq_g), n_u, r, 1.0, t)
                bc1 = _bias_corr(t, omb1)
                bc2 = _bias_corr(t, omb2)
                if BC == 2:
                    scale = r / bc1
                else:
                    scale = r
                start = tl.load(tile_start_ptr + pid)
                n = tl.load(tile_len_ptr + pid)
                for k in range(0, TILE, BLOCK):
                    offs = k + tl.arange(0, BLOCK)
                    msk = offs < n
                    ptr_off = start + offs
                    w = _load_w(param_ptr, master_ptr, ptr_off, msk, HAS_MASTER)
                    mm = tl.load(m_ptr + ptr_off, mask=msk, other=0.0)
                    vv = tl.load(v_ptr + ptr_off, mask=msk, other=0.0)
                    u = _adam_dir(mm, vv, bc1, bc2, eps, eps_root, BC)
                    if wd_mode == 0:
                        u = u + lam * w
                    if wd_mode == 2:
                        w = w * (1.0 - lr * lam)
                    w_new = w - u * scale * lr
                    if HAS_MASTER:
                        tl.store(master_ptr + ptr_off, w_new, mask=msk)
                    tl.store(param_ptr + ptr_off, w_new.to(param_ptr.dtype.element_ty), mask=msk)


# ------------------------------------------------------------------------------------------
# global gradient norm (LAMB max_grad_norm)
# ------------------------------------------------------------------------------------------
@triton.jit
def grad_sumsq_kernel(
    grad_ptr, active_ptr, inv_scale_ptr, part_ptr,
    tile_seg_ptr, tile_start_ptr, tile_len_ptr,
    TILE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per tile sum of (grad * inv_scale)^2, 0 for inactive segments (fp64 partials)."""
    pid = tl.program_id(0)
    s = tl.load(tile_seg_ptr + pid)
    start = tl.load(tile_start_ptr + pid)
    n = tl.load(tile_len_ptr + pid)
    inv_scale = tl.load(inv_scale_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if tl.load(active_ptr + s) != 0:
        for k in range(0, TILE, BLOCK):
            offs = k + tl.arange(0, BLOCK)
            m = offs < n
            g = tl.load(grad_ptr + start + offs, mask=m, other=0.0).to(tl.float32) * inv_scale
            acc += g * g
    tl.store(part_ptr + pid, tl.sum(acc, axis=0).to(tl.float64))
