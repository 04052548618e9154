"""The formats registry: every format is registered once, and shared code asks the registry."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from fakehub import TINY_CONFIG, FakeFile, FakeRepo, header_only_shard

from optimizer.backends import BACKEND_MODULES
from optimizer.errors import BadOptionError
from optimizer.formats import FORMATS, FormatSpec, folder_format, rules_for
from optimizer.formats.exl3_synth import synthesize
from optimizer.recipes import _module as recipes_module
from optimizer.safetensors_header import write_header_only
from optimizer.sources import HubOptions, RepoSpec
from optimizer.sources.hub import discover_hub
from optimizer.sources.local import discover_local
from optimizer.space import Budget, Configuration, evaluate
from optimizer.vram import GIB, Split

ROOT = Path(__file__).resolve().parents[1] / "optimizer"

#: Shared modules that must not test format names (they ask the registry instead).
SHARED = ["sources/local.py", "sources/hub.py", "arch.py", "tables.py", "cli/plan.py", "space.py",
          "backends/__init__.py", "recipes/__init__.py", "sources/download.py"]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_is_complete(name: str) -> None:
    spec = FORMATS[name]
    rules = rules_for(name)
    assert name == rules.FORMAT
    assert rules.CACHE_MODE_NAMES and rules.DEFAULT_OVERHEAD_BYTES > 0
    assert spec.layout in ("folder", "files")
    if spec.layout == "folder":
        assert spec.quant_method and spec.shards and spec.local_shards
    mod = recipes_module(name)
    assert mod is not None and set(mod.DEFAULT) <= set(mod.RECIPES)
    assert spec.backend is None or spec.backend in BACKEND_MODULES
    assert sum(1 for s in FORMATS.values() if s.legacy) == 1


@pytest.mark.parametrize("path", SHARED)
def test_shared_modules_name_no_format(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text())
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not names & set(FORMATS), f"{path} tests a format by name: {sorted(names & set(FORMATS))}"


def test_a_new_folder_format_is_one_registry_entry(tmp_path: Path, fake_hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Register a format that only differs by quant_method and shard names: local and Hub discovery,
    the bits from its quantization_config and the memory rules all follow, with no other change."""
    spec = FormatSpec(name="exl3x", rules="optimizer.formats.exl3_rules", recipes="optimizer.recipes.exl3",
                      backend=None, layout="folder", quant_method="exl3x", shards=r"^weights\.safetensors$",
                      local_shards=r"^weights\.safetensors$")
    monkeypatch.setitem(FORMATS, "exl3x", spec)
    cfg: dict[str, Any] = {**TINY_CONFIG, "quantization_config": {"quant_method": "exl3x", "bits": 4.0, "head_bits": 6}}
    table = synthesize(cfg, bits=4.0, head_bits=6)
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    write_header_only(d / "weights.safetensors", table)
    write_header_only(d / "model.safetensors", {"junk": ("F16", (8,))})  # not this format's shard name
    (v,) = discover_local(d)
    assert (v.format, v.bits, v.head_bits, v.location.files) == ("exl3x", 4.0, 6, ("weights.safetensors",))
    assert folder_format(cfg) is spec
    verdict = evaluate(config=Configuration(variant=v, max_seq_len=1024, cache="k4v4", split=Split()),
                       budget=Budget(per_device=(8 * GIB,)))
    assert verdict.fits and verdict.devices[0].weights > 0
    raw, size = header_only_shard(table)
    fake_hub.add(FakeRepo("new/Tiny", {"main": {"README.md": FakeFile(b"x")},
                                       "4.0bpw": {"config.json": FakeFile(json.dumps(cfg).encode()),
                                                  "weights.safetensors": FakeFile(raw, size=size)}}))
    (h,) = discover_hub(spec=RepoSpec("new/Tiny"), options=HubOptions(endpoint=fake_hub.endpoint,
                                                                       cache_dir=str(tmp_path / "c")))
    assert (h.format, h.location.files, h.total_bytes) == ("exl3x", ("weights.safetensors",), v.total_bytes)


def test_unknown_format_is_a_clear_error() -> None:
    with pytest.raises(BadOptionError, match="unknown format 'exl9'"):
        rules_for("exl9")
