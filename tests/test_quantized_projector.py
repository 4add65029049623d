"""Quantised GaLore bases (``proj_bits`` 8 / 4, the Q-GaLore idea) and the 4-bit block-wise
codes they use: codes against their documented construction, bytes, training, energy, resume,
structure and validation."""

import functools
import math
import os

import numpy as np
import pytest
import torch

import lowrank_optim as lo
from lowrank_optim import distributed, kernels
from lowrank_optim.kernels import blockwise
from lowrank_optim.profile import profile
from lowrank_optim.projectors import fast_svd, quantized
from lowrank_optim.projectors.svd import SVDProjector
from tests.helpers import (
    assert_same_training_state,
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

BITS = (8, 4)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- 4-bit codes -------------------------------------------------------------------------------
def _spec_table4(code: str, signed: bool) -> np.ndarray:
    """The 16 entries as the module docstring describes them (numpy, float64)."""
    if code == "linear":
        return np.append(np.arange(-7, 8) / 7.0, 1.0) if signed else np.arange(16) / 15.0
    counts = [1, 2, 4] if signed else [1, 2, 4, 8]
    pos = []
    for d, n in enumerate(counts):
        scale = 10.0 ** (d - len(counts) + 1)
        pos += [scale * (0.1 + 0.9 * j / n) for j in range(1, n + 1)]
    pos = np.array(sorted(pos))
    return np.concatenate([-pos[::-1], [0.0], pos, [1.0]]) if signed else np.append(0.0, pos)


@pytest.mark.parametrize("code", blockwise.CODES)
@pytest.mark.parametrize("signed", [True, False])
def test_4bit_tables_follow_the_documented_construction(code, signed):
    got = blockwise.table(code, signed, bits=4)
    assert got.shape == (16,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), _spec_table4(code, signed), rtol=0, atol=1e-7)
    assert blockwise.table(code, signed).numel() == 256  # the 8-bit tables are untouched


@pytest.mark.parametrize("code", blockwise.CODES)
@pytest.mark.parametrize("shape", [(37, 10), (5, 7), (300,)])
def test_4bit_codes_are_the_nearest_entry_within_the_bound(code, shape):
    """Each element is stored as the nearest table entry of ``x / absmax`` (brute force), so
    within :func:`error_bound` of ``x``; the codes use ``ceil(n / 2)`` bytes per row."""
    x = torch.randn(shape, generator=_gen(1)) * torch.logspace(-3, 0, shape[-1])
    packed, absmax = blockwise.quantize_4bit(x, 64, code, True)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], math.ceil(shape[-1] / 2))
    back = blockwise.dequantize_4bit(packed, absmax, shape, 64, code, True)
    scale = absmax.repeat_interleave(64)[: x.numel()].view(shape)
    values = blockwise.table(code, True, bits=4).double()
    nearest = (x.double() / scale.double()).unsqueeze(-1).sub(values).abs().amin(-1)
    err = (back.double() / scale.double() - x.double() / scale.double()).abs()
    assert torch.all(err <= nearest + 1e-6)
    assert torch.all((back - x).abs() <= blockwise.error_bound(x, scale, code, True, bits=4))


def test_4bit_error_bound_and_bytes_against_8bit():
    """Linear tables: half a step, absmax / 14 at 4 bits and absmax / 254 at 8; on Gaussian
    blocks the 4-bit relative RMS error is about 18 times the 8-bit one, for half the codes."""
    x = torch.randn(64, 96, generator=_gen(2))
    c8, a8 = blockwise.quantize(x, 256, "linear", True)
    c4, a4 = blockwise.quantize_4bit(x, 256, "linear", True)
    assert torch.equal(a8, a4)  # same blocks, same scales
    scale = a8.repeat_interleave(256).view(x.shape)
    e8 = (blockwise.dequantize(c8, a8, 256, "linear", True) - x).abs()
    e4 = (blockwise.dequantize_4bit(c4, a4, x.shape, 256, "linear", True) - x).abs()
    assert torch.all(e8 <= scale / 254 * (1 + 1e-5)) and torch.all(e4 <= scale / 14 * (1 + 1e-5))
    ratio = float(e4.norm() / e8.norm())
    assert 14 < ratio < 22, ratio
    assert c4.numel() + 4 * a4.numel() == blockwise.nbytes_4bit(x.shape, 256) == 64 * 48 + 4 * 24
    assert c8.numel() + 4 * a8.numel() == blockwise.nbytes(x.numel(), 256) == 64 * 96 + 4 * 24
    assert blockwise.nbytes_4bit((3, 5), 4) == 3 * 3 + 4 * 4  # odd rows: ceil(5 / 2) bytes


def test_4bit_zero_block_meta_and_dispatch():
    zero = torch.zeros(4, 6)
    packed, absmax = kernels.quantize_blockwise_4bit(zero, 8, "linear", True)
    assert torch.equal(absmax, torch.zeros(3))
    assert torch.equal(kernels.dequantize_blockwise_4bit(packed, absmax, (4, 6), 8, "linear"),
                       zero)
    x = torch.randn(9, 4, generator=_gen(3))
    same = blockwise.quantize_4bit(x, 8, "dynamic", True)
    for a, b in zip(kernels.quantize_blockwise_4bit(x, 8), same, strict=True):
        assert torch.equal(a, b)
    meta = torch.empty(100, 33, device="meta")
    packed, absmax = kernels.quantize_blockwise_4bit(meta, 256)
    assert packed.is_meta and packed.shape == (100, 17) and absmax.shape == (13,)
    assert kernels.dequantize_blockwise_4bit(packed, absmax, (100, 33)).shape == (100, 33)
    with pytest.raises(ValueError, match="do not hold a tensor of shape"):
        blockwise.dequantize_4bit(packed, absmax, (100, 35))
    with pytest.raises(ValueError, match="bits=5"):
        blockwise.table("linear", True, bits=5)


# -- the projector -----------------------------------------------------------------------------
def _make(bits=None, method="exact", **kw):
    """An optimizer factory: GaLore AdamW, rank 8, a refresh every 5 steps (``bits=None``:
    no ``proj_bits`` key at all)."""
    extra = {} if bits is None else {"proj_bits": bits}
    return lambda model: lo.create_optimizer(model, "galore_adamw", rank=8, update_proj_gap=5,
                                             lr=3e-3, svd_method=method, **extra, **kw)


def test_proj_bits_32_is_the_default_bit_for_bit():
    batches = token_batches(7, seed=4)
    runs = []
    for bits in (None, 32):
        model = tiny_llama(seed=3)
        opt = _make(bits, proj_type="full")(model)
        train(model, opt, batches)
        runs.append((model, opt))
    assert_same_training_state(*runs[0], *runs[1])
    state = next(iter(runs[1][1].state.values()))
    assert not any(k.endswith(("_codes", "_absmax")) for k in state)


def _expected_projector_bytes(opt, bits):
    """Codes + 4 bytes per block of each projected weight's ``(size, rank)`` basis."""
    total = 0
    for _, p, group in opt.projected_params():
        for side in opt.projector.sides(tuple(p.shape), group):
            size = p.shape[0] if side == "left" else p.shape[1]
            codes = size * (group["rank"] if bits == 8 else math.ceil(group["rank"] / 2))
            total += codes + 4 * math.ceil(size * group["rank"] / group["proj_block_size"])
    return total


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_state_holds_codes_counted_as_projector_bytes(bits, proj_type):
    model = tiny_llama(seed=0)
    opt = _make(bits, proj_type=proj_type, proj_block_size=64)(model)
    train(model, opt, token_batches(1))
    for _, p, group in opt.projected_params():
        state = opt.state[p]
        assert "proj_left" not in state and "proj_right" not in state
        for side in opt.projector.sides(tuple(p.shape), group):
            assert state[f"proj_{side}_codes"].dtype == torch.uint8
            assert state[f"proj_{side}_absmax"].dtype == torch.float32
        assert opt.projector.has_subspace(state)
    used = lo.memory.state_bytes(opt)
    assert used.projectors == _expected_projector_bytes(opt, bits)
    fp32 = lo.memory.state_bytes(_trained(None, proj_type))
    assert used.moments == fp32.moments and used.other == fp32.other
    assert used.projectors < fp32.projectors * (0.3 if bits == 8 else 0.2)
    # DDP digests cover the codes (the projector's declared subspace keys)
    assert any(t.dtype == torch.uint8 for t in distributed.subspace_tensors(opt))


def _trained(bits, proj_type="std"):
    model = tiny_llama(seed=0)
    opt = _make(bits, proj_type=proj_type)(model)
    train(model, opt, token_batches(1))
    return opt


@functools.cache
def _final_loss(bits):
    """(mean of the last 8 losses, first loss) of 40 steps, a refresh every 10."""
    model = tiny_llama(seed=1)
    opt = lo.create_optimizer(model, "galore_adamw", rank=8, update_proj_gap=10, lr=3e-3,
                              **({} if bits is None else {"proj_bits": bits}))
    losses = train(model, opt, token_batches(40, seed=2))
    return sum(losses[-8:]) / 8, losses[0]


@pytest.mark.parametrize("bits", BITS)
def test_tiny_llama_trains_as_with_fp32_bases(bits):
    """The last losses stay within a few percent of fp32 bases' (and well below the first)."""
    fp32, first = _final_loss(None)
    low, _ = _final_loss(bits)
    assert low < first - 0.5
    assert abs(low - fp32) < 0.03 * fp32, (bits, low, fp32)


def test_captured_energy_of_dequantised_bases_on_tiny_llama_gradients():
    """For every projected weight of the tiny LLaMA after 12 steps, the captured energy
    ``||P'(G)||^2 / ||G||^2`` of the dequantised basis ``B'`` against the fp32 basis ``B``'s
    ``e``: rigorously ``|sqrt(e') - sqrt(e)| <= eps (2 + eps)`` with ``eps = ||B' - B||_2``
    (``P' - P = B'^T B' - B^T B`` has norm at most ``eps (2 + eps)``), and on these gradients
    within 0.5% (8 bits) and 8% (4 bits) of ``e`` (``B'`` is not exactly orthonormal, so ``e'``
    may exceed ``e``)."""
    model = tiny_llama(seed=1)
    opt = lo.create_optimizer(model, "galore_adamw", rank=8, update_proj_gap=10, lr=3e-3)
    train(model, opt, token_batches(12, seed=2))
    proj = SVDProjector()
    worst = {8: 0.0, 4: 0.0}
    for _, p, group in opt.projected_params():
        exact = {}
        proj.refresh(p.grad, exact, group, None)
        e = float(proj.captured_energy(p.grad, exact, group))
        for bits in BITS:
            quant_group = {**group, "proj_bits": bits}
            state = {}
            proj.refresh(p.grad, state, quant_group, None)
            e_q = float(proj.captured_energy(p.grad, state, quant_group))
            for side in proj.held(state):
                eps = float(torch.linalg.matrix_norm(
                    proj.side_basis(state, side, quant_group) - exact[f"proj_{side}"], ord=2))
                assert abs(math.sqrt(e_q) - math.sqrt(e)) <= eps * (2 + eps) + 1e-6
            worst[bits] = max(worst[bits], abs(e_q / e - 1))
    assert worst[8] < 0.005 and worst[4] < 0.08, worst


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", ["exact", "warm"])
def test_resume_from_weights_only_checkpoint_is_bit_exact(bits, method):
    batches = token_batches(12, seed=5)
    make = _make(bits, method)
    model, opt, saved = resume_midway(make, tiny_llama, 0, batches, split=7)
    ref_model = tiny_llama(0)
    ref_opt = make(ref_model)
    train(ref_model, ref_opt, batches)
    assert_same_training_state(model, opt, ref_model, ref_opt)
    codes = [v for s in saved["state"].values() for k, v in s.items() if k.endswith("_codes")]
    assert len(codes) == 14 and all(c.dtype == torch.uint8 for c in codes)


def test_warm_refresh_starts_from_the_dequantised_basis(monkeypatch):
    starts = []
    real = fast_svd.warm_bases
    monkeypatch.setattr(fast_svd, "warm_bases",
                        lambda g, previous, iters: starts.append(previous) or real(g, previous,
                                                                                     iters))
    w = torch.nn.Parameter(torch.randn(48, 32, generator=_gen(6)))
    opt = lo.GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 2}], lr=1e-2,
                         svd_method="warm", proj_bits=4)
    held = []
    for t in range(3):  # refreshes at 0 (exact) and 2 (warm)
        w.grad = torch.randn(48, 32, generator=_gen(10 + t))
        if t == 2:
            held.append(opt.projector.side_basis(opt.state[w], "right", opt.param_groups[0]))
        opt.step()
    assert len(starts) == 1 and torch.equal(starts[0]["right"], held[0])
    assert starts[0]["right"].dtype == torch.float32 and starts[0]["right"].shape == (4, 32)


@pytest.mark.parametrize("saved, loaded, needle", [
    (dict(bits=8), dict(bits=4), "proj_bits: saved 8, this optimizer 4"),
    (dict(bits=8), dict(), "proj_bits: saved 8, this optimizer 32"),
    (dict(), dict(bits=8), "proj_bits: saved 32, this optimizer 8"),
    (dict(bits=4), dict(bits=4, proj_block_size=128), "proj_block_size: saved 256"),
])
def test_a_state_of_other_proj_bits_is_refused(saved, loaded, needle):
    model = tiny_llama()
    opt = _make(**saved)(model)
    train(model, opt, token_batches(1))
    sd = roundtrip(opt.state_dict())
    other = _make(**loaded)(tiny_llama())
    with pytest.raises(ValueError, match=needle):
        other.load_state_dict(sd)
    assert not other.state


def test_codes_of_other_settings_raise_naming_the_keys():
    w = torch.nn.Parameter(torch.randn(40, 24, generator=_gen(7)))
    opt = lo.GaLoreAdamW([{"params": [w], "rank": 4}], lr=1e-2, proj_bits=4)
    w.grad = torch.randn(40, 24, generator=_gen(8))
    opt.step()
    opt.param_groups[0]["proj_block_size"] = 32  # changed behind the optimizer's back
    with pytest.raises(ValueError, match="proj_bits / proj_block_size"):
        opt.step()


@pytest.mark.parametrize("bad, needle", [
    (dict(proj_bits=16), "proj_bits=16"), (dict(proj_bits=8.0), "proj_bits=8.0"),
    (dict(proj_bits=True), "proj_bits=True"), (dict(proj_bits="8"), "proj_bits='8'"),
    (dict(proj_block_size=0), "proj_block_size=0"),
])
def test_bad_settings_name_the_key(bad, needle):
    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=needle):
        lo.GaLoreAdamW([{"params": [w], "rank": 4}], **bad)


def test_the_other_galore_classes_take_the_keys():
    w = torch.nn.Parameter(torch.randn(64, 64))
    for cls, kw in ((lo.GaLoreAdamW8bit, {}), (lo.GaLoreAdafactor, dict(lr=1e-2,
                                                                       relative_step=False))):
        opt = cls([{"params": [w], "rank": 8}], proj_bits=4, proj_block_size=128, **kw)
        assert opt.param_groups[0]["proj_bits"] == 4
        w.grad = torch.randn(64, 64, generator=_gen(9))
        opt.step()
        assert "proj_right_codes" in opt.state[w]
        opt.state.clear()


def test_diagnostics_and_bf16_weights():
    """Overlap tracking and captured energy read the codes; bf16 weights get a bf16 basis."""
    w = torch.nn.Parameter(torch.randn(48, 32, generator=_gen(11)).bfloat16())
    opt = lo.GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 1}], lr=1e-2,
                         proj_bits=8)
    opt.track_subspace_overlap()
    g = torch.randn(48, 32, generator=_gen(12)).bfloat16()
    for _ in range(2):  # the same gradient twice: the same subspace
        w.grad = g.clone()
        opt.step()
    stats = opt.subspace_stats()[0]
    assert stats["overlap"] == pytest.approx(1.0, abs=1e-3)
    assert 0.1 < stats["captured_energy"] < 1.05
    assert w.dtype == torch.bfloat16 and torch.isfinite(w.float()).all()


@pytest.mark.parametrize("bits", BITS)
def test_analytic_profile_equals_measured_state_bytes(bits):
    settings = dict(rank=8, opt_args={"proj_bits": bits}, precision="fp32", seq_len=16)
    analytic = profile("tiny", "galore_adamw", **settings)
    measured = profile("tiny", "galore_adamw", mode="measured", device="cpu", steps=1,
                       **settings)
    for key in ("moments", "projectors", "indices", "other_state"):
        assert getattr(analytic, key) == getattr(measured, key), key
    fp32 = profile("tiny", "galore_adamw", rank=8, precision="fp32", seq_len=16)
    assert analytic.projectors < fp32.projectors / (3.5 if bits == 8 else 6.5)


def test_declared_keys():
    proj = SVDProjector()
    assert proj.structure_keys["proj_bits"] == 32
    assert proj.structure_keys["proj_block_size"] == 256
    for side in ("left", "right"):
        for key in (f"proj_{side}", f"proj_{side}_codes", f"proj_{side}_absmax"):
            assert proj.subspace_keys[key] == "projectors"
    assert quantized.nbytes((40, 8), 4, 256) == 40 * 4 + 4 * 2


# -- FSDP2: quantised bases are replicated, so row shards project with them --------------------
def _fsdp_worker(rank, world, port, out):
    from torch.distributed.fsdp import fully_shard

    init_gloo(rank, world, port)
    model = tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = lo.create_optimizer(model, "galore_adamw", rank=8, update_proj_gap=2, lr=1e-3,
                              proj_bits=4)
    record = record_steps(model, opt, rank, gather=lambda t: t.full_tensor())
    if rank == 0:
        codes = [k for st in opt.state.values() for k, v in st.items()
                 if k.endswith("_codes") and not distributed.is_dtensor(v)]
        torch.save({**record, "codes": len(codes)}, os.path.join(out, "q.pt"))
    torch.distributed.destroy_process_group()


def test_fsdp2_shards_step_quantised_bases_like_one_process(tmp_path):
    spawn_two(_fsdp_worker, tmp_path)
    rec = torch.load(tmp_path / "q.pt")
    model = tiny_llama()
    opt = lo.create_optimizer(model, "galore_adamw", rank=8, update_proj_gap=2, lr=1e-3,
                              proj_bits=4)
    assert rec["codes"] == 14  # every projected weight's basis: replicated codes
    replay_recorded_steps(model, opt, rec, "proj_bits=4")
