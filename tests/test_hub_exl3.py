"""EXL3 discovery on the Hub, against the loopback fake Hub (tests/fakehub.py); no network."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fakehub import TINY_CONFIG, FakeFile, FakeRepo, exl2_files, header_only_shard

from optimizer.formats.exl3_synth import quantization_config, synthesize
from optimizer.sources import HubOptions, RepoSpec, resolve_sources
from optimizer.sources.hub import discover_hub, discover_hub_detailed


def _opts(hub: Any, tmp_path: Path, **kw: Any) -> HubOptions:
    return HubOptions(endpoint=hub.endpoint, cache_dir=str(tmp_path / "cache"), **kw)


def exl3_files(bits: float, head_bits: int = 6, *, shards: int = 1, leftovers: bool = False
               ) -> tuple[dict[str, FakeFile], int]:
    """One EXL3 variant as the converter publishes it: config.json with ``quantization_config``,
    ``model.safetensors`` or ``model-0000k-of-0000N.safetensors`` (+ index), ``quantization_config.json``,
    tokenizer files, optionally converter leftovers; and the exact tensor bytes of the shards."""
    cfg = {**TINY_CONFIG, "quantization_config": quantization_config(bits=bits, head_bits=head_bits)}
    table = synthesize(cfg, bits=bits, head_bits=head_bits)
    names = list(table)
    per = math.ceil(len(names) / shards)
    files = {"config.json": FakeFile(json.dumps(cfg).encode()), "tokenizer.json": FakeFile(b"{}"),
             "quantization_config.json": FakeFile(json.dumps(cfg["quantization_config"]).encode())}
    total = 0
    for i in range(shards):
        raw, size = header_only_shard({k: table[k] for k in names[i * per:(i + 1) * per]})
        total += size - len(raw)
        name = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        files[name] = FakeFile(raw, size=size)
    if shards > 1:
        files["model.safetensors.index.json"] = FakeFile(json.dumps({"metadata": {"total_size": total}}).encode())
    if leftovers:
        junk, junk_size = header_only_shard({"hidden": ("F16", (4096, 4096))})
        files["hidden_states.safetensors"] = FakeFile(junk, size=junk_size)
        files["cal_data.safetensors"] = FakeFile(junk, size=junk_size)
    return files, total


def _fp16_original() -> dict[str, FakeFile]:
    """An unquantized original on main: config.json without quantization_config, model-*.safetensors."""
    table = {"model.embed_tokens.weight": ("F16", (1024, 256)), "model.layers.0.mlp.up_proj.weight": ("F16", (512, 256))}
    raw, size = header_only_shard(table)
    return {"config.json": FakeFile(json.dumps(TINY_CONFIG).encode()),
            "model-00001-of-00001.safetensors": FakeFile(raw, size=size)}


def test_branch_names_of_every_spelling(fake_hub: Any, tmp_path: Path) -> None:
    branches: dict[str, dict[str, FakeFile]] = {"main": {"README.md": FakeFile(b"# exl3"),
                                                         "measurement.json": FakeFile(b"{}")}}
    totals = {}
    for name, bits, shards in (("4.0bpw", 4.0, 1), ("4.00bpw", 4.0, 2), ("4.0bpw_H6", 4.0, 1), ("3.97bpw_H6", 3.97, 3)):
        branches[name], totals[name] = exl3_files(bits, shards=shards, leftovers=name == "3.97bpw_H6")
    repo = fake_hub.add(FakeRepo("turbo/Tiny-exl3", branches))
    variants = discover_hub(spec=RepoSpec(repo.repo_id), options=_opts(fake_hub, tmp_path))
    assert sorted(v.location.revision for v in variants) == ["3.97bpw_H6", "4.00bpw", "4.0bpw", "4.0bpw_H6"]
    for v in variants:
        rev = v.location.revision
        assert v.format == "exl3" and v.total_bytes == totals[rev]
        assert all(f.startswith("model") and f.endswith(".safetensors") for f in v.location.files)
        assert v.head_bits == 6 and v.location.commit == repo.commit(rev)
    by_rev = {v.location.revision: v for v in variants}
    assert by_rev["3.97bpw_H6"].bits == 3.97 and by_rev["3.97bpw_H6"].label == "3.97bpw-h6"
    assert len(by_rev["3.97bpw_H6"].location.files) == 3
    paths = [r.path for r in fake_hub.requests]
    assert not any("hidden_states" in p or "cal_data" in p or p.endswith(".index.json") for p in paths)
    for r in fake_hub.weight_gets():  # headers only, never weight data
        assert r.range is not None


def test_single_variant_repo_and_fp16_original_on_main(fake_hub: Any, tmp_path: Path) -> None:
    files, total = exl3_files(3.5)
    fake_hub.add(FakeRepo("solo/Tiny-exl3-3.50bpw", {"main": files}))
    mixed, mixed_total = exl3_files(5.0)
    fake_hub.add(FakeRepo("mix/Tiny", {"main": _fp16_original(), "5.0bpw": mixed}))
    variants = resolve_sources(specs=["solo/Tiny-exl3-3.50bpw", "mix/Tiny"], hub=_opts(fake_hub, tmp_path))
    assert [(v.location.repo_id, v.location.revision, v.format, v.total_bytes) for v in variants] == [
        ("solo/Tiny-exl3-3.50bpw", "main", "exl3", total), ("mix/Tiny", "5.0bpw", "exl3", mixed_total)]
    assert "--revision" not in variants[0].location.download_command()


def test_exl2_and_exl3_branches_of_one_repo_and_offline_rerun(fake_hub: Any, tmp_path: Path) -> None:
    e2, t2 = exl2_files(4.0, 6)
    e3, t3 = exl3_files(4.0)
    fake_hub.add(FakeRepo("both/Tiny", {"main": {"README.md": FakeFile(b"x")}, "exl2-4.0bpw": e2, "exl3-4.0bpw": e3}))
    online = discover_hub(spec=RepoSpec("both/Tiny"), options=_opts(fake_hub, tmp_path))
    assert sorted((v.format, v.total_bytes) for v in online) == sorted([("exl2", t2), ("exl3", t3)])
    cached = discover_hub_detailed(spec=RepoSpec("both/Tiny"), options=_opts(fake_hub, tmp_path, offline=True))
    assert cached.from_cache
    assert sorted((v.format, v.total_bytes) for v in cached.variants) == sorted((v.format, v.total_bytes) for v in online)


def test_fit_answers_for_a_hub_exl3_repo(fake_hub: Any, tmp_path: Path) -> None:
    files, _ = exl3_files(4.0)
    fake_hub.add(FakeRepo("turbo/Tiny-exl3", {"main": {"README.md": FakeFile(b"x")}, "4.0bpw": files}))
    env = {**os.environ, "HF_ENDPOINT": fake_hub.endpoint, "EXL2OPT_CACHE": str(tmp_path / "c"), "HF_HUB_OFFLINE": "0"}
    out = subprocess.run([sys.executable, "-m", "optimizer", "fit", "--model", "turbo/Tiny-exl3", "--vram", "4GB",
                          "--cache", "k4v4", "--json"], capture_output=True, text=True, env=env, check=True)
    (rec,) = json.loads(out.stdout)
    assert rec["format"] == "exl3" and rec["max_ctx"] == 4096 and rec["label"] == "4.0bpw-h6"
    assert "layer_type=CacheLayer_quant, k_bits=4, v_bits=4" in rec["run"]
