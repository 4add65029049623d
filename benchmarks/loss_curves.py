"""Loss curves of every method on the embedded corpus: the pretraining recipe, tiny LLaMA.

For each optimizer, one after another, this runs the recipe exactly as ``recipes/demo.py``
does (one process, fp32, ``OMP_NUM_THREADS=1``)::

    accelerate launch --config_file recipes/accelerate/single.yaml --num_processes 1 \\
        --mixed_precision no -m recipes.pretrain --config recipes/configs/tiny.yaml \\
        --optimizer NAME --output-dir runs/loss_curves/NAME --max-steps STEPS \\
        --log-every 1 --eval-every EVAL --seed SEED --progress false --report-to none

with the same seed, steps, data order and schedule for all (learning rates and projection
settings per optimizer from ``tiny.yaml``'s ``optimizer_overrides``).  The per-step train loss
and the periodic validation loss come from the recipe's ``metrics.jsonl``; the final numbers
(validation loss and perplexity, optimizer-state bytes, tokens/s) from its ``summary.json``.

Outputs: ``benchmarks/results/loss_curves_<dev>.md`` (table, ratios against AdamW) and
``loss_curves_<dev>.png`` (smoothed train loss as lines, validation loss as markers).

    python -m benchmarks.loss_curves              # 300 steps (tiny.yaml's), ~4-6 min on 2 cores
    python -m benchmarks.loss_curves --seeds 0 1 2  # each optimizer with 3 seeds: mean +- std
    python -m benchmarks.loss_curves --quick      # 60 steps; writes only under --output-dir
    python -m benchmarks.loss_curves --optimizers adamw galore_adamw --steps 100

With several seeds every optimizer runs once per seed (initialisation and data order change
together); the table gives the mean and the sample standard deviation over seeds and the plot
shows the first seed's curves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import RESULTS, write_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECIPES = ROOT / "recipes"
CONFIG = RECIPES / "configs" / "tiny.yaml"

#: the README demo's methods: full-rank, LoRA, the library's three projected families and the
#: methods built on the same core (APOLLO, APOLLO-Mini, Fira over SVD and DCT)
OPTIMIZERS = ("adamw", "lora", "galore_adamw", "dct_adamw", "sst_adamw", "apollo_adamw",
              "apollo_mini", "fira_adamw", "dct_fira_adamw")
DEFAULT_STEPS = 300  # tiny.yaml's max_steps
QUICK_STEPS = 60
#: validation evaluations per run (besides the final one): every ``steps // EVALS`` steps
EVALS = 12


def recipe_args(name: str, steps: int, eval_every: int, seed: int, out: Path) -> list[str]:
    """Flags for ``recipes/pretrain.py`` (after ``--config tiny.yaml``) for one optimizer.

    Parameters
    ----------
    name : str
        Optimizer name (``lowrank_optim.available()`` or ``"lora"``).
    steps : int
        Optimizer steps; the warm-up + cosine schedule spans them.
    eval_every : int
        Validation every this many steps (and always at the end).
    seed : int
        Model initialisation and data-order seed, the same for every optimizer.
    out : Path
        The run's output directory.

    Returns
    -------
    list of str
        The recipe's command-line flags.
    """
    return ["--config", str(CONFIG), "--optimizer", name, "--output-dir", str(out),
            "--max-steps", str(steps), "--log-every", "1", "--eval-every", str(eval_every),
            "--seed", str(seed), "--progress", "false", "--report-to", "none"]


def run_recipe(name: str, args: list[str]) -> float:
    """Launch the recipe for one optimizer with accelerate; returns the wall seconds.

    Parameters
    ----------
    name : str
        Optimizer name, for the console.
    args : list of str
        The recipe's flags (see :func:`recipe_args`).

    Returns
    -------
    float
        Wall time of the whole launch (start-up, data loading, training, evaluations).
    """
    launcher = ["--config_file", str(RECIPES / "accelerate" / "single.yaml"),
                "--num_processes", "1", "--mixed_precision", "no"]
    # `python -m recipes.pretrain`, run from the repository root: the package of this checkout
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher,
           "-m", "recipes.pretrain", *args]
    # tiny matrices: one BLAS thread per process is faster than several on 2 cores
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"\n[{name}] $ accelerate launch {' '.join(launcher)} -m recipes.pretrain "
          f"{' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0


def read_run(out: Path) -> dict[str, Any]:
    """Curves and final numbers of one finished run.

    Parameters
    ----------
    out : Path
        The run's output directory (``metrics.jsonl`` and ``summary.json``).

    Returns
    -------
    dict
        ``summary`` (the recipe's summary), ``train`` (``[(step, loss)]`` for every step),
        ``val`` (``[(step, val_loss)]``), ``state_bytes`` (the largest value logged: SST's
        state is briefly smaller right after a re-draw) and ``tokens`` (trained on).
    """
    summary = json.loads((out / "summary.json").read_text())
    if not summary.get("finished"):
        raise RuntimeError(f"{out}: the run did not finish (summary step {summary['step']})")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    sizes = [r["state_bytes"] for r in records if "state_bytes" in r] + [summary["state_bytes"]]
    tokens = max((r["tokens"] for r in records if "tokens" in r), default=0)
    return {"summary": summary, "train": train, "val": val, "state_bytes": max(sizes),
            "tokens": tokens}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (shorter windows at the start, so no point is dropped).

    Parameters
    ----------
    values : list of float
        The raw per-step losses.
    window : int
        Number of steps averaged.

    Returns
    -------
    list of float
        ``out[i] = mean(values[max(0, i - window + 1) : i + 1])``.
    """
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(runs: dict[str, dict[str, Any]], steps: int, path: Path) -> bool:
    """Two panels (whole run, second half zoomed): smoothed train loss and validation points.

    Parameters
    ----------
    runs : dict
        Optimizer name to :func:`read_run`'s result.
    steps : int
        Steps of every run (sets the smoothing window and the zoom).
    path : Path
        Where the PNG goes.

    Returns
    -------
    bool
        ``False`` (nothing written) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", flush=True)
        return False
    window = max(1, steps // 20)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, start in zip(axes, (0, steps // 2), strict=True):
        low, high = math.inf, -math.inf
        for i, (name, run) in enumerate(runs.items()):
            color = f"C{i}"
            xs = [s for s, _ in run["train"]]
            ys = smooth([v for _, v in run["train"]], window)
            kept = [(x, y) for x, y in zip(xs, ys, strict=True) if x >= start]
            ax.plot(*zip(*kept, strict=True), color=color, lw=1.4, label=f"{name} (train)")
            val = [(s, v) for s, v in run["val"] if s >= start]
            if val:
                ax.plot(*zip(*val, strict=True), color=color, ls="--", lw=0.8, marker="o",
                        ms=4, label=f"{name} (val)")
            span = [y for _, y in kept] + [v for _, v in val]
            low, high = min(low, *span), max(high, *span)
        if start:
            pad = 0.05 * (high - low)
            ax.set_ylim(low - pad, high + pad)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / token)")
        ax.set_title("whole run" if not start else f"from step {start} (zoom)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    how = f"moving average of {window} steps" if window > 1 else "per step"
    fig.suptitle(f"tiny LLaMA on the stdlib-docs corpus, {steps} steps: train loss ({how}) "
                 "and validation loss (markers)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def resolved_settings(args: list[str]) -> Any:
    """The recipe's configuration for these flags (defaults < tiny.yaml < overrides < flags)."""
    from recipes.pretrain import parse_args  # the recipe's own merge: the table shows what ran

    return parse_args(args)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _with_spread(values: list[float], digits: int = 4) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")


def table(runs: dict[str, list[dict[str, Any]]], settings: dict[str, Any],
          seconds: dict[str, float]) -> str:
    """Markdown table of final numbers over seeds, with ratios against AdamW when it ran.

    Parameters
    ----------
    runs : dict
        Optimizer name to the :func:`read_run` results of its seeds (one or more).
    settings : dict
        Optimizer name to its resolved ``RecipeConfig``.
    seconds : dict
        Optimizer name to the wall seconds of its launches (summed over seeds).

    Returns
    -------
    str
        The table, in markdown: validation loss, its ratio to AdamW's of the same seed and the
        train loss as mean ± std over seeds (plain with one seed), perplexity of the mean
        loss, state bytes of the first seed.
    """
    def val(name: str) -> list[float]:
        return [r["summary"]["val_loss"] for r in runs[name]]

    base = runs.get("adamw")
    seeds = len(next(iter(runs.values())))
    lines = [f"| optimizer | lr | final val loss{' (mean ± std)' if seeds > 1 else ''} | "
             "val ppl | val loss / AdamW | train loss (last 10%) | state bytes | "
             "state / AdamW | tokens/s | run s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, seed_runs in runs.items():
        cfg, first = settings[name], seed_runs[0]
        tails = []
        for run in seed_runs:
            tail = [v for _, v in run["train"][-max(1, len(run["train"]) // 10):]]
            tails.append(sum(tail) / len(tail))
        mean = mean_std(val(name))[0]
        # per seed (a seed also changes the data order), then averaged
        ratio = (_with_spread([v / b for v, b in zip(val(name), val("adamw"), strict=True)], 3)
                 if base else "-")
        state = f"{first['state_bytes'] / base[0]['state_bytes']:.2f}x" if base else "-"
        speed = mean_std([r["summary"]["tokens_per_s"] for r in seed_runs])[0]
        lines.append(f"| {name} | {cfg.lr:g} | {_with_spread(val(name))} | {math.exp(mean):.1f} "
                     f"| {ratio} | {_with_spread(tails)} | {first['state_bytes']:,} | "
                     f"{state} | {speed:,.0f} | {_seconds(seconds[name])} |")
    return "\n".join(lines)


def _seconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def describe(runs: dict[str, dict[str, Any]], settings: dict[str, Any], steps: int,
             eval_every: int, seeds: list[int]) -> str:
    """The paragraph above the table: what ran, with which settings."""
    cfg = next(iter(settings.values()))
    data = next(iter(runs.values()))["summary"]["data"]
    per_opt = "; ".join(
        f"{n}: lr {c.lr:g}" + (f", rank {c.rank}" if c.rank != cfg.rank else "")
        + (f", update_proj_gap {c.update_proj_gap}" if c.update_proj_gap else "")
        + (f", scale {c.scale:g}" if c.scale else "")
        for n, c in settings.items())
    seed_text = (f"seed {seeds[0]} for every optimizer" if len(seeds) == 1 else
                 f"seeds {', '.join(map(str, seeds))} for every optimizer (mean ± sample std "
                 "over seeds in the table; the plot shows the first seed)")
    return (
        f"`recipes/pretrain.py` on `recipes/configs/tiny.yaml` (tiny LLaMA: hidden 64, 2 "
        f"layers; a {cfg.vocab_size}-token BPE trained locally), one process, fp32, "
        f"`OMP_NUM_THREADS=1`. Data: {data}. {steps} steps of batch {cfg.batch_size} x "
        f"{cfg.seq_len} tokens, linear warm-up over {cfg.warmup_ratio:.0%} then cosine to "
        f"{cfg.min_lr_ratio:.0%} of the peak, {seed_text} (a seed sets the "
        f"initialisation and data order), rank {cfg.rank} (LoRA r, GaLore/DCT/APOLLO/Fira "
        f"projection rank, SST sampled vectors) unless listed below, no weight decay. "
        f"Settings per optimizer (tiny.yaml's `optimizer_overrides`): {per_opt}. "
        f"Validation: mean loss on {cfg.eval_samples} "
        f"held-out windows every {eval_every} steps and at the end; perplexity = exp(loss). "
        "State bytes: the optimizer's state tensors (moments, projectors, indices), largest "
        "value logged. tokens/s counts training steps only (no evaluation), one BLAS thread, "
        "on a machine shared with other jobs: indicative; run s is the whole launch. Train "
        "loss is logged every step (`--log-every 1`); the plot shows its moving average.")


def _widest(spread: dict[str, list[float]], skip: dict) -> float:
    """The largest max - min over seeds among the methods not in ``skip``."""
    return max((max(v) - min(v) for n, v in spread.items() if n not in skip), default=0.0)


def reading(runs: dict[str, dict[str, Any]], settings: dict[str, Any],
            by_seed: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """A few sentences on how to read the table, computed from the runs.

    Parameters
    ----------
    runs : dict
        Optimizer name to :func:`read_run`'s result.
    settings : dict
        Optimizer name to its resolved ``RecipeConfig``.
    by_seed : dict, optional
        Optimizer name to its runs over seeds: the methods whose final validation loss
        spreads by more than 0.1 over seeds are named with their values.

    Returns
    -------
    str
        Which method ends lowest, where AdamW ranks, the unstable ones over seeds, the share
        of the tiny model's parameters in the embedding and head (trained full-rank by every
        method).
    """
    from lowrank_optim.model_configs import build_llama

    cfg = next(iter(settings.values()))
    model = build_llama(cfg.model, vocab_size=cfg.vocab_size, **cfg.model_overrides)
    total = sum(p.numel() for p in model.parameters())
    full = sum(p.numel() for n, p in model.named_parameters()
               if "embed_tokens" in n or "lm_head" in n)
    order = sorted(runs, key=lambda n: runs[n]["summary"]["val_loss"])
    text = (f"Reading (first seed): lowest final validation loss {order[0]} "
            f"({runs[order[0]]['summary']['val_loss']:.4f})")
    if "adamw" in runs:
        text += f"; full-rank AdamW ranks {order.index('adamw') + 1} of {len(order)}"
    spread = {n: [r["summary"]["val_loss"] for r in rs] for n, rs in (by_seed or {}).items()
              if len(rs) > 1}
    unstable = {n: v for n, v in spread.items() if max(v) - min(v) > 0.1}
    if unstable:
        text += (". Over seeds, " + "; ".join(
            f"{n} ends at {', '.join(f'{x:.2f}' for x in v)}" for n, v in unstable.items())
            + " (a spread above 0.1: that learning rate is at the edge of stability for this "
            "config), while every other method stays within "
            f"{_widest(spread, unstable):.3f}"
            " (max - min)")
    tokens = max(run["tokens"] for run in runs.values())
    return text + (
        f". This is a short run of a tiny model ({total:,} parameters, {tokens:,} training "
        "tokens) at `tiny.yaml`'s learning rates: it compares the methods' early training on "
        "one seed and says nothing about full-rank vs low-rank quality at the paper's scales "
        "(60M-7B parameters, billions of tokens). "
        f"The embedding and the head hold {full / total:.0%} of the parameters and every "
        "method trains them with full-rank AdamW, so the state-bytes ratios here are far "
        "from the large-model ones (see the optimizer-state section of REPORT.md).")


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the recipe for each optimizer, then write the table and the plot.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    dict
        Optimizer name to :func:`read_run`'s result.
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    ap.add_argument("--steps", type=int, default=None,
                    help=f"optimizer steps (default {DEFAULT_STEPS}, --quick {QUICK_STEPS})")
    ap.add_argument("--eval-every", type=int, default=None,
                    help=f"validation interval (default steps // {EVALS})")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="one run per optimizer and seed (default: 0)")
    ap.add_argument("--output-dir", default=str(ROOT / "runs" / "loss_curves"),
                    help="the recipe's run directories go here, one per optimizer")
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_STEPS} steps; table and plot only under --output-dir")
    ap.add_argument("--collect-only", action="store_true",
                    help="read existing runs in --output-dir instead of training")
    args = ap.parse_args(argv)
    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    eval_every = args.eval_every or max(1, steps // EVALS)
    if steps < 1 or eval_every < 1:
        ap.error("--steps and --eval-every must be positive")
    torch.set_num_threads(1)  # as the runs (OMP_NUM_THREADS=1); machine() reports it
    root = Path(args.output_dir)
    by_seed: dict[str, list[dict[str, Any]]] = {}
    settings, seconds = {}, {}
    for name in args.optimizers:
        by_seed[name], seconds[name] = [], 0.0
        for seed in args.seeds:
            out = root / name if len(args.seeds) == 1 else root / name / f"seed{seed}"
            flags = recipe_args(name, steps, eval_every, seed, out)
            try:
                settings[name] = resolved_settings(flags)
            except ValueError as e:
                ap.error(str(e))
            seconds[name] += math.nan if args.collect_only else run_recipe(name, flags)
            by_seed[name].append(read_run(out))
    runs = {name: seed_runs[0] for name, seed_runs in by_seed.items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    body_table = table(by_seed, settings, seconds)
    print(f"\n{body_table}", flush=True)
    if args.quick:
        name, results = f"loss_curves_{device}_quick", root
        results.mkdir(parents=True, exist_ok=True)
    else:
        name, results = f"loss_curves_{device}", RESULTS
        results.mkdir(parents=True, exist_ok=True)
    png = results / f"{name}.png"
    plotted = plot(runs, steps, png)
    body = "\n\n".join([describe(runs, settings, steps, eval_every, args.seeds), body_table,
                        reading(runs, settings, by_seed),
                        *([f"![loss curves]({png.name})"] if plotted else [])])
    title = f"Loss curves on the embedded corpus ({device.upper()}, tiny LLaMA, {steps} steps)"
    if args.quick:
        path = results / f"{name}.md"
        path.write_text(f"# {title}\n\n{body}\n")
    else:
        path = write_result(name, title, body)
    print(f"wrote {path}" + (f" and {png}" if plotted else ""), flush=True)
    return runs


if __name__ == "__main__":
    main()
