"""Placement over devices and the itemized VRAM breakdown. Pure Python, stdlib only, bytes everywhere.

This module knows nothing about a quant format. A format module (``optimizer.formats.exl2``)
describes a loaded model as a :class:`MemoryPlan`: the GPU modules in load order with their weight,
scratch and transient bytes, the KV-cache bytes per attention layer, the per-device staging and
RoPE tables. :func:`place` then assigns modules to devices the way the engine does and returns a
:class:`VramVerdict` with one :class:`DeviceBreakdown` per device.

Split modes (:class:`Split`):
    * ``single``: every module on device 0 (ExLlamaV2 ``model.load()`` without a split).
    * ``manual``: ExLlamaV2 ``model.load(gpu_split=[...])``; ``gpu_split`` is GiB (2**30 bytes) per
      device for weights and fixed buffers, excluding the cache, placed greedily exactly as
      ``ExLlamaV2.set_device_map`` does.
    * ``auto``: ExLlamaV2 ``model.load_autosplit(cache)``, simulated module by module: a module and
      its cache layer go on the current device unless, with the device's reserves held, its test
      forward would not fit; then loading moves on to the next device.

Worked example (Smaug-34B exl2 3.0bpw-h6, one 15 GB = 13.97 GiB device, FP16 cache at the default
200 000 tokens): weights 12.0 GiB, cache 200000 x 60 layers x 2 x 8 heads x 128 x 2 B = 45.8 GiB,
so ``fits`` is False long before scratch, RoPE and the CUDA context (see ``optimizer.formats.exl2``).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field, replace

from optimizer.memplan import MemoryPlan, ModuleCost, ModuleKind, ModuleTable

__all__ = ["MIB", "GIB", "AUTOSPLIT_MIN_RESERVE", "MemoryPlan", "ModuleCost", "ModuleKind", "ModuleTable", "Split",
           "DeviceBreakdown", "VramVerdict", "place", "range_breakdown", "manual_need", "with_margin"]

MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class Split:
    """How modules are spread over GPUs.

    ``mode`` is ``"single"``, ``"manual"`` (``gpu_split`` = GiB per device, as ExLlamaV2 takes it)
    or ``"auto"`` (``n_devices`` GPUs, ExLlamaV2 autosplit with ``reserve_bytes`` per device).
    """

    mode: str = "single"
    n_devices: int = 1
    gpu_split: tuple[float, ...] = ()
    reserve_bytes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("single", "manual", "auto"):
            raise ValueError(f"unknown split mode {self.mode!r}")
        if self.mode == "manual":
            object.__setattr__(self, "n_devices", len(self.gpu_split))
        if self.mode == "auto" and not self.reserve_bytes:
            reserve = (192 * MIB,) + (64 * MIB,) * (self.n_devices - 1)
            object.__setattr__(self, "reserve_bytes", reserve)

    @property
    def device_count(self) -> int:
        """GPUs the split uses: 1 for ``single``, else ``n_devices`` (at least 1)."""
        return 1 if self.mode == "single" else max(self.n_devices, 1)

    @property
    def label(self) -> str:
        """Short label for tables and CSV: ``1gpu``, ``auto:2``, ``10,15``."""
        if self.mode == "single":
            return "1gpu"
        if self.mode == "auto":
            return f"auto:{self.n_devices}"
        return ",".join(f"{g:g}" for g in self.gpu_split)


#: ``load_autosplit`` holds this much on the device being filled while testing a module (bytes).
AUTOSPLIT_MIN_RESERVE = 256 * MIB


@dataclass(frozen=True)
class DeviceBreakdown:
    """Predicted memory of one device, in bytes. ``total`` is the peak during inference.

    ``margin`` is the safety margin kept free on a used device (``--margin``): it is not memory the
    engine allocates, so it is not part of ``total``, but ``fits`` and ``headroom`` count it.
    """

    index: int
    budget: int
    overhead: int = 0
    weights: int = 0
    cache: int = 0
    cache_staging: int = 0
    scratch: int = 0
    rope: int = 0
    transient: int = 0
    n_modules: int = 0
    n_kv_layers: int = 0
    margin: int = 0

    @property
    def total(self) -> int:
        return (self.overhead + self.weights + self.cache + self.cache_staging + self.scratch
                + self.rope + self.transient)

    @property
    def headroom(self) -> int:
        """Budget minus margin minus total (bytes); negative when the device does not fit."""
        return self.budget - self.margin - self.total

    @property
    def fits(self) -> bool:
        return self.total + self.margin <= self.budget


@dataclass(frozen=True)
class VramVerdict:
    """Result of :func:`place`: per-device breakdowns, whether everything fits, and why not."""

    devices: tuple[DeviceBreakdown, ...]
    placed: bool
    reason: str = ""
    extras: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def fits(self) -> bool:
        return self.placed and all(d.fits for d in self.devices)

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)

    @property
    def budget(self) -> int:
        return sum(d.budget for d in self.devices)

    @property
    def headroom(self) -> int:
        """Smallest headroom over the devices used (bytes)."""
        return min(d.headroom for d in self.devices)

    @property
    def peak_excess(self) -> int:
        """Largest ``total - budget`` over devices (<= 0 when everything fits)."""
        return max(d.total - d.budget for d in self.devices)


def place(*, plan: MemoryPlan, split: Split, budgets: tuple[int, ...], overhead_bytes: tuple[int, ...],
          margin_bytes: tuple[int, ...] = (0,)) -> VramVerdict:
    """Assign modules to devices as the engine would and return the per-device breakdown.

    Args:
        plan: the model as bytes (from a format module).
        split: single GPU, manual split or autosplit.
        budgets: usable bytes per device (one entry per device; a single entry is repeated).
        overhead_bytes: CUDA context / allocator overhead per device (same repetition rule).
        margin_bytes: safety margin to keep free on every used device (same repetition rule); it
            changes the verdict, not where the engine puts modules.

    Contract: the returned devices' parts add up to their ``total``; ``placed`` is False when the
    engine itself would refuse to load (autosplit "Insufficient VRAM for model and cache", or a
    manual split with too little room); ``fits`` additionally requires every device's peak
    (steady state plus the largest transient) to be within its budget.

    Cost: O(kinds) for one GPU and O(devices x kinds x log modules) for a split: each device takes
    the longest run of modules whose running requirement (monotone in the run's end) stays within
    its room, found by bisection over the plan's prefix sums.
    """
    n = split.device_count
    budgets, overheads = split_budgets(split, budgets, overhead_bytes)
    margins = expand_per_device(margin_bytes, n, "margin_bytes")
    if split.mode == "single":
        return _place_single(plan, budgets[0], overheads[0], margins[0])
    if split.mode == "manual":
        return _place_manual(plan, split, budgets, overheads, margins)
    if not any(margins):
        return _place_auto(plan, split, budgets, overheads, margins)
    # Autosplit measures the memory really free while loading, so an overhead larger than assumed
    # (by up to the margin) moves modules to later GPUs instead of failing the load. The answer must
    # hold both ways: with the overhead as assumed, and with the margin used up by overhead.
    nominal = _place_auto(plan, split, budgets, overheads, (0,) * n)
    if not nominal.fits:
        return nominal
    return _place_auto(plan, split, budgets, overheads, margins)


def unplaced(*, budgets: tuple[int, ...], overheads: tuple[int, ...], reason: str) -> VramVerdict:
    """A verdict for a configuration the engine cannot load at all (nothing placed), with the reason.

    ``budgets`` and ``overheads`` are bytes, one entry per device of the split (already expanded).
    """
    devs = tuple(DeviceBreakdown(index=i, budget=b, overhead=o) for i, (b, o) in enumerate(zip(budgets, overheads, strict=True)))
    return VramVerdict(devices=devs, placed=False, reason=reason)


def split_budgets(split: Split, budgets: tuple[int, ...], overheads: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``budgets`` and ``overheads`` (bytes; one entry, or one per GPU) expanded to the split's GPUs."""
    n = split.device_count
    return expand_per_device(budgets, n, "budgets"), expand_per_device(overheads, n, "overhead_bytes")


def expand_per_device(values: tuple[int, ...], n: int, what: str) -> tuple[int, ...]:
    """``values`` for ``n`` devices: a single entry repeated, or exactly ``n`` entries (else ValueError)."""
    if len(values) == 1:
        return tuple(values) * n
    if len(values) != n:
        raise ValueError(f"{what}: expected 1 or {n} values, got {len(values)}")
    return tuple(values)


def range_breakdown(plan: MemoryPlan, *, index: int, budget: int, overhead: int, start: int, end: int,
                    scratch: int | None = None, margin: int = 0) -> DeviceBreakdown:
    """The breakdown of a device holding modules ``[start, end)`` (bytes); ``scratch`` None = max over them.

    An empty range is an unused device (all zero). O(kinds).
    """
    if end <= start:
        return DeviceBreakdown(index=index, budget=budget)
    t, costs = plan.table, plan.costs
    kinds = t.kinds_in(start, end)
    n_kv = t.prefix_kv[end] - t.prefix_kv[start]
    return DeviceBreakdown(
        index=index,
        budget=budget,
        overhead=overhead,
        weights=t.prefix_w[end] - t.prefix_w[start],
        cache=n_kv * plan.cache_layer_bytes,
        cache_staging=plan.cache_staging_bytes if n_kv else 0,
        scratch=max(costs[k].scratch_bytes for k in kinds) if scratch is None else scratch,
        rope=plan.rope_bytes,
        transient=max(costs[k].transient_bytes for k in kinds),
        n_modules=end - start,
        n_kv_layers=n_kv,
        margin=margin,
    )


def _finish(devices: list[DeviceBreakdown], placed: bool, reason: str) -> VramVerdict:
    frozen = tuple(devices)
    if placed and not reason:
        over = [d for d in frozen if not d.fits]
        if over:
            d = over[0]
            keep = f" + {d.margin / GIB:.2f} GiB margin" if d.margin else ""
            reason = f"GPU {d.index} needs {d.total / GIB:.2f} GiB{keep} of {d.budget / GIB:.2f} GiB"
    return VramVerdict(devices=frozen, placed=placed, reason=reason)


def with_margin(verdict: VramVerdict, margin_bytes: tuple[int, ...]) -> VramVerdict:
    """``verdict`` with a safety margin on every used device (one entry, or one per device; bytes).

    For verdicts built elsewhere (a format that places layers itself); :func:`place` takes the
    margin directly.
    """
    if not any(margin_bytes):
        return verdict
    margins = expand_per_device(margin_bytes, len(verdict.devices), "margin_bytes")
    devices = [replace(d, margin=margins[i] if d.n_modules else 0) for i, d in enumerate(verdict.devices)]
    return _finish(devices, verdict.placed, verdict.reason)


def _place_single(plan: MemoryPlan, budget: int, overhead: int, margin: int) -> VramVerdict:
    return _finish([range_breakdown(plan, index=0, budget=budget, overhead=overhead, start=0, end=len(plan.table),
                                    margin=margin)], True, "")


def _place_manual(plan: MemoryPlan, split: Split, budgets: tuple[int, ...], overheads: tuple[int, ...],
                  margins: tuple[int, ...]) -> VramVerdict:
    """Mirror ``ExLlamaV2.set_device_map``: greedy, by planning sizes, within ``gpu_split`` GiB.

    A module goes on the current device when its weights plus the device's running maxima of
    ``scratch_space()`` and ``temp_attn_size()`` (itself included) fit in what is left of the
    device's allocation; otherwise loading moves on to the next device for good.
    """
    n_mod = len(plan.table)
    devices, start = [], 0
    for i, g in enumerate(split.gpu_split):
        room = int(g * GIB) - plan.plan_constant_bytes
        end = _manual_end(plan, start, room) if start < n_mod else start
        devices.append(range_breakdown(plan, index=i, budget=budgets[i], overhead=overheads[i], start=start, end=end,
                                       margin=margins[i]))
        start = end
    if start < n_mod:
        return _finish(devices, False, ("the --gpu-split allocation is too small for the weights and the buffers ExLlamaV2 reserves "
                                        "(it would stop with 'Insufficient space in device allocation')"))
    return _finish(devices, True, "")


def manual_need(plan: MemoryPlan, *, start: int, end: int) -> int:
    """What ``set_device_map`` needs free on one device to place modules ``[start, end)`` there (bytes).

    Their weights plus the largest ``scratch_space()`` and ``temp_attn_size()`` among them; 0 for
    an empty range. Module ``end - 1`` is placed exactly when the device's allocation (less the
    per-device constant) is at least this much.
    """
    if end <= start:
        return 0
    t, costs = plan.table, plan.costs
    kinds = t.kinds_in(start, end)
    return (t.prefix_w[end] - t.prefix_w[start] + max(costs[k].plan_bytes for k in kinds)
            + max(costs[k].plan_attn_bytes for k in kinds))


def _manual_end(plan: MemoryPlan, start: int, room: int) -> int:
    """First module from ``start`` that does not fit in ``room`` bytes (``len`` if all fit)."""
    t, costs, n_mod = plan.table, plan.costs, len(plan.table)
    firsts = sorted((t.next_of_kind(k, start), k) for k in t.present)
    firsts = [(p, k) for p, k in firsts if p < n_mod]
    scratch = attn = 0
    base = t.prefix_w[start]
    for i, (pos, k) in enumerate(firsts):
        # From ``pos`` to the next kind's first module the reserved maxima are constant, and the
        # requirement grows with the weights only: bisect the weight prefix sums.
        scratch = max(scratch, costs[k].plan_bytes)
        attn = max(attn, costs[k].plan_attn_bytes)
        seg_end = firsts[i + 1][0] if i + 1 < len(firsts) else n_mod
        x = bisect_right(t.prefix_w, room - scratch - attn + base, pos + 1, seg_end + 1)
        if x <= seg_end:
            return x - 1
    return n_mod


def _place_auto(plan: MemoryPlan, split: Split, budgets: tuple[int, ...], overheads: tuple[int, ...],
                margins: tuple[int, ...]) -> VramVerdict:
    """Mirror ``ExLlamaV2.load_autosplit``: fill device 0, move on when a module's test forward OOMs.

    A module (with its cache layer, and the device's staging buffers with its first one) stays on
    the current device when, with the global scratch, RoPE tables, the per-device reserve and the
    256 MiB minimum reserve held, its test-forward transient still fits. A device's margin is taken
    as overhead while placing (the pessimistic case) and kept apart in the breakdown.
    """
    t, costs, n_mod = plan.table, plan.costs, len(plan.table)
    scratch = max((costs[k].scratch_bytes for k in t.present), default=0)
    # Bytes that stay on a device up to and including module j: weights and cache layers.
    cl = plan.cache_layer_bytes
    held = [w + cl * kv for w, kv in zip(t.prefix_w, t.prefix_kv, strict=True)]
    kv_kinds = [k for k in t.present if t.kind_kv[k]]
    devices, start = [], 0
    for i in range(len(budgets)):
        end = start
        if start < n_mod:
            fixed = (overheads[i] + margins[i] + scratch + plan.rope_bytes + split.reserve_bytes[i]
                     + AUTOSPLIT_MIN_RESERVE)
            end = _auto_end(plan, held, kv_kinds, start, budgets[i] - fixed)
        devices.append(range_breakdown(plan, index=i, budget=budgets[i], overhead=overheads[i], start=start, end=end,
                                       scratch=scratch, margin=margins[i]))
        start = end
    if start < n_mod:
        return _finish(devices, False, "Insufficient VRAM for model and cache (autosplit ran out of GPUs)")
    return _finish(devices, True, "")


def _auto_end(plan: MemoryPlan, held: list[int], kv_kinds: list[int], start: int, room: int) -> int:
    """First module from ``start`` whose test forward does not fit in ``room`` bytes (``len`` if none)."""
    t, costs, n_mod = plan.table, plan.costs, len(plan.table)
    first_kv = min((t.next_of_kind(k, start) for k in kv_kinds), default=n_mod)
    end = n_mod
    # Two stretches: before the device's first cache layer, and from it on (staging buffers held).
    for lo, hi, staging in ((start, first_kv, 0), (first_kv, n_mod, plan.cache_staging_bytes)):
        limit = room + held[start] - staging
        for k in t.present:
            pos = t.positions[k]
            a, b = bisect_left(pos, lo), bisect_left(pos, min(hi, end))
            if a >= b:
                continue
            # held[j + 1] grows with j: the first module of this kind whose requirement exceeds the room.
            tt = costs[k].test_transient_bytes
            x = bisect_right(pos, limit - tt, a, b, key=lambda j: held[j + 1])
            if x < b:
                end = min(end, pos[x])
        if end < n_mod:
            return end
    return end
