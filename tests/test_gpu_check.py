"""``scripts/gpu_check.sh``: the CPU dry run of the whole harness (CI's guard that the GPU
check does not rot between GPU runs), the failure accounting, and the target verdicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check as gc

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    """This interpreter as the script's python; no pytest or interpreter settings leaking into
    the nested runs."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTEST_") and k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    return env


@pytest.mark.slow
def test_cpu_dry_run_runs_every_stage(tmp_path):
    """About 70 s on 2 cores: every stage at tiny sizes, a summary and one JSON per stage, all
    ok (or skipped), and nothing written under benchmarks/results/."""
    before = sorted(p.name for p in gc.RESULTS.glob("gpu_check*"))
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--out",
                           str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    md = tmp_path / "gpu_check_cpu_dry_run.md"
    stage_dir = tmp_path / "gpu_check_cpu_dry_run"
    text = md.read_text()
    assert "# GPU check: CPU dry run" in text and "## Targets" in text
    for word in ("torch", "triton", "transformers", "accelerate", "Date:"):
        assert word in text
    for stage in gc.STAGES:
        data = json.loads((stage_dir / f"{stage}.json").read_text())
        assert data["status"] == "ok" or data["status"].startswith("skipped:"), data["status"]
        assert gc.TITLES[stage] in text
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert summary["dry_run"] and summary["failed"] == []
    assert len(summary["targets"]) == 5
    assert all(t["verdict"] in ("not judged (CPU dry run)", "not measured")
               for t in summary["targets"])
    # each benchmark produced its numbers (the harness ran, it did not just skip)
    tests = json.loads((stage_dir / "tests.json").read_text())["result"]
    assert tests["failed"] == 0 and tests["errors"] == 0
    kernels = json.loads((stage_dir / "kernels.json").read_text())["result"]
    assert kernels["complete"] and kernels["peak"]["copy_gbps"] > 0 and kernels["rows"]
    step = json.loads((stage_dir / "step_time.json").read_text())["result"]
    assert set(step["configs"]["tiny"]["optimizers"]) >= {gc.FUSED, f"{gc.GALORE} [torch]"}
    recipe = json.loads((stage_dir / "recipe.json").read_text())["result"]["optimizers"]
    assert list(recipe) == gc.RECIPE_OPTIMIZERS
    assert all(r["finished"] and r["tokens_per_s"] > 0 for r in recipe.values())
    assert sorted(p.name for p in gc.RESULTS.glob("gpu_check*")) == before


def test_a_failed_stage_is_recorded_and_fails_the_run(tmp_path):
    """A stage without time left fails, the summary is still written, the exit status is 1."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu-dry-run",
                           "--out", str(tmp_path), "--stages", "refresh_cost", "--budget",
                           "refresh_cost=1"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    summary = json.loads((tmp_path / "gpu_check_cpu_dry_run" / "summary.json").read_text())
    assert summary["failed"] == ["refresh_cost"]
    assert "not run" in summary["stages"]["refresh_cost"]["status"]
    assert "| failed: not run" in (tmp_path / "gpu_check_cpu_dry_run.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_without_a_gpu_it_asks_for_the_dry_run(capsys):
    assert gc.main([]) == 2
    assert "--cpu-dry-run" in capsys.readouterr().err


def test_parse_junit_counts_and_failures(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_a"/>'
        '<testcase classname="tests.test_gpu" name="test_b"><failure message="boom: 1 != 2"/>'
        '</testcase>'
        '<testcase classname="tests.test_gpu" name="test_c"><skipped message="needs a CUDA GPU"/>'
        '</testcase></testsuite></testsuites>')
    got = gc.parse_junit(path)
    assert (got["passed"], got["failed"], got["skipped"]) == (1, 1, 1)
    assert got["failures"] == [{"test": "tests.test_gpu::test_b", "message": "boom: 1 != 2"}]
    assert got["skip_reasons"] == ["needs a CUDA GPU"]
    assert gc.parse_junit(tmp_path / "missing.xml") is None


def _row(shape, impl, seconds, flops, nbytes, unfused_s):
    return {"op": "back+update+decay", "shape": shape, "dtype": "bfloat16", "impl": impl,
            "seconds": seconds, "flops": flops, "bytes": nbytes,
            "speedup_vs_torch_unfused": unfused_s / seconds,
            "frac_copy_bw": nbytes / seconds / 1e9 / 1000.0}


def test_kernel_targets_judge_bandwidth_only_where_memory_bound():
    peak = {"matmul_tflops": {"bfloat16": 100.0}, "copy_gbps": 1000.0}
    rows = [  # memory-bound: 1e9 B at 1 TB/s = 1 ms > 1e9 FLOP at 100 TFLOP/s = 10 us
        _row("a r=128", "triton", 1.25e-3, 1e9, 1e9, 2e-3),
        # compute-bound: 1e13 FLOP = 100 ms > 1e9 B = 1 ms; its 1% bandwidth is not judged
        _row("b r=1024", "triton", 0.11, 1e13, 1e9, 0.2),
    ]
    speedup, bandwidth = gc.kernel_targets({"rows": rows, "peak": peak})
    assert speedup.met and "worst 1.60x" in speedup.measured
    assert bandwidth.met and "1 bandwidth-bound" in bandwidth.measured
    assert gc.bound(rows[0], peak) == "memory" and gc.bound(rows[1], peak) == "compute"
    rows[0]["seconds"] = 2e-3  # 50% of the copy bandwidth, and no faster than unfused
    rows[0]["frac_copy_bw"], rows[0]["speedup_vs_torch_unfused"] = 0.5, 1.0
    speedup, bandwidth = gc.kernel_targets({"rows": rows, "peak": peak})
    assert speedup.met is False and bandwidth.met is False
    assert speedup.verdict(dry=False) == "not met" and speedup.verdict(dry=True).startswith(
        "not judged")
    assert [t.met for t in gc.kernel_targets(None)] == [None, None]


def test_step_and_refresh_targets():
    configs = {"1b": {"rank": 512, "optimizers": {
        gc.FUSED: {"steady_s": 0.010}, f"{gc.GALORE} [triton]": {"steady_s": 0.009},
        f"{gc.GALORE} [torch]": {"steady_s": 0.030}, f"{gc.DCT} [triton]": {"steady_s": 0.013}}}}
    galore, dct = gc.step_targets({"configs": configs, "dtype": "bf16"})
    assert galore.met and "0.90x" in galore.measured and "[triton]" in galore.detail
    assert dct.met is False and "1.30x" in dct.measured
    rows = [{"shape": [2048, 2048], "rank": 512, "svd": {"s": 1.0},
             "dct matmul": {"s": 0.05}, "dct fft": {"s": 0.01}},
            {"shape": [1024, 1024], "rank": 256, "svd": {"s": 0.1},
             "dct matmul": {"s": 0.05}, "dct fft": {"s": 0.05}}]
    target = gc.refresh_target({"rows": rows})
    assert target.met and "100.0x" in target.measured and "fft" in target.measured
    assert gc.refresh_target(None).met is None


def test_steady_tokens_per_s_leaves_out_the_first_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "tokens": 100, "tokens_per_s": 10.0},  # 10 s for the first 100
             {"step": 2, "tokens": 300, "tokens_per_s": 25.0},  # 12 s in all
             {"step": 2, "val_loss": 1.0}]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    assert gc.steady_tokens_per_s(path) == pytest.approx(100.0)
    assert gc.steady_tokens_per_s(tmp_path / "missing.jsonl") is None
