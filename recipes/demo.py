"""The README's main job: the pretraining recipe on the tiny config, for several optimizers.

For each optimizer, one after another, this runs

    accelerate launch --config_file recipes/accelerate/single.yaml --mixed_precision no \\
        -m recipes.pretrain --config recipes/configs/tiny.yaml --optimizer NAME \\
        --output-dir runs/demo/NAME

(a tiny LLaMA on CPU, the offline stdlib-documentation corpus, 300 steps), then prints the
final table: validation loss and perplexity, optimizer-state bytes, tokens/s.  Arguments after
``--`` go to every recipe run.

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

from recipes.config import optimizer_names
from recipes.pretrain import format_table

HERE = Path(__file__).resolve().parent

#: shown when available (dct_adamw / sst_adamw come from lowrank_optim's registry)
DEMO_OPTIMIZERS = ("adamw", "lora", "galore_adamw", "dct_adamw", "sst_adamw")


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the recipe for each optimizer of ``argv`` (default: ``sys.argv[1:]``) and print
    the table; returns the runs' summaries."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizers", nargs="+",
                    default=[n for n in DEMO_OPTIMIZERS if n in optimizer_names()])
    ap.add_argument("--config", default=str(HERE / "configs" / "tiny.yaml"))
    ap.add_argument("--output-dir", default="runs/demo")
    ap.add_argument("recipe_args", nargs=argparse.REMAINDER,
                    help="after --: extra flags for recipes.pretrain")
    args = ap.parse_args(argv)
    extra = args.recipe_args[1:] if args.recipe_args[:1] == ["--"] else args.recipe_args
    # tiny matrices: one BLAS thread per process is faster than several on 2 cores; the
    # launched `python -m recipes.pretrain` imports the package from this repository
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent),
                                                      os.environ.get("PYTHONPATH")]))
    summaries = []
    for name in args.optimizers:
        out = Path(args.output_dir) / name
        recipe = ["-m", "recipes.pretrain", "--config", args.config, "--optimizer", name,
                  "--output-dir", str(out), *extra]
        launcher = ["--config_file", str(HERE / "accelerate" / "single.yaml"),
                    "--num_processes", "1", "--mixed_precision", "no"]
        print("\n$ accelerate launch " + " ".join(launcher + recipe), flush=True)
        subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launcher, *recipe],
                       check=True, env=env)
        summaries.append(json.loads((out / "summary.json").read_text()))
    table = format_table(summaries)
    (Path(args.output_dir) / "table.txt").write_text(table + "\n")
    print(f"\n{table}\n\n(tiny LLaMA, {summaries[0]['data']}; "
          f"table saved to {Path(args.output_dir) / 'table.txt'})")
    return summaries


if __name__ == "__main__":
    main()
