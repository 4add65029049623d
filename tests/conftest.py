import io
import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one BLAS thread per xdist worker: the workers already fill the cores, and oversubscribed
# OpenMP threads spin at barriers (an SVD then runs up to 50x slower)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


def tiny_llama(seed: int = 0, **overrides):
    from lowrank_optim.model_configs import build_llama

    return build_llama("tiny", seed=seed, **overrides)


def token_batches(n: int, batch: int = 4, seq: int = 32, vocab: int = 256, seed: int = 0):
    """Deterministic token batches with learnable structure (repeating random motifs)."""
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randint(0, vocab, (8, 8), generator=g)
    out = []
    for _ in range(n):
        idx = torch.randint(0, 8, (batch, seq // 8), generator=g)
        out.append(motifs[idx].reshape(batch, seq))
    return out


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.fixture
def one_thread():
    """One BLAS thread per pytest worker for in-process recipe runs (CI: two workers, two
    cores); use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llama():
    return tiny_llama


def train(model, opt, batches) -> list[float]:
    """One ``opt`` step per batch of ``lm_loss``; returns the losses."""
    losses = []
    for ids in batches:
        opt.zero_grad()
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def roundtrip(obj):
    """``torch.save`` then ``torch.load(weights_only=True)``: what a checkpoint gives back."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same_training_state(model, opt, other_model, other_opt):
    """Parameters and optimizer state of two runs equal bit for bit, dtypes included."""
    for (n, a), b in zip(model.named_parameters(), other_model.parameters(), strict=True):
        assert torch.equal(a, b), f"{n} differs after resume"
    for sa, sb in zip(opt.state.values(), other_opt.state.values(), strict=True):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def resume_midway(make, build, seed: int, batches, split: int):
    """Train ``build(seed)`` with ``make`` on ``batches[:split]``, checkpoint model and optimizer
    through :func:`roundtrip`, restore both into fresh objects (``build(99)``: other initial
    weights, so the load must do the work) and train on ``batches[split:]``.

    ``make`` runs before the model's weights are loaded, since it may change the model (SST
    converts its layers).  Returns ``(model, optimizer, loaded optimizer state dict)``.
    """
    model = build(seed)
    opt = make(model)
    train(model, opt, batches[:split])
    model_sd, opt_sd = roundtrip(model.state_dict()), roundtrip(opt.state_dict())
    fresh_model = build(99)
    fresh = make(fresh_model)
    fresh_model.load_state_dict(model_sd)
    fresh.load_state_dict(opt_sd)
    train(fresh_model, fresh, batches[split:])
    return fresh_model, fresh, opt_sd
