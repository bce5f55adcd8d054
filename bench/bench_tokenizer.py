"""Benchmark tokenizer.py: training time and peak memory, encode throughput, compression.

    python bench/bench_tokenizer.py [--data-dir ../shared/data] [--runs 3] [--big] [--work-dir DIR]

Each training run is a fresh subprocess so that its peak RSS is its own. tiktoken is optional.
--big adds training on generated 100 MB and 1 GB corpora, Chinese and English (character-level
Markov chains over the shared files, written once to --work-dir), under the default memory
budget, and the readable trainer (tokenizer.py's Tokenizer.train, which holds every distinct piece)
on the largest prefix that fits in the same peak RSS; compression is measured on a held-out file
that the chains never saw.
"""

import argparse
import codecs
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project root: its modules and data/
sys.path.insert(0, str(ROOT))

import numpy as np
import regex

from infra.bpe_train import DEFAULT_MEMORY_BUDGET, train_tokenizer
from infra.fast_encode import accelerate, encode_batch
from tokenizer import GPT4_SPLIT_PATTERN, Tokenizer

# The generated corpora: (source files, Markov chain order, mean copied run in characters) per
# language. The chains learn from the first 90% of each file; the last 10% is the held-out text.
LANGUAGES = {
    "zh": (
        [
            "chinese_poetry.txt",
            "zh_tang_guwen.txt",
            "zh_cmrc2018_wiki.txt",
            "zh_commonvoice_wiki.txt",
        ],
        2,
        3,
    ),
    "en": ([f"eltec_en/eltec_en_0{i}.txt" for i in range(9)], 4, 6),
}
NEEDED = [
    "zh_commonvoice_wiki.txt",
    *(name for files, _, _ in LANGUAGES.values() for name in files),
]


def train_child(job):
    """Run in a fresh process (`--train JOB`): train, save, print {"s", "cpu", "rss_mb"}.
    Reads with plain file reads rather than data.iter_texts, which imports torch and would
    inflate the peak RSS."""
    path, start, cpu = job["path"], time.perf_counter(), time.process_time()
    if path.endswith(".jsonl"):
        texts = (json.loads(line)["text"] for line in open(path))
    elif job["spread"]:
        texts = spread(path)
    else:
        texts = pieces(path, job["max_bytes"])
    if job["trainer"] == "bounded":
        tok = train_tokenizer(
            texts,
            job["vocab"],
            max_bytes=job["max_bytes"],
            memory_budget=job["budget"],
            verbose=job["spread"],
        )
    else:
        tok = Tokenizer.train(texts, job["vocab"])
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tok.save(job["out"])
    # VmHWM, not getrusage: ru_maxrss keeps the high-water mark of the process this one forked from
    peak_kb = int(
        next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]
    )
    print(json.dumps({"s": seconds, "cpu": cpu, "rss_mb": peak_kb / 1024}))


def spread(path, piece=1 << 20):
    """A file in pieces of 1 MB taken in bit-reversed order of their index, so that any prefix of
    the sequence is spread evenly over the file (a stand-in for data.py's corpus sampler)."""
    n = -(-os.path.getsize(path) // piece)
    bits = max(1, (n - 1).bit_length())
    with open(path, "rb") as f:
        for i in sorted(range(n), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2)):
            f.seek(i * piece)
            yield f.read(piece).decode("utf-8", "ignore")


def pieces(path, max_bytes, piece=1 << 20):
    """The first max_bytes of a file (all of it for None), in pieces of 1 MB."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    with open(path, "rb") as f:
        for start in range(0, max_bytes or os.path.getsize(path), piece):
            yield decoder.decode(f.read(min(piece, (max_bytes or 1 << 62) - start)))


def train(
    trainer, path, vocab, out, runs=1, max_bytes=None, spread=False, budget=DEFAULT_MEMORY_BUDGET
):
    """Median seconds and CPU seconds, the largest peak RSS (MB) over `runs` fresh processes, and
    the output's "tokenizer sample:" line."""
    job = json.dumps(
        {
            "trainer": trainer,
            "path": str(path),
            "vocab": vocab,
            "out": str(out),
            "max_bytes": max_bytes,
            "spread": spread,
            "budget": budget,
        }
    )
    results, report = [], ""
    for _ in range(runs):
        lines = subprocess.run(
            [sys.executable, __file__, "--train", job],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        results.append(json.loads(lines[-1]))
        report = next((line for line in lines if line.startswith("tokenizer sample:")), "")
    return (
        statistics.median(r["s"] for r in results),
        statistics.median(r["cpu"] for r in results),
        max(r["rss_mb"] for r in results),
        report,
    )


def sources(data, lang):
    """(the text the Markov chain learns from, the held-out text) of a language."""
    learn, held_out = [], []
    for name in LANGUAGES[lang][0]:
        text = (data / name).read_text(encoding="utf-8")
        cut = text.rfind("\n", 0, len(text) * 9 // 10) + 1
        learn.append(text[:cut])
        held_out.append(text[cut:])
    return "".join(learn), "".join(held_out)


def markov_corpus(source, out, n_bytes, order, mean_run, seed=0, walkers=1 << 16, steps=64):
    """Write about n_bytes of text from a character-level Markov chain of the given order over the
    source text: each of many walkers copies a run of source (geometric length, mean_run
    characters), jumps to a random place that follows the same `order` characters, and goes on."""
    c = np.frombuffer(source.encode("utf-32-le"), np.uint32)
    n, rng = len(c), np.random.default_rng(seed)
    context = np.zeros(n, np.int64)  # a hash of the `order` characters before each position
    for back in range(1, order + 1):
        context[order:] = context[order:] * 1_000_003 + c[order - back : n - back]
    context[:order] = -1 - np.arange(order)  # no context: never jumped to
    by_context = np.argsort(context, kind="stable")
    sorted_context = context[by_context]
    new = np.concatenate([[True], sorted_context[1:] != sorted_context[:-1]])
    starts = np.flatnonzero(new)
    group = np.empty(n, np.int64)
    group[by_context] = np.cumsum(new) - 1
    first, size = (
        starts[group],
        np.diff(np.append(starts, n))[group],
    )  # of the positions with the same context
    del context, sorted_context, new, group
    written, start = 0, time.perf_counter()
    with open(out, "wb") as f:
        while written < n_bytes:
            position, runs = rng.integers(order, n - 1, walkers), []
            for _ in range(steps):
                length = np.minimum(rng.geometric(1 / mean_run, walkers), n - 1 - position)
                runs.append((position, length))
                after = position + length
                position = by_context[
                    first[after] + rng.integers(0, 1 << 62, walkers) % size[after]
                ]
            starts = np.stack(
                [s for s, _ in runs], 1
            ).ravel()  # walker by walker, its runs in order
            lengths = np.stack([length for _, length in runs], 1).ravel()
            ends = np.cumsum(lengths)
            index = np.arange(ends[-1]) - np.repeat(ends - lengths - starts, lengths)
            written += f.write(c[index].tobytes().decode("utf-32-le").encode("utf-8"))
            print(
                f"  {out.name}: {written / 1e6:,.0f} MB "
                f"({written / 1e6 / (time.perf_counter() - start):.0f} MB/s)",
                end="\r",
                flush=True,
            )
    print()


def corpus(data, work, lang, mb):
    """The generated corpus of `mb` MB in a language (the first lines of the 1 GB one)."""
    _, order, mean_run = LANGUAGES[lang]
    big, path = work / f"{lang}-1000mb.txt", work / f"{lang}-{mb}mb.txt"
    if not big.exists():
        markov_corpus(sources(data, lang)[0], big, 1_000_000_000, order, mean_run)
    if not path.exists():
        with open(big, "rb") as f:
            head = f.read(mb * 1_000_000)
        path.write_bytes(head[: head.rindex(b"\n") + 1])
    return path


def held_out_compression(tok, text):
    return len(text.encode("utf-8")) / len(tok.encode_ordinary(text))


def big(data, work, tmp):
    """Training from the generated corpora: ours reading a spread sample, under the default
    budget and under a small one; the readable trainer on the largest prefix of the 1 GB corpus
    that fits in the same peak RSS as ours."""
    print("\n## training on generated corpora (one run each; peak RSS of the training process)")
    print(
        f"{'corpus':<14}{'budget':>8}  {'trainer':<10}{'read MB':>9}{'seconds':>9}{'CPU s':>8}"
        f"{'peak RSS MB':>13}"
        f"{'held-out bytes/token':>22}"
    )
    for lang in LANGUAGES:
        held_out = sources(data, lang)[1]
        for mb, budget in (
            (100, DEFAULT_MEMORY_BUDGET),
            (1000, DEFAULT_MEMORY_BUDGET),
            (1000, 256 << 20),
        ):
            path, out = corpus(data, work, lang, mb), tmp / f"{lang}-{mb}-{budget}.json"
            seconds, cpu, rss, report = train(
                "bounded", path, 32000, out, spread=True, budget=budget
            )
            read = float(report.split(" MB of text read")[0].split()[-1].replace(",", ""))
            print(
                f"{path.name:<14}{budget >> 20:>6}M  {'ours':<10}{read:>9,.0f}{seconds:>9.0f}"
                f"{cpu:>8.0f}{rss:>13,.0f}"
                f"{held_out_compression(Tokenizer.load(out), held_out):>22.3f}"
            )
            print(f"    {report}")
            if mb == 1000:
                prefix, seconds, cpu, old_rss, out = readable_at_equal_memory(path, rss, tmp)
                print(
                    f"{path.name:<14}{'':>8}  {'readable':<10}{prefix / 1e6:>9,.0f}"
                    f"{seconds:>9.0f}{cpu:>8.0f}"
                    f"{old_rss:>13,.0f}{held_out_compression(Tokenizer.load(out), held_out):>22.3f}"
                )
    print(
        "held out: the last 10% of each source file; readable: Tokenizer.train on the largest "
        f"prefix that fits in the peak RSS of ours; corpora in {work}"
    )


def readable_at_equal_memory(path, rss, tmp):
    """The readable trainer on the largest prefix of path whose peak RSS stays within rss (MB),
    found from its peak RSS growing about in proportion to the prefix (above ~80 MB of
    interpreter): (prefix, seconds, CPU seconds, peak RSS, tokenizer file)."""
    prefix, best = 4 << 20, None
    for _ in range(6):
        out = tmp / f"old-{path.stem}-{prefix}.json"
        seconds, cpu, old_rss, _ = train("readable", path, 32000, out, max_bytes=prefix)
        if old_rss <= rss and (best is None or prefix > best[0]):
            best = (prefix, seconds, cpu, old_rss, out)
        if old_rss <= rss and (old_rss > 0.9 * rss or prefix >= path.stat().st_size):
            break
        prefix = min(int(prefix * (rss - 80) / (old_rss - 80) * 0.97), path.stat().st_size)
    return best


def mb_per_s(fn, arg, n_bytes, runs, warmup=0):
    """MB/s of fn(arg): the median of `runs` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn(arg)
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
    p.add_argument(
        "--big",
        action="store_true",
        help="also train on generated 100 MB and 1 GB corpora (about an hour)",
    )
    p.add_argument(
        "--work-dir",
        default=str(Path(tempfile.gettempdir()) / "bench_tokenizer"),
        help="where the generated corpora are written (3 GB) and reused",
    )
    p.add_argument("--train", help=argparse.SUPPRESS)  # a child process: run one training job
    args = p.parse_args()
    if args.train:
        return train_child(json.loads(args.train))
    data = Path(args.data_dir)
    try:
        import tiktoken
    except ImportError:
        tiktoken = None
    tmp = Path(tempfile.mkdtemp())
    shakespeare = ROOT / "data" / "tinyshakespeare.txt"

    print(
        f"## training (median of {args.runs} runs where marked *, else 1; "
        f"peak RSS of the training process)"
    )
    print(f"{'corpus':<24}{'vocab':>7}{'MB':>7}{'seconds':>9}{'peak RSS MB':>13}")
    jobs = [
        (shakespeare, 4096, args.runs),
        (data / "peps.jsonl", 4096, 1),
        (data / "peps.jsonl", 32000, args.runs),
        (data / "chinese_poetry.txt", 4096, 1),
        (data / "chinese_poetry.txt", 32000, 1),
    ]
    missing = sorted(
        {str(path) for path, _, _ in jobs if not path.exists()}
        | {str(data / name) for name in NEEDED if not (data / name).exists()}
    )
    if missing:
        print(
            f"skipping what needs {', '.join(missing)}: not found "
            f"(the shared corpora; --data-dir DIR)"
        )
    toks = {}
    for path, vocab, runs in jobs:
        if str(path) in missing:
            continue
        out = tmp / f"{path.stem}-{vocab}.json"
        seconds, _, rss, _ = train("bounded", path, vocab, out, runs)
        toks[path.stem, vocab] = Tokenizer.load(out)
        print(
            f"{path.name + ' *' * (runs > 1):<24}{vocab:>7}{path.stat().st_size / 1e6:>7.1f}"
            f"{seconds:>9.2f}{rss:>13.0f}"
        )
    if args.big and not missing:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        big(data, work, tmp)

    print("\n## encode throughput, MB/s (median of runs, single thread unless said)")
    findall = regex.compile(GPT4_SPLIT_PATTERN).findall
    corpora = [
        (
            "tinyshakespeare",
            lambda: shakespeare.read_text(encoding="utf-8"),
            ("tinyshakespeare", 4096),
        ),
        (
            "peps.jsonl",
            lambda: [json.loads(line)["text"] for line in open(data / "peps.jsonl")],
            ("peps", 32000),
        ),
        (
            "zh_commonvoice_wiki",
            lambda: (data / "zh_commonvoice_wiki.txt").read_text(encoding="utf-8"),
            ("chinese_poetry", 32000),
        ),
    ]
    print("ours: Tokenizer.encode_ordinary with fast_encode.accelerate (tiktoken, when installed);")
    print(
        "python: tokenizer.py's own encoder (the fallback). "
        "cold: the first pass, warm: a repeated one"
    )
    print(
        f"{'text':<22}{'vocab':>6}{'ours cold':>10}{'ours warm':>10}{'python cold':>12}"
        f"{'python warm':>12}"
        f"{'tiktoken':>10}{'findall':>9}{'batch x2':>10}"
    )
    for name, read, key in corpora:
        if key not in toks:
            continue
        tok, text = toks[key], read()
        docs = (
            text
            if isinstance(text, list)
            else [text[i : i + 100_000] for i in range(0, len(text), 100_000)]
        )
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        encoders = []
        for accelerated in (True, False):
            fresh, warmed = (
                Tokenizer(tok.pattern, tok.merges, list(tok.special_tokens)) for _ in range(2)
            )
            if accelerated:
                fresh, warmed = accelerate(fresh), accelerate(warmed)
            encoders += [(fresh, 1, 0), (warmed, args.runs, 1)]
        cold, warm, py_cold, py_warm = (
            mb_per_s(lambda ds: [t.encode_ordinary(d) for d in ds], docs, n_bytes, runs, warmup)
            for t, runs, warmup in encoders
        )
        split = mb_per_s(lambda ds: [findall(d) for d in ds], docs, n_bytes, args.runs)
        batch = mb_per_s(lambda ds: encode_batch(tok, ds, num_workers=2), docs, n_bytes, args.runs)
        tt = "-"
        if tiktoken:
            enc = tiktoken.Encoding(
                name="b",
                pat_str=tok.pattern,
                mergeable_ranks=tok.mergeable_ranks,
                special_tokens=tok.special_tokens,
            )
            speed = mb_per_s(
                lambda ds: [enc.encode_ordinary(d) for d in ds], docs, n_bytes, args.runs
            )
            tt = f"{speed:.1f}"
        print(
            f"{name:<22}{key[1]:>6}{cold:>10.1f}{warm:>10.1f}"
            f"{py_cold:>12.1f}{py_warm:>12.1f}{tt:>10}"
            f"{split:>9.1f}{batch:>10.1f}"
        )

    if missing:
        return
    print("\n## compression on held-out text, bytes per token")
    held_out = [
        (
            "eltec_en_08 (2 MB)",
            (data / "eltec_en" / "eltec_en_08.txt").read_text(encoding="utf-8"),
            "peps",
        ),
        ("eltec_en_08 (2 MB)", None, "tinyshakespeare"),
        (
            "zh_commonvoice_wiki",
            (data / "zh_commonvoice_wiki.txt").read_text(encoding="utf-8"),
            "chinese_poetry",
        ),
    ]
    print(f"{'held-out text':<22}{'trained on':<18}{'vocab':>6}{'bytes/token':>12}")
    for name, text, trained_on in held_out:
        text = (text or held_out[0][1]).encode("utf-8")[:2_000_000].decode("utf-8", "ignore")
        for vocab in (4096, 32000):
            if (trained_on, vocab) in toks:
                n = len(toks[trained_on, vocab].encode_ordinary(text))
                print(f"{name:<22}{trained_on:<18}{vocab:>6}{len(text.encode('utf-8')) / n:>12.2f}")


if __name__ == "__main__":
    main()
