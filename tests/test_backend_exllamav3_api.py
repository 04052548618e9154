"""The exllamav3 backend's calls checked against the real exllamav3 1.6.5 package (CPU, import stubs).

The real package is imported behind ``exl3_stubs`` (no CUDA extension, no triton here). The engine is
then driven against *signature-checking fakes* (``Fake*`` below, test doubles): every call the backend
makes on ``Config``, ``Model``, ``Cache``, cache layers and ``Tokenizer`` is bound with
``inspect.signature`` of the real 1.6.5 function, so a wrong name or keyword fails here. Tensors are
real CPU torch tensors; only ``torch.cuda`` is faked.
"""

from __future__ import annotations

import inspect
import json
import math
import types
from pathlib import Path
from typing import Any

import pytest
from exl3_stubs import active, import_exllamav3

from optimizer.backends import BACKEND_MODULES, backend_for
from optimizer.backends.base import EvalProtocol, LoadSpec, SpeedProtocol
from optimizer.errors import BackendUnavailableError, EngineOOMError
from optimizer.formats import FORMATS
from optimizer.formats.exl3_synth import quantization_config, synthesize
from optimizer.safetensors_header import write_header_only
from optimizer.sources.local import discover_local
from optimizer.variant import Variant
from optimizer.vram import Split

torch = pytest.importorskip("torch")
VOCAB = 1000  # the head is padded to 1024 columns, as exllamav3's Linear(pad_to=128) does


@pytest.fixture(scope="module")
def xl() -> Any:
    exl3 = import_exllamav3()
    from exllamav3.version import __version__

    assert __version__ == "1.6.5"
    return exl3


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> Variant:
    d = tmp_path_factory.mktemp("m") / "tiny-exl3"
    d.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": VOCAB,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 1,
           "quantization_config": quantization_config(bits=4.0, head_bits=6)}
    (d / "config.json").write_text(json.dumps(cfg))
    write_header_only(d / "model.safetensors", synthesize(cfg, bits=4.0, head_bits=6))
    (v,) = discover_local(d)
    return v


def test_registered_as_the_exl3_backend() -> None:
    assert FORMATS["exl3"].backend == "exllamav3" and BACKEND_MODULES["exllamav3"] == "optimizer.backends.exllamav3"


def test_unavailable_without_cuda_is_one_line(variant: Variant) -> None:
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        backend_for(variant=variant).open()


# ----- signature-checking fakes of exllamav3 1.6.5 (test doubles) --------------------------------


class Calls(list):  # type: ignore[type-arg]
    def names(self) -> list[str]:
        return [c[0] for c in self]


def _bind(real: Any, *a: Any, **k: Any) -> None:
    inspect.signature(real).bind(*a, **k)


def fake_exllamav3(xl: Any, calls: Calls, *, oom_on_load: list[bool]) -> tuple[Any, Any]:
    """``exllamav3`` and ``exllamav3.cache`` stand-ins whose every method checks the real signature."""
    real_cache_mod = __import__("exllamav3.cache", fromlist=["CacheLayer_fp16"])
    layer_types = (real_cache_mod.CacheLayer_fp16, real_cache_mod.CacheLayer_quant)

    class FakeLayer:
        def __init__(self, cache_id: int, tokens: int) -> None:
            self.cache_id, self.tokens, self.device = cache_id, tokens, None

        def alloc(self, device: Any) -> None:
            _bind(real_cache_mod.CacheLayer_fp16.alloc, self, device)
            self.device = device
            calls.append(("alloc", (str(device),), {}))

        def free(self) -> None:
            _bind(real_cache_mod.CacheLayer_fp16.free, self)
            self.device = None
            calls.append(("free", (), {}))

    class FakeModule:
        def __init__(self, idx: int) -> None:
            self.layer_idx, self.cache_layers, self.device = idx, [], None

    class FakeConfig:
        vocab_size = VOCAB

        @staticmethod
        def from_directory(directory: str, **k: Any) -> FakeConfig:
            _bind(xl.Config.from_directory, directory, **k)
            assert (Path(directory) / "config.json").is_file()
            calls.append(("Config.from_directory", (directory,), k))
            return FakeConfig()

    class FakeModel:
        def __init__(self, config: Any) -> None:
            self.config = config
            self.attn = [FakeModule(0), FakeModule(1)]
            self.caches: list[Any] = []  # attached caches (the real model keeps weakrefs)
            self.written = 0  # tokens in the cache of the sequence being scored

        @staticmethod
        def from_config(config: Any, **k: Any) -> FakeModel:
            _bind(xl.Model.from_config, config, **k)
            calls.append(("Model.from_config", (), k))
            return FakeModel(config)

        def get_cache_layers(self) -> list[FakeModule]:
            _bind(xl.Model.get_cache_layers, self)
            return self.attn

        def load(self, **k: Any) -> None:
            _bind(xl.Model.load_gen, self, **k)
            calls.append(("load", (), k))
            if oom_on_load[0]:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            for m in self.attn:
                m.device = torch.device("cuda:0") if "device" in k else torch.device(f"cuda:{m.layer_idx}")
                for layer in m.cache_layers:
                    layer.alloc(m.device)
            for c in self.caches:  # model.py load_gen: attached caches are initialized by the load
                c.initialized = True

        def unload(self) -> None:
            _bind(xl.Model.unload, self)
            for c in self.caches:
                c.initialized = False
            calls.append(("unload", (), {}))

        def _run(self, real: Any, ids: Any, params: dict[str, Any]) -> Any:
            _bind(real, self, ids, params)
            cache, past = params["cache"], params["past_len"]
            assert params["attn_mode"] == "flash_attn" and params["batch_shape"] == (1, cache.max_num_tokens)
            assert all(m.device is not None for m in self.attn) and cache.initialized, "cache not allocated"
            assert past == 0 or past == self.written, f"past_len {past} but {self.written} tokens written"
            self.written = past + ids.shape[1]
            assert self.written <= cache.max_num_tokens, "write past the cache"
            # causal rows, constant over the vocabulary (uniform softmax): padded head columns included
            rows = ids.float().cumsum(-1) % 97
            return rows[..., None].expand(1, ids.shape[1], 1024).clone().half()

        def prefill(self, ids: Any, params: dict[str, Any]) -> None:
            calls.append(("prefill", (tuple(ids.shape),), {"past_len": params["past_len"]}))
            self._run(xl.Model.prefill, ids, params)

        def forward(self, ids: Any, params: dict[str, Any]) -> Any:
            calls.append(("forward", (tuple(ids.shape),), {"past_len": params["past_len"]}))
            return self._run(xl.Model.forward, ids, params)

    class FakeCache:
        def __init__(self, model: Any, max_num_tokens: int, **k: Any) -> None:
            _bind(xl.Cache.__init__, self, model, max_num_tokens, **k)
            assert k["layer_type"] in layer_types
            self.model, self.max_num_tokens, self.initialized = model, max_num_tokens, False
            self.layers = {(m.layer_idx, 0): FakeLayer(id(self), max_num_tokens) for m in model.attn}
            for m in model.attn:  # attach_to_model, as the real constructor does
                m.cache_layers.append(self.layers[(m.layer_idx, 0)])
            model.caches.append(self)
            calls.append(("Cache", (max_num_tokens,), {kk: getattr(v, "__name__", v) for kk, v in k.items()}))

        def detach_from_model(self, model: Any = None) -> None:
            _bind(xl.Cache.detach_from_model, self, model)
            for m in self.model.attn:
                m.cache_layers.remove(self.layers[(m.layer_idx, 0)])
            self.model.caches.remove(self)
            calls.append(("detach", (), {}))

    class FakeTokenizer:
        bos_token_id = 1

        @staticmethod
        def from_config(config: Any) -> FakeTokenizer:
            _bind(xl.Tokenizer.from_config, config)
            return FakeTokenizer()

        def encode(self, text: str, **k: Any) -> Any:
            _bind(xl.Tokenizer.encode, self, text, **k)
            return torch.tensor([[2 + (ord(c) % 500) for c in text]])

    mod = types.SimpleNamespace(Config=FakeConfig, Model=FakeModel, Cache=FakeCache, Tokenizer=FakeTokenizer)
    cache_mod = types.SimpleNamespace(CacheLayer_fp16=layer_types[0], CacheLayer_quant=layer_types[1])
    return mod, cache_mod


@pytest.fixture
def engine(xl: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    import sys

    calls, oom = Calls(), [False]
    with active():
        mod, cache_mod = fake_exllamav3(xl, calls, oom_on_load=oom)
    monkeypatch.setitem(sys.modules, "exllamav3", mod)
    monkeypatch.setitem(sys.modules, "exllamav3.cache", cache_mod)
    cuda = torch.cuda
    for name, fn in {"is_available": lambda: True, "device_count": lambda: 3, "reset_peak_memory_stats": lambda d=None: None,
                     "synchronize": lambda d=None: None, "empty_cache": lambda: None,
                     "mem_get_info": lambda d=None: (10 * 2**30, 24 * 2**30),
                     "max_memory_allocated": lambda d=None: 5 * 2**30, "memory_reserved": lambda d=None: 6 * 2**30}.items():
        monkeypatch.setattr(cuda, name, fn)
    from optimizer.backends.exllamav3 import ExLlamaV3Engine

    e = ExLlamaV3Engine()
    e.calls, e.oom = calls, oom  # type: ignore[attr-defined]
    return e


def test_single_gpu_load_makes_the_cache_first_and_reuses_the_model(engine: Any, variant: Variant) -> None:
    calls = engine.calls
    info = engine.prepare(LoadSpec(variant=variant, split=Split(), max_seq_len=1024, cache="k4v6", chunk_len=512))
    assert info.model_loaded
    names = calls.names()
    assert names.index("Cache") < names.index("load")
    cache_call = calls[names.index("Cache")]
    assert cache_call[1] == (1024,) and cache_call[2] == {"layer_type": "CacheLayer_quant", "k_bits": 4, "v_bits": 6}
    assert calls[names.index("load")][2] == {"device": "cuda:0", "max_chunk_size": 512, "progressbar": False}
    calls.clear()
    info = engine.prepare(LoadSpec(variant=variant, split=Split(), max_seq_len=2048, cache="fp16", chunk_len=512))
    assert not info.model_loaded and "load" not in calls.names()
    assert calls.names() == ["free", "free", "detach", "Cache", "alloc", "alloc"]
    assert engine.cache.max_num_tokens == 2048 and engine.cache.initialized


def test_splits_pass_exllamav3_budgets(engine: Any, variant: Variant) -> None:
    engine.prepare(LoadSpec(variant=variant, split=Split(mode="auto", n_devices=2), max_seq_len=1024, cache="fp16"))
    (load,) = [c for c in engine.calls if c[0] == "load"]
    assert load[2]["reserve_per_device"] == [0.5, 0.5, -1.0]  # the third visible GPU is excluded
    engine.calls.clear()
    engine.prepare(LoadSpec(variant=variant, split=Split(mode="manual", gpu_split=(10.0, 15.5)), max_seq_len=1024,
                            cache="fp16"))
    (load,) = [c for c in engine.calls if c[0] == "load"]
    assert load[2]["use_per_device"] == [10.0, 15.5] and "unload" in engine.calls.names()


def test_perplexity_goes_through_the_cache_and_uses_the_real_vocabulary(engine: Any, variant: Variant) -> None:
    engine.prepare(LoadSpec(variant=variant, split=Split(), max_seq_len=1024, cache="k4v4"))
    tokens = [5 + i % 900 for i in range(4096)]
    proto = EvalProtocol(window=512, n_windows=3, prefill=256, score_chunk=128)
    ppl = engine.perplexity(tokens=tokens, protocol=proto)
    assert math.isclose(ppl, VOCAB, rel_tol=1e-3)  # uniform over the 1000 real tokens, not the 1024 padded
    fwd = [c for c in engine.calls if c[0] in ("prefill", "forward")]
    assert fwd[:3] == [("prefill", ((1, 256),), {"past_len": 0}), ("forward", ((1, 128),), {"past_len": 256}),
                       ("forward", ((1, 128),), {"past_len": 384})]
    assert sum(1 for c in fwd if c[0] == "prefill") == 3
    # a context shorter than the window shrinks it, as for every engine
    engine.prepare(LoadSpec(variant=variant, split=Split(), max_seq_len=256, cache="k4v4"))
    assert math.isclose(engine.perplexity(tokens=tokens, protocol=proto), VOCAB, rel_tol=1e-3)


def test_speed_fills_the_cache_then_generates(engine: Any, variant: Variant) -> None:
    engine.prepare(LoadSpec(variant=variant, split=Split(), max_seq_len=1024, cache="fp16"))
    engine.calls.clear()
    res = engine.speed(protocol=SpeedProtocol(context_fill=2048, gen_tokens=16, warmup=1, repeats=2))
    assert res.context_fill == 1024 - 16 and len(res.gen_tok_s_runs) == 2 and res.prompt_tok_s > 0
    gen = [c for c in engine.calls if c[0] == "forward" and c[1] == ((1, 1),)]
    assert gen[-1][2]["past_len"] == 1024 - 16 + 15
    mem = engine.memory()
    assert mem[0].peak_allocated == 5 * 2**30 and mem[0].overhead == 8 * 2**30


def test_oom_on_load_is_reported_and_the_engine_stays_usable(engine: Any, variant: Variant) -> None:
    engine.oom[0] = True
    with pytest.raises(EngineOOMError, match="out of memory loading"):
        engine.prepare(LoadSpec(variant=variant, split=Split(), max_seq_len=1024, cache="fp16"))
    assert engine.model is None and engine.cache is None
    engine.oom[0] = False
    assert engine.prepare(LoadSpec(variant=variant, split=Split(), max_seq_len=1024, cache="fp16")).model_loaded
