"""Hostile GGUF metadata (issue 9, class 3): one validator, one clear line, memory bounded.

The red-team examples run as fixed cases through the CLI (local file and fake Hub); generated
headers (hypothesis) check that any value of any type for the keys the memory rules read either
gives sizes within range or one typed error, never another exception.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from fakehub import FakeFile, FakeRepo
from gguf_raw import (
    ARR,
    BOOL,
    F32,
    F64,
    I32,
    I64,
    RAW_ARR,
    STR,
    U8,
    U32,
    U64,
    gguf_bytes,
    nested_array,
    tiny_llama_kv,
    tiny_llama_tensors,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from optimizer.errors import Exl2optError, WeightsHeaderError
from optimizer.formats.gguf import LlamaSettings, kv_bytes, model_from_config, read_header
from optimizer.formats.gguf_meta import MAX_CTX, MAX_DIM, MAX_HEADS, MAX_LAYERS
from optimizer.sources import HubOptions, RepoSpec
from optimizer.sources.gguf_local import variant_from_headers
from optimizer.sources.hub import discover_hub
from optimizer.variant import Location

ROOT = Path(__file__).resolve().parents[1]


def _read(data: bytes):  # type: ignore[no-untyped-def]
    return read_header(lambda o, n: data[o:o + n], name="x.gguf", chunk_bytes=4096)


def _model(data: bytes):  # type: ignore[no-untyped-def]
    v = variant_from_headers([_read(data)], location=Location(kind="local", path="x.gguf", files=("x.gguf",)), name="x")
    return model_from_config(v.config, v.tensors)


def test_valid_tiny_header_sizes():
    m = _model(gguf_bytes(tiny_llama_kv(), tiny_llama_tensors()))
    assert (m.n_layer, m.n_embd, m.n_head, m.n_head_kv, m.n_vocab) == (2, 64, 4, (2, 2), 320)


RED_TEAM = {
    "block_count=10^8": tiny_llama_kv(block_count=(U64, 10**8)),
    "block_count=0": tiny_llama_kv(block_count=(U32, 0)),
    "block_count=-5": tiny_llama_kv(block_count=(I32, -5)),
    "block_count='two'": tiny_llama_kv(block_count=(STR, "two")),
    "block_count=true": tiny_llama_kv(block_count=(BOOL, True)),
    "context_length=inf": tiny_llama_kv(context_length=(F64, math.inf)),
    "embedding_length=-256": tiny_llama_kv(embedding_length=(I32, -256)),
    "general.alignment='x'": [*tiny_llama_kv()[:1], ("general.alignment", STR, "x"), *tiny_llama_kv()[2:]],
    "general.alignment=24": [*tiny_llama_kv()[:1], ("general.alignment", U32, 24), *tiny_llama_kv()[2:]],
    "head_count_kv array shorter": tiny_llama_kv(attention__head_count_kv=(ARR, (U32, [2]))),
    "head_count_kv array of strings": tiny_llama_kv(attention__head_count_kv=(ARR, (STR, ["2", "2"]))),
    "arrays nested 5000 deep": tiny_llama_kv() + [("evil", RAW_ARR, nested_array(5000))],
    "duplicate key": tiny_llama_kv() + [("llama.block_count", U32, 2)],
}


@pytest.mark.parametrize("case", sorted(RED_TEAM))
def test_red_team_metadata_is_one_typed_error(case):
    data = gguf_bytes(RED_TEAM[case], tiny_llama_tensors())
    with pytest.raises(WeightsHeaderError) as e:
        _model(data)
    assert "\n" not in str(e.value) and "x.gguf" in str(e.value)


def test_huge_tensor_is_refused_not_a_150_digit_figure():
    big = [("blk.0.attn_q.weight", (2**64 - 1,) * 4, 0, 0)]
    with pytest.raises(WeightsHeaderError, match="implausibl"):
        _read(gguf_bytes(tiny_llama_kv(), big + tiny_llama_tensors()))
    with pytest.raises(WeightsHeaderError, match="dimensions"):
        _read(gguf_bytes(tiny_llama_kv(), [("t", (1,) * 9, 0, 0)]))


def test_huge_claimed_counts_are_refused_before_reading():
    tracemalloc.start()
    t0 = time.perf_counter()
    for kv in ([("a", ARR, (U64, []))],):
        data = bytearray(gguf_bytes(kv))
        data[-8:] = (2**62).to_bytes(8, "little")  # the array claims 2^62 elements
        with pytest.raises(WeightsHeaderError, match="more than the header can hold"):
            _read(bytes(data))
    strs = bytearray(gguf_bytes([("tokenizer.ggml.tokens", ARR, (STR, []))]))
    strs[-8:] = (2**40).to_bytes(8, "little")
    with pytest.raises(WeightsHeaderError):
        _read(bytes(strs))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 2 and peak < 8 * 2**20


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "optimizer", *args], capture_output=True, text=True, env=e, timeout=120)


def test_cli_block_count_1e8_local_is_refused_fast(tmp_path):
    p = tmp_path / "evil.gguf"
    p.write_bytes(gguf_bytes(tiny_llama_kv(block_count=(U64, 10**8)), tiny_llama_tensors()))
    assert p.stat().st_size < 2048
    t0 = time.perf_counter()
    r = _cli("plan", "-m", str(p), "--vram", "24GB", "--ctx", "4096")
    assert time.perf_counter() - t0 < 30
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "block_count" in r.stderr, r.stderr


def test_block_count_1e8_on_the_hub_is_refused(fake_hub, tmp_path):
    data = gguf_bytes(tiny_llama_kv(block_count=(U64, 10**8)), tiny_llama_tensors())
    fake_hub.add(FakeRepo("org/evil-GGUF", {"main": {"M-Q4_0.gguf": FakeFile(data)}}))
    with pytest.raises(WeightsHeaderError, match="block_count"):
        discover_hub(spec=RepoSpec("org/evil-GGUF"), options=HubOptions(endpoint=fake_hub.endpoint,
                                                                         cache_dir=str(tmp_path / "c")))


@pytest.mark.parametrize("case", ["block_count=-5", "context_length=inf", "head_count_kv array shorter",
                                  "arrays nested 5000 deep", "general.alignment='x'"])
def test_cli_red_team_cases_are_one_line(tmp_path, case):
    p = tmp_path / "evil.gguf"
    p.write_bytes(gguf_bytes(RED_TEAM[case], tiny_llama_tensors()))
    r = _cli("plan", "-m", str(p), "--vram", "24GB", "--ctx", "4096")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "internal error" not in r.stderr, r.stderr


# ----- generated headers ---------------------------------------------------------------------

KEYS = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "attention.key_length", "attention.value_length", "attention.sliding_window",
        "vocab_size"]
INTS = st.one_of(st.integers(-(2**31), 2**31 - 1).map(lambda x: (I32, x)), st.integers(0, 2**64 - 1).map(lambda x: (U64, x)),
                 st.integers(-(2**63), 2**63 - 1).map(lambda x: (I64, x)), st.integers(0, 4096).map(lambda x: (U32, x)))
VALUES = st.one_of(
    INTS, INTS, st.floats(allow_nan=True).map(lambda x: (F64, x)), st.floats(width=32).map(lambda x: (F32, x)),
    st.booleans().map(lambda x: (BOOL, x)), st.text(max_size=8).map(lambda x: (STR, x)),
    st.lists(st.integers(0, 70000), max_size=5).map(lambda xs: (ARR, (U32, xs))),
    st.lists(st.integers(0, 255), max_size=3).map(lambda xs: (ARR, (U8, xs))),
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), st.one_of(st.none(), VALUES), max_size=5))
def test_any_metadata_gives_sizes_in_range_or_one_typed_error(override):
    kv = tiny_llama_kv(**{k.replace(".", "__"): v for k, v in override.items()})
    try:
        m = _model(gguf_bytes(kv, tiny_llama_tensors()))
    except Exl2optError as e:
        assert "\n" not in str(e)
        return
    assert 1 <= m.n_layer <= MAX_LAYERS and len(m.n_head_kv) == m.n_layer and len(m.layer_bytes) == m.n_layer
    assert 1 <= m.n_embd <= MAX_DIM and 1 <= m.n_head <= MAX_HEADS and all(0 <= h <= MAX_HEADS for h in m.n_head_kv)
    assert 1 <= m.n_ctx_train <= MAX_CTX and 0 <= m.n_ff <= MAX_DIM
    try:
        kv_total = kv_bytes(m, LlamaSettings(n_ctx=4096))
    except Exl2optError:
        return  # e.g. a head dimension that is not whole blocks of the cache type
    assert 0 <= kv_total < 2**60


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_headers_never_raise_anything_but_a_typed_error(data):
    raw = bytearray(gguf_bytes(tiny_llama_kv(), tiny_llama_tensors()))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(8, len(raw)))
    try:
        m = _model(bytes(raw[:cut]))
    except Exl2optError:
        return
    assert 0 <= m.total_bytes < 2**60 and all(b >= 0 for b in m.layer_bytes)
