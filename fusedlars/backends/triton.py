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

LARS from gradient sums taken in backward (issue #25, fusedlars.backward_norms):
``lars_step_given_grad_sums`` runs launch 1 as ``lars_wsums_kernel`` (sums w^2 alone, reads no grad;
g^2 from the given float64 sums times inv_scale^2) and launch 2 as above: 2 launches, 8 B/param fewer
(fp32 params with momentum: 4 + 20 = 24). ``lars_partials_given_grad_sums`` is its launch 1 for sharded
buckets. NOTE [Given gradient sums] in the kernels.

Low-bit state (issue #26): LARS / TVLARS with bf16, int8 or fp32 momentum and/or remainder masters run
``lars_lowbit_partials_kernel`` and ``lars_lowbit_update_kernel``, LAMB ``lamb_lowbit_partials_kernel`` and
``lamb_lowbit_update_kernel`` (2 launches each; norms summed in float64 into a float64 scratch, element math
in fp32, uncontracted: NOTE [Low-bit LARS in the Triton kernels], NOTE [Low-bit LAMB in the Triton kernels]).
int8 state is quantized per 256-element block as one row of a chunk (TILE and BLOCK are multiples of it).
``supports()`` refuses, with the reason, sharded buckets and a geometry not in whole blocks.

FSDP2 / DTensor buckets: ``lars_partials`` / ``lamb_partials`` are launch 1 and return the
per-segment sums ``[3, S]``; ``lars_apply`` / ``lamb_apply`` are launch 2 from sums the caller
has all-reduced (NOTE [Triton partials and apply]). ``*_step`` is exactly apply(partials).

Bytes per parameter, fp32 params with momentum: LARS 8 (launch 1 reads w, g) + 20 (launch 2
reads w, g, b and writes b, w) = 28; LAMB 24 (reads w, g, m, v, writes m, v) + 16 (reads w, m, v,
writes w) = 40, plus 4 for ``grad_sumsq`` when ``max_grad_norm`` is set. Per tile on top of that:
launch 1 writes 3 fp32 partials and does one int32 atomic on its segment's arrival counter, the
segment's reduction reads each partial once, launch 2 reads the segment's 3 sums, and each tile
program loads its segment's 2-5 base addresses: about 80 B per tile of TILE=4096 elements
(0.02 B/param), plus a few entries of the plan table (the same 8-byte words in every program:
cache hits). Full tiles of 16-byte-aligned buffers use 128-bit accesses (NOTE [Vector path]).

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
from . import lowbit, lowbit_state, option_fields
from .codes import BIAS, triton_mom
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
    why = _lowbit_unsupported(kind, cfg, bucket)
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
    tv = getattr(cfg, "tv", None)
    if tv is not None and tv[4] >= option_fields.FP32_EXACT_INT:  # NOTE [Triton modes are fp32]
        return f"a TVLARS gate of {tv[4]} steps is not exact in the Triton kernels' fp32 options (below 2**24 is)"
    return check_scalars(cfg, bucket.device) or check_kind(kind)


def _lowbit_unsupported(kind: str, cfg, bucket: Bucket) -> str | None:
    """Why the low-bit LARS kernels (NOTE [Low-bit LARS in the Triton kernels]) cannot step ``bucket``, or None
    (also None for a bucket that is not low-bit)."""
    if not bucket.exact_elements:
        return None
    tail = ": the torch and reference backends step it (backend='auto' picks torch)"
    if bucket.shard is not None and bucket.shard.shard_dims:
        return "sharded buckets with low-bit state or remainder masters are not fused by the Triton backend" + tail
    if bucket.state_storage == "int8" and (TILE % lowbit.QBLOCK or BLOCK % lowbit.QBLOCK):
        return (
            f"int8 state needs the Triton tile geometry in whole {lowbit.QBLOCK}-element quantization blocks "
            f"(TILE={TILE}, BLOCK={BLOCK})" + tail
        )
    return None


#: the weights' norms are read at every step (NOTE [Carried weight norms] is the cpu backend's)
CARRIES_WEIGHT_NORMS = False


# ------------------------------------------------------------------------------------------
# per-bucket cached device tensors
# ------------------------------------------------------------------------------------------
class _Scratch:
    """The bucket's launch-1 scratch and per-step constants for one tile geometry. ``work`` holds the tile
    partials ``[3, T]`` at 0, the per-segment sums ``ssq`` ``[3, S]`` at ``ssq_at`` and the step / has_state
    snapshot ``[2, S]`` at ``snap_at`` (offsets multiples of 4: each region 16-byte aligned)."""

    def __init__(self, bucket: Bucket, tile: int) -> None:
        dev = bucket.device
        self.tiles = bucket.tiles(tile)
        T, S = max(self.tiles.num_tiles, 1), max(bucket.num_segments, 1)
        self.ssq_at = _round4(3 * T)
        self.snap_at = self.ssq_at + _round4(3 * S)
        self.work = torch.zeros(self.snap_at + 2 * S, dtype=torch.float32, device=dev)
        self.part = self.work[: 3 * self.tiles.num_tiles]  # the tile partials, a view
        self.count = torch.zeros(S, dtype=torch.int32, device=dev)  # arrivals per segment, 0 between steps
        self.gpart = torch.zeros(T, dtype=torch.float64, device=dev)
        self.one = torch.ones(1, dtype=torch.float32, device=dev)
        self.zero = torch.zeros(1, dtype=torch.float32, device=dev)
        self.lr = CachedScalar(dev, torch.float32)  # a float lr
        self.clip = CachedScalar(dev, torch.float32)  # a float clip_coef
        self.plan: torch.Tensor | None = None  # the plan table (_plan)
        self.plan_key: tuple[int, ...] | None = None

    def work64(self) -> torch.Tensor:
        """``work``'s layout in float64: the scratch of the low-bit kernels, whose sums are in float64 (NOTE
        [Low-bit LARS in the Triton kernels]); allocated on first use (or by :func:`prepare`)."""
        if not hasattr(self, "_work64"):
            self._work64 = torch.zeros(self.work.numel(), dtype=torch.float64, device=self.work.device)
        return self._work64

    def ssq(self, num_segs: int) -> torch.Tensor:
        """The per-segment sums in ``work``, a ``[3, S]`` view."""
        return self.work[self.ssq_at : self.ssq_at + 3 * num_segs].view(3, num_segs)


def _round4(n: int) -> int:
    return -(-n // 4) * 4


def _scratch(bucket: Bucket) -> _Scratch:
    cache = bucket.cache.setdefault(NAME, {})
    sc = cache.get(TILE)
    if sc is None:
        sc = cache[TILE] = _Scratch(bucket, TILE)
    return sc


def _plan(bucket: Bucket, sc: _Scratch) -> torch.Tensor:
    """The int64 plan table of the kernels (``K.PLAN``: NOTE [Kernel arguments] in the kernels), rebuilt when
    one of the bucket tables it points at was replaced. A compiled step uses the table its eager prelude
    built (:func:`prepare`): the tables are static there, and dynamo does not trace ``data_ptr()``."""
    if sc.plan is not None and torch.compiler.is_compiling():
        return sc.plan
    tt = sc.tiles
    tables = dict(
        seg_numel=bucket.seg_numel,
        wd_mask=bucket.wd_mask,
        adapt_mask=bucket.adapt_mask,
        active=bucket.active,
        tile_seg=tt.tile_seg,
        tile_len=tt.tile_len,
        seg_tile_ptr=tt.seg_tile_ptr,
    )
    ptrs = {k: t.data_ptr() for k, t in tables.items()}
    if any(p % 16 for p in ptrs.values()):  # the kernels hint these aligned (K._tab)
        raise RuntimeError(f"triton backend: a bucket table is not 16-byte aligned: {ptrs}")
    values = dict(ptrs, num_tiles=tt.num_tiles, num_segs=bucket.num_segments, ssq_at=sc.ssq_at, snap_at=sc.snap_at)
    key = tuple(values[k] for k in K.PLAN)
    if key != sc.plan_key:
        host = torch.tensor(key, dtype=torch.int64)
        if sc.plan is None:
            sc.plan = host.to(bucket.device)
        else:
            sc.plan.copy_(host)
        sc.plan_key = key
    return sc.plan


def _kinds(bucket: Bucket) -> tuple[str, ...]:
    """The address-table rows the kernels read, in their order (see :mod:`.triton_kernels`): param, grad,
    master (only for a bucket with fp32 masters) or remainder, the bucket's state buffers, then the block
    scales of its int8 ones."""
    master = ("master",) if bucket.uses_masters else ("remainder",) if bucket.uses_remainder else ()
    scales = tuple(lowbit_state.absmax_key(n) for n in bucket.state_names if n in bucket.scale_tensors)
    return ("param", "grad") + master + tuple(bucket.state_names) + scales


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


def _geometry() -> list[int]:
    """The kernels' ``GEO`` constexpr: (TILE, BLOCK, RBLOCK, SBLOCK) of this module."""
    return [TILE, BLOCK, RBLOCK, SBLOCK]


def prepare(bucket: Bucket, kind: str, cfg=None) -> list[torch.Tensor]:
    """Allocate the bucket's tables and scratch now (not inside a compiled graph); returns them. The low-bit
    kernels' tables too (the float64 scratch, the option rows of ``cfg``, the state_dict ids, the int8 maps):
    built inside the first traced step, they would change the cache the trace guards on and recompile it."""
    sc = _scratch(bucket)
    t = sc.tiles
    plan = _plan(bucket, sc)
    exact = []
    if bucket.exact_elements:
        exact = [sc.work64(), *_qtables(bucket.device, True), *_qtables(bucket.device, False)]
        if cfg is not None:
            exact += list(_lowbit_tables(bucket, cfg, kind))
    return [t.tile_seg, t.tile_len, t.seg_tile_ptr, sc.work, sc.count, sc.gpart, sc.one, sc.zero, plan,
            _traced_table(bucket)] + exact  # fmt: skip


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

# NOTE: [Written tensors are arguments] Every tensor a kernel of the step writes through its own base
# address is an argument of the op that launches it, declared mutated, and the kernel takes its address
# from that argument (never from a table of addresses): launch 1's scratch ``work`` and ``count``, and
# launch 2's ``step``, ``has_state`` and per-segment outputs. Under torch.compile an op's mutated arguments
# are functionalized (a clone goes in, and is copied back after the graph): a kernel writing through an
# address taken before would write the original while the clone is copied back over it, which is what
# broke compiled steps in the reverted table-of-tables design (879fae0). The plan table points only at
# tables no op of the step writes. The kernels also write params, masters and state, through the address
# table ``addr``, which these schemas cannot name, as csrc/cuda writes them through its ``Addr``: eager
# and interpreted steps are unaffected; a compiled graph that also reads params after the step must not
# rely on the ops' schemas to order the reads.
#
# NOTE: [One launch sequence] Both kinds launch through the same two op bodies, as the kernels run the
# same two skeletons (NOTE [One skeleton] in the kernels): launch 1 (``_partials_op``) and launch 2
# (``_update_op``) take the tables in one order for both kinds, and a kind adds only its kernel, its
# per-step scalar tensors (``scalars``, in the kernel's argument order), its ``opts`` and its mode
# constexpr. One op is still registered per kind and launch (``fusedlars::triton_lars_partials`` ...):
# the op names and the 2 launches per step are what traces see. (The mode argument is ``mode_code``: an
# op argument named ``mode`` collides with the ``mode`` keyword torch.compile's dispatch passes along.)


def _constexprs(pdt: int, has_master: bool, mode_name: str | None, mode: int, geo: list[int]) -> dict:
    """The constexprs of a launch: the param dtype, masters, the kind's mode (``MOM`` / ``BC``, or none)
    and the tile geometry ``GEO``."""
    cx = dict(PDT=_pdt(pdt), HAS_MASTER=has_master)
    if mode_name is not None:
        cx[mode_name] = mode
    return dict(cx, GEO=tuple(geo))


def _partials_op(name: str, kernel: str, mode_name: str | None, exact: bool = False):
    """Register launch 1 of a kind as op ``fusedlars::<name>``: ``K.<kernel>`` over the tiles and the
    segment programs; the arrival counters are re-armed if the launch raises. ``exact``: launched without
    FMA contraction (a low-bit kernel's float64 sums)."""

    @_register(name, ("work", "count"))
    def op(
        addr: T_,
        plan: T_,
        work: T_,
        count: T_,
        step: T_,
        has_state: T_,
        scalars: list[T_],
        opts: list[float],
        grid: int,
        pdt: int,
        has_master: bool,
        mode_code: int,
        geo: list[int],
    ) -> None:
        with _rearm_on_error(count):
            _launch(
                getattr(K, kernel),
                grid,
                addr,
                plan,
                work,
                count,
                step,
                has_state,
                *scalars,
                tuple(opts),
                **_constexprs(pdt, has_master, mode_name, mode_code, geo),
                **(_NO_FMA if exact else {}),
            )

    return op


def _update_op(name: str, kernel: str, mode_name: str):
    """Register launch 2 of a kind as op ``fusedlars::<name>``: ``K.<kernel>`` over the tiles and the
    segment programs."""

    @_register(name, ("step", "has_state", "w_norm", "g_norm", "u_norm", "trust_ratio"))
    def op(
        addr: T_,
        plan: T_,
        work: T_,
        step: T_,
        has_state: T_,
        w_norm: T_,
        g_norm: T_,
        u_norm: T_,
        trust_ratio: T_,
        scalars: list[T_],
        opts: list[float],
        grid: int,
        pdt: int,
        has_master: bool,
        mode_code: int,
        geo: list[int],
    ) -> None:
        outs = (step, has_state, w_norm, g_norm, u_norm, trust_ratio)
        cx = _constexprs(pdt, has_master, mode_name, mode_code, geo)
        _launch(getattr(K, kernel), grid, addr, plan, work, *outs, *scalars, tuple(opts), **cx)

    return op


_partials_op("triton_lars_partials", "lars_partials_kernel", None)
_partials_op("triton_lars_wsums", "lars_wsums_kernel", None)  # scalars: (g2, inv_scale, found_inf)
_update_op("triton_lars_update", "lars_update_kernel", "MOM")
_partials_op("triton_lars_lowbit_partials", "lars_lowbit_partials_kernel", "MASTER", exact=True)
_partials_op("triton_lamb_partials", "lamb_moments_kernel", "BC")
_update_op("triton_lamb_update", "lamb_update_kernel", "BC")


@_register("triton_lars_lowbit_update", ("step", "has_state", "w_norm", "g_norm", "u_norm", "trust_ratio"))
def _lars_lowbit_update_op(
    addr: T_, plan: T_, work: T_, step: T_, has_state: T_, w_norm: T_, g_norm: T_, u_norm: T_, trust_ratio: T_,
    lr: T_, inv_scale: T_, found_inf: T_, dopts: T_, pidx: T_, seed: int, qmap: T_, qmid: T_, opts: list[float],
    grid: int, pdt: int, master: int, mom: int, store: int, geo: list[int],
) -> None:  # fmt: skip
    """Launch 2 of low-bit LARS (NOTE [Low-bit LARS in the Triton kernels]), compiled without FMA contraction;
    ``store`` 1: int8 momentum with the signed map ``qmap`` and its midpoints ``qmid``."""
    outs = (step, has_state, w_norm, g_norm, u_norm, trust_ratio)
    cx = dict(PDT=_pdt(pdt), HAS_MASTER=master != 0, MASTER=master, MOM=mom, STORE=store, GEO=tuple(geo))
    _launch(K.lars_lowbit_update_kernel, grid, addr, plan, work, *outs, lr, inv_scale, found_inf, dopts, pidx, seed,
            qmap, qmid, tuple(opts), **cx, **_NO_FMA)  # fmt: skip


@_register("triton_lamb_lowbit_partials", ("work", "count"))
def _lamb_lowbit_partials_op(
    addr: T_, plan: T_, work: T_, count: T_, step: T_, has_state: T_, lr: T_, inv_scale: T_, found_inf: T_, clip: T_,
    dopts: T_, qmap: T_, umap: T_, opts: list[float], grid: int, pdt: int, master: int, store: int, bc: int,
    geo: list[int],
) -> None:  # fmt: skip
    """Launch 1 of low-bit LAMB (NOTE [Low-bit LAMB in the Triton kernels]): float64 sums into ``work`` (the
    float64 scratch), compiled without FMA contraction; the arrival counters re-armed if it raises."""
    cx = dict(PDT=_pdt(pdt), MASTER=master, STORE=store, BC=bc, GEO=tuple(geo))
    with _rearm_on_error(count):
        _launch(K.lamb_lowbit_partials_kernel, grid, addr, plan, work, count, step, has_state, lr, inv_scale,
                found_inf, clip, dopts, qmap, umap, tuple(opts), **cx, **_NO_FMA)  # fmt: skip


@_register("triton_lamb_lowbit_update", ("step", "has_state", "w_norm", "g_norm", "u_norm", "trust_ratio"))
def _lamb_lowbit_update_op(
    addr: T_, plan: T_, work: T_, step: T_, has_state: T_, w_norm: T_, g_norm: T_, u_norm: T_, trust_ratio: T_,
    lr: T_, inv_scale: T_, found_inf: T_, clip: T_, dopts: T_, pidx: T_, seed: int, qmap: T_, umap: T_, qmid: T_,
    umid: T_, opts: list[float], grid: int, pdt: int, master: int, store: int, bc: int, geo: list[int],
) -> None:  # fmt: skip
    """Launch 2 of low-bit LAMB (NOTE [Low-bit LAMB in the Triton kernels]), compiled without FMA contraction;
    ``store`` 1: int8 moments (signed ``qmap`` / ``qmid`` for exp_avg, unsigned ``umap`` / ``umid`` for
    exp_avg_sq)."""
    outs = (step, has_state, w_norm, g_norm, u_norm, trust_ratio)
    cx = dict(PDT=_pdt(pdt), MASTER=master, STORE=store, BC=bc, GEO=tuple(geo))
    _launch(K.lamb_lowbit_update_kernel, grid, addr, plan, work, *outs, lr, inv_scale, found_inf, clip, dopts, pidx,
            seed, qmap, umap, qmid, umid, tuple(opts), **cx, **_NO_FMA)  # fmt: skip


#: launch options of the low-bit kernels: the element math operation by operation, no contraction into FMAs
_NO_FMA = {} if _IMPORT_ERROR is not None or (K is not None and K.INTERPRET) else {"enable_fp_fusion": False}


@_register("triton_grad_sumsq", ("part",))
def _grad_sumsq_op(addr: T_, plan: T_, inv_scale: T_, part: T_, grid: int, pdt: int, geo: list[int]) -> None:
    _launch(K.grad_sumsq_kernel, grid, addr, plan, inv_scale, part, PDT=_pdt(pdt), GEO=tuple(geo))


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


# NOTE: [Triton partials and apply] The FSDP2 split of NOTE [Partials and apply] (backends/torch.py)
# is the step's own two launches: ``*_partials`` is launch 1 (it returns launch 1's per-segment sums,
# a view of the bucket's scratch, valid until the bucket's next launch 1; LAMB's launch 1 has already
# updated the moments), ``*_apply`` is launch 2 reading the sums it is given (copied into that scratch
# first unless they are that view). ``*_step`` runs the same two ops on launch 1's own sums: 2 launches,
# bitwise equal to apply(partials). Launch 2 also reads the step/has_state snapshot launch 1 took, so
# apply must follow its bucket's partials.


def _launch1(bucket: Bucket, op: str, scalars: list, opts: list, mode: int, work: torch.Tensor | None = None) -> tuple:
    """Launch 1 of either kind through op ``op`` (NOTE [One launch sequence]) into the scratch ``work`` (the
    bucket's fp32 one by default); returns the context launch 2 needs (this step's address table)."""
    sc = _scratch(bucket)
    addr = _addresses(bucket)
    grid = sc.tiles.num_tiles + triton.cdiv(bucket.num_segments, SBLOCK)
    work = sc.work if work is None else work
    _op(op)(addr, _plan(bucket, sc), work, sc.count, bucket.step, bucket.has_state, scalars, opts, grid,
            _PDT_CODE[bucket.dtype], bucket.uses_masters, mode, _geometry())  # fmt: skip
    return (addr,)


def _launch2(bucket: Bucket, op: str, ctx: tuple, scalars: list, opts: list, mode: int) -> None:
    """Launch 2 of either kind through op ``op`` from the sums in the scratch and launch 1's context."""
    (addr,) = ctx
    sc = _scratch(bucket)
    b = bucket
    grid = sc.tiles.num_tiles + triton.cdiv(b.num_segments, SBLOCK)
    _op(op)(addr, _plan(b, sc), sc.work, b.step, b.has_state, b.w_norm, b.g_norm, b.u_norm, b.trust_ratio, scalars,
            opts, grid, _PDT_CODE[b.dtype], b.uses_masters, mode, _geometry())  # fmt: skip


def _sums_into_scratch(bucket: Bucket, ssq: torch.Tensor) -> None:
    """Put the per-segment sums ``ssq`` (``[3, S]``: launch 1's own view, or summed over ranks) where launch 2
    reads them."""
    S = bucket.num_segments
    if tuple(ssq.shape) != (3, S):
        raise ValueError(f"ssq must have shape (3, {S}) (per-segment sums of squares), got {tuple(ssq.shape)}")
    dst = _scratch(bucket).ssq(S)
    if torch.compiler.is_compiling() or ssq.data_ptr() != dst.data_ptr() or ssq.stride() != dst.stride():
        dst.copy_(ssq)


def _step_scalars(sc: _Scratch, cfg, *names: str) -> list[torch.Tensor]:
    """The per-step value tensors ``names`` of ``cfg`` in a kernel's argument order (1 / 0 tensors when absent)."""
    out = []
    for name in names:
        if name == "lr":
            out.append(_lr_tensor(sc, cfg.lr))
        elif name == "clip":  # LAMB's global clip divisor: a tensor, a float (a cached tensor) or none
            clip = cfg.clip_coef
            out.append(_t(clip if clip is None or isinstance(clip, torch.Tensor) else sc.clip(clip), sc.one))
        else:
            out.append(_t(getattr(cfg, name), sc.zero if name == "found_inf" else sc.one))
    return out


#: the low-bit kernels' ``STORE`` per state storage (float32: fp32 state beside remainder masters)
_STORE = {"bfloat16": 0, "int8": 1, "float32": 2}


def _master_code(bucket: Bucket) -> int:
    """The low-bit kernels' ``MASTER``: 0 the params are the weights, 1 fp32 masters, 2 remainder masters."""
    return 2 if bucket.uses_remainder else 1 if bucket.uses_masters else 0


def _lowbit_tables(bucket: Bucket, cfg, kind: str = "LARS") -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 option rows of ``kind`` (``dopts``, rewritten when they change) and the params' state_dict
    ids (int64 [S]) of the low-bit kernels, cached on the bucket."""
    cache = bucket.cache.setdefault(NAME, {})
    vals = tuple(option_fields.triton_values(kind, cfg))
    hit = cache.get("dopts")
    if hit is None or hit[0] != vals:
        host = torch.tensor(vals, dtype=torch.float64)
        t = host.to(bucket.device) if hit is None else hit[1].copy_(host)
        cache["dopts"] = hit = (vals, t)
    pidx = cache.get("pidx")
    if pidx is None:
        pidx = cache["pidx"] = torch.tensor(bucket.param_indices, dtype=torch.int64, device=bucket.device)
    return hit[1], pidx


def _lars_lowbit_step(bucket: Bucket, cfg: LarsConfig) -> None:
    """Both launches of low-bit LARS (NOTE [Low-bit LARS in the Triton kernels])."""
    sc = _scratch(bucket)
    b = bucket
    opts = option_fields.triton_values("LARS", cfg)
    master = _master_code(bucket)
    dopts, pidx = _lowbit_tables(b, cfg)
    inv_scale, found_inf = _step_scalars(sc, cfg, "inv_scale", "found_inf")
    (addr,) = _launch1(bucket, "triton_lars_lowbit_partials", [inv_scale, found_inf, dopts], opts, master, sc.work64())
    lr = cfg.lr.reshape(-1) if isinstance(cfg.lr, torch.Tensor) else _f64_lr(sc, cfg.lr)
    grid = sc.tiles.num_tiles + triton.cdiv(b.num_segments, SBLOCK)
    mom = triton_mom(cfg.momentum, cfg.momentum_mode)
    store = _STORE[b.state_storage]
    qmap, qmid = _qtables(b.device)
    _op("triton_lars_lowbit_update")(addr, _plan(b, sc), sc.work64(), b.step, b.has_state, b.w_norm, b.g_norm, b.u_norm,
                                     b.trust_ratio, lr, inv_scale, found_inf, dopts, pidx, b.seed, qmap, qmid, opts,
                                     grid, _PDT_CODE[b.dtype], master, mom, store, _geometry())  # fmt: skip


_QTABLES: dict[tuple[torch.device, bool], tuple[torch.Tensor, torch.Tensor]] = {}


def _qtables(device: torch.device, signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed (or unsigned) dynamic map (256 fp32 codes) and its 255 midpoints (lowbit) on ``device``, cached."""
    t = _QTABLES.get((device, signed))
    if t is None:
        t = _QTABLES[device, signed] = (lowbit.dynamic_map(signed).to(device), lowbit.code_midpoints(signed).to(device))
    return t


def _lamb_lowbit_step(bucket: Bucket, cfg: LambConfig) -> None:
    """Both launches of low-bit LAMB (NOTE [Low-bit LAMB in the Triton kernels]), on the float64 scratch."""
    sc = _scratch(bucket)
    b = bucket
    opts = option_fields.triton_values("LAMB", cfg)
    dopts, pidx = _lowbit_tables(b, cfg, "LAMB")
    lr = cfg.lr.reshape(-1) if isinstance(cfg.lr, torch.Tensor) else _f64_lr(sc, cfg.lr)
    inv_scale, found_inf = _step_scalars(sc, cfg, "inv_scale", "found_inf")
    clip = cfg.clip_coef
    clip = _t(clip if clip is None or isinstance(clip, torch.Tensor) else _f64_scalar(sc, "clip64", clip), sc.one)
    (qmap, qmid), (umap, umid) = _qtables(b.device, True), _qtables(b.device, False)
    store = _STORE[b.state_storage]
    modes = (_PDT_CODE[b.dtype], _master_code(b), store, _bc(cfg), _geometry())
    addr = _addresses(b)
    grid = sc.tiles.num_tiles + triton.cdiv(b.num_segments, SBLOCK)
    work, plan = sc.work64(), _plan(b, sc)
    _op("triton_lamb_lowbit_partials")(addr, plan, work, sc.count, b.step, b.has_state, lr, inv_scale, found_inf, clip,
                                       dopts, qmap, umap, opts, grid, *modes)  # fmt: skip
    _op("triton_lamb_lowbit_update")(addr, plan, work, b.step, b.has_state, b.w_norm, b.g_norm, b.u_norm,
                                     b.trust_ratio, lr, inv_scale, found_inf, clip, dopts, pidx, b.seed, qmap, umap,
                                     qmid, umid, opts, grid, *modes)  # fmt: skip


def _f64_lr(sc: _Scratch, lr: float) -> torch.Tensor:
    """A Python float lr as a float64 device tensor (the reference's double), cached."""
    return _f64_scalar(sc, "lr64", lr)


def _f64_scalar(sc: _Scratch, name: str, x: float) -> torch.Tensor:
    """A Python float as a float64 device tensor (the reference's double), cached as ``sc.<name>``."""
    if not hasattr(sc, name):
        setattr(sc, name, CachedScalar(sc.one.device, torch.float64))
    return getattr(sc, name)(x)


def lars_partials(bucket: Bucket, cfg: LarsConfig) -> tuple[torch.Tensor, tuple]:
    """Launch 1: per-segment sums of squares ``[w², g², (g+λw)²]`` (g = grad * inv_scale, signed for
    ``maximize``; w the fp32 master when there is one) as an fp32 ``[3, S]`` tensor (0 for segments
    without a grad), and the step's context. Changes nothing the user or ``state`` sees."""
    _check("LARS", cfg, bucket)
    if (cfg.momentum != 0) != ("momentum_buffer" in bucket.state_names):
        raise RuntimeError(f"LARS: momentum={cfg.momentum} but the bucket's state is {bucket.state_names}")
    sc = _scratch(bucket)
    scalars = _step_scalars(sc, cfg, "inv_scale", "found_inf")
    ctx = _launch1(bucket, "triton_lars_partials", scalars, option_fields.triton_values("LARS", cfg), 0)
    return sc.ssq(bucket.num_segments), ctx


def _given_g2(bucket: Bucket, cfg: LarsConfig, g2: torch.Tensor) -> torch.Tensor | None:
    """``g2`` as launch 1 from given gradient sums reads it (float64 [S] on the bucket's device), or None
    where that launch cannot stand for :func:`lars_partials`: the ratio's denominator needs ||g + lam*w||
    (``norm_of_sum``), or the bucket is not fused here."""
    _check("LARS", cfg, bucket)
    if cfg.denominator == "norm_of_sum" or bucket.num_segments == 0 or bucket.exact_elements:
        return None
    if (cfg.momentum != 0) != ("momentum_buffer" in bucket.state_names):
        raise RuntimeError(f"LARS: momentum={cfg.momentum} but the bucket's state is {bucket.state_names}")
    g2 = g2.reshape(-1)
    if g2.numel() != bucket.num_segments:
        raise ValueError(f"g2 must have {bucket.num_segments} entries (one per segment), got {g2.numel()}")
    return g2.to(device=bucket.device, dtype=torch.float64).contiguous()


def lars_partials_given_grad_sums(
    bucket: Bucket, cfg: LarsConfig, g2: torch.Tensor
) -> tuple[torch.Tensor, tuple] | None:
    """:func:`lars_partials` whose gradients' sums of squares ``g2`` (float64 [S], raw grads) were taken in
    backward (fusedlars.backward_norms; a sharded bucket's local shards'): launch 1 reads the weights alone
    (``lars_wsums_kernel``, NOTE [Given gradient sums] in the kernels) and returns ``[w^2, g2 * inv_scale^2,
    NaN]`` (the last row, ||g + lam*w||^2, only reported as u_norm). None (nothing done) for the
    ``norm_of_sum`` denominator."""
    g2 = _given_g2(bucket, cfg, g2)
    if g2 is None:
        return None
    sc = _scratch(bucket)
    scalars = [g2, *_step_scalars(sc, cfg, "inv_scale", "found_inf")]
    ctx = _launch1(bucket, "triton_lars_wsums", scalars, option_fields.triton_values("LARS", cfg), 0)
    return sc.ssq(bucket.num_segments), ctx


def lars_step_given_grad_sums(bucket: Bucket, cfg: LarsConfig, g2: torch.Tensor) -> bool:
    """A LARS step from the gradients' sums of squares ``g2`` taken in backward: launch 1 reads no grad
    (:func:`lars_partials_given_grad_sums`), launch 2 as :func:`lars_step`'s (2 launches; given the two-pass
    step's own g^2 sums, bitwise its params). False (nothing done) where that function declines."""
    out = lars_partials_given_grad_sums(bucket, cfg, g2)
    if out is None:
        return False
    _lars_apply(bucket, cfg, out[1])
    return True


def _lars_apply(bucket: Bucket, cfg: LarsConfig, ctx: tuple) -> None:
    scalars = _step_scalars(_scratch(bucket), cfg, "lr", "inv_scale", "found_inf")
    mom = triton_mom(cfg.momentum, cfg.momentum_mode)
    _launch2(bucket, "triton_lars_update", ctx, scalars, option_fields.triton_values("LARS", cfg), mom)


def lars_apply(bucket: Bucket, cfg: LarsConfig, ssq: torch.Tensor, ctx: tuple) -> None:
    """Launch 2: the LARS update from the per-segment sums ``ssq`` (``[3, S]``, as :func:`lars_partials`
    returns them, or summed over the ranks of a sharded bucket)."""
    _sums_into_scratch(bucket, ssq)
    _lars_apply(bucket, cfg, ctx)


def lars_step(bucket: Bucket, cfg: LarsConfig) -> None:
    """One LARS step: :func:`lars_partials` then launch 2 on launch 1's own sums (2 launches); a bucket with
    low-bit state or remainder masters through the low-bit kernels (2 launches)."""
    if bucket.exact_elements:
        _check("LARS", cfg, bucket)
        _lars_lowbit_step(bucket, cfg)
        return
    _, ctx = lars_partials(bucket, cfg)
    _lars_apply(bucket, cfg, ctx)


def lamb_partials(bucket: Bucket, cfg: LambConfig) -> tuple[torch.Tensor, tuple]:
    """Launch 1: the new moments m, v (stored: they do not depend on the norms) and the per-segment
    sums of squares ``[w_d², u², g²]`` (w_d the weights after decoupled decay, u the Adam direction
    plus in-update decay, g = grad * inv_scale / clip_coef before L2 decay) as an fp32 ``[3, S]``
    tensor (0 for segments without a grad), and the step's context."""
    _check("LAMB", cfg, bucket)
    sc = _scratch(bucket)
    scalars = _step_scalars(sc, cfg, "lr", "inv_scale", "found_inf", "clip")
    ctx = _launch1(bucket, "triton_lamb_partials", scalars, option_fields.triton_values("LAMB", cfg), _bc(cfg))
    return sc.ssq(bucket.num_segments), ctx


def _bc(cfg: LambConfig) -> int:
    """The ``BC`` constexpr: the bias-correction code of the ``bias_correction`` row."""
    return BIAS[cfg.bias_correction]


def _lamb_apply(bucket: Bucket, cfg: LambConfig, ctx: tuple) -> None:
    scalars = _step_scalars(_scratch(bucket), cfg, "lr", "found_inf")
    _launch2(bucket, "triton_lamb_update", ctx, scalars, option_fields.triton_values("LAMB", cfg), _bc(cfg))


def lamb_apply(bucket: Bucket, cfg: LambConfig, ssq: torch.Tensor, ctx: tuple) -> None:
    """Launch 2: trust ratio from the per-segment sums ``ssq`` (``[3, S]``, as :func:`lamb_partials`
    returns them, or summed over ranks) and w <- w_d - lr * ratio * u (u recomputed from m, v)."""
    _sums_into_scratch(bucket, ssq)
    _lamb_apply(bucket, cfg, ctx)


def lamb_step(bucket: Bucket, cfg: LambConfig) -> None:
    """One LAMB step: :func:`lamb_partials` then launch 2 on launch 1's own sums (2 launches); a bucket with
    low-bit state or remainder masters through the low-bit kernels (2 launches)."""
    if bucket.exact_elements:
        _check("LAMB", cfg, bucket)
        _lamb_lowbit_step(bucket, cfg)
        return
    _, ctx = lamb_partials(bucket, cfg)
    _lamb_apply(bucket, cfg, ctx)


def grad_sumsq(bucket: Bucket, cfg) -> torch.Tensor:
    """Sum over active segments of ||grad * inv_scale||^2 (float64 scalar): one launch + a fixed-order sum."""
    _check("LAMB", cfg, bucket)
    sc = _scratch(bucket)
    T = sc.tiles.num_tiles
    if T == 0:
        return torch.zeros((), dtype=torch.float64, device=bucket.device)
    inv_scale = _t(cfg.inv_scale, sc.one)
    _op("triton_grad_sumsq")(_addresses(bucket), _plan(bucket, sc), inv_scale, sc.gpart, T, _PDT_CODE[bucket.dtype],
                             _geometry())  # fmt: skip
    return sc.gpart[:T].sum()
