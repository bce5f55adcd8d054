"""train.py and config/: end-to-end runs, exact resume, signals, checkpoints, errors."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import train
from run_train import stop_at
from config import ConfigError, TrainConfig, apply_overrides, load_config

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 384


def tiny_args(data_dir, out_dir, *extra):
    """A model of ~0.1M parameters on the first 200 kB of the bundled corpus: seconds per run."""
    return [f"--inputs={data_dir.parent / 'corpus.txt'}", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
            f"--model.vocab_size={VOCAB}", "--model.dim=64", "--model.n_layers=2", "--model.n_heads=4",
            "--model.ffn_hidden=128", "--model.max_seq_len=64", "--model.dropout=0.1", "--micro_batch_size=8",
            "--global_batch_tokens=1024", "--lr=3e-3", "--warmup_steps=5", "--eval_interval=10",
            "--eval_tokens=2048", "--log_interval=5", "--sample_tokens=0", *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shakespeare")
    (root / "corpus.txt").write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:200_000])
    data_dir = root / "prepared"
    assert train.main(tiny_args(data_dir, root / "warmup", "--max_steps=1")) == 0
    return data_dir


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def load_model_state(out_dir):
    return checkpoint.safe_load(Path(out_dir) / checkpoint.CKPT_FILE)["model"]


def test_tiny_training_learns(data_dir, tmp_path, capsys):
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=60", "--sample_tokens=30")) == 0
    sample = capsys.readouterr().out.split("--- sample ---\n")[1]
    assert len(sample.strip()) > 30  # the run ends by printing text from the trained model
    log = read_log(tmp_path)
    evals = [r for r in log if r.get("event") == "eval"]
    steps = [r for r in log if "loss" in r]
    assert evals[0]["val_loss"] == pytest.approx(math.log(VOCAB), abs=0.3)  # small init: near uniform
    assert evals[-1]["val_loss"] < 0.75 * math.log(VOCAB)
    assert steps[-1]["loss"] < 0.75 * math.log(VOCAB)
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "eta_s"} <= set(steps[-1])
    assert (tmp_path / "ckpt.pt").is_file() and (tmp_path / "tokenizer.json").is_file()


def test_resume_is_exact(data_dir, tmp_path, monkeypatch):
    """N steps, stop, resume to N + M: the same parameters as N + M uninterrupted (dropout on)."""
    full, parts = tmp_path / "full", tmp_path / "parts"
    args = ["--max_steps=14", "--ckpt_interval=100", "--model.n_kv_heads=2"]
    assert train.main(tiny_args(data_dir, full, *args)) == 0
    with monkeypatch.context() as patch:
        stop_at(6, patch.setattr)
        assert train.main(tiny_args(data_dir, parts, *args)) == 0
    assert checkpoint.safe_load(parts / "ckpt.pt")["step"] == 6
    assert train.main(tiny_args(data_dir, parts, *args, "--resume")) == 0
    expected, resumed = load_model_state(full), load_model_state(parts)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    losses = lambda out: [r["loss"] for r in read_log(out) if "loss" in r]  # noqa: E731
    assert losses(full) == losses(parts)


def test_gradient_accumulation_matches_one_large_batch(data_dir, tmp_path):
    """4 micro-steps of 2 sequences equal 1 micro-step of 8: the loss is a mean over the same windows."""
    common = ["--max_steps=3", "--model.dropout=0.0"]
    assert train.main(tiny_args(data_dir, tmp_path / "big", *common, "--micro_batch_size=16",
                                "--global_batch_tokens=1024")) == 0
    assert train.main(tiny_args(data_dir, tmp_path / "acc", *common, "--micro_batch_size=4",
                                "--global_batch_tokens=1024")) == 0
    big, acc = load_model_state(tmp_path / "big"), load_model_state(tmp_path / "acc")
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-6)


def test_sigterm_leaves_a_loadable_checkpoint(data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "train.py", *tiny_args(data_dir, tmp_path, "--max_steps=100000",
                                                                        "--log_interval=1")],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in process.stdout:
        if line.startswith("step 3/"):
            process.send_signal(signal.SIGTERM)
            break
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert "stopped by signal" in output
    state = checkpoint.safe_load(tmp_path / "ckpt.pt")
    assert state["step"] >= 3 and state["config"]["model"]["dim"] == 64


def test_interrupted_checkpoint_write_keeps_the_previous_one(data_dir, tmp_path, monkeypatch):
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=2")) == 0
    before = load_model_state(tmp_path)
    real_save = torch.save

    def save_half_then_die(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:1000])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_args(data_dir, tmp_path, "--max_steps=4", "--resume"))
    monkeypatch.undo()
    after = load_model_state(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "log.jsonl", "tokenizer.json"]


def test_non_finite_loss_skips_updates_then_stops(data_dir, tmp_path, monkeypatch, capsys):
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=2")) == 0
    before = load_model_state(tmp_path)
    original = train.Transformer.forward

    def nan_forward(self, tokens, targets=None, start_pos=None):
        logits, loss = original(self, tokens, targets, start_pos)
        return logits, (loss * float("nan") if loss is not None and self.training else loss)

    monkeypatch.setattr(train.Transformer, "forward", nan_forward)
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=50", "--resume", "--max_bad_steps=3")) == 1
    out = capsys.readouterr().out
    assert out.count("not finite, update skipped") == 3 and "stopping" in out
    after = load_model_state(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_errors(data_dir, tmp_path, capsys):
    assert train.main(tiny_args(data_dir, tmp_path / "none", "--max_steps=1", "--resume")) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=1")) == 0
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=2", "--resume", "--model.dim=32")) == 2
    assert "another model shape (model.dim" in capsys.readouterr().err
    (tmp_path / "ckpt.pt").write_bytes(b"garbage" * 100)
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=2", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint") and "corrupt" in err and len(err.splitlines()) == 1


def test_config_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_size'; did you mean micro_batch_size"):
        apply_overrides(TrainConfig(), ["--batch_size=1"])
    with pytest.raises(ConfigError, match="did you mean model.n_layers"):
        apply_overrides(TrainConfig(), ["--model.nlayers=2"])
    with pytest.raises(ConfigError, match="expected a value of type int"):
        apply_overrides(TrainConfig(), ["--max_steps=ten"])
    with pytest.raises(ConfigError, match="parallel must be"):
        apply_overrides(TrainConfig(), ["--parallel=zero3"])
    cfg = apply_overrides(TrainConfig(), ["--max_steps=4e3", "--compile=true", "--model.n_kv_heads=none",
                                          "--inputs=a.txt,b/", "--lr=1e-3"])
    assert (cfg.max_steps, cfg.compile, cfg.model.n_kv_heads, cfg.inputs, cfg.lr) == (4000, True, None, ["a.txt", "b/"], 1e-3)
    assert train.main(["--zzz=1"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown config key 'zzz'; see config/__init__.py for the keys"
    assert train.main(["config/missing.py"]) == 2
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="must define `config = TrainConfig"):
        load_config(str(tmp_path / "bad.py"))


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert train.main(tiny_args(tmp_path / "data", tmp_path / "out", f"--inputs={tmp_path}/nothing.txt")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_other_tokenizer_is_refused(data_dir, tmp_path, capsys):
    from tokenizer import Tokenizer
    Tokenizer.train("some other text entirely, not the same", 260).save(tmp_path / "other.json")
    assert train.main(tiny_args(data_dir, tmp_path / "out", f"--tokenizer={tmp_path / 'other.json'}")) == 2
    assert "prepared with another tokenizer" in capsys.readouterr().err


def test_7b_dry_run_prints_the_published_parameter_count():
    result = subprocess.run([sys.executable, "train.py", "config/7b.py", "--dry-run", "--world-size=8"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "parameters: 6,738,415,616" in result.stdout
    assert "world size 8, parallel=fsdp" in result.stdout and "AdamW moments" in result.stdout


def test_memory_estimate_scales_with_parallel_mode():
    cfg = load_config("config/7b.py")
    fsdp8, fsdp1 = train.estimate_memory(cfg, 8), train.estimate_memory(cfg, 1)
    assert fsdp1["AdamW moments (fp32)"] == 8 * 6_738_415_616
    assert fsdp8["AdamW moments (fp32)"] == fsdp1["AdamW moments (fp32)"] / 8
    ddp8 = train.estimate_memory(apply_overrides(cfg, ["--parallel=ddp"]), 8)
    assert ddp8["weights (fp32)"] == 4 * 6_738_415_616 and ddp8["total"] > 108e9  # why 7B needs sharding
    no_ckpt = train.estimate_memory(apply_overrides(cfg, ["--activation_checkpointing=false"]), 8)
    assert no_ckpt["activations"] > 5 * fsdp8["activations"]


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert train.learning_rate(cfg, 0) == pytest.approx(0.1)
    assert train.learning_rate(cfg, 9) == pytest.approx(1.0)
    assert train.learning_rate(cfg, 60) == pytest.approx(0.55)
    assert train.learning_rate(cfg, 110) == pytest.approx(0.1)


def test_weight_decay_groups():
    from model import ModelConfig, Transformer
    model = Transformer(ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    decay, no_decay = train.make_optimizer(TrainConfig(), model, torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {"tok_embeddings.weight", "layers.0.attention_norm.weight",
                                                          "layers.0.ffn_norm.weight", "norm.weight"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
