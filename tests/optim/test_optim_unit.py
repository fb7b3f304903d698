"""Single-process behaviour of the optimizers: formulas, random blocks, checkpoints, errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from scaledl.comm import IdentityCompressor, ZeroCompressor, get_compressor
from scaledl.optim import (
    CSER,
    EFSGD,
    AdaAlter,
    LocalAdaAlter,
    LocalSGD,
    QSparseLocalSGD,
    RandomBlock,
    overall_ratio,
)
from scaledl.optim._common import derive_key, is_sync_step
from scaledl.optim.digits_task import RunSpec, build_optimizer
from scaledl.optim.random_block import BlockExchange


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 4, generator=g, dtype=torch.float64)
        y = torch.randn(5, 2, generator=g, dtype=torch.float64)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)


# --------------------------------------------------------------------------- keys, periods
def test_derive_key_is_deterministic_and_spreads():
    assert derive_key(1, 2, 3) == derive_key(1, 2, 3)
    keys = {derive_key(0, step, i) for step in range(50) for i in range(20)}
    assert len(keys) == 1000
    assert all(0 <= k < 2**63 for k in keys)


def test_sync_phases():
    assert [t for t in range(9) if is_sync_step(t, 3, "end")] == [2, 5, 8]
    assert [t for t in range(9) if is_sync_step(t, 3, "start")] == [0, 3, 6]


def test_overall_ratio_matches_the_official_settings():
    assert overall_ratio(64, 4, 16) == pytest.approx(33.03, abs=0.01)
    assert overall_ratio(512, 16, 32) == pytest.approx(260.1, abs=0.1)
    assert overall_ratio(2048, 8, 256) == pytest.approx(1026, abs=1)
    assert overall_ratio(8, 4, 2) == pytest.approx(5.33, abs=0.01)


# ----------------------------------------------------------------------------- random block
def test_random_block_selection_is_keyed_and_bounded():
    b = RandomBlock(dim0=0.3, dim1=0.5, layer=0.6)
    shape = (10, 7, 3)
    sels = [b.select(shape, derive_key(9, k)) for k in range(400)]
    assert sels == [b.select(shape, derive_key(9, k)) for k in range(400)]
    chosen = [s for s in sels if s is not None]
    assert 0.5 < len(chosen) / len(sels) < 0.7  # layer ratio
    for s in chosen:
        assert len(s) == 2  # trailing dims whole
        assert s[0].stop - s[0].start in (3, 1)  # k0 = 3; the last block (9:10) is truncated
        assert 0 <= s[0].start < 10 and s[0].stop <= 10
        assert s[1].stop - s[1].start in (4, 3)  # k1 = round(3.5) = 4; 4:7 truncated
    assert RandomBlock(layer=0.0).select(shape, 1) is None
    assert RandomBlock().select((5,), 3) == (slice(0, 5),)


def test_random_block_expected_fraction():
    b = RandomBlock.for_ratio(64)
    assert b.expected_ratio == pytest.approx(64)
    ex = BlockExchange(b)
    shapes = [(64, 32)] * 8
    numel = sum(ex.payload_numel(shapes, derive_key(3, k)) for k in range(300))
    assert numel / (300 * 8 * 64 * 32) == pytest.approx(1 / 64, rel=0.2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim0": 0.0}, "dim0"),
        ({"dim1": 1.5}, "dim1"),
        ({"layer": -0.1}, "layer"),
    ],
)
def test_random_block_rejects_bad_ratios(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandomBlock(**kwargs)
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        RandomBlock.for_ratio(0.5)


# ------------------------------------------------------------------ wrappers on one process
def test_single_process_wrappers_equal_their_local_optimizer():
    ref = _model()
    _train(ref, _sgd(ref), 6)
    factories = [
        lambda m: CSER(_sgd(m), IdentityCompressor(), IdentityCompressor(), 2),
        lambda m: CSER(_sgd(m), RandomBlock(dim0=0.5), RandomBlock(), 2, form="block"),
        lambda m: LocalSGD(_sgd(m), 3),
        lambda m: EFSGD(_sgd(m), IdentityCompressor()),
        lambda m: QSparseLocalSGD(_sgd(m), IdentityCompressor(), 2),
    ]
    for factory in factories:
        m = _model()
        _train(m, factory(m), 6)
        assert torch.allclose(_flat(m), _flat(ref), atol=1e-14, rtol=0), factory


def test_cser_zero_c1_keeps_the_whole_update_in_the_residual():
    m = _model()
    before = _flat(m).clone()
    opt = CSER(_sgd(m), ZeroCompressor(), ZeroCompressor(), 100)
    _train(m, opt, 3)
    residual = torch.cat([e.reshape(-1) for e in opt.residuals])
    # x̂ never moves: x - e is the starting point.
    assert torch.allclose(_flat(m) - residual, before, atol=1e-14, rtol=0)
    assert residual.abs().max() > 1e-3
    assert opt.stats.total_sent == 0


def test_wrapper_shares_param_groups_with_schedulers_and_runs_hooks(recwarn):
    m = _model()
    opt = CSER(_sgd(m), IdentityCompressor(), IdentityCompressor(), 2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(o.steps_done))
    _train(m, opt, 2)
    sched.step()
    assert opt.local_opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert calls == [1, 2]
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]


def test_wrapper_errors():
    m = _model()
    with pytest.raises(ValueError, match=r"torch\.optim\.Optimizer"):
        CSER(object(), IdentityCompressor(), IdentityCompressor(), 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="form must be"):
        CSER(_sgd(m), IdentityCompressor(), IdentityCompressor(), 2, form="blocks")
    with pytest.raises(ValueError, match="period must be a positive integer"):
        CSER(_sgd(m), IdentityCompressor(), IdentityCompressor(), 0)
    with pytest.raises(ValueError, match="c1 must be a RandomBlock"):
        CSER(_sgd(m), get_compressor("topk", ratio=0.1), RandomBlock(), 2, form="block")
    with pytest.raises(ValueError, match="sync_phase"):
        LocalSGD(_sgd(m), 2, sync_phase="middle")
    with pytest.raises(ValueError, match="Compressor or RandomBlock"):
        EFSGD(_sgd(m), "topk")  # type: ignore[arg-type]
    opt = LocalSGD(_sgd(m), 2)
    with pytest.raises(ValueError, match="already a communication wrapper"):
        LocalSGD(opt, 2)
    with pytest.raises(ValueError, match="cannot grow"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    with pytest.raises(ValueError, match="lacks"):
        opt.load_state_dict({"local": opt.local_opt.state_dict()})


def test_wrapper_checkpoint_rejects_mismatched_buffers():
    m = _model()
    opt = QSparseLocalSGD(_sgd(m), IdentityCompressor(), 2)
    sd = opt.state_dict()
    sd["buffers"]["anchor"] = sd["buffers"]["anchor"][:1]
    with pytest.raises(ValueError, match="buffer 'anchor' has 1 tensors for 4 parameters"):
        opt.load_state_dict(sd)


# ------------------------------------------------------------------------------- AdaAlter
def test_adaalter_uses_the_accumulator_before_the_gradient():
    torch.manual_seed(0)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    opt = AdaAlter(
        [w], lr=0.1, eps=1e-7, initial_accumulator_value=0.5, weight_decay=0.01, update_clip=None
    )
    x, acc = w.detach().clone(), torch.full((3,), 0.5, dtype=torch.float64)
    for k in range(4):
        g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) * (k + 1)
        w.grad = g.clone()
        opt.step()
        x = x - 0.1 * (g / torch.sqrt(acc + 1e-7) + 0.01 * x)
        acc = acc + g * g
        assert torch.allclose(w.detach(), x, atol=1e-15, rtol=0)
        assert torch.allclose(opt.state[w]["sum"], acc, atol=0, rtol=0)


def test_adaalter_clipping_modes():
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    w.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)  # norm 5
    AdaAlter([w], lr=1.0, eps=0.0, initial_accumulator_value=1.0, max_grad_norm=1.0).step()
    assert torch.allclose(w.detach(), -torch.tensor([0.6, 0.8], dtype=torch.float64), atol=1e-6)
    v = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    v.grad = torch.tensor([3.0, -0.5], dtype=torch.float64)
    opt = AdaAlter([v], lr=1.0, eps=0.0, initial_accumulator_value=1.0)
    opt.max_grad_norm, opt.clip_mode = 1.0, "value"
    opt.step()
    assert torch.equal(v.detach(), torch.tensor([-1.0, 0.5], dtype=torch.float64))


def _tiny_then_large_gradients(**kwargs) -> torch.Tensor:
    """Local AdaAlter (lr 0.01, zero initial accumulator, 20 warm-up steps, H = 8) on a
    coordinate whose warm-up gradients are tiny (1e-5), so the frozen B ≈ 2e-9, and which
    then sees f(w) = w²/2 from w ≈ 1."""
    w = torch.ones(4, requires_grad=True)
    opt = LocalAdaAlter([w], lr=0.01, period=8, warmup_steps=20, **kwargs)
    for t in range(40):
        w.grad = torch.full_like(w, 1e-5) if t < 20 else w.detach().clone()
        opt.step()
    return w.detach()


def test_adaalter_update_clip_floors_a_near_zero_frozen_denominator():
    # Unguarded, each local step multiplies w by 1 - 0.01/sqrt(1e-7 + 2e-9) ≈ -30: ~1e11
    # after 8 frozen steps (the GPU benchmark's NaN, in one coordinate).
    assert _tiny_then_large_gradients(update_clip=None).abs().max() > 1e3
    # The floor bounds every step by lr: w only moves towards the optimum.
    assert _tiny_then_large_gradients().abs().max() <= 1.0
    # It is inactive where g² <= c²(B + eps): the step equals the unguarded one.
    a = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    for p, clip in ((a, 1.0), (b, None)):
        p.grad = p.detach().clone()
        AdaAlter([p], lr=0.1, initial_accumulator_value=0.5, update_clip=clip).step()
    assert torch.equal(a, b)
    c = torch.zeros(2, requires_grad=True)
    c.grad = torch.tensor([3.0, -0.1])
    AdaAlter([c], lr=1.0, eps=0.0, initial_accumulator_value=1.0, update_clip=0.5).step()
    assert torch.equal(c.detach(), torch.tensor([-0.5, 0.1]))


def test_local_adaalter_h1_on_one_process_is_adaalter():
    a, b = _model(), _model()
    _train(a, AdaAlter(a.parameters(), lr=0.05, initial_accumulator_value=0.1), 6)
    _train(b, LocalAdaAlter(b.parameters(), lr=0.05, period=1, initial_accumulator_value=0.1), 6)
    assert torch.equal(_flat(a), _flat(b))


def test_local_adaalter_freezes_the_denominator_and_resumes():
    m = _model()
    opt = LocalAdaAlter(m.parameters(), lr=0.05, period=4, warmup_steps=2)
    _train(m, opt, 3)  # 2 warm-up steps and one local step
    p = next(m.parameters())
    frozen = opt.state[p]["sum"].clone()
    assert not torch.equal(opt.state[p]["local_sum"], frozen)  # a copy that moved on
    _train(m, opt, 2, seed=1)
    assert torch.equal(opt.state[p]["sum"], frozen)  # still 3 of 4 local steps
    assert opt.steps_done == 5 and not opt.in_warmup
    sd = copy.deepcopy(opt.state_dict())  # as if saved: the live state keeps changing
    m2 = _model(seed=3)
    m2.load_state_dict(m.state_dict())
    opt2 = LocalAdaAlter(m2.parameters(), lr=0.05, period=4, warmup_steps=2)
    opt2.load_state_dict(sd)
    _train(m, opt, 3, seed=2)
    _train(m2, opt2, 3, seed=2)
    assert torch.equal(_flat(m), _flat(m2))


def test_local_adaalter_frozen_plus_eps_differs():
    a, b = _model(), _model()
    kw = dict(lr=0.05, period=8, eps=0.1, initial_accumulator_value=0.1)
    _train(a, LocalAdaAlter(a.parameters(), **kw), 3)
    _train(b, LocalAdaAlter(b.parameters(), denominator="frozen_plus_eps", **kw), 3)
    assert not torch.allclose(_flat(a), _flat(b))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be positive"),
        ({"eps": -1.0}, "eps"),
        ({"initial_accumulator_value": -1.0}, "initial_accumulator_value"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"clip_mode": "norm"}, "clip_mode"),
        ({"update_clip": 0.0}, "update_clip"),
        ({"period": 0}, "period"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"denominator": "thawed"}, "denominator"),
    ],
)
def test_local_adaalter_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalAdaAlter(_model().parameters(), **kwargs)


# ------------------------------------------------------------------------- task and CLI
def test_run_spec_validation_and_ratios():
    assert RunSpec("cser", 0.1, period=16, r1=64, r2=4).expected_ratio == pytest.approx(33.03, 1e-3)
    assert RunSpec("qsparse", 0.1, period=8, ratio=4).expected_ratio == 32
    assert RunSpec("local-adaalter", 0.1, period=8).expected_ratio == 4
    with pytest.raises(ValueError, match="max_grad_norm must be positive"):
        RunSpec("adagrad", 0.1, max_grad_norm=0.0)
    spec = RunSpec("local-adaalter", 0.1, period=4, max_grad_norm=2.0, update_clip=None)
    opt, sync_grads = build_optimizer(spec, _model())
    assert not sync_grads and opt.update_clip is None and opt.max_grad_norm == 2.0
    assert opt.period == 4
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        RunSpec("adam", 0.1)
    with pytest.raises(ValueError, match="r1 must be >= 1"):
        RunSpec("cser", 0.1, r1=0.5)


@pytest.mark.dist
def test_cli_bench_json(capsys):
    from scaledl.cli import main

    code = main(
        ["optim", "bench", "--world-size", "2", "--optimizer", "cser-block", "--steps", "16",
         "--json"]
    )  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["optimizer"] == "cser-block" and out["world_size"] == 2
    assert out["period"] == 16
    assert 25 < out["measured_ratio_vs_fp32"] < 45  # (64, 4, 16): ~33x
    assert math.isfinite(out["final_loss"]) and 0 <= out["final_accuracy"] <= 1
    assert out["bytes_sent_per_rank"] > 0


@pytest.mark.dist
def test_cli_bench_charlm_json(capsys):
    from scaledl.cli import main

    code = main(
        ["optim", "bench", "--task", "charlm", "--world-size", "2", "--optimizer",
         "local-adaalter", "--steps", "16", "--warmup-steps", "8", "--json"]
    )  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "charlm" and out["period"] == 8 and out["lr"] == 0.4
    # 8 synchronous warm-up steps (1x each), then 8 local steps and one sync of 2x the model.
    assert out["measured_ratio_vs_fp32"] == pytest.approx(16 / (8 + 2))
    assert out["final_perplexity"] == pytest.approx(math.exp(out["final_loss"]))
    assert out["final_loss"] < 4.0  # ln(vocabulary) ~ 4.6 at the start
    assert "final_accuracy" not in out


def test_cli_bad_input(capsys):
    from scaledl.cli import main

    assert main(["optim", "bench", "--world-size", "0"]) == 2
    assert "--world-size must be >= 1" in capsys.readouterr().err
    assert main(["optim", "bench", "--optimizer", "cser", "--period", "0"]) == 2
    assert "--period must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["optim", "bench", "--optimizer", "adam"])


# ------------------------------------------------------------------- character LM task
def test_charlm_corpus_is_deterministic_and_decodes_to_the_sorted_files(tmp_path):
    from scaledl.optim.charlm_task import load_stdlib_corpus

    a = load_stdlib_corpus(200_000, 8_192)
    b = load_stdlib_corpus(200_000, 8_192)
    assert a.sha256 == b.sha256 and torch.equal(a.train, b.train)
    assert torch.equal(a.heldout, b.heldout) and a.vocab == b.vocab
    assert len(a.train) + len(a.heldout) == 200_000 and len(a.heldout) == 8_192
    assert list(a.vocab) == sorted(set(a.vocab)) and int(a.train.max()) < a.vocab_size
    # A folder of our own: files are read in sorted order, the tail is held out.
    for name, text in [("b.py", b"bbbb\n"), ("a.py", b"aa\n"), ("c.txt", b"ignored")]:
        (tmp_path / name).write_bytes(text)
    c = load_stdlib_corpus(7, 2, root=tmp_path)
    decode = lambda ids: bytes(c.vocab[i] for i in ids.tolist())  # noqa: E731
    assert decode(c.train) + decode(c.heldout) == b"aa\nbbbb"
    assert decode(c.heldout) == b"bb" and c.files == 2 and c.vocab == b"\nab"
    with pytest.raises(ValueError, match="fewer than 100"):
        load_stdlib_corpus(100, 2, root=tmp_path)
    with pytest.raises(ValueError, match="heldout_bytes"):
        load_stdlib_corpus(10, 5, root=tmp_path)


def test_charlm_batches_are_keyed_and_a_few_steps_lower_the_held_out_loss():
    from scaledl.optim._task import train_task
    from scaledl.optim.charlm_task import CharLMTask, load_stdlib_corpus

    task = CharLMTask(load_stdlib_corpus(200_000, 8_192), seq_len=32, hidden=64)
    x, y = task.batch(3, 1, 4, 0, 5)
    assert x.shape == y.shape == (5, 32) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(task.batch(3, 1, 4, 0, 5)[0], x)  # a pure function of its key
    assert not torch.equal(task.batch(3, 2, 4, 0, 5)[0], x)  # ranks draw their own windows
    start = task.evaluate(task.make_model(0))
    assert start["loss"] == pytest.approx(math.log(task.corpus.vocab_size), abs=0.2)
    assert start["perplexity"] == pytest.approx(math.exp(start["loss"]))
    spec = RunSpec("local-adaalter", 0.4, period=4, warmup_steps=5, initial_accumulator_value=0.0)
    (rec,) = train_task(task, [spec], steps=20, batch_size=8, eval_points=2)
    assert [c["step"] for c in rec["curve"]] == [10, 20]
    # ~4.5 -> ~2.4 nats/char in 20 steps; a broken step or loss would stay near ln(96).
    assert rec["curve"][1]["loss"] < rec["curve"][0]["loss"] < start["loss"] - 1.0
    assert rec["final_loss"] < start["loss"] - 1.5, (start, rec["curve"])
    assert rec["final_bits_per_char"] == pytest.approx(rec["final_loss"] / math.log(2))
    with pytest.raises(ValueError, match="too long"):
        CharLMTask(task.corpus, seq_len=10_000)
