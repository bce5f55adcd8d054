"""Figures of data.py's TokenData: batch reads with a bounded LRU of shard maps against every shard
mapped at start (the loader before it), and the share of train tokens an epoch of steps reads.

    python bench/bench_loader.py [--shards 4000] [--shard-tokens 25000] [--runs 7] [--batches 40]

1. Batch-read time on a temporary folder of many shards (written here, so in the page cache: the
   figures are the loader's own cost, not the disk's), windows at uniformly random starts, medians
   of --runs runs of --batches batches, each run with a fresh loader. Also the start-up time.
2. Share of train tokens inside at least one window after one epoch of steps (tokens / tokens per
   step, rounded down), by simulation, for the default config (its train split: tinyshakespeare with
   its tokenizer) and for config/7b.py's shapes on 1/100 of its 2T tokens (the share depends on the
   split only through tokens / seq_len): random starts (the loader before) against the epoch order.
3. Time to compute one step's window starts for config/7b.py (490M windows per epoch).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project root: its modules and data/
sys.path.insert(0, str(ROOT))

import numpy as np

import data
from config import TrainConfig, bundled_corpus
from data import TokenData, epoch_windows, train_window_starts
from infra.configurator import load_config
from tokenizer import Tokenizer


class AllOpenTokenData:
    """A loader without the LRU, for comparison: every shard memory-mapped at start."""

    def __init__(self, data_dir: str, split: str):
        info = json.loads((Path(data_dir) / "meta.json").read_text())["splits"][split]
        self.shards = [
            np.memmap(Path(data_dir) / s["path"], dtype=np.uint16, mode="r") for s in info["shards"]
        ]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.num_tokens = int(self.starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        parts, end = [], start + length
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            offset = start - self.starts[shard]
            piece = self.shards[shard][offset : offset + end - start]
            parts.append(piece)
            start += len(piece)
            shard += 1
        return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])

    def batch_rows(self, starts, seq_len: int) -> np.ndarray:
        return np.stack([self.window(int(s), seq_len + 1) for s in starts]).astype(np.int64)


def write_folder(folder: Path, shards: int, shard_tokens: int):
    rng, entries = np.random.default_rng(0), []
    for i in range(shards):
        name = f"train_{i:05d}.bin"
        rng.integers(0, 32000, size=shard_tokens, dtype=np.uint16).tofile(folder / name)
        entries.append({"path": name, "tokens": shard_tokens})
    split = {"shards": entries, "tokens": shards * shard_tokens}
    meta = {
        "format": data.META_FORMAT,
        "version": data.META_VERSION,
        "dtype": "uint16",
        "splits": {"train": split},
    }
    (folder / "meta.json").write_text(json.dumps(meta))


def time_reads(make_loader, read, num_tokens, batch, seq_len, runs, batches, shard_tokens) -> float:
    """Median over runs of the mean seconds per batch; each run has a fresh loader, warmed by
    reading from every shard once (the LRU then holds its steady state), and its own random
    starts."""
    results = []
    for run in range(runs):
        loader = make_loader()
        for start in range(0, num_tokens, shard_tokens):
            loader.window(start, 1)
        rng = np.random.default_rng(run)
        all_starts = rng.integers(0, num_tokens - seq_len, size=(batches, batch))
        start = time.perf_counter()
        for starts in all_starts:
            read(loader, starts, seq_len)
        results.append((time.perf_counter() - start) / batches)
    return statistics.median(results)


def bench_reads(args):
    budgets = sorted({8, 64, 512, data.MAX_OPEN_SHARDS, args.shards})
    shapes = [
        (32, 128, "default config (32 x 129)"),
        (128, 4096, "7B, a rank's step of 8 (128 x 4097)"),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp), args.shards, args.shard_tokens)
        num_tokens, chosen = args.shards * args.shard_tokens, data.MAX_OPEN_SHARDS
        print(
            f"1. batch reads, {args.shards:,} shards of {args.shard_tokens:,} tokens: ms per "
            f"batch, median of {args.runs} runs of {args.batches} batches; LRU N keeps N shards "
            f"open"
        )
        print(
            f"{'batch':<38}{'all open':>9}"
            + "".join(f"{'LRU ' + str(b):>10}" for b in budgets)
            + f"{'LRU ' + str(chosen) + ' / all open':>22}"
        )
        for batch, seq_len, label in shapes:
            baseline = time_reads(
                lambda: AllOpenTokenData(tmp, "train"),
                lambda d, s, n: d.batch_rows(s, n),
                num_tokens,
                batch,
                seq_len,
                args.runs,
                args.batches,
                args.shard_tokens,
            )
            lru = {}
            for budget in budgets:
                data.MAX_OPEN_SHARDS = budget
                lru[budget] = time_reads(
                    lambda: TokenData(tmp, "train"),
                    lambda d, s, n: d.batch(s, n, "cpu"),
                    num_tokens,
                    batch,
                    seq_len,
                    args.runs,
                    args.batches,
                    args.shard_tokens,
                )
            data.MAX_OPEN_SHARDS = chosen
            print(
                f"{label:<38}{baseline * 1e3:>9.2f}"
                + "".join(f"{lru[b] * 1e3:>10.2f}" for b in budgets)
                + f"{lru[chosen] / baseline:>21.2f}x"
            )
        for name, make in [
            ("all open", lambda: AllOpenTokenData(tmp, "train")),
            ("lazy", lambda: TokenData(tmp, "train")),
        ]:
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                make()
                times.append(time.perf_counter() - start)
            print(f"start-up, {name}: {statistics.median(times) * 1e3:.1f} ms")


def seen_share(starts: np.ndarray, seq_len: int, num_tokens: int) -> float:
    """Share of the tokens [0, num_tokens) inside at least one window [s, s + seq_len + 1)."""
    starts = np.sort(starts)
    covered = np.minimum(np.diff(starts), seq_len + 1).sum() + seq_len + 1
    return covered / num_tokens


def random_starts(num_tokens, seq_len, seed, steps, count) -> np.ndarray:
    """The loader before: starts drawn with replacement from a generator seeded by (seed, step)."""
    return np.concatenate(
        [
            np.random.default_rng([seed, step]).integers(0, num_tokens - seq_len, size=count)
            for step in range(steps)
        ]
    )


def default_train_tokens(cfg: TrainConfig) -> int:
    """Train tokens of the default run: its tokenizer trained on, and encoding, the head of the
    corpus."""
    text = Path(bundled_corpus()[0]).read_text()
    train = text[: int(len(text) * (1 - cfg.val_fraction))]
    return len(Tokenizer.train(train, cfg.model.vocab_size).encode_ordinary(train)) + 1


def bench_coverage():
    default, big = TrainConfig(), load_config(str(ROOT / "config" / "7b.py"))
    shapes = [
        ("default config", default_train_tokens(default), default),
        ("config/7b.py, 1/100", 20 * 10**9, big),
    ]
    print("\n2. share of train tokens read after one epoch of steps (simulated)")
    print(
        f"{'shapes':<22}{'train tokens':>16}{'seq_len':>9}{'batch':>7}{'steps':>8}"
        f"{'random starts':>15}{'epochs':>9}"
    )
    for label, num_tokens, cfg in shapes:
        seq_len = cfg.model.max_seq_len
        count = cfg.global_batch_tokens // seq_len
        steps = num_tokens // cfg.global_batch_tokens
        before = seen_share(
            random_starts(num_tokens, seq_len, cfg.seed, steps, count), seq_len, num_tokens
        )
        after = seen_share(
            train_window_starts(num_tokens, seq_len, cfg.seed, 0, steps * count),
            seq_len,
            num_tokens,
        )
        print(
            f"{label:<22}{num_tokens:>16,}{seq_len:>9}{count:>7}{steps:>8,}"
            f"{before:>15.2%}{after:>9.2%}"
        )


def bench_order(runs: int):
    cfg = load_config(str(ROOT / "config" / "7b.py"))
    num_tokens, seq_len = 2 * 10**12, cfg.model.max_seq_len
    count = cfg.global_batch_tokens // seq_len
    n, _ = epoch_windows(num_tokens, seq_len)
    times = []
    for step in range(runs * 20):
        start = time.perf_counter()
        train_window_starts(num_tokens, seq_len, cfg.seed, step * count, count)
        times.append(time.perf_counter() - start)
    print(
        f"\n3. one step's window starts, {n:,} windows per epoch, batch {count}: median"
        f" {statistics.median(times) * 1e3:.2f} ms over {len(times)} steps"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4000)
    parser.add_argument("--shard-tokens", type=int, default=25_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    bench_reads(args)
    bench_coverage()
    bench_order(args.runs)


if __name__ == "__main__":
    main()
