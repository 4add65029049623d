"""Every run writes to a directory of its own (issue 16, item 9): runs of one config never
overwrite each other, ``--resume-from latest`` still finds the run's checkpoints, an explicit
``--output-dir`` is used as given, every process of a launched run agrees on the directory, and
the recipe says where the run went."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from recipes import checkpoint, pretrain
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = str(ROOT / "recipes" / "configs" / "tiny_test.yaml")
STAMPED = r"(?P<name>[a-z0-9_]+)-\d{8}-\d{6}(-\d+)?"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("recipe-cache"))


def run(runs: Path, cache: str, *args: str) -> dict:
    """The recipe without --output-dir: its directory is chosen under ``runs``."""
    return pretrain.main(["--config", TEST_CONFIG, "--cache-dir", cache, "--runs-dir",
                          str(runs), "--max-steps", "2", *args])


def steps(out: Path) -> list[int]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["step"] for m in lines if "loss" in m]


# -- naming ---------------------------------------------------------------------------------
def test_a_run_directory_is_claimed_once_per_name(tmp_path):
    now = 1_700_000_000.0
    first = checkpoint.new_run_directory(tmp_path, "adamw", now=now)
    second = checkpoint.new_run_directory(tmp_path, "adamw", now=now)  # the same second
    assert first.is_dir() and second.is_dir() and first != second
    assert re.fullmatch(STAMPED, first.name) and second.name == first.name + "-2"
    assert checkpoint.new_run_directory(tmp_path, now=now).name == first.name.split("-", 1)[1]


def test_run_directories_sort_by_time_then_suffix_and_keep_to_the_optimizer(tmp_path):
    names = ["galore_adamw-20250101-120000-10", "galore_adamw-20250101-120000",
             "galore_adamw-20250101-120000-2", "galore_adamw-20240101-000000",
             "galore_adamw8bit-20260101-000000", "galore_adamw-notes", "galore_adamw-x-1"]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "galore_adamw-20270101-000000").write_text("a file, not a run")
    found = [p.name for p in checkpoint.run_directories(tmp_path, "galore_adamw")]
    assert found == ["galore_adamw-20240101-000000", "galore_adamw-20250101-120000",
                     "galore_adamw-20250101-120000-2", "galore_adamw-20250101-120000-10"]


# -- fresh runs -----------------------------------------------------------------------------
def test_runs_of_one_config_get_directories_of_their_own(tmp_path, cache, capsys):
    runs = tmp_path / "runs"
    a = run(runs, cache, "--optimizer", "adamw", "--report-to", "console", "tensorboard")
    out_a = capsys.readouterr().out
    b = run(runs, cache, "--optimizer", "galore_adamw")
    c = run(runs, cache, "--optimizer", "galore_adamw")  # the same optimizer again
    dirs = {Path(s["output_dir"]) for s in (a, b, c)}
    assert len(dirs) == 3 and {d.parent for d in dirs} == {runs}
    assert sorted(p.name for p in runs.iterdir()) == sorted(d.name for d in dirs)
    for s in (a, b, c):
        out = Path(s["output_dir"])
        assert re.fullmatch(STAMPED, out.name)["name"] == s["optimizer"]
        assert json.loads((out / "summary.json").read_text()) == s
        assert steps(out) == [1, 2] and (out / "rank0.json").exists()
    where = Path(a["output_dir"])
    assert list(where.rglob("events.out.tfevents.*"))  # TensorBoard follows the run's directory
    assert f"[pretrain] output_dir: {where} (a new run under runs_dir={runs})" in out_a
    assert f"[pretrain] wrote {where / 'summary.json'}" in out_a


def test_an_explicit_output_dir_is_used_as_given(tmp_path, cache, capsys):
    out = tmp_path / "exactly" / "here"
    s = run(tmp_path / "runs", cache, "--optimizer", "adamw", "--output-dir", str(out))
    assert s["output_dir"] == str(out) and (out / "summary.json").exists()
    assert not (tmp_path / "runs").exists()
    assert f"[pretrain] output_dir: {out} (as given by output_dir)" in capsys.readouterr().out


def test_the_summary_lines_have_a_header(tmp_path, cache, capsys):
    s = run(tmp_path / "runs", cache, "--optimizer", "adamw")
    lines = [line.removeprefix("[pretrain] ") for line in capsys.readouterr().out.splitlines()
             if line.startswith("[pretrain] ")]
    head = next(i for i, line in enumerate(lines) if line.startswith("optimizer "))
    assert "B/trained param" in lines[head] and "trained params" in lines[head]
    assert set(lines[head + 1]) == {"-"}
    assert lines[head + 2] == pretrain.summary_line(s)


# -- resume ---------------------------------------------------------------------------------
def test_resume_continues_the_run_in_its_own_directory(tmp_path, cache, capsys):
    """An interrupted run resumed by its checkpoint's directory, then by ``latest``, while a
    newer run of the same optimizer (finished, no checkpoint) and one with only an incomplete
    checkpoint sit next to it, and a run of another optimizer: all continue the first run."""
    runs, common = tmp_path / "runs", ["--optimizer", "galore_adamw", "--max-steps", "6"]
    first = run(runs, cache, *common, "--stop-after", "3")
    out = Path(first["output_dir"])
    assert not first["finished"] and checkpoint.checkpoints(out)[-1].name == "step_3"
    run(runs, cache, *common)  # newer, no checkpoint
    run(runs, cache, "--optimizer", "adamw", "--max-steps", "6", "--stop-after", "3")
    broken = runs / "galore_adamw-29991231-235959" / "checkpoints" / "step_5"
    broken.mkdir(parents=True)  # newest, its only checkpoint incomplete
    before = sorted(p.name for p in runs.iterdir())
    capsys.readouterr()

    second = run(runs, cache, *common, "--stop-after", "4",
                 "--resume-from", str(out / "checkpoints" / "step_3"))
    assert second["output_dir"] == str(out) and second["step"] == 4
    assert "(the run of resume_from=" in capsys.readouterr().out
    with pytest.warns(RuntimeWarning, match=r"skipping run .*galore_adamw-29991231-235959: "
                      r"none of its checkpoints is complete"):
        third = run(runs, cache, *common, "--resume-from", "latest")
    assert third["output_dir"] == str(out) and third["finished"] and third["step"] == 6
    assert third["resumed_from"] == str(out / "checkpoints" / "step_4")
    assert "(the newest run with a complete checkpoint (resume_from=latest))" in (
        capsys.readouterr().out)
    assert steps(out) == [1, 2, 3, 4, 5, 6]  # each step once, in the one directory
    assert sorted(p.name for p in runs.iterdir()) == before  # no new run directory


def test_latest_without_a_checkpoint_starts_a_new_run_and_points_at_old_ones(tmp_path, cache,
                                                                            capsys):
    runs = tmp_path / "runs"
    # a checkpoint written straight into runs_dir, as runs did before they had directories
    run(runs, cache, "--optimizer", "adamw", "--output-dir", str(runs), "--stop-after", "1")
    capsys.readouterr()
    s = run(runs, cache, "--optimizer", "adamw", "--resume-from", "latest")
    assert s["resumed_from"] is None and s["step"] == 2
    assert Path(s["output_dir"]).parent == runs
    err = capsys.readouterr().err
    assert f"no complete checkpoint in {runs / 'adamw-*'}: starting a new run" in err
    assert f"pass --output-dir {runs} to resume it" in err


# -- processes agree ------------------------------------------------------------------------
@pytest.mark.slow
def test_launched_processes_agree_on_the_new_directory(tmp_path, cache):
    """Two DDP processes started in different seconds would stamp different names: the main
    process chooses, the other receives it; one directory holds both ranks' markers."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(free_port()), "-m",
           "recipes.pretrain",
           "--config", TEST_CONFIG, "--cache-dir", cache, "--runs-dir", str(runs),
           "--max-steps", "2", "--batch-size", "2", "--optimizer", "adamw"]
    pretrain.load_data(pretrain.parse_args(["--config", TEST_CONFIG, "--cache-dir", cache]))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (out,) = runs.iterdir()
    assert (out / "rank0.json").exists() and (out / "rank1.json").exists()
    assert json.loads((out / "summary.json").read_text())["num_processes"] == 2
    assert done.stdout.count("[pretrain] output_dir:") == 1  # said once, by the main process
