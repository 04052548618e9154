"""Measurement-time download of Hub variants (optimizer.sources.download) against the fake Hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fakehub import FakeFile, FakeRepo, exl2_files

from optimizer.errors import EngineError
from optimizer.sources import HubOptions, RepoSpec
from optimizer.sources.download import local_path
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


@pytest.mark.slow
def test_download_failure_is_one_line_engine_error(fake_hub, tmp_path, monkeypatch):
    files, _ = exl2_files(4.0, 6)
    fake_hub.add(FakeRepo("org/Gone", {"4.0bpw": _full(files)}))
    opts = HubOptions(endpoint=fake_hub.endpoint, cache_dir=str(tmp_path / "c"))
    (v,) = discover_hub(spec=RepoSpec("org/Gone"), options=opts)
    fake_hub.stop()
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    with pytest.raises(EngineError) as e:
        local_path(v)
    assert "org/Gone@4.0bpw" in str(e.value) and "\n" not in str(e.value)
    assert os.environ.get("HF_TOKEN") is None
