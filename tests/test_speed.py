"""dtype=auto's choice of bf16 on CPU, and bench/gpu_check.py run on CPU (as CI runs it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config import TrainConfig
from infra import distributed

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "amx, avx512_bf16, expected",
    [(True, True, "AMX"), (False, True, "AVX512-BF16"), (False, False, None)],
)
def test_dtype_auto_takes_bf16_on_cpus_with_native_bf16_matmuls(
    monkeypatch, amx, avx512_bf16, expected
):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    dtype, reason = distributed.compute_dtype(TrainConfig(), torch.device("cpu"))
    if expected:
        assert (
            dtype == torch.bfloat16
            and reason == f"bf16 autocast (dtype=auto: this CPU has {expected})"
        )
    else:
        assert dtype == torch.float32 and reason.startswith(
            "float32 (dtype=auto: this CPU has no native bf16"
        )
    # an explicit dtype is taken as given, and CUDA always computes in bf16
    assert (
        distributed.compute_dtype(TrainConfig(dtype="float32"), torch.device("cpu"))[0]
        == torch.float32
    )
    assert (
        distributed.compute_dtype(TrainConfig(dtype="bfloat16"), torch.device("cpu"))[0]
        == torch.bfloat16
    )
    assert distributed.compute_dtype(TrainConfig(), torch.device("cuda"))[0] == torch.bfloat16


def test_dtype_auto_keeps_float32_without_onednn(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert distributed.compute_dtype(TrainConfig(), torch.device("cpu"))[0] == torch.float32


def test_gpu_check_runs_every_mode_on_cpu(tmp_path):
    report_path = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "bench/gpu_check.py",
            f"--out={report_path}",
            f"--work-dir={tmp_path}",
            "--layers=2",
            "--steps=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "these are not GPU figures" in result.stdout.splitlines()[0]
    report = json.loads(report_path.read_text())
    assert report["ok"] and not report["gpu_figures"] and "not GPU figures" in report["note"]
    checks = {check["check"]: check for check in report["checks"]}
    assert list(checks) == [
        "mode: fp32",
        "mode: bf16",
        "mode: activation checkpointing",
        "mode: ddp on 2 ranks",
        "mode: fsdp on 2 rank(s)",
        "7B recipe at dim 128, 2 layers",
        "sample.py from a checkpoint",
        "KV-cache decoding",
    ]
    assert [checks[name]["dtype"] for name in list(checks)[:5]] == ["float32"] + ["bfloat16"] * 4
    losses = [checks[name]["losses"] for name in list(checks)[:5]]
    assert all(len(curve) == 3 and curve[-1] < curve[0] for curve in losses)
    wide = checks["7B recipe at dim 128, 2 layers"]
    assert wide["tokens_per_s"] > 0 and wide["estimated_gib"] > 0 and wide["checkpoint_gb"] > 0
    assert not list(tmp_path.glob("gpu_check_*"))  # the runs and their checkpoints are deleted


def test_gpu_check_cuda_arguments_work_on_cpu_up_to_the_gpu_work(tmp_path):
    """gpu_check's 7B-width run exactly as a CUDA node gets it (4 blocks of config/7b.py at full
    width, vocab 32000, context 4096, FSDP on 2 ranks), the device swapped to the CPU: its arguments
    must agree with the check's data (a 32000-row model on the check's small tokenizer) and plan its
    batch; it stops where the GPU work starts, before building the 1B-parameter model."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    checker = gpu_check.Checker(tmp_path, cuda=True, ranks=2)
    command = checker.command(
        "wide", gpu_check.wide_model(True, 4, 2) + ["--max_steps=2"], 2, data="data-wide"
    )
    command[command.index("train.py")] = "tests/run_train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STOP_BEFORE_MODEL": "1"}
    result = subprocess.run(
        [*command, "--device=cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("stopped before building the model") == 2  # both ranks got there
    meta = json.loads((tmp_path / "data-wide" / "meta.json").read_text())
    assert meta["vocab_size"] == gpu_check.VOCAB


def test_attention_runs_in_fp32_under_cpu_autocast(monkeypatch):
    """PyTorch's CPU attention kernels are slower in bf16 than in fp32 (bench/bench_model.py), so
    under CPU autocast the projections run in bf16 and attention in fp32; the block's output stays
    in bf16."""
    import model

    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, *args, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(model.F, "scaled_dot_product_attention", recording_sdpa)
    m = model.Transformer(
        model.ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=16)
    )
    tokens = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(tokens)
        assert m.layers[0].attention.wq(torch.zeros(1, 32)).dtype == torch.bfloat16
    m(tokens)
    assert seen == [torch.float32, torch.float32]
