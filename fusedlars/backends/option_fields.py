"""The option fields the fused kernels take, declared once: one row per field, everything else derived.

A row names a field of a kind's option set (``LARS`` or ``LAMB``), its type (``"f"``: a double in the
C++ struct, an element of the ops' ``float[] hyper`` list; ``"i"``: an int, an element of ``int[] modes``),
how its value is read from the resolved config (:class:`.config.LarsConfig` / ``LambConfig``) and, for a
choice among strings, the code table of :mod:`.codes` that turns it into an int. The order of the rows
is the order of everything derived from them:

* :func:`pack`: the ops' ``(hyper, modes)`` lists (what :mod:`.packing` hands the C++ CPU and CUDA ops);
* :func:`header`: ``csrc/option_fields.h``, X-macros from which ``csrc/lars_math.h`` declares the members
  of ``LarsOptions`` / ``LambOptions`` and ``csrc/option_decode.h`` decodes the lists, and the list
  lengths. setup.py regenerates the file before every build (:func:`write_header`; also
  ``python -m fusedlars.backends.option_fields``); it is committed, so the CUDA emulation and the plain
  nvcc checks compile it as it is, and tests/test_one_source.py fails when it differs from this table;
* :func:`triton_values` / :func:`slots`: the Triton kernels' ``opts`` tuple (one fp32 per row, in row
  order) and the index of each row in it, from which ``triton_kernels.py`` names its slot constants.

Adding an option to every backend: a row here, and the math that reads it (a member of the C++ struct
by its name, an ``opts[SLOT]`` in a Triton kernel).

Rows with ``cpp=False`` are not in the C++ structs: values the Triton kernels' fp32 math needs
precomputed on the host in double (``1 - beta1``; the C++ kernels compute them from the double
members themselves).

NOTE: [Triton modes are fp32] The Triton kernels receive every row, ints included, as one tuple of fp32
scalars. Triton 3.9 specialises an int *inside a tuple* that equals 1 into a compile-time constant even
under ``do_not_specialize`` (top-level ints honour it), so an int tuple would compile a kernel variant per
pattern of 1s among the modes; floats are never specialised. Codes are small ints, exact in fp32, and
compared as such; ``tv_gate`` is exact below 2**24 steps (:data:`FP32_EXACT_INT`; the Triton backend
refuses a larger gate).

Pure Python that imports only :mod:`.codes`, so setup.py can load it before anything is built.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import codes

#: Largest int every smaller non-negative int of which an fp32 holds exactly (NOTE [Triton modes are fp32]).
FP32_EXACT_INT = 2**24


@dataclass(frozen=True)
class Field:
    """One option field (see the module docstring)."""

    name: str  # the C++ struct member, and the name of the Triton slot
    type: str  # "f": double / hyper[] ; "i": int / modes[]
    get: Callable[[Any], Any]  # the value from the resolved config
    codes: Mapping | None = None  # .codes table turning the value into the int the kernels take
    cpp: bool = True  # a member of the C++ struct (False: Triton only)

    def value(self, cfg) -> float | int:
        v = self.get(cfg)
        if self.codes is not None:
            return self.codes[v]
        return float(v) if self.type == "f" else int(v)


def _getter(attr: str) -> Callable[[Any], Any]:
    # a plain function, not operator.attrgetter: dynamo traces it in a compiled step
    return lambda cfg: getattr(cfg, attr)


def _f(name: str, attr: str | Callable | None = None, *, cpp: bool = True) -> Field:
    return Field(name, "f", attr if callable(attr) else _getter(attr or name), cpp=cpp)


def _i(name: str, attr: str | Callable | None = None, table: Mapping | None = None) -> Field:
    return Field(name, "i", attr if callable(attr) else _getter(attr or name), table)


_TV_OFF = (0.0, 0.0, 0.0, 0.0, 0)  # (lmbda, alpha, shift, gamma_min, gate) of a group without TVLARS


def _tv(i: int) -> Callable[[Any], Any]:
    return lambda cfg: (cfg.tv or _TV_OFF)[i]


#: The fields of ``LarsOptions`` (csrc/lars_math.h), config :class:`.config.LarsConfig`.
LARS: tuple[Field, ...] = (
    _f("momentum"),
    _f("dampening"),
    _f("weight_decay"),
    _f("eta"),
    _f("eps"),
    _f("clamp_lo"),
    _f("clamp_hi"),
    _f("clip_lo"),
    _f("clip_hi"),
    _f("tv_lmbda", _tv(0)),
    _f("tv_alpha", _tv(1)),
    _f("tv_shift", _tv(2)),
    _f("tv_gamma_min", _tv(3)),
    _f("tv_gate", _tv(4)),
    _i("nesterov"),
    _i("maximize"),
    _i("denominator", table=codes.DENOMINATOR),
    _i("wd_mode", "weight_decay_mode", codes.LARS_WD),
    _i("zero_norm", table=codes.ZERO_NORM),
    _i("zero_norm_check", table=codes.ZERO_CHECK),
    _i("trust_clip", table=codes.CLIP),
    _i("adapt_enabled"),
    _i("momentum_mode", table=codes.MOMENTUM),
    _i("first_step_buffer", table=codes.FIRST),
    _i("tv_on", lambda cfg: cfg.tv is not None),
)

#: The fields of ``LambOptions`` (csrc/lars_math.h), config :class:`.config.LambConfig`.
LAMB: tuple[Field, ...] = (
    _f("beta1"),
    _f("beta2"),
    _f("beta3"),
    _f("eps"),
    _f("eps_root"),
    _f("weight_decay"),
    _f("clamp_lo"),
    _f("clamp_hi"),
    _f("clip_lo"),
    _f("clip_hi"),
    _f("trust_ratio_eps"),
    _i("maximize"),
    _i("bias_correction", table=codes.BIAS),
    _i("wd_mode", "weight_decay_mode", codes.LAMB_WD),
    _i("adapt_enabled"),
    _i("trust_clip", table=codes.CLIP),
    _i("adam"),
    _f("one_minus_beta1", lambda cfg: 1.0 - cfg.beta1, cpp=False),
    _f("one_minus_beta2", lambda cfg: 1.0 - cfg.beta2, cpp=False),
)

TABLES: dict[str, tuple[Field, ...]] = {"LARS": LARS, "LAMB": LAMB}
#: The C++ struct of each kind.
STRUCTS = {"LARS": "LarsOptions", "LAMB": "LambOptions"}


def cpp_fields(kind: str, type_: str) -> list[Field]:
    """The rows of ``kind`` in its C++ struct of type ``type_`` (``"f"`` or ``"i"``), in order."""
    return [f for f in TABLES[kind] if f.cpp and f.type == type_]


def pack(kind: str, cfg) -> tuple[list[float], list[int]]:
    """The ops' ``(hyper, modes)`` lists of ``cfg``: the C++ struct's double and int members, in order."""
    return [f.value(cfg) for f in cpp_fields(kind, "f")], [f.value(cfg) for f in cpp_fields(kind, "i")]


def slots(kind: str) -> dict[str, int]:
    """Index of each row of ``kind`` in the Triton kernels' ``opts`` tuple."""
    return {f.name: i for i, f in enumerate(TABLES[kind])}


def triton_values(kind: str, cfg) -> list[float]:
    """The Triton kernels' ``opts`` of ``cfg``: every row, in order, as a float (NOTE [Triton modes are fp32])."""
    return [float(f.value(cfg)) for f in TABLES[kind]]


# ------------------------------------------------------------------------------------------
# csrc/option_fields.h
# ------------------------------------------------------------------------------------------
HEADER = Path(__file__).resolve().parents[2] / "csrc" / "option_fields.h"
_LISTS = {"f": ("HYPER", "hyper", "double"), "i": ("MODES", "modes", "int")}


def header() -> str:
    """The text of ``csrc/option_fields.h``."""
    out = [
        "// GENERATED from the table of fusedlars/backends/option_fields.py (setup.py rewrites it before every build;",
        "// `python -m fusedlars.backends.option_fields` by hand). Do not edit: tests/test_one_source.py fails when",
        "// this file differs from the table.",
        "//",
        "// FUSEDLARS_<KIND>_HYPER(X) / FUSEDLARS_<KIND>_MODES(X) call X(member, index) for each double / int member",
        "// of LarsOptions / LambOptions (csrc/lars_math.h declares the members from them), in struct order; index is",
        "// the member's position in the ops' float[] hyper / int[] modes list (csrc/option_decode.h decodes them).",
        "#pragma once",
        "",
        "#include <cstddef>",
        "",
    ]
    sizes = []
    for kind, struct in STRUCTS.items():
        for type_, (suffix, lst, ctype) in _LISTS.items():
            rows = cpp_fields(kind, type_)
            out.append(f"// {struct}: the {ctype} members, {lst}[0..{len(rows) - 1}]")
            out.append(f"#define FUSEDLARS_{kind}_{suffix}(X) \\")
            out.extend(f"  X({f.name}, {i}) \\" for i, f in enumerate(rows))
            out.append("")
            sizes.append(f"k{kind.capitalize()}{suffix.capitalize()} = {len(rows)}")
    out += ["namespace fusedlars {", "", "// lengths of the ops' option lists", f"constexpr size_t {', '.join(sizes)};"]
    out += ["", "}  // namespace fusedlars", ""]
    return "\n".join(out)


def write_header(path: Path | str = HEADER) -> bool:
    """Write :func:`header` to ``path`` unless it already holds it (no rebuild for an unchanged file).
    True when the file was written."""
    path = Path(path)
    text = header()
    if path.exists() and path.read_text() == text:
        return False
    path.write_text(text)
    return True


if __name__ == "__main__":
    print(f"{HEADER}: {'written' if write_header() else 'up to date'}", file=sys.stderr)
