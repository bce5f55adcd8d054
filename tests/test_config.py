"""config/ and infra/configurator.py: parsing overrides, validating every key, config files,
splitting the global batch, resuming."""

import math

import pytest

import train
from config import ConfigError, TrainConfig, plan_batch
from infra.configurator import flat, load_config, parse_overrides, valid_keys, with_values
from infra.run import CHANGEABLE_ON_RESUME, resume_config


def overridden(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`config` with `--key=value` overrides applied, as train.py applies them."""
    return with_values(config, parse_overrides(overrides))


# A value out of range for every key. A key added without an entry here fails
# test_every_key_rejects_a_bad_value.
BAD_VALUES = {
    "inputs": '[""]',
    "data_dir": "",
    "tokenizer": "missing-tokenizer.json",
    "val_fraction": "1",
    "tokenizer_max_bytes": "0",
    "val_max_bytes": "0",
    "text_field": "",
    "chat": "maybe",
    "tokenizer_memory_budget": "0",
    "out_dir": "",
    "micro_batch_size": "-1",
    "global_batch_tokens": "-4096",
    "max_steps": "inf",
    "lr": "-1",
    "min_lr_ratio": "1.5",
    "warmup_steps": "-1",
    "weight_decay": "-5",
    "beta1": "1",
    "beta2": "-0.1",
    "adam_eps": "0",
    "grad_clip": "-1",
    "eval_interval": "0",
    "eval_tokens": "0",
    "log_interval": "0",
    "ckpt_interval": "0",
    "keep_checkpoints": "0",
    "max_bad_steps": "0",
    "sample_tokens": "-1",
    "device": "gpu",
    "dtype": "fp16",
    "parallel": "zero3",
    "activation_checkpointing": "maybe",
    "compile": "2",
    "seed": "-1",
    "loggers": "stdout",
    "schedule": "linear",
    "optimizer": "sgd",
    "muon_lr": "0",
    "cooldown_fraction": "2",
    "ckpt_every_minutes": "-5",
    "model.vocab_size": "0",
    "model.dim": "100",
    "model.n_layers": "0",
    "model.n_heads": "7",
    "model.n_kv_heads": "4",
    "model.ffn_hidden": "0",
    "model.multiple_of": "0",
    "model.max_seq_len": "-1",
    "model.norm": "batchnorm",
    "model.norm_eps": "nan",
    "model.rope_theta": "-1",
    "model.tie_embeddings": "sometimes",
    "model.dropout": "1",
    "init_from": "missing-model-folder",
    "model.rope_scale_factor": "0.5",
    "model.rope_low_freq_factor": "-1",
    "model.rope_high_freq_factor": "0.5",
    "model.rope_original_max_seq_len": "0",
}
CHECKED_AT_START = {
    "tokenizer",
    "init_from",
    "schedule",
    "optimizer",
    "loggers",
}  # checked when the run starts, before any work: files, folders and the names of registries


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_shape_the_model_refuses_is_one_line_from_train_py(dry_run, tmp_path, capsys):
    args = ["--model.n_heads=7", f"--out_dir={tmp_path}"] + ["--dry-run"] * dry_run
    assert train.main(args) == 2
    assert capsys.readouterr().err == "error: model: dim 192 is not divisible by n_heads 7\n"
    assert list(tmp_path.iterdir()) == []


def test_every_key_rejects_a_bad_value(tmp_path, capsys):
    assert set(BAD_VALUES) == set(valid_keys())
    for key, value in BAD_VALUES.items():
        if key in CHECKED_AT_START:
            continue
        with pytest.raises(ConfigError) as error:
            overridden(TrainConfig(), [f"--{key}={value}"])
        message = str(error.value)
        assert "\n" not in message and key.removeprefix("model.") in message, (key, message)
    # a missing tokenizer file or model folder: one line, before data preparation
    for key in CHECKED_AT_START:
        assert (
            train.main(
                [
                    f"--out_dir={tmp_path / 'out'}",
                    f"--data_dir={tmp_path / 'data'}",
                    "--device=cpu",
                    f"--{key}={tmp_path / BAD_VALUES[key]}",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and BAD_VALUES[key] in err and len(err.splitlines()) == 1, (
            err
        )
        assert not (tmp_path / "data").exists()


def test_overrides_are_parsed_exactly():
    cfg = overridden(
        TrainConfig(),
        [
            "--max_steps=4e3",
            "--compile=true",
            "--model.n_kv_heads=none",
            "--inputs=a.txt,b/",
            "--lr=1e-3",
            "--seed=9007199254740993",
            "--global_batch_tokens=4_194_304",
        ],
    )
    assert (cfg.max_steps, cfg.compile, cfg.model.n_kv_heads, cfg.inputs, cfg.lr) == (
        4000,
        True,
        None,
        ["a.txt", "b/"],
        1e-3,
    )
    assert cfg.seed == 9007199254740993  # 2**53 + 1: read as an integer, not through a float
    assert cfg.global_batch_tokens == 4_194_304
    assert overridden(TrainConfig(), ['--inputs=["a,b.txt", "c.txt"]']).inputs == [
        "a,b.txt",
        "c.txt",
    ]
    for bad in ("--max_steps=ten", "--max_steps=1.5", "--max_steps=1e300"):
        with pytest.raises(ConfigError, match="expected a value of type int"):
            overridden(TrainConfig(), [bad])
    # 0: no clipping, as in nanoGPT
    assert overridden(TrainConfig(), ["--grad_clip=0"]).grad_clip == 0


def test_unknown_keys_and_config_files(tmp_path, capsys):
    with pytest.raises(
        ConfigError, match=r"unknown config key 'batch_size'; did you mean micro_batch_size"
    ):
        overridden(TrainConfig(), ["--batch_size=1"])
    with pytest.raises(ConfigError, match="did you mean model.n_layers"):
        overridden(TrainConfig(), ["--model.nlayers=2"])
    assert train.main(["--zzz=1"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: unknown config key 'zzz'; see config/__init__.py for the keys"
    )
    assert train.main(["config/missing.py"]) == 2
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="must define `config = TrainConfig"):
        load_config(str(tmp_path / "bad.py"))
    (tmp_path / "typed.py").write_text(
        "from config import TrainConfig\nconfig = TrainConfig(lr='3e-4')\n"
    )
    with pytest.raises(ConfigError, match="lr must be of type float, not '3e-4'"):
        load_config(str(tmp_path / "typed.py"))
    (tmp_path / "broken.py").write_text("from config import TrainConfig\nconfig = TrainConfig(\n")
    with pytest.raises(ConfigError, match=r"broken.py: SyntaxError: .*line 2"):
        load_config(str(tmp_path / "broken.py"))


def test_the_7b_recipe_is_the_papers():
    cfg = load_config("config/7b.py")
    assert (cfg.lr, cfg.beta1, cfg.beta2, cfg.adam_eps, cfg.weight_decay, cfg.grad_clip) == (
        3e-4,
        0.9,
        0.95,
        1e-5,
        0.1,
        1.0,
    )
    assert (cfg.warmup_steps, cfg.min_lr_ratio, cfg.global_batch_tokens) == (
        2000,
        0.1,
        4 * 1024 * 1024,
    )
    import torch

    from model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.model)
    assert train.make_optimizer(cfg, model, torch.device("cpu")).defaults["eps"] == 1e-5


@pytest.mark.parametrize(
    "global_tokens, micro, seq, world, expected",
    [
        (4096, 32, 128, 1, (32, 1, 4096)),  # the default run
        (4096, 32, 128, 2, (16, 1, 4096)),  # the default run under torchrun: micro-batch adapts
        (4096, 32, 128, 3, (11, 1, 4224)),  # 32 sequences cannot split over 3 ranks: 33
        (1024 * 4096, 2, 4096, 8, (2, 64, 4194304)),  # config/7b.py on 8 GPUs
        (
            1024 * 4096,
            2,
            4096,
            6,
            (2, 85, 4177920),
        ),  # on 6: 1024 sequences rounded to 1020 = 6 x 2 x 85
        (1024 * 4096, 3, 4096, 8, (2, 64, 4194304)),  # 128 per rank: 3 does not divide it, 2 does
        (128, 8, 128, 1, (1, 1, 128)),
    ],
)
def test_plan_batch(global_tokens, micro, seq, world, expected):
    cfg = overridden(
        TrainConfig(),
        [
            f"--global_batch_tokens={global_tokens}",
            f"--micro_batch_size={micro}",
            f"--model.max_seq_len={seq}",
        ],
    )
    plan = plan_batch(cfg, world)
    assert (plan.micro_batch_size, plan.accum_steps, plan.global_batch_tokens) == expected
    assert plan.micro_batch_size * plan.accum_steps * seq * world == plan.global_batch_tokens
    assert (plan.note == "") == (expected[0] == micro and expected[2] == global_tokens)


def test_plan_batch_refuses_less_than_a_sequence_per_rank():
    cfg = overridden(TrainConfig(), ["--global_batch_tokens=256"])
    with pytest.raises(
        ConfigError,
        match=r"less than one sequence per rank \(max_seq_len 128 x world size 4 = 512\)",
    ):
        plan_batch(cfg, 4)


def test_resume_config_fixes_what_would_change_the_run():
    saved = flat(TrainConfig())
    saved_dict = {k: v for k, v in saved.items() if not k.startswith("model.")}
    saved_dict["model"] = {k[6:]: v for k, v in saved.items() if k.startswith("model.")}
    cfg, changes = resume_config(
        saved_dict, {"lr": 1e-3, "seed": 1337, "out_dir": "moved"}, out_dir="moved"
    )
    assert cfg.lr == 1e-3 and changes == {"lr": (2e-3, 1e-3)} and cfg.out_dir == "moved"
    for key in set(valid_keys()) - CHANGEABLE_ON_RESUME - {"out_dir"}:
        with pytest.raises(ConfigError, match=f"{key} cannot change when resuming"):
            resume_config(saved_dict, {key: BAD_VALUES[key] + "x"}, out_dir="out")
    assert math.isclose(resume_config(saved_dict, {}, out_dir="out")[0].lr, 2e-3)
