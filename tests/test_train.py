"""train.py and config/: end-to-end runs, exact resume, signals, checkpoints, errors."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_train import stop_at

import train
from config import TrainConfig, plan_batch
from data import TokenData
from infra import checkpoint, distributed, files
from infra.configurator import load_config

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 384


def tiny_args(data_dir, out_dir, *extra):
    """A model of ~0.1M parameters on the first 200 kB of the bundled corpus: seconds per run. In
    float32, whatever the CPU: dtype=auto would pick bf16 on some, and exact comparisons need one
    dtype."""
    return [
        f"--inputs={data_dir.parent / 'corpus.txt'}",
        f"--data_dir={data_dir}",
        f"--out_dir={out_dir}",
        "--device=cpu",
        "--dtype=float32",
        f"--model.vocab_size={VOCAB}",
        "--model.dim=64",
        "--model.n_layers=2",
        "--model.n_heads=4",
        "--model.ffn_hidden=128",
        "--model.max_seq_len=64",
        "--model.dropout=0.1",
        "--micro_batch_size=8",
        "--global_batch_tokens=1024",
        "--optimizer=adamw",  # the mechanics under test; Muon has its own tests
        "--lr=3e-3",
        "--warmup_steps=5",
        "--eval_interval=10",
        "--eval_tokens=2048",
        "--log_interval=5",
        "--sample_tokens=0",
        *extra,
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shakespeare")
    (root / "corpus.txt").write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:200_000])
    data_dir = root / "prepared"
    assert train.main(tiny_args(data_dir, root / "warmup", "--max_steps=1")) == 0
    return data_dir


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def newest(out_dir) -> Path:
    return checkpoint.latest(out_dir, sharded=False)


def load_model_state(out_dir):
    return checkpoint.safe_load(newest(out_dir))["model"]


def test_tiny_training_learns(data_dir, tmp_path, capsys):
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=60", "--sample_tokens=30")) == 0
    sample = capsys.readouterr().out.split("--- sample ---\n")[1]
    assert len(sample.strip()) > 30  # the run ends by printing text from the trained model
    log = read_log(tmp_path)
    evals = [r for r in log if r.get("event") == "eval"]
    steps = [r for r in log if "loss" in r]
    # small init: near uniform
    assert evals[0]["val_loss"] == pytest.approx(math.log(VOCAB), abs=0.3)
    assert evals[-1]["val_loss"] < 0.75 * math.log(VOCAB)
    assert steps[-1]["loss"] < 0.75 * math.log(VOCAB)
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "eta_s", "epoch"} <= set(steps[-1])
    assert steps[-1]["epoch"] > 0
    assert newest(tmp_path).name == "ckpt-000060.pt" and (tmp_path / "tokenizer.json").is_file()


def test_resume_is_exact(data_dir, tmp_path, monkeypatch):
    """N steps, stop, resume to N + M: the same parameters as N + M uninterrupted (dropout on). The
    resume names only the folders: every other key comes from the checkpoint, not from repeating the
    overrides."""
    full, parts = tmp_path / "full", tmp_path / "parts"
    args = [
        "--max_steps=14",
        "--ckpt_interval=100",
        "--model.n_kv_heads=2",
        "--seed=7",
        "--lr=2e-3",
    ]
    assert train.main(tiny_args(data_dir, full, *args)) == 0
    with monkeypatch.context() as patch:
        stop_at(6, patch.setattr)
        assert train.main(tiny_args(data_dir, parts, *args)) == 0
    assert checkpoint.safe_load(newest(parts))["step"] == 6
    with open(parts / "log.jsonl", "a") as log:
        log.write('{"time": 1, "step": 7, "lo')  # a record cut short by a kill
    assert (
        train.main([f"--data_dir={data_dir}", f"--out_dir={parts}", "--device=cpu", "--resume"])
        == 0
    )
    expected, resumed = load_model_state(full), load_model_state(parts)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name

    # The log reads as if the run had never stopped: no step twice, training time carried over.
    def records(out):
        return [
            (r.get("event"), r["step"], r.get("loss"), r.get("val_loss"))
            for r in read_log(out)
            if r.get("event") not in ("start", "resume", "signal", "checkpoint")
        ]

    assert records(full) == records(parts)
    elapsed = [r["elapsed_s"] for r in read_log(parts) if "elapsed_s" in r]
    assert elapsed == sorted(elapsed)


def test_resume_takes_the_checkpoint_config_and_logs_deliberate_changes(data_dir, tmp_path, capsys):
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=2", "--lr=3e-3")) == 0
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=3", "--resume", "--seed=5")) == 2
    assert "--seed=5 differs from the checkpoint's 1337" in capsys.readouterr().err
    assert (
        train.main(tiny_args(data_dir, tmp_path, "--max_steps=3", "--resume", "--model.dim=32"))
        == 2
    )
    assert "model.dim cannot change when resuming" in capsys.readouterr().err
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=4", "--resume", "--lr=1e-3")) == 0
    changes = {
        r["key"]: (r["old"], r["new"])
        for r in read_log(tmp_path)
        if r.get("event") == "config_change"
    }
    assert changes == {"max_steps": (2, 4), "lr": (3e-3, 1e-3)}
    assert checkpoint.safe_load(newest(tmp_path))["config"]["lr"] == 1e-3


def test_a_second_start_never_overwrites_a_checkpoint(data_dir, tmp_path, capsys):
    """Without --resume an existing checkpoint is an error; --resume=auto serves the first start and
    every restart alike (what a cluster scheduler needs); --overwrite starts over."""
    auto = tiny_args(data_dir, tmp_path, "--max_steps=2", "--resume=auto")
    assert train.main(auto) == 0  # nothing to resume: a fresh start
    before = load_model_state(tmp_path)
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=3")) == 2
    assert (
        "already holds a checkpoint (ckpt-000002.pt); continue it with --resume"
        in capsys.readouterr().err
    )
    assert all(torch.equal(before[k], v) for k, v in load_model_state(tmp_path).items())
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=3", "--resume=auto")) == 0
    assert [r["step"] for r in read_log(tmp_path) if r.get("event") == "resume"] == [2]
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=1", "--overwrite")) == 0
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path, sharded=False)] == [
        "ckpt-000001.pt"
    ]
    assert not any(r.get("event") == "resume" for r in read_log(tmp_path))
    assert train.main(tiny_args(data_dir, tmp_path / "none", "--max_steps=1", "--resume")) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_a_run_folder_in_use_is_refused(data_dir, tmp_path, capsys):
    """While one run holds out_dir, a second one started on it stops at once and writes nothing
    there."""
    with checkpoint.lock(tmp_path):
        assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=1", "--resume=auto")) == 2
    assert f"another run is using {tmp_path}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    # the lock was released
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=1", "--resume=auto")) == 0


def test_the_newest_checkpoints_are_kept_and_partial_saves_cleared(data_dir, tmp_path, monkeypatch):
    args = ["--ckpt_interval=1", "--keep_checkpoints=2"]
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=3", *args)) == 0
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path, sharded=False)] == [
        "ckpt-000002.pt",
        "ckpt-000003.pt",
    ]
    # What a SIGKILL in the middle of a save leaves behind is not a checkpoint, and the next start
    # clears it.
    (tmp_path / "ckpt-000009.pt.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "ckpt-000009.tmp").mkdir()
    assert newest(tmp_path).name == "ckpt-000003.pt"
    synced = []
    monkeypatch.setattr(files, "fsync", lambda path: synced.append(Path(path).name))
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=4", "--resume", *args)) == 0
    assert not list(tmp_path.glob("*.tmp"))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path, sharded=False)] == [
        "ckpt-000003.pt",
        "ckpt-000004.pt",
    ]
    # The data reaches the disk before the rename makes it the checkpoint, and the rename itself
    # after.
    first = synced.index("ckpt-000004.pt.tmp")
    assert synced[first : first + 2] == ["ckpt-000004.pt.tmp", tmp_path.name]


def first_step(cfg):
    """The model, optimizer and micro-batches of a run's first step, as train.train builds them."""
    rt = distributed.Runtime(0, 0, 1, torch.device("cpu"))
    model = train.build_model(cfg, rt, torch.float32, sharded=False, pretrained=False)
    plan, seq = plan_batch(cfg, 1), cfg.model.max_seq_len
    data = TokenData(cfg.data_dir, "train")
    starts = data.train_starts(cfg.seed, 0, plan.global_batch_tokens // seq, seq)
    batches = [
        data.batch(micro, seq, rt.device)
        for micro in starts.reshape(plan.accum_steps, plan.micro_batch_size)
    ]
    return model, train.make_optimizer(cfg, model, rt.device), batches


def test_gradient_accumulation_matches_one_large_batch(data_dir, tmp_path):
    """4 micro-steps of 4 sequences give the gradient of 1 micro-step of 16: the loss is a mean over
    the same windows. Gradients are compared before the update, where only fp32 summation order
    differs (after it, Adam's division by sqrt(v) amplifies that rounding for the tiniest
    gradients)."""
    grads = {}
    for micro in (16, 4):
        cfg = load_config(
            None,
            tiny_args(
                data_dir,
                tmp_path / f"m{micro}",
                f"--micro_batch_size={micro}",
                "--model.dropout=0.0",
            ),
        )
        model, optimizer, batches = first_step(cfg)
        assert len(batches) == 16 // micro
        optimizer.step = optimizer.zero_grad = lambda *args, **kwargs: None
        train.train_step(model, optimizer, batches, cfg.grad_clip, contextlib.nullcontext)
        grads[micro] = {name: param.grad.clone() for name, param in model.named_parameters()}
    for name, grad in grads[16].items():
        torch.testing.assert_close(grads[4][name], grad, rtol=1e-5, atol=1e-8)


def test_sigterm_leaves_a_loadable_checkpoint(data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *tiny_args(data_dir, tmp_path, "--max_steps=100000", "--log_interval=1"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    for line in process.stdout:
        if line.startswith("step 3/"):
            process.send_signal(signal.SIGTERM)
            break
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert "stopped by signal" in output
    state = checkpoint.safe_load(newest(tmp_path))
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
    assert newest(tmp_path).name == "ckpt-000002.pt"
    after = load_model_state(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list(tmp_path.glob("*.tmp"))


def test_non_finite_loss_skips_updates_then_stops(data_dir, tmp_path, monkeypatch, capsys):
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=2")) == 0
    before = load_model_state(tmp_path)
    original = train.Transformer.forward

    def nan_forward(self, tokens, targets=None, start_pos=None):
        logits, loss = original(self, tokens, targets, start_pos)
        return logits, (loss * float("nan") if loss is not None and self.training else loss)

    monkeypatch.setattr(train.Transformer, "forward", nan_forward)
    assert (
        train.main(tiny_args(data_dir, tmp_path, "--max_steps=50", "--resume", "--max_bad_steps=3"))
        == 1
    )
    out = capsys.readouterr().out
    assert out.count("not finite, update skipped") == 3
    assert f"stopping; the last good checkpoint is {tmp_path / 'ckpt-000002.pt'}" in out
    after = load_model_state(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (
        train.main(tiny_args(data_dir, tmp_path / "fresh", "--max_steps=50", "--max_bad_steps=2"))
        == 1
    )
    assert "stopping; no checkpoint was saved yet" in capsys.readouterr().out


def test_corrupt_checkpoint_is_a_clear_error(data_dir, tmp_path, capsys):
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=1")) == 0
    (tmp_path / "ckpt-000001.pt").write_bytes(b"garbage" * 100)
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=2", "--resume")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("warning: checkpoint") and "corrupt" in lines[0]
    assert lines[1].startswith("error: no readable checkpoint") and len(lines) == 2
    assert (
        tmp_path / "ckpt-000001.pt.corrupt"
    ).read_bytes() == b"garbage" * 100  # moved, not deleted


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(data_dir, tmp_path, capsys):
    """A newest checkpoint cut short (a disk that filled) is moved aside with a warning naming it,
    and --resume and --resume=auto continue from the newest one that loads: a restart loop
    recovers."""
    args = ["--ckpt_interval=1", "--keep_checkpoints=3"]
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=3", *args)) == 0
    with open(tmp_path / "ckpt-000003.pt", "r+b") as f:
        f.truncate(20_000)
    capsys.readouterr()
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=4", "--resume=auto", *args)) == 0
    captured = capsys.readouterr()
    assert "ckpt-000003.pt is corrupt" in captured.err and "moved it aside" in captured.err
    assert "resumed from" in captured.out and "ckpt-000002.pt at step 2" in captured.out
    assert (tmp_path / "ckpt-000003.pt.corrupt").stat().st_size == 20_000
    assert newest(tmp_path).name == "ckpt-000004.pt"


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert (
        train.main(
            tiny_args(tmp_path / "data", tmp_path / "out", f"--inputs={tmp_path}/nothing.txt")
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_other_tokenizer_is_refused(data_dir, tmp_path, capsys):
    from tokenizer import Tokenizer

    Tokenizer.train("some other text entirely, not the same", 260).save(tmp_path / "other.json")
    assert (
        train.main(tiny_args(data_dir, tmp_path / "out", f"--tokenizer={tmp_path / 'other.json'}"))
        == 2
    )
    assert "prepared with another tokenizer" in capsys.readouterr().err


def test_a_prepared_folder_is_used_only_with_the_settings_it_was_made_with(
    data_dir, tmp_path, capsys
):
    """A new corpus (the bundled one too, when named), a missing input or another split given for
    an existing data_dir must not train on the old tokens in silence."""
    (tmp_path / "other.txt").write_text("other text\n" * 1000)
    for override, message in [
        (f"--inputs={tmp_path / 'other.txt'}", f"was prepared from {data_dir.parent}"),
        (f"--inputs={ROOT / 'data' / 'tinyshakespeare.txt'}", "was prepared from"),
        (f"--inputs={tmp_path / 'missing.txt'}", "missing.txt does not exist, and"),
        ("--val_fraction=0.2", "with val_fraction=0.1, not 0.2; delete"),
        ("--model.vocab_size=512", "with vocab_size=384, not 512; delete"),
    ]:
        assert train.main(tiny_args(data_dir, tmp_path / "out", override, "--max_steps=1")) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    # no inputs given: a data_dir prepared from any text is used as it is
    args = [
        a
        for a in tiny_args(data_dir, tmp_path / "out", "--max_steps=1")
        if not a.startswith("--inputs")
    ]
    assert train.main(args) == 0


def test_7b_dry_run_prints_the_published_parameter_count():
    result = subprocess.run(
        [sys.executable, "train.py", "config/7b.py", "--dry-run", "--world-size=8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "parameters: 6,738,415,616" in result.stdout
    assert "world size 8, parallel=fsdp" in result.stdout and "AdamW moments" in result.stdout
    six = subprocess.run(
        [
            sys.executable,
            "train.py",
            "config/7b.py",
            "--dry-run",
            "--world-size=6",
            "--micro_batch_size=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert six.returncode == 0, six.stderr
    assert (
        "micro-batch 2 x 4096 tokens, 85 accumulation steps, 4,177,920 tokens per step "
        "(global_batch_tokens 4,194,304 rounded to 4,177,920" in six.stdout
    )


def test_mfu_is_scored_against_the_exact_gpu_variant():
    names = {
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H100 NVL": 835e12,
        "NVIDIA H200": 989e12,
        "NVIDIA GH200 480GB": 989e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A100 80GB PCIe": 312e12,
        "NVIDIA A10": 125e12,
        "NVIDIA A10G": None,
        "NVIDIA L4": 121e12,
        "NVIDIA L40S": 362e12,
        "NVIDIA GeForce RTX 4090": None,
    }
    assert {name: distributed.peak_bf16_flops(name) for name in names} == names


def test_a_rank_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(
        distributed.RankError,
        match=r"rank 1 \(local rank 1\) on .* has no GPU: this node has 1; "
        r"use --nproc_per_node=1",
    ):
        distributed.setup_runtime(TrainConfig(device="cuda"))


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert train.learning_rate(cfg, 0) == pytest.approx(0.1)
    assert train.learning_rate(cfg, 9) == pytest.approx(1.0)
    assert train.learning_rate(cfg, 60) == pytest.approx(0.55)
    assert train.learning_rate(cfg, 110) == pytest.approx(0.1)


def test_wsd_schedule():
    """Warmup, then lr held until the last cooldown_fraction of the steps, then a linear decay."""
    cfg = TrainConfig(
        lr=1.0,
        warmup_steps=10,
        max_steps=110,
        min_lr_ratio=0.1,
        schedule="wsd",
        cooldown_fraction=0.2,
    )
    assert train.learning_rate(cfg, 0) == pytest.approx(0.1)
    assert train.learning_rate(cfg, 50) == pytest.approx(1.0)
    assert train.learning_rate(cfg, 88) == pytest.approx(1.0)  # the decay starts at 110 - 22
    assert train.learning_rate(cfg, 99) == pytest.approx(0.55)
    assert train.learning_rate(cfg, 110) == pytest.approx(0.1)


def test_weight_decay_groups():
    from model import ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    cfg = TrainConfig(optimizer="adamw")
    decay, no_decay = train.make_optimizer(cfg, model, torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {
        "tok_embeddings.weight",
        "layers.0.attention_norm.weight",
        "layers.0.ffn_norm.weight",
        "norm.weight",
    }
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_muon_groups_the_blocks_matrices():
    from model import ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.03)
    matrices, rest = train.make_optimizer(cfg, model, torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    blocks_matrices = sorted(names[id(p)].split(".")[-2] for p in matrices["params"])
    assert blocks_matrices == "w1 w2 w3 wk wo wq wv".split()
    assert {names[id(p)] for p in rest["params"]} == {
        "tok_embeddings.weight",
        "output.weight",
        "layers.0.attention_norm.weight",
        "layers.0.ffn_norm.weight",
        "norm.weight",
    }
    assert matrices["muon"] and matrices["lr_scale"] == pytest.approx(30) and not rest["muon"]


@pytest.mark.parametrize("shape", [(96, 32), (32, 96)])
def test_muon_orthogonalizes_with_the_gradients_singular_vectors(shape):
    """Newton-Schulz keeps the singular vectors of the SVD (up to bf16 rounding) and brings every
    singular value near 1 (the quintic's steep slope leaves them between about 0.7 and 1.15)."""
    from infra.muon import orthogonalize

    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    orthogonal = orthogonalize(g.float()).double()
    rotated = u.mT @ orthogonal @ vh.mT  # diagonal: the same singular vectors
    assert (rotated - torch.diag(torch.diagonal(rotated))).abs().max() < 0.05
    assert torch.diagonal(rotated).min() > 0  # and the same signs
    singular_values = torch.linalg.svdvals(orthogonal)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.2


def test_muon_trains_and_resumes_exactly(data_dir, tmp_path, monkeypatch):
    full, parts = tmp_path / "full", tmp_path / "parts"
    args = ["--optimizer=muon", "--muon_lr=0.02", "--max_steps=10", "--ckpt_interval=100"]
    assert train.main(tiny_args(data_dir, full, *args)) == 0
    evals = [r["val_loss"] for r in read_log(full) if r.get("event") == "eval"]
    assert evals[-1] < 0.9 * evals[0]
    with monkeypatch.context() as patch:
        stop_at(4, patch.setattr)
        assert train.main(tiny_args(data_dir, parts, *args)) == 0
    assert "momentum_buffer" in str(checkpoint.safe_load(newest(parts))["optimizer"])
    resume = [f"--data_dir={data_dir}", f"--out_dir={parts}", "--device=cpu", "--resume"]
    assert train.main(resume) == 0
    expected, resumed = load_model_state(full), load_model_state(parts)
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def test_bf16_autocast_tracks_float32(data_dir, tmp_path):
    """bf16 autocast on CPU (what dtype=auto picks on CPUs with native bf16 matmuls) trains like
    float32: over 40 steps the train losses agree to 0.02 nats on average (0.1 at any one step)
    and the final validation to 0.02 bits per byte. bf16 keeps 8 bits of mantissa (relative
    rounding 0.4%) in the matmul inputs only; weights, optimizer, norms, softmax and loss stay
    fp32, so the curves differ by noise far below what the run learns (over 1 nat here)."""
    logs = {}
    for dtype in ("float32", "bfloat16"):
        assert (
            train.main(
                tiny_args(
                    data_dir,
                    tmp_path / dtype,
                    "--max_steps=40",
                    "--eval_interval=20",
                    f"--dtype={dtype}",
                    "--model.dropout=0.0",
                )
            )
            == 0
        )
        logs[dtype] = read_log(tmp_path / dtype)
    assert [r["dtype"] for r in logs["bfloat16"] if r.get("event") == "start"] == ["bfloat16"]
    curves = {dtype: [r["loss"] for r in log if "loss" in r] for dtype, log in logs.items()}
    differences = [abs(a - b) for a, b in zip(*curves.values())]
    assert sum(differences) / len(differences) < 0.02 and max(differences) < 0.1
    evals = {dtype: [r for r in log if r.get("event") == "eval"] for dtype, log in logs.items()}
    # the run learns
    assert evals["float32"][0]["val_loss"] - evals["float32"][-1]["val_loss"] > 1.0
    assert abs(evals["float32"][-1]["val_bpb"] - evals["bfloat16"][-1]["val_bpb"]) < 0.02


def tensorboard_scalars(out_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out_dir / "tensorboard")).Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_tensorboard_logs_the_records_of_log_jsonl(data_dir, tmp_path):
    """The scalars are log.jsonl's numbers, step for step; after a restart from an older checkpoint
    the replayed steps replace the first version of them, as they do in log.jsonl."""
    pytest.importorskip("tensorboard")
    args = [
        "--loggers=tensorboard",
        "--ckpt_interval=4",
        "--max_steps=8",
        "--log_interval=1",
        "--eval_interval=4",
    ]
    assert train.main(tiny_args(data_dir, tmp_path, *args)) == 0
    (
        tmp_path / "ckpt-000008.pt"
    ).unlink()  # as if killed after logging step 8, before its checkpoint
    assert train.main(tiny_args(data_dir, tmp_path, *args, "--resume", "--lr=1e-3")) == 0
    log, scalars = read_log(tmp_path), tensorboard_scalars(tmp_path)
    for tag, key, event in [
        ("train/loss", "loss", None),
        ("train/lr", "lr", None),
        ("eval/val_bpb", "val_bpb", "eval"),
    ]:
        expected = [(r["step"], r[key]) for r in log if key in r and r.get("event") == event]
        assert [step for step, _ in scalars[tag]] == [step for step, _ in expected], tag
        assert [value for _, value in scalars[tag]] == pytest.approx(
            [value for _, value in expected], rel=1e-6
        ), tag
    # the first run's steps 5-8 (lr up to 3e-3) were replaced by the resumed run's (lr at most 1e-3)
    assert max(lr for step, lr in scalars["train/lr"] if step <= 4) > 1.5e-3
    assert max(lr for step, lr in scalars["train/lr"] if step > 4) < 1.01e-3


def test_wandb_receives_the_records(data_dir, tmp_path, monkeypatch):
    """--loggers=wandb (offline here: no network) gets the training, eval and checkpoint records."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ["--max_steps=4", "--log_interval=1", "--eval_interval=2", "--loggers=wandb"]
    assert train.main(tiny_args(data_dir, tmp_path, *args)) == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    keys = [b"train/loss", b"train/tokens_per_s", b"eval/val_bpb", b"checkpoint/seconds"]
    # wandb's own service process writes the file: on a busy machine it may lag the run's end
    for _ in range(120):
        written = runs[0].read_bytes()
        if all(key in written for key in keys):
            break
        time.sleep(0.5)
    assert [key for key in keys if key not in written] == []


def test_tensorboard_without_the_package_is_a_one_line_error(
    data_dir, tmp_path, monkeypatch, capsys
):
    # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=1", "--loggers=tensorboard")) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "error: loggers=tensorboard needs the tensorboard package: pip install tensorboard"
    )
    assert not (tmp_path / "log.jsonl").exists()  # refused before any work


def test_compile_is_regional(data_dir, tmp_path, monkeypatch):
    """--compile=true compiles each block on its own, in place: one graph serves every block
    (compile time does not grow with depth), parameter names are unchanged and the training steps
    compute the same losses (here with dynamo's eager backend: tracing, no code generation)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # forget graphs compiled earlier in this process
    counters.clear()
    compiled = []
    original = torch.nn.Module.compile

    def compile_eagerly(module, *args, **kwargs):
        compiled.append(module)
        original(module, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eagerly)
    losses = {}
    for flag in ("false", "true"):
        cfg = load_config(
            None, tiny_args(data_dir, tmp_path / flag, f"--compile={flag}", "--model.dropout=0.0")
        )
        model, optimizer, batches = first_step(cfg)
        forward = distributed.replicate_model(
            model,
            distributed.Runtime(0, 0, 1, torch.device("cpu")),
            sharded=False,
            compile=cfg.compile,
        )
        losses[flag] = [
            train.train_step(forward, optimizer, batches, cfg.grad_clip, contextlib.nullcontext)[0]
            for _ in range(2)
        ]
        names = [name for name, _ in model.named_parameters()]
    assert compiled == list(model.layers) and counters["stats"]["unique_graphs"] == 1
    assert names == [name for name, _ in train.Transformer(cfg.model).named_parameters()]
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-6)


def test_a_multi_node_run_on_a_loopback_hostname_says_which_variable_to_set(monkeypatch):
    """Gloo binds to the address the hostname resolves to; on several nodes a loopback one cannot be
    reached from the others, which fails later as "Gloo connectFullMesh failed"."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setattr(distributed.socket, "gethostbyname", lambda name: "127.0.1.1")
    with pytest.raises(
        distributed.RankError, match="resolves to 127.0.1.1, a loopback address.*GLOO_SOCKET_IFNAME"
    ):
        distributed.setup_runtime(TrainConfig(device="cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    distributed.check_gloo_address(4)  # one node: loopback is fine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    distributed.check_gloo_address(4)  # the variable is set: nothing to say


def test_a_stop_at_an_already_saved_step_does_not_save_it_again(data_dir, tmp_path):
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=2")) == 0
    saved = (tmp_path / "ckpt-000002.pt").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as patch:
        stop_at(2, patch.setattr)  # a signal before the resumed run's first step
        assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=4", "--resume")) == 0
    assert (tmp_path / "ckpt-000002.pt").stat().st_mtime_ns == saved and not list(
        tmp_path.glob("*.tmp")
    )
    assert read_log(tmp_path)[-1].get("event") == "signal"


def test_a_time_based_checkpoint_interval(data_dir, tmp_path, monkeypatch):
    """ckpt_every_minutes saves when that long passed since the last save, whatever
    ckpt_interval says."""
    clock = iter(range(0, 10**6, 40))  # every call to time.time() is 40 s later
    monkeypatch.setattr(train.time, "time", lambda: next(clock))
    assert (
        train.main(
            tiny_args(
                data_dir,
                tmp_path,
                "--max_steps=6",
                "--ckpt_interval=1000",
                "--ckpt_every_minutes=5",
                "--keep_checkpoints=10",
            )
        )
        == 0
    )
    saved = [r["step"] for r in read_log(tmp_path) if r.get("event") == "checkpoint"]
    assert 6 in saved and len(saved) >= 2  # the last step, and at least one on time before it


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(
    data_dir, tmp_path, monkeypatch, capsys
):
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=2")) == 0

    def full_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=4", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: could not write")
        and "if the disk is full, free space and resume" in err
    )
    assert len(err.splitlines()) == 1 and newest(tmp_path).name == "ckpt-000002.pt"
    assert not list(tmp_path.glob("*.tmp"))


def test_an_out_dir_that_cannot_be_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file", tmp_path / "file" / "out"):
        assert (
            train.main([f"--out_dir={target}", f"--data_dir={tmp_path / 'data'}", "--device=cpu"])
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {target}: ") and len(err.splitlines()) == 1, err
        assert "choose another path" in err


def test_an_absurd_global_batch_is_refused_before_any_work(tmp_path, capsys):
    assert (
        train.main(
            [
                f"--out_dir={tmp_path / 'out'}",
                f"--data_dir={tmp_path / 'data'}",
                "--global_batch_tokens=1099511627776",
            ]
        )
        == 2
    )
    assert (
        "global_batch_tokens must be a positive integer, at most 2**32" in capsys.readouterr().err
    )
    assert not (tmp_path / "data").exists()


def test_a_run_folder_of_the_other_parallel_mode_is_the_same_run(data_dir, tmp_path, capsys):
    """A folder whose newest checkpoint is an FSDP folder is not a new run for a plain start: it is
    refused, and --resume takes that checkpoint's mode (which needs torchrun)."""
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=2")) == 0
    state = checkpoint.read_train_state(newest(tmp_path))
    sharded = tmp_path / "ckpt-000003"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")
    config = {**state["config"], "parallel": "fsdp"}
    torch.save({"version": 1, "step": 3, "config": config}, sharded / checkpoint.TRAIN_STATE_FILE)
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=4")) == 2
    assert (
        "already holds a checkpoint (ckpt-000003); continue it with --resume (a parallel=fsdp run: "
        "under torchrun)" in capsys.readouterr().err
    )
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=4", "--resume")) == 2
    assert "parallel=fsdp needs torchrun" in capsys.readouterr().err
    assert newest(tmp_path).name == "ckpt-000002.pt"


def test_the_best_val_checkpoint_is_kept_and_named(data_dir, tmp_path, monkeypatch):
    """The run remembers its best val: that step is saved (between checkpoint intervals too),
    survives keep_checkpoints, is named by best.json, and is remembered across a resume."""
    scores = iter([9.0, 5.0, 3.0, 4.0, 4.5, 3.5, 6.0, 7.0])  # evaluations at steps 0, 1, ..., 7
    evaluate = train.evaluate

    def scripted(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        return result and {**result, "val_bpb": next(scores)}

    monkeypatch.setattr(train, "evaluate", scripted)
    args = ["--eval_interval=1", "--ckpt_interval=1", "--keep_checkpoints=2"]
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=5", *args)) == 0
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path, sharded=False)]
    assert names == ["ckpt-000002.pt", "ckpt-000004.pt", "ckpt-000005.pt"]  # step 2 scored 3.0
    best = json.loads((tmp_path / "best.json").read_text())
    assert best == {"step": 2, "val_bpb": 3.0, "checkpoint": "ckpt-000002.pt"}
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=7", "--resume", *args)) == 0
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 2  # 3.5, 6.0, 7.0 are worse
    assert "ckpt-000002.pt" in [
        p.name for p in checkpoint.list_checkpoints(tmp_path, sharded=False)
    ]


def test_resume_and_overwrite_together_are_refused(data_dir, tmp_path, capsys):
    """--resume continues a run and --overwrite deletes it: together they would delete the
    checkpoint being resumed."""
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=1")) == 0
    assert (
        train.main(tiny_args(data_dir, tmp_path, "--max_steps=2", "--resume", "--overwrite")) == 2
    )
    assert "give one of them" in capsys.readouterr().err
    assert newest(tmp_path).name == "ckpt-000001.pt"


def test_a_fresh_start_keeps_the_log_of_a_run_that_died_before_its_first_checkpoint(
    data_dir, tmp_path
):
    (tmp_path / "log.jsonl").write_text('{"step": 150, "loss": 3.0}\n')
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=1")) == 0
    assert all(r["step"] <= 1 for r in read_log(tmp_path))
    kept = list(tmp_path.glob("log-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == '{"step": 150, "loss": 3.0}\n'


def test_a_checkpoint_of_another_version_is_an_error_not_moved_aside(data_dir, tmp_path, capsys):
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=1")) == 0
    torch.save({"version": 99, "step": 5}, tmp_path / "ckpt-000005.pt")
    assert train.main(tiny_args(data_dir, tmp_path, "--max_steps=6", "--resume")) == 2
    assert "not a version-1 checkpoint" in capsys.readouterr().err
    assert (tmp_path / "ckpt-000005.pt").is_file() and not list(tmp_path.glob("*.corrupt"))


def test_a_failed_sharded_save_is_one_line():
    """torch.distributed.checkpoint's failures are BaseExceptions: they become CheckpointError."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    def fail(*args, **kwargs):
        full = _wrap_exception(OSError(28, "No space left on device"))
        raise CheckpointException("save", {0: full})

    failed = r"a sharded checkpoint failed \(rank 0: \[Errno 28\] No space left on device\)"
    with pytest.raises(checkpoint.CheckpointError, match=failed):
        checkpoint._dcp(fail)


def test_a_stop_during_an_evaluation_runs_it_on_resume(data_dir, tmp_path, monkeypatch):
    """A signal during the evaluation of step 2 saves step 2 without it; the resumed run evaluates
    step 2 first, so the log holds every evaluation an uninterrupted run holds, each once."""
    args = ["--eval_interval=2", "--ckpt_interval=100"]
    assert train.main(tiny_args(data_dir, tmp_path / "whole", "--max_steps=4", *args)) == 0
    calls, evaluate = [], train.evaluate

    def stop_in_the_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the evaluation of step 2 (the first is step 0's baseline)
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*a, **kw)

    monkeypatch.setattr(train, "evaluate", stop_in_the_second)
    assert train.main(tiny_args(data_dir, tmp_path / "cut", "--max_steps=4", *args)) == 0
    monkeypatch.undo()
    assert newest(tmp_path / "cut").name == "ckpt-000002.pt"
    assert (
        train.main(tiny_args(data_dir, tmp_path / "cut", "--max_steps=4", "--resume", *args)) == 0
    )

    def evals(out):
        return [(r["step"], r["val_loss"]) for r in read_log(out) if r.get("event") == "eval"]

    assert [step for step, _ in evals(tmp_path / "cut")] == [0, 2, 4]
    assert evals(tmp_path / "cut") == pytest.approx(evals(tmp_path / "whole"))
