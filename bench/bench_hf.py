"""Figures for starting from open weights: the loss head's memory, and importing a 1B model.

    python bench/bench_hf.py head [--vocab 128256] [--tokens 8192] [--dim 1024]
    python bench/bench_hf.py import [--folder /tmp/tinyllama-random] [--ranks 2]

`head`: peak memory of one forward + backward of the output head and its cross-entropy, on CPU,
for Llama 3's vocabulary, computed in one piece ("whole") and in chunks (model.py's
chunked_cross_entropy). Each variant runs in a fresh process; the figure is its peak RSS above the
RSS after making the inputs (hidden states, head weight), so it counts the logits and everything
backward allocates, including the head's gradient (vocab x dim fp32), which both variants need.

`import`: a random Llama of TinyLlama-1.1B's shape is written once as sharded bf16 safetensors (as
on the Hub); then the time and peak RSS of importing it: sample.py's path (hf.load_model, fp32 on
CPU), train.py's path in one process (build_model with init_from), and train.py's path on
`--ranks` ranks under torchrun with FSDP (gloo, CPU), per rank, with the files already in the page
cache. Peak RSS includes the Python process with torch loaded (printed as "baseline") and the
pages of the weight files each process touched through mmap: those are the page cache, shared by
all ranks and dropped when memory is needed; "not file pages" is the memory the process itself
holds at the end.
"""

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GB = 2**30


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def anonymous_rss() -> int:
    """Resident memory that is not file pages (weights read through mmap are file pages)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


# ----------------------------------------------------------------------------- head


def head_child(variant: str, vocab: int, tokens: int, dim: int):
    import torch.nn.functional as F

    from model import IGNORE_INDEX, chunked_cross_entropy

    torch.manual_seed(0)

    h = (torch.randn(1, tokens, dim) / dim**0.5).requires_grad_()
    weight = torch.nn.Parameter(torch.randn(vocab, dim) * 0.02)
    targets = torch.randint(0, vocab, (1, tokens))
    base = current_rss()
    start = time.perf_counter()
    if variant == "whole":  # one cross-entropy over the whole fp32 logits
        logits = F.linear(h, weight).float().flatten(0, 1)
        loss = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX)
    else:
        loss = chunked_cross_entropy(h, weight, targets)
    loss.backward()
    seconds = time.perf_counter() - start
    print(f"{variant}\t{(peak_rss() - base) / GB:.2f}\t{seconds:.1f}\t{loss.item():.6f}")


def bench_head(args):
    logits_gib, gradient_gib = 4 * args.vocab * args.tokens / GB, 4 * args.vocab * args.dim / GB
    print(
        f"head: vocab {args.vocab:,}, {args.tokens:,} tokens, dim {args.dim}; fp32 logits alone "
        f"would be {logits_gib:.2f} GiB, the head's gradient is {gradient_gib:.2f} GiB"
    )
    for variant in ("whole", "chunked"):
        sizes = [str(args.vocab), str(args.tokens), str(args.dim)]
        out = subprocess.run(
            [sys.executable, __file__, "head-child", variant, *sizes],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        peak, seconds = float(out[1]), float(out[2])
        print(f"  {variant:<8} peak above inputs {peak:6.2f} GiB  {seconds:6.1f} s  loss {out[3]}")


# ----------------------------------------------------------------------------- import

TINYLLAMA = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_act="silu",
    torch_dtype="bfloat16",
)


def write_random_tinyllama(folder: Path, shard_bytes=2 * 10**9):
    """TinyLlama's shape with random bf16 weights, as sharded safetensors + index, one tensor at a
    time."""
    import json

    from safetensors.torch import save_file

    from infra import hf
    from model import Transformer

    if (folder / "model.safetensors.index.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINYLLAMA))
    with torch.device("meta"):
        model = Transformer(hf.read_config(folder))
    shapes = {hf.hf_name(n): p.shape for n, p in model.named_parameters()}
    parts, shard, size = [], {}, 0  # a shard is written as soon as it is full
    for name, shape in [*shapes.items(), (None, None)]:
        if shard and (name is None or size + 2 * shape.numel() > shard_bytes):
            save_file(shard, folder / f"part-{len(parts)}")
            parts.append(list(shard))
            shard, size = {}, 0
        if name is not None:
            shard[name] = (torch.randn(shape) * 0.02).to(torch.bfloat16)
            size += 2 * shape.numel()
    names = [f"model-{i:05d}-of-{len(parts):05d}.safetensors" for i in range(1, len(parts) + 1)]
    for i, name in enumerate(names):
        os.replace(folder / f"part-{i}", folder / name)
    weight_map = {key: name for name, keys in zip(names, parts) for key in keys}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def import_child(mode: str, folder: str):
    import torch.distributed as dist

    import train
    from infra import hf
    from infra.distributed import setup_runtime
    from infra.run import run_config

    base = current_rss()
    start = time.perf_counter()
    if mode == "sample":
        model = hf.load_model(folder)
    else:
        cfg = run_config(None, [f"--init_from={folder}", "--device=cpu", f"--parallel={mode}"])
        rt = setup_runtime(cfg)
        model = train.build_model(cfg, rt, torch.float32, sharded=mode == "fsdp", pretrained=True)
    seconds = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    fields = [
        mode,
        rank,
        f"{seconds:.1f}",
        f"{base / GB:.2f}",
        f"{peak_rss() / GB:.2f}",
        f"{anonymous_rss() / GB:.2f}",
        n_params,
        local,
    ]
    print("\t".join(["RESULT", *map(str, fields)]), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def bench_import(args):
    folder = Path(args.folder)
    start = time.perf_counter()
    write_random_tinyllama(folder)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    for path in folder.glob("*.safetensors"):  # into the page cache: every run reads from memory
        with open(path, "rb") as f:
            while f.read(1 << 26):
                pass
    shards = len(list(folder.glob("*.safetensors")))
    print(
        f"import: {folder} ({size / GB:.2f} GiB of bf16 safetensors in {shards} shards, ready in "
        f"{time.perf_counter() - start:.0f} s)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.ranks}",
    ]
    runs = [("sample", [sys.executable]), ("ddp", [sys.executable]), ("fsdp", torchrun)]
    for mode, launcher in runs:
        result = subprocess.run(
            [*launcher, __file__, "import-child", mode, str(folder)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
        lines = [
            line.split("\t") for line in result.stdout.splitlines() if line.startswith("RESULT")
        ]
        if result.returncode or not lines:
            print(result.stdout[-2000:], result.stderr[-2000:])
            raise SystemExit(f"{mode} failed")
        label = {
            "sample": "sample.py path (hf.load_model), 1 process",
            "ddp": "train.py --init_from, 1 process",
            "fsdp": f"train.py --init_from, FSDP, {args.ranks} ranks",
        }[mode]
        print(f"  {label}")
        by_rank = sorted(lines, key=lambda r: int(r[2]))
        for _, _, rank, seconds, base, peak, anon, n_params, local in by_rank:
            print(
                f"    rank {rank}: {float(seconds):5.1f} s, peak RSS {float(peak):5.2f} GiB "
                f"(baseline {float(base):.2f}; {float(anon):.2f} GiB not file pages at the end), "
                f"holds {int(local) / 1e9:.2f}B of {int(n_params) / 1e9:.2f}B parameters "
                f"({4 * int(local) / GB:.2f} GiB in fp32)"
            )


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "head-child":
        return head_child(sys.argv[2], *map(int, sys.argv[3:6]))
    if len(sys.argv) > 1 and sys.argv[1] == "import-child":
        return import_child(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    head = sub.add_parser("head")
    head.add_argument("--vocab", type=int, default=128256)
    head.add_argument("--tokens", type=int, default=8192)
    head.add_argument("--dim", type=int, default=1024)
    imp = sub.add_parser("import")
    imp.add_argument("--folder", default="/tmp/tinyllama-random")
    imp.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_head(args) if args.what == "head" else bench_import(args)


if __name__ == "__main__":
    main()
