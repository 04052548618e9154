"""Hostile config.json and safetensors headers: one clear line, exit code 2, bounded memory.

Every case goes through the real CLI entry point (``optimizer.cli.main``) on a copy of the shipped
Smaug example with one file replaced. Memory is measured with ``tracemalloc`` around the parse.
"""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from optimizer.cli import main
from optimizer.errors import EXIT_USAGE, ModelConfigError, WeightsHeaderError
from optimizer.safetensors_header import MAX_HEADER_BYTES, parse_header_json, read_safetensors_header
from optimizer.sources.local import load_config_bytes

EXAMPLE = Path(__file__).resolve().parents[1] / "studies" / "examples" / "Smaug-34B-v0.1-3.0bpw-h6-exl2"
BASE_CONFIG: dict[str, Any] = json.loads((EXAMPLE / "config.json").read_text())


def _st(header: bytes, *, claimed: int | None = None, tail: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header) if claimed is None else claimed) + header + tail


def _cfg(**changes: Any) -> bytes:
    return json.dumps({**BASE_CONFIG, **changes}).encode()


def _entry(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _model_dir(tmp_path: Path, *, config: bytes | None = None, weights: bytes | None = None) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_bytes(config if config is not None else (EXAMPLE / "config.json").read_bytes())
    if weights is None:
        shutil.copy(EXAMPLE / "output.safetensors", d / "output.safetensors")
    else:
        (d / "output.safetensors").write_bytes(weights)
    return d


def _run_plan(model: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ei:
        main(["plan", "-m", str(model), "--vram", "24GB", "--ctx", "4096", "--cache", "q4", "--json"])
    out, err = capsys.readouterr()
    code = ei.value.code
    return (code if isinstance(code, int) else 1), out, err


CONFIG_CASES: dict[str, tuple[bytes, str]] = {
    "huge dimension": (_cfg(hidden_size=10**12), "out of range"),
    "negative dimension": (_cfg(num_hidden_layers=-5), "out of range"),
    "zero heads": (_cfg(num_attention_heads=0), "out of range"),
    "string dimension": (_cfg(hidden_size="7168"), "must be an integer"),
    "float dimension": (_cfg(vocab_size=64000.5), "must be an integer"),
    "bool dimension": (_cfg(num_hidden_layers=True), "must be an integer"),
    "NaN dimension": (_cfg().replace(b'"hidden_size": 7168', b'"hidden_size": NaN'), "must be an integer"),
    "Infinity dimension": (_cfg().replace(b'"hidden_size": 7168', b'"hidden_size": Infinity'), "must be an integer"),
    "10000-digit integer": (_cfg().replace(b'"hidden_size": 7168', b'"hidden_size": ' + b"9" * 10000),
                            "absurd number"),
    "huge context": (_cfg(max_position_embeddings=10**15), "out of range"),
    "kv heads not dividing heads": (_cfg(num_key_value_heads=112), "not a multiple"),
    "architectures not a list": (_cfg(architectures="LlamaForCausalLM"), "architectures"),
    "unknown architecture": (_cfg(architectures=["EvilForCausalLM"]), "not supported"),
    "deeply nested arrays": (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    "deeply nested objects": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
    "8 MiB file": (b'{"x":"' + b"a" * (8 * 2**20) + b'"}', "larger than"),
    "not UTF-8": (b'\xff\xfe{"a":1}', "not valid JSON"),
    "empty file": (b"", "not valid JSON"),
    "JSON array": (b"[1, 2]", "must be a JSON object"),
}

HEADER_CASES: dict[str, tuple[bytes, str]] = {
    "length larger than file": (_st(b"{}", claimed=5000), "larger than the file"),
    "1 GB claimed length": (_st(b"{}", claimed=2**30), "not plausible"),
    "2^64-1 claimed length": (b"\xff" * 8 + b"{}", "not plausible"),
    "shorter than 8 bytes": (b"abc", "shorter than 8 bytes"),
    "empty file": (b"", "shorter than 8 bytes"),
    "invalid JSON": (_st(b'{"a": [1,2'), "not valid JSON"),
    "not UTF-8": (_st(b"\xff\xff\xff\xff"), "not valid JSON"),
    "JSON array": (_st(b"[1,2]"), "not a JSON object"),
    "deep nesting": (_st(b"[" * 100_000 + b"]" * 100_000), "not a JSON object"),  # refused at byte 0, never parsed
    "deep nesting in a tensor": (_st(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "not valid JSON"),
    "escaped key with a nested value": (_st(b'{"a":{"dtype":"F16","shape":[[[1]]],"data_\\u006fffsets":[0,2]}}'),
                                        "invalid shape"),
    "5000-digit integer": (_st(b'{"a":{"dtype":"F16","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,2]}}'),
                           "absurd number"),
    "overlapping offsets": (_st(json.dumps({"a": _entry("F16", [4], 0, 8), "b": _entry("F16", [4], 4, 12)}).encode()),
                            "overlaps"),
    "absurd shape": (_st(json.dumps({"a": _entry("F16", [2**39, 2**39], 0, 2)}).encode()), "implausibly large"),
    "negative dimension": (_st(json.dumps({"a": _entry("F16", [-1], 0, 2)}).encode()), "invalid shape"),
    "shape of strings": (_st(json.dumps({"a": _entry("F16", ["4"], 0, 8)}).encode()), "invalid shape"),
    "unknown dtype": (_st(json.dumps({"a": _entry("Q99", [1], 0, 2)}).encode()), "unknown dtype"),
    "size does not match shape": (_st(json.dumps({"a": _entry("F16", [4], 0, 6)}).encode()), "declares"),
    "negative offsets": (_st(json.dumps({"a": _entry("F16", [1], -2, 0)}).encode()), "invalid data_offsets"),
    "offsets past the data": (
        _st(json.dumps({"a": _entry("F16", [4], 0, 8), "b": _entry("F16", [4096], 8, 8200)}).encode(),
            tail=b"\0" * 16),
        "file holds only",
    ),
    "no tensors": (_st(b"{}"), "no tensors"),
    "no decoder layer": (_st(json.dumps({"foo": _entry("F16", [4], 0, 8)}).encode()), "no decoder layer"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_hostile_config_is_refused_with_one_line_and_exit_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw, phrase = CONFIG_CASES[case]
    code, out, err = _run_plan(_model_dir(tmp_path, config=raw), capsys)
    assert code == EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exl2opt: error:"), err
    assert phrase in lines[0]
    assert len(lines[0]) < 400  # the message does not echo the hostile content
    assert out == ""


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_hostile_safetensors_header_is_refused_with_one_line_and_exit_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw, phrase = HEADER_CASES[case]
    code, out, err = _run_plan(_model_dir(tmp_path, weights=raw), capsys)
    assert code == EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exl2opt: error:"), err
    assert phrase in lines[0]
    assert len(lines[0]) < 400
    assert out == ""


def test_valid_example_still_plans(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The hardening does not refuse the real (header-only) example."""
    try:
        main(["plan", "-m", str(_model_dir(tmp_path)), "--vram", "24GB", "--ctx", "4096", "--cache", "q4", "--json"])
    except SystemExit as e:
        assert e.code in (0, None)
    out, _ = capsys.readouterr()
    rows = json.loads(out)
    assert len(rows) == 1 and rows[0]["fits"] is True  # 3.0 bpw 34B at 4k/q4 fits 24 GB


def test_1gb_claimed_header_does_not_allocate_it(tmp_path: Path) -> None:
    f = tmp_path / "evil.safetensors"
    f.write_bytes(_st(b"{}" + b" " * 100, claimed=2**30))
    tracemalloc.start()
    try:
        with pytest.raises(WeightsHeaderError):
            read_safetensors_header(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"peak {peak} bytes for a 1 GB claimed header"


def test_header_claiming_just_under_the_cap_but_file_short_reads_nothing_big(tmp_path: Path) -> None:
    f = tmp_path / "short.safetensors"
    f.write_bytes(_st(b"{}", claimed=MAX_HEADER_BYTES))
    tracemalloc.start()
    try:
        with pytest.raises(WeightsHeaderError, match="larger than the file"):
            read_safetensors_header(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_header_with_too_many_tensors_is_refused_before_json_parsing() -> None:
    raw = b"{" + b"".join(b'"t%d":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]},' % (i, i, i + 1)
                          for i in range(300_000)) + b'"z":1}'
    tracemalloc.start()
    try:
        with pytest.raises(WeightsHeaderError, match="more than"):
            parse_header_json(raw, name="many")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # json.loads of this would build 300k dicts (>100 MB); the counting pass keeps only the names seen
    assert peak < 2 * len(raw)


def test_huge_config_file_is_not_read_whole(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_bytes(b'{"x":"' + b"a" * (64 * 2**20) + b'"}')
    shutil.copy(EXAMPLE / "output.safetensors", d / "output.safetensors")
    from optimizer.sources.local import variant_from_dir

    tracemalloc.start()
    try:
        with pytest.raises(ModelConfigError, match="larger than"):
            variant_from_dir(d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak} bytes for a 64 MiB config.json"


def test_config_parser_depth_and_digits_limits_are_typed_errors() -> None:
    with pytest.raises(ModelConfigError):
        load_config_bytes(b"[" * 10**6, name="x")
    with pytest.raises(ModelConfigError):
        load_config_bytes(b'{"a": ' + b"1" * 50_000 + b"}", name="x")
