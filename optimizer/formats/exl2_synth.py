"""Synthesize the tensor table of an exl2 quant from config.json alone (no weights, no GPU).

Used to ship metadata of real models (``studies/examples``), to build oracle fixtures of real
sizes, and to answer "what would a 4.5 bpw variant need?" before anyone has made it.

The layout follows ExLlamaV2's converter (``conversion/adaptivegptq.py`` ``pack()``): for a linear
layer with ``K`` inputs and ``N`` outputs (``N`` padded to a multiple of 32) it stores

    q_weight    int32 [sum_g rows_g * bits_g / 32, N]   packed weights, bits_g per row group
    q_scale     int32 [n_groups, N / 8]                  4-bit scales
    q_scale_max fp16  [n_groups]
    q_groups    int16 [2 * n_groups]
    q_invperm   int32 [K]

Row groups have 128 rows (32 when ``K`` is not a multiple of 128), and the per-group bit widths are
mixed from ExLlamaV2's options so that the layer's bits per weight *including* that overhead hit
the target, as the converter's optimizer budgets it. Embedding and norms are FP16.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from optimizer.arch import ModelArch, parse_arch

_BIT_OPTIONS = (2, 3, 4, 5, 6, 8)
_QK_NORM_ARCHS = frozenset({"Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForConditionalGeneration"})

Tensors = dict[str, tuple[str, tuple[int, ...]]]


def _group_bits(n_groups: int, target: float) -> list[int]:
    """Per-group bit widths whose mean is as close to ``target`` as two neighbouring options allow."""
    target = min(max(target, _BIT_OPTIONS[0]), _BIT_OPTIONS[-1])
    lo = max(b for b in _BIT_OPTIONS if b <= target)
    hi = min(b for b in _BIT_OPTIONS if b >= target)
    if hi == lo:
        return [lo] * n_groups
    n_hi = round((target - lo) / (hi - lo) * n_groups)
    return [hi] * n_hi + [lo] * (n_groups - n_hi)


def exl2_linear(key: str, k: int, n: int, bits: float, *, bias: bool = False) -> Tensors:
    """Tensors of one exl2 linear ``key`` (K=k inputs, N=n outputs) at ``bits`` per weight."""
    n_pad = n + (-n % 32)
    gs = 128 if k % 128 == 0 else 32
    n_groups = math.ceil(k / gs)
    overhead_bits = n_groups * (n_pad // 8) * 32 + n_groups * 16 + 2 * n_groups * 16 + k * 32
    packed_target = bits - overhead_bits / (k * n_pad)
    gb = _group_bits(n_groups, packed_target)
    rows = sum(min(gs, k - i * gs) * b // 32 for i, b in enumerate(gb))
    out: Tensors = {
        f"{key}.q_weight": ("I32", (rows, n_pad)),
        f"{key}.q_scale": ("I32", (n_groups, n_pad // 8)),
        f"{key}.q_scale_max": ("F16", (n_groups,)),
        f"{key}.q_groups": ("I16", (2 * n_groups,)),
        f"{key}.q_invperm": ("I32", (k,)),
    }
    if bias:
        out[f"{key}.bias"] = ("F16", (n_pad,))
    return out


def synthesize(config: Mapping[str, Any], *, bits: float, head_bits: int) -> Tensors:
    """The full tensor table of an exl2 quant of ``config`` at ``bits`` (decoder) / ``head_bits``."""
    arch = parse_arch(config)
    return synthesize_arch(arch, bits=bits, head_bits=head_bits, qkv_bias=bool(config.get("attention_bias"))
                           or arch.architecture == "Qwen2ForCausalLM")


def synthesize_arch(arch: ModelArch, *, bits: float, head_bits: int, qkv_bias: bool = False) -> Tensors:
    """As :func:`synthesize`, from a parsed :class:`ModelArch`."""
    p = arch.spec.lm_prefix
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q_out, kv_out = arch.num_attention_heads * d, arch.kv_dim
    t: Tensors = {f"{p}model.embed_tokens.weight": ("F16", (arch.vocab_size, h))}
    # Norm names as ExLlamaV2's architecture table gives them (``exllamav2/architecture.py``).
    norms = ["input_layernorm", "post_attention_layernorm"]
    if arch.architecture == "YiForCausalLM":
        norms = ["ln1", "ln2"]
    if arch.spec.residual_fp32:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    if arch.spec.parallel_decoder:
        norms = ["input_layernorm"]
    # Per-head q/k norms (``default_use_qk_norm``): Qwen3, Qwen3-MoE, Gemma 3.
    qk_norm = arch.architecture in _QK_NORM_ARCHS
    for layer in range(arch.num_hidden_layers):
        lk = f"{p}model.layers.{layer}"
        for nm in norms:
            t[f"{lk}.{nm}.weight"] = ("F16", (h,))
        t.update(exl2_linear(f"{lk}.self_attn.q_proj", h, q_out, bits, bias=qkv_bias))
        t.update(exl2_linear(f"{lk}.self_attn.k_proj", h, kv_out, bits, bias=qkv_bias))
        t.update(exl2_linear(f"{lk}.self_attn.v_proj", h, kv_out, bits, bias=qkv_bias))
        t.update(exl2_linear(f"{lk}.self_attn.o_proj", q_out, h, bits))
        if qk_norm:
            t[f"{lk}.self_attn.q_norm.weight"] = ("F16", (d,))
            t[f"{lk}.self_attn.k_norm.weight"] = ("F16", (d,))
        if arch.spec.is_moe:
            e_key = "block_sparse_moe" if arch.architecture == "MixtralForCausalLM" else "mlp"
            names = ("w1", "w3", "w2") if e_key == "block_sparse_moe" else ("gate_proj", "up_proj", "down_proj")
            t[f"{lk}.{e_key}.gate.weight"] = ("F16", (arch.num_experts or 0, h))
            for e in range(arch.num_experts or 0):
                ek = f"{lk}.{e_key}.experts.{e}"
                t.update(exl2_linear(f"{ek}.{names[0]}", h, i, bits))
                t.update(exl2_linear(f"{ek}.{names[1]}", h, i, bits))
                t.update(exl2_linear(f"{ek}.{names[2]}", i, h, bits))
        else:
            t.update(exl2_linear(f"{lk}.mlp.gate_proj", h, i, bits))
            t.update(exl2_linear(f"{lk}.mlp.up_proj", h, i, bits))
            t.update(exl2_linear(f"{lk}.mlp.down_proj", i, h, bits))
    t[f"{p}model.norm.weight"] = ("F16", (h,))
    # compile.py writes a separately quantized ``<lm_prefix>lm_head`` even for tied embeddings.
    t.update(exl2_linear(f"{p}lm_head", h, arch.vocab_size, _head_bits_eff(head_bits)))
    return t


def _head_bits_eff(head_bits: int) -> float:
    """Effective head bpw incl. overhead as ExLlamaV2's -hb options give it (h6 ~ 6.33, h8 ~ 8.03)."""
    return {6: 6.33, 8: 8.03, 4: 4.43, 5: 5.18, 3: 3.28, 2: 2.73}.get(head_bits, float(head_bits))
