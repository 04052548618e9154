"""GGUF repos on the (loopback, fake) Hub: one variant per quant file or split set, headers only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fakehub import FakeFile, FakeRepo, exl2_files, gguf_fake_files
from gguf_util import write_tiny_gguf

from optimizer.errors import GatedRepoError, ModelSourceError, OfflineError, WeightsHeaderError
from optimizer.sources import HubOptions, RepoSpec, resolve_sources
from optimizer.sources.gguf_local import discover_gguf
from optimizer.sources.hub import discover_hub, discover_hub_detailed
from optimizer.variant import Variant

REPO = "org/Tiny-GGUF"


def _opts(hub, tmp_path: Path, **kw) -> HubOptions:
    return HubOptions(endpoint=hub.endpoint, cache_dir=str(tmp_path / "cache"), **kw)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Local GGUF files, keyed by the path they get in the fake repo.

    ``big`` has ~4 MB of tensor data behind a ~10 kB header; ``Q8/Tiny-C`` is a 3-part split set.
    """
    d = tmp_path_factory.mktemp("gguf-hub")
    files: dict[str, Path] = {
        "Tiny-A.gguf": write_tiny_gguf(d / "Tiny-A.gguf", n_embd=64, seed=1),
        "big/Tiny-Big.gguf": write_tiny_gguf(d / "Tiny-Big.gguf", n_embd=256, n_ff=1024, seed=2),
        "mmproj-Tiny-F16.gguf": write_tiny_gguf(d / "mmproj.gguf", n_embd=64, seed=3),
    }
    sd = d / "split"
    sd.mkdir()
    write_tiny_gguf(sd / "Tiny-C.gguf", n_layer=3, split_max_tensors=12, seed=4)
    for p in sorted(sd.glob("*.gguf")):
        files[f"Q8/{p.name}"] = p
    return files


def _gguf_repo(hub, files: dict[str, Path], repo_id: str = REPO, **kw) -> FakeRepo:
    main = gguf_fake_files(files)
    main["README.md"] = FakeFile(b"# tiny gguf")
    return hub.add(FakeRepo(repo_id, {"main": main}, **kw))


def _local(files: dict[str, Path], repo_path: str) -> Variant:
    (v,) = discover_gguf(files[repo_path])
    return v


def _split_parts(files: dict[str, Path]) -> list[str]:
    return sorted(p for p in files if p.startswith("Q8/"))


def test_every_quant_is_a_variant_equal_to_local_discovery(fake_hub, tmp_path, gguf_dir):
    repo = _gguf_repo(fake_hub, gguf_dir)
    variants = discover_hub(spec=RepoSpec(REPO), options=_opts(fake_hub, tmp_path))
    by_file = {(v.location.subfolder, v.location.files[0]): v for v in variants}
    parts = _split_parts(gguf_dir)
    assert set(by_file) == {(None, "Tiny-A.gguf"), ("big", "Tiny-Big.gguf"), ("Q8", os.path.basename(parts[0]))}
    assert len({v.key for v in variants}) == 3, "each quant file needs its own identity"
    for repo_path in ("Tiny-A.gguf", "big/Tiny-Big.gguf", parts[0]):
        sub, _, name = repo_path.rpartition("/")
        hub_v, local_v = by_file[(sub or None, name)], _local(gguf_dir, repo_path)
        assert hub_v.format == "gguf"
        assert hub_v.tensors == local_v.tensors
        assert hub_v.total_bytes == local_v.total_bytes > 0
        assert dict(hub_v.config) == dict(local_v.config)
        assert (hub_v.label, hub_v.bits) == (local_v.label, local_v.bits)
        loc = hub_v.location
        assert loc.kind == "hub" and loc.repo_id == REPO and loc.revision == "main"
        assert loc.commit == repo.commit("main")
        assert loc.display == f"{REPO}@main/{repo_path}"
    big = by_file[("big", "Tiny-Big.gguf")]
    assert big.location.download_command() == f"hf download {REPO} big/Tiny-Big.gguf --local-dir Tiny-GGUF"
    split = by_file[("Q8", os.path.basename(parts[0]))]
    assert split.location.files == tuple(os.path.basename(p) for p in parts) and len(parts) == 3
    cmd = split.location.download_command()
    assert all(f" {p}" in cmd for p in parts) and cmd.startswith(f"hf download {REPO} Q8/")
    names = {t.name for t in split.tensors}
    assert "token_embd.weight" in names and "output.weight" in names and "blk.2.ffn_down.weight" in names


def test_only_the_header_is_read_with_ranges(fake_hub, tmp_path, gguf_dir):
    _gguf_repo(fake_hub, gguf_dir)
    discover_hub(spec=RepoSpec(REPO), options=_opts(fake_hub, tmp_path))
    gets = fake_hub.gguf_gets()
    assert gets and all(r.range is not None for r in gets), "a GGUF file was fetched without a Range header"
    served = fake_hub.bytes_served(".gguf")
    big_path = next(p for p in served if p.endswith("/big/Tiny-Big.gguf"))  # read at the branch's commit
    big_size = gguf_dir["big/Tiny-Big.gguf"].stat().st_size
    assert big_size > 4_000_000
    assert 0 < served[big_path] <= big_size // 20, "more than a header's worth of the big file was served"
    assert not any("mmproj" in r.path for r in fake_hub.requests), "vision projectors are not variants"
    assert not any(r.path.endswith("README.md") and r.method == "GET" and "/resolve/" in r.path
                   for r in fake_hub.requests)


def test_large_header_is_read_incrementally(fake_hub, tmp_path, monkeypatch, gguf_dir):
    """With a small first read the parser asks for more, in growing ranges, never the whole file."""
    import optimizer.sources.http as hg

    monkeypatch.setattr(hg, "FIRST_READ_BYTES", 512)
    monkeypatch.setattr(hg, "MAX_READ_BYTES", 2048)
    _gguf_repo(fake_hub, {"big/Tiny-Big.gguf": gguf_dir["big/Tiny-Big.gguf"]})
    (v,) = discover_hub(spec=RepoSpec(REPO), options=_opts(fake_hub, tmp_path))
    assert v.tensors == _local(gguf_dir, "big/Tiny-Big.gguf").tensors
    gets = fake_hub.gguf_gets()
    assert len(gets) >= 3
    sizes = [int(e) - int(s) + 1 for s, _, e in (r.range.removeprefix("bytes=").partition("-") for r in gets)]
    assert sizes[0] == 512 and max(sizes) <= 2048 and sizes == sorted(sizes)


def test_repeated_run_works_offline_and_without_network(fake_hub, tmp_path, gguf_dir):
    _gguf_repo(fake_hub, gguf_dir)
    first = discover_hub(spec=RepoSpec(REPO), options=_opts(fake_hub, tmp_path))
    n_req = len(fake_hub.requests)
    again = discover_hub_detailed(spec=RepoSpec(REPO), options=_opts(fake_hub, tmp_path, offline=True))
    assert again.from_cache and again.reason == "offline"
    assert len(fake_hub.requests) == n_req
    for a, b in zip(first, again.variants, strict=True):
        assert (a.key, a.label, a.bits, a.tensors, dict(a.config), a.location) == \
               (b.key, b.label, b.bits, b.tensors, dict(b.config), b.location)
    # an online rerun at the same commit reuses the cached headers (refs only)
    n_gguf = len(fake_hub.gguf_gets())
    discover_hub(spec=RepoSpec(REPO), options=_opts(fake_hub, tmp_path))
    assert len(fake_hub.gguf_gets()) == n_gguf
    fake_hub.stop()
    down = discover_hub_detailed(spec=RepoSpec(REPO, "main"), options=_opts(fake_hub, tmp_path))
    assert down.from_cache and down.reason == "network"
    assert [v.key for v in down.variants] == [v.key for v in first]


def test_offline_without_cache_is_a_clear_error(fake_hub, tmp_path, gguf_dir):
    _gguf_repo(fake_hub, gguf_dir)
    with pytest.raises(OfflineError, match="no metadata"):
        discover_hub(spec=RepoSpec(REPO), options=_opts(fake_hub, tmp_path, offline=True))


def test_revision_spec_and_mixed_repo(fake_hub, tmp_path, gguf_dir):
    """exl2 branches beside a main of GGUF files: both formats, each as its own variants."""
    files, _ = exl2_files(4.0, 6)
    main = gguf_fake_files({"Tiny-A.gguf": gguf_dir["Tiny-A.gguf"]})
    repo = fake_hub.add(FakeRepo("org/Mixed", {"main": main, "4.0bpw": files}))
    both = discover_hub(spec=RepoSpec("org/Mixed"), options=_opts(fake_hub, tmp_path))
    assert sorted(v.format for v in both) == ["exl2", "gguf"]
    only = resolve_sources(specs=["org/Mixed@main"], hub=_opts(fake_hub, tmp_path))
    assert [(v.format, v.location.files) for v in only] == [("gguf", ("Tiny-A.gguf",))]
    by_sha = discover_hub(spec=RepoSpec("org/Mixed", repo.commit("main")), options=_opts(fake_hub, tmp_path))
    assert by_sha[0].tensors == only[0].tensors
    assert f"--revision {repo.commit('main')}" in by_sha[0].location.download_command()


def test_incomplete_split_set_and_bad_header(fake_hub, tmp_path, gguf_dir):
    parts = _split_parts(gguf_dir)
    _gguf_repo(fake_hub, {p: gguf_dir[p] for p in parts[:2]}, repo_id="org/Broken-GGUF")
    with pytest.raises(ModelSourceError, match="incomplete GGUF split set"):
        discover_hub(spec=RepoSpec("org/Broken-GGUF"), options=_opts(fake_hub, tmp_path))
    fake_hub.add(FakeRepo("org/Junk-GGUF", {"main": {"x-Q4_0.gguf": FakeFile(b"not a gguf at all" * 10)}}))
    with pytest.raises(WeightsHeaderError, match="not a GGUF file"):
        discover_hub(spec=RepoSpec("org/Junk-GGUF"), options=_opts(fake_hub, tmp_path))


def test_gated_gguf_repo_maps_errors_and_sends_the_token(fake_hub, tmp_path, gguf_dir):
    _gguf_repo(fake_hub, {"Tiny-A.gguf": gguf_dir["Tiny-A.gguf"]}, gated=True, token="hf_fake_ok")
    with pytest.raises(GatedRepoError, match="set HF_TOKEN"):
        discover_hub(spec=RepoSpec(REPO), options=_opts(fake_hub, tmp_path))
    with pytest.raises(GatedRepoError, match="refused"):
        discover_hub(spec=RepoSpec(REPO), options=_opts(fake_hub, tmp_path / "b", token="hf_wrong"))
    (v,) = discover_hub(spec=RepoSpec(REPO), options=_opts(fake_hub, tmp_path / "c", token="hf_fake_ok"))
    assert v.tensors == _local(gguf_dir, "Tiny-A.gguf").tensors
    assert all(r.auth for r in fake_hub.gguf_gets()[-1:])
    cached = (tmp_path / "c" / "cache").rglob("*.json") if (tmp_path / "c" / "cache").exists() else []
    assert all("hf_fake_ok" not in p.read_text() for p in cached)


def test_plan_and_fit_cli_on_a_gguf_repo(fake_hub, tmp_path, gguf_dir):
    _gguf_repo(fake_hub, gguf_dir)
    env = dict(os.environ, HF_ENDPOINT=fake_hub.endpoint, PYTHONPATH=str(Path(__file__).parent))
    r = subprocess.run([sys.executable, "-m", "optimizer", "plan", "-m", REPO, "--vram", "1GB", "--gpus", "2",
                        "--ctx", "512", "--cache", "f16", "--json"], env=env, capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 3 and all(len(row["devices"]) == 2 for row in rows)
    n_req = len(fake_hub.requests)
    shutil.rmtree(tmp_path / "hf-home", ignore_errors=True)
    r2 = subprocess.run([sys.executable, "-m", "optimizer", "fit", "-m", REPO, "--vram", "1GB", "--cache", "f16",
                         "--offline", "--json"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert len(json.loads(r2.stdout)) == 3
    assert len(fake_hub.requests) == n_req, "an --offline run must not touch the Hub"


def test_llamacpp_engine_downloads_a_hub_variant(fake_hub, tmp_path, monkeypatch, gguf_dir):
    """A Hub GGUF variant (here a 3-part split set) is fetched into the HF cache and loaded."""
    pytest.importorskip("llama_cpp")
    from optimizer.backends.base import LoadSpec
    from optimizer.backends.llamacpp import LlamaCppEngine
    from optimizer.vram import Split

    parts = _split_parts(gguf_dir)
    _gguf_repo(fake_hub, {p: gguf_dir[p] for p in parts})
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    (v,) = discover_hub(spec=RepoSpec(REPO), options=_opts(fake_hub, tmp_path))
    eng = LlamaCppEngine(n_threads=1)
    try:
        assert eng.prepare(LoadSpec(variant=v, split=Split(), max_seq_len=256, cache="f16", chunk_len=64)).model_loaded
        assert len(eng.tokenize("the cat")) > 0
    finally:
        eng.close()
    full = [r for r in fake_hub.gguf_gets() if r.range is None]
    assert len(full) == 3, "each part is downloaded once, in full, only for the measurement"
