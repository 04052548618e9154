"""Hub discovery against the loopback fake Hub (tests/fakehub.py); nothing here touches the network."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fakehub import FakeFile, FakeRepo, exl2_files, header_only_shard

from optimizer.errors import (
    EXIT_RUNTIME,
    EXIT_USAGE,
    GatedRepoError,
    ModelSourceError,
    OfflineError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from optimizer.sources import HubOptions, RepoSpec, resolve_sources
from optimizer.sources.hub import discover_hub, discover_hub_detailed

STALE_INDEX = json.dumps({
    "metadata": {"total_size": 16_000_000_000},
    "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                   "lm_head.weight": "model-00002-of-00002.safetensors"},
}).encode()


def _opts(hub, tmp_path: Path, **kw) -> HubOptions:
    return HubOptions(endpoint=hub.endpoint, cache_dir=str(tmp_path / "cache"), **kw)


def _branch_repo(hub, repo_id: str = "org/Tiny-exl2", *, gated: bool = False, token: str | None = None):
    """main = README only; 3 bpw branches; 4.0bpw has 2 shards, a stale index and converter leftovers."""
    branches: dict[str, dict[str, FakeFile]] = {"main": {"README.md": FakeFile(b"# tiny"), "measurement.json": FakeFile(b"{}")}}
    totals: dict[str, int] = {}
    for name, bits, hb, shards in (("3.0bpw", 3.0, 6, 1), ("4.0bpw", 4.0, 6, 2), ("6.0bpw", 6.0, 8, 1)):
        files, total = exl2_files(bits, hb, shards=shards)
        files["README.md"] = FakeFile(b"# tiny")
        branches[name] = files
        totals[name] = total
    leftover, leftover_size = header_only_shard({"hidden": ("F16", (4096, 4096))})
    branches["4.0bpw"]["model.safetensors.index.json"] = FakeFile(STALE_INDEX)
    branches["4.0bpw"]["hidden_states.safetensors"] = FakeFile(leftover, size=leftover_size)
    branches["4.0bpw"]["cal_data.safetensors"] = FakeFile(leftover, size=leftover_size)
    repo = hub.add(FakeRepo(repo_id, branches, gated=gated, token=token))
    return repo, totals


def _assert_header_reads_only(hub) -> None:
    gets = hub.weight_gets()
    assert gets, "expected ranged header reads"
    for r in gets:
        assert r.range is not None, f"full download of {r.path}"
        start, _, end = r.range.removeprefix("bytes=").partition("-")
        assert end and int(end) - int(start) <= 100_000 + 8


def test_branch_per_bpw_lists_every_branch_with_exact_bytes(fake_hub, tmp_path):
    repo, totals = _branch_repo(fake_hub)
    variants = discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    assert [v.location.revision for v in variants] == ["3.0bpw", "4.0bpw", "6.0bpw"]
    for v in variants:
        rev = v.location.revision
        assert v.total_bytes == totals[rev]
        assert v.location.kind == "hub" and v.location.repo_id == repo.repo_id
        assert v.location.commit == repo.commit(rev)
        assert f"--revision {rev}" in v.location.download_command()
    assert [(v.bits, v.head_bits) for v in variants] == [(3.0, 6), (4.0, 6), (6.0, 8)]
    assert variants[1].location.files == ("output-00001-of-00002.safetensors", "output-00002-of-00002.safetensors")
    _assert_header_reads_only(fake_hub)
    paths = [r.path for r in fake_hub.requests]
    assert not any("hidden_states" in p or "cal_data" in p or p.endswith(".index.json") for p in paths)
    assert not any("/resolve/main/" in p for p in paths), "main holds no weights and must not be read"


def test_branch_without_qc_uses_name_hint(fake_hub, tmp_path):
    files, total = exl2_files(6.5, 8, with_qc=False)
    fake_hub.add(FakeRepo("bart/Tiny-exl2", {"main": {"README.md": FakeFile(b"x")}, "6_5": files}))
    (v,) = discover_hub(spec=RepoSpec("bart/Tiny-exl2"), options=_opts(fake_hub, tmp_path))
    assert v.bits == 6.5 and v.label.startswith("6.5bpw") and v.total_bytes == total


def test_repo_per_bpw_several_models(fake_hub, tmp_path):
    totals = {}
    for bits in (3.0, 5.0):
        rid = f"lone/Tiny-{bits}bpw-h6-exl2"
        files, totals[rid] = exl2_files(bits, 6, with_qc=False)
        files["model.safetensors.index.json"] = FakeFile(STALE_INDEX)
        fake_hub.add(FakeRepo(rid, {"main": files}))
    variants = resolve_sources(specs=list(totals), hub=_opts(fake_hub, tmp_path))
    assert [v.location.repo_id for v in variants] == list(totals)
    assert [v.bits for v in variants] == [3.0, 5.0]
    assert [v.head_bits for v in variants] == [6, 6]
    assert [v.total_bytes for v in variants] == list(totals.values())
    assert "--revision" not in variants[0].location.download_command()
    _assert_header_reads_only(fake_hub)


def test_repo_at_revision_reads_only_that_revision(fake_hub, tmp_path):
    repo, totals = _branch_repo(fake_hub)
    (v,) = discover_hub(spec=RepoSpec(repo.repo_id, "6.0bpw"), options=_opts(fake_hub, tmp_path))
    assert v.location.revision == "6.0bpw" and v.total_bytes == totals["6.0bpw"]
    assert not any("3.0bpw" in r.path or "4.0bpw" in r.path for r in fake_hub.requests)
    sha = repo.commit("3.0bpw")
    (w,) = discover_hub(spec=RepoSpec(repo.repo_id, sha), options=_opts(fake_hub, tmp_path))
    assert w.location.commit == sha and w.total_bytes == totals["3.0bpw"]


def test_subfolder_layout(fake_hub, tmp_path):
    main: dict[str, FakeFile] = {"README.md": FakeFile(b"x")}
    totals = {}
    for sub, bits in (("3.0bpw", 3.0), ("5.0bpw", 5.0)):
        files, totals[sub] = exl2_files(bits, 6, shards=2 if bits == 5.0 else 1, with_qc=False)
        main.update({f"{sub}/{k}": f for k, f in files.items()})
        main[f"{sub}/model.safetensors.index.json"] = FakeFile(STALE_INDEX)
    fake_hub.add(FakeRepo("ftf/Tiny-exl2", {"main": main}))
    variants = discover_hub(spec=RepoSpec("ftf/Tiny-exl2"), options=_opts(fake_hub, tmp_path))
    assert [v.location.subfolder for v in variants] == ["3.0bpw", "5.0bpw"]
    assert [v.total_bytes for v in variants] == [totals["3.0bpw"], totals["5.0bpw"]]
    assert [v.bits for v in variants] == [3.0, 5.0]
    assert "--include '3.0bpw/*'" in variants[0].location.download_command()
    assert variants[0].source.endswith("/3.0bpw")


def test_gated_repo_needs_token_and_never_stores_it(fake_hub, tmp_path, capfd):
    secret = "hf_fakeSECRETtoken1234567890"
    repo, totals = _branch_repo(fake_hub, "meta/Gated-exl2", gated=True, token=secret)
    with pytest.raises(GatedRepoError) as ei:
        discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    assert "HF_TOKEN" in str(ei.value) and ei.value.exit_code == EXIT_RUNTIME
    with pytest.raises(GatedRepoError) as ei2:
        discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path, token="hf_wrong"))
    assert "hf_wrong" not in str(ei2.value)
    variants = discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path, token=secret))
    assert sorted(v.total_bytes for v in variants) == sorted(totals.values())
    assert any(r.auth for r in fake_hub.requests)
    out, err = capfd.readouterr()
    assert secret not in out + err
    assert secret not in repr(_opts(fake_hub, tmp_path, token=secret))
    for p in (tmp_path / "cache").rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p


def test_missing_repo_and_revision(fake_hub, tmp_path):
    repo, _ = _branch_repo(fake_hub)
    with pytest.raises(RepoNotFoundError) as e1:
        discover_hub(spec=RepoSpec("org/nope"), options=_opts(fake_hub, tmp_path))
    assert e1.value.exit_code == EXIT_USAGE and "org/nope" in str(e1.value)
    with pytest.raises(RevisionNotFoundError) as e2:
        discover_hub(spec=RepoSpec(repo.repo_id, "9.9bpw"), options=_opts(fake_hub, tmp_path))
    assert e2.value.exit_code == EXIT_USAGE and "9.9bpw" in str(e2.value)


def test_repo_without_exl2_weights(fake_hub, tmp_path):
    fake_hub.add(FakeRepo("org/readme-only", {"main": {"README.md": FakeFile(b"x")}}))
    with pytest.raises(ModelSourceError):
        discover_hub(spec=RepoSpec("org/readme-only"), options=_opts(fake_hub, tmp_path))


def _summary(vs):
    return [(v.source, v.label, v.location.commit, v.total_bytes, v.bits, v.head_bits, v.location.files) for v in vs]


def test_second_run_uses_cache_when_hub_is_gone(fake_hub, tmp_path):
    repo, _ = _branch_repo(fake_hub)
    first = discover_hub_detailed(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    assert not first.from_cache
    n_gets = len(fake_hub.weight_gets())
    again = discover_hub_detailed(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    assert len(fake_hub.weight_gets()) == n_gets, "unchanged commits must be served from the cache"
    assert _summary(again.variants) == _summary(first.variants)
    fake_hub.stop()
    down = discover_hub_detailed(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    assert down.from_cache and down.reason == "network"
    assert _summary(down.variants) == _summary(first.variants)
    off = discover_hub_detailed(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path, offline=True))
    assert off.from_cache and _summary(off.variants) == _summary(first.variants)
    (one,) = discover_hub(spec=RepoSpec(repo.repo_id, "4.0bpw"), options=_opts(fake_hub, tmp_path, offline=True))
    assert one.location.revision == "4.0bpw"


def test_moved_branch_is_refetched(fake_hub, tmp_path):
    repo, _ = _branch_repo(fake_hub)
    discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    files, total = exl2_files(3.5, 6)
    repo.branches["3.0bpw"] = files  # branch now points at another commit
    variants = discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    v = next(v for v in variants if v.location.revision == "3.0bpw")
    assert v.total_bytes == total and v.bits == 3.5 and v.location.commit == repo.commit("3.0bpw")


def test_offline_with_empty_cache(fake_hub, tmp_path):
    _branch_repo(fake_hub)
    with pytest.raises(OfflineError) as e:
        discover_hub(spec=RepoSpec("org/Tiny-exl2"), options=_opts(fake_hub, tmp_path, offline=True))
    assert "--offline" in str(e.value) and "org/Tiny-exl2" in str(e.value)
    assert not fake_hub.requests


def test_unreachable_hub_with_empty_cache(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    opts = HubOptions(endpoint=f"http://127.0.0.1:{port}", cache_dir=str(tmp_path / "c"))
    with pytest.raises(OfflineError) as e:
        discover_hub(spec=RepoSpec("org/x"), options=opts)
    assert "org/x" in str(e.value) and e.value.exit_code == EXIT_RUNTIME


def test_corrupt_cache_counts_as_miss(fake_hub, tmp_path):
    repo, _ = _branch_repo(fake_hub)
    discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    for p in (tmp_path / "cache" / "hub").rglob("*.json"):
        p.write_text("{not json")
    with pytest.raises(OfflineError):
        discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path, offline=True))


def test_cli_plan_against_fake_hub(fake_hub, tmp_path):
    repo, totals = _branch_repo(fake_hub)
    env = {**os.environ, "HF_ENDPOINT": fake_hub.endpoint, "EXL2OPT_CACHE": str(tmp_path / "cli-cache")}
    cmd = [sys.executable, "-m", "optimizer", "plan", "-m", repo.repo_id, "--vram", "15GB", "--ctx", "4096", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["variant"] for row in rows} == {f"{repo.repo_id}@{b}" for b in totals}
    assert all(row["fits"] for row in rows)
    _assert_header_reads_only(fake_hub)
    fake_hub.stop()
    r2 = subprocess.run(cmd + ["--offline"], capture_output=True, text=True, env=env, timeout=120)
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout) == rows
