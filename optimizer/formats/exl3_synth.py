"""Synthesize the tensor table of an EXL3 quant from config.json alone (no weights, no GPU).

Used to ship metadata of real models (``studies/examples``), to build oracle fixtures of real sizes,
and to answer "what would a 4.0 bpw EXL3 variant need?" before anyone has made it.

The layout follows exllamav3 1.6.5's converter (facts: shared ``exllamav3-memory.md`` section 1): a
linear with ``in`` inputs and ``out`` outputs, both padded to a multiple of 128, quantized at ``K``
bits stores

    trellis  int16 [in/16, out/16, 16*K]   one 16x16 tile = 16*K words
    suh      fp16  [in]
    svh      fp16  [out]
    mul1     int32 []                      codebook marker (value 0x83DCD12D)
    bias     fp16  [out]                   where the architecture has one

``K`` is an integer per tensor: like the converter's allocation, every decoder linear starts at
``floor(bits)`` and the largest ones are bumped to ``ceil(bits)`` until the numel-weighted average
reaches ``bits``. The head has ``head_bits``; embedding, norms and MoE routers stay FP16.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from optimizer.arch import ModelArch, parse_arch
from optimizer.formats.exl3 import ARCHITECTURES, check_architecture

#: The mul1 codebook marker value every linear of a mul1 quant stores.
MUL1_MARKER = 0x83DCD12D

Tensors = dict[str, tuple[str, tuple[int, ...]]]

_QK_NORM = frozenset({"Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForConditionalGeneration"})
_BLOCK_SPARSE = frozenset({"MixtralForCausalLM", "MiniMaxM2ForCausalLM"})  # block_sparse_moe.experts.N.w1/w2/w3
_QKV_BIAS = frozenset({"Qwen2ForCausalLM"})


def _pad128(n: int) -> int:
    return n + (-n % 128)


def exl3_linear(key: str, in_f: int, out_f: int, k_bits: int, *, bias: bool = False) -> Tensors:
    """Tensors of one EXL3 linear ``key`` at ``k_bits`` (1-8) bits per weight."""
    if not 1 <= k_bits <= 8:
        raise ValueError(f"EXL3 bits per tensor must be 1..8, got {k_bits}")
    ip, op = _pad128(in_f), _pad128(out_f)
    out: Tensors = {
        f"{key}.trellis": ("I16", (ip // 16, op // 16, 16 * k_bits)),
        f"{key}.suh": ("F16", (ip,)),
        f"{key}.svh": ("F16", (op,)),
        f"{key}.mul1": ("I32", ()),
    }
    if bias:
        out[f"{key}.bias"] = ("F16", (op,))
    return out


def _glm(config: Mapping[str, Any], key: str, default: int) -> int:
    v = config.get(key, default)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default


def _linears(arch: ModelArch, config: Mapping[str, Any]) -> list[tuple[str, int, int, bool]]:
    """``(key, in, out, bias)`` of every decoder linear, in order (HF tensor names)."""
    p = arch.spec.lm_prefix
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q_out, kv_out = arch.num_attention_heads * d, arch.kv_dim
    bias = arch.architecture in _QKV_BIAS or config.get("attention_bias") is True
    glm = arch.architecture == "Glm4MoeForCausalLM"
    out: list[tuple[str, int, int, bool]] = []
    for layer in range(arch.num_hidden_layers):
        lk = f"{p}model.layers.{layer}"
        out += [(f"{lk}.self_attn.q_proj", h, q_out, bias), (f"{lk}.self_attn.k_proj", h, kv_out, bias),
                (f"{lk}.self_attn.v_proj", h, kv_out, bias), (f"{lk}.self_attn.o_proj", q_out, h, False)]
        if glm and layer < _glm(config, "first_k_dense_replace", 3):  # dense MLP of the full width
            di = _glm(config, "intermediate_size", i)
            out += [(f"{lk}.mlp.gate_proj", h, di, False), (f"{lk}.mlp.up_proj", h, di, False),
                    (f"{lk}.mlp.down_proj", di, h, False)]
            continue
        if glm:
            si = i * _glm(config, "n_shared_experts", 1)
            out += [(f"{lk}.mlp.shared_experts.gate_proj", h, si, False), (f"{lk}.mlp.shared_experts.up_proj", h, si, False),
                    (f"{lk}.mlp.shared_experts.down_proj", si, h, False)]
        if arch.spec.is_moe:
            mixtral = arch.architecture in _BLOCK_SPARSE
            e_key = "block_sparse_moe" if mixtral else "mlp"
            g, u, dn = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
            for e in range(arch.num_experts or 0):
                ek = f"{lk}.{e_key}.experts.{e}"
                out += [(f"{ek}.{g}", h, i, False), (f"{ek}.{u}", h, i, False), (f"{ek}.{dn}", i, h, False)]
        else:
            out += [(f"{lk}.mlp.gate_proj", h, i, False), (f"{lk}.mlp.up_proj", h, i, False),
                    (f"{lk}.mlp.down_proj", i, h, False)]
    return out


def allocate_bits(numels: list[int], target: float) -> list[int]:
    """Integer bits per tensor (1..8) whose numel-weighted mean is the largest not above ``target``
    reachable by bumping whole tensors, largest first, from ``floor(target)`` to ``ceil(target)``."""
    target = min(max(target, 1.0), 8.0)
    lo = math.floor(target)
    out = [lo] * len(numels)
    if lo == target:
        return out
    budget = math.floor(target * sum(numels)) - lo * sum(numels)
    for idx in sorted(range(len(numels)), key=lambda j: -numels[j]):
        if numels[idx] <= budget:
            out[idx] = lo + 1
            budget -= numels[idx]
    return out


def synthesize(config: Mapping[str, Any], *, bits: float, head_bits: int) -> Tensors:
    """The full tensor table of an EXL3 quant of ``config`` at ``bits`` (decoder) and ``head_bits``."""
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        check_architecture(archs[0])
    arch = parse_arch(config, architectures=ARCHITECTURES)
    p = arch.spec.lm_prefix
    h, d = arch.hidden_size, arch.head_dim
    lins = _linears(arch, config)
    ks = allocate_bits([_pad128(a) * _pad128(b) for _, a, b, _ in lins], bits)
    by_key = {key: (a, b, bias, k) for (key, a, b, bias), k in zip(lins, ks, strict=True)}
    norms = ["input_layernorm", "post_attention_layernorm"]
    if arch.spec.residual_fp32:  # Gemma 2 / 3
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    if arch.spec.parallel_decoder:  # Cohere
        norms = ["input_layernorm"]
    t: Tensors = {f"{p}model.embed_tokens.weight": ("F16", (arch.vocab_size, h))}
    for layer in range(arch.num_hidden_layers):
        lk = f"{p}model.layers.{layer}"
        for nm in norms:
            t[f"{lk}.{nm}.weight"] = ("F16", (h,))
        if arch.architecture in _QK_NORM:
            t[f"{lk}.self_attn.q_norm.weight"] = ("F16", (d,))
            t[f"{lk}.self_attn.k_norm.weight"] = ("F16", (d,))
        if arch.architecture == "MiniMaxM2ForCausalLM":  # q/k norms span all heads
            t[f"{lk}.self_attn.q_norm.weight"] = ("F16", (arch.num_attention_heads * d,))
            t[f"{lk}.self_attn.k_norm.weight"] = ("F16", (arch.kv_dim,))
        if arch.architecture == "Glm4MoeForCausalLM" and config.get("use_qk_norm") is True:
            t[f"{lk}.self_attn.q_norm.weight"] = ("F16", (d,))
            t[f"{lk}.self_attn.k_norm.weight"] = ("F16", (d,))
        dense = arch.architecture == "Glm4MoeForCausalLM" and layer < _glm(config, "first_k_dense_replace", 3)
        if arch.spec.is_moe and not dense:
            e_key = "block_sparse_moe" if arch.architecture in _BLOCK_SPARSE else "mlp"
            t[f"{lk}.{e_key}.gate.weight"] = ("F16", (arch.num_experts or 0, h))
            if arch.architecture in ("MiniMaxM2ForCausalLM", "Glm4MoeForCausalLM"):
                t[f"{lk}.{e_key}.gate.e_score_correction_bias"] = ("F32", (arch.num_experts or 0,))
        for key, (a, b, bias, k) in by_key.items():
            if key.startswith(lk + "."):
                t.update(exl3_linear(key, a, b, k, bias=bias))
    t[f"{p}model.norm.weight"] = ("F16", (h,))
    t.update(exl3_linear(f"{p}lm_head", h, arch.vocab_size, head_bits))
    return t


def quantization_config(*, bits: float, head_bits: int, version: str = "1.6.5") -> dict[str, Any]:
    """The ``quantization_config`` block the converter writes into config.json."""
    return {"quant_method": "exl3", "version": version, "bits": bits, "head_bits": head_bits,
            "calibration": {"rows": 250, "cols": 2048}, "out_scales": "auto", "codebook": "mul1"}
