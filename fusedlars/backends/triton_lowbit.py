"""Triton helpers of the low-bit state arithmetic (issue #26): the functions of
:mod:`fusedlars.backends.lowbit` (the specification: formulas, sources and NOTE blocks there), bit for bit,
as ``@triton.jit`` functions that the Triton kernels inline per element (or per quantization block).

* :func:`philox_words`: ``tl.philox`` (Philox-4x32-10) on the counter (element mod 2**32, step, param
  index, element >> 32) under the 64-bit seed, as ``lowbit.philox_words``; :func:`sr_bits` the
  16 bits of one buffer of an element from its group's call, as ``lowbit.sr_bits``;
* :func:`bf16_rne_bits` / :func:`bf16_sr_bits` (uint16 patterns) and :func:`bf16_rne` / :func:`bf16_sr`
  (bf16 values): rounding in uint32 integer ops, never through a float conversion (NOTE [bf16 rounding
  in integers] in lowbit.py; the interpreter truncates bf16 casts and the GPU's conversion makes its own
  NaN);
* :func:`block_absmax` (one scale per row of a ``[rows, QBLOCK]`` tile), :func:`normalize`,
  :func:`quantize_code` (the 8-step midpoint search, loading a midpoint table in global memory) and
  :func:`dequantize`;
* :func:`master_split` / :func:`master_rebuild`;
* :func:`pow64` / :func:`exp64`: float64 ``pow`` and ``exp`` as the reference's torch.pow / torch.exp
  compute them on the kernel's device (NOTE [Device libm in the kernels]).

``normalize`` divides with ``tl.math.div_rn``: Triton's ``/`` on fp32 lowers to an approximate division
on NVIDIA GPUs, and the code of a value near a midpoint would then differ from the other backends'.

``tests/test_lowbit.py`` runs each helper in small test kernels under TRITON_INTERPRET=1 and compares the
bits against lowbit.py.
"""

from __future__ import annotations

import os

import numpy as np
import triton
import triton.language as tl

#: triton.jit decorates for the interpreter when TRITON_INTERPRET is set at import (as triton_kernels.INTERPRET)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: The quiet NaN a block holding a NaN gets as its scale (lowbit: NOTE [Block scale]).
SCALE_NAN_BITS: tl.constexpr = tl.constexpr(0x7FC00000)


@triton.jit
def sr_bits(seed, step, param_index, element, BUFFER: tl.constexpr, BUFFERS: tl.constexpr):
    """The 16 stochastic-rounding bits (uint32) of buffer ``BUFFER`` of ``BUFFERS`` (1 or 2) per element of
    the int64 index tensor ``element`` (lowbit.sr_bits: half ``BUFFER * P + e % P`` of the call of
    counter ``e // P``, ``P = 8 // BUFFERS``; each element computes its group's call)."""
    P: tl.constexpr = 8 // BUFFERS
    e = element.to(tl.int64)
    w0, w1, w2, w3 = philox_words(seed, step, param_index, e // P)
    h = BUFFER * P + (e % P).to(tl.int32)
    k = h >> 1
    w = tl.where(k == 0, w0, tl.where(k == 1, w1, tl.where(k == 2, w2, w3)))
    return (w >> (16 * (h & 1)).to(tl.uint32)) & 0xFFFF


@triton.jit
def philox_words(seed, step, param_index, element):
    """Four uint32 words per element of the int64 index tensor ``element`` (lowbit.philox_words).
    ``seed``: the 64-bit seed (int argument; tl.philox takes its low word as k0, its high word as k1)."""
    e = element.to(tl.int64)
    c0 = e.to(tl.uint32)
    c3 = (e >> 32).to(tl.uint32)
    zero = c0 * 0
    c1 = zero + step.to(tl.int64).to(tl.uint32)
    c2 = zero + param_index.to(tl.int64).to(tl.uint32)
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def _bits(x):
    return x.to(tl.uint32, bitcast=True)


@triton.jit
def _is_nan_bits(b):
    return (b & 0x7FFFFFFF) > 0x7F800000


@triton.jit
def bf16_rne_bits(x):
    """Round-to-nearest-even fp32 -> bf16 pattern (uint16); NaN -> ``(b >> 16) | 0x40``."""
    b = _bits(x)
    h = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    h = tl.where(_is_nan_bits(b), (b >> 16) | 0x40, h)
    return h.to(tl.uint16)


@triton.jit
def bf16_sr_bits(x, rand):
    """Stochastic rounding fp32 -> bf16 pattern (uint16) with the low 16 bits of the uint32 ``rand``;
    inf and NaN as :func:`bf16_rne_bits` (an inf's low half is zero: add-and-truncate keeps it, so
    only NaN branches)."""
    b = _bits(x)
    h = (b + (rand.to(tl.uint32) & 0xFFFF)) >> 16
    return tl.where(_is_nan_bits(b), (b >> 16) | 0x40, h).to(tl.uint16)


@triton.jit
def bf16_rne(x):
    return bf16_rne_bits(x).to(tl.bfloat16, bitcast=True)


@triton.jit
def bf16_sr(x, rand):
    return bf16_sr_bits(x, rand).to(tl.bfloat16, bitcast=True)


@triton.jit
def block_absmax(x):
    """One scale per row of the fp32 tile ``x`` ``[rows, QBLOCK]`` (lanes past a param's end hold 0):
    ``max |x|``, the quiet NaN ``0x7FC00000`` for a row holding a NaN."""
    a = tl.abs(x)
    isnan = a != a
    nan_rows = tl.max(isnan.to(tl.int32), axis=1)
    m = tl.max(tl.where(isnan, 0.0, a), axis=1)
    nan = tl.full(m.shape, SCALE_NAN_BITS, tl.uint32).to(tl.float32, bitcast=True)
    return tl.where(nan_rows > 0, nan, m)


@triton.jit
def normalize(x, scale):
    """``x / scale`` (correctly rounded) where ``scale > 0``, else 0."""
    ok = scale > 0.0
    return tl.where(ok, tl.math.div_rn(x, tl.where(ok, scale, 1.0)), 0.0)


@triton.jit
def quantize_code(v, mid_ptr):
    """The code (uint8) of normalized ``v``: ``#{i : mid[i] < v}`` by the 8-step binary search over the
    255 fp32 midpoints at ``mid_ptr`` (lowbit.code_midpoints)."""
    c = tl.zeros(v.shape, tl.int32)
    for k in tl.static_range(8):  # step 128 >> k (no constexpr name: a compiled loop cannot rebind one)
        probe = tl.load(mid_ptr + c + ((128 >> k) - 1))
        c = tl.where(probe < v, c + (128 >> k), c)
    return c.to(tl.uint8)


@triton.jit
def dequantize(code, scale, map_ptr):
    """``map[code] * scale`` (fp32), ``map_ptr``: the 256 fp32 codes (lowbit.dynamic_map)."""
    return tl.load(map_ptr + code.to(tl.int32)) * scale


@triton.jit
def master_split(master):
    """``(param bf16, remainder int16)`` of an fp32 master (lowbit: NOTE [Master split])."""
    b = _bits(master)
    t = b + 0x8000
    p = t >> 16
    r = (t & 0xFFFF).to(tl.int32) - 0x8000
    nan = _is_nan_bits(b)
    p = tl.where(nan, ((b >> 16) & 0x8000) | 0x7FC0, p)
    r = tl.where(nan, 0, r)
    return p.to(tl.uint16).to(tl.bfloat16, bitcast=True), r.to(tl.int16)


@triton.jit
def master_rebuild(param, remainder):
    """The fp32 master ``((p << 16) + r) mod 2**32`` of a bf16 param and its int16 remainder."""
    p = param.to(tl.uint16, bitcast=True).to(tl.uint32)
    r = remainder.to(tl.int32).to(tl.uint32, bitcast=True)
    return ((p << 16) + r).to(tl.float32, bitcast=True)


# NOTE: [Device libm in the kernels] The exact (low-bit) kernels form per-segment coefficients from
# beta^t (LAMB's bias corrections) and exp (TVLARS's phi) in float64 and round them to fp32 once, as the
# reference does with ``beta ** t`` and torch.exp on 0-dim float64 tensors of the bucket's device. Two
# libms agree to an ulp of a double, not bit for bit (on this project's CPU host, exp(t*log(b)) differs
# from torch's b**t for two thirds of (b, t), and numpy's and the C library's exp from torch's for 5% and
# 0.5% of arguments: tests/test_lowbit.py), and an ulp can move the fp32 rounding of a coefficient. So
# each kernel takes the function torch uses on its device: CUDA's math library when compiled (libdevice's
# ``__nv_pow``, ``__nv_exp``; torch's CUDA kernels are compiled against the same library: bench/gpu_check.sh
# runs tests/test_lowbit.py's check of it on a GPU, nothing here has), and in the interpreter, whose tensors are CPU tensors,
# torch's own CPU functions on 0-dim tensors, element by element (the interpreter cannot run libdevice:
# extern calls are not interpreted). Once per segment, never per element.
if _INTERPRET:
    import torch

    def _torch_cpu(fn, *args):
        """``fn`` (of 0-dim float64 CPU tensors) elementwise on interpreter tensors, as a float64 tensor."""
        from triton.runtime.interpreter import TensorHandle

        arrs = np.broadcast_arrays(*[np.asarray(a.handle.data, dtype=np.float64) for a in args])
        zd = [[torch.tensor(float(x), dtype=torch.float64) for x in a.ravel()] for a in arrs]
        out = np.array([fn(*xs).item() for xs in zip(*zd)], dtype=np.float64).reshape(arrs[0].shape)
        ty = max((a.type for a in args), key=lambda t: len(getattr(t, "shape", ())))
        return tl.core.tensor(TensorHandle(out, tl.float64), ty)

    def _pow_as_reference(b, t):
        return b.item() ** t  # a float to the power of a 0-dim tensor, as reference.lamb_coef32 writes it

    @triton.jit
    def pow64(b, t):
        """``b ** t`` in float64 (NOTE [Device libm in the kernels])."""
        return _torch_cpu(_pow_as_reference, b.to(tl.float64), t.to(tl.float64))

    @triton.jit
    def exp64(x):
        """``exp(x)`` in float64 (NOTE [Device libm in the kernels])."""
        return _torch_cpu(torch.exp, x.to(tl.float64))

else:
    from triton.language.extra import libdevice

    @triton.jit
    def pow64(b, t):
        """``b ** t`` in float64 (NOTE [Device libm in the kernels])."""
        return libdevice.pow(b.to(tl.float64), t.to(tl.float64))

    @triton.jit
    def exp64(x):
        """``exp(x)`` in float64 (NOTE [Device libm in the kernels])."""
        return libdevice.exp(x.to(tl.float64))
