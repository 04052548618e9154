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

from dataclasses import dataclass, field

MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class ModuleCost:
    """One GPU module in load order. All values in bytes.

    Attributes:
        name: module key, e.g. ``model.layers.3.self_attn`` or ``lm_head``.
        weight_bytes: device memory of its weights.
        scratch_bytes: its ``scratch_space_fixed()``; a device's scratch is the max over its modules
            (manual split) or over all modules (autosplit).
        transient_bytes: peak short-lived memory while it forwards one chunk (activations, logits).
        kv_layer: it owns one layer of KV cache (attention or parallel decoder).
        plan_bytes: ``scratch_space()`` + attention planning size; used only by the manual split to
            place modules as ``set_device_map`` does.
        load_transient_bytes: peak short-lived bytes of ``load_autosplit``'s test forward (one
            ``max_input_len`` chunk, batch 1, past_len 0), which decides the autosplit placement;
            None means the same as ``transient_bytes``. It is smaller than the inference peak when
            attention transients grow with the context (no flash-attention) or with the batch.
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


@dataclass(frozen=True)
class MemoryPlan:
    """A model, a cache and settings, reduced to bytes. Produced by a format module.

    Attributes:
        modules: GPU modules in load order (the embedding, kept in system RAM, is excluded).
        cache_layer_bytes: KV cache bytes of one attention layer (K, V and scales).
        cache_staging_bytes: bytes every device holding cache layers adds once (FP16 staging
            buffers of quantized caches; 0 for FP16).
        rope_bytes: RoPE sin/cos tables allocated on every device that holds a module.
        plan_constant_bytes: what ``set_device_map`` subtracts from every manual-split device.
    """

    modules: tuple[ModuleCost, ...]
    cache_layer_bytes: int
    cache_staging_bytes: int
    rope_bytes: int
    plan_constant_bytes: int = 0


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
    """Predicted memory of one device, in bytes. ``total`` is the peak during inference."""

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

    @property
    def total(self) -> int:
        return (self.overhead + self.weights + self.cache + self.cache_staging + self.scratch
                + self.rope + self.transient)

    @property
    def headroom(self) -> int:
        """Budget minus total; negative when the device does not fit."""
        return self.budget - self.total

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


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


class _Dev:
    """Mutable accumulator for one device during placement."""

    def __init__(self, index: int, budget: int, overhead: int) -> None:
        self.index, self.budget, self.overhead = index, budget, overhead
        self.weights = self.cache = self.staging = self.scratch = self.rope = self.transient = 0
        self.n_modules = self.n_kv = 0

    def steady(self) -> int:
        return self.overhead + self.weights + self.cache + self.staging + self.scratch + self.rope

    def add(self, m: ModuleCost, plan: MemoryPlan) -> None:
        self.weights += m.weight_bytes
        self.transient = max(self.transient, m.transient_bytes)
        self.n_modules += 1
        if m.kv_layer:
            self.cache += plan.cache_layer_bytes
            self.staging = plan.cache_staging_bytes
            self.n_kv += 1

    def freeze(self) -> DeviceBreakdown:
        used = self.n_modules > 0
        return DeviceBreakdown(
            index=self.index,
            budget=self.budget,
            overhead=self.overhead if used else 0,
            weights=self.weights,
            cache=self.cache,
            cache_staging=self.staging,
            scratch=self.scratch if used else 0,
            rope=self.rope if used else 0,
            transient=self.transient,
            n_modules=self.n_modules,
            n_kv_layers=self.n_kv,
        )


def place(*, plan: MemoryPlan, split: Split, budgets: tuple[int, ...], overhead_bytes: tuple[int, ...]) -> VramVerdict:
    """Assign modules to devices as the engine would and return the per-device breakdown.

    Args:
        plan: the model as bytes (from a format module).
        split: single GPU, manual split or autosplit.
        budgets: usable bytes per device (one entry per device; a single entry is repeated).
        overhead_bytes: CUDA context / allocator overhead per device (same repetition rule).

    Contract: the returned devices' parts add up to their ``total``; ``placed`` is False when the
    engine itself would refuse to load (autosplit "Insufficient VRAM for model and cache", or a
    manual split with too little room); ``fits`` additionally requires every device's peak
    (steady state plus the largest transient) to be within its budget.
    """
    n = max(split.n_devices, 1)
    budgets = _expand(budgets, n, "budgets")
    overheads = _expand(overhead_bytes, n, "overhead_bytes")
    devs = [_Dev(i, budgets[i], overheads[i]) for i in range(n)]
    if split.mode == "single":
        return _place_single(plan, devs[:1])
    if split.mode == "manual":
        return _place_manual(plan, split, devs)
    return _place_auto(plan, split, devs)


def _expand(values: tuple[int, ...], n: int, what: str) -> tuple[int, ...]:
    if len(values) == 1:
        return tuple(values) * n
    if len(values) != n:
        raise ValueError(f"{what}: expected 1 or {n} values, got {len(values)}")
    return tuple(values)


def _finish(devs: list[_Dev], placed: bool, reason: str) -> VramVerdict:
    frozen = tuple(d.freeze() for d in devs)
    if placed and not reason:
        over = [d for d in frozen if not d.fits]
        if over:
            d = over[0]
            reason = f"GPU {d.index} needs {d.total / GIB:.2f} GiB of {d.budget / GIB:.2f} GiB"
    return VramVerdict(devices=frozen, placed=placed, reason=reason)


def _place_single(plan: MemoryPlan, devs: list[_Dev]) -> VramVerdict:
    d = devs[0]
    d.scratch = max((m.scratch_bytes for m in plan.modules), default=0)
    d.rope = plan.rope_bytes
    for m in plan.modules:
        d.add(m, plan)
    return _finish(devs, True, "")


def _place_manual(plan: MemoryPlan, split: Split, devs: list[_Dev]) -> VramVerdict:
    """Mirror ``ExLlamaV2.set_device_map``: greedy, by planning sizes, within ``gpu_split`` GiB."""
    remaining = [int(g * GIB) - plan.plan_constant_bytes for g in split.gpu_split]
    reserve = [0] * len(devs)
    reserve_attn = [0] * len(devs)
    cur = 0
    for m in plan.modules:
        while True:
            if cur >= len(devs):
                return _finish(devs, False, "the --gpu-split allocation is too small for the weights")
            dev_scratch = max(m.plan_bytes, reserve[cur])
            dev_attn = max(m.plan_attn_bytes, reserve_attn[cur])
            if m.weight_bytes + dev_scratch + dev_attn <= remaining[cur]:
                break
            cur += 1
        reserve[cur], reserve_attn[cur] = dev_scratch, dev_attn
        remaining[cur] -= m.weight_bytes
        d = devs[cur]
        d.scratch = max(d.scratch, m.scratch_bytes)
        d.rope = plan.rope_bytes
        d.add(m, plan)
    return _finish(devs, True, "")


def _place_auto(plan: MemoryPlan, split: Split, devs: list[_Dev]) -> VramVerdict:
    """Mirror ``ExLlamaV2.load_autosplit``: fill device 0, move on when a module's test forward OOMs."""
    scratch = max((m.scratch_bytes for m in plan.modules), default=0)
    cur = 0
    touched = -1
    for m in plan.modules:
        while True:
            if cur >= len(devs):
                return _finish(devs, False, "Insufficient VRAM for model and cache (autosplit ran out of GPUs)")
            d = devs[cur]
            if cur > touched:
                d.scratch, d.rope = scratch, plan.rope_bytes
                touched = cur
            held = split.reserve_bytes[cur] + AUTOSPLIT_MIN_RESERVE
            need = d.steady() + m.weight_bytes + held + m.test_transient_bytes
            if m.kv_layer:
                need += plan.cache_layer_bytes + (plan.cache_staging_bytes if d.n_kv == 0 else 0)
            if need <= d.budget:
                break
            cur += 1
        d.add(m, plan)
    return _finish(devs, True, "")
