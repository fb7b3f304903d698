"""Error-feedback algebra and compressor-side momentum (single process)."""

import pytest
import torch

from scaledl.comm import (
    CastCompressor,
    DitheringCompressor,
    ErrorFeedback,
    OneBitCompressor,
    RandomKCompressor,
    TopKCompressor,
    compress_shards,
)


@pytest.mark.parametrize("comp", [OneBitCompressor(), TopKCompressor(0.05)], ids=repr)
def test_vanilla_error_feedback_telescopes(comp):
    torch.manual_seed(0)
    ef = ErrorFeedback("vanilla")
    sent = torch.zeros(120, dtype=torch.float64)
    total = torch.zeros(120, dtype=torch.float64)
    for t in range(30):
        x = torch.randn(120)
        total += x.double()
        payload, decoded = compress_shards(comp, ef, x, keys=[t, t + 100, t + 200])
        assert payload.numel() == 3 * comp.payload_bytes(40)
        # the receivers see exactly `decoded`
        chunks = payload.view(3, -1)
        again = torch.cat(
            [comp.decompress(chunks[j], 40, k) for j, k in enumerate([t, t + 100, t + 200])]
        )
        assert torch.equal(again, decoded)
        sent += decoded.double()
    # sum_t D(c_t) + e_T == sum_t x_t
    assert torch.allclose(sent + ef.error.double(), total, atol=1e-4)


def test_residual_is_input_minus_decoded_and_lr_correction_rescales():
    torch.manual_seed(1)
    comp = TopKCompressor(3)
    ef = ErrorFeedback("lr_corrected")
    x1, x2 = torch.randn(20), torch.randn(20)
    _, d1 = compress_shards(comp, ef, x1, [0], lr=0.1)
    e1 = ef.error.clone()
    assert torch.equal(e1, x1 - d1)
    _, d2 = compress_shards(comp, ef, x2, [1], lr=0.05)
    p2 = x2 + (0.1 / 0.05) * e1  # alpha = lr_{t-1} / lr_t
    assert torch.allclose(ef.error, p2 - d2, atol=1e-6)
    assert torch.allclose(d2, comp.roundtrip(p2), atol=1e-6)
    with pytest.raises(ValueError, match="needs the learning rate"):
        compress_shards(comp, ef, x2, [2])


def test_no_error_feedback_keeps_no_state():
    ef = ErrorFeedback("none")
    _, dec = compress_shards(OneBitCompressor(), ef, torch.randn(16), [0])
    assert ef.error is None and dec.numel() == 16


def test_sparse_error_feedback_equals_vanilla_for_unscaled_randomk():
    torch.manual_seed(2)
    comp = RandomKCompressor(0.2)
    sparse, dense = ErrorFeedback("sparse"), ErrorFeedback("vanilla")
    for t in range(10):
        x = torch.randn(50)
        ps, ds = compress_shards(comp, sparse, x, [t, t + 1])
        pv, dv = compress_shards(comp, dense, x, [t, t + 1])
        assert torch.equal(ps, pv) and torch.equal(ds, dv)
        assert torch.equal(sparse.error, dense.error)
    with pytest.raises(ValueError, match="random-k compressor with rescale=False"):
        compress_shards(OneBitCompressor(), ErrorFeedback("sparse"), torch.randn(4), [0])


def test_nesterov_momentum_inside_the_compressor():
    mu = 0.9
    ef = ErrorFeedback("none", momentum=mu)
    m = torch.zeros(5)
    for _ in range(4):
        g = torch.randn(5)
        p = ef.prepare(g)
        m = mu * m + g
        assert torch.allclose(p, mu * m + g)
    with pytest.raises(ValueError, match="momentum"):
        ErrorFeedback("vanilla", momentum=1.0)


def test_state_dict_round_trip_and_mode_check():
    ef = ErrorFeedback("vanilla", momentum=0.5)
    compress_shards(OneBitCompressor(), ef, torch.randn(8), [0])
    other = ErrorFeedback("vanilla", momentum=0.5)
    other.load_state_dict(ef.state_dict())
    assert torch.equal(other.error, ef.error) and torch.equal(other.momentum_buf, ef.momentum_buf)
    with pytest.raises(ValueError, match="checkpoint EF mode"):
        ErrorFeedback("none").load_state_dict(ef.state_dict())
    with pytest.raises(ValueError, match="unknown error-feedback mode"):
        ErrorFeedback("always")
    with pytest.raises(ValueError, match="equal shards"):
        compress_shards(OneBitCompressor(), ef, torch.randn(9), [0, 1])


@pytest.mark.parametrize("mode", ["vanilla", "lr_corrected"])
@pytest.mark.parametrize(
    "comp",
    [
        OneBitCompressor(),
        OneBitCompressor("l2_sqrt_d"),
        TopKCompressor(0.05),
        TopKCompressor(0.05, chunk=40),
        RandomKCompressor(0.2),
        RandomKCompressor(0.2, rescale=True),
        DitheringCompressor(levels=7),
        CastCompressor("bf16"),
    ],
    ids=repr,
)
def test_in_place_residual_path_equals_decode_and_subtract(comp, mode):
    """The hooks' path (return_decoded=False) keeps the same error, bit for bit."""
    torch.manual_seed(3)
    slow, fast = ErrorFeedback(mode), ErrorFeedback(mode)
    for t in range(6):
        x = torch.randn(3 * 64)
        x[::17] = 0.0  # zeros: a sign cannot encode them, the residual must still match
        lr = 0.1 / (t + 1)
        p_slow, _ = compress_shards(comp, slow, x, [t, t + 1, t + 2], lr)
        own = x.clone()
        p_fast, decoded = compress_shards(
            comp, fast, own, [t, t + 1, t + 2], lr, inplace=True, return_decoded=False
        )
        assert decoded is None
        assert torch.equal(p_fast, p_slow)
        assert torch.equal(fast.error, slow.error)
        assert fast.error.data_ptr() == own.data_ptr()  # the caller's buffer, no copy


def test_in_place_residual_without_error_feedback_keeps_no_state():
    ef = ErrorFeedback("none")
    payload, decoded = compress_shards(
        TopKCompressor(2), ef, torch.randn(8), [0], return_decoded=False
    )
    assert decoded is None and ef.error is None and payload.numel() == 16
