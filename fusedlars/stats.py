"""Per-layer telemetry from the norms the step already computed: no extra pass, no host sync.

After each step every bucket holds, per layer: ``||w||``, ``||g||`` (of the unscaled
gradient), the norm of the direction the ratio was computed for (LARS: ``||g + wd*w||``,
LAMB: ``||u||``) and the final trust ratio (after clipping, the TVLARS factor and
exclusions). These are the quantities the TVLARS paper tracks through training (layer-wise
weight norm, gradient norm and normalized rate).
"""

from __future__ import annotations

import csv
import os
from typing import Any

import torch

__all__ = ["collect", "StatsLogger"]


def collect(opt) -> dict[str, Any]:
    """``{"names": [...], "weight_norm": T, "grad_norm": T, "update_norm": T, "trust_ratio": T,
    "effective_lr": T}`` with one entry per parameter (in group order), tensors on the
    parameters' device (the first bucket's device when they differ). Layers with no step
    yet report zeros and a ratio of 1."""
    names, cols = [], {k: [] for k in ("weight_norm", "grad_norm", "update_norm", "trust_ratio", "effective_lr")}
    dev = None
    for gi, group in enumerate(opt.param_groups):
        for b in opt._layout.of_group(gi):
            dev = dev or b.device
            names += [n or f"group{gi}.param{i}" for i, n in enumerate(b.names)]
            lr = group["lr"]
            cols["weight_norm"].append(b.w_norm.to(dev))
            cols["grad_norm"].append(b.g_norm.to(dev))
            cols["update_norm"].append(b.u_norm.to(dev))
            cols["trust_ratio"].append(b.trust_ratio.to(dev))
            cols["effective_lr"].append((b.trust_ratio * lr).to(dev))
    out: dict[str, Any] = {"names": names}
    for k, v in cols.items():
        out[k] = torch.cat([x.float() for x in v]) if v else torch.zeros(0)
    return out


class StatsLogger:
    """Write ``opt.stats()`` every ``every`` steps to a CSV file (long format: step, layer,
    quantity columns) and, if ``tensorboard`` is a ``SummaryWriter`` or a log dir and the
    tensorboard package is installed, as scalars. Call :meth:`step` after ``opt.step()``.

    Only the steps that are written read the values back to the host.
    """

    FIELDS = ("step", "layer", "weight_norm", "grad_norm", "update_norm", "trust_ratio", "effective_lr")

    def __init__(self, opt, path: str | os.PathLike, every: int = 1, tensorboard: Any = None) -> None:
        if every < 1:
            raise ValueError(f"StatsLogger: every={every} must be >= 1.")
        self.opt, self.path, self.every, self.n = opt, os.fspath(path), every, 0
        self._fh = open(self.path, "w", newline="")
        self._w = csv.writer(self._fh)
        self._w.writerow(self.FIELDS)
        self.tb = None
        if tensorboard is not None:
            if isinstance(tensorboard, (str, os.PathLike)):
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:  # pragma: no cover - optional dependency
                    raise ImportError("StatsLogger(tensorboard=...) needs `pip install tensorboard`.") from e
                tensorboard = SummaryWriter(os.fspath(tensorboard))
            self.tb = tensorboard

    def step(self) -> None:
        self.n += 1
        if self.n % self.every:
            return
        s = collect(self.opt)
        vals = {k: s[k].tolist() for k in self.FIELDS[2:]}
        for i, name in enumerate(s["names"]):
            self._w.writerow([self.n, name] + [f"{vals[k][i]:.9g}" for k in self.FIELDS[2:]])
            if self.tb is not None:
                for k in self.FIELDS[2:]:
                    self.tb.add_scalar(f"{k}/{name}", vals[k][i], self.n)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
        if self.tb is not None:
            self.tb.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
