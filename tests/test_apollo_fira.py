"""APOLLO, APOLLO-Mini and Fira against their papers' equations, written out here.

APOLLO (arXiv:2412.05270, Algorithm 1): ``R = P G`` with ``P ~ N(0, 1/r)`` redrawn every T
steps; Adam on ``R`` gives ``R~ = M_hat / (sqrt(V_hat) + eps)``; ``s_j = ||R~_j|| / ||R_j||``
(channel) or ``||R~|| / ||R||`` (tensor, APOLLO-Mini); ``G~ = G diag(s)``; norm-growth limiter
``G~ <- G~ * gamma ||G~_prev|| / ||G~||`` when the ratio exceeds gamma; ``W <- W - lr alpha G~ -
lr wd W``.  Fira (arXiv:2410.01623): GaLore's Adam step ``psi(R)`` in the SVD subspace plus
``S = phi (G - B R)`` with ``phi_j = ||psi(R)_j|| / ||R_j||``, limited the same way.

The references use nothing of the library's rules: only the projection matrices, taken from
the optimizer's projector (APOLLO: its seeded draw, whose own properties are tested separately)
or computed here with ``torch.linalg.svd`` / ``scipy.fft.dct`` (Fira).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

import lowrank_optim as lo
from lowrank_optim import memory
from lowrank_optim.projectors import RandomProjector
from lowrank_optim.rules import scaling
from tests.helpers import (
    init_gloo,
    record_steps,
    replay_recorded_steps,
    resume_midway,
    roundtrip,
    spawn_two,
    tiny_llama,
    token_batches,
    train,
)

SHAPES = [(24, 12), (12, 24)]  # right side (channels = rows) and left side (columns)


def _grads(shape, steps, seed=0, growth=1.0):
    """Random gradients whose norm grows by ``growth`` per step (to trip the limiter)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * growth**t for t in range(steps)]


def _run(opt, weight, grads):
    out = []
    for grad in grads:
        weight.grad = grad.clone()
        opt.step()
        out.append(weight.detach().clone())
    return out


def _adam(state, x, beta1, beta2, eps, t):
    """Adam's bias-corrected output on ``x`` (the papers' psi / R~), float64."""
    m, v = state.setdefault("m", torch.zeros_like(x)), state.setdefault("v", torch.zeros_like(x))
    m.mul_(beta1).add_(x, alpha=1 - beta1)
    v.mul_(beta2).add_(x * x, alpha=1 - beta2)
    return (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)


def _ratio(num, den, axis, scale_type):
    if scale_type == "tensor":
        return num.norm() / den.norm()
    return num.norm(dim=axis, keepdim=True) / den.norm(dim=axis, keepdim=True)


def _limit(state, term, gamma):
    norm = term.norm()
    prev = state.get("prev")
    if gamma is not None and prev is not None and prev > 0 and norm / prev > gamma:
        term = term / norm * gamma * prev
    state["prev"] = term.norm()
    return term


def apollo_reference(weight, grads, draws, lr, betas, eps, wd, alpha, gamma, scale_type):
    """Algorithm 1 of the APOLLO paper in float64; ``draws[t]`` is the projection used at step
    ``t`` as ``(basis, side)`` (left: ``R = B^T G``; right: ``R = G B^T``)."""
    w, state, out = weight.double().clone(), {}, []
    for t, grad in enumerate(grads, start=1):
        g = grad.double()
        basis, side = draws[t - 1]
        basis = basis.double()
        r = basis.t() @ g if side == "left" else g @ basis.t()
        axis = 0 if side == "left" else 1
        adapted = _adam(state, r, *betas, eps, t)
        scaled = g * _ratio(adapted, r, axis, scale_type)
        scaled = _limit(state, scaled, gamma)
        w = w - lr * wd * w - lr * alpha * scaled
        out.append(w.clone())
    return out


def _recorded_draws(opt, weight, grads):
    """Step ``opt`` and record the projector's draw used at each step."""
    draws, out = [], []
    proj, group = opt.projector, opt.param_groups[0]
    for grad in grads:
        weight.grad = grad.clone()
        opt.step()
        state = opt.state[weight]
        draws.append(proj.basis(state, group, tuple(weight.shape), weight.device,
                                torch.float32))
        out.append(weight.detach().clone())
    return draws, out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cls, scale_type, alpha, rank", [
    (lo.ApolloAdamW, "channel", 1.0, 4),
    (lo.ApolloMini, "tensor", math.sqrt(128), 1),
])
def test_apollo_equals_the_papers_equations(shape, cls, scale_type, alpha, rank):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape))
    start = weight.detach().clone()
    grads = _grads(shape, 9, growth=1.3)  # the limiter engages on most steps
    opt = cls([{"params": [weight], "rank": rank, "update_proj_gap": 3}], lr=1e-2,
              weight_decay=0.1)
    assert opt.param_groups[0]["scale"] == pytest.approx(alpha)
    assert opt.param_groups[0]["scale_type"] == scale_type
    draws, ours = _recorded_draws(opt, weight, grads)
    ref = apollo_reference(start, grads, draws, 1e-2, (0.9, 0.999), 1e-8, 0.1, alpha, 1.01,
                           scale_type)
    for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=f"step {t}")
    # the draw changes at each refresh and only then
    assert torch.equal(draws[0][0], draws[2][0]) and not torch.equal(draws[2][0], draws[3][0])


def test_apollo_limiter_off_and_growth_limit_change_the_update():
    shape = (24, 12)
    results = {}
    for limit in (None, 1.01, 2.0):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(shape))
        start = weight.detach().clone()
        grads = _grads(shape, 6, growth=1.5)
        opt = lo.ApolloAdamW([{"params": [weight], "rank": 4}], lr=1e-2,
                             norm_growth_limit=limit)
        draws, ours = _recorded_draws(opt, weight, grads)
        ref = apollo_reference(start, grads, draws, 1e-2, (0.9, 0.999), 1e-8, 0.0, 1.0, limit,
                               "channel")
        torch.testing.assert_close(ours[-1].double(), ref[-1], rtol=1e-5, atol=1e-6)
        results[limit] = ours[-1]
    assert not torch.equal(results[None], results[1.01])
    assert not torch.equal(results[1.01], results[2.0])


def test_limiter_does_not_freeze_after_a_zero_term_and_syncs_nothing():
    state = {}
    assert float(scaling.limited(state, torch.tensor(0.0), 1.01)) == 1.0  # first: no limit
    # a previous norm of 0 would cap every later term at 0 for good: it is not a cap
    assert float(scaling.limited(state, torch.tensor(5.0), 1.01)) == 1.0
    factor = scaling.limited(state, torch.tensor(10.0), 1.01)
    assert float(factor) == pytest.approx(5.0 * 1.01 / 10.0)
    assert float(state[scaling.LIMITER_KEY]) == pytest.approx(5.0 * 1.01)


def _svd_basis(g, rank, side):
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return u[:, :rank] if side == "left" else vh[:rank]


def _dct_basis(g, rank, side):
    """The reference DCT selection: top-``rank`` l2 scores of the DCT-II coefficients."""
    n = g.shape[1] if side == "right" else g.shape[0]
    q = torch.from_numpy(scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0))
    coeffs = g.double() @ q.t() if side == "right" else q @ g.double()
    scores = coeffs.norm(dim=0 if side == "right" else 1)
    idx = scores.topk(rank).indices.sort().values
    return q[idx].t() if side == "left" else q[idx]


def fira_reference(weight, grads, rank, gap, basis_fn, lr, betas, eps, alpha, gamma,
                   formula):
    """Fira in float64: GaLore's Adam step in the subspace plus the limited, scaled residual.
    ``formula="galore"`` puts eps before the bias correction (galore-torch)."""
    m_, n_ = weight.shape
    side = "right" if m_ >= n_ else "left"
    axis = 0 if side == "left" else 1
    w, state, out, basis = weight.double().clone(), {}, [], None
    beta1, beta2 = betas
    for t, grad in enumerate(grads, start=1):
        g = grad.double()
        if (t - 1) % gap == 0:
            basis = basis_fn(g, rank, side)
        r = basis.t() @ g if side == "left" else g @ basis.t()
        b = basis

        def back(x, b=b):
            return b @ x if side == "left" else x @ b
        eps_t = eps / math.sqrt(1 - beta2**t) if formula == "galore" else eps
        psi = _adam(state, r, beta1, beta2, eps_t, t)
        phi = _ratio(psi, r, axis, "channel")
        residual = _limit(state, (g - back(r)) * phi, gamma)
        w = w - lr * alpha * (back(psi) + residual)
        out.append(w.clone())
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cls, basis_fn, formula, eps, alpha, gap", [
    (lo.FiraAdamW, _svd_basis, "galore", 1e-6, 0.25, 3),
    (lo.DCTFiraAdamW, _dct_basis, "torch", 1e-8, 1.0, 1),
])
def test_fira_equals_the_papers_equations(shape, cls, basis_fn, formula, eps, alpha, gap):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape))
    start = weight.detach().clone()
    grads = _grads(shape, 8, growth=1.2)
    group = {"params": [weight], "rank": 4, "update_proj_gap": gap, "scale": alpha}
    if cls is lo.DCTFiraAdamW:  # the reference DCT-AdamW's default: moments keep their slots
        group["rotate_moments"] = False
    ours = _run(cls([group], lr=1e-2), weight, grads)
    ref = fira_reference(start, grads, 4, gap, basis_fn, 1e-2, (0.9, 0.999), eps, alpha, 1.01,
                         formula)
    for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=f"step {t}")


def test_fira_without_a_residual_is_galore():
    """At rank = min(m, n) the residual is zero up to rounding, and Fira's step is GaLore's
    (the low-rank part is Adam's own code)."""
    torch.manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(16, 8)) for _ in range(2))
    b.data.copy_(a.data)
    grads = _grads((16, 8), 5)
    fira = lo.FiraAdamW([{"params": [a], "rank": 8, "update_proj_gap": 2}], lr=1e-2,
                        scale_type="tensor")
    galore = lo.GaLoreAdamW([{"params": [b], "rank": 8, "update_proj_gap": 2}], lr=1e-2)
    for x, y in zip(_run(fira, a, grads), _run(galore, b, grads), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_random_projector_draws_seeded_gaussians_per_parameter_and_step():
    proj = RandomProjector()
    group = {"rank": 64, "proj_type": "std", "proj_seed": 3}
    states = [{}, {}]
    for i, state in enumerate(states):
        proj.register(state, group, i)
        state["step"] = torch.tensor(0.0)
        proj.refresh(torch.zeros(128, 256), state, group, None)
    (b0, side), (b1, _) = (proj.basis(s, group, (128, 256), torch.device("cpu"), torch.float32)
                           for s in states)
    assert side == "left" and b0.shape == (128, 64)  # the smaller side is projected
    assert not torch.equal(b0, b1)  # each parameter its own matrix
    assert abs(float(b0.mean())) < 0.01 and float(b0.var()) == pytest.approx(1 / 64, rel=0.05)
    again = proj.basis(roundtrip(states[0]), group, (128, 256), torch.device("cpu"),
                       torch.float32)[0]
    assert torch.equal(again, b0)  # the state (three integers) redraws it bit for bit
    assert all(v.dtype == torch.int64 and v.numel() <= 2 for v in states[0].values()
               if v.dtype != torch.float32)


@pytest.mark.parametrize("name", ["apollo_adamw", "apollo_mini", "fira_adamw",
                                  "dct_fira_adamw"])
def test_trains_the_tiny_llama_and_resumes_bit_exactly(name):
    batches = token_batches(12)

    def make(model):
        kwargs = {} if name == "apollo_mini" else {"rank": 8}
        return lo.create_optimizer(model, name, lr=1e-2, update_proj_gap=4, **kwargs)

    model = tiny_llama()
    losses = train(model, make(model), batches)
    assert losses[-1] < losses[0] - 1.0, losses
    resumed, opt, saved = resume_midway(make, tiny_llama, 0, batches, 5)
    full_model = tiny_llama()
    full = make(full_model)
    train(full_model, full, batches)
    for (n, p), q in zip(resumed.named_parameters(), full_model.parameters(), strict=True):
        assert torch.equal(p, q), n
    for sa, sb in zip(opt.state.values(), full.state.values(), strict=True):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(isinstance(v, torch.Tensor) for s in saved["state"].values() for v in s.values())


@pytest.mark.parametrize("name, moments_per_weight", [
    ("apollo_adamw", lambda m, n, r: 2 * r * max(m, n)),
    ("apollo_mini", lambda m, n, r: 2 * max(m, n)),
    ("fira_adamw", lambda m, n, r: 2 * r * max(m, n)),
])
def test_state_bytes_follow_the_papers_formula(name, moments_per_weight):
    """APOLLO: two ``r x max(m, n)`` moments, no stored projection (three int64 + the
    limiter's fp32 norm); Fira: GaLore's state (+ basis ``r x min(m, n)``) and the norm."""
    model = tiny_llama()
    rank = 1 if name == "apollo_mini" else 8
    opt = lo.create_optimizer(model, name, lr=1e-3, rank=rank)
    train(model, opt, token_batches(1))
    projected = [p for g in opt.param_groups if g["rank"] for p in g["params"] if p.dim() == 2]
    plain = [p for g in opt.param_groups for p in g["params"] if p not in set(projected)]
    sb = memory.state_bytes(opt)
    expected = sum(moments_per_weight(*p.shape, rank) for p in projected) * 4
    expected += sum(2 * p.numel() for p in plain) * 4
    assert sb.moments == expected
    bases = 0 if name.startswith("apollo") else sum(rank * min(p.shape) for p in projected) * 4
    assert sb.projectors == bases
    per_weight = 4 + (3 * 8 + 2 * 8 if name.startswith("apollo") else 0)  # limiter + ints
    assert sb.indices + sb.other == (per_weight * len(projected)
                                     + 4 * len([*projected, *plain])  # float step counts
                                     + (8 * len(projected) if name == "fira_adamw" else 0))


@pytest.mark.parametrize("make, match", [
    (lambda p: lo.ApolloAdamW([{"params": p, "rank": 2}], scale_type="row"), "scale_type"),
    (lambda p: lo.ApolloAdamW([{"params": p, "rank": 2}], norm_growth_limit=0.5),
     "norm_growth_limit"),
    (lambda p: lo.ApolloAdamW([{"params": p, "rank": 2}], norm_growth_limit=True),
     "norm_growth_limit"),
    (lambda p: lo.ApolloAdamW([{"params": p, "rank": 2, "proj_type": "full"}]), "proj_type"),
    (lambda p: lo.ApolloAdamW([{"params": p, "rank": 2}], proj_seed=-1), "proj_seed"),
    (lambda p: lo.ApolloAdamW([{"params": p, "rank": 99}]), "rank=99"),
    (lambda p: lo.FiraAdamW([{"params": p, "rank": 2, "proj_type": "full"}]), "proj_type"),
    (lambda p: lo.DCTFiraAdamW([{"params": p, "rank": 2, "error_feedback": True}]),
     "error_feedback"),
    (lambda p: lo.FiraAdamW([{"params": p, "rank": 2}], lr=-1.0), "lr"),
])
def test_bad_settings_raise_naming_the_key(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.nn.Parameter(torch.randn(8, 6))])


def test_create_optimizer_defaults_and_layerwise_equality():
    """apollo_mini defaults to rank 1 and sqrt(128); layer-wise steps (with gradient
    accumulation: full gradients are accumulated, since APOLLO scales each full gradient)
    equal the regular ones."""
    model = tiny_llama()
    opt = lo.create_optimizer(model, "apollo_mini", lr=1e-2)
    projected = [g for g in opt.param_groups if g["rank"]]
    assert projected[0]["rank"] == 1 and projected[0]["scale"] == pytest.approx(math.sqrt(128))
    for name in ("apollo_adamw", "fira_adamw"):
        batches = token_batches(4, batch=4)
        regular_model, layer_model = tiny_llama(), tiny_llama()
        regular = lo.create_optimizer(regular_model, name, lr=1e-2, rank=8, update_proj_gap=2)
        for ids in batches:
            regular.zero_grad()
            for half in ids.chunk(2):
                (regular_model(input_ids=half, labels=half).loss / 2).backward()
            regular.step()
        _layer = lo.LayerwiseOptimizer(  # steps the parameters from the backward hooks
            lo.create_optimizer(layer_model, name, lr=1e-2, rank=8, update_proj_gap=2),
            gradient_accumulation_steps=2)
        for ids in batches:
            for half in ids.chunk(2):
                (layer_model(input_ids=half, labels=half).loss / 2).backward()
        for (n, a), b in zip(regular_model.named_parameters(), layer_model.parameters(),
                             strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"{name} {n}")


DDP_NAMES = ["apollo_adamw", "apollo_mini", "fira_adamw", "dct_fira_adamw"]


def _ddp_kwargs(name):
    return dict(lr=1e-2, update_proj_gap=2, **({} if name == "apollo_mini" else {"rank": 8}))


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    init_gloo(rank, world, port)
    for name in DDP_NAMES:
        model = tiny_llama()
        ddp = DistributedDataParallel(model)
        opt = lo.create_optimizer(model, name, **_ddp_kwargs(name))
        torch.save(record_steps(ddp, opt, rank, steps=4), f"{out}/{name}-{rank}.pt")
    dist.destroy_process_group()


def test_ddp_ranks_agree_and_equal_one_process(tmp_path):
    """Two gloo ranks, each half of the batch: the replicas stay identical (APOLLO's draws
    come from the same seeds on every rank, Fira's refreshes from the same all-reduced
    gradient) and equal one process stepping the recorded all-reduced gradients."""
    spawn_two(_ddp_worker, tmp_path)
    for name in DDP_NAMES:
        r0, r1 = (torch.load(tmp_path / f"{name}-{r}.pt") for r in (0, 1))
        for a, b in zip(r0["params"], r1["params"], strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a), name
        model = tiny_llama()
        # APOLLO's draws and scalings are bit-identical; the SVD / DCT GEMMs of the replay run
        # with this process's thread count (1 in the ranks): rounding-level differences
        atol = 0 if name.startswith("apollo") else 2e-6
        replay_recorded_steps(model, lo.create_optimizer(model, name, **_ddp_kwargs(name)), r0,
                              name, atol=atol)
