"""Packages and files the recipe's settings need are checked when the settings are read,
before any process group exists (issue 16, item 11): a launched run stops in every process at
once, local rank 0 prints the one message, the launcher's report quotes it, exit status 2.

``HIDE_PACKAGES`` (in the launched processes) makes packages look uninstalled, so the tests do
not depend on what this machine has.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipes import config, pretrain

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = str(ROOT / "recipes" / "configs" / "tiny_test.yaml")
DATASETS_MESSAGE = (r"hf_dataset='allenai/c4': needs the `datasets` package, which this Python "
                    r"does not have: pip install datasets \(or, in the repository, pip install "
                    r"-e '\.\[data\]'\)")

#: runs recipes.pretrain as ``python -m`` does, with the packages of $HIDE_PACKAGES hidden from
#: importlib.util.find_spec (how the recipe looks packages up)
WRAPPER = """\
import importlib.util, os, runpy
_hidden = set(os.environ.get("HIDE_PACKAGES", "").split(","))
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: (
    None if name.split(".")[0] in _hidden else _find(name, *a, **k))
runpy.run_module("recipes.pretrain", run_name="__main__", alter_sys=True)
"""


def hide(monkeypatch, *packages: str) -> None:
    """Make ``packages`` look uninstalled to the recipe's checks (the others installed)."""
    monkeypatch.setattr(config, "_installed",
                        lambda *modules: not set(modules) <= set(packages))


# -- which settings need what -----------------------------------------------------------------
PACKAGE_CASES = [
    ("datasets", {"hf_dataset": "allenai/c4"}, ("datasets",), DATASETS_MESSAGE),
    ("tensorboard", {"report_to": ["console", "tensorboard"]}, ("tensorboard", "tensorboardX"),
     r"report_to=\['console', 'tensorboard'\]: needs the `tensorboard` package.*pip install "
     r"tensorboard"),
    ("wandb", {"report_to": ["wandb"]}, ("wandb",), r"report_to=\['wandb'\]: needs the `wandb`"),
    ("all-without-wandb", {"report_to": ["all"]}, ("wandb",),
     r"report_to=\['all'\]: 'all' asks for tensorboard and wandb; wandb needs the `wandb` "
     r"package.*or name the trackers to use, e.g. --report-to console tensorboard"),
    ("lora-without-peft", {"optimizer": "lora"}, ("peft",),
     r"optimizer='lora': the LoRA baseline needs the `peft` package.*pip install peft"),
    ("deepspeed-flag", {"deepspeed": str(ROOT / "recipes/accelerate/ds_zero0.json")},
     ("deepspeed",), r"deepspeed='.*ds_zero0.json': needs the `deepspeed` package.*"
     r"pip install deepspeed"),
]


@pytest.mark.parametrize(("settings", "hidden", "message"), [c[1:] for c in PACKAGE_CASES],
                         ids=[c[0] for c in PACKAGE_CASES])
def test_a_missing_package_is_named_with_the_install_command(monkeypatch, settings, hidden,
                                                             message):
    hide(monkeypatch, *hidden)
    with pytest.raises(config.RecipeError, match=message):
        config.make_config(settings, {})
    monkeypatch.setattr(config, "_installed", lambda *modules: True)
    config.make_config(settings, {})  # installed: the same settings are fine


def test_tensorboardx_serves_tensorboard_as_for_accelerate(monkeypatch):
    hide(monkeypatch, "tensorboard")  # tensorboardX still there
    config.make_config({"report_to": ["tensorboard"]}, {})


def test_deepspeed_from_the_accelerate_config_needs_the_package(monkeypatch):
    hide(monkeypatch, "deepspeed")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(config.RecipeError, match=r"the accelerate config asks for DeepSpeed "
                       r"\(ACCELERATE_USE_DEEPSPEED\) but needs the `deepspeed` package"):
        config.make_config({}, {})


def test_every_problem_is_in_the_one_message(monkeypatch):
    hide(monkeypatch, "datasets", "wandb")
    with pytest.raises(config.RecipeError) as e:
        config.make_config({"hf_dataset": "allenai/c4", "report_to": ["wandb"]}, {})
    assert "`datasets`" in str(e.value) and "`wandb`" in str(e.value)
    assert "\n" not in str(e.value)


FILE_CASES = [
    ("deepspeed-missing", {"deepspeed": "{tmp}/nope.json"},
     r"deepspeed='.*nope.json': cannot read this DeepSpeed JSON config \(No such file"),
    ("deepspeed-not-json", {"deepspeed": "{tmp}/bad.json"}, r"deepspeed='.*bad.json': not a JSON"),
    ("data-unmatched", {"data": ["{tmp}/*.txt", "{tmp}/corpus/**/*.md"]},
     r"data=.*: no file matches \['.*/\*\.txt', '.*/corpus/\*\*/\*\.md'\]"),
    ("tokenizer-missing", {"tokenizer": "{tmp}/tok.json"},
     r"tokenizer='.*tok.json': no such tokenizer.json file"),
]


@pytest.mark.parametrize(("settings", "message"), [c[1:] for c in FILE_CASES],
                         ids=[c[0] for c in FILE_CASES])
def test_a_missing_file_is_named(tmp_path, monkeypatch, settings, message):
    monkeypatch.setattr(config, "_installed", lambda *modules: True)
    (tmp_path / "bad.json").write_text("{not json")
    settings = json.loads(json.dumps(settings).replace("{tmp}", str(tmp_path)))
    with pytest.raises(config.RecipeError, match=message):
        config.make_config(settings, {})


def test_datasets_is_in_the_data_extra():
    extras = configparser.ConfigParser()
    extras.read(ROOT / "setup.cfg")
    data = extras["options.extras_require"]["data"].split()
    assert any(re.fullmatch(r"datasets(>=[\d.]+)?", d) for d in data)


# -- one message per machine --------------------------------------------------------------------
def test_only_local_rank_0_prints_and_every_rank_tells_the_launcher(tmp_path, monkeypatch,
                                                                     capsys):
    hide(monkeypatch, "datasets")
    argv = ["--config", TEST_CONFIG, "--hf-dataset", "allenai/c4"]
    for rank in ("0", "1"):
        error_file = tmp_path / f"error{rank}.json"
        monkeypatch.setenv("LOCAL_RANK", rank)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
        assert pretrain.cli(argv) == 2
        err = capsys.readouterr().err
        if rank == "0":
            assert re.fullmatch(r"\S+: error: " + DATASETS_MESSAGE + r".*\n", err), err
        else:
            assert err == ""
        record = json.loads(error_file.read_text())["message"]
        assert re.search(DATASETS_MESSAGE, record["extraInfo"]["py_callstack"])


def test_argparse_errors_are_printed_once_too(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pretrain.cli(["--max-stepz", "3"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert pretrain.cli(["--max-stepz", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and "unrecognized arguments: --max-stepz" in err


def _env(hidden: str) -> dict[str, str]:
    return {**os.environ, "HIDE_PACKAGES": hidden, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")]))}


def test_one_process_exits_2_with_one_line_before_any_work(tmp_path):
    script = tmp_path / "recipe.py"
    script.write_text(WRAPPER)
    runs = tmp_path / "runs"
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script), "--config", TEST_CONFIG,
                           "--hf-dataset", "allenai/c4", "--runs-dir", str(runs)],
                          env=_env("datasets"), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and re.search(DATASETS_MESSAGE, lines[0]), done.stderr
    assert "Traceback" not in done.stderr
    assert not runs.exists()  # nothing was started
    assert time.monotonic() - started < 120


@pytest.mark.slow
def test_torchrun_workers_fail_together_with_one_message(tmp_path):
    """Two processes under torchrun (the elastic agent of ``accelerate launch`` too): one
    worker prints the message, no worker prints a traceback, the launcher's failure report
    quotes the message instead of pointing at a traceback."""
    script = tmp_path / "recipe.py"
    script.write_text(WRAPPER)
    runs = tmp_path / "runs"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script), "--config", TEST_CONFIG,
                           "--hf-dataset", "allenai/c4", "--runs-dir", str(runs)],
                          env=_env("datasets"), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    printed = [line for line in out.splitlines() if line.startswith("pretrain.py: error:")]
    assert len(printed) == 1 and re.search(DATASETS_MESSAGE, printed[0]), out
    # the launcher's own ChildFailedError traceback is the only one
    assert out.count("Traceback (most recent call last)") <= 1, out
    assert "RecipeError" not in out and "ImportError" not in out
    assert re.search(r"exitcode\s*: 2", out), out
    assert re.search(r"traceback : pretrain.py: error: " + DATASETS_MESSAGE, out), out
    assert "To enable traceback see" not in out
    assert not runs.exists()
