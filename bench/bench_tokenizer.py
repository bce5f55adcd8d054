"""Benchmark tokenizer.py: training time and peak memory, encode throughput, compression.

    python bench/bench_tokenizer.py [--data-dir ../shared/data] [--runs 3]

Each training run is a fresh subprocess so that its peak RSS is its own. tiktoken is optional.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project root: its modules and data/
sys.path.insert(0, str(ROOT))

import regex

from tokenizer import GPT4_SPLIT_PATTERN, Tokenizer

TRAIN_ONE = """
import json, resource, sys, time
from tokenizer import Tokenizer
path, vocab, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
start = time.perf_counter()
# Read here rather than with data.iter_texts, which imports torch and would inflate the peak RSS
# (this script too stays free of torch: a child process's peak RSS starts at its parent's).
texts = (json.loads(line)["text"] for line in open(path)) if path.endswith(".jsonl") else [open(path).read()]
tok = Tokenizer.train(texts, vocab)
seconds = time.perf_counter() - start
tok.save(out)
print(json.dumps({"s": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def train(path, vocab, out, runs):
    """Median train time and the largest peak RSS over `runs` fresh processes."""
    results = [json.loads(subprocess.run([sys.executable, "-c", TRAIN_ONE, str(path), str(vocab), str(out)],
                                         cwd=ROOT, check=True, capture_output=True, text=True).stdout)
               for _ in range(runs)]
    return statistics.median(r["s"] for r in results), max(r["rss_mb"] for r in results)


def mb_per_s(fn, arg, n_bytes, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return n_bytes / statistics.median(times) / 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    data = Path(args.data_dir)
    try:
        import tiktoken
    except ImportError:
        tiktoken = None
    tmp = Path(tempfile.mkdtemp())
    shakespeare = ROOT / "data" / "tinyshakespeare.txt"

    print("## training (median of runs; peak RSS of the training process)")
    print(f"{'corpus':<24}{'vocab':>7}{'MB':>7}{'seconds':>9}{'peak RSS MB':>13}")
    jobs = [(shakespeare, 4096, args.runs), (data / "peps.jsonl", 4096, 1), (data / "peps.jsonl", 32000, args.runs),
            (data / "chinese_poetry.txt", 4096, 1), (data / "chinese_poetry.txt", 32000, 1)]
    toks = {}
    for path, vocab, runs in jobs:
        out = tmp / f"{path.stem}-{vocab}.json"
        seconds, rss = train(path, vocab, out, runs)
        toks[path.stem, vocab] = Tokenizer.load(out)
        print(f"{path.name:<24}{vocab:>7}{path.stat().st_size / 1e6:>7.1f}{seconds:>9.2f}{rss:>13.0f}")

    print("\n## encode throughput, MB/s (median of runs, single thread unless said)")
    findall = regex.compile(GPT4_SPLIT_PATTERN).findall
    corpora = [("tinyshakespeare", shakespeare.read_text(encoding="utf-8"), ("tinyshakespeare", 4096)),
               ("peps.jsonl", [json.loads(line)["text"] for line in open(data / "peps.jsonl")], ("peps", 32000)),
               ("zh_commonvoice_wiki", (data / "zh_commonvoice_wiki.txt").read_text(encoding="utf-8"),
                ("chinese_poetry", 32000))]
    print(f"{'text':<22}{'vocab':>6}{'ours cold':>10}{'ours warm':>10}{'tiktoken':>10}{'findall':>9}{'batch x2':>10}")
    for name, text, key in corpora:
        tok = toks[key]
        docs = text if isinstance(text, list) else [text[i:i + 100_000] for i in range(0, len(text), 100_000)]
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        fresh = Tokenizer(tok.pattern, tok.merges, list(tok.special_tokens))
        cold = mb_per_s(lambda ds: [fresh.encode_ordinary(d) for d in ds], docs, n_bytes, 1)
        warm = mb_per_s(lambda ds: [tok.encode_ordinary(d) for d in ds], docs, n_bytes, args.runs)
        split = mb_per_s(lambda ds: [findall(d) for d in ds], docs, n_bytes, args.runs)
        batch = mb_per_s(lambda ds: tok.encode_batch(ds, num_workers=2), docs, n_bytes, args.runs)
        tt = "-"
        if tiktoken:
            enc = tiktoken.Encoding(name="b", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks,
                                    special_tokens=tok.special_tokens)
            tt = f"{mb_per_s(lambda ds: [enc.encode_ordinary(d) for d in ds], docs, n_bytes, args.runs):.1f}"
        print(f"{name:<22}{key[1]:>6}{cold:>10.1f}{warm:>10.1f}{tt:>10}{split:>9.1f}{batch:>10.1f}")

    print("\n## compression on held-out text, bytes per token")
    held_out = [("eltec_en_08 (2 MB)", (data / "eltec_en" / "eltec_en_08.txt").read_text(encoding="utf-8"), "peps"),
                ("eltec_en_08 (2 MB)", None, "tinyshakespeare"),
                ("zh_commonvoice_wiki", (data / "zh_commonvoice_wiki.txt").read_text(encoding="utf-8"), "chinese_poetry")]
    print(f"{'held-out text':<22}{'trained on':<18}{'vocab':>6}{'bytes/token':>12}")
    for name, text, trained_on in held_out:
        text = (text or held_out[0][1]).encode("utf-8")[:2_000_000].decode("utf-8", "ignore")
        for vocab in (4096, 32000):
            if (trained_on, vocab) in toks:
                n = len(toks[trained_on, vocab].encode_ordinary(text))
                print(f"{name:<22}{trained_on:<18}{vocab:>6}{len(text.encode('utf-8')) / n:>12.2f}")


if __name__ == "__main__":
    main()
