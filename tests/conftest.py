"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> Iterator[object]:
    """A running :class:`fakehub.FakeHub` on 127.0.0.1 with an isolated HF_HOME and exl2opt cache.

    HF_HOME, EXL2OPT_CACHE and HF_HUB_CACHE point into ``tmp_path``; HF_HUB_OFFLINE, HF_TOKEN and
    HF_ENDPOINT are unset so neither a developer's token nor the real Hub is ever used.
    """
    from fakehub import FakeHub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("EXL2OPT_CACHE", str(tmp_path / "exl2opt-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    hub = FakeHub().start()
    try:
        yield hub
    finally:
        hub.stop()
