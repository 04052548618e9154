"""Per-GPU overhead: the store, the choice plan/fit/search make, and `exl2opt calibrate` without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optimizer.calibration import (
    CalibrationRecord,
    GpuIdentity,
    choose_overhead,
    load_records,
    overhead_line,
    save_record,
)
from optimizer.formats.exl2 import DEFAULT_OVERHEAD_BYTES

MIB = 2**20
H200 = GpuIdentity(name="NVIDIA H200", driver="550.54.15", torch="2.13.0+cu128")
T4 = GpuIdentity(name="Tesla T4", driver="550.54.15", torch="2.13.0+cu128")
SMAUG = Path(__file__).resolve().parents[1] / "studies/examples/Smaug-34B-v0.1-3.0bpw-h6-exl2"


def _rec(gpu: GpuIdentity, overhead_mib: int) -> CalibrationRecord:
    return CalibrationRecord(gpu=gpu, overhead_bytes=overhead_mib * MIB, used_bytes=(overhead_mib + 20) * MIB,
                             reserved_bytes=20 * MIB, total_bytes=80000 * MIB,
                             initialised=("torch", "exllamav2_ext", "cublas"), measured_at="2026-11-29 05:00 UTC")


def test_store_round_trip_and_replace(tmp_path: Path) -> None:
    p = tmp_path / "cal.json"
    save_record(_rec(H200, 600), path=p)
    save_record(_rec(T4, 350), path=p)
    save_record(_rec(H200, 640), path=p)  # same GPU, driver, torch: replaced
    recs = load_records(path=p)
    assert set(recs) == {H200.key, T4.key}
    assert recs[H200.key].overhead_bytes == 640 * MIB and recs[T4.key].initialised == ("torch", "exllamav2_ext", "cublas")


def test_damaged_store_counts_as_empty(tmp_path: Path) -> None:
    p = tmp_path / "cal.json"
    p.write_text("{not json")
    assert load_records(path=p) == {}
    p.write_text(json.dumps({"x": {"gpu": {"name": "a"}}}))
    assert load_records(path=p) == {}


def test_explicit_overhead_wins(tmp_path: Path) -> None:
    c = choose_overhead(explicit=(300 * MIB,), gpus=[H200], path=tmp_path / "none.json")
    assert c.per_device == (300 * MIB,) and "(--overhead)" in c.note


def test_no_gpu_here_uses_the_format_default(tmp_path: Path) -> None:
    c = choose_overhead(explicit=None, gpus=[], path=tmp_path / "none.json")
    assert c.per_device is None and "no NVIDIA GPU" in c.note
    line = overhead_line(overhead=c.per_device, note=c.note, formats=["exl2", "exl2"])
    assert line.startswith(f"overhead per GPU: exl2 {DEFAULT_OVERHEAD_BYTES // MIB} MiB, the default for uncalibrated")


def test_calibrated_gpus_use_their_largest_figure(tmp_path: Path) -> None:
    p = tmp_path / "cal.json"
    save_record(_rec(H200, 600), path=p)
    save_record(_rec(T4, 350), path=p)
    c = choose_overhead(explicit=None, gpus=[T4, H200], path=p)
    assert c.per_device == (600 * MIB,) and "calibrated on NVIDIA H200" in c.note


def test_other_driver_or_torch_is_not_calibrated(tmp_path: Path) -> None:
    p = tmp_path / "cal.json"
    save_record(_rec(H200, 600), path=p)
    newer = GpuIdentity(name=H200.name, driver="560.1", torch=H200.torch)
    c = choose_overhead(explicit=None, gpus=[newer], path=p)
    assert c.per_device is None and "is not calibrated: run `exl2opt calibrate`" in c.note


def test_calibrate_without_gpu_is_one_line_and_nonzero(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    monkeypatch.setenv("EXL2OPT_CACHE", str(tmp_path))
    from optimizer.cli import main

    with pytest.raises(SystemExit) as e:
        main(["calibrate"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibrate needs a CUDA GPU" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "calibration.json").exists()


def test_plan_says_which_overhead_it_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optimizer.cli import app

    monkeypatch.setenv("EXL2OPT_CACHE", str(tmp_path))
    monkeypatch.setattr("optimizer.calibration.local_gpus", lambda: [T4])
    args = ["plan", "-m", str(SMAUG), "--vram", "15GB", "--ctx", "1024", "--cache", "q4"]
    before = CliRunner().invoke(app, args)
    assert before.exit_code == 0, before.output
    assert "Tesla T4 | driver 550.54.15 | torch 2.13.0+cu128 is not calibrated" in before.output
    save_record(_rec(T4, 300), path=tmp_path / "calibration.json")
    after = CliRunner().invoke(app, args)
    assert after.exit_code == 0, after.output
    assert "overhead per GPU: 300 MiB, calibrated on Tesla T4" in after.output
