"""Optimizer step time and state bytes on LLaMA-shaped layers: torch AdamW, galore-torch, ours.

For each config, the seven weight matrices of one decoder block (q, k, v, o, gate, up, down)
get fixed random gradients and each optimizer steps them; the time per step is averaged over
``update_proj_gap`` steps, so one SVD refresh is amortised in it as in training.  Ratios are
against galore-torch from the same run.

    python benchmarks/step_time.py            # 60m and 350m, writes results/step_time_<dev>.md
    python benchmarks/step_time.py --quick    # fewer steps
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine, sync, write_result

import lowrank_optim as lo
from lowrank_optim.memory import state_bytes
from lowrank_optim.model_configs import LLAMA_SHAPES

RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}


def block_params(config: str, device: str) -> list[torch.nn.Parameter]:
    hidden, inter, _, _ = LLAMA_SHAPES[config]
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
    g = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g).mul_(0.02).to(device))
        p.grad = torch.randn(shape, generator=g).to(device)
        params.append(p)
    return params


def make(name: str, params, rank: int, gap: int):
    group = [{"params": params, "rank": rank, "update_proj_gap": gap, "scale": 0.25,
              "proj_type": "std"}]
    if name == "torch AdamW":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "galore-torch":
        import galore_torch

        return galore_torch.GaLoreAdamW(group, lr=1e-3)
    return lo.GaLoreAdamW(group, lr=1e-3)


def measure(name: str, config: str, device: str, gap: int, steps: int) -> tuple[float, int]:
    """Mean seconds per step over ``steps`` steps after a warm-up step, and state bytes."""
    params = block_params(config, device)
    opt = make(name, params, RANKS[config], gap)
    opt.step()  # first step: allocation + first refresh, not timed
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync()
    return (time.perf_counter() - t0) / steps, state_bytes(opt).total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["60m", "350m"])
    ap.add_argument("--gap", type=int, default=200, help="update_proj_gap (paper: 200)")
    ap.add_argument("--steady-steps", type=int, default=20, help="steps timed without refresh")
    ap.add_argument("--quick", action="store_true", help="gap 50, 10 steady steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.quick:
        args.gap, args.steady_steps = 50, 10
    names = ["torch AdamW", "galore-torch", "lowrank_optim"]
    lines = [f"fp32, one decoder block's 7 weight matrices with fixed random gradients. "
             f"'amortised': mean over {args.gap} steps with update_proj_gap={args.gap} (one SVD "
             f"refresh included); 'steady': mean over {args.steady_steps} steps without refresh.",
             "", "| config | rank | optimizer | amortised ms/step | steady ms/step | state MiB "
             "| amortised / galore-torch | steady / galore-torch | state / galore-torch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for config in args.configs:
        amort = {n: measure(n, config, args.device, args.gap, args.gap) for n in names}
        steady = {n: measure(n, config, args.device, 10**9, args.steady_steps) for n in names}
        (ta_ref, b_ref), (ts_ref, _) = amort["galore-torch"], steady["galore-torch"]
        for n in names:
            (ta, b), (ts, _) = amort[n], steady[n]
            lines.append(f"| {config} | {RANKS[config]} | {n} | {ta * 1e3:.2f} | {ts * 1e3:.2f} "
                         f"| {b / 2**20:.2f} | {ta / ta_ref:.2f} | {ts / ts_ref:.2f} "
                         f"| {b / b_ref:.2f} |")
        print("\n".join(lines[-3:]), flush=True)
    body = "\n".join(lines)
    path = write_result(f"step_time_{args.device}", "Optimizer step time and state bytes", body)
    print(f"\n{machine()}\n{body}\n\nwritten to {path}")


if __name__ == "__main__":
    main()
