"""Start-up stays light: ``--help`` of every command and ``fit`` on the shipped exl2 example import
none of the heavy modules (pydantic through typer's option conversion, rich, optuna, torch, the
GGUF reader...). The time itself is measured by benchmarks/startup.py, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "studies" / "examples" / "Smaug-34B-v0.1-3.0bpw-h6-exl2"
HEAVY = ("pydantic", "rich", "optuna", "torch", "numpy", "pandas", "huggingface_hub", "llama_cpp", "exllamav2",
         "sqlalchemy", "optimizer.formats.gguf", "optimizer.study")
PROBE = """
import io, json, sys, contextlib
from optimizer.cli import main
out = io.StringIO()
code = 0
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        code = e.code or 0
print(json.dumps({"code": code, "out": out.getvalue(), "heavy": sorted(m for m in %r if m in sys.modules)}))
"""


def _probe(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE % (HEAVY,), *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", [[], ["plan"], ["fit"], ["search"], ["worker"], ["report"]])
def test_help_imports_nothing_heavy(command: list[str]) -> None:
    got = _probe([*command, "--help"])
    assert got["code"] == 0 and "Usage" in got["out"]
    assert got["heavy"] == []


def test_fit_on_the_exl2_example_imports_nothing_heavy_and_prints_a_plain_table() -> None:
    got = _probe(["fit", "-m", str(EXAMPLE), "--vram", "15GB"])
    assert got["code"] == 0, got["out"]
    assert got["heavy"] == []
    lines = got["out"].splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    assert set(lines[head + 1].replace(" ", "")) == {"-"}  # a plain header rule, no box drawing
    assert lines[head + 2].split()[:2] == ["3.0bpw-h6", "fp16"]


def test_bad_number_is_one_clear_line_without_pydantic() -> None:
    got = _probe(["plan", "-m", str(EXAMPLE), "--vram", "15GB", "--chunk", "abc"])
    assert got["code"] == 2
    assert "'abc' is not an integer" in got["out"] and "Traceback" not in got["out"]
    assert got["heavy"] == []
