"""Low-bit optimizer-state arithmetic, the specification (issue #26): a counter-based generator, bf16
rounding (to nearest even and stochastic), block-wise 8-bit quantization with dynamic-tree maps, and the
exact fp32 master split into a bf16 param plus a 16-bit remainder.

Every function here is written in torch integer and fp32 ops on whole tensors, so it runs on any
device, and every result is defined down to the bit: ``csrc/lowbit.h`` (C++, CPU and CUDA) and
:mod:`fusedlars.backends.triton_lowbit` (Triton) implement the same functions and
``tests/test_lowbit.py`` checks them bitwise against this module (and this module against slow
per-element references, the Philox known-answer vectors and Triton's ``tl.philox``).

Conventions:

* uint32 arithmetic is emulated in int64 tensors holding values in ``[0, 2**32)`` (torch has no
  general uint32 arithmetic). A 32x32-bit product is one ``torch.uint64`` multiply (exact modulo
  2**64, unsigned wrap-around is defined) where the device has it, else four int64 products that
  stay below ``2**63`` (see :func:`_mulhilo32`); both give the same bits.
* bf16 values travel as their 16-bit patterns: int64 tensors in ``[0, 2**16)`` here, converted to
  ``torch.bfloat16`` tensors by :func:`bf16_from_bits` / :func:`bf16_bits`.
* A "quantization block" is ``QBLOCK = 256`` consecutive elements of ONE param, counted from its
  first element; the last block of a param may be partial. No block spans two params.

Who uses what (later work, issue #26): bf16 optimizer state is stored with
:func:`round_bf16_stochastic` using bits from :func:`sr_bits`; int8 state with
:func:`quantize_blockwise` / :func:`dequantize_blockwise`; ``master_weights="remainder"`` with
:func:`master_split` / :func:`master_rebuild`.
"""

from __future__ import annotations

import functools

import torch

M32 = 0xFFFFFFFF
#: Elements per quantization block (one fp32 absmax scale each).
QBLOCK = 256

# ---------------------------------------------------------------------------------------------
# Philox-4x32-10

#: Philox4x32 round multipliers and Weyl key increments (Salmon et al., SC'11, table 2 / section 4.2;
#: Random123's PHILOX_M4x32_0/1 and PHILOX_W32_0/1; the golden ratio and sqrt(3) - 1 for the W's).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` 32-bit halves of the 64-bit product ``a * m`` (``a``: int64 tensor in ``[0, 2**32)``,
    ``m``: a 32-bit constant). The product can reach ``2**64``, past int64, so ``m`` is split into
    16-bit halves: ``a*m = t + u * 2**16`` with ``t = a*m_lo``, ``u = a*m_hi`` (each ``< 2**48``);
    ``lo = (t + (u << 16)) mod 2**32`` (computed from ``u mod 2**16``) and
    ``hi = (u + (t >> 16)) >> 16`` (exact: ``floor((u*2**16 + t) / 2**32)``)."""
    t = a * (m & 0xFFFF)
    u = a * (m >> 16)
    lo = (t + ((u & 0xFFFF) << 16)) & M32
    hi = (u + (t >> 16)) >> 16
    return hi, lo


@functools.cache
def _uint64_mul_ok(device: str) -> bool:
    """Does ``device`` multiply ``torch.uint64`` tensors (exactly, mod 2**64)? Checked once per
    device type on a product past 2**63 (torch 2.x has uint64 ``*`` but not ``+`` or shifts on CPU)."""
    try:
        a = torch.tensor([M32], dtype=torch.int64, device=device)
        p = (a.view(torch.uint64) * PHILOX_M0).view(torch.int64)
        return int(p.item()) == (M32 * PHILOX_M0) - 2**64
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _mulhilo32_u64(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_mulhilo32` with one uint64 multiply: the full 64-bit product ``a * m`` (exact mod 2**64,
    viewed back as int64: its two's-complement bits), ``lo`` its low and ``hi`` its high 32 bits."""
    p = (a.view(torch.uint64) * m).view(torch.int64)
    return (p >> 32) & M32, p & M32


def philox4x32(
    c0: torch.Tensor | int,
    c1: torch.Tensor | int,
    c2: torch.Tensor | int,
    c3: torch.Tensor | int,
    k0: int,
    k1: int,
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32-R (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC'11),
    the generator of cuRAND's Philox and of Triton's ``tl.philox`` / ``tl.randint``.

    Counter ``(c0, c1, c2, c3)`` (int64 tensors or ints, values in ``[0, 2**32)``, broadcast together),
    key ``(k0, k1)``. One round, with ``hi/lo`` the halves of a 32x32 -> 64-bit product::

        (hi0, lo0) = M0 * c0        (hi1, lo1) = M1 * c2
        (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0,  lo1,  hi0 ^ c3 ^ k1,  lo0)

    and between rounds the key is bumped: ``k0 += W0, k1 += W1 (mod 2**32)``. Returns the four output
    words as int64 tensors in ``[0, 2**32)``. Checked against Random123's known-answer vectors and
    against ``tl.philox`` in tests/test_lowbit.py."""
    like = next((c for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)), None)
    dev = like.device if like is not None else None

    def as_t(c):
        return c.to(torch.int64) if isinstance(c, torch.Tensor) else torch.tensor(int(c) & M32, device=dev)

    c0, c1, c2, c3 = (as_t(c) for c in (c0, c1, c2, c3))
    k0 &= M32
    k1 &= M32
    # same bits either way (tests/test_lowbit.py: known answers); the uint64 product is ~2x faster
    mulhilo = _mulhilo32_u64 if _uint64_mul_ok(c0.device.type) else _mulhilo32
    c0, c2 = c0.contiguous(), c2.contiguous()  # (.view(uint64) needs a dense tensor)
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & M32
            k1 = (k1 + PHILOX_W1) & M32
        hi0, lo0 = mulhilo(c0, PHILOX_M0)
        hi1, lo1 = mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_words(
    seed: int, step: int, param_index: int, numel: int, device: torch.device | str | None = None, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random words of elements ``start .. start + numel - 1`` of param ``param_index`` at step ``step``:
    Philox-4x32-10 keyed by the 64-bit ``seed`` (``k0`` its low word, ``k1`` its high word, as
    ``tl.philox`` splits its seed) on the counter::

        c0 = element index mod 2**32,  c1 = step mod 2**32,  c2 = param index,  c3 = element index >> 32

    (``c3`` is 0 for any param below 2**32 elements). A counter is used once per (seed, step, param,
    element), so every element of every step has its own independent words, the same in every backend
    and on resume. Each call gives four 32-bit words per element: state tensor ``j`` of a step
    (e.g. exp_avg ``j=0``, exp_avg_sq ``j=1``) takes word ``j``."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    idx = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    return philox4x32(idx & M32, step & M32, param_index & M32, idx >> 32, seed & M32, seed >> 32)


# NOTE: [Stochastic-rounding bits: 16 per value, 8 per Philox call]
# Stochastic rounding to bf16 uses 16 random bits per value (round_bf16_stochastic), and one Philox
# call gives 128. So a call serves several elements: a step with ``buffers`` rounded state tensors per
# element (LARS / TVLARS: 1, momentum_buffer; LAMB: 2, exp_avg then exp_avg_sq) gives each call to
# ``P = 8 // buffers`` consecutive elements of one param:
#
#     q = e // P          the call's counter: philox_words(seed, step, param, element q)
#     h = buffer * P + e % P,   bits = (word[h // 2] >> (16 * (h % 2))) & 0xFFFF
#
# i.e. the call's four words read as eight 16-bit halves, low half first (the little-endian uint16
# view of the words): LARS's element 8q + j takes half j, LAMB's element 4q + j takes half j for
# exp_avg and half 4 + j for exp_avg_sq. Every (seed, step, param, element, buffer) still has its own
# 16 bits, used once. Drawing one call per element cost 8x the Philox work (measured on the cpu
# backend: about half of a bf16 LARS step); a GPU kernel may compute the call per element (it is the
# same call for the P elements) and pick its half.
#: state tensors stochastically rounded per element -> elements per Philox call
SR_PER_CALL = {1: 8, 2: 4}


def sr_bits(seed: int, step, param_index, elem: torch.Tensor, buffers: int) -> tuple[torch.Tensor, ...]:
    """The 16 random bits (int64 tensors in ``[0, 2**16)``, one per buffer, each of ``elem``'s shape)
    with which each of the ``buffers`` state tensors rounded per element is stochastically rounded, for
    elements ``elem`` (int64 tensor of indices inside the param) of param ``param_index`` at step
    ``step``: NOTE [Stochastic-rounding bits: 16 per value, 8 per Philox call] (one Philox evaluation
    per element serves all buffers). ``step`` / ``param_index``: ints or int64 tensors broadcasting with
    ``elem``."""
    if buffers not in SR_PER_CALL:
        raise ValueError(f"buffers must be 1 or 2, got {buffers}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    per = SR_PER_CALL[buffers]
    elem = elem.to(torch.int64)
    q = elem // per
    step = step & M32 if isinstance(step, int) else step.to(torch.int64) & M32
    pidx = param_index & M32 if isinstance(param_index, int) else param_index.to(torch.int64) & M32
    w = torch.stack(torch.broadcast_tensors(*philox4x32(q & M32, step, pidx, q >> 32, seed & M32, seed >> 32)))
    w = w.reshape(4, -1)
    out = []
    for buffer in range(buffers):
        h = (buffer * per + elem % per).reshape(1, -1)
        word = torch.gather(w, 0, (h >> 1).expand(1, w.shape[1]))
        out.append(((word >> (16 * (h & 1))) & 0xFFFF).reshape(elem.shape))
    return tuple(out)


def sr_bits_runs(
    seed: int,
    step: torch.Tensor,
    param_index: torch.Tensor,
    counts: list[int],
    buffers: int,
    counts_t: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """:func:`sr_bits` of whole params at once, with one Philox call per call, not per element: the
    bits of elements ``0 .. counts[r] - 1`` of param ``param_index[r]`` at step ``step[r]`` (int64
    tensors of one value per run, on the device of the result), the runs one after another (so
    ``sum(counts)`` values per buffer). Bitwise :func:`sr_bits` on the same elements (NOTE
    [Stochastic-rounding bits: 16 per value, 8 per Philox call]: a call serves ``P`` consecutive
    elements, so evaluating it once per element, as ``sr_bits`` on arbitrary indices must, is ``P``
    times the work: tests/test_lowbit.py compares the two). ``counts_t``: the same counts as an int64
    tensor on that device, when the caller keeps one (a step then copies nothing from the host:
    a pageable host-to-device copy waits for the device's queue); made from ``counts`` otherwise."""
    if buffers not in SR_PER_CALL:
        raise ValueError(f"buffers must be 1 or 2, got {buffers}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    per = SR_PER_CALL[buffers]
    dev = step.device
    calls = [(n + per - 1) // per for n in counts]
    ncall = sum(calls)
    if ncall == 0:
        return tuple(torch.zeros(0, dtype=torch.int64, device=dev) for _ in range(buffers))
    if len(counts) == 1:
        q = torch.arange(ncall, dtype=torch.int64, device=dev)
        st, pi = step.reshape(()), param_index.reshape(())
    else:
        if counts_t is None:
            counts_t = torch.tensor(counts, dtype=torch.int64, device=dev)
        calls_t = (counts_t + (per - 1)) // per
        run = torch.repeat_interleave(torch.arange(len(counts), device=dev), calls_t, output_size=ncall)
        first = torch.cumsum(calls_t, 0) - calls_t  # each run's first call
        q = torch.arange(ncall, dtype=torch.int64, device=dev) - first[run]
        st, pi = step.reshape(-1)[run], param_index.reshape(-1)[run]
    w = philox4x32(q & M32, st.to(torch.int64) & M32, pi.to(torch.int64) & M32, q >> 32, seed & M32, seed >> 32)
    # the call's eight 16-bit halves, low half of word 0 first: [calls, 8]
    halves = torch.stack([h for x in w for h in (x & 0xFFFF, x >> 16)], dim=1)
    out = []
    for b in range(buffers):
        hb = halves[:, b * per : (b + 1) * per].reshape(-1)  # run r's elements from first_call[r] * per on
        if all(n % per == 0 for n in counts):
            out.append(hb)
        else:  # drop the halves past each run's last element
            pieces, c0 = [], 0
            for n, c in zip(counts, calls):
                pieces.append(hb[c0 * per : c0 * per + n])
                c0 += c
            out.append(torch.cat(pieces))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# fp32 <-> bf16 bit patterns


def float_bits(x: torch.Tensor) -> torch.Tensor:
    """The IEEE-754 bit patterns of an fp32 tensor as int64 in ``[0, 2**32)`` (denormals, signed zeros
    and NaN payloads kept)."""
    if x.dtype != torch.float32:
        raise TypeError(f"expected float32, got {x.dtype}")
    return x.contiguous().view(torch.int32).to(torch.int64) & M32


def float_from_bits(b: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`float_bits` (``b``: integers in ``[0, 2**32)``)."""
    b = b.to(torch.int64)
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """The 16-bit patterns of a bf16 tensor as int64 in ``[0, 2**16)``."""
    if x.dtype != torch.bfloat16:
        raise TypeError(f"expected bfloat16, got {x.dtype}")
    return x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def bf16_from_bits(h: torch.Tensor) -> torch.Tensor:
    """A bf16 tensor from 16-bit patterns (integers in ``[0, 2**16)``)."""
    h = h.to(torch.int64)
    return torch.where(h >= 2**15, h - 2**16, h).to(torch.int16).view(torch.bfloat16)


def _is_nan_bits(b: torch.Tensor) -> torch.Tensor:
    return (b & 0x7FFFFFFF) > 0x7F800000


def _nan_bf16(b: torch.Tensor) -> torch.Tensor:
    # sign and the top 7 payload bits kept, quiet bit set: a NaN whatever the payload was
    return (b >> 16) | 0x0040


# NOTE: [bf16 rounding in integers]
# Both roundings work on the fp32 bit pattern b, which is sign-magnitude: adding to the low 16 bits
# moves the magnitude away from zero, carries propagate into the exponent (a mantissa overflow is
# the next binade, the largest finite values go to inf), and denormals round to bf16 denormals
# (bf16 has fp32's exponent range). Nothing here depends on the hardware's conversion
# instructions, whose NaN outputs differ (0x7FC0, 0x7FFF, ...): a NaN becomes (b >> 16) | 0x0040,
# the same NaN with its sign, in every language.


def round_bf16_nearest_bits(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even fp32 -> bf16, as 16-bit patterns:
    ``h = (b + 0x7FFF + ((b >> 16) & 1)) >> 16`` for non-NaN ``b`` (ties to the even bf16; inf stays inf,
    values from halfway above the largest finite bf16 go to inf), ``(b >> 16) | 0x0040`` for NaN."""
    b = float_bits(x)
    h = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return torch.where(_is_nan_bits(b), _nan_bf16(b), h)


def round_bf16_nearest(x: torch.Tensor) -> torch.Tensor:
    """:func:`round_bf16_nearest_bits` as a bf16 tensor (equals ``x.to(torch.bfloat16)`` for non-NaN x)."""
    return bf16_from_bits(round_bf16_nearest_bits(x))


def round_bf16_stochastic_bits(x: torch.Tensor, rand: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding fp32 -> bf16, as 16-bit patterns. For finite ``b``:
    ``h = (b + (rand & 0xFFFF)) >> 16``: adding 16 uniform random bits to the 16 bits the truncation
    drops carries into the kept part with probability ``(b & 0xFFFF) / 2**16``, so
    ``E[bf16(h)] = x``. Stochastic rounding: Gupta et al., "Deep learning with limited numerical
    precision", ICML 2015; for bf16 weights and optimizer state: Zamirai et al., "Revisiting BFloat16
    Training", 2020. This add-and-truncate bit form is the usual one (e.g. torchao's bf16 stochastic-
    rounding optimizers). A value above the largest finite bf16 rounds up to inf with the same
    probability.
    Non-finite ``b`` round as :func:`round_bf16_nearest_bits` does (inf stays inf, NaN stays NaN).
    ``rand``: 32-bit words (int64 tensor), only the low 16 bits are used.

    (An inf's low 16 bits are zero, so the add-and-truncate form already gives ``b >> 16`` there,
    the nearest rounding's inf: only NaN needs its own branch, which saves the nearest rounding's
    pass over every element.)"""
    b = float_bits(x)
    h = (b + (rand.to(torch.int64) & 0xFFFF)) >> 16
    return torch.where(_is_nan_bits(b), _nan_bf16(b), h)


def round_bf16_stochastic(x: torch.Tensor, rand: torch.Tensor) -> torch.Tensor:
    """:func:`round_bf16_stochastic_bits` as a bf16 tensor."""
    return bf16_from_bits(round_bf16_stochastic_bits(x, rand))


# ---------------------------------------------------------------------------------------------
# block-wise 8-bit quantization with dynamic-tree maps

# NOTE: [Dynamic tree maps]
# Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise Quantization" (ICLR 2022),
# section 2.3 / appendix, after Dettmers 2016 ("8-Bit Approximations for Parallelism in Deep
# Learning"): a dynamic-tree code is a sign bit, then a run of E zero bits (the decimal exponent:
# magnitude 10**-E), then an indicator bit 1, then F = 6 - E bits of a linear fraction in [0.1, 1].
# With 8 bits, E = 0..6: decade E holds 2**(6-E) fractions per sign, the midpoints of 2**F equal
# bins of [0.1, 1]: 10**-E * (0.1 + (k + 1/2) * 0.9 / 2**F), k = 0 .. 2**F - 1. That is
# 2 * 127 = 254 codes; with 0 and +1.0 there are 256. The +1.0 makes a block's absmax element
# (normalized to exactly +1) exact; -1 rounds to -(0.1 + 63.5 * 0.9 / 64) = -0.99297, as in the
# published maps.
# For exp_avg_sq (never negative) the sign bit is a fraction bit instead (the paper's unsigned
# variant): decade E holds 2**(7-E) fractions, 254 codes, plus 0 and 1.0.
# Values are computed in float64 and rounded once to fp32; the map is sorted ascending.
#
# NOTE: [Nearest code]
# A value v (normalized by its block's scale) gets code c = #{i : mid[i] < v}, mid[i] the fp32
# midpoint fl32((map[i] + map[i+1]) / 2) of consecutive codes (computed once, a table like the
# map): the nearest code, a tie (v == mid[i]) going to the lower code, NaN to code 0. Every
# language computes c the same way: a binary search of 8 steps (128, 64, ..., 1) over the 255
# midpoints with a strict `<`, so each step is one fp32 comparison and no rounding happens
# anywhere but in v = x / scale.
#
# NOTE: [Block scale]
# scale = max |x| over the block (fp32, exact), NaN if any element is NaN. v = x / scale with an
# IEEE (correctly rounded) division, so |v| <= 1 for finite x; v = 0 when scale is 0 (all zeros) or
# NaN. Dequantization is map[c] * scale (one fp32 product). A block holding NaN dequantizes to NaN
# everywhere, one holding inf to inf/NaN: such state is already lost, and a GradScaler skip never
# lets a non-finite grad reach it.


def _decades(signed: bool) -> list[float]:
    vals = []
    for e in range(7):
        f = (6 if signed else 7) - e
        n = 2**f
        for k in range(n):
            v = (0.1 + (k + 0.5) * 0.9 / n) / 10**e  # float64, rounded once to fp32 below
            vals.append(v)
            if signed:
                vals.append(-v)
    return vals


@functools.cache
def _maps(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    vals = sorted(_decades(signed) + [0.0, 1.0])
    code_map = torch.tensor(vals, dtype=torch.float64).to(torch.float32)
    if code_map.numel() != 256 or not bool((code_map[1:] > code_map[:-1]).all()):
        raise AssertionError("a dynamic map must be 256 strictly increasing fp32 values")
    mid = (code_map[:-1] + code_map[1:]) * 0.5  # fp32 add (rounded), * 0.5 exact (no denormals here)
    return code_map, mid


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted fp32 codes of NOTE [Dynamic tree maps] (a fresh CPU tensor)."""
    return _maps(signed)[0].clone()


def code_midpoints(signed: bool) -> torch.Tensor:
    """The 255 fp32 midpoints of NOTE [Nearest code] (a fresh CPU tensor)."""
    return _maps(signed)[1].clone()


def zero_code(signed: bool) -> int:
    """The code of 0.0 (127 in the signed map, 0 in the unsigned one)."""
    return int((_maps(signed)[0] == 0).nonzero()[0, 0])


def num_blocks(numel: int) -> int:
    """Quantization blocks of a param of ``numel`` elements: ``ceil(numel / QBLOCK)``."""
    return -(-numel // QBLOCK)


def block_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-block scales of a param (flattened): ``max |x|`` over each ``QBLOCK`` block, NaN if the block
    holds a NaN (NOTE [Block scale]). fp32 [num_blocks(numel)]."""
    x = x.reshape(-1).to(torch.float32)
    n = x.numel()
    pad = num_blocks(n) * QBLOCK - n
    blocks = torch.nn.functional.pad(x.abs(), (0, pad)).view(-1, QBLOCK)
    return blocks.amax(dim=1)  # amax propagates NaN


def quantize_codes(v: torch.Tensor, signed: bool) -> torch.Tensor:
    """Codes (uint8) of normalized values ``v`` (fp32): NOTE [Nearest code]'s 8-step binary search."""
    mid = _maps(signed)[1].to(v.device)
    # c = #{i : mid[i] < v}: the left insertion point of v in the sorted midpoints, which is what the
    # 8-step search computes (the count defines the code, so any exact search gives the same bits);
    # NaN compares false everywhere: code 0
    c = torch.searchsorted(mid, v.contiguous().to(torch.float32), right=False, out_int32=True)
    return torch.where(torch.isnan(v), 0, c).to(torch.uint8)


def normalize(x: torch.Tensor, scale_per_element: torch.Tensor) -> torch.Tensor:
    """``v = x / scale`` (IEEE fp32 division) where ``scale > 0``, else 0 (NOTE [Block scale])."""
    ok = scale_per_element > 0
    return torch.where(ok, x / torch.where(ok, scale_per_element, 1.0), 0.0)


def quantize_blockwise(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise 8-bit quantization of one param's values ``x`` (any shape, taken flat, fp32):
    ``scale = block_absmax(x)`` and ``code = nearest map code of x / scale``. Returns
    ``(codes uint8 [numel], scales fp32 [num_blocks])``. ``signed``: the map of momentum / exp_avg
    (True) or of exp_avg_sq (False; negative values get the code of 0)."""
    x = x.reshape(-1).to(torch.float32)
    scales = block_absmax(x)
    s = scales.repeat_interleave(QBLOCK)[: x.numel()]
    return quantize_codes(normalize(x, s), signed), scales


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, signed: bool) -> torch.Tensor:
    """``map[code] * scale`` (fp32, flat [numel]), the scale of the element's block."""
    m = _maps(signed)[0].to(codes.device)
    s = scales.repeat_interleave(QBLOCK)[: codes.numel()]
    return m[codes.reshape(-1).to(torch.int64)] * s


# ---------------------------------------------------------------------------------------------
# exact fp32 masters as bf16 param + 16-bit remainder

# NOTE: [Master split]
# The fp32 master's bit pattern b (32 bits) is kept as a bf16 param p (16 bits) and an int16
# remainder r, with
#
#     split:    p = ((b + 0x8000) mod 2**32) >> 16        r = b - (p << 16)   (as int16, in [-2**15, 2**15))
#     rebuild:  b = ((p << 16) + r) mod 2**32
#
# r always fits: b + 0x8000 = p * 2**16 + q with 0 <= q < 2**16, so r = q - 0x8000. The rebuild is
# the inverse for every b (a bijection between 32-bit patterns and (p, r) pairs), bitwise. p is the
# round-to-nearest bf16 of the master with ties (low half exactly 0x8000) away from zero: the
# low 16 bits decide whether the magnitude rounds up, as in Transformer Engine's FusedAdam
# (store_param_remainders: the remainder is the low half, the high half is incremented when the
# remainder's top bit is set, and decremented back on rebuild). It cannot be round-to-nearest-EVEN:
# at a tie both candidates' masters differ from even p by +0x8000 (rounded down) and -0x8000
# (rounded up), and an int16 holds only one of them. Only exact ties with an even truncated part
# (2**-17 of all patterns) differ from the param `master.to(torch.bfloat16)` would give, by one ulp.
# NaN masters are the exception: the formula would turn some NaNs into inf or -0.0 (CUDA's
# canonical NaN 0x7FFFFFFF gives p = 0x8000, -0.0), hiding the NaN from the forward pass, so a NaN
# master splits to p = sign | 0x7FC0 (a quiet NaN), r = 0, and rebuilds as that quiet NaN with its
# sign, not its payload. Every other pattern (finite, inf, denormal, -0.0) round-trips bitwise.


def master_split_bits(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NOTE [Master split] on bit patterns: ``(p, r)`` int64 tensors, ``p`` in ``[0, 2**16)``, ``r`` in
    ``[-2**15, 2**15)``."""
    b = float_bits(master)
    p = ((b + 0x8000) & M32) >> 16
    r = ((b + 0x8000) & 0xFFFF) - 0x8000
    nan = _is_nan_bits(b)
    p = torch.where(nan, (b >> 16) & 0x8000 | 0x7FC0, p)
    r = torch.where(nan, 0, r)
    return p, r


def master_split(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 param and int16 remainder of an fp32 master (NOTE [Master split])."""
    p, r = master_split_bits(master)
    return bf16_from_bits(p), r.to(torch.int16)


def master_rebuild(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The fp32 master ``((p << 16) + r) mod 2**32`` from a bf16 param and its int16 remainder."""
    p = bf16_bits(param)
    return float_from_bits(((p << 16) + remainder.to(torch.int64)) & M32)
