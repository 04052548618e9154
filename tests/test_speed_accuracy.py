"""The decode-speed accuracy benchmark: its prior refit, its reading of the shipped table, its host-bound split."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from optimizer.predict.speed import ENGINES

ROOT = Path(__file__).resolve().parents[1]


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("speed_accuracy", ROOT / "benchmarks" / "speed_accuracy.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["speed_accuracy"] = mod
    spec.loader.exec_module(mod)
    return mod


sa = _module()


def _row(*, weights: int, layers: int, server: bool, eta: float, td: float, ts: float, bw: float = 1e12,
         host_bound: bool = False, model: str = "m", tok: float | None = None):  # type: ignore[no-untyped-def]
    t = weights / (eta * bw) + layers * (ts if server else td)
    return sa.Row(model=model, fmt="exl2", gpu="g", bandwidth=bw, server=server, weights=weights, kv_per_token=0,
                  fill=0, layers=layers, tok_s=tok if tok is not None else 1 / t, host_bound=host_bound)


def test_refit_recovers_efficiency_and_both_host_costs() -> None:
    rows = [_row(weights=w, layers=L, server=s, eta=0.8, td=50e-6, ts=200e-6, model=f"m{i}")
            for i, (w, L, s) in enumerate([(1e9, 22, False), (4e9, 32, False), (20e9, 80, False),
                                           (4e9, 32, True), (35e9, 80, True)])]
    p = sa.refit_priors(rows, "exl2")
    assert p.eta_w == pytest.approx(0.8, rel=1e-6)
    assert p.tau_desktop == pytest.approx(50e-6, rel=1e-6)
    assert p.tau_server == pytest.approx(200e-6, rel=1e-6)


def test_refit_never_fits_host_bound_rows_and_keeps_prior_tau_without_data() -> None:
    rows = [_row(weights=w, layers=L, server=False, eta=0.9, td=40e-6, ts=0.0, model=f"m{i}")
            for i, (w, L) in enumerate([(1e9, 22), (4e9, 32), (20e9, 80)])]
    slow = _row(weights=4e9, layers=32, server=True, eta=0.9, td=0.0, ts=0.0, host_bound=True, tok=5.0)
    p = sa.refit_priors([*rows, slow], "exl2")
    assert p.eta_w == pytest.approx(0.9, rel=1e-6)
    assert p.tau_desktop == pytest.approx(40e-6, rel=1e-6)
    assert p.tau_server == ENGINES["exl2"].tau_server.value  # the only server row is host-bound


def test_shipped_table_reads_whole_with_sources() -> None:
    rows = sa.load_rows()
    assert len(rows) >= 80 and {r.fmt for r in rows} == {"exl2", "gguf"}
    assert all(r.weights > 0 and r.tok_s > 0 and r.layers > 0 for r in rows)
    with sa.DATA.open() as f:
        raw = list(csv.DictReader(f))
    assert all(r["source_url"].startswith("https://") for r in raw)
    for r, parsed in zip(raw, rows, strict=True):
        if r["format"] == "gguf":  # bytes read = file minus the embedding lookup: below the printed size
            assert parsed.weights < float(r["size_gib"]) * 2**30
        if r["host_bound"] == "yes":  # flagged only where the source itself blames the host CPU
            assert "cpu" in r["note"].lower()


def test_report_splits_host_bound_rows_and_names_misses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with sa.DATA.open() as f:
        raw = list(csv.DictReader(f))
    keep = [r for r in raw if r["gpu"] in ("RTX 4090", "A100 SXM4 40GB") and r["format"] == "exl2"]
    path = tmp_path / "speed.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(raw[0]))
        w.writeheader()
        w.writerows(keep)
    out = sa.speed_report(path)
    text = capsys.readouterr().out
    a100 = next(line for line in text.splitlines() if "A100 SXM4 40GB" in line and "exllamav2" in line)
    assert "--" in a100  # only host-bound rows: nothing left once they are set aside
    assert "over the goal (priors, all rows): exllamav2 A100 SXM4 40GB" in text
    assert out["excl_host_bound"] <= out["all"]
    assert out["groups"] == 2
