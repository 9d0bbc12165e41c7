"""Test machinery of the backends, kept out of the production modules.

* Triton program order: :data:`PROGRAM_ORDER` / :func:`install_program_order` run every launch of the
  ``triton`` backend with its programs reversed or shuffled in Triton's interpreter (a GPU runs them in any
  order; tests/test_triton_order.py requires the natural order's bits).
* :func:`launch_plan`: what one Triton step launches and reads, from the tile geometry alone
  (tests/test_triton_backend.py checks it against the launches and loads counted in the interpreter).
* Ahead-of-time compilation of the Triton kernels without a GPU (:func:`aot_specializations`,
  :func:`aot_compile`): tests/test_triton_aot.py and bench/triton_aot_report.py. Must run in a process
  where TRITON_INTERPRET is not set.

The CUDA-on-CPU emulation of csrc/cuda is tests/cuda_emu.py (it builds and loads a library of its own).
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile

import torch

from .backends import option_fields
from .backends import triton as tb
from .backends.codes import BIAS, MOM, MOM_NONE

# ------------------------------------------------------------------------------------------
# Triton program order (interpreter only)
# ------------------------------------------------------------------------------------------
#: The order in which the *interpreter* runs the programs of every launch that goes through
#: :func:`launch` (installed by :func:`install_program_order`): ``None`` (natural order, the default),
#: ``"reversed"``, ``"shuffled"`` (a new permutation per launch, seeded by :data:`ORDER_SEED`), or a
#: callable ``n -> permutation of range(n)``. A GPU runs programs in any order; tests use this to require
#: bitwise-equal results under other orders. Initialised from ``FUSEDLARS_TRITON_PROGRAM_ORDER`` (which
#: tests/conftest.py also reads, to install the hook for a whole run).
PROGRAM_ORDER = os.environ.get("FUSEDLARS_TRITON_PROGRAM_ORDER") or None
ORDER_SEED = 0
_order_launches = 0  # launches reordered so far (varies the shuffle from launch to launch)


def program_order(n: int, order=None) -> list[int]:
    """The order of program ids ``0..n-1`` that :data:`PROGRAM_ORDER` (or ``order``) asks for."""
    global _order_launches
    order = PROGRAM_ORDER if order is None else order
    if callable(order):
        perm = [int(i) for i in order(n)]
    elif order == "reversed":
        perm = list(range(n - 1, -1, -1))
    elif order == "shuffled":
        import random  # noqa: PLC0415

        perm = list(range(n))
        random.Random(f"{ORDER_SEED}/{_order_launches}/{n}").shuffle(perm)
        _order_launches += 1
    elif order in (None, "natural"):
        perm = list(range(n))
    else:
        raise ValueError(f"PROGRAM_ORDER must be None, 'natural', 'reversed', 'shuffled' or a callable, not {order!r}")
    if sorted(perm) != list(range(n)):
        raise ValueError(f"program order {order!r} is not a permutation of range({n})")
    return perm


def launch_reordered(k, grid: int, args, kwargs) -> None:
    """Run one interpreted launch with its program ids visited in ``program_order(grid)``.

    NOTE: [Program order in the interpreter] Triton 3.9's interpreter runs a launch as
    ``for x in range(grid[0]): interpreter_builder.set_grid_idx(x, 0, 0); fn(**args)`` and
    ``tl.program_id`` returns the index last set. We shadow ``set_grid_idx`` on that builder
    instance for the duration of the launch and map the loop's x to ``perm[x]``: the kernels,
    their signatures and the launch count stay exactly as in production, and the launch's
    argument copies happen once. (The alternative, a program-id offset argument and one
    ``grid=(1,)`` launch per program, would add an argument to every production kernel and
    copy every argument's storage once per program.) The hook checks that the interpreter
    did call it once per program in loop order; if a future Triton iterates the grid another
    way, the launch raises instead of silently running in natural order.
    """
    from triton.runtime import interpreter as _interp  # noqa: PLC0415

    builder = _interp.interpreter_builder
    perm = program_order(grid)
    seen: list[int] = []
    real = type(builder).set_grid_idx

    def set_grid_idx(x, y, z):
        seen.append(x)
        real(builder, perm[x], y, z)

    saved = builder.__dict__.get("set_grid_idx")
    builder.set_grid_idx = set_grid_idx
    try:
        k[(grid,)](*args, **kwargs)
    finally:
        if saved is None:
            del builder.set_grid_idx
        else:
            builder.set_grid_idx = saved
    if seen != list(range(grid)):
        raise RuntimeError(
            "PROGRAM_ORDER: Triton's interpreter did not iterate the grid through interpreter_builder.set_grid_idx "
            f"once per program in order (saw {seen[:8]}... for {grid} programs); the order hook must be updated"
        )


def launch(kernel, grid: int, *args, **constexprs) -> None:
    """The ``triton`` backend's ``_launch`` with the programs in :data:`PROGRAM_ORDER` (installed over it by
    :func:`install_program_order`; in natural order it is the backend's own launch)."""
    if PROGRAM_ORDER is None or PROGRAM_ORDER == "natural":
        _backend_launch(kernel, grid, *args, **constexprs)
        return
    if grid == 0:
        return
    if not tb._interpreting():
        raise RuntimeError("PROGRAM_ORDER (a test hook) reorders programs only in Triton's interpreter")
    launch_reordered(kernel, grid, args, dict(num_warps=tb.NUM_WARPS, **constexprs))


_backend_launch = tb._launch


def install_program_order(monkeypatch) -> None:
    """Route the ``triton`` backend's launches through :func:`launch` for the test (``monkeypatch``: pytest's)."""
    monkeypatch.setattr(tb, "_launch", launch)


# ------------------------------------------------------------------------------------------
# launch plan
# ------------------------------------------------------------------------------------------
def launch_plan(
    seg_numels,
    kind: str = "LARS",
    max_grad_norm: bool = False,
    *,
    given_grad_sums: bool = False,
    tile: int | None = None,
    sblock: int | None = None,
    rblock: int | None = None,
) -> dict:
    """What one step over a bucket whose segments have ``seg_numels`` elements launches and reads,
    from the tile geometry alone (nothing is allocated: a 1e9-element layer is fine).

    Returns ``launches`` (kernel name, grid) in launch order, ``num_tiles``, ``partial_reads``
    (tile partial records read per step; each record is the tile's 3 fp32 sums, read once, by the
    program that reduces its segment), ``max_reduction_iters`` (the longest serial reduction:
    ``cdiv(tiles, RBLOCK)`` iterations for the largest segment), ``partial_rows`` (fp32 sums per record).
    ``given_grad_sums``: a LARS step from gradient sums taken in backward (``lars_step_given_grad_sums``:
    launch 1 sums the weights alone, records of 1 fp32). Assumes every segment is active.
    """
    tile = tb.TILE if tile is None else tile
    sblock = tb.SBLOCK if sblock is None else sblock
    rblock = tb.RBLOCK if rblock is None else rblock
    tiles = [-(-int(n) // tile) for n in seg_numels]
    num_tiles = sum(tiles)
    grid = num_tiles + -(-len(tiles) // sblock)
    if kind == "LAMB":
        launches = [("lamb_moments_kernel", grid), ("lamb_update_kernel", grid)]
        if max_grad_norm and num_tiles:
            launches.insert(0, ("grad_sumsq_kernel", num_tiles))
    elif kind == "LARS":
        launch1 = "lars_wsums_kernel" if given_grad_sums else "lars_partials_kernel"
        launches = [(launch1, grid), ("lars_update_kernel", grid)]
    else:
        raise ValueError(f"kind must be 'LARS' or 'LAMB', not {kind!r}")
    # launch 1: the last tile program of segment s to arrive reads [seg_tile_ptr[s], seg_tile_ptr[s+1]) once;
    # launch 2 reads the segment's reduced sums, no partials
    partial_reads = sum(tiles)
    return dict(
        launches=launches,
        num_tiles=num_tiles,
        partial_reads=partial_reads,
        partial_rows=1 if given_grad_sums and kind == "LARS" else 3,
        max_reduction_iters=max((-(-t // rblock) for t in tiles), default=0),
    )


# ------------------------------------------------------------------------------------------
# ahead-of-time compilation of the Triton kernels (no GPU needed)
# ------------------------------------------------------------------------------------------
_TRITON_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
#: Triton type of the kernels' pointer arguments that do not point at fp32
_PTR_TYPES = {"addr_ptr": "*i64", "plan_ptr": "*i64", "count_ptr": "*i32", "pidx_ptr": "*i64", "dopts_ptr": "*fp64",
              "seed": "i64"}  # fmt: skip


def _signature(kernel) -> dict[str, str]:
    """Triton type of every argument of ``kernel`` as the backend launches it (the param dtype itself is the
    constexpr ``PDT``: params, grads and state are reached through the int64 address table ``addr_ptr``;
    ``opts`` is the kind's tuple of fp32 options, one per row of its table in backends/option_fields.py)."""
    fn = kernel.fn if hasattr(kernel, "fn") else kernel
    kind = fn.__name__.split("_")[0].upper()
    sig = {}
    for name in inspect.signature(fn).parameters:
        if name.isupper():
            sig[name] = "constexpr"
        elif name == "opts":
            sig[name] = ("fp32",) * len(option_fields.TABLES[kind])
        elif (name == "part_ptr" and fn.__name__ == "grad_sumsq_kernel") or name == "g2_ptr":
            sig[name] = "*fp64"
        elif "lowbit" in fn.__name__ and name == "lr_ptr":  # a float lr is a float64 scalar there (_f64_lr)
            sig[name] = "*fp64"
        elif "lowbit" in fn.__name__ and name in ("work_ptr", "clip_ptr"):  # the float64 scratch
            sig[name] = "*fp64"
        else:
            sig[name] = _PTR_TYPES.get(name, "*fp32")
    return sig


def aot_specializations(covering: bool = False) -> list[dict]:
    """Every (kernel, dtype, constexprs) this backend can launch with the module's tile geometry.

    ``covering=True``: a subset that still compiles every kernel for every param dtype and
    every value of every constexpr (MOM, BC, HAS_MASTER) at least once.
    """
    if tb.K is None:
        return []
    geo = dict(GEO=tuple(tb._geometry()))  # (TILE, BLOCK, RBLOCK, SBLOCK)
    layouts = [(dt, False) for dt in _TRITON_DT] + [(torch.float16, True), (torch.bfloat16, True)]
    out = []

    def add(kernel, dtype, **cx):
        cx = dict(PDT=tb._pdt(tb._PDT_CODE[dtype]), **cx)  # the param dtype, a constexpr (pointers come from the table)
        out.append(
            dict(
                kernel=kernel,
                name=kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__,
                dtype=dtype,
                constexprs=cx,
            )
        )

    if covering:  # fp32 with every MOM / BC value, fp16 without and bf16 with master weights
        layouts = [(torch.float32, False), (torch.float16, False), (torch.bfloat16, True)]
    for dt, master in layouts:
        add(tb.K.lars_partials_kernel, dt, HAS_MASTER=master, **geo)
        add(tb.K.lars_wsums_kernel, dt, HAS_MASTER=master, **geo)
        for mom in (MOM_NONE, *MOM.values()):
            if covering and dt != torch.float32 and mom != MOM["classic" if master else "torch"]:
                continue
            add(tb.K.lars_update_kernel, dt, HAS_MASTER=master, MOM=mom, **geo)
        for bc in BIAS.values():
            if covering and dt != torch.float32 and bc != BIAS["first_outside" if master else "both"]:
                continue
            add(tb.K.lamb_moments_kernel, dt, HAS_MASTER=master, BC=bc, **geo)
            add(tb.K.lamb_update_kernel, dt, HAS_MASTER=master, BC=bc, **geo)
    for dt in _TRITON_DT:
        add(tb.K.grad_sumsq_kernel, dt, **geo)
    # low-bit LARS (issue #26): fp32 params, bf16 with fp32 or remainder masters, fp16 with fp32 masters, half
    # params without masters; STORE 0: bf16 momentum, 1: int8 (with momentum only: without, there is no state)
    forms = ((torch.float32, 0), (torch.bfloat16, 1), (torch.bfloat16, 2), (torch.float16, 1), (torch.float16, 0),
             (torch.bfloat16, 0))  # fmt: skip
    for dt, master in forms:
        add(tb.K.lars_lowbit_partials_kernel, dt, HAS_MASTER=master != 0, MASTER=master, **geo)
        for mom in (MOM_NONE, *MOM.values()):
            for store in (0, 1) if mom != MOM_NONE else (0,):
                if covering and ((mom == MOM_NONE) != (master == 0) or store != (master == 2)):
                    continue
                add(tb.K.lars_lowbit_update_kernel, dt, HAS_MASTER=master != 0, MASTER=master, MOM=mom, STORE=store,
                    **geo)  # fmt: skip
    # low-bit LAMB: the same param forms; STORE 0 bf16, 1 int8, 2 fp32 moments (beside remainder masters only)
    lamb_cover = {(torch.float32, 0, 1, BIAS["both"]), (torch.bfloat16, 1, 0, BIAS["none"]),
                  (torch.bfloat16, 2, 1, BIAS["first_outside"]), (torch.bfloat16, 2, 2, BIAS["both"]),
                  (torch.float16, 1, 1, BIAS["both"]), (torch.bfloat16, 0, 0, BIAS["first_outside"])}  # fmt: skip
    for dt, master in forms:
        for store in (0, 1, 2) if master == 2 else (0, 1):
            for bc in BIAS.values():
                if covering and (dt, master, store, bc) not in lamb_cover:
                    continue
                for k in (tb.K.lamb_lowbit_partials_kernel, tb.K.lamb_lowbit_update_kernel):
                    add(k, dt, MASTER=master, STORE=store, BC=bc, **geo)
    return out


#: the kernels the backend launches with ``enable_fp_fusion=False`` (triton._NO_FMA)
_NO_FMA_KERNELS = ("lars_lowbit_partials_kernel", "lars_lowbit_update_kernel", "lamb_lowbit_partials_kernel",
                   "lamb_lowbit_update_kernel")  # fmt: skip


def aot_compile(spec: dict, arch: int) -> dict:
    """Compile one specialization for ``GPUTarget("cuda", arch, 32)``; registers, spills, shared memory."""
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    if tb.K.INTERPRET:
        raise RuntimeError("aot_compile needs a process without TRITON_INTERPRET (kernels are interpreted here)")
    sig = _signature(spec["kernel"])
    src = ASTSource(fn=spec["kernel"], signature=sig, constexprs=dict(spec["constexprs"]))
    options = {"num_warps": tb.NUM_WARPS}
    if spec["name"] in _NO_FMA_KERNELS:  # launched without FMA contraction (triton._NO_FMA)
        options["enable_fp_fusion"] = False
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    res = dict(
        kernel=spec["name"],
        dtype=str(spec["dtype"]).replace("torch.", ""),
        arch=arch,
        constexprs={k: v for k, v in spec["constexprs"].items() if k in ("HAS_MASTER", "MASTER", "MOM", "BC", "STORE")},
        triton_shared=int(ck.metadata.shared),
        ptx_chars=len(ck.asm["ptx"]),
        cubin_bytes=len(ck.asm["cubin"]),
    )
    # the synchronization the kernel was compiled with (NOTE [Last-arriving program] in the kernels):
    # its atomic instructions, whether a CTA barrier sits between its last global store and each
    # atomic, and its L1-bypassing loads
    ptx = ck.asm["ptx"]
    res["atomics"] = sorted(set(re.findall(r"\b(?:atom|red)\.[\w.:]+", ptx)))
    res["barrier_before_atomics"] = all(
        "bar.sync" in ptx[ptx.rfind("st.global", 0, m.start()) : m.start()] for m in re.finditer(r"\batom\.", ptx)
    )
    res["cg_loads"] = len(re.findall(r"\bld\.global\.cg\b", ptx))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        r = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", r.stdout)
    if not m:
        raise RuntimeError(f"cannot read resource usage of {spec['name']} sm_{arch}: {r.stdout} {r.stderr}")
    res.update(regs=int(m.group(1)), stack=int(m.group(2)), static_shared=int(m.group(3)), spill_bytes=int(m.group(4)))
    return res
