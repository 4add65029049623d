"""Quantised projector state: GaLore bases in 8 / 4 bits (``proj_bits``, the Q-GaLore idea) and
DCT error feedback in 8 / 4 bits (``error_feedback_bits``): what they keep and what they save.

Three sections, all on the tiny recipe (``recipes/configs/tiny.yaml``: the offline stdlib
corpus, its local BPE tokenizer, the tiny LLaMA, rank 16; nothing is downloaded):

* **Energy** (``--energy-steps``, default 100; 0 skips): GaLore with fp32 bases trains; every
  ``--energy-every`` steps, for every projected weight, the top-r basis of that step's gradient
  is computed and stored at 32, 8 and 4 bits (and 4 bits in blocks of 64), and two shares of
  the fp32 basis's captured energy are reported: ``P'(G)``, the captured energy the optimizer
  sees (:meth:`~lowrank_optim.projectors.Projector.captured_energy`, back-projection through the
  dequantised basis ``B'``, which is not exactly orthonormal, so the share may exceed 1), and
  ``span``, the energy of the orthogonal projection onto ``span(B')`` (at most 1: how much of
  the subspace survives).
* **Training** (``--steps``, default 150; ``--seeds``, default 0 1 2): the recipe runs for each
  variant and seed (GaLore ``proj_bits`` 32 / 8 / 4; DCT-AdamW without error feedback, and with
  it at ``error_feedback_bits`` 32 / 8 / 4), each with the recipe's settings for its optimizer
  (GaLore: lr 0.01, scale 0.25, a refresh every 50 steps; DCT: lr 0.01, a refresh every step),
  cosine schedule over ``--steps``; final validation loss (the recipe's validation windows)
  and last training loss.
* **State bytes**: the trained runs' optimizer state (``memory.state_bytes``, from the recipe's
  summary), and the analytic profile (meta device, exact) of LLaMA-7B in bf16 at rank 1024
  per variant, by category.

    python -m benchmarks.quant_projector                      # ~2 min on 2 idle cores
    python -m benchmarks.quant_projector --steps 300          # the recipe's length (~4 min)
    python -m benchmarks.quant_projector --energy-steps 0 --no-write  # training only, print

Results go to ``benchmarks/results/quant_projector_<cpu|cuda>.md`` (``--out`` names another
file under ``benchmarks/results/``; ``--no-write`` prints only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from benchmarks._common import write_result
from lowrank_optim.memory import format_bytes
from lowrank_optim.profile import profile
from lowrank_optim.projectors import fast_svd
from lowrank_optim.projectors.svd import SVDProjector

TINY_CONFIG = "recipes/configs/tiny.yaml"
#: (label, optimizer name, optimizer keywords) of every trained variant
VARIANTS = [
    ("GaLore fp32 basis", "galore_adamw", {}),
    ("GaLore proj_bits=8", "galore_adamw", {"proj_bits": 8}),
    ("GaLore proj_bits=4", "galore_adamw", {"proj_bits": 4}),
    ("DCT, no error feedback", "dct_adamw", {}),
    ("DCT + EF fp32", "dct_adamw", {"error_feedback": True}),
    ("DCT + EF error_feedback_bits=8", "dct_adamw", {"error_feedback": True,
                                                     "error_feedback_bits": 8}),
    ("DCT + EF error_feedback_bits=4", "dct_adamw", {"error_feedback": True,
                                                     "error_feedback_bits": 4}),
]
#: (label, proj_bits, proj_block_size) of the energy section
BASES = [("8 bits", 8, 256), ("4 bits", 4, 256), ("4 bits, blocks of 64", 4, 64)]


def recipe_flags(optimizer: str, kwargs: dict | None = None, **settings: object) -> list[str]:
    """Command-line flags of the tiny recipe for ``optimizer`` with ``kwargs``."""
    flags = ["--config", TINY_CONFIG, "--optimizer", optimizer]
    if kwargs:
        flags += ["--optimizer-kwargs", json.dumps(kwargs)]
    for key, value in settings.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


# -- energy -----------------------------------------------------------------------------------
def span_energy(g: torch.Tensor, bases: dict[str, torch.Tensor]) -> float:
    """Share of ``g``'s energy in the orthogonal projection onto the span of ``bases`` (left
    ``(m, r)``, right ``(r, n)``; orthonormalised first)."""
    low = g
    if "left" in bases:
        low = fast_svd.orthonormalize(bases["left"]).t() @ low
    if "right" in bases:
        low = low @ fast_svd.orthonormalize(bases["right"].t())
    return float(low.square().sum() / g.square().sum())


@torch.no_grad()
def basis_energies(opt, step: int) -> list[dict]:
    """For each projected weight's current gradient: the fp32 basis's captured energy and, per
    :data:`BASES`, the dequantised basis's captured energy and span energy."""
    proj, rows = SVDProjector(), []
    for name, p, group in opt.projected_params():
        if p.grad is None:
            continue
        g = p.grad.float()
        exact: dict = {}
        proj.refresh(g, exact, group, opt.rule)
        row = {"name": name, "step": step, "fp32": float(proj.captured_energy(g, exact, group))}
        for label, bits, block in BASES:
            q_group = {**group, "proj_bits": bits, "proj_block_size": block}
            state: dict = {}
            proj.refresh(g, state, q_group, opt.rule)
            bases = {s: proj.side_basis(state, s, q_group) for s in proj.held(state)}
            row[label] = float(proj.captured_energy(g, state, q_group))
            row[label + " span"] = span_energy(g, bases)
        rows.append(row)
    return rows


def real_gradient_energy(steps: int, every: int) -> list[dict]:
    """Train the tiny recipe's GaLore run (fp32 bases) for ``steps`` steps; measure
    :func:`basis_energies` every ``every`` steps (from step ``every`` on)."""
    from recipes import config, pretrain

    cfg = config.parse_args(recipe_flags("galore_adamw", max_steps=steps))
    data = pretrain.load_data(cfg)
    torch.manual_seed(cfg.seed)
    model, opt = pretrain.build_optimizer(cfg, pretrain.build_model(cfg, data.vocab_size))
    scheduler = pretrain.build_scheduler(cfg, opt)
    rows: list[dict] = []
    for step in range(steps):
        ids = data.train.samples(step * cfg.batch_size, cfg.batch_size)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        if step and step % every == 0:
            rows += basis_energies(opt, step)
        opt.step()
        scheduler.step()
    return rows


def energy_section(rows: list[dict]) -> str:
    steps = sorted({r["step"] for r in rows})
    lines = [
        "## Captured energy of quantised bases (real gradients)", "",
        f"Tiny recipe, GaLore with fp32 bases training, rank 16; at steps {steps} the top-r "
        f"basis of each of the {len(rows) // max(len(steps), 1)} projected weights' gradient "
        "is quantised and its captured energy compared with the fp32 basis's "
        f"(mean fp32 captured energy {statistics.mean(r['fp32'] for r in rows):.3f}). "
        "`P'(G)`: what the optimizer projects (the dequantised basis is not exactly "
        "orthonormal, so the share can exceed 1); `span`: orthogonal projection onto the "
        "dequantised basis's span (at most 1).", "",
        "| basis | P'(G) share: min | median | max | span share: min | median |",
        "|---|---|---|---|---|---|",
    ]
    for label, _, _ in BASES:
        share = [r[label] / r["fp32"] for r in rows]
        span = [r[label + " span"] / r["fp32"] for r in rows]
        lines.append(f"| {label} | {min(share):.4f} | {statistics.median(share):.4f} | "
                     f"{max(share):.4f} | {min(span):.4f} | {statistics.median(span):.4f} |")
    return "\n".join(lines)


# -- training ---------------------------------------------------------------------------------
def train_variants(steps: int, seeds: list[int], out_dir: str) -> dict[str, list[dict]]:
    """The recipe's summary for every variant and seed."""
    from recipes import pretrain

    runs: dict[str, list[dict]] = {}
    for label, name, kwargs in VARIANTS:
        for seed in seeds:
            t0 = time.perf_counter()
            summary = pretrain.main(recipe_flags(
                name, kwargs, seed=seed, max_steps=steps, eval_every=steps,
                output_dir=os.path.join(out_dir, f"{name}-{len(runs)}-{seed}")))
            summary["seconds"] = time.perf_counter() - t0
            runs.setdefault(label, []).append(summary)
            print(f"{label}, seed {seed}: val {summary['val_loss']:.4f}, last train "
                  f"{summary['last_loss']:.4f}, state {summary['state_bytes']:,} B, "
                  f"{summary['seconds']:.1f} s", flush=True)
    return runs


def training_section(runs: dict[str, list[dict]], steps: int, seeds: list[int]) -> str:
    lines = [
        "## Training effect (tiny recipe)", "",
        f"{steps} steps per run (cosine schedule over them, the recipe's warm-up ratio), seeds "
        f"{seeds}; validation loss on the recipe's validation windows at the end, last "
        "training loss as logged; optimizer state bytes of the run (fp32 weights; "
        "`memory.state_bytes`).", "",
        "| variant | val loss per seed | mean val | mean last train loss | state bytes | "
        "vs. its fp32 variant |",
        "|---|---|---|---|---|---|",
    ]
    base = {}
    for label, name, kwargs in VARIANTS:
        summaries = runs[label]
        val = [s["val_loss"] for s in summaries]
        last = statistics.mean(s["last_loss"] for s in summaries)
        state = summaries[0]["state_bytes"]
        key = (name, bool(kwargs.get("error_feedback")))
        base.setdefault(key, state)
        lines.append(f"| {label} | {', '.join(f'{v:.4f}' for v in val)} | "
                     f"{statistics.mean(val):.4f} | {last:.4f} | {state:,} | "
                     f"{state / base[key]:.3f}x |")
    return "\n".join(lines)


# -- bytes at scale ---------------------------------------------------------------------------
def profile_section(model: str = "7b", rank: int = 1024) -> str:
    lines = [
        f"## State bytes at scale (analytic, LLaMA-{model}, bf16, rank {rank})", "",
        "The real optimizer stepped on the meta device (`lowrank_optim.profile`, exact). "
        "In bf16 a \"32-bit\" basis and the fp32 error-feedback buffer are kept in the "
        "parameter dtype, bf16, so 8 bits halve them and 4 bits quarter them (plus one fp32 "
        "scale per 256 elements).", "",
        "| variant | moments | projectors | other (error feedback) | total state |",
        "|---|---|---|---|---|",
    ]
    for label, name, kwargs in VARIANTS:
        p = profile(model, name, rank=rank, opt_args=kwargs)
        lines.append(f"| {label} | {format_bytes(p.moments)} | {format_bytes(p.projectors)} "
                     f"| {format_bytes(p.other_state)} | {format_bytes(p.optimizer_state)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="steps per training run (0: skip)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="seeds of the training runs (none: skip them)")
    parser.add_argument("--energy-steps", type=int, default=100,
                        help="steps of the fp32 GaLore run whose gradients are measured (0: skip)")
    parser.add_argument("--energy-every", type=int, default=25,
                        help="measure the bases every this many steps")
    parser.add_argument("--profile-model", default="7b", help="model of the analytic section")
    parser.add_argument("--profile-rank", type=int, default=1024,
                        help="rank of the analytic section (<= the model's smallest width)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default=None,
                        help="result name under benchmarks/results/ (default "
                             "quant_projector_<cpu|cuda>)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    sections = []
    if args.energy_steps:
        sections.append(energy_section(real_gradient_energy(args.energy_steps,
                                                            args.energy_every)))
    if args.steps and args.seeds:
        with tempfile.TemporaryDirectory() as out_dir:
            runs = train_variants(args.steps, args.seeds, out_dir)
        sections.append(training_section(runs, args.steps, args.seeds))
    sections.append(profile_section(args.profile_model, args.profile_rank))
    seconds = time.perf_counter() - t0
    head = (f"torch threads {args.threads}; 1-minute load average {load:.2f} at the start; "
            f"the whole benchmark took {seconds:.0f} s. Quantised state uses the signed linear "
            "block-wise table (`lowrank_optim.projectors.quantized`), 256 elements per fp32 "
            "scale unless stated.")
    body = "\n\n".join([head, *sections])
    print("\n" + body)
    if not args.no_write:
        name = args.out or ("quant_projector_cuda" if torch.cuda.is_available()
                            else "quant_projector_cpu")
        path = write_result(name.removesuffix(".md"), "Quantised projector state: 8- and "
                            "4-bit GaLore bases, 8- and 4-bit DCT error feedback", body)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
