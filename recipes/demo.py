"""CPU demo: a tiny LLaMA (built from a config) trained with AdamW and with GaLore side by side.

Prints the training loss of both every few steps, then validation loss and optimizer-state
bytes (moments / projectors / total and bytes per parameter).  Runs offline on the Python
standard library's docstrings with byte-level tokens.

    python recipes/demo.py --steps 200 --rank 16
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from corpus import batches, byte_tokens, stdlib_texts

import lowrank_optim as lo
from lowrank_optim.model_configs import build_llama


@torch.no_grad()
def evaluate(model, tokens, seq_len: int, n_batches: int = 8) -> float:
    model.eval()
    losses = [model(input_ids=ids, labels=ids).loss.item()
              for ids, _ in zip(batches(tokens, 8, seq_len, seed=123), range(n_batches),
                                         strict=False)]
    model.train()
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--update-proj-gap", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    train_text, val_text = stdlib_texts()
    train, val = byte_tokens(train_text), byte_tokens(val_text)
    print(f"corpus: stdlib docstrings, {len(train):,} train / {len(val):,} val bytes")

    base = build_llama("tiny", seed=args.seed)
    runs = {"adamw": base, "galore_adamw": copy.deepcopy(base)}
    opts = {
        "adamw": torch.optim.AdamW(runs["adamw"].parameters(), lr=args.lr, weight_decay=0.0),
        "galore_adamw": lo.create_optimizer(
            runs["galore_adamw"], "galore_adamw", lr=args.lr, rank=args.rank,
            update_proj_gap=args.update_proj_gap, scale=0.25),
    }
    data = batches(train, args.batch_size, args.seq_len, seed=args.seed)
    seconds = dict.fromkeys(runs, 0.0)
    print(f"{'step':>6} {'adamw loss':>12} {'galore loss':>12}")
    for step in range(1, args.steps + 1):
        ids = next(data)
        losses = {}
        for name, model in runs.items():
            t0 = time.perf_counter()
            opts[name].zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opts[name].step()
            seconds[name] += time.perf_counter() - t0
            losses[name] = loss.item()
        if step == 1 or step % max(1, args.steps // 10) == 0:
            print(f"{step:>6} {losses['adamw']:>12.4f} {losses['galore_adamw']:>12.4f}")

    tokens = args.steps * args.batch_size * args.seq_len
    print(f"\n{'optimizer':<14}{'val loss':>9}{'val ppl':>9}{'moments B':>12}{'proj B':>9}"
          f"{'state B':>10}{'B/param':>9}{'tok/s':>9}")
    for name, model in runs.items():
        val_loss = evaluate(model, val, args.seq_len)
        sb = lo.memory.state_bytes(opts[name])
        print(f"{name:<14}{val_loss:>9.4f}{math.exp(val_loss):>9.2f}{sb.moments:>12,}"
              f"{sb.projectors:>9,}{sb.total:>10,}{sb.bytes_per_param:>9.2f}"
              f"{tokens / seconds[name]:>9,.0f}")


if __name__ == "__main__":
    main()
