"""Every setting of the recipe (``recipes.config``) with a wrong type, value or combination
fails at once with a message naming the setting, its flag and the fix (no training, no
model)."""

import pytest

from recipes import config, pretrain


@pytest.mark.parametrize("settings, message", [
    # types
    ({"max_steps": "ten"}, r"max_steps='ten': expected an integer \(set with --max-steps"),
    ({"max_steps": 2.5}, "max_steps=2.5: expected an integer"),
    ({"max_steps": "inf"}, "max_steps='inf': expected an integer"),
    ({"rank": True}, "rank=True: expected an integer"),
    ({"lr": "fast"}, "lr='fast': expected a number"),
    ({"lr": [1e-3]}, r"lr=\[0.001\]: expected a number"),
    ({"progress": "maybe"}, "progress='maybe': expected true or false"),
    ({"progress": 2}, "progress=2: expected true or false"),
    ({"model_overrides": "{layers: 2}"}, "model_overrides='{layers: 2}': not valid JSON"),
    ({"model_overrides": [1]}, "model_overrides=.*expected a dict"),
    ({"optimizer": ["adamw"]}, "optimizer=.*expected a string"),
    ({"seq_len": None}, "seq_len=None: cannot be null"),
    # values
    ({"max_steps": -5}, r"max_steps=-5: must be >= 1 \(set with --max-steps"),
    ({"max_steps": 0}, "max_steps=0: must be >= 1"),
    ({"rank": 0}, "rank=0: must be >= 1"),
    ({"batch_size": 0}, "batch_size=0: must be >= 1"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0: must be >= 1"),
    ({"seq_len": -1}, "seq_len=-1: must be >= 1"),
    ({"log_every": 0}, "log_every=0: must be >= 1"),
    ({"eval_samples": 0}, "eval_samples=0: must be >= 1"),
    ({"keep_checkpoints": 0}, "keep_checkpoints=0: must be >= 1"),
    ({"vocab_size": 0}, "vocab_size=0: must be >= 1"),
    ({"eval_every": -1}, r"eval_every=-1: must be >= 0 \(0: off\)"),
    ({"save_every": -2}, "save_every=-2: must be >= 0"),
    ({"check_sync_every": -1}, "check_sync_every=-1: must be >= 0"),
    ({"seed": -1}, "seed=-1: must be >= 0"),
    ({"update_proj_gap": 0}, "update_proj_gap=0: must be >= 1, or null"),
    ({"stop_after": 0}, "stop_after=0: must be >= 1"),
    ({"corpus_max_chars": 0}, "corpus_max_chars=0: must be >= 1"),
    ({"lr": 0}, "lr=0.0: must be > 0"),
    ({"lr": "nan"}, "lr=nan: must be > 0"),
    ({"scale": -0.25}, "scale=-0.25: must be > 0"),
    ({"lora_alpha": 0}, "lora_alpha=0.0: must be > 0"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1: must be >= 0"),
    ({"max_grad_norm": -1}, r"max_grad_norm=-1.0: must be >= 0 \(0: no clipping\)"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio=1.0: must be in \[0, 1\)"),
    ({"min_lr_ratio": 1.5}, r"min_lr_ratio=1.5: must be in \[0, 1\]"),
    ({"val_fraction": 0}, r"val_fraction=0.0: must be in \(0, 1\)"),
    ({"betas": [0.9]}, "betas=.*expected two numbers in"),
    ({"betas": [0.9, 1.5]}, "betas=.*expected two numbers in"),
    ({"betas": ["a", "b"]}, "betas=.*expected two numbers, e.g. --betas 0.9 0.999"),
    ({"optimizer": "sgd"}, "optimizer='sgd': choose one of"),
    ({"model": "3b"}, "model='3b': choose one of"),
    ({"proj_type": "diagonal"}, "proj_type='diagonal': choose one of"),
    ({"optimizer": "dct_adamw", "proj_type": "full"}, "proj_type='full': choose one of .* for "
                                                      "dct_adamw"),
    ({"target_modules": []}, "target_modules=.*expected 'all-linear'"),
    ({"target_modules": {"q": 1}}, "target_modules=.*expected 'all-linear'"),
    ({"mixed_precision": "fp8"}, "mixed_precision='fp8': choose auto, no, bf16 or fp16"),
    ({"refresh_sync": "allreduce"}, "refresh_sync='allreduce'"),
    ({"refresh_schedule": {"kind": "cosine"}}, "refresh_schedule=.*Unknown schedule kind"),
    ({"refresh_schedule": {"gap": 0}}, "refresh_schedule=.*gap=0: must be an integer >= 1"),
    ({"refresh_schedule": "adaptive"}, r"refresh_schedule=\['adaptive'\]: expected a dict"),
    ({"report_to": ["mlflow"]}, "report_to=.*choose from"),
    ({"report_to": []}, "report_to=.*choose from"),
    ({"output_dir": ""}, "output_dir='': cannot be empty"),
    # combinations
    ({"stop_after": 20, "max_steps": 10}, "stop_after=20: beyond max_steps=10, so it would never"),
    ({"optimizer_kwargs": {"lr": 0.1}}, r"\['lr'\] have their own settings; use --lr instead"),
    ({"optimizer_kwargs": {"rank": 4, "scale": 1}},
     r"\['rank', 'scale'\] have their own settings; use --rank, --scale instead"),
    ({"report_to": ["none", "wandb"]}, "'none' cannot be combined"),
    ({"refresh_schedule": {"kind": "fixed"}, "optimizer": "sst_adamw"},
     "refresh_schedule=.*sst_adamw has no subspaces refreshed every update_proj_gap steps"),
    ({"refresh_schedule": {"kind": "fixed"}, "optimizer": "lora"}, "lora has no subspaces"),
    ({"data": ["a.txt"], "hf_dataset": "allenai/c4"}, "choose one source"),
    # keys and override blocks
    ({"learning_rate": 1}, r"unknown settings \['learning_rate'\]"),
    ({"save_evry": 1}, r"'save_evry': did you mean 'save_every'\?"),
    ({"optimizer_overrides": {"galore": {"lr": 1}}}, "optimizer_overrides='galore': not an "
                                                     "optimizer"),
    ({"optimizer_overrides": {"adamw": {"lrate": 1}}}, r"optimizer_overrides\['adamw'\]"),
    ({"optimizer_overrides": {"adamw": 5}}, r"optimizer_overrides\['adamw'\]: expected a mapping"),
    ({"optimizer_overrides": {"adamw": {"rank": 0}}, "optimizer": "adamw"}, "rank=0: must be"),
], ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items())[:60] if isinstance(x, dict) else None)
def test_a_bad_setting_names_the_setting_and_the_fix(settings, message):
    with pytest.raises(config.RecipeError, match=message):
        config.make_config(settings, {})


@pytest.mark.parametrize("argv, message", [
    (["--rank", "0"], r"rank=0: must be >= 1 \(set with --rank"),
    (["--max-steps", "-3"], "max_steps=-3: must be >= 1"),
    (["--optimizer", "sgd"], "optimizer='sgd'"),
    (["--betas", "0.9"], "betas="),
    (["--stop-after", "5000"], "stop_after=5000: beyond max_steps=1000"),
    (["--allow-config-change", "perhaps"], "allow_config_change='perhaps': expected true or false"),
])
def test_bad_flags_on_the_command_line(argv, message):
    with pytest.raises(config.RecipeError, match=message):
        config.parse_args(argv)


def test_a_missing_or_broken_config_file_is_named(tmp_path):
    with pytest.raises(config.RecipeError, match="--config .*nope.yaml: cannot read"):
        config.parse_args(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1\n")
    with pytest.raises(config.RecipeError, match="--config .*bad.yaml: does not parse"):
        config.parse_args(["--config", str(bad)])
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(config.RecipeError, match="expected a mapping of settings"):
        config.parse_args(["--config", str(bad)])


def test_good_values_still_pass():
    cfg = config.make_config({"optimizer": "GaLore-AdamW", "stop_after": 1000, "run_name": 7,
                                "optimizer_overrides": {"galore_adamw": {"rank": 3}},
                                "allow_config_change": "true", "betas": ["0.9", "0.95"]}, {})
    assert cfg.rank == 3 and cfg.run_name == "7" and cfg.allow_config_change is True
    assert config.make_config({"max_steps": "1e3", "scale": None}, {}).max_steps == 1000


def test_the_command_line_turns_a_setting_error_into_exit_status_2(capsys):
    assert pretrain.cli(["--rank", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: rank=0: must be >= 1" in err and "Traceback" not in err
