"""Reference backend: float64, one parameter at a time, a plain transcription of the formulas.

This module is the specification in code. Every other backend is tested against it. Two
definitions it shares with the ``torch`` backend live in :mod:`.formulas` (the TVLARS factor
``phi_t`` and the meaning of each ``trust_clip`` kind; that module says why); the rest of the step
is transcribed here line by line.
It is written for clarity, not speed, but it still makes no host sync (guards are
``torch.where``, per-step values stay tensors).

LARS, per layer (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional
Networks", arXiv:1708.03888, eq. 6 and Alg. 1; the variants are the options of fusedlars/optim/options.py):

    g   = grad * inv_scale, negated if maximize        (GradScaler unscale inside the step)
    lam = weight_decay if the layer is not excluded from decay else 0
    ||w||, ||g||, ||g + lam*w||                        (norms of the unscaled gradient)
    n_w = clamp(||w||), n_d = clamp(||g|| or ||g + lam*w||)        (norm_clamp, TVLARS: [0, 10])
    denominator  sum_of_norms: n_d + lam*n_w + eps | norm_of_sum: n_d + eps | grad_only: n_d + eps
    r   = eta * phi_t * n_w / denominator,  phi_t = 1/(alpha + exp(lmbda*(t - shift))) + gamma_min
          (TVLARS, "Revisiting LARS for Large Batch Training Generalization of Neural Networks";
           phi = 1 for plain LARS and while t < gate)
    ok  = ||w|| > 0 and (||g|| | gradient-side norm | denominator) > 0       (zero_norm_check)
    not adapted: r = 1;  ok: r = clip(r);  not ok: zero_norm 'one' -> r = clip(1), 'skip' -> r = 1, lam = 0
    clip  larc: min(r/lr, 1) (apex LARC) | lambc: min(r, 1) | range: clamp(r, lo, hi)
    g'  = r*(g + lam*w)  (l2)  |  r*g  (ratio_only, decoupled)
    torch momentum:   b = mu*b + (1-d)*g'  (first step: b = g' [clone] or (1-d)*g' [zeros])
                      step = g' + mu*b (nesterov) or b;      w <- w - lr*step
    classic momentum: v = mu*v + lr*g';  step = lr*g' + mu*v (nesterov) or v;   w <- w - step
    decoupled decay:  w <- w - lr*lam*w_old  in addition

LAMB, per layer (You et al. 2019, "Large Batch Optimization for Deep Learning", Alg. 2):

    g   = grad * inv_scale / clip_coef, negated if maximize   (clip_coef: global grad-norm clip)
    l2 mode: g <- g + lam*w
    m = b1*m + b3*g;  v = b2*v + (1-b2)*g^2;  t = step + 1
    both:  u = (m/(1-b1^t)) / (sqrt(v/(1-b2^t) + eps_root) + eps)
    none / first_outside / both_outside:  u = m / (sqrt(v + eps_root) + eps)   (raw moments)
    in_update mode: u <- u + lam*w;   decoupled mode: w <- w*(1 - lr*lam) first
    r = clamp(||w||) / (||u|| + trust_ratio_eps) if both norms > 0 else 1;  r = clip(r);  r = 1 if not adapted
    w <- w - lr * s * r * u,   s = 1/(1-b1^t) for first_outside (pytorch_optimizer),
                               sqrt(1-b2^t)/(1-b1^t) for both_outside (DeepSpeed FusedLamb <= v0.19.6), else 1

Low-bit state (issue #26, ``state_dtype`` bf16 / int8) and remainder masters: b, m, v above are the
stored state dequantized exactly, the norms and per-layer scalars are the same float64 computation, and
the element math is the fp32 kernels' own, one fp32 operation at a time (:func:`lars_update32`,
:func:`lamb_update32`; csrc/lars_math.h NOTE [Low-bit element math in fp32]); the new value is then
quantized (fusedlars.backends.lowbit_state, NOTE [Low-bit state: where values become fp32]). Remainder masters
(``master_weights="remainder"``): w is the fp32 master rebuilt from the bf16 param and its remainder, and
the new master is split back (fusedlars.backends.lowbit, NOTE [Master split]).

The per-layer scalars (the trust ratio, LAMB's bias corrections) are the functions
:func:`lars_layer_scalars`, :func:`lamb_bias_corrections` and :func:`lamb_layer_scalars`, on 0-dim
float64 tensors; the torch backend's low-bit step calls the same functions, so that its per-layer
values are the reference's bit for bit given the same norms.
"""

from __future__ import annotations

import torch

from ..buckets import Bucket
from . import lowbit, lowbit_state
from .config import LambConfig, LarsConfig
from .formulas import trust_clip, tv_phi_tensor  # noqa: F401  (shared definitions: see .formulas)

NAME = "reference"


def available() -> tuple[bool, str]:
    return True, "pure PyTorch, float64, one parameter at a time (the specification)"


# The backend contract (fusedlars.backends.protocol.Backend): every configuration runs here, nothing is
# cached per bucket, no weight norms are carried, and there is no partials/apply split (FSDP2).
def supports(kind: str, cfg, bucket: Bucket) -> str | None:
    return None


def prepare(bucket: Bucket, kind: str, cfg=None) -> list[torch.Tensor]:
    return []


CARRIES_WEIGHT_NORMS = False
lars_partials = lars_apply = lamb_partials = lamb_apply = None
lars_step_given_grad_sums = None  # the specification takes every norm itself


def _f64(x):
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64).reshape(())
    return torch.tensor(float(x), dtype=torch.float64)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return (
        torch.linalg.vector_norm(x.reshape(-1), dtype=torch.float64)
        if x.numel()
        else x.new_zeros((), dtype=torch.float64)
    )


def _grad(bucket: Bucket, i: int, cfg) -> torch.Tensor:
    g = bucket.grad_tensors[i].detach().to(torch.float64)
    if cfg.inv_scale is not None:
        g = g * _f64(cfg.inv_scale).to(g.device)
    if getattr(cfg, "clip_coef", None) is not None:
        g = g / _f64(cfg.clip_coef).to(g.device)
    if cfg.maximize:
        g = -g
    return g


def _weights(bucket: Bucket, i: int) -> torch.Tensor:
    return bucket.weights(i).detach().to(torch.float64)


def _write(bucket: Bucket, i: int, w_new: torch.Tensor, keep: torch.Tensor) -> None:
    """Store new weights (and master weights) unless ``keep`` (skip) is true."""
    if bucket.remainder_tensors is not None:
        # the new fp32 master, split into the bf16 param and its remainder (lowbit NOTE [Master split])
        old = bucket.weights(i)
        m32 = torch.where(keep, old.to(torch.float64), w_new).to(torch.float32)
        p, r = lowbit.master_split(m32)
        bucket.param_tensors[i].copy_(p.view(old.shape))
        bucket.remainder_tensors[i].copy_(r.view(old.shape))
    elif bucket.master_tensors is not None:
        mv = bucket.master_tensors[i]
        mv.copy_(torch.where(keep, mv.to(torch.float64), w_new).to(mv.dtype))
        bucket.param_tensors[i].copy_(mv.to(bucket.dtype))
    else:
        pv = bucket.param_tensors[i]
        pv.copy_(torch.where(keep, pv.to(torch.float64), w_new).to(pv.dtype))


def _state(bucket: Bucket, name: str, i: int) -> torch.Tensor:
    """The stored state buffer ``name`` of segment i, dequantized exactly, in float64."""
    v = bucket.state_tensors[name][i].detach()
    scales = bucket.scale_tensors.get(name)
    return lowbit_state.decode(name, v, None if scales is None else scales[i]).to(torch.float64)


def _store(bucket: Bucket, name: str, i: int, new: torch.Tensor, keep: torch.Tensor) -> None:
    """Store the new value ``new`` (float64) of state buffer ``name`` of segment i unless ``keep``:
    rounded to the state dtype, or (low-bit state) to fp32 and then quantized (lowbit_state NOTE [Low-bit
    state: where values become fp32])."""
    buf = bucket.state_tensors[name][i]
    storage = bucket.state_storage
    if storage == "float32":
        buf.copy_(torch.where(keep, buf.to(torch.float64), new).to(buf.dtype))
        return
    # fp32 (one rounding), its elements in the param's memory order (lowbit_state.mem_flat)
    x32 = lowbit_state.mem_flat(torch.empty_like(buf, dtype=torch.float32).copy_(new))
    out = torch.empty_like(buf)
    if storage == "bfloat16":
        elem = torch.arange(x32.numel(), dtype=torch.int64, device=x32.device)
        step = (bucket.step[i] + 1).to(torch.int64)  # the step count once this step is done
        rand = lowbit_state.sr_bits(bucket.seed, step, bucket.param_indices[i], elem, name)
        lowbit_state.mem_flat(out).copy_(lowbit.round_bf16_stochastic(x32, rand))
        buf.copy_(torch.where(keep, buf, out))
        return
    codes, scales = lowbit.quantize_blockwise(x32, lowbit_state.SIGNED[name])
    lowbit_state.mem_flat(out).copy_(codes)
    sbuf = bucket.scale_tensors[name][i]
    buf.copy_(torch.where(keep, buf, out))
    sbuf.copy_(torch.where(keep, sbuf, scales))


def _keep(bucket: Bucket, i: int, cfg) -> torch.Tensor:
    """True when the segment must not change: GradScaler found an inf (segments without a grad are
    not visited at all)."""
    keep = torch.zeros((), dtype=torch.bool, device=bucket.device)
    if cfg.found_inf is not None:
        keep = keep | (cfg.found_inf.reshape(()).to(bucket.device) != 0)
    return keep


def lars_step(bucket: Bucket, cfg: LarsConfig) -> None:
    lr = _f64(cfg.lr).to(bucket.device)
    for i in bucket.active_idx:  # a param without a grad is skipped (torch.optim)
        keep = _keep(bucket, i, cfg)
        w = _weights(bucket, i)
        g = _grad(bucket, i, cfg)
        lam = cfg.weight_decay * bucket.wd_mask[i].to(torch.float64)
        adapt = bool(cfg.adapt_enabled) & (bucket.adapt_mask[i] != 0)
        n_w_raw, n_g_raw = _norm(w), _norm(g)
        n_u_raw = _norm(g + lam * w)
        t = bucket.step[i].to(torch.float64)
        r, lam_eff = lars_layer_scalars(cfg, lr, lam, adapt, n_w_raw, n_g_raw, n_u_raw, t)
        has = bucket.has_state[i] != 0
        if bucket.exact_elements:  # low-bit state, remainder masters: NOTE [Low-bit element math in fp32]
            c = lars_coef32(cfg, lr, r, lam_eff, has)
            b = _state(bucket, "momentum_buffer", i).to(torch.float32) if cfg.momentum != 0 else None
            g32 = bucket.grad_tensors[i].detach().to(torch.float32) * gscale32(cfg, w.device)
            w_new, b_new = lars_update32(cfg, c, w.to(torch.float32), g32, b)
            if b_new is not None:
                _store(bucket, "momentum_buffer", i, b_new.to(torch.float64), keep)
            _write(bucket, i, w_new.to(torch.float64), keep)
            _finish(bucket, i, keep, n_w_raw, n_g_raw, n_u_raw, r)
            continue
        if cfg.weight_decay_mode == "l2":
            gp = r * (g + lam_eff * w)
        else:
            gp = r * g
        if cfg.momentum != 0:
            b = _state(bucket, "momentum_buffer", i)
            b_new, step = lars_momentum(cfg, lr, b, gp, has)
            _store(bucket, "momentum_buffer", i, b_new, keep)
        else:
            step = lr * gp
        w_new = w - step
        if cfg.weight_decay_mode == "decoupled":
            w_new = w_new - lr * lam_eff * w
        _write(bucket, i, w_new, keep)
        _finish(bucket, i, keep, n_w_raw, n_g_raw, n_u_raw, r)


def lars_layer_scalars(cfg: LarsConfig, lr, lam, adapt, n_w_raw, n_g_raw, n_u_raw, t):
    """One layer's trust ratio ``r`` and effective weight decay ``lam_eff`` (0-dim float64) from its
    norms, its decay ``lam``, whether it is ``adapt``ed and its completed steps ``t``."""
    n_w = torch.clamp(n_w_raw, cfg.clamp_lo, cfg.clamp_hi)
    side_raw = n_u_raw if cfg.denominator == "norm_of_sum" else n_g_raw
    side = torch.clamp(side_raw, cfg.clamp_lo, cfg.clamp_hi)
    if cfg.denominator == "sum_of_norms":
        den = side + lam * n_w + cfg.eps
    else:
        den = side + cfg.eps
    if cfg.tv is None:
        phi = torch.ones((), dtype=torch.float64, device=n_w.device)
    else:
        phi = tv_phi_tensor(t, *cfg.tv)
    ratio = cfg.eta * phi * n_w / den
    if cfg.zero_norm_check == "raw_grad":
        ok = (n_w_raw > 0) & (n_g_raw > 0)
    elif cfg.zero_norm_check == "update":
        ok = (n_w_raw > 0) & (side_raw > 0)
    else:
        ok = (n_w_raw > 0) & (den > 0)
    one = torch.ones((), dtype=torch.float64, device=n_w.device)
    if cfg.zero_norm == "one":
        r_adapt = trust_clip(torch.where(ok, ratio, one), cfg, lr)
        lam_eff = lam
    else:  # skip: no ratio, no clip and no weight decay on a zero norm
        r_adapt = torch.where(ok, trust_clip(ratio, cfg, lr), one)
        lam_eff = torch.where(ok | ~adapt, lam, torch.zeros_like(lam))
    r = torch.where(adapt, r_adapt, one)
    return r, lam_eff


def lars_momentum(cfg: LarsConfig, lr, b, gp, has):
    """The new buffer ``b_new`` from the old one ``b`` (float64, zeros-as-first-step where not ``has``)
    and ``g' = gp``, and the weights' step (``w <- w - step``)."""
    mu, d = cfg.momentum, cfg.dampening
    if cfg.momentum_mode == "torch":
        if cfg.first_step_buffer == "clone":
            b_new = torch.where(has, mu * b + (1 - d) * gp, gp)
        else:
            b_new = mu * torch.where(has, b, torch.zeros_like(b)) + (1 - d) * gp
        upd = gp + mu * b_new if cfg.nesterov else b_new
        step = lr * upd
    else:  # classic: lr inside the buffer
        b_new = mu * torch.where(has, b, torch.zeros_like(b)) + lr * gp
        step = lr * gp + mu * b_new if cfg.nesterov else b_new
    return b_new, step


def _fl32(x, like: torch.Tensor) -> torch.Tensor:
    """``x`` (a float64 tensor or a Python float) rounded once to fp32, on ``like``'s device."""
    if isinstance(x, torch.Tensor):
        return x.to(device=like.device, dtype=torch.float32)
    return torch.tensor(x, dtype=torch.float32, device=like.device)


def lars_coef32(cfg: LarsConfig, lr, r, lam_eff, has) -> dict[str, torch.Tensor]:
    """The fp32 coefficients of low-bit LARS's element math (csrc/lars_math.h ``lars_coef``; NOTE [Low-bit
    LARS element math in fp32] there): each formed in float64 from the trust ratio ``r``, ``lam_eff``, ``lr``
    (float64 tensors, 0-dim or one value per element) and the options, then rounded once. ``has``: where
    the segment has state (bool, broadcasting with ``r``)."""
    zero = torch.zeros((), dtype=torch.float32, device=r.device)
    one = torch.ones((), dtype=torch.float32, device=r.device)
    mu = cfg.momentum
    c = {"r": _fl32(r, r), "lam": _fl32(lam_eff, r), "dec": _fl32(lr * lam_eff, r), "has": has}
    c["mu_b"] = torch.where(has, _fl32(mu, r), zero)
    if cfg.momentum_mode == "torch":
        clone_first = (cfg.first_step_buffer == "clone") & ~has
        c["c_g"] = torch.where(clone_first, one, _fl32(1.0 - cfg.dampening, r))
        c["a_g"] = _fl32(lr, r)
        c["a_b"] = _fl32(lr * mu, r) if cfg.nesterov else _fl32(lr, r)
    else:  # classic: lr inside the buffer
        c["c_g"] = _fl32(lr, r)
        c["a_g"] = _fl32(lr, r)
        c["a_b"] = _fl32(mu, r) if cfg.nesterov else one
    return c


def lars_update32(cfg: LarsConfig, c: dict[str, torch.Tensor], w, g, b):
    """Low-bit LARS's element math in fp32 (csrc/lars_math.h ``lars_update_modes``, one torch op per fp32
    operation, so each is rounded as the kernels round it): ``(w_new, b_new)`` from the fp32 weights,
    gradients and old buffer (None without momentum; it reads +0 where the segment has no state)."""
    if cfg.weight_decay_mode == "l2":
        gp = (g + c["lam"] * w) * c["r"]
    else:
        gp = g * c["r"]
    b_new = None
    if cfg.momentum != 0:
        b = torch.where(c["has"], b, torch.zeros((), dtype=b.dtype, device=b.device))
        b_new = c["mu_b"] * b + c["c_g"] * gp
        w_new = w - (c["a_g"] * gp + c["a_b"] * b_new) if cfg.nesterov else w - c["a_b"] * b_new
    else:
        w_new = w - c["a_g"] * gp
    if cfg.weight_decay_mode == "decoupled":
        w_new = w_new - c["dec"] * w
    return w_new, b_new


def _finish(bucket: Bucket, i: int, keep, n_w, n_g, n_u, r) -> None:
    sd = bucket.state_dtype
    for dst, val in ((bucket.w_norm, n_w), (bucket.g_norm, n_g), (bucket.u_norm, n_u), (bucket.trust_ratio, r)):
        dst[i] = torch.where(keep, dst[i].to(torch.float64), val).to(sd)
    bucket.has_state[i] = torch.where(keep, bucket.has_state[i], torch.ones((), dtype=sd, device=bucket.device))
    bucket.step[i] = torch.where(keep, bucket.step[i], bucket.step[i] + 1)


def grad_sumsq(bucket: Bucket, cfg) -> torch.Tensor:
    """Sum over active segments of ||grad * inv_scale||^2 (float64 scalar), for global clipping."""
    total = torch.zeros((), dtype=torch.float64, device=bucket.device)
    for i in bucket.active_idx:  # a param without a grad is skipped (torch.optim)
        g = bucket.grad_tensors[i].detach().to(torch.float64)
        if cfg.inv_scale is not None:
            g = g * _f64(cfg.inv_scale).to(g.device)
        total = total + _norm(g) ** 2
    return total


def lamb_step(bucket: Bucket, cfg: LambConfig) -> None:
    lr = _f64(cfg.lr).to(bucket.device)
    b1, b2 = cfg.beta1, cfg.beta2
    for i in bucket.active_idx:  # a param without a grad is skipped (torch.optim)
        keep = _keep(bucket, i, cfg)
        w = _weights(bucket, i)
        g = _grad(bucket, i, cfg)
        n_g_raw = _norm(g)
        lam = cfg.weight_decay * bucket.wd_mask[i].to(torch.float64)
        adapt = bool(cfg.adapt_enabled and not cfg.adam) & (bucket.adapt_mask[i] != 0)
        t = bucket.step[i].to(torch.float64) + 1
        if bucket.exact_elements:  # low-bit state, remainder masters: NOTE [Low-bit element math in fp32]
            c = lamb_coef32(cfg, lr, lam, t)
            m = _state(bucket, "exp_avg", i).to(torch.float32)
            v = _state(bucket, "exp_avg_sq", i).to(torch.float32)
            g32 = bucket.grad_tensors[i].detach().to(torch.float32) * gscale32(cfg, w.device)
            w_d, m, v, u = lamb_update32(cfg, c, w.to(torch.float32), g32, m, v)
            n_w_raw, n_u = _norm(w_d.to(torch.float64)), _norm(u.to(torch.float64))
            r, s = lamb_layer_scalars(cfg, lr, adapt, n_w_raw, n_u, t)
            w_new = w_d - _fl32(lr * s * r, w_d) * u
            _store(bucket, "exp_avg", i, m.to(torch.float64), keep)
            _store(bucket, "exp_avg_sq", i, v.to(torch.float64), keep)
            _write(bucket, i, w_new.to(torch.float64), keep)
            _finish(bucket, i, keep, n_w_raw, n_g_raw, n_u, r)
            continue
        if cfg.weight_decay_mode == "l2":
            g = g + lam * w
        m_old, v_old = _state(bucket, "exp_avg", i), _state(bucket, "exp_avg_sq", i)
        m = b1 * m_old + cfg.beta3 * g
        v = b2 * v_old + (1 - b2) * g * g
        bc = lamb_bias_corrections(cfg, t)
        u = lamb_direction(cfg, m, v, bc)
        if cfg.weight_decay_mode == "in_update":
            u = u + lam * w
        if cfg.weight_decay_mode == "decoupled":
            w = w * (1 - lr * lam)
        n_w_raw, n_u = _norm(w), _norm(u)
        r, s = lamb_layer_scalars(cfg, lr, adapt, n_w_raw, n_u, t)
        w_new = w - lr * s * r * u
        _store(bucket, "exp_avg", i, m, keep)
        _store(bucket, "exp_avg_sq", i, v, keep)
        _write(bucket, i, w_new, keep)
        _finish(bucket, i, keep, n_w_raw, n_g_raw, n_u, r)


def lamb_bias_corrections(cfg: LambConfig, t):
    """``(1 - b1^t, 1 - b2^t)`` (0-dim float64) for bias_correction="both" at step ``t`` (1 at the
    first), else None: the direction takes the raw moments."""
    if cfg.bias_correction != "both":
        return None
    return 1 - cfg.beta1**t, 1 - cfg.beta2**t


def sqrt32(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 square root of fp32 ``x`` (what sqrtps / CUDA's sqrtf give): the float64
    root rounded once (exact for fp32 inputs). ATen's fp32 sqrt on the CPU is not correctly rounded (an
    ulp off for ~18% of inputs, measured with torch 2.13), so the fp32 element math does not use it."""
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def gscale32(cfg: LarsConfig | LambConfig, device) -> torch.Tensor:
    """The gradient factor of the low-bit element math, fl32((+-inv_scale) / clip_coef): formed in float64
    (the sign of maximize in it; LARS has no clip_coef: its clip is in inv_scale) and rounded once, as the
    fp32 kernels form it; the gradient is fl32(grad) times it, one fp32 product. On ``device``."""
    x = torch.ones((), dtype=torch.float64, device=device)
    if cfg.inv_scale is not None:
        x = cfg.inv_scale.to(device=device, dtype=torch.float64).reshape(())
    if cfg.maximize:
        x = -x
    if getattr(cfg, "clip_coef", None) is not None:
        x = x / _f64(cfg.clip_coef).to(device)
    return x.to(torch.float32)


def lamb_coef32(cfg: LambConfig, lr, lam, t) -> dict[str, torch.Tensor]:
    """The fp32 coefficients of low-bit LAMB's element math (csrc/lars_math.h ``lamb_coef``, NOTE [Low-bit
    element math in fp32]): each formed in float64 from ``lr``, ``lam`` and the step ``t`` (after this
    one; float64 tensors, 0-dim or one value per element) and rounded once."""
    f = lambda x: _fl32(x, lam)  # noqa: E731
    both = cfg.bias_correction == "both"
    bc2 = 1 - cfg.beta2**t if both else torch.ones_like(lam)
    c = {
        "lam": f(lam), "wd_keep": f(1 - lr * lam), "b1": f(cfg.beta1), "b3": f(cfg.beta3),
        "b2": f(cfg.beta2), "omb2": f(1.0 - cfg.beta2), "bc1": f(1 - cfg.beta1**t) if both else f(1.0),
        "isq2": f(1.0 / torch.sqrt(bc2)), "er2": f(cfg.eps_root * bc2), "eps": f(cfg.eps),
    }  # fmt: skip
    c["ibc1"] = torch.ones_like(c["bc1"]) / c["bc1"]  # one fp32 division (lamb_coef)
    return c


def lamb_update32(cfg: LambConfig, c: dict[str, torch.Tensor], w, g, m, v):
    """Low-bit LAMB's element math in fp32 (csrc/lars_math.h ``lamb_moments_mode``, ``lamb_direction_mode``,
    one torch op per fp32 operation; the square root :func:`sqrt32`): ``(w_d, m_new, v_new, u)`` from the
    fp32 weights, scaled gradients and old moments."""
    if cfg.weight_decay_mode == "l2":
        g = g + c["lam"] * w
    m = c["b1"] * m + c["b3"] * g
    v = c["b2"] * v + c["omb2"] * g * g
    u = (m * c["ibc1"]) / (sqrt32(v + c["er2"]) * c["isq2"] + c["eps"])
    if cfg.weight_decay_mode == "in_update":
        u = u + c["lam"] * w
    w_d = w * c["wd_keep"] if cfg.weight_decay_mode == "decoupled" else w
    return w_d, m, v, u


def lamb_direction(cfg: LambConfig, m, v, bc):
    """The Adam direction from the new moments (float64) and :func:`lamb_bias_corrections`."""
    if bc is not None:
        bc1, bc2 = bc
        return (m / bc1) / (torch.sqrt(v / bc2 + cfg.eps_root) + cfg.eps)
    return m / (torch.sqrt(v + cfg.eps_root) + cfg.eps)


def lamb_layer_scalars(cfg: LambConfig, lr, adapt, n_w_raw, n_u, t):
    """One layer's trust ratio ``r`` and step scale ``s`` (``w <- w - lr*s*r*u``), 0-dim float64."""
    b1, b2 = cfg.beta1, cfg.beta2
    n_w = torch.clamp(n_w_raw, cfg.clamp_lo, cfg.clamp_hi)
    one = torch.ones((), dtype=torch.float64, device=n_w.device)
    ratio = torch.where((n_w > 0) & (n_u > 0), n_w / (n_u + cfg.trust_ratio_eps), one)
    r = torch.where(adapt, trust_clip(ratio, cfg, lr), one)
    if cfg.bias_correction == "first_outside":
        s = 1 / (1 - b1**t)
    elif cfg.bias_correction == "both_outside":
        s = torch.sqrt(1 - b2**t) / (1 - b1**t)
    else:
        s = one
    return r, s
