"""Data: corpus -> tokenizer -> token shards on disk -> batches of token windows.

`prepare` reads the corpus with corpus.py (text files, folders, .jsonl, .parquet, .gz, .zst; bad
records skipped and counted), trains a tokenizer on a sample of the train split spread over the
whole corpus (or loads a given one), encodes in worker processes and appends uint16 tokens (uint32
when the vocabulary needs it) to numbered shards of a train and a val split, with the tokenizer's
BOS (if it has one) before every document and its EOS (<|endoftext|>) after. A document is cut into
pieces only where the tokenizer allows (Tokenizer.cut_points; corpus.py, Other tokenizers) and its
later pieces are encoded as continuations (no SentencePiece prefix space), so its ids are those of
encoding it whole.

Never losing work: prepare works inside `out` itself (so a mount point works). `out` must be new,
empty, or one of its own; a folder holding anything else is an error and is left untouched. The
progress is in out/prepare.json: the settings, and a checkpoint (where reading stopped and how
long every shard was then), rewritten atomically every CHECKPOINT_SECONDS after the shards are
fsynced. Run again with the same settings, an interrupted prepare (killed, disk full, a worker
dead) cuts its shards back to the checkpoint and goes on from there, with the tokenizer it had
already trained. meta.json, written last and atomically, marks a complete folder.

Many machines: `--part I/N` prepares the I-th of N contiguous slices of the input files (by size)
into out/part-0000I, with a given tokenizer; `--merge` writes one meta.json over the parts without
moving their shards (shard paths in meta.json are relative to the data folder).

`TokenData` reads one split's shards as a single stream of tokens (see its docstring): every
training window once per epoch, in an order shuffled anew each epoch, and the batch of a step a
pure function of (seed, step), so the step number is the whole loader state a checkpoint needs.

    python data.py --input FILE_OR_DIR [...] --out DIR [--vocab-size N | --tokenizer PATH]
    python data.py --input FILE_OR_DIR [...] --out DIR --tokenizer PATH --part I/N   # for I in 0..N-1
    python data.py --merge DIR
"""
import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch

from infra import atomic
from infra.corpus import DataError, Progress, list_sources, read_documents, sample_texts, val_share
from tokenizer import Tokenizer, parse_size

META_FORMAT = "llm-tokens"
META_VERSION = 2
TOKENIZER_FILE = "tokenizer.json"
MANIFEST = "prepare.json"           # an unfinished prepare: its settings and last checkpoint
SHARD_TOKENS = 100_000_000
CHECKPOINT_SECONDS = 30
VAL_MAX_BYTES = 100_000_000         # the val split holds at most about this much input
SPLITS = ("train", "val")


# ----------------------------------------------------------------------------- shards that survive a crash

class _ShardWriter:
    """Appends one split's tokens to shards {split}_00000.bin, ... of at most SHARD_TOKENS tokens.

    Built from a checkpoint's state, it deletes the shards begun after it and cuts the last one
    back to its length then, so whatever was written after the checkpoint is gone."""

    def __init__(self, folder: Path, split: str, dtype, state: dict | None = None):
        self.folder, self.split, self.dtype = folder, split, np.dtype(dtype)
        state = state or {"shards": [], "bytes": 0, "documents": 0}
        self.shards = [dict(shard) for shard in state["shards"]]
        self.bytes, self.documents, self.file, self.new_file = state["bytes"], state["documents"], None, False
        kept = {shard["path"] for shard in self.shards}
        for path in folder.iterdir():
            if re.fullmatch(rf"{split}_\d{{5}}\.bin", path.name) and path.name not in kept:
                path.unlink()
        if self.shards:
            self.file = open(folder / self.shards[-1]["path"], "r+b")
            self.file.truncate(self.shards[-1]["tokens"] * self.dtype.itemsize)
            self.file.seek(0, os.SEEK_END)

    def add(self, ids, nbytes: int, bos: int | None, eos: int | None):
        """Append one piece's ids (an array of uint32), with BOS before / EOS after when given."""
        tokens = np.frombuffer(ids, dtype=np.uint32) if not isinstance(ids, np.ndarray) else ids
        if bos is not None or eos is not None:
            tokens = np.concatenate([[bos] if bos is not None else [], tokens, [eos] if eos is not None else []])
        tokens = tokens.astype(self.dtype)
        self.bytes += nbytes
        self.documents += eos is not None
        while len(tokens):
            if self.file is None or self.shards[-1]["tokens"] == SHARD_TOKENS:
                self._next_shard()
            take = tokens[: SHARD_TOKENS - self.shards[-1]["tokens"]]
            self.file.write(take.tobytes())
            self.shards[-1]["tokens"] += len(take)
            tokens = tokens[len(take):]

    def _next_shard(self):
        if self.file:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.file, self.new_file = open(self.folder / name, "wb"), True
        self.shards.append({"path": name, "tokens": 0})

    def sync(self) -> dict:
        """Make what was written durable and return the state to resume from."""
        if self.file:
            self.file.flush()
            os.fsync(self.file.fileno())
        if self.new_file:
            atomic.fsync(self.folder)
            self.new_file = False
        return {"shards": [dict(s) for s in self.shards], "bytes": self.bytes, "documents": self.documents}

    def close(self) -> dict:
        state = self.sync()
        if self.file:
            self.file.close()
        return {**state, "tokens": sum(s["tokens"] for s in self.shards)}


# ----------------------------------------------------------------------------- settings

def _load_tokenizer(path) -> Tokenizer:
    if not Path(path).exists():
        raise DataError(f"tokenizer {path} does not exist; give a tokenizer file (python tokenizer.py trains one) "
                        f"or a model folder that holds one")
    try:
        return Tokenizer.load(path)
    except ValueError as error:
        raise DataError(str(error)) from None


def _settings(inputs, given: Tokenizer | None, vocab_size, val_fraction, val_max_bytes, tokenizer_max_bytes,
              text_field) -> dict:
    """What decides the tokens of a prepared folder. A given tokenizer counts by its content."""
    return {"inputs": None if inputs is None else [str(p) for p in inputs],
            "val_fraction": val_fraction, "val_max_bytes": val_max_bytes, "text_field": text_field,
            "tokenizer": given.fingerprint() if given else None,
            "vocab_size": given.vocab_size if given else vocab_size,
            "tokenizer_max_bytes": None if given else tokenizer_max_bytes}


def _same_inputs(stored: dict, inputs: list[str]) -> bool:
    if [os.path.normpath(p) for p in stored["inputs"]] == [os.path.normpath(p) for p in inputs]:
        return True
    return stored.get("input_paths") == [os.path.abspath(p) for p in inputs]


def _mismatch(stored: dict, run: dict, fingerprint: str | None) -> tuple | None:
    """The first setting of `run` (None: not checked) that differs from `stored`: (key, was, now)."""
    if run["inputs"] is not None and not _same_inputs(stored, run["inputs"]):
        return "inputs", stored["inputs"], run["inputs"]
    for key in ("val_fraction", "val_max_bytes", "text_field"):
        if run[key] is not None and run[key] != stored.get(key):
            return key, stored.get(key), run[key]
    if run["tokenizer"]:
        if run["tokenizer"] != fingerprint:
            return "tokenizer", fingerprint, run["tokenizer"]
    elif stored.get("tokenizer") is None:  # both train one: on the same sample, to the same size?
        for key in ("vocab_size", "tokenizer_max_bytes"):
            if run[key] is not None and run[key] != stored.get(key):
                return key, stored.get(key), run[key]
    for key in ("part", "sources"):  # an unfinished prepare only
        if key in run and run[key] != stored.get(key):
            return key, stored.get(key), run[key]
    return None


def _settings_error(folder: Path, key, was, now, tokenizer_path=None, unfinished=False) -> DataError:
    keep = (f" (to keep its trained tokenizer, copy {folder / TOKENIZER_FILE} elsewhere first and pass it as "
            f"the tokenizer)" if unfinished and (folder / TOKENIZER_FILE).exists() else "")
    if key == "inputs":
        missing = [p for p in now if not Path(p).exists()]
        if missing:
            return DataError(f"input {missing[0]} does not exist, and {folder} was prepared from "
                             f"{', '.join(was)}; fix the path (or give no inputs to use {folder} as it is)")
        what = f"from {', '.join(was)}, not {', '.join(now)} (inputs)"
    elif key == "sources":
        what = "from input files that have changed since (added, removed or modified)"
    elif key == "tokenizer":
        what = f"with another tokenizer than {tokenizer_path or 'a trained one'}"
    else:
        what = f"with {key}={json.dumps(was)}, not {json.dumps(now)}"
    if unfinished:
        return DataError(f"{folder} holds an unfinished prepare {what}; run again with the same settings to resume "
                         f"it, or delete {folder} to start over{keep}")
    return DataError(f"{folder} was prepared {what}; delete {folder} (or choose another data folder) to prepare "
                     f"it again" + ("" if key in ("inputs", "sources", "tokenizer") else f", or set {key}={json.dumps(was)}"))


def check_prepared(data_dir, inputs=None, vocab_size=None, tokenizer_path=None, val_fraction=None,
                   val_max_bytes=None, tokenizer_max_bytes=None, text_field=None) -> dict:
    """meta.json of a prepared folder, after checking that it was prepared with these settings
    (None: not checked); a DataError naming the first one that differs and what to do otherwise.
    A given tokenizer counts by content (its fingerprint), not by its file's bytes."""
    meta = read_meta(data_dir)
    if "settings" not in meta:
        raise DataError(f"{data_dir} was prepared by an older version of data.py, which did not record its settings;"
                        f" delete it to prepare it again")
    given = _load_tokenizer(tokenizer_path) if tokenizer_path else None
    run = _settings(inputs, given, vocab_size, val_fraction, val_max_bytes, tokenizer_max_bytes, text_field)
    if difference := _mismatch(meta.get("settings", {}), run, meta["tokenizer_fingerprint"]):
        raise _settings_error(Path(data_dir), *difference, tokenizer_path)
    return meta


def _claim(folder: Path, settings: dict) -> dict:
    """The progress record of folder: a new one in a new or empty folder, or the unfinished one
    with the same settings. Any other folder is an error, and nothing in it is touched."""
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is a file; choose a folder for the prepared data")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != META_FORMAT + "-progress":
            raise DataError(f"{path} is not a progress record of this program; choose another folder")
        if difference := _mismatch(manifest["settings"], settings, manifest["tokenizer_fingerprint"]):
            raise _settings_error(folder, *difference, unfinished=True)
        return manifest
    others = sorted(set(os.listdir(folder)) - {MANIFEST + ".tmp", "lost+found"})  # the root of an ext4 volume
    if others:
        raise DataError(f"{folder} already holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}, which"
                        f" was not prepared here; choose a new or empty folder (nothing was changed)")
    manifest = {"format": META_FORMAT + "-progress", "settings": settings, "tokenizer_fingerprint": None,
                "checkpoint": None}
    atomic.write_text(path, json.dumps(manifest))
    return manifest


def _digest(sources) -> str:
    """Identifies the input files (paths, sizes, modification times), to notice changes on resume."""
    sha = hashlib.sha256()
    for source in sources:
        stat = source.path.stat()
        sha.update(f"{source.path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return sha.hexdigest()


def part_sources(sources: list, index: int, count: int) -> list:
    """The index-th of `count` contiguous slices of sources by size: a file goes to the slice
    that holds its middle byte."""
    total, before, mine = max(sum(s.size for s in sources), 1), 0, []
    for source in sources:
        if min(count - 1, (2 * before + source.size) * count // (2 * total)) == index:
            mine.append(source)
        before += source.size
    return mine


# ----------------------------------------------------------------------------- preparing shards

def prepare(inputs: list[str], out_dir: str, vocab_size: int | None = None, tokenizer_path: str | None = None,
            val_fraction: float = 0.1, tokenizer_max_bytes: int = 200_000_000, num_workers: int | None = None,
            verbose: bool = True, *, val_max_bytes: int | None = VAL_MAX_BYTES, text_field: str = "text",
            tokenizer_memory_budget: int | None = None, part: tuple[int, int] | None = None) -> dict:
    """Tokenize the inputs into out_dir (train/val shards, tokenizer.json, meta.json); return meta.

    Resumes an unfinished prepare of out_dir with the same settings; returns the meta of a
    finished one with the same settings. part=(I, N): the I-th of N slices into out_dir/part-0000I.
    """
    inputs = [str(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    given = _load_tokenizer(tokenizer_path) if tokenizer_path else None
    if given is None and not vocab_size:
        raise DataError("give a vocabulary size to train a tokenizer, or a tokenizer file")
    if part is not None and given is None:
        raise DataError("preparing a part needs a given tokenizer, the same for every part: train one first "
                        "(python tokenizer.py --input ... --vocab-size N --out tok.json) and pass --tokenizer")
    settings = _settings(inputs, given, vocab_size, val_fraction, val_max_bytes, tokenizer_max_bytes, text_field)
    folder = Path(out_dir) / f"part-{part[0]:05d}" if part else Path(out_dir)
    if (folder / "meta.json").is_file():
        meta = check_prepared(folder, inputs, vocab_size, tokenizer_path, val_fraction, val_max_bytes,
                              tokenizer_max_bytes, text_field)
        if verbose:
            print(f"{folder} is already prepared with these settings", file=sys.stderr)
        return meta
    sources = list_sources(inputs)
    share = val_share(sources, val_fraction, val_max_bytes)
    mine = part_sources(sources, *part) if part else sources
    try:
        manifest = _claim(folder, {**settings, "part": list(part) if part else None, "sources": _digest(sources)})
        tokenizer = _tokenizer(folder, manifest, given, sources, share, settings, tokenizer_memory_budget, verbose)
        splits, counts = _encode(folder, manifest, tokenizer, mine, share, text_field, num_workers, verbose)
        meta = {"format": META_FORMAT, "version": META_VERSION, "dtype": splits.pop("dtype"),
                "vocab_size": tokenizer.vocab_size, "tokenizer_fingerprint": tokenizer.fingerprint(),
                "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                "settings": {**settings, "input_paths": [os.path.abspath(p) for p in inputs]},
                "skipped": counts, "splits": splits, **({"part": list(part)} if part else {})}
        if not part:
            _check_splits(splits, inputs)
        atomic.write_text(folder / "meta.json", json.dumps(meta, indent=1))
        (folder / MANIFEST).unlink()
        atomic.fsync(folder)
    except OSError as error:
        raise DataError(f"cannot write to {folder} ({error.strerror or error}); fix that (e.g. free some space) "
                        f"and run the same command again to resume") from None
    return meta


def _check_splits(splits: dict, inputs):
    for split, info in splits.items():
        if info["tokens"] == 0:
            raise DataError(f"the {split} split of {', '.join(map(str, inputs))} is empty; add text or change "
                            f"val_fraction")


def _tokenizer(folder, manifest, given, sources, share, settings, memory_budget, verbose) -> Tokenizer:
    """The given tokenizer, the one trained before an interruption, or a new one trained on a
    sample of the train split (tokenizer_max_bytes, spread over the corpus: corpus.sample_texts)."""
    path = folder / TOKENIZER_FILE
    if manifest["tokenizer_fingerprint"]:
        tokenizer = _load_tokenizer(path)
        if tokenizer.fingerprint() != manifest["tokenizer_fingerprint"]:
            raise DataError(f"{path} was changed during the prepare; delete {folder} to start over")
        if verbose:
            print(f"resuming the prepare in {folder}", file=sys.stderr)
        return tokenizer
    if given:
        tokenizer = given
    else:
        vocab_size, max_bytes = settings["vocab_size"], settings["tokenizer_max_bytes"]
        if verbose:
            print(f"training a {vocab_size}-token tokenizer on a sample of the train split", file=sys.stderr)
        with contextlib.closing(sample_texts(sources, share, settings["text_field"], max_bytes, verbose)) as texts:
            try:
                tokenizer = Tokenizer.train(texts, vocab_size, max_bytes=max_bytes, memory_budget=memory_budget,
                                            verbose=verbose)
            except ValueError as error:
                raise DataError(str(error)) from None
    tokenizer.save(path)  # atomically and durably, before the manifest counts it
    manifest["tokenizer_fingerprint"] = tokenizer.fingerprint()
    atomic.write_text(folder / MANIFEST, json.dumps(manifest))
    return tokenizer


def _encode(folder, manifest, tokenizer, sources, share, text_field, num_workers, verbose) -> tuple[dict, dict]:
    """Encode the documents into the shards, from the last checkpoint; return the splits' info
    and the counts of what was skipped."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    checkpoint = manifest["checkpoint"] or {"position": [0, 0, 0], "splits": {},
                                            "skipped": {"binary_files": 0, "bad_records": 0, "invalid_utf8_bytes": 0}}
    writers = {split: _ShardWriter(folder, split, dtype, checkpoint["splits"].get(split)) for split in SPLITS}
    counts, position = dict(checkpoint["skipped"]), tuple(checkpoint["position"])
    total = sum(s.size for s in sources)
    progress = Progress("encoding", total, sum(s.size for s in sources[:position[0]]), verbose)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    workers = num_workers or os.cpu_count() or 1
    # Cut where the tokenizer allows, and later pieces encoded as continuations (no SentencePiece prefix
    # space): each document gets the ids of its whole.
    pieces, texts = itertools.tee(read_documents(sources, share, text_field, position, counts,
                                                 cuts=tokenizer.cut_points))
    saved = time.monotonic()
    try:
        with contextlib.closing(tokenizer.encode_stream(((p.text, not p.begins) for p in texts), workers,
                                                        allowed_special=None)) as ids:
            for piece, piece_ids in zip(pieces, ids):
                writers[piece.split].add(piece_ids, piece.nbytes, bos if piece.begins else None,
                                         eos if piece.ends else None)
                if piece.resume and time.monotonic() - saved >= CHECKPOINT_SECONDS:
                    manifest["checkpoint"] = {"position": list(piece.resume), "skipped": dict(counts),
                                              "splits": {split: w.sync() for split, w in writers.items()}}
                    atomic.write_text(folder / MANIFEST, json.dumps(manifest))
                    saved = time.monotonic()
                progress.update(piece.raw_done)
    except BrokenProcessPool as error:
        raise DataError(f"{error}; the work up to the last checkpoint is kept: run the same command again to "
                        f"resume") from None
    progress.update(total, final=True)
    return {"dtype": np.dtype(dtype).name, **{split: w.close() for split, w in writers.items()}}, counts


def merge_parts(out_dir, verbose: bool = True) -> dict:
    """Write out_dir/meta.json (and tokenizer.json) over the finished parts out_dir/part-*; the
    shards stay in the parts' folders."""
    out = Path(out_dir)
    folders = sorted(p for p in out.glob("part-*") if re.fullmatch(r"part-\d{5}", p.name) and p.is_dir())
    if not folders:
        raise DataError(f"no parts (part-00000, ...) in {out}; prepare them with --part I/N first")
    for folder in folders:
        if not (folder / "meta.json").is_file():
            raise DataError(f"{folder} is not finished; run its --part command again to resume it")
    metas = [read_meta(folder) for folder in folders]
    count = metas[0]["part"][1]
    missing = sorted(set(range(count)) - {m["part"][0] for m in metas})
    if missing or len(metas) != count:
        raise DataError(f"{out} should hold parts 0..{count - 1} of {count}; missing: {missing or 'none'}, found: "
                        f"{', '.join(f.name for f in folders)}; prepare the missing ones with --part I/{count}")
    for folder, meta in zip(folders, metas):
        if meta["part"][1] != count or (difference := _mismatch(metas[0]["settings"], meta["settings"],
                                                                 metas[0]["tokenizer_fingerprint"])):
            raise DataError(f"{folder} was prepared with other settings than {folders[0]} "
                            f"({difference[0] if meta['part'][1] == count else 'the part count'}); "
                            f"prepare all parts with the same command")
    if (out / "meta.json").is_file() and "parts" not in read_meta(out):
        raise DataError(f"{out} already holds a prepared corpus besides the parts; choose another folder")
    splits = {}
    for split in SPLITS:
        splits[split] = {"shards": [{"path": f"{folder.name}/{s['path']}", "tokens": s["tokens"]}
                                    for folder, meta in zip(folders, metas) for s in meta["splits"][split]["shards"]],
                         **{key: sum(m["splits"][split][key] for m in metas) for key in ("tokens", "bytes", "documents")}}
    _check_splits(splits, metas[0]["settings"]["inputs"])
    skipped = {key: sum(m["skipped"][key] for m in metas) for key in metas[0]["skipped"]}
    meta = {**{k: v for k, v in metas[0].items() if k != "part"}, "parts": count, "skipped": skipped, "splits": splits}
    tmp = out / (TOKENIZER_FILE + ".tmp")
    shutil.copyfile(folders[0] / TOKENIZER_FILE, tmp)
    atomic.replace(tmp, out / TOKENIZER_FILE)
    atomic.write_text(out / "meta.json", json.dumps(meta, indent=1))
    if verbose:
        print(f"merged {count} parts into {out}", file=sys.stderr)
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
    specials = set(tokenizer.special_tokens.values())
    known = [0 if token is None or i in specials else len(token) for i, token in enumerate(tokenizer.vocab)]
    lengths = torch.zeros(vocab_size, dtype=torch.float64)  # ids past the vocabulary: special tokens, unused
    lengths[:len(known)] = torch.tensor(known, dtype=torch.float64)
    return lengths


def bits_per_byte(total_nats: float, total_bytes: float) -> float:
    """Cross-entropy summed over tokens, in nats, per byte of the text they encode, in bits."""
    return total_nats / (math.log(2) * total_bytes)


def _part(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not int(match[1]) < int(match[2]):
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(match[1]), int(match[2])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Tokenize a corpus into train/val token shards.")
    parser.add_argument("--input", nargs="+", help="text files, folders, .jsonl, .parquet, .gz, .zst files")
    parser.add_argument("--out", help="folder for the shards, tokenizer.json and meta.json (new or empty)")
    parser.add_argument("--vocab-size", type=int, help="train a tokenizer of this size on the train split")
    parser.add_argument("--tokenizer", help="use this tokenizer file instead of training one")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out for val")
    parser.add_argument("--val-max-bytes", type=int, default=VAL_MAX_BYTES, help="at most this much input held out")
    parser.add_argument("--text-field", default="text", help="the field (.jsonl) or column (.parquet) with the text")
    parser.add_argument("--tokenizer-max-bytes", type=int, default=200_000_000, help="tokenizer sample size")
    parser.add_argument("--tokenizer-memory-budget", type=parse_size, metavar="SIZE",
                        help="memory that tokenizer training may use, e.g. 512M or 8G (default 2G)")
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: one per CPU)")
    parser.add_argument("--part", type=_part, help="prepare only slice I of N of the files (I in 0..N-1), "
                                                   "into OUT/part-0000I; needs --tokenizer")
    parser.add_argument("--merge", metavar="DIR", help="write DIR/meta.json over the finished parts in DIR")
    args = parser.parse_args(argv)
    try:
        if args.merge:
            meta = merge_parts(args.merge)
        else:
            if not args.input or not args.out:
                parser.error("give --input and --out (or --merge DIR)")
            if not args.vocab_size and not args.tokenizer:
                parser.error("give --vocab-size N to train a tokenizer, or --tokenizer PATH")
            if args.tokenizer and args.vocab_size and _load_tokenizer(args.tokenizer).vocab_size != args.vocab_size:
                raise DataError(f"--vocab-size {args.vocab_size} differs from the {_load_tokenizer(args.tokenizer).vocab_size}"
                                f" tokens of {args.tokenizer}; leave --vocab-size out to use that tokenizer")
            start = time.time()
            meta = prepare(args.input, args.out, args.vocab_size, args.tokenizer, args.val_fraction,
                           args.tokenizer_max_bytes, args.workers, val_max_bytes=args.val_max_bytes,
                           text_field=args.text_field, tokenizer_memory_budget=args.tokenizer_memory_budget, part=args.part)
            seconds = time.time() - start
    except ValueError as error:  # DataError, and a tokenizer file that cannot be used
        Progress.end_line()
        sys.exit(f"error: {error}")
    for split, info in meta["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens, {info['bytes']:,} bytes, {info['documents']:,} documents,"
              f" {info['bytes'] / max(info['tokens'], 1):.2f} bytes/token")
    if not args.merge:
        total_bytes = sum(s["bytes"] for s in meta["splits"].values())
        print(f"prepared {total_bytes / 1e6:.1f} MB in {seconds:.1f}s ({total_bytes / 1e6 / seconds:.2f} MB/s)")


if __name__ == "__main__":
    main()
