"""A new inner rule is one class and a registry line (the rule contract of issue 13).

``Lion`` below (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms": the sign of
an interpolated momentum) is written here, inside the test suite, against the public
:class:`lowrank_optim.rules.Rule` contract only: it declares its one moment and its
capabilities, implements ``update`` on plain tensors, and ``register_rule`` makes
``galore_lion`` / ``dct_lion``.  Everything else comes from the declarations: SVD and DCT
projection, DCT moment rotation, 8-bit state, memory accounting, resume, FSDP2 shards.
References: the update written out by hand (full-size and in a fixed SVD subspace).
"""

from __future__ import annotations

import os

import pytest
import torch

import lowrank_optim as lo
from lowrank_optim import distributed, memory
from lowrank_optim.distributed import layout
from lowrank_optim.projectors import DCTProjector, SVDProjector
from lowrank_optim.registry import register_rule
from lowrank_optim.rules import Moment, Rule, Update, lowbit
from lowrank_optim.validation import check_betas, check_lr, check_nonneg
from tests.helpers import lm_loss, replay_recorded_steps, roundtrip, tiny_llama, token_batches


class Lion(Rule):
    """``N = sign(b1 M + (1 - b1) G)``, ``M <- b2 M + (1 - b2) G``, decoupled decay first."""

    name = "lion"
    moments = (Moment("exp_avg"),)
    elementwise = True
    bits = (32, 8)
    hyperparameters = ("lr", "betas", "weight_decay", *lowbit.DEFAULTS)
    defaults = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, **lowbit.DEFAULTS}

    def validate(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonneg("weight_decay", group["weight_decay"])
        super().validate(group)

    def update(self, low, state, group, param):
        beta1, beta2 = group["betas"]
        m = state["exp_avg"]
        direction = (m * beta1 + low * (1 - beta1)).sign().to(low.dtype)
        m.mul_(beta2).add_(low.to(m.dtype), alpha=1 - beta2)
        return Update(direction, -group["lr"], decay=group["lr"] * group["weight_decay"],
                      decay_first=True)


NAMES = register_rule(Lion)  # the registry line (at import: spawned workers get it too)


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def _lion_reference(w, grads, lr, betas, wd, basis=None, scale=1.0):
    """Lion by hand, full-size or in the fixed right-side subspace ``basis`` (r x n)."""
    w, m = w.clone(), None
    for g in grads:
        low = g if basis is None else g @ basis.t()
        m = torch.zeros_like(low) if m is None else m
        d = (betas[0] * m + (1 - betas[0]) * low).sign()
        m = betas[1] * m + (1 - betas[1]) * low
        w = w * (1 - lr * wd)
        w = w - lr * scale * (d if basis is None else d @ basis)
    return w


def test_register_rule_adds_a_name_per_projector():
    assert NAMES == ["galore_lion", "dct_lion"] or set(NAMES) <= {"galore_lion", "dct_lion"}
    assert {"galore_lion", "dct_lion"} <= set(lo.available())
    opt = lo.create_optimizer(tiny_llama(), "galore_lion", rank=8, lr=1e-3)
    assert opt.projector_type is SVDProjector and isinstance(opt.rule, Lion)
    assert lo.create_optimizer(tiny_llama(), "dct_lion", rank=8).projector_type is DCTProjector
    with pytest.raises(ValueError, match="takes no argument 'eps'"):
        lo.create_optimizer(tiny_llama(), "galore_lion", rank=8, eps=1e-8)


def test_unprojected_and_svd_projected_steps_equal_the_written_out_update():
    lr, betas, wd = 1e-2, (0.9, 0.99), 0.1
    w0 = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    grads = _grads((16, 8), 4)
    cls = lo.registry.OPTIMIZERS["galore_lion"]
    for rank in (None, 4):
        w = torch.nn.Parameter(w0.clone())
        opt = cls([{"params": [w], "rank": rank, "update_proj_gap": 100, "scale": 0.5}],
                  lr=lr, betas=betas, weight_decay=wd)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        basis = None
        if rank:  # the subspace is the first gradient's top right singular vectors
            basis = torch.linalg.svd(grads[0], full_matrices=False)[2][:rank]
        want = _lion_reference(w0, grads, lr, betas, wd, basis, 0.5 if rank else 1.0)
        torch.testing.assert_close(w.detach(), want, rtol=0, atol=1e-6)


def test_dct_rotation_maps_the_new_rule_moment():
    """On a new selection the projector asks the rule to rotate its declared moment: kept
    frequencies move to their new slot, new ones start at zero."""
    proj, rule = DCTProjector(), Lion()
    group = {"rank": 3, "proj_type": "std", "score_route": "matmul", "rotate_moments": True}
    q = lo.projectors.dct_matrix(12)

    def grad_on(freqs):  # a 20 x 12 gradient spanned by DCT frequencies ``freqs``
        coeffs = torch.zeros(20, 12)
        coeffs[:, freqs] = torch.arange(1.0, 4.0) * 10
        return coeffs @ q

    state = {}
    proj.refresh(grad_on([2, 5, 8]), state, group, rule)
    m = torch.randn(20, 3)
    state["exp_avg"] = m.clone()
    proj.refresh(grad_on([5, 8, 11]), state, group, rule)
    assert state["proj_idx"].tolist() == [5, 8, 11]
    assert torch.equal(state["exp_avg"][:, :2], m[:, 1:]) and not state["exp_avg"][:, 2].any()


def test_8bit_state_accounting_and_bit_exact_resume():
    cls = lo.registry.OPTIMIZERS["galore_lion"]
    runs = {}
    for bits in (32, 8):
        w = torch.nn.Parameter(torch.randn(64, 32, generator=torch.Generator().manual_seed(2)))
        opt = cls([{"params": [w], "rank": 16}], lr=1e-3, bits=bits, min_8bit_size=0,
                  block_size=64)
        for g in _grads((64, 32), 3):
            w.grad = g
            opt.step()
        runs[bits] = (w.detach().clone(), opt)
    state8 = runs[8][1].state[next(iter(runs[8][1].state))]
    assert state8["exp_avg_codes"].dtype == torch.uint8 and "exp_avg" not in state8
    # sign updates: the 8-bit run moves like the 32-bit one up to a few flipped signs
    moved = (runs[8][0] - runs[32][0]).abs().max()
    assert moved <= 3 * 3e-3 * 1.0 + 1e-6, moved
    m32, m8 = (memory.state_bytes(runs[b][1]) for b in (32, 8))
    assert m32.moments == 64 * 16 * 4 and m8.moments == 64 * 16 + 4 * 16
    assert m8.projectors == m32.projectors == 16 * 32 * 4

    model = tiny_llama()
    make = lambda m: lo.create_optimizer(m, "dct_lion", rank=8, lr=1e-3, bits=8,  # noqa: E731
                                         min_8bit_size=0)
    opt = make(model)
    batches = token_batches(4)
    for ids in batches[:2]:
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()
    sd, msd = roundtrip(opt.state_dict()), roundtrip(model.state_dict())
    other = tiny_llama(seed=9)
    other.load_state_dict(msd)
    resumed = make(other)
    resumed.load_state_dict(sd)
    for m_, o_ in ((model, opt), (other, resumed)):
        for ids in batches[2:]:
            o_.zero_grad()
            lm_loss(m_, ids).backward()
            o_.step()
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_declared_capabilities_decide_what_fsdp2_and_bits_accept():
    class NotElementwise(Lion):
        name = "lion_global"
        elementwise = False
        bits = (32,)

    cls = lo.optim.compose(NotElementwise, SVDProjector)
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = cls([{"params": [w], "rank": 2}])
    problem = layout.fsdp2_problem(opt, opt.param_groups[0], True)
    assert "inner rule 'lion_global' is not elementwise" in problem
    assert "not under FSDP2" in distributed.engine_support(opt)
    with pytest.raises(ValueError, match="supports 32-bit state"):
        cls([{"params": [w], "rank": 2}], bits=8)
    lion = lo.registry.OPTIMIZERS["galore_lion"]([{"params": [w], "rank": 2}])
    assert layout.fsdp2_problem(lion, lion.param_groups[0], True) is None


def _fsdp_lion_worker(rank, world, port, out):
    from tests.helpers import init_gloo, record_steps
    from tests.test_recipe_engines import _fsdp_model

    init_gloo(rank, world, port)
    model = _fsdp_model()
    opt = lo.create_optimizer(model, "galore_lion", rank=8, update_proj_gap=2, lr=1e-3)
    record = record_steps(model, opt, rank, gather=lambda t: t.full_tensor())
    if rank == 0:
        torch.save(record, os.path.join(out, "lion.pt"))
    torch.distributed.destroy_process_group()


def test_fsdp2_shards_step_the_new_rule_like_one_process(tmp_path):
    from tests.helpers import spawn_two

    spawn_two(_fsdp_lion_worker, tmp_path)
    rec = torch.load(tmp_path / "lion.pt")
    model = tiny_llama()
    opt = lo.create_optimizer(model, "galore_lion", rank=8, update_proj_gap=2, lr=1e-3)
    replay_recorded_steps(model, opt, rec, "galore_lion")
