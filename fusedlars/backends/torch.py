"""Portable backend: pure PyTorch, ``torch._foreach_*`` over per-layer tensor lists.

The same math as :mod:`fusedlars.backends.reference` (which states the formulas), computed in the
state dtype (fp32, or fp64 for fp64 params) with a constant number of tensor operations per
bucket, whatever the number of layers (a foreach op counts once), and no host sync. The one
exception is on the CPU, where no op is a launch: there the sums of squares are one ``torch.dot``
per chunk, twice as fast as the foreach norms (NOTE [Norms on the CPU]).

The math is written against *lists of tensors*: per active segment its weight (the fp32 master,
or the param), grad, state buffers and scratch. The bucket supplies those lists (the user's
params and grads, the optimizer's state: ``param_tensors``, ``grad_tensors``, ``master_tensors``,
``state_tensors``), which segments are active (host side) and the per-segment masks
(``wd_mask``, ``adapt_mask``, ``has_state``, ``step``):

* per-layer sums of squares with ``torch._foreach_norm`` (on the CPU ``torch.dot``) over
  fixed-size chunks of every tensor, summed per layer in float64 (NOTE [Accurate norms]);
* per-layer scalars (trust ratio, momentum coefficients) computed on ``[S]`` vectors with
  ``torch.where`` guards, exactly as before, then handed to the foreach ops as lists of 0-dim
  tensors (one ``unbind`` per coefficient);
* in-place foreach updates of the state buffers and the weights: a full pass over the data per
  op, with persistent scratch buffers (no per-step allocation of model-sized tensors).

Segments without a grad this step are not in the lists at all (untouched). A GradScaler step
with ``found_inf`` is skipped without a host sync: the grads are copied into scratch and zeroed
there when ``found_inf`` is set (``masked_fill_``), every coefficient that would change a buffer
becomes its neutral value (``torch.where`` on the per-layer vectors), so the buffers are
rewritten with their own values. A segment without a grad adds 0 to the partial sums that a
sharded bucket all-reduces.

Costs (ResNet-50, fp32, CPU, defaults): LARS 3 dot passes (w.w, g.g, g.w: NOTE [Update norm from a
cross term]) + 4 in-place passes, LAMB 3 + 10; each foreach op is one ATen call per tensor (per
chunk for the norms). Measured side by side on a 2-core Ice Lake VM, two runs each: 3.3-3.6x (LARS) and 3.5-3.8x (LAMB)
the fused ``cpu`` step. A foreach op whose per-layer scalar is a
list of 0-dim tensors takes torch's per-tensor path on GPUs too (one kernel per tensor). On a CPU
shared with other processes, each per-tensor op over 32K elements is a parallel region that can
stall for a time slice: prefer fewer threads there.

It runs on any device torch supports and is the fallback when no fused kernel is built.

Low-bit state (issue #26: ``state_dtype`` bf16 / int8) takes a path of its own,
:mod:`fusedlars.backends.torch_lowbit` (the reference's step vectorized over the bucket, so that
the quantized state is the reference's bitwise). Remainder masters (``master_weights="remainder"``)
with fp32 state run here: the fp32 masters are rebuilt into a scratch list before the step and split
back into the bf16 params and their remainders after it, so the masters are those of
``master_weights=True`` bit for bit.
"""

from __future__ import annotations

import torch

from ..buckets import Bucket, same_order
from . import lowbit, torch_lowbit
from .config import LambConfig, LarsConfig
from .formulas import trust_clip, tv_phi_tensor

NAME = "torch"


def available() -> tuple[bool, str]:
    return True, f"pure PyTorch {torch.__version__}, torch._foreach_* over per-layer tensor lists"


def supports(kind: str, cfg, bucket: Bucket) -> str | None:
    """Every configuration runs here (the fallback of backend='auto'), except low-bit state of sharded
    (FSDP2) params, which no backend steps yet, or in a compiled step (the triton backend runs those)."""
    if bucket.lowbit_state and bucket.shard is not None and bucket.shard.shard_dims:
        return "low-bit optimizer state (state_dtype bf16/int8) of FSDP2-sharded params is not supported yet"
    if bucket.lowbit_state and torch.compiler.is_compiling():
        return "low-bit optimizer state (state_dtype bf16/int8) does not run in a compiled step yet"
    return None


#: the weights' norms are read at every step (NOTE [Carried weight norms] is the cpu backend's)
CARRIES_WEIGHT_NORMS = False


# NOTE: [Accurate norms]
# torch's CPU norm kernels accumulate fp32 in fp32 lanes: the relative error of a sum of squares
# grows with the tensor (measured on torch 2.13: ~1e-6 at 64K elements, 6e-6 at 2.4M, 3e-5 at
# 10M, 2e-3 at 100M; 9e-5 worst case over ResNet-50's tensors). Every tensor is therefore cut
# into chunks of _CHUNK elements (cached views), one foreach op takes the norms of all chunks, and
# their squares are added per layer in float64 (index_add_): 1.7e-6 relative worst case on
# ResNet-50's tensors (shifted to a nonzero mean), 4e-9 on 30M elements, for ~1.05x the time of
# one foreach norm. (64K chunks: 1.3e-6; 256K: 4e-6; 1M: 2.6e-5. Each chunk of more than 32K
# elements is one parallel region of the CPU kernel: fewer chunks also stall less on a busy machine.)
_CHUNK = 131072
_MAX_PATTERNS = 8  # sets of active segments whose lists are kept per bucket


class _Lists:
    """The tensors one step runs over: one entry per active segment (cached per bucket and set
    of active segments; the grads and every list whose tensors changed are re-read each step),
    the scratch buffers and the chunk tables of the norms."""

    def __init__(self, bucket: Bucket, idx: tuple[int, ...]) -> None:
        self.bucket = bucket
        self.idx = idx
        self.n = len(idx)
        self.sel = None if self.n == bucket.num_segments else torch.tensor(idx, dtype=torch.int64, device=bucket.device)
        self._key: tuple = ()
        self._scratch: dict[str, list[torch.Tensor]] = {}
        self._rows: dict[tuple[str, ...], torch.Tensor] = {}
        self.update()

    def update(self) -> None:
        """Re-read this step's tensors from the bucket. Chunk tables over the user's params, masters
        and state are kept while those tensors are the same objects; grads are new most steps."""
        b, idx = self.bucket, self.idx
        self.grads = [b.grad_tensors[i] for i in idx]
        params = [b.param_tensors[i] for i in idx]
        masters = [b.master_tensors[i] for i in idx] if b.master_tensors is not None else None
        #: master_weights="remainder": the int16 remainders; the masters are a scratch list rebuilt each step
        rems = [b.remainder_tensors[i] for i in idx] if b.remainder_tensors is not None else None
        if rems is not None:
            masters = self.scratch("m")
        state = {name: [lst[i] for i in idx] for name, lst in b.state_tensors.items()}
        key = (
            tuple(map(id, params))
            + (tuple(map(id, masters)) if masters else ())
            + (tuple(map(id, rems)) if rems else ())
            + tuple(id(t) for lst in state.values() for t in lst)
        )
        if key != self._key:
            self._key = key
            self.params, self.masters, self._state, self.remainders = params, masters, state, rems
            self._chunks: dict[tuple[str, ...], tuple[list[torch.Tensor], torch.Tensor]] = {}

    def state(self, name: str) -> list[torch.Tensor]:
        return self._state[name]

    def scratch(self, name: str) -> list[torch.Tensor]:
        """Per-segment views of a persistent scratch buffer of the state dtype."""
        lst = self._scratch.get(name)
        if lst is None:
            flat, views = _scratch(self.bucket, name)
            lst = self._scratch[name] = [views[i] for i in self.idx]
        return lst

    def weights_direct(self) -> bool:
        """Are the weights stepped in place (fp32 masters, or params of the state dtype)?"""
        return self.masters is not None or self.bucket.dtype == self.bucket.state_dtype

    def get(self, name: str) -> list[torch.Tensor]:
        """A list by name: 'w' the weights the math reads and updates (masters, params, or a
        state-dtype scratch copy), 'grads' the bucket's grads, 'g' / 'u' scratch."""
        if name == "grads":
            return self.grads
        if name == "w":
            if self.masters is not None:
                return self.masters
            if self.bucket.dtype == self.bucket.state_dtype:
                return self.params
        return self.scratch(name)

    def rows(self, names: tuple[str, ...]) -> torch.Tensor:
        """The row table of :meth:`chunks` (shapes only: built once, no views)."""
        table = self._rows.get(names)
        return table if table is not None else self.chunks(names)[1]

    def chunks(self, names: tuple[str, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(chunk views of every tensor of the lists ``names``, int64 row of each chunk in
        ``[len(names) * n]``) (NOTE [Accurate norms]). The rows depend only on the shapes and are
        cached; the views are cached unless they include the user's grads (new tensors most steps)."""
        hit = self._chunks.get(names)
        if hit is not None:
            return hit
        out: list[torch.Tensor] = []
        rows: list[int] = []
        for k, name in enumerate(names):
            for j, t in enumerate(self.get(name)):
                if t.numel() == 0:
                    continue
                cs = _flat(t).split(_CHUNK) if t.numel() > _CHUNK else (t,)
                out.extend(cs)
                rows.extend([k * self.n + j] * len(cs))
        table = self._rows.get(names)
        if table is None:
            table = self._rows[names] = torch.tensor(rows, dtype=torch.int64, device=self.bucket.device)
        if "grads" not in names:
            self._chunks[names] = (out, table)
        return out, table


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as a 1-D view in memory order (every list is dense: NOTE [Dense segments]
    in fusedlars/buckets.py), never a copy: the views of params and state are cached."""
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,))


def _same_layout(L: _Lists, a: str, b: str) -> bool:
    """Do the lists ``a`` and ``b`` hold every segment with the same strides (so that their memory-
    order views pair element with element)?"""
    return all(same_order(x, y) for x, y in zip(L.get(a), L.get(b)))


def _cache(bucket: Bucket) -> dict:
    return bucket.cache.setdefault(NAME, {})


def _scratch(bucket: Bucket, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cache = _cache(bucket).setdefault("scratch", {})
    hit = cache.get(name)
    if hit is None:
        flat = torch.zeros(sum(bucket.numels), dtype=bucket.state_dtype, device=bucket.device)
        views, off = [], 0
        # the param's strides (NOTE [Dense segments]): memory-order views of scratch and params pair up
        for n, p in zip(bucket.numels, bucket.param_tensors):
            views.append(flat[off : off + n].as_strided(p.shape, p.stride()))
            off += n
        hit = cache[name] = (flat, views)
    return hit


def _lists(bucket: Bucket) -> _Lists:
    """This step's lists (call once per step phase; re-reads the grads)."""
    key = bucket.active_idx
    plans = _cache(bucket).setdefault("lists", {})
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= _MAX_PATTERNS:  # grads present on ever-changing subsets: keep the newest
            del plans[next(iter(plans))]
        plan = plans[key] = _Lists(bucket, key)
    else:
        plan.update()
    return plan


def prepare(bucket: Bucket, kind: str, cfg=None) -> list[torch.Tensor]:
    """Build the bucket's lists, scratch and chunk tables now (a compiled step must not build them
    in its graph); returns the scratch buffers, so that they can be marked static."""
    L = _lists(bucket)
    if bucket.lowbit_state:  # torch_lowbit builds its tables at its first step
        return []
    names = ["g", "u"] + ([] if L.weights_direct() else ["w"]) + (["m"] if L.remainders is not None else [])
    for name in names:
        L.scratch(name)
    for name in bucket.state_tensors:
        L.state(name)
    if L.n:  # every combination _sumsq is called with
        for g in ("grads", "g"):
            for combo in (("w", g, "u"), ("w", g), (g,), ("w", "u", g)):
                L.chunks(combo)
        L.chunks(("w", "u"))
    return [_cache(bucket)["scratch"][name][0] for name in names]


# NOTE: [Norms on the CPU]
# On the CPU, torch._foreach_norm runs one reduction per chunk at ~8 GB/s here (torch 2.13, 2 threads,
# ResNet-50's tensors: 12.7 ms for one pass over 25.6M fp32 values), while torch.dot over the same
# chunks (BLAS) takes 6.7 ms, and 9.6 ms for a product of two lists. So CPU buckets of fp32/fp64
# lists take their sums of squares, and LARS its cross term g.w (NOTE [Update norm from a cross
# term]), as one torch.dot per chunk (a Python loop over ~320 chunks of ResNet-50: ~1 ms), summed
# per layer in float64 as above. Relative error against float64 sums, ResNet-50's tensors shifted to
# a nonzero mean: 1.5e-7 worst case (foreach norms: 1.1e-6). Other devices, bf16/fp16 lists and
# compiled steps (a graph of one op per chunk) keep the foreach norms: one op per list.
def _dots_ok(L: _Lists, names: tuple[str, ...]) -> bool:
    b = L.bucket
    return (
        b.device.type == "cpu"
        and ("grads" not in names or b.dtype in (torch.float32, torch.float64))
        and not torch.compiler.is_compiling()
    )


def _dots(L: _Lists, pairs: tuple[tuple[str, str], ...]) -> torch.Tensor:
    """Per-tensor sums of ``a * b`` for each pair of lists ``(a, b)``, as a float64 ``[len(pairs), n]``
    tensor (NOTE [Norms on the CPU])."""
    vals: list[torch.Tensor] = []
    for a, b in pairs:
        ca = L.chunks((a,))[0]
        cb = ca if b == a else L.chunks((b,))[0]
        vals.extend(torch.dot(_flat(x), _flat(y)) for x, y in zip(ca, cb))
    out = torch.zeros(len(pairs) * L.n, dtype=torch.float64, device=L.bucket.device)
    if vals:
        # the chunks' rows are those of the list names (a, ...) of the same shapes: NOTE [Accurate norms]
        out.index_add_(0, L.rows(tuple(a for a, _ in pairs)), torch.stack(vals).to(torch.float64))
    return out.view(len(pairs), L.n)


def _sumsq(L: _Lists, names: tuple[str, ...]) -> torch.Tensor:
    """Per-tensor sums of squares of the lists ``names`` as a float64 ``[len(names), n]`` tensor
    (NOTE [Accurate norms], NOTE [Norms on the CPU])."""
    if _dots_ok(L, names):
        return _dots(L, tuple((n, n) for n in names))
    chunks, rows = L.chunks(names)
    out = torch.zeros(len(names) * L.n, dtype=torch.float64, device=L.bucket.device)
    if chunks:
        # _foreach_norm rather than _foreach_powsum: dynamo traces it, and torch < 2.13 has it.
        # bf16 / fp16 chunks accumulate and return in fp32 (without dtype= the norm itself is rounded to
        # bf16: ~1e-3 relative, e.g. in LAMB's global clip coefficient); fp32 / fp64 chunks keep theirs.
        low = any(c.dtype in (torch.bfloat16, torch.float16) for c in chunks)
        norms = torch._foreach_norm(chunks, 2, dtype=torch.float32) if low else torch._foreach_norm(chunks)
        out.index_add_(0, rows, torch.stack(norms).to(torch.float64).square())
    return out.view(len(names), L.n)


def _scatter(L: _Lists, sums: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[k, n]`` per-active-segment values -> ``[k, S]`` (zero for inactive segments), in ``dtype``."""
    sums = sums.to(dtype)
    if L.sel is None:
        return sums
    out = torch.zeros((sums.shape[0], L.bucket.num_segments), dtype=dtype, device=sums.device)
    return out.index_copy_(1, L.sel, sums)


def _sel(L: _Lists, v: torch.Tensor) -> torch.Tensor:
    """An ``[S]`` vector's entries of the active segments."""
    return v if L.sel is None else v.index_select(0, L.sel)


def _per_seg(L: _Lists, v: torch.Tensor) -> list[torch.Tensor]:
    """An ``[S]`` vector as a list of 0-dim tensors, one per active segment (for the foreach ops)."""
    if L.sel is not None:
        v = v.index_select(0, L.sel)
    return list(v.unbind(0))


def _axpy(y: list[torch.Tensor], x: list[torch.Tensor], a) -> None:
    """y += a * x, ``a`` a Python float or a list of 0-dim tensors."""
    if isinstance(a, list):
        torch._foreach_addcmul_(y, x, a)
    else:
        torch._foreach_add_(y, x, alpha=a)


def _found(cfg) -> torch.Tensor | None:
    return None if cfg.found_inf is None else cfg.found_inf.reshape(()) != 0


def _grad_factor(cfg, sdt) -> torch.Tensor | float | None:
    """The factor the raw grad is multiplied by (inv_scale / clip_coef, negated for maximize), or None."""
    f = None
    if cfg.inv_scale is not None:
        f = cfg.inv_scale.reshape(()).to(sdt)
    clip = getattr(cfg, "clip_coef", None)
    if isinstance(clip, torch.Tensor):
        clip = clip.reshape(()).to(sdt)
    if clip is not None:
        f = 1.0 / clip if f is None else f / clip
    if cfg.maximize:
        f = -1.0 if f is None else -f
    return f


def _load_grad(L: _Lists, cfg, sdt, need_copy: bool = False) -> tuple[str, list[torch.Tensor]]:
    """The grads the math reads: the bucket's own when nothing is to be done to them, else a
    state-dtype scratch copy, scaled (inv_scale, clip, maximize) and zeroed when ``found_inf``."""
    found = _found(cfg)
    f = _grad_factor(cfg, sdt)
    if not need_copy and f is None and found is None and L.bucket.dtype == sdt:
        return "grads", L.grads
    G = L.scratch("g")
    torch._foreach_copy_(G, L.grads)
    if f is not None:
        torch._foreach_mul_(G, f)
    if found is not None:
        # NOTE: [Skipped steps] 0 * inf is nan: zero the grads themselves, so that neutral
        # coefficients (0, or 1 for a decay factor) leave every buffer bitwise unchanged.
        _scratch(L.bucket, "g")[0].masked_fill_(found, 0.0)
    return "g", G


def _load_weights(L: _Lists) -> list[torch.Tensor]:
    W = L.get("w")
    if L.remainders is not None and L.n:
        # the fp32 masters of master_weights="remainder", rebuilt bitwise (lowbit NOTE [Master split])
        m = lowbit.master_rebuild(_cat_flat(L.params), _cat_flat(L.remainders))
        torch._foreach_copy_([_flat(t) for t in W], list(m.split([t.numel() for t in W])))
    elif not L.weights_direct():
        torch._foreach_copy_(W, L.params)
    return W


def _store_weights(L: _Lists, W: list[torch.Tensor]) -> None:
    if L.remainders is not None:
        if L.n:  # split the new masters into the bf16 params and their remainders
            p, r = lowbit.master_split(_cat_flat(W))
            sizes = [t.numel() for t in W]
            torch._foreach_copy_([_flat(t) for t in L.params], list(p.split(sizes)))
            torch._foreach_copy_([_flat(t) for t in L.remainders], list(r.split(sizes)))
    elif W is not L.params:
        torch._foreach_copy_(L.params, W)


def _cat_flat(ts: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' elements in memory order, one after the other (one new tensor)."""
    return torch.cat([_flat(t) for t in ts])


def _keep_s(bucket: Bucket, cfg) -> torch.Tensor | None:
    """Per-segment keep [S] bool (no grad, or GradScaler found an inf), or None when nothing is kept."""
    if bucket.all_active and cfg.found_inf is None:
        return None
    keep_s = bucket.active == 0
    if cfg.found_inf is not None:
        keep_s = keep_s | (cfg.found_inf.reshape(()) != 0)
    return keep_s


def _finish(bucket: Bucket, keep_s, n_w, n_g, n_u, r) -> None:
    if keep_s is None:
        bucket.w_norm.copy_(n_w)
        bucket.g_norm.copy_(n_g)
        bucket.u_norm.copy_(n_u)
        bucket.trust_ratio.copy_(r)
        bucket.has_state.fill_(1.0)
        bucket.step.add_(1.0)
        return
    for dst, val in ((bucket.w_norm, n_w), (bucket.g_norm, n_g), (bucket.u_norm, n_u), (bucket.trust_ratio, r)):
        dst.copy_(torch.where(keep_s, dst, val))
    bucket.has_state.copy_(torch.where(keep_s, bucket.has_state, torch.ones_like(bucket.has_state)))
    bucket.step.add_((~keep_s).to(bucket.step.dtype))


def _neutral(found: torch.Tensor | None, v, neutral: float, dtype: torch.dtype):
    """``v`` (a float or a tensor of ``dtype``), or ``neutral`` where the step is skipped
    (``found``: a 0-dim bool tensor); a tensor of ``dtype`` then."""
    if found is None:
        return v
    if not isinstance(v, torch.Tensor):
        v = torch.full((), v, dtype=dtype, device=found.device)
    return torch.where(found, neutral, v)


# NOTE: [Partials and apply]
# Each step is split in two phases so that sharded buckets (FSDP2 / DTensor, see
# fusedlars.distributed) can sum the per-layer sums of squares over the ranks in between:
# ``*_partials`` returns ``(ssq [3, S], ctx)`` and ``*_apply(bucket, cfg, ssq, ctx)`` finishes
# the step from (possibly reduced) sums. ``*_step`` = apply(partials). Partials may already
# update what does not depend on the norms (LAMB's moments, decoupled decay) in place.


def lars_partials(bucket: Bucket, cfg: LarsConfig) -> tuple[torch.Tensor, tuple]:
    """Per-segment sums of squares ``[w², g², (g+λw)²]`` as one ``[3, S]`` tensor, and the step's context."""
    sdt = bucket.state_dtype
    L = _lists(bucket)
    if L.n == 0:
        return torch.zeros((3, bucket.num_segments), dtype=sdt, device=bucket.device), (None, None, None)
    W = _load_weights(L)
    gname, G = _load_grad(L, cfg, sdt)
    wd = cfg.weight_decay
    if wd != 0 and cfg.denominator != "norm_of_sum" and _dots_ok(L, ("w", gname)) and _same_layout(L, gname, "w"):
        # NOTE: [Update norm from a cross term]
        # Unless the ratio's denominator is ||g + lam*w|| (norm_of_sum), that norm is only reported
        # (u_norm), so it is not built: ||g + lam*w||^2 = ||g||^2 + 2 lam g.w + lam^2 ||w||^2 from
        # the per-chunk dots, in float64. Its relative error grows as g approaches -lam*w
        # (cancellation); an inf or NaN in g gives the inf or NaN of the direct sum. The update then
        # reads g and w (lars_apply: r*g + r*lam*w) instead of a scratch u: ResNet-50, fp32, CPU:
        # two passes fewer (copy, axpy) and one norm pass fewer, for one cross-product pass more.
        U = None
        ww, gg, gw = _dots(L, (("w", "w"), (gname, gname), (gname, "w"))).unbind(0)
        lam = _sel(L, bucket.wd_mask.to(torch.float64) * wd)
        uu = torch.addcmul(gg, lam, torch.addcmul(gw * 2.0, lam, ww)).clamp_min_(0.0)
        sums = torch.stack((ww, gg, torch.where(gg.isinf(), gg, uu)))  # inf in g: inf, as the direct sum
    elif wd != 0:
        U = L.scratch("u")
        torch._foreach_copy_(U, G)
        _axpy(U, W, _per_seg(L, wd * bucket.wd_mask) if bucket.any_wd_excluded else wd)
        sums = _sumsq(L, ("w", gname, "u"))
    else:
        U = G
        sums = _sumsq(L, ("w", gname))
        sums = torch.cat((sums, sums[1:2]))
    return _scatter(L, sums, sdt), (W, G, U)


def lars_step_given_grad_sums(bucket: Bucket, cfg: LarsConfig, g2: torch.Tensor) -> bool:
    """A LARS step whose gradients' sums of squares ``g2`` (float64 [S], raw grads) were taken in
    backward (fusedlars.backward_norms): the norms read the weights only, and the update reads g and w
    once. ``||g + lam*w||`` is not taken (its reported u_norm is NaN). False (nothing done) where the
    step scales the grads (GradScaler, maximize) or its ratio needs that norm (norm_of_sum), and for
    low-bit state (its step takes the reference's norms)."""
    out = lars_partials_given_grad_sums(bucket, cfg, g2)
    if out is None:
        return False
    lars_apply(bucket, cfg, *out)
    return True


def lars_partials_given_grad_sums(
    bucket: Bucket, cfg: LarsConfig, g2: torch.Tensor
) -> tuple[torch.Tensor, tuple] | None:
    """:func:`lars_partials` of a bucket whose gradients' sums of squares ``g2`` (float64 [S], raw grads;
    a sharded bucket's LOCAL ones, taken where FSDP2 set the reduce-scattered grads) are given
    (fusedlars.backward_norms): the weights' sums alone are taken here, the (g + lam*w)^2 row is NaN (not
    known without reading g; only reported, as u_norm). None (nothing done) where the step scales the
    grads, its ratio needs ||g + lam*w||, or the state is low-bit."""
    if bucket.lowbit_state:
        return None
    if cfg.denominator == "norm_of_sum" or _grad_factor(cfg, bucket.state_dtype) is not None or _found(cfg) is not None:
        return None
    sdt = bucket.state_dtype
    L = _lists(bucket)
    if L.n == 0:
        return None
    W = _load_weights(L)
    _, G = _load_grad(L, cfg, sdt)
    ww = _sumsq(L, ("w",))[0]
    gg = _sel(L, g2.to(device=bucket.device, dtype=torch.float64))
    sums = torch.stack((ww, gg, torch.full_like(ww, float("nan"))))
    return _scatter(L, sums, sdt), (W, G, G if cfg.weight_decay == 0 else None)


def lars_apply(bucket: Bucket, cfg: LarsConfig, ssq: torch.Tensor, ctx: tuple) -> None:
    """The LARS update from the per-segment sums of squares ``ssq`` (global ones for a sharded bucket)."""
    W, G, U = ctx
    sdt = bucket.state_dtype
    L = _lists(bucket)
    lr = cfg.lr.reshape(()).to(sdt) if isinstance(cfg.lr, torch.Tensor) else cfg.lr
    keep_s = _keep_s(bucket, cfg)
    found = _found(cfg)
    lam_s = cfg.weight_decay * bucket.wd_mask
    n_w_raw, n_g_raw, n_u_raw = ssq[0].sqrt(), ssq[1].sqrt(), ssq[2].sqrt()
    n_w = torch.clamp(n_w_raw, cfg.clamp_lo, cfg.clamp_hi)
    side_raw = n_u_raw if cfg.denominator == "norm_of_sum" else n_g_raw
    side = torch.clamp(side_raw, cfg.clamp_lo, cfg.clamp_hi)
    den = side + lam_s * n_w + cfg.eps if cfg.denominator == "sum_of_norms" else side + cfg.eps
    ratio = cfg.eta * n_w / den
    if cfg.tv is not None:
        phi = tv_phi_tensor(bucket.step.to(sdt), *cfg.tv)
        ratio = ratio * phi
    if cfg.zero_norm_check == "raw_grad":
        ok = (n_w_raw > 0) & (n_g_raw > 0)
    elif cfg.zero_norm_check == "update":
        ok = (n_w_raw > 0) & (side_raw > 0)
    else:
        ok = (n_w_raw > 0) & (den > 0)
    one = torch.ones_like(ratio)
    adapt = bucket.adapt_mask != 0 if cfg.adapt_enabled else torch.zeros_like(ok)
    lam_eff_s = lam_s
    if cfg.zero_norm == "one":
        r_adapt = trust_clip(torch.where(ok, ratio, one), cfg, lr)
    else:
        r_adapt = torch.where(ok, trust_clip(ratio, cfg, lr), one)
        if cfg.weight_decay != 0:
            lam_eff_s = torch.where(ok | ~adapt, lam_s, torch.zeros_like(lam_s))
    r = torch.where(adapt, r_adapt, one)

    if L.n:
        # g' = sum of coef * X over terms (X, coef [S]): r*(g + lam_eff*w) (l2) or r*g
        if cfg.weight_decay_mode == "l2" and cfg.weight_decay != 0:
            terms = [(U, r)] if cfg.zero_norm == "one" and U is not None else [(G, r), (W, r * lam_eff_s)]
        else:
            terms = [(G, r)]
        mu, d = cfg.momentum, cfg.dampening
        coefs = []  # (X, [S] coefficient of X in W's update); buf's own coefficient apart
        buf_coef = None
        if mu != 0:
            buf = L.state("momentum_buffer")
            # NOTE: [Zero buffers] a segment's buffer is zero until its first step (zero at
            # build, written only by a step that also sets has_state), so mu*b needs no mask.
            if cfg.momentum_mode == "torch":
                if cfg.first_step_buffer == "clone" and d != 0:
                    hs = bucket.has_state
                    k = torch.where(hs != 0, torch.full_like(hs, 1.0 - d), torch.ones_like(hs))
                else:
                    k = 1.0 - d
                into_buf = [(X, c * k) for X, c in terms]
                if cfg.nesterov:
                    coefs = [(X, -(c * lr)) for X, c in terms]
                    buf_coef = -(lr * mu)
                else:
                    buf_coef = -lr
            else:  # classic: lr inside the buffer
                into_buf = [(X, c * lr) for X, c in terms]
                if cfg.nesterov:
                    coefs = [(X, -(c * lr)) for X, c in terms]
                    buf_coef = -mu
                else:
                    buf_coef = -1.0
            torch._foreach_mul_(buf, _neutral(found, mu, 1.0, sdt))
            for X, c in into_buf:
                torch._foreach_addcmul_(buf, X, _per_seg(L, _neutral(found, c, 0.0, sdt)))
        else:
            coefs = [(X, -(c * lr)) for X, c in terms]
        if cfg.weight_decay_mode == "decoupled" and cfg.weight_decay != 0:
            torch._foreach_mul_(W, _per_seg(L, _neutral(found, 1.0 - lam_eff_s * lr, 1.0, sdt)))
        # W's own term first: it reads the old weights (l2 with zero_norm='skip', no momentum)
        coefs.sort(key=lambda xc: xc[0] is not W)
        for X, c in coefs:
            torch._foreach_addcmul_(W, X, _per_seg(L, _neutral(found, c, 0.0, sdt)))
        if buf_coef is not None:
            bc = _neutral(found, buf_coef, 0.0, sdt)
            if isinstance(bc, torch.Tensor):
                torch._foreach_addcmul_(W, buf, [bc] * L.n)
            else:
                torch._foreach_add_(W, buf, alpha=bc)
        _store_weights(L, W)
    _finish(bucket, keep_s, n_w_raw, n_g_raw, n_u_raw, r)


def lars_step(bucket: Bucket, cfg: LarsConfig) -> None:
    if bucket.lowbit_state:
        return torch_lowbit.lars_step(bucket, cfg)
    ssq, ctx = lars_partials(bucket, cfg)
    lars_apply(bucket, cfg, ssq, ctx)


def grad_sumsq(bucket: Bucket, cfg) -> torch.Tensor:
    """Sum over active segments of ||grad * inv_scale||^2, as a float64 scalar."""
    L = _lists(bucket)
    if L.n == 0:
        return torch.zeros((), dtype=torch.float64, device=bucket.device)
    total = _sumsq(L, ("grads",)).sum()
    if cfg.inv_scale is not None:
        total = total * cfg.inv_scale.reshape(()).to(torch.float64).square()
    return total


def lamb_partials(bucket: Bucket, cfg: LambConfig) -> tuple[torch.Tensor, tuple]:
    """Per-segment sums of squares ``[w_d², u², g²]`` as one ``[3, S]`` tensor, and the step's context.
    Also updates the moments (and applies decoupled decay) in place: neither depends on the norms."""
    sdt = bucket.state_dtype
    L = _lists(bucket)
    if L.n == 0:
        return torch.zeros((3, bucket.num_segments), dtype=sdt, device=bucket.device), (None,) * 5
    lr = cfg.lr.reshape(()).to(sdt) if isinstance(cfg.lr, torch.Tensor) else cfg.lr
    found = _found(cfg)
    b1, b2 = cfg.beta1, cfg.beta2
    wd = cfg.weight_decay
    W = _load_weights(L)
    l2 = cfg.weight_decay_mode == "l2" and wd != 0
    gname, G = _load_grad(L, cfg, sdt, need_copy=l2)
    ssq_g = _sumsq(L, (gname,)) if l2 else None  # (l2 changes G below: its norm first)
    lam_s = wd * bucket.wd_mask
    if l2:
        _axpy(
            G, W, _per_seg(L, _neutral(found, lam_s, 0.0, sdt)) if found is not None or bucket.any_wd_excluded else wd
        )
    m_buf, v_buf = L.state("exp_avg"), L.state("exp_avg_sq")
    if cfg.beta3 == 1.0 - b1:
        # m + (1-b1)*(g - m): one pass instead of two (a skipped step has g = 0 and weight 0)
        wt = _neutral(found, 1.0 - b1, 0.0, sdt)
        torch._foreach_lerp_(m_buf, G, [wt] * L.n if isinstance(wt, torch.Tensor) else wt)
    else:
        torch._foreach_mul_(m_buf, _neutral(found, b1, 1.0, sdt))
        torch._foreach_add_(m_buf, G, alpha=cfg.beta3)
    torch._foreach_mul_(v_buf, _neutral(found, b2, 1.0, sdt))
    torch._foreach_addcmul_(v_buf, G, G, value=1.0 - b2)
    t = bucket.step.to(torch.float64) + 1
    # NOTE: bias corrections in float64: 1 - 0.999**t loses ~1e-5 relative in fp32.
    bc1_s = (1 - b1**t).to(sdt)
    U = L.scratch("u")
    # NOTE: [Folded bias correction] with eps_root = 0, u = (m/bc1) / (sqrt(v/bc2) + eps)
    # = s * m / (sqrt(v) + eps*sqrt(bc2)) with s = sqrt(bc2)/bc1 per layer: U holds u/s (two
    # passes fewer), its norm is scaled by s and s joins the update's coefficient.
    u_scale = None
    torch._foreach_copy_(U, v_buf)
    if cfg.bias_correction == "both" and not cfg.eps_root:
        sq2 = (1 - b2**t).sqrt()
        u_scale = (sq2 / (1 - b1**t)).to(sdt)
        torch._foreach_sqrt_(U)
        torch._foreach_add_(U, _per_seg(L, (cfg.eps * sq2).to(sdt)))
    elif cfg.bias_correction == "both":
        # sqrt(v/bc2 + eps_root) as sqrt(v + eps_root*bc2) / sqrt(bc2): v/bc2 overflows where v does not
        # (csrc/lars_math.h NOTE [Adam direction in range])
        bc2 = 1 - b2**t
        torch._foreach_add_(U, _per_seg(L, (cfg.eps_root * bc2).to(sdt)))
        torch._foreach_sqrt_(U)
        torch._foreach_div_(U, _per_seg(L, bc2.sqrt().to(sdt)))
        torch._foreach_add_(U, cfg.eps)
    else:
        if cfg.eps_root:
            torch._foreach_add_(U, cfg.eps_root)
        torch._foreach_sqrt_(U)
        torch._foreach_add_(U, cfg.eps)
    torch._foreach_reciprocal_(U)
    torch._foreach_mul_(U, m_buf)
    if cfg.bias_correction == "both" and u_scale is None:
        torch._foreach_div_(U, _per_seg(L, bc1_s))
    if cfg.bias_correction == "both_outside":
        # DeepSpeed's legacy step size: sqrt(1-b2^t)/(1-b1^t) outside the ratio, in float64 as above
        outside_s = ((1 - b2**t).sqrt() / (1 - b1**t)).to(sdt)
    else:
        outside_s = None
    if cfg.weight_decay_mode == "in_update" and wd != 0:
        if u_scale is None:
            _axpy(U, W, _per_seg(L, lam_s) if bucket.any_wd_excluded else wd)
        else:
            _axpy(U, W, _per_seg(L, lam_s / u_scale))
    if cfg.weight_decay_mode == "decoupled" and wd != 0:
        torch._foreach_mul_(W, _per_seg(L, _neutral(found, 1 - lr * lam_s, 1.0, sdt)))
    if l2:
        sums = torch.cat((_sumsq(L, ("w", "u")), ssq_g))
    else:
        sums = _sumsq(L, ("w", "u", gname))
    if u_scale is not None:
        sums[1].mul_(_sel(L, u_scale.to(torch.float64).square()))
    ssq = _scatter(L, sums, sdt)
    return ssq, (W, U, bc1_s, outside_s, u_scale)


def lamb_apply(bucket: Bucket, cfg: LambConfig, ssq: torch.Tensor, ctx: tuple) -> None:
    """The LAMB update from the per-segment sums of squares ``ssq`` (global ones for a sharded bucket)."""
    W, U, bc1_s, outside_s, u_scale = ctx
    sdt = bucket.state_dtype
    L = _lists(bucket)
    lr = cfg.lr.reshape(()).to(sdt) if isinstance(cfg.lr, torch.Tensor) else cfg.lr
    keep_s = _keep_s(bucket, cfg)
    found = _found(cfg)
    n_w_raw, n_u, n_g_raw = ssq[0].sqrt(), ssq[1].sqrt(), ssq[2].sqrt()
    n_w = torch.clamp(n_w_raw, cfg.clamp_lo, cfg.clamp_hi)
    one = torch.ones_like(n_w)
    ratio = torch.where((n_w > 0) & (n_u > 0), n_w / (n_u + cfg.trust_ratio_eps), one)
    adapt_on = cfg.adapt_enabled and not cfg.adam
    r = torch.where(bucket.adapt_mask != 0, trust_clip(ratio, cfg, lr), one) if adapt_on else one
    if L.n:
        if cfg.bias_correction == "first_outside":
            scale = r / bc1_s
        elif cfg.bias_correction == "both_outside":
            scale = r * outside_s
        else:
            scale = r
        if u_scale is not None:  # NOTE [Folded bias correction]
            scale = scale * u_scale
        torch._foreach_addcmul_(W, U, _per_seg(L, _neutral(found, -(scale * lr), 0.0, sdt)))
        _store_weights(L, W)
    _finish(bucket, keep_s, n_w_raw, n_g_raw, n_u, r)


def lamb_step(bucket: Bucket, cfg: LambConfig) -> None:
    if bucket.lowbit_state:
        return torch_lowbit.lamb_step(bucket, cfg)
    ssq, ctx = lamb_partials(bucket, cfg)
    lamb_apply(bucket, cfg, ssq, ctx)
