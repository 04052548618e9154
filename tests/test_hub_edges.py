"""Edge cases of Hub discovery and the metadata cache, as ``exl2opt plan -m org/name`` meets them.

Everything runs against the loopback fake Hub (tests/fakehub.py); nothing touches the network.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import struct
from pathlib import Path

import pytest
from fakehub import FakeFile, FakeRepo, exl2_files

from optimizer.errors import (
    GatedRepoError,
    HubError,
    ModelConfigError,
    ModelSourceError,
    WeightsHeaderError,
)
from optimizer.sources import HubOptions, RepoSpec, parse_repo_spec, resolve_sources
from optimizer.sources.hub import discover_hub, discover_hub_detailed


def _opts(hub, tmp_path: Path, **kw) -> HubOptions:
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return HubOptions(endpoint=hub.endpoint, **kw)


def _repo(hub, repo_id: str = "org/Edge-exl2", bpws=(("3.0bpw", 3.0), ("5.0bpw", 5.0)), **kw):
    branches: dict[str, dict[str, FakeFile]] = {"main": {"README.md": FakeFile(b"# edge")}}
    totals = {}
    for name, bits in bpws:
        branches[name], totals[name] = exl2_files(bits, 6)
    return hub.add(FakeRepo(repo_id, branches, **kw)), totals


# ----- refs and revisions ------------------------------------------------------------------------


def test_paged_tree_listing_is_followed(fake_hub, tmp_path):
    """The Hub pages tree listings (Link: rel=next); shards on a later page must still be found."""
    files, total = exl2_files(4.0, 6, shards=3)
    files.update({f"extra/file{i:02d}.txt": FakeFile(b"x") for i in range(7)})
    fake_hub.add(FakeRepo("org/Paged-exl2", {"main": files}))
    fake_hub.tree_page_size = 2
    (v,) = discover_hub(spec=RepoSpec("org/Paged-exl2"), options=_opts(fake_hub, tmp_path))
    assert v.total_bytes == total and len(v.location.files) == 3
    tree_gets = [r for r in fake_hub.requests if "/tree/" in r.path]
    assert len(tree_gets) > 3, "the listing should have needed several pages"


@pytest.mark.parametrize("branch", ["v1.0/4.0bpw", "refs/pr/1", "4.0bpw+h6"])
def test_branch_names_with_slashes_and_special_characters(fake_hub, tmp_path, branch):
    repo, _ = _repo(fake_hub)
    repo.branches[branch], total = exl2_files(4.0, 6)
    variants = discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    v = next(v for v in variants if v.location.revision == branch)
    assert v.total_bytes == total and v.location.commit == repo.commit(branch)
    (w,) = discover_hub(spec=RepoSpec(repo.repo_id, branch), options=_opts(fake_hub, tmp_path))
    assert w.total_bytes == total
    # and again from the cache alone
    (o,) = discover_hub(spec=RepoSpec(repo.repo_id, branch), options=_opts(fake_hub, tmp_path, offline=True))
    assert o.total_bytes == total and o.location.commit == repo.commit(branch)


def test_tag_as_revision_reuses_branch_snapshot(fake_hub, tmp_path):
    repo, totals = _repo(fake_hub, tags={"v1": "5.0bpw"})
    all_variants = discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    assert [v.location.revision for v in all_variants] == ["3.0bpw", "5.0bpw"], "tags are not extra variants"
    n = len(fake_hub.weight_gets())
    (v,) = discover_hub(spec=RepoSpec(repo.repo_id, "v1"), options=_opts(fake_hub, tmp_path))
    assert v.total_bytes == totals["5.0bpw"] and v.location.commit == repo.commit("5.0bpw")
    assert len(fake_hub.weight_gets()) == n, "the tag points at a cached commit: no header reads"
    (o,) = discover_hub(spec=RepoSpec(repo.repo_id, "v1"), options=_opts(fake_hub, tmp_path, offline=True))
    assert o.location.commit == repo.commit("5.0bpw")


def test_repo_at_commit_sha_offline_after_branch_listing(fake_hub, tmp_path):
    repo, totals = _repo(fake_hub)
    discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    sha = repo.commit("3.0bpw")
    (v,) = discover_hub(spec=RepoSpec(repo.repo_id, sha), options=_opts(fake_hub, tmp_path, offline=True))
    assert v.total_bytes == totals["3.0bpw"] and v.location.commit == sha


def test_repo_spec_parsing_edges():
    assert parse_repo_spec("Org-X/Model.Name_v2") is not None
    with pytest.raises(ModelSourceError, match="empty revision"):
        parse_repo_spec("org/name@")
    assert parse_repo_spec("org/name/extra") is None
    assert parse_repo_spec("org/name@v1.0/4.0bpw") == RepoSpec("org/name", "v1.0/4.0bpw")


def test_existing_directory_named_like_a_repo_is_local(fake_hub, tmp_path, monkeypatch):
    """A directory ``org/name`` in cwd wins over the Hub (documented); ``./org/name`` is always local."""
    files, _ = exl2_files(4.0, 6)
    d = tmp_path / "work" / "org" / "Local-exl2"
    d.mkdir(parents=True)
    for name, f in files.items():
        (d / name).write_bytes(f.data)
    monkeypatch.chdir(tmp_path / "work")
    (v,) = resolve_sources(specs=["org/Local-exl2"], hub=_opts(fake_hub, tmp_path))
    assert v.location.kind == "local"
    assert not fake_hub.requests
    with pytest.raises(ModelSourceError):
        resolve_sources(specs=["./org/Missing-exl2"], hub=_opts(fake_hub, tmp_path))
    assert not fake_hub.requests


# ----- one bad branch among good ones ------------------------------------------------------------


@pytest.mark.parametrize("bad", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_bad_branch_is_skipped_with_one_warning(fake_hub, tmp_path, caplog, bad):
    repo, totals = _repo(fake_hub)
    files, _ = exl2_files(4.0, 6)
    files["config.json"] = FakeFile(bad)
    repo.branches["4.0bpw"] = files
    with caplog.at_level(logging.WARNING, logger="exl2opt"):
        res = discover_hub_detailed(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    assert [v.location.revision for v in res.variants] == ["3.0bpw", "5.0bpw"]
    assert len(res.skipped) == 1 and f"{repo.repo_id}@4.0bpw" in res.skipped[0]
    msgs = [r.getMessage() for r in caplog.records if r.name == "exl2opt"]
    assert len(msgs) == 1 and "4.0bpw" in msgs[0] and "config.json" in msgs[0] and "\n" not in msgs[0]
    # asked for by name, the bad branch is an error, not a skip
    with pytest.raises(ModelConfigError) as e:
        discover_hub(spec=RepoSpec(repo.repo_id, "4.0bpw"), options=_opts(fake_hub, tmp_path))
    assert "4.0bpw" in str(e.value) and "\n" not in str(e.value)


def test_only_bad_branches_is_one_clear_error(fake_hub, tmp_path):
    files, _ = exl2_files(4.0, 6)
    files["config.json"] = FakeFile(b"{oops")
    fake_hub.add(FakeRepo("org/AllBad-exl2", {"main": {"README.md": FakeFile(b"x")}, "4.0bpw": files}))
    with pytest.raises(ModelConfigError) as e:
        discover_hub(spec=RepoSpec("org/AllBad-exl2"), options=_opts(fake_hub, tmp_path))
    assert "org/AllBad-exl2@4.0bpw" in str(e.value) and "config.json" in str(e.value)


def test_missing_config_branch_is_not_a_variant(fake_hub, tmp_path):
    repo, totals = _repo(fake_hub)
    files, _ = exl2_files(4.0, 6)
    del files["config.json"]
    repo.branches["4.0bpw"] = files
    variants = discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    assert [v.location.revision for v in variants] == ["3.0bpw", "5.0bpw"]


def test_exl3_branch_beside_exl2_branches_is_ignored(fake_hub, tmp_path):
    repo, totals = _repo(fake_hub)
    exl3_cfg = {**json.loads(repo.branches["3.0bpw"]["config.json"].data),
                "quantization_config": {"quant_method": "exl3", "bits": 4.0, "head_bits": 6}}
    repo.branches["4.00bpw"] = {
        "config.json": FakeFile(json.dumps(exl3_cfg).encode()),
        "quantization_config.json": FakeFile(json.dumps(exl3_cfg["quantization_config"]).encode()),
        "model.safetensors": FakeFile(b"\0" * 16),
    }
    variants = discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    assert [v.location.revision for v in variants] == ["3.0bpw", "5.0bpw"]
    assert not any("/resolve/4.00bpw/model.safetensors" in r.path for r in fake_hub.requests)


# ----- shard headers -----------------------------------------------------------------------------


def test_header_larger_than_first_ranged_read(fake_hub, tmp_path):
    files, total = exl2_files(4.0, 6)
    raw = files["output.safetensors"].data
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = {"pad": "x" * 150_000}
    hb = json.dumps(header).encode()
    files["output.safetensors"] = FakeFile(struct.pack("<Q", len(hb)) + hb,
                                           size=files["output.safetensors"].listed_size + len(hb) - n)
    fake_hub.add(FakeRepo("org/BigHeader-exl2", {"main": files}))
    (v,) = discover_hub(spec=RepoSpec("org/BigHeader-exl2"), options=_opts(fake_hub, tmp_path))
    assert v.total_bytes == total
    gets = fake_hub.weight_gets()
    assert len(gets) == 2 and all(g.range for g in gets)


@pytest.mark.parametrize("body", [
    b"\xff" * 8 + b"{}",                                           # absurd header length
    struct.pack("<Q", 6) + b"{nope}",                              # not JSON
    struct.pack("<Q", 6) + b"[1, 2]",                              # JSON, not an object
    struct.pack("<Q", 40) + b'{"w": {"dtype": "F16", "shape": [2]}}   ',  # no data_offsets
])
def test_corrupt_shard_header_names_repo_branch_and_file(fake_hub, tmp_path, body):
    repo, _ = _repo(fake_hub)
    files, _ = exl2_files(4.0, 6, shards=2)
    files["output-00002-of-00002.safetensors"] = FakeFile(body, size=10_000)
    repo.branches["4.0bpw"] = files
    with pytest.raises(WeightsHeaderError) as e:
        discover_hub(spec=RepoSpec(repo.repo_id, "4.0bpw"), options=_opts(fake_hub, tmp_path))
    msg = str(e.value)
    assert f"{repo.repo_id}@4.0bpw" in msg and "output-00002-of-00002.safetensors" in msg and "\n" not in msg


# ----- cache -------------------------------------------------------------------------------------


def test_read_only_cache_dir_still_works_online(fake_hub, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    repo, totals = _repo(fake_hub)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        variants = discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path, cache_dir=str(ro / "c")))
        assert sorted(v.total_bytes for v in variants) == sorted(totals.values())
    finally:
        ro.chmod(stat.S_IRWXU)


def test_cache_file_in_place_of_cache_dir_still_works_online(fake_hub, tmp_path):
    """Works for root too: the cache path is a regular file, so nothing can be created below it."""
    repo, totals = _repo(fake_hub)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    variants = discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path, cache_dir=str(blocker)))
    assert sorted(v.total_bytes for v in variants) == sorted(totals.values())


def test_old_schema_snapshot_is_refetched_online(fake_hub, tmp_path):
    repo, totals = _repo(fake_hub)
    discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    for p in (tmp_path / "cache" / "hub").rglob("snapshots/*.json"):
        doc = json.loads(p.read_text())
        for v in doc["variants"]:
            v.pop("tensors")  # as an older exl2opt might have written it
        p.write_text(json.dumps(doc))
    variants = discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    assert sorted(v.total_bytes for v in variants) == sorted(totals.values())
    # the refetch repaired the cache
    again = discover_hub_detailed(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path, offline=True))
    assert sorted(v.total_bytes for v in again.variants) == sorted(totals.values())


def test_moved_branch_offline_uses_last_known_commit(fake_hub, tmp_path):
    repo, totals = _repo(fake_hub)
    old = repo.commit("3.0bpw")
    discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    repo.branches["3.0bpw"], _ = exl2_files(3.5, 6)  # moved on the Hub; we are offline
    res = discover_hub_detailed(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path, offline=True))
    v = next(v for v in res.variants if v.location.revision == "3.0bpw")
    assert res.from_cache and v.location.commit == old and v.total_bytes == totals["3.0bpw"]


def test_concurrent_discovery_shares_one_cache(fake_hub, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    repo, totals = _repo(fake_hub)
    opts = _opts(fake_hub, tmp_path)
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: discover_hub(spec=RepoSpec(repo.repo_id), options=opts), range(4)))
    for vs in results:
        assert sorted(v.total_bytes for v in vs) == sorted(totals.values())
    assert not list((tmp_path / "cache").rglob(".tmp-*")), "no temp files left behind"
    off = discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path, offline=True))
    assert sorted(v.total_bytes for v in off) == sorted(totals.values())


# ----- tokens ------------------------------------------------------------------------------------


def test_empty_hf_token_is_no_token(fake_hub, tmp_path, monkeypatch):
    from optimizer.cli._common import hub_options

    monkeypatch.setenv("HF_TOKEN", "")
    assert hub_options(offline=False).token is None
    repo, _ = _repo(fake_hub, "meta/Gated-exl2", gated=True, token="hf_right")
    with pytest.raises(GatedRepoError) as e:
        discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    assert "HF_TOKEN" in str(e.value) and "refused" not in str(e.value)
    assert not any(r.auth for r in fake_hub.requests)


def test_gated_config_message_names_repo_and_branch(fake_hub, tmp_path):
    """Refs and tree are public; config.json needs a token (hub-conventions §3.5)."""
    repo, _ = _repo(fake_hub, "meta/Gated-exl2", gated=True, token="hf_right")
    with pytest.raises(GatedRepoError) as e:
        discover_hub(spec=RepoSpec(repo.repo_id, "5.0bpw"), options=_opts(fake_hub, tmp_path))
    msg = str(e.value)
    assert "meta/Gated-exl2" in msg and "gated" in msg and "\n" not in msg
    assert any("/tree/" in r.path for r in fake_hub.requests), "metadata is public"


def test_hub_error_is_one_line_even_for_unexpected_status(fake_hub, tmp_path):
    """Sanity: a repo that is not found maps to a HubError subclass with one line."""
    with pytest.raises(HubError) as e:
        discover_hub(spec=RepoSpec("org/absent"), options=_opts(fake_hub, tmp_path))
    assert "\n" not in str(e.value)


def test_cli_plan_skips_bad_branch_with_one_stderr_line(fake_hub, tmp_path):
    import subprocess
    import sys

    repo, totals = _repo(fake_hub)
    files, _ = exl2_files(4.0, 6)
    files["config.json"] = FakeFile(b"{not json")
    repo.branches["4.0bpw"] = files
    env = {**os.environ, "HF_ENDPOINT": fake_hub.endpoint, "EXL2OPT_CACHE": str(tmp_path / "cli-cache")}
    cmd = [sys.executable, "-m", "optimizer", "plan", "-m", repo.repo_id, "--vram", "15GB", "--ctx", "4096", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert {row["variant"] for row in json.loads(r.stdout)} == {f"{repo.repo_id}@{b}" for b in totals}
    lines = [ln for ln in r.stderr.splitlines() if "4.0bpw" in ln]
    assert len(lines) == 1 and "config.json" in lines[0], r.stderr
