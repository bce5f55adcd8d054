"""Memory per GPU of the 7B recipe and a 70B-class model: the formula against the traced step.

    python bench/bench_memory.py            # 7B under FSDP on 1, 8 and 64 ranks, DDP on 8,
                                            # without checkpointing
    python bench/bench_memory.py --70b      # also Llama-2-70B's shape under FSDP on 64 ranks
                                            # (a minute or two)

Each trace runs train.py's own step (train.RECIPE) on fake tensors and a fake process group of its
own; its time is wall clock and CPU. Memory figures are GiB per GPU, without the CUDA reserve.
config/7b.py fits its micro-batch to the GPU; the cases name theirs: 2 (what a 24 GB card
holds), 16 and 32 (what micro_batch_size=0 fits on an 80 GB and a 141 GB card at 8 ranks).
"""

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from infra import memory  # noqa: E402
from infra.configurator import load_config  # noqa: E402

GiB = 2**30
LLAMA2_70B = [
    "--model.dim=8192",
    "--model.n_layers=80",
    "--model.n_heads=64",
    "--model.n_kv_heads=8",
    "--model.ffn_hidden=28672",
]
CASES = [
    ("7B fsdp", 1, ["--micro_batch_size=2"]),
    ("7B fsdp", 8, ["--micro_batch_size=2"]),
    ("7B fsdp", 64, ["--micro_batch_size=2"]),
    ("7B fsdp, micro-batch 16", 8, ["--micro_batch_size=16"]),
    ("7B fsdp, micro-batch 32", 8, ["--micro_batch_size=32"]),
    ("7B ddp", 8, ["--parallel=ddp", "--micro_batch_size=2"]),
    ("7B fsdp, no checkpointing", 8, ["--activation_checkpointing=false", "--micro_batch_size=2"]),
    ("7B fsdp, micro-batch 1", 8, ["--micro_batch_size=1"]),
    ("7B fsdp, fp32", 8, ["--dtype=float32", "--micro_batch_size=2"]),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--70b", dest="llama70b", action="store_true", help="also trace Llama-2-70B on 64 ranks"
    )
    args = parser.parse_args()
    cases = CASES + (
        [("70B fsdp (Llama-2 shape)", 64, [*LLAMA2_70B, "--micro_batch_size=2"])]
        if args.llama70b
        else []
    )
    print(
        f"{'case':<28} {'ranks':>5} | {'step: formula':>13} {'traced':>7} {'diff':>5} | "
        f"{'init: formula':>13} {'traced':>7} | {'wall s':>6} {'CPU s':>6}"
    )
    for name, world_size, overrides in cases:
        cfg = load_config("config/7b.py", overrides)
        estimate = memory.estimate_memory(cfg, world_size)
        start, cpu_start = time.time(), resource.getrusage(resource.RUSAGE_SELF)
        traced = memory.trace_memory(cfg, world_size, train.RECIPE)
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        cpu_seconds = cpu.ru_utime + cpu.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime
        print(
            f"{name:<28} {world_size:>5} | {estimate['total'] / GiB:13.1f} "
            f"{traced['peak'] / GiB:7.1f} "
            f"{100 * (estimate['total'] / traced['peak'] - 1):+4.0f}% | "
            f"{estimate['peak at initialisation'] / GiB:13.1f} "
            f"{traced['peak at initialisation'] / GiB:7.1f} | "
            f"{time.time() - start:6.0f} {cpu_seconds:6.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
