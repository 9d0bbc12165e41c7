"""Low-bit optimizer state (issue #26): the state formats, their keys in ``optimizer.state[p]``, and the
one quantized store every backend performs at the end of a step.

The arithmetic (Philox, bf16 rounding, 8-bit block quantization, the master split) is
:mod:`fusedlars.backends.lowbit`; this module says which of it is applied to which state tensor.

Formats of a state buffer (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``), chosen per param group by
``state_dtype``, held by the bucket (``Bucket.state_storage``):

* ``"float32"``: the buffer in the state dtype (fp32; fp64 for fp64 params), as torch.optim keeps it;
* ``"bfloat16"``: the buffer as a bf16 tensor of the param's shape;
* ``"int8"``: ``<name>`` a uint8 tensor of the param's shape holding dynamic-tree codes (the signed map
  for momentum_buffer / exp_avg, the unsigned map for exp_avg_sq) and ``<name>_absmax`` one fp32
  scale per 256-element block of the param (``ceil(numel / 256)`` of them; no block spans two params).

``master_weights="remainder"`` keeps ``master_remainder``, an int16 tensor of the param's shape: the
fp32 master is the bf16 param plus it (lowbit NOTE [Master split]).

# NOTE: [Low-bit state: where values become fp32]
# A step dequantizes the stored state exactly (bf16 -> fp32; int8: map[code] * absmax, one fp32
# product), takes the per-layer norms and trust ratio from the exact values (never from quantized
# ones) in float64, and computes the new state value s32 with the fp32 kernels' element math, operation
# by operation (csrc/lars_math.h NOTE [Low-bit element math in fp32]; the reference does the same fp32
# operations with torch), and stores it as
#
#     bf16:  bits = (fp32_bits(s32) + (word & 0xFFFF)) >> 16        stochastic rounding (lowbit)
#     int8:  absmax = max |s32| over the block,  code = nearest map code of s32 / absmax
#
# with ``word`` the 16 random bits of the element for this buffer (lowbit.sr_bits: NOTE [Stochastic-
# rounding bits: 16 per value, 8 per Philox call]; the buffer's slot is BUFFER[name]), drawn from the
# Philox-4x32-10 call of counter (element // per call, step, param index) under the optimizer's
# 64-bit seed, where ``step`` is the param's step count AFTER this step (state["step"] once it is done: 1 at the first
# step) and ``param index`` its position in the optimizer's flat param order (the state_dict id).
# fp32 is the point of the contract: the quantization of a given s32 is bitwise the same in every
# backend (tests/test_lowbit.py), and s32 is the fp32 every backend holds in its registers (the same
# operations in the same order, uncontracted: bitwise the reference's given the same per-layer
# norms). The params are updated from the unquantized s32 (as the fp32-state step updates them from
# the value it stores), so the weights do not see the quantization error of this step, only of the
# state read at the next one.
# A skipped step (GradScaler found an inf) stores nothing: codes, scales and bf16 bits unchanged.
# Loading or converting state between formats (load_state_dict, a changed state_dtype) rounds to
# nearest: bf16 round-to-nearest-even, int8 nearest codes; no random bits are drawn.
#
# NOTE: [Every tensor is quantized]
# A group's state_dtype applies to every param of the group, however small: there is no
# ``min_8bit_size`` (bitsandbytes and torchao keep tensors under 4096 elements in fp32). Measured on
# the parity tasks (issue #26): one-shot int8 quantization of a trained LAMB state changes the Adam
# direction of LayerNorm weights/biases, biases, the embedding and the head by 0.5-4% (norm of the
# difference over the norm), as much as of the large matrices (2-2.3%); the outlier was a 2048-element
# FFN weight (2.5x), where units whose ReLU died keep an exp_avg_sq far below their block's absmax:
# it codes to 0 while exp_avg does not, so u = m / eps (the "zero-point problem" of Li et al., "Memory
# Efficient Optimizers with 4-bit States", NeurIPS 2023). A size rule would hide that only in models
# whose matrices are all small, and the parity runs end equal without one (tests/test_low_memory_state
# NOTE [Training parity over seeds]). bf16 has no such failure (a relative error of 2**-9 per value).
"""

from __future__ import annotations

import torch

from . import lowbit

#: ``state_dtype`` values as stored in buckets: the canonical name of each format.
STORAGES = ("float32", "bfloat16", "int8")
#: which map quantizes each state buffer (exp_avg_sq is never negative: the unsigned map)
SIGNED = {"momentum_buffer": True, "exp_avg": True, "exp_avg_sq": False}
#: each buffer's slot for stochastic rounding: (its index, buffers rounded per element) in lowbit.sr_bits
BUFFER = {"momentum_buffer": (0, 1), "exp_avg": (0, 2), "exp_avg_sq": (1, 2)}
#: the key of the int16 remainder of ``master_weights="remainder"``
REMAINDER_KEY = "master_remainder"
#: the seed of the stochastic rounding when the constructor is given none (any fixed value: runs are
#: reproducible; the issue number)
DEFAULT_SEED = 26


def absmax_key(name: str) -> str:
    """The state key of the per-block fp32 scales of int8 buffer ``name``."""
    return name + "_absmax"


def storage_name(v) -> str:
    """The canonical format name of a ``state_dtype`` value (``torch.float32`` / ``torch.bfloat16`` /
    ``"int8"``, or their names); ValueError for anything else."""
    if v is torch.float32 or v in ("float32", "fp32"):
        return "float32"
    if v is torch.bfloat16 or v in ("bfloat16", "bf16"):
        return "bfloat16"
    if v in ("int8", torch.int8, torch.uint8):
        return "int8"
    raise ValueError(v)


def mem_flat(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as a 1-D view in memory order (``t`` dense: Bucket NOTE [Dense segments]). The
    element index of the block quantization and of the random words is this order's: the order a
    fused kernel walks a segment in (the row-major index for a contiguous param)."""
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,))


def format_of(t: torch.Tensor) -> str:
    """The format a stored state tensor is in, from its dtype."""
    if t.dtype == torch.uint8:
        return "int8"
    if t.dtype == torch.bfloat16:
        return "bfloat16"
    return "float32"


def decode(name: str, value: torch.Tensor, absmax: torch.Tensor | None) -> torch.Tensor:
    """The fp32 (fp64 for fp64 state) values of a stored buffer, of ``value``'s shape, exactly:
    bf16 -> fp32, int8 -> map[code] * absmax (NOTE above)."""
    fmt = format_of(value)
    if fmt == "int8":
        if absmax is None:
            raise ValueError(f"int8 state {name!r} has no {absmax_key(name)!r} scales")
        scales = absmax.to(device=value.device, dtype=torch.float32)
        out = torch.empty_like(value, dtype=torch.float32)
        mem_flat(out).copy_(lowbit.dequantize_blockwise(mem_flat(value), scales, SIGNED[name]))
        return out
    if fmt == "bfloat16":
        return value.to(torch.float32)
    return value


def encode_nearest(
    name: str, x: torch.Tensor, storage: str, full_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` stored in ``storage`` with round-to-nearest (conversions and loads: NOTE above): the stored
    tensor (``x``'s shape and strides) and the int8 scales (None for the other formats)."""
    if storage == "float32":
        return torch.empty_like(x, dtype=full_dtype).copy_(x), None
    x32 = x.to(torch.float32)
    if storage == "bfloat16":
        out = torch.empty_like(x, dtype=torch.bfloat16)
        out.copy_(lowbit.round_bf16_nearest(x32.contiguous()).view(x.shape))
        return out, None
    x32 = torch.empty_like(x, dtype=torch.float32).copy_(x)
    codes, scales = lowbit.quantize_blockwise(mem_flat(x32), SIGNED[name])
    out = torch.empty_like(x, dtype=torch.uint8)
    mem_flat(out).copy_(codes)
    return out, scales


def fresh(
    name: str, like: torch.Tensor, storage: str, full_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A zero buffer in ``storage`` (int8: the code of 0 with zero scales), with ``like``'s strides."""
    if storage == "float32":
        return torch.zeros_like(like, dtype=full_dtype), None
    if storage == "bfloat16":
        return torch.zeros_like(like, dtype=torch.bfloat16), None
    codes = torch.full_like(like, lowbit.zero_code(SIGNED[name]), dtype=torch.uint8)
    return codes, torch.zeros(lowbit.num_blocks(like.numel()), dtype=torch.float32, device=like.device)


def sr_bits(seed: int, step, param_index, elem: torch.Tensor, name: str) -> torch.Tensor:
    """The 16 random bits with which buffer ``name`` of elements ``elem`` (int64 tensor of element
    indices inside their param) of param ``param_index`` at step ``step`` (ints or int64 tensors
    broadcasting with ``elem``) is stochastically rounded (lowbit.sr_bits, slot BUFFER[name])."""
    k, buffers = BUFFER[name]
    return lowbit.sr_bits(seed, step, param_index, elem, buffers)[k]


def store_bf16(x32: torch.Tensor, rand: torch.Tensor) -> torch.Tensor:
    """The stochastically rounded bf16 of ``x32`` (fp32) with random words ``rand`` (same numel)."""
    return lowbit.round_bf16_stochastic(x32.reshape(-1), rand.reshape(-1)).view(x32.shape)


def quantize_padded(x32: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Block quantization of a ``[blocks, QBLOCK]`` fp32 tensor whose rows are the blocks (zeros past
    a param's end): ``(codes uint8 [blocks, QBLOCK], absmax fp32 [blocks])``, lowbit.quantize_blockwise
    row by row (a zero pad changes no block's max |x|)."""
    scales = x32.abs().amax(dim=1) if x32.numel() else x32.new_zeros((x32.shape[0],))
    v = lowbit.normalize(x32, scales[:, None].expand_as(x32))
    return lowbit.quantize_codes(v, signed), scales


def state_bytes(st: dict) -> int:
    """Bytes of the optimizer-state tensors of one param's state dict entry (step counters excluded)."""
    return sum(v.numel() * v.element_size() for k, v in st.items() if k != "step" and isinstance(v, torch.Tensor))


#: state keys of the low-bit formats besides the buffers themselves (state_dict loading)
def is_lowbit_key(key: str) -> bool:
    return key == REMAINDER_KEY or (key.endswith("_absmax") and key[: -len("_absmax")] in SIGNED)


def load_entry(entry: dict, param: torch.Tensor, storage: str, full_dtype: torch.dtype, master_weights) -> bool:
    """Bring one param's loaded state ``entry`` (tensors already on the param's device) into this
    optimizer's formats, in place: buffers converted to ``storage`` with round-to-nearest (fp32 into
    bf16 / int8, bf16 / int8 into fp32: exact), masters between ``master_weight`` (fp32) and
    ``master_remainder`` (int16) as ``master_weights`` keeps them. Returns False when a saved master
    is dropped because it is not the param's (its split is not the param: the param is the truth).
    ValueError when an int8 buffer's scales are missing or of the wrong size."""
    for name in SIGNED:
        v = entry.get(name)
        akey = absmax_key(name)
        scale = entry.pop(akey, None)
        if v is None:
            continue
        if format_of(v) == "int8":
            nb = lowbit.num_blocks(v.numel())
            if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (nb,):
                got = tuple(scale.shape) if isinstance(scale, torch.Tensor) else None
                raise ValueError(
                    f"int8 state {name!r} needs {akey!r}: {nb} fp32 scales (one per {lowbit.QBLOCK} elements), "
                    f"got {got}"
                )
            scale = scale.to(torch.float32)
        fmt = format_of(v)
        if fmt == storage and (storage != "float32" or v.dtype == full_dtype):
            entry[name] = v
            if scale is not None:
                entry[akey] = scale
            continue
        stored, new_scale = encode_nearest(name, decode(name, v, scale), storage, full_dtype)
        entry[name] = stored
        if new_scale is not None:
            entry[akey] = new_scale
    kept = True
    rem = entry.pop(REMAINDER_KEY, None)
    remainder = master_weights == "remainder" and param.dtype == torch.bfloat16
    if rem is not None:
        if tuple(rem.shape) != tuple(param.shape):
            raise ValueError(f"{REMAINDER_KEY!r} has shape {tuple(rem.shape)}, the param has {tuple(param.shape)}")
        if remainder:
            entry[REMAINDER_KEY] = rem.to(torch.int16)
        elif master_weights and param.dtype == torch.bfloat16 and "master_weight" not in entry:
            # the fp32 master the remainder stands for, with the param it was saved beside
            entry["master_weight"] = lowbit.master_rebuild(param.detach(), rem.to(torch.int16)).view(param.shape)
    m = entry.pop("master_weight", None) if remainder else None
    if m is not None and REMAINDER_KEY not in entry:
        p_bits, r = lowbit.master_split(m.to(torch.float32))
        if torch.equal(p_bits.view(param.shape), param.detach()):
            entry[REMAINDER_KEY] = r.view(param.shape)
        else:
            kept = False
    return kept
