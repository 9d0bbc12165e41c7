"""The unfused LARS baselines live in the package (``fusedlars.baselines``) so that the
installed ``fusedlars bench`` can run them; this module re-exports them for the suites."""

from fusedlars.baselines import BASELINES, ForeachLARS, PerParamLARS, __all__, foreach_lars_, per_param_lars_  # noqa: F401
