"""memory.py: the traced step against a real 2-rank run, the 7B trace against the formula, the
pre-run check."""

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import train
from infra import memory
from infra.configurator import load_config
from infra.distributed import RankError, Runtime
from model import Transformer

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Every matrix's first dimension is even, so FSDP's shards over 2 ranks need no padding: a rank
# holds exactly half of every parameter.
SMALL = [
    "--optimizer=adamw",  # the bookkeeping below counts AdamW's moments
    "--model.vocab_size=384",
    "--model.dim=64",
    "--model.n_layers=2",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--model.ffn_hidden=128",
    "--model.max_seq_len=64",
    "--model.dropout=0.0",
    "--micro_batch_size=4",
    "--global_batch_tokens=1024",
    "--parallel=fsdp",
]  # 2 micro-steps per step on 2 ranks

REAL_RUN = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import train
from infra import memory
from infra.distributed import Runtime
from infra.configurator import from_dict
dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
rt = Runtime(rank, rank, world_size, torch.device("cpu"))
result = memory.traced_steps(from_dict(json.loads(sys.argv[2])), rt, train.RECIPE)
if rank == 0:
    print(json.dumps(result))
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """The same two steps of the small FSDP config on real tensors and 2 gloo ranks, and on fake
    tensors."""
    cfg = load_config(None, SMALL)
    script = tmp_path_factory.mktemp("real") / "real_run.py"
    script.write_text(REAL_RUN)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(ROOT),
        json.dumps(dataclasses.asdict(cfg)),
    ]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return (
        cfg,
        json.loads(result.stdout.splitlines()[-1]),
        memory.trace_memory(cfg, 2, train.RECIPE),
    )


def test_the_traced_step_holds_what_a_real_two_rank_run_holds(small_runs):
    """Every category at the peak is the same on fake tensors and fake ranks as on real ones, and
    the sharded weights, gradients and AdamW moments are exactly half of the model's (a scalar step
    count per parameter tensor besides)."""
    cfg, real, fake = small_runs
    model = Transformer(cfg.model)
    n_params, n_tensors = model.num_params(), len(list(model.parameters()))
    assert real["at peak"]["Sharded Param"] == real["at peak"]["Sharded Grad"] == 4 * n_params // 2
    assert real["at peak"]["OptState"] == 8 * n_params // 2 + 4 * n_tensors
    assert fake["at peak"] == real["at peak"] and fake["peak"] == real["peak"]
    assert fake["between micro-steps"] == real["between micro-steps"]
    assert fake["peak at initialisation"] == pytest.approx(real["peak at initialisation"], abs=64)
    assert fake["peak at initialisation"] >= 4 * n_params  # the whole fp32 model before sharding


def test_fsdp_holds_sharded_gradients_between_micro_steps(small_runs):
    """After a non-final micro-step a rank holds its shard of the fp32 gradient,
    4 x n_params / 2 bytes; skipping the reduce-scatter (set_requires_gradient_sync(False)) would
    hold the whole unsharded gradient, 4 x n_params, as the tracker's Temp."""
    cfg, real, _ = small_runs
    n_params = Transformer(cfg.model).num_params()
    held = real["between micro-steps"]
    assert (
        sum(held.get(kind, 0) for kind in ("Sharded Grad", "Unsharded Grad", "Temp"))
        == 4 * n_params // 2
    )


# 16 and 32: what micro_batch_size=0 fits on 80 and 141 GB
@pytest.mark.parametrize("micro", [2, 16, 32])
def test_the_7b_trace_on_8_ranks_agrees_with_the_formula(micro):
    """config/7b.py's shapes at 2 of its 32 layers (the whole depth is in bench/bench_memory.py),
    FSDP2 on 8 fake ranks, through the command line: the traced peaks and the formula agree within
    3%."""
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "config/7b.py",
            "--dry-run",
            "--trace",
            "--world-size=8",
            "--model.n_layers=2",
            f"--micro_batch_size={micro}",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "traced on fake tensors, 8 fake rank(s)" in out
    assert f"then one of 2; the run's {128 // micro} repeat the second)" in out
    categories = ["Sharded Param", "Sharded Grad", "OptState", "Unsharded Param"]
    for category in categories + ["Reduce Scatter"] * (
        micro == 2
    ):  # at the peak of a small micro-batch
        assert f"  {category} " in out
    for line in ("  total ", "  peak at initialisation "):
        traced = [row for row in out.splitlines() if row.startswith(line) and "formula" in row]
        assert len(traced) == 1, out
        difference = float(traced[0].split(", ")[-1].rstrip("%)"))
        assert abs(difference) <= 3, traced[0]


@pytest.mark.parametrize(
    "overrides", [["--parallel=ddp"], ["--activation_checkpointing=false", "--dtype=float32"]]
)
def test_the_trace_agrees_with_the_formula_under_ddp_and_without_checkpointing(overrides):
    cfg = load_config("config/7b.py", ["--model.n_layers=2", "--micro_batch_size=1", *overrides])
    traced, estimate = memory.trace_memory(cfg, 8, train.RECIPE), memory.estimate_memory(cfg, 8)
    assert estimate["total"] == pytest.approx(traced["peak"], rel=0.15)
    assert estimate["peak at initialisation"] == pytest.approx(
        traced["peak at initialisation"], rel=0.15
    )


def test_trace_needs_a_dry_run(capsys):
    assert train.main(["config/7b.py", "--trace"]) == 2
    assert "--trace goes with --dry-run" in capsys.readouterr().err


def test_memory_estimate_scales_with_parallel_mode():
    cfg = load_config("config/7b.py", ["--micro_batch_size=2"])
    fsdp8, fsdp1 = memory.estimate_memory(cfg, 8), memory.estimate_memory(cfg, 1)
    assert fsdp1["AdamW moments (fp32)"] == 8 * 6_738_415_616
    assert fsdp8["AdamW moments (fp32)"] == fsdp1["AdamW moments (fp32)"] / 8
    ddp8 = memory.estimate_memory(
        load_config("config/7b.py", ["--micro_batch_size=2", "--parallel=ddp"]), 8
    )
    # why 7B needs sharding
    assert ddp8["weights (fp32)"] == 4 * 6_738_415_616 and ddp8["total"] > 20 * 6_738_415_616

    def activations(estimate):
        return next(size for name, size in estimate.items() if name.startswith("activations"))

    no_ckpt = memory.estimate_memory(
        load_config("config/7b.py", ["--micro_batch_size=2", "--activation_checkpointing=false"]), 8
    )
    assert activations(no_ckpt) > 5 * activations(fsdp8)


def test_the_formula_counts_muons_state():
    """One momentum buffer for each of the blocks' matrices, two AdamW moments for the rest."""
    cfg = load_config(None, [*SMALL, "--parallel=ddp", "--optimizer=muon"])
    model = Transformer(cfg.model)
    optimizer = train.make_optimizer(cfg, model, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    held = sum(t.numel() * t.element_size() for t in state)
    assert memory.estimate_memory(cfg, 1)["Muon + AdamW state (fp32)"] == held


def test_the_pre_run_check_uses_the_formula(small_runs, monkeypatch, capsys):
    cfg, _, traced = small_runs
    estimate = memory.estimate_memory(cfg, 2)
    assert memory.memory_needed(cfg, 2) == memory.CUDA_RESERVE + max(
        estimate["total"], estimate["peak at initialisation"]
    )
    monkeypatch.setattr(memory, "memory_needed", lambda cfg, world_size: 30 * memory.GiB)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device: types.SimpleNamespace(total_memory=80 * memory.GiB),
    )
    memory.check_memory_fits(cfg, Runtime(0, 0, 1, torch.device("cuda")))
    assert (
        "memory per GPU: 30.0 GiB needed (formula), 80.0 GiB on the GPU" in capsys.readouterr().out
    )
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device: types.SimpleNamespace(total_memory=24 * memory.GiB),
    )
    with pytest.raises(RankError, match=r"a GPU needs 30 GiB but has 24 GiB; use --parallel=fsdp"):
        memory.check_memory_fits(cfg, Runtime(0, 0, 1, torch.device("cuda")))


def test_no_run_depends_on_the_trace(small_runs, monkeypatch, capsys):
    """The fake-tensor trace needs torch's testing internals and patches of torch: only
    --dry-run --trace runs it, never the check before a run."""
    cfg, _, _ = small_runs

    def no_trace(*args, **kwargs):
        raise AssertionError("the pre-run check traced")

    monkeypatch.setattr(memory, "trace_memory", no_trace)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device: types.SimpleNamespace(total_memory=80 * memory.GiB),
    )
    memory.check_memory_fits(cfg, Runtime(0, 0, 1, torch.device("cuda")))
    assert "GiB needed (formula)" in capsys.readouterr().out
    source = (ROOT / "infra" / "memory.py").read_text()
    uses = [line for line in source.splitlines() if "torch.testing._internal" in line]
    assert len(uses) == 1 and source.index(uses[0]) > source.index("def trace_memory(")


def test_the_micro_batch_fills_an_80_and_a_141_gb_gpu():
    """config/7b.py's micro_batch_size=0: the largest micro-batch that divides a rank's 128
    sequences and whose estimate fits 90% of the card; a bigger card gets a bigger one, the global
    batch is the same."""
    cfg = load_config("config/7b.py")
    h100 = memory.fit_micro_batch(cfg, 8, 80 * 10**9)
    h200 = memory.fit_micro_batch(cfg, 8, 141 * 10**9)
    assert 2 < h100 < h200 and 128 % h100 == 0 and 128 % h200 == 0
    for size, micro in ((80 * 10**9, h100), (141 * 10**9, h200)):
        fitted = load_config("config/7b.py", [f"--micro_batch_size={micro}"])
        assert memory.memory_needed(fitted, 8) <= memory.PLANNED_SHARE * size
        bigger = load_config("config/7b.py", [f"--micro_batch_size={2 * micro}"])
        assert memory.memory_needed(bigger, 8) > memory.PLANNED_SHARE * size
    result = subprocess.run(
        [sys.executable, "train.py", "config/7b.py", "--dry-run", "--world-size=8"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"{h100} on an H100 80GB, {h200} on an H200 141GB" in result.stdout, result.stderr[
        -2000:
    ]
    assert (
        f"micro-batch {h100} x 4096 tokens, {128 // h100} accumulation steps, 4,194,304"
        in result.stdout
    )
