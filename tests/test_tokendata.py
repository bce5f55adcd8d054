"""data.py's TokenData: lazily opened shards, the shuffled epoch order of training windows, eval
windows.

The folders here are written directly (shards with numpy, meta.json by hand): the tokens of a split
are 0, 1, 2, ... so a window's content says where it was read from.
"""

import json
import math
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data
from data import DataError, TokenData, epoch_windows, feistel_permutation, train_window_starts

ROOT = Path(__file__).resolve().parent.parent


def make_data(folder: Path, lengths: list[int], dtype="uint32", folders=1) -> Path:
    """A prepared folder whose train and val splits are shards of the given lengths (spread over
    `folders` subfolders when more than one) holding the tokens 0, 1, 2, ..."""
    splits, first = {}, 0
    for split in ("train", "val"):
        shards = []
        for i, length in enumerate(lengths):
            name = (
                f"{split}_{i:05d}.bin"
                if folders == 1
                else f"part-{i % folders:05d}/{split}_{i:05d}.bin"
            )
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            np.arange(first, first + length, dtype=dtype).tofile(folder / name)
            shards.append({"path": name, "tokens": length})
            first += length
        splits[split] = {"shards": shards, "tokens": sum(lengths)}
        first = 0
    meta = {
        "format": data.META_FORMAT,
        "version": data.META_VERSION,
        "dtype": dtype,
        "splits": splits,
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_window_crosses_shards(tmp_path):
    lengths = [100, 100, 3, 0, 100, 57]  # an empty shard is skipped, never opened
    for dtype, folders in [("uint16", 1), ("uint32", 3)]:
        stream = TokenData(str(make_data(tmp_path / dtype, lengths, dtype, folders)), "train")
        assert stream.num_tokens == sum(lengths) and len(stream.shards) == len(lengths)
        for start, length in [
            (0, 10),
            (95, 10),
            (90, 250),
            (199, 5),
            (202, 2),
            (stream.num_tokens - 7, 7),
            (0, stream.num_tokens),
        ]:
            window = stream.window(start, length)
            assert window.dtype == dtype and window.tolist() == list(range(start, start + length))
        with pytest.raises(ValueError, match="outside the train split"):
            stream.window(stream.num_tokens - 3, 4)


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    folder = str(make_data(tmp_path, [700, 300, 1000]))
    stream = TokenData(folder, "train")
    a = stream.train_starts(1, 5, 8, 32)
    # a resumed run gets the same starts
    assert a.tolist() == TokenData(folder, "train").train_starts(1, 5, 8, 32).tolist()
    assert a.tolist() != stream.train_starts(1, 6, 8, 32).tolist()
    assert a.tolist() != stream.train_starts(2, 5, 8, 32).tolist()
    assert a.min() >= 0 and a.max() + 33 <= stream.num_tokens
    x, y = stream.batch(a, 32, "cpu")
    assert x.dtype == torch.long and x.shape == (8, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x.tolist() == [list(range(s, s + 32)) for s in a.tolist()]
    assert y[:, -1].tolist() == (a + 32).tolist()


def test_every_window_once_per_epoch_in_a_new_order_and_ranks_disjoint(tmp_path):
    stream = TokenData(str(make_data(tmp_path, [37, 100, 5, 0, 250, 64])), "train")  # 456 tokens
    seq_len, world, accum, micro = 8, 2, 2, 3
    # 12 sequences per step; 56 windows per epoch: steps straddle epochs
    count = world * accum * micro
    n, max_offset = epoch_windows(stream.num_tokens, seq_len)
    assert (n, max_offset) == (56, 7)
    steps = 3 * n // count
    starts = np.concatenate([stream.train_starts(7, step, count, seq_len) for step in range(steps)])
    ranks = np.concatenate([np.repeat(np.arange(world), accum * micro)] * steps)
    orders = []
    for epoch in range(3):
        mine, rank = starts[epoch * n : (epoch + 1) * n], ranks[epoch * n : (epoch + 1) * n]
        offset = mine[0] % seq_len
        assert (mine % seq_len == offset).all() and mine.max() + seq_len + 1 <= stream.num_tokens
        assert sorted((mine - offset) // seq_len) == list(range(n))  # each window exactly once
        assert not set(mine[rank == 0]) & set(mine[rank == 1])
        orders.append(((mine - offset) // seq_len).tolist())
        assert stream.epoch((epoch + 1) * n // count, count, seq_len) == pytest.approx(
            (epoch + 1), abs=count / n
        )
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert stream.epoch(steps, count, seq_len) == pytest.approx(steps * count / n)
    # window boundaries move between epochs
    offsets = {
        int(train_window_starts(stream.num_tokens, seq_len, 7, e * n, 1)[0] % seq_len)
        for e in range(40)
    }
    assert len(offsets) >= 4


def test_a_split_smaller_than_a_batch_still_serves_every_window(tmp_path):
    stream = TokenData(str(make_data(tmp_path, [20])), "train")
    assert (
        epoch_windows(20, 8) == (1, 7)
        and epoch_windows(12, 8) == (1, 3)
        and epoch_windows(9, 8) == (1, 0)
    )
    starts = stream.train_starts(0, 3, 5, 8)  # five epochs of one window, each at its own offset
    assert ((starts >= 0) & (starts <= 7)).all() and len(set(starts.tolist())) > 1
    assert stream.batch(starts, 8, "cpu")[1].shape == (5, 8)


PRIMES = [2, 3, 5, 7, 11, 13, 61, 251, 1009, 4093, 65521]


@settings(max_examples=60, deadline=None)
@given(
    n=st.one_of(
        st.integers(1, 5000), st.sampled_from([1, 2, 4, 16, 17, 1024, 1025, 4096] + PRIMES)
    ),
    key=st.integers(0, 2**64 - 1),
)
def test_feistel_permutation_is_a_bijection(n, key):
    order = feistel_permutation(np.arange(n), n, key)
    assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(n))


def test_the_order_differs_across_epochs_and_seeds_and_looks_shuffled():
    num_tokens, seq_len = 100_003, 10
    n, _ = epoch_windows(num_tokens, seq_len)
    epoch0, epoch1 = (train_window_starts(num_tokens, seq_len, 1, e * n, n) for e in (0, 1))
    other_seed = train_window_starts(num_tokens, seq_len, 2, 0, n)
    for a, b in [(epoch0, epoch1), (epoch0, other_seed)]:
        assert np.mean(a // seq_len == b // seq_len) < 0.01
    positions = np.arange(n)
    for order in (epoch0, epoch1, other_seed):
        assert abs(np.corrcoef(positions, order)[0, 1]) < 0.05
        # neighbours in the order are about n / 3 windows apart, as in a uniform shuffle
        assert np.mean(np.abs(np.diff(order // seq_len))) == pytest.approx(n / 3, rel=0.05)
    for (
        n
    ) in PRIMES:  # small domains too: 20 keys give many orders (all 2 and 6 of them for n = 2, 3)
        orders = {tuple(feistel_permutation(np.arange(n), n, key).tolist()) for key in range(20)}
        assert len(orders) >= min(math.factorial(n), 15)


def test_one_batch_of_a_2T_token_run_takes_memory_of_the_batch_not_of_the_epoch():
    num_tokens, seq_len, count = 2 * 10**12, 4096, 1024  # config/7b.py: ~490M windows per epoch
    n, max_offset = epoch_windows(num_tokens, seq_len)
    assert n > 480_000_000
    # numpy's one-time allocations, outside the count
    train_window_starts(num_tokens, seq_len, 1337, 0, 1)
    for first in (123_456 * count, n - count // 2):  # mid-epoch, and a batch straddling two epochs
        tracemalloc.start()
        starts = train_window_starts(num_tokens, seq_len, 1337, first, count)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # ~80 bytes per window; a permutation of the epoch would be 3.9 GB
        assert peak < 32 * 8 * count
        assert len(set(starts.tolist())) == count
        assert starts.min() >= 0 and starts.max() + seq_len + 1 <= num_tokens


def test_thousands_of_shards_under_a_low_descriptor_limit(tmp_path):
    """3,000 shards with 256 descriptors: all-open maps would fail with "Too many open files"."""
    pytest.importorskip("resource")
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("counting open descriptors needs /proc")
    lengths = np.random.default_rng(0).integers(0, 40, size=3000)
    folder = make_data(tmp_path, lengths.tolist(), "uint16", folders=3)
    script = textwrap.dedent(f"""
        import os, resource
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        import numpy as np
        import data

        def descriptors():
            return len(os.listdir("/proc/self/fd"))

        before = descriptors()
        stream, peak = data.TokenData({str(folder)!r}, "train"), 0
        assert stream.window(0, stream.num_tokens).tolist() == list(range(stream.num_tokens))
        shards = set()
        for step in range(40):
            starts = stream.train_starts(0, step, 64, 16)
            x, y = stream.batch(starts, 16, "cpu")
            assert x.tolist() == [list(range(s, s + 16)) for s in starts.tolist()]
            shards.update(np.searchsorted(stream.offsets, starts, side="right").tolist())
            peak = max(peak, descriptors())
        print(len(stream.shards), len(shards), peak - before, data.MAX_OPEN_SHARDS)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    shard_count, shards_read, extra_descriptors, budget = map(int, result.stdout.split())
    assert shard_count == 3000 and shards_read > 1000
    assert extra_descriptors <= budget


def test_eval_windows_are_spread_over_the_split(tmp_path):
    stream = TokenData(str(make_data(tmp_path, [4000, 6000])), "val")
    starts = stream.eval_starts(16, 160)
    assert starts.tolist() == stream.eval_starts(16, 160).tolist()
    assert len(starts) == 10 and starts[0] == 0 and (starts % 16 == 0).all()
    assert (np.diff(starts) >= 16).all() and starts[-1] + 17 <= stream.num_tokens
    assert starts[-1] >= stream.num_tokens * 0.85  # from the whole split, not its first 160 tokens
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= 16
    every = stream.eval_starts(16, 10**9)  # more than the split holds: every window
    assert every.tolist() == list(range(0, (stream.num_tokens - 1) // 16 * 16, 16))
    assert stream.eval_starts(16, 1).tolist() == [0]


def test_clear_errors(tmp_path):
    folder = make_data(tmp_path / "d", [10, 20, 30], folders=2)
    (folder / "part-00001" / "train_00001.bin").unlink()
    with pytest.raises(
        DataError, match="1 train shard.* missing or empty, the first .*train_00001.bin; prepare"
    ):
        TokenData(str(folder), "train")
    stream = TokenData(str(folder), "val")
    (folder / "part-00000" / "val_00002.bin").write_bytes(b"\0" * 8)  # 2 tokens, meta.json says 30
    stream.window(0, 30)
    with pytest.raises(
        DataError, match="val_00002.bin holds 2 tokens, meta.json says 30; prepare the data again"
    ):
        stream.window(25, 10)
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    for change, message in [
        (lambda m: m["splits"]["val"].update(tokens=61), "hold 60 tokens, meta.json says 61"),
        (lambda m: m["splits"]["val"].update(shards=["val_00000.bin"]), "does not describe"),
        (lambda m: m["splits"]["val"]["shards"][0].update(path="../x.bin"), "does not describe"),
        (lambda m: m.update(dtype="float32"), "does not describe"),
        (lambda m: m["splits"].pop("val"), "does not describe a val split"),
    ]:
        broken = json.loads(json.dumps(meta))
        change(broken)
        meta_path.write_text(json.dumps(broken))
        with pytest.raises(DataError, match=message):
            TokenData(str(folder), "val")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="fewer than max_seq_len"):
        TokenData(str(folder), "val").check_length(60)
