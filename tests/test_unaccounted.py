"""Weights the memory rules do not account for are refused, never summed to zero (issue 9, class 4)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from exl2_fixtures import TINY_LLAMA, synth_tensors
from gguf_raw import gguf_bytes, tiny_llama_kv, tiny_llama_tensors
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle_util import tiny_gemma3_config

from optimizer.errors import WeightsHeaderError
from optimizer.formats import RuntimeOptions
from optimizer.formats.accounting import TOLERATED_BYTES
from optimizer.formats.exl2_rules import variant_plan
from optimizer.formats.gguf import model_from_config, read_header
from optimizer.safetensors_header import write_header_only
from optimizer.sources.gguf_local import variant_from_headers
from optimizer.variant import Location, TensorInfo, Variant

ROOT = Path(__file__).resolve().parents[1]


def _variant(config: dict, tensors: list[TensorInfo]) -> Variant:
    """A variant with its own location (variants compare by location; the rules cache per variant)."""
    import uuid

    return Variant(format="exl2", label="x", location=Location(kind="local", path=f"/m/{uuid.uuid4().hex}"),
                   config=config, tensors=tuple(tensors))


def _plan_bytes(v: Variant) -> int:
    plan = variant_plan(v, max_seq_len=256, cache="fp16", runtime=RuntimeOptions())
    return sum(m.weight_bytes for m in plan.modules)


def _t(name: str, nbytes: int) -> TensorInfo:
    return TensorInfo(name=name, dtype="U8", shape=(nbytes,), nbytes=nbytes)


def test_decoy_layer_and_100_gb_under_another_prefix_is_refused(tmp_path):
    """The red-team shard: one decoy ``model.layers.0.x`` and 100 GB under ``transformer.``."""
    d = tmp_path / "evil"
    d.mkdir()
    cfg = {**TINY_LLAMA, "num_hidden_layers": 1}
    (d / "config.json").write_text(json.dumps(cfg))
    write_header_only(d / "output.safetensors", {"model.layers.0.x": ("F16", (8,)),
                                                 "transformer.layers.0.weight": ("F16", (200_000, 250_000))})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "optimizer", "plan", "-m", str(d), "--vram", "24GB", "--ctx", "4096"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "100000000000 bytes" in r.stderr and "transformer.layers.0.weight" in r.stderr and "fits" not in r.stdout


def test_gemma3_config_over_llama_named_tensors_is_refused():
    cfg = tiny_gemma3_config()
    llama = synth_tensors({**TINY_LLAMA, "hidden_size": 256, "num_hidden_layers": 2}, bits=4.0)
    with pytest.raises(WeightsHeaderError, match="do not account for"):
        _plan_bytes(_variant(cfg, llama))


def test_gemma3_vision_tower_is_ignored_but_a_llama_one_is_not():
    cfg = tiny_gemma3_config()
    lm = synth_tensors(cfg, bits=4.0)
    vision = [_t("vision_tower.encoder.layers.0.w", 50 * 2**20), _t("multi_modal_projector.w", 4 * 2**20)]
    assert _plan_bytes(_variant(cfg, lm + vision)) == _plan_bytes(_variant(cfg, lm))
    llama = synth_tensors(TINY_LLAMA, bits=4.0)
    with pytest.raises(WeightsHeaderError, match="vision_tower"):
        _plan_bytes(_variant(TINY_LLAMA, llama + vision))


def test_declared_layer_without_tensors_is_refused():
    tensors = [t for t in synth_tensors(TINY_LLAMA, bits=4.0) if not t.name.startswith("model.layers.3.")]
    with pytest.raises(WeightsHeaderError, match="layer 3"):
        _plan_bytes(_variant(TINY_LLAMA, tensors))


# An independent statement of the Llama naming rules: what ExLlamaV2 loads for a Llama model.
_LLAMA_LOADED = re.compile(r"^(?:model\.embed_tokens\.|model\.norm\.|lm_head\.|model\.layers\.(\d+)\.)")
EXTRA_NAMES = st.one_of(
    st.sampled_from(["transformer.layers.0.weight", "model.decoy", "language_model.model.layers.0.mlp.w",
                     "vision_tower.x", "model.layers.0.mlp.extra", "model.layers.1.self_attn.extra", "lm_head.bias",
                     "model.rotary_emb.inv_freq", "decoder.layers.0.w", "model.norm.bias"]),
    st.from_regex(r"[a-z_]{1,8}(\.[a-z0-9_]{1,8}){0,3}", fullmatch=True),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(EXTRA_NAMES, st.integers(1, 10**12)), max_size=4, unique_by=lambda x: x[0]))
def test_accepted_tables_leave_out_at_most_the_tolerated_bytes(extra):
    base = synth_tensors(TINY_LLAMA, bits=4.0)
    names = {t.name for t in base}
    tensors = base + [_t(n, b) for n, b in extra if n not in names]
    try:
        _plan_bytes(_variant(TINY_LLAMA, tensors))
    except WeightsHeaderError as e:
        assert "\n" not in str(e)
        left_out = sum(t.nbytes for t in tensors if not _LLAMA_LOADED.match(t.name))
        assert left_out > TOLERATED_BYTES, f"refused with only {left_out} bytes unaccounted: {e}"
        return
    left_out = sum(t.nbytes for t in tensors if not _LLAMA_LOADED.match(t.name))
    assert left_out <= TOLERATED_BYTES
    for t in tensors:
        m = _LLAMA_LOADED.match(t.name)
        assert not (m and m.group(1) and int(m.group(1)) >= TINY_LLAMA["num_hidden_layers"])


# ----- GGUF ----------------------------------------------------------------------------------


def _gguf_model(tensors):  # type: ignore[no-untyped-def]
    data = gguf_bytes(tiny_llama_kv(), tensors)
    h = read_header(lambda o, n: data[o:o + n], name="x.gguf")
    v = variant_from_headers([h], location=Location(kind="local", path="x.gguf", files=("x.gguf",)), name="x")
    return model_from_config(v.config, v.tensors, where="x.gguf")


def test_gguf_layers_beyond_block_count_and_empty_layers_are_refused():
    with pytest.raises(WeightsHeaderError, match="beyond block_count"):
        _gguf_model(tiny_llama_tensors() + [("blk.7.ffn_up.weight", (4096, 4096), 1, 0)])
    with pytest.raises(WeightsHeaderError, match="blk.1"):
        _gguf_model([t for t in tiny_llama_tensors() if not t[0].startswith("blk.1.")])
    m = _gguf_model(tiny_llama_tensors())
    assert m.total_bytes == sum(math.prod(s) * (2 if ty == 1 else 4) for _, s, ty, _ in tiny_llama_tensors())
