"""DCT error feedback kept in 8 or 4 bits (``error_feedback_bits``): bytes, the telescoping sum
up to the rounding, resume, structure, validation and the analytic profile."""

import functools

import pytest
import torch

import lowrank_optim as lo
from lowrank_optim.kernels import blockwise
from lowrank_optim.profile import profile
from lowrank_optim.projectors import quantized
from lowrank_optim.projectors.dct import (
    ERROR_FEEDBACK_BLOCK_SIZE,
    ERROR_FEEDBACK_KEY,
    DCTProjector,
    error_feedback_precision,
)
from lowrank_optim.rules import Adam
from tests.helpers import (
    assert_same_training_state,
    resume_midway,
    roundtrip,
    tiny_llama,
    token_batches,
    train,
)

BITS = (8, 4)
CODES, ABSMAX = ERROR_FEEDBACK_KEY + "_codes", ERROR_FEEDBACK_KEY + "_absmax"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _make(bits=None, **kw):
    """DCT-AdamW with error feedback (``bits=None``: no ``error_feedback_bits`` key)."""
    extra = {} if bits is None else {"error_feedback_bits": bits}
    return lambda model: lo.create_optimizer(model, "dct_adamw", rank=8, lr=3e-3,
                                             error_feedback=True, **extra, **kw)


def _ef_bytes(opt) -> int:
    """Bytes of the error-feedback entries of every parameter's state."""
    keys = (ERROR_FEEDBACK_KEY, CODES, ABSMAX)
    return sum(v.numel() * v.element_size() for s in opt.state.values()
               for k, v in s.items() if k in keys)


def test_bits_32_is_the_default_bit_for_bit():
    batches = token_batches(6, seed=4)
    runs = []
    for bits in (None, 32):
        model = tiny_llama(seed=3)
        opt = _make(bits)(model)
        train(model, opt, batches)
        runs.append((model, opt))
    assert_same_training_state(*runs[0], *runs[1])


@pytest.mark.parametrize("bits", BITS)
def test_residual_bytes_are_codes_plus_scales(bits):
    model = tiny_llama(seed=0)
    opt = _make(bits)(model)
    train(model, opt, token_batches(2))
    expected = 0
    for _, p, _ in opt.projected_params():
        state = opt.state[p]
        assert ERROR_FEEDBACK_KEY not in state and state[CODES].dtype == torch.uint8
        expected += quantized.nbytes(tuple(p.shape), bits, ERROR_FEEDBACK_BLOCK_SIZE)
    assert _ef_bytes(opt) == expected
    full_model = tiny_llama(seed=0)
    full = _make()(full_model)
    train(full_model, full, token_batches(2))
    fp32 = _ef_bytes(full)
    assert fp32 == sum(4 * p.numel() for _, p, _ in opt.projected_params())
    assert expected <= fp32 * (0.26 if bits == 8 else 0.135)  # ~1/4, ~1/8 plus the scales
    # memory accounting counts the codes as "other", like the fp32 buffer
    used, before = lo.memory.state_bytes(opt), lo.memory.state_bytes(full)
    assert used.other - expected == before.other - fp32
    assert (used.moments, used.indices) == (before.moments, before.indices)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_quantised_feedback_telescopes_up_to_the_rounding(bits, shape):
    """``E_k = Q(G_k + E_{k-1} - back(R_k))``, so ``sum back(R_k) + E_K - sum G_k`` is the sum
    of the per-step rounding errors, each within half a table step of its block's absmax
    (linear table: ``absmax / (2 * 7)`` at 4 bits, ``/ (2 * 127)`` at 8)."""
    proj, state = DCTProjector(), {}
    group = {"rank": 3, "proj_type": "std", "error_feedback": True, "error_feedback_bits": bits}
    levels = 7 if bits == 4 else 127
    total = torch.zeros(shape, dtype=torch.float64)
    bound = torch.zeros(shape, dtype=torch.float64)
    for step in range(7):
        grad = torch.randn(shape, generator=_gen(step))
        low = (proj.refresh(grad, state, group, Adam()) if step % 3 == 0
               else proj.project(grad, state, group))
        total += grad.double() - proj.project_back(low, state, group).double()
        scale = state[ABSMAX].repeat_interleave(ERROR_FEEDBACK_BLOCK_SIZE)[: grad.numel()]
        bound += (scale / (2 * levels)).view(shape).double() * (1 + 1e-5) + 1e-6
    err = quantized.load(state, ERROR_FEEDBACK_KEY, shape, error_feedback_precision(group))
    assert err.dtype == torch.float32 and err.abs().max() > 0.1
    assert torch.all((err.double() - total).abs() <= bound)
    # the feedback is doing its work: the unrounded sum alone is far from the stored residual
    assert (total - err.double()).abs().max() < 0.5 * total.abs().max()


@functools.cache
def _final_loss(bits):
    """(mean of the last 8 losses, first loss) of 30 steps of the tiny LLaMA."""
    model = tiny_llama(seed=1)
    losses = train(model, _make(bits)(model), token_batches(30, seed=2))
    return sum(losses[-8:]) / 8, losses[0]


@pytest.mark.parametrize("bits", BITS)
def test_tiny_llama_trains_as_with_fp32_feedback(bits):
    fp32, first = _final_loss(None)
    low, _ = _final_loss(bits)
    assert low < first - 0.5 and abs(low - fp32) < 0.03 * fp32, (bits, low, fp32)


@pytest.mark.parametrize("bits", BITS)
def test_resume_from_weights_only_checkpoint_is_bit_exact(bits):
    batches = token_batches(10, seed=5)
    make = _make(bits)
    model, opt, saved = resume_midway(make, tiny_llama, 0, batches, split=6)
    ref_model = tiny_llama(0)
    ref_opt = make(ref_model)
    train(ref_model, ref_opt, batches)
    assert_same_training_state(model, opt, ref_model, ref_opt)
    assert sum(CODES in s for s in saved["state"].values()) == 14


@pytest.mark.parametrize("saved, loaded, needle", [
    (8, 4, "error_feedback_bits: saved 8, this optimizer 4"),
    (4, None, "error_feedback_bits: saved 4, this optimizer 32"),
])
def test_a_state_of_other_bits_is_refused(saved, loaded, needle):
    model = tiny_llama()
    opt = _make(saved)(model)
    train(model, opt, token_batches(1))
    other = _make(loaded)(tiny_llama())
    with pytest.raises(ValueError, match=needle):
        other.load_state_dict(roundtrip(opt.state_dict()))


@pytest.mark.parametrize("value", [16, 8.0, True, "4"])
def test_bad_bits_name_the_key(value):
    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=f"error_feedback_bits={value!r}"):
        lo.DCTAdamW([{"params": [w], "rank": 4}], error_feedback=True, error_feedback_bits=value)


def test_adafactor_takes_the_key_and_categories_are_other():
    w = torch.nn.Parameter(torch.randn(64, 32))
    opt = lo.DCTAdafactor([{"params": [w], "rank": 4}], error_feedback=True,
                          error_feedback_bits=4, lr=1e-2, relative_step=False)
    w.grad = torch.randn(64, 32, generator=_gen(1))
    opt.step()
    assert opt.state[w][CODES].shape == blockwise.packed_shape((64, 32)) == (64, 16)
    cats = opt.state_categories()
    assert cats[CODES] == cats[ABSMAX] == cats[ERROR_FEEDBACK_KEY] == "other"
    assert DCTProjector.structure_keys["error_feedback_bits"] == 32


@pytest.mark.parametrize("bits", BITS)
def test_analytic_profile_equals_measured_state_bytes(bits):
    settings = dict(rank=8, precision="fp32", seq_len=16,
                    opt_args={"error_feedback": True, "error_feedback_bits": bits})
    analytic = profile("tiny", "dct_adamw", **settings)
    measured = profile("tiny", "dct_adamw", mode="measured", device="cpu", steps=1, **settings)
    for key in ("moments", "projectors", "indices", "other_state"):
        assert getattr(analytic, key) == getattr(measured, key), key
    full = profile("tiny", "dct_adamw", rank=8, precision="fp32", seq_len=16,
                   opt_args={"error_feedback": True})
    assert analytic.other_state < full.other_state / (3.5 if bits == 8 else 6.5)
