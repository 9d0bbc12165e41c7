"""Load timm's optimizer sources (``timm/optim``) without importing ``timm``.

``import timm`` needs a torchvision built for the running torch, which PyPI does not have for the
CPU build of torch 2.13.0 (torchvision 0.28.0 from PyPI fails to import beside it: "operator
torchvision::nms does not exist"). ``timm.optim`` itself imports
only torch, its own modules and ``timm.models.group_parameters`` (layer decay, which we do not use):
so we load the installed files (``pip install --no-deps timm``) under a stand-in ``timm`` package
whose ``timm.models`` holds only a stub of that function, and take the ``timm*`` entries out of
``sys.modules`` again. Returns None when timm's files are not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def timm_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("timm")
    except Exception:
        return None


def load_timm_optim():
    try:
        import timm.optim as real  # a timm that imports (a matching torchvision): use it

        return real
    except Exception:
        pass
    for k in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]:
        del sys.modules[k]
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    saved = {k: v for k, v in sys.modules.items() if k == "timm" or k.startswith("timm.")}
    pkg = types.ModuleType("timm")
    pkg.__path__ = list(spec.submodule_search_locations)
    models = types.ModuleType("timm.models")

    def group_parameters(*args, **kwargs):
        raise NotImplementedError("timm.models is stubbed out in the fusedlars tests (no torchvision)")

    models.group_parameters = group_parameters
    sys.modules["timm"] = pkg
    sys.modules["timm.models"] = models
    try:
        return importlib.import_module("timm.optim")
    finally:
        for k in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]:
            del sys.modules[k]
        sys.modules.update(saved)
