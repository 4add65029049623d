"""SSTAdamW: the step, sampling law, schedule, re-SVD, exact resume, memory, registry, bad input."""

import itertools

import pytest
import torch
from torch import nn

import lowrank_optim as lo
from lowrank_optim import sst
from lowrank_optim.memory import state_bytes
from tests.helpers import (
    assert_same_training_state,
    resume_midway,
    tiny_llama,
    token_batches,
    train,
)


def _mlp(seed: int = 0, rank: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 20))
    return sst.convert(model, rank=rank)


def _backward(model: nn.Module, seed: int = 0) -> None:
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(seed))
    model(x).sin().sum().backward()


@pytest.mark.parametrize("warmup", [0, 4])
def test_step_updates_sampled_vectors_with_adamw_and_all_singular_values(warmup):
    model = _mlp()
    lr, wd = 1e-2, 0.1
    opt = lo.SSTAdamW(sst.sst_param_groups(model), lr=lr, weight_decay=wd,
                      iteration_warmup=warmup)
    sst_lr = lr / warmup if warmup else lr  # first step of a fresh state: 1 / warmup of lr
    _backward(model)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    grads = {id(p): p.grad.clone() for p in model.parameters()}
    opt.step()
    for _, group, u, s, v in opt.spectral_layers():
        idx = opt.state[u]["proj_idx"]
        assert torch.equal(idx, opt.state[v]["proj_idx"]) and idx.numel() == group["rank"]
        rest = torch.ones(u.shape[1], dtype=torch.bool)
        rest[idx] = False
        for p in (u, v):
            old = before[id(p)]
            assert torch.equal(p[:, rest], old[:, rest])  # unsampled vectors untouched
            # the sampled ones: torch AdamW on the gathered enhanced gradient (no decay), then
            # renormalised to unit length
            ref = old[:, idx].clone().requires_grad_()
            ref.grad = grads[id(p)][:, idx]
            torch.optim.AdamW([ref], lr=sst_lr, weight_decay=0.0).step()
            expected = ref.detach() / ref.detach().norm(dim=0)
            torch.testing.assert_close(p[:, idx], expected)
            assert opt.state[p]["exp_avg"].shape == (p.shape[0], group["rank"])
        ref = before[id(s)].clone().requires_grad_()  # every singular value: AdamW with decay
        ref.grad = grads[id(s)]
        torch.optim.AdamW([ref], lr=sst_lr, weight_decay=wd).step()
        torch.testing.assert_close(s, ref.detach().clamp(min=0))
    # the bias (a plain parameter) is ordinary AdamW
    bias = model[0].bias
    ref = before[id(bias)].clone().requires_grad_()
    ref.grad = grads[id(bias)]
    torch.optim.AdamW([ref], lr=lr, weight_decay=wd).step()
    torch.testing.assert_close(bias, ref.detach())


def test_singular_values_are_clamped_at_zero():
    model = _mlp()
    with torch.no_grad():
        model[0].S.fill_(1e-4)
    opt = lo.SSTAdamW(sst.sst_param_groups(model), lr=0.1, weight_decay=0.0)
    _backward(model)
    grad = model[0].S.grad.clone()
    opt.step()
    assert (grad > 0).any(), "test needs singular values pushed below zero"
    assert (model[0].S >= 0).all()
    assert torch.equal(model[0].S[grad > 0], torch.zeros(int((grad > 0).sum())))


def _probs(s: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 / s.numel() + s / s.sum())


def test_first_picks_follow_the_mixed_multinomial():
    stats = pytest.importorskip("scipy.stats")
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0])
    n = 5000
    picks = torch.stack([sst.sample_indices(s, 1, sst.seeded_generator(7, 0, t))
                         for t in range(n)]).flatten()
    counts = torch.bincount(picks, minlength=6).double()
    expected = _probs(s.double()) * n
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # power check: the same counts clearly reject the unmixed and the uniform laws
    unmixed = (s.double() + 1e-3) / (s.double() + 1e-3).sum() * n
    assert stats.chisquare(counts, unmixed).pvalue < 1e-12
    uniform = torch.full((6,), n / 6.0, dtype=torch.float64)
    assert stats.chisquare(counts, uniform).pvalue < 1e-12


def test_optimizer_draws_follow_the_law_without_replacement():
    s_true = torch.tensor([5.0, 3.0, 1.5, 1.0, 0.3, 0.1])
    q1, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    q2, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))
    linear = nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        linear.weight.copy_(q1 @ torch.diag(s_true) @ q2.T)
    model = sst.convert(nn.Sequential(linear), rank=3)
    opt = lo.SSTAdamW(sst.sst_param_groups(model), seed=3)
    _, _, u, s, v = opt.spectral_layers()[0]
    n = 3000
    hits = torch.zeros(6)
    for _ in range(n):
        opt.resample()
        idx = opt.state[u]["proj_idx"]
        assert torch.equal(idx, opt.state[v]["proj_idx"]) and idx.unique().numel() == 3
        hits[idx] += 1
    assert opt.schedule_state()["draws"] == n + 1
    # exact inclusion probabilities of successive sampling, by enumerating ordered triples
    p = _probs(s.detach().double())
    exact = torch.zeros(6, dtype=torch.float64)
    for a, b, c in itertools.permutations(range(6), 3):
        exact[[a, b, c]] += p[a] * p[b] / (1 - p[a]) * p[c] / (1 - p[a] - p[b])
    freq = hits.double() / n
    sigma = (exact * (1 - exact) / n).sqrt()
    assert ((freq - exact).abs() < 4.5 * sigma).all(), (freq, exact)
    assert (exact.max() - exact.min()) > 20 * sigma.max()  # the law is far from uniform


def test_sampling_is_deterministic_and_depends_on_the_seed():
    draws = []
    for seed in (0, 0, 1):
        opt = lo.SSTAdamW(sst.sst_param_groups(_mlp(rank=2)), seed=seed)
        for _ in range(5):
            opt.resample()
        draws.append([opt.state[u]["proj_idx"].tolist() for _, _, u, _, _ in
                      opt.spectral_layers()])
    assert draws[0] == draws[1] and draws[0] != draws[2]


def test_schedule_resamples_every_iteration_and_resvds_every_round():
    model = _mlp()
    opt = lo.SSTAdamW(sst.sst_param_groups(model), lr=1e-2, iteration_length=3,
                      iterations_per_round=2, iteration_warmup=1)
    _, _, u, s, _ = opt.spectral_layers()[0]
    seen = []
    for step in range(1, 7):
        opt.zero_grad()
        _backward(model, seed=step)
        opt.step()
        seen.append(opt.schedule_state())
        if step in (3, 6):  # fresh state for the new vectors (and for S after the re-SVD)
            assert "exp_avg" not in opt.state[u]
        else:
            assert int(opt.state[u]["step"]) == step % 3
    assert [c["draws"] for c in seen] == [1, 1, 2, 2, 2, 3]
    assert [c["resvds"] for c in seen] == [0, 0, 0, 0, 0, 1]
    assert "exp_avg" not in opt.state[s] and int(opt.state[s]["sst_step"]) == 6
    # iterations_per_round=None is the paper's d / r: k // rank per layer
    auto = lo.SSTAdamW(sst.sst_param_groups(_mlp(rank=3)))
    assert [auto.iterations_per_round(g, s) for _, g, _, s, _ in auto.spectral_layers()] == [4, 4]
    # iteration_warmup=None is the paper's 20 of 200 steps: a tenth of the iteration
    warmups = [lo.SSTAdamW(sst.sst_param_groups(_mlp()), iteration_length=length)
               .param_groups[0]["iteration_warmup"] for length in (200, 55, 4, None)]
    assert warmups == [20, 5, 0, 0]


def test_meta_device_models_step_for_analytic_profiling():
    with torch.device("meta"):
        model = _mlp()
    opt = lo.SSTAdamW(sst.sst_param_groups(model), nonfinite="ignore")
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()
    _, group, u, _, _ = opt.spectral_layers()[0]
    assert opt.state[u]["exp_avg"].shape == (u.shape[0], group["rank"])


def test_resvd_restores_orthonormality_and_keeps_the_product():
    model = _mlp()
    opt = lo.SSTAdamW(sst.sst_param_groups(model), lr=5e-2, iteration_length=2,
                      iterations_per_round=100, iteration_warmup=0)
    for step in range(8):
        opt.zero_grad()
        _backward(model, seed=step)
        opt.step()
    layer = model[0]
    eye = torch.eye(layer.k)
    drift = (layer.U.T @ layer.U - eye).abs().max()
    assert drift > 1e-3, "vectors should have drifted from orthogonality before the re-SVD"
    product = layer.merged_weight()
    opt.resvd([layer.U])
    assert torch.allclose(layer.U.T @ layer.U, eye, atol=1e-5)
    assert torch.allclose(layer.V.T @ layer.V, eye, atol=1e-5)
    assert torch.allclose(layer.merged_weight(), product, atol=1e-5, rtol=0)
    assert (layer.S >= 0).all() and (layer.S[:-1] >= layer.S[1:]).all()
    assert opt.state[layer.S].keys() == {"sst_layer", "sst_step", "sst_draws", "sst_resvds"}
    assert [int(opt.state[m.S]["sst_resvds"]) for m in (model[0], model[2])] == [1, 0]


def test_resume_is_bit_exact_across_iterations_and_a_resvd():
    def make(model):
        sst.convert(model, rank=4)
        return lo.SSTAdamW(sst.sst_param_groups(model), lr=1e-2, iteration_length=3,
                           iterations_per_round=2, iteration_warmup=2, seed=5)

    batches = token_batches(10, batch=2, seq=16, seed=3)  # draws after steps 3 and 9, a
    model = tiny_llama(seed=1, num_hidden_layers=1)  # re-SVD after step 6
    opt = make(model)
    train(model, opt, batches)
    assert opt.schedule_state() == {"step": 10, "draws": 4, "resvds": 1}

    fresh_model, fresh, _ = resume_midway(
        make, lambda seed: tiny_llama(seed=seed, num_hidden_layers=1), 1, batches, 4)
    assert_same_training_state(model, opt, fresh_model, fresh)


def test_state_bytes_count_only_the_sampled_vectors_and_s():
    rank = 4
    model = tiny_llama()
    opt = lo.create_optimizer(model, "sst_adamw", rank=rank, lr=1e-3)
    assert isinstance(opt, lo.SSTAdamW) and sst.spectral_modules(model)
    train(model, opt, token_batches(1))
    layers = opt.spectral_layers()
    rest = [p for g in opt.param_groups if g["rank"] is None for p in g["params"]]
    fp32 = 4
    moments = 2 * fp32 * (sum(rank * (u.shape[0] + v.shape[0]) + s.numel()
                              for _, _, u, s, v in layers) + sum(p.numel() for p in rest))
    got = state_bytes(opt)
    assert got.moments == moments
    assert got.indices == len(layers) * 2 * (8 * rank + 8)  # proj_idx + proj_width, U and V
    assert got.projectors == 0
    # vs AdamW on the same converted model: the spectral weights' state shrinks by ~rank / k
    spectral = [p for _, _, u, s, v in layers for p in (u, s, v)]
    adamw_spectral = lo.memory.adamw_state_bytes(spectral)
    sst_spectral = 2 * fp32 * sum(rank * (u.shape[0] + v.shape[0]) + s.numel()
                                  for _, _, u, s, v in layers)
    assert sst_spectral < adamw_spectral * (rank / 64 + 0.02)


def test_registry_builds_sst_from_a_plain_or_converted_model():
    model = tiny_llama()
    assert "sst_adamw" in lo.available()
    with pytest.raises(ValueError, match="update_proj_gap"):
        lo.create_optimizer(model, "sst_adamw", rank=4, update_proj_gap=10)
    opt = lo.create_optimizer(model, "sst_adamw", rank=4, target_modules=["q_proj"],
                              iteration_length=7, iteration_warmup=1)
    assert [len(g["params"]) for g in opt.param_groups][0] == 6  # two q_proj triples
    assert opt.param_groups[0]["iteration_length"] == 7
    again = lo.create_optimizer(model, "sst_adamw", rank=2)  # already converted: reused
    assert len(again.spectral_layers()) == 2 and again.param_groups[0]["rank"] == 2


def test_request_refresh_resamples():
    opt = lo.SSTAdamW(sst.sst_param_groups(_mlp()))
    opt.request_refresh()
    assert opt.schedule_state()["draws"] == 2


def test_request_refresh_draws_new_vectors_whose_state_restarts():
    """What a refresh does, not only its counter: every layer's U and V share a new draw of
    distinct indices (some layer's differs from before), their moments restart, and the next
    step moves exactly the newly sampled columns, by a first Adam step (lr * sign-like
    ``g / (|g| + eps)``: AdamW's first update is ``lr * m / (sqrt(v) + eps)`` with
    ``m = (1 - b1) g``, ``v = (1 - b2) g^2`` bias-corrected to ``g`` and ``g^2``)."""
    model = _mlp()
    opt = lo.SSTAdamW(sst.sst_param_groups(model), lr=1e-2, weight_decay=0.0,
                      iteration_warmup=0)  # no warm-up of the restarted vectors
    for seed in range(2):
        opt.zero_grad()
        _backward(model, seed)
        opt.step()
    before = {id(u): opt.state[u]["proj_idx"].clone() for _, _, u, _, _ in opt.spectral_layers()}
    opt.request_refresh()
    changed = False
    for _, group, u, _, v in opt.spectral_layers():
        idx = opt.state[u]["proj_idx"]
        assert torch.equal(idx, opt.state[v]["proj_idx"])
        assert idx.unique().numel() == group["rank"] and 0 <= int(idx.min())
        assert int(idx.max()) < u.shape[1]
        assert set(opt.state[u]) == set(opt.state[v]) == {"proj_idx", "proj_width"}
        changed |= not torch.equal(idx, before[id(u)])
    assert changed
    _, _, u, _, _ = opt.spectral_layers()[0]
    old = u.detach().clone()
    opt.zero_grad()
    _backward(model, 5)
    grad = u.grad.clone()
    opt.step()
    idx = opt.state[u]["proj_idx"]
    untouched = [c for c in range(u.shape[1]) if c not in idx.tolist()]
    assert torch.equal(u[:, untouched], old[:, untouched])
    first = old[:, idx] - 1e-2 * grad[:, idx] / (grad[:, idx].abs() + 1e-8)
    first = first / first.norm(dim=0, keepdim=True)  # SST keeps U's columns unit length
    torch.testing.assert_close(u[:, idx].detach(), first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(iteration_length=0), "iteration_length=0"),
        (dict(iteration_length=2.5), "iteration_length=2.5"),
        (dict(iterations_per_round=0), "iterations_per_round=0"),
        (dict(iterations_per_round=-1), "iterations_per_round=-1"),
        (dict(iteration_warmup=-1), "iteration_warmup=-1"),
        (dict(iteration_length=10, iteration_warmup=10), "iteration_warmup=10 must be smaller"),
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(seed=-1), "seed=-1"),
        (dict(betas=(0.9, 1.5)), "betas"),
        (dict(weight_decay=-0.1), "weight_decay"),
    ],
)
def test_optimizer_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lo.SSTAdamW(sst.sst_param_groups(_mlp()), **kwargs)


def test_optimizer_rejects_bad_groups():
    model = _mlp(rank=None)
    layer = model[0]
    with pytest.raises(ValueError, match="rank=13 exceeds the number of singular vectors k=12"):
        lo.SSTAdamW(sst.sst_param_groups(model, rank=13))
    with pytest.raises(ValueError, match="no rank given"):
        sst.sst_param_groups(model)
    with pytest.raises(ValueError, match="triples"):
        lo.SSTAdamW([{"params": [layer.U, layer.S], "rank": 2}])
    with pytest.raises(ValueError, match="triple"):
        lo.SSTAdamW([{"params": [layer.U, layer.V, layer.S], "rank": 2}])
    with pytest.raises(ValueError, match="update_proj_gap"):
        lo.SSTAdamW([{"params": [layer.U, layer.S, layer.V], "rank": 2,
                      "update_proj_gap": 5}])
    with pytest.raises(ValueError, match="convert"):
        sst.sst_param_groups(tiny_llama())


def test_a_trainer_callback_drives_the_schedule(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_llama()
    sst.convert(model, rank=4)
    opt = lo.SSTAdamW(sst.sst_param_groups(model), lr=1e-3, iteration_length=None)
    rows = [{"input_ids": ids, "labels": ids} for batch in token_batches(2) for ids in batch]

    class ResampleEvery2(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            if state.global_step % 2 == 0:
                inner.resample()

    args = transformers.TrainingArguments(
        str(tmp_path), per_device_train_batch_size=4, max_steps=4, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None),
                         callbacks=[ResampleEvery2()]).train()
    assert opt.schedule_state() == {"step": 4, "draws": 3, "resvds": 0}
