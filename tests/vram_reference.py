"""Reference VRAM rules for tests: the straightforward, module-by-module form of the model.

This is the VRAM model as it was before the columnar rewrite (one :class:`ModuleCost` per module per
evaluation, placement by walking the modules one at a time), kept so that tests can run the old
rules beside the fast ones (``tests/test_vram_reference.py``). Keep it in step with any change of
the rules themselves (e.g. a new planning term); never optimize it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from optimizer.arch import ModelArch
from optimizer.errors import ModelConfigError
from optimizer.formats.exl2 import (
    Exl2Settings,
    _transients,
    attn_plan_scratch,
    attn_plan_size,
    attn_scratch,
    cache_layer_bytes,
    cache_staging_bytes,
    head_scratch,
    mlp_scratch,
    rope_bytes,
)
from optimizer.variant import TensorInfo
from optimizer.vram import AUTOSPLIT_MIN_RESERVE, GIB, DeviceBreakdown, ModuleCost, Split, VramVerdict


@dataclass(frozen=True)
class RefPlan:
    """The old ``MemoryPlan``: a tuple of rows."""

    modules: tuple[ModuleCost, ...]
    cache_layer_bytes: int
    cache_staging_bytes: int
    rope_bytes: int
    plan_constant_bytes: int = 0


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_ATTN_NORMS = ("input_layernorm.", "ln1.")
_ATTN_POST_NORMS_GEMMA = ("post_attention_layernorm.",)


def group_modules(arch: ModelArch, tensors: Iterable[TensorInfo]) -> dict[str, int]:
    """Bytes per ExLlamaV2 module key, in load order; the embedding is keyed ``embed`` (CPU).

    Tensors outside the language model (vision tower, projector) are dropped: a text-only load
    never reads them.
    """
    prefix = arch.spec.lm_prefix
    n_layers = arch.num_hidden_layers
    norm_bytes = 2 * arch.hidden_size  # ExLlamaV2 RMSNorm/LayerNorm/HeadNorm.weight_footprint()
    attn: list[int] = [0] * n_layers
    mlp: list[int] = [0] * n_layers
    out: dict[str, int] = {"embed": 0}
    norm = head = 0
    gemma_post = arch.spec.residual_fp32  # Gemma 2/3: post_attention_layernorm belongs to attention
    for t in tensors:
        name = t.name
        if prefix:
            if not name.startswith(prefix):
                if name.startswith("lm_head."):
                    head += t.nbytes
                continue
            name = name[len(prefix):]
        nbytes = t.nbytes
        if name.endswith("norm.weight"):
            nbytes = norm_bytes
        elif name.endswith("norm.bias"):
            nbytes = 0  # LayerNorm.weight_footprint() counts the weight only
        if name.startswith("model.embed_tokens."):
            out["embed"] += t.nbytes
        elif name.startswith("lm_head."):
            head += nbytes
        elif name.startswith("model.norm."):
            norm += nbytes
        else:
            m = _LAYER_RE.match(name)
            if not m:
                continue
            i, rest = int(m.group(1)), m.group(2)
            if i >= n_layers:
                raise ModelConfigError(
                    f"weights hold layer {i} but config.json says num_hidden_layers = {n_layers}"
                )
            if arch.spec.parallel_decoder or rest.startswith("self_attn.") or rest.startswith(_ATTN_NORMS) or (
                gemma_post and rest.startswith(_ATTN_POST_NORMS_GEMMA)
            ):
                attn[i] += nbytes
            else:
                mlp[i] += nbytes
    for i in range(n_layers):
        out[f"model.layers.{i}.self_attn"] = attn[i]
        if not arch.spec.parallel_decoder:
            out[f"model.layers.{i}.mlp"] = mlp[i]
    out["model.norm"] = norm
    out["lm_head"] = head
    return out


def memory_plan(*, arch: ModelArch, tensors: Iterable[TensorInfo], settings: Exl2Settings) -> RefPlan:
    """Describe ``arch`` with ``tensors`` loaded under ``settings`` as bytes per module.

    Raises:
        ModelConfigError: the tensors do not belong to this architecture.
    """
    groups = group_modules(arch, tensors)
    s = settings
    a_scr, m_scr, h_scr = attn_scratch(arch, s), mlp_scratch(arch, s), head_scratch(arch, s)
    a_plan, a_attn = attn_plan_scratch(arch, s), attn_plan_size(arch, s)
    a_tr, m_tr, h_tr = _transients(arch, s)
    # load_autosplit's test forward: one (1, max_input_len) chunk at past_len 0 (model.py ~L560-625).
    t = Exl2Settings(max_seq_len=s.chunk_len, cache=s.cache, batch_size=1, max_input_len=s.chunk_len,
                     max_dq_size=s.max_dq_size, flash_attn=s.flash_attn)
    a_lt, m_lt, h_lt = _transients(arch, t)
    if arch.spec.parallel_decoder:
        a_scr = max(a_scr, m_scr)
        a_plan, a_attn = max(a_plan, m_scr), 0
        a_tr = max(a_tr, m_tr)
        a_lt = max(a_lt, m_lt)
    state_size = arch.hidden_size * s.chunk_len * s.batch_size * 2
    mask_size = s.chunk_len**2 * s.batch_size * 2
    constant = 2 * (arch.head_dim * s.max_seq_len * 2)
    modules: list[ModuleCost] = []
    for key, nbytes in groups.items():
        if key == "embed":
            continue
        if key.endswith(".self_attn"):
            modules.append(ModuleCost(key, nbytes, a_scr, a_tr, kv_layer=True, plan_bytes=a_plan, plan_attn_bytes=a_attn,
                                      load_transient_bytes=a_lt))
        elif key.endswith(".mlp"):
            modules.append(ModuleCost(key, nbytes, m_scr, m_tr, plan_bytes=m_scr, load_transient_bytes=m_lt))
        elif key == "lm_head":
            modules.append(ModuleCost(key, nbytes, h_scr, h_tr, plan_bytes=h_scr, load_transient_bytes=h_lt))
        else:
            modules.append(ModuleCost(key, nbytes, 0, 0))
    return RefPlan(
        modules=tuple(modules),
        cache_layer_bytes=cache_layer_bytes(arch, s),
        cache_staging_bytes=cache_staging_bytes(arch, s),
        rope_bytes=rope_bytes(arch, s),
        plan_constant_bytes=constant + state_size + mask_size,
    )


class _Dev:
    """Mutable accumulator for one device during placement."""

    def __init__(self, index: int, budget: int, overhead: int) -> None:
        self.index, self.budget, self.overhead = index, budget, overhead
        self.weights = self.cache = self.staging = self.scratch = self.rope = self.transient = 0
        self.n_modules = self.n_kv = 0
        self.margin = 0

    def steady(self) -> int:
        return self.overhead + self.weights + self.cache + self.staging + self.scratch + self.rope

    def add(self, m: ModuleCost, plan: RefPlan) -> None:
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
            margin=self.margin if used else 0,
        )


def place(*, plan: RefPlan, split: Split, budgets: tuple[int, ...], overhead_bytes: tuple[int, ...],
          margin_bytes: tuple[int, ...] = (0,)) -> VramVerdict:
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
    margins = _expand(margin_bytes, n, "margin_bytes")

    def devices(with_margin: bool) -> list[_Dev]:
        devs = [_Dev(i, budgets[i], overheads[i]) for i in range(n)]
        for d, m in zip(devs, margins, strict=True):
            d.margin = m if with_margin else 0
        return devs

    if split.mode == "single":
        return _place_single(plan, devices(True)[:1])
    if split.mode == "manual":
        return _place_manual(plan, split, devices(True))
    # autosplit: the answer must hold with the overhead as assumed and with the margin used up by it
    nominal = _place_auto(plan, split, devices(False))
    if not nominal.fits or not any(margins):
        return nominal
    return _place_auto(plan, split, devices(True))


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
            keep = f" + {d.margin / GIB:.2f} GiB margin" if d.margin else ""
            reason = f"GPU {d.index} needs {d.total / GIB:.2f} GiB{keep} of {d.budget / GIB:.2f} GiB"
    return VramVerdict(devices=frozen, placed=placed, reason=reason)


def _place_single(plan: RefPlan, devs: list[_Dev]) -> VramVerdict:
    d = devs[0]
    d.scratch = max((m.scratch_bytes for m in plan.modules), default=0)
    d.rope = plan.rope_bytes
    for m in plan.modules:
        d.add(m, plan)
    return _finish(devs, True, "")


def _place_manual(plan: RefPlan, split: Split, devs: list[_Dev]) -> VramVerdict:
    """Mirror ``ExLlamaV2.set_device_map``: greedy, by planning sizes, within ``gpu_split`` GiB."""
    remaining = [int(g * GIB) - plan.plan_constant_bytes for g in split.gpu_split]
    reserve = [0] * len(devs)
    reserve_attn = [0] * len(devs)
    cur = 0
    for m in plan.modules:
        while True:
            if cur >= len(devs):
                return _finish(devs, False, "the --gpu-split allocation is too small for the weights and the buffers "
                               "ExLlamaV2 reserves (it would stop with 'Insufficient space in device allocation')")
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


def _place_auto(plan: RefPlan, split: Split, devs: list[_Dev]) -> VramVerdict:
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
            need = d.steady() + d.margin + m.weight_bytes + held + m.test_transient_bytes
            if m.kv_layer:
                need += plan.cache_layer_bytes + (plan.cache_staging_bytes if d.n_kv == 0 else 0)
            if need <= d.budget:
                break
            cur += 1
        d.add(m, plan)
    return _finish(devs, True, "")
