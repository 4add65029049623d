"""SST against LoRA (peft) at the same rank and full-rank AdamW: tiny-LLaMA pretraining on CPU.

Model: the test suite's tiny LLaMA (``build_llama("tiny")``: hidden 64, 2 layers) with a 32-token
vocabulary, trained from scratch with ``lm_loss``.  Data: a second-order Markov language, each
next token a fixed random function of the previous two (1024 contexts, so the attention and MLP
weights must learn a large lookup and the loss can go to 0).  The tests' motif task does not
rank the methods: every method reaches its entropy floor (~0.20) within ~100 steps, and with the
256-token vocabulary the fully trained embeddings and head carry most of the learning.

All methods use AdamW (betas 0.9/0.999, no weight decay), 10% linear warm-up then cosine decay to
10% of the peak lr; embeddings, norms and the head are trained fully by all three, so the methods
differ only in how the attention / MLP ``nn.Linear`` layers are trained:

* ``adamw``: full-rank AdamW on every weight;
* ``lora``: peft LoRA (``lora_alpha = r``) on every Linear except the head, frozen base weights;
* ``sst``: ``lowrank_optim.sst.convert`` + ``SSTAdamW`` at the same rank, with the paper's
  schedule (``SSTAdamW`` defaults: a new draw every 200 steps with a 20-step warm-up, re-SVD
  every ``k // rank`` draws).

The score is the mean loss on held-out batches after training (SST scored after ``merge``);
"gap closed" is ``(loss_lora - loss_sst) / (loss_lora - loss_adamw)``, the paper's measure
(100% = as good as full rank).

    python -m benchmarks.sst_vs_lora            # 1500 steps, lr sweep, 3 seeds, writes results/
    python -m benchmarks.sst_vs_lora --quick    # 400 steps, the default lrs, one seed
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import lowrank_optim as lo
from lowrank_optim import sst
from lowrank_optim.memory import state_bytes
from lowrank_optim.model_configs import build_llama

METHODS = ("adamw", "lora", "sst")
VOCAB = 32
#: learning rates tried by the full run
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
#: the best lr of each method in the 600-step sweep (used by --quick and the test)
DEFAULT_LR = {"adamw": 3e-3, "lora": 3e-3, "sst": 1e-2}
EVAL_BATCHES = 16


def order2_batches(n: int, batch: int = 4, seq: int = 32, vocab: int = VOCAB,
                   seed: int = 0) -> list[torch.Tensor]:
    """Token batches of a random second-order Markov language: ``x_t = f(x_{t-2}, x_{t-1})``."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (vocab, vocab), generator=g)
    out = []
    for _ in range(n):
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, :2] = torch.randint(0, vocab, (batch, 2), generator=g)
        for t in range(2, seq):
            ids[:, t] = table[ids[:, t - 2], ids[:, t - 1]]
        out.append(ids)
    return out


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Causal-LM loss of ``model`` on ``ids`` (labels = inputs, shifted inside the model)."""
    return model(input_ids=ids, labels=ids).loss


def build(method: str, rank: int, lr: float, sst_kwargs: dict | None = None, seed: int = 1):
    """``(model, optimizer, trained_per_step)`` for one method on a fresh tiny LLaMA."""
    model = build_llama("tiny", seed=seed, vocab_size=VOCAB)
    betas = (0.9, 0.999)
    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=0.0)
        return model, opt, sum(p.numel() for p in model.parameters())
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                 target_modules="all-linear"))
        for name, p in model.named_parameters():  # train everything but the frozen base weights
            p.requires_grad_("base_layer" not in name)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0)
        return model, opt, sum(p.numel() for p in params)
    if method == "sst":
        sst.convert(model, rank=rank, target_modules="all-linear")
        opt = lo.SSTAdamW(sst.sst_param_groups(model), lr=lr, betas=betas, weight_decay=0.0,
                          **(sst_kwargs or {}))
        per_step = sum(rank * (u.shape[0] + v.shape[0]) + s.numel()
                       for _, _, u, s, v in opt.spectral_layers())
        per_step += sum(p.numel() for g in opt.param_groups if g["rank"] is None
                        for p in g["params"])
        return model, opt, per_step
    raise ValueError(f"Unknown method={method!r}; choose one of {METHODS}.")


def warmup_cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """10% linear warm-up, then cosine decay to 10% of the peak lr."""
    warm = max(1, steps // 10)

    def factor(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * (t - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def eval_loss(model, batches) -> float:
    model.eval()
    loss = sum(float(lm_loss(model, ids)) for ids in batches) / len(batches)
    model.train()
    return loss


def run(method: str, steps: int, lr: float | None = None, rank: int = 8,
        sst_kwargs: dict | None = None, seed: int = 1) -> dict:
    """Train one method for ``steps`` steps (model seed ``seed``, data seed ``seed + 1``).

    Returns the held-out loss, optimizer-state bytes (after the first step, when every state
    tensor the method keeps exists; SST's draws empty the vectors' state for a moment), model
    and per-step trained parameter counts, and seconds.
    """
    lr = DEFAULT_LR[method] if lr is None else lr
    batches = order2_batches(steps + EVAL_BATCHES, seed=seed + 1)
    train, held_out = batches[:steps], batches[steps:]
    model, opt, per_step = build(method, rank, lr, sst_kwargs, seed=seed)
    schedule = warmup_cosine(opt, steps)
    start = time.perf_counter()
    for step, ids in enumerate(train):
        opt.zero_grad(set_to_none=True)
        lm_loss(model, ids).backward()
        opt.step()
        schedule.step()
        if step == 0:
            nbytes = state_bytes(opt).total
    seconds = time.perf_counter() - start
    model_params = sum(p.numel() for p in model.parameters())
    if method == "sst":  # score the exported model: merging must not change the function
        model = sst.merge(model)
    return {"method": method, "lr": lr, "seed": seed, "eval_loss": eval_loss(model, held_out),
            "state_bytes": nbytes, "model_params": model_params, "trained_per_step": per_step,
            "seconds": seconds}


def gap_closed(losses: dict[str, float]) -> float:
    """Percentage of the LoRA -> full-rank loss gap that SST closes."""
    return 100.0 * (losses["lora"] - losses["sst"]) / (losses["lora"] - losses["adamw"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--iteration-length", type=int, default=200, help="paper: 200")
    parser.add_argument("--iteration-warmup", type=int, default=20, help="paper: 20")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 avoids oversubscription on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="400 steps, default lrs, 1 seed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps, seeds = (400, 1) if args.quick else (args.steps, args.seeds)
    sst_kwargs = {"iteration_length": args.iteration_length,
                  "iteration_warmup": args.iteration_warmup}
    sweep: list[dict] = []
    best: dict[str, dict] = {}
    for method in METHODS:  # lr sweep on the first seed
        for lr in (DEFAULT_LR[method],) if args.quick else LR_GRID:
            res = run(method, steps, lr, args.rank, sst_kwargs, seed=1)
            sweep.append(res)
            print(f"{method:6s} lr {lr:.0e} seed 1: eval loss {res['eval_loss']:.4f} "
                  f"({res['seconds']:.0f} s)", flush=True)
            if method not in best or res["eval_loss"] < best[method]["eval_loss"]:
                best[method] = res
    per_seed = {1: {m: best[m]["eval_loss"] for m in METHODS}}
    for seed in range(2, seeds + 1):
        per_seed[seed] = {}
        for method in METHODS:
            res = run(method, steps, best[method]["lr"], args.rank, sst_kwargs, seed=seed)
            per_seed[seed][method] = res["eval_loss"]
            print(f"{method:6s} lr {res['lr']:.0e} seed {seed}: eval loss "
                  f"{res['eval_loss']:.4f}", flush=True)
    mean = {m: statistics.mean(per_seed[s][m] for s in per_seed) for m in METHODS}
    adamw_bytes = best["adamw"]["state_bytes"]
    lines = [
        f"Tiny LLaMA (hidden 64, 2 layers, vocab {VOCAB}) on a random second-order Markov "
        f"language, {steps} steps of batch 4 x 32 tokens, rank {args.rank}, SST "
        f"iteration_length {args.iteration_length}, iteration_warmup {args.iteration_warmup}, "
        f"iterations_per_round auto = k // rank = {64 // args.rank} (paper defaults), "
        "AdamW betas (0.9, 0.999), no weight decay, warm-up + cosine lr. "
        f"Eval: mean loss on {EVAL_BATCHES} held-out batches; lr chosen per method on seed 1 "
        f"from {[DEFAULT_LR[m] for m in METHODS] if args.quick else list(LR_GRID)}, then "
        f"{seeds} seed(s) (model and data).",
        "",
        "| method | lr | eval loss (mean over seeds) | optimizer state (bytes) | vs AdamW "
        "| model params (while training) | params trained per step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        r = best[method]
        lines.append(f"| {method} | {r['lr']:.0e} | {mean[method]:.4f} | "
                     f"{r['state_bytes']:,} | {r['state_bytes'] / adamw_bytes:.2f}x | "
                     f"{r['model_params']:,} | {r['trained_per_step']:,} |")
    closed = [gap_closed(per_seed[s]) for s in per_seed]
    lines += ["", f"SST closes {gap_closed(mean):.1f}% of the LoRA -> full-rank gap (mean losses); "
              f"per seed: {', '.join(f'{c:.1f}%' for c in closed)}.", "",
              "lr sweep (seed 1):", "", "| method | lr | eval loss | seconds |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {r['method']} | {r['lr']:.0e} | {r['eval_loss']:.4f} | {r['seconds']:.0f} |"
              for r in sweep]
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        from benchmarks._common import write_result

        print("wrote", write_result("sst_vs_lora_cpu", "SST vs LoRA vs AdamW (CPU)", body))


if __name__ == "__main__":
    main()
