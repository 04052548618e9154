"""Oracle tests: exl2opt's EXL3 memory rules against exllamav3 1.6.5's own Python code, byte for byte.

The library runs on CPU behind import stubs (``exl3_stubs``: a stand-in extension module and a stand-in
triton). Tiny models of every architecture exl2opt's EXL3 rules accept are written as sparse
safetensors (real header, real codebook markers, a hole for the data), *loaded* with
``model.load("cpu")``, and the tensors every top-level module keeps are counted; real-size models are
checked against the library's header accounting (loading them would need GBs of RAM). Caches are the
real ``Cache`` classes' ``storage_size()``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from exl3_oracle import Exl3Oracle, oracle_cache_bytes, oracle_load, write_exl3_dir
from exl3_stubs import active, import_exllamav3
from oracle_util import REAL_CONFIGS, tiny_config, tiny_gemma3_config

from optimizer.arch import parse_arch
from optimizer.errors import ModelConfigError
from optimizer.formats.exl3 import ARCHITECTURES, Exl3Settings, cache_layer_bytes, group_modules, mtp_layers
from optimizer.formats.exl3_qconfig import tensors_from_quantization_config
from optimizer.formats.exl3_synth import exl3_linear, synthesize
from optimizer.safetensors_header import DTYPE_BYTES, read_safetensors_header

pytestmark = pytest.mark.oracle


def _tiny(arch: str, **over: Any) -> dict[str, Any]:
    if arch == "Gemma3ForConditionalGeneration":
        cfg = tiny_gemma3_config(**over)
        cfg.update(mm_tokens_per_image=256, hidden_act="gelu_pytorch_tanh")
        return cfg
    cfg = tiny_config(arch, **over)
    if arch == "Gemma2ForCausalLM":
        cfg["hidden_act"] = "gelu_pytorch_tanh"
    if arch == "Glm4MoeForCausalLM":
        cfg.update(moe_intermediate_size=128, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                   first_k_dense_replace=1, head_dim=64, use_qk_norm=True, attention_bias=True,
                   partial_rotary_factor=0.5, num_nextn_predict_layers=1, norm_topk_prob=True)
    if arch == "MiniMaxM2ForCausalLM":
        cfg.update(num_local_experts=4, num_experts_per_tok=2, head_dim=64, qk_norm_type="per_layer",
                   norm_topk_prob=True)
    return cfg


TINY = {a: _tiny(a) for a in sorted(ARCHITECTURES)}
#: Odd shapes: dims that need padding to 128, a mixed 3.5-bit allocation, 3 layers, 1 KV head.
TINY["odd-Llama-pad"] = tiny_config(hidden_size=320, intermediate_size=880, num_attention_heads=5,
                                    num_key_value_heads=1, head_dim=64, num_hidden_layers=3, vocab_size=1001)
BITS = {"odd-Llama-pad": 3.5, "Qwen3MoeForCausalLM": 2.25, "MixtralForCausalLM": 5.5}

_LOADED: dict[str, tuple[Path, Exl3Oracle]] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exl3-oracle")


def _loaded(root: Path, name: str, cfg: dict[str, Any] | None = None, **kw: Any) -> tuple[Path, Exl3Oracle]:
    if name not in _LOADED:
        cfg = cfg if cfg is not None else TINY[name]
        d = write_exl3_dir(root / name, cfg, bits=BITS.get(name, 4.0), **kw)
        prefix = parse_arch(cfg, architectures=ARCHITECTURES).spec.lm_prefix
        _LOADED[name] = (d, oracle_load(d, prefix=prefix))
    return _LOADED[name]


def _ours(d: Path) -> tuple[Any, dict[str, int], int]:
    cfg = json.loads((d / "config.json").read_text())
    arch = parse_arch(cfg, architectures=ARCHITECTURES)
    mb = group_modules(arch, read_safetensors_header(d / "model.safetensors"), extra_layers=mtp_layers(cfg))
    mods = dict(mb.modules)
    mods["model.embed_tokens"] = mb.embedding
    return arch, mods, mb.n_linears


@pytest.mark.parametrize("name", sorted(TINY))
def test_weights_per_module_match_a_cpu_load(root: Path, name: str) -> None:
    d, om = _loaded(root, name)
    arch, ours, n_lin = _ours(d)
    assert ours == om.modules
    assert n_lin == om.linears > 0
    # The embedding, and only it, stays in system RAM.
    assert [k for k, cpu in om.prefer_cpu.items() if cpu] == ["model.embed_tokens"]
    assert om.modules["lm_head"] > 0


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("tokens", [256, 768, 4096])
def test_cache_bytes_match_the_real_cache(root: Path, name: str, tokens: int) -> None:
    d, om = _loaded(root, name)
    arch = parse_arch(json.loads((d / "config.json").read_text()), architectures=ARCHITECTURES)
    for k, v in ((None, None), (4, 4), (4, 6), (2, 8), (8, 3), (5, 5)):
        mode = "fp16" if k is None else f"k{k}v{v}"
        ours = cache_layer_bytes(arch, Exl3Settings(max_num_tokens=tokens, cache=mode)) * arch.num_hidden_layers
        assert ours == oracle_cache_bytes(om, tokens=tokens, k_bits=k, v_bits=v), mode


def test_fp32_norms_load_as_fp16(root: Path) -> None:
    cfg = TINY["LlamaForCausalLM"]
    t = synthesize({**cfg, "hidden_act": "silu"}, bits=4.0, head_bits=6)
    t = {n: (("F32", s) if n.endswith("norm.weight") else (dt, s)) for n, (dt, s) in t.items()}
    d, om = _loaded(root, "f32-norms", cfg, tensors=t)
    _, ours, _ = _ours(d)
    assert ours == om.modules


def test_legacy_packed_signs_and_fp32_bias_grow_on_load(root: Path) -> None:
    """Older quants store ``su``/``sv`` as packed int16 sign bits; exllamav3 unpacks them to FP16 vectors.
    An FP32 bias is loaded as FP16."""
    cfg = TINY["Qwen2ForCausalLM"]
    t = synthesize({**cfg, "hidden_act": "silu"}, bits=4.0, head_bits=6)
    legacy: dict[str, Any] = {}
    for n, (dt, s) in t.items():
        if n.endswith((".suh", ".svh")) and "layers.0." in n:
            legacy[n[:-1]] = ("I16", (s[0] // 16,))
        elif n.endswith(".bias"):
            legacy[n] = ("F32", s)
        else:
            legacy[n] = (dt, s)
    d, om = _loaded(root, "legacy-su-sv", cfg, tensors=legacy)
    _, ours, _ = _ours(d)
    assert ours == om.modules


def test_bf16_router_bias_becomes_fp32(root: Path) -> None:
    """MiniMax-M2's score-correction bias: FP16 is kept, anything else is loaded as FP32."""
    cfg = TINY["MiniMaxM2ForCausalLM"]
    t = synthesize(cfg, bits=4.0, head_bits=6)
    t = {n: (("BF16", s) if n.endswith("e_score_correction_bias") else (dt, s)) for n, (dt, s) in t.items()}
    d, om = _loaded(root, "minimax-bf16-bias", cfg, tensors=t)
    _, ours, _ = _ours(d)
    assert ours == om.modules


def test_glm_mtp_layer_is_reported_not_counted(root: Path) -> None:
    """GLM-4.5 checkpoints store a multi-token-prediction layer after the decoder; the text model never loads it."""
    cfg = TINY["Glm4MoeForCausalLM"]
    t = synthesize(cfg, bits=4.0, head_bits=6)
    mtp = {n.replace("model.layers.1.", "model.layers.2."): v for n, v in t.items() if n.startswith("model.layers.1.")}
    t.update(mtp)
    d, om = _loaded(root, "glm-mtp", cfg, tensors=t)
    arch, ours, _ = _ours(d)
    assert ours == om.modules
    mb = group_modules(arch, read_safetensors_header(d / "model.safetensors"), extra_layers=1)
    assert mb.not_loaded == sum(math.prod(s) * DTYPE_BYTES[dt] for dt, s in mtp.values())
    with pytest.raises(ModelConfigError, match="layer 2"):
        group_modules(arch, read_safetensors_header(d / "model.safetensors"))


def test_vision_tower_is_reported_not_counted(root: Path) -> None:
    cfg = TINY["Gemma3ForConditionalGeneration"]
    t = synthesize(cfg, bits=4.0, head_bits=6)
    t.update(exl3_linear("vision_tower.vision_model.encoder.layers.0.mlp.fc1", 128, 256, 4))
    t["multi_modal_projector.mm_input_projection_weight"] = ("F16", (128, 256))
    d, om = _loaded(root, "gemma3-vision", cfg, tensors=t)
    arch, ours, _ = _ours(d)
    assert ours == om.modules
    mb = group_modules(arch, read_safetensors_header(d / "model.safetensors"))
    assert mb.not_loaded == 128 * 256 // 2 + 2 * 128 + 2 * 256 + 4 + 2 * 128 * 256


def test_quantization_config_json_lists_the_loaded_tensors(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library's own quantization_config.json, read back, gives the same module bytes as the headers."""
    exl3 = import_exllamav3()
    from exllamav3.conversion import quant_config

    d, _ = _loaded(root, "Qwen3ForCausalLM")
    orig = exl3.Config.from_directory
    monkeypatch.setattr(quant_config.Config, "from_directory",
                        staticmethod(lambda p, **kw: orig(p, load_method="python", **kw)))
    with active():
        quant_config.create_quantization_config_json(str(d))
    doc = json.loads((d / "quantization_config.json").read_text())
    arch = parse_arch(json.loads((d / "config.json").read_text()), architectures=ARCHITECTURES)
    from_qc = group_modules(arch, tensors_from_quantization_config(doc))
    from_headers = group_modules(arch, read_safetensors_header(d / "model.safetensors"))
    assert from_qc == from_headers


# --- real sizes: header-only sparse files, the library's header accounting (no load) ----------------

REAL = {k: REAL_CONFIGS[k] for k in ("Llama-3-8B", "Qwen2.5-32B", "Mixtral-8x7B", "Gemma-2-27B")}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_size_modules_match_the_library_header_accounting(root: Path, name: str) -> None:
    with active():
        _real_size(root, name)


def _real_size(root: Path, name: str) -> None:
    exl3 = import_exllamav3()
    cfg = dict(REAL[name])
    if cfg["architectures"] == ["Gemma2ForCausalLM"]:
        cfg["hidden_act"] = "gelu_pytorch_tanh"
    d = write_exl3_dir(root / f"real-{name}", cfg, bits=4.0, head_bits=6)
    config = exl3.Config.from_directory(str(d), load_method="python")
    model = exl3.Model.from_config(config)
    lib: dict[str, int] = {}
    for m in model.modules:
        n_markers = sum(1 for sm in m if type(sm).__name__ == "Linear" and sm.is_exl3_storage(sm.key))
        lib[str(m.key)] = sum(config.stc.get_tensor_sizes(prefix=str(m.key))) - 4 * n_markers
    _, ours, n_lin = _ours(d)
    assert ours == lib
    _, _, vram_bits = model.get_storage_info()
    norms = sum(t.nbytes for t in read_safetensors_header(d / "model.safetensors")
                if t.name.endswith("norm.weight") and not t.name.startswith("model.norm"))
    arch = parse_arch(cfg, architectures=ARCHITECTURES)
    decoder = sum(v for k, v in ours.items() if k.startswith("model.layers."))
    assert decoder - norms + ours["lm_head"] + 4 * n_lin == int(vram_bits) // 8
    if name == "Llama-3-8B":  # the worked example of the facts (section 1.4), measured with 1.6.5
        assert (decoder - norms + 4 * (n_lin - 1), ours["lm_head"] + 4) == (3_494_904_704, 394_267_140)
    fresh = exl3.Model.from_config(config)
    for mode, kb, vb in (("fp16", None, None), ("k4v4", 4, 4), ("k6v8", 6, 8)):
        from exllamav3.cache import CacheLayer_fp16, CacheLayer_quant

        kw: dict[str, Any] = {"layer_type": CacheLayer_fp16} if kb is None else {
            "layer_type": CacheLayer_quant, "k_bits": kb, "v_bits": vb}
        cache = exl3.Cache(fresh, max_num_tokens=8192, **kw)
        lib_cache = sum(int(layer.storage_size()) for layer in cache.layers.values())
        assert cache_layer_bytes(arch, Exl3Settings(max_num_tokens=8192, cache=mode)) * arch.num_hidden_layers == lib_cache
