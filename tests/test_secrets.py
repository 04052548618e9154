"""The Hub token never leaves the process; the package never unpickles or runs remote code.

The token test plants a random token in ``HF_TOKEN``, reads a *gated* repository of the loopback
fake Hub with it (so the token is really used), runs plan / fit / search (fake engine) / report /
worker as the user would, and scans stdout, stderr and every file written under the test folder
(CSV, JSON, plots, the journal, variants.json, the metadata cache). With a PostgreSQL server it
also scans every table of the study database.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from fakehub import FakeFile, FakeRepo, exl2_files
from pg import postgres_server, postgres_url  # noqa: F401  (pytest fixtures)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "optimizer"
TESTS = Path(__file__).resolve().parent


# ----- source hygiene ---------------------------------------------------------------------------


def _sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    return files


def test_package_source_never_mentions_pickle() -> None:
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in _sources()
           for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"pickle", line, re.IGNORECASE)]
    assert bad == [], f"pickle (or allow_pickle / read_pickle) in the package: {bad}"


def test_package_source_never_trusts_remote_code() -> None:
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in _sources()
           for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"trust_remote_code\s*=\s*True", line)]
    assert bad == [], bad


def test_every_torch_load_is_weights_only() -> None:
    bad = []
    for p in _sources():
        text = p.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start(): text.find(")", m.start()) + 1]
            if not re.search(r"weights_only\s*=\s*True", call):
                bad.append(f"{p.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}")
    assert bad == [], f"torch.load without weights_only=True: {bad}"


def test_no_eval_or_exec_of_text() -> None:
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in _sources()
           for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"(?<![\w.])(eval|exec)\(", line)]
    assert bad == [], bad


# ----- token scan -----------------------------------------------------------------------------------


def _scan_tree(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            if any(n in data for n in needles):
                hits.append(str(p.relative_to(root)))
    return hits


def _run(args: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "optimizer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


def _needles(token: str) -> list[bytes]:
    # the token, and a long inner piece of it (a truncated or re-encoded copy is still a leak)
    return [token.encode(), token[6:30].encode()]


def _token_env(fake_hub: object, tmp_path: Path, token: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HF_TOKEN": token, "HF_ENDPOINT": fake_hub.endpoint,  # type: ignore[attr-defined]
        "PYTHONPATH": os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "FAKE_ENGINE_LOG": str(tmp_path / "engine.log"), "FAKE_ENGINE_DELAY": "0",
        "EXL2OPT_DEBUG": "0", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
    })
    return env


def _gated_repo(fake_hub: object, token: str) -> str:
    branches: dict[str, dict[str, FakeFile]] = {"main": {"README.md": FakeFile(b"# gated")}}
    for name, bits in (("3.0bpw", 3.0), ("4.0bpw", 4.0)):
        files, _ = exl2_files(bits, 6)
        branches[name] = files
    fake_hub.add(FakeRepo("secretorg/Gated-exl2", branches, gated=True, token=token))  # type: ignore[attr-defined]
    return "secretorg/Gated-exl2"


def _run_everything(repo: str, work: Path, env: dict[str, str], storage: list[str]) -> list[subprocess.CompletedProcess[str]]:
    (work / "eval.txt").write_text("a small evaluation text for the fake engine. " * 30)
    common = ["-m", repo, "--vram", "8GB"]
    search_opts = ["--ctx", "2048", "--cache", "fp16,q4", "--study", "tok", "--root", "studies",
                   "--eval-data", "eval.txt", "--backend-factory", "fake_engine:fake_backend_factory",
                   "--eval-window", "64", "--eval-windows", "1", *storage]
    runs = [
        _run(["plan", *common, "--ctx", "2048", "--csv", "out/plan.csv"], cwd=work, env=env),
        _run(["plan", *common, "--ctx", "2048", "--json"], cwd=work, env=env),
        _run(["fit", *common, "--csv", "out/fit.csv"], cwd=work, env=env),
        _run(["fit", *common, "--json"], cwd=work, env=env),
        _run(["search", *common, *search_opts], cwd=work, env=env),
        _run(["report", "tok", "--root", "studies", "--out", "out/report", *storage], cwd=work, env=env),
        _run(["worker", "--study", "tok", "--root", "studies", "--eval-data", "eval.txt",
              "--backend-factory", "fake_engine:fake_backend_factory", *storage], cwd=work, env=env),
    ]
    for r in runs:
        assert r.returncode == 0, (r.args, r.stderr[-2000:])
    # error paths print messages too: they must not carry the token either
    runs.append(_run(["plan", "-m", "secretorg/Missing-exl2", "--vram", "8GB"], cwd=work, env=env))
    runs.append(_run(["plan", "-m", "secretorg/Gated-exl2@nosuchbranch", "--vram", "8GB", "--debug"], cwd=work, env=env))
    assert runs[-2].returncode != 0 and runs[-1].returncode != 0
    return runs


@pytest.mark.slow
def test_hub_token_never_appears_in_output_files_journal_or_streams(fake_hub: object, tmp_path: Path) -> None:
    token = "hf_" + secrets.token_urlsafe(30).replace("-", "a").replace("_", "b")
    repo = _gated_repo(fake_hub, token)
    work = tmp_path / "work"
    work.mkdir()
    runs = _run_everything(repo, work, _token_env(fake_hub, tmp_path, token), storage=[])
    for r in runs:
        assert token not in r.stdout + r.stderr and token[6:30] not in r.stdout + r.stderr, r.args
    # the gated repo was really read with the token, and everything was written
    assert any(r.auth for r in fake_hub.requests)  # type: ignore[attr-defined]
    written = {p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()}
    for f in ("out/plan.csv", "out/fit.csv", "studies/tok/journal.log", "out/report/trials.csv",
              "out/report/pareto.csv"):
        assert f in written, sorted(written)
    assert _scan_tree(tmp_path, _needles(token)) == []


@pytest.mark.postgres
@pytest.mark.slow
def test_hub_token_never_reaches_the_postgres_study(fake_hub: object, tmp_path: Path,
                                                    postgres_url: str) -> None:  # noqa: F811
    import psycopg

    token = "hf_" + secrets.token_urlsafe(30).replace("-", "a").replace("_", "b")
    repo = _gated_repo(fake_hub, token)
    work = tmp_path / "work"
    work.mkdir()
    runs = _run_everything(repo, work, _token_env(fake_hub, tmp_path, token), storage=["--storage", postgres_url])
    for r in runs:
        assert token not in r.stdout + r.stderr, r.args
    assert _scan_tree(tmp_path, _needles(token)) == []
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()]
        assert "trials" in tables and "trial_user_attributes" in tables
        n_rows = 0
        for t in tables:
            for row in conn.execute(f'SELECT * FROM "{t}"').fetchall():
                n_rows += 1
                text = repr(row)
                assert token not in text and token[6:30] not in text, t
    assert n_rows > 20

