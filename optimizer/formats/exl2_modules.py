"""ExLlamaV2 0.3.2 (exl2) modules: a variant's stored tensors grouped into the modules the library builds.

ExLlamaV2 loads one module per attention block (with its pre/post norms; the whole layer for a
parallel decoder), one per MLP (with its norms), the final norm and ``lm_head``, in that order; the
token embedding stays in system RAM. Norms count ``hidden_size * 2`` bytes whatever their stored
shape, as the library's ``weight_footprint()`` does (checked by ``tests/test_oracle_exllamav2.py``).
The grouping depends on the tensors only, so it is done once per variant (:func:`module_table`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from optimizer.arch import ModelArch
from optimizer.errors import ModelConfigError
from optimizer.variant import TensorInfo
from optimizer.vram import ModuleTable

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_ATTN_NORMS = ("input_layernorm.", "ln1.")
_ATTN_POST_NORMS_GEMMA = ("post_attention_layernorm.",)
_AS_STORED, _NORM_WEIGHT, _NORM_BIAS = 0, 1, 2


def _size_rule(name: str) -> int:
    """How ExLlamaV2 counts a tensor: as stored, as a norm weight (``2 * hidden``) or not at all."""
    if name.endswith("norm.weight"):
        return _NORM_WEIGHT
    if name.endswith("norm.bias"):
        return _NORM_BIAS  # LayerNorm.weight_footprint() counts the weight only
    return _AS_STORED


def group_modules(arch: ModelArch, tensors: Iterable[TensorInfo], *,
                  dropped: list[TensorInfo] | None = None) -> dict[str, int]:
    """Bytes per ExLlamaV2 module key, in load order; the embedding is keyed ``embed`` (CPU).

    Tensors outside the language model (vision tower, projector) are dropped: a text-only load
    never reads them. Every dropped tensor is appended to ``dropped`` when given (see
    ``optimizer.formats.accounting``, which refuses weights these rules do not account for).
    """
    prefix = arch.spec.lm_prefix
    n_layers = arch.num_hidden_layers
    norm_bytes = 2 * arch.hidden_size  # ExLlamaV2 RMSNorm/LayerNorm/HeadNorm.weight_footprint()
    attn: list[int] = [0] * n_layers
    mlp: list[int] = [0] * n_layers
    out: dict[str, int] = {"embed": 0}
    norm = head = 0
    gemma_post = arch.spec.residual_fp32  # Gemma 2/3: post_attention_layernorm belongs to attention
    parallel = arch.spec.parallel_decoder
    # Per layer-tensor suffix ("self_attn.q_proj.q_weight"): (counts toward attention, size rule).
    # Every layer repeats the same few dozen suffixes, so each is classified once.
    classes: dict[str, tuple[bool, int]] = {}
    match = _LAYER_RE.match
    for t in tensors:
        name = t.name
        if prefix:
            if not name.startswith(prefix):
                if name.startswith("lm_head."):
                    head += t.nbytes
                elif dropped is not None:
                    dropped.append(t)
                continue
            name = name[len(prefix):]
        m = match(name)
        if m is not None:
            num, rest = m.groups()
            i = int(num)
            if i >= n_layers:
                raise ModelConfigError(
                    f"weights hold layer {i} but config.json says num_hidden_layers = {n_layers}"
                )
            cls = classes.get(rest)
            if cls is None:
                to_attn = parallel or rest.startswith(("self_attn.", *_ATTN_NORMS)) or (
                    gemma_post and rest.startswith(_ATTN_POST_NORMS_GEMMA))
                cls = classes[rest] = (to_attn, _size_rule(rest))
            rule = cls[1]
            nbytes = t.nbytes if rule == _AS_STORED else (norm_bytes if rule == _NORM_WEIGHT else 0)
            if cls[0]:
                attn[i] += nbytes
            else:
                mlp[i] += nbytes
            continue
        nbytes = t.nbytes
        rule = _size_rule(name)
        if rule != _AS_STORED:
            nbytes = norm_bytes if rule == _NORM_WEIGHT else 0
        if name.startswith("model.embed_tokens."):
            out["embed"] += t.nbytes
        elif name.startswith("lm_head."):
            head += nbytes
        elif name.startswith("model.norm."):
            norm += nbytes
        elif dropped is not None:
            dropped.append(t)
    for i in range(n_layers):
        out[f"model.layers.{i}.self_attn"] = attn[i]
        if not arch.spec.parallel_decoder:
            out[f"model.layers.{i}.mlp"] = mlp[i]
    out["model.norm"] = norm
    out["lm_head"] = head
    return out


#: Module kinds of an exl2 :class:`~optimizer.vram.ModuleTable`: attention (owns a cache layer),
#: MLP, the rest (norms), the output head.
KIND_ATTN, KIND_MLP, KIND_OTHER, KIND_HEAD = 0, 1, 2, 3
_KIND_KV = (True, False, False, False)


def module_table(arch: ModelArch, tensors: Iterable[TensorInfo]) -> ModuleTable:
    """The GPU modules of ``arch`` loaded from ``tensors``, in load order (embedding excluded).

    Independent of context, cache and runtime settings, so callers build it once per variant.

    Raises:
        ModelConfigError: the tensors do not belong to this architecture.
    """
    return table_of(group_modules(arch, tensors))


def table_of(groups: dict[str, int]) -> ModuleTable:
    """:func:`group_modules`'s result as a :class:`ModuleTable` (the embedding left out)."""
    names: list[str] = []
    weights: list[int] = []
    kinds: list[int] = []
    for key, nbytes in groups.items():
        if key == "embed":
            continue
        names.append(key)
        weights.append(nbytes)
        if key.endswith(".self_attn"):
            kinds.append(KIND_ATTN)
        elif key.endswith(".mlp"):
            kinds.append(KIND_MLP)
        elif key == "lm_head":
            kinds.append(KIND_HEAD)
        else:
            kinds.append(KIND_OTHER)
    return ModuleTable(names=tuple(names), weights=tuple(weights), kinds=tuple(kinds), kind_kv=_KIND_KV)
