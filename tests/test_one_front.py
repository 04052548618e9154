"""exl2, EXL3 and GGUF variants of one model: one plan table, one fit table, one Pareto front, ``--format``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from optimizer.formats import exl2_synth, exl3_synth
from optimizer.safetensors_header import write_header_only

CFG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
       "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 274, "max_position_embeddings": 512,
       "rms_norm_eps": 1e-5}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The same tiny Llama as an exl2 folder, an EXL3 folder and a GGUF file (headers only / tiny)."""
    pytest.importorskip("gguf")
    from gguf_util import write_tiny_gguf

    root = tmp_path_factory.mktemp("one")
    d2, d3 = root / "Tiny-exl2-4.0bpw", root / "Tiny-exl3-4.0bpw"
    d2.mkdir()
    d3.mkdir()
    c2 = {**CFG, "quantization_config": {"quant_method": "exl2", "bits": 4.0, "head_bits": 6}}
    c3 = {**CFG, "quantization_config": exl3_synth.quantization_config(bits=4.0, head_bits=6)}
    (d2 / "config.json").write_text(json.dumps(c2))
    (d3 / "config.json").write_text(json.dumps(c3))
    write_header_only(d2 / "output.safetensors", exl2_synth.synthesize(c2, bits=4.0, head_bits=6))
    write_header_only(d3 / "model.safetensors", exl3_synth.synthesize(c3, bits=4.0, head_bits=6))
    g = write_tiny_gguf(root / "tiny-f16.gguf", n_embd=128, n_ff=256, context_length=512)
    (root / "eval.txt").write_text("the of and a to in is was on for " * 2000)
    return [str(d2), str(d3), str(g)]


def _cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "optimizer", *args], capture_output=True, text=True, check=check,
                          cwd=cwd, env=env)


def _model_args(models: list[str]) -> list[str]:
    return [a for m in models for a in ("-m", m)]


def test_plan_and_fit_tables_hold_every_format(models: list[str]) -> None:
    rows = json.loads(_cli("plan", *_model_args(models), "--vram", "2GB", "--ctx", "512", "--json").stdout)
    assert {r["format"] for r in rows} == {"exl2", "exl3", "gguf"}
    assert {r["cache"] for r in rows if r["format"] == "exl3"} == {"fp16", "k8v8", "k6v6", "k4v4", "k3v3"}
    text = _cli("fit", *_model_args(models), "--vram", "2GB", "--cache", "fp16,k4v4,f16").stdout
    table = [ln.split() for ln in text.splitlines() if ln.startswith(("exl2 ", "exl3 ", "gguf "))]
    assert sorted((r[0], r[2]) for r in table) == [("exl2", "fp16"), ("exl3", "fp16"), ("exl3", "k4v4"), ("gguf", "f16")]
    assert "4.0bpw-h6 (exl2):" in text and "4.0bpw-h6 (exl3):" in text and "F16 (gguf):" in text


def test_format_filter(models: list[str]) -> None:
    rows = json.loads(_cli("plan", *_model_args(models), "--vram", "2GB", "--ctx", "512", "--format", "exl3,gguf",
                           "--json").stdout)
    assert {r["format"] for r in rows} == {"exl3", "gguf"}
    bad = _cli("plan", *_model_args(models), "--vram", "2GB", "--format", "exl4", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "choose from exl2, exl3, gguf" in bad.stderr
    none = _cli("fit", "-m", models[0], "--vram", "2GB", "--format", "exl3", check=False)
    assert none.returncode == 2 and "formats found: exl2" in none.stderr


def test_one_pareto_front_across_formats(models: list[str], tmp_path: Path) -> None:
    """A search over the three variants (fake engine) keeps every format in one study and one front:
    the front is exactly the non-dominated set of all measured trials, whatever their format."""
    root = Path(models[0]).parent
    _cli("search", *_model_args(models), "--vram", "2GB", "--ctx", "512", "--min-ctx", "256",
         "--eval-data", str(root / "eval.txt"), "--eval-window", "128", "--eval-windows", "2",
         "--backend-factory", "fake_engine:fake_backend_factory", "--study", "one", "--root", str(tmp_path),
         "--exhaustive", cwd=tmp_path)
    with open(tmp_path / "one" / "trials.csv") as f:
        trials = list(csv.DictReader(f))
    with open(tmp_path / "one" / "pareto.csv") as f:
        front = list(csv.DictReader(f))
    measured = [t for t in trials if t.get("perplexity") not in (None, "")]
    assert {t["format"] for t in measured} == {"exl2", "exl3", "gguf"}

    def point(r: dict[str, Any]) -> tuple[float, float, int]:
        return float(r["perplexity"]), float(r["gen_tok_s"]), int(r["max_seq_len"])

    def dominated(p: tuple[float, float, int], q: tuple[float, float, int]) -> bool:
        return q != p and q[0] <= p[0] and q[1] >= p[1] and q[2] >= p[2]

    pts = [point(t) for t in measured]
    truth = sorted({p for p in pts if not any(dominated(p, q) for q in pts)})
    assert sorted({point(r) for r in front}) == truth
    assert len({r["format"] for r in front}) >= 2
