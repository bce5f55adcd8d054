"""Data preparation throughput and memory: prepare MB/s against the number of workers, the reader's
own MB/s (the parent process's ceiling), and peak RSS of the parent and of a worker for ~1 GB.

    python bench/bench_data.py [--data-dir ../shared/data] [--gb 1] [--scaling-mb 100]
        [--workers 1,2,4] [--keep]

The corpus is generated from ../shared/data (not committed): documents made of runs of shuffled
paragraphs of the English novels, the Chinese files, the PEPs and the Python code, written as
.txt files (one ~64 MB file per 64 MB) and .jsonl files, half and half. Words and phrases repeat
as in real corpora but the documents do not. Each prepare runs in a fresh process with a given
tokenizer (trained once here on 8 MB of the corpus, vocab 8192), so tokenizer training is not
timed; bench_tokenizer.py measures that.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DRIVER = """
import json, resource, runpy, sys, time
sys.path.insert(0, {root!r})
sys.argv = ["infra/prepare.py"] + {argv!r}
start, cpu = time.time(), time.process_time()
try:
    runpy.run_module("infra.prepare", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    if exit.code:
        raise
# VmHWM, not getrusage: ru_maxrss keeps the high-water mark of the process this one was forked from
peak = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
print(json.dumps({{"seconds": time.time() - start, "parent_cpu": time.process_time() - cpu,
                  "parent_kb": peak,
                  "worker_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}}))
"""


def paragraphs(shared: Path) -> list[str]:
    if not (shared / "peps.jsonl").is_file():
        sys.exit(
            f"needs the corpora of ../shared/data in {shared} (see its README.md); give --data-dir"
        )
    texts = [p.read_text() for p in sorted(shared.glob("*.txt"))] + [
        p.read_text() for p in sorted(shared.glob("eltec_en/*.txt"))
    ]
    texts += [json.loads(line)["text"] for line in (shared / "peps.jsonl").open()]
    return [p for text in texts for p in text.split("\n\n") if p.strip()]


def generate(folder: Path, pool: list[str], total_bytes: int, seed: int = 0):
    """Write about total_bytes of .txt and .jsonl files made of shuffled runs of paragraphs."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written, index = 0, 0
    while written < total_bytes:
        size = min(64 << 20, total_bytes - written)
        jsonl = index % 2 == 1
        path = folder / f"part_{index:04d}.{'jsonl' if jsonl else 'txt'}"
        with open(path, "w", encoding="utf-8") as f:
            done = 0
            while done < size:
                start = rng.randrange(len(pool))
                doc = "\n\n".join(pool[start : start + rng.randint(3, 40)]) + "\n"
                line = json.dumps({"text": doc}, ensure_ascii=False) + "\n" if jsonl else doc + "\n"
                f.write(line)
                done += len(line.encode("utf-8"))
        written += path.stat().st_size
        index += 1


def prepare(inputs: Path, out: Path, tokenizer: Path, workers: int, code: Path = ROOT) -> dict:
    """Figures of one `python -m infra.prepare` run (of the code in `code`) in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        "--input",
        str(inputs),
        "--out",
        str(out),
        "--tokenizer",
        str(tokenizer),
        "--workers",
        str(workers),
    ]
    result = subprocess.run(
        [sys.executable, "-c", DRIVER.format(root=str(code), argv=argv)],
        cwd=code,
        capture_output=True,
        text=True,
    )
    if result.returncode:
        sys.exit(result.stderr)
    figures = json.loads(result.stdout.splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--gb", type=float, default=1.0, help="size of the big input")
    parser.add_argument(
        "--scaling-mb", type=int, default=100, help="size of the input for the worker scaling"
    )
    parser.add_argument("--workers", default=f"1,2,{2 * (os.cpu_count() or 1)}")
    parser.add_argument("--dir", default="/tmp/bench_data", help="where the generated corpus goes")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpus")
    parser.add_argument(
        "--baseline", help="a checkout of another version, run side by side (e.g. a git worktree)"
    )
    args = parser.parse_args()
    from infra.corpus import list_sources, read_documents
    from tokenizer import Tokenizer

    work = Path(args.dir)
    big, small, tokenizer = work / "corpus_big", work / "corpus_small", work / "tokenizer.json"
    if not big.is_dir():
        print(f"generating {args.gb:g} GB in {big} ...", flush=True)
        pool = paragraphs(Path(args.data_dir))
        generate(big, pool, int(args.gb * 1e9))
        generate(small, pool, args.scaling_mb * 10**6, seed=1)
    if not tokenizer.exists():
        sample = (small / "part_0000.txt").read_text()[:8_000_000]
        Tokenizer.train(sample, 8192).save(tokenizer)
    size_small = sum(p.stat().st_size for p in small.iterdir())
    size_big = sum(p.stat().st_size for p in big.iterdir())
    print(
        f"machine: {os.cpu_count()} CPUs; inputs: {size_small / 1e6:.0f} MB and "
        f"{size_big / 1e9:.2f} GB\n"
    )

    start, n = time.time(), 0
    for piece in read_documents(list_sources(big), 0.1):
        n += piece.nbytes
    print(
        f"reader alone (parent process: read, decode, cut, split), {size_big / 1e9:.2f} GB: "
        f"{n / 1e6 / (time.time() - start):.0f} MB/s\n"
    )

    versions = [("this", ROOT)] + ([("baseline", Path(args.baseline))] if args.baseline else [])
    print(
        f"prepare, {size_small / 1e6:.0f} MB, given tokenizer (vocab 8192); the parent's CPU "
        f"seconds per MB bound the MB/s that any number of workers can reach:"
    )
    print(
        "| version | workers | seconds | MB/s | parent CPU s/MB | peak RSS parent "
        "| peak RSS of a worker |"
    )
    print("|---|---|---|---|---|---|---|")
    for workers in map(int, args.workers.split(",")):
        for name, code in versions:
            f = prepare(small, work / "out", tokenizer, workers, code)
            print(
                f"| {name} | {workers} | {f['seconds']:.1f} | "
                f"{size_small / 1e6 / f['seconds']:.2f} | "
                f"{f['parent_cpu'] / (size_small / 1e6):.3f} | {f['parent_kb'] / 1024:.0f} MB | "
                f"{f['worker_kb'] / 1024:.0f} MB |",
                flush=True,
            )

    workers = os.cpu_count() or 1
    for name, code in versions:
        f = prepare(big, work / "out", tokenizer, workers, code)
        print(
            f"\nprepare ({name}), {size_big / 1e9:.2f} GB, {workers} workers: "
            f"{f['seconds']:.0f} s, {size_big / 1e6 / f['seconds']:.2f} MB/s, parent CPU "
            f"{f['parent_cpu'] / (size_big / 1e6):.3f} s/MB, peak RSS "
            f"{f['parent_kb'] / 1024:.0f} MB (parent), {f['worker_kb'] / 1024:.0f} MB "
            f"(largest worker)",
            flush=True,
        )
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
