"""Time forward + backward of the default small model (config.small_model()) on this machine.

One step = forward with loss and backward, no optimizer, float32, batch 32 x seq 128
(4096 tokens, the batch of `python train.py`). Reports the median of several steps after warmup, tokens/s, and the FLOP/s
implied by Transformer.flops_per_token() (PaLM's 6N + 12*L*H*Q*T).

    python bench/bench_model.py [--batch 32] [--seq 128] [--steps 5] [--warmup 2]
"""

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project root: its modules and data/
sys.path.insert(0, str(ROOT))

import torch

from config import small_model
from model import Transformer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = dataclasses.replace(small_model(), max_seq_len=args.seq)
    model = Transformer(config).train()
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    targets = torch.randint(0, config.vocab_size, (args.batch, args.seq))

    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        _, loss = model(tokens, targets)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)

    step_s = statistics.median(times)
    n_tokens = args.batch * args.seq
    flops = model.flops_per_token(args.seq) * n_tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    print(f"config: {config}")
    print(f"params: {model.num_params():,} total, {model.num_params(exclude_embedding=True):,} non-embedding")
    print(f"batch {args.batch} x seq {args.seq} = {n_tokens} tokens/step, median of {args.steps} after {args.warmup} warmup")
    print(f"fwd+bwd: {step_s * 1e3:.1f} ms/step (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
    print(f"throughput: {n_tokens / step_s:,.0f} tokens/s")
    print(f"flops_per_token: {model.flops_per_token(args.seq):,} -> {flops / step_s / 1e9:.1f} GFLOP/s achieved")


if __name__ == "__main__":
    main()
