"""8-bit vs 32-bit optimizer state: step time, state bytes and update drift, plus bitsandbytes.

For one LLaMA decoder block (q, k, v, o, gate, up, down weights with fixed random gradients),
each optimizer steps in 32-bit and in 8-bit state (``bits=8``, block 256, dynamic code):
GaLoreAdamW (rank as in the paper), DCTAdamW (same rank, a new selection every step) and the
same weights unprojected (plain AdamW through the library's core).  Reported: the median step
time (no subspace refresh in the GaLore timing: ``update_proj_gap`` 200, steady steps), the
moment bytes and total state bytes from :func:`lowrank_optim.memory.state_bytes`, and the
drift of the 8-bit run, ``|dW_8 - dW_32| / |dW_32|`` after a few steps on the same gradients.

bitsandbytes, when installed: ``bitsandbytes.optim.AdamW8bit`` against ``torch.optim.AdamW``
on the unprojected weights, and galore-torch's ``GaLoreAdamW8bit`` against our 8-bit GaLore,
each only if it can run on this device (galore-torch's class calls ``torch.cuda.synchronize()``
every step, so it cannot run on a CPU-only torch: the table says so).  Neither is required.

    python -m benchmarks.quant8bit              # 60m block, writes results/quant8bit_<dev>.md
    python -m benchmarks.quant8bit --config 350m --repeats 9
    python -m benchmarks.quant8bit --quick      # fewer repeats, no file written

It ends with the LLaMA-7B state table of the analytic profiler (exact bytes, meta tensors).
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

import torch

import lowrank_optim as lo
from benchmarks._common import block_params, machine, median_time, write_result
from lowrank_optim.memory import state_bytes
from lowrank_optim.profile import profile

RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
MIB = 2**20
#: torch.optim.AdamW's settings everywhere, so 32 and 8 bits differ by the state alone
HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)

Maker = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def ours(kind: str, rank: int, bits: int) -> Maker:
    """Our optimizers, ``kind`` in galore / dct / plain, in ``bits``-bit state."""
    def make(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if kind == "plain":
            return lo.GaLoreAdamW(params, formula="torch", bits=bits, **HP)
        group = [{"params": params, "rank": rank, "scale": 0.25}]
        if kind == "dct":
            return lo.DCTAdamW(group, bits=bits, update_proj_gap=1, **HP)
        group[0]["update_proj_gap"] = 200
        if bits == 8:
            return lo.GaLoreAdamW8bit(group, **HP)
        return lo.GaLoreAdamW(group, formula="torch", **HP)
    return make


def bnb_adamw8bit(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, **HP)


def galore_torch_8bit(rank: int) -> Maker:
    def make(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        import galore_torch

        group = [{"params": params, "rank": rank, "update_proj_gap": 200, "scale": 0.25,
                  "proj_type": "std"}]
        return galore_torch.GaLoreAdamW8bit(group, **HP)
    return make


def runnable(make: Maker, device: str) -> str | None:
    """``None`` if ``make``'s optimizer can step on ``device``, else why not (one line)."""
    try:
        p = torch.nn.Parameter(torch.randn(256, 128, device=device))
        p.grad = torch.randn_like(p)
        make([p]).step()
    except Exception as e:  # noqa: BLE001 - any failure means "cannot run here"
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None


def measure_pair(makers: tuple[Maker, Maker], config: str, device: str, repeats: int,
                 drift_steps: int) -> list[dict]:
    """For each optimizer: median step seconds, state bytes and the weights' change after
    ``drift_steps`` steps.  The timed steps of the two alternate, so that load changes on a
    shared machine hit both alike."""
    runs = []
    for make in makers:
        params = block_params(config, device)
        start = [p.detach().clone() for p in params]
        opt = make(params)
        for _ in range(drift_steps):
            opt.step()
        sb = state_bytes(opt)
        runs.append({"opt": opt, "times": [], "moments": sb.moments + foreign_moment_bytes(opt),
                     "total": sb.total,
                     "moved": [p.detach() - s for p, s in zip(params, start, strict=True)]})
    for _ in range(repeats):
        for run in runs:
            run["times"].append(median_time(run["opt"].step, repeats=1, warmup=0))
    for run in runs:
        run["seconds"] = statistics.median(run.pop("times"))
        del run["opt"]
    return runs


#: bitsandbytes' state keys of the two moments (codes or fp32 values, scales, code tables),
#: which the library's accounting files under "other"
BNB_MOMENT_KEYS = ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")


def foreign_moment_bytes(opt: torch.optim.Optimizer) -> int:
    """Moment bytes of a bitsandbytes-based optimizer (0 for the others)."""
    return sum(v.numel() * v.element_size() for s in opt.state.values()
               for k, v in s.items() if k in BNB_MOMENT_KEYS and isinstance(v, torch.Tensor))


def drift(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """``|a - b| / |b|`` over all weights (a: the 8-bit run's change, b: the 32-bit one's)."""
    num = sum(float((x - y).float().square().sum()) for x, y in zip(a, b, strict=True))
    den = sum(float(y.float().square().sum()) for y in b)
    return (num / max(den, 1e-30)) ** 0.5


def profile_7b() -> list[str]:
    """LLaMA-7B optimizer state, GaLore rank 1024, 32 vs 8 bits (analytic profiler: the real
    optimizers run one step on meta tensors, so the bytes are exact)."""
    out = ["LLaMA-7B optimizer state (python -m lowrank_optim.profile, analytic, GaLore rank "
           "1024 on all linear layers, per-layer updates, seq 256, batch 1). With bf16 weights "
           "the 32-bit optimizers keep bf16 moments (the parameter's dtype), so 8 bits halve "
           "them; with fp32 weights they quarter them.", "",
           "| weights | optimizer | moments GiB | optimizer state GiB | total GiB | fits 24 GB |",
           "|---|---|---|---|---|---|"]
    for precision in ("bf16", "fp32"):
        for name in ("adamw", "galore_adamw", "galore_adamw8bit"):
            prof = profile("7b", name, rank=1024, precision=precision, layerwise=True)
            fits = any(ok for gpu, ok, _ in prof.fits() if gpu.startswith("24 GB"))
            out.append(f"| {precision} | {name} | {prof.moments / 2**30:.3f} | "
                       f"{prof.optimizer_state / 2**30:.3f} | {prof.total / 2**30:.2f} | "
                       f"{'yes' if fits else 'no'} |")
            print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="60m", choices=sorted(RANKS))
    ap.add_argument("--repeats", type=int, default=7, help="timed steps (median)")
    ap.add_argument("--drift-steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="3 repeats, 3 drift steps, no file")
    ap.add_argument("--no-7b", action="store_true", help="skip the LLaMA-7B state table")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.drift_steps = 3, 3
    args.drift_steps = max(1, args.drift_steps)  # also the warm-up (first step, first SVD)
    rank = RANKS[args.config]
    print(f"machine: {machine()}")
    pairs: list[tuple[str, Maker, Maker]] = [
        (f"GaLoreAdamW r={rank} (vs GaLoreAdamW8bit)", ours("galore", rank, 32),
         ours("galore", rank, 8)),
        (f"DCTAdamW r={rank}, bits=8", ours("dct", rank, 32), ours("dct", rank, 8)),
        ("AdamW, no projection (lowrank_optim core), bits=8", ours("plain", rank, 32),
         ours("plain", rank, 8)),
    ]
    notes = []
    try:
        import bitsandbytes  # noqa: F401

        have_bnb = True
    except Exception as e:  # noqa: BLE001 - missing or broken install: skip it
        have_bnb = False
        notes.append(f"bitsandbytes not usable here ({type(e).__name__}): not compared.")
    if have_bnb:
        why = runnable(bnb_adamw8bit, args.device)
        if why is None:
            pairs.append(("bitsandbytes AdamW8bit vs torch.optim.AdamW, no projection",
                          lambda ps: torch.optim.AdamW(ps, foreach=False, **HP), bnb_adamw8bit))
        else:
            notes.append(f"bitsandbytes AdamW8bit cannot run on {args.device}: {why}")
        try:
            import galore_torch  # noqa: F401

            why = runnable(galore_torch_8bit(64), args.device)
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {e}"
        if why is None:
            pairs.append((f"galore-torch GaLoreAdamW8bit r={rank} (vs our GaLoreAdamW8bit)",
                          ours("galore", rank, 8), galore_torch_8bit(rank)))
        else:
            hint = " (it calls torch.cuda.synchronize() in every step)" if "CUDA" in why else ""
            notes.append(f"galore-torch GaLoreAdamW8bit cannot run on {args.device}: {why}{hint}.")

    lines = [
        f"Config {args.config}: one decoder block's 7 weight matrices "
        f"({sum(p.numel() for p in block_params(args.config, 'cpu')) / 1e6:.2f}M parameters), "
        f"fp32 weights and gradients, {args.device}. AdamW hyper-parameters "
        f"lr 1e-3, eps 1e-8, weight decay 1e-2 (torch formula). 8-bit: block 256, dynamic code, "
        f"min_8bit_size 4096. Step time: median of {args.repeats} steps, the 32-bit and 8-bit "
        f"optimizers' steps alternating (GaLore: steady steps, "
        f"no SVD refresh; DCT: a new selection every step, as its default). Drift: "
        f"|dW_8bit - dW_32bit| / |dW_32bit| after {args.drift_steps} steps on the same fixed "
        "gradients.",
        "",
        "| optimizer | 32-bit ms/step | 8-bit ms/step | time 8/32 | 32-bit moments MiB | "
        "8-bit moments MiB | moments 8/32 | 32-bit state MiB | 8-bit state MiB | drift |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    load_before = os.getloadavg()[0]
    for name, make32, make8 in pairs:
        r32, r8 = measure_pair((make32, make8), args.config, args.device, args.repeats,
                               args.drift_steps)
        d = drift(r8["moved"], r32["moved"])
        row = (f"| {name} | {r32['seconds'] * 1e3:.2f} | {r8['seconds'] * 1e3:.2f} | "
               f"{r8['seconds'] / r32['seconds']:.2f} | {r32['moments'] / MIB:.3f} | "
               f"{r8['moments'] / MIB:.3f} | {r8['moments'] / max(r32['moments'], 1):.4f} | "
               f"{r32['total'] / MIB:.3f} | {r8['total'] / MIB:.3f} | {d:.2e} |")
        print(row, flush=True)
        lines.append(row)
        del r32, r8
    lines += ["", f"1-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} "
              f"after the timings, on {os.cpu_count()} CPUs: above the CPU count the machine "
              "was shared with other jobs and the times are noisy (compare ratios, not ms)."]
    if any(n.startswith("galore-torch") for n, *_ in pairs):
        lines += ["", "In the galore-torch row the '32-bit' columns are our GaLoreAdamW8bit and "
                  "the '8-bit' ones galore-torch's; its drift is between the two 8-bit runs."]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    if not args.no_7b:
        lines += ["", *profile_7b()]
    body = "\n".join(lines)
    print(body.split("\n\n", 1)[0])
    for n in notes:
        print("note:", n)
    if not args.quick:
        dev = "cpu" if args.device == "cpu" else "gpu"
        path = write_result(f"quant8bit_{dev}", "8-bit vs 32-bit optimizer state", body)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
