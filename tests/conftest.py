import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
def llama():
    return tiny_llama
