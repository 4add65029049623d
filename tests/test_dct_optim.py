"""DCTAdamW / DCTAdafactor: the update against an independent loop, resume, accounting, errors."""

import copy
import io

import numpy as np
import pytest
import scipy.fft
import torch

import lowrank_optim as lo
from lowrank_optim.memory import state_bytes
from lowrank_optim.projectors.dct import ERROR_FEEDBACK_KEY, dct_side
from tests.helpers import tiny_llama, token_batches, train

SHAPES = [(24, 16), (16, 24), (16,)]  # right side, left side, unprojected 1-D


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grads(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]


def _reference_dct_adamw(params, grads, *, rank, lr, betas, eps, weight_decay, scale, gap,
                         rotate, error_feedback, norm):
    """DCT-AdamW written straight from the paper / ALGORITHMS.md section 2, in its own
    orientation: ``B`` has the basis vectors as *columns* (B = DCT-II matrix transposed, from
    scipy), ``S = G B`` (right) or ``B^T G`` (left); ``R_rot = B[:, old]^T B[:, new]`` computed
    by matmul; ``|V R_rot|``; torch-AdamW arithmetic as in the reference package.  Selected
    indices are sorted increasingly (the reference leaves topk's order unspecified)."""
    b1, b2 = betas
    states = [{} for _ in params]
    for t, step_grads in enumerate(grads, start=1):
        bc1, sqrt_bc2 = 1 - b1**t, (1 - b2**t) ** 0.5
        for p, g, st in zip(params, step_grads, states, strict=True):
            with torch.no_grad():
                p.mul_(1 - lr * weight_decay)
                if p.dim() == 1:
                    st.setdefault("m", torch.zeros_like(p)).mul_(b1).add_(g, alpha=1 - b1)
                    st.setdefault("v", torch.zeros_like(p)).mul_(b2).addcmul_(g, g, value=1 - b2)
                    p.add_(st["m"] / (eps * sqrt_bc2 + st["v"].sqrt()), alpha=-lr * sqrt_bc2 / bc1)
                    continue
                right = p.shape[0] >= p.shape[1]
                n = p.shape[1] if right else p.shape[0]
                B64 = torch.from_numpy(scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0).T)
                B = B64.float()
                A = g + st["E"] if "E" in st else g
                if (t - 1) % gap == 0:
                    S = A @ B if right else B.t() @ A
                    scores = S.norm(p=2 if norm == "l2" else 1, dim=0 if right else 1)
                    new = torch.topk(scores, rank).indices.sort().values
                    if rotate and "idx" in st:
                        # in fp64: fp32 rounding of B^T B (~1e-7 off the 0/1 pattern) is
                        # amplified by Adam's normalisation on tiny new coordinates
                        rot = (B64[:, st["idx"]].t() @ B64[:, new]).float()
                        for k in ("m", "v"):
                            st[k] = st[k] @ rot if right else rot.t() @ st[k]
                        st["v"] = st["v"].abs()
                    st["idx"] = new
                    low = S[:, new] if right else S[new]
                else:
                    Bi = B[:, st["idx"]]
                    low = A @ Bi if right else Bi.t() @ A
                Bi = B[:, st["idx"]]
                if error_feedback:
                    st["E"] = A - (low @ Bi.t() if right else Bi @ low)
                st.setdefault("m", torch.zeros_like(low)).mul_(b1).add_(low, alpha=1 - b1)
                st.setdefault("v", torch.zeros_like(low)).mul_(b2).addcmul_(low, low, value=1 - b2)
                u = st["m"] / (eps * sqrt_bc2 + st["v"].sqrt())
                p.add_(u @ Bi.t() if right else Bi @ u, alpha=-lr * sqrt_bc2 / bc1 * scale)


CASES = {
    "defaults": dict(),  # refresh every step, l2 scores, moments rotated
    "reference_defaults": dict(rotate_moments=False, score_norm="l1"),
    "gap3": dict(update_proj_gap=3),
    "error_feedback_no_rotation": dict(error_feedback=True, rotate_moments=False),
    "l1_fft_gap2": dict(score_norm="l1", score_route="fft", update_proj_gap=2),
    "all_options": dict(update_proj_gap=2, rotate_moments=True, error_feedback=True,
                        score_route="fft"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dct_adamw_matches_independent_loop(case):
    opts = CASES[case]
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ours, ref = _params(), _params()
    opt = lo.DCTAdamW([{"params": ours, "rank": 4, "scale": 0.5}], **hp, **opts)
    grads = _grads(12)
    for step_grads in grads:
        for p, g in zip(ours, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    _reference_dct_adamw(
        ref, grads, rank=4, scale=0.5, gap=opts.get("update_proj_gap", 1),
        rotate=opts.get("rotate_moments", True),
        error_feedback=opts.get("error_feedback", False),
        norm=opts.get("score_norm", "l2"), **hp,
    )
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        moved = max(float((p - q).abs().max()) for p, q in zip(ref, _params(), strict=True))
    assert moved > 0.05, "parameters barely moved: the comparison is vacuous"
    assert (ERROR_FEEDBACK_KEY in opt.state[ours[0]]) == opts.get("error_feedback", False)


# -- resume -------------------------------------------------------------------------------
def _groups(model, **kw):
    return lo.param_groups(model, "all-linear", rank=8, **kw)


RESUME = {
    "adamw_defaults": lambda m: lo.DCTAdamW(_groups(m, update_proj_gap=1, scale=1.0), lr=3e-3),
    "adamw_all_options": lambda m: lo.DCTAdamW(
        _groups(m, update_proj_gap=3, scale=0.5), lr=3e-3, weight_decay=0.1,
        rotate_moments=True, error_feedback=True, score_route="fft"),
    "adafactor": lambda m: lo.DCTAdafactor(_groups(m, update_proj_gap=2, scale=1.0),
                                           rotate_moments=True),
}


@pytest.mark.parametrize("name", list(RESUME))
def test_resume_is_bit_exact_with_weights_only_load(name):
    make = RESUME[name]
    batches = token_batches(10, seed=4)
    model = tiny_llama(seed=3)
    opt = make(model)
    train(model, opt, batches[:5])

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    resumed_model = copy.deepcopy(model)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    for state in saved["state"].values():
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    resumed = make(resumed_model)
    resumed.load_state_dict(saved)
    for p in resumed_model.parameters():
        st = resumed.state[p]
        if "proj_idx" in st:
            assert st["proj_idx"].dtype == torch.int32 and st["proj_shape"].dtype == torch.int64
            assert all(not v.is_floating_point() for k, v in st.items() if k.startswith("proj"))

    train(model, opt, batches[5:])
    train(resumed_model, resumed, batches[5:])
    for (name_, p), q in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q), name_
    assert any(not torch.equal(p, q) for p, q in
               zip(model.parameters(), tiny_llama(seed=3).parameters(), strict=True))


# -- memory accounting ------------------------------------------------------------------------
def _one_step(make):
    model = tiny_llama(seed=0)
    opt = make(model)
    train(model, opt, token_batches(1))
    return model, opt


def test_state_bytes_indices_instead_of_float_projectors():
    rank = 8
    model, dct = _one_step(lambda m: lo.DCTAdamW(_groups(m, update_proj_gap=1), lr=1e-3))
    _, galore = _one_step(lambda m: lo.GaLoreAdamW(_groups(m, update_proj_gap=1), lr=1e-3))
    ours, theirs = state_bytes(dct), state_bytes(galore)
    projected = [p for _, p, _ in dct.projected_params()]
    sizes = {dct_side(p.shape)[1] for p in projected}
    assert ours.moments == theirs.moments
    # r int32 indices + the int64 (m, n) shape per layer, nothing else
    assert ours.indices == sum(rank * 4 + 2 * 8 for _ in projected)
    assert ours.other == theirs.other and theirs.indices == 0
    # one shared fp32 basis per distinct size, counted once ...
    assert ours.projectors == sum(n * n * 4 for n in sizes)
    # ... against one r x min(m, n) float projector per layer for GaLore
    assert theirs.projectors == sum(rank * min(p.shape) * 4 for p in projected)
    assert ours.projectors + ours.indices < theirs.projectors
    assert len(dct.projector.shared_buffers()) == len(sizes)


def test_state_bytes_count_only_this_optimizers_bases():
    model = tiny_llama(seed=0)
    wide = [p for n, p in model.named_parameters() if n.endswith("mlp.down_proj.weight")]
    square = [p for n, p in model.named_parameters() if n.endswith("self_attn.q_proj.weight")]
    a = lo.DCTAdamW([{"params": wide, "rank": 4}])
    b = lo.DCTAdamW([{"params": square, "rank": 4}], score_route="fft")
    for p in wide + square:
        p.grad = torch.randn_like(p)
    a.step()
    b.step()
    assert len(a.projector.shared_buffers()) == len(b.projector.shared_buffers()) == 1
    assert state_bytes(a).projectors == state_bytes(b).projectors == 64 * 64 * 4
    assert state_bytes(a).indices == len(wide) * (4 * 4 + 2 * 8)


# -- defaults, registry, fallbacks -------------------------------------------------------------
def test_create_optimizer_uses_dct_defaults():
    model = tiny_llama()
    for name, cls in (("dct_adamw", lo.DCTAdamW), ("dct_adafactor", lo.DCTAdafactor)):
        opt = lo.create_optimizer(model, name, rank=8)
        assert type(opt) is cls and name in lo.available()
        group = opt.param_groups[0]
        assert (group["update_proj_gap"], group["scale"], group["score_norm"]) == (1, 1.0, "l2")
    opt = lo.create_optimizer(model, "dct_adamw", rank=8, update_proj_gap=None, scale=0.5,
                              score_norm="l1")
    group = opt.param_groups[0]
    assert (group["update_proj_gap"], group["scale"], group["score_norm"]) == (None, 0.5, "l1")
    galore = lo.create_optimizer(model, "galore_adamw", rank=8).param_groups[0]
    assert (galore["update_proj_gap"], galore["scale"]) == (200, 0.25)


def test_unprojected_parameters_get_plain_adamw():
    model, opt = _one_step(lambda m: lo.DCTAdamW(_groups(m), lr=1e-3))
    projected = {id(p) for _, p, _ in opt.projected_params()}
    for p in model.parameters():
        st = opt.state[p]
        if id(p) in projected:
            assert st["exp_avg"].shape != p.shape and "proj_idx" in st
        else:  # embeddings, lm_head, norms
            assert st["exp_avg"].shape == p.shape and not any(k.startswith("proj") for k in st)
    assert any("embed" in n for n, p in model.named_parameters() if id(p) not in projected)


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(score_norm="l3"), "score_norm='l3'"),
    (dict(score_route="gpu"), "score_route='gpu'"),
    (dict(proj_type="full"), "proj_type='full'"),
    (dict(rotate_moments="yes"), "rotate_moments='yes'"),
    (dict(error_feedback=None), "error_feedback=None"),
    (dict(update_proj_gap=0), "update_proj_gap=0"),
    (dict(scale=-1.0), "scale=-1.0"),
])
def test_bad_options_raise_value_error_naming_the_option(kwargs, match):
    w = torch.nn.Parameter(torch.randn(24, 16))
    with pytest.raises(ValueError, match=match):
        lo.DCTAdamW([{"params": [w], "rank": 4}], **kwargs)
    with pytest.raises(ValueError, match=match):  # the same check for a group key
        lo.DCTAdafactor([{"params": [w], "rank": 4, **kwargs}])


def test_rank_too_large_names_the_parameter():
    w = torch.nn.Parameter(torch.randn(24, 16))
    with pytest.raises(ValueError, match=r"attn\.w .*rank=17 exceeds min\(m, n\)=16"):
        lo.DCTAdamW([{"params": [w], "param_names": ["attn.w"], "rank": 17}])
    with pytest.raises(ValueError, match="rank=0"):
        lo.DCTAdamW([{"params": [w], "rank": 0}])
