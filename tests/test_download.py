"""Measurement-time download of Hub variants (optimizer.sources.download) against the fake Hub."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fakehub import FakeFile, FakeRepo, exl2_files

from optimizer.errors import EngineError, EngineTransientError
from optimizer.sources import HubOptions, RepoSpec
from optimizer.sources.download import RetryPolicy, local_path
from optimizer.sources.hub import discover_hub


def _full(files: dict[str, FakeFile]) -> dict[str, FakeFile]:
    """Serve exactly the listed bytes (header-only shards), so a real download is consistent."""
    return {name: FakeFile(f.data) for name, f in files.items()}


def test_exl2_branch_and_subfolder_download_to_a_loadable_dir(fake_hub, tmp_path, monkeypatch):
    files, _ = exl2_files(4.0, 6)
    sub, _ = exl2_files(3.0, 6)
    branches = {
        "main": {"README.md": FakeFile(b"# r")},
        "4.0bpw": {**_full(files), "README.md": FakeFile(b"# r")},
    }
    fake_hub.add(FakeRepo("org/M-exl2", branches))
    fake_hub.add(FakeRepo("org/M-sub", {"main": {f"3.0bpw/{k}": v for k, v in _full(sub).items()}}))
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    opts = HubOptions(endpoint=fake_hub.endpoint, cache_dir=str(tmp_path / "c"))
    (v,) = discover_hub(spec=RepoSpec("org/M-exl2"), options=opts)
    path = Path(local_path(v))
    assert (path / "config.json").is_file() and (path / "output.safetensors").is_file()
    assert (path / "output.safetensors").read_bytes() == files["output.safetensors"].data
    (vs,) = discover_hub(spec=RepoSpec("org/M-sub"), options=opts)
    spath = Path(local_path(vs))
    assert spath.name == "3.0bpw" and (spath / "config.json").is_file()


def test_local_variant_is_returned_as_is(tmp_path):
    from exl2_fixtures import TINY_LLAMA, make_exl2_dir

    from optimizer.sources.local import discover_local

    d = make_exl2_dir(tmp_path, "4.0bpw", TINY_LLAMA, bits=4.0)
    (v,) = discover_local(d)
    assert local_path(v) == str(d)


#: retries fast enough for a test (the default waits 2 + 4 + 8 s)
FAST = RetryPolicy(attempts=3, first_delay_s=0.01)


def test_hub_gone_is_a_transient_one_line_engine_error_after_bounded_retries(fake_hub, tmp_path, monkeypatch):
    files, _ = exl2_files(4.0, 6)
    fake_hub.add(FakeRepo("org/Gone", {"4.0bpw": _full(files)}))
    opts = HubOptions(endpoint=fake_hub.endpoint, cache_dir=str(tmp_path / "c"))
    (v,) = discover_hub(spec=RepoSpec("org/Gone"), options=opts)
    fake_hub.stop()
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    t0 = time.monotonic()
    with pytest.raises(EngineTransientError) as e:
        local_path(v, retry=FAST)
    assert time.monotonic() - t0 < 10  # our bounded retries only: no library back-off of its own
    assert "org/Gone@4.0bpw" in str(e.value) and "after 3 attempts" in str(e.value) and "\n" not in str(e.value)
    assert os.environ.get("HF_TOKEN") is None


def test_a_flaky_hub_is_retried_and_the_download_completes(fake_hub, tmp_path, monkeypatch):
    files, _ = exl2_files(4.0, 6)
    fake_hub.add(FakeRepo("org/Flaky", {"4.0bpw": _full(files)}))
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    opts = HubOptions(endpoint=fake_hub.endpoint, cache_dir=str(tmp_path / "c"))
    (v,) = discover_hub(spec=RepoSpec("org/Flaky"), options=opts)
    fake_hub.unavailable = 2  # the listing and then the first file GET fail with 503
    path = Path(local_path(v, retry=FAST))
    assert (path / "output.safetensors").read_bytes() == files["output.safetensors"].data
    assert fake_hub.unavailable == 0


def test_a_missing_repo_is_final_not_retried(fake_hub, tmp_path, monkeypatch):
    files, _ = exl2_files(4.0, 6)
    repo = fake_hub.add(FakeRepo("org/Deleted", {"4.0bpw": _full(files)}))
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    opts = HubOptions(endpoint=fake_hub.endpoint, cache_dir=str(tmp_path / "c"))
    (v,) = discover_hub(spec=RepoSpec("org/Deleted"), options=opts)
    del fake_hub.repos[repo.repo_id]
    before = len(fake_hub.requests)
    with pytest.raises(EngineError) as e:
        local_path(v, retry=FAST)
    assert not isinstance(e.value, EngineTransientError)
    assert len(fake_hub.requests) - before == 1  # one listing GET, no retry


def test_retry_policy_waits_are_bounded() -> None:
    assert RetryPolicy(attempts=5, first_delay_s=2.0, max_delay_s=5.0).delays() == [2.0, 4.0, 5.0, 5.0]
    assert RetryPolicy(attempts=1).delays() == []
