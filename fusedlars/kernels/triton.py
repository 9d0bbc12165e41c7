"""Triton backend: LARS / TVLARS / LAMB over a flat bucket in two launches per step.

Same math as :mod:`fusedlars.kernels.reference` (which states the formulas), in fp32
(the state dtype of fp32 / fp16 / bf16 buckets). Kernels: :mod:`.triton_kernels`.

Per bucket and step, whatever the number of layers:

* LARS: launch 1 ``lars_partials_kernel`` (per tile: sum w^2, g^2, (g+lam*w)^2),
  launch 2 ``lars_update_kernel`` (per tile: re-reduce the segment's partials in a
  fixed order, trust ratio, momentum, store). 2 launches.
* LAMB: launch 1 ``lamb_moments_kernel`` (new m, v stored; per tile sum g^2, w_d^2, u^2),
  launch 2 ``lamb_update_kernel`` (re-reduce, ratio, u recomputed from m, v, store).
  2 launches, plus one ``grad_sumsq_kernel`` launch when ``max_grad_norm`` is set.

fp32 bytes per parameter: LARS 12 (launch 1: w, g) + 20 (launch 2: w, g, b read, b, w
written) = 32 with momentum (28 without master weights reread... see the final report);
LAMB 24 + 16 = 40. The per-tile partial reads of launch 2 add 12 * tiles_in_segment bytes
per tile, from L2.

Per-step values never cause a host sync: ``lr`` is a 1-element tensor (a Python float lr
is written into a cached device tensor with ``fill_`` only when it changes), GradScaler's
``inv_scale`` / ``found_inf`` and LAMB's ``clip_coef`` are passed as pointers (constant
1 / 0 tensors when absent). Every launch goes through :func:`_launch` and is registered
as a ``torch.library`` op (``triton_op`` + ``wrap_triton``), so ``torch.compile`` can trace
a step.
"""

from __future__ import annotations

import math
import os

import torch

from ..buckets import Bucket
from .common import LambConfig, LarsConfig

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
#: inner loop, RBLOCK the chunk of partials reduced at once, SBLOCK segments per
#: segment-program. Tests may lower TILE / RBLOCK to exercise multi-tile segments.
TILE = 4096
BLOCK = 1024
RBLOCK = 256
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
    return False, f"Triton {triton.__version__} is installed but no CUDA device is available and TRITON_INTERPRET is not set"


def supports(kind: str, cfg, bucket: Bucket) -> str | None:
    """None when this backend fuses the configuration for ``bucket``, else the reason."""
    ok, why = available()
    if not ok:
        return why
    if bucket.dtype not in (torch.float32, torch.float16, torch.bfloat16):
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
    if kind not in ("LARS", "LAMB"):
        return f"unknown optimizer kind {kind!r}"
    return None


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
        self.gpart = torch.zeros(max(T, 1), dtype=torch.float64, device=dev)
        self.one = torch.ones(1, dtype=torch.float32, device=dev)
        self.zero = torch.zeros(1, dtype=torch.float32, device=dev)
        self.no_master = torch.zeros(1, dtype=torch.float32, device=dev)
        self.no_mom = torch.zeros(1, dtype=torch.float32, device=dev)
        self.lr = torch.zeros(1, dtype=torch.float32, device=dev)
        self.lr_value: float | None = None


def _scratch(bucket: Bucket) -> _Scratch:
    cache = bucket.__dict__.setdefault("_triton_scratch", {})
    sc = cache.get(TILE)
    if sc is None:
        sc = cache[TILE] = _Scratch(bucket, TILE)
    return sc


def _lr_tensor(sc: _Scratch, lr) -> torch.Tensor:
    if isinstance(lr, torch.Tensor):
        return lr.reshape(-1)
    lr = float(lr)
    if sc.lr_value != lr:
        sc.lr.fill_(lr)
        sc.lr_value = lr
    return sc.lr


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


def _launch(kernel, grid: int, *args, **constexprs) -> None:
    """Launch ``kernel`` on a 1-D grid of ``grid`` programs."""
    if grid == 0:
        return
    k = _wrap_triton(kernel) if _wrap_triton is not None else kernel
    k[(grid,)](*args, num_warps=NUM_WARPS, **constexprs)


def _register(name: str, mutates: tuple[str, ...]):
    def deco(fn):
        if _IMPORT_ERROR is not None:
            return fn
        if _triton_op is not None:
            return _triton_op(f"fusedlars::{name}", mutates_args=mutates)(fn)
        return torch.library.custom_op(f"fusedlars::{name}", mutates_args=mutates)(fn)

    return deco


T_ = torch.Tensor


@_register(
    "triton_lars_step",
    ("param", "master", "mom", "step", "has_state", "w_norm", "g_norm", "u_norm", "trust_ratio", "part", "snap"),
)
def _lars_op(
    param: T_, master: T_, grad: T_, mom: T_,
    wd_mask: T_, adapt_mask: T_, active: T_, seg_numel: T_,
    step: T_, has_state: T_, w_norm: T_, g_norm: T_, u_norm: T_, trust_ratio: T_,
    lr: T_, inv_scale: T_, found_inf: T_, part: T_, snap: T_,
    tile_seg: T_, tile_start: T_, tile_len: T_, seg_tile_ptr: T_,
    num_tiles: int, num_segs: int, fvals: list[float], ivals: list[int],
    has_master: bool, mom_mode: int, tile: int, block: int, rblock: int, sblock: int,
) -> None:
    (weight_decay, sign, eta, eps, clamp_lo, clamp_hi, clip_lo, clip_hi, momentum, dampening,
     tv_lmbda, tv_alpha, tv_shift, tv_gamma_min) = fvals
    (tv_gate, den_mode, wd_mode, check_mode, zero_skip, clip_mode, adapt_enabled, use_tv, nesterov,
     clone_first) = ivals
    grid = num_tiles + triton.cdiv(num_segs, sblock)
    _launch(
        K.lars_partials_kernel, grid,
        param, master, grad, wd_mask, active, step, has_state, inv_scale, found_inf, part, snap,
        tile_seg, tile_start, tile_len, num_tiles, num_segs, weight_decay, sign,
        HAS_MASTER=has_master, TILE=tile, BLOCK=block, SBLOCK=sblock,
    )
    _launch(
        K.lars_update_kernel, grid,
        param, master, grad, mom, wd_mask, adapt_mask, active, seg_numel,
        step, has_state, w_norm, g_norm, u_norm, trust_ratio,
        lr, inv_scale, found_inf, part, snap,
        tile_seg, tile_start, tile_len, seg_tile_ptr, num_tiles, num_segs,
        weight_decay, sign, eta, eps, clamp_lo, clamp_hi, clip_lo, clip_hi, momentum, dampening,
        tv_lmbda, tv_alpha, tv_shift, tv_gamma_min, tv_gate,
        den_mode, wd_mode, check_mode, zero_skip, clip_mode, adapt_enabled, use_tv, nesterov, clone_first,
        HAS_MASTER=has_master, MOM=mom_mode, TILE=tile, BLOCK=block, RBLOCK=rblock, SBLOCK=sblock,
    )


@_register(
    "triton_lamb_step",
    ("param", "master", "exp_avg", "exp_avg_sq", "step", "has_state", "w_norm", "g_norm", "u_norm",
     "trust_ratio", "part", "snap"),
)
def _lamb_op(
    param: T_, master: T_, grad: T_, exp_avg: T_, exp_avg_sq: T_,
    wd_mask: T_, adapt_mask: T_, active: T_, seg_numel: T_,
    step: T_, has_state: T_, w_norm: T_, g_norm: T_, u_norm: T_, trust_ratio: T_,
    lr: T_, inv_scale: T_, found_inf: T_, clip_coef: T_, part: T_, snap: T_,
    tile_seg: T_, tile_start: T_, tile_len: T_, seg_tile_ptr: T_,
    num_tiles: int, num_segs: int, fvals: list[float], ivals: list[int],
    has_master: bool, bc_mode: int, tile: int, block: int, rblock: int, sblock: int,
) -> None:
    (weight_decay, sign, beta1, beta2, beta3, omb1, omb2, eps, eps_root, clamp_lo, clamp_hi, clip_lo, clip_hi,
     tr_eps) = fvals
    wd_mode, clip_mode, adapt_enabled = ivals
    grid = num_tiles + triton.cdiv(num_segs, sblock)
    _launch(
        K.lamb_moments_kernel, grid,
        param, master, grad, exp_avg, exp_avg_sq, wd_mask, active, step, has_state,
        lr, inv_scale, found_inf, clip_coef, part, snap,
        tile_seg, tile_start, tile_len, num_tiles, num_segs,
        weight_decay, sign, beta1, beta2, beta3, omb1, omb2, eps, eps_root, wd_mode,
        HAS_MASTER=has_master, BC=bc_mode, TILE=tile, BLOCK=block, SBLOCK=sblock,
    )
    _launch(
        K.lamb_update_kernel, grid,
        param, master, exp_avg, exp_avg_sq, wd_mask, adapt_mask, active, seg_numel,
        step, has_state, w_norm, g_norm, u_norm, trust_ratio,
        lr, found_inf, part, snap,
        tile_seg, tile_start, tile_len, seg_tile_ptr, num_tiles, num_segs,
        weight_decay, omb1, omb2, eps, eps_root, clamp_lo, clamp_hi, clip_lo, clip_hi, tr_eps,
        wd_mode, clip_mode, adapt_enabled,
        HAS_MASTER=has_master, BC=bc_mode, TILE=tile, BLOCK=block, RBLOCK=rblock, SBLOCK=sblock,
    )


@_register("triton_grad_sumsq", ("part",))
def _grad_sumsq_op(
    grad: T_, active: T_, inv_scale: T_, part: T_, tile_seg: T_, tile_start: T_, tile_len: T_,
    num_tiles: int, tile: int, block: int,
) -> None:
    _launch(K.grad_sumsq_kernel, num_tiles, grad, active, inv_scale, part, tile_seg, tile_start, tile_len,
            TILE=tile, BLOCK=block)


def _op(name: str):
    return getattr(torch.ops.fusedlars, name) if _IMPORT_ERROR is None else None


# ------------------------------------------------------------------------------------------
# the backend contract
# ------------------------------------------------------------------------------------------
_CLIP = {None: 0, "larc": 1, "lambc": 2, "range": 3}


def _finite(x: float) -> float:
    # fp32 kernel arguments: keep inf representable (clamp bounds), it is exact
    return float(x)


def _check(kind: str, cfg, bucket: Bucket) -> None:
    why = supports(kind, cfg, bucket)
    if why:
        raise RuntimeError(f"{kind}: backend='triton' cannot run this bucket: {why}.")


def lars_step(bucket: Bucket, cfg: LarsConfig) -> None:
    _check("LARS", cfg, bucket)
    sc = _scratch(bucket)
    tt = sc.tiles
    mom_mode = 0 if cfg.momentum == 0 else (1 if cfg.momentum_mode == "torch" else 2)
    den = {"sum_of_norms": 0, "norm_of_sum": 1, "grad_only": 2}[cfg.denominator]
    wdm = {"l2": 0, "ratio_only": 1, "decoupled": 2}[cfg.weight_decay_mode]
    chk = {"raw_grad": 0, "update": 1, "denominator": 2}[cfg.zero_norm_check]
    tv = cfg.tv or (0.0, 0.0, 0.0, 0.0, 0)
    fvals = [
        float(cfg.weight_decay), -1.0 if cfg.maximize else 1.0, float(cfg.eta), float(cfg.eps),
        _finite(cfg.clamp_lo), _finite(cfg.clamp_hi), _finite(cfg.clip_lo), _finite(cfg.clip_hi),
        float(cfg.momentum), float(cfg.dampening),
        float(tv[0]), float(tv[1]), float(tv[2]), float(tv[3]),
    ]
    ivals = [
        int(tv[4]), den, wdm, chk, int(cfg.zero_norm == "skip"), _CLIP[cfg.trust_clip], int(bool(cfg.adapt_enabled)),
        int(cfg.tv is not None), int(bool(cfg.nesterov)), int(cfg.first_step_buffer == "clone"),
    ]
    master = bucket.flat_master
    mom = bucket.state["momentum_buffer"] if mom_mode else sc.no_mom
    _op("triton_lars_step")(
        bucket.flat_param, master if master is not None else sc.no_master, bucket.flat_grad, mom,
        bucket.wd_mask, bucket.adapt_mask, bucket.active, bucket.seg_numel,
        bucket.step, bucket.has_state, bucket.w_norm, bucket.g_norm, bucket.u_norm, bucket.trust_ratio,
        _lr_tensor(sc, cfg.lr), _t(cfg.inv_scale, sc.one), _t(cfg.found_inf, sc.zero), sc.part, sc.snap,
        tt.tile_seg, tt.tile_start, tt.tile_len, tt.seg_tile_ptr,
        tt.num_tiles, bucket.num_segments, fvals, ivals,
        master is not None, mom_mode, TILE, BLOCK, RBLOCK, SBLOCK,
    )


def lamb_step(bucket: Bucket, cfg: LambConfig) -> None:
    _check("LAMB", cfg, bucket)
    sc = _scratch(bucket)
    tt = sc.tiles
    bc = {"both": 0, "none": 1, "first_outside": 2}[cfg.bias_correction]
    wdm = {"in_update": 0, "l2": 1, "decoupled": 2}[cfg.weight_decay_mode]
    fvals = [
        float(cfg.weight_decay), -1.0 if cfg.maximize else 1.0, float(cfg.beta1), float(cfg.beta2),
        float(cfg.beta3), 1.0 - float(cfg.beta1), 1.0 - float(cfg.beta2), float(cfg.eps), float(cfg.eps_root),
        _finite(cfg.clamp_lo), _finite(cfg.clamp_hi), _finite(cfg.clip_lo), _finite(cfg.clip_hi),
        float(cfg.trust_ratio_eps),
    ]
    ivals = [wdm, _CLIP[cfg.trust_clip], int(bool(cfg.adapt_enabled) and not cfg.adam)]
    clip = cfg.clip_coef
    if clip is not None and not isinstance(clip, torch.Tensor):
        clip = torch.full((1,), float(clip), dtype=torch.float32, device=bucket.device)
    master = bucket.flat_master
    _op("triton_lamb_step")(
        bucket.flat_param, master if master is not None else sc.no_master, bucket.flat_grad,
        bucket.state["exp_avg"], bucket.state["exp_avg_sq"],
        bucket.wd_mask, bucket.adapt_mask, bucket.active, bucket.seg_numel,
        bucket.step, bucket.has_state, bucket.w_norm, bucket.g_norm, bucket.u_norm, bucket.trust_ratio,
        _lr_tensor(sc, cfg.lr), _t(cfg.inv_scale, sc.one), _t(cfg.found_inf, sc.zero), _t(clip, sc.one),
        sc.part, sc.snap,
        tt.tile_seg, tt.tile_start, tt.tile_len, tt.seg_tile_ptr,
        tt.num_tiles, bucket.num_segments, fvals, ivals,
        master is not None, bc, TILE, BLOCK, RBLOCK, SBLOCK,
    )


def grad_sumsq(bucket: Bucket, cfg) -> torch.Tensor:
    """Sum over active segments of ||grad * inv_scale||^2 (float64 scalar): one launch + a fixed-order sum."""
    _check("LAMB", cfg, bucket)
    sc = _scratch(bucket)
    tt = sc.tiles
    if tt.num_tiles == 0:
        return torch.zeros((), dtype=torch.float64, device=bucket.device)
    _op("triton_grad_sumsq")(
        bucket.flat_grad, bucket.active, _t(cfg.inv_scale, sc.one), sc.gpart,
        tt.tile_seg, tt.tile_start, tt.tile_len, tt.num_tiles, TILE, BLOCK,
    )
    return sc.gpart[: tt.num_tiles].sum()




