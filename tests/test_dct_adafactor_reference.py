"""DCTAdafactor against an independently written loop.

The reference is written from the papers, not from the library: Adafactor as in Shazeer &
Stern (2018) / ``transformers.Adafactor`` (relative step, parameter scale, factored second
moment ``R C / sum(R)`` for matrices, update clipping, optional first moment, decay before the
update), applied inside the DCT subspace of Modoranu et al. (2025) (``S = G B`` on the right or
``B^T G`` on the left, ``B`` the DCT-II basis with vectors as columns from scipy, top-r columns
by l2 norm, back-projection by ``B_I``) with the moments re-expressed on a refresh by the
paper's ``R_rot = B[:, old]^T B[:, new]`` (rounded: it is a 0/1 matrix for an orthonormal
basis): the first moment and the factored statistic that keeps the rank axis are rotated, the
statistic that averages the rank axis away is not.
"""

import math

import numpy as np
import pytest
import scipy.fft
import torch

import lowrank_optim as lo
from tests.test_dct_optim import _grads, _params  # right, left, 1-D: the DCT-AdamW loop's


def _rms(x):
    return x.pow(2).mean().sqrt()


def _adafactor_direction(st, grad, t, hp):
    """One Adafactor second-moment update on ``grad`` (any shape); returns the clipped
    direction (before the learning rate)."""
    beta2 = 1 - t ** hp["decay_rate"]
    sq = grad * grad + hp["eps"][0]
    if grad.dim() == 2:
        st["R"] = beta2 * st.get("R", torch.zeros(grad.shape[0])) + (1 - beta2) * sq.mean(1)
        st["C"] = beta2 * st.get("C", torch.zeros(grad.shape[1])) + (1 - beta2) * sq.mean(0)
        v_hat = torch.outer(st["R"], st["C"]) / st["R"].mean()
    else:
        st["V"] = beta2 * st.get("V", torch.zeros_like(grad)) + (1 - beta2) * sq
        v_hat = st["V"]
    u = grad / v_hat.sqrt()
    return u / max(1.0, float(_rms(u)) / hp["clip_threshold"])


def _learning_rate(p, t, hp):
    if hp["relative_step"]:
        rho = min(1e-6 * t if hp["warmup_init"] else 1e-2, 1 / math.sqrt(t))
    else:
        rho = hp["lr"]
    return max(hp["eps"][1], float(_rms(p))) * rho if hp["scale_parameter"] else rho


def _reference_dct_adafactor(params, grads, *, rank, scale, gap, rotate, **hp):
    states = [{} for _ in params]
    for t, step_grads in enumerate(grads, start=1):
        for p, g, st in zip(params, step_grads, states, strict=True):
            with torch.no_grad():
                lr = _learning_rate(p, t, hp)
                if p.dim() == 1:
                    low, back = g, (lambda u: u)
                else:
                    right = p.shape[0] >= p.shape[1]
                    n = p.shape[1] if right else p.shape[0]
                    B = torch.from_numpy(
                        scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0).T)  # columns
                    S = (g.double() @ B if right else B.t() @ g.double()).float()
                    if (t - 1) % gap == 0:
                        scores = S.norm(dim=0 if right else 1)
                        new = torch.topk(scores, rank).indices.sort().values
                        if rotate and "idx" in st:
                            rot = (B[:, st["idx"]].t() @ B[:, new]).round().float()
                            if "M" in st:
                                st["M"] = st["M"] @ rot if right else rot.t() @ st["M"]
                            key = "C" if right else "R"  # the statistic over the rank axis
                            st[key] = st[key] @ rot
                        st["idx"] = new
                    Bi = B[:, st["idx"]].float()
                    low = S[:, st["idx"]] if right else S[st["idx"]]

                    def back(u, Bi=Bi, right=right):
                        return u @ Bi.t() if right else Bi @ u
                u = _adafactor_direction(st, low, t, hp) * lr
                if hp["beta1"] is not None:
                    st["M"] = hp["beta1"] * st.get("M", torch.zeros_like(u)) + (
                        1 - hp["beta1"]) * u
                    u = st["M"]
                if hp["weight_decay"]:
                    p.mul_(1 - hp["weight_decay"] * lr)
                p.sub_(back(u) * (scale if p.dim() == 2 else 1.0))


ADAFACTOR = dict(lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                 weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False)
CASES = {
    "defaults": dict(),  # relative step, no first moment, refresh every step, rotation
    "beta1_fixed_lr_decay": dict(beta1=0.9, lr=3e-2, relative_step=False, weight_decay=0.1),
    "beta1_gap3": dict(beta1=0.9, update_proj_gap=3),
    "no_rotation": dict(beta1=0.9, rotate_moments=False),
    "warmup_no_param_scale": dict(warmup_init=True, scale_parameter=False, clip_threshold=0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dct_adafactor_matches_independent_loop(case):
    opts = {**CASES[case]}
    gap = opts.pop("update_proj_gap", 1)
    rotate = opts.pop("rotate_moments", True)
    hp = {**ADAFACTOR, **opts}
    ours, ref = _params(), _params()
    opt = lo.DCTAdafactor([{"params": ours, "rank": 4, "scale": 0.5}], update_proj_gap=gap,
                          rotate_moments=rotate, score_route="matmul", **opts)
    grads = _grads(10)
    changed = 0
    for step_grads in grads:
        before = {id(p): opt.state[p]["proj_idx"].clone() for p in ours[:2] if opt.state[p]}
        for p, g in zip(ours, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
        changed += sum(not torch.equal(before[id(p)], opt.state[p]["proj_idx"])
                       for p in ours[:2] if id(p) in before)
    _reference_dct_adafactor(ref, grads, rank=4, scale=0.5, gap=gap, rotate=rotate, **hp)
    # compare the changes (the warm-up case moves by ~1e-5 only)
    for p, q, p0 in zip(ours, ref, _params(), strict=True):
        ours_delta, ref_delta = (p.detach() - p0.detach()), (q.detach() - p0.detach())
        assert float(ref_delta.abs().max()) > 1e-6, "parameters did not move: vacuous"
        torch.testing.assert_close(ours_delta, ref_delta, rtol=1e-4,
                                   atol=1e-4 * float(ref_delta.abs().max()))
    assert changed > 0, "the selection never changed: rotation was not exercised"
