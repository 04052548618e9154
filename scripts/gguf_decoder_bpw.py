"""Decoder-only bits per weight of a published GGUF file from its size: the rows added to
``optimizer/predict/data/published-ppl.csv`` from llama.cpp's perplexity tables (which print file sizes, not bpw).

decoder bpw = (file bits - token_embd bits - output bits) / decoder parameters, with the two vocabulary tensors
at the types llama.cpp's quantize gives them (``src/llama-quant.cpp`` ``llama_tensor_get_type_impl``): output
Q5_K for the IQ1/IQ2/IQ3_XXS mixes, Q8_0 for Q8_0, else Q6_K; token_embd Q2_K for IQ1_S/IQ1_M/IQ2_XXS/IQ2_XS,
IQ3_S for IQ2_S/IQ2_M/IQ3_XXS, else the mix's base type. A size printed to 0.01 GiB is +-0.012 bpw on an 8B
model; the tokenizer and norms (a few MB) are ignored. Checked against the exllamav3 chart's GGUF x positions
(Llama-3.1-8B, same shapes as Llama-3-8B): Q4_K_M 4.799 vs 4.795, IQ2_S 2.480 vs 2.476, IQ3_M 3.577 vs 3.573,
Q5_K_M 5.655 vs 5.652 from the quantize README's bits/weight.

Usage: ``python scripts/gguf_decoder_bpw.py MODEL SIZE_GIB TYPE`` (MODEL: llama3-8b, llama3-70b, llama2-70b).
"""

from __future__ import annotations

import sys

#: bits per weight of the ggml block types (ggml-common.h block sizes)
TYPE_BITS = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "q8_0": 8.5,
             "iq1_s": 1.5625, "iq1_m": 1.75, "iq2_xxs": 2.0625, "iq2_xs": 2.3125, "iq2_s": 2.5625,
             "iq3_xxs": 3.0625, "iq3_s": 3.4375, "iq4_xs": 4.25, "iq4_nl": 4.5}
#: the mix's base (default) tensor type
BASE = {"q2_k": "q2_k", "q2_k_s": "q2_k", "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k",
        "q4_k_s": "q4_k", "q4_k_m": "q4_k", "q5_k_s": "q5_k", "q5_k_m": "q5_k", "q6_k": "q6_k", "q8_0": "q8_0",
        "iq1_s": "iq1_s", "iq1_m": "iq1_m", "iq2_xxs": "iq2_xxs", "iq2_xs": "iq2_xs", "iq2_s": "iq2_xs",
        "iq2_m": "iq2_s", "iq3_xxs": "iq3_xxs", "iq3_xs": "iq3_s", "iq3_s": "iq3_s", "iq3_m": "iq3_s",
        "iq4_xs": "iq4_xs", "iq4_nl": "iq4_nl"}
#: (decoder parameters, vocab x hidden) from the models' config.json shapes
SHAPES = {"llama3-8b": (32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336), 128256 * 4096),
          "llama3-70b": (80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672), 128256 * 8192),
          "llama2-70b": (80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672), 32000 * 8192)}


def vocab_types(mix: str) -> tuple[str, str]:
    """(output, token_embd) types of a quantization mix."""
    low = {"iq2_xxs", "iq2_xs", "iq3_xxs", "iq1_s", "iq2_s", "iq2_m", "iq1_m"}
    out = "q5_k" if mix in low else "q8_0" if mix == "q8_0" else "q6_k"
    if mix in ("iq2_xxs", "iq2_xs", "iq1_s", "iq1_m"):
        emb = "q2_k"
    elif mix in ("iq2_s", "iq2_m", "iq3_xxs"):
        emb = "iq3_s"
    else:
        emb = BASE[mix]
    return out, emb


def decoder_bpw(model: str, size_gib: float, mix: str) -> float:
    dec, vocab = SHAPES[model]
    out, emb = vocab_types(mix.lower())
    bits = size_gib * 8 * 2**30 - vocab * (TYPE_BITS[out] + TYPE_BITS[emb])
    return bits / dec


if __name__ == "__main__":
    m, size, t = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    print(f"{decoder_bpw(m, size, t):.3f} (output {vocab_types(t.lower())[0]}, token_embd {vocab_types(t.lower())[1]})")
