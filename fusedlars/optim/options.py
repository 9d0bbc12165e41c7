"""Option sets of LARS and LAMB, their validation, and the presets.

Every LARS / LAMB implementation in use differs from the others in a handful of
choices (each option's docstring names the implementations and files it follows). Each choice is an
option here, so that each implementation is an exact special case: a *preset*
is nothing but a dict of option values. Resolution order for one param group:

    base defaults  <  preset  <  explicit keyword arguments  <  group keys

Validation happens here, before any tensor is touched, and every error names
the parameter and the fix.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..backends import lowbit_state
from ..backends.formulas import TV_DEFAULTS, TV_KEYS

__all__ = [
    "LARS_DEFAULTS",
    "LAMB_DEFAULTS",
    "LARS_PRESETS",
    "LAMB_PRESETS",
    "presets",
    "resolve",
    "mlperf_no_weight_decay",
    "mlperf_no_adaptation",
    "validate_lars_group",
    "validate_lamb_group",
    "STATE_DTYPES",
    "check_master_weights",
    "check_seed",
]

_INF = math.inf

# ---------------------------------------------------------------------------
# Low-memory state (issue #26): both kinds
# ---------------------------------------------------------------------------

#: ``state_dtype`` values (constructor keyword and param-group key), with what they store.
STATE_DTYPES: dict[str, str] = {
    "torch.float32": "state in fp32 (fp64 for fp64 params), as torch.optim: the default",
    "torch.bfloat16": "state in bf16, updated in fp32 and stored with stochastic rounding (Philox bits keyed "
    "by seed, step, param and element): 2 B per buffer element",
    "'int8'": "block-wise 8-bit dynamic-tree codes (signed map for momentum / exp_avg, unsigned for "
    "exp_avg_sq) plus one fp32 absmax per 256-element block: ~1.02 B per buffer element",
}

# ---------------------------------------------------------------------------
# LARS
# ---------------------------------------------------------------------------

#: Choices of each string-valued LARS option, with what they mean.
LARS_CHOICES: dict[str, dict[str, str]] = {
    "denominator": {
        "sum_of_norms": "||g|| + wd*||w|| + eps (paper, timm, apex LARC, torchlars, Lightning, MLPerf)",
        "norm_of_sum": "||g + wd*w|| + eps (Barlow Twins, TVLARS, optax)",
        "grad_only": "||g|| + eps (weight decay not in the ratio)",
    },
    "weight_decay_mode": {
        "l2": "g' = r*(g + wd*w): decay enters the step and is scaled by the ratio",
        "ratio_only": "wd only in the denominator, never in the step (old tf.contrib LARS)",
        "decoupled": "w <- w - lr*wd*w beside the ratio-scaled step",
    },
    "zero_norm": {
        "one": "ratio = 1 where a norm is zero; weight decay still applies (timm, BT, optax)",
        "skip": "neither ratio nor weight decay where a norm is zero (apex LARC, Lightning)",
    },
    "zero_norm_check": {
        "raw_grad": "a layer is adapted when ||w|| > 0 and ||g|| > 0 (timm, LARC, MLPerf)",
        "update": "... when ||w|| > 0 and the denominator's gradient-side norm > 0 (BT, TVLARS, optax)",
        "denominator": "... when ||w|| > 0 and the whole denominator > 0 (pytorch_optimizer)",
    },
    "adapt_when": {
        "always": "every non-excluded layer gets a trust ratio",
        "weight_decay_nonzero": "only groups with weight_decay != 0 (timm, Lightning)",
    },
    "momentum_mode": {
        "torch": "b <- mu*b + (1-d)*g'; w <- w - lr*b (torch SGD; lr outside the buffer)",
        "classic": "v <- mu*v + lr*g'; w <- w - v (paper, optax; lr inside the buffer)",
    },
    "first_step_buffer": {
        "clone": "b_1 = g' (torch SGD)",
        "zeros": "b_0 = 0, so b_1 = (1-d)*g' (Barlow Twins, TVLARS, pytorch_optimizer); "
        "the two agree unless dampening != 0, and always in classic mode (v_1 = lr*g')",
    },
}

#: Base LARS defaults: the clean, torch-SGD-compatible choice.
LARS_DEFAULTS: dict[str, Any] = {
    "momentum": 0.9,
    "dampening": 0.0,
    "weight_decay": 0.0,
    "nesterov": False,
    "trust_coefficient": 1e-3,
    "eps": 1e-8,
    "maximize": False,
    "denominator": "sum_of_norms",
    "weight_decay_mode": "l2",
    "zero_norm": "one",
    "zero_norm_check": "raw_grad",
    "norm_clamp": None,
    "trust_clip": None,
    "adapt_when": "always",
    "exclude_from_weight_decay": False,
    "exclude_from_adaptation": False,
    "momentum_mode": "torch",
    "first_step_buffer": "clone",
    # TVLARS time-varying factor (None: plain LARS).
    "tv": None,
    # storage of the momentum buffer (issue #26): torch.float32 | torch.bfloat16 | "int8"
    "state_dtype": torch.float32,
}

_NDIM1 = "ndim<=1"  # biases and norm scales, and 0-dim scalars


# NVIDIA's MLPerf ResNet-50 LARS (mlcommons/training_results_v0.7 @ c6640611,
# NVIDIA/benchmarks/resnet/implementations/mxnet/common/fit.py, SGDwLARS and SGDwFASTLARS) decides by
# MXNet parameter name: ``set_wd_mult`` zeroes the decay of every name that does not end with
# '_weight', except names containing both 'fc' and 'bias' (the fc bias IS decayed); ``_get_lars`` /
# ``multi_lars`` skip the ratio for names ending with 'gamma', 'beta' or 'bias' (fc bias included).
# torch names a normalization layer's scale '<layer>.weight' (1-D) where MXNet says '<layer>_gamma':
# a 1-D name ending in 'weight' but not '_weight' counts as a gamma. Without names (plain
# ``model.parameters()``) the rules fall back to the parameter's dimension: ndim <= 1 is excluded
# from both (the fc bias is then not decayed), and a warning says so at construction.
def mlperf_no_weight_decay(name: str | None, p: Any) -> bool:
    """MLPerf ResNet-50 (NVIDIA MXNet) weight-decay exclusion: all but weights and the fc bias."""
    if name is None:
        return p.ndim <= 1
    decayed = name.endswith("_weight") or (name.endswith("weight") and p.ndim > 1) or ("fc" in name and "bias" in name)
    return not decayed


def mlperf_no_adaptation(name: str | None, p: Any) -> bool:
    """MLPerf ResNet-50 (NVIDIA MXNet) trust-ratio exclusion: BN gamma/beta and every bias."""
    if name is None:
        return p.ndim <= 1
    if name.endswith(("gamma", "beta", "bias")):
        return True
    return name.endswith("weight") and not name.endswith("_weight") and p.ndim <= 1


#: Named exclusion rules, written ``"rule:<name>"`` in an exclusion spec: a string, so that a
#: state_dict's param groups stay loadable with ``torch.load(weights_only=True)`` (a function is not).
#: They decide by parameter name and fall back to ``ndim <= 1`` without names.
RULES: dict[str, Callable[[str | None, Any], bool]] = {
    "mlperf_no_weight_decay": mlperf_no_weight_decay,
    "mlperf_no_adaptation": mlperf_no_adaptation,
}
_RULE = "rule:"
_NDIM_EQ1 = "ndim==1"  # Barlow Twins / TVLARS test p.ndim == 1 exactly

LARS_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("clean defaults: ||g||+wd||w||+eps, torch-SGD momentum, no exclusions", {}),
    "paper": (
        "You, Gitman & Ginsburg 2017 Alg. 1: ||g||+wd||w||, no eps, lr inside the momentum",
        {"eps": 0.0, "momentum_mode": "classic", "first_step_buffer": "zeros"},
    ),
    "timm": (
        "timm.optim.Lars: ||g||+wd||w||+1e-8, adapted only where weight_decay != 0; "
        "defaults lr 1.0, momentum 0 (as timm)",
        {"lr": 1.0, "momentum": 0.0, "eps": 1e-8, "adapt_when": "weight_decay_nonzero"},
    ),
    "apex_larc_clip": (
        "apex LARC(clip=True) around torch.optim.SGD: eta 0.02, ratio min(r/lr, 1), zero norm skips ratio and "
        "decay; default momentum 0 (SGD's)",
        {"momentum": 0.0, "trust_coefficient": 0.02, "eps": 1e-8, "zero_norm": "skip", "trust_clip": "larc"},
    ),
    "apex_larc_scale": (
        "apex LARC(clip=False) around torch.optim.SGD: eta 0.02, zero norm skips ratio and decay; "
        "default momentum 0 (SGD's)",
        {"momentum": 0.0, "trust_coefficient": 0.02, "eps": 1e-8, "zero_norm": "skip"},
    ),
    "lightning": (
        "Lightning Bolts / Flash LARS: adapted only where weight_decay != 0, zero norm skips; default momentum 0",
        {"momentum": 0.0, "eps": 1e-8, "zero_norm": "skip", "adapt_when": "weight_decay_nonzero"},
    ),
    "barlowtwins": (
        "Barlow Twins LARS: ||g+wd*w||, no eps, zero buffer; 1-D params excluded from decay and ratio by default "
        "(the flags its main.py passes; the class itself defaults them off)",
        {
            "eps": 0.0,
            "denominator": "norm_of_sum",
            "zero_norm_check": "update",
            "exclude_from_weight_decay": _NDIM_EQ1,
            "exclude_from_adaptation": _NDIM_EQ1,
            "first_step_buffer": "zeros",
        },
    ),
    "tvlars_official": (
        "official TVLARS code: Barlow Twins LARS, norms clamped to [0,10], phi_t = 1/(0.1+exp(lmbda*(t+1))); "
        "defaults weight_decay 5e-4, momentum 0.9 (its class) and 1-D params excluded from decay and ratio "
        "(its clf.py call site)",
        {
            "eps": 0.0,
            "weight_decay": 5e-4,
            "denominator": "norm_of_sum",
            "zero_norm_check": "update",
            "norm_clamp": (0.0, 10.0),
            "exclude_from_weight_decay": _NDIM_EQ1,
            "exclude_from_adaptation": _NDIM_EQ1,
            "first_step_buffer": "zeros",
            "tv": dict(TV_DEFAULTS),
        },
    ),
    "optax": (
        "optax.lars: ||g+wd*w||, eps 0, lr inside the momentum trace",
        {
            "eps": 0.0,
            "denominator": "norm_of_sum",
            "zero_norm_check": "update",
            "momentum_mode": "classic",
            "first_step_buffer": "zeros",
        },
    ),
    "mlperf": (
        "MLPerf ResNet-50 v0.7 (NVIDIA MXNet SGDwLARS/SGDwFASTLARS): ||g||+wd||w||, eps 0; by parameter name: "
        "BN gamma/beta and biases get no ratio, only weights and the fc bias are decayed; defaults "
        "momentum 0.9, weight_decay 1e-4 (its training script)",
        {
            "eps": 0.0,
            "weight_decay": 1e-4,
            "exclude_from_weight_decay": "rule:mlperf_no_weight_decay",
            "exclude_from_adaptation": "rule:mlperf_no_adaptation",
        },
    ),
    "pytorch_optimizer": (
        "pytorch_optimizer.LARS 4.x: ||g||+wd||w||, eps 0, only ndim>1 adapted and decayed, zero buffer; "
        "default lr 1e-3",
        {
            "lr": 1e-3,
            "eps": 0.0,
            "zero_norm_check": "denominator",
            "exclude_from_weight_decay": _NDIM1,
            "exclude_from_adaptation": _NDIM1,
            "first_step_buffer": "zeros",
        },
    ),
    "torchlars": (
        "kakaobrain torchlars around torch.optim.SGD: ||g||+wd||w||+1e-8, ratio 1 on zero norms; "
        "default momentum 0 (SGD's)",
        {"momentum": 0.0, "eps": 1e-8},
    ),
}

# ---------------------------------------------------------------------------
# LAMB
# ---------------------------------------------------------------------------

LAMB_CHOICES: dict[str, dict[str, str]] = {
    "bias_correction": {
        "both": "u = (m/(1-b1^t)) / (sqrt(v/(1-b2^t) + eps_root) + eps)",
        "none": "u = m / (sqrt(v + eps_root) + eps) (cybertron, TVLARS repo)",
        "first_outside": "u = m / (sqrt(v) + eps); step scaled by 1/(1-b1^t) outside the ratio (pytorch_optimizer)",
        "both_outside": "u = m / (sqrt(v + eps_root) + eps) from the raw moments; step scaled by "
        "sqrt(1-b2^t)/(1-b1^t) outside the ratio (DeepSpeed FusedLamb v0.1.0 to v0.19.6)",
    },
    "weight_decay_mode": {
        "in_update": "u <- u + wd*w, inside the trust ratio (paper, apex, timm)",
        "l2": "g <- g + wd*w before the moments (apex adam_w_mode=0)",
        "decoupled": "w <- w*(1 - lr*wd) before the norms (timm decoupled_decay, pytorch_optimizer)",
    },
    "adapt_when": LARS_CHOICES["adapt_when"],
}

LAMB_DEFAULTS: dict[str, Any] = {
    "betas": (0.9, 0.999),
    "eps": 1e-6,
    "weight_decay": 0.0,
    "maximize": False,
    "bias_correction": "both",
    "grad_averaging": True,
    "max_grad_norm": None,
    "weight_decay_mode": "in_update",
    "adapt_when": "always",
    "trust_clip": None,
    "weight_norm_clamp": None,
    "trust_ratio_eps": 0.0,
    "eps_root": 0.0,
    "adam": False,
    "exclude_from_weight_decay": False,
    "exclude_from_adaptation": False,
    # storage of exp_avg / exp_avg_sq (issue #26): torch.float32 | torch.bfloat16 | "int8"
    "state_dtype": torch.float32,
}

LAMB_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("You et al. 2019 LAMB: bias-corrected Adam + wd*w, ratio ||w||/||u|| on every layer", {}),
    "paper": ("You et al. 2019 Algorithm 2 (same as default)", {}),
    "apex": (
        "apex FusedLAMB: global grad clip 1.0, ratio only where weight_decay != 0; default weight_decay 0.01",
        {"weight_decay": 0.01, "max_grad_norm": 1.0, "adapt_when": "weight_decay_nonzero"},
    ),
    "timm": (
        "timm.optim.Lamb: global grad clip 1.0, ratio only where weight_decay != 0; default weight_decay 0.01",
        {"weight_decay": 0.01, "max_grad_norm": 1.0, "adapt_when": "weight_decay_nonzero"},
    ),
    "cybertron": (
        "cybertronai pytorch-lamb (TVLARS repo): no bias correction, ||w|| clamped to [0,10]",
        {"bias_correction": "none", "weight_norm_clamp": (0.0, 10.0)},
    ),
    "optax": ("optax.lamb: bias-corrected Adam (+eps_root) + wd*w, ratio on every layer", {}),
    "deepspeed": (
        "DeepSpeed FusedLamb, current kernel (bias-corrected m and v): eps 1e-8, ratio clamped to [0.01, 10]",
        {"eps": 1e-8, "trust_clip": ("range", 0.01, 10.0)},
    ),
    "deepspeed_legacy": (
        "DeepSpeed FusedLamb v0.1.0 to v0.19.6: raw moments, ratio clamped to [0.01, 10], "
        "lr*sqrt(1-b2^t)/(1-b1^t) outside the ratio, eps 1e-8 (not fused: torch backend)",
        {"eps": 1e-8, "trust_clip": ("range", 0.01, 10.0), "bias_correction": "both_outside"},
    ),
    "pytorch_optimizer": (
        "pytorch_optimizer.Lamb 4.x: decoupled decay, 1/(1-b1^t) outside, ||w||<=10, ratio eps = eps",
        {
            "bias_correction": "first_outside",
            "weight_decay_mode": "decoupled",
            "weight_norm_clamp": (0.0, 10.0),
            "trust_ratio_eps": "eps",
        },
    ),
}

# Keys of torch optimizers' param groups that carry no semantics here; loading a
# torch checkpoint (e.g. torch.optim.SGD) may bring them along.
TORCH_INFRA_KEYS = frozenset(
    {"foreach", "fused", "differentiable", "capturable", "decoupled_weight_decay", "initial_lr", "amsgrad"}
)
# Keys we add to groups ourselves (bookkeeping, not options).
BOOKKEEPING_KEYS = frozenset({"params", "param_names", "preset", "initial_lr"})


def presets() -> dict[str, dict[str, str]]:
    """Every preset, one line each: ``{"LARS": {name: line}, "LAMB": {name: line}}``."""
    return {
        "LARS": {k: v[0] for k, v in LARS_PRESETS.items()},
        "LAMB": {k: v[0] for k, v in LAMB_PRESETS.items()},
    }


def resolve(
    kind: str, preset: str | None, explicit: Mapping[str, Any], *, base_override: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Merge base defaults, the preset and the explicit keyword arguments."""
    table = LARS_PRESETS if kind == "LARS" else LAMB_PRESETS
    base = dict(LARS_DEFAULTS if kind == "LARS" else LAMB_DEFAULTS)
    if base_override:
        base.update(base_override)
    name = preset or "default"
    if name not in table:
        raise ValueError(
            f"{kind}: unknown preset={name!r}. Choose one of {sorted(table)} (fusedlars.presets() describes each)."
        )
    out = dict(base)
    out.update(table[name][1])
    for k, v in explicit.items():
        if k not in base:
            raise TypeError(f"{kind}: unknown option {k!r}. Known options: {sorted(base)}.")
        out[k] = v
    return out


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


def _err(kind: str, where: str, msg: str) -> ValueError:
    return ValueError(f"{kind}{where}: {msg}")


#: An exclusion string that compares the parameter's dimension: "ndim" then an operator and an integer.
_NDIM_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt,
             ">": operator.gt}  # fmt: skip
_NDIM_RE = re.compile(r"\s*ndim\s*(<=|>=|==|!=|<|>)\s*(\d+)\s*")
NDIM_FORMS = "'ndim' then one of <, <=, ==, !=, >=, > and an integer, e.g. 'ndim<=1', 'ndim>=5'"


def _looks_ndim(s: str) -> bool:
    """An exclusion string meant as an ndim comparison (a well-formed one or not), not a name regex."""
    return re.match(r"\s*ndim\s*[<>=!]", s) is not None


def _ndim_rule(s: str) -> Callable[[str | None, Any], bool] | None:
    """``"ndim>=5"`` -> ``f(name, param) = param.ndim >= 5``; None when ``s`` is not such a comparison."""
    m = _NDIM_RE.fullmatch(s)
    if m is None:
        return None
    op, k = _NDIM_OPS[m.group(1)], int(m.group(2))
    return lambda name, p: op(p.ndim, k)


def _check_float(
    kind, where, name, v, lo=None, hi=None, lo_open=False, hi_open=False, allow_tensor=False, finite=False
):
    """``finite``: +-inf is refused too, with the same range in the message (issue #29: ``lr=inf`` was accepted
    while ``lr=-1`` was told the range "[0.0, inf)")."""
    import torch

    if allow_tensor and isinstance(v, torch.Tensor):
        if v.numel() != 1 or not v.is_floating_point():
            raise _err(kind, where, f"{name} must be a float or a 1-element float tensor, got {v!r}.")
        return  # no host sync to look at its value
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _err(kind, where, f"{name} must be a number, got {type(v).__name__} {v!r}.")
    if math.isnan(v):
        raise _err(kind, where, f"{name} is NaN; pass a finite number.")
    if finite and math.isinf(v):
        lo_s = f"{'(' if lo_open else '['}{lo}" if lo is not None else "(-inf"
        hi_s = f"{hi}{')' if hi_open else ']'}" if hi is not None else "inf)"
        raise _err(kind, where, f"{name}={v} is outside {lo_s}, {hi_s}; pass a finite value in that range.")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{')' if hi_open or hi is None else ']'}"
        raise _err(kind, where, f"{name}={v} is outside {rng}; pass a value in that range.")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise _err(kind, where, f"{name}={v} is outside {rng}; pass a value in that range.")


def _check_choice(kind, where, name, v, choices):
    if v not in choices:
        lines = "; ".join(f"{k!r}: {d}" for k, d in choices.items())
        raise _err(kind, where, f"{name}={v!r} is not supported. Choose one of: {lines}.")


def _check_exclude(kind, where, name, v):
    if isinstance(v, bool) or v is None or callable(v):
        return
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise _err(
            kind,
            where,
            f"{name} must be a bool, a callable (name, param) -> bool, an ndim comparison ({NDIM_FORMS}), a named rule "
            f"{sorted(_RULE + r for r in RULES)}, or a regex / list of regexes matched against parameter names; "
            f"got {v!r}.",
        )
    import re

    for s in items:
        if s.startswith(_RULE):
            if s[len(_RULE) :] not in RULES:
                raise _err(kind, where, f"{name}: unknown rule {s!r}; known: {sorted(_RULE + r for r in RULES)}.")
        elif _looks_ndim(s):
            if _ndim_rule(s) is None:
                raise _err(kind, where, f"{name}: {s!r} is not an ndim comparison; {NDIM_FORMS}.")
        else:
            try:
                re.compile(s)
            except re.error as e:
                raise _err(kind, where, f"{name}: {s!r} is not a valid regular expression ({e}).") from None


def _check_pair(kind, where, name, v):
    if v is None:
        return
    if not (isinstance(v, (tuple, list)) and len(v) == 2):
        raise _err(kind, where, f"{name} must be None or a (low, high) pair, got {v!r}.")
    lo, hi = v
    _check_float(kind, where, f"{name}[0]", lo, 0.0)
    _check_float(kind, where, f"{name}[1]", hi, 0.0)
    if hi < lo:
        raise _err(kind, where, f"{name}={tuple(v)} has high < low; pass (low, high) with low <= high.")


def _check_trust_clip(kind, where, v, allowed):
    if v is None or v in allowed:
        return
    if isinstance(v, (tuple, list)) and len(v) == 3 and v[0] == "range":
        _check_pair(kind, where, "trust_clip range", v[1:])
        return
    raise _err(
        kind,
        where,
        f"trust_clip={v!r} is not supported. Use None, {', '.join(repr(a) for a in allowed)} or ('range', low, high).",
    )


def state_storage(v: Any) -> str | None:
    """The format name (lowbit_state.STORAGES) of a ``state_dtype`` value, None when it is not one."""
    try:
        return lowbit_state.storage_name(v)
    except (ValueError, TypeError):
        return None


def _check_state_dtype(kind, where, g):
    """``state_dtype`` and what it needs of the group's params (when the group lists them)."""
    v = g["state_dtype"]
    storage = state_storage(v)
    if storage is None:
        lines = "; ".join(f"{k}: {d}" for k, d in STATE_DTYPES.items())
        raise _err(kind, where, f"state_dtype={v!r} is not supported. Choose one of: {lines}.")
    if storage == "float32":
        return
    label = _first_param_of(g, torch.float64)
    if label is not None:
        raise _err(
            kind,
            where,
            f"state_dtype={v!r} stores the state below fp32, but {label} is float64 (its state is fp64): "
            "put float64 params in a param group with state_dtype=torch.float32.",
        )


def _first_param_of(g: Mapping[str, Any], dtype: torch.dtype) -> str | None:
    """The label ("parameter 'name'" or "parameter #j") of the group's first param of ``dtype``, or None
    (a group being validated before it lists its params has none)."""
    names = g.get("param_names") or [None] * len(g.get("params", ()))
    for j, p in enumerate(g.get("params", ())):
        if isinstance(p, torch.Tensor) and p.dtype == dtype:
            return f"parameter {names[j]!r}" if names[j] else f"parameter #{j}"
    return None


def check_master_weights(kind: str, master_weights: Any) -> None:
    """``master_weights``: False, True (fp32 masters of bf16/fp16 params) or ``"remainder"``."""
    if isinstance(master_weights, bool) or master_weights == "remainder":
        return
    raise ValueError(
        f"{kind}: master_weights must be False, True (fp32 masters of bf16/fp16 params) or 'remainder' (bf16 "
        f"params: the fp32 master kept as the param plus a 16-bit remainder), got {master_weights!r}."
    )


def check_remainder_params(kind: str, where: str, g: Mapping[str, Any], master_weights: Any) -> None:
    """``master_weights="remainder"`` rebuilds an fp32 master from a bf16 param: an fp16 param cannot
    hold the top half of an fp32 (its exponent is 5 bits), so it is refused; fp32 / fp64 params are
    their own masters and need none."""
    if master_weights != "remainder":
        return
    label = _first_param_of(g, torch.float16)
    if label is not None:
        raise _err(
            kind,
            where,
            f"master_weights='remainder' keeps the fp32 master of a bf16 param as the param plus a 16-bit "
            f"remainder, but {label} is float16, whose bits are not the top half of an fp32: use "
            "master_weights=True for float16 params (or train them in bfloat16).",
        )


def check_remainder_optimizer(kind: str, param_groups: list, master_weights: Any) -> None:
    """``master_weights="remainder"`` on an optimizer without a single bf16 param is a mistake (there is
    nothing to split): refused, naming the fix."""
    if master_weights != "remainder":
        return
    dtypes = {p.dtype for g in param_groups for p in g["params"]}
    if dtypes and torch.bfloat16 not in dtypes:
        raise ValueError(
            f"{kind}: master_weights='remainder' keeps fp32 masters of bfloat16 params as a 16-bit remainder, "
            f"but the params are {sorted(str(d) for d in dtypes)}: pass master_weights=False (fp32 params "
            "are their own masters), or cast the model to bfloat16 first (model.to(torch.bfloat16))."
        )


def check_seed(kind: str, seed: Any) -> int:
    """The stochastic-rounding seed: an int in [0, 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"{kind}: seed must be an int in [0, 2**64) (the stochastic rounding's key), got {seed!r}.")
    return int(seed)


def _check_common(kind, where, g):
    _check_float(kind, where, "lr", g["lr"], 0.0, allow_tensor=True, finite=True)
    _check_float(kind, where, "weight_decay", g["weight_decay"], 0.0, finite=True)
    if not isinstance(g["maximize"], bool):
        raise _err(kind, where, f"maximize must be a bool, got {g['maximize']!r}.")
    _check_exclude(kind, where, "exclude_from_weight_decay", g["exclude_from_weight_decay"])
    _check_exclude(kind, where, "exclude_from_adaptation", g["exclude_from_adaptation"])
    _check_state_dtype(kind, where, g)


def validate_lars_group(g: Mapping[str, Any], where: str = "") -> None:
    """Raise ValueError on any invalid or unsupported LARS option in group ``g``."""
    k = "LARS"
    _check_common(k, where, g)
    _check_float(k, where, "momentum", g["momentum"], 0.0, 1.0, hi_open=True)
    _check_float(k, where, "dampening", g["dampening"], 0.0, 1.0)
    _check_float(k, where, "trust_coefficient", g["trust_coefficient"], 0.0)
    _check_float(k, where, "eps", g["eps"], 0.0)
    if not isinstance(g["nesterov"], bool):
        raise _err(k, where, f"nesterov must be a bool, got {g['nesterov']!r}.")
    for name, choices in LARS_CHOICES.items():
        _check_choice(k, where, name, g[name], choices)
    _check_pair(k, where, "norm_clamp", g["norm_clamp"])
    _check_trust_clip(k, where, g["trust_clip"], ("larc", "lambc"))
    if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
        raise _err(k, where, "nesterov=True needs momentum > 0 and dampening = 0 (as torch.optim.SGD).")
    if g["momentum_mode"] == "classic" and g["dampening"] != 0:
        raise _err(
            k, where, "dampening is not defined for momentum_mode='classic' (lr inside the buffer); use dampening=0."
        )
    if g["weight_decay_mode"] == "ratio_only" and g["denominator"] == "norm_of_sum":
        raise _err(
            k,
            where,
            "weight_decay_mode='ratio_only' puts wd only in the denominator, which needs "
            "denominator='sum_of_norms'; norm_of_sum would need wd in the step.",
        )
    tv = g["tv"]
    if tv is not None:
        if not isinstance(tv, Mapping):
            raise _err(k, where, f"tv must be None or a dict of lmbda/alpha/shift/gamma_min/gate, got {tv!r}.")
        unknown = set(tv) - set(TV_KEYS)
        if unknown:
            raise _err(k, where, f"tv has unknown keys {sorted(unknown)}; use lmbda, alpha, shift, gamma_min, gate.")
        tv = {**TV_DEFAULTS, **tv}
        _check_float(k, where, "lmbda", tv["lmbda"], 0.0)
        _check_float(k, where, "alpha", tv["alpha"], 0.0)
        _check_float(k, where, "shift", tv["shift"])
        _check_float(k, where, "gamma_min", tv["gamma_min"], 0.0)
        gate = tv["gate"]
        if isinstance(gate, bool) or not isinstance(gate, int) or gate < 0:
            raise _err(k, where, f"gate must be a non-negative int (steps with phi = 1), got {gate!r}.")
        if tv["alpha"] == 0 and tv["gamma_min"] == 0 and tv["lmbda"] < 0:
            raise _err(k, where, "tv factor would overflow; use lmbda >= 0.")


def validate_lamb_group(g: Mapping[str, Any], where: str = "") -> None:
    """Raise ValueError on any invalid or unsupported LAMB option in group ``g``."""
    k = "LAMB"
    _check_common(k, where, g)
    betas = g["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise _err(k, where, f"betas must be a pair (beta1, beta2), got {betas!r}.")
    _check_float(k, where, "betas[0]", betas[0], 0.0, 1.0, hi_open=True)
    _check_float(k, where, "betas[1]", betas[1], 0.0, 1.0, hi_open=True)
    _check_float(k, where, "eps", g["eps"], 0.0)
    _check_float(k, where, "eps_root", g["eps_root"], 0.0)
    if g["trust_ratio_eps"] != "eps":
        _check_float(k, where, "trust_ratio_eps", g["trust_ratio_eps"], 0.0)
    if g["max_grad_norm"] is not None:
        _check_float(k, where, "max_grad_norm", g["max_grad_norm"], 0.0, lo_open=True)
    for name in ("grad_averaging", "adam"):
        if not isinstance(g[name], bool):
            raise _err(k, where, f"{name} must be a bool, got {g[name]!r}.")
    for name, choices in LAMB_CHOICES.items():
        _check_choice(k, where, name, g[name], choices)
    _check_pair(k, where, "weight_norm_clamp", g["weight_norm_clamp"])
    _check_trust_clip(k, where, g["trust_clip"], ("lambc",))
    if g["eps"] == 0 and g["eps_root"] == 0:
        # u = m / sqrt(v) is 0/0 on coordinates that never saw a gradient.
        raise _err(k, where, "eps=0 with eps_root=0 divides 0 by 0 for untouched coordinates; use eps > 0.")


def trust_clip_spec(clip: Any) -> tuple[str | None, float, float]:
    """``trust_clip`` as the kernels take it: (kind, low, high); low/high only bind for 'range'."""
    if isinstance(clip, (tuple, list)):
        return "range", float(clip[1]), float(clip[2])
    return clip, 0.0, math.inf


class Default:
    """A signature default that is *not passed*: the preset's value wins over it.

    It shows as the value of the default preset (``help(fusedlars.LARS)`` reads ``momentum=0.9``), so
    every default is visible, while ``LARS(preset="torchlars")`` still gets torchlars' momentum 0.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


class _Required:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<required>"


#: Signature default of an argument without a default (LARS's lr, unless the preset has one).
REQUIRED: Any = _Required()
#: Sentinel for "argument not passed", so a preset's value is kept unless overridden.
UNSET: Any = Default(None)


def passed(v: Any) -> bool:
    """True when the caller passed ``v`` (it is neither a :class:`Default` nor :data:`REQUIRED`)."""
    return not isinstance(v, (Default, _Required))


#: bias_correction values that correct the moments (True maps to the preset's one of these).
_CORRECTED = ("both", "first_outside", "both_outside")


def bias_correction_value(v: Any, corrected: str) -> Any:
    """``bias_correction`` given as a bool (apex, timm, DeepSpeed): True -> ``corrected`` (the preset's
    corrected form, "both" unless the preset says otherwise), False -> "none". Other values unchanged."""
    if isinstance(v, bool):
        return corrected if v else "none"
    return v


def corrected_form(preset_value: Any) -> str:
    return preset_value if preset_value in _CORRECTED else "both"


def _items(spec: Any) -> list:
    if spec is None or isinstance(spec, bool) or callable(spec):
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def prefers_names(spec: Any) -> bool:
    """A named rule (``"rule:..."``, MLPerf) decides by parameter name and falls back to ndim without names."""
    return any(isinstance(s, str) and s.startswith(_RULE) for s in _items(spec))


def exclusion_fn(spec: Any) -> Callable[[str | None, Any], bool]:
    """Turn an exclusion spec into ``f(name, param) -> bool`` (True = excluded)."""
    import re

    if spec is None or spec is False:
        return lambda name, p: False
    if spec is True:
        return lambda name, p: True
    if callable(spec):
        return lambda name, p: bool(spec(name, p))
    items = [spec] if isinstance(spec, str) else list(spec)
    rules: list[Callable[[str | None, Any], bool]] = []
    for s in items:
        if s.startswith(_RULE):
            rules.append(RULES[s[len(_RULE) :]])
        elif _looks_ndim(s):
            rules.append(_ndim_rule(s))
        else:
            rx = re.compile(s)

            def rule(name, p, rx=rx, s=s):
                if name is None:
                    raise ValueError(
                        f"exclusion pattern {s!r} matches parameter names, but this param group has none. "
                        "Pass model.named_parameters() (or use fusedlars.param_groups(model, ...))."
                    )
                return rx.search(name) is not None

            rules.append(rule)
    return lambda name, p: any(r(name, p) for r in rules)


def needs_names(spec: Any) -> bool:
    if spec is None or isinstance(spec, bool) or callable(spec):
        return False
    items = [spec] if isinstance(spec, str) else list(spec)
    return any(not (s.startswith(_RULE) or _looks_ndim(s)) for s in items)
