"""The PyTorch allocator setting of measurement runs (optimizer.allocator) and its record in the trial."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from exl2_fixtures import TINY_LLAMA, make_exl2_dir
from fake_engine import FakeBackend

from optimizer.allocator import ENV, ENV_NEW, EXPANDABLE, apply_for_measurement, for_backend, fragmentation_allowance
from optimizer.backends.base import EvalProtocol, SpeedProtocol
from optimizer.evaldata import EvalText
from optimizer.sources.local import discover_local
from optimizer.space import Budget
from optimizer.study import SearchSpec, open_study, run
from optimizer.units import parse_size
from optimizer.vram import MIB, Split


def test_set_unless_the_user_set_it() -> None:  # on a dict, not os.environ
    env: dict[str, str] = {}
    s = apply_for_measurement(env)
    assert env == {ENV: EXPANDABLE} and s.source == "exl2opt" and s.expandable
    assert s.as_record() == {"alloc_conf": EXPANDABLE, "alloc_conf_source": "exl2opt", "alloc_conf_late": False}
    for name in (ENV, ENV_NEW):
        env = {name: "backend:cudaMallocAsync"}
        s = apply_for_measurement(env)
        assert env == {name: "backend:cudaMallocAsync"} and s.source == "user" and not s.expandable
    env = {}
    assert for_backend("llamacpp", env) is None and env == {}  # llama.cpp does not use PyTorch
    assert for_backend("exllamav2", env) is not None and env == {ENV: EXPANDABLE}


def test_fragmentation_assumption() -> None:
    assert fragmentation_allowance(transient_bytes=300 * MIB, expandable=True) == 0
    assert fragmentation_allowance(transient_bytes=300 * MIB, expandable=False) == 300 * MIB


def _run(tmp_path: Path, backend: FakeBackend) -> list[dict]:
    d = tmp_path / "models"
    make_exl2_dir(d, "tiny-4.0bpw", TINY_LLAMA, bits=4.0)
    spec = SearchSpec(
        variants=tuple(discover_local(d)), budget=Budget(per_device=(parse_size("2GiB"),), overhead=(0,)),
        split=Split(), contexts=(2048,), caches=("fp16", "q4"),
        eval_protocol=EvalProtocol(window=64, n_windows=2, prefill=32, score_chunk=16),
        speed_protocol=SpeedProtocol(context_fill=1024, gen_tokens=16),
    )
    run(spec=spec, study_name="a", backend_factory=lambda v: backend,
        eval_text=lambda: EvalText(dataset_id="fake:1", text="hello world " * 50), root=tmp_path / "studies")
    study = open_study(study_name="a", storage=None, root=tmp_path / "studies")
    return [t.user_attrs for t in study.get_trials(deepcopy=False) if t.user_attrs.get("status") == "measured"]


def _unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset both variables; the run's own setting is undone after the test (setenv records the original)."""
    for name in (ENV, ENV_NEW):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_a_pytorch_backend_run_sets_and_records_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _unset(monkeypatch)
    trials = _run(tmp_path, FakeBackend(name="exllamav2"))  # the fake engine standing in for exllamav2
    assert trials and all(t["alloc_conf"] == EXPANDABLE and t["alloc_conf_source"] == "exl2opt" for t in trials)
    assert os.environ[ENV] == EXPANDABLE


def test_the_users_setting_is_kept_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _unset(monkeypatch)
    monkeypatch.setenv(ENV, "expandable_segments:False")
    trials = _run(tmp_path, FakeBackend(name="exllamav2"))
    assert trials and all(t["alloc_conf"] == "expandable_segments:False" and t["alloc_conf_source"] == "user"
                          for t in trials)
    assert os.environ[ENV] == "expandable_segments:False"


def test_a_llama_cpp_run_records_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _unset(monkeypatch)
    trials = _run(tmp_path, FakeBackend(name="llamacpp"))
    assert trials and all("alloc_conf" not in t for t in trials) and ENV not in os.environ


def test_applied_to_an_already_imported_torch() -> None:
    """torch parses the setting once, on first use: a run whose torch was imported (and its config
    read) earlier still gets expandable segments through the runtime setter."""
    pytest.importorskip("torch")
    code = (
        "import os, torch\n"
        "os.environ.pop('PYTORCH_CUDA_ALLOC_CONF', None); os.environ.pop('PYTORCH_ALLOC_CONF', None)\n"
        "before = torch._C._accelerator_getAllocatorSettings()\n"
        "from optimizer.allocator import apply_for_measurement\n"
        "s = apply_for_measurement()\n"
        "print(repr(before), torch._C._accelerator_getAllocatorSettings(), s.source)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (ENV, ENV_NEW)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert out == ["''", EXPANDABLE, "exl2opt"]
