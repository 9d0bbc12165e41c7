"""Fused CPU backend: the C++ kernels of ``fusedlars._C`` (csrc/cpu, math in csrc/lars_math.h).

Same math as :mod:`fusedlars.backends.reference` (which states the formulas), computed in fp32
with norms accumulated per fixed-size tile and reduced in a fixed order (bitwise reproducible for
any thread count), SIMD chosen at run time (AVX-512, AVX2 or generic x86-64), threads from
``torch.get_num_threads()``. One step of a bucket is one call into C++:

* LARS: pass 1 sums w^2, g^2 and (g + wd*w)^2 per tile; per-layer trust ratios; pass 2 updates
  params (and fp32 master weights) and the momentum buffer, and sums the new w^2, which the next
  step uses instead of reading w again (NOTE [Carried weight norms]; bitwise the same results):
  pass 1 then reads only g. Layers are grouped so that pass 2 finds pass 1's data in cache:
  20 B/param from DRAM (fp32), 24 for a layer larger than the cache (28 without carried norms).
* LAMB: pass 1 updates the moments in place and sums w^2, g^2 and u^2 of the Adam direction u;
  pass 2 recomputes u from the new moments and updates the weights (no scratch buffer):
  28 B/param from cache, 40 from DRAM.

fp32, bf16 and fp16 params (fp32 state, optional fp32 master weights) are fused; fp64 buckets and
non-CPU buckets are not (:func:`supports` gives the reason, ``backend='auto'`` then uses ``torch``).

Low-bit state (issue #26: ``state_dtype`` bf16 / int8) and ``master_weights="remainder"`` run in the
exact kernels (``lars_step_lowbit_cpu`` / ``lamb_step_lowbit_cpu``, csrc/cpu/exact_impl.h): the same
plan and per-layer scalars, the element math in fp32 as the reference states it (csrc/lars_math.h NOTE
[Low-bit element math in fp32]), the state stored
through csrc/lowbit.h (bitwise lowbit.py), so the stored state is the reference's bit for bit given the
same per-layer norms (csrc/cpu/exact_impl.h NOTE [What "bitwise" means for the cpu backend's low-bit
state]). Whole steps only (LARS may take the gradient norms from backward and carry the weight norms:
csrc/cpu/exact_impl.h NOTE [Carried weight norms of the exact step]); sharded (FSDP2) buckets and
compiled steps are refused, as the torch backend refuses them.

Eager steps call the ops' CPU kernels directly (fusedlars.host.call: csrc/host.cpp NOTE [Direct
calls]); compiled steps, and calls under a TorchDispatchMode, go through ``torch.ops``.
"""

from __future__ import annotations

import torch

from .. import host
from ..buckets import Bucket
from .config import CachedScalar, LambConfig, LarsConfig, check_fused
from .packing import lamb_options, lars_options

NAME = "cpu"

_OPS = ("lars_step_cpu", "lamb_step_cpu", "grad_sumsq_cpu", "cpu_isa", "lars_step_lowbit_cpu", "lamb_step_lowbit_cpu")


def _load() -> str | None:
    """None when the extension and its ops are there, else why not."""
    try:
        import fusedlars._C  # noqa: F401  (loads the op registrations)
    except Exception as e:  # ImportError, or an undefined symbol from a torch mismatch
        return f"fusedlars._C does not import ({type(e).__name__}: {e}); build it with `pip install --no-build-isolation -e .`"
    missing = [op for op in _OPS if not hasattr(torch.ops.fusedlars, op)]
    if missing:
        return f"fusedlars._C lacks the ops {missing}: it was built from older sources, rebuild it"
    return None


_WHY_NOT = _load()


def _register_fakes() -> None:
    """Fake (meta) kernels, so the ops trace under torch.compile / FakeTensor (see torch.library.opcheck)."""

    def _step_fake(*args, **kwargs):  # the step ops return nothing (they write their arguments)
        return None

    for op in ("lars_step_cpu", "lamb_step_cpu", "lars_step_lowbit_cpu", "lamb_step_lowbit_cpu"):
        torch.library.register_fake(f"fusedlars::{op}")(_step_fake)

    @torch.library.register_fake("fusedlars::grad_sumsq_cpu")
    def _sumsq_fake(grads, inv_scale):
        return torch.empty((), dtype=torch.float64, device="cpu")


if _WHY_NOT is None:
    _register_fakes()


def available() -> tuple[bool, str]:
    if _WHY_NOT is not None:
        return False, _WHY_NOT
    return True, f"fused C++ kernels, {isa()} SIMD, {torch.get_num_threads()} threads"


_ISA: list[str] = []


def isa() -> str:
    """The kernel table (avx512 | avx2 | generic) chosen at the first call (FUSEDLARS_CPU_ISA or the
    CPU), asked once: ``available()`` runs at every step's backend choice. (Tests that switch tables
    with ``torch.ops.fusedlars.cpu_isa(want)`` switch back before this is read again.)"""
    if not _ISA:
        _ISA.append(torch.ops.fusedlars.cpu_isa(""))
    return _ISA[0]


def supports(kind: str, cfg, bucket: Bucket) -> str | None:
    """None when this bucket and configuration run fused here, else the reason."""
    if _WHY_NOT is not None:
        return _WHY_NOT
    if bucket.exact_elements:
        if bucket.shard is not None and bucket.shard.shard_dims:
            return "low-bit optimizer state (state_dtype bf16/int8) of FSDP2-sharded params is not supported yet"
        if torch.compiler.is_compiling():
            return "low-bit optimizer state (state_dtype bf16/int8) does not run in a compiled step yet"
    return check_fused(kind, cfg, bucket, "cpu", "CPU")


#: the ops' ``storage`` code of each state format (lowbit_state.STORAGES; csrc/cpu/kernels.h Storage)
_STORAGE = {"float32": 0, "bfloat16": 1, "int8": 2}


def _param_ids(bucket: Bucket) -> torch.Tensor:
    """int64 [S]: each segment's state_dict id (the Philox counter's param word), cached."""
    t = bucket.cache.get("cpu_param_ids")
    if t is None:
        t = bucket.cache["cpu_param_ids"] = torch.tensor(bucket.param_indices, dtype=torch.int64)
    return t


def _seed(bucket: Bucket) -> int:
    """The 64-bit seed as the int64 the op takes (its bits)."""
    s = bucket.seed & ((1 << 64) - 1)
    return s - (1 << 64) if s >= 1 << 63 else s


def _lowbit_lists(bucket: Bucket, names: tuple[str, ...]) -> list[list[torch.Tensor]]:
    """Remainders, then per state name its tensors and (int8) its scales."""
    (rem,) = _lists(bucket, "remainder") if bucket.uses_remainder else ([],)
    out = [rem]
    for n in names:
        (st,) = _lists(bucket, n)
        out.append(st)
        out.append(_lists(bucket, n + "_absmax")[0] if bucket.state_storage == "int8" else [])
    return out


class _Scalars:
    """Per-bucket 0-dim float64 tensors for float ``lr`` / ``clip_coef`` (no allocation per step)."""

    def __init__(self) -> None:
        self.lr = CachedScalar(torch.device("cpu"), torch.float64, ())
        self.clip = CachedScalar(torch.device("cpu"), torch.float64, ())


def _scalars(bucket: Bucket) -> _Scalars:
    sc = bucket.cache.get(NAME)
    if sc is None:
        sc = bucket.cache[NAME] = _Scalars()
    return sc


def _lr(lr, bucket: Bucket | None = None) -> torch.Tensor:
    """lr as the ops take it: a 0-dim float64 tensor (a float lr goes into the bucket's cached one)."""
    if isinstance(lr, torch.Tensor):
        return lr.detach().reshape(())
    if bucket is None:
        return torch.tensor(float(lr), dtype=torch.float64)
    return _scalars(bucket).lr(lr)


def prepare(bucket: Bucket, kind: str, cfg=None) -> list[torch.Tensor]:
    """Build the bucket's cached scalars now (a compiled step must not create them in its graph)."""
    sc = _scalars(bucket)
    return [sc.lr.tensor, sc.clip.tensor]


#: lars_step carries ||w||^2 from one step to the next (NOTE [Carried weight norms], csrc/cpu/optim_cpu.cpp)
CARRIES_WEIGHT_NORMS = True


def _lists(bucket: Bucket, *names: str) -> list[list[torch.Tensor]]:
    """The active segments' tensors of each address kind (``[]`` for a kind the bucket has none of)."""
    idx = bucket.active_idx
    out = []
    for kind in names:
        if kind == "master" and bucket.master_tensors is None:
            out.append([])
        else:
            src = bucket.tensors_of(kind)
            out.append([src[i] for i in idx])
    return out


def _lars(bucket: Bucket, cfg: LarsConfig, phase: int, sums: torch.Tensor | None) -> None:
    hyper, modes = lars_options(cfg)
    if bucket.exact_elements:
        if phase not in (0, 3):
            raise RuntimeError("fusedlars cpu: low-bit state steps whole (no partials/apply split)")
        names = ("momentum_buffer",) if cfg.uses_buffer else ()
        params, grads, masters = _lists(bucket, "param", "grad", "master")
        rem, *st = _lowbit_lists(bucket, names)
        mom, mabs = st if st else ([], [])
        wss = bucket.carry_buffer() if cfg.carry_w else None
        torch.ops.fusedlars.lars_step_lowbit_cpu(
            params, grads, masters, rem, mom, mabs, bucket.active_ids(), _param_ids(bucket), bucket.wd_mask,
            bucket.adapt_mask, bucket.has_state, bucket.step, bucket.w_norm, bucket.g_norm, bucket.u_norm,
            bucket.trust_ratio, _lr(cfg.lr, bucket), cfg.inv_scale, cfg.found_inf, wss, sums if phase == 3 else None,
            _STORAGE[bucket.state_storage], _seed(bucket), hyper, modes,
        )  # fmt: skip
        return
    wss = bucket.carry_buffer() if cfg.carry_w else None
    mom = ("momentum_buffer",) if cfg.uses_buffer else ()
    params, grads, masters, *moms = _lists(bucket, "param", "grad", "master", *mom)
    host.call(
        "lars_step_cpu", params, grads, masters, moms[0] if moms else [], bucket.active_ids(), bucket.wd_mask, bucket.adapt_mask,
        bucket.has_state, bucket.step, bucket.w_norm, bucket.g_norm, bucket.u_norm, bucket.trust_ratio,
        _lr(cfg.lr, bucket), cfg.inv_scale, cfg.found_inf, wss, sums, phase, hyper, modes,
    )  # fmt: skip


def _lamb(bucket: Bucket, cfg: LambConfig, phase: int, sums: torch.Tensor | None) -> None:
    hyper, modes = lamb_options(cfg)
    clip = cfg.clip_coef
    if clip is not None and not isinstance(clip, torch.Tensor):
        clip = _scalars(bucket).clip(clip)
    if bucket.exact_elements:
        if phase != 0:
            raise RuntimeError("fusedlars cpu: low-bit state steps whole (no partials/apply split)")
        params, grads, masters = _lists(bucket, "param", "grad", "master")
        rem, m, ma, v, va = _lowbit_lists(bucket, ("exp_avg", "exp_avg_sq"))
        torch.ops.fusedlars.lamb_step_lowbit_cpu(
            params, grads, masters, rem, m, ma, v, va, bucket.active_ids(), _param_ids(bucket), bucket.wd_mask,
            bucket.adapt_mask, bucket.has_state, bucket.step, bucket.w_norm, bucket.g_norm, bucket.u_norm,
            bucket.trust_ratio, _lr(cfg.lr, bucket), cfg.inv_scale, cfg.found_inf, clip,
            _STORAGE[bucket.state_storage], _seed(bucket), hyper, modes,
        )  # fmt: skip
        return
    params, grads, masters, m, v = _lists(bucket, "param", "grad", "master", "exp_avg", "exp_avg_sq")
    host.call(
        "lamb_step_cpu", params, grads, masters, m, v, bucket.active_ids(), bucket.wd_mask, bucket.adapt_mask,
        bucket.has_state, bucket.step, bucket.w_norm, bucket.g_norm, bucket.u_norm, bucket.trust_ratio,
        _lr(cfg.lr, bucket), cfg.inv_scale, cfg.found_inf, clip, sums, phase, hyper, modes,
    )  # fmt: skip


def lars_step(bucket: Bucket, cfg: LarsConfig) -> None:
    _lars(bucket, cfg, 0, None)


def lamb_step(bucket: Bucket, cfg: LambConfig) -> None:
    _lamb(bucket, cfg, 0, None)


# NOTE [Partials and apply] (fusedlars/backends/torch.py) on the C++ kernels: NOTE [Phases] in
# csrc/cpu/optim_cpu.cpp. The sums are float64 [3, S] (zero for segments without a grad, so that a
# sharded bucket's all_reduce adds nothing for them); apply reads them after the all_reduce.


def lars_step_given_grad_sums(bucket: Bucket, cfg: LarsConfig, g2: torch.Tensor) -> bool:
    """A LARS step whose gradients' sums of squares ``g2`` (float64 [S], of the raw grads) were taken in
    backward (fusedlars.backward_norms): NOTE [Phases]' phase 3, in which no segment reads its gradient
    for the norms (pass 1 skips a carried segment and sums only the weights of the others, unless they
    have fp32 masters). Low-bit state and remainder masters: the exact step's pass 1 sums only the
    weights, or nothing where they are carried (csrc/cpu/exact_impl.h NOTE [Carried weight norms of the
    exact step]). False (nothing done) where the ratio needs ||g + lam*w|| (norm_of_sum)."""
    if cfg.denominator == "norm_of_sum":
        return False
    sums = torch.zeros((3, bucket.num_segments), dtype=torch.float64)
    sums[1] = g2 if cfg.inv_scale is None else g2 * cfg.inv_scale.double().square()
    _lars(bucket, cfg, 3, sums)
    return True


def lars_partials_given_grad_sums(
    bucket: Bucket, cfg: LarsConfig, g2: torch.Tensor
) -> tuple[torch.Tensor, tuple] | None:
    """:func:`lars_partials` of a sharded bucket whose LOCAL gradients' sums of squares ``g2`` (float64
    [S], raw grads, by ``grad_sumsq_cpu``) were taken where FSDP2 set the reduce-scattered grads
    (fusedlars.backward_norms): no gradient is read. The weights' (or fp32 masters') sums are the
    carried ones (carry_w) or ``grad_sumsq_cpu``'s, bitwise pass 1's w^2 (NOTE [Phases]), so a
    carried segment reads nothing here; the (g + lam*w)^2 row is NaN (only
    reported, as u_norm), as for a carried segment. None where the ratio needs ||g + lam*w|| or the
    bucket has low-bit state."""
    if cfg.denominator == "norm_of_sum" or bucket.exact_elements:
        return None
    idx = list(bucket.active_idx)
    if not idx:
        return None
    params, masters = _lists(bucket, "param", "master")
    ws = [m if m is not None else p for p, m in zip(params, masters or [None] * len(params))]
    # a carried ||w||^2 (NOTE [Carried weight norms]: valid where not negative) is bitwise the sum
    carried = bucket.carry_buffer()[idx].tolist() if cfg.carry_w else [-1.0] * len(idx)
    sums = torch.zeros((3, bucket.num_segments), dtype=torch.float64)
    sums[0, idx] = torch.tensor(
        [c if c >= 0 else float(host.call("grad_sumsq_cpu", [w], None)) for c, w in zip(carried, ws)],
        dtype=torch.float64,
    )
    sums[1] = g2 if cfg.inv_scale is None else g2 * cfg.inv_scale.double().square()
    sums[2, idx] = float("nan")
    return sums, ()


def lars_partials(bucket: Bucket, cfg: LarsConfig) -> tuple[torch.Tensor, tuple]:
    """Per-segment sums of squares ``[w², g², (g+λw)²]`` (g = grad * inv_scale) as a float64 ``[3, S]`` tensor."""
    sums = torch.zeros((3, bucket.num_segments), dtype=torch.float64)
    _lars(bucket, cfg, 1, sums)
    return sums, ()


def lars_apply(bucket: Bucket, cfg: LarsConfig, ssq: torch.Tensor, ctx: tuple) -> None:
    """The LARS update from the (all-reduced) per-segment sums ``ssq`` of :func:`lars_partials`."""
    _lars(bucket, cfg, 2, ssq.to(torch.float64).contiguous())


def lamb_partials(bucket: Bucket, cfg: LambConfig) -> tuple[torch.Tensor, tuple]:
    """Per-segment sums ``[w_d², u², g²]`` as a float64 ``[3, S]`` tensor; updates the moments in place."""
    sums = torch.zeros((3, bucket.num_segments), dtype=torch.float64)
    _lamb(bucket, cfg, 1, sums)
    return sums, ()


def lamb_apply(bucket: Bucket, cfg: LambConfig, ssq: torch.Tensor, ctx: tuple) -> None:
    """The LAMB weight update from the (all-reduced) sums of :func:`lamb_partials`."""
    _lamb(bucket, cfg, 2, ssq.to(torch.float64).contiguous())


def grad_sumsq(bucket: Bucket, cfg) -> torch.Tensor:
    """Sum over active segments of ||grad * inv_scale||^2, as a float64 0-dim tensor."""
    (grads,) = _lists(bucket, "grad")
    return host.call("grad_sumsq_cpu", grads, cfg.inv_scale)
