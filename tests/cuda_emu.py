"""Run csrc/cuda's kernels on the CPU: build them under the SIMT emulation (csrc/emu) and drive them
through the real ``fusedlars.backends.cuda`` backend.

* :func:`build` rewrites the six ``kernel<<<grid, block, smem, stream>>>(args)`` launches of
  ``csrc/cuda/fused_kernels.cu`` into ``::fusedlars_emu::Launcher(grid, block, smem, stream)(kernel, args)``
  (nothing else of the source changes; ``#line`` keeps the messages pointing at the original lines),
  compiles it with g++ together with ``csrc/emu/emu_abi.cpp`` under UBSan into a shared library, and
  caches it by content hash under ``build/cuda_emu/`` (or ``FUSEDLARS_EMU_BUILD_DIR``).
  ``FUSEDLARS_EMU_SOURCE`` replaces the kernel source (the mutation check,
  ``scripts/cuda_emu_mutants.py``, builds each mutant this way).
* :class:`EmuOps` has the signatures of ``torch.ops.fusedlars.{lars,lamb}_step_cuda`` (the step ops'
  from the backend's own parameter list, ``fusedlars.backends.cuda.step_params``) /
  ``grad_sumsq_cuda`` / ``cuda_info`` and takes CPU tensors. It poisons the step's scratch (per-tile
  partials, snapshots, the split's per-segment sums) with NaN before every launch, so a kernel that
  reads a partial it did not write in this step shows as NaN instead of reusing last step's value.
  The kernels reach params, grads and state through the address table (raw addresses of the CPU
  tensors): an inactive segment's address 0 that a kernel dereferenced would crash the process.
* :func:`install` points ``fusedlars.backends.cuda`` at an :class:`EmuOps` and at CPU tensors, so
  ``LARS(..., backend="cuda")`` runs the whole host path of the backend (option packing, tile and
  group tables, scratch, launch path choice) and the kernels, on CPU tensors.
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNELS = CSRC / "cuda" / "fused_kernels.cu"
SELFTEST = CSRC / "emu" / "selftest_kernels.cu"
EMU_FILES = sorted((CSRC / "emu").rglob("*.h")) + [
    CSRC / "emu" / "emu_control.cpp",
    CSRC / "cuda" / "launch.h",
    CSRC / "lars_math.h",
    CSRC / "option_decode.h",
    CSRC / "option_fields.h",
]
#: what each emulation library is made of: (kernel source with <<<>>> launches, plain C++ sources)
LIBS = {
    "kernels": (KERNELS, [CSRC / "emu" / "emu_abi.cpp", CSRC / "emu" / "emu_control.cpp"]),
    "selftest": (SELFTEST, [CSRC / "emu" / "emu_control.cpp"]),
}

# name<<<config>>>( -> ::fusedlars_emu::Launcher(config)(name,
LAUNCH_RE = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>();]*>)?)\s*<<<([^\n]*?)>>>\s*\(")

FLAGS = [
    "-std=c++17",
    "-O1",
    "-g",
    "-fPIC",
    "-shared",
    "-pthread",
    "-fno-strict-aliasing",
    "-U_FORTIFY_SOURCE",
    "-D_FORTIFY_SOURCE=0",
    "-Wall",
    "-Wno-unknown-pragmas",
    "-Wno-unused-function",
]
UBSAN = ["-fsanitize=undefined", "-fno-sanitize-recover=all"]

# launch.h Variant
VARIANTS = {
    (torch.float32, False): 0,
    (torch.bfloat16, False): 1,
    (torch.bfloat16, True): 2,
    (torch.float16, False): 3,
    (torch.float16, True): 4,
}
PATHS = {1: "cooperative", 2: "two_launch", 3: "partials", 4: "apply"}
#: launch.h kPathGivenG2: the flag on a LARS path whose grads' sums of squares are given
GIVEN_G2 = 8


class EmulationError(RuntimeError):
    """A launch stopped by the emulation (divergent barrier, deadlock, grid.sync outside a cooperative launch ...)."""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")


def rewrite(src: str) -> tuple[str, int]:
    """The kernel source with every ``<<<...>>>`` launch rewritten; returns (text, launches rewritten)."""
    return LAUNCH_RE.subn(lambda m: f"::fusedlars_emu::Launcher({m.group(2)})({m.group(1)}, ", src)


def build(
    source: Path | None = None, *, kind: str = "kernels", sanitize: bool = True, out_root: Path | None = None
) -> Path:
    """Build (or reuse) an emulation library: ``kind`` "kernels" (csrc/cuda, or ``source`` /
    FUSEDLARS_EMU_SOURCE in its place) or "selftest" (csrc/emu/selftest_kernels.cu). Raises RuntimeError
    with the compiler output on failure."""
    original, extra = LIBS[kind]
    if kind == "kernels":
        source = source or os.environ.get("FUSEDLARS_EMU_SOURCE")
    source = Path(source or original).resolve()
    text, n = rewrite(source.read_text())
    if n == 0:
        raise RuntimeError(f"{source}: no <<<...>>> launch found to rewrite")
    text = f'#line 1 "{original.relative_to(ROOT)}"\n' + text
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH: the CUDA-on-CPU emulation needs one")
    flags = FLAGS + (UBSAN if sanitize else [])
    h = hashlib.sha256(text.encode())
    for f in EMU_FILES + extra:
        h.update(f.read_bytes())
    h.update(" ".join([cxx] + flags).encode())
    out_root = out_root or Path(os.environ.get("FUSEDLARS_EMU_BUILD_DIR") or ROOT / "build" / "cuda_emu")
    out_dir = out_root / h.hexdigest()[:16]
    lib = out_dir / f"libfusedlars_emu_{kind}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / f"{original.stem}_emu.cpp"
    src.write_text(text)
    tmp = out_dir / f"lib.{os.getpid()}.so"
    cmd = [
        cxx,
        *flags,
        "-I",
        str(CSRC / "emu" / "include"),
        "-I",
        str(CSRC / "cuda"),
        "-I",
        str(CSRC),
        str(src),
        *map(str, extra),
        "-o",
        str(tmp),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"emulation build failed ({' '.join(cmd)}):\n{r.stderr[-6000:]}")
    os.replace(tmp, lib)
    return lib


class Lib:
    """The loaded emulation library."""

    def __init__(self, path: Path) -> None:
        self.path = path
        L = ctypes.CDLL(str(path))
        self.L = L
        L.emu_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
        L.emu_counters.argtypes = [ctypes.POINTER(ctypes.c_long)]
        L.emu_error_text.restype = ctypes.c_char_p
        self.device = dict(sms=4, blocks_per_sm=2, coop=True, seed=0)
        if not hasattr(L, "emu_lars_step"):  # the selftest library
            return
        vp, i64p = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64)
        dp, ip = ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int)
        for name in ("emu_lars_step", "emu_lamb_step"):
            fn = getattr(L, name)
            fn.argtypes = [vp, i64p, dp, ctypes.c_int64, i64p, ctypes.c_int64, ctypes.c_double, ctypes.c_int, ip]
            fn.restype = ctypes.c_int
        L.emu_grad_sumsq.argtypes = [vp, i64p]
        L.emu_why.restype = ctypes.c_char_p
        self.slots = L.emu_slots()
        self.ints = L.emu_ints()

    def configure(self, *, sms: int = 4, blocks_per_sm: int = 2, coop: bool = True, seed: int = 0) -> None:
        """The emulated device: SM count, resident blocks per SM, cooperative launch support; the schedule seed."""
        self.device = dict(sms=sms, blocks_per_sm=blocks_per_sm, coop=coop, seed=seed)
        self.L.emu_configure(sms, blocks_per_sm, int(coop), seed)

    def reset(self) -> None:
        self.L.emu_reset()

    def counters(self) -> dict[str, int]:
        """Launches and cooperative launches since the last reset (every step resets), blocks of the last one."""
        out = (ctypes.c_long * 3)()
        self.L.emu_counters(out)
        return {"launches": out[0], "coop_launches": out[1], "last_grid": out[2]}

    def error_text(self) -> str:
        return self.L.emu_error_text().decode()


def _ptr(t: torch.Tensor | None, name: str) -> int:
    if t is None:
        return 0
    if t.device.type != "cpu":
        raise ValueError(f"emulated CUDA op: {name} must be a CPU tensor, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"emulated CUDA op: {name} must be contiguous")
    return t.data_ptr()


def _is_double(t: torch.Tensor | None) -> int:
    return int(t is not None and t.dtype == torch.float64)


#: state dtypes besides float32 that each low-bit input allows (ops_cuda.cpp check_lists)
_LOWBIT_DTYPES = {"storage1": torch.bfloat16, "storage2": torch.uint8, "remainder": torch.int16}


def _check_lists(params, grads, state, addresses, S: int, min_rows: int, allowed=()) -> torch.dtype:
    """The checks of csrc/cuda/ops_cuda.cpp check_lists / check_common on the lists and the address table."""
    if len(params) != S or S == 0:
        raise RuntimeError(f"fusedlars cuda: {S} segments but {len(params)} params")
    dt = params[0].dtype
    if any(t.dtype != dt or t.device.type != "cpu" for t in params):
        raise RuntimeError(f"fusedlars cuda: every param must be {dt}")
    if len(grads) > S or any(t.dtype != dt or t.device.type != "cpu" for t in grads):
        raise RuntimeError(f"fusedlars cuda: at most {S} grads, every one {dt}")
    if any(t.dtype not in (torch.float32, *allowed) or t.device.type != "cpu" for t in state):
        raise RuntimeError("fusedlars cuda: master weights and state must be float32 (or the low-bit formats)")
    if (
        addresses.dtype != torch.int64
        or addresses.dim() != 2
        or addresses.shape[1] != S
        or not min_rows <= addresses.shape[0] <= 8
    ):
        raise RuntimeError(
            f"fusedlars cuda: the address table must be int64 [{min_rows}..8, {S}], got "
            f"{addresses.dtype} {tuple(addresses.shape)}"
        )
    return dt


#: the step ops' arguments in emu_abi.cpp's slot order (clip_coef, LAMB only, follows)
_SLOT_ARGS = (
    "addresses", "wd_mask", "adapt_mask", "active", "has_state", "step", "w_norm", "g_norm", "u_norm",
    "trust_ratio", "tile_seg", "tile_start", "tile_len", "seg_tile_ptr", "group_seg", "partials", "snap", "ssq",
    "lr_tensor", "inv_scale", "found_inf",
)  # fmt: skip


def _step_op(kind: str):
    """EmuOps' method for ``kind``'s step op: the op's parameters (fusedlars.backends.cuda.step_params,
    the same list the backend packs its call from), by position or name, defaults applied."""
    from fusedlars.backends import cuda as K

    P = inspect.Parameter
    sig = inspect.Signature(
        [P("self", P.POSITIONAL_OR_KEYWORD)]
        + [P(n, P.POSITIONAL_OR_KEYWORD, default=K.STEP_DEFAULTS.get(n, P.empty)) for n in K.step_params(kind)]
    )

    def op(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        del a["self"]
        self._step(kind, a)

    op.__signature__ = sig
    op.__name__ = op.__qualname__ = K.STEP_OPS[kind]
    return op


class EmuOps:
    """Stand-in for ``torch.ops.fusedlars`` (the CUDA ops) over CPU tensors."""

    def __init__(self, lib: Lib, *, poison: bool = True) -> None:
        self.lib = lib
        self.poison = poison
        self.last = None  # (path, grid) of the last step

    def _run(self, fn, slots: list, ints: list[int], hyper, modes, lr: float, path: int) -> None:
        t = (ctypes.c_void_p * self.lib.slots)(*[_ptr(x, f"slot {i}") for i, x in enumerate(slots)])
        n = (ctypes.c_int64 * self.lib.ints)(*ints)
        h = (ctypes.c_double * len(hyper))(*[float(x) for x in hyper])
        m = (ctypes.c_int64 * len(modes))(*[int(x) for x in modes])
        out = (ctypes.c_int * 3)()
        self.lib.reset()
        rc = fn(t, n, h, len(hyper), m, len(modes), float(lr), int(path), out)
        if rc == -1:
            raise ValueError(f"emulated CUDA op: wrong option list lengths ({len(hyper)} hyper, {len(modes)} modes)")
        why = self.lib.L.emu_why().decode()
        if why:
            raise RuntimeError(f"fusedlars cuda: cooperative launch requested but unavailable: {why}")
        err = self.lib.error_text()
        if rc != 0 or err:
            raise EmulationError(f"emulated CUDA launch failed (cudaError {out[2]}): {err or 'no emulation message'}")
        self.last = (PATHS.get(out[0], "none"), out[1])

    def _step(self, kind: str, a: dict) -> None:
        """One step op of ``kind`` on the arguments ``a`` (by parameter name, fusedlars.backends.cuda.step_params)."""
        S = a["wd_mask"].numel()
        # rows param, grad, master, then LARS's momentum buffer (packing.lars_options: hyper[0] is the
        # momentum) or LAMB's exp_avg, exp_avg_sq (ops_cuda.cpp)
        min_rows = 5 if kind == "LAMB" else 4 if float(a["hyper"][0]) != 0.0 else 3
        storage, remainder = int(a["storage"]), bool(a["remainder"])
        allowed = tuple(
            _LOWBIT_DTYPES[k] for k in (f"storage{storage}", "remainder" * remainder) if k in _LOWBIT_DTYPES
        )
        dt = _check_lists(a["params"], a["grads"], a["state"], a["addresses"], S, min_rows, allowed)
        if (storage or remainder) and (a["param_ids"] is None or a["param_ids"].numel() != S):
            raise RuntimeError("fusedlars cuda: low-bit state needs param_ids (int64 [S])")
        path, ssq, partials, snap = a["path"], a["ssq"], a["partials"], a["snap"]
        # path: launch.h Path, + GIVEN_G2 where the grads' sums taken in backward are given (ssq: [S]
        # on a whole step, row 1 of the output on the partials path)
        base, given = path & ~GIVEN_G2, bool(path & GIVEN_G2)
        if base not in (0, 1, 2, 3, 4) or (given and (base == 4 or kind == "LAMB")):
            raise RuntimeError(f"fusedlars cuda: path {path} is not a {kind} path")
        if (base in (3, 4) or given) != (ssq is not None):
            raise RuntimeError("fusedlars cuda: ssq is given exactly for path 3 (partials), 4 (apply) and +8")
        if ssq is not None and (ssq.dtype != torch.float64 or ssq.numel() != (S if given and base < 3 else 3 * S)):
            raise RuntimeError("fusedlars cuda: ssq must be float64 [3, S] ([S] for given grad sums)")
        if self.poison:
            # a kernel must write every partial it reads in the same step; the apply launch of the split
            # reads the snapshots the partials launch took (not the partials) and the given sums
            partials.fill_(float("nan"))
            if base != 4:
                snap.fill_(float("nan"))
            if base == 3:
                ssq[0 if given else slice(None)].fill_(float("nan"))  # row 1 holds the given grad sums
                ssq[2].fill_(float("nan"))
        # emu_abi.cpp's slots and ints
        slots = [a[n] for n in _SLOT_ARGS] + [a.get("clip_coef"), a["param_ids"] if storage or remainder else None]
        ints = [
            VARIANTS[(dt, bool(a["master"]))],
            a["tile_start"].numel(),
            S,
            a["group_seg"].numel(),
            a["addresses"].shape[0],
            *(_is_double(a[n]) for n in ("lr_tensor", "inv_scale", "found_inf")),
            _is_double(a.get("clip_coef")),
            storage,
            int(remainder),
            int(a["seed"]),
        ]
        fn = self.lib.L.emu_lamb_step if kind == "LAMB" else self.lib.L.emu_lars_step
        self._run(fn, slots, ints, a["hyper"], a["modes"], a["lr"], path)

    lars_step_cuda = _step_op("LARS")
    lamb_step_cuda = _step_op("LAMB")

    def grad_sumsq_cuda(self, grads, addresses, active, tile_seg, tile_start, tile_len, gpart, inv_scale):
        S = active.numel()
        if addresses.dtype != torch.int64 or addresses.dim() != 2 or addresses.shape[1] != S or addresses.shape[0] < 2:
            raise RuntimeError("fusedlars cuda: the address table must be int64 [rows >= 2, S]")
        if self.poison:
            gpart.fill_(float("nan"))
        out = torch.full((), float("nan"), dtype=torch.float64)
        slots = [None] * self.lib.slots
        slots[0], slots[3], slots[10], slots[11], slots[12] = addresses, active, tile_seg, tile_start, tile_len
        slots[15], slots[17], slots[19] = gpart, out, inv_scale
        t = (ctypes.c_void_p * self.lib.slots)(*[_ptr(x, f"slot {i}") for i, x in enumerate(slots)])
        dt = grads[0].dtype if grads else torch.float32
        ints = [0] * self.lib.ints
        ints[0], ints[1], ints[2], ints[4], ints[6] = (
            VARIANTS[(dt, False)],
            tile_start.numel(),
            S,
            addresses.shape[0],
            _is_double(inv_scale),
        )
        n = (ctypes.c_int64 * self.lib.ints)(*ints)
        self.lib.reset()
        rc = self.lib.L.emu_grad_sumsq(t, n)
        err = self.lib.error_text()
        if rc != 0 or err:
            raise EmulationError(f"emulated grad_sumsq launch failed (cudaError {rc}): {err}")
        return out

    def cuda_info(self) -> str:
        d = self.lib.device
        lp = PATHS.get(self.lib.L.emu_last_path(), "none")
        return (
            f"archs=emulated;devices=1;device=0;name=SIMT emulation;sm=0;coop={int(d['coop'])};"
            f"sms={d['sms']};blocks_per_sm={d['blocks_per_sm']};last_path={lp}"
        )

    def build_info(self) -> str:
        return "emulated+cuda"


def install(monkeypatch, lib: Lib, *, l2_bytes: int | None = None, poison: bool = True) -> EmuOps:
    """Point ``fusedlars.backends.cuda`` at the emulation for the duration of a test."""
    from fusedlars.backends import cuda as K
    from fusedlars.backends.config import check_fused

    ops = EmuOps(lib, poison=poison)
    monkeypatch.setattr(K, "_ops", lambda: ops)
    # the backend's checks, for the CPU tensors the emulated kernels run on
    monkeypatch.setattr(
        K, "supports", lambda kind, cfg, bucket: check_fused(kind, cfg, bucket, "cpu", "CUDA", K._SCALAR_DTYPES)
    )
    monkeypatch.setattr(K, "_WHY_NOT", None)
    if l2_bytes is not None:
        monkeypatch.setattr(K, "_l2_bytes", lambda device: l2_bytes)
    monkeypatch.setattr(K, "available", lambda: (True, f"CUDA kernels under the SIMT emulation ({lib.path.name})"))
    return ops
