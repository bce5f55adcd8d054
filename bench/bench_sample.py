"""Decoding speed of sample.generate (KV cache) against recomputing the whole sequence for every
token.

    python bench/bench_sample.py [--new-tokens 64] [--repeats 3]

The model is the default small model's shape (config.small_model()) with random weights (speed
does not depend on the values), except max_seq_len=1024, so that a 512-token prompt plus the new
tokens fit in the context. Both paths decode greedily; times are the median of --repeats runs and
include the prompt's forward pass.
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
from sample import generate


def median_seconds(fn, repeats):
    fn()  # warm-up: first calls pay for allocation and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def greedy_by_recompute(model, prompt, new_tokens):
    ids = torch.tensor([prompt])
    for _ in range(new_tokens):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


@torch.inference_mode()
def step_latency(model, context, repeats, cached):
    """Seconds to produce the token after `context` tokens: one cached position, or a full
    forward."""
    ids = torch.randint(model.config.vocab_size, (1, context + 1))
    if not cached:
        return median_seconds(lambda: model(ids), repeats)
    model.setup_kv_cache(1, max_seq_len=context + 1)
    model(ids[:, :context], start_pos=0)  # prefill; each timed step rewrites the same slot
    seconds = median_seconds(lambda: model(ids[:, context:], start_pos=context), repeats)
    model.clear_kv_cache()
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = dataclasses.replace(small_model(), max_seq_len=1024)
    model = Transformer(config).eval()
    print(
        f"model: the default small model but max_seq_len=1024 (dim {config.dim}, "
        f"{config.n_layers} layers, {config.n_heads} heads, vocab {config.vocab_size}), "
        f"{model.num_params() / 1e6:.1f}M params, float32, {torch.get_num_threads()} CPU "
        f"threads; median of {args.repeats} runs"
    )

    header = [
        "prompt".rjust(6),
        "new".rjust(4),
        "KV cache tok/s".rjust(14),
        "recompute tok/s".rjust(15),
        "speed-up".rjust(8),
    ]
    print("\n" + "  ".join(header))
    n = args.new_tokens
    for prompt_len in (16, 512):
        prompt = torch.randint(config.vocab_size, (prompt_len,)).tolist()
        cached = median_seconds(lambda: generate(model, prompt, n, temperature=0), args.repeats)
        full = median_seconds(lambda: greedy_by_recompute(model, prompt, n), args.repeats)
        print(
            f"{prompt_len:>6}  {n:>4}  {n / cached:>14.1f}  {n / full:>15.1f}  "
            f"{full / cached:>7.1f}x"
        )

    print(f"\n{'context':>7}  {'KV cache ms/token':>17}  {'recompute ms/token':>18}")
    for context in (16, 128, 256, 512, 768, 1000):
        cached = step_latency(model, context, 2 * args.repeats + 1, cached=True)
        full = step_latency(model, context, args.repeats, cached=False)
        print(f"{context:>7}  {cached * 1e3:>17.2f}  {full * 1e3:>18.2f}")


if __name__ == "__main__":
    main()
