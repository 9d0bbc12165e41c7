"""Triton backend: LARS / TVLARS / LAMB over a bucket of the user's tensors in two launches per step.

Same math as :mod:`fusedlars.backends.reference` (which states the formulas), in fp32
(the state dtype of fp32 / fp16 / bf16 buckets). Kernels: :mod:`.triton_kernels`. Params and
grads stay the user's tensors: the kernels reach every segment's param, grad, fp32 master and
state buffers through the bucket's int64 address table (:meth:`Bucket.address_table`, rows
param, grad, [master], state names), so a grad that is a view at any offset of a larger tensor
(DDP's ``gradient_as_bucket_view``), a freshly allocated one or an FSDP2 local shard is read
where it lies, never copied. A segment without a grad this step (address 0) is not touched.

Per bucket and step, whatever the number of layers:

* LARS: launch 1 ``lars_partials_kernel`` (per tile: sum w^2, g^2, (g+lam*w)^2; the last
  tile program of a segment to finish reduces the segment's partials in a fixed order),
  launch 2 ``lars_update_kernel`` (per tile: the segment's three sums, trust ratio,
  momentum, store). 2 launches.
* LAMB: launch 1 ``lamb_moments_kernel`` (new m, v stored; per tile sum w_d^2, u^2, g^2;
  per segment reduced as for LARS), launch 2 ``lamb_update_kernel`` (ratio, u recomputed
  from m, v, store). 2 launches, plus one ``grad_sumsq_kernel`` launch before them when
  ``max_grad_norm`` is set (its fp64 per-tile partials summed by one ``torch.sum``).

FSDP2 / DTensor buckets: ``lars_partials`` / ``lamb_partials`` are launch 1 and return the
per-segment sums ``[3, S]``; ``lars_apply`` / ``lamb_apply`` are launch 2 from sums the caller
has all-reduced (NOTE [Triton partials and apply]). ``*_step`` is exactly apply(partials).

Bytes per parameter, fp32 params with momentum: LARS 8 (launch 1 reads w, g) + 20 (launch 2
reads w, g, b and writes b, w) = 28; LAMB 24 (reads w, g, m, v, writes m, v) + 16 (reads w, m, v,
writes w) = 40, plus 4 for ``grad_sumsq`` when ``max_grad_norm`` is set. Per tile on top of that:
launch 1 writes 3 fp32 partials and does one int32 atomic on its segment's arrival counter, the
segment's reduction reads each partial once, launch 2 reads the segment's 3 sums, and each tile
program loads its segment's 2-5 base addresses: about 80 B per tile of TILE=4096 elements
(0.02 B/param). Full tiles of 16-byte-aligned buffers use 128-bit accesses (NOTE [Vector path]).

Reduction cost: linear, every tile's partials are read exactly once per step at any layer size
(``fusedlars._testing.launch_plan`` computes the reads; tests check it against loads counted in the interpreter and
require at most 1.1x the number of tiles for a 1e9-element layer). The previous design re-reduced
a segment's partials in every tile program of launch 2, tiles^2 reads per segment: at 40M elements
12 B x 9766 tiles per 4096-element tile, as many bytes again as the step itself moves. A
segment's reduction runs in one program, at the end of launch 1: ``cdiv(tiles, RBLOCK)``
dependent iterations of three RBLOCK-wide loads of L2-resident partials (20 for a 40M-element
layer, 477 for 1e9 elements: a serial tail of roughly 0.2-0.5 ms, estimated, not measured, where
the step itself streams 28 GB). It is order-independent: which program reduces depends on
scheduling, the order of the sum does not (NOTE [Last-arriving program] in the kernels).

Per-step values never cause a host sync: ``lr`` is a 1-element tensor (a Python float lr
is written into a cached device tensor with ``fill_`` only when it changes), GradScaler's
``inv_scale`` / ``found_inf`` and LAMB's ``clip_coef`` are passed as pointers (constant
1 / 0 tensors when absent). Every launch goes through :func:`_launch` (tests count the
launches there, and in the interpreter run each launch's programs reversed or shuffled:
``fusedlars._testing.PROGRAM_ORDER``) and is registered as a ``torch.library`` op (``triton_op`` +
``wrap_triton``), so ``torch.compile`` can trace a step.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..buckets import Bucket
from .codes import BIAS, CLIP, DENOMINATOR, LAMB_WD, LARS_WD, ZERO_CHECK, triton_mom
from .config import FUSED_DTYPES, CachedScalar, LambConfig, LarsConfig, check_kind, check_scalars

NAME = "triton"

try:
    import triton

    from . import triton_kernels as K

    _IMPORT_ERROR: Exception | None = None
except Exception as e:  # triton missing or broken: reported by available()
    triton = None  # type: ignore[assignment]
    K = None  # type: ignore[assignment]
    _IMPORT_ERROR = e

#: Tile geometry. TILE elements per tile (and per program), BLOCK the vector width of the
#: inner loop, RBLOCK the chunk of partials a segment's reduction loads at once, SBLOCK
#: segments per segment-program. Tests may lower TILE / RBLOCK to exercise multi-tile segments.
TILE = 4096
BLOCK = 1024
RBLOCK = 512  # 1024 would raise lamb_moments_kernel from <= 96 to 118 registers (sm_80/90/100)
SBLOCK = 256
NUM_WARPS = 4


def _interpreting() -> bool:
    return K is not None and K.INTERPRET


def available() -> tuple[bool, str]:
    if _IMPORT_ERROR is not None:
        return False, f"triton is not importable ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR})"
    env = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if K.INTERPRET:
        return True, (
            f"Triton {triton.__version__} in interpreter mode (TRITON_INTERPRET=1 when the kernels were imported): "
            "runs on CPU tensors, slowly; meant for tests"
        )
    if torch.cuda.is_available():
        return True, f"Triton {triton.__version__} on CUDA ({torch.cuda.get_device_name()})"
    if env:
        return False, (
            "TRITON_INTERPRET=1 was set after fusedlars' Triton kernels were imported; set it before importing fusedlars"
        )
    return (
        False,
        f"Triton {triton.__version__} is installed but no CUDA device is available and TRITON_INTERPRET is not set",
    )


def supports(kind: str, cfg, bucket: Bucket) -> str | None:
    """None when this backend fuses the configuration for ``bucket``, else the reason."""
    ok, why = available()
    if not ok:
        return why
    why = bucket.fused_unsupported()  # low-bit state, remainder masters (issue #26): torch backend for now
    if why:
        return why
    if bucket.dtype not in FUSED_DTYPES:
        return (
            f"{bucket.dtype} buckets are not fused by the Triton backend (its kernels compute in fp32 and take "
            "fp32 hyper-parameters)"
        )
    dev = bucket.device.type
    if dev == "cpu" and not _interpreting():
        return "the bucket is on CPU; Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
    if dev not in ("cpu", "cuda"):
        return f"the bucket is on {dev}; the Triton backend launches on CUDA devices"
    if dev == "cuda" and _interpreting():
        return "Triton is in interpreter mode (TRITON_INTERPRET=1): it runs on CPU tensors only here"
    return check_scalars(cfg, bucket.device) or check_kind(kind)


#: the weights' norms are read at every step (NOTE [Carried weight norms] is the cpu backend's)
CARRIES_WEIGHT_NORMS = False

#: LARS's step from gradient norms taken in backward (fusedlars.backward_norms): not fused here yet
#: (it needs a pass over the weights alone); the step takes the norms itself
lars_step_given_grad_sums = None


# ------------------------------------------------------------------------------------------
# per-bucket cached device tensors
# ------------------------------------------------------------------------------------------
class _Scratch:
    def __init__(self, bucket: Bucket, tile: int) -> None:
        dev = bucket.device
        self.tiles = bucket.tiles(tile)
        T, S = self.tiles.num_tiles, bucket.num_segments
        self.part = torch.zeros(3 * max(T, 1), dtype=torch.float32, device=dev)
        self.snap = torch.zeros(2 * max(S, 1), dtype=torch.float32, device=dev)
        self.ssq = torch.zeros(3 * max(S, 1), dtype=torch.float32, device=dev)  # per-segment sums, launch 1 -> 2
        self.count = torch.zeros(max(S, 1), dtype=torch.int32, device=dev)  # arrivals per segment, 0 between steps
        self.gpart = torch.zeros(max(T, 1), dtype=torch.float64, device=dev)
        self.one = torch.ones(1, dtype=torch.float32, device=dev)
        self.zero = torch.zeros(1, dtype=torch.float32, device=dev)
        self.lr = CachedScalar(dev, torch.float32)  # a float lr
        self.clip = CachedScalar(dev, torch.float32)  # a float clip_coef


def _scratch(bucket: Bucket) -> _Scratch:
    cache = bucket.cache.setdefault(NAME, {})
    sc = cache.get(TILE)
    if sc is None:
        sc = cache[TILE] = _Scratch(bucket, TILE)
    return sc


def _kinds(bucket: Bucket) -> tuple[str, ...]:
    """The address-table rows the kernels read, in their order (see :mod:`.triton_kernels`): param, grad,
    master (only for a bucket with fp32 masters), then the bucket's state buffers."""
    return ("param", "grad") + (("master",) if bucket.uses_masters else ()) + tuple(bucket.state_names)


def _addresses(bucket: Bucket) -> torch.Tensor:
    """This step's int64 ``[rows, S]`` address table (a cached device tensor, rewritten only when an address moved).

    NOTE: [Addresses in a compiled step] Eager steps take the table from :meth:`Bucket.address_table`.
    A compiled step cannot: dynamo does not trace ``data_ptr()``, and the grads of a compiled step are
    graph inputs (a new tensor each step after ``zero_grad()``) whose addresses exist only at run time.
    It uses a table of its own (allocated by :func:`prepare` in the eager prelude, marked static),
    refreshed by the opaque op ``fusedlars::triton_addresses`` from the tensors themselves before the
    kernels' ops that read it. Its own: the op and ``Bucket.address_table`` each skip the copy when the
    addresses equal the ones *they* wrote last, so sharing one table between eager and compiled steps
    could leave stale addresses in it."""
    kinds = _kinds(bucket)
    if torch.compiler.is_compiling():
        table = bucket.cache.setdefault(NAME, {}).get(("traced_addr", kinds))
        if table is None:
            raise RuntimeError("triton backend: a compiled step needs prepare(bucket) in its eager prelude")
        _op("triton_addresses")(table, [t for k in kinds for t in bucket.tensors_of(k)])
        return table
    return bucket.address_table(kinds)


def _traced_table(bucket: Bucket) -> torch.Tensor:
    """The address table of compiled steps (NOTE [Addresses in a compiled step]), allocated once."""
    kinds = _kinds(bucket)
    cache = bucket.cache.setdefault(NAME, {})
    table = cache.get(("traced_addr", kinds))
    if table is None:
        table = cache[("traced_addr", kinds)] = torch.zeros(
            (len(kinds), bucket.num_segments), dtype=torch.int64, device=bucket.device
        )
    return table


#: param dtype codes of the ops (a torch.library schema cannot carry a tl.dtype) -> the kernels' PDT
_PDT_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _pdt(code: int):
    return (K.tl.float32, K.tl.float16, K.tl.bfloat16)[code]


def prepare(bucket: Bucket, kind: str) -> list[torch.Tensor]:
    """Allocate the bucket's tables and scratch now (not inside a compiled graph); returns them."""
    sc = _scratch(bucket)
    t = sc.tiles
    return [t.tile_seg, t.tile_len, t.seg_tile_ptr, sc.part, sc.snap, sc.ssq, sc.count, sc.gpart, sc.one, sc.zero,
            _traced_table(bucket)]  # fmt: skip


def _lr_tensor(sc: _Scratch, lr) -> torch.Tensor:
    if isinstance(lr, torch.Tensor):
        # one kernel specialization (fp32 lr pointer); a device-side cast, no host sync
        return lr.reshape(-1) if lr.dtype == torch.float32 else lr.reshape(-1).to(torch.float32)
    return sc.lr(lr)


def _t(x: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    return default if x is None else x.reshape(-1)


# ------------------------------------------------------------------------------------------
# launching: every launch goes through _launch (tests count them)
# ------------------------------------------------------------------------------------------
try:
    from torch.library import triton_op as _triton_op
    from torch.library import wrap_triton as _wrap_triton
except ImportError:  # older torch: plain custom ops (opaque to torch.compile)
    _triton_op = None
    _wrap_triton = None


def _traceable() -> bool:
    # wrap_triton traces compiled JIT kernels; interpreted ones are registered as opaque ops instead
    return _triton_op is not None and not _interpreting()


def _launch(kernel, grid: int, *args, **constexprs) -> None:
    """Launch ``kernel`` on a 1-D grid of ``grid`` programs (every launch of the backend passes here)."""
    if grid == 0:
        return
    k = _wrap_triton(kernel) if _traceable() else kernel
    k[(grid,)](*args, num_warps=NUM_WARPS, **constexprs)


@contextlib.contextmanager
def _rearm_on_error(count: torch.Tensor):
    """Zero the segments' arrival counters if a launch raises: an interrupted launch 1 (possible in the
    interpreter) leaves some arrivals counted, and the next step's last-arriving program would not
    recognise itself. On success launch 1 leaves every counter at 0 by itself."""
    try:
        yield
    except BaseException:
        count.zero_()
        raise


def _register(name: str, mutates: tuple[str, ...]):
    """A torch.library op: ``triton_op`` (torch.compile sees the kernels) or, in the interpreter or on an
    older torch, an opaque ``custom_op`` with a fake implementation (the ops only mutate their inputs)."""

    def deco(fn):
        if _IMPORT_ERROR is not None:
            return fn
        if _traceable():
            return _triton_op(f"fusedlars::{name}", mutates_args=mutates)(fn)
        op = torch.library.custom_op(f"fusedlars::{name}", mutates_args=mutates)(fn)
        op.register_fake(lambda *a, **k: None)
        return op

    return deco


T_ = torch.Tensor

# NOTE: [Ops and raw addresses] One torch.library op per launch. The kernels write params, masters
# and state through the address table ``addr``, which these schemas cannot name: an op declares only
# the bucket tables and scratch it mutates. Eager and interpreted steps are unaffected; a compiled
# graph that also reads params after the step must not rely on the op's schema to order the reads.


def _constexprs(pdt: int, has_master: bool, mode_name: str | None, mode: int, **geometry) -> dict:
    """The constexprs of a launch: the param dtype, masters, the kind's mode (``MOM`` / ``BC``, or none)
    and the tile geometry."""
    cx = dict(PDT=_pdt(pdt), HAS_MASTER=has_master)
    if mode_name is not None:
        cx[mode_name] = mode
    return dict(cx, **geometry)


# NOTE: [One launch sequence] Both kinds launch through the same two op bodies, as the kernels run the
# same two skeletons (NOTE [One skeleton] in the kernels): launch 1 (``_partials_op``) and launch 2
# (``_update_op``) take the bucket tables, scratch and geometry in one order for both kinds, and a kind
# adds only its kernel, its per-step scalar tensors (``scalars``), hyper-parameters (``fvals``, then
# ``ivals``: the kernel's argument order) and its mode constexpr. One op is still registered per kind
# and launch (``fusedlars::triton_lars_partials`` ...): the op names and the 2 launches per step are
# what tests and traces see. (The mode argument is ``mode_code``: an op argument named ``mode`` collides
# with the ``mode`` keyword torch.compile's dispatch passes along.)
def _partials_op(name: str, kernel: str, mode_name: str | None):
    """Register launch 1 of a kind as op ``fusedlars::<name>``: ``K.<kernel>`` over the tiles and the
    segment programs; the arrival counters are re-armed if the launch raises."""

    @_register(name, ("part", "snap", "ssq", "count"))
    def op(
        addr: T_,
        wd_mask: T_,
        active: T_,
        step: T_,
        has_state: T_,
        scalars: list[T_],
        part: T_,
        snap: T_,
        ssq: T_,
        count: T_,
        tile_seg: T_,
        tile_len: T_,
        seg_tile_ptr: T_,
        num_tiles: int,
        num_segs: int,
        fvals: list[float],
        ivals: list[int],
        pdt: int,
        has_master: bool,
        mode_code: int,
        tile: int,
        block: int,
        rblock: int,
        sblock: int,
    ) -> None:
        with _rearm_on_error(count):
            _launch(
                getattr(K, kernel),
                num_tiles + triton.cdiv(num_segs, sblock),
                addr,
                wd_mask,
                active,
                step,
                has_state,
                *scalars,
                part,
                snap,
                ssq,
                count,
                tile_seg,
                tile_len,
                seg_tile_ptr,
                num_tiles,
                num_segs,
                *fvals,
                *ivals,
                **_constexprs(
                    pdt, has_master, mode_name, mode_code, TILE=tile, BLOCK=block, RBLOCK=rblock, SBLOCK=sblock
                ),
            )

    return op


def _update_op(name: str, kernel: str, mode_name: str):
    """Register launch 2 of a kind as op ``fusedlars::<name>``: ``K.<kernel>`` over the tiles and the
    segment programs."""

    @_register(name, ("step", "has_state", "w_norm", "g_norm", "u_norm", "trust_ratio"))
    def op(
        addr: T_,
        wd_mask: T_,
        adapt_mask: T_,
        active: T_,
        seg_numel: T_,
        step: T_,
        has_state: T_,
        w_norm: T_,
        g_norm: T_,
        u_norm: T_,
        trust_ratio: T_,
        scalars: list[T_],
        ssq: T_,
        snap: T_,
        tile_seg: T_,
        tile_len: T_,
        seg_tile_ptr: T_,
        num_tiles: int,
        num_segs: int,
        fvals: list[float],
        ivals: list[int],
        pdt: int,
        has_master: bool,
        mode_code: int,
        tile: int,
        block: int,
        sblock: int,
    ) -> None:
        _launch(
            getattr(K, kernel),
            num_tiles + triton.cdiv(num_segs, sblock),
            addr,
            wd_mask,
            adapt_mask,
            active,
            seg_numel,
            step,
            has_state,
            w_norm,
            g_norm,
            u_norm,
            trust_ratio,
            *scalars,
            ssq,
            snap,
            tile_seg,
            tile_len,
            seg_tile_ptr,
            num_tiles,
            num_segs,
            *fvals,
            *ivals,
            **_constexprs(pdt, has_master, mode_name, mode_code, TILE=tile, BLOCK=block, SBLOCK=sblock),
        )

    return op


_partials_op("triton_lars_partials", "lars_partials_kernel", None)
_update_op("triton_lars_update", "lars_update_kernel", "MOM")
_partials_op("triton_lamb_partials", "lamb_moments_kernel", "BC")
_update_op("triton_lamb_update", "lamb_update_kernel", "BC")


@_register("triton_grad_sumsq", ("part",))
def _grad_sumsq_op(
    addr: T_,
    active: T_,
    inv_scale: T_,
    part: T_,
    tile_seg: T_,
    tile_len: T_,
    seg_tile_ptr: T_,
    num_tiles: int,
    num_segs: int,
    pdt: int,
    tile: int,
    block: int,
) -> None:
    _launch(
        K.grad_sumsq_kernel,
        num_tiles,
        addr,
        active,
        inv_scale,
        part,
        tile_seg,
        tile_len,
        seg_tile_ptr,
        num_segs,
        PDT=_pdt(pdt),
        TILE=tile,
        BLOCK=block,
    )


_seen_addresses: dict[int, tuple[int, ...]] = {}  # table data_ptr -> the addresses it holds


def _addresses_op(table: T_, tensors: list[T_ | None]) -> None:
    """Write the base addresses of ``tensors`` (row-major ``[rows, S]``, 0 for None) into ``table``,
    copying only when they changed (NOTE [Addresses in a compiled step])."""
    ptrs = tuple(0 if t is None else t.data_ptr() for t in tensors)
    if _seen_addresses.get(table.data_ptr()) != ptrs:
        table.copy_(torch.tensor(ptrs, dtype=torch.int64).view(table.shape))
        _seen_addresses[table.data_ptr()] = ptrs


if _IMPORT_ERROR is None:
    # always opaque (never traced): its body reads data_ptr()s
    _addresses_op = torch.library.custom_op("fusedlars::triton_addresses", mutates_args=("table",))(_addresses_op)
    _addresses_op.register_fake(lambda table, tensors: None)


def _op(name: str):
    return getattr(torch.ops.fusedlars, name) if _IMPORT_ERROR is None else None


# ------------------------------------------------------------------------------------------
# the backend contract
# ------------------------------------------------------------------------------------------
def _check(kind: str, cfg, bucket: Bucket) -> None:
    why = supports(kind, cfg, bucket)
    if why:
        raise RuntimeError(f"{kind}: backend='triton' cannot run this bucket: {why}.")


def _sums_for_apply(bucket: Bucket, ssq: torch.Tensor) -> torch.Tensor:
    """``ssq`` as launch 2 reads it: a contiguous fp32 ``[3, S]`` on the bucket's device (a no-op for
    launch 1's own buffer and for an all-reduced fp32 one)."""
    S = bucket.num_segments
    if tuple(ssq.shape) != (3, S):
        raise ValueError(f"ssq must have shape (3, {S}) (per-segment sums of squares), got {tuple(ssq.shape)}")
    return ssq.to(device=bucket.device, dtype=torch.float32).contiguous()


# NOTE: [Triton partials and apply] The FSDP2 split of NOTE [Partials and apply] (kernels/torch.py)
# is the step's own two launches: ``*_partials`` is launch 1 (it returns launch 1's per-segment sums,
# a view of the bucket's scratch, valid until the bucket's next launch 1; LAMB's launch 1 has already
# updated the moments), ``*_apply`` is launch 2 reading the sums it is given. ``*_step`` calls the
# same two ops with launch 1's own buffer: 2 launches, bitwise equal to apply(partials). Launch 2
# also reads the step/has_state snapshot launch 1 took, so apply must follow its bucket's partials.


def _partials(
    bucket: Bucket, op: str, scalars: list, fvals: list, ivals: list, mode: int
) -> tuple[torch.Tensor, tuple]:
    """Launch 1 of either kind through op ``op`` (NOTE [One launch sequence]): the per-segment sums as an
    fp32 ``[3, S]`` view of the bucket's scratch, and the context launch 2 needs (this step's address table)."""
    sc = _scratch(bucket)
    tt = sc.tiles
    S = bucket.num_segments
    addr = _addresses(bucket)
    _op(op)(
        addr,
        bucket.wd_mask,
        bucket.active,
        bucket.step,
        bucket.has_state,
        scalars,
        sc.part,
        sc.snap,
        sc.ssq,
        sc.count,
        tt.tile_seg,
        tt.tile_len,
        tt.seg_tile_ptr,
        tt.num_tiles,
        S,
        fvals,
        ivals,
        _PDT_CODE[bucket.dtype],
        bucket.uses_masters,
        mode,
        TILE,
        BLOCK,
        RBLOCK,
        SBLOCK,
    )
    return sc.ssq[: 3 * S].view(3, S), (addr,)


def _apply(
    bucket: Bucket, op: str, ssq: torch.Tensor, ctx: tuple, scalars: list, fvals: list, ivals: list, mode: int
) -> None:
    """Launch 2 of either kind through op ``op`` from the per-segment sums ``ssq`` (launch 1's or summed over
    ranks) and launch 1's context."""
    (addr,) = ctx
    sc = _scratch(bucket)
    tt = sc.tiles
    _op(op)(
        addr,
        bucket.wd_mask,
        bucket.adapt_mask,
        bucket.active,
        bucket.seg_numel,
        bucket.step,
        bucket.has_state,
        bucket.w_norm,
        bucket.g_norm,
        bucket.u_norm,
        bucket.trust_ratio,
        scalars,
        _sums_for_apply(bucket, ssq),
        sc.snap,
        tt.tile_seg,
        tt.tile_len,
        tt.seg_tile_ptr,
        tt.num_tiles,
        bucket.num_segments,
        fvals,
        ivals,
        _PDT_CODE[bucket.dtype],
        bucket.uses_masters,
        mode,
        TILE,
        BLOCK,
        SBLOCK,
    )


def _lars_values(cfg: LarsConfig) -> tuple[list[float], list[int], int]:
    """(fp32 hyper-parameters, int modes, MOM) of launch 2, in the kernel's argument order."""
    mom_mode = triton_mom(cfg.momentum, cfg.momentum_mode)
    tv = cfg.tv or (0.0, 0.0, 0.0, 0.0, 0)
    fvals = [
        float(cfg.weight_decay),
        -1.0 if cfg.maximize else 1.0,
        float(cfg.eta),
        float(cfg.eps),
        float(cfg.clamp_lo),
        float(cfg.clamp_hi),
        float(cfg.clip_lo),
        float(cfg.clip_hi),
        float(cfg.momentum),
        float(cfg.dampening),
        float(tv[0]),
        float(tv[1]),
        float(tv[2]),
        float(tv[3]),
    ]
    # runtime mode codes of the kernels: those of the C++ option structs (.codes); zero_skip, clone_first: 0/1 flags
    ivals = [
        int(tv[4]),
        DENOMINATOR[cfg.denominator],
        LARS_WD[cfg.weight_decay_mode],
        ZERO_CHECK[cfg.zero_norm_check],
        int(cfg.zero_norm == "skip"),
        CLIP[cfg.trust_clip],
        int(bool(cfg.adapt_enabled)),
        int(cfg.tv is not None),
        int(bool(cfg.nesterov)),
        int(cfg.first_step_buffer == "clone"),
    ]
    return fvals, ivals, mom_mode


def lars_partials(bucket: Bucket, cfg: LarsConfig) -> tuple[torch.Tensor, tuple]:
    """Launch 1: per-segment sums of squares ``[w², g², (g+λw)²]`` (g = grad * inv_scale, signed for
    ``maximize``; w the fp32 master when there is one) as an fp32 ``[3, S]`` tensor (0 for segments
    without a grad), and the step's context. Changes nothing the user or ``state`` sees."""
    _check("LARS", cfg, bucket)
    if (cfg.momentum != 0) != ("momentum_buffer" in bucket.state_names):
        raise RuntimeError(f"LARS: momentum={cfg.momentum} but the bucket's state is {bucket.state_names}")
    sc = _scratch(bucket)
    scalars = [_t(cfg.inv_scale, sc.one), _t(cfg.found_inf, sc.zero)]
    fvals = [float(cfg.weight_decay), -1.0 if cfg.maximize else 1.0]
    return _partials(bucket, "triton_lars_partials", scalars, fvals, [], 0)


def lars_apply(bucket: Bucket, cfg: LarsConfig, ssq: torch.Tensor, ctx: tuple) -> None:
    """Launch 2: the LARS update from the per-segment sums ``ssq`` (``[3, S]``, as :func:`lars_partials`
    returns them, or summed over the ranks of a sharded bucket)."""
    sc = _scratch(bucket)
    scalars = [_lr_tensor(sc, cfg.lr), _t(cfg.inv_scale, sc.one), _t(cfg.found_inf, sc.zero)]
    fvals, ivals, mom_mode = _lars_values(cfg)
    _apply(bucket, "triton_lars_update", ssq, ctx, scalars, fvals, ivals, mom_mode)


def lars_step(bucket: Bucket, cfg: LarsConfig) -> None:
    """One LARS step: :func:`lars_partials` then :func:`lars_apply` on launch 1's own sums (2 launches)."""
    ssq, ctx = lars_partials(bucket, cfg)
    lars_apply(bucket, cfg, ssq, ctx)


def lamb_partials(bucket: Bucket, cfg: LambConfig) -> tuple[torch.Tensor, tuple]:
    """Launch 1: the new moments m, v (stored: they do not depend on the norms) and the per-segment
    sums of squares ``[w_d², u², g²]`` (w_d the weights after decoupled decay, u the Adam direction
    plus in-update decay, g = grad * inv_scale / clip_coef before L2 decay) as an fp32 ``[3, S]``
    tensor (0 for segments without a grad), and the step's context."""
    _check("LAMB", cfg, bucket)
    sc = _scratch(bucket)
    clip = cfg.clip_coef
    if clip is not None and not isinstance(clip, torch.Tensor):
        clip = sc.clip(clip)
    scalars = [_lr_tensor(sc, cfg.lr), _t(cfg.inv_scale, sc.one), _t(cfg.found_inf, sc.zero), _t(clip, sc.one)]
    fvals = [
        float(cfg.weight_decay),
        -1.0 if cfg.maximize else 1.0,
        float(cfg.beta1),
        float(cfg.beta2),
        float(cfg.beta3),
        1.0 - float(cfg.beta1),
        1.0 - float(cfg.beta2),
        float(cfg.eps),
        float(cfg.eps_root),
    ]
    ivals = [LAMB_WD[cfg.weight_decay_mode]]
    return _partials(bucket, "triton_lamb_partials", scalars, fvals, ivals, BIAS[cfg.bias_correction])


def lamb_apply(bucket: Bucket, cfg: LambConfig, ssq: torch.Tensor, ctx: tuple) -> None:
    """Launch 2: trust ratio from the per-segment sums ``ssq`` (``[3, S]``, as :func:`lamb_partials`
    returns them, or summed over ranks) and w <- w_d - lr * ratio * u (u recomputed from m, v)."""
    sc = _scratch(bucket)
    scalars = [_lr_tensor(sc, cfg.lr), _t(cfg.found_inf, sc.zero)]
    fvals = [
        float(cfg.weight_decay),
        1.0 - float(cfg.beta1),
        1.0 - float(cfg.beta2),
        float(cfg.eps),
        float(cfg.eps_root),
        float(cfg.clamp_lo),
        float(cfg.clamp_hi),
        float(cfg.clip_lo),
        float(cfg.clip_hi),
        float(cfg.trust_ratio_eps),
    ]
    ivals = [LAMB_WD[cfg.weight_decay_mode], CLIP[cfg.trust_clip], int(bool(cfg.adapt_enabled) and not cfg.adam)]
    _apply(bucket, "triton_lamb_update", ssq, ctx, scalars, fvals, ivals, BIAS[cfg.bias_correction])


def lamb_step(bucket: Bucket, cfg: LambConfig) -> None:
    """One LAMB step: :func:`lamb_partials` then :func:`lamb_apply` on launch 1's own sums (2 launches)."""
    ssq, ctx = lamb_partials(bucket, cfg)
    lamb_apply(bucket, cfg, ssq, ctx)


def grad_sumsq(bucket: Bucket, cfg) -> torch.Tensor:
    """Sum over active segments of ||grad * inv_scale||^2 (float64 scalar): one launch + a fixed-order sum."""
    _check("LAMB", cfg, bucket)
    sc = _scratch(bucket)
    tt = sc.tiles
    if tt.num_tiles == 0:
        return torch.zeros((), dtype=torch.float64, device=bucket.device)
    _op("triton_grad_sumsq")(
        _addresses(bucket),
        bucket.active,
        _t(cfg.inv_scale, sc.one),
        sc.gpart,
        tt.tile_seg,
        tt.tile_len,
        tt.seg_tile_ptr,
        tt.num_tiles,
        bucket.num_segments,
        _PDT_CODE[bucket.dtype],
        TILE,
        BLOCK,
    )
    return sc.gpart[: tt.num_tiles].sum()
