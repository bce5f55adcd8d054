"""Data: a prepared folder of token shards, and the batches of token windows read from it.

A prepared folder holds meta.json, tokenizer.json and the shards of a train and a val split: flat
files of uint16 tokens (uint32 when the vocabulary needs it), each document's tokens between the
tokenizer's BOS (if any) and EOS. meta.json lists each split's shards (paths relative to the
folder) with their lengths, and is written last: a folder without it is not prepared.
infra/prepare.py writes such folders (`python -m infra.prepare --help`)."""
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from tokenizer import Tokenizer, UserError

META_FORMAT = "llm-tokens"
META_VERSION = 2
TOKENIZER_FILE = "tokenizer.json"
MAX_OPEN_SHARDS = 64  # memory maps one TokenData keeps open (one file descriptor each)
FEISTEL_ROUNDS = 6
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, the odd increment of splitmix64


class DataError(UserError):
    """Missing, stale or unusable data; the message says what to do."""


def read_meta(data_dir) -> dict:
    """meta.json of a prepared folder, or a DataError saying how to prepare one."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"no prepared data in {data_dir} (meta.json missing); run `python -m "
                        f"infra.prepare --input YOUR_TEXT --out {data_dir} --vocab-size N` "
                        f"or set inputs")
    try:
        meta = json.loads(path.read_text())
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or (meta.get("format"), meta.get("version")) != (
            META_FORMAT, META_VERSION):
        raise DataError(f"{path} is corrupt or from another version; prepare the data again")
    return meta


# ---------------------------------------------------------------------- the epoch order

def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 words in which each input bit flips about half
    of the output bits (uint64 array arithmetic wraps modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash_words(*words: int) -> int:
    """A 64-bit key from integers of any size and sign: each folded into the state, then mixed."""
    state = np.zeros(1, dtype=np.uint64)
    for word in words:
        state = _mix64((state ^ np.uint64(word % 2**64)) + np.uint64(_GOLDEN))
    return int(state[0])


def feistel_permutation(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """The image of each index under a bijection of [0, n) chosen by `key`, in O(len(index)) memory.

    A balanced Feistel network permutes the words of 2h bits, the fewest with 4**h >= n: each round
    swaps the two halves and xors one with a keyed hash of the other, invertible whatever the hash.
    Cycle-walking restricts it to [0, n): a value at or above n goes through the network again. The
    walk follows its start's cycle, so it ends and two starts never meet (under four passes on
    average, since 4**h < 4n)."""
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
    low, shift = np.uint64((1 << half_bits) - 1), np.uint64(half_bits)
    round_keys = [np.uint64(_hash_words(key, r)) for r in range(FEISTEL_ROUNDS)]

    def network(x):
        left, right = x >> shift, x & low
        for round_key in round_keys:
            left, right = right, left ^ (_mix64(right ^ round_key) & low)
        return (left << shift) | right

    x = network(np.asarray(index, dtype=np.uint64))
    while (outside := x >= n).any():
        x[outside] = network(x[outside])
    return x.astype(np.int64)


def epoch_windows(num_tokens: int, seq_len: int) -> tuple[int, int]:
    """(n, max_offset): an epoch's windows start at offset + i * seq_len, i < n, each reading
    seq_len + 1 tokens, for any offset in [0, max_offset] (seq_len - 1 unless under two windows)."""
    n = max(1, num_tokens // seq_len - 1)
    return n, min(seq_len - 1, num_tokens - 1 - n * seq_len)


def train_window_starts(num_tokens: int, seq_len: int, seed: int, first: int,
                        count: int) -> np.ndarray:
    """Starts of windows first .. first + count - 1 of the endless sequence epoch 0, epoch 1, ...

    Epoch e is all n windows of a grid shifted by an offset in [0, max_offset] (epoch_windows), in
    the order of feistel_permutation(., n, key); offset and key are hashes of (seed, e). Any stretch
    costs time and memory in proportion to its length, not to n. The shift moves the window
    boundaries, so a token that opens a window (no context) in one epoch sits inside one next."""
    n, max_offset = epoch_windows(num_tokens, seq_len)
    epochs, positions = np.divmod(first + np.arange(count, dtype=np.int64), n)
    starts = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):  # one or two per batch, unless the split is tinier than a batch
        key = _hash_words(seed, int(epoch))
        here = epochs == epoch
        permuted = feistel_permutation(positions[here], n, key)
        starts[here] = key % (max_offset + 1) + permuted * seq_len
    return starts


# ---------------------------------------------------------------------- the batch loader

class TokenData:
    """One split of a prepared folder, read as a single stream of tokens.

    Shards are opened lazily and at most MAX_OPEN_SHARDS stay memory-mapped (least recently used
    closed first): each map holds a file descriptor, and the common limit is 1,024 open files. At
    start one directory listing per shard folder checks that every shard exists (per-file calls are
    slow on network filesystems); a shard's size is checked when it is opened.

    Training windows (seq_len tokens, plus one for the targets) are each read once per epoch, in an
    order shuffled anew every epoch. Step s takes windows [s * count, (s + 1) * count) of the
    endless sequence of epochs: a pure function of (seed, step), so the step number is the loader's
    whole state in a checkpoint, and ranks take disjoint slices of the same global batch."""

    def __init__(self, data_dir: str, split: str):
        self.meta, self.split = read_meta(data_dir), split
        try:
            info, dtype = self.meta["splits"][split], self.meta["dtype"]
            names = [entry["path"] for entry in info["shards"]]
            self.lengths = np.array([int(e["tokens"]) for e in info["shards"]], dtype=np.int64)
            valid = (dtype in ("uint16", "uint32") and (self.lengths >= 0).all()
                     and not any(os.path.isabs(name) or ".." in name.split("/") for name in names))
        except (KeyError, TypeError, ValueError, AttributeError):
            valid = False
        if not valid:
            raise DataError(f"{data_dir}/meta.json does not describe a {split} split; "
                            f"prepare the data again")
        if self.lengths.sum() != info["tokens"]:
            raise DataError(f"{data_dir}: {split} shards hold {self.lengths.sum()} tokens, "
                            f"meta.json says {info['tokens']}; prepare the data again")
        # Plain strings, not Paths: a 20,000-shard folder then starts in milliseconds.
        self.dtype, self.shards = np.dtype(dtype), [os.path.join(data_dir, name) for name in names]
        folders = {os.path.dirname(path) for path in self.shards}
        listed = {folder: set(os.listdir(folder)) if os.path.isdir(folder) else set()
                  for folder in folders}
        missing = [path for path in self.shards
                   if os.path.basename(path) not in listed[os.path.dirname(path)]]
        if missing:
            raise DataError(f"{len(missing)} {split} shard(s) of {data_dir} missing or empty, the "
                            f"first {missing[0]}; prepare the data again")
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.num_tokens = int(self.offsets[-1])
        self._open = {}  # shard index -> memmap, least recently used first (dicts keep order)

    def _shard(self, index: int) -> np.memmap:
        shard = self._open.pop(index, None)
        if shard is None:
            if len(self._open) >= MAX_OPEN_SHARDS:
                del self._open[next(iter(self._open))]  # the last reference: the map closes
            path = self.shards[index]
            try:
                shard = np.memmap(path, dtype=self.dtype, mode="r")
            except (FileNotFoundError, ValueError) as error:
                raise DataError(f"shard {path} is missing or empty ({error}); "
                                f"prepare the data again") from None
            if len(shard) != self.lengths[index]:
                raise DataError(f"shard {path} holds {len(shard)} tokens, meta.json says "
                                f"{self.lengths[index]}; prepare the data again")
        self._open[index] = shard
        return shard

    def _read(self, start: int, out: np.ndarray):
        """Fill `out` with tokens [start, start + len(out)) of the stream, across shards."""
        if start < 0 or start + len(out) > self.num_tokens:
            raise ValueError(f"tokens [{start}, {start + len(out)}) are outside the {self.split} "
                             f"split of {self.num_tokens} tokens")
        done, shard = 0, int(np.searchsorted(self.offsets, start, side="right")) - 1
        while done < len(out):
            offset = start + done - int(self.offsets[shard])
            take = min(len(out) - done, int(self.lengths[shard]) - offset)
            if take > 0:  # empty shards are never opened
                out[done: done + take] = self._shard(shard)[offset: offset + take]
                done += take
            shard += 1

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, as a copy (no map is held through it)."""
        out = np.empty(length, dtype=self.dtype)
        self._read(start, out)
        return out

    def check_length(self, seq_len: int):
        if self.num_tokens < seq_len + 1:
            raise DataError(f"the {self.split} split has {self.num_tokens} tokens, fewer than "
                            f"max_seq_len + 1 = {seq_len + 1}; use a shorter model.max_seq_len "
                            f"or more text")

    def batch(self, starts, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets for windows beginning at `starts`."""
        rows = np.empty((len(starts), seq_len + 1), dtype=np.int64)
        for row, start in zip(rows, starts):
            self._read(int(start), row)
        tokens = torch.from_numpy(rows)
        if torch.device(device).type == "cuda":
            tokens = tokens.pin_memory().to(device, non_blocking=True)
        return tokens[:, :-1], tokens[:, 1:]

    def train_starts(self, seed: int, step: int, count: int, seq_len: int) -> np.ndarray:
        """Window starts of the global batch of `step` (count sequences), from (seed, step) only."""
        self.check_length(seq_len)
        return train_window_starts(self.num_tokens, seq_len, seed, step * count, count)

    def epoch(self, step: int, count: int, seq_len: int) -> float:
        """Epochs completed after `step` steps of `count` sequences (for the log)."""
        return step * count / epoch_windows(self.num_tokens, seq_len)[0]

    def eval_starts(self, seq_len: int, max_tokens: int) -> np.ndarray:
        """Starts of max_tokens // seq_len non-overlapping windows (at least one, at most all)
        spread evenly over the split, the same at every evaluation."""
        slots = (self.num_tokens - 1) // seq_len
        count = max(1, min(slots, max_tokens // seq_len))
        return np.arange(count, dtype=np.int64) * slots // count * seq_len


# ---------------------------------------------------------------------- bits per byte

def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens and unused ids)."""
    specials = set(tokenizer.special_tokens.values())
    known = [0 if token is None or i in specials else len(token)
             for i, token in enumerate(tokenizer.vocab)]
    lengths = torch.zeros(vocab_size, dtype=torch.float64)  # ids past the vocabulary stand for none
    lengths[:len(known)] = torch.tensor(known, dtype=torch.float64)
    return lengths


def bits_per_byte(total_nats: float, total_bytes: float) -> float:
    """Cross-entropy summed over tokens, in nats, per byte of the text they encode, in bits."""
    return total_nats / (math.log(2) * total_bytes)
