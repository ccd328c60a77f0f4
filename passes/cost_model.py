"""When does horizontal merging pay? The launch-vs-copy cost rule used by :class:`HorizontalMerge`.

Merging N structurally equal ops from different models into one wide op saves N-1 kernel
launches per heavy op (conv, matmul, pooling, reduction, softmax, layer norm, embedding lookup: the
ops that stay kernels of their own after ``FuseOps``; elementwise epilogues fuse into them either
way), but may add copies: a ``concat`` where branches that read different values enter a merged
region, and a ``split`` where merged values leave it. The rule compares the two in microseconds:

    saved_us = kernel_overhead_us * (saved_kernels - added_kernels)
    copy_us  = sum over the added copies of bytes / bandwidth   # bytes read + written; bandwidth
               # is cached_copy_gbps up to cache_bytes per copy, copy_gbps above
    merge iff saved_kernels > added_kernels and saved_us >= copy_us

Wider kernels can also run faster than the sum of narrow ones (occupancy on GPUs, one pass over a
shared input); the rule ignores that gain on purpose, so "auto" merges only when the launch savings
alone pay for the copies. ``HorizontalMerge(mode="always")`` merges regardless.

Default numbers: for CPUs they were measured on the development machine with TVM's default
(untuned) schedules — one more kernel call through the Relax VM costs ~0.3 us (a chain of 50 tiny
kernels: 14 us), and a legalized ``split``/``concat`` moves ~80 GB/s (read + write) while a copy
fits in the cache (1 MB: 27 us) and ~12 GB/s beyond (16 MB: 2.5 ms). On that CPU the merged
kernels ran as fast as the separate ones (8 same-architecture CNNs at batch 1: 0.94x-1.04x, within
the run-to-run noise), so on CPUs "auto" is about launch overhead only. For GPUs the defaults are
the usual orders of magnitude (a launch ~5 us, copies ~200 GB/s on a Jetson-class board), not
measured here.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm

from gmorph_tvm.core.targets import resolve_target
from gmorph_tvm.errors import GmorphError


class MergeOptionError(GmorphError, ValueError):
    """HorizontalMerge or its cost model was given an invalid option."""


@dataclass(frozen=True)
class MergeCost:
    """What merging one region changes: kernels saved, kernels and bytes of copies added."""

    saved_kernels: int
    added_kernels: int
    copy_sizes: tuple[int, ...] = ()  # bytes read + written by each added concat / split

    @property
    def copy_bytes(self) -> int:
        return sum(self.copy_sizes)


@dataclass(frozen=True)
class MergeCostModel:
    """Launch overhead vs copy bandwidth of one target (see module docstring for the rule)."""

    kernel_overhead_us: float = 0.3
    copy_gbps: float = 12.0
    cached_copy_gbps: float = 80.0
    cache_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.kernel_overhead_us < 0 or self.copy_gbps <= 0 or self.cached_copy_gbps <= 0 or self.cache_bytes < 0:
            raise MergeOptionError(
                "MergeCostModel needs kernel_overhead_us >= 0, copy_gbps > 0, cached_copy_gbps > 0 and "
                f"cache_bytes >= 0, got {self.kernel_overhead_us}, {self.copy_gbps}, {self.cached_copy_gbps}, "
                f"{self.cache_bytes}"
            )

    def copy_us(self, nbytes: int) -> float:
        """Time of one copy moving ``nbytes`` (read + write)."""
        gbps = self.cached_copy_gbps if nbytes <= self.cache_bytes else self.copy_gbps
        return nbytes / (gbps * 1e3)

    def saved_us(self, cost: MergeCost) -> float:
        """Estimated net time saved (negative: merging is slower)."""
        launches = self.kernel_overhead_us * (cost.saved_kernels - cost.added_kernels)
        return launches - sum(self.copy_us(n) for n in cost.copy_sizes)

    def pays(self, cost: MergeCost) -> bool:
        """True when the saved launches cover the added copies (and at least one kernel is saved)."""
        return cost.saved_kernels > cost.added_kernels and self.saved_us(cost) >= 0.0

    @staticmethod
    def for_target(target: tvm.target.Target | dict | str | None) -> MergeCostModel:
        """Defaults for a target: CPU numbers for llvm (and None), GPU numbers for cuda/rocm/..."""
        if target is None:
            return MergeCostModel()
        tgt = target if isinstance(target, tvm.target.Target) else resolve_target(target)
        if tgt.kind.name in ("cuda", "rocm", "vulkan", "metal", "opencl"):
            return MergeCostModel(kernel_overhead_us=5.0, copy_gbps=200.0, cached_copy_gbps=200.0)
        return MergeCostModel()
