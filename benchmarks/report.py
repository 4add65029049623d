"""Run the benchmark scripts and write ``benchmarks/results/REPORT.md`` with plots.

Sections: optimizer step time vs torch AdamW and galore-torch, refresh cost SVD vs DCT, state
bytes per method (analytic profiler, exact) with the GaLore paper's 7B statements checked,
8-bit states, SST vs LoRA, loss curves of every method on the embedded corpus, Triton kernels
(GPU only).  Every figure comes from a script run on the machine named in its section.

    python benchmarks/report.py            # full runs (tens of minutes on 2 CPU cores)
    python benchmarks/report.py --quick    # the scripts' quick modes
    python benchmarks/report.py --only-collect   # rebuild REPORT.md from existing results
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from _common import RESULTS, machine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: (script, args, args in --quick mode, result files it writes, section title)
SCRIPTS = [
    ("step_time.py", [], ["--quick"], ["step_time_cpu.md", "step_time_cuda.md"],
     "Step time and state bytes vs torch AdamW and galore-torch"),
    ("refresh_cost.py", [], ["--quick"], ["refresh_cost_cpu.md", "refresh_cost_cuda.md"],
     "Subspace refresh cost: exact SVD vs DCT"),
    ("quant8bit.py", [], ["--quick"], ["quant8bit_cpu.md", "quant8bit_cuda.md"],
     "8-bit optimizer states"),
    ("sst_vs_lora.py", [], ["--quick"], ["sst_vs_lora_cpu.md"],
     "Sparse Spectral Training vs LoRA vs full-rank AdamW"),
    ("loss_curves.py", [], ["--quick"], ["loss_curves_cpu.md"],
     "Loss curves on the embedded corpus"),
    ("kernels.py", [], [], ["kernels_cuda.md", "kernels_cpu_reference.md"],
     "Triton kernels vs the unfused torch path"),
]

#: paper statements checked against the profiler (GaLore, arXiv 2403.03507, abstract / sec. 5)
PAPER_7B = [
    ("optimizer-state reduction of GaLore vs BF16 AdamW", "up to 65.5%", "galore_adamw"),
    ("optimizer-state reduction of 8-bit GaLore vs BF16 AdamW", "up to 82.5%", "galore_adamw8bit"),
]


def run_scripts(quick: bool) -> None:
    for script, args, quick_args, _, _ in SCRIPTS:
        if not (HERE / script).exists():
            print(f"skip {script}: not present", flush=True)
            continue
        cmd = [sys.executable, str(HERE / script), *args, *(quick_args if quick else [])]
        print("$", " ".join(cmd), flush=True)
        done = subprocess.run(cmd, cwd=HERE, check=False)
        if done.returncode:
            print(f"warning: {script} exited with {done.returncode}", flush=True)


def state_bytes_section() -> str:
    """Optimizer-state bytes per method from the analytic profiler, and the 7B paper check."""
    import lowrank_optim as lo
    from lowrank_optim.profile import GIB, plot, profile

    ranks = {"60m": 128, "350m": 256, "1b": 512, "7b": 1024}
    names = lo.available()
    lines = ["Exact optimizer-state bytes (analytic profiler: the real optimizer stepped on "
             "meta tensors), bf16 weights, rank per the paper (60m 128, 350m 256, 1b 512, "
             "7b 1024).", "", "| model | optimizer | moments GiB | projectors GiB | indices GiB "
             "| state GiB | state / AdamW |", "|---|---|---|---|---|---|---|"]
    by_model: dict[str, dict[str, object]] = {}
    for model, rank in ranks.items():
        for name in names:
            try:
                p = profile(model, name, rank=rank, precision="bf16")
            except Exception as e:  # an optimizer that cannot profile is reported, not hidden
                lines.append(f"| {model} | {name} | error: {e} | | | | |")
                continue
            by_model.setdefault(model, {})[name] = p
        base = by_model[model]["adamw"].optimizer_state
        for name, p in by_model[model].items():
            lines.append(f"| {model} | {name} | {p.moments / GIB:.3f} | {p.projectors / GIB:.3f}"
                         f" | {p.indices / GIB:.4f} | {p.optimizer_state / GIB:.3f} "
                         f"| {p.optimizer_state / base:.3f} |")
    seven = by_model.get("7b", {})
    lines += ["", "GaLore paper statements at LLaMA-7B vs this profiler:", "",
              "| statement | paper | profiler | note |", "|---|---|---|---|"]
    for what, paper, name in PAPER_7B:
        if name in seven and "adamw" in seven:
            red = 1 - seven[name].optimizer_state / seven["adamw"].optimizer_state
            lines.append(f"| {what} | {paper} | {red:.1%} | embeddings and lm_head stay "
                         "full-rank AdamW; 8-bit keeps tensors < min_8bit_size in 32-bit |")
    if seven:
        lay = profile("7b", "galore_adamw8bit" if "galore_adamw8bit" in seven else
                      "galore_adamw", rank=1024, precision="bf16", layerwise=True)
        lines.append(f"| 7B pretraining fits a 24 GB card (8-bit GaLore + layer-wise) | ~22 GB "
                     f"| {lay.total / GIB:.1f} GiB ({lay.optimizer}, seq 256, batch 1) | "
                     "activation term is an estimate; paper measured on an RTX 4090 |")
        plot([seven[n] for n in seven], str(RESULTS / "state_bytes_7b.png"))
        lines += ["", "![state bytes at 7B](state_bytes_7b.png)"]
    return "\n".join(lines)


def collect(sections: list[str]) -> str:
    out = ["# lowrank-optim benchmark report", "",
           f"Generated on: {machine()}", "",
           "Each section names the machine its numbers came from; ratios compare methods "
           "measured in the same run.", ""]
    for _, _, _, files, title in SCRIPTS:
        found = [f for f in files if (RESULTS / f).exists()]
        out += [f"## {title}", ""]
        if not found:
            out += ["_Not run on this machine (no result file)._", ""]
        for f in found:
            body = (RESULTS / f).read_text().split("\n", 1)[1].strip()
            out += [f"From `{f}`:", "", body, ""]
    out += ["## Optimizer-state bytes per method", "", *sections]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only-collect", action="store_true")
    args = ap.parse_args()
    if not args.only_collect:
        run_scripts(args.quick)
    sys.path.insert(0, str(ROOT))
    report = collect([state_bytes_section()])
    path = RESULTS / "REPORT.md"
    path.write_text(report)
    print(f"written {path}")


if __name__ == "__main__":
    main()
