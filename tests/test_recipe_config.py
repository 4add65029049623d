"""The pretraining recipe's settings, schedule and optimizer construction (no training)."""

import json
import math
from pathlib import Path

import pytest
import torch

import lowrank_optim as lo
from lowrank_optim import distributed
from recipes import config, pretrain
from tests.helpers import tiny_llama

ROOT = Path(__file__).resolve().parents[1]

TINY = str(ROOT / "recipes" / "configs" / "tiny.yaml")


def test_settings_precedence_defaults_file_optimizer_block_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.1\nrank: 3\noptimizer_overrides:\n"
                    "  galore_adamw: {lr: 0.2, rank: 4}\n")
    cfg = config.parse_args(["--config", str(path)])
    assert (cfg.optimizer, cfg.lr, cfg.rank, cfg.seq_len) == ("galore_adamw", 0.2, 4, 256)
    cfg = config.parse_args(["--config", str(path), "--lr", "0.3"])
    assert (cfg.lr, cfg.rank) == (0.3, 4)
    cfg = config.parse_args(["--config", str(path), "--optimizer", "adamw"])
    assert (cfg.lr, cfg.rank) == (0.1, 3)  # another optimizer: its block does not apply


def test_values_are_coerced_from_yaml_json_and_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the --data globs must match files (checked when parsed)
    (tmp_path / "a").mkdir()
    for name in ("a/1.txt", "b.txt", "x.txt"):
        (tmp_path / name).write_text("text")
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"lr": "1e-3", "max_steps": "20", "streaming": "true",
                                "update_proj_gap": "null"}))
    cfg = config.parse_args([
        "--config", str(path), "--model-overrides", '{"num_hidden_layers": 1}',
        "--target-modules", '["q_proj", "v_proj"]', "--data", "a/*.txt", "b.txt",
        "--betas", "0.9", "0.95", "--report-to", "console", "tensorboard"])
    assert cfg.lr == 1e-3 and cfg.max_steps == 20 and cfg.streaming is True
    assert cfg.update_proj_gap is None and cfg.model_overrides == {"num_hidden_layers": 1}
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.data == ["a/*.txt", "b.txt"]
    assert cfg.betas == ["0.9", "0.95"] and cfg.report_to == ["console", "tensorboard"]
    assert config.parse_args(["--data", '["x.txt"]']).data == ["x.txt"]


@pytest.mark.parametrize("settings, message", [
    ({"learning_rate": 1}, "unknown settings \\['learning_rate'\\]"),
    ({"optimizer": "sgd"}, "optimizer='sgd': choose one of"),
    ({"model": "3b"}, "model='3b'"),
    ({"max_steps": 2.5}, "expected an integer"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"refresh_sync": "allreduce"}, "refresh_sync"),
    ({"report_to": ["mlflow"]}, "report_to"),
    ({"optimizer_overrides": {"adamw": {"lrate": 1}}, "optimizer": "adamw"},
     "optimizer_overrides\\['adamw'\\]"),
])
def test_bad_settings_are_rejected_with_the_reason(settings, message):
    with pytest.raises(ValueError, match=message):
        config.make_config(settings, {})


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        config.parse_args(["--learning-rate", "1"])
    assert exc.value.code == 2  # argparse's usage error, not a crash
    err = capsys.readouterr().err
    assert "unrecognized arguments: --learning-rate 1" in err and "Traceback" not in err


def test_every_library_optimizer_and_the_lora_baseline_are_offered():
    names = config.optimizer_names()
    assert set(lo.available()) <= set(names) and "lora" in names
    assert {"adamw", "galore_adamw", "dct_adamw", "sst_adamw"} <= set(names)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    cfg = config.make_config({"max_steps": 100, "lr": 1.0}, {})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = pretrain.build_scheduler(cfg, opt)
    lrs = []
    for _ in range(101):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    middle = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))
    assert lrs[55] == pytest.approx(middle) and lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


@pytest.mark.parametrize("name", config.optimizer_names())
def test_build_optimizer_for_every_name(name):
    cfg = config.parse_args(["--config", TINY, "--optimizer", name])
    model, opt = pretrain.build_optimizer(cfg, tiny_llama())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == trainable and opt.param_groups[0]["lr"] == cfg.lr
    if name == "lora":
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert any("lora_A" in n for n in names) and any("embed_tokens" in n for n in names)
        assert not any(".base_layer." in n for n in names)  # wrapped weights stay frozen
    if name == "sst_adamw":
        assert lo.sst.spectral_modules(model)
    if name == "galore_adamw":
        assert opt.param_groups[0]["update_proj_gap"] == 50  # tiny.yaml's override
    if name == "dct_adamw":  # nothing set: the optimizer's own defaults
        assert (opt.param_groups[0]["update_proj_gap"], opt.param_groups[0]["scale"]) == (1, 1.0)


def test_refresh_sync_broadcast_wraps_the_projector():
    cfg = config.parse_args(["--config", TINY, "--refresh-sync", "broadcast"])
    _, opt = pretrain.build_optimizer(cfg, tiny_llama())
    assert isinstance(opt.refresher, distributed.BroadcastRefresh)
    cfg = config.parse_args(["--config", TINY, "--refresh-sync", "broadcast",
                               "--optimizer", "adamw"])
    with pytest.raises(ValueError, match="needs a low-rank optimizer"):
        pretrain.build_optimizer(cfg, tiny_llama())


def test_model_configs_from_tiny_to_7b_are_selectable():
    for name in ("tiny", "60m", "130m", "350m", "1b", "7b"):
        assert config.make_config({"model": name}, {}).model == name
    cfg = config.make_config({"model": "tiny", "model_overrides": {"num_hidden_layers": 1}},
                               {})
    model = pretrain.build_model(cfg, vocab_size=300)
    assert model.config.vocab_size == 300 and model.config.num_hidden_layers == 1


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_recipe_configs_are_valid_for_every_optimizer(path, monkeypatch):
    # the settings, whatever is installed (the paper configs' `datasets` and tensorboard are
    # checked by tests/test_recipe_prerequisites.py)
    monkeypatch.setattr(config, "_installed", lambda *modules: True)
    for name in config.optimizer_names():
        cfg = config.parse_args(["--config", str(path), "--optimizer", name])
        assert cfg.model in ("tiny", "60m", "130m", "350m", "1b", "7b")
    if path.stem.startswith("llama_"):  # the paper's setup: 512 x 256 tokens per step on 8 GPUs
        cfg = config.parse_args(["--config", str(path)])
        assert cfg.model == path.stem.split("_")[1] and cfg.seq_len == 256
        assert cfg.batch_size * 8 * cfg.gradient_accumulation_steps == 512
        assert (cfg.warmup_ratio, cfg.min_lr_ratio, cfg.scale) == (0.1, 0.1, 0.25)
