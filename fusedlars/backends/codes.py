"""The option codes the compiled kernels take: one table per option, the only definition.

Each table maps an option's Python value (as the resolved configs of :mod:`.config` hold it) to
the int the kernels receive. They are, in order, the enums of ``csrc/lars_math.h`` (the C++ CPU and
CUDA kernels; :data:`CPP_ENUMS` names each one and its enumerators, and
``tests/test_one_source.py`` parses the header and checks it against these tables) and the
mode codes of the Triton kernels (``fusedlars/backends/triton_kernels.py`` builds its
``tl.constexpr`` names from these tables). The table of option fields (:mod:`.option_fields`) names
the code table of each field it encodes; the ops' ``modes`` lists and the Triton kernels' ``opts``
tuples are derived from it.

The one encoding that differs is Triton's ``MOM`` constexpr: it folds "the group has a momentum
buffer" (``momentum != 0``, a separate float for the C++ kernels) into the momentum mode so that
the kernel specialises on both at once: see :func:`triton_mom`.

Pure Python with no imports, so that the Triton kernel module and the C++ header check load it
without torch.
"""

from __future__ import annotations

DENOMINATOR = {"sum_of_norms": 0, "norm_of_sum": 1, "grad_only": 2}
LARS_WD = {"l2": 0, "ratio_only": 1, "decoupled": 2}
ZERO_NORM = {"one": 0, "skip": 1}
ZERO_CHECK = {"raw_grad": 0, "update": 1, "denominator": 2}
CLIP = {None: 0, "larc": 1, "lambc": 2, "range": 3}
MOMENTUM = {"torch": 0, "classic": 1}
FIRST = {"clone": 0, "zeros": 1}
BIAS = {"both": 0, "none": 1, "first_outside": 2}
LAMB_WD = {"in_update": 0, "l2": 1, "decoupled": 2}

#: Each table's C++ enum in ``csrc/lars_math.h`` and its enumerators, in the table's order.
CPP_ENUMS = {
    "Denominator": (DENOMINATOR, ("kSumOfNorms", "kNormOfSum", "kGradOnly")),
    "LarsWdMode": (LARS_WD, ("kLarsL2", "kLarsRatioOnly", "kLarsDecoupled")),
    "ZeroNorm": (ZERO_NORM, ("kZeroNormOne", "kZeroNormSkip")),
    "ZeroNormCheck": (ZERO_CHECK, ("kCheckRawGrad", "kCheckUpdate", "kCheckDenominator")),
    "TrustClip": (CLIP, ("kClipNone", "kClipLarc", "kClipLambc", "kClipRange")),
    "MomentumMode": (MOMENTUM, ("kMomentumTorch", "kMomentumClassic")),
    "FirstStepBuffer": (FIRST, ("kFirstClone", "kFirstZeros")),
    "BiasCorrection": (BIAS, ("kBcBoth", "kBcNone", "kBcFirstOutside")),
    "LambWdMode": (LAMB_WD, ("kLambInUpdate", "kLambL2", "kLambDecoupled")),
}

#: Triton's ``MOM`` constexpr: no momentum buffer, else 1 + :data:`MOMENTUM` of the mode.
MOM_NONE = 0
MOM = {mode: 1 + code for mode, code in MOMENTUM.items()}


def triton_mom(momentum: float, momentum_mode: str) -> int:
    """The ``MOM`` constexpr of the Triton LARS update kernel: :data:`MOM_NONE` when
    ``momentum == 0`` (no buffer), else ``MOM[momentum_mode]`` (1 torch, 2 classic)."""
    return MOM_NONE if momentum == 0 else MOM[momentum_mode]
