"""Multi-GPU splits that hold more than autosplit: a manual ``gpu_split`` or per-GPU autosplit reserves.

Autosplit fills GPU 0 as far as its load-time test forward allows, then the next GPU. Without
flash-attention the inference peak (SDPA's K/V copies over the whole context) is larger than that
test forward, so GPU 0 ends up over budget at run time however many GPUs follow. Both searches
below pack each GPU, in order, with the longest run of modules whose *run-time* total (weights,
cache layers, staging, scratch, RoPE, the largest transient and the overhead) fits its budget, and
then find the setting that makes ExLlamaV2 produce exactly that packing:

* :func:`best_manual_split`: ``gpu_split`` GiB per GPU for ``model.load(gpu_split)``; GPU i's
  allocation must let ``set_device_map`` place its last module but not the next one
  (:func:`optimizer.vram.manual_need`); a value from the middle of that range, with few decimals.
* :func:`best_reserves`: ``reserve_vram`` per GPU (whole MiB) for ``load_autosplit``; GPU i's
  reserve must let every test forward on it pass but stop at the next module (the middle of
  the reserves that do is taken; the last GPU used needs none).

Packing greedily in GPU order is optimal for contiguous placements whose per-GPU cost only grows
as the range grows; a packing the engine cannot be made to produce exactly is shortened by a
module at a time. Every answer is checked with :func:`optimizer.vram.place`. Pure, stdlib only.
"""

from __future__ import annotations

import math

from optimizer.vram import (
    AUTOSPLIT_MIN_RESERVE,
    GIB,
    MIB,
    MemoryPlan,
    Split,
    VramVerdict,
    manual_need,
    place,
    range_breakdown,
)


def _fill_end(plan: MemoryPlan, start: int, budget: int, overhead: int, scratch: int | None, margin: int) -> int:
    """Largest ``end`` such that modules ``[start, end)`` fit one device's budget at run time."""
    lo, hi = start, len(plan.table)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        d = range_breakdown(plan, index=0, budget=budget, overhead=overhead, start=start, end=mid, scratch=scratch,
                            margin=margin)
        if d.fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _gib_between(lo: int, hi: int | None) -> float | None:
    """A short decimal GiB value ``g`` with ``lo <= int(g * GiB) < hi`` (``hi`` None: no upper bound).

    Inside a bounded interval the central half is tried first, so that a module's requirement may
    move a little (another context, a rounding) without moving the module to another GPU.
    """
    tries = [(lo, hi)]
    if hi is not None:
        q = (hi - lo) // 4
        tries.insert(0, (lo + q, hi - q))
    for a, b in tries:
        for digits in range(1, 11):
            scale = 10**digits
            g = round(math.ceil(a / GIB * scale) / scale, digits)
            while int(g * GIB) < a:  # float rounding of ceil
                g = round(g + 1 / scale, digits)
            if g > 0 and (b is None or int(g * GIB) < b):
                return g
    return None


def best_manual_split(*, plan: MemoryPlan, budgets: tuple[int, ...], overheads: tuple[int, ...],
                      margins: tuple[int, ...] | None = None) -> tuple[Split, VramVerdict] | None:
    """A ``gpu_split`` (GiB per GPU) under which the model fits every GPU's budget, or None.

    ``budgets``, ``overheads`` and ``margins`` (safety margin; default none) are bytes, one entry per GPU.
    """
    margins = margins or (0,) * len(budgets)
    n, n_dev = len(plan.table), len(budgets)
    start, split = 0, []
    for i in range(n_dev):
        last = i == n_dev - 1
        end = n if last else _fill_end(plan, start, budgets[i], overheads[i], None, margins[i])
        while True:
            lo = manual_need(plan, start=start, end=end) + plan.plan_constant_bytes
            hi = None if end >= n else manual_need(plan, start=start, end=end + 1) + plan.plan_constant_bytes
            g = _gib_between(max(lo, 1), hi)
            if g is not None or end <= start:
                break
            end -= 1
        if g is None:
            return None
        split.append(g)
        start = end
    s = Split(mode="manual", gpu_split=tuple(split))
    v = place(plan=plan, split=s, budgets=budgets, overhead_bytes=overheads, margin_bytes=margins)
    return (s, v) if v.fits else None


def best_reserves(*, plan: MemoryPlan, budgets: tuple[int, ...], overheads: tuple[int, ...],
                  margins: tuple[int, ...] | None = None) -> tuple[Split, VramVerdict] | None:
    """Autosplit reserves (bytes, whole MiB, per GPU) under which the model fits every GPU, or None."""
    margins = margins or (0,) * len(budgets)
    t, costs, n, n_dev = plan.table, plan.costs, len(plan.table), len(budgets)
    scratch = max((costs[k].scratch_bytes for k in t.present), default=0)
    held = [w + plan.cache_layer_bytes * kv for w, kv in zip(t.prefix_w, t.prefix_kv, strict=True)]
    start, reserves = 0, []
    for i in range(n_dev):
        last = i == n_dev - 1
        # autosplit loads by the memory really free: place as if the margin were used up by overhead
        room = budgets[i] - (overheads[i] + margins[i] + scratch + plan.rope_bytes + AUTOSPLIT_MIN_RESERVE)
        # need[j]: what the test forward of module j needs beyond ``room`` when [start, j] is on GPU i
        need, seen_kv = [], False
        for j in range(start, n):
            seen_kv = seen_kv or t.kind_kv[t.kinds[j]]
            need.append(held[j + 1] - held[start] + (plan.cache_staging_bytes if seen_kv else 0)
                        + costs[t.kinds[j]].test_transient_bytes)
        end = n if last else _fill_end(plan, start, budgets[i], overheads[i], scratch, margins[i])
        reserve = None
        while reserve is None and end >= start:
            reserve = _reserve_for(need, end - start, room, at_end=end >= n)
            if reserve is None:
                if last:
                    return None
                end -= 1
        if reserve is None:
            return None
        reserves.append(reserve)
        start = end
    s = Split(mode="auto", n_devices=n_dev, reserve_bytes=tuple(reserves))
    v = place(plan=plan, split=s, budgets=budgets, overhead_bytes=overheads, margin_bytes=margins)
    return (s, v) if v.placed and v.fits and start == n else None


def _reserve_for(need: list[int], k: int, room: int, *, at_end: bool) -> int | None:
    """A reserve (whole MiB) that keeps modules ``need[:k]`` on the GPU and stops at ``need[k]``.

    ``need[j]`` is what module j's test forward needs beyond the GPU's fixed part; ``room`` what the
    GPU has for it; ``at_end``: the GPU takes every remaining module (nothing to stop at; 0).
    Of the reserves that work, the middle one is taken, so that neither edge of the placement
    depends on the last MiB of the model's figures.
    """
    top = room - max(need[:k], default=-(2**62))  # a reserve up to ``top`` keeps every placed module
    if at_end:
        return 0 if top >= 0 else None
    low = max(0, room - need[k] + 1)  # from here on the test forward of module k fails
    if low > top:
        return None
    mid = (low + min(top, low + 64 * GIB)) // 2
    for r in (mid - mid % MIB, mid + (-mid % MIB)):
        if low <= r <= top:
            return r
    return None
