"""SST ends closer to full-rank AdamW than LoRA at the same rank (tiny LLaMA pretraining).

The task, models and learning rates are those of ``benchmarks/sst_vs_lora.py`` (which runs
longer, sweeps the learning rate and averages seeds); this is its quick, fixed-seed form.
"""

import pytest
import torch

from benchmarks import sst_vs_lora as bench

pytest.importorskip("peft")


@pytest.fixture
def one_thread():
    """These 64-wide matmuls gain nothing from a second thread, which only risks
    oversubscription when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_sst_closes_most_of_the_lora_gap_to_full_rank(one_thread):
    steps = 400
    losses = {m: bench.run(m, steps, seed=1)["eval_loss"] for m in bench.METHODS}
    assert losses["lora"] > losses["adamw"] + 0.03, f"no LoRA gap to close: {losses}"
    assert abs(losses["sst"] - losses["adamw"]) < abs(losses["lora"] - losses["adamw"]), losses
    assert bench.gap_closed(losses) > 30.0, losses
