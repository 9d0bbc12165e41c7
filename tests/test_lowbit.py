"""The low-bit state arithmetic of issue #26 (fusedlars/backends/lowbit.py, the specification) against
independent computations, and its C++ (csrc/lowbit.h) and Triton (fusedlars/backends/triton_lowbit.py)
copies against it, bitwise.

* Philox-4x32-10: Random123's known-answer vectors; a scalar Python-int Philox written from the paper
  for both word sizes, whose 4x64 instance must reproduce numpy's ``Philox`` bit generator (an
  independent implementation: numpy has no 4x32) and whose 4x32 instance must reproduce the torch
  vectorized one; Triton's ``tl.philox``.
* bf16 rounding: round-to-nearest-even against a float64 nearest-neighbour choice and torch's own
  conversion; stochastic rounding against a per-element carry rule, its two-neighbour support and its
  mean.
* 8-bit maps rebuilt by decoding every byte of the dynamic-tree code; quantization against a float64
  nearest-code search over every block; dequantization against numpy fp32.
* Master split: bitwise round trip over edge patterns and random bit patterns, and the param against
  the float64 nearest bf16.
* The same functions from g++ (ctypes on a library built in tmp_path, under UBSan) and from Triton
  kernels (TRITON_INTERPRET=1 where there is no GPU), compared bit for bit; nvcc compiles the header for
  sm_80 where it is on PATH.
* Round-to-nearest bf16 momentum stalls an update below half an ulp; stochastic rounding follows fp32.

NaN results of float arithmetic (a dequantized NaN block) are compared as "both NaN": the payload of a
computed NaN is the hardware's; everything the functions produce in integers is compared bitwise,
NaN patterns included.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fusedlars.backends import lowbit as L

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
M32 = 0xFFFFFFFF

# ---------------------------------------------------------------------------------------------
# test data


def f32(bits) -> torch.Tensor:
    return L.float_from_bits(torch.tensor(bits, dtype=torch.int64))


#: fp32 bit patterns at the edges: signed zeros, denormals, the normal range's ends, bf16 ties
#: (low half 0x8000 with an even / odd kept part), the largest finite values around the bf16
#: overflow threshold, infinities, quiet / signalling NaNs with and without low payload bits.
EDGE_BITS = [
    0x00000000, 0x80000000, 0x3F800000, 0xBF800000, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF,
    0x00008000, 0x00018000, 0x0000FFFF, 0x00800000, 0x80800000, 0x3F808000, 0x3F818000, 0xBF808000,
    0xBF818000, 0x3F807FFF, 0x3F808001, 0x3F80FFFF, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7F8000,
    0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F808000, 0x7FBFFFFF,
    0x7FFFFFFF, 0xFFFFFFFF, 0xFF800001, 0x7FFF8000, 0x4B7FFFFF, 0x33800000, 0x1E3CE508, 0x5F5E1000,
]  # fmt: skip


def edge_values() -> torch.Tensor:
    return f32(EDGE_BITS)


def random_bit_patterns(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return L.float_from_bits(torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64))


def mixed_values(n: int, seed: int = 0) -> torch.Tensor:
    """Edges, random bit patterns (every exponent, NaNs included) and normals of several scales."""
    g = torch.Generator().manual_seed(seed)
    normals = torch.randn(n, generator=g) * torch.logspace(-30, 30, n)[torch.randperm(n, generator=g)]
    return torch.cat([edge_values(), random_bit_patterns(n, seed), normals.float()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and bool((a.view(-1).view(torch.uint8) == b.view(-1).view(torch.uint8)).all())
    )


def same_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = a.isnan() & b.isnan()
    return bool(nan.eq(b.isnan()).all()) and same_bits(torch.where(nan, 0.0, a), torch.where(nan, 0.0, b))


# ---------------------------------------------------------------------------------------------
# Philox


def philox_scalar(ctr: list[int], key: list[int], w: int = 32, rounds: int = 10) -> list[int]:
    """Philox-4xW-R on Python ints, written from Salmon et al. (SC'11) section 4.2 and Random123's
    constants, for W = 32 and 64: per round the products M0*c0 and M1*c2 split into hi/lo words, the
    output (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0), the key bumped by the Weyl constants between rounds."""
    mask = (1 << w) - 1
    if w == 32:
        m0, m1, w0, w1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    else:
        m0, m1, w0, w1 = 0xD2E7470EE14C6C93, 0xCA5A826395121157, 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B
    c, k = list(ctr), list(key)
    for r in range(rounds):
        if r:
            k = [(k[0] + w0) & mask, (k[1] + w1) & mask]
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [(p1 >> w) ^ c[1] ^ k[0], p1 & mask, (p0 >> w) ^ c[3] ^ k[1], p0 & mask]
    return c


#: Random123 1.x kat_vectors, philox4x32 with 10 rounds: counter, key, output.
KAT_4X32 = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([M32] * 4, [M32] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]


@pytest.mark.parametrize("case", range(len(KAT_4X32)))
def test_philox_known_answers(case):
    ctr, key, want = KAT_4X32[case]
    assert philox_scalar(ctr, key) == want
    got = L.philox4x32(*ctr, *key)
    assert [int(x) for x in got] == want


def test_philox_scalar_reference_is_numpy_philox4x64():
    """The scalar Philox, instantiated for 64-bit words, reproduces numpy's Philox (4x64-10): numpy
    increments its counter (word 0 first) before each block of four outputs, and takes key[0] as k0."""
    key = [0x0123456789ABCDEF, 0xFEDCBA9876543210]
    start = [2**64 - 2, 5, 0, 7]  # the increment carries into word 1
    bitgen = np.random.Philox(key=np.array(key, dtype=np.uint64), counter=np.array(start, dtype=np.uint64))
    raw = [int(x) for x in bitgen.random_raw(12)]
    ctr = list(start)
    for block in range(3):
        ctr[0] = (ctr[0] + 1) & (2**64 - 1)
        if ctr[0] == 0:
            ctr[1] += 1
        assert philox_scalar(ctr, key, w=64) == raw[4 * block : 4 * block + 4], block


def test_philox_torch_matches_scalar_reference():
    g = torch.Generator().manual_seed(1)
    ctr = torch.randint(0, 2**32, (4, 64), generator=g, dtype=torch.int64)
    ctr[:, :4] = torch.tensor([[0, M32, 1, 2**31]] * 4)
    for k0, k1 in [(0, 0), (M32, 1), (0x9E3779B9, 0x12345678)]:
        got = torch.stack(L.philox4x32(*ctr, k0, k1))
        for j in range(ctr.shape[1]):
            assert got[:, j].tolist() == philox_scalar(ctr[:, j].tolist(), [k0, k1]), (k0, k1, j)


def test_philox_uint64_product_and_int64_split_give_the_same_words(monkeypatch):
    """philox4x32 multiplies in torch.uint64 where the device can (CPU here) and in four int64 products
    elsewhere: both are the scalar reference's words (the split is forced here)."""
    assert L._uint64_mul_ok("cpu")
    g = torch.Generator().manual_seed(2)
    ctr = torch.randint(0, 2**32, (4, 4096), generator=g, dtype=torch.int64)
    ctr[:, :4] = torch.tensor([[0, M32, 1, 2**31]] * 4)
    fast = torch.stack(L.philox4x32(*ctr, 0x9E3779B9, M32))
    monkeypatch.setattr(L, "_uint64_mul_ok", lambda device: False)
    split = torch.stack(L.philox4x32(*ctr, 0x9E3779B9, M32))
    assert torch.equal(fast, split)
    for j in (0, 1, 2, 3, 4095):
        assert fast[:, j].tolist() == philox_scalar(ctr[:, j].tolist(), [0x9E3779B9, M32])


def test_philox_words_counter_layout():
    """(element mod 2**32, step, param index, element >> 32) under (seed low, seed high), from any start."""
    seed, step, param = 0xDEADBEEF_0BADF00D, 2**32 + 9, 3
    start = 2**32 - 3  # crosses into c3 = 1
    words = torch.stack(L.philox_words(seed, step, param, 6, start=start))
    for j in range(6):
        e = start + j
        want = philox_scalar([e & M32, step & M32, param, e >> 32], [seed & M32, seed >> 32])
        assert words[:, j].tolist() == want
    with pytest.raises(ValueError):
        L.philox_words(-1, 0, 0, 1)


@pytest.mark.parametrize("buffers", [1, 2])
def test_sr_bits_are_the_halves_of_one_call_per_group(buffers):
    """NOTE [Stochastic-rounding bits: 16 per value, 8 per Philox call], per element from the scalar
    Philox: element e, buffer k takes half k*P + e%P of the call of counter e // P, P = 8 / buffers;
    every (element, buffer) gets a different half, so no 16 bits are used twice."""
    seed, step, param = 0xDEADBEEF_0BADF00D, 2**32 + 9, 3
    per = 8 // buffers
    start = per * (2**32 - 2) - 3  # counters cross into c3 = 1; the first group starts mid-way
    elem = torch.arange(start, start + 5 * per, dtype=torch.int64)
    got = L.sr_bits(seed, step, param, elem, buffers)
    assert len(got) == buffers
    seen = set()
    for j, e in enumerate(elem.tolist()):
        q = e // per
        words = philox_scalar([q & M32, step & M32, param, q >> 32], [seed & M32, seed >> 32])
        for k in range(buffers):
            h = k * per + e % per
            assert int(got[k][j]) == (words[h // 2] >> (16 * (h % 2))) & 0xFFFF, (e, k)
            assert (q, h) not in seen
            seen.add((q, h))
    two_d = L.sr_bits(seed, step, param, elem.view(5, per), buffers)  # any shape, elementwise
    assert all(torch.equal(a.reshape(-1), b) for a, b in zip(two_d, got))
    with pytest.raises(ValueError, match="buffers"):
        L.sr_bits(seed, step, param, elem, 3)


@pytest.mark.parametrize("buffers", [1, 2])
def test_sr_bits_runs_is_sr_bits_of_each_run(buffers):
    """lowbit.sr_bits_runs (one Philox evaluation per call, the torch backend's path) gives every run's
    elements the bits lowbit.sr_bits gives them one element at a time: runs of every length mod P
    (0, 1, 3, P, P+1, 4097), steps and param ids past 2**31 and 2**32, a single run."""
    seed = 0x0123456789ABCDEF
    counts = [0, 1, 3, 8, 9, 4097, 4]
    step = torch.tensor([5, 1, 2**32 + 7, 3, 9, 11, 2**31 + 1])
    pidx = torch.tensor([0, 4, 7, 1, 2, 2**31 + 5, 2])
    got = L.sr_bits_runs(seed, step, pidx, counts, buffers)
    want = [L.sr_bits(seed, int(s), int(p), torch.arange(n), buffers) for n, s, p in zip(counts, step, pidx)]
    assert len(got) == buffers
    for k in range(buffers):
        assert torch.equal(got[k], torch.cat([w[k] for w in want]))
    kept = L.sr_bits_runs(seed, step, pidx, counts, buffers, torch.tensor(counts))  # the caller's counts tensor
    assert all(torch.equal(a, b) for a, b in zip(kept, got))
    one = L.sr_bits_runs(seed, step[5:6], pidx[5:6], [4097], buffers)
    assert all(torch.equal(a, b) for a, b in zip(one, want[5]))
    empty = L.sr_bits_runs(seed, step[:1], pidx[:1], [0], buffers)
    assert [t.numel() for t in empty] == [0] * buffers
    with pytest.raises(ValueError, match="buffers"):
        L.sr_bits_runs(seed, step, pidx, counts, 3)


# ---------------------------------------------------------------------------------------------
# bf16 rounding


def bf16_value(h: int) -> float:
    """The float64 value of a bf16 pattern, with 0x7F80 / 0xFF80 read as +-2**128: the next value past the
    largest finite bf16 for IEEE's unbounded-exponent rounding (overflow to inf)."""
    if h & 0x7FFF == 0x7F80:
        return math.copysign(2.0**128, -1.0 if h & 0x8000 else 1.0)
    return float(L.bf16_from_bits(torch.tensor([h])).float())


def rne_scalar(x: float, b: int) -> int:
    """Nearest bf16 of finite or infinite x (pattern b) by comparing float64 distances to the two bf16
    neighbours that bracket it; a tie goes to the even pattern. NaN: sign, top payload, quiet bit."""
    if (b & 0x7FFFFFFF) > 0x7F800000:
        return (b >> 16) | 0x0040
    if math.isinf(x):
        return b >> 16
    lo = b >> 16  # truncation: same sign, smaller or equal magnitude
    dlo, dhi = abs(x - bf16_value(lo)), abs(bf16_value(lo + 1) - x)
    if dlo != dhi:
        return lo if dlo < dhi else lo + 1
    return lo if lo % 2 == 0 else lo + 1


def test_round_nearest_even_against_float64_neighbours_and_torch():
    x = mixed_values(3000)
    got = L.round_bf16_nearest_bits(x)
    bits = L.float_bits(x)
    want = [rne_scalar(float(v), int(b)) for v, b in zip(x.tolist(), bits.tolist())]
    assert got.tolist() == want
    finite_or_inf = ~x.isnan()
    assert same_bits(L.round_bf16_nearest(x)[finite_or_inf], x[finite_or_inf].to(torch.bfloat16))
    assert L.round_bf16_nearest(x)[x.isnan()].isnan().all()


def test_stochastic_rounding_carry_rule():
    """Per element: the result is the truncation, plus one ulp exactly when the dropped low half plus the
    16 random bits carries (so with probability low / 2**16); inf and NaN as round-to-nearest."""
    x = mixed_values(2000)
    rand = torch.stack(L.philox_words(7, 1, 0, x.numel()))[0]
    got = L.round_bf16_stochastic_bits(x, rand).tolist()
    for v, b, r, h in zip(x.tolist(), L.float_bits(x).tolist(), rand.tolist(), got):
        if math.isfinite(v):
            assert h == (b >> 16) + (1 if (b & 0xFFFF) + (r & 0xFFFF) >= 0x10000 else 0)
            assert bf16_value(h) in (bf16_value(b >> 16), bf16_value((b >> 16) + 1))
        else:
            assert h == rne_scalar(v, b)


def test_stochastic_rounding_is_unbiased():
    """E[SR(x)] = x: for values with a known position between their bf16 neighbours, the mean of 2**14
    roundings with Philox bits is within 5 standard errors of x (float64 reference). Above the largest
    finite bf16 the upper neighbour is inf, counted as 2**128 (IEEE's overflow neighbour)."""
    n = 2**14
    for b in (0x3F801234, 0xBF80C000, 0x00000001, 0x7F7F4000, 0x4049_0FDB):
        x = f32([b] * n)
        rand = torch.stack(L.philox_words(11, 5, 2, n))[1]
        r = L.round_bf16_stochastic(x, rand).double()
        r = torch.where(r.isinf(), r.sign() * 2.0**128, r)  # the overflow neighbour, as in bf16_value
        lo, hi = bf16_value(b >> 16), bf16_value((b >> 16) + 1)
        p = (b & 0xFFFF) / 65536
        se = abs(hi - lo) * math.sqrt(p * (1 - p) / n)
        assert abs(float(r.mean()) - float(x[0])) <= 5 * se + 1e-300, hex(b)


# ---------------------------------------------------------------------------------------------
# 8-bit maps and block quantization


def decode_tree_byte(byte: int, signed: bool) -> float:
    """The dynamic-tree code of one byte (Dettmers et al. 2022, section 2.3), decoded bit by bit: the
    top bit is the sign (signed) or the lowest fraction bit (unsigned); in the other 7 bits a run of E
    zeros, an indicator 1, then 6 - E linear-fraction bits k: 10**-E * (0.1 + (k + 1/2) * 0.9 / 2**F).
    All 7 bits zero: 0, and with the top bit set +1.0 (the block's absmax, exact)."""
    top, rest = byte >> 7, byte & 0x7F
    if rest == 0:
        return 1.0 if top else 0.0
    e = 7 - rest.bit_length()  # leading zeros of the 7-bit field
    f = 6 - e
    k = rest & ((1 << f) - 1)
    if not signed:
        k, f = 2 * k + top, f + 1
    v = 10.0**-e * (0.1 + (k + 0.5) * 0.9 / 2**f)
    return -v if signed and top else v


@pytest.mark.parametrize("signed", [True, False])
def test_maps_are_the_dynamic_tree_code(signed):
    decoded = torch.tensor(sorted(decode_tree_byte(b, signed) for b in range(256)), dtype=torch.float64)
    m = L.dynamic_map(signed)
    assert m.dtype == torch.float32 and m.numel() == 256
    assert torch.allclose(m.double(), decoded, rtol=2**-23, atol=0)  # float64 -> fp32 rounding only
    assert bool((m[1:] > m[:-1]).all()) and float(m[-1]) == 1.0
    assert float(m[L.zero_code(signed)]) == 0.0 and L.zero_code(signed) == (127 if signed else 0)
    assert float(m[0]) == (float(np.float32(-(0.1 + 63.5 * 0.9 / 64))) if signed else 0.0)
    # midpoints: fp32 of the exact float64 average (no denormals: the fp32 halving is exact)
    mid = L.code_midpoints(signed)
    assert same_bits(mid, ((m.double()[:-1] + m.double()[1:]) / 2).float())


def nearest_code_scalar(v: float, code_map: list[float], mids: list[float]) -> int:
    """The code with the smallest float64 distance |map[c] - v| (exact: fp32 differences), ties to the
    lower code; a v equal to an fp32 midpoint (which need not be the exact middle) takes the lower code,
    NaN code 0."""
    if math.isnan(v):
        return 0
    for i, m in enumerate(mids):
        if v == m:
            return i
    d = [abs(c - v) for c in code_map]
    return d.index(min(d))


def quantize_scalar(x: torch.Tensor, signed: bool) -> tuple[list[int], list[float]]:
    """Block by block: scale = max |x| (NaN if any NaN), v = fp32(x / scale) (numpy fp32), nearest code."""
    xs = x.numpy()
    code_map, mids = L.dynamic_map(signed).tolist(), L.code_midpoints(signed).tolist()
    codes, scales = [], []
    for s in range(0, len(xs), L.QBLOCK):
        blk = xs[s : s + L.QBLOCK]
        scale = np.float32(np.nan) if np.isnan(blk).any() else np.abs(blk).max()
        scales.append(float(scale))
        for xi in blk:
            v = xi / scale if scale > 0 else np.float32(0.0)
            codes.append(nearest_code_scalar(float(np.float32(v)), code_map, mids))
    return codes, scales


def quant_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    m = L.dynamic_map(True)
    ties = torch.cat([torch.tensor([1.0]), L.code_midpoints(True), m, -L.code_midpoints(True)[:100]])
    return {
        "odd": torch.randn(1001, generator=g) * 1e-3,  # 4 blocks, the last of 233
        "one": torch.tensor([-2.5]),
        "zeros": torch.zeros(300),
        "ties": ties,  # absmax exactly 1: v == x, so every midpoint is hit exactly
        "denormal": torch.cat([f32([0x00000001, 0x80000005, 0x007FFFFF, 0x00000000] * 64), torch.randn(3)]),
        "huge": torch.cat([f32([0x7F7FFFFF, 0xFF7FFFFF]), torch.randn(257, generator=g) * 1e37]),
        "nonfinite": torch.cat([torch.randn(300, generator=g), f32([0x7FC00000, 0x7F800000, 0xFF800000])]),
        "spread": torch.randn(513, generator=g) * torch.logspace(-12, 3, 513),
    }


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("case", list(quant_cases()))
def test_quantize_is_blockwise_nearest_code(case, signed):
    x = quant_cases()[case]
    if not signed:
        x = x.abs()  # exp_avg_sq (negative values of the unsigned map are covered by the C++/Triton tests)
    codes, scales = L.quantize_blockwise(x, signed)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel() and scales.numel() == L.num_blocks(x.numel())
    want_codes, want_scales = quantize_scalar(x, signed)
    assert codes.tolist() == want_codes
    assert same_or_both_nan(scales, torch.tensor(want_scales, dtype=torch.float32))
    deq = L.dequantize_blockwise(codes, scales, signed)
    mp = L.dynamic_map(signed).numpy()
    want = torch.from_numpy(
        np.array([mp[c] * np.float32(want_scales[i // L.QBLOCK]) for i, c in enumerate(want_codes)], dtype=np.float32)
    )
    assert same_or_both_nan(deq, want)
    fin = torch.isfinite(scales).repeat_interleave(L.QBLOCK)[: x.numel()]
    # the absmax element of each finite block is exact (+1.0 code, or -0.99297 for a negative signed max)
    assert (deq[fin] - x[fin]).abs().le(scales.repeat_interleave(L.QBLOCK)[: x.numel()][fin] * 0.0071).all()


def test_blocks_do_not_span_params():
    """Two params quantized one after the other give the same codes and scales as each alone."""
    a, b = torch.randn(300), torch.randn(50) * 100
    ca, sa = L.quantize_blockwise(a, True)
    cb, sb = L.quantize_blockwise(b, True)
    assert sa.numel() == 2 and sb.numel() == 1
    assert float(sb[0]) == float(b.abs().max()) and float(sa[1]) == float(a[256:].abs().max())
    assert same_bits(L.dequantize_blockwise(cb, sb, True)[:1], (L.dynamic_map(True)[cb[:1].long()] * sb[0]))


# ---------------------------------------------------------------------------------------------
# master split


def test_master_split_round_trips_and_rounds_to_nearest():
    m = mixed_values(20000)
    p, r = L.master_split(m)
    assert p.dtype == torch.bfloat16 and r.dtype == torch.int16
    back = L.master_rebuild(p, r)
    nan = m.isnan()
    assert same_bits(back[~nan], m[~nan])
    # NaN masters: a quiet NaN param with the master's sign, remainder 0; rebuilt as that NaN
    assert p[nan].isnan().all() and (r[nan] == 0).all() and back[nan].isnan().all()
    assert (L.float_bits(back[nan]) >> 31).tolist() == (L.float_bits(m[nan]) >> 31).tolist()
    # the param is a nearest bf16 of the master (float64 distances), ties away from zero
    ph = L.bf16_bits(p)[~nan].tolist()
    for v, b, h in zip(m[~nan].tolist(), L.float_bits(m[~nan]).tolist(), ph):
        if math.isinf(v):
            assert h == b >> 16
            continue
        lo = b >> 16
        dlo, dhi = abs(v - bf16_value(lo)), abs(bf16_value(lo + 1) - v)
        assert h == (lo if dlo < dhi else lo + 1), hex(b)
    # and equals torch's round-to-nearest-even except at exact ties with an even truncation
    tie_even = ((L.float_bits(m) & 0x1FFFF) == 0x08000) & ~nan
    assert same_bits(p[~nan & ~tie_even], m[~nan & ~tie_even].to(torch.bfloat16))
    assert tie_even.any()


# ---------------------------------------------------------------------------------------------
# C++ (csrc/lowbit.h) through g++ and ctypes

HARNESS = r"""
#include "lowbit.h"
using namespace fusedlars::lowbit;
extern "C" {
void lb_philox(const uint32_t* ctr, uint32_t k0, uint32_t k1, long n, uint32_t* out) {
  for (long i = 0; i < n; ++i) {
    uint32_t c[4] = {ctr[i], ctr[n + i], ctr[2 * n + i], ctr[3 * n + i]};
    philox4x32_10(c, k0, k1);
    for (int j = 0; j < 4; ++j) out[j * n + i] = c[j];
  }
}
void lb_words(uint64_t seed, uint64_t step, uint32_t param, uint64_t start, long n, uint32_t* out) {
  for (long i = 0; i < n; ++i) {
    uint32_t w[4];
    philox_words(seed, step, param, start + uint64_t(i), w);
    for (int j = 0; j < 4; ++j) out[j * n + i] = w[j];
  }
}
void lb_sr_bits(uint64_t seed, uint64_t step, uint32_t param, uint64_t start, long n, int buffers, uint32_t* out) {
  for (long i = 0; i < n; ++i) {
    uint32_t r[2];
    sr_bits(seed, step, param, start + uint64_t(i), buffers, r);
    for (int k = 0; k < buffers; ++k) out[k * n + i] = r[k];
  }
}
void lb_rne(const float* x, long n, uint16_t* out) { for (long i = 0; i < n; ++i) out[i] = bf16_rne_bits(x[i]); }
void lb_sr(const float* x, const uint32_t* r, long n, uint16_t* out) {
  for (long i = 0; i < n; ++i) out[i] = bf16_sr_bits(x[i], r[i]);
}
void lb_quantize(const float* x, long n, int sgn, uint8_t* codes, float* scales) {
  const float* mid = sgn ? kSignedMid : kUnsignedMid;
  for (long s = 0, b = 0; s < n; s += kQBlock, ++b) {
    const int len = n - s < kQBlock ? int(n - s) : kQBlock;
    const float scale = block_absmax(x + s, len);
    scales[b] = scale;
    for (int i = 0; i < len; ++i) codes[s + i] = quantize_code(normalize(x[s + i], scale), mid);
  }
}
void lb_dequantize(const uint8_t* codes, const float* scales, long n, int sgn, float* out) {
  const float* map = sgn ? kSignedMap : kUnsignedMap;
  for (long i = 0; i < n; ++i) out[i] = dequantize(codes[i], scales[i / kQBlock], map);
}
void lb_split(const float* m, long n, uint16_t* p, int16_t* r) { for (long i = 0; i < n; ++i) master_split(m[i], p[i], r[i]); }
void lb_rebuild(const uint16_t* p, const int16_t* r, long n, float* out) {
  for (long i = 0; i < n; ++i) out[i] = master_rebuild(p[i], r[i]);
}
void lb_tables(float* out) {
  for (int i = 0; i < 256; ++i) { out[i] = kSignedMap[i]; out[511 + i] = kUnsignedMap[i]; }
  for (int i = 0; i < 255; ++i) { out[256 + i] = kSignedMid[i]; out[767 + i] = kUnsignedMid[i]; }
  out[1022] = float(kSignedZero);
  out[1023] = float(kQBlock);
}
}
"""


@pytest.fixture(scope="module")
def clib(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) on PATH")
    d = tmp_path_factory.mktemp("lowbit")
    (d / "harness.cpp").write_text(HARNESS)
    lib = d / "liblowbit.so"
    cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
           "-fsanitize=undefined", "-fno-sanitize-recover=all", "-I", str(CSRC), str(d / "harness.cpp"), "-o", str(lib)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return ctypes.CDLL(str(lib))


def ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def np32(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.numpy().astype(np.float32))


def test_cpp_tables_equal_python(clib):
    out = np.zeros(1024, dtype=np.float32)
    clib.lb_tables(ptr(out))
    t = torch.from_numpy(out)
    assert same_bits(t[:256], L.dynamic_map(True)) and same_bits(t[256:511], L.code_midpoints(True))
    assert same_bits(t[511:767], L.dynamic_map(False)) and same_bits(t[767:1022], L.code_midpoints(False))
    assert out[1022] == L.zero_code(True) and out[1023] == L.QBLOCK


def test_cpp_philox(clib):
    g = torch.Generator().manual_seed(5)
    ctr = torch.randint(0, 2**32, (4, 257), generator=g, dtype=torch.int64)
    ctr[:, :3] = torch.tensor([[0, 0, 0, 0], [M32] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]]).T
    c = np.ascontiguousarray(ctr.numpy().astype(np.uint32))
    out = np.zeros_like(c)
    for k0, k1 in [(0, 0), (M32, M32), (0xA4093822, 0x299F31D0)]:
        clib.lb_philox(ptr(c), ctypes.c_uint32(k0), ctypes.c_uint32(k1), ctypes.c_long(257), ptr(out))
        assert out.astype(np.int64).tolist() == torch.stack(L.philox4x32(*ctr, k0, k1)).tolist()
    assert out[:, 2].tolist() == KAT_4X32[2][2]
    for seed, step, param, start in [(0, 0, 0, 0), (2**64 - 1, 2**32 + 1, 7, 2**32 - 100), (12345, 3, 160, 999)]:
        w = np.zeros((4, 131), dtype=np.uint32)
        clib.lb_words(ctypes.c_uint64(seed), ctypes.c_uint64(step), ctypes.c_uint32(param), ctypes.c_uint64(start), ctypes.c_long(131), ptr(w))  # fmt: skip
        assert w.astype(np.int64).tolist() == torch.stack(L.philox_words(seed, step, param, 131, start=start)).tolist()
        elem = torch.arange(start, start + 131, dtype=torch.int64)
        for buffers in (1, 2):
            r = np.zeros((buffers, 131), dtype=np.uint32)
            clib.lb_sr_bits(ctypes.c_uint64(seed), ctypes.c_uint64(step), ctypes.c_uint32(param), ctypes.c_uint64(start), ctypes.c_long(131), ctypes.c_int(buffers), ptr(r))  # fmt: skip
            assert r.astype(np.int64).tolist() == torch.stack(L.sr_bits(seed, step, param, elem, buffers)).tolist()


@pytest.mark.parametrize("n", [1, 7, 4099])
def test_cpp_bf16_rounding(clib, n):
    x = mixed_values(n, seed=n)
    xa = np32(x)
    rand = torch.stack(L.philox_words(3, n, 1, x.numel()))[2]
    ra = np.ascontiguousarray(rand.numpy().astype(np.uint32))
    out = np.zeros(x.numel(), dtype=np.uint16)
    clib.lb_rne(ptr(xa), ctypes.c_long(x.numel()), ptr(out))
    assert out.astype(np.int64).tolist() == L.round_bf16_nearest_bits(x).tolist()
    clib.lb_sr(ptr(xa), ptr(ra), ctypes.c_long(x.numel()), ptr(out))
    assert out.astype(np.int64).tolist() == L.round_bf16_stochastic_bits(x, rand).tolist()


@pytest.mark.parametrize("signed", [True, False])
def test_cpp_quantize(clib, signed):
    for name, x in {**quant_cases(), "mixed": mixed_values(700)}.items():
        n = x.numel()
        xa = np32(x)
        codes, scales = np.zeros(n, dtype=np.uint8), np.zeros(L.num_blocks(n), dtype=np.float32)
        clib.lb_quantize(ptr(xa), ctypes.c_long(n), ctypes.c_int(int(signed)), ptr(codes), ptr(scales))
        want_c, want_s = L.quantize_blockwise(x, signed)
        assert codes.tolist() == want_c.tolist(), name
        assert same_bits(torch.from_numpy(scales), want_s), name  # NaN scales are the one quiet NaN
        out = np.zeros(n, dtype=np.float32)
        clib.lb_dequantize(ptr(codes), ptr(scales), ctypes.c_long(n), ctypes.c_int(int(signed)), ptr(out))
        assert same_or_both_nan(torch.from_numpy(out), L.dequantize_blockwise(want_c, want_s, signed)), name


def test_cpp_master_split(clib):
    m = mixed_values(5001)
    n = m.numel()
    p, r = np.zeros(n, dtype=np.uint16), np.zeros(n, dtype=np.int16)
    clib.lb_split(ptr(np32(m)), ctypes.c_long(n), ptr(p), ptr(r))
    wp, wr = L.master_split(m)
    assert p.astype(np.int64).tolist() == L.bf16_bits(wp).tolist()
    assert r.tolist() == wr.tolist()
    out = np.zeros(n, dtype=np.float32)
    clib.lb_rebuild(ptr(p), ptr(r), ctypes.c_long(n), ptr(out))
    assert same_bits(torch.from_numpy(out), L.master_rebuild(wp, wr))


NVCC_KERNEL = r"""
#include "lowbit.h"
using namespace fusedlars::lowbit;
__constant__ float c_mid[255];
__constant__ float c_map[256];
__global__ void lowbit_all(const float* x, float* y, uint16_t* h, uint8_t* c, int16_t* r, unsigned long long seed,
                           unsigned long long step, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint32_t w[2];
  sr_bits(seed, step, 3u, uint64_t(i), 2, w);
  h[i] = bf16_sr_bits(x[i], w[0]) ^ bf16_sr_bits(x[i], w[1]) ^ bf16_rne_bits(x[i]);
  const int b = i / kQBlock * kQBlock;
  const float s = block_absmax(x + b, n - b < kQBlock ? n - b : kQBlock);
  c[i] = quantize_code(normalize(x[i], s), c_mid);
  uint16_t p;
  master_split(x[i], p, r[i]);
  y[i] = dequantize(c[i], s, c_map) + master_rebuild(p, r[i]) + bf16_bits_to_float(p);
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_header_compiles_with_nvcc_for_sm80(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text(NVCC_KERNEL)
    cmd = ["nvcc", "-arch=sm_80", "-std=c++17", "-c", "-Xptxas", "-v", "-I", str(CSRC), str(src), "-o", str(tmp_path / "k.o")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "0 bytes spill stores" in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Triton (triton_lowbit), in the interpreter where there is no GPU

try:
    import triton
    import triton.language as tl

    from fusedlars.backends import triton_lowbit as TL

    _TRITON_ERR = None
except Exception as e:  # pragma: no cover - triton missing
    _TRITON_ERR = e

needs_triton = pytest.mark.skipif(_TRITON_ERR is not None, reason=f"triton unavailable: {_TRITON_ERR}")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

if _TRITON_ERR is None:

    @triton.jit
    def _k_philox(out_ptr, seed, step, param, start, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        w0, w1, w2, w3 = TL.philox_words(seed, step, param, start + offs.to(tl.int64))
        tl.store(out_ptr + offs, w0.to(tl.int64), mask=mask)
        tl.store(out_ptr + n + offs, w1.to(tl.int64), mask=mask)
        tl.store(out_ptr + 2 * n + offs, w2.to(tl.int64), mask=mask)
        tl.store(out_ptr + 3 * n + offs, w3.to(tl.int64), mask=mask)

    @triton.jit
    def _k_sr_bits(out_ptr, seed, step, param, start, n, BUFFERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        e = start + offs.to(tl.int64)
        tl.store(out_ptr + offs, TL.sr_bits(seed, step, param, e, 0, BUFFERS).to(tl.int64), mask=mask)
        if BUFFERS == 2:
            tl.store(out_ptr + n + offs, TL.sr_bits(seed, step, param, e, 1, BUFFERS).to(tl.int64), mask=mask)

    @triton.jit
    def _k_round(x_ptr, rand_ptr, rne_ptr, sr_ptr, bf_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        r = tl.load(rand_ptr + offs, mask=mask).to(tl.uint32)
        tl.store(rne_ptr + offs, TL.bf16_rne_bits(x).to(tl.int32), mask=mask)
        tl.store(sr_ptr + offs, TL.bf16_sr_bits(x, r).to(tl.int32), mask=mask)
        tl.store(bf_ptr + offs, TL.bf16_sr(x, r), mask=mask)

    @triton.jit
    def _k_quant(x_ptr, code_ptr, scale_ptr, deq_ptr, mid_ptr, map_ptr, n, ROWS: tl.constexpr, QB: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        offs = rows[:, None] * QB + tl.arange(0, QB)[None, :]
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        scale = TL.block_absmax(x)
        tl.store(scale_ptr + rows, scale, mask=rows * QB < n)
        code = TL.quantize_code(TL.normalize(x, scale[:, None]), mid_ptr)
        tl.store(code_ptr + offs, code, mask=mask)
        tl.store(deq_ptr + offs, TL.dequantize(code, scale[:, None], map_ptr), mask=mask)

    @triton.jit
    def _k_master(m_ptr, p_ptr, r_ptr, back_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p, r = TL.master_split(tl.load(m_ptr + offs, mask=mask))
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(r_ptr + offs, r, mask=mask)
        tl.store(back_ptr + offs, TL.master_rebuild(p, r), mask=mask)

    @triton.jit
    def _k_libm(b_ptr, t_ptr, pow_ptr, exp_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        t = tl.load(t_ptr + offs, mask=mask, other=1.0)
        tl.store(pow_ptr + offs, TL.pow64(tl.load(b_ptr + offs, mask=mask, other=0.5), t), mask=mask)
        tl.store(exp_ptr + offs, TL.exp64(-t * 0.0171), mask=mask)


def _grid(n, block):
    return (max(1, triton.cdiv(n, block)),)


@needs_triton
def test_triton_philox_words():
    n = 300
    for seed, step, param, start in [(0, 0, 0, 0), (0xA4093822_299F31D0, 2**32 + 5, 9, 2**32 - 150), (77, 12, 160, 5)]:
        out = torch.zeros(4 * n, dtype=torch.int64, device=DEV)
        _k_philox[_grid(n, 128)](out, seed, step, param, start, n, BLOCK=128)
        want = torch.stack(L.philox_words(seed, step, param, n, start=start)).reshape(-1)
        assert out.cpu().tolist() == want.tolist(), (seed, step, param, start)


@needs_triton
@pytest.mark.parametrize("buffers", [1, 2])
def test_triton_sr_bits(buffers):
    n = 300
    for seed, step, param, start in [
        (0, 0, 0, 0),
        (0xA4093822_299F31D0, 2**32 + 5, 9, 8 * 2**32 - 150),
        (77, 12, 160, 5),
    ]:
        out = torch.zeros(buffers * n, dtype=torch.int64, device=DEV)
        _k_sr_bits[_grid(n, 128)](out, seed, step, param, start, n, BUFFERS=buffers, BLOCK=128)
        elem = torch.arange(start, start + n, dtype=torch.int64)
        want = torch.stack(L.sr_bits(seed, step, param, elem, buffers)).reshape(-1)
        assert out.cpu().tolist() == want.tolist(), (seed, step, param, start)


@needs_triton
def test_triton_tl_philox_is_the_known_answer():
    """tl.philox itself, on the third Random123 vector (counter words and a 64-bit key) and the torch one."""
    ctr, key, want = KAT_4X32[2]
    seed = key[0] | (key[1] << 32)
    out = torch.zeros(4, dtype=torch.int64, device=DEV)
    # philox_words(seed, step=c1, param=c2, element=c0 + c3 * 2**32)
    _k_philox[(1,)](out, seed, ctr[1], ctr[2], ctr[0] + (ctr[3] << 32), 1, BLOCK=16)
    assert out.cpu().tolist() == want


@needs_triton
@pytest.mark.parametrize("n", [1, 7, 1030])
def test_triton_bf16_rounding(n):
    x = mixed_values(n, seed=n + 1)
    rand = torch.stack(L.philox_words(5, 1, 0, x.numel()))[0]
    rne, sr = (torch.zeros(x.numel(), dtype=torch.int32, device=DEV) for _ in range(2))
    bf = torch.zeros(x.numel(), dtype=torch.bfloat16, device=DEV)
    _k_round[_grid(x.numel(), 256)](x.to(DEV), rand.to(DEV), rne, sr, bf, x.numel(), BLOCK=256)
    assert rne.cpu().tolist() == L.round_bf16_nearest_bits(x).tolist()
    assert sr.cpu().tolist() == L.round_bf16_stochastic_bits(x, rand).tolist()
    assert same_bits(bf.cpu(), L.round_bf16_stochastic(x, rand))


@needs_triton
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf in the "nonfinite" case
def test_triton_quantize(signed):
    mid, mp = L.code_midpoints(signed).to(DEV), L.dynamic_map(signed).to(DEV)
    for name, x in {**quant_cases(), "mixed": mixed_values(600)}.items():
        n = x.numel()
        nb = L.num_blocks(n)
        codes = torch.zeros(n, dtype=torch.uint8, device=DEV)
        scales = torch.zeros(nb, dtype=torch.float32, device=DEV)
        deq = torch.zeros(n, dtype=torch.float32, device=DEV)
        _k_quant[_grid(nb, 2)](x.to(DEV), codes, scales, deq, mid, mp, n, ROWS=2, QB=L.QBLOCK)
        want_c, want_s = L.quantize_blockwise(x, signed)
        assert codes.cpu().tolist() == want_c.tolist(), name
        assert same_bits(scales.cpu(), want_s), name
        assert same_or_both_nan(deq.cpu(), L.dequantize_blockwise(want_c, want_s, signed)), name


@needs_triton
def test_triton_pow_and_exp_are_the_references():
    """triton_lowbit NOTE [Device libm in the kernels]: ``pow64(b, t)`` is the reference's ``b ** t`` (a float
    to the power of a 0-dim float64 tensor) and ``exp64`` its torch.exp, bit for bit, on the kernel's device,
    for the betas of LAMB presets and t up to 3000; the exponents also cover TVLARS's phi. exp(t * log(b)) (what
    the fp32-state kernels use) differs from the reference's pow for most of these, and numpy's exp (the
    interpreter's tl.exp) for some, so this test fails for either substitute."""
    betas = [0.9, 0.999, 0.95, 0.98, 0.99, 0.5, 0.9999, 0.875]
    ts = [float(t) for t in range(1, 3001, 7)]
    b = torch.tensor([x for x in betas for _ in ts], dtype=torch.float64)
    t = torch.tensor(ts * len(betas), dtype=torch.float64)
    n = b.numel()
    pw, ex = torch.zeros(n, dtype=torch.float64, device=DEV), torch.zeros(n, dtype=torch.float64, device=DEV)
    _k_libm[_grid(n, 256)](b.to(DEV), t.to(DEV), pw, ex, n, BLOCK=256)
    if DEV == "cpu":  # the reference's own expressions, on 0-dim tensors
        want_pow = torch.tensor([bi.item() ** ti for bi, ti in zip(b, t)], dtype=torch.float64)
        want_exp = torch.tensor([torch.exp(-ti * 0.0171).item() for ti in t], dtype=torch.float64)
    else:
        want_pow = (b.to(DEV) ** t.to(DEV)).cpu()
        want_exp = torch.exp(-t.to(DEV) * 0.0171).cpu()
    assert same_bits(pw.cpu(), want_pow)
    assert same_bits(ex.cpu(), want_exp)


@needs_triton
def test_triton_master_split():
    m = mixed_values(2000)
    n = m.numel()
    p = torch.zeros(n, dtype=torch.bfloat16, device=DEV)
    r = torch.zeros(n, dtype=torch.int16, device=DEV)
    back = torch.zeros(n, dtype=torch.float32, device=DEV)
    _k_master[_grid(n, 512)](m.to(DEV), p, r, back, n, BLOCK=512)
    wp, wr = L.master_split(m)
    assert same_bits(p.cpu(), wp) and same_bits(r.cpu(), wr)
    assert same_bits(back.cpu(), L.master_rebuild(wp, wr))


# ---------------------------------------------------------------------------------------------
# why stochastic rounding: an update below half an ulp


@pytest.mark.parametrize(
    "beta,scale,start,target,steps",
    [
        (0.9, 1.0, 1.0, 1.03, 200),  # LARS-style m = 0.9 m + g, g = 0.103: each step moves m by 0.003 < ulp/2
        (0.999, 0.001, 1.0, 2.0, 1000),  # an EMA like Adam's exp_avg_sq, beta2 = 0.999
    ],
)
def test_round_to_nearest_stalls_where_stochastic_rounding_follows(beta, scale, start, target, steps):
    """m <- beta * m + scale * g with g constant (fixed point ``target``), m stored in bf16 after every step.
    Round-to-nearest: beta * m + scale * g rounds back to m at every step (the change, 0.003 or 0.001, is
    below half a bf16 ulp of m = 1, 2**-8): m never moves. Stochastic rounding (Philox bits, a different
    element index per copy): the mean over 1024 copies follows the exact trajectory (float64 closed form,
    target - (target - start) * beta**t) within 0.01, and the per-step value never leaves the two bf16
    neighbours of its fp32 update."""
    n = 1024
    g = target * (1 - beta) / scale
    m_rn = torch.full((n,), start).to(torch.bfloat16)
    m_sr = m_rn.clone()
    for t in range(steps):
        m_rn = L.round_bf16_nearest(beta * m_rn.float() + scale * g)
        u = beta * m_sr.float() + scale * g
        m_sr = L.round_bf16_stochastic(u, L.philox_words(2024, t, 0, n)[0])
        assert ((m_sr.float() - u).abs() <= u.abs() * 2**-7).all()
    exact = target - (target - start) * beta**steps
    assert (m_rn.float() == start).all()  # stalled
    assert abs(exact - start) > 0.02
    assert abs(float(m_sr.double().mean()) - exact) < 0.01
