"""``benchmarks/loss_curves.py``'s table over several seeds: mean ± sample std, ratios against
AdamW's mean (the runs themselves are the benchmark, not a test)."""

import math
from types import SimpleNamespace

import pytest

from benchmarks.loss_curves import mean_std, table


def _run(val_loss, train=(5.0, 4.0), state=1000, speed=100.0):
    return {"summary": {"val_loss": val_loss, "tokens_per_s": speed},
            "train": list(enumerate(train)), "state_bytes": state}


def test_mean_std_is_the_sample_standard_deviation():
    assert mean_std([1.0]) == (1.0, 0.0)
    mean, std = mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0)


def test_table_reports_the_mean_and_spread_over_seeds_and_ratios_to_adamw_mean():
    runs = {"adamw": [_run(4.0), _run(4.2)],
            "apollo_mini": [_run(3.0, state=250), _run(3.4, state=250)]}
    settings = {n: SimpleNamespace(lr=1e-2) for n in runs}
    text = table(runs, settings, {"adamw": 10.0, "apollo_mini": math.nan})
    adamw, mini = text.splitlines()[2:]
    assert "(mean ± std)" in text.splitlines()[0]
    assert "| 4.1000 ± 0.1414 |" in adamw and f"| {math.exp(4.1):.1f} |" in adamw
    ratios = [3.0 / 4.0, 3.4 / 4.2]  # per seed, then mean ± std
    mean, std = sum(ratios) / 2, abs(ratios[0] - ratios[1]) / math.sqrt(2)
    assert "| 3.2000 ± 0.2828 |" in mini and f"| {mean:.3f} ± {std:.3f} |" in mini
    assert "| 0.25x |" in mini and mini.endswith("| - |")
