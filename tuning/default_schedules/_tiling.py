"""Schedule building blocks shared by the default CPU rules (one home for each).

* :func:`vector_lanes`: floats per SIMD register of the target (``-mcpu``'s widest vector unit:
  AVX-512 16, AVX2 8, NEON 4), and :func:`vector_registers` (32 on AVX-512 and aarch64, else 16).
* :func:`tile_reduction`: the register-blocked schedule of a kernel with one reduction block (the
  "anchor": conv2d, matmul, pooling, a mean over non-innermost axes), its injective producers and
  an injective epilogue. The anchor's output axis that is contiguous in memory (its last index)
  is split into a vector tile ``vi`` (a multiple of the vector width where the extent allows) and
  a second spatial axis into a register tile ``bi``; the outer spatial loops are fused and run in
  parallel, the reduction loops go inside them and the ``bi x vi`` block of accumulators
  innermost (``bi`` unrolled, ``vi`` vectorised), written back through a small cache stage (or
  the epilogue, computed per tile). Layout-free weights (constants) whose last axis is not the
  vector axis, or whose rows are longer than a tile, are re-laid out so that one tile is
  contiguous (``[.., co, ..] -> [co // vi, .., co % vi]``, ``[K, N] -> [N // vi, K, N % vi]``) in a block
  annotated ``meta_schedule.layout_rewrite_preproc``: ``SplitLayoutRewritePreproc`` moves it out
  and ``FoldConstant`` runs it once at build time.
* :func:`schedule_injective`: parallel outer loops, vectorised innermost loop.

Schedules never change what is computed: only loop order, splits with divisors of the extents
(no padding, no predicates), the storage layout of constants, and cache stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from gmorph_tvm.tuning.shipped import target_arch

LAYOUT_REWRITE = "meta_schedule.layout_rewrite_preproc"
# Below this many output elements a kernel runs on one core: waking the pool costs more.
PARALLEL_MIN_ELEMENTS = 4096
PARALLEL_MIN_WORK = 32768  # ... and below this many multiply-adds for a reduction


def vector_bits(target: Target) -> int:
    """The widest SIMD register of ``target``'s CPU (``mcpu`` / ``mattr`` features): 512 with
    AVX-512, 256 with AVX / AVX2, else 128 (SSE, NEON, generic x86-64 without ``mcpu``).
    (``llvm_get_vector_width`` answers for the host CPU: 512 for a haswell target here.)"""
    from tvm.target.codegen import target_has_features

    if target_arch(target) not in ("x86_64", "aarch64"):
        return 128  # LLVM is asked only about CPUs it knows: a bad triple crashes it (no exception)

    def has(feature: str) -> bool:
        try:
            return bool(target_has_features(feature, target))
        except Exception:  # noqa: BLE001  # a feature LLVM does not know for this architecture
            return False

    if has("avx512f"):
        return 512
    if has("avx2") or has("avx"):
        return 256
    return 128


def vector_lanes(target: Target, dtype_bits: int = 32) -> int:
    """Lanes of ``dtype_bits`` per vector register of ``target`` (at least 2)."""
    return max(vector_bits(target) // dtype_bits, 2)


def vector_registers(target: Target) -> int:
    """SIMD registers to hold accumulators in: 32 with AVX-512 or on aarch64, else 16."""
    triple = str(target.attrs.get("mtriple", ""))
    if triple.startswith(("aarch64", "arm64")) or vector_bits(target) >= 512:
        return 32
    return 16


def _int(expr) -> int | None:
    return int(expr) if isinstance(expr, (int, tirx.IntImm)) else None


def _vars_of(expr) -> set:
    from tvm.tirx.analysis import undefined_vars

    return set(undefined_vars(expr))


def divisor_at_most(extent: int, limit: int, multiple_of: int = 1) -> int | None:
    """Largest divisor of ``extent`` that is <= ``limit`` and a multiple of ``multiple_of``."""
    for d in range(min(extent, limit), 0, -1):
        if extent % d == 0 and d % multiple_of == 0:
            return d
    return None


def vector_tile(extent: int, lanes: int) -> int:
    """The vector tile of an axis of ``extent``: a divisor, whole registers where possible (up to two)."""
    d = divisor_at_most(extent, 2 * lanes, lanes)  # one or two whole registers
    if d is not None:
        return d
    for multiple in (lanes // 2, lanes // 4):  # whole narrower registers (24 -> 8 on AVX-512)
        d = divisor_at_most(extent, lanes, multiple) if multiple >= 4 else None
        if d is not None:
            return d
    if extent <= 2 * lanes:
        return extent
    return divisor_at_most(extent, 2 * lanes) or 1


@dataclass
class Blocks:
    """A kernel split into its one reduction block and the injective blocks around it."""

    anchor: s_tir.schedule.SBlockRV
    others: list[s_tir.schedule.SBlockRV]


def _is_reduction(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _is_spatial(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def root_blocks(sch: s_tir.Schedule) -> list[s_tir.schedule.SBlockRV]:
    root = sch.get_sblock("root")
    return list(sch.get_child_blocks(root))


def single_reduction(sch: s_tir.Schedule) -> Blocks | None:
    """The kernel's only reduction block and the rest, or None (several reductions, nested blocks,
    opaque blocks, non-float output)."""
    try:
        blocks = root_blocks(sch)
    except Exception:  # noqa: BLE001  # no root block: not a plain s_tir kernel
        return None
    anchors = [b for b in blocks if _is_reduction(sch, b)]
    if len(anchors) != 1:
        return None
    others = [b for b in blocks if b is not anchors[0]]
    if not all(_is_spatial(sch, b) for b in others):
        return None
    if any(len(sch.get(b).writes) != 1 for b in blocks):
        return None
    return Blocks(anchors[0], others)


def _trivial_binding(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    loops = sch.get_loops(block)
    binding = _block_realize(sch, block)
    if binding is None or len(binding.iter_values) != len(loops):
        return False
    return all(
        isinstance(v, tirx.Var) and v.same_as(sch.get(loop).loop_var)
        for v, loop in zip(binding.iter_values, loops)
    )


def _block_realize(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV):
    loops = sch.get_loops(block)
    if not loops:
        return None
    body = sch.get(loops[-1]).body
    return body if isinstance(body, s_tir.SBlockRealize) else None


def inline_around(sch: s_tir.Schedule, blocks: Blocks, output_buffers: set) -> tuple[list, list]:
    """Inline every injective block into its consumer (producers of the anchor that copy, all
    epilogue blocks but the last). Returns (producers left, epilogue blocks left)."""
    changed = True
    while changed:
        changed = False
        for block in list(blocks.others):
            write = sch.get(block).writes[0].source
            if _member(write, output_buffers):
                continue
            if _is_pad(sch, block) and _feeds(sch, block, blocks.anchor):
                continue  # padding stays a stage: inlined it puts a branch in the inner loop
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001  # not inlinable (e.g. read by a reduction with a window)
                try:
                    sch.reverse_compute_inline(block)
                except Exception:  # noqa: BLE001
                    continue
            blocks.others.remove(block)
            changed = True
    anchor_out = sch.get(blocks.anchor).writes[0].source
    producers, epilogue = [], []
    for block in blocks.others:
        reads = {r.source for r in sch.get(block).reads}
        (epilogue if _member(anchor_out, reads) else producers).append(block)
    return producers, epilogue


def _one_epilogue_chain(sch: s_tir.Schedule, blocks: Blocks, outputs: set) -> bool:
    """Whether the kernel writes one output (the anchor's or its epilogue's)."""
    written = [sch.get(b).writes[0].source for b in [blocks.anchor, *blocks.others]]
    return sum(1 for w in written if _member(w, outputs)) == 1


def _same_extents(a, b) -> bool:
    """Whether buffers ``a`` and ``b`` have the same static shape."""
    ea, eb = [_int(d) for d in a.shape], [_int(d) for d in b.shape]
    return None not in ea and ea == eb


def _member(node, nodes) -> bool:
    """``node in nodes`` by identity (``==`` on TIR variables builds an expression)."""
    return any(node.same_as(n) for n in nodes)


def _is_pad(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    text = sch.get(block).body.script()  # this TVM has no Python statement visitor for s_tir
    return "if_then_else" in text or "T.Select" in text


def _feeds(sch: s_tir.Schedule, producer, consumer) -> bool:
    write = sch.get(producer).writes[0].source
    return any(r.source.same_as(write) for r in sch.get(consumer).reads)


def schedule_injective(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int, *, parallel: bool = True) -> None:
    """Vectorise the innermost loop of ``block`` (by a divisor of its extent) and run the fused
    outer loops in parallel when the block is big enough."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [_int(sch.get(loop).extent) for loop in loops]
    if any(e is None for e in extents):
        return
    total = 1
    for e in extents:
        total *= e
    inner = loops[-1]
    outer = list(loops[:-1])
    vec = vector_tile(extents[-1], lanes) if extents[-1] >= 2 else 1
    if 2 <= vec < extents[-1]:
        o, inner = sch.split(inner, [None, vec])
        outer.append(o)
    if vec >= 2:
        sch.vectorize(inner)
    if parallel and outer and total >= PARALLEL_MIN_ELEMENTS:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(fused)


def tile_reduction(sch: s_tir.Schedule, target: Target, *, allow_relayout: bool = True) -> bool:
    """Register-block the kernel's one reduction block (see the module docstring); False when the
    kernel does not have that shape (the schedule is then unusable: callers start afresh)."""
    blocks = single_reduction(sch)
    if blocks is None:
        return False
    func = sch.mod["main"]
    outputs = set(func.params)
    anchor = blocks.anchor
    stmt = sch.get(anchor)
    if not _trivial_binding(sch, anchor) or str(stmt.writes[0].source.dtype) not in ("float32", "float16", "float64"):
        return False
    bits = stmt.writes[0].source.dtype.bits
    lanes = vector_lanes(target, bits)
    registers = vector_registers(target)
    iters = list(stmt.iter_vars)
    loops = sch.get_loops(anchor)
    extents = [_int(iv.dom.extent) for iv in iters]
    if any(e is None for e in extents):
        return False
    write_idx = [r.min for r in stmt.writes[0].region]
    spatial = [i for i, iv in enumerate(iters) if iv.iter_type == tirx.IterVar.DataPar]
    reduce = [i for i, iv in enumerate(iters) if iv.iter_type == tirx.IterVar.CommReduce]
    var_pos = {iv.var: i for i, iv in enumerate(iters)}
    # The vector axis: the spatial iterator that is the output's last index.
    v = None
    for expr in reversed(write_idx):
        if isinstance(expr, tirx.Var) and expr in var_pos and var_pos[expr] in spatial and extents[var_pos[expr]] > 1:
            v = var_pos[expr]
            break
        if _int(expr) is None or len(_vars_of(expr)) > 0:
            break  # the last non-unit index is not a plain spatial iterator
    if v is None:
        return False
    # Vector loads along v need an input that is contiguous along it (or a constant to re-lay
    # out): a reduction over the innermost axis (softmax, layer norm) is a row reduction instead.
    free = {func.params[int(i)] for i in (func.attrs.get("layout_free_buffers") or [])} if func.attrs else set()
    if not any(
        (read.region and iters[v].var in _vars_of(read.region[-1].min))
        or (allow_relayout and _member(read.source, free) and any(iters[v].var in _vars_of(r.min) for r in read.region))
        for read in stmt.reads
    ):
        return False
    # The register-block axis: a spatial iterator of an input that does not read along v
    # (conv NHWC: the output column; conv NCHW: the output channel; matmul: the row), else the
    # output's next-to-last non-unit axis.
    b = None
    for read in stmt.reads:
        used = set().union(*(_vars_of(r.min) for r in read.region)) if read.region else set()
        if iters[v].var in used:
            continue
        for r in reversed(read.region):
            cand = [var_pos[x] for x in _vars_of(r.min) if x in var_pos and var_pos[x] in spatial and var_pos[x] != v
                    and extents[var_pos[x]] > 1]
            if cand:
                b = cand[0]
                break
        if b is not None:
            break
    if b is None:
        for expr in reversed(write_idx):
            if isinstance(expr, tirx.Var) and expr in var_pos and var_pos[expr] in spatial and var_pos[expr] != v \
                    and extents[var_pos[expr]] > 1:
                b = var_pos[expr]
                break
    if not _one_epilogue_chain(sch, blocks, outputs):
        return False
    producers, epilogue = inline_around(sch, blocks, outputs)
    if len(epilogue) != 1 and (epilogue or not _member(sch.get(anchor).writes[0].source, outputs)):
        raise ValueError("epilogue did not inline into one block")
    if epilogue and not _same_extents(sch.get(epilogue[0]).writes[0].source, sch.get(anchor).writes[0].source):
        # An epilogue that writes another shape (a zero pad the next conv could not absorb: the model's
        # output) cannot be computed per accumulator tile: its border is no tile's. Not this rule's.
        return False
    # Re-read after inlining: block statements are replaced by it.
    stmt = sch.get(anchor)
    vi = vector_tile(extents[v], lanes)
    vregs = -(-vi // lanes)
    rb = 1
    if b is not None:
        rb = divisor_at_most(extents[b], max((registers - 4) // vregs, 1)) or 1
    if allow_relayout:
        _relayout_weights(sch, anchor, func, iters[v].var, vi)
    loops = sch.get_loops(anchor)
    vb = 1
    if rb == 1 and reduce:
        # No second axis to block (a one-row matmul): several vector tiles of v accumulate at
        # once instead, so the multiply-adds do not wait on one register.
        vb = divisor_at_most(extents[v] // vi, min(8, max((registers - 4) // vregs, 1))) or 1
    if vb > 1:
        vo, bin_, vin = sch.split(loops[v], [None, vb, vi])
        bo, b, rb = None, None, vb
    else:
        vo, vin = sch.split(loops[v], [None, vi]) if vi < extents[v] else (None, loops[v])
        if b is not None and rb < extents[b]:
            bo, bin_ = sch.split(loops[b], [None, rb])
        elif b is not None:
            bo, bin_ = None, loops[b]
        else:
            bo = bin_ = None
    outer = []
    for i in spatial:
        if i == v:
            if vo is not None:
                outer.append(vo)
        elif i == b:
            if bo is not None:
                outer.append(bo)
        else:
            outer.append(loops[i])
    inner = [loops[i] for i in reduce] + ([bin_] if bin_ is not None else []) + [vin]
    sch.reorder(*outer, *inner)
    total = 1
    for e in extents:  # multiply-adds: a small output with a long reduction is worth the cores
        total *= e
    fused = None
    if outer:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if total >= PARALLEL_MIN_WORK:
            sch.parallel(fused)
    if epilogue:
        tail = epilogue[0]
        # A stack buffer of one tile's accumulators: LLVM keeps it in registers.
        sch.set_scope(anchor, 0, "local")
        if fused is not None:
            sch.reverse_compute_at(tail, fused, preserve_unit_loops=True)
        schedule_injective(sch, tail, lanes, parallel=False)
    elif fused is not None:
        tail = sch.cache_write(anchor, 0, "local")
        sch.reverse_compute_at(tail, fused, preserve_unit_loops=True)
        schedule_injective(sch, tail, lanes, parallel=False)
    if bin_ is not None and rb > 1:
        sch.unroll(bin_)
    if vi >= 2:
        sch.vectorize(vin)
    if reduce:
        # After vectorising: decompose_reduction copies the vector loop into the init block.
        first_r = sch.get_loops(anchor)[len(sch.get_loops(anchor)) - len(inner)]
        sch.decompose_reduction(anchor, first_r)
    for block in producers:
        schedule_injective(sch, block, lanes)
    return True


def _relayout_weights(sch: s_tir.Schedule, anchor, func: tirx.PrimFunc, v_var, vi: int) -> None:
    """Store each layout-free input of ``anchor`` read along ``v_var`` in a non-last axis with
    that axis split by ``vi`` and its inner part last (contiguous vector loads)."""
    free = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
    if not free:
        return
    free_buffers = {func.params[int(i)] for i in free}
    stmt = sch.get(anchor)
    for index, read in enumerate(stmt.reads):
        if not _member(read.source, free_buffers):
            continue
        region = [r.min for r in read.region]
        dims = [d for d, e in enumerate(region) if isinstance(e, tirx.Var) and e.same_as(v_var)]
        if len(dims) != 1:
            continue
        if any(v_var in _vars_of(e) for d, e in enumerate(region) if d != dims[0]):
            continue
        d = dims[0]
        shape = [_int(s) for s in read.source.shape]
        if shape[d] is None or shape[d] % vi != 0 or (d == len(region) - 1 and shape[d] == vi):
            continue  # (already one contiguous tile per row)
        cached = sch.cache_read(anchor, index, "global")
        sch.annotate(cached, LAYOUT_REWRITE, True)

        sch.transform_layout(anchor, ("read", index), _split_axis_last(d, vi))


def _split_axis_last(axis: int, factor: int):
    """Index map ``(.., i_axis, ..) -> (i_axis // factor, .., i_axis % factor)``."""

    def index_map(*idx):
        rest = [x for k, x in enumerate(idx) if k != axis]
        return [idx[axis] // factor, *rest, idx[axis] % factor]

    return index_map
