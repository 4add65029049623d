"""The profiler's command line as a user meets it (issue 16, item 12): model names spelled as
the recipe's config files, sizes in units that fit them, a titled chart with labelled GPU
capacities, and a ``--help`` that lists the optimizers and the defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lowrank_optim as lo
from lowrank_optim.model_configs import LLAMA_SHAPES, model_name
from lowrank_optim.profile import (
    GPUS,
    MemoryProfile,
    argument_parser,
    figure,
    format_bytes,
    gpu_capacities,
    main,
    model_config,
    profile,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPE_CONFIGS = sorted((ROOT / "recipes" / "configs").glob("llama_*.yaml"))


# -- model names ----------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["7b", "7B", "llama_7b", "llama-7b", "LLaMA-7B", " 7b "])
def test_every_spelling_of_a_size_names_the_same_config(spelling):
    assert model_name(spelling) == "7b"
    assert model_config(spelling).to_dict() == model_config("7b").to_dict()


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=[p.stem for p in RECIPE_CONFIGS])
def test_recipe_config_names_are_profiler_model_names(path):
    """``--model llama_7b`` profiles what ``recipes/configs/llama_7b.yaml`` trains."""
    import yaml

    assert model_name(path.stem) == str(yaml.safe_load(path.read_text())["model"])


def test_recipe_configs_exist_for_the_paper_sizes():
    assert {model_name(p.stem) for p in RECIPE_CONFIGS} == set(LLAMA_SHAPES) - {"tiny"}


@pytest.mark.parametrize("name", ["llama", "llama_", "7bb", "llama_8b", "", "tiny_test"])
def test_names_that_spell_no_size_are_not_guessed(name):
    assert model_name(name) is None


def test_cli_accepts_the_recipe_spelling(capsys):
    assert main(["--model", "llama_60m", "--optimizer", "adamw"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("60m (")  # shown under its one name


# -- units ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("num", "text"), [
    (0, "0 B"), (84, "84 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (1536, "1.50 KiB"),
    (5 * 2**20, "5.00 MiB"), (int(12.55 * 2**30), "12.55 GiB"), (3 * 2**40, "3.00 TiB"),
    (-44.16 * 2**30, "-44.16 GiB"),
])
def test_format_bytes_picks_the_unit_by_size(num, text):
    assert format_bytes(num) == text


def test_format_bytes_signs_headroom():
    assert format_bytes(7 * 2**30, sign=True) == "+7.00 GiB"
    assert format_bytes(-2**20, sign=True) == "-1.00 MiB"


def _sizes(table: str) -> list[str]:
    """The size column of a profile table (rows above the fit verdicts)."""
    head = table.split("fits (")[0]
    return re.findall(r"(-?\d[\d.,]*) (B|KiB|MiB|GiB|TiB)\s*$", head, flags=re.M)


def test_measured_tiny_table_shows_no_zero_gib(capsys):
    """Measured on tiny (a few hundred KiB in all): every size in a unit where it reads."""
    assert main(["--model", "tiny", "--optimizer", "adamw", "--mode", "measured", "--device",
                 "cpu", "--seq-len", "16", "--steps", "1", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "0.000 GiB" not in out
    sizes = _sizes(out)
    assert len(sizes) == 9  # weights ... total
    units = {unit for _, unit in sizes}
    assert "KiB" in units and "GiB" not in units
    for value, unit in sizes:  # 1 <= value < 1024 in its unit, or exactly 0 B
        assert unit == "B" or 1 <= float(value) < 1024


def test_analytic_7b_table_in_gib(capsys):
    assert main(["--model", "7b", "--optimizer", "adamw"]) == 0
    sizes = dict(zip(["weights", "gradients", "moments"], _sizes(capsys.readouterr().out),
                     strict=False))
    assert sizes["weights"][1] == "GiB" and sizes["moments"][1] == "GiB"


# -- the chart ------------------------------------------------------------------------------
def test_capacity_labels_name_every_card_once():
    labels = gpu_capacities()
    assert sorted(labels) == sorted({gib for _, gib in GPUS})
    assert labels[24] == "24 GB: RTX 3090 / 4090, A10 / L4"
    assert labels[141] == "141 GB: H200"


@pytest.fixture(scope="module")
def profiles_7b() -> list[MemoryProfile]:
    return [profile("7b", "adamw"), profile("7b", "galore_adamw", rank=1024, layerwise=True)]


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].texts]


def test_chart_has_a_title_and_labelled_capacity_lines(profiles_7b):
    pytest.importorskip("matplotlib")
    fig = figure(profiles_7b)
    ax = fig.axes[0]
    title = ax.get_title()
    assert "7b (analytic)" in title and "precision bf16" in title and "seq 256" in title
    assert "rank 1024," in title  # GaLore's; AdamW has none
    assert "layerwise False/True" in title  # settings that differ between the bars: both
    assert ax.get_ylabel() == "GiB"
    texts = _texts(fig)
    tallest = max(p.total for p in profiles_7b) / 2**30
    drawn = {gib: label for gib, label in gpu_capacities().items() if gib <= tallest * 1.3}
    assert drawn and set(drawn.values()) <= set(texts)  # one label per dashed line
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert sorted(line.get_ydata()[0] for line in dashed) == sorted(drawn)
    assert any(t.startswith("dashed: GPU memory") for t in texts)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "weights", "gradients", "optimizer state", "activations"]


def test_chart_of_a_tiny_model_uses_a_small_unit():
    pytest.importorskip("matplotlib")
    fig = figure([profile("tiny", "adamw", rank=8)])
    assert fig.axes[0].get_ylabel() == "MiB"
    assert not [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert any("cards of 8 GB and more are above this scale" in t for t in _texts(fig))


def test_cli_writes_the_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "chart.png"
    assert main(["--model", "tiny", "--optimizer", "adamw", "--png", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- --help ---------------------------------------------------------------------------------
def test_help_lists_optimizers_models_and_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in lo.available():
        assert name in text
    for name in LLAMA_SHAPES:
        assert name in text
    assert "llama_7b" in text
    for default in ("(default: 7b)", "(default: adamw galore_adamw)", "(default: 128)",
                    "(default: 256)", "(default: 1)", "(default: bf16)", "(default: analytic)",
                    "(default: 2)", "(default: cuda when available, else cpu)"):
        assert default in text, default


def test_every_option_says_what_it_defaults_to():
    """Each option with a default shows it (a bare "None" or "False" would say nothing)."""
    parser = argument_parser()
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in parser._actions:
        if action.default is not None and action.dest != "help":
            assert "default" in parser._get_formatter()._get_help_string(action), action.dest
