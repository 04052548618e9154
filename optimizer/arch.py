"""ModelArch: the dimensions of a model, read from config.json, independent of the quant format.

Keys are looked up the way ExLlamaV2 0.3.2 does (``exllamav2/config.py`` ``read()``): every listed
top-level key in order first, then the same keys under ``text_config`` (multimodal configs).
The context length is the first of ``max_sequence_length``, ``model_max_length``,
``max_position_embeddings``, ``max_seq_len``, ``n_positions`` (default 2048), as in ExLlamaV2.

An architecture that is not in :data:`ARCHITECTURES` is refused by name: ExLlamaV2 itself would load
it as Llama with a warning, and a VRAM estimate built on that guess is worse than no estimate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from optimizer.errors import ModelConfigError, UnsupportedArchitectureError

#: Hard caps on dimensions; anything above is a hostile or corrupt config.
_MAX_DIM = 1 << 22  # 4M (hidden, intermediate, vocab)
_MAX_LAYERS = 4096
_MAX_HEADS = 65536
_MAX_CTX = 1 << 26  # 64M tokens


@dataclass(frozen=True)
class ArchSpec:
    """What differs between architectures for memory purposes.

    Attributes:
        lm_prefix: tensor-name prefix of the language model (Gemma 3: ``language_model.``).
        is_moe: MLP is a mixture of experts (``ExLlamaV2MoEMLP``).
        parallel_decoder: attention and MLP share one module (Cohere).
        residual_fp32: the residual stream is FP32 (Gemma 2/3), doubling its transient size.
        rope_bases: number of RoPE sin/cos table pairs per device (2 when there is an alt base).
        head_tied_name: tensor key used as lm_head when the head is tied to the embedding.
        defaults: config defaults ExLlamaV2 applies for this arch (``head_dim`` etc.).
    """

    lm_prefix: str = ""
    is_moe: bool = False
    parallel_decoder: bool = False
    residual_fp32: bool = False
    rope_bases: int = 1
    defaults: tuple[tuple[str, int], ...] = ()


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(),
    "MistralForCausalLM": ArchSpec(),
    "YiForCausalLM": ArchSpec(),
    "MixtralForCausalLM": ArchSpec(is_moe=True),
    "Qwen2ForCausalLM": ArchSpec(),
    "Qwen3ForCausalLM": ArchSpec(),
    "Qwen3MoeForCausalLM": ArchSpec(is_moe=True),
    "Gemma2ForCausalLM": ArchSpec(residual_fp32=True),
    "Gemma3ForConditionalGeneration": ArchSpec(
        lm_prefix="language_model.",
        residual_fp32=True,
        rope_bases=2,
        defaults=(
            ("vocab_size", 262208),
            ("head_dim", 256),
            ("num_attention_heads", 8),
            ("num_key_value_heads", 4),
        ),
    ),
    "Phi3ForCausalLM": ArchSpec(),
    "CohereForCausalLM": ArchSpec(parallel_decoder=True),
}

CTX_KEYS = ("max_sequence_length", "model_max_length", "max_position_embeddings", "max_seq_len", "n_positions")
DEFAULT_CTX = 2048


@dataclass(frozen=True)
class ModelArch:
    """Dimensions of the language model. All sizes are element counts, not bytes.

    ``max_seq_len`` is the context ExLlamaV2 would allocate by default (see module docstring).
    ``bits``/``head_bits`` come from the exl2 ``quantization_config`` (None on quants made
    before March 2024, which carry no such block).
    """

    architecture: str
    spec: ArchSpec
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    max_seq_len: int
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    bits: float | None = None
    head_bits: int | None = None

    @property
    def kv_dim(self) -> int:
        """Elements per token per layer in K (or V): ``num_key_value_heads * head_dim``."""
        return self.num_key_value_heads * self.head_dim

    @property
    def rot_dim(self) -> int:
        """RoPE table width: ``head_dim * partial_rotary_factor``."""
        return int(self.head_dim * self.partial_rotary_factor)


_MISSING = object()


def _lookup(cfg: Mapping[str, Any], keys: tuple[str, ...] | str) -> Any:
    """ExLlamaV2's ``read()`` order: all top-level keys, then all under ``text_config``."""
    if isinstance(keys, str):
        keys = (keys,)
    tc = cfg.get("text_config")
    scopes: list[Mapping[str, Any]] = [cfg]
    if isinstance(tc, Mapping):
        scopes.append(tc)
    for scope in scopes:
        for k in keys:
            v = scope.get(k)
            if v is not None:
                return v
    return _MISSING


def _int(cfg: Mapping[str, Any], keys: tuple[str, ...] | str, *, default: Any = _MISSING,
         lo: int = 1, hi: int = _MAX_DIM, what: str | None = None) -> int:
    v = _lookup(cfg, keys)
    name = what or (keys if isinstance(keys, str) else keys[0])
    if v is _MISSING:
        if default is _MISSING:
            raise ModelConfigError(f"config.json lacks {name!r}, which the VRAM model needs")
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ModelConfigError(f"config.json: {name!r} must be an integer, got {v!r}")
    iv = int(v)
    if not lo <= iv <= hi:
        raise ModelConfigError(f"config.json: {name!r} = {iv} is out of range [{lo}, {hi}]")
    return iv


def parse_arch(config: Mapping[str, Any], *, architectures: Mapping[str, ArchSpec] | None = None) -> ModelArch:
    """Build a :class:`ModelArch` from a parsed config.json.

    ``architectures`` is the table of architectures the caller's format sizes (default
    :data:`ARCHITECTURES`, ExLlamaV2's set; a format whose engine knows others passes its own).

    Raises:
        ModelConfigError: a needed dimension is missing, of the wrong type, or out of range.
        UnsupportedArchitectureError: the architecture is not one exl2opt can size.
    """
    if not isinstance(config, Mapping):
        raise ModelConfigError("config.json must be a JSON object")
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ModelConfigError("config.json lacks 'architectures' (a list naming the model class)")
    name = archs[0]
    table = ARCHITECTURES if architectures is None else architectures
    spec = table.get(name)
    if spec is None:
        supported = ", ".join(sorted(table))
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not supported by exl2opt's VRAM model (supported: {supported})"
        )
    d = dict(spec.defaults)
    hidden = _int(config, ("hidden_size", "d_model", "n_embd"))
    n_heads = _int(config, ("num_attention_heads", "n_heads", "n_head"), default=d.get("num_attention_heads", _MISSING), hi=_MAX_HEADS)
    head_dim = _int(config, "head_dim", default=d.get("head_dim", hidden // n_heads if hidden >= n_heads else _MISSING), hi=65536)
    n_kv = _int(config, ("num_key_value_heads",), default=d.get("num_key_value_heads", n_heads), hi=_MAX_HEADS)
    if n_heads % n_kv:
        raise ModelConfigError(
            f"config.json: num_attention_heads ({n_heads}) is not a multiple of num_key_value_heads ({n_kv})"
        )
    layers = _int(config, ("num_hidden_layers", "n_layers", "n_layer"), hi=_MAX_LAYERS)
    inter = _int(config, ("intermediate_size", "n_inner"))
    experts: int | None = None
    per_tok: int | None = None
    if spec.is_moe:
        experts = _int(config, ("num_local_experts", "num_experts", "n_routed_experts"), hi=4096)
        per_tok = _int(config, ("num_experts_per_tok",), hi=experts)
        inter = _int(config, ("moe_intermediate_size",), default=inter)
    vocab = _int(config, "vocab_size", default=d.get("vocab_size", _MISSING))
    ctx = _int(config, CTX_KEYS, default=DEFAULT_CTX, hi=_MAX_CTX, what="max_position_embeddings")
    prf = _lookup(config, "partial_rotary_factor")
    if prf is _MISSING:
        prf = 1.0
    if isinstance(prf, bool) or not isinstance(prf, (int, float)) or not 0 < prf <= 1:
        raise ModelConfigError(f"config.json: partial_rotary_factor must be in (0, 1], got {prf!r}")
    bits, head_bits = quant_bits(config)
    tie = config.get("tie_word_embeddings", False)
    return ModelArch(
        architecture=name,
        spec=spec,
        hidden_size=hidden,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        num_hidden_layers=layers,
        intermediate_size=inter,
        vocab_size=vocab,
        max_seq_len=ctx,
        num_experts=experts,
        num_experts_per_tok=per_tok,
        partial_rotary_factor=float(prf),
        tie_word_embeddings=bool(tie) if isinstance(tie, bool) else False,
        bits=bits,
        head_bits=head_bits,
    )


def quant_bits(config: Mapping[str, Any]) -> tuple[float | None, int | None]:
    """``bits`` and ``head_bits`` of a quant format's ``quantization_config`` block (None if absent);
    which ``quant_method`` values count is the formats registry's business."""
    from optimizer.formats import quant_bits as registered

    return registered(config)
