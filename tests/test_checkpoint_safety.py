"""Resuming never runs code planted in a checkpoint, and never silently drops part of it
(issue 19): checkpoints of the recipe (``recipes.pretrain``) and Trainer checkpoints written with
our callbacks.

A payload is a pickle whose unpickling runs ``touch MARKER``; it is planted in place of each file
of a checkpoint in turn (the manifest's recorded size updated, as an attacker would), and the
resume must refuse it, naming the file, without the marker ever appearing.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from transformers import Trainer

import trainer_callbacks as tc
from lowrank_optim import safe_load
from recipes import checkpoint as recipe_checkpoint
from recipes import pretrain
from tests.helpers import tiny_llama
from tests.test_trainer_swap import dataset, training_args  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]

TEST_CONFIG = str(ROOT / "recipes" / "configs" / "tiny_test.yaml")
ARGS = ["--optimizer", "galore_adamw", "--max-steps", "6", "--save-every", "3"]


class Payload:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, how: str) -> None:
    """Replace ``path`` with a payload written by ``torch.save`` or ``pickle.dump``."""
    if how == "torch":
        torch.save({"state": Payload(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(Payload(marker), f)


def run(out: Path, cache: str, *args: str) -> dict:
    return pretrain.main(["--config", TEST_CONFIG, "--cache-dir", cache, "--output-dir",
                          str(out), *ARGS, *args])


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A run interrupted after step 3 (checkpoint step_3), and the uninterrupted run."""
    root = tmp_path_factory.mktemp("safety")
    cache = str(root / "cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(root / "cut", cache, "--stop-after", "3")
        run(root / "full", cache)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "cache": cache, "cut": root / "cut", "full": root / "full"}


def _copy(recipe, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(recipe["cut"], out)
    return out, out / "checkpoints" / "step_3"


def _fix_manifest(checkpoint: Path, name: str, remove: bool = False) -> None:
    """Record ``name``'s new size in train_state.json (or drop it from the list)."""
    path = checkpoint / recipe_checkpoint.STATE_FILE
    state = json.loads(path.read_text())
    if remove:
        state["files"].pop(name)
    else:
        state["files"][name] = (checkpoint / name).stat().st_size
    path.write_text(json.dumps(state))


def test_the_recipe_writes_no_pickle_that_it_reads_unsafely(recipe):
    checkpoint = recipe["cut"] / "checkpoints" / "step_3"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert not [n for n in names if n.endswith(".pkl")], names  # accelerate's pickles are gone
    assert {"scheduler.json", "rng_state_0.json", "model.safetensors"} <= set(names)
    kinds = safe_load.check_directory(checkpoint)
    assert {k for n, k in kinds.items() if n != "optimizer.bin"} <= {"json", "safetensors"}
    assert kinds["optimizer.bin"] == "torch"  # loads with torch.load(weights_only=True)


def test_a_payload_in_any_file_of_a_recipe_checkpoint_is_refused(recipe, tmp_path):
    """Every file of the checkpoint (listed, not hard-coded), planted with torch.save and with
    pickle.dump, plus accelerate's pickles the recipe no longer writes: each resume fails
    before anything is loaded, naming the file, and no payload runs."""
    files = sorted(p.name for p in (recipe["cut"] / "checkpoints" / "step_3").iterdir())
    cases = [(name, how) for name in files for how in ("torch", "pickle")]
    cases += [("custom_checkpoint_0.pkl", "torch"), ("random_states_0.pkl", "torch")]
    marker = tmp_path / "MARKER"
    for name, how in cases:
        out, checkpoint = _copy(recipe, tmp_path)
        plant(checkpoint / name, marker, how)
        if name != recipe_checkpoint.STATE_FILE and name in files:
            _fix_manifest(checkpoint, name)
        with pytest.raises(recipe_checkpoint.CheckpointError) as e:
            run(out, recipe["cache"], "--resume-from", str(checkpoint))
        message = str(e.value)
        assert str(checkpoint / name) in message, (name, how, message)
        assert any(w in message for w in ("refused", "unreadable")), (name, how, message)
        if name.endswith((".bin", ".pkl")):
            assert "refused" in message and "posix.system" in message or (
                "accelerate would unpickle" in message), (name, how, message)
        assert not marker.exists(), f"the payload in {name} ({how}) ran"


def test_a_corrupted_or_missing_rng_file_fails_the_resume_unless_allowed(recipe, tmp_path,
                                                                        capsys):
    out, checkpoint = _copy(recipe, tmp_path)
    rng = checkpoint / "rng_state_0.json"
    data = json.loads(rng.read_text())
    data["numpy"][1] = data["numpy"][1][:100]  # numpy's key cut short: parses, cannot restore
    rng.write_text(json.dumps(data))
    _fix_manifest(checkpoint, rng.name)
    with pytest.raises(recipe_checkpoint.CheckpointError) as e:
        run(out, recipe["cache"], "--resume-from", str(checkpoint))
    assert f"{rng} is unreadable" in str(e.value) and "--allow-inexact-resume" in str(e.value)

    rng.write_bytes(rng.read_bytes()[: rng.stat().st_size // 2])  # truncated
    _fix_manifest(checkpoint, rng.name)
    with pytest.raises(recipe_checkpoint.CheckpointError, match=f"{rng} is unreadable"):
        run(out, recipe["cache"], "--resume-from", str(checkpoint))
    copy, _ = _copy(recipe, tmp_path / "truncated")  # accepted as inexact with the flag
    shutil.copy(rng, copy / "checkpoints" / "step_3" / rng.name)
    _fix_manifest(copy / "checkpoints" / "step_3", rng.name)
    summary = run(copy, recipe["cache"], "--resume-from", "latest", "--allow-inexact-resume",
                  "true")
    assert summary["finished"] and "rng_state_0.json is unreadable" in summary[
        "inexact_resume"][0]

    rng.unlink()
    _fix_manifest(checkpoint, rng.name, remove=True)
    with pytest.raises(recipe_checkpoint.CheckpointError, match="rng_state_0.json is missing"):
        run(out, recipe["cache"], "--resume-from", str(checkpoint))
    capsys.readouterr()
    summary = run(out, recipe["cache"], "--resume-from", str(checkpoint),
                  "--allow-inexact-resume", "true")
    assert summary["finished"] and len(summary["inexact_resume"]) == 1
    assert "rng_state_0.json is missing" in summary["inexact_resume"][0]
    assert json.loads((out / "summary.json").read_text())["inexact_resume"] == (
        summary["inexact_resume"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "inexact_resume" in x] == [3]
    assert "inexact resume" in capsys.readouterr().err


def test_a_clean_resume_is_exact_and_says_so(recipe, tmp_path):
    out, checkpoint = _copy(recipe, tmp_path)
    summary = run(out, recipe["cache"], "--resume-from", str(checkpoint))
    assert summary["finished"] and summary["inexact_resume"] == []
    a, b = (json.loads((d / "rank0.json").read_text()) for d in (out, recipe["full"]))
    assert a["param_digest"] == b["param_digest"]


def test_safe_load_refuses_truncated_and_foreign_files(tmp_path):
    marker = tmp_path / "MARKER"
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3), "step": 1}, good)
    assert safe_load.check_file(good) == "torch"
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(safe_load.UnsafeFileError, match="cut.pt: unreadable"):
        safe_load.check_file(cut)
    meta = tmp_path / ".metadata"
    plant(meta, marker, "pickle")
    with pytest.raises(safe_load.UnsafeFileError, match="posix.system, which is not allowed"):
        safe_load.check_file(meta, pickle_globals=safe_load.DCP_METADATA_GLOBALS)
    with pytest.raises(safe_load.UnsafeFileError, match="is missing"):
        safe_load.check_file(tmp_path / "absent.bin")
    assert not marker.exists()



def test_a_payload_in_an_fsdp2_style_dcp_checkpoint_is_refused(tmp_path):
    """FSDP2's sharded checkpoints are torch.distributed.checkpoint directories: ``.metadata``
    (read with pickle.load) and non-tensor items (read with weights_only=False)."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "MARKER"
    dcp.save({"w": torch.ones(2), "meta": {"step": 1}}, checkpoint_id=str(tmp_path / "ok"),
             no_dist=True)
    safe_load.check_directory(tmp_path / "ok")
    dcp.save({"w": torch.ones(2), "meta": Payload(marker)},
             checkpoint_id=str(tmp_path / "item"), no_dist=True)
    with pytest.raises(safe_load.UnsafeFileError, match=r"item 'meta' refused as unsafe"):
        safe_load.check_directory(tmp_path / "item")
    shutil.copytree(tmp_path / "ok", tmp_path / "meta")
    plant(tmp_path / "meta" / ".metadata", marker, "pickle")
    with pytest.raises(safe_load.UnsafeFileError, match=r"\.metadata: refused as unsafe"):
        safe_load.check_directory(tmp_path / "meta")
    assert not marker.exists()

# -- the Trainer ------------------------------------------------------------------------------
def _trainer(tmp_path: Path, max_steps: int) -> Trainer:
    model = tiny_llama(seed=0)
    args = training_args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2,
                         restore_callback_states_from_checkpoint=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(16))
    tc.attach(trainer, "galore_adamw", rank=8, lr=1e-2, stats=True,
              refresh=tc.AdaptiveGap(gap=1, overlap_threshold=0.0, max_gap=4))
    return trainer


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _trainer(root, max_steps=2).train()
    finally:
        torch.set_num_threads(threads)
    return root / "out" / "checkpoint-2"


def test_callback_state_is_json_in_trainer_state(trainer_checkpoint):
    state = json.loads((trainer_checkpoint / "trainer_state.json").read_text())
    assert "SubspaceRefreshCallback" in state["stateful_callbacks"]
    names = {p.name for p in trainer_checkpoint.iterdir()}
    pickled = {n for n in names if safe_load.file_kind(trainer_checkpoint / n) in ("torch",
                                                                                    "pickle")}
    assert pickled == {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}
    kinds = tc.verify_checkpoint(trainer_checkpoint)  # tensors only, weights_only=True loads
    assert "training_args.bin" not in kinds and kinds["optimizer.pt"] == "torch"


def test_a_payload_in_a_trainer_checkpoint_never_runs(trainer_checkpoint, tmp_path):
    """Each pickle-based file planted: verify_checkpoint refuses it naming the file, and the
    Trainer's own resume (transformers 5: weights_only=True) fails or, for training_args.bin
    which it never reads, ignores it; the payload never runs."""
    marker = tmp_path / "MARKER"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin",
                     "model.safetensors"):
            checkpoint = tmp_path / name / "checkpoint-2"
            shutil.copytree(trainer_checkpoint, checkpoint)
            plant(checkpoint / name, marker, "torch")
            if name in tc.safety.NOT_READ_AT_RESUME:
                _trainer(tmp_path / name, max_steps=3).train(resume_from_checkpoint=str(
                    checkpoint))
            else:
                with pytest.raises(safe_load.UnsafeFileError) as e:
                    tc.verify_checkpoint(checkpoint)
                assert str(checkpoint / name) in str(e.value)
                assert "refused as unsafe" in str(e.value) or "unreadable" in str(e.value)
                with pytest.raises(Exception):  # noqa: B017 - torch's or safetensors' error
                    _trainer(tmp_path / name, max_steps=3).train(
                        resume_from_checkpoint=str(checkpoint))
            assert not marker.exists(), f"the payload in {name} ran"
    finally:
        torch.set_num_threads(threads)
