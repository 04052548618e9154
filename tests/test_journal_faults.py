"""Crashed, full and read-only study storage (issue 9, class 6, storage parts).

A journal cut at any byte (hypothesis) is resumed without losing a complete record and stays
readable after further appends; read-only, full and over-long names give one line each.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimizer.errors import StorageError, storage_os_error
from optimizer.storage import JOURNAL_NAME, open_storage

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _journal(root: Path, n: int = 5) -> bytes:
    """A journal with ``n`` finished trials (plus attributes), as a run writes it."""
    storage = open_storage(study="s", url=None, root=root)
    study = optuna.create_study(study_name="s", storage=storage, directions=["minimize", "maximize"])
    for i in range(n):
        t = study.ask()
        t.set_user_attr("label", f"v{i}" * 20)
        study.tell(t, [1.0 + i, 10.0 * i])
    return (root / "s" / JOURNAL_NAME).read_bytes()


@pytest.fixture(scope="module")
def intact(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _journal(tmp_path_factory.mktemp("j"))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 1.0))
def test_a_journal_cut_anywhere_resumes_and_stays_readable(tmp_path, intact, cut):
    import tempfile

    d = Path(tempfile.mkdtemp(dir=tmp_path)) / "s"
    d.mkdir()
    data = intact[: int(len(intact) * cut)]
    (d / JOURNAL_NAME).write_bytes(data)
    complete = data[: data.rfind(b"\n") + 1]
    n_done = sum(1 for line in complete.splitlines() if b'"state":1' in line)
    storage = open_storage(study="s", url=None, root=d.parent)
    study = optuna.load_study(study_name="s", storage=storage) if complete.count(b"\n") else None
    kept = (d / JOURNAL_NAME).read_bytes()
    aside = sorted(d.glob(JOURNAL_NAME + ".partial-*"))
    assert kept == complete  # nothing complete lost
    assert (aside[0].read_bytes() if aside else b"") == data[len(complete):]  # the partial record kept aside
    if study is None:
        return
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == n_done
    t = study.ask()  # the resumed run appends ...
    study.tell(t, [0.5, 1.0])
    again = optuna.load_study(study_name="s", storage=open_storage(study="s", url=None, root=d.parent))
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in again.trials) == n_done + 1  # ... and it reads back


def test_cli_resume_after_a_cut_journal(tmp_path):
    from exl2_fixtures import TINY_LLAMA, make_exl2_dir

    models = tmp_path / "models"
    for b in (3.0, 4.0):
        make_exl2_dir(models, f"{b}bpw", TINY_LLAMA, bits=b)
    ev = tmp_path / "eval.txt"
    ev.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "FAKE_ENGINE_DELAY": "0"}
    cmd = [sys.executable, "-m", "optimizer", "search", "-m", str(models), "--vram", "8GB", "--ctx", "2048",
           "--cache", "fp16,q4", "--study", "s", "--studies-dir", str(tmp_path / "st"), "--eval-data", str(ev),
           "--backend-factory", "fake_engine:fake_backend_factory", "--no-report", "--exhaustive"]
    assert subprocess.run(cmd + ["--n-trials", "2"], env=env, capture_output=True, timeout=300).returncode == 0
    j = tmp_path / "st" / "s" / JOURNAL_NAME
    with open(j, "r+b") as f:
        f.truncate(j.stat().st_size - 40)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "partial record" in r.stderr and "measured 3" in r.stdout
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "measured 0" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize(("code", "phrase"), [(errno.ENOSPC, "no space left"), (errno.EDQUOT, "no space left"),
                                              (errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"),
                                              (errno.ENAMETOOLONG, "too long"), (errno.EIO, "Input/output error")])
def test_os_errors_are_one_line(code, phrase):
    e = storage_os_error(OSError(code, os.strerror(code), "/s/run.lock"), doing="continue")
    assert isinstance(e, StorageError) and phrase in str(e) and "\n" not in str(e)


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_a_failing_disk_anywhere_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys, code):
    """Any OSError reaching the CLI (here: writing --csv) is one line, not an internal error."""
    from optimizer.cli import main

    def refuse(self: Path, *a: object, **k: object) -> None:
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "write_text", refuse)
    ex = ROOT / "studies" / "examples" / "Smaug-34B-v0.1-3.0bpw-h6-exl2"
    with pytest.raises(SystemExit) as se:
        main(["plan", "-m", str(ex), "--vram", "24GB", "--ctx", "4096", "--csv", str(tmp_path / "o.csv")])
    err = capsys.readouterr().err
    assert se.value.code == 1 and err.count("\n") == 1 and err.startswith("exl2opt: error: cannot continue")


def test_journal_that_cannot_be_repaired_is_one_line(tmp_path, monkeypatch):
    d = tmp_path / "s"
    d.mkdir()
    (d / JOURNAL_NAME).write_bytes(b'{"op_code": 0, "worker_id": "x"')  # partial, and the folder refuses writes
    import optimizer.journal as jr

    def refuse(*a: object, **k: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(d / "journal.log.partial-1"))

    monkeypatch.setattr(jr.shutil, "copyfileobj", refuse)
    with pytest.raises(StorageError, match="read-only"):
        open_storage(study="s", url=None, root=tmp_path)
