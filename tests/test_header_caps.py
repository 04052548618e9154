"""Safetensors header caps that hold for any JSON (issue 9, class 5).

A differential property test against ``json.loads`` plus the safetensors format rules, over
generated documents written with random spacing and escaping; the tensor cap counted entry by
entry (escaped keys included); and the memory multiple stated in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optimizer.safetensors_header as sh
from optimizer.errors import WeightsHeaderError
from optimizer.safetensors_header import DTYPE_BYTES, parse_header_json

#: The bound stated in docs/reliability.md: peak traced memory while reading a header, as a
#: multiple of the header's size (plus 1 MiB of fixed cost).
MEMORY_MULTIPLE = 10

JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                    max_leaves=8)
DIMS = st.lists(st.integers(0, 9), max_size=4)


@st.composite
def entries(draw: Any) -> dict[str, Any]:
    """A tensor entry: usually valid, sometimes with a field of a wrong type, missing or extra."""
    dtype = draw(st.sampled_from([*DTYPE_BYTES, "Q99"]))
    shape = draw(DIMS)
    begin = draw(st.integers(0, 64))
    n = 1
    for d in shape:
        n *= d
    end = begin + n * DTYPE_BYTES.get(dtype, 1) + draw(st.sampled_from([0, 0, 0, 1]))
    e: dict[str, Any] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    mutation = draw(st.sampled_from(["none"] * 6 + ["drop", "extra", "retype"]))
    field = draw(st.sampled_from(sorted(e)))
    if mutation == "drop":
        del e[field]
    elif mutation == "extra":
        e[draw(st.text(max_size=5))] = draw(JSON)
    elif mutation == "retype":
        e[field] = draw(JSON)
    return e


def reference(doc: Any) -> list[tuple[str, str, tuple[int, ...], int]] | None:
    """What the format allows, from the parsed document (None: refuse)."""
    if not isinstance(doc, dict):
        return None
    out = []
    for k, v in doc.items():
        if k == "__metadata__":
            if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
                return None
            continue
        if not isinstance(v, dict) or set(v) != {"dtype", "shape", "data_offsets"}:
            return None
        dt, shape, offs = v["dtype"], v["shape"], v["data_offsets"]
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in [*shape, *offs]) if isinstance(shape, list) \
            and isinstance(offs, list) else False
        if not (isinstance(dt, str) and dt in DTYPE_BYTES and ints and len(shape) <= 8 and all(x >= 0 for x in shape)
                and len(offs) == 2 and 0 <= offs[0] <= offs[1]):
            return None
        n = 1
        for d in shape:
            n *= d
        if offs[1] - offs[0] != n * DTYPE_BYTES[dt]:
            return None
        out.append((k, dt, tuple(shape), offs[0], offs[1]))
    out.sort(key=lambda r: (r[3], r[4]))
    prev = 0
    for r in out:
        if r[3] < prev:
            return None
        prev = r[4]
    return [(k, dt, s, e - b) for k, dt, s, b, e in out]


@settings(max_examples=400, deadline=None)
@given(doc=st.one_of(
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "__metadata__"), entries(), max_size=5),
    st.builds(lambda d, m: {**d, "__metadata__": m},
              st.dictionaries(st.text(max_size=8), entries(), max_size=3),
              st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3), JSON)),
    JSON),
    ascii_only=st.booleans(), indent=st.sampled_from([None, 0, 1]), seps=st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]))
def test_the_streaming_reader_agrees_with_the_format_rules(doc, ascii_only, indent, seps):
    raw = json.dumps(doc, ensure_ascii=ascii_only, indent=indent, separators=seps).encode("utf-8", "surrogatepass")
    want = reference(doc)
    try:
        got = parse_header_json(raw, name="h")
    except WeightsHeaderError as e:
        assert "\n" not in str(e)
        assert want is None, f"refused a valid header: {e}"
        return
    assert want is not None, "accepted a header the format refuses"
    assert [(t.name, t.dtype, t.shape, t.nbytes) for t in got] == want


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 14), escaped=st.lists(st.booleans(), min_size=14, max_size=14))
def test_the_tensor_cap_counts_entries_whatever_their_spelling(monkeypatch_cap, n, escaped):
    """Keys and field names written with ``\\uXXXX`` escapes count like plain ones."""
    parts = []
    for i in range(n):
        key = f"t{i}"
        if escaped[i]:
            key_json = '"' + "".join(f"\\u{ord(c):04x}" for c in key) + '"'
            fields = f'"d\\u0074ype":"U8","sh\\u0061pe":[1],"data_\\u006fffsets":[{i},{i + 1}]'
        else:
            key_json = json.dumps(key)
            fields = f'"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]'
        parts.append(f"{key_json}:{{{fields}}}")
    raw = ("{" + ",".join(parts) + "}").encode()
    if n > 10:
        with pytest.raises(WeightsHeaderError, match="more than 10 tensors"):
            parse_header_json(raw, name="h")
    else:
        assert len(parse_header_json(raw, name="h")) == n


@pytest.fixture
def monkeypatch_cap(monkeypatch):
    monkeypatch.setattr(sh, "MAX_TENSORS", 10)


def _peak(raw: bytes) -> int:
    tracemalloc.start()
    try:
        with contextlib.suppress(WeightsHeaderError):
            parse_header_json(raw, name="h")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["short names, no dims", "8 dims", "metadata of empty lists", "metadata strings",
                                  "escaped keys"])
def test_memory_stays_within_the_stated_multiple_of_the_header(kind):
    n = 20_000
    if kind == "short names, no dims":
        raw = b"{" + b",".join(b'"%x":{"dtype":"U8","shape":[],"data_offsets":[%d,%d]}' % (i, i, i + 1) for i in range(n)) + b"}"
    elif kind == "8 dims":
        raw = b"{" + b",".join(b'"%x":{"dtype":"U8","shape":[1,1,1,1,1,1,1,1],"data_offsets":[%d,%d]}' % (i, i, i + 1)
                               for i in range(n)) + b"}"
    elif kind == "metadata of empty lists":
        raw = b'{"__metadata__":{"a":' + b"[]," * 1_000_000 + b"[]}}"
    elif kind == "metadata strings":
        raw = b'{"__metadata__":{' + b",".join(b'"%x":"ab"' % i for i in range(200_000)) + b"}}"
    else:
        raw = b"{" + b",".join(b'"\\u0074%x":{"dtype":"U8","shape":[],"data_offsets":[%d,%d]}' % (i, i, i + 1)
                               for i in range(n)) + b"}"
    peak = _peak(raw)
    assert peak <= MEMORY_MULTIPLE * len(raw) + 2**20, f"{kind}: {peak / len(raw):.1f}x of {len(raw)} bytes"
