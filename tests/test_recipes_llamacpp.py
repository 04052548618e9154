"""The llama-cpp-python recipe runs as printed (plus ``verbose=False``, to keep test output quiet) against the
real llama-cpp-python (CPU build)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf_util import llama_cpp_available, write_tiny_gguf

from optimizer.formats.gguf import GGML_TYPE_IDS
from optimizer.recipes import RunSpec, recipe
from optimizer.vram import Split

if not llama_cpp_available():
    pytest.skip("llama-cpp-python is not installed", allow_module_level=True)


@pytest.mark.parametrize("cache", ["f16", "q8_0/f16", "q4_0/f16"])
@pytest.mark.parametrize("split", [Split(), Split(mode="manual", gpu_split=(3.0, 1.0))], ids=["1gpu", "manual"])
def test_llama_cpp_python_recipe_runs_as_printed(tmp_path: Path, cache: str, split: Split) -> None:
    path = write_tiny_gguf(tmp_path / "tiny 'model'.gguf")
    spec = RunSpec(fmt="gguf", label="tiny", model_path=str(path), max_seq_len=256, cache=cache, split=split, chunk_len=128)
    ns: dict = {}
    exec(recipe(spec, tool="python").text.replace("llm = llama_cpp.Llama(", "llm = llama_cpp.Llama(verbose=False, "), ns)
    llm = ns["llm"]
    try:
        k, _, v = cache.partition("/")
        assert llm.n_ctx() == 256 and llm.n_batch == 128
        assert (llm.context_params.type_k, llm.context_params.type_v) == (GGML_TYPE_IDS[k], GGML_TYPE_IDS[v or k])
        assert llm.context_params.flash_attn_type == 0  # V is f16: flash attention off, as the prediction assumed
        assert llm.tensor_split == (None if split.mode == "single" else [3.0, 1.0])
    finally:
        llm.close()
