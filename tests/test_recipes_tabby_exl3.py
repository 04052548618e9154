"""TabbyAPI's config.yml recipe for EXL3 quants, against the option names and behaviour of TabbyAPI's
exllamav3 backend (read from its sources at the commit below), and against the real exllamav3 1.6.5.

The facts recorded here were read with git from theroyallab/tabbyAPI ``main`` at ``e632af41eba6``
(2026-08-13): ``common/config_models.py`` (field names and validators), ``backends/exllamav3/model.py``
(how the values reach exllamav3), ``main.py`` (``cuda_malloc_async``). They are the reference the recipe is
tested against, so a recipe that drifts from them fails here.
"""

from __future__ import annotations

import inspect
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from optimizer.allocator import ENV, EXPANDABLE
from optimizer.errors import BadOptionError
from optimizer.formats.exl3 import CACHE_MODE_NAMES, cache_mode
from optimizer.recipes import RunSpec, recipe
from optimizer.recipes.exl3_tabby import TABBY_COMMIT, tabby_cache_mode
from optimizer.vram import MIB, Split

yaml = pytest.importorskip("yaml")

# ----- TabbyAPI e632af41eba6, recorded ---------------------------------------------------------------------
COMMIT = "e632af41eba6"
#: ModelConfig fields (common/config_models.py) the block may set.
MODEL_KEYS = {"model_dir", "model_name", "max_seq_len", "cache_size", "cache_mode", "chunk_size", "max_batch_size",
              "tensor_parallel", "gpu_split_auto", "gpu_split", "autosplit_reserve"}
#: MemoryConfig fields the block may set.
MEMORY_KEYS = {"cuda_malloc_async"}
#: cache_mode: CACHE_SIZES literals, or this pattern (k_bits,v_bits); create_cache maps Q4/Q6/Q8 to 4,4/6,6/8,8.
CACHE_LITERALS = {"FP16": None, "Q8": (8, 8), "Q6": (6, 6), "Q4": (4, 4)}
CACHE_PAIR = re.compile(r"^([2-8])\s*,\s*([2-8])$")
#: cache_size: multiple_of=256, gt=0; chunk_size: max(256, c) rounded up to 256 (adjust_chunk_size).
CACHE_MULTIPLE = 256
#: exllamav3 calls of backends/exllamav3/model.py, keyword names as TabbyAPI passes them.
CACHE_KWARGS = ("max_num_tokens", "layer_type", "k_bits", "v_bits", "max_batch_size", "max_history")
LOAD_GEN_KWARGS = ("tensor_p", "tp_backend", "reserve_per_device", "use_per_device", "callback", "max_chunk_size",
                   "max_batch_size")
GENERATOR_KWARGS = ("model", "cache", "draft_model", "draft_cache", "tokenizer", "max_batch_size", "max_chunk_size",
                    "recurrent_cache_size", "cpu_cache_size", "num_draft_tokens", "dynamic_draft_tokens",
                    "ngram_match_min")
#: max_batch_size default for attention-only models (create: 4 if recurrent_states else 128).
DEFAULT_MAX_BATCH = 128

ENV_WORD = f"{ENV}={EXPANDABLE}"
SPLITS = {
    "single": Split(),
    "manual": Split(mode="manual", gpu_split=(10.0, 15.5)),
    "auto": Split(mode="auto", n_devices=2),
    "auto-reserve": Split(mode="auto", n_devices=2, reserve_bytes=(1024 * MIB, 300 * MIB)),
}


def spec(cache: str = "k4v4", split: Split = Split(), path: str = "/models/Llama-exl3", ctx: int = 8192,
         **kw: Any) -> RunSpec:
    return RunSpec(fmt="exl3", label="4.0bpw-h6", model_path=path, max_seq_len=ctx, cache=cache, split=split, **kw)


def tabby_layer(value: str) -> tuple[int, int] | None:
    """What TabbyAPI's create_cache makes of a cache_mode value: (k_bits, v_bits), or None for FP16."""
    if value in CACHE_LITERALS:
        return CACHE_LITERALS[value]
    m = CACHE_PAIR.match(value)
    assert m, f"TabbyAPI's ModelConfig refuses cache_mode {value!r}"
    return int(m.group(1)), int(m.group(2))


def test_recorded_commit_is_the_one_the_recipe_names() -> None:
    assert TABBY_COMMIT == COMMIT
    assert f"(main, {COMMIT[:7]}," in recipe(spec(), tool="tabby").title


@pytest.mark.parametrize("cache", CACHE_MODE_NAMES)
def test_every_exl3_cache_mode_maps_to_the_same_layer_in_tabbyapi(cache: str) -> None:
    value = tabby_cache_mode(cache)
    mode = cache_mode(cache)
    assert tabby_layer(value) == ((mode.k_bits, mode.v_bits) if mode.quantized else None)
    doc = yaml.safe_load(recipe(spec(cache=cache), tool="tabby").text)
    assert doc["model"]["cache_mode"] == value  # a string after YAML (never the number 4 or a list)


def test_an_exl2_cache_name_is_refused_not_mapped() -> None:
    for bad in ("q4", "fp8", "k9v4", "k1v1"):
        with pytest.raises(BadOptionError):
            tabby_cache_mode(bad)


@pytest.mark.parametrize("split_name", list(SPLITS))
@pytest.mark.parametrize("cache", ["fp16", "k8v8", "k4v6", "k2v2"])
def test_block_is_yaml_with_the_keys_tabbyapi_reads(cache: str, split_name: str) -> None:
    split = SPLITS[split_name]
    r = recipe(spec(cache=cache, split=split), tool="tabby")
    doc = yaml.safe_load(r.text)
    m = doc["model"]
    assert set(doc) == {"model", "memory"} and set(m) <= MODEL_KEYS and set(doc["memory"]) == MEMORY_KEYS
    assert (m["model_dir"], m["model_name"]) == ("/models", "Llama-exl3")
    # the cache exl2opt sized: max_num_tokens = cache_size; max_seq_len not clipped by it
    assert m["cache_size"] == 8192 == m["max_seq_len"] and m["cache_size"] % CACHE_MULTIPLE == 0
    assert m["chunk_size"] == 2048 and "max_batch_size" not in m
    assert doc["memory"]["cuda_malloc_async"] is False
    start = r.text.splitlines()[-1]
    assert start.startswith("# start TabbyAPI with: ") and ENV_WORD in start
    if split_name == "single":
        assert not {"gpu_split", "gpu_split_auto", "autosplit_reserve", "tensor_parallel"} & set(m)
        assert "CUDA_VISIBLE_DEVICES=0" in start and any("256 MiB" in n for n in r.notes)
    elif split_name == "manual":
        assert m["gpu_split"] == [10, 15.5] and m["gpu_split_auto"] is False and m["tensor_parallel"] is False
        assert "autosplit_reserve" not in m  # TabbyAPI drops it with a gpu_split
    else:
        # MiB per GPU; exllamav3's own default (0.5 GiB each), not TabbyAPI's [96]
        want = [512, 512] if split_name == "auto" else [1024, 300]
        assert m["gpu_split_auto"] is True and m["autosplit_reserve"] == want and m["tensor_parallel"] is False
    assert any("1.4.2" in n and "1.6.5" in n for n in r.notes)


def test_chunk_is_the_load_chunk_or_refused_off_the_page_grid() -> None:
    doc = yaml.safe_load(recipe(spec(ctx=1024, chunk_len=2048), tool="tabby").text)
    assert doc["model"]["chunk_size"] == 1024  # at most the cache, as exl2opt sizes the load
    assert yaml.safe_load(recipe(spec(chunk_len=512), tool="tabby").text)["model"]["chunk_size"] == 512
    for chunk, up in ((1000, 1024), (100, 256)):
        r = recipe(spec(chunk_len=chunk), tool="tabby")
        assert not r.supported and len(r.notes) == 1 and f"({up})" in r.notes[0] and f"--chunk {up}" in r.notes[0]
    r = recipe(spec(ctx=1000), tool="tabby")
    assert not r.supported and len(r.notes) == 1 and "multiple of 256" in r.notes[0]


def test_batch_size_is_written_only_when_asked() -> None:
    r = recipe(spec(batch_size=4), tool="tabby")
    m = yaml.safe_load(r.text)["model"]
    assert m["max_batch_size"] == 4 and m["cache_size"] == 8192  # one page pool for every sequence
    assert not any("share the cache_size" in n for n in r.notes)
    assert any(str(DEFAULT_MAX_BATCH) in n for n in recipe(spec(), tool="tabby").notes)


HOSTILE = (
    "/models/Llama-3-exl3-4.0bpw;touch${IFS}/tmp/x;#",
    "/m/it's \"quoted\" $(id) `id` \\ back",
    "/m/new\nline\tand\x1b[31mred",
    "/m/ünïcode 模型 \u2028 sep \u202e evil",
    "C:\\models\\win dir\\Llama",
)


@pytest.mark.parametrize("path", HOSTILE)
def test_hostile_paths_survive_yaml_exactly(path: str) -> None:
    r = recipe(spec(path=path), tool="tabby")
    assert "\x1b" not in r.text and "\u2028" not in r.text and "\u202e" not in r.text
    m = yaml.safe_load(r.text)["model"]
    head, _, name = path.rpartition("/")
    assert (m["model_dir"], m["model_name"]) == (head or ".", name)


def test_relative_hub_path_gets_the_absolute_path_note() -> None:
    r = recipe(spec(path="Llama-3.1-8B-Instruct-exl3-4.0bpw"), tool="tabby")
    m = yaml.safe_load(r.text)["model"]
    assert (m["model_dir"], m["model_name"]) == (".", "Llama-3.1-8B-Instruct-exl3-4.0bpw")
    assert any("absolute path" in n for n in r.notes)
    words = shlex.split(r.text.splitlines()[-1].removeprefix("# start TabbyAPI with: "))
    assert words == ["CUDA_VISIBLE_DEVICES=0", ENV_WORD, "./start.sh"]


# ----- the calls TabbyAPI makes, against the real exllamav3 1.6.5 ------------------------------------------

def test_tabbyapi_calls_bind_to_exllamav3_1_6_5() -> None:
    """Installing exllamav3 1.6.5 into TabbyAPI (the recipe's advice) keeps every keyword it passes valid."""
    from exl3_stubs import import_exllamav3

    exl3 = import_exllamav3()
    from exllamav3.generator import Generator
    from exllamav3.version import __version__

    assert __version__ == "1.6.5"
    inspect.signature(exl3.Cache.__init__).bind(None, None, **dict.fromkeys(CACHE_KWARGS))
    inspect.signature(exl3.Model.load_gen).bind(None, **dict.fromkeys(LOAD_GEN_KWARGS))
    inspect.signature(Generator.__init__).bind(None, **dict.fromkeys(GENERATOR_KWARGS))


@pytest.mark.oracle
def test_tabbyapi_cache_arguments_keep_the_bytes_exl2opt_sizes(tmp_path: Path) -> None:
    """TabbyAPI also passes max_batch_size (128) and max_history to Cache: for the architectures exl2opt
    sizes they change nothing (recurrent-state slots only), so the K/V bytes are exl2opt's."""
    from exl3_oracle import write_exl3_dir
    from exl3_stubs import active, import_exllamav3
    from oracle_util import tiny_config

    from optimizer.arch import parse_arch
    from optimizer.formats.exl3 import ARCHITECTURES, Exl3Settings, cache_layer_bytes

    exl3 = import_exllamav3()
    from exllamav3.cache import CacheLayer_fp16, CacheLayer_quant

    cfg = tiny_config("LlamaForCausalLM")
    d = write_exl3_dir(tmp_path / "tiny", cfg)
    arch = parse_arch(json.loads((d / "config.json").read_text()), architectures=ARCHITECTURES)
    for cache in ("fp16", "k4v6", "k8v8", "k2v3"):
        value = yaml.safe_load(recipe(spec(cache=cache, ctx=768), tool="tabby").text)["model"]["cache_mode"]
        bits = tabby_layer(value)
        kw: dict[str, Any] = ({"layer_type": CacheLayer_fp16} if bits is None else
                              {"layer_type": CacheLayer_quant, "k_bits": bits[0], "v_bits": bits[1]})
        with active():
            config = exl3.Config.from_directory(str(d), load_method="python")
            model = exl3.Model.from_config(config)
            c = exl3.Cache(model, max_num_tokens=768, max_batch_size=DEFAULT_MAX_BATCH, max_history=0, **kw)
            got = sum(int(layer.storage_size()) for layer in c.layers.values())
        assert not (getattr(c, "recurrent_layers", None) or {})
        assert got == cache_layer_bytes(arch, Exl3Settings(max_num_tokens=768, cache=cache)) * arch.num_hidden_layers


# ----- fit on the shipped example ----------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "studies" / "examples" / "Llama-3.1-8B-Instruct-exl3-4.0bpw"


def _fit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from optimizer.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    return int(e.value.code or 0), capsys.readouterr().out


def _blocks(out: str) -> list[dict[str, Any]]:
    """Every TabbyAPI block in fit's output, parsed."""
    lines, found = out.splitlines(), []
    for i, ln in enumerate(lines):
        if ln.strip() == "model:":
            indent = len(ln) - len(ln.lstrip())
            block = []
            for b in lines[i:]:
                if b.strip().startswith("note:") or len(b) - len(b.lstrip()) < indent or not b.strip():
                    break
                block.append(b[indent:])
            found.append(yaml.safe_load("\n".join(block)))
    return found


@pytest.mark.parametrize("extra", [["--recipe", "tabby"], []], ids=["tabby", "auto"])
def test_fit_on_the_exl3_example_prints_a_tabby_block(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    base = ["fit", "-m", str(EXAMPLE), "--vram", "24GB"]
    code, out = _fit([*base, *extra], capsys)
    assert code == 0
    recs = json.loads(_fit([*base, "--json"], capsys)[1])
    blocks = _blocks(out)
    assert len(blocks) == (len(recs) if extra else 1)  # --recipe tabby: every answer; auto: the pick
    answers = {(r["cache"], r["max_ctx"]) for r in recs}
    for doc in blocks:
        m = doc["model"]
        assert Path(m["model_dir"]) / m["model_name"] == EXAMPLE
        bits = tabby_layer(m["cache_mode"])
        cache = "fp16" if bits is None else f"k{bits[0]}v{bits[1]}"
        assert (cache, m["max_seq_len"]) in answers and m["cache_size"] == m["max_seq_len"]
    if not extra:
        assert "examples/chat.py" in out  # the example-script line follows, as for exl2
    code, out = _fit([*base, "--recipe", "tabby", "--json"], capsys)
    assert all("model:" in r["recipe_tabby"] for r in json.loads(out))


def test_pareto_rows_of_exl3_carry_a_tabby_block() -> None:
    from optimizer.recipes.present import front_row_fields

    row = {"format": "exl3", "label": "4.0bpw-h6", "variant": "/models/Llama-exl3", "max_seq_len": 8192,
           "cache_mode": "k4v6", "split": "auto:2"}
    fields = front_row_fields(row, spec_record={"split": {"reserve_bytes": [1024 * MIB, 300 * MIB]}})
    m = yaml.safe_load(fields["tabby_config"])["model"]
    assert (m["model_name"], m["cache_mode"], m["cache_size"]) == ("Llama-exl3", "4,6", 8192)
    assert m["autosplit_reserve"] == [1024, 300]
    assert "examples/chat.py" not in fields["run_command"]  # chat.py cannot set that reserve
    plain = front_row_fields({**row, "split": "1gpu"}, spec_record=None)
    assert "examples/chat.py" in plain["run_command"] and "cache_mode: \"4,6\"" in plain["tabby_config"]
