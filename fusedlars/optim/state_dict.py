"""state_dict conversion: torch-format ``state_dict`` / ``load_state_dict`` (also from torch.optim's
SGD / Adam-style dicts), and copies (pickle, ``copy.deepcopy``)."""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

import torch

from .. import distributed
from ..backends import lowbit_state
from ..buckets import state_dtype_for
from .options import BOOKKEEPING_KEYS, TORCH_INFRA_KEYS, check_seed, presets

#: Attributes rebuilt from the param groups after a copy (NOTE [Copies]).
TRANSIENT = ("_layout", "_dispatch", "_compiled", "_bwd")

#: The param-group key of a saved state dict that records the optimizer kind (NOTE [Kinds of state dicts]).
KIND_KEY = "fusedlars_kind"
#: ... and the one that records the stochastic rounding's seed (NOTE [Low-bit state in state dicts]).
SEED_KEY = "fusedlars_seed"

# NOTE: [Low-bit state in state dicts]
# Every saved group records its ``state_dtype`` (an option) and the optimizer's ``seed`` (SEED_KEY);
# the state tensors are saved as stored (bf16, uint8 codes with their ``<name>_absmax`` scales, the
# int16 ``master_remainder``), all loadable with torch.load(weights_only=True). On load the state is
# brought into THIS optimizer's format (fusedlars.backends.lowbit_state.load_entry: dequantized
# exactly, then rounded to nearest), and the optimizer keeps its own ``state_dtype``, as it keeps its
# master_weights: it says how this run stores its state, not what the step computes. The saved seed is
# adopted, so that a resumed run draws the random bits the uninterrupted one would have.

# NOTE: [Kinds of state dicts]
# A LARS resumed from a LAMB checkpoint (or the reverse) would load the options both kinds share
# (weight_decay_mode, lr, ...) with another meaning and drop or misuse the state. state_dict() records
# the kind in every saved param group (a group key survives torch.save, distributed checkpointing and
# torch.optim's own load_state_dict, which copies unknown group keys); a checkpoint without it (an
# older fusedlars, torch.optim) is recognized by its state and group keys: momentum buffers and
# SGD's momentum/dampening/nesterov are LARS-like (SGD -> LARS keeps working), Adam moments and betas
# LAMB-like. Another kind is refused, naming both, before anything changes.
_LARS_LIKE_STATE = frozenset({"momentum_buffer", "mu", "momentum"})
_LAMB_LIKE_STATE = frozenset({"exp_avg", "exp_avg_sq"})
_LARS_LIKE_GROUP = frozenset({"momentum", "dampening", "nesterov", "trust_coefficient", "momentum_mode"})
_LAMB_LIKE_GROUP = frozenset({"betas", "bias_correction", "amsgrad"})


def _kind_of(state_dict: dict[str, Any]) -> tuple[str | None, str]:
    """The optimizer kind a (validated) state dict comes from, and how that is known."""
    recorded = {g[KIND_KEY] for g in state_dict["param_groups"] if KIND_KEY in g}
    if len(recorded) == 1:
        return next(iter(recorded)), f"recorded as {KIND_KEY}={next(iter(recorded))!r}"
    if len(recorded) > 1:
        return "mixed", f"its param groups record different kinds {sorted(recorded)}"
    skeys = {k for st in state_dict["state"].values() for k in st}
    gkeys = {k for g in state_dict["param_groups"] for k in g}
    lars = sorted(skeys & _LARS_LIKE_STATE) or sorted(gkeys & _LARS_LIKE_GROUP)
    lamb = sorted(skeys & _LAMB_LIKE_STATE) or sorted(gkeys & _LAMB_LIKE_GROUP)
    if lamb and not (skeys & _LARS_LIKE_STATE):
        return "LAMB", f"LAMB/Adam-like: it has {lamb}"
    if lars and not (skeys & _LAMB_LIKE_STATE):
        return "LARS", f"LARS/SGD-like: it has {lars}"
    return None, "unknown"


def _malformed(k: str, what: str) -> ValueError:
    return ValueError(f"{k}.load_state_dict: malformed state dict: {what}.")


def _check_structure(k: str, sd: Any) -> None:
    """The shape of a torch.optim state dict, before anything reads it (ValueError naming what is wrong)."""
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError(f"{k}: load_state_dict expects a dict with 'state' and 'param_groups'.")
    if not isinstance(sd["state"], dict):
        raise _malformed(
            k, f"'state' must be a dict of param index -> dict of tensors, got {type(sd['state']).__name__}"
        )
    groups = sd["param_groups"]
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise _malformed(k, "'param_groups' must be a list of dicts, each with a 'params' list")
    for gi, g in enumerate(groups):
        if not isinstance(g["params"], (list, tuple)):
            raise _malformed(k, f"param_groups[{gi}]['params'] must be a list of param indices")
    for pid, st in sd["state"].items():
        if not isinstance(st, dict):
            raise _malformed(k, f"state of param {pid!r} must be a dict, got {type(st).__name__}")
        if "step" in st:
            v = st["step"]
            n = v.numel() if isinstance(v, torch.Tensor) else (1 if isinstance(v, (int, float)) else -1)
            if n != 1:
                raise _malformed(k, f"state of param {pid!r}, key 'step': one number expected, got {v!r}")


class StateDictMixin:
    """``state_dict`` / ``load_state_dict`` and copies of a :class:`fusedlars.optim.base.BucketedOptimizer`."""

    def _unstepped(self) -> set[int]:
        """ids of params whose state was created but never stepped (a GradScaler-skipped first step):
        torch.optim would have no state for them. Reads the buckets' ``has_state`` (a host sync:
        fine outside step())."""
        out: set[int] = set()
        for b in self.buckets():
            for p, h in zip(b.params, b.has_state.tolist()):
                if not h and p in self.state:
                    out.add(id(p))
        return out

    def state_dict(self) -> dict[str, Any]:
        """torch-format state (``torch.optim.Optimizer.state_dict``): the per-param state tensors
        themselves, for params that have stepped. ``self.state`` is not modified."""
        sd = super().state_dict()
        for g in sd["param_groups"]:  # NOTE [Kinds of state dicts]
            g[KIND_KEY] = self._KIND
            g[SEED_KEY] = getattr(self, "seed", lowbit_state.DEFAULT_SEED)  # NOTE [Low-bit state in state dicts]
        skip = self._unstepped()
        if skip:
            order = [p for group in self.param_groups for p in group["params"]]  # torch's packed ids
            sd["state"] = {k: v for k, v in sd["state"].items() if not (isinstance(k, int) and id(order[k]) in skip)}
        return sd

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a fusedlars or torch (e.g. ``torch.optim.SGD``) state dict; validated before anything changes.

        Hooks registered with ``register_load_state_dict_pre_hook`` / ``..._post_hook`` run as in
        torch.optim: pre-hooks (in order, ``prepend=True`` first) on a shallow copy, a returned dict
        replacing it; post-hooks after the state is loaded."""
        k = self._KIND
        if not isinstance(state_dict, dict):
            raise ValueError(f"{k}: load_state_dict expects a dict with 'state' and 'param_groups'.")
        state_dict = state_dict.copy()  # shallow, as torch.optim
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        self._load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        k = self._KIND
        _check_structure(k, state_dict)
        kind, how = _kind_of(state_dict)
        if kind is not None and kind != k:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: this state dict is not a {k} optimizer's ({how}); a {k} "
                f"cannot resume from a {kind} checkpoint: its state and options mean other things. Load it "
                "into the optimizer kind that saved it."
            )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{k}: the state dict has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}: it comes from a different parameter layout."
            )
        id_map = {}
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"{k}: param group {gi} has {len(g['params'])} params but the state dict's has "
                    f"{len(sg['params'])}: it comes from a different parameter layout."
                )
            id_map.update(zip(sg["params"], g["params"]))
        storage = {id(p): lowbit_state.storage_name(g.get("state_dtype", "float32")) for g in self.param_groups
                   for p in g["params"]}  # fmt: skip
        new_state: dict[torch.Tensor, dict[str, Any]] = {}
        ignored: set[str] = set()
        dropped: list = []  # params whose saved master is not (or no longer) the master of the param
        aliases = {"mu": "momentum_buffer", "momentum": "momentum_buffer"}
        for pid, st in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"{k}: the state dict has state for param id {pid}, which no group lists.")
            p = id_map[pid]
            out: dict[str, Any] = {}
            for key, v in st.items():
                key = aliases.get(key, key)
                if key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "master_weight"):
                    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(p.shape):
                        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                        raise ValueError(
                            f"{k}: state {key!r} of param id {pid} has shape {shape}, the param has "
                            f"{tuple(p.shape)}: the state dict comes from a different parameter layout."
                        )
                    sdt = torch.float32 if key == "master_weight" else state_dtype_for(p.dtype)
                    if v.dtype in (torch.bfloat16, torch.uint8) and key != "master_weight":
                        sdt = v.dtype  # low-bit state: converted below (NOTE [Low-bit state in state dicts])
                    out[key] = v.detach().to(device=p.device, dtype=sdt, copy=True)
                    if key == "master_weight" and self.master_weights == "remainder" and p.dtype == torch.bfloat16:
                        pass  # split into a remainder below
                    elif key == "master_weight" and not self._keeps_master(p, out[key]):
                        del out[key]
                        dropped.append(pid)
                elif key == "step":
                    out["step"] = torch.as_tensor(v, dtype=torch.float32).detach().clone().reshape(())
                elif lowbit_state.is_lowbit_key(key) and isinstance(v, torch.Tensor):
                    out[key] = v.detach().to(device=p.device, copy=True)
                else:
                    ignored.add(key)
            try:
                if not lowbit_state.load_entry(out, p, storage[id(p)], state_dtype_for(p.dtype), self.master_weights):
                    dropped.append(pid)
            except ValueError as e:
                raise ValueError(f"{k}: state of param id {pid}: {e}: the state dict is malformed.") from None
            new_state[p] = out
        new_groups = []
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            ng = dict(g)
            for key, v in sg.items():
                if key in ("params", KIND_KEY, SEED_KEY, "state_dtype"):  # NOTE [Low-bit state in state dicts]
                    continue
                if key == "preset" and v not in presets()[k]:
                    raise ValueError(
                        f"{k}.load_state_dict: param_groups[{gi}] has preset={v!r}, which is no {k} preset. "
                        f"Known: {sorted(presets()[k])} (fusedlars.presets() describes each)."
                    )
                if key in self.defaults or key in BOOKKEEPING_KEYS:
                    ng[key] = v
                elif key not in TORCH_INFRA_KEYS:
                    ignored.add(f"param_groups[{gi}].{key}")
            self._validate_group(ng, f" (loaded param group {gi})")
            new_groups.append(ng)
        if ignored:
            warnings.warn(f"{k}.load_state_dict: ignored entries with no meaning here: {sorted(ignored)}", stacklevel=2)
        if dropped:
            warnings.warn(
                f"{k}.load_state_dict: the saved fp32 master weights of params {dropped} are not used: "
                + (
                    "the param is not their rounding (the param was changed after they were saved, or the "
                    "model was loaded after the optimizer); they are rebuilt from the param."
                    if self.master_weights
                    else "this optimizer has master_weights=False."
                ),
                stacklevel=2,
            )
        seeds = {sg[SEED_KEY] for sg in saved_groups if SEED_KEY in sg}
        seed = check_seed(k, seeds.pop()) if len(seeds) == 1 else None
        # -- nothing above mutated the optimizer; now commit
        for g, ng in zip(self.param_groups, new_groups):
            g.clear()
            g.update(ng)
        if seed is not None:
            self.seed = seed
        # NOTE: [Loading in place]
        # Where a param already has state of the same keys and shapes, the loaded values are copied
        # into the existing tensors (and "step" into its bucket table), so that a compiled step, whose
        # guards hold the state tensors' ids, does not recompile after load_state_dict. Other state
        # replaces the param's entry and is adopted by its bucket (Bucket.refresh); state of params
        # the state dict has none for is dropped, as in torch.optim. A loaded fp32 master is copied
        # into its param. A sharded param's state is wrapped as a DTensor.
        with torch.no_grad():
            for p in [p for p in self.state if p not in new_state]:
                del self.state[p]
            for p, st in new_state.items():
                cur = self.state.get(p)
                if (
                    cur is not None
                    and cur.keys() == st.keys()
                    and all(distributed.local_tensor(cur[k]).shape == v.shape for k, v in st.items() if k != "step")
                ):
                    for k, v in st.items():
                        cur[k].copy_(v) if k == "step" else distributed.local_tensor(cur[k]).copy_(v)
                    continue
                if distributed.is_dtensor(p):
                    st = {
                        key: distributed.as_dtensor_like(distributed.local_tensor(v), p) if key != "step" else v
                        for key, v in st.items()
                    }
                self.state[p] = st
            for b in self.buckets():
                b.loaded(self.state)

    def _keeps_master(self, p: torch.Tensor, master: torch.Tensor) -> bool:
        """A saved fp32 master is loaded only into an optimizer that keeps masters for ``p``, and only
        while it is ``p``'s master: ``p`` equals it rounded to ``p``'s dtype. Otherwise the param is
        the truth (a stale master would roll it back at the next step) and the master is rebuilt
        from it. One comparison per master at load time (a host sync: outside step())."""
        if not (self.master_weights and p.dtype in (torch.float16, torch.bfloat16)):
            return False
        loc = distributed.local_tensor(p).detach()
        return bool(torch.equal(distributed.local_tensor(master).to(loc.dtype), loc))

    # NOTE: [Copies]
    # torch.optim's __getstate__ keeps only defaults, state and param_groups; ours keeps every attribute
    # (backend, master_weights, capturable, carry_weight_norms, preset, foreach, fused, and a subclass's
    # own) except the buckets and hooks (torch drops hooks too). The state is taken as state_dict()
    # sees it (params that never stepped have none, so the copy's first step on them is a first step),
    # with each "step" cloned out of its bucket's step table. The copy builds its buckets at its first
    # step from its params and this state, like after load_state_dict: it steps bitwise like the original.
    def __getstate__(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in TRANSIENT and not k.startswith("_optimizer_")}
        skip = self._unstepped()
        state: defaultdict = defaultdict(dict)
        for p, st in self.state.items():
            if id(p) in skip:
                continue
            state[p] = {
                k: v.detach().clone() if k == "step" and isinstance(v, torch.Tensor) else v for k, v in st.items()
            }
        out["state"] = state
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        had_differentiable = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not had_differentiable:  # torch's __setstate__ adds it; it is not an option here
            self.defaults.pop("differentiable", None)
        for k, v in (("backend", "auto"), ("master_weights", False), ("capturable", False),
                     ("carry_weight_norms", False), ("norms_in_backward", False), ("foreach", None),
                     ("fused", None)):  # fmt: skip
            self.__dict__.setdefault(k, v)
        self._reset_transient()
        self._bwd = None
        self._start_backward_norms()  # hooks on this copy's params
