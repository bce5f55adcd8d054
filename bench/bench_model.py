"""Forward + backward of the default model (config.small_model()), side by side in float32 and bf16
autocast, with and without its dropout (0.1, on the residual branches).

One step = forward with loss and backward, no optimizer, batch 32 x seq 128 (4096 tokens, the batch
of `python train.py`). The variants take turns step by step, so machine load falls on all of them
alike; each reports the median step time after warmup, tokens/s, the FLOP/s implied by
Transformer.flops_per_token() (PaLM's 6N + 12*L*H*Q*T), and its speed relative to the first variant.
Then attention alone, fused and unfused kernels in both dtypes (why it runs in fp32 under CPU
autocast).

    python bench/bench_model.py [--batch 32] [--seq 128] [--steps 7] [--warmup 2]
"""

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project root: its modules and data/
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from config import small_model  # noqa: E402
from infra.distributed import native_bf16_cpu  # noqa: E402
from model import Transformer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = dataclasses.replace(small_model(), max_seq_len=args.seq)
    variants = {}
    for dropout in (0.0, 0.1):
        model = Transformer(dataclasses.replace(config, dropout=dropout)).train()
        for dtype in (torch.float32, torch.bfloat16):
            variants[f"dropout {dropout}, {str(dtype).removeprefix('torch.')}"] = (model, dtype)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    targets = torch.randint(0, config.vocab_size, (args.batch, args.seq))

    times = {name: [] for name in variants}
    for step in range(args.warmup + args.steps):
        for name, (model, dtype) in variants.items():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                _, loss = model(tokens, targets)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)

    n_tokens = args.batch * args.seq
    flops = model.flops_per_token(args.seq) * n_tokens
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16 matmul: "
        f"{native_bf16_cpu() or 'none'}"
    )
    print(f"model: {config}")
    print(
        f"params: {model.num_params():,}; batch {args.batch} x seq {args.seq} = "
        f"{n_tokens} tokens/step, "
        f"median of {args.steps} steps after {args.warmup} warmup, variants interleaved"
    )
    first = statistics.median(next(iter(times.values())))
    print(f"\n{'variant':<26} {'ms/step':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'speed-up':>8}")
    for name, seconds in times.items():
        step_s = statistics.median(seconds)
        print(
            f"{name:<26} {step_s * 1e3:>8.1f} {n_tokens / step_s:>9,.0f} "
            f"{flops / step_s / 1e9:>8.1f} "
            f"{first / step_s:>7.2f}x"
        )
    attention_alone(args.batch, config, args.warmup + args.steps)


def attention_alone(batch: int, config, repeats: int):
    """Causal SDPA forward + backward at the model's shape, per kernel and dtype: why
    model.attention runs in fp32 under CPU autocast."""
    shape = (batch, config.n_heads, config.max_seq_len, config.head_dim)
    kernels = {"fused": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
    times = {}
    for _ in range(repeats):
        for kernel, backend in kernels.items():
            for dtype in (torch.float32, torch.bfloat16):
                q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
                start = time.perf_counter()
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                times.setdefault((kernel, str(dtype).removeprefix("torch.")), []).append(
                    time.perf_counter() - start
                )
    print(f"\nattention alone, forward + backward of {shape}, median of {repeats}:")
    for (kernel, dtype), seconds in times.items():
        print(f"  {kernel:<6} {dtype:<9} {statistics.median(seconds) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
