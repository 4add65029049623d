"""Helpers shared by the test modules (``from tests.helpers import ...``): the tiny LLaMA, token
batches with learnable structure, a training loop, checkpoint round trips and resume checks.

Importing this module sets nothing up; the environment and thread settings of a pytest run live
in ``tests/conftest.py``.
"""

import io
import os
import socket

import torch


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


def random_grads(n: int, seed: int = 0):
    """``n`` random 16 x 16 gradients per call (a fresh draw each time)."""
    g = torch.Generator().manual_seed(seed)
    return lambda t: [torch.randn(16, 16, generator=g) for _ in range(n)]


def stable_grads(n: int, seed: int = 0, noise: float = 1e-3):
    """Rank-2 gradients with a fixed column space, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    bases = [torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g) for _ in range(n)]
    return lambda t: [b + noise * torch.randn(16, 16, generator=g) for b in bases]


def replay_recorded_steps(model, opt, record: dict, label: str = "",
                          atol: float = 2e-6) -> float:
    """Step ``opt`` on ``model`` (one process) with the full gradients a distributed run
    recorded (``record["grads"]``, one dict per step) and check the parameters against the
    ones it recorded after each step (``record["params"]``); the largest difference seen."""
    named = dict(model.named_parameters())
    worst = 0.0
    for step, (grads, expected) in enumerate(zip(record["grads"], record["params"], strict=True)):
        for n, p in named.items():
            p.grad = grads[n].clone()
        opt.step()
        for n, p in named.items():
            torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=atol,
                                       msg=f"{label}, step {step}, {n}")
            worst = max(worst, (p.detach() - expected[n]).abs().max().item())
    return worst


def both(fn, *args, **kwargs):
    """``fn`` on Triton and on the torch reference, each on its own copy of the tensor
    arguments: ``((triton result, its args), (reference result, its args))``."""
    def copies():
        return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]

    tri_args, ref_args = copies(), copies()
    tri = fn(*tri_args, **kwargs, backend="triton")
    ref = fn(*ref_args, **kwargs, backend="torch")
    return (tri, tri_args), (ref, ref_args)


def spy_calls(monkeypatch, module, name: str) -> list:
    """Patch ``module.name`` to record each call (one entry per call) and return the list."""
    calls: list = []
    original = getattr(module, name)

    def spy(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(module, name, spy)
    return calls



# -- multi-process scenarios (gloo, 2 CPU ranks) --------------------------------------------
def free_port() -> int:
    """A free TCP port on localhost (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_two(fn, tmp_path, *args) -> None:
    """Run ``fn(rank, 2, port, str(tmp_path), *args)`` in two processes (``init_gloo`` inside)."""
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(2, free_port(), str(tmp_path), *args), nprocs=2, join=True)


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join the gloo process group of :func:`spawn_two` (one thread per rank)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def record_steps(module, opt, rank: int, steps: int = 3,
                 gather=lambda t: t.detach().clone()) -> dict:
    """Train ``module`` (a model, or its DDP wrapper) on rank ``rank``'s half of each of
    ``steps`` batches of 4 and record, per step, every parameter's (reduced) gradient and its
    value after ``opt.step()``, through ``gather`` (``DTensor.full_tensor`` for FSDP2): the
    record :func:`replay_recorded_steps` checks one process against."""
    model = getattr(module, "module", module)
    grads, params = [], []
    for ids in token_batches(steps, batch=4, seq=32, seed=1):
        opt.zero_grad()
        local = ids[2 * rank:2 * rank + 2]
        module(input_ids=local, labels=local).loss.backward()
        grads.append({n: gather(p.grad) for n, p in model.named_parameters()})
        opt.step()
        params.append({n: gather(p) for n, p in model.named_parameters()})
    return {"grads": grads, "params": params}
