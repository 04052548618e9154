"""scripts/gpu-check.sh stays runnable without a GPU: shell syntax, and its --dry-run (the same steps on a
small FP16 model through the CPU stand-in of exllamav2_ext, without the converter and the real extension)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def test_shell_syntax() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_dry_run_prints_every_step(tmp_path: Path) -> None:
    for mod in ("torch", "exllamav2", "tokenizers"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")
    env = dict(os.environ, PYTHON=sys.executable, WORK=str(tmp_path / "work"), RESULTS=str(tmp_path / "out"))
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout
    rows = re.findall(r"^fp16\s+(fp16|q8|q4)\s+measured\s", out, flags=re.MULTILINE)
    assert sorted(rows) == ["fp16", "q4", "q8"], out  # one FP16 variant x fp16, q8, q4
    assert "ours:    causality check: causal" in out and "default: causality check: NOT causal" in out
    assert "Q cache wbits=4" in out and (tmp_path / "out" / "gpu-check.json").is_file()
