"""A loaded model reduced to bytes: the modules in load order and what each costs. Stdlib only.

A format module (``optimizer.formats.exl2``, ``optimizer.formats.gguf``) describes a model as a
:class:`MemoryPlan`; ``optimizer.vram.place`` spreads it over devices. The plan is stored as
columns, because the VRAM model evaluates thousands of (context, cache, split) points per second:

* :class:`ModuleTable`: names, weight bytes and a *kind* per module, with prefix sums. It depends
  only on the stored tensors, so a format builds it once per variant.
* :class:`ModuleKind`: the per-module costs that depend on the settings (scratch, transients,
  planning sizes); every module of a kind (e.g. every attention layer) shares them. A plan holds one
  per kind, so building a plan for a new context costs a handful of integers, not one object per module.

:class:`ModuleCost` is the row view (one module with its costs); ``MemoryPlan(modules=...)`` builds
the columns from rows and ``plan.modules`` gives the rows back.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate


@dataclass(frozen=True)
class ModuleKind:
    """Costs shared by every module of one kind, in bytes.

    Attributes:
        scratch_bytes: its ``scratch_space_fixed()``; a device's scratch is the max over its modules
            (manual split) or over all modules (autosplit).
        transient_bytes: peak short-lived memory while it forwards one chunk (activations, logits).
        plan_bytes: ``scratch_space()``; used only by the manual split to place modules as
            ``set_device_map`` does.
        plan_attn_bytes: ``temp_attn_size()`` (attention planning size), manual split only.
        load_transient_bytes: peak short-lived bytes of ``load_autosplit``'s test forward (one
            ``max_input_len`` chunk, batch 1, past_len 0), which decides the autosplit placement;
            None means the same as ``transient_bytes``.
    """

    scratch_bytes: int = 0
    transient_bytes: int = 0
    plan_bytes: int = 0
    plan_attn_bytes: int = 0
    load_transient_bytes: int | None = None

    @property
    def test_transient_bytes(self) -> int:
        """Transient bytes of the autosplit test forward (bytes)."""
        return self.transient_bytes if self.load_transient_bytes is None else self.load_transient_bytes


@dataclass(frozen=True)
class ModuleCost:
    """One GPU module in load order with its costs (bytes); the row view of a plan.

    ``kv_layer``: it owns one layer of KV cache (attention or parallel decoder). The other cost
    fields mean what they mean on :class:`ModuleKind`.
    """

    name: str
    weight_bytes: int
    scratch_bytes: int = 0
    transient_bytes: int = 0
    kv_layer: bool = False
    plan_bytes: int = 0
    plan_attn_bytes: int = 0
    load_transient_bytes: int | None = None

    @property
    def test_transient_bytes(self) -> int:
        """Transient bytes of the autosplit test forward (bytes)."""
        return self.transient_bytes if self.load_transient_bytes is None else self.load_transient_bytes

    @property
    def kind(self) -> ModuleKind:
        """Its costs without name, weight and cache flag."""
        return ModuleKind(self.scratch_bytes, self.transient_bytes, self.plan_bytes, self.plan_attn_bytes,
                          self.load_transient_bytes)


@dataclass(frozen=True)
class ModuleTable:
    """Modules in load order as columns. Weights in bytes; ``kinds[i]`` indexes the plan's costs.

    Attributes:
        names: module keys, e.g. ``model.layers.3.self_attn`` or ``lm_head``.
        weights: device bytes of each module's weights.
        kinds: kind index of each module (``0 <= kinds[i] < len(kind_kv)``).
        kind_kv: per kind, whether its modules own one layer of KV cache.

    Derived (not compared): ``prefix_w[i]`` = bytes of modules ``[0, i)``, ``prefix_kv[i]`` = cache
    layers among them, ``positions[k]`` = indices of kind ``k`` in order.
    """

    names: tuple[str, ...]
    weights: tuple[int, ...]
    kinds: tuple[int, ...]
    kind_kv: tuple[bool, ...]
    prefix_w: tuple[int, ...] = field(init=False, compare=False, repr=False)
    prefix_kv: tuple[int, ...] = field(init=False, compare=False, repr=False)
    positions: tuple[tuple[int, ...], ...] = field(init=False, compare=False, repr=False)
    present: tuple[int, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.names)
        if len(self.weights) != n or len(self.kinds) != n:
            raise ValueError("names, weights and kinds must have the same length")
        if any(k < 0 or k >= len(self.kind_kv) for k in self.kinds):
            raise ValueError("a module kind is out of range")
        if any(w < 0 for w in self.weights):
            raise ValueError("weights must not be negative")
        kv_flags = [1 if self.kind_kv[k] else 0 for k in self.kinds]
        pos: list[list[int]] = [[] for _ in self.kind_kv]
        for i, k in enumerate(self.kinds):
            pos[k].append(i)
        object.__setattr__(self, "prefix_w", tuple(accumulate(self.weights, initial=0)))
        object.__setattr__(self, "prefix_kv", tuple(accumulate(kv_flags, initial=0)))
        object.__setattr__(self, "positions", tuple(tuple(p) for p in pos))
        object.__setattr__(self, "present", tuple(k for k, p in enumerate(pos) if p))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def total_weight(self) -> int:
        """Bytes of every module's weights."""
        return self.prefix_w[-1]

    @property
    def n_kv(self) -> int:
        """Number of modules that own a KV-cache layer."""
        return self.prefix_kv[-1]

    def next_of_kind(self, kind: int, start: int) -> int:
        """Index of the first module of ``kind`` at or after ``start``; ``len(self)`` if none."""
        p = self.positions[kind]
        i = bisect_left(p, start)
        return p[i] if i < len(p) else len(self.names)

    def kinds_in(self, start: int, end: int) -> list[int]:
        """Kinds with at least one module in ``[start, end)``."""
        return [k for k in self.present if self.next_of_kind(k, start) < end]


@dataclass(frozen=True, init=False)
class MemoryPlan:
    """A model, a cache and settings, reduced to bytes. Produced by a format module.

    Build it from columns (``table=``, ``costs=``: one :class:`ModuleKind` per kind of the table) or
    from rows (``modules=``: :class:`ModuleCost` in load order, the embedding excluded).

    Attributes:
        table: the GPU modules in load order (the embedding, kept in system RAM, is excluded).
        costs: per kind of ``table``, the settings-dependent costs.
        cache_layer_bytes: KV cache bytes of one attention layer (K, V and scales).
        cache_staging_bytes: bytes every device holding cache layers adds once (FP16 staging
            buffers of quantized caches; 0 for FP16).
        rope_bytes: RoPE sin/cos tables allocated on every device that holds a module.
        plan_constant_bytes: what ``set_device_map`` subtracts from every manual-split device.
    """

    table: ModuleTable
    costs: tuple[ModuleKind, ...]
    cache_layer_bytes: int
    cache_staging_bytes: int
    rope_bytes: int
    plan_constant_bytes: int

    def __init__(
        self,
        modules: tuple[ModuleCost, ...] | None = None,
        cache_layer_bytes: int = 0,
        cache_staging_bytes: int = 0,
        rope_bytes: int = 0,
        plan_constant_bytes: int = 0,
        *,
        table: ModuleTable | None = None,
        costs: tuple[ModuleKind, ...] | None = None,
    ) -> None:
        if modules is not None:
            if table is not None or costs is not None:
                raise ValueError("give either modules or table and costs, not both")
            table, costs = _columns(modules)
        elif table is None or costs is None:
            raise ValueError("a MemoryPlan needs modules, or a table and its costs")
        if len(costs) != len(table.kind_kv):
            raise ValueError(f"the table has {len(table.kind_kv)} kinds but {len(costs)} costs were given")
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "costs", tuple(costs))
        object.__setattr__(self, "cache_layer_bytes", cache_layer_bytes)
        object.__setattr__(self, "cache_staging_bytes", cache_staging_bytes)
        object.__setattr__(self, "rope_bytes", rope_bytes)
        object.__setattr__(self, "plan_constant_bytes", plan_constant_bytes)

    @cached_property
    def modules(self) -> tuple[ModuleCost, ...]:
        """The row view: one :class:`ModuleCost` per module, in load order."""
        t, out = self.table, []
        for name, w, k in zip(t.names, t.weights, t.kinds, strict=True):
            c = self.costs[k]
            out.append(ModuleCost(name, w, c.scratch_bytes, c.transient_bytes, t.kind_kv[k], c.plan_bytes,
                                  c.plan_attn_bytes, c.load_transient_bytes))
        return tuple(out)


def _columns(modules: tuple[ModuleCost, ...]) -> tuple[ModuleTable, tuple[ModuleKind, ...]]:
    """Group rows into kinds by their costs (and cache flag)."""
    index: dict[tuple[ModuleKind, bool], int] = {}
    kinds: list[int] = []
    for m in modules:
        kinds.append(index.setdefault((m.kind, m.kv_layer), len(index)))
    table = ModuleTable(names=tuple(m.name for m in modules), weights=tuple(m.weight_bytes for m in modules),
                        kinds=tuple(kinds), kind_kv=tuple(kv for _, kv in index))
    return table, tuple(kind for kind, _ in index)
