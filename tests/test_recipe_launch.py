"""The recipe launched with ``accelerate launch -m recipes.pretrain``: one process, DDP and
FSDP2 on two CPU processes (gloo), with the accelerate configs in recipes/accelerate/.

Two-process runs are compared with single-process runs of the same global batch (per-process
batch 2 x 2 processes vs batch 2 x 2 accumulation steps): the gradients are then the same sums,
so losses and parameters agree to rounding.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipes import config, pretrain
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]

TEST_CONFIG = str(ROOT / "recipes" / "configs" / "tiny_test.yaml")
ACCELERATE_CONFIGS = ROOT / "recipes" / "accelerate"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Corpus and tokenizer built once here, so launched ranks only read them."""
    path = str(tmp_path_factory.mktemp("recipe-cache"))
    pretrain.load_data(config.parse_args(["--config", TEST_CONFIG, "--cache-dir", path]))
    return path


def python_path() -> str:
    """``$PYTHONPATH`` with the repository's root first: launched processes import the
    ``recipes`` package (``-m recipes.pretrain``) from this checkout."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def launch(config: str, nproc: int, out: Path, cache: str, *args: str,
           mixed_precision: str | None = "no") -> subprocess.CompletedProcess:
    """``accelerate launch`` of the recipe on CPU: the working multi-process form (see
    /work/shared/ENVIRONMENT.md: ``--cpu`` would silently run one process)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ACCELERATE_CONFIGS / config), "--num_processes", str(nproc),
           "--main_process_port", str(free_port())]
    if mixed_precision:
        cmd += ["--mixed_precision", mixed_precision]
    cmd += ["-m", "recipes.pretrain", "--config", TEST_CONFIG, "--cache-dir", cache,
            "--output-dir", str(out), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": python_path()}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def succeeded(proc: subprocess.CompletedProcess, out: Path, nproc: int) -> list[dict]:
    """Every rank's marker (written after a clean teardown), or a failure with the log."""
    markers = [out / f"rank{r}.json" for r in range(nproc)]
    assert proc.returncode == 0 and all(m.exists() for m in markers), (
        proc.stdout[-3000:] + proc.stderr[-5000:])
    return [json.loads(m.read_text()) for m in markers]


def metrics(out: Path, key: str = "loss") -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m[key] for m in lines if key in m}


def single_process(out: Path, cache: str, *args: str) -> dict:
    """The reference: one process, the same global batch through gradient accumulation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain.main(["--config", TEST_CONFIG, "--cache-dir", cache, "--output-dir",
                              str(out), "--batch-size", "2", "--gradient-accumulation-steps",
                              "2", *args])
    finally:
        torch.set_num_threads(threads)


def assert_same_run(out: Path, ref: Path, rtol: float = 1e-5) -> None:
    a, b = metrics(out), metrics(ref)
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=rtol), (step, a[step], b[step])
    assert metrics(out, "val_loss") == pytest.approx(metrics(ref, "val_loss"), rel=rtol)


def test_single_process_launch_with_bf16_autocast(tmp_path, cache):
    out = tmp_path / "run"
    proc = launch("single.yaml", 1, out, cache, "--max-steps", "6", "--mixed-precision", "auto",
                  mixed_precision=None)
    succeeded(proc, out, 1)  # "auto" takes single.yaml's bf16: autocast on CPU
    assert "single x 1 / precision bf16" in proc.stdout
    curve = metrics(out)
    assert curve[6] < curve[1]


@pytest.mark.parametrize("name", ["galore_adamw", "dct_adamw", "sst_adamw"])
def test_ddp_ranks_hold_identical_parameters_and_subspaces(tmp_path, cache, name):
    """GaLore refreshes its SVD bases every 4 steps (tiny_test.yaml), DCT re-selects every
    step, SST draws its vectors from seeded generators: each rank computes its subspaces on its
    own from the all-reduced gradient, with no broadcast."""
    out = tmp_path / "ddp"
    proc = launch("ddp.yaml", 2, out, cache, "--optimizer", name, "--batch-size", "2",
                  "--check-sync-every", "4")
    r0, r1 = succeeded(proc, out, 2)
    assert "ddp x 2" in proc.stdout
    assert r0["param_digest"] == r1["param_digest"]
    assert r0["subspace_digest"] == r1["subspace_digest"]
    curve = metrics(out)
    assert curve[12] < curve[1] - 0.3
    single_process(tmp_path / "single", cache, "--optimizer", name)
    assert_same_run(out, tmp_path / "single")


@pytest.mark.slow
def test_zero1_equals_ddp_and_resumes_exactly(tmp_path, cache):
    """--zero1 true (ZeroRedundancyOptimizer: each rank keeps the state of its share of the
    parameters, GaLore refreshing every 4 steps) trains exactly as plain DDP, holds less state
    per rank, and resumes from a step-4 checkpoint bit for bit."""
    args = ["--optimizer", "galore_adamw", "--max-steps", "8", "--batch-size", "2"]
    ddp = tmp_path / "ddp"
    plain = succeeded(launch("ddp.yaml", 2, ddp, cache, *args), ddp, 2)
    full = tmp_path / "zero1"
    first = succeeded(launch("ddp.yaml", 2, full, cache, *args, "--zero1", "true",
                             "--save-every", "4"), full, 2)
    assert metrics(full) == metrics(ddp) and metrics(full, "val_loss") == metrics(ddp, "val_loss")
    assert first[0]["param_digest"] == first[1]["param_digest"] == plain[0]["param_digest"]
    zero_bytes = metrics(full, "state_bytes")
    assert max(zero_bytes.values()) < 0.8 * max(metrics(ddp, "state_bytes").values())
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_4", resumed / "checkpoints" / "step_4")
    proc = launch("ddp.yaml", 2, resumed, cache, *args, "--zero1", "true", "--resume-from",
                  "latest")
    second = succeeded(proc, resumed, 2)
    assert "resumed from" in proc.stdout
    assert [r["param_digest"] for r in second] == [r["param_digest"] for r in first]
    assert metrics(resumed) == {k: v for k, v in metrics(full).items() if k > 4}


FSDP2_SUPPORTED = ["adamw", "galore_adamw", "dct_adamw", "lora"]


@pytest.mark.parametrize("name", FSDP2_SUPPORTED)
def test_fsdp2_equals_the_single_process_run(tmp_path, cache, name):
    out = tmp_path / "fsdp"
    args = ["--optimizer", name, "--max-steps", "8", "--save-final-model", "true"]
    proc = launch("fsdp2.yaml", 2, out, cache, *args, "--batch-size", "2")
    succeeded(proc, out, 2)
    assert "fsdp x 2" in proc.stdout
    single_process(tmp_path / "single", cache, *args)
    assert_same_run(out, tmp_path / "single")
    sharded = load_file(out / "final" / "model.safetensors")
    reference = load_file(tmp_path / "single" / "final" / "model.safetensors")
    assert sharded.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(sharded[key], reference[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("name, reason", [
    ("galore_adafactor", "inner rule 'adafactor' is not elementwise"),
    ("sst_adamw", "does not support FSDP2: Sparse Spectral Training"),
])
def test_fsdp2_unsupported_optimizers_fail_fast_with_the_documented_error(tmp_path, cache,
                                                                          name, reason):
    out = tmp_path / "fsdp"
    proc = launch("fsdp2.yaml", 2, out, cache, "--optimizer", name, "--batch-size", "2")
    assert proc.returncode != 0
    assert "NotImplementedError" in proc.stderr and reason in proc.stderr
    assert not (out / "metrics.jsonl").exists()  # stopped at the first step, before any log
    assert not list(out.glob("rank*.json"))


def test_fsdp2_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, cache):
    """Sharded checkpoint (torch.distributed.checkpoint through accelerate) at step 4, GaLore
    refreshing every 4 steps: the resumed run matches bit for bit on every rank."""
    args = ["--optimizer", "galore_adamw", "--max-steps", "8", "--batch-size", "2"]
    full = tmp_path / "full"
    first = succeeded(launch("fsdp2.yaml", 2, full, cache, *args, "--save-every", "4"), full, 2)
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_4", resumed / "checkpoints" / "step_4")
    proc = launch("fsdp2.yaml", 2, resumed, cache, *args, "--resume-from", "latest")
    second = succeeded(proc, resumed, 2)
    assert "resumed from" in proc.stdout
    for a, b in zip(first, second, strict=True):
        assert a["param_digest"] == b["param_digest"], a["rank"]
        assert a["subspace_digest"] == b["subspace_digest"] and a["val_loss"] == b["val_loss"]
    assert metrics(resumed) == {k: v for k, v in metrics(full).items() if k > 4}


def test_demo_launches_the_recipe_per_optimizer_and_prints_the_table(tmp_path, cache, capsys):
    """scripts/demo.sh's job (recipes.demo), cut down to two optimizers and the test config."""
    from recipes import demo

    out = tmp_path / "demo"
    summaries = demo.main(["--config", TEST_CONFIG, "--optimizers", "adamw", "galore_adamw",
                           "--output-dir", str(out), "--", "--cache-dir", cache,
                           "--max-steps", "4"])
    assert [s["optimizer"] for s in summaries] == ["adamw", "galore_adamw"]
    table = (out / "table.txt").read_text()
    assert table.splitlines()[0].split()[:3] == ["optimizer", "val", "loss"]
    assert table in capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:]  # the rows: between the header and the notes
            for line in table.split("\n\n")[0].splitlines()[2:]}
    assert set(rows) == {"adamw", "galore_adamw"}
    # GaLore's projected moments are smaller than AdamW's full ones
    assert int(rows["galore_adamw"][2].replace(",", "")) < int(rows["adamw"][2].replace(",", ""))


@pytest.mark.parametrize("saved, resumed", [
    (("fsdp2.yaml", 2), ("fsdp2.yaml", 1)),
    (("fsdp2.yaml", 1), ("fsdp2.yaml", 2)),
    (("ddp.yaml", 2), ("single.yaml", 1)),
], ids=["fsdp2-2to1", "fsdp2-1to2", "ddp2-to-single"])
def test_checkpoint_resumes_on_another_number_of_processes(tmp_path, cache, saved, resumed):
    """A checkpoint written by N processes resumes on M: FSDP2's sharded state
    (``torch.distributed.checkpoint`` through accelerate) is resharded, DDP's replicated state
    is the one-process state.  The global batch is kept (per-process batch 2 x accumulation
    2 / N); the run continues as the uninterrupted one to rounding (32- vs 64-row shards and
    summation orders round differently), GaLore refreshing right after the resume.  Scaling
    the loaded moments by 0.9 fails this comparison (step 5: 5.8304 vs 5.8282)."""
    def args(nproc: int) -> list[str]:
        return ["--optimizer", "galore_adamw", "--max-steps", "8", "--batch-size", "2",
                "--gradient-accumulation-steps", str(2 // nproc), "--save-every", "4"]

    (saved_config, saved_on), (resumed_config, resumed_on) = saved, resumed
    full = tmp_path / "full"
    succeeded(launch(saved_config, saved_on, full, cache, *args(saved_on)), full, saved_on)
    copy = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_4", copy / "checkpoints" / "step_4")
    flags = ["--resume-from", "latest", "--allow-config-change", "true"]
    if resumed_on > saved_on:  # the new processes have no saved generators
        flags += ["--allow-inexact-resume", "true"]
    proc = launch(resumed_config, resumed_on, copy, cache, *args(resumed_on), *flags)
    succeeded(proc, copy, resumed_on)
    assert "resumed from" in proc.stdout and "num_processes: saved" in proc.stderr
    ref, got = metrics(full), metrics(copy)
    assert got.keys() == {k for k in ref if k > 4}
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got[step], ref[step])
