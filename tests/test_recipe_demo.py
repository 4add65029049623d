"""The demo and its table (issue 16, items 9 and 10): each demo writes into a directory of its
own and says where, shows "run k of N", and the table names what its bytes per parameter
divide by, with notes for LoRA's and SST's counts and SST's state bytes at redraw steps."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from recipes import demo, pretrain

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = str(ROOT / "recipes" / "configs" / "tiny_test.yaml")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("recipe-cache"))


def summary(name: str, state_bytes: int, params: int | None) -> dict:
    s = {"optimizer": name, "val_loss": 5.5, "val_ppl": 244.69, "state_bytes": state_bytes,
         "state_bytes_per_param": state_bytes / params if params else 0.0,
         "tokens_per_s": 12345.6}
    if params is not None:
        s["trained_params"] = params
    return s


# -- the table --------------------------------------------------------------------------------
def test_the_table_names_its_denominator_and_shows_it():
    rows = [summary("adamw", 1_329_748, 166_208), summary("lora", 684_684, 85_568)]
    table = pretrain.format_table(rows)
    head, rule, *body = table.splitlines()
    assert "trained params" in head and "B/trained param" in head and "B/param " not in head
    assert set(rule) == {"-"} and len(rule) == len(head)
    assert all(len(line) == len(head) for line in body[:2])
    assert body[0].split()[-3:] == ["166,208", "8.00", "12,346"]
    notes = table.split("\n\n", 1)[1]
    assert notes.startswith("* B/trained param = state bytes / trained params")
    assert "* lora: its adapters plus the embeddings, norms and head" in notes
    assert "sst_*" not in notes  # no SST row, no SST note
    assert all(len(line) <= len(head) for line in notes.splitlines())


def test_the_sst_note_explains_its_count_and_the_redraw_steps():
    notes = " ".join(pretrain.table_notes([summary("sst_adamw8bit", 1000, 500)]))
    assert "lora:" not in notes
    assert "U, S and V of each converted layer" in notes
    assert re.search(r"each redraw of the sampled vectors \(every iteration_length steps, 200 by "
                     r"default\) drops their moments", " ".join(notes.split()))


def test_summaries_without_trained_params_still_show_the_count():
    row = pretrain.summary_line(summary("adamw", 800, None) | {"state_bytes_per_param": 8.0})
    assert row.split()[-3:] == ["100", "8.00", "12,346"]


def test_sst_state_bytes_dip_at_redraw_steps(tmp_path, cache):
    """What the SST note says: a redraw every 4 steps drops the sampled vectors' moments, so
    the evaluations at steps 4 and 8 count fewer bytes than those at 2, 6 and 10."""
    out = tmp_path / "sst"
    pretrain.main(["--config", TEST_CONFIG, "--cache-dir", cache, "--output-dir", str(out),
                   "--optimizer", "sst_adamw", "--optimizer-kwargs",
                   '{"iteration_length": 4, "iterations_per_round": 100}', "--eval-every", "2"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    held = {m["step"]: m["state_bytes"] for m in lines if "state_bytes" in m}
    assert sorted(held) == [2, 4, 6, 8, 10, 12]
    assert held[2] == held[6] == held[10] > held[4] == held[8]
    assert held[12] == held[4]  # 12 is a redraw step too: the final count dips as well


# -- the demo ---------------------------------------------------------------------------------
@pytest.fixture
def in_process(monkeypatch):
    """``accelerate launch -m recipes.pretrain ...`` of the demo run in this process (the
    launch itself is covered by tests/test_recipe_launch.py); records the recipe arguments."""
    calls: list[list[str]] = []

    def fake_run(cmd, check=False, env=None):
        recipe = cmd[cmd.index("recipes.pretrain") + 1:]
        calls.append(recipe)
        pretrain.main(recipe)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    return calls


def test_each_demo_writes_into_its_own_directory(tmp_path, cache, capsys, in_process):
    runs = tmp_path / "runs" / "demo"
    argv = ["--optimizers", "adamw", "sst_adamw", "--config", TEST_CONFIG, "--runs-dir",
            str(runs), "--", "--cache-dir", cache, "--max-steps", "2"]
    demo.main(argv)
    first = capsys.readouterr().out
    demo.main(argv)
    second = capsys.readouterr().out
    dirs = sorted(runs.iterdir())
    assert len(dirs) == 2  # the second demo did not overwrite the first
    for root, out in zip(dirs, (first, second), strict=True):
        assert f"[demo] 2 runs (adamw, sst_adamw), written to {root}" in out
        assert f"[demo] run 1 of 2: adamw -> {root / 'adamw'}" in out
        assert f"[demo] run 2 of 2: sst_adamw -> {root / 'sst_adamw'}" in out
        assert out.index("run 1 of 2") < out.index("run 2 of 2")
        assert f"[demo] table saved to {root / 'table.txt'}" in out
        table = (root / "table.txt").read_text()
        assert table.startswith("optimizer ") and "B/trained param" in table
        assert "* sst_*: the converted model" in table and table in out + "\n"
        for name in ("adamw", "sst_adamw"):
            assert (root / name / "summary.json").exists()
    assert [c[c.index("--output-dir") + 1] for c in in_process] == [
        str(d / n) for d in dirs for n in ("adamw", "sst_adamw")]


def test_an_explicit_output_dir_is_used_as_given(tmp_path, cache, capsys, in_process):
    root = tmp_path / "mine"
    demo.main(["--optimizers", "adamw", "--config", TEST_CONFIG, "--output-dir", str(root),
               "--", "--cache-dir", cache, "--max-steps", "2"])
    assert (root / "table.txt").exists() and (root / "adamw" / "summary.json").exists()


def test_every_run_is_checked_before_the_first_starts(tmp_path, capsys, in_process):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--optimizers", "adamw", "galore_adamx", "--runs-dir", str(tmp_path / "r")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: run 2 of 2 (galore_adamx): optimizer='galore_adamx'" in err
    assert in_process == [] and not (tmp_path / "r").exists()


def test_a_failed_run_stops_the_demo_with_its_status(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo.subprocess, "run",
                        lambda cmd, check=False, env=None: subprocess.CompletedProcess(cmd, 3))
    with pytest.raises(SystemExit) as exc:
        demo.main(["--optimizers", "adamw", "lora", "--config", TEST_CONFIG, "--runs-dir",
                   str(tmp_path)])
    assert exc.value.code == 3
    err = capsys.readouterr().err
    assert "[demo] run 1 of 2 (adamw) failed with exit status 3" in err
