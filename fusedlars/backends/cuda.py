"""Fused CUDA backend: the CUDA kernels of ``fusedlars._C`` (csrc/cuda, math in csrc/lars_math.h).

The kernels step the user's own tensors (params, grads) and ours (state, masters) in place, through the
bucket's device table of base addresses (:meth:`Bucket.address_table`), refreshed only when a tensor
moves. Tensors may sit at any element offset (DDP bucket views, FSDP2 shards): 128-bit access is chosen
per segment from its addresses, with bitwise the same results either way.

Same math as :mod:`fusedlars.backends.reference` (which states the formulas), in fp32 with norms
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
FSDP2-sharded buckets: ``lars_partials`` / ``lars_apply`` (and LAMB's), NOTE [Partials and apply].
LARS from the grads' sums of squares taken in backward (fusedlars.backward_norms, issue #25):
``lars_step_given_grad_sums`` / ``lars_partials_given_grad_sums``, whose pass 1 loads no grad
(NOTE [Grad sums from backward] in csrc/cuda/fused_kernels.cu).
"""

from __future__ import annotations

import os

import torch

from ..buckets import Bucket
from .config import CachedScalar, LambConfig, LarsConfig, check_fused
from .packing import lamb_options, lars_options

NAME = "cuda"

#: Elements per tile; must equal kTileElems of csrc/cuda/launch.h.
TILE = 16384
_PATHS = {"auto": 0, "cooperative": 1, "two_launch": 2}
_OPS = ("lars_step_cuda", "lamb_step_cuda", "grad_sumsq_cuda", "cuda_info", "build_info")
_SCALAR_DTYPES = (torch.float32, torch.float64)


def _ops():
    """The ops the kernels run through: the extension's. (The CUDA-on-CPU emulation of the tests,
    tests/cuda_emu.py, replaces this, :func:`supports` and :func:`_l2_bytes` for a test.)"""
    return torch.ops.fusedlars


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
        why = (
            "the installed torch has no CUDA"
            if torch.version.cuda is None
            else "nvcc / CUDA_HOME was not found or FUSEDLARS_NO_CUDA=1"
        )
        return f"fusedlars._C was built without CUDA kernels ({why}; the build: line of `fusedlars info` says why)"
    return None


_WHY_NOT = _load()


#: The parameters of the step ops ``fusedlars::lars_step_cuda`` / ``lamb_step_cuda`` (csrc/ops.cpp
#: schemas), in order; only LAMB has ``clip_coef``. One list for the call (:func:`_step`), the fake
#: kernels and the CUDA-on-CPU stand-in of the ops in the tests (tests/cuda_emu.py).
_STEP_HEAD = (
    "params", "grads", "state", "addresses", "master",
    "wd_mask", "adapt_mask", "active", "has_state", "step", "w_norm", "g_norm", "u_norm", "trust_ratio",
    "tile_seg", "tile_start", "tile_len", "seg_tile_ptr", "group_seg", "partials", "snap", "ssq",
    "lr_tensor", "lr", "inv_scale", "found_inf",
)  # fmt: skip
_STEP_TAIL = ("hyper", "modes", "path", "param_ids", "storage", "remainder", "seed")
#: the step op of each kind
STEP_OPS = {"LARS": "lars_step_cuda", "LAMB": "lamb_step_cuda"}
#: defaults of the schemas (``int path=0``)
STEP_DEFAULTS = {"path": 0, "param_ids": None, "storage": 0, "remainder": False, "seed": 0}


def step_params(kind: str) -> tuple[str, ...]:
    """The parameter names of ``kind``'s step op (``STEP_OPS``), in schema order."""
    return _STEP_HEAD + (("clip_coef",) if kind == "LAMB" else ()) + _STEP_TAIL


_PARAMS = {kind: step_params(kind) for kind in STEP_OPS}


def _register_fakes() -> None:
    def _step_fake(*args, **kwargs):  # the step ops return nothing (they write their arguments)
        return None

    for op in STEP_OPS.values():
        torch.library.register_fake(f"fusedlars::{op}")(_step_fake)

    @torch.library.register_fake("fusedlars::grad_sumsq_cuda")
    def _sumsq_fake(grads, addresses, active, tile_seg, tile_start, tile_len, gpart, inv_scale):
        return addresses.new_empty((), dtype=torch.float64)


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
        return (
            False,
            f"CUDA kernels built for {sm}; the device is sm_{cap} (rebuild with TORCH_CUDA_ARCH_LIST including {major}.{minor})",
        )
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
    if bucket.exact_elements:  # low-bit state / remainder masters: the exact kernels (NOTE [Exact kernels])
        if bucket.shard is not None and bucket.shard.shard_dims:
            return "low-bit optimizer state (state_dtype bf16/int8) of FSDP2-sharded params is not supported yet"
    else:
        why = bucket.fused_unsupported()
        if why:
            return why
    return check_fused(kind, cfg, bucket, "cuda", "CUDA", _SCALAR_DTYPES)


#: the ops' ``storage`` code of each state format (lowbit_state.STORAGES; csrc/cuda/launch.h StateFormat)
_STORAGE = {"float32": 0, "bfloat16": 1, "int8": 2}


def _seed(bucket: Bucket) -> int:
    """The 64-bit seed as the int64 the op takes (its bits)."""
    s = bucket.seed & ((1 << 64) - 1)
    return s - (1 << 64) if s >= 1 << 63 else s


#: the weights' norms are read at every step (NOTE [Carried weight norms] is the cpu backend's)
CARRIES_WEIGHT_NORMS = False


# ------------------------------------------------------------------------------------------
# per-bucket cached device tables and scratch (allocated once: nothing allocates in a step)
# ------------------------------------------------------------------------------------------
#: Rows of the address table the kernels read (csrc/cuda/launch.h Row): param, grad, master, then the
#: state buffers of the kind (see _kinds).
_ROWS = ("param", "grad", "master")
#: path codes of the FSDP2 split (csrc/cuda/launch.h Path)
_PARTIALS, _APPLY = 3, 4


def _kinds(bucket: Bucket, kind: str) -> tuple[str, ...]:
    """The address kinds of a step, in the kernels' row order: param, grad, master, the state buffers,
    then for low-bit state the remainders and the int8 scales of each buffer (csrc/cuda/launch.h Lowbit)."""
    if kind == "LAMB":
        names = ("exp_avg", "exp_avg_sq")
    else:
        names = ("momentum_buffer",) if "momentum_buffer" in bucket.state_names else ()
    low = ("remainder",) if bucket.uses_remainder else ()
    if bucket.state_storage == "int8" and bucket.exact_elements:
        low += tuple(n + "_absmax" for n in names)
    return _ROWS + names + low


class _Scratch:
    def __init__(self, bucket: Bucket, kind: str) -> None:
        dev = bucket.device
        self.tiles = bucket.tiles(TILE)
        T, S = self.tiles.num_tiles, bucket.num_segments
        self.kinds = _kinds(bucket, kind)
        self.part = torch.zeros(3 * max(T, 1), dtype=torch.float64, device=dev)
        self.snap = torch.zeros(2 * max(S, 1), dtype=torch.float32, device=dev)
        self.gpart = torch.zeros(max(T, 1), dtype=torch.float64, device=dev)
        self.ssq = torch.zeros((3, S), dtype=torch.float64, device=dev)  # the split's per-segment sums
        self.group_seg = torch.tensor(_groups(bucket, kind), dtype=torch.int64, device=dev)
        self.clip = CachedScalar(dev, torch.float64)  # LAMB's clip_coef when given as a float
        # NOTE [Addresses in a compiled step]: the table of compiled steps
        self.traced_addr = torch.zeros((len(self.kinds), S), dtype=torch.int64, device=dev)
        # the segments' state_dict ids (Philox counter word of low-bit state)
        self.param_ids = torch.tensor(bucket.param_indices, dtype=torch.int64, device=dev)


def _l2_bytes(device: torch.device) -> int:
    """The device's L2 bytes (40 MiB if it cannot say), for the cooperative path's segment groups."""
    try:
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or (40 << 20)
    except Exception:
        return 40 << 20


def _groups(bucket: Bucket, kind: str) -> list[int]:
    """Segment boundaries of groups of consecutive segments whose phase-1 bytes fit in ~half the L2."""
    budget = _l2_bytes(bucket.device) // 2
    item = torch.empty((), dtype=bucket.dtype).element_size()
    bpe = (4 if bucket.uses_masters else item) + item + (8 if kind == "LAMB" else 0)
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
    cache = bucket.cache.setdefault(NAME, {})
    sc = cache.get(kind)
    if sc is None:
        sc = cache[kind] = _Scratch(bucket, kind)
    return sc


def prepare(bucket: Bucket, kind: str, cfg=None) -> list[torch.Tensor]:
    """Allocate the bucket's tables and scratch now (not inside a compiled graph or a CUDA graph
    capture); returns them."""
    sc = _scratch(bucket, kind)
    t = sc.tiles
    return [t.tile_seg, t.tile_start, t.tile_len, t.seg_tile_ptr, sc.part, sc.snap, sc.gpart, sc.group_seg, sc.ssq,
            sc.traced_addr, sc.param_ids]  # fmt: skip


def _addresses(bucket: Bucket, sc: _Scratch) -> torch.Tensor:
    """This step's int64 ``[rows, S]`` address table.

    NOTE: [Addresses in a compiled step] (as fusedlars/backends/triton.py) Eager steps take the table
    from :meth:`Bucket.address_table`. A compiled step cannot: dynamo does not trace ``data_ptr()``, and
    its grads are graph inputs (a new tensor each step after ``zero_grad()``) whose addresses exist only
    at run time. It uses a table of its own (``_Scratch.traced_addr``, allocated by :func:`prepare` in
    the eager prelude, marked static) that the opaque op ``fusedlars::cuda_addresses`` refreshes from the
    tensors themselves before the step's op reads it. Its own: each writer skips the copy when the
    addresses equal the ones *it* wrote last, so a table shared by both kinds of steps could go stale."""
    if torch.compiler.is_compiling():
        torch.ops.fusedlars.cuda_addresses(sc.traced_addr, [t for k in sc.kinds for t in bucket.tensors_of(k)])
        return sc.traced_addr
    return bucket.address_table(sc.kinds)


_last_written: dict[int, tuple[int, ...]] = {}  # traced table's data_ptr -> the addresses the op wrote last


@torch.library.custom_op("fusedlars::cuda_addresses", mutates_args=("table",))
def _cuda_addresses(table: torch.Tensor, tensors: list[torch.Tensor | None]) -> None:
    """Writes the base addresses of ``tensors`` (0 for None), row-major, into ``table`` when they
    differ from what this op wrote there last (NOTE [Addresses in a compiled step]). Opaque: never traced."""
    ptrs = tuple(0 if t is None else t.data_ptr() for t in tensors)
    if _last_written.get(table.data_ptr()) != ptrs:
        table.copy_(torch.tensor(ptrs, dtype=torch.int64).view(table.shape))
        _last_written[table.data_ptr()] = ptrs


_cuda_addresses.register_fake(lambda table, tensors: None)


def _lists(bucket: Bucket, sc: _Scratch) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(params, grads, state) of the op: what a step writes and reads, as alias information (the
    kernels reach every tensor through the address table): the state holds the masters, then the
    tensors of every row past the master row (state buffers, remainders, int8 scales)."""
    grads = [g for g in bucket.grad_tensors if g is not None]
    state = [m for m in bucket.master_tensors if m is not None] if bucket.master_tensors is not None else []
    for name in sc.kinds[len(_ROWS) :]:
        state += [t for t in bucket.tensors_of(name) if t is not None]
    return bucket.param_tensors, grads, state


def _lr(lr) -> tuple[torch.Tensor | None, float]:
    if isinstance(lr, torch.Tensor):
        return lr.detach().reshape(-1), 0.0
    return None, float(lr)


def _check(kind: str, cfg, bucket: Bucket) -> None:
    why = supports(kind, cfg, bucket)
    if why:
        raise RuntimeError(f"{kind}: backend='cuda' cannot run this bucket: {why}.")


def _given_sums(bucket: Bucket, ssq: torch.Tensor) -> torch.Tensor:
    S = bucket.num_segments
    if tuple(ssq.shape) != (3, S):
        raise ValueError(f"the per-segment sums of squares must have shape (3, {S}), got {tuple(ssq.shape)}")
    return ssq.to(device=bucket.device, dtype=torch.float64).contiguous()


def _step_args(kind: str, bucket: Bucket, cfg, path: int, ssq: torch.Tensor | None) -> tuple[_Scratch, dict]:
    """The bucket's scratch and the arguments of ``kind``'s step op by parameter name (:func:`step_params`)."""
    _check(kind, cfg, bucket)
    sc = _scratch(bucket, kind)
    tt = sc.tiles
    hyper, modes = lamb_options(cfg) if kind == "LAMB" else lars_options(cfg)
    clip = cfg.clip_coef if kind == "LAMB" else None  # LAMB's clip_coef: a float goes through a cached tensor
    if clip is not None and not isinstance(clip, torch.Tensor):
        clip = sc.clip(clip)
    lr_t, lr = _lr(cfg.lr)
    params, grads, state = _lists(bucket, sc)
    args = dict(
        params=params, grads=grads, state=state, addresses=_addresses(bucket, sc), master=bucket.uses_masters,
        wd_mask=bucket.wd_mask, adapt_mask=bucket.adapt_mask, active=bucket.active, has_state=bucket.has_state,
        step=bucket.step, w_norm=bucket.w_norm, g_norm=bucket.g_norm, u_norm=bucket.u_norm,
        trust_ratio=bucket.trust_ratio, tile_seg=tt.tile_seg, tile_start=tt.tile_start, tile_len=tt.tile_len,
        seg_tile_ptr=tt.seg_tile_ptr, group_seg=sc.group_seg, partials=sc.part, snap=sc.snap, ssq=ssq,
        lr_tensor=lr_t, lr=lr, inv_scale=cfg.inv_scale, found_inf=cfg.found_inf, hyper=hyper, modes=modes, path=path,
    )  # fmt: skip
    args.update(param_ids=None, storage=0, remainder=False, seed=0)  # the fp32 kernels
    if bucket.exact_elements:
        args.update(param_ids=sc.param_ids, storage=_STORAGE[bucket.state_storage], remainder=bucket.uses_remainder,
                    seed=_seed(bucket))  # fmt: skip
    if kind == "LAMB":
        args["clip_coef"] = clip
    return sc, args


def _step(kind: str, bucket: Bucket, cfg, path: int, ssq: torch.Tensor | None) -> _Scratch:
    sc, args = _step_args(kind, bucket, cfg, path, ssq)
    getattr(_ops(), STEP_OPS[kind])(*[args[n] for n in _PARAMS[kind]])
    return sc


def lars_step(bucket: Bucket, cfg: LarsConfig) -> None:
    """One LARS step of the bucket: 1 cooperative launch, or 2 (``FUSEDLARS_CUDA_PATH``)."""
    _step("LARS", bucket, cfg, _path_code(), None)


def lamb_step(bucket: Bucket, cfg: LambConfig) -> None:
    """One LAMB step of the bucket: 1 cooperative launch, or 2 (``FUSEDLARS_CUDA_PATH``)."""
    _step("LAMB", bucket, cfg, _path_code(), None)


# NOTE: [Partials and apply] (fusedlars/backends/torch.py states the convention)
# ``*_partials(bucket, cfg) -> (ssq, ctx)`` runs launch 1 of the two-launch path (per-tile partials;
# LAMB also writes the new moments, which do not depend on the norms) and one more launch that reduces
# each segment's partials, in the fixed order a whole step uses, into ``ssq``: float64 ``[3, S]``,
# rows LARS ``[w², g², (g+λw)²]`` (g = grad * inv_scale), LAMB ``[w_d², u², g²]``, 0 for a segment
# without a grad. ``*_apply(bucket, cfg, ssq, ctx)`` runs launch 2 from the given (all-reduced) sums.
# Unreduced, apply(partials) is bitwise the step (the same sums, the same element math). ``ssq`` is
# the bucket's scratch: the next partials call of the bucket overwrites it. float64, as the kernels'
# own sums: rounding them to fp32 would make a sharded step differ from an unsharded one.


def lars_partials(bucket: Bucket, cfg: LarsConfig) -> tuple[torch.Tensor, None]:
    """Per-segment sums of squares ``[w², g², (g+λw)²]`` (float64 ``[3, S]``) and the context (None)."""
    sc = _step("LARS", bucket, cfg, _PARTIALS, _scratch(bucket, "LARS").ssq)
    return sc.ssq, None


def lars_apply(bucket: Bucket, cfg: LarsConfig, ssq: torch.Tensor, ctx=None) -> None:
    """The LARS update from the per-segment sums of squares ``ssq`` (global ones for a sharded bucket)."""
    _step("LARS", bucket, cfg, _APPLY, _given_sums(bucket, ssq))


def lamb_partials(bucket: Bucket, cfg: LambConfig) -> tuple[torch.Tensor, None]:
    """Per-segment sums of squares ``[w_d², u², g²]`` (float64 ``[3, S]``) and the context (None); the
    moments are updated in place."""
    sc = _step("LAMB", bucket, cfg, _PARTIALS, _scratch(bucket, "LAMB").ssq)
    return sc.ssq, None


def lamb_apply(bucket: Bucket, cfg: LambConfig, ssq: torch.Tensor, ctx=None) -> None:
    """The LAMB update from the per-segment sums of squares ``ssq`` (global ones for a sharded bucket)."""
    _step("LAMB", bucket, cfg, _APPLY, _given_sums(bucket, ssq))


#: the path flag of a LARS step from grad sums taken in backward (csrc/cuda/launch.h kPathGivenG2)
_GIVEN = 8


def _declines_given(bucket: Bucket, cfg: LarsConfig, g2: torch.Tensor) -> bool:
    """Whether a LARS step cannot use grad sums taken in backward: its ratio needs ||g + lam*w||
    (norm_of_sum), which only a pass over the grads gives, or the bucket has low-bit state."""
    if tuple(g2.shape) != (bucket.num_segments,):
        raise ValueError(f"the grads' sums of squares must have shape ({bucket.num_segments},), got {tuple(g2.shape)}")
    return cfg.denominator == "norm_of_sum" or bucket.exact_elements


def lars_step_given_grad_sums(bucket: Bucket, cfg: LarsConfig, g2: torch.Tensor) -> bool:
    """A LARS step whose raw grads' sums of squares ``g2`` (float64 [S]) were taken in backward
    (fusedlars.backward_norms): the same launches as :func:`lars_step` (1 cooperative, or 2), whose
    pass 1 sums the weights alone and loads no grad; the g^2 row is ``g2 * inv_scale^2`` in float64 on
    the device, the reported u_norm NaN (NOTE [Grad sums from backward] in csrc/cuda/fused_kernels.cu).
    Given the g^2 the step's own pass takes, bitwise :func:`lars_step`. False (nothing done) where the
    ratio needs ||g + lam*w|| (norm_of_sum) or the bucket has low-bit state."""
    if _declines_given(bucket, cfg, g2):
        return False
    g2 = g2.to(device=bucket.device, dtype=torch.float64).contiguous()
    _step("LARS", bucket, cfg, _path_code() | _GIVEN, g2)
    return True


def lars_partials_given_grad_sums(
    bucket: Bucket, cfg: LarsConfig, g2: torch.Tensor
) -> tuple[torch.Tensor, None] | None:
    """:func:`lars_partials` of a sharded bucket whose LOCAL raw grads' sums of squares ``g2`` (float64
    [S]) were taken where FSDP2 set the reduce-scattered grads (fusedlars.backward_norms): launch 1
    sums the weights alone (no grad is loaded), the reduction takes row 1 from ``g2`` (scaled by
    inv_scale^2); the (g + lam*w)^2 row is NaN (only reported, as u_norm). None (nothing done) where
    :func:`lars_step_given_grad_sums` declines."""
    if _declines_given(bucket, cfg, g2):
        return None
    sc = _scratch(bucket, "LARS")
    sc.ssq[1].copy_(g2)  # read by the reduction, then overwritten with the scaled sums
    _step("LARS", bucket, cfg, _PARTIALS | _GIVEN, sc.ssq)
    return sc.ssq, None


def grad_sumsq(bucket: Bucket, cfg) -> torch.Tensor:
    """Sum over active segments of ||grad * inv_scale||^2, as a float64 0-dim tensor on the device."""
    sc = _scratch(bucket, "LAMB")
    tt = sc.tiles
    grads = [g for g in bucket.grad_tensors if g is not None]
    return _ops().grad_sumsq_cuda(
        grads, _addresses(bucket, sc), bucket.active, tt.tile_seg, tt.tile_start, tt.tile_len, sc.gpart, cfg.inv_scale
    )
