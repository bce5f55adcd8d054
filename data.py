"""Data: corpus -> tokenizer -> token shards on disk -> batches of token windows.

`prepare` streams text from files, folders of files and .jsonl (one {"text": ...} per line),
trains a tokenizer on the train split (or loads a given one), encodes in worker processes and
writes numbered shards of uint16 tokens (uint32 when the vocabulary needs it) for a train and a
val split, with `<|endoftext|>` after every document. The val split is the tail of the corpus.
Everything is written into a temporary folder that is renamed into place at the end, so an
interrupted prepare never leaves a folder that looks complete; meta.json marks a complete one.

`TokenData` memory-maps one split's shards as a single stream. A training batch is a set of
windows of seq_len + 1 tokens whose starts come from a generator seeded by (seed, step), so the
batch of any step can be recomputed from the step number alone: that number is the whole loader
state a checkpoint needs, and ranks take disjoint slices of the same global batch.

    python data.py --input FILE_OR_DIR [...] --out DIR [--vocab-size N | --tokenizer PATH]
"""
import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tokenizer import SAFE_CUT, Tokenizer

META_FORMAT = "llm-tokens"
META_VERSION = 2
TOKENIZER_FILE = "tokenizer.json"
CHUNK_BYTES = 1 << 18  # text is read and encoded in pieces of about this size, cut at line starts
SHARD_TOKENS = 100_000_000


class DataError(ValueError):
    """Missing, stale or unusable data; the message says what to do."""


# ----------------------------------------------------------------------------- reading the corpus

def input_files(paths) -> list[Path]:
    """Expand files and folders (recursively, sorted) into the list of files to read."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path} does not exist; pass text files, folders or .jsonl files")
    if not files:
        raise DataError(f"no input files found in {', '.join(map(str, paths))}")
    return files


def iter_documents(files: list[Path]):
    """Yield (text, document_ends_here, source_bytes_read_so_far) in pieces of ~CHUNK_BYTES.

    A .jsonl line is one document; a text file is one document, read in pieces cut just before
    a line that starts with a non-space character, where the GPT-4 split pattern would also cut,
    so encoding piece by piece gives the same tokens as encoding the whole file.
    """
    consumed = 0
    for path in files:
        if path.suffix == ".jsonl":
            with open(path, "rb") as f:
                for line_number, line in enumerate(f, 1):
                    consumed += len(line)
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError):
                        raise DataError(f"{path}:{line_number} is not a JSON object with a \"text\" field")
                    yield text, True, consumed
            continue
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            carry = ""
            while chunk := f.read(CHUNK_BYTES):
                consumed += len(chunk.encode("utf-8"))
                buffer = carry + chunk
                cut = _last_line_start(buffer)
                carry = buffer[cut:]
                if cut:
                    yield buffer[:cut], False, consumed - len(carry.encode("utf-8"))
            yield carry, True, consumed


def _last_line_start(text: str) -> int:
    """Index of the last start of a line that begins with a non-space character (0 if none)."""
    position = 0
    for match in SAFE_CUT.finditer(text, max(0, len(text) - 65536)):
        position = match.start()
    return position


def iter_texts(paths):
    """The text of files, folders and .jsonl files, streamed in pieces (e.g. to train a tokenizer)."""
    return (text for text, _, _ in iter_documents(input_files(paths)))


def iter_splits(paths: list[str], val_fraction: float):
    """Yield (split, text, document_ends_here): the last val_fraction of the input bytes is "val".

    The boundary falls on a line start inside whichever piece straddles it.
    """
    files = input_files(paths)
    total = sum(p.stat().st_size for p in files)
    boundary = total * (1 - val_fraction)
    before = 0
    for text, doc_end, after in iter_documents(files):
        if after <= boundary:
            yield "train", text, doc_end
        elif before >= boundary:
            yield "val", text, doc_end
        else:
            fraction = (boundary - before) / max(after - before, 1)
            cut = text.find("\n", int(len(text) * fraction)) + 1 or len(text)
            yield "train", text[:cut], False
            yield "val", text[cut:], doc_end
        before = after


# ----------------------------------------------------------------------------- preparing shards

class _ShardWriter:
    """Appends tokens of one split to numbered shard files of at most SHARD_TOKENS tokens."""

    def __init__(self, folder: Path, split: str, dtype):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.shards, self.tokens, self.bytes, self.documents = [], 0, 0, 0
        self.file, self.in_shard = None, 0

    def write(self, ids: list[int], text_bytes: int, doc_end: bool):
        self.bytes += text_bytes
        self.documents += doc_end
        array = np.asarray(ids, dtype=self.dtype)
        while len(array):
            if self.file is None or self.in_shard == SHARD_TOKENS:
                self._next_shard()
            take = array[: SHARD_TOKENS - self.in_shard]
            self.file.write(take.tobytes())
            self.shards[-1]["tokens"] += len(take)
            self.in_shard += len(take)
            self.tokens += len(take)
            array = array[len(take):]

    def _next_shard(self):
        if self.file:
            self.file.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.shards.append({"path": name, "tokens": 0})
        self.file, self.in_shard = open(self.folder / name, "wb"), 0

    def close(self) -> dict:
        if self.file:
            self.file.close()
        return {"shards": self.shards, "tokens": self.tokens, "bytes": self.bytes, "documents": self.documents}


class _Progress:
    """Prints MB done, MB/s and ETA to stderr at most once a second."""

    def __init__(self, label: str, total_bytes: int):
        self.label, self.total, self.start, self.last = label, total_bytes, time.time(), 0.0

    def update(self, done: int, final=False):
        now = time.time()
        if not final and now - self.last < 1:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate and not final else 0
        print(f"\r{self.label}: {done / 1e6:.1f}/{self.total / 1e6:.1f} MB  {rate / 1e6:.2f} MB/s"
              f"  ETA {eta:4.0f}s", end="\n" if final else "", file=sys.stderr, flush=True)


def prepare(inputs: list[str], out_dir: str, vocab_size: int | None = None, tokenizer_path: str | None = None,
            val_fraction: float = 0.1, tokenizer_max_bytes: int = 200_000_000, num_workers: int | None = None,
            verbose: bool = True) -> dict:
    """Tokenize the inputs into out_dir (train/val shards, tokenizer.json, meta.json); return meta."""
    out, files = Path(out_dir), input_files(inputs)
    if (out / "meta.json").exists():
        raise DataError(f"{out} already holds prepared data; delete it or choose another folder")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if tokenizer_path:
            tokenizer = Tokenizer.load(tokenizer_path)
        else:
            if verbose:
                print(f"training a {vocab_size}-token tokenizer on {', '.join(inputs)}", file=sys.stderr)
            train_text = (text for split, text, _ in iter_splits(inputs, val_fraction) if split == "train")
            tokenizer = Tokenizer.train(train_text, vocab_size, max_bytes=tokenizer_max_bytes, verbose=verbose)
        tokenizer.save(tmp / TOKENIZER_FILE)
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
        writers = {split: _ShardWriter(tmp, split, dtype) for split in ("train", "val")}
        total_bytes = sum(p.stat().st_size for p in files)
        workers = num_workers or min(os.cpu_count() or 1, 8)
        progress, done = _Progress("encoding", total_bytes), 0
        pieces, texts = itertools.tee(iter_splits(inputs, val_fraction))
        encodings = tokenizer.encode_stream((text for _, text, _ in texts), workers, allowed_special=None)
        for (split, text, doc_end), ids in zip(pieces, encodings):
            if doc_end:  # text that looks like "<|endoftext|>" inside a document stays plain text
                ids.append(tokenizer.eos_id)
            text_bytes = len(text.encode("utf-8"))
            writers[split].write(ids, text_bytes, doc_end)
            done += text_bytes
            if verbose:
                progress.update(done)
        if verbose:
            progress.update(done, final=True)
        meta = {"format": META_FORMAT, "version": META_VERSION, "dtype": np.dtype(dtype).name,
                "vocab_size": tokenizer.vocab_size, "tokenizer_fingerprint": tokenizer.fingerprint(),
                "inputs": [str(p) for p in inputs], "val_fraction": val_fraction,
                "splits": {split: writer.close() for split, writer in writers.items()}}
        for split, info in meta["splits"].items():
            if info["tokens"] == 0:
                raise DataError(f"the {split} split of {', '.join(inputs)} is empty; add text or change val_fraction")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)  # an incomplete folder (no meta.json) from an older attempt
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def read_meta(data_dir: str) -> dict:
    """meta.json of a prepared folder, or a DataError saying how to prepare one."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"no prepared data in {data_dir} (meta.json missing); run "
                        f"`python data.py --input YOUR_TEXT --out {data_dir} --vocab-size N` or set inputs")
    try:
        meta = json.loads(path.read_text())
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or (meta.get("format"), meta.get("version")) != (META_FORMAT, META_VERSION):
        raise DataError(f"{path} is corrupt or from another version; prepare the data again")
    return meta


# ----------------------------------------------------------------------------- loading batches

MAX_OPEN_SHARDS = 64  # memory maps one TokenData keeps open (one file descriptor each); see TokenData
FEISTEL_ROUNDS = 6
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, the odd increment of splitmix64


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 words in which each input bit flips about half
    of the output bits (uint64 array arithmetic wraps modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash_words(*words: int) -> int:
    """A 64-bit key from integers of any size and sign: each is folded into the state, then mixed."""
    state = np.zeros(1, dtype=np.uint64)
    for word in words:
        state = _mix64((state ^ np.uint64(word % 2**64)) + np.uint64(_GOLDEN))
    return int(state[0])


def feistel_permutation(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """The image of each index under a bijection of [0, n) chosen by `key`, in O(len(index)) memory.

    A balanced Feistel network permutes the words of 2h bits, the fewest with 4**h >= n (so 4**h < 4n):
    each of FEISTEL_ROUNDS rounds swaps the two h-bit halves and xors one with a keyed hash of the
    other, which is invertible whatever the hash, so the network is a bijection. Cycle-walking
    restricts it to [0, n): a value that lands at or above n goes through the network again until it
    falls inside. The walk follows its start's cycle, which contains the start (inside), so it ends,
    and two starts never end on the same value; it takes fewer than four passes on average.
    """
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    round_keys = [np.uint64(_hash_words(key, r)) for r in range(FEISTEL_ROUNDS)]

    def network(x):
        left, right = x >> shift, x & low
        for round_key in round_keys:
            left, right = right, left ^ (_mix64(right ^ round_key) & low)
        return (left << shift) | right

    x = network(np.asarray(index, dtype=np.uint64))
    outside = x >= n
    while outside.any():
        x[outside] = network(x[outside])
        outside = x >= n
    return x.astype(np.int64)


def epoch_windows(num_tokens: int, seq_len: int) -> tuple[int, int]:
    """(n, max_offset): an epoch's windows start at offset + i * seq_len for i < n, each reading
    seq_len + 1 tokens, with n the same for every offset in [0, max_offset]; max_offset is
    seq_len - 1 unless the split holds fewer than two windows."""
    n = max(1, num_tokens // seq_len - 1)
    return n, min(seq_len - 1, num_tokens - 1 - n * seq_len)


def train_window_starts(num_tokens: int, seq_len: int, seed: int, first: int, count: int) -> np.ndarray:
    """Starts of windows first .. first + count - 1 of the endless sequence epoch 0, epoch 1, ...

    Epoch e is all n windows of a grid shifted by an offset in [0, max_offset] (epoch_windows), in
    the order of feistel_permutation(., n, key); offset and key are hashes of (seed, e). So every
    window is read once per epoch, in an order that changes from epoch to epoch, and any stretch of
    the sequence costs memory and time in proportion to its length, not to n. The shift moves the
    window boundaries: a token that opens a window (predicted from no context) in one epoch sits
    inside one in the next. Each epoch leaves out fewer than 2 * seq_len tokens (head and tail).
    """
    n, max_offset = epoch_windows(num_tokens, seq_len)
    epochs, positions = np.divmod(first + np.arange(count, dtype=np.int64), n)
    starts = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):  # one or two epochs per batch, unless the split is tinier than a batch
        key = _hash_words(seed, int(epoch))
        here = epochs == epoch
        starts[here] = key % (max_offset + 1) + feistel_permutation(positions[here], n, key) * seq_len
    return starts


class TokenData:
    """One split of a prepared folder, read as a single stream of tokens.

    Shards are opened lazily, with their lengths taken from meta.json, and at most MAX_OPEN_SHARDS
    (64) stay memory-mapped, the least recently used closed first. Each map holds a file descriptor,
    so a 2T-token folder of 20,000 shards trains within the common limit of 1,024 open files (train
    and val together hold at most 128 maps). The budget pays only while a split has at most that many
    shards (then every read hits, as fast as with all maps open); random windows over far more shards
    miss at any affordable budget (512 of 20,000 would hit 2.5%), and a miss (open, map, first page
    faults, unmap) adds 50-80 us to a window read: a rank's 128 windows of 4,097 tokens in a 7B step
    of 8 ranks take ~11 ms instead of 2-4 ms with every shard open (bench/bench_loader.py), against
    a step of tens of seconds. At start one directory listing per shard folder checks that every
    shard exists (no per-file calls, which are slow on network filesystems); a shard's size is
    checked when it is opened. Windows are returned as copies, so no evicted map stays alive.

    Training windows are the non-overlapping windows of seq_len tokens (each reads one more for its
    targets), each read once per epoch in an order shuffled anew every epoch (train_window_starts).
    Step s takes windows [s * count, (s + 1) * count) of the endless sequence of epochs, so its batch
    is a pure function of (seed, step): the step number is the loader's whole state in a checkpoint,
    and ranks take disjoint slices of the same global batch. A batch may straddle two epochs.
    """

    def __init__(self, data_dir: str, split: str):
        self.meta, self.split = read_meta(data_dir), split
        try:
            info, dtype = self.meta["splits"][split], self.meta["dtype"]
            names = [entry["path"] for entry in info["shards"]]
            self.lengths = np.array([int(entry["tokens"]) for entry in info["shards"]], dtype=np.int64)
            valid = (dtype in ("uint16", "uint32") and (self.lengths >= 0).all()
                     and not any(os.path.isabs(name) or ".." in name.split("/") for name in names))
        except (KeyError, TypeError, ValueError, AttributeError):
            valid = False
        if not valid:
            raise DataError(f"{data_dir}/meta.json does not describe a {split} split; prepare the data again")
        if self.lengths.sum() != info["tokens"]:
            raise DataError(f"{data_dir}: {split} shards hold {self.lengths.sum()} tokens, meta.json says "
                            f"{info['tokens']}; prepare the data again")
        # Plain strings, not Paths: a 20,000-shard folder then starts in milliseconds.
        self.dtype, self.shards = np.dtype(dtype), [os.path.join(data_dir, name) for name in names]
        listed = {folder: set(os.listdir(folder)) if os.path.isdir(folder) else set()
                  for folder in {os.path.dirname(path) for path in self.shards}}
        missing = [path for path in self.shards if os.path.basename(path) not in listed[os.path.dirname(path)]]
        if missing:
            raise DataError(f"{len(missing)} {split} shard(s) of {data_dir} missing or empty, the first {missing[0]};"
                            f" prepare the data again")
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.num_tokens = int(self.offsets[-1])
        self._open = {}  # shard index -> memmap, least recently used first (dicts keep insertion order)

    def _shard(self, index: int) -> np.memmap:
        shard = self._open.pop(index, None)
        if shard is None:
            if len(self._open) >= MAX_OPEN_SHARDS:
                del self._open[next(iter(self._open))]  # its last reference: the map and descriptor close
            shard = self._map(index)
        self._open[index] = shard
        return shard

    def _map(self, index: int) -> np.memmap:
        path = self.shards[index]
        try:
            shard = np.memmap(path, dtype=self.dtype, mode="r")
        except (FileNotFoundError, ValueError) as error:
            raise DataError(f"shard {path} is missing or empty ({error}); prepare the data again") from None
        if len(shard) != self.lengths[index]:
            raise DataError(f"shard {path} holds {len(shard)} tokens, meta.json says {self.lengths[index]};"
                            f" prepare the data again")
        return shard

    def _read(self, start: int, out: np.ndarray):
        """Fill `out` with tokens [start, start + len(out)) of the stream, across shard boundaries."""
        if start < 0 or start + len(out) > self.num_tokens:
            raise ValueError(f"tokens [{start}, {start + len(out)}) are outside the {self.split} split "
                             f"of {self.num_tokens} tokens")
        done, shard = 0, int(np.searchsorted(self.offsets, start, side="right")) - 1
        while done < len(out):
            offset = start + done - int(self.offsets[shard])
            take = min(len(out) - done, int(self.lengths[shard]) - offset)
            if take > 0:  # empty shards are never opened
                out[done: done + take] = self._shard(shard)[offset: offset + take]
                done += take
            shard += 1

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, as a copy (so no map is held open through it)."""
        out = np.empty(length, dtype=self.dtype)
        self._read(start, out)
        return out

    def check_length(self, seq_len: int):
        if self.num_tokens < seq_len + 1:
            raise DataError(f"the {self.split} split has {self.num_tokens} tokens, fewer than max_seq_len + 1 ="
                            f" {seq_len + 1}; use a shorter model.max_seq_len or more text")

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
        """Window starts of the global batch of `step` (count sequences): a pure function of (seed, step)."""
        self.check_length(seq_len)
        return train_window_starts(self.num_tokens, seq_len, seed, step * count, count)

    def epoch(self, step: int, count: int, seq_len: int) -> float:
        """Epochs completed after `step` steps of `count` sequences (for the log)."""
        return step * count / epoch_windows(self.num_tokens, seq_len)[0]

    def eval_starts(self, seq_len: int, max_tokens: int) -> np.ndarray:
        """Starts of max_tokens // seq_len non-overlapping windows (at least one, at most all) spread
        evenly over the split, the same at every evaluation."""
        slots = (self.num_tokens - 1) // seq_len
        count = max(1, min(slots, max_tokens // seq_len))
        return np.arange(count, dtype=np.int64) * slots // count * seq_len


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens and unused ids), for bits per byte."""
    lengths = torch.zeros(vocab_size, dtype=torch.float64)
    specials = set(tokenizer.special_tokens.values())
    for token_id in range(tokenizer.vocab_size):
        if token_id not in specials:
            lengths[token_id] = len(tokenizer.decode_bytes([token_id]))
    return lengths


def bits_per_byte(total_nats: float, total_bytes: float) -> float:
    """Cross-entropy summed over tokens, in nats, per byte of the text they encode, in bits."""
    return total_nats / (math.log(2) * total_bytes)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Tokenize a corpus into train/val token shards.")
    parser.add_argument("--input", nargs="+", required=True, help="text files, folders, .jsonl files")
    parser.add_argument("--out", required=True, help="folder for the shards, tokenizer.json and meta.json")
    parser.add_argument("--vocab-size", type=int, help="train a tokenizer of this size on the train split")
    parser.add_argument("--tokenizer", help="use this tokenizer file instead of training one")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--tokenizer-max-bytes", type=int, default=200_000_000)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    if not args.vocab_size and not args.tokenizer:
        parser.error("give --vocab-size N to train a tokenizer, or --tokenizer PATH")
    start = time.time()
    try:
        meta = prepare(args.input, args.out, args.vocab_size, args.tokenizer, args.val_fraction,
                       args.tokenizer_max_bytes, args.workers)
    except (DataError, ValueError) as error:
        sys.exit(f"error: {error}")
    seconds = time.time() - start
    total_bytes = sum(s["bytes"] for s in meta["splits"].values())
    for split, info in meta["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens, {info['bytes']:,} bytes, {info['documents']:,} documents,"
              f" {info['bytes'] / info['tokens']:.2f} bytes/token")
    print(f"prepared {total_bytes / 1e6:.1f} MB in {seconds:.1f}s ({total_bytes / 1e6 / seconds:.2f} MB/s)")


if __name__ == "__main__":
    main()
