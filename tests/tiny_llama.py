"""A tiny FP16 Llama-architecture model for tests (random weights) and an independent fp32 reference forward.

:func:`write_tiny_llama` writes ``config.json``, ``model.safetensors`` (FP16), a byte-level BPE
``tokenizer.json`` trained with ``tokenizers`` on :func:`corpus` text, and ``tokenizer_config.json``.
exllamav2 loads it unconverted (FP16 weights), which the CPU stand-in for its extension runs.

:func:`reference_logits` is a plain fp32 torch forward of the same weights (RMSNorm, NeoX RoPE, GQA,
causal softmax attention, SwiGLU MLP), written from the Llama definition and sharing no code with
exllamav2; :func:`reference_perplexity` scores windows the way
:class:`optimizer.backends.base.EvalProtocol` defines them, in one causal pass per window.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

SHAPE: dict[str, Any] = {
    "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 2, "vocab_size": 320, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
}
BOS, EOS = "<s>", "</s>"
_TEXT = ("""the cache holds keys and values of every layer while a model reads text one chunk after
another so that later tokens attend to earlier ones quantized caches trade precision for memory and the
search measures what that costs in perplexity and speed on each card""")
_WORDS = tuple(_TEXT.split())


def corpus(*, n_words: int, seed: int = 0) -> str:
    """Deterministic pseudo-text: words of a small vocabulary with a little local structure."""
    rng = random.Random(seed)
    out, prev = [], 0
    for i in range(n_words):
        prev = (prev + rng.choice((1, 1, 2, 3, 5, 8))) % len(_WORDS) if rng.random() < 0.7 else rng.randrange(len(_WORDS))
        out.append(_WORDS[prev])
        if i % 13 == 12:
            out.append(".\n")
    return " ".join(out)


def _train_tokenizer(path: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus(n_words=3000, seed=s) for s in range(4)], trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    return int(tok.get_vocab_size())


def write_tiny_llama(path: Path, *, seed: int = 0, qk_std: float = 0.08, vo_std: float = 0.08, **over: Any) -> Path:
    """Write the tiny model into ``path`` (created) and return it. ``over`` changes :data:`SHAPE` entries.

    Weights are N(0, 0.08) except the embedding (0.8, so logits have structure) and, with ``qk_std``
    / ``vo_std``, the attention projections: larger values make attention sharper and the attention
    output larger, so the precision of the cached keys and values shows in the logits."""
    import torch
    from safetensors.torch import save_file

    shape = dict(SHAPE, **over)
    path.mkdir(parents=True, exist_ok=True)
    n_tok = _train_tokenizer(path, shape["vocab_size"])
    assert n_tok <= shape["vocab_size"], n_tok
    h, inter, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    nh, nkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = h // nh
    g = torch.Generator().manual_seed(seed)

    def rnd(*dims: int, std: float = 0.08) -> torch.Tensor:
        return (torch.randn(*dims, generator=g) * std).half()

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(v, h, std=0.8),
                                  "model.norm.weight": (1 + rnd(h, std=0.1).float()).half(),
                                  "lm_head.weight": rnd(v, h)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + rnd(h, std=0.1).float()).half()
        t[p + "post_attention_layernorm.weight"] = (1 + rnd(h, std=0.1).float()).half()
        t[p + "self_attn.q_proj.weight"] = rnd(nh * d, h, std=qk_std)
        t[p + "self_attn.k_proj.weight"] = rnd(nkv * d, h, std=qk_std)
        t[p + "self_attn.v_proj.weight"] = rnd(nkv * d, h, std=vo_std)
        t[p + "self_attn.o_proj.weight"] = rnd(h, nh * d, std=vo_std)
        t[p + "mlp.gate_proj.weight"] = rnd(inter, h)
        t[p + "mlp.up_proj.weight"] = rnd(inter, h)
        t[p + "mlp.down_proj.weight"] = rnd(h, inter)
    save_file({k: x.contiguous() for k, x in t.items()}, str(path / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
              "max_position_embeddings": 2048, "bos_token_id": 0, "eos_token_id": 1,
              "tie_word_embeddings": False, "hidden_act": "silu", **shape}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS,
                                                            "add_bos_token": False}))
    return path


def _forward(w: dict[str, Any], cfg: dict[str, Any], ids: Any) -> Any:
    """fp32 logits (B, n, vocab) of a causal forward of ``ids`` (B, n) with weights ``w``."""
    import torch

    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, eps = h // nh, cfg["rms_norm_eps"]
    bsz, n = ids.shape

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()

    def rope(x: torch.Tensor) -> torch.Tensor:  # (B, heads, n, d), rotate-half (NeoX) pairing
        a, b = x[..., : d // 2], x[..., d // 2:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    def heads(y: torch.Tensor, name: str, k: int) -> torch.Tensor:
        return (y @ w[name].T).view(bsz, n, k, d).transpose(1, 2)

    x = w["model.embed_tokens.weight"][ids]
    mask = torch.full((n, n), -math.inf).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = norm(x, w[p + "input_layernorm.weight"])
        q = rope(heads(y, p + "self_attn.q_proj.weight", nh))
        k = rope(heads(y, p + "self_attn.k_proj.weight", nkv)).repeat_interleave(nh // nkv, dim=1)
        v = heads(y, p + "self_attn.v_proj.weight", nkv).repeat_interleave(nh // nkv, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1)
        x = x + (att @ v).transpose(1, 2).reshape(bsz, n, h) @ w[p + "self_attn.o_proj.weight"].T
        y = norm(x, w[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(y @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (y @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def reference_logits(path: Path, ids: list[int]) -> Any:
    """fp32 logits (len(ids), vocab) of one causal forward over ``ids`` (no cache)."""
    import torch
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())
    w = {k: x.float() for k, x in load_file(str(path / "model.safetensors")).items()}
    with torch.no_grad():
        return _forward(w, cfg, torch.tensor([ids]))[0]


def reference_perplexity(path: Path, tokens: list[int], *, window: int, n_windows: int, prefill: int,
                         bos: int | None) -> float:
    """Perplexity under EvalProtocol's rules: back-to-back windows, BOS replacing the first token,
    the predictions of positions ``prefill .. window-2`` scored, each window in one causal pass."""
    import torch

    nll, count = 0.0, 0
    for i in range(n_windows):
        ids = list(tokens[i * window:(i + 1) * window])
        if bos is not None:
            ids[0] = bos
        lp = torch.log_softmax(reference_logits(path, ids).double(), dim=-1)
        tgt = torch.tensor(ids[prefill + 1:])
        nll -= float(lp[prefill:window - 1].gather(-1, tgt[:, None]).sum())
        count += len(tgt)
    return math.exp(nll / count)
