"""The README's main job: the pretraining recipe on the tiny config, for several optimizers.

For each optimizer, one after another, this runs

    accelerate launch --config_file recipes/accelerate/single.yaml --mixed_precision no \\
        -m recipes.pretrain --config recipes/configs/tiny.yaml --optimizer NAME \\
        --output-dir runs/demo/<YYYYmmdd-HHMMSS>/NAME

(a tiny LLaMA on CPU, the offline stdlib-documentation corpus, 300 steps), then prints the
final table: validation loss and perplexity, optimizer-state bytes, tokens/s.  Every demo
writes into a directory of its own under ``--runs-dir`` (``runs/demo``), printed at the start
and the end: the runs' directories and ``table.txt``; ``--output-dir DIR`` uses DIR as given.
Every run's settings are checked before the first one starts.  Arguments after ``--`` go to
every recipe run.

    python -m recipes.demo
    python -m recipes.demo --optimizers adamw galore_adamw -- --max-steps 100

(from the repository's root, like every module of :mod:`recipes`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from recipes.checkpoint import new_run_directory
from recipes.config import RecipeError, optimizer_names, parse_args
from recipes.pretrain import format_table

HERE = Path(__file__).resolve().parent

#: shown when available (all but lora come from lowrank_optim's registry)
DEMO_OPTIMIZERS = ("adamw", "lora", "galore_adamw", "dct_adamw", "sst_adamw",
                   "apollo_adamw", "apollo_mini", "fira_adamw", "dct_fira_adamw")


def _recipe_args(config: str, name: str, out: Path, extra: list[str]) -> list[str]:
    return ["--config", config, "--optimizer", name, "--output-dir", str(out), *extra]


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the recipe for each optimizer of ``argv`` (default: ``sys.argv[1:]``) and print
    the table; returns the runs' summaries.

    Raises
    ------
    SystemExit
        Status 2 when a run's settings are wrong (before any run starts), the failed run's
        status when a run fails.
    """
    ap = argparse.ArgumentParser(prog="python -m recipes.demo",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--optimizers", nargs="+",
                    default=[n for n in DEMO_OPTIMIZERS if n in optimizer_names()],
                    help="the optimizers to run, in this order")
    ap.add_argument("--config", default=str(HERE / "configs" / "tiny.yaml"),
                    help="the recipe's config file")
    ap.add_argument("--runs-dir", default="runs/demo",
                    help="every demo gets a new directory <runs-dir>/<YYYYmmdd-HHMMSS> here")
    ap.add_argument("--output-dir", default=None,
                    help="write into this directory instead (runs replace what is there)")
    ap.add_argument("recipe_args", nargs=argparse.REMAINDER,
                    help="after --: extra flags for recipes.pretrain")
    args = ap.parse_args(argv)
    extra = args.recipe_args[1:] if args.recipe_args[:1] == ["--"] else args.recipe_args
    names = args.optimizers
    for k, name in enumerate(names, 1):  # every run's settings, before the first one starts
        try:
            parse_args(_recipe_args(args.config, name, Path("."), extra))
        except RecipeError as e:
            ap.exit(2, f"{ap.prog}: error: run {k} of {len(names)} ({name}): {e}\n")
    root = Path(args.output_dir) if args.output_dir else new_run_directory(args.runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    print(f"[demo] {len(names)} runs ({', '.join(names)}), written to {root}", flush=True)
    # tiny matrices: one BLAS thread per process is faster than several on 2 cores; the
    # launched `python -m recipes.pretrain` imports the package from this repository
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent),
                                                      os.environ.get("PYTHONPATH")]))
    summaries = []
    for k, name in enumerate(names, 1):
        out = root / name
        recipe = ["-m", "recipes.pretrain", *_recipe_args(args.config, name, out, extra)]
        launcher = ["--config_file", str(HERE / "accelerate" / "single.yaml"), "--quiet",
                    "--num_processes", "1", "--mixed_precision", "no"]
        print(f"\n[demo] run {k} of {len(names)}: {name} -> {out}", flush=True)
        print("$ accelerate launch " + " ".join(launcher + recipe), flush=True)
        done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launcher,
                               *recipe], check=False, env=env)
        if done.returncode:
            print(f"\n[demo] run {k} of {len(names)} ({name}) failed with exit status "
                  f"{done.returncode} (its messages are above); the runs so far are in {root}",
                  file=sys.stderr, flush=True)
            raise SystemExit(done.returncode)
        summaries.append(json.loads((out / "summary.json").read_text()))
    table = format_table(summaries)
    (root / "table.txt").write_text(table + "\n")
    print(f"\n[demo] summary of the {len(names)} runs (tiny LLaMA, {summaries[0]['data']}):"
          f"\n\n{table}\n\n[demo] table saved to {root / 'table.txt'}; the runs are in {root}")
    return summaries


if __name__ == "__main__":
    main()
