"""Float64 anchors: one plain transcription per existing optimizer.

Each function performs ONE optimizer step of ONE param group, in place, the way
the named implementation does it.  They are written from the upstream sources named in
each docstring (a paper by its arXiv id, or a repository and file; for the
pytorch_optimizer anchors, the per-parameter code path of pytorch_optimizer
4.1.0), independently of ``fusedlars``: nothing here imports
the package under test.

Calling convention (all anchors)::

    anchor(params, grads, state, lr, **hyper)

* ``params``: list of float64 tensors, updated in place.
* ``grads``: list of float64 tensors (or ``None`` = parameter skipped); never
  modified.
* ``state``: a dict owned by the caller, one per param group; the anchor keeps
  its step counter in ``state["step"]`` and per-parameter buffers in
  ``state[i]`` (``i`` = index in ``params``).
* ``lr``: the learning rate of this step (read every step, as a scheduler would
  set ``group["lr"]``).

Keyword names are uniform across anchors (``momentum``, ``dampening``,
``nesterov``, ``weight_decay``, ``eta`` = trust coefficient, ``eps``) while the
DEFAULT of each keyword is the default of the implementation being transcribed.
Scalars that decide a branch are compared with Python ``if`` on float64
tensors: slow and obvious is the point.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "LARS_ANCHORS",
    "LAMB_ANCHORS",
    "total_grad_norm",
    # LARS family
    "paper_lars_step",
    "timm_lars_step",
    "apex_larc_step",
    "apex_larc_clip_step",
    "apex_larc_scale_step",
    "lightning_lars_step",
    "barlowtwins_lars_step",
    "tvlars_official_step",
    "optax_lars_step",
    "mlperf_lars_step",
    "pytorch_optimizer_lars_step",
    "torchlars_step",
    # LAMB family
    "paper_lamb_step",
    "apex_lamb_step",
    "timm_lamb_step",
    "cybertron_lamb_step",
    "optax_lamb_step",
    "deepspeed_lamb_step",
    "deepspeed_legacy_lamb_step",
    "pytorch_optimizer_lamb_step",
]


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------
def _norm(x: torch.Tensor) -> float:
    """L2 norm over the whole tensor, as a Python float (float64)."""
    return float(torch.linalg.vector_norm(x.to(torch.float64)))


def _pstate(state: dict, i: int) -> dict:
    return state.setdefault(i, {})


def _advance(state: dict) -> int:
    """Increment and return the 1-based step count of this group."""
    state["step"] = state.get("step", 0) + 1
    return state["step"]


def _check64(params, grads):
    for p, g in zip(params, grads):
        if p.dtype != torch.float64 or (g is not None and g.dtype != torch.float64):
            raise TypeError("anchors work on float64 tensors only")


def total_grad_norm(grads) -> float:
    """sqrt(sum of ||g||^2) over every gradient given (all groups)."""
    return math.sqrt(sum(_norm(g) ** 2 for g in grads if g is not None))


def _torch_sgd_update(p, d_p, st, lr, momentum, dampening, nesterov):
    """torch.optim.SGD's per-parameter update with weight_decay=0.

    The momentum buffer is a clone of the (already rewritten) gradient on the
    first step, then ``buf <- momentum*buf + (1-dampening)*d_p``.
    """
    if momentum != 0:
        buf = st.get("momentum_buffer")
        if buf is None:
            buf = d_p.clone()
            st["momentum_buffer"] = buf
        else:
            buf.mul_(momentum).add_(d_p, alpha=1.0 - dampening)
        d_p = d_p + momentum * buf if nesterov else buf
    p.add_(d_p, alpha=-lr)


# ==========================================================================
# LARS family
# ==========================================================================
def paper_lars_step(params, grads, state, lr, *, momentum=0.9, weight_decay=0.0, eta=1e-3):
    """You, Gitman & Ginsburg 2017, Algorithm 1 (arXiv:1708.03888, eq. 6).

    local_lr = eta*||w|| / (||g|| + wd*||w||), taken as 1 when ||w|| or ||g|| is 0
    v <- m*v + lr*local_lr*(g + wd*w)      (lr INSIDE the momentum, v starts at 0)
    w <- w - v
    No eps, no exclusion, no dampening, no nesterov.
    """
    _check64(params, grads)
    _advance(state)
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        st = _pstate(state, i)
        wn, gn = _norm(w), _norm(g)
        if wn > 0 and gn > 0:
            local = eta * wn / (gn + weight_decay * wn)
        else:
            local = 1.0
        v = st.get("v")
        if v is None:
            v = st["v"] = torch.zeros_like(w)
        v.mul_(momentum).add_((g + weight_decay * w) * (lr * local))
        w.sub_(v)


def timm_lars_step(
    params,
    grads,
    state,
    lr,
    *,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
    eta=1e-3,
    eps=1e-8,
    trust_clip=False,
    always_adapt=False,
):
    """timm ``Lars`` (huggingface/pytorch-image-models, ``timm/optim/lars.py``).

    Only when wd != 0 (or always_adapt): r = eta*||w||/(||g||+wd*||w||+eps),
    r = 1 if ||w|| == 0 or raw ||g|| == 0, LARC clip r = min(r/lr, 1) if
    trust_clip, g <- (g + wd*w)*r.  Otherwise the gradient is used as is (no
    decay at all).  Then torch-SGD momentum (buffer cloned on first step).
    """
    _check64(params, grads)
    _advance(state)
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        st = _pstate(state, i)
        d_p = g.clone()
        if weight_decay != 0 or always_adapt:
            wn, gn = _norm(w), _norm(g)
            if wn > 0 and gn > 0:
                r = eta * wn / (gn + weight_decay * wn + eps)
            else:
                r = 1.0
            if trust_clip:
                r = min(r / lr, 1.0)
            d_p = (d_p + weight_decay * w) * r
        _torch_sgd_update(w, d_p, st, lr, momentum, dampening, nesterov)


def apex_larc_step(
    params,
    grads,
    state,
    lr,
    *,
    clip=True,
    eta=0.02,
    eps=1e-8,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
):
    """apex ``LARC`` wrapping ``torch.optim.SGD`` (NVIDIA apex
    ``apex/parallel/LARC.py``, removed in apex commit ``cb65b8ed``: read at ``cb65b8ed^``).

    The group's weight decay is taken away from SGD.  When ||w|| != 0 and raw
    ||g|| != 0: a = eta*||w||/(||g||+wd*||w||+eps), clip mode a = min(a/lr, 1),
    g <- (g + wd*w)*a.  Otherwise the gradient is neither scaled NOR decayed.
    Then SGD (momentum/dampening/nesterov, wd = 0) steps with lr.
    """
    _check64(params, grads)
    _advance(state)
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        st = _pstate(state, i)
        d_p = g.clone()
        wn, gn = _norm(w), _norm(g)
        if wn != 0 and gn != 0:
            a = eta * wn / (gn + weight_decay * wn + eps)
            if clip:
                # record which side of min(a/lr, 1) was taken (True: 1, i.e. the rate is lr)
                st.setdefault("clip_log", []).append(a / lr >= 1.0)
                a = min(a / lr, 1.0)
            d_p = (d_p + weight_decay * w) * a
        _torch_sgd_update(w, d_p, st, lr, momentum, dampening, nesterov)


def apex_larc_clip_step(params, grads, state, lr, **kw):
    """apex LARC with clip=True (its default)."""
    return apex_larc_step(params, grads, state, lr, clip=True, **kw)


def apex_larc_scale_step(params, grads, state, lr, **kw):
    """apex LARC with clip=False (scale mode)."""
    return apex_larc_step(params, grads, state, lr, clip=False, **kw)


def lightning_lars_step(
    params,
    grads,
    state,
    lr,
    *,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
    eta=1e-3,
    eps=1e-8,
):
    """Lightning Bolts / Flash ``LARS`` (Lightning-Universe/lightning-bolts
    ``pl_bolts/optimizers/lars.py``; Lightning-Universe/lightning-flash ``flash/core/optimizers/lars.py``).

    Only if wd != 0 and ||w|| != 0 and raw ||g|| != 0:
    d_p = (g + wd*w) * eta*||w||/(||g||+wd*||w||+eps); otherwise d_p = g (no decay).
    Then torch-SGD momentum (buffer cloned on first step).
    """
    _check64(params, grads)
    _advance(state)
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        st = _pstate(state, i)
        d_p = g.clone()
        wn, gn = _norm(w), _norm(g)
        if weight_decay != 0 and wn != 0 and gn != 0:
            a = eta * wn / (gn + weight_decay * wn + eps)
            d_p = (d_p + weight_decay * w) * a
        _torch_sgd_update(w, d_p, st, lr, momentum, dampening, nesterov)


def barlowtwins_lars_step(
    params,
    grads,
    state,
    lr,
    *,
    momentum=0.9,
    weight_decay=0.0,
    eta=1e-3,
    weight_decay_filter=True,
    lars_adaptation_filter=True,
):
    """Barlow Twins ``LARS`` (facebookresearch/barlowtwins, ``main.py``), with both filters on as
    at its call site.

    g' = g + wd*w unless (filter and ndim == 1);
    r = eta*||w||/||g'|| if ||w|| > 0 and ||g'|| > 0 else 1, unless (filter and ndim == 1);
    mu <- m*mu + g' (mu starts at zeros);  w <- w - lr*mu.
    """
    _check64(params, grads)
    _advance(state)
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        st = _pstate(state, i)
        dp = g.clone()
        if not (weight_decay_filter and w.ndim == 1):
            dp = dp + weight_decay * w
        if not (lars_adaptation_filter and w.ndim == 1):
            wn, un = _norm(w), _norm(dp)
            q = eta * wn / un if (wn > 0 and un > 0) else 1.0
            dp = dp * q
        mu = st.get("mu")
        if mu is None:
            mu = st["mu"] = torch.zeros_like(w)
        mu.mul_(momentum).add_(dp)
        w.add_(mu, alpha=-lr)


def tvlars_official_step(
    params,
    grads,
    state,
    lr,
    *,
    lmbda=1e-3,
    momentum=0.9,
    weight_decay=5e-4,
    eta=1e-3,
    weight_decay_filter=True,
    lars_adaptation_filter=True,
):
    """Official TVLARS at HEAD (KhoiDOO/tvlars ``opt/tvlars.py`` at ``89c3291``), both filters on as in its clf.py.

    t = number of completed step() calls (from 0); phi_t = 1/(0.1 + exp(lmbda*(t+1))).
    g' = g + wd*w unless ndim == 1;  unless ndim == 1:
        n_w = clamp(||w||, 0, 10), n_g = clamp(||g'||, 0, 10),
        q = eta*phi_t*n_w/n_g if n_w > 0 and n_g > 0 else 1,  g' <- q*g'
    mu <- m*mu + g' (zeros at start);  w <- w - lr*mu.
    (The original evaluates exp in float32 on the CPU; here everything is float64.)
    """
    _check64(params, grads)
    t = state.get("step", 0)  # completed steps before this one
    phi = 1.0 / (0.1 + math.exp(lmbda * (t + 1)))
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        st = _pstate(state, i)
        dp = g.clone()
        if not (weight_decay_filter and w.ndim == 1):
            dp = dp + weight_decay * w
        if not (lars_adaptation_filter and w.ndim == 1):
            n_w = min(max(_norm(w), 0.0), 10.0)
            n_g = min(max(_norm(dp), 0.0), 10.0)
            q = eta * phi * n_w / n_g if (n_w > 0 and n_g > 0) else 1.0
            dp = dp * q
        mu = st.get("mu")
        if mu is None:
            mu = st["mu"] = torch.zeros_like(w)
        mu.mul_(momentum).add_(dp)
        w.add_(mu, alpha=-lr)
    state["step"] = t + 1


def _mask_on(mask, w) -> bool:
    return bool(mask(w)) if callable(mask) else bool(mask)


def optax_lars_step(
    params,
    grads,
    state,
    lr,
    *,
    momentum=0.9,
    nesterov=False,
    weight_decay=0.0,
    eta=1e-3,
    eps=0.0,
    weight_decay_mask=True,
    trust_ratio_mask=True,
):
    """optax ``lars`` chain (google-deepmind/optax ``optax/_src/alias.py``, ``_src/transform.py``).

    u = g + wd*w (where the wd mask holds);
    where the trust mask holds: r = eta*||w||/(||u||+eps), r = 1 if ||w|| == 0 or ||u|| == 0;  u <- r*u
    u <- -lr*u;  trace: b <- u + m*b (b starts at zeros);
    w <- w + b, or with nesterov w <- w + (u + m*b_new).
    """
    _check64(params, grads)
    _advance(state)
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        st = _pstate(state, i)
        u = g.clone()
        if _mask_on(weight_decay_mask, w):
            u = u + weight_decay * w
        if _mask_on(trust_ratio_mask, w):
            wn, un = _norm(w), _norm(u)
            r = 1.0 if (wn == 0 or un == 0) else eta * wn / (un + eps)
            u = u * r
        u = -lr * u
        b = st.get("trace")
        if b is None:
            b = st["trace"] = torch.zeros_like(w)
        b.mul_(momentum).add_(u)
        out = u + momentum * b if nesterov else b
        w.add_(out)


def mlperf_lars_step(
    params,
    grads,
    state,
    lr,
    *,
    names,
    momentum=0.9,
    weight_decay=1e-4,
    eta=1e-3,
    eps=0.0,
):
    """MLPerf ResNet-50, NVIDIA MXNet ``SGDwLARS`` / ``SGDwFASTLARS`` (mlcommons/training_results_v0.7
    @ c6640611, NVIDIA/benchmarks/resnet/implementations/mxnet/common/fit.py), in its equivalent
    torch form (the ratio kernel: MXNet ``src/operator/contrib/multi_lars-inl.h``).  ``names`` are MXNet parameter names.

    wd_mult = 0 unless the name ends with '_weight' or contains both 'fc' and 'bias' (the fc bias IS
    decayed); lam = wd * wd_mult.
    No ratio (r = 1) for names ending with 'gamma', 'beta' or 'bias' (fc bias included); others:
    r = eta*||w||/(||g|| + lam*||w|| + eps), r = 1 if ||w|| == 0 or ||g|| == 0.
    MXNet's sgd_mom_update with the lr-ratio momentum correction == buf <- m*buf + r*(g + lam*w)
    (buf starts at zeros), w <- w - lr*buf.
    """
    _check64(params, grads)
    _advance(state)
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        st = _pstate(state, i)
        name = names[i]
        decayed = name.endswith("_weight") or ("fc" in name and "bias" in name)
        lam = weight_decay if decayed else 0.0
        if name.endswith("gamma") or name.endswith("beta") or name.endswith("bias"):
            r = 1.0
        else:
            wn, gn = _norm(w), _norm(g)
            r = eta * wn / (gn + lam * wn + eps) if (wn > 0 and gn > 0) else 1.0
        dp = (g + lam * w) * r
        buf = st.get("momentum_buffer")
        if buf is None:
            buf = st["momentum_buffer"] = torch.zeros_like(w)
        buf.mul_(momentum).add_(dp)
        w.add_(buf, alpha=-lr)


def pytorch_optimizer_lars_step(
    params,
    grads,
    state,
    lr,
    *,
    momentum=0.9,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
    eta=1e-3,
    maximize=False,
):
    """pytorch_optimizer 4.1.0 ``LARS``, per-parameter path (foreach=False).

    Only params with ndim > 1: den = ||g|| + wd*||w|| (raw g, no eps);
    r = eta*||w||/den if ||w|| > 0 and den > 0 else 1;  g <- (g + wd*w)*r.
    momentum > 0: buf (zeros at start) <- m*buf + (1-d)*g;
    g <- g + m*buf (nesterov) or buf.   w <- w - lr*g.
    """
    _check64(params, grads)
    _advance(state)
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        st = _pstate(state, i)
        d = -g if maximize else g.clone()
        if w.ndim > 1:
            wn, gn = _norm(w), _norm(d)
            den = gn + weight_decay * wn
            r = eta * wn / den if (wn > 0 and den > 0) else 1.0
            d = (d + weight_decay * w) * r
        if momentum > 0:
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = torch.zeros_like(w)
            buf.mul_(momentum).add_(d, alpha=1.0 - dampening)
            d = d + momentum * buf if nesterov else buf.clone()
        w.add_(d, alpha=-lr)


def torchlars_step(
    params,
    grads,
    state,
    lr,
    *,
    eta=1e-3,
    eps=1e-8,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
):
    """torchlars ``LARS`` wrapping ``torch.optim.SGD`` (kakaobrain/torchlars ``torchlars/lars.py``).

    a = eta*||w||/(||g|| + wd*||w|| + eps) if ||w|| > 0 and ||g|| > 0 else 1;
    g <- (g + wd*w)*a (decay applied even when a = 1); SGD step with wd hidden.
    """
    _check64(params, grads)
    _advance(state)
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        st = _pstate(state, i)
        wn, gn = _norm(w), _norm(g)
        a = eta * wn / (gn + weight_decay * wn + eps) if (wn > 0 and gn > 0) else 1.0
        d_p = (g + weight_decay * w) * a
        _torch_sgd_update(w, d_p, st, lr, momentum, dampening, nesterov)


# ==========================================================================
# LAMB family
# ==========================================================================
def _moments(st, w, g, beta1, beta2, beta3):
    m = st.get("exp_avg")
    if m is None:
        m = st["exp_avg"] = torch.zeros_like(w)
        st["exp_avg_sq"] = torch.zeros_like(w)
    v = st["exp_avg_sq"]
    m.mul_(beta1).add_(g, alpha=beta3)
    v.mul_(beta2).add_(g * g, alpha=1.0 - beta2)
    return m, v


def _clip_divisor(gnorm, max_grad_norm) -> float:
    if max_grad_norm is None or max_grad_norm <= 0:
        return 1.0
    return gnorm / max_grad_norm if gnorm > max_grad_norm else 1.0


def paper_lamb_step(params, grads, state, lr, *, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
    """You et al. 2019 (LAMB), Algorithm 2 with phi = identity.

    m, v: Adam moments (1-beta averaging), bias corrected;
    u = m_hat/(sqrt(v_hat)+eps) + wd*w;  r = ||w||/||u|| (1 if a norm is 0), always;
    w <- w - lr*r*u.
    """
    _check64(params, grads)
    t = _advance(state)
    b1, b2 = betas
    bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        m, v = _moments(_pstate(state, i), w, g, b1, b2, 1.0 - b1)
        u = (m / bc1) / ((v / bc2).sqrt() + eps) + weight_decay * w
        wn, un = _norm(w), _norm(u)
        r = wn / un if (wn > 0 and un > 0) else 1.0
        w.add_(u, alpha=-lr * r)


def apex_lamb_step(
    params,
    grads,
    state,
    lr,
    *,
    betas=(0.9, 0.999),
    eps=1e-6,
    weight_decay=0.01,
    bias_correction=True,
    grad_averaging=True,
    adam_w_mode=True,
    max_grad_norm=1.0,
    use_nvlamb=False,
    global_grad_norm=None,
):
    """apex ``FusedLAMB`` (NVIDIA apex ``apex/optimizers/fused_lamb.py``, ``csrc/multi_tensor_lamb.cu``).

    ``global_grad_norm`` must be the norm over the grads of ALL groups (apex
    clips globally); when omitted it is computed from this group's grads only.
    g_hat = g / c, c = ||G||/max_grad_norm if ||G|| > max_grad_norm else 1;
    adam_w_mode: u = (m/bc1)/(sqrt(v/bc2)+eps) + wd*w   (else wd*w is added to g_hat first);
    if use_nvlamb or wd != 0: step = lr*||w||/||u|| if both != 0 else lr;  else step = lr;
    w <- w - step*u.
    """
    _check64(params, grads)
    t = _advance(state)
    b1, b2 = betas
    b3 = 1.0 - b1 if grad_averaging else 1.0
    bc1, bc2 = (1.0 - b1**t, 1.0 - b2**t) if bias_correction else (1.0, 1.0)
    if global_grad_norm is None:
        global_grad_norm = total_grad_norm(grads)
    c = _clip_divisor(global_grad_norm, max_grad_norm)
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        gh = g / c
        if not adam_w_mode:
            gh = gh + weight_decay * w
        m, v = _moments(_pstate(state, i), w, gh, b1, b2, b3)
        u = (m / bc1) / ((v / bc2).sqrt() + eps)
        if adam_w_mode:
            u = u + weight_decay * w
        step = lr
        if use_nvlamb or weight_decay != 0:
            wn, un = _norm(w), _norm(u)
            if wn != 0 and un != 0:
                step = lr * wn / un
        w.add_(u, alpha=-step)


def timm_lamb_step(
    params,
    grads,
    state,
    lr,
    *,
    betas=(0.9, 0.999),
    eps=1e-6,
    weight_decay=0.01,
    bias_correction=True,
    grad_averaging=True,
    max_grad_norm=1.0,
    trust_clip=False,
    always_adapt=False,
    decoupled_decay=False,
    global_grad_norm=None,
):
    """timm ``Lamb`` (huggingface/pytorch-image-models ``timm/optim/lamb.py``); ``global_grad_norm`` as for apex.

    g <- g / max(1, ||G||/max_grad_norm);  u = (m/bc1)/(sqrt(v)/sqrt(bc2)+eps);
    wd != 0: decoupled -> w <- w - lr*wd*w, else u <- u + wd*w;
    wd != 0 or always_adapt: r = ||w||/||u|| (1 if a norm is 0), trust_clip r = min(r, 1), u <- r*u;
    w <- w - lr*u.
    """
    _check64(params, grads)
    t = _advance(state)
    b1, b2 = betas
    b3 = 1.0 - b1 if grad_averaging else 1.0
    bc1, bc2 = (1.0 - b1**t, 1.0 - b2**t) if bias_correction else (1.0, 1.0)
    if global_grad_norm is None:
        global_grad_norm = total_grad_norm(grads)
    c = _clip_divisor(global_grad_norm, max_grad_norm)
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        gh = g / c
        m, v = _moments(_pstate(state, i), w, gh, b1, b2, b3)
        u = (m / bc1) / (v.sqrt() / math.sqrt(bc2) + eps)
        if weight_decay != 0:
            if decoupled_decay:
                w.add_(w, alpha=-lr * weight_decay)
            else:
                u = u + weight_decay * w
        if weight_decay != 0 or always_adapt:
            wn, un = _norm(w), _norm(u)
            r = wn / un if (wn > 0 and un > 0) else 1.0
            if trust_clip:
                r = min(r, 1.0)
            u = u * r
        w.add_(u, alpha=-lr)


def cybertron_lamb_step(params, grads, state, lr, *, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, adam=False):
    """cybertronai pytorch-lamb ``Lamb`` (= the TVLARS repo's LAMB).

    No bias correction: u = m/(sqrt(v)+eps) + wd*w;
    r = clamp(||w||, 0, 10)/||u||, r = 1 if either is 0; adam=True forces r = 1;
    w <- w - lr*r*u.
    """
    _check64(params, grads)
    _advance(state)
    b1, b2 = betas
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        m, v = _moments(_pstate(state, i), w, g, b1, b2, 1.0 - b1)
        wn = min(max(_norm(w), 0.0), 10.0)
        u = m / (v.sqrt() + eps)
        if weight_decay != 0:
            u = u + weight_decay * w
        un = _norm(u)
        r = 1.0 if (wn == 0 or un == 0) else wn / un
        if adam:
            r = 1.0
        w.add_(u, alpha=-lr * r)


def optax_lamb_step(
    params,
    grads,
    state,
    lr,
    *,
    betas=(0.9, 0.999),
    eps=1e-6,
    eps_root=0.0,
    weight_decay=0.0,
    mask=None,
):
    """optax ``lamb`` chain (google-deepmind/optax ``optax/_src/alias.py``).

    scale_by_adam: u = m_hat/(sqrt(v_hat + eps_root) + eps) (bias corrected, count from 1);
    add_decayed_weights: u <- u + wd*w where mask holds (None = everywhere);
    scale_by_trust_ratio: r = ||w||/||u||, 1 if either is 0 (always applied);
    w <- w - lr*r*u.
    """
    _check64(params, grads)
    t = _advance(state)
    b1, b2 = betas
    bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        m, v = _moments(_pstate(state, i), w, g, b1, b2, 1.0 - b1)
        u = (m / bc1) / ((v / bc2 + eps_root).sqrt() + eps)
        if mask is None or _mask_on(mask, w):
            u = u + weight_decay * w
        wn, un = _norm(w), _norm(u)
        r = 1.0 if (wn == 0 or un == 0) else wn / un
        w.add_(u, alpha=-lr * r)


def deepspeed_lamb_step(
    params,
    grads,
    state,
    lr,
    *,
    betas=(0.9, 0.999),
    eps=1e-8,
    eps_inside_sqrt=False,
    weight_decay=0.0,
    bias_correction=True,
    max_coeff=10.0,
    min_coeff=0.01,
):
    """DeepSpeed ``FusedLamb``, current kernel (deepspeedai/DeepSpeed @ e5d277fc,
    csrc/lamb/fused_lamb_cuda_kernel.cu: m and v bias-corrected themselves; default max_grad_norm=0:
    no global clip).

    m_hat = m/bc1, v_hat = v/bc2;  u = m_hat/(sqrt(v_hat)+eps) + wd*w  (sqrt(v_hat + eps) when
    eps_inside_sqrt);  r = ||w||/||u|| if both > 0 else 1, then clamped to [min_coeff, max_coeff];
    w <- w - lr*r*u.
    """
    _check64(params, grads)
    t = _advance(state)
    b1, b2 = betas
    bc1, bc2 = (1.0 - b1**t, 1.0 - b2**t) if bias_correction else (1.0, 1.0)
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        m, v = _moments(_pstate(state, i), w, g, b1, b2, 1.0 - b1)
        v_hat = v / bc2
        den = (v_hat + eps).sqrt() if eps_inside_sqrt else v_hat.sqrt() + eps
        u = (m / bc1) / den + weight_decay * w
        wn, un = _norm(w), _norm(u)
        r = 1.0
        if wn != 0 and un != 0:
            r = min(max(wn / un, min_coeff), max_coeff)
        w.add_(u, alpha=-lr * r)


def deepspeed_legacy_lamb_step(
    params,
    grads,
    state,
    lr,
    *,
    betas=(0.9, 0.999),
    eps=1e-8,
    eps_inside_sqrt=False,
    weight_decay=0.0,
    bias_correction=True,
    max_coeff=10.0,
    min_coeff=0.01,
):
    """DeepSpeed ``FusedLamb``, the kernel of every release up to v0.19.6 (deepspeedai/DeepSpeed
    v0.1.0 .. v0.19.6, master @ edaa7221 of 2026-08-22; csrc/lamb/fused_lamb_cuda_kernel.cu).

    Raw moments: u = m/(sqrt(v)+eps) + wd*w  (sqrt(v + eps) when eps_inside_sqrt);
    r = ||w||/||u|| clamped to [min_coeff, max_coeff], 1 when either norm is 0;
    step_size = lr*sqrt(1-b2^t)/(1-b1^t) (lr without bias correction), outside the ratio;
    w <- w - step_size*r*u.
    """
    _check64(params, grads)
    t = _advance(state)
    b1, b2 = betas
    step_size = lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t) if bias_correction else lr
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        m, v = _moments(_pstate(state, i), w, g, b1, b2, 1.0 - b1)
        den = (v + eps).sqrt() if eps_inside_sqrt else v.sqrt() + eps
        u = m / den + weight_decay * w
        wn, un = _norm(w), _norm(u)
        r = 1.0
        if wn != 0 and un != 0:
            r = min(max(wn / un, min_coeff), max_coeff)
        w.add_(u, alpha=-step_size * r)


def pytorch_optimizer_lamb_step(
    params,
    grads,
    state,
    lr,
    *,
    betas=(0.9, 0.999),
    eps=1e-6,
    weight_decay=0.0,
    weight_decouple=True,
    fixed_decay=False,
    grad_averaging=True,
    adam=False,
    adam_debias=False,
    maximize=False,
):
    """pytorch_optimizer 4.1.0 ``Lamb``, per-parameter path (foreach=False, pre_norm=False,
    rectify=False).

    step_size = lr/(1-beta1^t) (lr if adam_debias) -- outside the ratio; no correction on v;
    m <- b1*m + b3*g, v <- b2*v + (1-b2)*g^2;
    weight_decouple: w <- w*(1 - lr*wd) (1 - wd if fixed_decay), BEFORE the norms;
    u = m/(sqrt(v)+eps) (+ wd*w when not weight_decouple);
    r = clamp(||w||, 0, 10)/(||u|| + eps), 1 if clamp(||w||) == 0 or ||u|| == 0; adam -> 1;
    w <- w - step_size*r*u.  (max_grad_norm is unused unless pre_norm.)
    """
    _check64(params, grads)
    t = _advance(state)
    b1, b2 = betas
    b3 = 1.0 - b1 if grad_averaging else 1.0
    step_size = lr if adam_debias else lr / (1.0 - b1**t)
    for i, (w, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        gg = -g if maximize else g
        m, v = _moments(_pstate(state, i), w, gg, b1, b2, b3)
        if weight_decay != 0 and weight_decouple:
            w.mul_(1.0 - weight_decay * (1.0 if fixed_decay else lr))
        u = m / (v.sqrt() + eps)
        if not weight_decouple and weight_decay > 0:
            u = u + weight_decay * w
        wn = min(max(_norm(w), 0.0), 10.0)
        un = _norm(u)
        r = 1.0 if (wn == 0 or un == 0) else wn / (un + eps)
        if adam:
            r = 1.0
        w.add_(u, alpha=-step_size * r)


# --------------------------------------------------------------------------
# registries: preset name -> anchor
# --------------------------------------------------------------------------
LARS_ANCHORS: dict[str, Callable] = {
    "paper": paper_lars_step,
    "timm": timm_lars_step,
    "apex_larc_clip": apex_larc_clip_step,
    "apex_larc_scale": apex_larc_scale_step,
    "lightning": lightning_lars_step,
    "barlowtwins": barlowtwins_lars_step,
    "tvlars_official": tvlars_official_step,
    "optax": optax_lars_step,
    "mlperf": mlperf_lars_step,
    "pytorch_optimizer": pytorch_optimizer_lars_step,
    "torchlars": torchlars_step,
}

LAMB_ANCHORS: dict[str, Callable] = {
    "paper": paper_lamb_step,
    "apex": apex_lamb_step,
    "timm": timm_lamb_step,
    "cybertron": cybertron_lamb_step,
    "optax": optax_lamb_step,
    "deepspeed": deepspeed_lamb_step,
    "deepspeed_legacy": deepspeed_legacy_lamb_step,
    "pytorch_optimizer": pytorch_optimizer_lamb_step,
}
