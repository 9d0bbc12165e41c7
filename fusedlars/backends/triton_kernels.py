"""Triton kernels of the ``triton`` backend (the launch logic lives in :mod:`.triton`).

Layout contract (see :mod:`fusedlars.buckets`): params and grads are the user's tensors, state
and master weights the optimizer's; a segment is one param tensor, walked as ``numel``
consecutive elements from its base address (NOTE [Dense segments] in buckets.py). Kernels find
segment ``s``'s buffers in an int64 *address table* ``addr`` (``[rows, S]`` of ``data_ptr()``s,
:meth:`Bucket.address_table`)::

    row 0 param (param dtype PDT)   row 1 grad (PDT)   row 2 fp32 master (only when HAS_MASTER)
    then the fp32 state buffers in the bucket's order: momentum_buffer (LARS), exp_avg, exp_avg_sq (LAMB)

    element k of buffer X of segment s  =  *((X's type *) addr[row_X, s] + k)

A row holds 0 where a segment has no such tensor (no grad this step: inactive; no state yet);
no kernel loads an address of an inactive segment, so those are never dereferenced. A *tile*
is ``TILE`` consecutive elements of one segment, described by the integer tables ``tile_seg``
(int32), ``tile_len`` (int32) and ``seg_tile_ptr`` (int64 [S+1]); tile ``t`` of segment ``s``
starts at element ``(t - seg_tile_ptr[s]) * TILE`` of the segment (the ``tile_start`` of
:class:`TileTable`, recomputed here so that the compiler knows it is a multiple of TILE).
No float atomics.

NOTE: [Kernel arguments] The kernels take what csrc/cuda passes in its ``Addr`` / ``Segs`` / ``Plan``
structs, split by who writes what (the rule of NOTE [Written tensors are arguments] in :mod:`.triton`):

* ``addr_ptr``: the address table above (the user's tensors and the optimizer's state, written in place
  through it, as the CUDA kernels write them through ``Addr``);
* ``plan_ptr``: an int64 table, read only, of what no kernel of a step writes: the counts
  ``num_tiles`` / ``num_segs``, the offsets of the sums and the snapshot in ``work``, and the base
  addresses of the bucket's read-only per-segment tables and of its tile table, one entry per name of
  :data:`PLAN`, in that order (:mod:`.triton` builds it from that tuple);
* every tensor a kernel of the step writes, as an argument of its own: ``work`` (launch 1's scratch,
  fp32: the tile partials ``part`` [3, num_tiles] at 0, the per-segment sums ``ssq`` [3, S] at
  ``ssq_at``, the step / has_state snapshot ``snap`` [2, S] at ``snap_at``), ``count`` (int32 [S], the
  arrival counters), ``step``, ``has_state`` and the per-segment outputs ``w_norm`` ... ``trust_ratio``;
* the per-step value pointers (``lr``, ``inv_scale``, ``found_inf``, ``clip``);
* ``opts``: the kind's options, one fp32 per row of the table of :mod:`.option_fields`, in its order
  (NOTE [Triton modes are fp32] there); the kernels read ``opts[LARS.eta]`` ..., slot constants derived
  from that table below;
* constexprs: the param dtype ``PDT``, ``HAS_MASTER``, the kind's mode (``MOM`` / ``BC``) and the tile
  geometry ``GEO = (TILE, BLOCK, RBLOCK, SBLOCK)``.

Tensors are never inside a tuple argument: torch.compile's ``wrap_triton`` keeps tuple arguments as
trace-time constants.

Reduction (linear in the number of tiles): every tile program of launch 1 writes one
partial sum of squares per quantity into ``part`` (fp32 [3, num_tiles]), then counts
itself into its segment's int32 arrival counter ``count[s]``; the program that arrives
last reduces the segment's partials in a fixed order (chunks of ``RBLOCK`` partials
added element-wise in tile order, then one ``tl.sum``) into ``ssq`` (fp32 [3, S]) and
resets ``count[s]`` to 0. Launch 2 reads the three sums of its segment from ``ssq``: the ones
launch 1 wrote (``*_step``) or ones summed over the ranks of a sharded bucket, copied there by
``*_apply`` (``*_partials`` returns a view of ``ssq``). Each partial is read once per step; which program reduces
depends on scheduling, the bits do not (NOTE [Last-arriving program] below;
tests/test_triton_order.py runs every launch with its programs reversed and shuffled and
requires the natural order's bits).

``ssq`` rows: LARS ``[w^2, g^2, (g + lam*w)^2]``, LAMB ``[w_d^2, u^2, g^2]`` (the conventions
of NOTE [Partials and apply] in fusedlars/backends/torch.py). After launch 1 every entry of
``ssq`` is defined: segments that no tile program sums (inactive, empty, a GradScaler-skipped
step) hold 0, so a sharded bucket all-reduces exact zeros for them.

Grid of every step kernel: ``num_tiles + cdiv(S, SBLOCK)`` programs. Programs below
``num_tiles`` work on a tile; the others handle segments ``SBLOCK`` at a time:

* launch 1 (partials): they snapshot ``step`` and ``has_state`` into ``snap``
  (fp32 [2, S]), so that launch 2 can read the values of *before* the step while
  its programs advance them (no read/write race inside a launch), and zero the ``ssq``
  entries no tile program writes;
* launch 2 (update): they finish the segments that have no tiles (empty params):
  norms 0, trust ratio, ``has_state``, ``step``. For the others the program of the
  segment's first tile writes the per-segment outputs.

Per-step values are pointers to 1-element tensors: ``lr_ptr``, ``inv_scale_ptr``
(GradScaler's 1/scale, a 1.0 tensor when absent), ``found_inf_ptr`` (0.0 when
absent), ``clip_ptr`` (LAMB's global clip divisor, 1.0 when absent). Only the param dtype
``PDT``, ``HAS_MASTER``, the momentum mode ``MOM``, the bias-correction mode ``BC`` and the tile
geometry are compile-time; the option modes (denominator, zero-norm rule, clip, TV factor, ...) are
runtime values of ``opts``, because they cost one scalar branch per program and would otherwise
multiply the number of compiled variants.

NOTE: [Vector path] A pointer loaded from a table carries no alignment the compiler could
know, and a mask ``offs < n`` with a loaded ``n`` none either: such loads compile to 32-bit
(16-bit) accesses. A tile that is full (``tile_len == TILE``) and whose buffers' base
addresses are all 16-byte aligned runs the same loop body unmasked on pointers hinted
``multiple_of(16)`` (``FAST=True``: 128-bit ``ld/st.global.v4``); every other tile (the last
tile of a segment, a view at an odd element offset, e.g. a DDP bucket's grad view) runs it
masked (``FAST=False``). Both compute the same values in the same order.

All per-element arithmetic is fp32 (the state dtype of fp32/fp16/bf16 params);
per-segment scalars that suffer cancellation (Adam bias corrections) use fp64.
"""

from __future__ import annotations

import os
import types

import triton
import triton.language as tl

from . import codes as _codes
from . import option_fields as _fields
from . import triton_lowbit as _LB
from .lowbit import QBLOCK as _LB_QBLOCK

#: Whether the kernels below were decorated in interpreter mode (fixed at import).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Mode codes the kernels test: the tables of fusedlars.backends.codes (the C++ option enums), as
# constexpr globals (the only globals a jitted function may read). The runtime modes are slots of
# ``opts``; MOM and BC are constexprs.
DEN_SUM_OF_NORMS = tl.constexpr(_codes.DENOMINATOR["sum_of_norms"])
DEN_NORM_OF_SUM = tl.constexpr(_codes.DENOMINATOR["norm_of_sum"])
DEN_GRAD_ONLY = tl.constexpr(_codes.DENOMINATOR["grad_only"])
WD_L2 = tl.constexpr(_codes.LARS_WD["l2"])  # LARS
WD_RATIO_ONLY = tl.constexpr(_codes.LARS_WD["ratio_only"])
WD_DECOUPLED = tl.constexpr(_codes.LARS_WD["decoupled"])
LWD_IN_UPDATE = tl.constexpr(_codes.LAMB_WD["in_update"])  # LAMB
LWD_L2 = tl.constexpr(_codes.LAMB_WD["l2"])
LWD_DECOUPLED = tl.constexpr(_codes.LAMB_WD["decoupled"])
CHECK_RAW_GRAD = tl.constexpr(_codes.ZERO_CHECK["raw_grad"])
CHECK_UPDATE = tl.constexpr(_codes.ZERO_CHECK["update"])
CHECK_DENOMINATOR = tl.constexpr(_codes.ZERO_CHECK["denominator"])
ZN_SKIP = tl.constexpr(_codes.ZERO_NORM["skip"])
FIRST_CLONE = tl.constexpr(_codes.FIRST["clone"])
CLIP_NONE = tl.constexpr(_codes.CLIP[None])
CLIP_LARC = tl.constexpr(_codes.CLIP["larc"])
CLIP_LAMBC = tl.constexpr(_codes.CLIP["lambc"])
CLIP_RANGE = tl.constexpr(_codes.CLIP["range"])
BC_BOTH = tl.constexpr(_codes.BIAS["both"])
BC_NONE = tl.constexpr(_codes.BIAS["none"])
BC_FIRST_OUTSIDE = tl.constexpr(_codes.BIAS["first_outside"])
# MOM: no buffer / torch / classic (codes.triton_mom: the one encoding that differs from C++'s)
MOM_NONE = tl.constexpr(_codes.MOM_NONE)
MOM_TORCH = tl.constexpr(_codes.MOM["torch"])
MOM_CLASSIC = tl.constexpr(_codes.MOM["classic"])

#: The entries of ``plan_ptr``, in order (NOTE [Kernel arguments]): two counts, two element offsets into
#: ``work``, then the base addresses of the bucket's per-segment tables (``seg_numel`` int64, the others
#: fp32) and of its tile table (``tile_seg`` / ``tile_len`` int32, ``seg_tile_ptr`` int64 [S+1]).
PLAN = (
    "num_tiles",
    "num_segs",
    "ssq_at",
    "snap_at",
    "seg_numel",
    "wd_mask",
    "adapt_mask",
    "active",
    "tile_seg",
    "tile_len",
    "seg_tile_ptr",
)


def _slots(names) -> types.ModuleType:
    """A namespace with one ``tl.constexpr`` index per name, in order: a module object, since jitted code may
    read the attributes of a module (not those of other objects)."""
    ns = types.ModuleType("slots")
    for i, name in enumerate(names):
        setattr(ns, name, tl.constexpr(i))
    return ns


#: Slots of the ``opts`` tuples (NOTE [Kernel arguments]): ``opts[LARS.eta]`` is the row ``eta`` of the
#: LARS table of .option_fields (the member ``eta`` of the C++ ``LarsOptions``), derived from that table.
LARS = _slots(_fields.slots("LARS"))
LAMB = _slots(_fields.slots("LAMB"))
#: Slots of ``plan_ptr``: ``plan_ptr + P.active`` holds the address of the bucket's ``active`` table.
P = _slots(PLAN)


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
    if clip_mode == CLIP_LARC:  # larc: min(r/lr, 1)
        out = tl.minimum(r / lr, 1.0, propagate_nan=tl.PropagateNan.ALL)
    elif clip_mode == CLIP_LAMBC:  # lambc: min(r, 1)
        out = tl.minimum(r, 1.0, propagate_nan=tl.PropagateNan.ALL)
    elif clip_mode == CLIP_RANGE:  # range: clamp(r, lo, hi)
        out = _clamp(r, clip_lo, clip_hi)
    return out


@triton.jit
def _sign(maximize):
    """-1 for ``maximize`` (the grads enter negated), else 1 (exact: ``maximize`` is 0 or 1)."""
    return 1.0 - 2.0 * maximize


@triton.jit
def _dims(plan_ptr):
    """(num_tiles, num_segs) of the bucket, int32."""
    return tl.load(plan_ptr + P.num_tiles).to(tl.int32), tl.load(plan_ptr + P.num_segs).to(tl.int32)


@triton.jit
def _tab(plan_ptr, SLOT: tl.constexpr, DT: tl.constexpr):
    """The bucket table at plan entry ``SLOT`` as a DT pointer (the bucket's own allocations, 16-byte
    aligned: :mod:`.triton` checks it when it builds the plan)."""
    return tl.multiple_of(tl.load(plan_ptr + SLOT).to(tl.pointer_type(DT)), 16)


@triton.jit
def _at(work_ptr, plan_ptr, SLOT: tl.constexpr):
    """The region of ``work`` at the element offset of plan entry ``SLOT`` (a multiple of 4: 16-byte aligned)."""
    return tl.multiple_of(work_ptr + tl.load(plan_ptr + SLOT), 16)


@triton.jit
def _seg_sum3(part_ptr, num_tiles, lo, hi, RBLOCK: tl.constexpr):
    """Sums of the three partial rows over tiles [lo, hi) in a fixed order: chunks of RBLOCK partials
    added element-wise in tile order, then one ``tl.sum``. The bits depend only on the partials,
    ``lo``, ``hi`` and RBLOCK, not on which program runs it. Loads bypass L1 (``.cg``): the partials
    were written by other programs of this launch."""
    DT: tl.constexpr = part_ptr.dtype.element_ty  # fp32, or float64 (the low-bit kernels' scratch)
    a0 = tl.zeros([RBLOCK], dtype=DT)
    a1 = tl.zeros([RBLOCK], dtype=DT)
    a2 = tl.zeros([RBLOCK], dtype=DT)
    for j in range(lo, hi, RBLOCK):
        idx = j + tl.arange(0, RBLOCK)
        m = idx < hi
        a0 += tl.load(part_ptr + idx, mask=m, other=0.0, cache_modifier=".cg")
        a1 += tl.load(part_ptr + num_tiles + idx, mask=m, other=0.0, cache_modifier=".cg")
        a2 += tl.load(part_ptr + 2 * num_tiles + idx, mask=m, other=0.0, cache_modifier=".cg")
    return tl.sum(a0, axis=0), tl.sum(a1, axis=0), tl.sum(a2, axis=0)


@triton.jit
def _store_partials_and_reduce(work_ptr, plan_ptr, count_ptr, pid, s, lo, acc0, acc1, acc2, RBLOCK: tl.constexpr):
    """Launch 1's tile epilogue: store this tile's partials; the segment's last-arriving tile program
    then reduces all of the segment's partials (:func:`_seg_sum3`) into ``ssq[:, s]`` and re-arms
    the segment's arrival counter for the next step. ``lo``: the segment's first tile.

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
    part_ptr = work_ptr  # the partials are work's first region
    # the counts are read here, after the tile loop, not kept in registers across it
    num_tiles, num_segs = _dims(plan_ptr)
    tl.store(part_ptr + pid, tl.sum(acc0, axis=0))
    tl.store(part_ptr + num_tiles + pid, tl.sum(acc1, axis=0))
    tl.store(part_ptr + 2 * num_tiles + pid, tl.sum(acc2, axis=0))
    tl.debug_barrier()
    hi = tl.load(_tab(plan_ptr, P.seg_tile_ptr, tl.int64) + s + 1)
    arrived = tl.atomic_add(count_ptr + s, 1, sem="acq_rel", scope="gpu")
    if arrived == (hi - lo - 1).to(tl.int32):
        ssq0, ssq1, ssq2 = _seg_sum3(part_ptr, num_tiles, lo, hi, RBLOCK)
        ssq_ptr = _at(work_ptr, plan_ptr, P.ssq_at)
        tl.store(ssq_ptr + s, ssq0)
        tl.store(ssq_ptr + num_segs + s, ssq1)
        tl.store(ssq_ptr + 2 * num_segs + s, ssq2)
        tl.store(count_ptr + s, 0)


@triton.jit
def _seg_sum1(part_ptr, lo, hi, RBLOCK: tl.constexpr):
    """:func:`_seg_sum3` of the first partial row alone (the given-grad-sums launch 1 stores no others)."""
    a0 = tl.zeros([RBLOCK], dtype=part_ptr.dtype.element_ty)
    for j in range(lo, hi, RBLOCK):
        idx = j + tl.arange(0, RBLOCK)
        a0 += tl.load(part_ptr + idx, mask=idx < hi, other=0.0, cache_modifier=".cg")
    return tl.sum(a0, axis=0)


@triton.jit
def _store_w_partial_and_reduce(work_ptr, plan_ptr, count_ptr, pid, s, lo, acc0, ssq1, ssq2, RBLOCK: tl.constexpr):
    """:func:`_store_partials_and_reduce` of launch 1 from given gradient sums (NOTE [Given gradient sums]):
    the tile stores its one partial (w^2), the segment's last-arriving program reduces that row and stores
    the segment's given ``ssq1`` / ``ssq2`` beside it (the same synchronization, NOTE [Last-arriving
    program])."""
    part_ptr = work_ptr
    num_segs = tl.load(plan_ptr + P.num_segs).to(tl.int32)
    tl.store(part_ptr + pid, tl.sum(acc0, axis=0))
    tl.debug_barrier()
    hi = tl.load(_tab(plan_ptr, P.seg_tile_ptr, tl.int64) + s + 1)
    arrived = tl.atomic_add(count_ptr + s, 1, sem="acq_rel", scope="gpu")
    if arrived == (hi - lo - 1).to(tl.int32):
        ssq_ptr = _at(work_ptr, plan_ptr, P.ssq_at)
        tl.store(ssq_ptr + s, _seg_sum1(part_ptr, lo, hi, RBLOCK))
        tl.store(ssq_ptr + num_segs + s, ssq1)
        tl.store(ssq_ptr + 2 * num_segs + s, ssq2)
        tl.store(count_ptr + s, 0)


@triton.jit
def _lars_ratio(ssq_w, ssq_g, ssq_u, lam, adapt, t, lr, opts):
    """LARS's per-segment scalars (scalars or [SBLOCK] vectors) from ``ssq`` rows ``[w^2, g^2, (g+lam*w)^2]``
    and the step count before this step ``t``: (r, lam_eff, ||w||, ||g||, ||g+lam w||). A ``SEG_RATIO`` of
    :func:`_update_program`."""
    clamp_lo = opts[LARS.clamp_lo]
    clamp_hi = opts[LARS.clamp_hi]
    den_mode = opts[LARS.denominator]
    n_w_raw = tl.sqrt(ssq_w)
    n_g_raw = tl.sqrt(ssq_g)
    n_u_raw = tl.sqrt(ssq_u)
    n_w = _clamp(n_w_raw, clamp_lo, clamp_hi)
    if den_mode == DEN_NORM_OF_SUM:
        side_raw = n_u_raw
    else:
        side_raw = n_g_raw
    side = _clamp(side_raw, clamp_lo, clamp_hi)
    if den_mode == DEN_SUM_OF_NORMS:
        den = side + lam * n_w + opts[LARS.eps]
    else:
        den = side + opts[LARS.eps]
    ratio = opts[LARS.eta] * n_w / den
    if opts[LARS.tv_on] != 0:
        tt = t.to(tl.float64)
        e = tl.exp(opts[LARS.tv_lmbda] * (tt - opts[LARS.tv_shift]))  # fp64: fp32 scalars promote
        phi = 1.0 / (opts[LARS.tv_alpha] + e) + opts[LARS.tv_gamma_min]
        phi = tl.where(tt < opts[LARS.tv_gate], 1.0, phi)
        ratio = ratio * phi.to(tl.float32)
    check_mode = opts[LARS.zero_norm_check]
    if check_mode == CHECK_RAW_GRAD:
        ok = (n_w_raw > 0) & (n_g_raw > 0)
    elif check_mode == CHECK_UPDATE:
        ok = (n_w_raw > 0) & (side_raw > 0)
    else:
        ok = (n_w_raw > 0) & (den > 0)
    lam_eff = lam
    clip_mode = opts[LARS.trust_clip]
    if opts[LARS.zero_norm] == ZN_SKIP:
        r_adapt = tl.where(ok, _clip(ratio, lr, clip_mode, opts[LARS.clip_lo], opts[LARS.clip_hi]), 1.0)
        lam_eff = tl.where(ok | (adapt == 0), lam, 0.0)
    else:
        r_adapt = _clip(tl.where(ok, ratio, 1.0), lr, clip_mode, opts[LARS.clip_lo], opts[LARS.clip_hi])
    r = tl.where(adapt != 0, r_adapt, 1.0)
    return r, lam_eff, n_w_raw, n_g_raw, n_u_raw


@triton.jit
def _bias_corr(t, omb):
    """1 - b^t in fp64 from omb = 1 - b (no cancellation for b close to 1)."""
    lb = tl.log(tl.full([], 1.0, tl.float64) - omb)
    return (1.0 - tl.exp(t.to(tl.float64) * lb)).to(tl.float32)


@triton.jit
def _lamb_ratio(ssq_w, ssq_u, ssq_g, lam, adapt, t, lr, opts):
    """LAMB's per-segment scalars from ``ssq`` rows ``[w_d^2, u^2, g^2]``: (r, lam, ||w_d||, ||g||, ||u||)
    (the decay is never skipped; ``t`` unused). A ``SEG_RATIO`` of :func:`_update_program`."""
    n_w_raw = tl.sqrt(ssq_w)
    n_u = tl.sqrt(ssq_u)
    n_w = _clamp(n_w_raw, opts[LAMB.clamp_lo], opts[LAMB.clamp_hi])
    ratio = tl.where((n_w > 0) & (n_u > 0), n_w / (n_u + opts[LAMB.trust_ratio_eps]), 1.0)
    r = tl.where(adapt != 0, _clip(ratio, lr, opts[LAMB.trust_clip], opts[LAMB.clip_lo], opts[LAMB.clip_hi]), 1.0)
    return r, lam, n_w_raw, tl.sqrt(ssq_g), n_u


@triton.jit
def _addr(addr_ptr, row, num_segs, s):
    """Segment s's base address (int64) in row ``row`` of the address table."""
    return tl.load(addr_ptr + row * num_segs + s)


@triton.jit
def _state_row(HAS_MASTER: tl.constexpr):
    """Row of the first state buffer: after param, grad and, when there are masters, master."""
    if HAS_MASTER:
        row = 3
    else:
        row = 2
    return row


@triton.jit
def _ptr(addr, start, DT: tl.constexpr, FAST: tl.constexpr):
    """Pointer to element ``start`` (the tile's first) of the DT buffer at ``addr``; the base is hinted
    16-byte aligned on the vector path (NOTE [Vector path]). Moving the pointer once per tile keeps the
    per-element offsets and the mask in int32."""
    p = addr.to(tl.pointer_type(DT))
    if FAST:
        p = tl.multiple_of(p, 16)
    return p + start


@triton.jit
def _ld(ptr, offs, m, FAST: tl.constexpr):
    """Block load: unmasked on the vector path (a full tile), masked with 0 fill otherwise."""
    if FAST:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=m, other=0.0)
    return x


@triton.jit
def _st(ptr, offs, x, m, FAST: tl.constexpr):
    if FAST:
        tl.store(ptr + offs, x)
    else:
        tl.store(ptr + offs, x, mask=m)


@triton.jit
def _fast(n, addr_or, TILE: tl.constexpr):
    """Does this tile take the vector path: full, and every base address it touches 16-byte aligned."""
    return (n == TILE) & ((addr_or % 16) == 0)


@triton.jit
def _tile_geometry(plan_ptr, pid, s, TILE: tl.constexpr):
    """(first tile of segment s, element offset of this tile inside the segment, valid elements)."""
    lo = tl.load(_tab(plan_ptr, P.seg_tile_ptr, tl.int64) + s)
    start = (pid - lo) * TILE  # int64, a multiple of TILE (== TileTable.tile_start[pid])
    n = tl.load(_tab(plan_ptr, P.tile_len, tl.int32) + pid)
    return lo, start, n


@triton.jit
def _store_seg_outputs(outs, idx, mask, n_w, n_g, n_u, r, one, t_new):
    """A segment's (or a block of empty segments') outputs of the step, stored where ``mask`` holds:
    ``outs = (w_norm, g_norm, u_norm, trust_ratio, has_state, step)`` get the norms, the ratio,
    has_state = 1 and the new step count."""
    w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr, has_ptr, step_ptr = outs
    tl.store(w_norm_ptr + idx, n_w, mask=mask)
    tl.store(g_norm_ptr + idx, n_g, mask=mask)
    tl.store(u_norm_ptr + idx, n_u, mask=mask)
    tl.store(ratio_ptr + idx, r, mask=mask)
    tl.store(has_ptr + idx, one, mask=mask)
    tl.store(step_ptr + idx, t_new, mask=mask)


@triton.jit
def _empty_segs(plan_ptr, pid, num_tiles, num_segs, SBLOCK: tl.constexpr):
    """Segment-program lanes of launch 2: (segment indices, mask of the active empty segments)."""
    offs = (pid - num_tiles).to(tl.int64) * SBLOCK + tl.arange(0, SBLOCK)
    m = offs < num_segs
    numel = tl.load(_tab(plan_ptr, P.seg_numel, tl.int64) + offs, mask=m, other=1)
    act = tl.load(_tab(plan_ptr, P.active, tl.float32) + offs, mask=m, other=0.0)
    return offs, m & (numel == 0) & (act != 0)


@triton.jit
def _segment_prologue(bufs, sblk, num_segs, SBLOCK: tl.constexpr):
    """Segment-program lanes of launch 1: snapshot ``step`` / ``has_state`` for launch 2, and zero the
    sums of the segments no tile program sums this launch (inactive, no tiles, or a skipped step):
    disjoint from the entries the tile programs write, so no race."""
    _, plan_ptr, work_ptr, _, step_ptr, has_ptr, found_inf_ptr = bufs
    offs = sblk.to(tl.int64) * SBLOCK + tl.arange(0, SBLOCK)
    m = offs < num_segs
    snap_ptr = _at(work_ptr, plan_ptr, P.snap_at)
    tl.store(snap_ptr + offs, tl.load(step_ptr + offs, mask=m, other=0.0).to(tl.float32), mask=m)
    tl.store(snap_ptr + num_segs + offs, tl.load(has_ptr + offs, mask=m, other=0.0).to(tl.float32), mask=m)
    act = tl.load(_tab(plan_ptr, P.active, tl.float32) + offs, mask=m, other=0.0)
    seg_tile_ptr = _tab(plan_ptr, P.seg_tile_ptr, tl.int64)
    ntiles = tl.load(seg_tile_ptr + offs + 1, mask=m, other=0) - tl.load(seg_tile_ptr + offs, mask=m, other=0)
    zero = tl.zeros([SBLOCK], dtype=tl.float32)
    found = zero + tl.load(found_inf_ptr).to(tl.float32)  # as a vector: the interpreter cannot OR a scalar bool in
    idle = m & ((act == 0) | (ntiles == 0) | (found != 0))
    ssq_ptr = _at(work_ptr, plan_ptr, P.ssq_at)
    tl.store(ssq_ptr + offs, zero, mask=idle)
    tl.store(ssq_ptr + num_segs + offs, zero, mask=idle)
    tl.store(ssq_ptr + 2 * num_segs + offs, zero, mask=idle)


# ------------------------------------------------------------------------------------------
# the two-phase skeleton, written once for both kinds
# ------------------------------------------------------------------------------------------
# NOTE: [One skeleton] Every kernel of both kinds is one of two program skeletons,
# :func:`_partials_program` (launch 1) and :func:`_update_program` (launch 2): the grid split,
# the GradScaler skip, the segment programs, the tile geometry, the partials and their
# reduction, the per-segment outputs. A kind supplies only constexpr jitted functions (its
# per-tile launch-1 work, its trust ratio, its per-tile update), the tuple ``kargs`` of the
# per-step pointers they read and its ``opts``, which the skeleton passes through untouched. The
# kernels stay separate entry points per kind and phase (their names, signatures and compiled
# variants are the launch contract of triton.py), each a single call of its skeleton.
#
# The per-tile functions of a kind come in pairs named by role: ``_<kind>_<what>_tile`` is what the
# skeleton calls (it reads the segment's scalars and chooses the path), ``_<kind>_<what>_loop`` the
# element loop it runs, once per path (NOTE [Vector path]). ``tile = (addr_ptr, num_segs, s, start, n)``
# locates the tile: the address table, segment s, the tile's first element and its valid elements.
@triton.jit
def _on_path(BODY: tl.constexpr, fast, args, TILE: tl.constexpr, BLOCK: tl.constexpr):
    """``BODY(*args, FAST, TILE, BLOCK)`` (a tile loop body returning its accumulators) on the vector path
    when ``fast``, else masked (NOTE [Vector path]): the same body instantiated twice, values equal."""
    if fast:
        out = BODY(*args, True, TILE, BLOCK)
    else:
        out = BODY(*args, False, TILE, BLOCK)
    return out


@triton.jit
def _on_path_void(BODY: tl.constexpr, fast, args, TILE: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`_on_path` for a body that only stores (Triton cannot carry a ``None`` out of a branch)."""
    if fast:
        BODY(*args, True, TILE, BLOCK)
    else:
        BODY(*args, False, TILE, BLOCK)


@triton.jit
def _aligned_or(tile, HAS_MASTER: tl.constexpr, PARAM: tl.constexpr, GRAD: tl.constexpr, NSTATE: tl.constexpr):
    """OR of the base addresses a tile dereferences (for :func:`_fast`): the param when ``PARAM`` (and always
    when there are no masters: the param is then the weights), the first ``NSTATE`` state buffers, the grad
    when ``GRAD``, the master when there are masters. A buffer the tile body dereferences but this OR leaves
    out would be accessed with vector instructions at a misaligned address. (The order of the ORs is each
    kind's order before the kinds shared this helper: it does not change the value, but ptxas's register
    allocation of ``lamb_moments_kernel`` follows it.)"""
    addr_ptr, num_segs, s, _, _ = tile
    row = _state_row(HAS_MASTER)
    if PARAM or not HAS_MASTER:
        a = _addr(addr_ptr, 0, num_segs, s)
        for i in tl.static_range(NSTATE):
            a = a | _addr(addr_ptr, row + i, num_segs, s)
        if GRAD:
            a = a | _addr(addr_ptr, 1, num_segs, s)
        if HAS_MASTER:
            a = a | _addr(addr_ptr, 2, num_segs, s)
    else:  # the weights are the master, the param is not dereferenced
        a = _addr(addr_ptr, 2, num_segs, s)
        for i in tl.static_range(NSTATE):
            a = a | _addr(addr_ptr, row + i, num_segs, s)
        if GRAD:
            a = a | _addr(addr_ptr, 1, num_segs, s)
    return a


@triton.jit
def _partials_program(
    TILE_SUMS: tl.constexpr,
    kargs,
    bufs,
    opts,
    weight_decay,
    PDT: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    MODE: tl.constexpr,
    GEO: tl.constexpr,
    GIVEN: tl.constexpr,
):
    """Launch 1 of either kind; ``bufs = (addr, plan, work, count, step, has_state, found_inf)`` pointers.
    Programs below ``num_tiles``: an active tile of a step that is not skipped runs ``TILE_SUMS(tile, lam,
    kargs, opts, PDT, HAS_MASTER, MODE, TILE, BLOCK)`` (the kind's tile work, ``lam = weight_decay * wd_mask[s]``;
    it returns the tile's three elementwise accumulators in ``ssq`` row order), then stores its partials and,
    if last to arrive, reduces its segment. ``GIVEN``: ``TILE_SUMS`` returns one accumulator and the
    segment's two other sums, given (NOTE [Given gradient sums]): one partial row is stored and reduced. The others: the segment prologue (snapshot, zeroed sums)."""
    TILE: tl.constexpr = GEO[0]
    BLOCK: tl.constexpr = GEO[1]
    RBLOCK: tl.constexpr = GEO[2]
    SBLOCK: tl.constexpr = GEO[3]
    addr_ptr, plan_ptr, work_ptr, count_ptr, _, _, found_inf_ptr = bufs
    num_tiles, num_segs = _dims(plan_ptr)
    pid = tl.program_id(0)
    go = tl.load(found_inf_ptr).to(tl.float32) == 0
    if pid >= num_tiles:
        _segment_prologue(bufs, pid - num_tiles, num_segs, SBLOCK)
    else:
        s = tl.load(_tab(plan_ptr, P.tile_seg, tl.int32) + pid)
        if go & (tl.load(_tab(plan_ptr, P.active, tl.float32) + s) != 0):
            lo, start, n = _tile_geometry(plan_ptr, pid, s, TILE)
            lam = weight_decay * tl.load(_tab(plan_ptr, P.wd_mask, tl.float32) + s).to(tl.float32)
            tile = (addr_ptr, num_segs, s, start, n)
            acc0, acc1, acc2 = TILE_SUMS(tile, lam, kargs, opts, PDT, HAS_MASTER, MODE, TILE, BLOCK)
            if GIVEN:  # acc1, acc2: the segment's given sums (NOTE [Given gradient sums])
                _store_w_partial_and_reduce(work_ptr, plan_ptr, count_ptr, pid, s, lo, acc0, acc1, acc2, RBLOCK)
            else:
                _store_partials_and_reduce(work_ptr, plan_ptr, count_ptr, pid, s, lo, acc0, acc1, acc2, RBLOCK)


@triton.jit
def _update_program(
    SEG_RATIO: tl.constexpr,
    TILE_UPDATE: tl.constexpr,
    kargs,
    bufs,
    outs,
    opts,
    weight_decay,
    adapt_enabled,
    PDT: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    MODE: tl.constexpr,
    GEO: tl.constexpr,
):
    """Launch 2 of either kind (nothing when the step is skipped); ``bufs = (addr, plan, work, lr, found_inf)``
    pointers, ``outs`` as :func:`_store_seg_outputs` takes them. ``SEG_RATIO(ssq0, ssq1, ssq2, lam, adapt, t,
    lr, opts) -> (r, lam_eff, ||w||, ||g||, ||u||)`` is the kind's trust ratio (``t``: the step count before
    this step), evaluated on zero sums for the empty segments of the segment programs and on the segment's
    sums in every tile program; the segment's first tile stores the outputs. Then ``TILE_UPDATE(tile, t,
    has, r, lam_eff, lr, kargs, opts, PDT, HAS_MASTER, MODE, TILE, BLOCK)`` updates the tile (``t``, ``has``:
    launch 1's snapshot of the step count and has_state; LAMB reads no ``has``, and its compiled kernel drops
    the unused load)."""
    TILE: tl.constexpr = GEO[0]
    BLOCK: tl.constexpr = GEO[1]
    SBLOCK: tl.constexpr = GEO[3]
    addr_ptr, plan_ptr, work_ptr, lr_ptr, found_inf_ptr = bufs
    num_tiles, num_segs = _dims(plan_ptr)
    pid = tl.program_id(0)
    go = tl.load(found_inf_ptr).to(tl.float32) == 0
    lr = tl.load(lr_ptr).to(tl.float32)
    if go:
        if pid >= num_tiles:
            # segments without tiles (empty params): norms are 0
            offs, m = _empty_segs(plan_ptr, pid, num_tiles, num_segs, SBLOCK)
            lam = weight_decay * tl.load(_tab(plan_ptr, P.wd_mask, tl.float32) + offs, mask=m, other=0.0)
            adapt = tl.load(_tab(plan_ptr, P.adapt_mask, tl.float32) + offs, mask=m, other=0.0) * adapt_enabled
            t = tl.load(outs[5] + offs, mask=m, other=0.0)
            zero = tl.zeros([SBLOCK], dtype=tl.float32)
            r, lam_eff, n_w, n_g, n_u = SEG_RATIO(zero, zero, zero, lam, adapt, t, lr, opts)
            _store_seg_outputs(outs, offs, m, n_w, n_g, n_u, r, zero + 1.0, t + 1.0)
        else:
            s = tl.load(_tab(plan_ptr, P.tile_seg, tl.int32) + pid)
            if tl.load(_tab(plan_ptr, P.active, tl.float32) + s) != 0:
                lo, start, n = _tile_geometry(plan_ptr, pid, s, TILE)
                ssq_ptr = _at(work_ptr, plan_ptr, P.ssq_at)
                ssq0 = tl.load(ssq_ptr + s)
                ssq1 = tl.load(ssq_ptr + num_segs + s)
                ssq2 = tl.load(ssq_ptr + 2 * num_segs + s)
                # launch 1's snapshot: the step count and has_state before this step
                snap_ptr = _at(work_ptr, plan_ptr, P.snap_at)
                t = tl.load(snap_ptr + s)
                has = tl.load(snap_ptr + num_segs + s) != 0
                lam = weight_decay * tl.load(_tab(plan_ptr, P.wd_mask, tl.float32) + s)
                adapt = tl.load(_tab(plan_ptr, P.adapt_mask, tl.float32) + s) * adapt_enabled
                r, lam_eff, n_w, n_g, n_u = SEG_RATIO(ssq0, ssq1, ssq2, lam, adapt, t, lr, opts)
                # the segment's first tile writes its outputs
                _store_seg_outputs(outs, s, pid == lo, n_w, n_g, n_u, r, 1.0, t + 1.0)
                tile = (addr_ptr, num_segs, s, start, n)
                TILE_UPDATE(tile, t, has, r, lam_eff, lr, kargs, opts, PDT, HAS_MASTER, MODE, TILE, BLOCK)


@triton.jit
def _weights_ptr(tile, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, FAST: tl.constexpr):
    """Pointer to the weights of the tile (fp32 master when there are masters, else the param)."""
    addr_ptr, num_segs, s, start, _ = tile
    if HAS_MASTER:
        w = _ptr(_addr(addr_ptr, 2, num_segs, s), start, tl.float32, FAST)
    else:
        w = _ptr(_addr(addr_ptr, 0, num_segs, s), start, PDT, FAST)
    return w


@triton.jit
def _buf_ptr(tile, row, DT: tl.constexpr, FAST: tl.constexpr):
    """Pointer to the tile's first element in row ``row`` of the address table (a DT buffer)."""
    addr_ptr, num_segs, s, start, _ = tile
    return _ptr(_addr(addr_ptr, row, num_segs, s), start, DT, FAST)


# ------------------------------------------------------------------------------------------
# LARS
# ------------------------------------------------------------------------------------------
@triton.jit
def _lars_sums_loop(
    tile, inv_scale, lam, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, FAST: tl.constexpr, TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One tile's elementwise accumulators of w^2, g^2 and (g + lam*w)^2, g = grad * inv_scale (signed)."""
    n = tile[4]
    wp = _weights_ptr(tile, PDT, HAS_MASTER, FAST)
    gp = _buf_ptr(tile, 1, PDT, FAST)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, TILE, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        m = offs < n
        w = _ld(wp, offs, m, FAST).to(tl.float32)
        g = _ld(gp, offs, m, FAST).to(tl.float32) * inv_scale
        u = g + lam * w
        acc_w += w * w
        acc_g += g * g
        acc_u += u * u
    return acc_w, acc_g, acc_u


@triton.jit
def _lars_sums_tile(
    tile, lam, kargs, opts, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, MODE: tl.constexpr, TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """LARS's ``TILE_SUMS`` (:func:`_partials_program`); ``kargs = (inv_scale_ptr,)``."""
    inv_scale = tl.load(kargs[0]).to(tl.float32) * _sign(opts[LARS.maximize])
    fast = _fast(tile[4], _aligned_or(tile, HAS_MASTER, False, True, 0), TILE)
    return _on_path(_lars_sums_loop, fast, (tile, inv_scale, lam, PDT, HAS_MASTER), TILE, BLOCK)


@triton.jit
def lars_partials_kernel(
    addr_ptr, plan_ptr, work_ptr, count_ptr, step_ptr, has_ptr, inv_scale_ptr, found_inf_ptr, opts,
    PDT: tl.constexpr, HAS_MASTER: tl.constexpr, GEO: tl.constexpr,
):  # fmt: skip
    """Launch 1: per tile, sums of w^2, g^2 and (g + lam*w)^2 (g unscaled, signed); per segment
    their totals ``ssq[0:3, s]``, reduced by the segment's last-arriving tile program."""
    bufs = (addr_ptr, plan_ptr, work_ptr, count_ptr, step_ptr, has_ptr, found_inf_ptr)
    _partials_program(
        _lars_sums_tile, (inv_scale_ptr,), bufs, opts, opts[LARS.weight_decay], PDT, HAS_MASTER, 0, GEO, False
    )


# NOTE: [Given gradient sums] (issue #25) A LARS step whose gradients' sums of squares were taken in
# backward (fusedlars.backward_norms: float64 [S], of the raw grads) reads no grad in launch 1:
# ``lars_wsums_kernel`` is :func:`lars_partials_kernel` with a tile body that sums w^2 alone (the same
# loop, so ``ssq[0]`` is bitwise the two-pass step's) and stores one partial per tile; the segment's
# last-arriving program reduces that row and stores beside it ``ssq[1] = fp32(g2[s] * inv_scale^2)``
# (float64 product, rounded once; inv_scale carries GradScaler's 1/scale and a clip coefficient) and
# ``ssq[2] = NaN``: ||g + lam*w|| is not known without reading g and is only reported (u_norm), so
# the backend declines the ``norm_of_sum`` denominator. Launch 2 is the unchanged
# :func:`lars_update_kernel`: 2 launches, and given the two-pass step's own g^2 sums the params are
# bitwise the two-pass step's. A skipped step (found_inf) or an inactive segment: the segment
# prologue zeroes the three sums, as in launch 1.
NAN = tl.constexpr(float("nan"))


@triton.jit
def _lars_wsum_loop(
    tile, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, FAST: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr
):
    """One tile's elementwise accumulator of w^2, as :func:`_lars_sums_loop` takes it."""
    n = tile[4]
    wp = _weights_ptr(tile, PDT, HAS_MASTER, FAST)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, TILE, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        w = _ld(wp, offs, offs < n, FAST).to(tl.float32)
        acc_w += w * w
    return acc_w


@triton.jit
def _lars_wsums_tile(
    tile, lam, kargs, opts, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, MODE: tl.constexpr, TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """LARS's ``TILE_SUMS`` from given gradient sums (NOTE [Given gradient sums]); ``kargs = (g2_ptr,
    inv_scale_ptr)``: (the w^2 accumulator, the segment's g^2, NaN)."""
    g2_ptr, inv_scale_ptr = kargs
    inv = tl.load(inv_scale_ptr).to(tl.float64)
    g2 = (tl.load(g2_ptr + tile[2]).to(tl.float64) * (inv * inv)).to(tl.float32)
    fast = _fast(tile[4], _aligned_or(tile, HAS_MASTER, False, False, 0), TILE)
    acc_w = _on_path(_lars_wsum_loop, fast, (tile, PDT, HAS_MASTER), TILE, BLOCK)
    return acc_w, g2, tl.full([], NAN, tl.float32)


@triton.jit
def lars_wsums_kernel(
    addr_ptr, plan_ptr, work_ptr, count_ptr, step_ptr, has_ptr, g2_ptr, inv_scale_ptr, found_inf_ptr, opts,
    PDT: tl.constexpr, HAS_MASTER: tl.constexpr, GEO: tl.constexpr,
):  # fmt: skip
    """Launch 1 from given gradient sums ``g2`` (float64 [S]): per tile the sum of w^2; per segment
    ``ssq[:, s] = [sum w^2, fp32(g2[s] * inv_scale^2), NaN]`` (NOTE [Given gradient sums]). No grad is read."""
    bufs = (addr_ptr, plan_ptr, work_ptr, count_ptr, step_ptr, has_ptr, found_inf_ptr)
    kargs = (g2_ptr, inv_scale_ptr)
    _partials_program(_lars_wsums_tile, kargs, bufs, opts, opts[LARS.weight_decay], PDT, HAS_MASTER, 0, GEO, True)


@triton.jit
def _lars_update_loop(
    tile, coefs, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, MOM: tl.constexpr, FAST: tl.constexpr,
    TILE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One tile of the LARS update: g' = r*(g + lam_eff*w) (l2) or r*g; momentum; decoupled decay; store.
    ``coefs`` as :func:`_lars_update_tile` packs them."""
    inv_scale, r, lam_eff, lr, has, c_new, momentum, wd_mode, nesterov = coefs
    n = tile[4]
    wp = _weights_ptr(tile, PDT, HAS_MASTER, FAST)
    pp = _buf_ptr(tile, 0, PDT, FAST)
    gp = _buf_ptr(tile, 1, PDT, FAST)
    if MOM != MOM_NONE:
        bp = _buf_ptr(tile, _state_row(HAS_MASTER), tl.float32, FAST)
    for k in range(0, TILE, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        m = offs < n
        w = _ld(wp, offs, m, FAST).to(tl.float32)
        g = _ld(gp, offs, m, FAST).to(tl.float32) * inv_scale
        if wd_mode == WD_L2:
            gq = r * (g + lam_eff * w)
        else:
            gq = r * g
        if MOM == MOM_NONE:
            w_new = w - lr * gq
        else:
            b = _ld(bp, offs, m, FAST)
            b_new = momentum * tl.where(has, b, 0.0) + c_new * gq
            _st(bp, offs, b_new, m, FAST)
            if MOM == MOM_TORCH:
                if nesterov != 0:
                    w_new = w - lr * (gq + momentum * b_new)
                else:
                    w_new = w - lr * b_new
            else:
                if nesterov != 0:
                    w_new = w - (lr * gq + momentum * b_new)
                else:
                    w_new = w - b_new
        if wd_mode == WD_DECOUPLED:
            w_new = w_new - lr * lam_eff * w
        if HAS_MASTER:
            _st(wp, offs, w_new, m, FAST)
        _st(pp, offs, w_new.to(PDT), m, FAST)


@triton.jit
def _lars_update_tile(
    tile, t, has, r, lam_eff, lr, kargs, opts, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, MOM: tl.constexpr,
    TILE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """LARS's ``TILE_UPDATE`` (:func:`_update_program`); ``kargs = (inv_scale_ptr,)``."""
    inv_scale = tl.load(kargs[0]).to(tl.float32) * _sign(opts[LARS.maximize])
    momentum = opts[LARS.momentum]
    # momentum coefficient of the new gradient (the old buffer counts only once the segment has state)
    if MOM == MOM_TORCH:
        c_new = tl.where(has | (opts[LARS.first_step_buffer] != FIRST_CLONE), 1.0 - opts[LARS.dampening], 1.0)
    else:
        c_new = lr
    if MOM != MOM_NONE:
        aligned = _aligned_or(tile, HAS_MASTER, True, True, 1)
    else:
        aligned = _aligned_or(tile, HAS_MASTER, True, True, 0)
    # wd_mode as an int: the loop's compares of it cost ptxas fewer registers than fp32 ones (AOT report)
    coefs = (
        inv_scale,
        r,
        lam_eff,
        lr,
        has,
        c_new,
        momentum,
        tl.cast(opts[LARS.wd_mode], tl.int32),
        opts[LARS.nesterov],
    )
    _on_path_void(_lars_update_loop, _fast(tile[4], aligned, TILE), (tile, coefs, PDT, HAS_MASTER, MOM), TILE, BLOCK)


@triton.jit
def lars_update_kernel(
    addr_ptr, plan_ptr, work_ptr, step_ptr, has_ptr, w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr, lr_ptr,
    inv_scale_ptr, found_inf_ptr, opts, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, MOM: tl.constexpr,
    GEO: tl.constexpr,
):  # fmt: skip
    """Launch 2: the segment's sums of squares ``ssq[0:3, s]`` (launch 1's, or summed over ranks), trust
    ratio, momentum update, store."""
    bufs = (addr_ptr, plan_ptr, work_ptr, lr_ptr, found_inf_ptr)
    outs = (w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr, has_ptr, step_ptr)
    wd, adapt_enabled = opts[LARS.weight_decay], opts[LARS.adapt_enabled]
    _update_program(
        _lars_ratio, _lars_update_tile, (inv_scale_ptr,), bufs, outs, opts, wd, adapt_enabled, PDT, HAS_MASTER, MOM, GEO
    )


# ------------------------------------------------------------------------------------------
# LAMB
# ------------------------------------------------------------------------------------------
@triton.jit
def _adam_dir(m, v, bc1, bc2, eps, eps_root, BC: tl.constexpr):
    if BC == BC_BOTH:
        # csrc/lars_math.h NOTE [Adam direction in range]: v / bc2 would overflow where v does not
        u = (m / bc1) / (tl.sqrt(v + eps_root * bc2) / tl.sqrt(bc2) + eps)
    else:
        u = m / (tl.sqrt(v + eps_root) + eps)
    return u


@triton.jit
def _lamb_moments_loop(
    tile, coefs, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, BC: tl.constexpr, FAST: tl.constexpr,
    TILE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One tile of LAMB's launch 1: new m, v stored; elementwise accumulators of w_d^2, u^2, g^2. ``coefs`` as
    :func:`_lamb_moments_tile` packs them."""
    gscale, clip, lam, lr, bc1, bc2, beta1, beta2, beta3, omb2, eps, eps_root, wd_mode = coefs
    n = tile[4]
    wp = _weights_ptr(tile, PDT, HAS_MASTER, FAST)
    gp = _buf_ptr(tile, 1, PDT, FAST)
    row = _state_row(HAS_MASTER)
    mp = _buf_ptr(tile, row, tl.float32, FAST)
    vp = _buf_ptr(tile, row + 1, tl.float32, FAST)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, TILE, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        msk = offs < n
        w = _ld(wp, offs, msk, FAST).to(tl.float32)
        g = _ld(gp, offs, msk, FAST).to(tl.float32) * gscale / clip
        acc_g += g * g
        if wd_mode == LWD_L2:
            g = g + lam * w
        m = beta1 * _ld(mp, offs, msk, FAST) + beta3 * g
        v = beta2 * _ld(vp, offs, msk, FAST) + omb2 * g * g
        _st(mp, offs, m, msk, FAST)
        _st(vp, offs, v, msk, FAST)
        u = _adam_dir(m, v, bc1, bc2, eps, eps_root, BC)
        if wd_mode == LWD_IN_UPDATE:
            u = u + lam * w
        if wd_mode == LWD_DECOUPLED:
            w = w * (1.0 - lr * lam)
        acc_w += w * w
        acc_u += u * u
    return acc_w, acc_u, acc_g


@triton.jit
def _lamb_moments_tile(
    tile, lam, kargs, opts, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, BC: tl.constexpr, TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """LAMB's ``TILE_SUMS`` (:func:`_partials_program`); ``kargs = (lr_ptr, inv_scale_ptr, clip_ptr, step_ptr)``."""
    lr_ptr, inv_scale_ptr, clip_ptr, step_ptr = kargs
    lr = tl.load(lr_ptr).to(tl.float32)
    gscale = tl.load(inv_scale_ptr).to(tl.float32) * _sign(opts[LAMB.maximize])
    clip = tl.load(clip_ptr).to(tl.float32)
    t = tl.load(step_ptr + tile[2]).to(tl.float32) + 1.0
    bc1 = _bias_corr(t, opts[LAMB.one_minus_beta1])
    bc2 = _bias_corr(t, opts[LAMB.one_minus_beta2])
    fast = _fast(tile[4], _aligned_or(tile, HAS_MASTER, True, True, 2), TILE)
    coefs = (gscale, clip, lam, lr, bc1, bc2, opts[LAMB.beta1], opts[LAMB.beta2], opts[LAMB.beta3], opts[LAMB.one_minus_beta2],
             opts[LAMB.eps], opts[LAMB.eps_root], opts[LAMB.wd_mode])  # fmt: skip
    return _on_path(_lamb_moments_loop, fast, (tile, coefs, PDT, HAS_MASTER, BC), TILE, BLOCK)


@triton.jit
def lamb_moments_kernel(
    addr_ptr, plan_ptr, work_ptr, count_ptr, step_ptr, has_ptr, lr_ptr, inv_scale_ptr, found_inf_ptr, clip_ptr,
    opts, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, BC: tl.constexpr, GEO: tl.constexpr,
):  # fmt: skip
    """Launch 1: new m, v (stored); per tile sums of w_d^2, u^2 and g^2 (before L2); per segment their
    totals ``ssq[0:3, s]``, reduced by the segment's last-arriving tile program."""
    bufs = (addr_ptr, plan_ptr, work_ptr, count_ptr, step_ptr, has_ptr, found_inf_ptr)
    kargs = (lr_ptr, inv_scale_ptr, clip_ptr, step_ptr)
    _partials_program(_lamb_moments_tile, kargs, bufs, opts, opts[LAMB.weight_decay], PDT, HAS_MASTER, BC, GEO, False)


@triton.jit
def _lamb_update_loop(
    tile, coefs, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, BC: tl.constexpr, FAST: tl.constexpr,
    TILE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One tile of LAMB's launch 2: u from the new m, v; w <- w_d - lr * scale * u; store. ``coefs`` as
    :func:`_lamb_update_tile` packs them."""
    lam, lr, scale, bc1, bc2, eps, eps_root, wd_mode = coefs
    n = tile[4]
    wp = _weights_ptr(tile, PDT, HAS_MASTER, FAST)
    pp = _buf_ptr(tile, 0, PDT, FAST)
    row = _state_row(HAS_MASTER)
    mp = _buf_ptr(tile, row, tl.float32, FAST)
    vp = _buf_ptr(tile, row + 1, tl.float32, FAST)
    for k in range(0, TILE, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        msk = offs < n
        w = _ld(wp, offs, msk, FAST).to(tl.float32)
        u = _adam_dir(_ld(mp, offs, msk, FAST), _ld(vp, offs, msk, FAST), bc1, bc2, eps, eps_root, BC)
        if wd_mode == LWD_IN_UPDATE:
            u = u + lam * w
        if wd_mode == LWD_DECOUPLED:
            w = w * (1.0 - lr * lam)
        w_new = w - u * scale * lr
        if HAS_MASTER:
            _st(wp, offs, w_new, msk, FAST)
        _st(pp, offs, w_new.to(PDT), msk, FAST)


@triton.jit
def _lamb_update_tile(
    tile, t, has, r, lam, lr, kargs, opts, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, BC: tl.constexpr,
    TILE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """LAMB's ``TILE_UPDATE`` (:func:`_update_program`); no ``kargs``. The bias corrections are those of the
    new step count ``t + 1``, as launch 1's."""
    bc1 = _bias_corr(t + 1.0, opts[LAMB.one_minus_beta1])
    bc2 = _bias_corr(t + 1.0, opts[LAMB.one_minus_beta2])
    if BC == BC_FIRST_OUTSIDE:
        scale = r / bc1
    else:
        scale = r
    fast = _fast(tile[4], _aligned_or(tile, HAS_MASTER, True, False, 2), TILE)
    coefs = (lam, lr, scale, bc1, bc2, opts[LAMB.eps], opts[LAMB.eps_root], opts[LAMB.wd_mode])
    _on_path_void(_lamb_update_loop, fast, (tile, coefs, PDT, HAS_MASTER, BC), TILE, BLOCK)


@triton.jit
def lamb_update_kernel(
    addr_ptr, plan_ptr, work_ptr, step_ptr, has_ptr, w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr, lr_ptr,
    found_inf_ptr, opts, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, BC: tl.constexpr, GEO: tl.constexpr,
):  # fmt: skip
    """Launch 2: the segment's sums of squares ``ssq[0:3, s]`` (launch 1's, or summed over ranks), trust
    ratio, w <- w_d - lr*s*r*u (u from the new m, v). ``adam``: ratio 1 everywhere."""
    bufs = (addr_ptr, plan_ptr, work_ptr, lr_ptr, found_inf_ptr)
    outs = (w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr, has_ptr, step_ptr)
    adapt_enabled = tl.where(opts[LAMB.adam] != 0, 0.0, opts[LAMB.adapt_enabled])
    _update_program(
        _lamb_ratio, _lamb_update_tile, (), bufs, outs, opts, opts[LAMB.weight_decay], adapt_enabled, PDT, HAS_MASTER,
        BC, GEO,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------
# global gradient norm (LAMB max_grad_norm)
# ------------------------------------------------------------------------------------------
@triton.jit
def _grad_tile_sumsq(
    gaddr, start, n, inv_scale, PDT: tl.constexpr, FAST: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr
):
    gp = _ptr(gaddr, start, PDT, FAST)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, TILE, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        g = _ld(gp, offs, offs < n, FAST).to(tl.float32) * inv_scale
        acc += g * g
    return acc


@triton.jit
def grad_sumsq_kernel(addr_ptr, plan_ptr, inv_scale_ptr, part_ptr, PDT: tl.constexpr, GEO: tl.constexpr):
    """Per tile sum of (grad * inv_scale)^2 (grads: row 1 of the address table), 0 for inactive
    segments (fp64 partials ``part`` [num_tiles]; one program per tile)."""
    TILE: tl.constexpr = GEO[0]
    BLOCK: tl.constexpr = GEO[1]
    pid = tl.program_id(0)
    s = tl.load(_tab(plan_ptr, P.tile_seg, tl.int32) + pid)
    inv_scale = tl.load(inv_scale_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if tl.load(_tab(plan_ptr, P.active, tl.float32) + s) != 0:
        lo, start, n = _tile_geometry(plan_ptr, pid, s, TILE)
        gaddr = _addr(addr_ptr, 1, tl.load(plan_ptr + P.num_segs).to(tl.int32), s)
        if _fast(n, gaddr, TILE):
            acc = _grad_tile_sumsq(gaddr, start, n, inv_scale, PDT, True, TILE, BLOCK)
        else:
            acc = _grad_tile_sumsq(gaddr, start, n, inv_scale, PDT, False, TILE, BLOCK)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0).to(tl.float64))


# ------------------------------------------------------------------------------------------
# LARS with low-bit state (issue #26): bf16 momentum, remainder masters
# ------------------------------------------------------------------------------------------
# NOTE: [Low-bit LARS in the Triton kernels] The same two launches and skeletons. Launch 1
# (``lars_lowbit_partials_kernel``) sums w^2, g^2 and (g + lam*w)^2 in float64 (the weights as stored,
# ``MASTER``: 0 the param, 1 an fp32 master, 2 the bf16 param plus its int16 remainder, rebuilt bitwise by
# triton_lowbit.master_rebuild; g and u formed in float64 as the reference forms them) into a float64
# scratch, as the cuda and cpu exact kernels do. Launch 2 (``lars_lowbit_update_kernel``) follows
# lowbit_state NOTE [Low-bit state: where values become fp32] and csrc/lars_math.h NOTE [Low-bit LARS
# element math in fp32], as the cpu and cuda backends do: the segment's norms are sqrt of its sums in
# float64, the trust ratio is reference.lars_layer_scalars in float64 from the options in float64
# (``dopts``: the rows of the option table as doubles, not ``opts``' fp32), the fp32 coefficients of
# ``lars_coef`` are formed from it in float64 and rounded once, and every element is
# ``lars_update_modes`` in fp32 in its order of operations (the kernel is launched without FMA
# contraction: triton._NO_FMA); the new buffer is stored in bf16 by stochastic rounding with the
# element's 16 bits of the Philox call of (seed, step after this step, the param's state_dict id,
# element // 8) (lowbit.sr_bits), or in int8 (``STORE`` 1): the old codes dequantized with their block's
# scale (map[code] * scale), the new values of a chunk quantized as rows of QBLOCK elements, each one
# block of the param (TILE and BLOCK are multiples of QBLOCK, and so are a tile's and a chunk's starts):
# the row's absmax, x / scale correctly rounded, the 8-step midpoint search (triton_lowbit); the new
# weights are split into param and remainder (or stored as master and param). The sums are the
# reference's but for their order, which moves a norm by ulps of a double: the fp32 coefficients are the
# reference's unless one lies that close to a rounding boundary, and params and state are its bits (given
# equal sums they always are). Every tile runs the
# masked path.
#: elements per int8 quantization block (lowbit.QBLOCK)
QBLOCK: tl.constexpr = tl.constexpr(_LB_QBLOCK)


@triton.jit
def _weights32(tile, offs, m, PDT: tl.constexpr, MASTER: tl.constexpr):
    """The tile's weights at ``offs`` in fp32 (exact): param, fp32 master or param + remainder (MASTER 0/1/2)."""
    if MASTER == 2:
        p = tl.load(_buf_ptr(tile, 0, PDT, False) + offs, mask=m, other=0.0)
        r = tl.load(_buf_ptr(tile, 2, tl.int16, False) + offs, mask=m, other=0)
        w = _LB.master_rebuild(p, r)
    elif MASTER == 1:
        w = tl.load(_buf_ptr(tile, 2, tl.float32, False) + offs, mask=m, other=0.0)
    else:
        w = tl.load(_buf_ptr(tile, 0, PDT, False) + offs, mask=m, other=0.0).to(tl.float32)
    return w


@triton.jit
def _weights_store(tile, offs, m, w32, PDT: tl.constexpr, MASTER: tl.constexpr):
    """Store the new fp32 weights: param and remainder (lowbit NOTE [Master split]) (MASTER 2), the fp32 master
    and the param rounded to nearest from it (1), or the param rounded to nearest from them (0: exact for
    fp32 params; half params round once, as the reference rounds its float64 of these fp32 values)."""
    pp = _buf_ptr(tile, 0, PDT, False)
    if MASTER == 2:
        p, rem = _LB.master_split(w32)
        tl.store(pp + offs, p, mask=m)
        tl.store(_buf_ptr(tile, 2, tl.int16, False) + offs, rem, mask=m)
    else:
        if MASTER == 1:
            tl.store(_buf_ptr(tile, 2, tl.float32, False) + offs, w32, mask=m)
        if PDT == tl.bfloat16:
            tl.store(pp + offs, _LB.bf16_rne(w32), mask=m)
        else:
            tl.store(pp + offs, w32.to(PDT), mask=m)


@triton.jit
def _scales_ptr(tile, srow, STORE: tl.constexpr):
    """int8 (``STORE`` 1): the segment's block scales in address-table row ``srow`` (block j at + j); else the
    tile's first address (never dereferenced)."""
    if STORE == 1:
        sp = _ptr(_addr(tile[0], srow, tile[1], tile[2]), 0, tl.float32, False)
    else:
        sp = _ptr(_addr(tile[0], 0, tile[1], tile[2]), 0, tl.float32, False)
    return sp


@triton.jit
def _state_load32(tile, row, scale_ptr, offs, m, map_ptr, STORE: tl.constexpr, BLOCK: tl.constexpr):
    """The stored state buffer of row ``row`` at the chunk ``offs``, in fp32 (exact): bf16 widened (``STORE``
    0), int8 codes dequantized with their block's scale (1: lowbit.dequantize_blockwise, map[code] * scale)
    or fp32 (2: fp32 state beside remainder masters)."""
    if STORE == 1:
        code = tl.load(_buf_ptr(tile, row, tl.uint8, False) + offs, mask=m, other=0)
        x = _LB.dequantize(code, tl.load(scale_ptr + (tile[3] + offs) // QBLOCK, mask=m, other=0.0), map_ptr)
    elif STORE == 2:
        x = tl.load(_buf_ptr(tile, row, tl.float32, False) + offs, mask=m, other=0.0)
    else:
        x = tl.load(_buf_ptr(tile, row, tl.bfloat16, False) + offs, mask=m, other=0.0).to(tl.float32)
    return x


@triton.jit
def _state_store(
    tile, row, scale_ptr, k, offs, m, x, mid_ptr, sr, STORE: tl.constexpr, BUF: tl.constexpr, BUFS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Store the chunk's new fp32 state ``x`` (at ``offs = k + arange(BLOCK)``) in row ``row``: bf16 by
    stochastic rounding with the Philox bits of ``sr = (seed, step after this step, param id)`` for buffer
    ``BUF`` of ``BUFS`` (lowbit.sr_bits), or int8 (``STORE`` 1): lowbit.quantize_blockwise over the chunk's
    quantization blocks (rows) with the map's midpoints at ``mid_ptr``. A tile starts at a multiple of TILE
    and a chunk at a multiple of BLOCK, both multiples of QBLOCK, so a row is one block of the param; lanes
    past its end hold +-0 (w, g, code 0 and scale 0 loaded), which no |max| sees. ``STORE`` 2: fp32, as is."""
    QB: tl.constexpr = QBLOCK
    start = tile[3]
    if STORE == 1:
        xr = tl.reshape(x, [BLOCK // QB, QB])
        sc = _LB.block_absmax(xr)
        codes = _LB.quantize_code(_LB.normalize(xr, sc[:, None]), mid_ptr)
        tl.store(_buf_ptr(tile, row, tl.uint8, False) + offs, tl.reshape(codes, [BLOCK]), mask=m)
        rows = tl.arange(0, BLOCK // QB)
        tl.store(scale_ptr + (start + k) // QB + rows, sc, mask=(k + rows * QB) < tile[4])
    elif STORE == 2:
        tl.store(_buf_ptr(tile, row, tl.float32, False) + offs, x, mask=m)
    else:
        seed, step_new, pidx = sr
        rand = _LB.sr_bits(seed, step_new, pidx, start + offs, BUF, BUFS)
        tl.store(_buf_ptr(tile, row, tl.bfloat16, False) + offs, _LB.bf16_sr(x, rand), mask=m)


@triton.jit
def _lam64(lam32, wd64):
    """``weight_decay * wd_mask`` in float64 as the reference forms it (``lam32``: the fp32 product)."""
    return tl.where(lam32 != 0, wd64, 0.0)


@triton.jit
def _zeros3(R: tl.constexpr):
    """Three float64 accumulators of R lanes (the exact kernels' launch 1)."""
    return tl.zeros([R], dtype=tl.float64), tl.zeros([R], dtype=tl.float64), tl.zeros([R], dtype=tl.float64)


@triton.jit
def _sum4(acc, x, m, R: tl.constexpr):
    """``acc`` ([R] float64) plus the float64 ``x`` ([4 R], 0 where not ``m``), 4 neighbours per lane."""
    return acc + tl.sum(tl.reshape(tl.where(m, x, 0.0), [R, 4]), axis=1)


@triton.jit
def _lars_lowbit_sums_tile(
    tile, lam32, kargs, opts, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, MASTER: tl.constexpr, TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Launch 1's ``TILE_SUMS`` of low-bit LARS: float64 sums of w^2, g^2 and (g + lam*w)^2 from the weights as
    stored (exact in fp32) and g = grad * (+-inv_scale) in float64, as reference.lars_step forms its norms
    (launched without FMA contraction); ``opts = (fp32 opts, dopts_ptr)``, ``kargs = (inv_scale_ptr,)``.
    Chunks and accumulators as low-bit LAMB's (NOTE [Low-bit LAMB in the Triton kernels])."""
    fo, dp = opts
    inv = tl.load(kargs[0]).to(tl.float64)
    inv = tl.where(fo[LARS.maximize] != 0, -inv, inv)
    lam = _lam64(lam32, _d(dp, LARS.weight_decay))
    CH: tl.constexpr = BLOCK // 2
    R: tl.constexpr = CH // 4
    gp = _buf_ptr(tile, 1, PDT, False)
    acc_w, acc_g, acc_u = _zeros3(R)
    for k in range(0, TILE, CH):
        offs = k + tl.arange(0, CH)
        m = offs < tile[4]
        w = _weights32(tile, offs, m, PDT, MASTER).to(tl.float64)
        g = tl.load(gp + offs, mask=m, other=0.0).to(tl.float64) * inv
        u = g + lam * w
        acc_w = _sum4(acc_w, w * w, m, R)
        acc_g = _sum4(acc_g, g * g, m, R)
        acc_u = _sum4(acc_u, u * u, m, R)
    return acc_w, acc_g, acc_u


@triton.jit
def lars_lowbit_partials_kernel(
    addr_ptr, plan_ptr, work_ptr, count_ptr, step_ptr, has_ptr, inv_scale_ptr, found_inf_ptr, dopts_ptr, opts,
    PDT: tl.constexpr, HAS_MASTER: tl.constexpr, MASTER: tl.constexpr, GEO: tl.constexpr,
):  # fmt: skip
    """Launch 1 of low-bit LARS (NOTE [Low-bit LARS in the Triton kernels]): per segment the float64 sums
    ``[w^2, g^2, (g + lam*w)^2]`` into the float64 scratch ``work``, the weights read as ``MASTER`` stores
    them."""
    bufs = (addr_ptr, plan_ptr, work_ptr, count_ptr, step_ptr, has_ptr, found_inf_ptr)
    _partials_program(
        _lars_lowbit_sums_tile, (inv_scale_ptr,), bufs, (opts, dopts_ptr), opts[LARS.weight_decay], PDT,
        MASTER != 0, MASTER, GEO, False,
    )  # fmt: skip


@triton.jit
def _d(dopts_ptr, SLOT: tl.constexpr):
    """Option ``SLOT`` as a double (the row's value as Python holds it)."""
    return tl.load(dopts_ptr + SLOT)


@triton.jit
def _clip64(r, lr, clip_mode, dopts_ptr, LO: tl.constexpr, HI: tl.constexpr):
    """formulas.trust_clip in float64 (``LO``, ``HI``: the kind's clip_lo / clip_hi slots)."""
    out = r
    if clip_mode == CLIP_LARC:
        out = tl.minimum(r / lr, 1.0, propagate_nan=tl.PropagateNan.ALL)
    elif clip_mode == CLIP_LAMBC:
        out = tl.minimum(r, 1.0, propagate_nan=tl.PropagateNan.ALL)
    elif clip_mode == CLIP_RANGE:
        out = _clamp(r, _d(dopts_ptr, LO), _d(dopts_ptr, HI))
    return out


@triton.jit
def _lars_ratio64(ssq_w, ssq_g, ssq_u, lam32, adapt, t, lr32, opts):
    """reference.lars_layer_scalars in float64 (a ``SEG_RATIO``): the norms are sqrt of the sums in float64,
    ``lam = weight_decay * wd_mask`` and ``lr`` as the reference forms them; ``opts = (fp32 opts,
    dopts_ptr, lr_ptr)``; TVLARS's phi_t in float64 from the double options, as the reference forms it
    (``exp`` the device's libm: triton_lowbit NOTE [Device libm in the kernels])."""
    fo, dp, lr_ptr = opts
    lr = tl.load(lr_ptr).to(tl.float64)
    lam = _lam64(lam32, _d(dp, LARS.weight_decay))
    n_w_raw = tl.sqrt(ssq_w.to(tl.float64))  # fp64 sqrt and / are correctly rounded (sqrt.rn / div.rn.f64)
    n_g_raw = tl.sqrt(ssq_g.to(tl.float64))
    n_u_raw = tl.sqrt(ssq_u.to(tl.float64))
    lo = _d(dp, LARS.clamp_lo)
    hi = _d(dp, LARS.clamp_hi)
    n_w = _clamp(n_w_raw, lo, hi)
    den_mode = fo[LARS.denominator]
    if den_mode == DEN_NORM_OF_SUM:
        side_raw = n_u_raw
    else:
        side_raw = n_g_raw
    side = _clamp(side_raw, lo, hi)
    if den_mode == DEN_SUM_OF_NORMS:
        den = side + lam * n_w + _d(dp, LARS.eps)
    else:
        den = side + _d(dp, LARS.eps)
    tt = t.to(tl.float64)  # the completed steps (exact in fp32); a vector in the segment programs
    eta_phi = tl.zeros_like(tt) + _d(dp, LARS.eta)  # eta * phi, phi = 1 for plain LARS (exact); t's shape
    if fo[LARS.tv_on] != 0:  # formulas.tv_phi_tensor in float64
        e = _LB.exp64(_d(dp, LARS.tv_lmbda) * (tt - _d(dp, LARS.tv_shift)))
        phi = 1.0 / (_d(dp, LARS.tv_alpha) + e) + _d(dp, LARS.tv_gamma_min)
        eta_phi = eta_phi * tl.where(tt < _d(dp, LARS.tv_gate), 1.0, phi)
    ratio = eta_phi * n_w / den
    check_mode = fo[LARS.zero_norm_check]
    if check_mode == CHECK_RAW_GRAD:
        ok = (n_w_raw > 0) & (n_g_raw > 0)
    elif check_mode == CHECK_UPDATE:
        ok = (n_w_raw > 0) & (side_raw > 0)
    else:
        ok = (n_w_raw > 0) & (den > 0)
    lam_eff = lam
    clip_mode = fo[LARS.trust_clip]
    if fo[LARS.zero_norm] == ZN_SKIP:
        r_adapt = tl.where(ok, _clip64(ratio, lr, clip_mode, dp, LARS.clip_lo, LARS.clip_hi), 1.0)
        lam_eff = tl.where(ok | (adapt == 0), lam, 0.0)
    else:
        r_adapt = _clip64(tl.where(ok, ratio, 1.0), lr, clip_mode, dp, LARS.clip_lo, LARS.clip_hi)
    r = tl.where(adapt != 0, r_adapt, 1.0)
    return r, lam_eff, n_w_raw, n_g_raw, n_u_raw


@triton.jit
def _lars_lowbit_update_tile(
    tile, t, has, r, lam_eff, lr32, kargs, opts, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, MODE: tl.constexpr,
    TILE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Launch 2's ``TILE_UPDATE`` of low-bit LARS: csrc/lars_math.h NOTE [Low-bit element math in fp32]
    (NOTE [Low-bit LARS in the Triton kernels]): ``lars_coef``'s fp32 coefficients, each formed in float64
    and rounded once, then ``lars_update_modes`` per element in fp32, launched without FMA contraction;
    ``MODE = (MOM, MASTER, STORE)`` (STORE 0: bf16 momentum, 1: int8 codes and block scales, 2: fp32),
    ``kargs = (inv_scale_ptr, pidx_ptr, seed, qmap_ptr, qmid_ptr)`` (the signed map and its midpoints)."""
    MOM: tl.constexpr = MODE[0]
    MASTER: tl.constexpr = MODE[1]
    STORE: tl.constexpr = MODE[2]
    fo, dp, lr_ptr = opts
    inv_scale_ptr, pidx_ptr, seed, qmap_ptr, qmid_ptr = kargs
    lr = tl.load(lr_ptr).to(tl.float64)
    inv_scale = tl.load(inv_scale_ptr).to(tl.float64)
    gscale = tl.where(fo[LARS.maximize] != 0, -inv_scale, inv_scale).to(tl.float32)
    mu = _d(dp, LARS.momentum)
    has_state = has != 0
    nesterov = fo[LARS.nesterov] != 0
    # lars_coef
    r32 = r.to(tl.float32)
    lam32 = lam_eff.to(tl.float32)
    dec32 = (lr * lam_eff).to(tl.float32)
    mu_b = tl.where(has_state, mu, 0.0).to(tl.float32)
    if MOM == MOM_TORCH:
        clone_first = (fo[LARS.first_step_buffer] == FIRST_CLONE) & (has == 0)
        c_g = tl.where(clone_first, 1.0, 1.0 - _d(dp, LARS.dampening)).to(tl.float32)
        a_g = lr.to(tl.float32)
        a_b = tl.where(nesterov, lr * mu, lr).to(tl.float32)
    else:  # classic (or no momentum: a_g alone)
        c_g = lr.to(tl.float32)
        a_g = lr.to(tl.float32)
        a_b = tl.where(nesterov, mu, 1.0).to(tl.float32)
    l2 = tl.cast(fo[LARS.wd_mode], tl.int32) == WD_L2
    decoupled = tl.cast(fo[LARS.wd_mode], tl.int32) == WD_DECOUPLED
    step_new = (t + 1.0).to(tl.int64)  # the count once this step is done
    pidx = tl.load(pidx_ptr + tile[2])
    n = tile[4]
    gp_ptr = _buf_ptr(tile, 1, PDT, False)
    row = _state_row(HAS_MASTER)
    scale_ptr = _scales_ptr(tile, row + 1, STORE)  # int8: the block scales, the row after the codes
    for k in range(0, TILE, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        m = offs < n
        w = _weights32(tile, offs, m, PDT, MASTER)
        g = tl.load(gp_ptr + offs, mask=m, other=0.0).to(tl.float32) * gscale
        if l2:
            gq = (g + lam32 * w) * r32
        else:
            gq = g * r32
        if MOM == MOM_NONE:
            w_new = w - a_g * gq
        else:
            b = tl.where(has_state, _state_load32(tile, row, scale_ptr, offs, m, qmap_ptr, STORE, BLOCK), 0.0)
            b_new = mu_b * b + c_g * gq
            if nesterov:
                w_new = w - (a_g * gq + a_b * b_new)
            else:
                w_new = w - a_b * b_new
            _state_store(tile, row, scale_ptr, k, offs, m, b_new, qmid_ptr, (seed, step_new, pidx), STORE, 0, 1, BLOCK)
        if decoupled:
            w_new = w_new - dec32 * w
        _weights_store(tile, offs, m, w_new, PDT, MASTER)


@triton.jit
def lars_lowbit_update_kernel(
    addr_ptr, plan_ptr, work_ptr, step_ptr, has_ptr, w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr, lr_ptr,
    inv_scale_ptr, found_inf_ptr, dopts_ptr, pidx_ptr, seed, qmap_ptr, qmid_ptr, opts, PDT: tl.constexpr,
    HAS_MASTER: tl.constexpr, MASTER: tl.constexpr, MOM: tl.constexpr, STORE: tl.constexpr, GEO: tl.constexpr,
):  # fmt: skip
    """Launch 2 of low-bit LARS (NOTE [Low-bit LARS in the Triton kernels]): the trust ratio in float64 from
    the segment's sums, the update per element in float64, bf16 momentum by stochastic rounding, the new
    weights rounded once to fp32 (split into param and remainder for ``MASTER == 2``); ``STORE`` 1: int8
    momentum, dequantized and quantized per 256-element block with the signed map at ``qmap_ptr`` and its
    midpoints at ``qmid_ptr``."""
    bufs = (addr_ptr, plan_ptr, work_ptr, lr_ptr, found_inf_ptr)
    outs = (w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr, has_ptr, step_ptr)
    _update_program(
        _lars_ratio64, _lars_lowbit_update_tile, (inv_scale_ptr, pidx_ptr, seed, qmap_ptr, qmid_ptr), bufs, outs,
        (opts, dopts_ptr, lr_ptr), opts[LARS.weight_decay], opts[LARS.adapt_enabled], PDT, MASTER != 0,
        (MOM, MASTER, STORE), GEO,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------
# LAMB with low-bit state (issue #26): bf16 / int8 moments, remainder masters
# ------------------------------------------------------------------------------------------
# NOTE: [Low-bit LAMB in the Triton kernels] Two launches, the skeletons of the fp32 kernels, the element
# math of csrc/lars_math.h NOTE [Low-bit element math in fp32] (``lamb_coef`` formed in float64 with
# beta^t from the device's pow (triton_lowbit NOTE [Device libm in the kernels]), each coefficient rounded
# once; ``lamb_moments_mode`` / ``lamb_direction_mode`` per element in fp32, sqrt and division correctly
# rounded (sqrt_rn, div_rn), no FMA contraction). Launch 1 (``lamb_lowbit_partials_kernel``) evaluates
# them from the stored moments (dequantized exactly) and sums w_d^2, u^2 (the fp32 values) and g^2 (the
# exact scaled gradient) in float64, as the cuda and cpu exact kernels do, into a float64 scratch: it
# stores nothing else. Launch 2 (``lamb_lowbit_update_kernel``) takes the trust ratio in float64 from the
# sums (reference.lamb_layer_scalars), k = fl32(lr * s * r), recomputes each element from the same inputs
# and stores w_d - k*u (split or rounded as MASTER says) and the new moments: bf16 by stochastic rounding
# with halves BUFFER * 4 + e % 4 of the Philox call of element // 4 (exp_avg 0, exp_avg_sq 1), or int8
# per 256-element block (exp_avg with the signed map, exp_avg_sq with the unsigned one). Recomputing in
# launch 2 (not storing in launch 1) is what keeps u exact: it is formed from the new moments before they
# are rounded to their storage, as the reference forms it.
@triton.jit
def _lamb_gscales(inv_scale_ptr, clip_ptr, fo):
    """``(gscale32, inv64, clip64)``: reference.gscale32 (fl32((+-inv_scale) / clip_coef), formed in float64)
    and the float64 factors of the scaled gradient whose norm is reported (reference._grad)."""
    inv = tl.load(inv_scale_ptr).to(tl.float64)
    clip = tl.load(clip_ptr).to(tl.float64)
    gscale = (tl.where(fo[LAMB.maximize] != 0, -inv, inv) / clip).to(tl.float32)
    return gscale, inv, clip


@triton.jit
def _lamb_coef32(dp, lr, lam, t_new, BC: tl.constexpr):
    """reference.lamb_coef32 (csrc/lars_math.h ``lamb_coef<true>``): ``(lam, wd_keep, b1, b3, b2, omb2, ibc1,
    isq2, er2, eps)`` in fp32, each formed in float64 from ``lr``, ``lam`` and the step after this one and
    rounded once; ``ibc1`` one fp32 division."""
    b1 = _d(dp, LAMB.beta1)
    b2 = _d(dp, LAMB.beta2)
    if BC == BC_BOTH:
        bc2 = 1.0 - _LB.pow64(b2, t_new)
        bc1 = (1.0 - _LB.pow64(b1, t_new)).to(tl.float32)
    else:
        bc2 = tl.full([], 1.0, tl.float64)
        bc1 = tl.full([], 1.0, tl.float32)
    ibc1 = tl.math.div_rn(tl.full([], 1.0, tl.float32), bc1)
    isq2 = (1.0 / tl.sqrt(bc2)).to(tl.float32)  # fp64 sqrt and division: correctly rounded
    er2 = (_d(dp, LAMB.eps_root) * bc2).to(tl.float32)
    return (lam.to(tl.float32), (1.0 - lr * lam).to(tl.float32), b1.to(tl.float32),
            _d(dp, LAMB.beta3).to(tl.float32), b2.to(tl.float32), (1.0 - b2).to(tl.float32), ibc1, isq2, er2,
            _d(dp, LAMB.eps).to(tl.float32))  # fmt: skip


@triton.jit
def _lamb_elem32(c, wd_mode, w, g, m, v):
    """reference.lamb_update32 for fp32 ``w``, scaled ``g``, old ``m``, ``v``: ``(w_d, m_new, v_new, u)``,
    one IEEE fp32 operation at a time in the reference's order."""
    lam, wd_keep, b1, b3, b2, omb2, ibc1, isq2, er2, eps = c
    if wd_mode == LWD_L2:
        g = g + lam * w
    m = b1 * m + b3 * g
    v = b2 * v + omb2 * g * g
    u = tl.math.div_rn(m * ibc1, tl.math.sqrt_rn(v + er2) * isq2 + eps)
    if wd_mode == LWD_IN_UPDATE:
        u = u + lam * w
    if wd_mode == LWD_DECOUPLED:
        w = w * wd_keep
    return w, m, v, u


@triton.jit
def _lamb_lowbit_chunk(tile, offs, msk, c, gscale, fo, qmaps, PDT: tl.constexpr, MASTER: tl.constexpr,
                       STORE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One chunk's ``(w_d, m_new, v_new, u, grad as stored)`` from the weights, the grad and the stored moments
    (``qmaps = (signed map, unsigned map)``)."""
    row = _state_row(MASTER != 0)
    w = _weights32(tile, offs, msk, PDT, MASTER)
    gr = tl.load(_buf_ptr(tile, 1, PDT, False) + offs, mask=msk, other=0.0).to(tl.float32)
    m = _state_load32(tile, row, _scales_ptr(tile, row + 2, STORE), offs, msk, qmaps[0], STORE, BLOCK)
    v = _state_load32(tile, row + 1, _scales_ptr(tile, row + 3, STORE), offs, msk, qmaps[1], STORE, BLOCK)
    w_d, m, v, u = _lamb_elem32(c, fo[LAMB.wd_mode], w, gr * gscale, m, v)
    return w_d, m, v, u, gr


@triton.jit
def _lamb_lowbit_sums_tile(
    tile, lam32, kargs, opts, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, MODE: tl.constexpr, TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Launch 1's ``TILE_SUMS`` of low-bit LAMB (NOTE [Low-bit LAMB in the Triton kernels]): float64 sums of
    w_d^2, u^2 and g^2; ``MODE = (MASTER, STORE, BC)``, ``opts = (fp32 opts, dopts_ptr)``, ``kargs =
    (lr_ptr, inv_scale_ptr, clip_ptr, step_ptr, qmaps)``."""
    MASTER: tl.constexpr = MODE[0]
    STORE: tl.constexpr = MODE[1]
    BC: tl.constexpr = MODE[2]
    fo, dp = opts
    lr_ptr, inv_scale_ptr, clip_ptr, step_ptr, qmaps = kargs
    lr = tl.load(lr_ptr).to(tl.float64)
    gscale, inv, clip = _lamb_gscales(inv_scale_ptr, clip_ptr, fo)
    t_new = tl.load(step_ptr + tile[2]).to(tl.float64) + 1.0  # step[s] is written by launch 2
    c = _lamb_coef32(dp, lr, _lam64(lam32, _d(dp, LAMB.weight_decay)), t_new, BC)
    # Chunks of BLOCK // 2 (launch 1 stores nothing, so any chunk start is a whole element) and float64
    # accumulators of CH // 4 lanes, each adding 4 neighbouring squares per chunk: BLOCK-wide chunks with
    # [BLOCK] accumulators hold 3 x 8 doubles per thread (156 registers on sm_90, over the 128 of 4 CTAs
    # per SM). The g^2 row sums (g * inv_scale)^2 and divides the tile's sums by clip_coef^2 once: a
    # division per element would be the slow path of a float64 division; it moves ||g|| (reported, not in
    # the ratio) by ulps of a double, as the order of the sums does.
    CH: tl.constexpr = BLOCK // 2
    R: tl.constexpr = CH // 4
    acc_w, acc_u, acc_g = _zeros3(R)
    for k in range(0, TILE, CH):
        offs = k + tl.arange(0, CH)
        msk = offs < tile[4]
        w_d, _m, _v, u, gr = _lamb_lowbit_chunk(tile, offs, msk, c, gscale, fo, qmaps, PDT, MASTER, STORE, CH)
        g64 = gr.to(tl.float64) * inv
        wd64 = w_d.to(tl.float64)
        u64 = u.to(tl.float64)
        acc_w = _sum4(acc_w, wd64 * wd64, msk, R)
        acc_u = _sum4(acc_u, u64 * u64, msk, R)  # masked lanes: u may be 0/0
        acc_g = _sum4(acc_g, g64 * g64, msk, R)
    acc_g = acc_g / (clip * clip)
    return acc_w, acc_u, acc_g


@triton.jit
def lamb_lowbit_partials_kernel(
    addr_ptr, plan_ptr, work_ptr, count_ptr, step_ptr, has_ptr, lr_ptr, inv_scale_ptr, found_inf_ptr, clip_ptr,
    dopts_ptr, qmap_ptr, umap_ptr, opts, PDT: tl.constexpr, MASTER: tl.constexpr, STORE: tl.constexpr,
    BC: tl.constexpr, GEO: tl.constexpr,
):  # fmt: skip
    """Launch 1 of low-bit LAMB (NOTE [Low-bit LAMB in the Triton kernels]): per segment the float64 sums
    ``[w_d^2, u^2, g^2]`` into the float64 scratch ``work``; nothing else is stored."""
    bufs = (addr_ptr, plan_ptr, work_ptr, count_ptr, step_ptr, has_ptr, found_inf_ptr)
    kargs = (lr_ptr, inv_scale_ptr, clip_ptr, step_ptr, (qmap_ptr, umap_ptr))
    _partials_program(
        _lamb_lowbit_sums_tile, kargs, bufs, (opts, dopts_ptr), opts[LAMB.weight_decay], PDT, MASTER != 0,
        (MASTER, STORE, BC), GEO, False,
    )  # fmt: skip


@triton.jit
def _lamb_ratio64(ssq_w, ssq_u, ssq_g, lam32, adapt, t, lr32, opts):
    """reference.lamb_layer_scalars in float64 (a ``SEG_RATIO``): ``(r, lam, ||w_d||, ||g||, ||u||)`` from the
    float64 sums, the options as doubles; ``opts = (fp32 opts, dopts_ptr, lr_ptr)``."""
    fo, dp, lr_ptr = opts
    lr = tl.load(lr_ptr).to(tl.float64)
    n_w_raw = tl.sqrt(ssq_w.to(tl.float64))
    n_u = tl.sqrt(ssq_u.to(tl.float64))
    n_w = _clamp(n_w_raw, _d(dp, LAMB.clamp_lo), _d(dp, LAMB.clamp_hi))
    ratio = tl.where((n_w > 0) & (n_u > 0), n_w / (n_u + _d(dp, LAMB.trust_ratio_eps)), 1.0)
    clipped = _clip64(ratio, lr, fo[LAMB.trust_clip], dp, LAMB.clip_lo, LAMB.clip_hi)
    r = tl.where(adapt != 0, clipped, 1.0)
    return r, lam32, n_w_raw, tl.sqrt(ssq_g.to(tl.float64)), n_u


@triton.jit
def _lamb_lowbit_update_tile(
    tile, t, has, r, lam32, lr32, kargs, opts, PDT: tl.constexpr, HAS_MASTER: tl.constexpr, MODE: tl.constexpr,
    TILE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Launch 2's ``TILE_UPDATE`` of low-bit LAMB (NOTE [Low-bit LAMB in the Triton kernels]): ``k = fl32((lr *
    s) * r)`` (s = 1/(1 - b1^t) for first_outside, else 1), each element recomputed, w_d - k*u and the new
    moments stored; ``kargs = (inv_scale_ptr, clip_ptr, pidx_ptr, seed, qmaps, qmids)``."""
    MASTER: tl.constexpr = MODE[0]
    STORE: tl.constexpr = MODE[1]
    BC: tl.constexpr = MODE[2]
    fo, dp, lr_ptr = opts
    inv_scale_ptr, clip_ptr, pidx_ptr, seed, qmaps, qmids = kargs
    lr = tl.load(lr_ptr).to(tl.float64)
    gscale, _inv, _clip_ = _lamb_gscales(inv_scale_ptr, clip_ptr, fo)
    t_new = t.to(tl.float64) + 1.0
    c = _lamb_coef32(dp, lr, _lam64(lam32, _d(dp, LAMB.weight_decay)), t_new, BC)
    if BC == BC_FIRST_OUTSIDE:
        s = 1.0 / (1.0 - _LB.pow64(_d(dp, LAMB.beta1), t_new))
    else:
        s = tl.full([], 1.0, tl.float64)
    k32 = (lr * s * r.to(tl.float64)).to(tl.float32)
    sr = (seed, t_new.to(tl.int64), tl.load(pidx_ptr + tile[2]))
    row = _state_row(MASTER != 0)
    # chunks of BLOCK // 2 (4 elements per thread at the default geometry) where that is a whole number of
    # int8 quantization blocks (a chunk's rows are blocks: powers of two, so at least one), else BLOCK
    CH: tl.constexpr = BLOCK // 2 if QBLOCK <= BLOCK // 2 else BLOCK
    for k in range(0, TILE, CH):
        offs = k + tl.arange(0, CH)
        msk = offs < tile[4]
        w_d, m, v, u, _g = _lamb_lowbit_chunk(tile, offs, msk, c, gscale, fo, qmaps, PDT, MASTER, STORE, CH)
        _weights_store(tile, offs, msk, w_d - k32 * u, PDT, MASTER)
        _state_store(tile, row, _scales_ptr(tile, row + 2, STORE), k, offs, msk, m, qmids[0], sr, STORE, 0, 2, CH)
        _state_store(tile, row + 1, _scales_ptr(tile, row + 3, STORE), k, offs, msk, v, qmids[1], sr, STORE, 1, 2, CH)


@triton.jit
def lamb_lowbit_update_kernel(
    addr_ptr, plan_ptr, work_ptr, step_ptr, has_ptr, w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr, lr_ptr,
    inv_scale_ptr, found_inf_ptr, clip_ptr, dopts_ptr, pidx_ptr, seed, qmap_ptr, umap_ptr, qmid_ptr, umid_ptr, opts,
    PDT: tl.constexpr, MASTER: tl.constexpr, STORE: tl.constexpr, BC: tl.constexpr, GEO: tl.constexpr,
):  # fmt: skip
    """Launch 2 of low-bit LAMB (NOTE [Low-bit LAMB in the Triton kernels]): the trust ratio in float64 from
    the float64 sums in ``work``, the update per element in fp32, the new moments stored in bf16 by stochastic
    rounding or in int8 (``STORE`` 1: signed map and midpoints for exp_avg, unsigned ones for exp_avg_sq)."""
    bufs = (addr_ptr, plan_ptr, work_ptr, lr_ptr, found_inf_ptr)
    outs = (w_norm_ptr, g_norm_ptr, u_norm_ptr, ratio_ptr, has_ptr, step_ptr)
    kargs = (inv_scale_ptr, clip_ptr, pidx_ptr, seed, (qmap_ptr, umap_ptr), (qmid_ptr, umid_ptr))
    adapt_enabled = tl.where(opts[LAMB.adam] != 0, 0.0, opts[LAMB.adapt_enabled])
    _update_program(
        _lamb_ratio64, _lamb_lowbit_update_tile, kargs, bufs, outs, (opts, dopts_ptr, lr_ptr),
        opts[LAMB.weight_decay], adapt_enabled, PDT, MASTER != 0, (MASTER, STORE, BC), GEO,
    )  # fmt: skip
