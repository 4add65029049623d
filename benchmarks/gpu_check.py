"""The GPU check: the one command to run when a GPU is available (``bash scripts/gpu_check.sh``).

Five stages, each a subprocess with a time budget (a stage that fails or runs out of time is
recorded and the next one runs; the exit status is 1 if any stage failed), the whole run under
6 minutes on one GPU:

1. ``tests``: ``pytest tests/test_gpu.py`` (the ``gpu`` marker): every kernel compiled on the
   device against the torch reference, one step of every registry optimizer on CUDA (Triton
   against torch), 8-bit / layer-wise / DCT routes on CUDA, the profiler's measured mode;
2. ``kernels``: ``benchmarks.kernels`` at LLaMA-1B / 7B shapes, r = 128 .. 1024, bf16, Triton
   against torch, against the card's matmul rate and copy bandwidth measured in the same run;
3. ``step_time``: whole-model ``optimizer.step()`` at LLaMA-350m / 1B shapes, bf16, fixed
   gradients: ``torch.optim.AdamW(fused=True)`` and ours (GaLore, DCT, GaLore 8-bit) on the
   Triton and the torch backends; ``refresh_cost``: exact SVD against the DCT selection;
4. ``recipe``: ``python -m recipes.pretrain``, LLaMA-130m, bf16, a few hundred steps on the
   offline corpus, one process per optimizer (adamw, galore_adamw, dct_adamw,
   galore_adamw8bit): tokens/s.

The summary ``benchmarks/results/gpu_check_<gpu>.md`` names the GPU, the versions and the date,
lists each stage and reports the issue's targets (ratios within this run) as met / not met;
``benchmarks/results/gpu_check_<gpu>/`` holds one JSON per stage, ``summary.json`` and each
stage's log.  ``--cpu-dry-run`` runs the same harness at tiny sizes on the CPU (the tests under
Triton's interpreter, the benchmarks on the torch path, the tiny recipe config) in a temporary
directory, or ``--out DIR``: CI's guard that this script does not rot between GPU runs.

    bash scripts/gpu_check.sh                      # on the GPU machine (python3, no installs)
    bash scripts/gpu_check.sh --cpu-dry-run --out /tmp/gc
    python -m benchmarks.gpu_check --stages kernels step_time --budget kernels=120
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

STAGES = ["tests", "kernels", "step_time", "refresh_cost", "recipe"]
TITLES = {
    "tests": "1. GPU tests (pytest -m gpu: tests/test_gpu.py)",
    "kernels": "2. Kernel benchmarks (benchmarks.kernels)",
    "step_time": "3a. Whole-model optimizer step (benchmarks.step_time)",
    "refresh_cost": "3b. Subspace refresh: exact SVD vs DCT (benchmarks.refresh_cost)",
    "recipe": "4. bf16 recipe run, tokens/s (recipes.pretrain)",
}
#: seconds per stage on one GPU; a stage may use what earlier ones left (cumulative slots),
#: never a later stage's share, and the run stops at TOTAL_S
GPU_BUDGETS = {"tests": 80, "kernels": 100, "step_time": 50, "refresh_cost": 25, "recipe": 90}
GPU_TOTAL_S = 345
#: caps for the CPU dry run (it takes about 1.5 minutes on 2 cores)
DRY_BUDGETS = {"tests": 120, "kernels": 40, "step_time": 40, "refresh_cost": 40, "recipe": 120}
DRY_TOTAL_S = 360
RECIPE_OPTIMIZERS = ["adamw", "galore_adamw", "dct_adamw", "galore_adamw8bit"]
#: names of benchmarks.step_time's optimizers
FUSED, GALORE, DCT, GALORE8 = ("torch AdamW fused", "lowrank_optim", "lowrank_optim DCT",
                               "lowrank_optim 8-bit")


# -- running a stage ----------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    status: str = "not run"  # ok | failed | skipped: <why>
    seconds: float = 0.0
    budget_s: float = 0.0
    commands: list[dict] = field(default_factory=list)
    result: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")

    def as_dict(self) -> dict:
        return {"stage": self.name, "title": TITLES[self.name], "status": self.status,
                "seconds": round(self.seconds, 2), "budget_s": round(self.budget_s, 1),
                "commands": self.commands, "notes": self.notes, "result": self.result}


@dataclass
class Context:
    dry: bool
    out: Path  # the stage directory (JSON, logs)
    python: str
    env: dict[str, str]
    cuda: bool
    triton: bool
    recipe_steps: int
    kernels_dtype: str
    workers: int


def _kill(proc: subprocess.Popen) -> None:
    """Stop the process group this script started for ``proc`` (TERM, then KILL)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run(ctx: Context, stage: Stage, cmd: list[str], timeout: float, log: Path,
        env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` from the repository root, output appended to ``log``, killed (with its
    children) after ``timeout`` seconds.  Returns and records ``{cmd, rc, timed_out, ...}``."""
    t0 = time.monotonic()
    timeout = max(1.0, timeout)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}   # timeout {timeout:.0f} s\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or ctx.env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc, timed_out = proc.returncode, True
            f.write(f"\n[gpu_check] killed after {timeout:.0f} s (stage budget)\n")
        except BaseException:  # Ctrl-C: do not leave the child running on the GPU
            _kill(proc)
            raise
    record = {"cmd": shlex.join(cmd), "rc": rc, "timed_out": timed_out,
              "seconds": round(time.monotonic() - t0, 2), "timeout_s": round(timeout, 1),
              "log": log.name}
    stage.commands.append(record)
    print(f"  [{record['seconds']:6.1f} s] rc={rc}{' TIMEOUT' if timed_out else ''}: "
          f"{shlex.join(cmd)[:140]}", flush=True)
    return record


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finish(stage: Stage, record: dict, data: dict | None, what: str) -> None:
    """Status of a one-command benchmark stage from its exit and its JSON."""
    if data is not None:
        stage.result = data
    if record["timed_out"]:
        stage.status = f"failed: timeout after {record['timeout_s']:.0f} s"
        if data:
            stage.notes.append(f"partial {what} (written before the timeout) kept")
    elif record["rc"] != 0:
        stage.status = f"failed: exit {record['rc']} (see {record['log']})"
    elif data is None:
        stage.status = f"failed: no {what} JSON written (see {record['log']})"
    else:
        stage.status = "ok"


# -- the stages ---------------------------------------------------------------------------------
def stage_tests(ctx: Context, stage: Stage, deadline: float) -> None:
    junit = ctx.out / "tests_junit.xml"
    junit.unlink(missing_ok=True)
    cmd = [ctx.python, "-m", "pytest", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    if ctx.workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(ctx.workers)]
    env = dict(ctx.env)
    if ctx.dry and ctx.triton:  # the CPU stand-in: the same tests under Triton's interpreter
        env.update(TRITON_INTERPRET="1", LOWRANK_OPTIM_GPU_TESTS_ON_CPU="1")
        stage.notes.append("CPU dry run: tests/test_gpu.py under Triton's interpreter "
                           "(LOWRANK_OPTIM_GPU_TESTS_ON_CPU=1), smallest shapes, small model")
    record = run(ctx, stage, cmd, deadline - time.monotonic(), ctx.out / "tests.log", env)
    counts = parse_junit(junit)
    stage.result = counts
    if record["timed_out"]:
        stage.status = f"failed: timeout after {record['timeout_s']:.0f} s (see tests.log)"
    elif counts is None:
        stage.status = f"failed: exit {record['rc']}, no junit report (see tests.log)"
    elif counts["failed"] or counts["errors"] or record["rc"] not in (0, 5):
        stage.status = (f"failed: {counts['failed']} failed, {counts['errors']} errors "
                        f"(see tests.log)")
    elif counts["passed"] == 0:
        reason = counts["skip_reasons"][0] if counts["skip_reasons"] else "nothing ran"
        stage.status = f"skipped: {reason}"
    else:
        stage.status = "ok"


def parse_junit(path: Path) -> dict | None:
    """Counts and failures of a pytest ``--junitxml`` report."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    out: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0,
                           "failures": [], "skip_reasons": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            key = "failed" if "failure" in kinds else "errors"
            out[key] += 1
            child = case.find("failure") if "failure" in kinds else case.find("error")
            message = (child.get("message") or "").strip().splitlines()
            out["failures"].append({"test": name, "message": message[0][:300] if message
                                    else ""})
        elif "skipped" in kinds:
            out["skipped"] += 1
            reason = (case.find("skipped").get("message") or "").strip()
            if reason and reason not in out["skip_reasons"]:
                out["skip_reasons"].append(reason)
        else:
            out["passed"] += 1
    return out


def stage_kernels(ctx: Context, stage: Stage, deadline: float) -> None:
    raw = ctx.out / "kernels_raw.json"
    raw.unlink(missing_ok=True)
    if ctx.dry:
        args = ["--cpu-reference", "--shapes", "tiny", "--ranks", "8,16"]
        stage.notes.append("CPU dry run: the torch reference path only, tiny shapes (no Triton "
                           "without a GPU)")
    else:
        args = ["--shapes", "1b,7b", "--ranks", "128,256,512,1024", "--warmup-ms", "5",
                "--rep-ms", "20"]
    cmd = [ctx.python, "-m", "benchmarks.kernels", *args, "--sides", "auto", "--dtype",
           ctx.kernels_dtype, "--peak", "--json", str(raw)]
    record = run(ctx, stage, cmd, deadline - time.monotonic(), ctx.out / "kernels.log")
    data = read_json(raw)
    finish(stage, record, data, "kernel")
    if data is not None and not data.get("complete") and stage.status == "ok":
        stage.status = "failed: the kernel JSON is incomplete"


def stage_step_time(ctx: Context, stage: Stage, deadline: float) -> None:
    raw = ctx.out / "step_time_raw.json"
    raw.unlink(missing_ok=True)
    if ctx.dry:
        args = ["--device", "cpu", "--configs", "tiny", "--layers", "1", "--backends", "torch",
                "--steady-steps", "3"]
        stage.notes.append("CPU dry run: tiny config, 1 layer, torch backend (no Triton "
                           "without a GPU)")
    else:
        args = ["--device", "cuda", "--configs", "350m", "1b", "--backends", "triton", "torch",
                "--steady-steps", "10"]
    cmd = [ctx.python, "-m", "benchmarks.step_time", *args, "--dtype", "bf16", "--scope",
           "model", "--optimizers", FUSED, GALORE, DCT, GALORE8, "--baseline", FUSED,
           "--refreshes", "0", "--init-subspace", "random", "--json", str(raw), "--no-write"]
    record = run(ctx, stage, cmd, deadline - time.monotonic(), ctx.out / "step_time.log")
    finish(stage, record, read_json(raw), "step-time")
    stage.notes.append("steady steps only: GaLore's first subspace is random (meta-device step, "
                       "no SVD); the refresh cost is stage 3b")


def stage_refresh_cost(ctx: Context, stage: Stage, deadline: float) -> None:
    raw = ctx.out / "refresh_cost_raw.json"
    raw.unlink(missing_ok=True)
    if ctx.dry:
        args = ["--device", "cpu", "--shapes", "64x64,64x176", "--repeats", "1", "--threads",
                "1"]
        stage.notes.append("CPU dry run: tiny shapes on the CPU")
    else:
        args = ["--device", "cuda", "--shapes", "1024x1024,1024x2736,2048x2048,2048x5461",
                "--repeats", "2"]
    cmd = [ctx.python, "-m", "benchmarks.refresh_cost", *args, "--json", str(raw),
           "--no-write", "--quality-steps", "0", "--quality-seeds"]  # timings only
    record = run(ctx, stage, cmd, deadline - time.monotonic(), ctx.out / "refresh_cost.log")
    finish(stage, record, read_json(raw), "refresh-cost")


def recipe_args(ctx: Context, name: str, out: Path) -> list[str]:
    if ctx.dry:
        return ["--config", "recipes/configs/tiny_test.yaml", "--optimizer", name,
                "--max-steps", str(ctx.recipe_steps), "--log-every", "1",
                "--mixed-precision", "no", "--report-to", "none", "--progress", "false",
                "--output-dir", str(out)]
    steps = ctx.recipe_steps
    return ["--config", "recipes/configs/llama_130m.yaml", "--optimizer", name,
            "--hf-dataset", "none", "--streaming", "false", "--tokenizer", "bpe",
            "--vocab-size", "1024", "--max-steps", str(steps), "--eval-every", "0",
            "--eval-samples", "64", "--save-every", "0", "--log-every", str(max(1, steps // 10)),
            "--report-to", "none", "--progress", "false", "--mixed-precision", "bf16",
            "--output-dir", str(out)]


def steady_tokens_per_s(metrics: Path) -> float | None:
    """Tokens/s between the first and the last train log line of ``metrics.jsonl`` (the
    first steps, with the first subspace and Triton's autotuning, left out)."""
    points = []
    try:
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if "tokens_per_s" in row and row["tokens_per_s"] > 0:
                points.append((row["tokens"], row["tokens"] / row["tokens_per_s"]))
    except (OSError, ValueError, KeyError):
        return None
    if len(points) < 2 or points[-1][1] <= points[0][1]:
        return None
    return (points[-1][0] - points[0][0]) / (points[-1][1] - points[0][1])


def stage_recipe(ctx: Context, stage: Stage, deadline: float) -> None:
    runs: dict[str, dict] = {}
    start = time.monotonic()
    failures = []
    for k, name in enumerate(RECIPE_OPTIMIZERS):
        # cumulative slots within the stage: an early finish leaves more to the next run
        slot_end = start + (deadline - start) * (k + 1) / len(RECIPE_OPTIMIZERS)
        out = ctx.out / "recipe" / name
        cmd = [ctx.python, "-m", "recipes.pretrain", *recipe_args(ctx, name, out)]
        record = run(ctx, stage, cmd, slot_end - time.monotonic(), ctx.out / "recipe.log")
        summary = read_json(out / "summary.json")
        entry: dict[str, Any] = {"rc": record["rc"], "timed_out": record["timed_out"],
                                 "seconds": record["seconds"]}
        if summary:
            entry.update({key: summary.get(key) for key in (
                "step", "finished", "tokens_per_s", "first_loss", "last_loss", "val_loss",
                "state_bytes", "state_bytes_per_param", "data", "engine")})
        entry["steady_tokens_per_s"] = steady_tokens_per_s(out / "metrics.jsonl")
        runs[name] = entry
        if record["timed_out"] or record["rc"] != 0 or not (summary or {}).get("finished"):
            failures.append(name + (" (timeout)" if record["timed_out"] else ""))
    stage.result = {"optimizers": runs, "steps": ctx.recipe_steps,
                    "config": "tiny_test" if ctx.dry else "llama_130m (offline corpus, bpe 1024)"}
    stage.status = "ok" if not failures else f"failed: {', '.join(failures)} (see recipe.log)"
    if ctx.dry:
        stage.notes.append("CPU dry run: recipes/configs/tiny_test.yaml, fp32")
    else:
        stage.notes.append("llama_130m.yaml (seq 256, batch 64) on the offline stdlib corpus with "
                           "a locally trained 1024-token BPE (the paper's C4 / T5 32k vocabulary "
                           "needs the network), bf16 autocast, one process per optimizer")


RUNNERS: dict[str, Callable[[Context, Stage, float], None]] = {
    "tests": stage_tests, "kernels": stage_kernels, "step_time": stage_step_time,
    "refresh_cost": stage_refresh_cost, "recipe": stage_recipe,
}


# -- the targets ---------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    measured: str = "not measured"
    met: bool | None = None  # None: not measured / not judged
    detail: str = ""

    def verdict(self, dry: bool) -> str:
        if self.met is None:
            return "not measured"
        if dry:
            return "not judged (CPU dry run)"
        return "met" if self.met else "not met"

    def as_dict(self, dry: bool) -> dict:
        return {"target": self.name, "measured": self.measured, "met": None if dry else self.met,
                "verdict": self.verdict(dry), "detail": self.detail}


def _pick(rows: dict, base: str, backends: tuple[str, ...] = ("triton", "torch", "auto")):
    """``(name, row)`` of optimizer ``base`` in a step-time table, Triton backend first."""
    for b in backends:
        if f"{base} [{b}]" in rows:
            return f"{base} [{b}]", rows[f"{base} [{b}]"]
    return (base, rows[base]) if base in rows else (None, None)


def step_targets(data: dict | None) -> list[Target]:
    t1 = Target("GaLore steady optimizer step <= 1.0x fused AdamW (LLaMA-1B shapes, r = d/4)")
    t2 = Target("DCT with a new selection every step <= 1.2x fused AdamW (LLaMA-1B shapes)")
    configs = (data or {}).get("configs", {})
    if not configs:
        return [t1, t2]
    config = "1b" if "1b" in configs else list(configs)[-1]
    rows = configs[config]["optimizers"]
    if FUSED not in rows:
        return [t1, t2]
    base = rows[FUSED]["steady_s"]
    for target, name, limit in ((t1, GALORE, 1.0), (t2, DCT, 1.2)):
        label, row = _pick(rows, name)
        if row is None:
            continue
        ratio = row["steady_s"] / base
        target.measured = f"{ratio:.2f}x ({row['steady_s'] * 1e3:.2f} ms vs {base * 1e3:.2f} ms)"
        target.met = ratio <= limit
        target.detail = (f"{config}, r = {configs[config]['rank']}, {data.get('dtype')}, "
                         f"{label} / {FUSED}")
    return [t1, t2]


def refresh_target(data: dict | None) -> Target:
    target = Target("DCT refresh >= 50x cheaper than exact SVD (LLaMA-1B shapes)")
    rows = [r for r in (data or {}).get("rows", []) if r.get("svd")]
    if not rows:
        return target
    big = [r for r in rows if min(r["shape"]) == 2048] or rows
    ratios = []
    for r in big:
        routes = {m: r[m]["s"] for m in ("dct matmul", "dct fft") if r.get(m)}
        best = min(routes, key=routes.get)
        ratios.append((r["svd"]["s"] / routes[best], best, r["shape"]))
    worst = min(ratios)
    target.measured = f"{worst[0]:,.1f}x (worst shape {worst[2][0]}x{worst[2][1]}, {worst[1]})"
    target.met = worst[0] >= 50
    target.detail = "; ".join(f"{s[0]}x{s[1]}: {v:,.1f}x ({m})" for v, m, s in ratios)
    return target


def bound(row: dict, peak: dict | None) -> str | None:
    """``"memory"`` or ``"compute"``: which floor (minimum bytes / copy bandwidth, or FLOPs /
    matmul rate) is the higher for this case."""
    if not peak or not row.get("flops"):
        return None
    rate = peak["matmul_tflops"].get(row["dtype"])
    if not rate:
        return None
    t_mem = row["bytes"] / (peak["copy_gbps"] * 1e9)
    t_flop = row["flops"] / (rate * 1e12)
    return "memory" if t_mem >= t_flop else "compute"


def kernel_targets(data: dict | None) -> list[Target]:
    t1 = Target("fused back-projection + update >= 1.3x the unfused torch path")
    t2 = Target("fused back-projection + update >= 70% of the measured copy bandwidth")
    rows = (data or {}).get("rows", [])
    fused = [r for r in rows if r["op"] == "back+update+decay" and r["impl"] == "triton"]
    impl = "triton"
    if not fused:  # CPU dry run: no Triton; the harness still computes on the torch path
        fused = [r for r in rows if r["op"] == "back+update+decay" and r["impl"] == "torch"]
        impl = "torch (no Triton)"
    if not fused:
        return [t1, t2]
    speedups = sorted((r["speedup_vs_torch_unfused"], r["shape"]) for r in fused)
    t1.measured = (f"worst {speedups[0][0]:.2f}x ({speedups[0][1]}), median "
                   f"{statistics.median(s for s, _ in speedups):.2f}x over {len(speedups)} "
                   f"cases")
    t1.met = speedups[0][0] >= 1.3
    t1.detail = f"{impl}; {sum(s >= 1.3 for s, _ in speedups)}/{len(speedups)} cases >= 1.3x"
    peak = data.get("peak")
    memory = [r for r in fused if bound(r, peak) == "memory" and r.get("frac_copy_bw")]
    if memory:
        fracs = sorted((r["frac_copy_bw"], r["shape"]) for r in memory)
        t2.measured = (f"worst {100 * fracs[0][0]:.0f}% ({fracs[0][1]}), best "
                       f"{100 * fracs[-1][0]:.0f}% over {len(fracs)} bandwidth-bound cases")
        t2.met = fracs[0][0] >= 0.7
        t2.detail = (f"{impl}; judged where minimum bytes / copy bandwidth exceed FLOPs / matmul "
                     f"rate ({len(fused) - len(memory)} compute-bound cases left out, see the "
                     "kernel table)")
    elif peak:
        t2.detail = "no bandwidth-bound case among the shapes measured"
    return [t1, t2]


# -- the markdown summary ------------------------------------------------------------------------
def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def tests_section(stage: Stage) -> list[str]:
    r = stage.result or {}
    if not r:
        return []
    lines = [f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, "
             f"{r['skipped']} skipped."]
    for f in r.get("failures", [])[:30]:
        lines.append(f"- `{f['test']}`: {f['message']}")
    return lines


def kernels_section(stage: Stage) -> list[str]:
    data = stage.result or {}
    rows, peak = data.get("rows", []), data.get("peak")
    if not rows:
        return []
    lines = []
    if peak:
        rates = ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in peak["matmul_tflops"].items())
        lines += [f"Measured in this run: `torch.matmul` {peak['matmul_size']}^3: {rates} "
                  f"(TF32 {'on' if peak.get('tf32') else 'off'}); tensor copy "
                  f"{peak['copy_gbps']:.0f} GB/s ({peak['copy_bytes'] / 2**30:.2f} GiB read + "
                  "written).", ""]
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["op"], r["shape"], r["dtype"]), {})[r["impl"]] = r
    lines += ["| op | shape | dtype | bound | fast impl us | torch us | torch unfused us | "
              "vs torch | vs unfused | TFLOP/s | % matmul | GB/s | % copy BW |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (op, shape, dtype), impls in by_case.items():
        fast = impls.get("triton") or impls.get("torch")
        torch_row, unfused = impls.get("torch"), impls.get("torch unfused")
        lines.append(
            f"| {op} | {shape} | {dtype} | {bound(fast, peak) or '-'} "
            f"| {fast['seconds'] * 1e6:.1f}{'' if 'triton' in impls else ' (torch)'} "
            f"| {fmt(torch_row and torch_row['seconds'] * 1e6, '.1f')} "
            f"| {fmt(unfused and unfused['seconds'] * 1e6, '.1f')} "
            f"| {fmt(fast['speedup_vs_torch'], '.2f', 'x')} "
            f"| {fmt(fast.get('speedup_vs_torch_unfused'), '.2f', 'x')} "
            f"| {fmt(fast.get('tflops'), '.1f')} "
            f"| {fmt(fast.get('frac_matmul_peak') and 100 * fast['frac_matmul_peak'], '.0f', '%')} "
            f"| {fast['gbps']:.0f} "
            f"| {fmt(fast.get('frac_copy_bw') and 100 * fast['frac_copy_bw'], '.0f', '%')} |")
    lines += ["", "bound: which floor is higher for the case, minimum bytes / measured copy "
              "bandwidth (memory) or FLOPs / measured matmul rate (compute). 'vs torch' is the "
              "torch reference path (cuBLAS for the GEMMs) over the fast implementation."]
    return lines


def step_section(stage: Stage) -> list[str]:
    configs = (stage.result or {}).get("configs", {})
    if not configs:
        return []
    lines = [f"{stage.result.get('dtype')}, scope {stage.result.get('scope')}, median of "
             f"{stage.result.get('steady_steps')} steady steps, fixed gradients.", "",
             "| config | rank | optimizer | steady ms/step | vs fused AdamW | state MiB |",
             "|---|---|---|---:|---:|---:|"]
    for config, block in configs.items():
        for name, row in block["optimizers"].items():
            lines.append(f"| {config} | {block['rank']} | {name} | {row['steady_s'] * 1e3:.2f} "
                         f"| {row['steady_ratio']:.2f}x | {row['state_bytes'] / 2**20:,.1f} |")
    return lines


def refresh_section(stage: Stage) -> list[str]:
    rows = (stage.result or {}).get("rows", [])
    if not rows:
        return []
    lines = ["| shape | rank | SVD ms | DCT matmul ms | DCT FFT ms | SVD / best DCT |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        svd, mm, fft = (r.get(m) for m in ("svd", "dct matmul", "dct fft"))
        best = min((x["s"] for x in (mm, fft) if x), default=None)
        ratio = svd["s"] / best if svd and best else None
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['rank']} "
                     f"| {fmt(svd and svd['s'] * 1e3, ',.2f')} "
                     f"| {fmt(mm and mm['s'] * 1e3, ',.2f')} "
                     f"| {fmt(fft and fft['s'] * 1e3, ',.2f')} | {fmt(ratio, ',.1f', 'x')} |")
    return lines


def recipe_section(stage: Stage) -> list[str]:
    runs = (stage.result or {}).get("optimizers", {})
    if not runs:
        return []
    base = (runs.get("adamw") or {}).get("steady_tokens_per_s")
    lines = ["| optimizer | steps | tokens/s (run) | tokens/s (after first log) | vs adamw | "
             "state MiB | first -> last loss | val loss | wall s |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for name, r in runs.items():
        steady = r.get("steady_tokens_per_s")
        loss = (f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"
                if r.get("first_loss") is not None and r.get("last_loss") is not None else "-")
        state = r.get("state_bytes")
        lines.append(f"| {name} | {r.get('step', '-')} | {fmt(r.get('tokens_per_s'), ',.0f')} "
                     f"| {fmt(steady, ',.0f')} "
                     f"| {fmt(steady / base if steady and base else None, '.2f', 'x')} "
                     f"| {fmt(state and state / 2**20, ',.1f')} | {loss} "
                     f"| {fmt(r.get('val_loss'), '.3f')} | {r['seconds']:.0f} |")
    return lines


SECTIONS = {"tests": tests_section, "kernels": kernels_section, "step_time": step_section,
            "refresh_cost": refresh_section, "recipe": recipe_section}


def markdown(env: dict, stages: list[Stage], targets: list[Target], dry: bool,
             total_s: float, budget_s: float, stage_dir: Path, md_path: Path) -> str:
    rel = os.path.relpath(stage_dir, md_path.parent)
    title = "GPU check" + (": CPU dry run (harness check, numbers not meaningful)" if dry
                           else f": {env.get('gpu')}")
    v = env["versions"]
    lines = [f"# {title}", "",
             f"Date: {env['date']}  ",
             f"Machine: {env['machine']}  ",
             "Versions: " + ", ".join(f"{k} {v[k]}" for k in v) + "  ",
             f"Working tree: {env.get('git') or 'unknown'}  ",
             f"Command: `{env['command']}`  ",
             f"Total {total_s:.0f} s (budget {budget_s:.0f} s); exit status "
             f"{1 if any(s.failed for s in stages) else 0}. Per-stage JSON, logs and "
             f"`summary.json`: [`{rel}/`]({rel}/).", "",
             "## Stages", "", "| stage | status | time s | budget s | JSON |",
             "|---|---|---:|---:|---|"]
    for s in stages:
        lines.append(f"| {TITLES[s.name]} | {s.status} | {s.seconds:.1f} | {s.budget_s:.0f} "
                     f"| [{s.name}.json]({rel}/{s.name}.json) |")
    lines += ["", "## Targets (ratios measured in this run, on this GPU)", "",
              "| target | measured | verdict | detail |", "|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t.name} | {t.measured} | {t.verdict(dry)} | {t.detail} |")
    lines += ["", "A target not met does not fail the run (the exit status reports stages); "
              "'not measured' means its stage did not produce the figure."]
    for s in stages:
        body = SECTIONS[s.name](s)
        lines += ["", f"## {TITLES[s.name]}", "", f"Status: {s.status}."]
        lines += [f"Note: {n}." for n in s.notes]
        if body:
            lines += [""] + body
    return "\n".join(lines) + "\n"


# -- environment ---------------------------------------------------------------------------------
def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_state() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if not head:
        return None
    return f"git {head}" + (" + uncommitted changes" if dirty.strip() else "")


def environment(argv: list[str]) -> dict:
    import torch

    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["bash", "scripts/gpu_check.sh", *argv]),
        "python": f"{sys.executable} ({platform.python_version()})",
        "cpus": os.cpu_count(), "git": git_state(),
        "kernel_backend_env": os.environ.get("LOWRANK_OPTIM_KERNELS"),
        "versions": {"torch": torch.__version__, "triton": version("triton"),
                     "transformers": version("transformers"),
                     "accelerate": version("accelerate"), "python": platform.python_version()},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   capability=f"sm_{props.major}{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   sms=props.multi_processor_count)
        env["versions"]["CUDA"] = torch.version.cuda
        env["machine"] = (f"{env['gpu']} ({env['capability']}, {env['gpu_memory_gib']} GiB, "
                          f"{env['sms']} SMs), {env['cpus']} CPUs")
        smi = _nvidia_smi()
        if smi:
            env["nvidia_smi"] = smi
            env["machine"] += f", driver {smi.split(',')[0].strip()}"
    else:
        env["gpu"] = None
        cpu = platform.processor() or platform.machine()
        env["machine"] = f"no CUDA GPU, {env['cpus']} CPUs ({cpu})"
    return env


def _nvidia_smi() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,power.limit,"
                               "clocks.max.sm", "--format=csv,noheader", "-i", "0"],
                              text=True, capture_output=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


# -- main ---------------------------------------------------------------------------------------
def parse_budgets(items: list[str], base: dict[str, float]) -> dict[str, float]:
    budgets = dict(base)
    for item in items:
        key, _, value = item.partition("=")
        if key not in budgets or not value:
            raise SystemExit(f"--budget {item!r}: expected STAGE=SECONDS with STAGE one of "
                             f"{STAGES}")
        budgets[key] = float(value)
    return budgets


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="scripts/gpu_check.sh",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="the same harness at tiny sizes on the CPU, in a temporary directory")
    ap.add_argument("--out", default=None,
                    help="output directory (default: benchmarks/results/, or a temporary "
                         "directory with --cpu-dry-run)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES)
    ap.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                    help="override one stage's time budget")
    ap.add_argument("--total-s", type=float, default=None,
                    help=f"the whole run's limit (default {GPU_TOTAL_S} s on a GPU)")
    ap.add_argument("--recipe-steps", type=int, default=None,
                    help="training steps per optimizer (default 200 on a GPU, 3 dry)")
    ap.add_argument("--kernels-dtype", choices=["bf16", "fp32", "both"], default="bf16")
    ap.add_argument("--workers", type=int, default=None,
                    help="pytest-xdist workers for the tests (default: half the CPUs, at most "
                         "8, on a GPU: Triton compiles on the CPU; 2 dry)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    dry = args.cpu_dry_run
    python = sys.executable

    env = environment(argv)
    if not dry and env["gpu"] is None:
        print("gpu_check: no CUDA GPU found. Run it on the GPU machine, or use --cpu-dry-run "
              "to check the harness on the CPU.", file=sys.stderr)
        return 2
    if dry:
        out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check_"))
        name = "cpu_dry_run"
    else:
        out_root = Path(args.out) if args.out else RESULTS
        name = slug(env["gpu"])
    md_path = out_root / f"gpu_check_{name}.md"
    stage_dir = out_root / f"gpu_check_{name}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    for old in stage_dir.glob("*.log"):  # this run's logs only
        old.unlink()
    shutil.rmtree(stage_dir / "recipe", ignore_errors=True)  # a previous run's recipe outputs

    budgets = parse_budgets(args.budget, DRY_BUDGETS if dry else GPU_BUDGETS)
    total_s = args.total_s or (DRY_TOTAL_S if dry else GPU_TOTAL_S)
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                       ("HF_DATASETS_OFFLINE", "1"), ("WANDB_MODE", "disabled"),
                       ("TOKENIZERS_PARALLELISM", "false"), ("PYTHONUNBUFFERED", "1"),
                       ("TRITON_CACHE_AUTOTUNING", "1")):
        child_env.setdefault(key, value)
    if dry:
        child_env.pop("TRITON_INTERPRET", None)
    triton = importlib.util.find_spec("triton") is not None
    ctx = Context(dry=dry, out=stage_dir, python=python, env=child_env,
                  cuda=env["gpu"] is not None, triton=triton,
                  recipe_steps=args.recipe_steps or (3 if dry else 200),
                  kernels_dtype=args.kernels_dtype,
                  workers=args.workers or (min(2, os.cpu_count() or 1) if dry
                                           else min(8, max(1, (os.cpu_count() or 2) // 2))))
    print(f"gpu_check{' (CPU dry run)' if dry else ''}: {env['machine']}; writing "
          f"{md_path}", flush=True)

    stages: list[Stage] = []
    slot_end = t_start
    hard_end = t_start + total_s
    for name_ in args.stages:
        stage = Stage(name_)
        stages.append(stage)
        slot_end = min(slot_end + budgets[name_], hard_end)
        left = slot_end - time.monotonic()
        stage.budget_s = max(0.0, left)
        print(f"\n== {TITLES[name_]}  (up to {left:.0f} s)", flush=True)
        t0 = time.monotonic()
        if left < 5:
            stage.status = "failed: not run, the run's time budget was spent"
        else:
            try:
                RUNNERS[name_](ctx, stage, slot_end)
            except Exception as e:  # a bug here must not lose the other stages' results
                stage.status = f"failed: the harness raised {type(e).__name__}: {e}"
        stage.seconds = time.monotonic() - t0
        (stage_dir / f"{name_}.json").write_text(json.dumps(stage.as_dict(), indent=1))
        print(f"   -> {stage.status}", flush=True)

    by_name = {s.name: s for s in stages}
    targets = (step_targets(by_name.get("step_time", Stage("step_time")).result)
               + [refresh_target(by_name.get("refresh_cost", Stage("refresh_cost")).result)]
               + kernel_targets(by_name.get("kernels", Stage("kernels")).result))
    total = time.monotonic() - t_start
    summary = {"dry_run": dry, "env": env, "total_s": round(total, 1), "budget_s": total_s,
               "stages": {s.name: {"status": s.status, "seconds": round(s.seconds, 1),
                                   "json": f"{s.name}.json"} for s in stages},
               "targets": [t.as_dict(dry) for t in targets],
               "failed": [s.name for s in stages if s.failed]}
    (stage_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    md_path.write_text(markdown(env, stages, targets, dry, total, total_s, stage_dir, md_path))
    print(f"\n{'CPU dry run' if dry else 'GPU check'} done in {total:.0f} s: "
          + ", ".join(f"{s.name} {s.status}" for s in stages))
    for t in targets:
        print(f"  target: {t.name}: {t.measured} -> {t.verdict(dry)}")
    print(f"summary: {md_path}\nstage JSON and logs: {stage_dir}")
    return 1 if any(s.failed for s in stages) else 0


if __name__ == "__main__":
    sys.exit(main())
