"""The CPU stand-in for exllamav2_ext (a TEST DOUBLE) on its own: kernels against plain formulas, loud failures.

Nothing is installed here (no torch.cuda patches in this process): the kernels are plain functions.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import exl2_ext_standin as S  # noqa: E402


def _q_tensors(t: int, heads: int, dim: int, wbits: int) -> tuple[torch.Tensor, ...]:
    kb, vb = S._bits(wbits)
    g = torch.Generator().manual_seed(wbits)
    k = torch.randn(1, t, heads, dim, generator=g).half()
    v = (torch.randn(1, t, heads, dim, generator=g) * 3).half()
    ko = torch.zeros(1, t, heads, dim * kb // 8, dtype=torch.uint8)
    vo = torch.zeros(1, t, heads, dim * vb // 8, dtype=torch.uint8)
    ks, vs = torch.zeros(1, t, heads, dim // 32).half(), torch.zeros(1, t, heads, dim // 32).half()
    return k, v, ko, vo, ks, vs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / a.float().norm())


@pytest.mark.parametrize(("wbits", "k_err", "v_err"), [(4, 0.15, 0.15), (6, 0.01, 0.15), (8, 0.01, 0.01)])
def test_q_cache_round_trip_error_matches_the_bit_width(wbits: int, k_err: float, v_err: float) -> None:
    k, v, ko, vo, ks, vs = _q_tensors(64, 2, 32, wbits)  # kv_dim 64: 512-element blocks span 8 tokens
    S.fp16_to_q_kv(k, ko, ks, v, vo, vs, 1, 0, 64, 0, None, None, wbits)
    k2, v2 = torch.zeros_like(k), torch.zeros_like(v)
    S.q_to_fp16_kv(ko, k2, ks, vo, v2, vs, 1, 0, 64, 0, None, None, wbits)
    ek, ev = _rel(k, k2), _rel(v, v2)
    assert 0 < ek < k_err and 0 < ev < v_err
    # 4-bit error is an order of magnitude above 8-bit: 16 levels against 256
    if wbits == 6:
        assert ev > 5 * ek


def test_q_cache_writes_only_the_aligned_token_range() -> None:
    k, v, ko, vo, ks, vs = _q_tensors(64, 2, 32, 4)
    S.fp16_to_q_kv(k, ko, ks, v, vo, vs, 1, 10, 3, 0, None, None, 4)  # tokens 10..12 -> block of tokens 8..15
    written = ko.view(64, -1).any(dim=-1).nonzero().flatten().tolist()
    assert written == list(range(8, 16))


def test_q_cache_scale_is_absmax_over_32_hadamard_values() -> None:
    x = torch.zeros(1, 512).half()
    x[0, 0] = 1.0  # one spike: after the 32-point transform every value of its group has magnitude 1
    packed, scales = S._quant_block(x, 4)
    assert scales.shape == (1, 16) and packed.shape == (1, 256)
    assert float(scales[0, 0]) == pytest.approx(1 / 8)
    out = S._dequant_block(packed, scales, 4)
    # +absmax maps to level 16, clamped to 15 (cache_q.cuh): it comes back as 7/8 of itself
    assert float(out[0, 0]) == pytest.approx(0.875, abs=1e-3) and float(out[0, 1:].abs().max()) < 1e-3


def test_fp8_keeps_the_top_byte_of_fp16() -> None:
    x = torch.tensor([1.0, -2.0, 3.14159, 1e-3, -65504.0, 0.0, 7.0, 0.5]).half().view(1, 1, 1, 8)
    out = torch.zeros(1, 1, 1, 8, dtype=torch.uint8)
    S.fp16_to_fp8(x, out, 1, 0, 1)
    assert out.flatten().tolist() == [(int(b) >> 8) & 0xFF for b in x.view(torch.int16).flatten().tolist()]
    back = torch.zeros_like(x)
    S.fp8_to_fp16(out, back, 1, 0, 1)
    assert back.flatten()[:2].tolist() == [1.0, -2.0]  # exactly representable in E5M2
    assert abs(float(back.flatten()[2])) <= 3.14159  # truncation rounds towards zero


def test_rms_norm_matches_the_formula() -> None:
    x = torch.randn(3, 64).half()
    w = torch.rand(64).half()
    y = torch.empty_like(x)
    S.rms_norm(x, w, y, 1e-6)
    ref = x.float() / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
    assert torch.allclose(y.float(), ref, atol=2e-3)


@pytest.mark.parametrize("neox", [True, False])
def test_rope_rotates_each_position_by_its_angle(neox: bool) -> None:
    seq, heads, dim, past = 5, 2, 8, 3
    pos = torch.arange(64)[:, None].double()
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).double() / dim))
    ang = pos * inv[None]
    ang = torch.cat((ang, ang), -1) if neox else ang.repeat_interleave(2, -1)
    sin, cos = torch.sin(ang).half()[None, None], torch.cos(ang).half()[None, None]
    x = torch.randn(1, seq, heads, dim).half()
    y = x.clone()
    S.rope_(y, sin, cos, past, heads, dim, torch.empty(0, device="meta"), neox)
    a = ang[past:past + seq, None, : dim // 2].float() if neox else ang[past:past + seq, None, 0::2].float()
    xf = x.float()[0]
    if neox:
        x1, x2 = xf[..., : dim // 2], xf[..., dim // 2:]
        ref = torch.cat((x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()), -1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        ref = torch.stack((x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()), -1).flatten(-2)
    assert torch.allclose(y.float()[0], ref, atol=1e-2)
    assert not math.isclose(float((y.float() - x.float()).abs().max()), 0.0)


def test_unimplemented_ext_calls_fail_loudly_by_name() -> None:
    ext = S._Ext("exllamav2_ext")
    with pytest.raises(NotImplementedError, match=r"exllamav2_ext\.make_q_matrix is not implemented"):
        ext.make_q_matrix(1, 2, 3)
    k, v, ko, vo, ks, vs = _q_tensors(8, 2, 32, 4)
    with pytest.raises(NotImplementedError, match=r"fp16_to_q_kv with page_size=256"):
        S.fp16_to_q_kv(k, ko, ks, v, vo, vs, 1, 0, 8, 256, None, None, 4)


def test_install_refuses_another_exllamav2_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S.importlib.metadata, "version", lambda name: "0.3.1")
    monkeypatch.delitem(__import__("sys").modules, "exllamav2", raising=False)
    with pytest.raises(RuntimeError, match="matches exllamav2 0.3.2 only, found 0.3.1"):
        S.install()
