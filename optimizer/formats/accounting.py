"""Refuse weights whose tensors the memory rules do not account for (instead of summing them to zero).

The exl2 rules (``optimizer.formats.exl2.group_modules``) count tensors by name: the embedding,
``model.layers.N.*``, ``model.norm``, ``lm_head`` (under the architecture's language-model prefix,
e.g. ``language_model.`` for Gemma 3). A tensor they do not recognise is dropped from the plan, so a
shard holding a decoy ``model.layers.0.x`` and 100 GB under ``transformer.layers.0.weight``, or a
Gemma 3 config over Llama-named tensors, would plan (almost) nothing. :func:`check_exl2` refuses:

* tensors dropped by the rules, when together they exceed :data:`TOLERATED_BYTES` -- except, for
  multimodal architectures (those with a language-model prefix), the vision tower and projector,
  which a text-only load never reads; the message names the bytes and the first tensors;
* a decoder layer that config.json declares but no tensor fills.

GGUF (:func:`check_gguf`): a ``blk.N.`` tensor with ``N`` at or beyond ``block_count`` and a layer
without tensors are refused the same way (llama.cpp refuses such files too).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from optimizer.arch import ModelArch
from optimizer.errors import WeightsHeaderError
from optimizer.units import fmt_gib
from optimizer.variant import TensorInfo

#: Bytes of unrecognised tensors tolerated (stray buffers such as ``rotary_emb.inv_freq``).
TOLERATED_BYTES = 2**20
#: Parts of multimodal checkpoints outside the language model (never loaded for text).
VISION_PREFIXES = ("vision_tower.", "vision_model.", "multi_modal_projector.", "visual.", "mm_projector.")
_BLK_RE = re.compile(r"^blk\.(\d+)\.")


def _describe(tensors: Sequence[TensorInfo]) -> str:
    total = sum(t.nbytes for t in tensors)
    names = ", ".join(repr(t.name[:80]) for t in sorted(tensors, key=lambda t: -t.nbytes)[:3])
    more = f" and {len(tensors) - 3} more" if len(tensors) > 3 else ""
    return f"{fmt_gib(total)} ({total} bytes) in {len(tensors)} tensor(s) ({names}{more})"


def check_exl2(arch: ModelArch, tensors: Iterable[TensorInfo], *, where: str,
               grouped: tuple[dict[str, int], list[TensorInfo]] | None = None) -> None:
    """Raise when the exl2 rules would leave weights out of the plan (see the module docstring).

    ``grouped``: ``group_modules``'s result and its ``dropped`` list when the caller has them already.

    Raises:
        WeightsHeaderError: unaccounted bytes above :data:`TOLERATED_BYTES`, or an empty layer.
    """
    from optimizer.formats.exl2_modules import group_modules

    if grouped is None:
        dropped: list[TensorInfo] = []
        modules = group_modules(arch, tensors, dropped=dropped)
    else:
        modules, dropped = grouped
    if arch.spec.lm_prefix:
        dropped = [t for t in dropped if not t.name.startswith(VISION_PREFIXES)]
    if sum(t.nbytes for t in dropped) > TOLERATED_BYTES:
        prefix = arch.spec.lm_prefix or "model."
        raise WeightsHeaderError(
            f"{where}: the weights hold {_describe(dropped)} that the {arch.architecture} rules do not "
            f"account for (expected names under {prefix!r}); refusing rather than planning without them")
    empty = [i for i in range(arch.num_hidden_layers)
             if modules.get(f"model.layers.{i}.self_attn", 0) + modules.get(f"model.layers.{i}.mlp", 0) == 0]
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
        raise WeightsHeaderError(f"{where}: config.json declares {arch.num_hidden_layers} layers but the weights hold "
                                 f"no tensor for {len(empty)} of them (layer {shown})")


def check_gguf(*, n_layer: int, tensors: Iterable[TensorInfo], where: str) -> None:
    """Raise for ``blk.N.`` tensors beyond ``block_count`` or layers without tensors.

    Raises:
        WeightsHeaderError: naming the bytes beyond the declared layers, or the empty layers.
    """
    beyond: list[TensorInfo] = []
    filled = [False] * n_layer
    for t in tensors:
        m = _BLK_RE.match(t.name)
        if m is None:
            continue
        i = int(m.group(1))
        if i >= n_layer:
            beyond.append(t)
        else:
            filled[i] = True
    if beyond:
        raise WeightsHeaderError(f"{where}: the header holds {_describe(beyond)} in layers beyond block_count = {n_layer}")
    empty = [i for i, f in enumerate(filled) if not f]
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
        raise WeightsHeaderError(f"{where}: block_count is {n_layer} but no tensor belongs to {len(empty)} layer(s) "
                                 f"(blk.{shown})")
