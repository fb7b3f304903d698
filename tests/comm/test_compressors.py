"""Compressor payloads, round trips, unbiasedness and contraction (single process)."""

import math

import pytest
import torch

from scaledl.comm import (
    CastCompressor,
    Compressor,
    DitheringCompressor,
    OneBitCompressor,
    RandomKCompressor,
    TopKCompressor,
    available_compressors,
    derive_key,
    get_compressor,
)
from scaledl.comm.compressors import pack_bits, unpack_bits

ALL = [
    *(get_compressor(n) for n in available_compressors()),
    OneBitCompressor("l2_sqrt_d"),
    OneBitCompressor("none"),
    TopKCompressor(5),
    TopKCompressor(0.05, chunk=16),
    RandomKCompressor(0.3, rescale=True),
    DitheringCompressor(levels=4, kind="natural"),
    DitheringCompressor(levels=200),
    DitheringCompressor(bits=3, norm="l2"),
]


@pytest.mark.parametrize("comp", ALL, ids=repr)
def test_payload_is_fixed_size_uint8_and_decodes_from_misaligned_slices(comp: Compressor):
    torch.manual_seed(0)
    for numel in (1, 7, 8, 9, 100, 1003):
        x = torch.randn(numel)
        payload = comp.compress(x, key=3)
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        assert payload.numel() == comp.payload_bytes(numel)
        y = comp.decompress(payload, numel, key=3)
        assert y.dtype == torch.float32 and y.shape == (numel,)
        # a payload sliced out of a received buffer at an odd offset decodes the same
        buf = torch.cat([torch.zeros(3, dtype=torch.uint8), payload])
        assert torch.equal(comp.decompress(buf[3:], numel, key=3), y)
        # fp16 inputs are cast up first
        assert comp.compress(x.half(), key=3).numel() == payload.numel()


def test_payload_sizes_match_the_documented_formulas():
    d = 1000
    assert OneBitCompressor().payload_bytes(d) == 4 + 125
    assert OneBitCompressor().payload_bytes(1001) == 4 + 126
    assert TopKCompressor(0.001).payload_bytes(d) == 8  # ceil, at least one
    assert TopKCompressor(0.0101).payload_bytes(d) == 8 * 11
    assert TopKCompressor(30).payload_bytes(d) == 240
    assert TopKCompressor(5000).payload_bytes(d) == 8 * d  # count capped at d
    assert RandomKCompressor(0.25).payload_bytes(d) == 4 * 250
    assert DitheringCompressor(levels=127).payload_bytes(d) == 4 + d
    assert DitheringCompressor(levels=128).payload_bytes(d) == 4 + 2 * d
    assert CastCompressor("bf16").payload_bytes(d) == 2 * d
    assert get_compressor("identity").payload_bytes(d) == 4 * d
    assert get_compressor("zero").payload_bytes(d) == 0
    assert math.isclose(OneBitCompressor().ratio(8000), 32000 / 1004)


def test_bits_pack_msb_first_and_round_trip():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.uint8)
    packed = pack_bits(bits)
    assert packed.tolist() == [0b10000001, 0b11000000]
    assert torch.equal(unpack_bits(packed, 10), bits)
    rnd = torch.randint(0, 2, (4099,), dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(rnd), 4099), rnd)
    # all 256 bit patterns (MSB first): the pattern of byte b packs to b
    patterns = ((torch.arange(256).unsqueeze(1) >> torch.arange(7, -1, -1)) & 1).to(torch.uint8)
    assert torch.equal(pack_bits(patterns.reshape(-1)), torch.arange(256).to(torch.uint8))
    assert torch.equal(pack_bits(patterns.reshape(-1).bool()), torch.arange(256).to(torch.uint8))
    shifted = torch.cat([torch.zeros(3, dtype=torch.uint8), patterns.reshape(-1)])[3:]
    assert torch.equal(pack_bits(shifted), torch.arange(256).to(torch.uint8))  # misaligned


def test_onebit_decodes_scaled_signs():
    x = torch.tensor([0.5, -2.0, 0.0, 1.5, -1.0])
    y = OneBitCompressor("mean_abs").roundtrip(x)
    assert torch.allclose(y, torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0]) * 1.0)  # mean|x| = 1
    y2 = OneBitCompressor("l2_sqrt_d").roundtrip(x)
    scale = float(torch.linalg.vector_norm(x)) / math.sqrt(5)
    assert torch.allclose(y2.abs(), torch.full((5,), scale))
    assert torch.equal(OneBitCompressor("none").roundtrip(x), torch.sign(y))


def test_topk_keeps_exactly_the_largest_magnitudes():
    torch.manual_seed(1)
    x = torch.randn(1000)
    comp = TopKCompressor(0.01)
    y = comp.roundtrip(x)
    kept = y.nonzero().squeeze(1)
    assert kept.numel() == 10
    assert set(kept.tolist()) == set(x.abs().topk(10).indices.tolist())
    assert torch.equal(y[kept], x[kept])
    # contraction: ||C(x) - x||^2 <= (1 - k/d) ||x||^2
    assert (y - x).pow(2).sum() <= (1 - 10 / 1000) * x.pow(2).sum()


def test_chunked_topk_keeps_the_largest_magnitudes_of_each_chunk():
    torch.manual_seed(2)
    d, chunk = 1000, 64  # 16 chunks, the last one 40 elements (24 of padding)
    comp = TopKCompressor(0.05, chunk=chunk)
    assert comp.k(d) == 16 * 4 and comp.payload_bytes(d) == 8 * 64
    assert comp.k(10) == 1 and comp.k(0) == 0  # a tensor shorter than a chunk is one chunk
    x = torch.randn(d)
    x[-40:] = -x[-40:].abs() - 5.0  # the short chunk: every value beats the padding
    y = comp.roundtrip(x)
    for start in range(0, d, chunk):
        part = x[start : start + chunk]
        kept = set((y[start : start + chunk].nonzero().squeeze(1)).tolist())
        assert kept == set(part.abs().topk(4).indices.tolist()), start
    assert torch.equal(y[y != 0], x[y != 0])
    # padding entries (value 0, index d-1) change nothing, in decode and residual alike
    x = torch.randn(d)
    x[-40:] = 0.0
    x[-1] = 7.0  # the last element is sent next to the padding entries pointing at it
    payload = comp.compress(x)
    idx = payload[: 4 * 64].view(torch.int32)
    assert int((idx == d - 1).sum()) > 1 and int(idx.max()) == d - 1
    assert comp.decompress(payload, d)[-1] == 7.0
    p = x.clone().view(1, -1)
    comp.residual_batch_(p, payload.view(1, -1), [0])
    assert torch.equal(p.view(-1), x - comp.decompress(payload, d))
    with pytest.raises(ValueError, match="fractional ratio"):
        TopKCompressor(30, chunk=8)
    with pytest.raises(ValueError, match="positive integer"):
        TopKCompressor(0.1, chunk=0)


def test_randomk_indices_are_shared_in_range_and_depend_on_key():
    comp = RandomKCompressor(0.1, seed=7)
    a = comp.indices(500, key=11, device="cpu")
    assert a.dtype == torch.int64 and a.numel() == 50
    assert bool(((a >= 0) & (a < 500)).all())
    assert torch.equal(a, RandomKCompressor(0.1, seed=7).indices(500, key=11, device="cpu"))
    assert not torch.equal(a, comp.indices(500, key=12, device="cpu"))
    assert not torch.equal(a, RandomKCompressor(0.1, seed=8).indices(500, key=11, device="cpu"))
    batch = comp.indices_batch(500, [12, 11], "cpu")
    assert torch.equal(batch[1], a) and torch.equal(batch[0], comp.indices(500, 12, "cpu"))
    x = torch.randn(500)
    y = comp.roundtrip(x, key=11)
    assert torch.equal(y[a], x[a]) and y.count_nonzero() <= 50


def test_randomk_draws_uniformly_with_replacement():
    comp = RandomKCompressor(0.1)
    d, k, trials = 500, 50, 2000
    idx = comp.indices_batch(d, list(range(trials)), "cpu")
    # distinct indices per draw: d (1 - (1 - 1/d)^k) on average (about 47.6 of 50)
    distinct = torch.tensor([row.unique().numel() for row in idx], dtype=torch.float64)
    expected = d * (1 - (1 - 1 / d) ** k)
    assert abs(float(distinct.mean()) - expected) < 0.15
    # every position is equally likely: counts are Binomial(k * trials, 1/d)
    counts = torch.bincount(idx.reshape(-1), minlength=d).double()
    mean = k * trials / d
    assert float(((counts - mean) ** 2 / mean).sum()) < d + 6 * math.sqrt(2 * d)  # chi-square


def test_randomk_index_draw_is_O_k_not_O_d():
    # a permutation of 2**40 elements would need 8 TB; a draw of k indices needs 40 bytes
    idx = RandomKCompressor(5).indices(2**40, key=1, device="cpu")
    assert idx.numel() == 5 and bool((idx >= 0).all()) and bool((idx < 2**40).all())


def test_randomk_rescaled_repeats_add_up():
    comp = RandomKCompressor(9, rescale=True)
    x = torch.randn(10)
    key = 3
    idx = comp.indices(10, key, "cpu")
    counts = torch.bincount(idx, minlength=10).float()
    assert counts.max() > 1  # 9 draws among 10 positions repeat (here they do)
    expected = counts * x * (10 / 9)
    assert torch.allclose(comp.roundtrip(x, key), expected, atol=1e-6)


@pytest.mark.parametrize("comp", ALL, ids=repr)
def test_batched_calls_equal_row_by_row_calls(comp: Compressor):
    torch.manual_seed(5)
    keys = [4, 9, 4]
    for length in (1, 13, 64):
        x = torch.randn(3, length)
        payloads = comp.compress_batch(x, keys)
        assert payloads.shape == (3, comp.payload_bytes(length))
        for j, key in enumerate(keys):
            assert torch.equal(payloads[j], comp.compress(x[j], key))
        decoded = comp.decompress_batch(payloads, length, keys)
        assert decoded.shape == (3, length) and decoded.dtype == torch.float32
        for j, key in enumerate(keys):
            assert torch.equal(decoded[j], comp.decompress(payloads[j], length, key))
    with pytest.raises(ValueError, match="keys"):
        comp.decompress_batch(payloads, length, keys[:2])


def _mean_over_keys(comp: Compressor, x: torch.Tensor, trials: int) -> torch.Tensor:
    return torch.stack([comp.roundtrip(x, key=k) for k in range(trials)]).mean(0)


@pytest.mark.parametrize(
    "comp",
    [
        RandomKCompressor(0.25, rescale=True),
        DitheringCompressor(levels=3, kind="linear"),
        DitheringCompressor(levels=3, kind="natural"),
        DitheringCompressor(levels=2, norm="l2"),
    ],
    ids=repr,
)
def test_unbiased_without_error_feedback(comp: Compressor):
    torch.manual_seed(2)
    x = torch.randn(200)
    trials = 4000
    samples = torch.stack([comp.roundtrip(x, key=k) for k in range(trials)])
    # error of the mean against its standard error (plus float rounding of exact elements)
    sem = samples.std(0) / math.sqrt(trials)
    err = (samples.mean(0) - x).abs()
    assert bool((err <= 6 * sem + 1e-5 * x.abs().max()).all())
    # and the mean of a biased compressor (unscaled random-k) is visibly off
    if isinstance(comp, RandomKCompressor):
        biased = _mean_over_keys(RandomKCompressor(0.25), x, 400)
        assert torch.allclose(biased, 0.25 * x, atol=0.25)


def test_dithering_values_lie_on_the_level_grid():
    torch.manual_seed(3)
    x = torch.randn(300)
    nu = float(x.abs().max())
    lin = DitheringCompressor(levels=4).roundtrip(x, key=1)
    assert torch.allclose(lin.abs() / nu * 4, (lin.abs() / nu * 4).round(), atol=1e-5)
    nat = DitheringCompressor(levels=3, kind="natural").roundtrip(x, key=1) / nu
    grid = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.isclose(nat.abs().unsqueeze(1), grid, atol=1e-6).any(1).all()
    assert (lin.abs() <= nu + 1e-6).all()
    # signs are kept wherever the value is not rounded to zero
    assert (torch.sign(lin) * torch.sign(x) >= 0).all()
    # independent random bits per key
    c = DitheringCompressor(levels=2)
    assert not torch.equal(c.roundtrip(x, key=1), c.roundtrip(x, key=2))
    assert DitheringCompressor(bits=4).levels == 7
    assert DitheringCompressor(bits=4, kind="natural").levels == 4


def test_casts_round_like_torch():
    x = torch.randn(100) * 10
    assert torch.equal(CastCompressor("fp16").roundtrip(x), x.half().float())
    assert torch.equal(get_compressor("bf16").roundtrip(x), x.bfloat16().float())


def test_onebit_contracts():
    torch.manual_seed(4)
    x = torch.randn(4096)
    y = OneBitCompressor().roundtrip(x)
    # the mean-|x| scale is the l2-optimal scale for the sign vector's l1 direction only,
    # but the error is still below ||x||^2 for non-degenerate inputs
    assert (y - x).pow(2).sum() < x.pow(2).sum()


def test_registry_and_bad_input_errors():
    assert set(available_compressors()) >= {
        "identity",
        "onebit",
        "topk",
        "randomk",
        "dithering",
        "fp16",
        "bf16",
    }
    assert isinstance(get_compressor("topk", ratio=0.5), TopKCompressor)
    comp = TopKCompressor()
    assert get_compressor(comp) is comp
    with pytest.raises(ValueError, match=r"unknown compressor 'nope'.*onebit"):
        get_compressor("nope")
    with pytest.raises(ValueError, match="bad options for compressor 'onebit'"):
        get_compressor("onebit", ratio=0.1)
    with pytest.raises(ValueError, match="top-k ratio"):
        TopKCompressor(0)
    with pytest.raises(ValueError, match="whole"):
        RandomKCompressor(2.5)
    with pytest.raises(ValueError, match="1-bit scale"):
        OneBitCompressor("max")
    with pytest.raises(ValueError, match="levels"):
        DitheringCompressor(levels=0)
    with pytest.raises(ValueError, match="flat 1-D"):
        OneBitCompressor().compress(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="expected 129"):
        OneBitCompressor().decompress(torch.zeros(10, dtype=torch.uint8), 1000)


def test_keys_are_deterministic_and_distinct():
    assert derive_key(1, 2, 3) == derive_key(1, 2, 3)
    keys = {derive_key(0, step, b, s) for step in range(20) for b in range(5) for s in range(4)}
    assert len(keys) == 400
    assert all(0 <= k < 2**63 for k in keys)


@pytest.mark.gpu
@pytest.mark.parametrize("comp", ALL, ids=repr)
def test_cuda_matches_cpu_where_deterministic(comp: Compressor):
    x = torch.randn(10_001)
    payload = comp.compress(x.cuda(), key=5)
    assert payload.is_cuda and payload.numel() == comp.payload_bytes(x.numel())
    y = comp.decompress(payload, x.numel(), key=5).cpu()
    if not isinstance(comp, (DitheringCompressor, RandomKCompressor)):  # device RNGs differ
        assert torch.allclose(y, comp.roundtrip(x, key=5), atol=1e-5, rtol=1e-5)
