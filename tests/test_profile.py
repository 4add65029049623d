"""Memory profiler: analytic (meta device) equals measured (real tensors), clean errors."""

import json

import pytest

import lowrank_optim as lo
from lowrank_optim.profile import main, profile

SMALL = dict(seq_len=16, batch_size=1, precision="fp32", steps=1)


@pytest.mark.parametrize("name", lo.available())
@pytest.mark.parametrize("model", ["tiny", "60m"])
def test_analytic_state_bytes_equal_measured_exactly(name, model):
    rank = 8 if model == "tiny" else 32
    a = profile(model, name, rank=rank, mode="analytic", **SMALL)
    m = profile(model, name, rank=rank, mode="measured", device="cpu", **SMALL)
    for field in ("moments", "projectors", "indices", "other_state", "weights", "gradients",
                  "num_params", "activations"):
        assert getattr(a, field) == getattr(m, field), field
    assert a.optimizer_state > 0


def test_galore_saves_state_against_adamw_at_7b():
    adamw = profile("7b", "adamw", precision="bf16")
    galore = profile("7b", "galore_adamw", rank=1024, precision="bf16", layerwise=True)
    saving = 1 - galore.optimizer_state / adamw.optimizer_state
    # GaLore paper: "up to 65.5%" optimizer-state reduction at 7B (rank 1024, bf16)
    assert 0.6 < saving < 0.7
    # layer-wise: one gradient live at a time (the largest, the 32000 x 4096 embedding)
    assert galore.gradients == 32000 * 4096 * 2 < adamw.gradients / 50
    assert any(ok for name, ok, _ in galore.fits() if name.startswith("24 GB"))
    assert not any(ok for name, ok, _ in adamw.fits() if name.startswith("24 GB"))


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["--model", "tiny", "--optimizer", "galore_adamw", "--rank", "8",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data[0]["optimizer"] == "galore_adamw" and data[0]["total"] > 0
    assert "fits" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model", "13x"], "unknown model '13x'"),
        (["--model", "tiny", "--rank", "4096", "--optimizer", "galore_adamw"], "rank=4096"),
        (["--model", "tiny", "--seq-len", "-5"], "seq_len must be a positive integer"),
        (["--model", "tiny", "--batch-size", "0"], "batch_size must be a positive integer"),
        (["--model", "tiny", "--optimizer", "sgdx"], "Unknown optimizer name='sgdx'"),
        (["--model", "tiny", "--opt-arg", "bits"], "expected key=value"),
    ],
)
def test_bad_input_gives_a_message_not_a_traceback(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
