"""Placement of an EXL3 model over GPUs the way exllamav3 1.6.5's ``Model.load`` does. Bytes everywhere.

* ``single``: ``model.load(device="cuda:0")`` (``_load_single``): every GPU module on device 0, no
  budget check by the library; it fits when the peak is within the budget.
* ``auto``: ``model.load(reserve_per_device=[...])`` (layer split over all GPUs, default reserve
  0.5 GiB per device). Modules load in order, device 0 first (greedy, not balanced); a module with
  its cache layers stays on the current device when, with the largest measuring-forward transient
  seen on that device, the device's allocation stays within ``free - reserve`` and leaves the
  256 MiB physical margin (``EXL3_AUTOSPLIT_MARGIN_MB``); otherwise loading moves on. No device left
  is exllamav3's "Insufficient VRAM in split for model and cache".
* ``manual``: ``model.load(use_per_device=[GiB, ...])``: the same walk, each device capped at its
  listed GiB (and at its free memory).

``free`` of a device is its budget minus its overhead (the CUDA context exists before loading).
Tensor parallel (``model.load(tensor_p=True)``) is not placed here: see :func:`refuse_tensor_parallel`.
"""

from __future__ import annotations

from optimizer.errors import BadOptionError
from optimizer.vram import GIB, MIB, DeviceBreakdown, MemoryPlan, Split, VramVerdict

#: ``Model.load`` default ``reserve_per_device`` (GiB 0.5 per device).
DEFAULT_RESERVE_BYTES = 512 * MIB

#: ``EXL3_AUTOSPLIT_MARGIN_MB`` default: physical headroom kept above the largest transient.
AUTOSPLIT_MARGIN_BYTES = 256 * MIB


def refuse_tensor_parallel() -> None:
    """Tensor parallel is refused, by name.

    Raises:
        BadOptionError: always. exllamav3's TP planner scales its split until it "fits" and never
            reports a shortfall; it starts one worker process (its own CUDA context) per device and
            a second context on non-output devices, none of which is measured here.
    """
    raise BadOptionError(
        "EXL3 tensor parallel (model.load(tensor_p=True)) is not sized by exl2opt: exllamav3's own planner "
        "never reports a shortfall and its per-process CUDA contexts are unmeasured; use --gpus N (layer split)"
    )


def reserves_for(split: Split, n: int) -> tuple[int, ...]:
    """Reserve per device: exllamav3's 0.5 GiB unless the split carries reserves other than the default."""
    default = Split(mode="auto", n_devices=n).reserve_bytes
    if split.reserve_bytes and tuple(split.reserve_bytes) != tuple(default):
        r = tuple(split.reserve_bytes)
        return r if len(r) == n else (r + (DEFAULT_RESERVE_BYTES,) * n)[:n]
    return (DEFAULT_RESERVE_BYTES,) * n


class _Dev:
    def __init__(self, index: int, budget: int, overhead: int, cap: int) -> None:
        self.index, self.budget, self.overhead = index, budget, overhead
        self.cap = cap  # bytes the library lets this device allocate (torch memory-fraction cap)
        self.weights = self.cache = self.transient = self.test_transient = 0
        self.n_modules = self.n_kv = 0

    def freeze(self) -> DeviceBreakdown:
        used = self.n_modules > 0
        return DeviceBreakdown(
            index=self.index, budget=self.budget, overhead=self.overhead if used else 0, weights=self.weights,
            cache=self.cache, transient=self.transient, n_modules=self.n_modules, n_kv_layers=self.n_kv,
        )


def place(*, plan: MemoryPlan, split: Split, budgets: tuple[int, ...], overheads: tuple[int, ...]) -> VramVerdict:
    """Assign ``plan``'s modules to devices as ``Model.load`` would (see the module docstring).

    ``budgets`` and ``overheads`` hold one entry per device (bytes). ``ModuleCost.kv_layer`` counts
    as ``plan.cache_layer_bytes`` of cache; ``test_transient_bytes`` decides placement,
    ``transient_bytes`` is the inference peak reported per device.
    """
    n = len(budgets)
    caps: tuple[int, ...]
    if split.mode == "single":
        caps = (budgets[0],)
    elif split.mode == "manual":
        caps = tuple(int(g * GIB) for g in split.gpu_split)
    else:
        reserves = reserves_for(split, n)
        caps = tuple(budgets[i] - overheads[i] - reserves[i] for i in range(n))
    devs = [_Dev(i, budgets[i], overheads[i], caps[i]) for i in range(n)]
    cur = 0
    for m in plan.modules:
        kv = plan.cache_layer_bytes if m.kv_layer else 0
        if split.mode != "single":
            while True:
                if cur >= n:
                    frozen = tuple(d.freeze() for d in devs)
                    return VramVerdict(devices=frozen, placed=False,
                                       reason="Insufficient VRAM in split for model and cache (exllamav3 autosplit)")
                d = devs[cur]
                free = d.budget - d.overhead
                t = max(d.test_transient, m.test_transient_bytes)
                alloc = d.weights + d.cache + m.weight_bytes + kv
                if alloc + t <= min(d.cap, free) and alloc + t + AUTOSPLIT_MARGIN_BYTES <= free:
                    break
                cur += 1
        d = devs[cur]
        d.weights += m.weight_bytes
        d.cache += kv
        d.n_kv += 1 if m.kv_layer else 0
        d.n_modules += 1
        d.transient = max(d.transient, m.transient_bytes)
        d.test_transient = max(d.test_transient, m.test_transient_bytes)
    frozen = tuple(d.freeze() for d in devs)
    over = [d for d in frozen if not d.fits]
    reason = f"GPU {over[0].index} needs {over[0].total / GIB:.2f} GiB of {over[0].budget / GIB:.2f} GiB" if over else ""
    return VramVerdict(devices=frozen, placed=True, reason=reason)
