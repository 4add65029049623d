"""The pretraining recipe on one process (in-process runs of recipes.pretrain)."""

import json
from pathlib import Path

import pytest
import torch

from recipes import checkpoint, config, pretrain

ROOT = Path(__file__).resolve().parents[1]

TEST_CONFIG = str(ROOT / "recipes" / "configs" / "tiny_test.yaml")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("recipe-cache"))


pytestmark = pytest.mark.usefixtures("one_thread")


def run(out: Path, cache: str, *args: str) -> dict:
    return pretrain.main(["--config", TEST_CONFIG, "--cache-dir", cache,
                          "--output-dir", str(out), *args])


def losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


@pytest.mark.parametrize("name", config.optimizer_names())
def test_every_optimizer_trains_and_reports(tmp_path, cache, name):
    s = run(tmp_path, cache, "--optimizer", name)
    assert s["finished"] and s["step"] == 12 and s["optimizer"] == name
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, 13))
    assert sum(list(curve.values())[-3:]) < sum(list(curve.values())[:3]) - 0.3  # learns
    assert s["val_loss"] < 6.0 and s["val_ppl"] == pytest.approx(torch.tensor(
        s["val_loss"]).exp().item(), rel=1e-5)
    assert s["state_bytes"] > 0 and s["tokens_per_s"] > 0
    assert json.loads((tmp_path / "summary.json").read_text()) == s
    assert json.loads((tmp_path / "rank0.json").read_text())["step"] == 12
    assert name in pretrain.format_table([s])


@pytest.mark.parametrize("name", ["galore_adamw", "dct_adamw", "sst_adamw", "lora"])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, cache, name):
    """Interrupted after step 5 (GaLore refreshes every 4 steps), resumed in a fresh run from
    the checkpoint: same losses and bit-identical parameters at step 12.  Gradient
    accumulation 2 checks that accelerate's micro-step counter is restored too."""
    common = ["--optimizer", name, "--gradient-accumulation-steps", "2", "--batch-size", "2"]
    run(tmp_path / "full", cache, *common)
    cut = tmp_path / "cut"
    first = run(cut, cache, *common, "--stop-after", "5")
    assert not first["finished"] and checkpoint.checkpoints(cut)[-1].name == "step_5"
    s = run(cut, cache, *common, "--resume-from", "latest")  # a fresh run, same output_dir
    assert s["finished"] and s["train_steps_this_run"] == 7
    full, resumed = losses(tmp_path / "full"), losses(cut)
    assert sorted(resumed) == list(range(1, 13)) and resumed == full
    a, b = (json.loads((d / "rank0.json").read_text()) for d in (tmp_path / "full", cut))
    assert a["param_digest"] == b["param_digest"] and a["subspace_digest"] == b[
        "subspace_digest"] and a["val_loss"] == b["val_loss"]


def test_a_refresh_schedule_times_the_refreshes_and_resumes_exactly(tmp_path, cache):
    """``--refresh-schedule``: lowrank_optim.schedules in the recipe's loop (gradient
    accumulation 2), its state in the checkpoint, the resumed run bit-identical."""
    schedule = '{"kind": "growing", "gap": 2, "factor": 2.0}'
    common = ["--optimizer", "galore_adamw", "--gradient-accumulation-steps", "2",
              "--batch-size", "2"]
    run(tmp_path / "plain", cache, *common)
    run(tmp_path / "full", cache, *common, "--refresh-schedule", schedule)
    cut = tmp_path / "cut"
    run(cut, cache, *common, "--refresh-schedule", schedule, "--stop-after", "5")
    saved = json.loads((cut / "checkpoints" / "step_5" / checkpoint.REFRESH_FILE).read_text())
    assert saved["schedule"] == {"kind": "growing", "gap": 2, "factor": 2.0, "max_gap": None}
    assert {layer["gap"] for layer in saved["layers"]} == {4}  # one refresh each, staggered
    s = run(cut, cache, *common, "--refresh-schedule", schedule, "--resume-from", "latest")
    assert s["finished"] and losses(cut) == losses(tmp_path / "full")
    digests = [json.loads((d / "rank0.json").read_text()) for d in (tmp_path / "full", cut,
                                                                    tmp_path / "plain")]
    assert digests[0]["param_digest"] == digests[1]["param_digest"]
    assert digests[0]["subspace_digest"] == digests[1]["subspace_digest"]
    assert digests[0]["subspace_digest"] != digests[2]["subspace_digest"]  # not the gap of 4


def test_periodic_checkpoints_evaluation_and_trackers(tmp_path, cache):
    s = run(tmp_path, cache, "--save-every", "3", "--keep-checkpoints", "2", "--eval-every", "4",
            "--report-to", "console", "tensorboard", "--save-final-model", "true")
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_9", "step_12"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "val_loss" in m] == [4, 8, 12]
    assert lines[-1]["val_loss"] == s["val_loss"]
    assert list(tmp_path.rglob("events.out.tfevents.*"))  # accelerate's tensorboard tracker
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_local_text_files_with_byte_tokens(tmp_path, cache):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(30):
        (texts / f"doc{i:02d}.txt").write_text(f"Document {i}. " + "the quick brown fox " * 40)
    s = run(tmp_path / "out", cache, "--data", str(texts / "*.txt"), "--tokenizer", "bytes",
            "--optimizer", "adamw", "--val-fraction", "0.2", "--max-steps", "4")
    assert s["finished"] and s["data"].startswith("1 file pattern(s), bytes")
    assert torch.isfinite(torch.tensor(s["val_loss"]))
