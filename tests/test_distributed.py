"""DDP and FSDP2 under `torchrun --nproc_per_node=2` (gloo, CPU) against a single process.

Tolerance: with the same global batch, ranks compute the same per-sequence gradients as one
process; only the order of fp32 additions (all-reduce, reduce-scatter, the mean over micro-steps)
differs, by a few ulp. Losses must agree to 1e-4 (they are logged to 4 decimals). AdamW divides
each update by sqrt(v): for the rare weights whose gradient is ~0, that rounding noise can move
the update by up to lr (3e-3) per step, so parameters must agree to 1e-6 in 99.9% of elements
and to 1e-4 (3% of one step) in all; a wrong gradient scale or data split moves them by ~lr
everywhere and fails both.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint

ROOT = Path(__file__).resolve().parent.parent
ENTRY = str(ROOT / "tests" / "run_train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    (root / "corpus.txt").write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:200_000])
    return root


def args(workdir, out, *extra):
    return [f"--inputs={workdir / 'corpus.txt'}", f"--data_dir={workdir / 'prepared'}", f"--out_dir={workdir / out}",
            "--model.vocab_size=384", "--model.dim=64", "--model.n_layers=2", "--model.n_heads=4",
            "--model.n_kv_heads=2", "--model.ffn_hidden=128", "--model.max_seq_len=64", "--model.dropout=0.0",
            "--micro_batch_size=8", "--global_batch_tokens=1024", "--lr=3e-3", "--warmup_steps=2",
            "--eval_interval=3", "--eval_tokens=2048", "--log_interval=1", "--sample_tokens=0", "--max_steps=6",
            *extra]


def run(workdir, out, *extra, nproc=0, stop_at=0):
    """Train with `nproc` torchrun ranks (0: plain python) and return the output folder."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    env = {**ENV, "STOP_AT_STEP": str(stop_at)}
    result = subprocess.run([*launcher, ENTRY, *args(workdir, out, *extra)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir / out


@pytest.fixture(scope="module")
def single(workdir):
    return run(workdir, "single")


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_model(a, b):
    state_a, state_b = checkpoint.safe_load(a / "ckpt.pt")["model"], checkpoint.safe_load(b / "ckpt.pt")["model"]
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        difference = (state_a[name] - state_b[name]).abs()
        assert difference.max() <= 1e-4, f"{name}: max difference {difference.max():.2e}"
        assert (difference > 1e-6).float().mean() <= 1e-3, f"{name}: {(difference > 1e-6).sum()} elements differ"


def test_ddp_two_ranks_equal_one_process(workdir, single):
    ddp = run(workdir, "ddp", nproc=2)
    assert len(losses(ddp)) == 6
    assert losses(ddp) == pytest.approx(losses(single), abs=1e-4)
    assert_same_model(ddp, single)
    log = (ddp / "log.jsonl").read_text()
    assert '"world_size": 2' in log and '"grad_accum": 1' in log


def test_ddp_gradient_accumulation_equals_one_large_batch(workdir):
    one_batch = run(workdir, "one_batch", "--micro_batch_size=16")
    accumulated = run(workdir, "ddp_accum", "--micro_batch_size=4", nproc=2)
    assert '"grad_accum": 2' in (accumulated / "log.jsonl").read_text()
    assert losses(accumulated) == pytest.approx(losses(one_batch), abs=1e-4)
    assert_same_model(accumulated, one_batch)


def test_fsdp_two_ranks_equal_one_process_and_consolidate(workdir, single):
    """With activation checkpointing on: recomputing each block in backward must change nothing."""
    fsdp = run(workdir, "fsdp", "--parallel=fsdp", "--activation_checkpointing=true", nproc=2)
    assert (fsdp / "ckpt_dcp" / ".metadata").is_file() and not (fsdp / "ckpt.pt").exists()
    assert losses(fsdp) == pytest.approx(losses(single), abs=1e-4)
    subprocess.run([sys.executable, "train.py", "--consolidate", str(fsdp)], cwd=ROOT, check=True, env=ENV,
                   capture_output=True)
    assert_same_model(fsdp, single)
    assert checkpoint.safe_load(fsdp / "ckpt.pt")["config"]["parallel"] == "fsdp"


def test_fsdp_resume_equals_uninterrupted_also_on_another_world_size(workdir, single):
    stopped = run(workdir, "fsdp_resume", "--parallel=fsdp", nproc=2, stop_at=3)
    assert checkpoint.safe_load(stopped / "ckpt_dcp" / "train_state.pt")["step"] == 3
    shutil.copytree(stopped, workdir / "fsdp_resume_1rank")
    run(workdir, "fsdp_resume", "--parallel=fsdp", "--resume", nproc=2)
    run(workdir, "fsdp_resume_1rank", "--parallel=fsdp", "--resume", nproc=1)
    for out in ("fsdp_resume", "fsdp_resume_1rank"):
        subprocess.run([sys.executable, "train.py", "--consolidate", str(workdir / out)], cwd=ROOT, check=True,
                       env=ENV, capture_output=True)
        assert_same_model(workdir / out, single)
        assert losses(workdir / out) == pytest.approx(losses(single), abs=1e-4)
