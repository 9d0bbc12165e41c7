"""Portable backend: vectorized pure PyTorch over a whole bucket.

The same math as :mod:`fusedlars.kernels.reference` (which states the formulas),
computed in the state dtype (fp32, or fp64 for fp64 params) with a constant number
of tensor operations per bucket, whatever the number of layers, and no host sync:

* per-layer sums of squares with ``torch.segment_reduce`` over the padded segments
  (pads are zero, so they add nothing);
* per-layer scalars (trust ratio, momentum coefficients) computed on ``[S]`` vectors
  with ``torch.where`` guards;
* broadcast back to elements with one ``index_select`` through the bucket's
  element -> segment table.

It runs on any device torch supports and is the fallback when no fused kernel is built.
"""

from __future__ import annotations

import torch

from ..buckets import Bucket
from .common import LambConfig, LarsConfig
from .reference import trust_clip

NAME = "torch"


def available() -> tuple[bool, str]:
    return True, f"pure PyTorch {torch.__version__}, vectorized over flat buckets"


_CHUNK = 16  # every padded segment length is a multiple of 16 elements (see buckets._align_elems)


def _segsum(bucket: Bucket, x: torch.Tensor) -> torch.Tensor:
    """Per-segment sum of ``x`` (pads are zero), accumulated in float64.

    // NOTE: [Accurate norms] segment_reduce adds sequentially; in fp32 its relative error
    // grows with the layer size (~5e-4 at 1M elements). Sum 16-element chunks first
    // (fp32 products, fp64 sums), then the chunks per segment in fp64: error ~1e-7.
    """
    chunks = x.view(-1, _CHUNK).sum(dim=1, dtype=torch.float64)
    lengths = bucket.__dict__.get("_seg_chunks")
    if lengths is None:
        prepare(bucket, "")
        lengths = bucket._seg_chunks
    return torch.segment_reduce(chunks, "sum", lengths=lengths).to(x.dtype)


def _expand(bucket: Bucket, v: torch.Tensor) -> torch.Tensor:
    return v.index_select(0, bucket.elem_seg())


def prepare(bucket: Bucket, kind: str) -> list[torch.Tensor]:
    """Build the bucket's cached tables now (a compiled step must not build them in its graph);
    returns them, so that they can be marked static."""
    if bucket.__dict__.get("_seg_chunks") is None:
        bucket._seg_chunks = bucket.seg_len // _CHUNK
    return [bucket.elem_seg(), bucket._seg_chunks]


def _load_grad(bucket: Bucket, cfg, sdt) -> torch.Tensor:
    g = bucket.flat_grad.to(sdt)
    if cfg.inv_scale is not None:
        g = g * cfg.inv_scale.to(sdt)
    clip = getattr(cfg, "clip_coef", None)
    if clip is not None:
        g = g / clip
    if cfg.maximize:
        g = -g if g is bucket.flat_grad else g.neg_()
    return g


def _keep_mask(bucket: Bucket, cfg) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(per-segment keep [S] bool, per-element keep [N] bool) or (None, None) when nothing is kept."""
    if bucket.all_active and cfg.found_inf is None:
        return None, None
    keep_s = bucket.active == 0
    if cfg.found_inf is not None:
        keep_s = keep_s | (cfg.found_inf.reshape(()) != 0)
    if bucket.all_active:
        return keep_s, (cfg.found_inf.reshape(()) != 0)  # a scalar broadcasts over elements
    return keep_s, _expand(bucket, keep_s)


def _store(bucket: Bucket, w_old: torch.Tensor, w_new: torch.Tensor, keep_e) -> None:
    if keep_e is not None:
        w_new = torch.where(keep_e, w_old, w_new)
    if bucket.flat_master is not None:
        bucket.flat_master.copy_(w_new)
    bucket.flat_param.copy_(w_new)


def _finish(bucket: Bucket, keep_s, n_w, n_g, n_u, r) -> None:
    if keep_s is None:
        bucket.w_norm.copy_(n_w)
        bucket.g_norm.copy_(n_g)
        bucket.u_norm.copy_(n_u)
        bucket.trust_ratio.copy_(r)
        bucket.has_state.fill_(1.0)
        bucket.step.add_(1.0)
        return
    for dst, val in ((bucket.w_norm, n_w), (bucket.g_norm, n_g), (bucket.u_norm, n_u), (bucket.trust_ratio, r)):
        dst.copy_(torch.where(keep_s, dst, val))
    bucket.has_state.copy_(torch.where(keep_s, bucket.has_state, torch.ones_like(bucket.has_state)))
    bucket.step.add_((~keep_s).to(bucket.step.dtype))


# NOTE: [Partials and apply]
# Each step is split in two phases so that sharded buckets (FSDP2 / DTensor, see
# fusedlars.distributed) can sum the per-layer sums of squares over the ranks in between:
# ``*_partials`` returns ``(ssq [3, S], ctx)`` and ``*_apply(bucket, cfg, ssq, ctx)`` finishes
# the step from (possibly reduced) sums. ``*_step`` = apply(partials): unsharded results are
# bitwise those of a single function.


def lars_partials(bucket: Bucket, cfg: LarsConfig) -> tuple[torch.Tensor, tuple]:
    """Per-segment sums of squares ``[w², g², (g+λw)²]`` as one ``[3, S]`` tensor, and the step's context."""
    sdt = bucket.state_dtype
    w = bucket.weights().to(sdt)
    g = _load_grad(bucket, cfg, sdt)
    lam_s = cfg.weight_decay * bucket.wd_mask
    lam_e = _expand(bucket, lam_s) if bucket.any_wd_excluded else cfg.weight_decay
    ssq_w = _segsum(bucket, w * w)
    ssq_g = _segsum(bucket, g * g)
    u = g + lam_e * w if cfg.weight_decay != 0 else g
    ssq_u = _segsum(bucket, u * u) if cfg.weight_decay != 0 else ssq_g
    return torch.stack((ssq_w, ssq_g, ssq_u)), (w, g, u, lam_s, lam_e)


def lars_apply(bucket: Bucket, cfg: LarsConfig, ssq: torch.Tensor, ctx: tuple) -> None:
    """The LARS update from the per-segment sums of squares ``ssq`` (global ones for a sharded bucket)."""
    w, g, u, lam_s, lam_e = ctx
    sdt = bucket.state_dtype
    lr = cfg.lr.to(sdt) if isinstance(cfg.lr, torch.Tensor) else cfg.lr
    keep_s, keep_e = _keep_mask(bucket, cfg)
    n_w_raw, n_g_raw, n_u_raw = ssq[0].sqrt(), ssq[1].sqrt(), ssq[2].sqrt()
    n_w = torch.clamp(n_w_raw, cfg.clamp_lo, cfg.clamp_hi)
    side_raw = n_u_raw if cfg.denominator == "norm_of_sum" else n_g_raw
    side = torch.clamp(side_raw, cfg.clamp_lo, cfg.clamp_hi)
    den = side + lam_s * n_w + cfg.eps if cfg.denominator == "sum_of_norms" else side + cfg.eps
    ratio = cfg.eta * n_w / den
    if cfg.tv is not None:
        lmbda, alpha, shift, gamma_min, gate = cfg.tv
        t = bucket.step.to(sdt)
        phi = torch.where(t < gate, 1.0, 1.0 / (alpha + torch.exp(lmbda * (t - shift))) + gamma_min)
        ratio = ratio * phi
    if cfg.zero_norm_check == "raw_grad":
        ok = (n_w_raw > 0) & (n_g_raw > 0)
    elif cfg.zero_norm_check == "update":
        ok = (n_w_raw > 0) & (side_raw > 0)
    else:
        ok = (n_w_raw > 0) & (den > 0)
    one = torch.ones_like(ratio)
    adapt = bucket.adapt_mask != 0 if cfg.adapt_enabled else torch.zeros_like(ok)
    lam_eff_e = lam_e
    if cfg.zero_norm == "one":
        r_adapt = trust_clip(torch.where(ok, ratio, one), cfg, lr)
    else:
        r_adapt = torch.where(ok, trust_clip(ratio, cfg, lr), one)
        if cfg.weight_decay != 0:
            lam_eff_s = torch.where(ok | ~adapt, lam_s, torch.zeros_like(lam_s))
            lam_eff_e = _expand(bucket, lam_eff_s)
    r = torch.where(adapt, r_adapt, one)
    r_e = _expand(bucket, r)

    if cfg.weight_decay_mode == "l2" and cfg.weight_decay != 0:
        gp = (u if lam_eff_e is lam_e else g + lam_eff_e * w) * r_e
    else:
        gp = g * r_e

    mu, d = cfg.momentum, cfg.dampening
    if mu != 0:
        buf = bucket.state["momentum_buffer"]
        # NOTE: [Zero buffers] a segment's buffer is zero until its first step (zero at
        # build, written only by a step that also sets has_state), so mu*b needs no mask.
        if cfg.momentum_mode == "torch":
            if cfg.first_step_buffer == "clone" and d != 0:
                hs = bucket.has_state
                c_e = _expand(bucket, torch.where(hs != 0, torch.full_like(hs, 1.0 - d), torch.ones_like(hs)))
                b_new = buf * mu + gp * c_e
            else:
                b_new = torch.add(gp, buf, alpha=mu) if d == 0 else buf * mu + gp * (1.0 - d)
            upd = torch.add(gp, b_new, alpha=mu) if cfg.nesterov else b_new
            w_new = w - upd * lr
        else:
            lg = gp * lr
            b_new = torch.add(lg, buf, alpha=mu)
            upd = torch.add(lg, b_new, alpha=mu) if cfg.nesterov else b_new
            w_new = w - upd
        buf.copy_(b_new if keep_e is None else torch.where(keep_e, buf, b_new))
    else:
        w_new = w - gp * lr
    if cfg.weight_decay_mode == "decoupled" and cfg.weight_decay != 0:
        w_new = w_new - w * (lam_eff_e * lr)
    _store(bucket, w, w_new, keep_e)
    _finish(bucket, keep_s, n_w_raw, n_g_raw, n_u_raw, r)


def lars_step(bucket: Bucket, cfg: LarsConfig) -> None:
    ssq, ctx = lars_partials(bucket, cfg)
    lars_apply(bucket, cfg, ssq, ctx)


def grad_sumsq(bucket: Bucket, cfg) -> torch.Tensor:
    """Sum over active segments of ||grad * inv_scale||^2, as a float64 scalar."""
    sdt = bucket.state_dtype
    g = bucket.flat_grad.to(sdt)
    if cfg.inv_scale is not None:
        g = g * cfg.inv_scale.to(sdt)
    ssq = _segsum(bucket, g * g)
    if not bucket.all_active:
        ssq = torch.where(bucket.active != 0, ssq, torch.zeros_like(ssq))
    return ssq.sum(dtype=torch.float64)


def lamb_partials(bucket: Bucket, cfg: LambConfig) -> tuple[torch.Tensor, tuple]:
    """Per-segment sums of squares ``[w_d², u², g²]`` as one ``[3, S]`` tensor, and the step's context."""
    sdt = bucket.state_dtype
    lr = cfg.lr.to(sdt) if isinstance(cfg.lr, torch.Tensor) else cfg.lr
    b1, b2 = cfg.beta1, cfg.beta2
    w = bucket.weights().to(sdt)
    g = _load_grad(bucket, cfg, sdt)
    ssq_g = _segsum(bucket, g * g)
    lam_s = cfg.weight_decay * bucket.wd_mask
    lam_e = _expand(bucket, lam_s) if bucket.any_wd_excluded else cfg.weight_decay
    if cfg.weight_decay_mode == "l2" and cfg.weight_decay != 0:
        g = g + lam_e * w
    m_buf, v_buf = bucket.state["exp_avg"], bucket.state["exp_avg_sq"]
    m = torch.add(m_buf * b1, g, alpha=cfg.beta3)
    v = torch.addcmul(v_buf * b2, g, g, value=1.0 - b2)
    t = bucket.step.to(torch.float64) + 1
    # NOTE: bias corrections in float64: 1 - 0.999**t loses ~1e-5 relative in fp32.
    bc1_s = (1 - b1**t).to(sdt)
    if cfg.bias_correction == "both":
        bc1_e = _expand(bucket, bc1_s)
        bc2_e = _expand(bucket, (1 - b2**t).to(sdt))
        den = (v / bc2_e + cfg.eps_root).sqrt_().add_(cfg.eps)
        u = (m / bc1_e).div_(den)
    else:  # none, first_outside, both_outside: u from the raw moments
        den = (v + cfg.eps_root).sqrt_().add_(cfg.eps) if cfg.eps_root else v.sqrt().add_(cfg.eps)
        u = m / den
    if cfg.bias_correction == "both_outside":
        # DeepSpeed's legacy step size: sqrt(1-b2^t)/(1-b1^t) outside the ratio, in float64 as above
        outside_s = ((1 - b2**t).sqrt() / (1 - b1**t)).to(sdt)
    else:
        outside_s = None
    if cfg.weight_decay_mode == "in_update" and cfg.weight_decay != 0:
        u = u + lam_e * w
    if cfg.weight_decay_mode == "decoupled" and cfg.weight_decay != 0:
        w_d = w * (1 - lr * lam_e)
    else:
        w_d = w
    ssq = torch.stack((_segsum(bucket, w_d * w_d), _segsum(bucket, u * u), ssq_g))
    return ssq, (w, w_d, u, m, v, bc1_s, outside_s)


def lamb_apply(bucket: Bucket, cfg: LambConfig, ssq: torch.Tensor, ctx: tuple) -> None:
    """The LAMB update from the per-segment sums of squares ``ssq`` (global ones for a sharded bucket)."""
    w, w_d, u, m, v, bc1_s, outside_s = ctx
    sdt = bucket.state_dtype
    lr = cfg.lr.to(sdt) if isinstance(cfg.lr, torch.Tensor) else cfg.lr
    keep_s, keep_e = _keep_mask(bucket, cfg)
    n_w_raw, n_u, n_g_raw = ssq[0].sqrt(), ssq[1].sqrt(), ssq[2].sqrt()
    n_w = torch.clamp(n_w_raw, cfg.clamp_lo, cfg.clamp_hi)
    one = torch.ones_like(n_w)
    ratio = torch.where((n_w > 0) & (n_u > 0), n_w / (n_u + cfg.trust_ratio_eps), one)
    adapt_on = cfg.adapt_enabled and not cfg.adam
    r = torch.where(bucket.adapt_mask != 0, trust_clip(ratio, cfg, lr), one) if adapt_on else one
    if cfg.bias_correction == "first_outside":
        scale = r / bc1_s
    elif cfg.bias_correction == "both_outside":
        scale = r * outside_s
    else:
        scale = r
    w_new = w_d - u * _expand(bucket, scale) * lr
    m_buf, v_buf = bucket.state["exp_avg"], bucket.state["exp_avg_sq"]
    if keep_e is None:
        m_buf.copy_(m)
        v_buf.copy_(v)
    else:
        m_buf.copy_(torch.where(keep_e, m_buf, m))
        v_buf.copy_(torch.where(keep_e, v_buf, v))
    _store(bucket, w, w_new, keep_e)
    _finish(bucket, keep_s, n_w_raw, n_g_raw, n_u, r)


def lamb_step(bucket: Bucket, cfg: LambConfig) -> None:
    ssq, ctx = lamb_partials(bucket, cfg)
    lamb_apply(bucket, cfg, ssq, ctx)
