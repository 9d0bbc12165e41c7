"""Parameter-shape sets for optimizer benchmarks: re-exported from :mod:`fusedlars.shapes`.

The generators live in the installed package so that ``fusedlars bench`` works without a
checkout of this repository; see :mod:`fusedlars.shapes` for the documentation of each set.
"""

from __future__ import annotations

from fusedlars.shapes import (  # noqa: F401
    SHAPE_SETS,
    Shape,
    ShapeList,
    __all__,
    _available_bytes,
    bert_large,
    count_params,
    make_params,
    numel,
    resnet50,
    stress,
    tiny,
    vit_b16,
)
