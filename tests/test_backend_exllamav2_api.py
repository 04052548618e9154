"""The exllamav2 backend's calls checked against the real exllamav2 0.3.2 package (CPU, stub extension).

The real package is imported with ``sys.modules["exllamav2_ext"]`` stubbed (the CUDA extension
cannot be built here). Then the engine is driven against *signature-checking* fakes: every call the
backend makes is bound with ``inspect.signature`` of the real function, so a wrong name or keyword
fails here. Tensors are real CPU torch tensors; only ``torch.cuda`` is faked.
"""

from __future__ import annotations

import inspect
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def xl() -> Any:
    sys.modules.setdefault("exllamav2_ext", types.ModuleType("exllamav2_ext"))
    try:
        import exllamav2
    except Exception as e:  # pragma: no cover
        pytest.skip(f"exllamav2 not importable: {e}")
    assert exllamav2.__version__ == "0.3.2"
    return exllamav2


def test_cache_classes_exist_and_take_our_arguments(xl: Any) -> None:
    from optimizer.backends.exllamav2 import CACHE_CLASSES
    from optimizer.formats.exl2 import CACHE_MODES

    assert set(CACHE_CLASSES) == set(CACHE_MODES)
    for mode, name in CACHE_CLASSES.items():
        assert CACHE_MODES[mode].cls == name
        cls = getattr(xl, name)
        sig = inspect.signature(cls.__init__)
        sig.bind(object(), object(), batch_size=1, max_seq_len=4096)
        sig.bind(object(), object(), batch_size=1, max_seq_len=4096, lazy=True)


def test_load_signatures(xl: Any) -> None:
    inspect.signature(xl.ExLlamaV2.load).bind(object(), progress=False)
    inspect.signature(xl.ExLlamaV2.load).bind(object(), gpu_split=[10.0, 15.0], progress=False)
    inspect.signature(xl.ExLlamaV2.load_autosplit).bind(object(), object(), reserve_vram=[1, 2], progress=False)
    fwd = inspect.signature(xl.ExLlamaV2.forward)
    fwd.bind(object(), object(), object(), preprocess_only=True)
    fwd.bind(object(), object(), object())
    inspect.signature(xl.ExLlamaV2Tokenizer.encode).bind(object(), "x", add_bos=False)
    assert callable(xl.ExLlamaV2.unload)


def test_config_has_the_attributes_we_set(xl: Any, tmp_path: Path) -> None:
    from exl2_fixtures import TINY_LLAMA, make_exl2_dir

    d = make_exl2_dir(tmp_path, "tiny", dict(TINY_LLAMA, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
                                            eos_token_id=2, torch_dtype="float16"), bits=4.0)
    cfg = xl.ExLlamaV2Config(str(d))
    for attr in ("max_seq_len", "max_input_len", "max_attention_size", "max_batch_size", "no_flash_attn", "vocab_size"):
        assert hasattr(cfg, attr), attr
    cfg.no_flash_attn = True
    cfg.arch_compat_overrides(quiet=True)  # the engine calls it before ExLlamaV2(config), as model_init does
    assert cfg.no_flash_attn is True
    model = xl.ExLlamaV2(cfg)
    cache = xl.ExLlamaV2Cache_Q4(model, batch_size=1, max_seq_len=512, lazy=True)
    assert hasattr(cache, "current_seq_len") and cache.max_seq_len == 512


# ----- drive the engine against signature-checking fakes ------------------------------------


class _Calls(list):
    pass


def _checked(real: Any, calls: _Calls, name: str, result: Any = None) -> Any:
    sig = inspect.signature(real)

    def fn(self: Any, *a: Any, **k: Any) -> Any:
        sig.bind(self, *a, **k)
        calls.append((name, a, k))
        return result(self, *a, **k) if callable(result) else result

    return fn


def _fake_module(xl: Any, calls: _Calls, vocab: int) -> types.SimpleNamespace:
    def cfg_init(self: Any, model_dir: str | None = None) -> None:
        inspect.signature(xl.ExLlamaV2Config.__init__).bind(self, model_dir)
        # the real prepare() asserts the directory and its config.json exist (config.py prepare)
        assert model_dir and (Path(model_dir) / "config.json").is_file(), f"bad model_dir {model_dir!r}"
        self.model_dir = model_dir
        self.vocab_size = vocab
        self.max_seq_len, self.max_input_len, self.max_output_len = 4096, 2048, None
        self.no_flash_attn = fake_env_no_flash_attn[0]  # EXLLAMA_NO_FLASH_ATTN
        self.no_xformers = self.no_sdpa = False  # EXLLAMA_NO_XFORMERS / EXLLAMA_NO_SDPA unset
        self.arch = types.SimpleNamespace(lm=types.SimpleNamespace(requires_bos=fake_requires_bos[0]))
        calls.append(("config", (model_dir,), {}))

    def arch_compat(self: Any, *a: Any, **k: Any) -> None:
        inspect.signature(xl.ExLlamaV2Config.arch_compat_overrides).bind(self, *a, **k)
        calls.append(("arch_compat_overrides", a, dict(k, no_flash_attn=self.no_flash_attn)))

    def forward(self: Any, ids: Any, cache: Any = None, **k: Any) -> Any:
        inspect.signature(xl.ExLlamaV2.forward).bind(self, ids, cache, **k)
        calls.append(("forward", (tuple(ids.shape),), k))
        if cache is not None:
            cache.current_seq_len += ids.shape[1]
            assert cache.current_seq_len <= cache.max_seq_len
            # past the allocated tensors (Q caches round max_seq_len up afterwards) or the RoPE tables
            assert cache.current_seq_len <= cache.allocated_len, "write past the cache tensors"
            assert cache.current_seq_len <= self.config.max_seq_len, "position past the RoPE tables"
        if k.get("preprocess_only"):
            return None
        # each row is constant over the vocabulary (uniform after softmax) and depends on the tokens up
        # to it (causal), or on the whole chunk when a test makes this "model" non-causal
        ids_f = ids.float()
        rows = ids_f.sum(-1, keepdim=True).expand_as(ids_f) if fake_noncausal[0] else ids_f.cumsum(-1)
        return rows[..., None].expand(1, ids.shape[1], vocab).clone()

    def model_init(self: Any, config: Any) -> None:
        calls.append(("model", (), {"max_seq_len": config.max_seq_len, "max_input_len": config.max_input_len}))
        self.config = config

    def cache_cls(real: Any) -> type:
        def init(self: Any, model: Any, batch_size: int = 1, max_seq_len: int = -1, **k: Any) -> None:
            inspect.signature(real.__init__).bind(self, model, batch_size=batch_size, max_seq_len=max_seq_len, **k)
            if fake_cache_oom[0]:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
            self.max_seq_len, self.current_seq_len, self.allocated_len = max_seq_len, 0, max_seq_len
            if "_Q" in real.__name__:  # cache.py: rounded up to q_block *after* the tensors exist
                self.max_seq_len = (max_seq_len + 7) // 8 * 8
            calls.append((real.__name__, (), dict(k, max_seq_len=max_seq_len)))

        return type(real.__name__, (), {"__init__": init})

    def tok_init(self: Any, config: Any, **k: Any) -> None:
        self.bos_token_id = 1
        self.model_dir = config.model_dir

    ns = types.SimpleNamespace(
        ExLlamaV2Config=type("C", (), {"__init__": cfg_init, "arch_compat_overrides": arch_compat}),
        ExLlamaV2=type("M", (), {
            "__init__": model_init, "forward": forward,
            "load": _checked(xl.ExLlamaV2.load, calls, "load"),
            "load_autosplit": _checked(xl.ExLlamaV2.load_autosplit, calls, "load_autosplit"),
            "unload": _checked(xl.ExLlamaV2.unload, calls, "unload"),
        }),
        ExLlamaV2Tokenizer=type("T", (), {
            "__init__": tok_init,
            "encode": _checked(xl.ExLlamaV2Tokenizer.encode, calls, "encode",
                               lambda self, text, **k: torch.tensor([[ord(c) % vocab for c in text]])),
        }),
    )
    ns.attn = types.SimpleNamespace(has_flash_attn=False, has_xformers=False)
    for name in ("ExLlamaV2Cache", "ExLlamaV2Cache_8bit", "ExLlamaV2Cache_Q8", "ExLlamaV2Cache_Q6", "ExLlamaV2Cache_Q4"):
        setattr(ns, name, cache_cls(getattr(xl, name)))
    return ns


fake_env_no_flash_attn = [False]
fake_requires_bos = [False]
fake_cache_oom = [False]
fake_noncausal = [False]


class _FakeCuda:
    def __init__(self, calls: _Calls, n: int = 2) -> None:
        self.calls, self.n = calls, n

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.n

    def reset_peak_memory_stats(self, d: int) -> None:
        self.calls.append(("reset_peak", (d,), {}))

    def empty_cache(self) -> None: ...

    def synchronize(self, device: Any = None) -> None:
        inspect.signature(torch.cuda.synchronize).bind(device)
        self.calls.append(("synchronize", (device,), {}))

    def max_memory_allocated(self, d: int) -> int:
        return 1000 + d

    def mem_get_info(self, d: int) -> tuple[int, int]:
        return (10, 5000)

    def memory_reserved(self, d: int) -> int:
        return 4000 + d


@pytest.fixture()
def engine(xl: Any) -> Any:
    from optimizer.backends.exllamav2 import ExLlamaV2Engine

    calls = _Calls()
    fake_env_no_flash_attn[0] = fake_requires_bos[0] = fake_cache_oom[0] = fake_noncausal[0] = False
    eng = ExLlamaV2Engine.__new__(ExLlamaV2Engine)
    eng.torch = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("_") and k != "cuda"},
                                      cuda=_FakeCuda(calls))
    eng.xl = _fake_module(xl, calls, vocab=64)
    eng.model = eng.cache = eng.tokenizer = eng.spec = None
    eng.tokenizer_key = eng.model_dir = ""
    eng.loaded_seq_len = 0
    eng.placed = None
    eng.causality = None
    eng.calls = calls
    return eng


def _spec(tmp_path: Path, *, ctx: int, cache: str, split: Any, name: str = "tiny", flash_attn: bool = False) -> Any:
    from exl2_fixtures import TINY_LLAMA, make_exl2_dir

    from optimizer.backends.base import LoadSpec
    from optimizer.sources.local import discover_local

    d = tmp_path / name
    if not d.exists():
        make_exl2_dir(tmp_path, name, TINY_LLAMA, bits=4.0)
    return LoadSpec(variant=discover_local(d)[0], split=split, max_seq_len=ctx, cache=cache, chunk_len=256,
                    flash_attn=flash_attn)


def test_engine_reuses_model_and_rebuilds_cache(engine: Any, tmp_path: Path) -> None:
    from optimizer.backends.base import EvalProtocol, SpeedProtocol
    from optimizer.vram import Split

    info = engine.prepare(_spec(tmp_path, ctx=2048, cache="q4", split=Split()))
    assert info.model_loaded
    assert [c[0] for c in engine.calls if c[0] in ("load", "ExLlamaV2Cache_Q4")] == ["load", "ExLlamaV2Cache_Q4"]
    info2 = engine.prepare(_spec(tmp_path, ctx=1024, cache="fp16", split=Split()))
    assert not info2.model_loaded
    assert sum(1 for c in engine.calls if c[0] == "load") == 1
    toks = engine.tokenize("hello world " * 200)
    ppl = engine.perplexity(tokens=toks, protocol=EvalProtocol(window=256, n_windows=2, prefill=128, score_chunk=64))
    assert ppl == pytest.approx(64.0, rel=1e-4)  # uniform logits over a 64-token vocabulary
    sp = engine.speed(protocol=SpeedProtocol(context_fill=512, gen_tokens=8, warmup=1))
    assert sp.context_fill == 512 and sp.gen_tok_s > 0 and sp.prompt_tok_s > 0
    mem = engine.memory()
    assert [m.index for m in mem] == [0] and mem[0].used == 4990
    # a larger context than loaded needs a reload (RoPE tables are sized at load)
    assert engine.prepare(_spec(tmp_path, ctx=4096, cache="fp16", split=Split())).model_loaded


def test_engine_manual_and_autosplit(engine: Any, tmp_path: Path) -> None:
    from optimizer.vram import Split

    engine.prepare(_spec(tmp_path, ctx=2048, cache="q8", split=Split(mode="manual", gpu_split=(10.0, 12.0))))
    load = [c for c in engine.calls if c[0] == "load"][-1]
    assert load[2]["gpu_split"] == [10.0, 12.0]
    engine.prepare(_spec(tmp_path, ctx=2048, cache="q6", split=Split(mode="auto", n_devices=2)))
    lazy = [c for c in engine.calls if c[0] == "ExLlamaV2Cache_Q6"][-1]
    assert lazy[2]["lazy"] is True
    auto = [c for c in engine.calls if c[0] == "load_autosplit"][-1]
    assert auto[2]["reserve_vram"] == [192 * 2**20, 64 * 2**20]
    # autosplit without place_around always reloads
    assert engine.prepare(_spec(tmp_path, ctx=1024, cache="q6", split=Split(mode="auto", n_devices=2))).model_loaded
    assert len(engine.memory()) == 2


def test_autosplit_shares_a_placement_made_around_another_cache(engine: Any, tmp_path: Path) -> None:
    """place_around: load_autosplit places around that (length, cache); the spec's own cache is then built on the
    model's cache_map devices (a non-lazy cache), and specs sharing the placement only rebuild the cache."""
    from optimizer.vram import Split

    auto = Split(mode="auto", n_devices=2)

    def names() -> list[str]:
        return [c[0] for c in engine.calls]

    info = engine.prepare(replace(_spec(tmp_path, ctx=1024, cache="q4", split=auto), place_around=(2048, "fp16")))
    assert info.model_loaded and info.placed_around == (2048, "fp16")
    lazy = [c for c in engine.calls if c[0] == "ExLlamaV2Cache"]
    assert len(lazy) == 1 and lazy[0][2]["lazy"] is True and lazy[0][2]["max_seq_len"] == 2048
    model = next(c for c in engine.calls if c[0] == "model")
    assert model[2]["max_seq_len"] == 2048  # RoPE tables of the placed-around context
    q4 = [c for c in engine.calls if c[0] == "ExLlamaV2Cache_Q4"]
    assert len(q4) == 1 and "lazy" not in q4[0][2] and q4[0][2]["max_seq_len"] == 1024
    n = names()
    # built after the load, with the peaks reset after the load: memory of resident model + this cache
    assert n.index("load_autosplit") < n.index("ExLlamaV2Cache_Q4")
    assert "reset_peak" in n[n.index("load_autosplit"):n.index("ExLlamaV2Cache_Q4")]
    assert engine.cache.max_seq_len >= 1024 and engine._context() == 1024
    # same placement: no load, only the cache (also for the placed-around configuration itself)
    for ctx, cache in ((2048, "q8"), (2048, "fp16")):
        info = engine.prepare(replace(_spec(tmp_path, ctx=ctx, cache=cache, split=auto), place_around=(2048, "fp16")))
        assert not info.model_loaded and info.placed_around == (2048, "fp16")
    assert names().count("load_autosplit") == 1
    # another placement, or none (a fresh load of the spec's own placement, as --exhaustive does): reloaded
    info = engine.prepare(replace(_spec(tmp_path, ctx=1024, cache="q8", split=auto), place_around=(1024, "q8")))
    assert info.model_loaded and info.placed_around is None and names().count("load_autosplit") == 2
    info = engine.prepare(_spec(tmp_path, ctx=1024, cache="q8", split=auto))
    assert info.model_loaded and info.placed_around is None and names().count("load_autosplit") == 3
    # a longer context than the one placed around cannot use its RoPE tables
    from optimizer.errors import EngineError

    with pytest.raises(EngineError, match="cannot place"):
        engine.prepare(replace(_spec(tmp_path, ctx=4096, cache="q4", split=auto), place_around=(2048, "fp16")))


def test_engine_oom_is_reported_and_frees(engine: Any, tmp_path: Path) -> None:
    from optimizer.errors import EngineOOMError
    from optimizer.vram import Split

    def boom(self: Any, *a: Any, **k: Any) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    engine.xl.ExLlamaV2.load = boom
    with pytest.raises(EngineOOMError):
        engine.prepare(_spec(tmp_path, ctx=2048, cache="fp16", split=Split()))
    assert engine.model is None and engine.cache is None


def test_backend_unavailable_without_cuda() -> None:
    from optimizer.backends.exllamav2 import ExLlamaV2Backend
    from optimizer.errors import BackendUnavailableError

    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("CUDA present")
    with pytest.raises(BackendUnavailableError) as ei:
        ExLlamaV2Backend().open()
    assert "\n" not in str(ei.value) and "GPU" in str(ei.value)


# ----- regressions found by reviewing the engine against the 0.3.2 source --------------------


def test_fresh_load_reads_the_variant_directory(engine: Any, tmp_path: Path) -> None:
    """prepare() once cleared model_dir (in unload) after resolving it, so ExLlamaV2Config got ''."""
    from optimizer.vram import Split

    spec = _spec(tmp_path, ctx=1024, cache="fp16", split=Split())
    engine.prepare(spec)
    cfg = [c for c in engine.calls if c[0] == "config"]
    assert len(cfg) == 1 and Path(cfg[0][1][0]) == tmp_path / "tiny"
    # a second, different variant is loaded from its own directory
    engine.prepare(_spec(tmp_path, ctx=1024, cache="fp16", split=Split(), name="other"))
    assert Path([c for c in engine.calls if c[0] == "config"][-1][1][0]) == tmp_path / "other"


def test_config_is_set_before_the_model_and_compat_overrides_run(engine: Any, tmp_path: Path) -> None:
    from optimizer.vram import Split

    fake_env_no_flash_attn[0] = True  # EXLLAMA_NO_FLASH_ATTN set, or an arch that cannot use flash-attn
    engine.prepare(_spec(tmp_path, ctx=128, cache="fp16", split=Split(), flash_attn=True))
    names = [c[0] for c in engine.calls]
    assert names.index("arch_compat_overrides") < names.index("model") < names.index("load")
    compat = next(c for c in engine.calls if c[0] == "arch_compat_overrides")
    assert compat[2]["no_flash_attn"] is True  # flash_attn=True must not turn flash-attn back on
    model = next(c for c in engine.calls if c[0] == "model")
    # max_input_len clamped to the context (autosplit does it itself; load() does not)
    assert model[2] == {"max_seq_len": 128, "max_input_len": 128}
    assert engine.model.config.max_attention_size == 128 ** 2


def test_q_cache_rounding_never_writes_past_the_requested_context(engine: Any, tmp_path: Path) -> None:
    """ExLlamaV2Cache_Q* rounds max_seq_len up to q_block after allocating (cache.py ~L441-454)."""
    from optimizer.backends.base import EvalProtocol, SpeedProtocol
    from optimizer.vram import Split

    engine.prepare(_spec(tmp_path, ctx=1001, cache="q4", split=Split()))
    assert engine.cache.max_seq_len > 1001  # the fake rounds like the real class
    toks = engine.tokenize("the quick brown fox " * 300)
    ppl = engine.perplexity(tokens=toks, protocol=EvalProtocol(window=2048, n_windows=2, prefill=1024, score_chunk=256))
    assert ppl == pytest.approx(64.0, rel=1e-4)
    sp = engine.speed(protocol=SpeedProtocol(context_fill=4096, gen_tokens=8, warmup=1))
    assert sp.context_fill == 1001 - 8


def test_perplexity_with_nothing_scored_is_an_error(engine: Any, tmp_path: Path) -> None:
    from optimizer.backends.base import EvalProtocol
    from optimizer.errors import EngineError
    from optimizer.vram import Split

    engine.prepare(_spec(tmp_path, ctx=1024, cache="fp16", split=Split()))
    toks = engine.tokenize("x" * 3000)
    with pytest.raises(EngineError, match="nothing to score"):
        engine.perplexity(tokens=toks, protocol=EvalProtocol(window=512, n_windows=1, prefill=512, score_chunk=64))


def test_perplexity_without_bos_refused_for_requires_bos_archs(engine: Any, tmp_path: Path) -> None:
    from optimizer.backends.base import EvalProtocol
    from optimizer.errors import EngineError
    from optimizer.vram import Split

    fake_requires_bos[0] = True
    engine.prepare(_spec(tmp_path, ctx=1024, cache="fp16", split=Split()))
    toks = engine.tokenize("x" * 3000)
    proto = EvalProtocol(window=512, n_windows=1, prefill=256, score_chunk=64)
    with pytest.raises(EngineError, match="BOS"):
        engine.perplexity(tokens=toks, protocol=replace(proto, add_bos=False))
    engine.prepare(_spec(tmp_path, ctx=1024, cache="fp16", split=Split()))
    assert engine.perplexity(tokens=toks, protocol=proto) == pytest.approx(64.0, rel=1e-4)


def test_manual_split_is_reused_only_at_the_same_context(engine: Any, tmp_path: Path) -> None:
    """set_device_map places layers using config.max_seq_len (sin/cos + temp_kv_size)."""
    from optimizer.vram import Split

    split = Split(mode="manual", gpu_split=(10.0, 12.0))
    assert engine.prepare(_spec(tmp_path, ctx=2048, cache="q8", split=split)).model_loaded
    assert not engine.prepare(_spec(tmp_path, ctx=2048, cache="q4", split=split)).model_loaded
    assert engine.prepare(_spec(tmp_path, ctx=1024, cache="q4", split=split)).model_loaded
    # single GPU: placement does not depend on the context, a smaller one reuses the model
    assert engine.prepare(_spec(tmp_path, ctx=2048, cache="q4", split=Split())).model_loaded
    assert not engine.prepare(_spec(tmp_path, ctx=1024, cache="q4", split=Split())).model_loaded


def test_peaks_are_reset_after_the_load_so_reuse_measures_the_same(engine: Any, tmp_path: Path) -> None:
    from optimizer.vram import Split

    engine.prepare(_spec(tmp_path, ctx=2048, cache="q8", split=Split()))
    names = [c[0] for c in engine.calls]
    assert names.index("load") < names.index("reset_peak") < names.index("ExLlamaV2Cache_Q8")
    engine.calls.clear()
    engine.prepare(_spec(tmp_path, ctx=1024, cache="q4", split=Split()))
    assert [c[0] for c in engine.calls if c[0] in ("reset_peak", "ExLlamaV2Cache_Q4")] == ["reset_peak", "ExLlamaV2Cache_Q4"]


def test_timings_synchronize_every_used_device(engine: Any, tmp_path: Path) -> None:
    from optimizer.backends.base import SpeedProtocol
    from optimizer.vram import Split

    engine.prepare(_spec(tmp_path, ctx=2048, cache="fp16", split=Split(mode="manual", gpu_split=(10.0, 12.0))))
    engine.calls.clear()
    engine.speed(protocol=SpeedProtocol(context_fill=512, gen_tokens=4, warmup=0))
    synced = {c[1][0] for c in engine.calls if c[0] == "synchronize"}
    assert synced == {0, 1}


def test_autosplit_cannot_spill_onto_unplanned_gpus(engine: Any, tmp_path: Path) -> None:
    """load_autosplit uses every visible GPU and indexes reserve_vram[device] (model.py ~L551-600)."""
    from optimizer.vram import Split

    engine.torch.cuda.n = 4
    engine.prepare(_spec(tmp_path, ctx=2048, cache="q6", split=Split(mode="auto", n_devices=2)))
    reserve = [c for c in engine.calls if c[0] == "load_autosplit"][-1][2]["reserve_vram"]
    assert len(reserve) == 4 and reserve[:2] == [192 * 2**20, 64 * 2**20]
    assert all(isinstance(b, int) and b > 2**45 for b in reserve[2:])


def test_oom_at_cache_creation_leaves_a_usable_engine_with_the_right_tokenizer(engine: Any, tmp_path: Path) -> None:
    from optimizer.errors import EngineOOMError
    from optimizer.vram import Split

    engine.prepare(_spec(tmp_path, ctx=1024, cache="fp16", split=Split()))
    fake_cache_oom[0] = True
    with pytest.raises(EngineOOMError):
        engine.prepare(_spec(tmp_path, ctx=1024, cache="fp16", split=Split(), name="other"))
    assert engine.model is None and engine.cache is None and engine.spec is None
    fake_cache_oom[0] = False
    info = engine.prepare(_spec(tmp_path, ctx=1024, cache="fp16", split=Split()))
    assert info.model_loaded
    # the tokenizer belongs to the variant now loaded, not to the one whose cache failed
    assert Path(engine.tokenizer.model_dir) == tmp_path / "tiny"


def test_without_flash_attn_the_matmul_path_is_forced_and_checked_before_perplexity(engine: Any, tmp_path: Path) -> None:
    from optimizer.backends.base import EvalProtocol
    from optimizer.errors import EngineError
    from optimizer.vram import Split

    engine.prepare(_spec(tmp_path, ctx=512, cache="fp16", split=Split()))
    assert engine.model.config.no_sdpa is True  # neither flash-attn nor xformers: SDPA is never used
    toks = list(range(1, 60)) * 20
    proto = EvalProtocol(window=256, n_windows=1, prefill=128, score_chunk=64)
    assert engine.perplexity(tokens=toks, protocol=proto) == pytest.approx(64.0, rel=1e-4)
    assert engine.causality is not None and engine.causality.passed
    fake_noncausal[0] = True
    engine.causality = None  # as after a fresh load
    with pytest.raises(EngineError, match="does not attend causally"):
        engine.perplexity(tokens=toks, protocol=proto)
    assert engine.model is None  # a refused measurement frees the model like any failure


def test_with_flash_attn_sdpa_setting_is_left_alone(engine: Any, tmp_path: Path) -> None:
    from optimizer.vram import Split

    engine.xl.attn.has_flash_attn = True
    engine.prepare(_spec(tmp_path, ctx=512, cache="fp16", split=Split(), flash_attn=True))
    assert engine.model.config.no_sdpa is False


def test_memory_records_the_overhead_beyond_torch_reserved(engine: Any, tmp_path: Path) -> None:
    from optimizer.vram import Split

    engine.prepare(_spec(tmp_path, ctx=512, cache="fp16", split=Split()))
    (m,) = engine.memory()
    assert (m.used, m.reserved, m.overhead) == (4990, 4000, 990)
    assert m.record()["overhead"] == 990
