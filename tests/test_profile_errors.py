"""Every wrong input to the profiler gets a clear error (issue 12, "nothing silent").

The Python API raises ``TypeError`` / ``ValueError`` naming the argument; the command line
exits 2 with one ``error:`` line naming the flag and no traceback, before it profiles anything
(so a bad ``--json`` path does not cost a long run).  Rows: ``(bad input, regex)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from lowrank_optim.profile import _message, main, profile


def _bad_config(tmp_path: Path) -> str:
    path = tmp_path / "config.json"
    path.write_text("{not json")
    return str(path)


def _gpt2_config(tmp_path: Path) -> str:
    # a causal LM config without LLaMA's intermediate_size
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1,
                                "n_head": 2, "vocab_size": 64}))
    return str(path)


API_CASES: list[tuple[str, dict[str, Any], type, str]] = [
    ("model-type", dict(model=7), TypeError, r"model must be a size name.*got int 7"),
    ("model-typo", dict(model="7bb"), ValueError, r"unknown model '7bb' \(did you mean '7b'\?\)"),
    ("optimizer-typo", dict(optimizer="galore_adamx"), ValueError,
     r"Unknown optimizer name='galore_adamx' \(did you mean 'galore_adamw'"),
    ("optimizer-type", dict(optimizer=None), TypeError, r"optimizer must be a name"),
    ("rank-bool", dict(rank=True), ValueError, r"rank must be a positive integer, got True"),
    ("rank-str", dict(rank="8"), ValueError, r"rank must be a positive integer, got '8'"),
    ("rank-too-large", dict(rank=65), ValueError, r"rank=65 exceeds"),
    ("seq-len-zero", dict(seq_len=0), ValueError, r"seq_len must be a positive integer"),
    ("steps-bool", dict(steps=False), ValueError, r"steps must be a positive integer"),
    ("layerwise-str", dict(layerwise="yes"), TypeError, r"layerwise must be True or False"),
    ("checkpointing-int", dict(checkpointing=1), TypeError,
     r"checkpointing must be True or False"),
    ("precision", dict(precision="fp16"), ValueError, r"precision must be one of"),
    ("mode", dict(mode="exact"), ValueError, r"mode must be 'analytic' or 'measured'"),
    ("device-analytic", dict(device="cpu"), ValueError,
     r"device='cpu' applies to mode='measured' only"),
    ("device-name", dict(mode="measured", device="gpu0"), ValueError,
     r"device must be a torch device"),
    ("opt-args-type", dict(opt_args=["bits=8"]), TypeError, r"opt_args must be a dict"),
    ("opt-args-rank", dict(opt_args={"rank": 4}), ValueError,
     r"opt_args\['rank'\] would silently override rank"),
    ("layerwise-sst", dict(optimizer="sst_adamw", layerwise=True), ValueError,
     r"layerwise=True: sst_adamw \(SSTAdamW\) cannot step one parameter"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), [c[1:] for c in API_CASES],
                         ids=[c[0] for c in API_CASES])
def test_profile_api_rejects(kwargs: dict[str, Any], exc: type, match: str) -> None:
    kwargs = {"model": "tiny", "optimizer": "galore_adamw", "rank": 8, **kwargs}
    with pytest.raises(exc, match=match):
        profile(**kwargs)


@pytest.mark.parametrize(("config", "match"), [
    (_bad_config, r"model config '.*config.json' could not be read"),
    (_gpt2_config, r"model config .*\(GPT2Config\) has no intermediate_size"),
])
def test_profile_api_rejects_unusable_configs(tmp_path, config, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        profile(config(tmp_path), "adamw")


def _file(tmp_path: Path) -> str:
    path = tmp_path / "plain-file"
    path.write_text("")
    return str(path)


CLI_CASES: list[tuple[str, list[str], str]] = [
    ("json-no-dir", ["--json", "{tmp}/no/such/dir/out.json"],
     r"--json '.*/no/such/dir/out.json': directory '.*/no/such/dir' does not exist"),
    ("json-is-dir", ["--json", "{tmp}"], r"--json '.*' is a directory: give a file name"),
    ("json-under-file", ["--json", "{file}/out.json"], r"--json '.*/out.json': directory"),
    ("png-format", ["--png", "{tmp}/chart.xyz"],
     r"--png '.*chart.xyz': the file name must end in an image format"),
    ("png-no-dir", ["--png", "{tmp}/nope/chart.png"], r"--png .* does not exist"),
    ("model-typo", ["--model", "60mm"], r"unknown model '60mm' \(did you mean '60m'\?\)"),
    ("optimizer-typo-second", ["--optimizer", "adamw", "dct_adamx"],
     r"Unknown optimizer name='dct_adamx' \(did you mean 'dct_adamw'"),
    ("opt-arg-twice", ["--opt-arg", "bits=8", "--opt-arg", "bits=32"],
     r"--opt-arg bits is given twice"),
    ("opt-arg-empty-key", ["--opt-arg", "=8"], r"--opt-arg '=8': expected key=value"),
    ("opt-arg-rank", ["--opt-arg", "rank=4"], r"--opt-arg rank=\.\.\. would override --rank"),
    ("opt-arg-unknown", ["--opt-arg", "bitz=8"], r"argument 'bitz'.*Did you mean 'bits'"),
    ("steps-analytic", ["--steps", "3"], r"--steps applies to --mode measured only"),
    ("device-analytic", ["--device", "cuda"], r"device='cuda' applies to mode='measured'"),
    ("layerwise-sst", ["--optimizer", "sst_adamw", "--layerwise"],
     r"sst_adamw \(SSTAdamW\) cannot step one parameter"),
    ("rank-float", ["--rank", "8.5"], r"argument --rank: invalid int value: '8.5'"),
    ("bad-config", ["--model", "{config}"], r"could not be read"),
]


@pytest.mark.parametrize(("argv", "match"), [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_cli_rejects_before_profiling(tmp_path, capsys, argv: list[str], match: str) -> None:
    if any(a.startswith("--png") for a in argv):
        pytest.importorskip("matplotlib")
    subs = {"{tmp}": str(tmp_path), "{file}": _file(tmp_path)}
    if "{config}" in argv:
        subs["{config}"] = _bad_config(tmp_path)
    for key, value in subs.items():
        argv = [a.replace(key, value) for a in argv]
    base = ["--model", "tiny", "--optimizer", "galore_adamw", "--rank", "8"]
    with pytest.raises(SystemExit) as exc:
        main([*base, *argv])
    out, err = capsys.readouterr()
    assert exc.value.code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert out == "", "nothing is profiled before the error"
    assert re.search(match, err), err


@pytest.mark.parametrize(("error", "line"), [
    (KeyError("bits"), "bits"),  # str(KeyError) would quote it
    (ValueError("takes no argument 'bitz'"), "takes no argument 'bitz'"),  # quote kept
    (ValueError("two\nlines"), "two lines"),
])
def test_cli_error_line(error: Exception, line: str) -> None:
    assert _message(error) == line
