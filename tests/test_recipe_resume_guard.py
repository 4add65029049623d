"""Resuming the recipe: settings that differ from the checkpoint's are refused before
anything is loaded (or, with ``--allow-config-change true``, logged); incomplete or unreadable
checkpoints are skipped by ``latest`` and refused when named."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes import checkpoint, config, pretrain

ROOT = Path(__file__).resolve().parents[1]

TEST_CONFIG = str(ROOT / "recipes" / "configs" / "tiny_test.yaml")
COMMON = ["--optimizer", "galore_adamw", "--save-every", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and one interrupted after step 4 (checkpoints step_2, step_4)."""
    root = tmp_path_factory.mktemp("guard")
    cache = str(root / "cache")
    full, cut = root / "full", root / "cut"
    torch.set_num_threads(1)
    run(full, cache, *COMMON)
    run(cut, cache, *COMMON, "--stop-after", "4")
    return {"cache": cache, "full": full, "cut": cut}


def run(out: Path, cache: str, *args: str) -> dict:
    return pretrain.main(["--config", TEST_CONFIG, "--cache-dir", cache,
                          "--output-dir", str(out), *args])


def copy_run(runs, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(runs["cut"], out)
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_equals_full_run(out: Path, full: Path) -> None:
    a, b = (json.loads((d / "rank0.json").read_text()) for d in (out, full))
    assert a["param_digest"] == b["param_digest"] and a["subspace_digest"] == b[
        "subspace_digest"]
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(out)
             if "config_changes" not in r]
    assert strip == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(full)]


# -- B: settings that differ from the checkpoint's ---------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["--optimizer", "dct_adamw"], "optimizer: saved 'galore_adamw', now 'dct_adamw'"),
    (["--rank", "4"], "rank: saved 8, now 4"),
    (["--proj-type", "left"], "proj_type: saved 'std', now 'left'"),
    (["--update-proj-gap", "3"], "update_proj_gap: saved 4, now 3"),
    (["--scale", "0.5"], "scale: saved 0.25, now 0.5"),
    (["--optimizer-kwargs", '{"bits": 8}'], "optimizer_kwargs: saved {}, now {'bits': 8}"),
    (["--model", "60m"], "model: saved 'tiny', now '60m'"),
    (["--model-overrides", '{"num_hidden_layers": 1}'], "model_overrides: saved {}"),
    (["--seq-len", "32"], "seq_len: saved 64, now 32"),
    (["--batch-size", "2"], "global batch: saved 4 sequences per step, now 2"),
    (["--gradient-accumulation-steps", "2"], "gradient_accumulation_steps: saved 1, now 2"),
    (["--lr", "0.02"], "lr: saved 0.01, now 0.02"),
    (["--betas", "0.8", "0.9"], "betas: saved None, now [0.8, 0.9]"),
    (["--max-steps", "20"], "max_steps: saved 12, now 20"),
    (["--seed", "1"], "seed: saved 0, now 1"),
    (["--tokenizer", "bytes"], "tokenizer: saved 'bpe', now 'bytes'"),
], ids=lambda x: x[0] if isinstance(x, list) else None)
def test_a_changed_setting_is_refused_before_anything_is_loaded(runs, args, expected):
    before = (runs["cut"] / "metrics.jsonl").read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match="was saved with other settings") as e:
        run(runs["cut"], runs["cache"], *COMMON, "--resume-from", "latest", *args)
    assert expected in str(e.value) and "--allow-config-change true" in str(e.value)
    assert (runs["cut"] / "metrics.jsonl").read_bytes() == before  # nothing touched


@pytest.mark.parametrize("saved, expected", [
    ({"num_processes": 2}, ["num_processes: saved 2, now 1",
                            "global batch: saved 8 sequences per step, now 4"]),
    ({"engine": "fsdp"}, ["engine: saved 'fsdp', now 'single'"]),
    ({"mixed_precision": "bf16"}, ["mixed_precision: saved 'bf16', now 'no'"]),
])
def test_another_world_size_engine_or_precision_is_refused(runs, tmp_path, saved, expected):
    out = copy_run(runs, tmp_path)
    path = out / "checkpoints" / "step_4" / checkpoint.SETTINGS_FILE
    data = json.loads(path.read_text())
    data["settings"].update(saved)
    path.write_text(json.dumps(data))
    with pytest.raises(checkpoint.CheckpointError) as e:
        run(out, runs["cache"], *COMMON, "--resume-from", str(path.parent))
    assert all(x in str(e.value) for x in expected), str(e.value)


def test_every_difference_is_listed(runs):
    with pytest.raises(checkpoint.CheckpointError) as e:
        run(runs["cut"], runs["cache"], *COMMON, "--resume-from", "latest", "--rank", "4",
            "--seq-len", "32")
    assert "rank: saved 8, now 4" in str(e.value) and "seq_len: saved 64, now 32" in str(e.value)


def test_output_settings_may_change(runs, tmp_path):
    out = copy_run(runs, tmp_path)
    s = run(out, runs["cache"], *COMMON, "--resume-from", "latest", "--eval-every", "6",
            "--keep-checkpoints", "3", "--report-to", "console")
    assert s["finished"] and s["config_changes"] == {}


def test_allow_config_change_resumes_and_logs_the_differences(runs, tmp_path, capsys):
    out = copy_run(runs, tmp_path)
    s = run(out, runs["cache"], *COMMON, "--resume-from", "latest", "--max-grad-norm", "1.0",
            "--allow-config-change", "true")
    change = {"max_grad_norm": {"saved": 0.0, "now": 1.0}}
    assert s["finished"] and s["config_changes"] == change
    assert s["resumed_from"].endswith("step_4")
    assert json.loads((out / "summary.json").read_text())["config_changes"] == change
    lines = [r for r in records(out) if "config_changes" in r]
    assert lines == [{"step": 4, "resumed_from": s["resumed_from"], "config_changes": change}]
    assert "max_grad_norm: saved 0.0, now 1.0" in capsys.readouterr().err
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == list(range(1, 13))


def test_a_checkpoint_without_settings_needs_the_flag(runs, tmp_path):
    out = copy_run(runs, tmp_path)
    (out / "checkpoints" / "step_4" / checkpoint.SETTINGS_FILE).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="recipe_settings.json is missing"):
        run(out, runs["cache"], *COMMON, "--resume-from", "latest")
    s = run(out, runs["cache"], *COMMON, "--resume-from", "latest", "--allow-config-change",
            "true")
    assert s["finished"]
    assert_equals_full_run(out, runs["full"])


def test_stop_after_at_or_before_the_checkpoint_is_refused(runs):
    with pytest.raises(config.RecipeError, match="stop_after=4: not after step 4"):
        run(runs["cut"], runs["cache"], *COMMON, "--resume-from", "latest", "--stop-after", "4")


def test_the_command_line_exits_with_2_and_no_traceback(runs, capsys):
    args = ["--config", TEST_CONFIG, "--cache-dir", runs["cache"], "--output-dir",
            str(runs["cut"]), *COMMON, "--resume-from", "latest", "--rank", "4"]
    assert pretrain.cli(args) == 2
    err = capsys.readouterr().err
    assert "error: resume_from:" in err and "rank: saved 8, now 4" in err
    assert "Traceback" not in err


# -- A: incomplete or unreadable checkpoints ---------------------------------------------------
def test_latest_skips_an_unreadable_checkpoint_and_resumes_the_previous_one(runs, tmp_path):
    """The original bug: an empty ``train_state.json`` (a kill between open and write) counted
    as complete and ``latest`` crashed with a JSONDecodeError."""
    out = copy_run(runs, tmp_path)
    (out / "checkpoints" / "step_4" / "train_state.json").write_text("")
    assert [p.name for p in checkpoint.checkpoints(out)] == ["step_2"]
    with pytest.warns(RuntimeWarning, match="skipping .*step_4.*train_state.json is unreadable"):
        s = run(out, runs["cache"], *COMMON, "--resume-from", "latest")
    assert s["resumed_from"].endswith("step_2") and s["train_steps_this_run"] == 10
    assert_equals_full_run(out, runs["full"])


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "train_state.json").unlink(),
     "train_state.json is missing: the checkpoint is incomplete"),
    (lambda d: (d / "train_state.json").write_text(""), "train_state.json is unreadable"),
    (lambda d: (d / "train_state.json").write_text("[1, 2]"), "train_state.json is unreadable"),
    (lambda d: (d / "optimizer.bin").unlink(), "optimizer.bin is missing"),
    (lambda d: (d / "model.safetensors").write_bytes(b"x"), "model.safetensors has 1 bytes"),
    (lambda d: (d / checkpoint.SETTINGS_FILE).write_text("{"),
     "recipe_settings.json is unreadable"),
], ids=["no-marker", "empty-marker", "bad-marker", "missing-file", "truncated-file",
        "bad-settings"])
def test_an_explicit_incomplete_checkpoint_is_refused_naming_the_file(runs, tmp_path, damage,
                                                                      expected):
    out = copy_run(runs, tmp_path)
    directory = out / "checkpoints" / "step_4"
    damage(directory)
    with pytest.raises(checkpoint.CheckpointError, match="cannot be resumed") as e:
        run(out, runs["cache"], *COMMON, "--resume-from", str(directory))
    assert expected in str(e.value) and str(directory) in str(e.value)


def test_an_explicit_missing_directory_is_refused(runs, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint directory"):
        run(tmp_path / "out", runs["cache"], *COMMON, "--resume-from", str(tmp_path / "nope"))


def test_resuming_an_earlier_checkpoint_sets_later_ones_aside(runs, tmp_path):
    out = copy_run(runs, tmp_path)
    with pytest.warns(RuntimeWarning, match="step_4 is later than the step this run starts"):
        s = run(out, runs["cache"], *COMMON, "--resume-from", str(out / "checkpoints" / "step_2"),
                "--stop-after", "3")
    assert s["step"] == 3 and (out / "checkpoints" / "superseded_step_4").is_dir()
    assert [p.name for p in checkpoint.checkpoints(out)] == ["step_2", "step_3"]
    run(out, runs["cache"], *COMMON, "--resume-from", "latest")
    assert_equals_full_run(out, runs["full"])


def test_a_checkpoint_between_log_lines_keeps_the_loss_interval(runs, tmp_path):
    """``--log-every 3`` with a checkpoint after step 4: the step-6 line still averages steps
    4-6, as in the uninterrupted run."""
    args = ["--optimizer", "adamw", "--log-every", "3", "--max-steps", "6"]
    run(tmp_path / "full", runs["cache"], *args)
    run(tmp_path / "cut", runs["cache"], *args, "--stop-after", "4")
    run(tmp_path / "cut", runs["cache"], *args, "--resume-from", "latest")
    assert_equals_full_run(tmp_path / "cut", tmp_path / "full")


def test_a_bad_flag_from_the_shell_exits_with_2_and_names_the_flag(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "recipes.pretrain", "--config", TEST_CONFIG,
                           "--rank", "0", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "pretrain.py: error: rank=0: must be >= 1 (set with --rank" in proc.stderr
    assert "Traceback" not in proc.stderr
