"""Optimizer step time and state bytes on LLaMA-shaped layers: torch AdamW, galore-torch, ours
(GaLore, GaLore 8-bit, DCT).

For each config, the seven weight matrices of one decoder block (q, k, v, o, gate, up, down)
get fixed random gradients and each optimizer steps them.  Steady steps (subspace kept) and
refresh steps (new SVD) are timed separately, the optimizers taking turns, and combined into
the amortised time of training with ``update_proj_gap`` (one refresh per gap).  Ratios are
against galore-torch from the same run.

    python -m benchmarks.step_time            # 60m and 350m, writes results/step_time_<dev>.md
    python -m benchmarks.step_time --quick    # fewer steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import lowrank_optim as lo
from benchmarks._common import block_params, machine, sync, write_result
from lowrank_optim.memory import state_bytes

RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}


#: the optimizers compared; DCT re-selects its subspace every step (its default), so all its
#: steps are refresh steps and the gap does not apply to it
NAMES = ["torch AdamW", "galore-torch", "lowrank_optim", "lowrank_optim DCT", "lowrank_optim 8-bit"]
EVERY_STEP = {"lowrank_optim DCT"}
NO_SUBSPACE = {"torch AdamW"}


def make(name: str, params, rank: int, gap: int):
    group = [{"params": params, "rank": rank, "update_proj_gap": gap, "scale": 0.25,
              "proj_type": "std"}]
    if name == "lowrank_optim DCT":
        return lo.DCTAdamW([{**group[0], "update_proj_gap": 1}], lr=1e-3)
    if name == "lowrank_optim 8-bit":
        return lo.GaLoreAdamW8bit(group, lr=1e-3)
    if name == "torch AdamW":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "galore-torch":
        import galore_torch

        return galore_torch.GaLoreAdamW(group, lr=1e-3)
    return lo.GaLoreAdamW(group, lr=1e-3)


def _timed_step(opt: torch.optim.Optimizer) -> float:
    sync()
    t0 = time.perf_counter()
    opt.step()
    sync()
    return time.perf_counter() - t0


def measure(names: list[str], config: str, device: str, gap: int, steady_steps: int,
            refreshes: int) -> dict[str, tuple[float, float, float, int]]:
    """``{name: (steady s/step, refresh s/step, amortised s/step, state bytes)}``.

    The optimizers step in turn (the order rotating every round), so a change in machine load
    hits all of them alike; each figure is a median.  A steady step keeps the subspace; a
    refresh step recomputes it (a second copy of each optimizer with ``update_proj_gap=1``).
    Amortised = steady + (refresh - steady) / ``gap``: one refresh per ``gap`` steps, as in
    training with ``update_proj_gap=gap``.
    """
    rank = RANKS[config]
    steady_opts = {n: make(n, block_params(config, device), rank, 10**9) for n in names}
    refresh_opts = {n: make(n, block_params(config, device), rank, 1) for n in names
                    if n not in NO_SUBSPACE | EVERY_STEP}
    for opt in [*steady_opts.values(), *refresh_opts.values()]:
        opt.step()  # allocation + first subspace: not timed
    times: dict[str, list[float]] = {n: [] for n in names}
    refresh: dict[str, list[float]] = {n: [] for n in refresh_opts}
    for i in range(max(steady_steps, refreshes)):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            if i < steady_steps:
                times[n].append(_timed_step(steady_opts[n]))
            if i < refreshes and n in refresh_opts:
                refresh[n].append(_timed_step(refresh_opts[n]))
    out = {}
    for n in names:
        steady = statistics.median(times[n])
        fresh = statistics.median(refresh[n]) if n in refresh else steady
        amortised = steady + (fresh - steady) / gap
        out[n] = (steady, fresh, amortised, state_bytes(steady_opts[n]).total)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["60m", "350m"])
    ap.add_argument("--gap", type=int, default=200, help="update_proj_gap (paper: 200)")
    ap.add_argument("--steady-steps", type=int, default=30, help="timed steps without refresh")
    ap.add_argument("--refreshes", type=int, default=5, help="timed refresh steps")
    ap.add_argument("--quick", action="store_true", help="10 steady steps, 3 refreshes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.quick:
        args.steady_steps, args.refreshes = 10, 3
    names = NAMES
    load = os.getloadavg()[0]
    lines = [f"fp32, one decoder block's 7 weight matrices with fixed random gradients, "
             f"std projection. The optimizers step in turn (rotating order), medians of "
             f"{args.steady_steps} steady steps (subspace kept) and {args.refreshes} refresh "
             f"steps (new SVD); 'amortised' = steady + (refresh - steady) / {args.gap}, i.e. "
             f"update_proj_gap={args.gap} as in the paper. 'lowrank_optim' is GaLoreAdamW, "
             "'8-bit' GaLoreAdamW8bit (block-wise 8-bit moments), 'DCT' DCTAdamW with its "
             "default new selection every step (every step timed as it runs). Ratios against "
             "galore-torch.",
             "", "| config | rank | optimizer | steady ms/step | refresh-step ms | amortised "
             "ms/step | state MiB | steady / galore-torch | amortised / galore-torch "
             "| state / galore-torch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for config in args.configs:
        res = measure(names, config, args.device, args.gap, args.steady_steps, args.refreshes)
        ts_ref, _, ta_ref, b_ref = res["galore-torch"]
        for n in names:
            ts, tr, ta, b = res[n]
            fresh = "-" if n in NO_SUBSPACE | EVERY_STEP else f"{tr * 1e3:.1f}"
            lines.append(f"| {config} | {RANKS[config]} | {n} | {ts * 1e3:.2f} | {fresh} "
                         f"| {ta * 1e3:.2f} | {b / 2**20:.2f} | {ts / ts_ref:.2f} "
                         f"| {ta / ta_ref:.2f} | {b / b_ref:.2f} |")
        print("\n".join(lines[-3:]), flush=True)
    lines += ["", f"1-minute load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at "
              f"the end ({os.cpu_count()} CPUs; above that, other processes shared the cores)."]
    body = "\n".join(lines)
    path = write_result(f"step_time_{args.device}", "Optimizer step time and state bytes", body)
    print(f"\n{machine()}\n{body}\n\nwritten to {path}")


if __name__ == "__main__":
    main()
