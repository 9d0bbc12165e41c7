"""Fused CUDA backend: the CUDA kernels of ``fusedlars._C`` (csrc/cuda, math in csrc/lars_math.h).

Same math as :mod:`fusedlars.kernels.reference` (which states the formulas), in fp32 with norms
accumulated per tile of ``TILE`` elements and reduced in a fixed order (bitwise reproducible, for any
grid size and for both launch paths). One step of a bucket is ONE cooperative launch of a persistent
grid: per-tile partial sums of squares, ``grid.sync()``, then every block reduces its segments'
partials and updates the same tiles it just read (still in L2). Buckets larger than about half the L2
are cut into groups of consecutive segments, one grid sync per group. Without cooperative launch
(or with ``FUSEDLARS_CUDA_COOP=0``) the same kernel runs as 2 launches.

fp32, bf16 and fp16 params (fp32 state, optional fp32 master weights). ``lr`` is a float or a
1-element device tensor; GradScaler's ``inv_scale`` / ``found_inf`` and LAMB's ``clip_coef`` are read
on the device (``found_inf != 0``: the step changes nothing). No host sync, so a step can be captured
in a CUDA graph (pass ``lr`` as a tensor then: a float lr is baked into the captured launch).

``FUSEDLARS_CUDA_PATH`` = ``auto`` (default) | ``cooperative`` (error if unavailable) | ``two_launch``.
"""

from __future__ import annotations

import os

import torch

from ..buckets import Bucket
from .common import CachedScalar, LambConfig, LarsConfig, check_fused
from .packing import lamb_options, lars_options

NAME = "cuda"

#: Elements per tile; must equal kTileElems of csrc/cuda/launch.h.
TILE = 16384
_PATHS = {"auto": 0, "cooperative": 1, "two_launch": 2}
_OPS = ("lars_step_cuda", "lamb_step_cuda", "grad_sumsq_cuda", "cuda_info", "build_info")
_SCALAR_DTYPES = (torch.float32, torch.float64)

#: Where the kernels run. The CUDA-on-CPU emulation of the tests (tests/cuda_emu.py) points these at
#: its own ops object and at CPU tensors, so that everything below runs unmodified around the
#: emulated kernels. OPS None: the extension's ``torch.ops.fusedlars``.
OPS = None
DEVICE_TYPE = "cuda"
#: L2 bytes for the cooperative path's segment groups; None: ask the device (40 MiB if it cannot say).
L2_BYTES: int | None = None


def _ops():
    return OPS if OPS is not None else torch.ops.fusedlars


def _load() -> str | None:
    """None when the extension holds the CUDA kernels, else why not."""
    try:
        import fusedlars._C  # noqa: F401
    except Exception as e:
        return f"fusedlars._C does not import ({type(e).__name__}: {e}); build it with `pip install --no-build-isolation -e .`"
    missing = [op for op in _OPS if not hasattr(torch.ops.fusedlars, op)]
    if missing:
        return f"fusedlars._C lacks the ops {missing}: it was built from older sources, rebuild it"
    if "+cuda" not in torch.ops.fusedlars.build_info():
        why = "the installed torch has no CUDA" if torch.version.cuda is None else "nvcc / CUDA_HOME was not found or FUSEDLARS_NO_CUDA=1"
        return f"fusedlars._C was built without CUDA kernels ({why}; the build: line of `fusedlars info` says why)"
    return None


_WHY_NOT = _load()


def _register_fakes() -> None:
    @torch.library.register_fake("fusedlars::lars_step_cuda")
    def _lars_fake(param, grad, master, momentum, wd_mask, adapt_mask, active, has_state, step, w_norm, g_norm,
                   u_norm, trust_ratio, tile_seg, tile_start, tile_len, seg_tile_ptr, group_seg, partials, snap,
                   lr_tensor, lr, inv_scale, found_inf, hyper, modes, path=0):
        return None

    @torch.library.register_fake("fusedlars::lamb_step_cuda")
    def _lamb_fake(param, grad, master, exp_avg, exp_avg_sq, wd_mask, adapt_mask, active, has_state, step, w_norm,
                   g_norm, u_norm, trust_ratio, tile_seg, tile_start, tile_len, seg_tile_ptr, group_seg, partials,
                   snap, lr_tensor, lr, inv_scale, found_inf, clip_coef, hyper, modes, path=0):
        return None

    @torch.library.register_fake("fusedlars::grad_sumsq_cuda")
    def _sumsq_fake(grad, active, tile_seg, tile_start, tile_len, gpart, inv_scale):
        return grad.new_empty((), dtype=torch.float64)


if _WHY_NOT is None:
    _register_fakes()


def build_info() -> dict[str, str]:
    """The CUDA build and device facts (``cuda_info`` op): archs, devices, coop, sms, last_path ...; {} without CUDA kernels."""
    if _WHY_NOT is not None:
        return {}
    raw = _ops().cuda_info()
    return dict(kv.split("=", 1) for kv in raw.split(";") if "=" in kv)


def archs() -> list[int]:
    """Compute capabilities with SASS in this build, e.g. [80, 90, 100]."""
    a = build_info().get("archs", "")
    return [int(x) // 10 for x in a.split(",") if x.strip().isdigit()]


def _path_code() -> int:
    p = os.environ.get("FUSEDLARS_CUDA_PATH", "auto")
    if p not in _PATHS:
        raise ValueError(f"FUSEDLARS_CUDA_PATH={p!r}: choose one of {sorted(_PATHS)}")
    return _PATHS[p]


def available() -> tuple[bool, str]:
    if _WHY_NOT is not None:
        return False, _WHY_NOT
    sm = ", ".join(f"sm_{a}" for a in archs()) or "unknown architectures"
    if not torch.cuda.is_available():
        return False, f"CUDA kernels built for {sm}, but no CUDA device is visible (torch.cuda.is_available() is False)"
    info = build_info()
    major, minor = torch.cuda.get_device_capability()
    cap = 10 * major + minor
    if not any(a // 10 == cap // 10 and a <= cap for a in archs()):
        return False, f"CUDA kernels built for {sm}; the device is sm_{cap} (rebuild with TORCH_CUDA_ARCH_LIST including {major}.{minor})"
    env = os.environ.get("FUSEDLARS_CUDA_PATH", "auto")
    if info.get("coop") == "1" and env != "two_launch" and os.environ.get("FUSEDLARS_CUDA_COOP") != "0":
        how = f"1 cooperative launch per bucket step ({info.get('sms')} SMs x {info.get('blocks_per_sm')} blocks)"
    elif info.get("coop") == "1":
        how = "2 launches per bucket step (cooperative path switched off by FUSEDLARS_CUDA_PATH / FUSEDLARS_CUDA_COOP)"
    else:
        how = "2 launches per bucket step (the device has no cooperative launch)"
    return True, f"fused CUDA kernels for {sm} on {info.get('name', 'GPU')} (sm_{cap}): {how}"


def supports(kind: str, cfg, bucket: Bucket) -> str | None:
    """None when this bucket and configuration run fused here, else the reason."""
    if _WHY_NOT is not None:
        return _WHY_NOT
    return check_fused(kind, cfg, bucket, DEVICE_TYPE, "CUDA", _SCALAR_DTYPES)


# ------------------------------------------------------------------------------------------
# per-bucket cached device tables and scratch (allocated once: nothing allocates in a step)
# ------------------------------------------------------------------------------------------
class _Scratch:
    def __init__(self, bucket: Bucket, kind: str) -> None:
        dev = bucket.device
        self.tiles = bucket.tiles(TILE)
        T, S = self.tiles.num_tiles, bucket.num_segments
        self.part = torch.zeros(3 * max(T, 1), dtype=torch.float64, device=dev)
        self.snap = torch.zeros(2 * max(S, 1), dtype=torch.float32, device=dev)
        self.gpart = torch.zeros(max(T, 1), dtype=torch.float64, device=dev)
        self.group_seg = torch.tensor(_groups(bucket, kind), dtype=torch.int64, device=dev)
        self.clip = CachedScalar(dev, torch.float64)  # LAMB's clip_coef when given as a float


def _groups(bucket: Bucket, kind: str) -> list[int]:
    """Segment boundaries of groups of consecutive segments whose phase-1 bytes fit in ~half the L2."""
    l2 = L2_BYTES
    if l2 is None:
        try:
            l2 = int(getattr(torch.cuda.get_device_properties(bucket.device), "L2_cache_size", 0)) or (40 << 20)
        except Exception:
            l2 = 40 << 20
    budget = l2 // 2
    item = torch.empty((), dtype=bucket.dtype).element_size()
    bpe = (4 if bucket.flat_master is not None else item) + item + (8 if kind == "LAMB" else 0)
    bounds, acc = [0], 0
    for i, n in enumerate(bucket.numels):
        b = n * bpe
        if acc and acc + b > budget:
            bounds.append(i)
            acc = 0
        acc += b
    bounds.append(bucket.num_segments)
    return bounds


def _scratch(bucket: Bucket, kind: str) -> _Scratch:
    cache = bucket.__dict__.setdefault("_cuda_scratch", {})
    sc = cache.get(kind)
    if sc is None:
        sc = cache[kind] = _Scratch(bucket, kind)
    return sc


def prepare(bucket: Bucket, kind: str) -> list[torch.Tensor]:
    """Allocate the bucket's tables and scratch now (not inside a compiled graph or a CUDA graph
    capture); returns them."""
    sc = _scratch(bucket, kind)
    t = sc.tiles
    return [t.tile_seg, t.tile_start, t.tile_len, t.seg_tile_ptr, sc.part, sc.snap, sc.gpart, sc.group_seg]


def _lr(lr) -> tuple[torch.Tensor | None, float]:
    if isinstance(lr, torch.Tensor):
        return lr.detach().reshape(-1), 0.0
    return None, float(lr)


def _check(kind: str, cfg, bucket: Bucket) -> None:
    why = supports(kind, cfg, bucket)
    if why:
        raise RuntimeError(f"{kind}: backend='cuda' cannot run this bucket: {why}.")


def lars_step(bucket: Bucket, cfg: LarsConfig) -> None:
    _check("LARS", cfg, bucket)
    sc = _scratch(bucket, "LARS")
    tt = sc.tiles
    hyper, modes = lars_options(cfg)
    lr_t, lr = _lr(cfg.lr)
    _ops().lars_step_cuda(
        bucket.flat_param, bucket.flat_grad, bucket.flat_master, bucket.state.get("momentum_buffer"),
        bucket.wd_mask, bucket.adapt_mask, bucket.active, bucket.has_state, bucket.step,
        bucket.w_norm, bucket.g_norm, bucket.u_norm, bucket.trust_ratio,
        tt.tile_seg, tt.tile_start, tt.tile_len, tt.seg_tile_ptr, sc.group_seg, sc.part, sc.snap,
        lr_t, lr, cfg.inv_scale, cfg.found_inf, hyper, modes, _path_code(),
    )  # fmt: skip


def lamb_step(bucket: Bucket, cfg: LambConfig) -> None:
    _check("LAMB", cfg, bucket)
    sc = _scratch(bucket, "LAMB")
    tt = sc.tiles
    hyper, modes = lamb_options(cfg)
    clip = cfg.clip_coef
    if clip is not None and not isinstance(clip, torch.Tensor):
        clip = sc.clip(clip)
    lr_t, lr = _lr(cfg.lr)
    _ops().lamb_step_cuda(
        bucket.flat_param, bucket.flat_grad, bucket.flat_master, bucket.state["exp_avg"], bucket.state["exp_avg_sq"],
        bucket.wd_mask, bucket.adapt_mask, bucket.active, bucket.has_state, bucket.step,
        bucket.w_norm, bucket.g_norm, bucket.u_norm, bucket.trust_ratio,
        tt.tile_seg, tt.tile_start, tt.tile_len, tt.seg_tile_ptr, sc.group_seg, sc.part, sc.snap,
        lr_t, lr, cfg.inv_scale, cfg.found_inf, clip, hyper, modes, _path_code(),
    )  # fmt: skip


def grad_sumsq(bucket: Bucket, cfg) -> torch.Tensor:
    """Sum over active segments of ||grad * inv_scale||^2, as a float64 0-dim tensor on the device."""
    sc = _scratch(bucket, "LAMB")
    tt = sc.tiles
    return _ops().grad_sumsq_cuda(
        bucket.flat_grad, bucket.active, tt.tile_seg, tt.tile_start, tt.tile_len, sc.gpart, cfg.inv_scale
    )
