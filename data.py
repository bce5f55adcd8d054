"""Data: corpus -> tokenizer -> token shards on disk -> batches of token windows.

`prepare` reads the corpus with corpus.py (text files, folders, .jsonl, .parquet, .gz, .zst; bad
records skipped and counted), trains a tokenizer on a sample of the train split spread over the
whole corpus (or loads a given one), encodes in worker processes and appends uint16 tokens (uint32
when the vocabulary needs it) to numbered shards of a train and a val split, with the tokenizer's
BOS (if it has one) before every document and its EOS (<|endoftext|>) after.

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

`TokenData` memory-maps one split's shards as a single stream. A training batch is a set of
windows of seq_len + 1 tokens whose starts come from a generator seeded by (seed, step), so the
batch of any step can be recomputed from the step number alone: that number is the whole loader
state a checkpoint needs, and ranks take disjoint slices of the same global batch.

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

from corpus import (DataError, Progress, iter_texts, list_sources, read_documents, sample_texts,  # noqa: F401
                    val_share)
from tokenizer import Tokenizer

META_FORMAT = "llm-tokens"
META_VERSION = 2
TOKENIZER_FILE = "tokenizer.json"
MANIFEST = "prepare.json"           # an unfinished prepare: its settings and last checkpoint
SHARD_TOKENS = 100_000_000
CHECKPOINT_SECONDS = 30
VAL_MAX_BYTES = 100_000_000         # the val split holds at most about this much input
SPLITS = ("train", "val")


# ----------------------------------------------------------------------------- files that survive a crash

def _fsync_dir(folder: Path):
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_atomic(path: Path, text: str):
    """Replace path with text: a temporary file, fsynced, renamed over it, the folder fsynced."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_file(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
            _fsync_dir(self.folder)
            self.new_file = False
        return {"shards": [dict(s) for s in self.shards], "bytes": self.bytes, "documents": self.documents}

    def close(self) -> dict:
        state = self.sync()
        if self.file:
            self.file.close()
        return {**state, "tokens": sum(s["tokens"] for s in self.shards)}


# ----------------------------------------------------------------------------- settings

def _load_tokenizer(path) -> Tokenizer:
    if not Path(path).is_file():
        raise DataError(f"tokenizer file {path} does not exist; give the path of a tokenizer.json "
                        f"(python tokenizer.py trains one)")
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
    _write_atomic(path, json.dumps(manifest))
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
        _write_atomic(folder / "meta.json", json.dumps(meta, indent=1))
        (folder / MANIFEST).unlink()
        _fsync_dir(folder)
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
        budget = {"memory_budget": memory_budget} if memory_budget else {}
        with contextlib.closing(sample_texts(sources, share, settings["text_field"], max_bytes, verbose)) as texts:
            try:
                tokenizer = Tokenizer.train(texts, vocab_size, max_bytes=max_bytes, verbose=verbose, **budget)
            except ValueError as error:
                raise DataError(str(error)) from None
    tokenizer.save(path)
    _fsync_file(path)
    manifest["tokenizer_fingerprint"] = tokenizer.fingerprint()
    _write_atomic(folder / MANIFEST, json.dumps(manifest))
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
    pieces, texts = itertools.tee(read_documents(sources, share, text_field, position, counts))
    saved = time.monotonic()
    try:
        with contextlib.closing(tokenizer.encode_stream((p.text for p in texts), workers, allowed_special=None)) as ids:
            for piece, piece_ids in zip(pieces, ids):
                writers[piece.split].add(piece_ids, piece.nbytes, bos if piece.begins else None,
                                         eos if piece.ends else None)
                if piece.resume and time.monotonic() - saved >= CHECKPOINT_SECONDS:
                    manifest["checkpoint"] = {"position": list(piece.resume), "skipped": dict(counts),
                                              "splits": {split: w.sync() for split, w in writers.items()}}
                    _write_atomic(folder / MANIFEST, json.dumps(manifest))
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
    _fsync_file(tmp)
    os.replace(tmp, out / TOKENIZER_FILE)
    _write_atomic(out / "meta.json", json.dumps(meta, indent=1))
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

class TokenData:
    """One split of a prepared folder, memory-mapped as a single stream of tokens."""

    def __init__(self, data_dir: str, split: str):
        meta = read_meta(data_dir)
        self.meta = meta
        info = meta["splits"][split]
        try:
            self.shards = [np.memmap(Path(data_dir) / name, dtype=meta["dtype"], mode="r") for name in info["shards"]]
        except (FileNotFoundError, ValueError) as error:
            raise DataError(f"a shard of {data_dir} is missing or empty ({error}); prepare the data again") from None
        lengths = [len(s) for s in self.shards]
        if sum(lengths) != info["tokens"]:
            raise DataError(f"{data_dir}: {split} shards hold {sum(lengths)} tokens, meta.json says "
                            f"{info['tokens']}; prepare the data again")
        self.starts = np.cumsum([0] + lengths)
        self.num_tokens, self.split = int(self.starts[-1]), split

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, across shard boundaries if need be."""
        parts, end = [], start + length
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            offset = start - self.starts[shard]
            piece = self.shards[shard][offset: offset + end - start]
            parts.append(piece)
            start += len(piece)
            shard += 1
        return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])

    def check_length(self, seq_len: int):
        if self.num_tokens < seq_len + 1:
            raise DataError(f"the {self.split} split has {self.num_tokens} tokens, fewer than max_seq_len + 1 ="
                            f" {seq_len + 1}; use a shorter model.max_seq_len or more text")

    def batch(self, starts, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets for windows beginning at `starts`."""
        rows = np.stack([self.window(int(s), seq_len + 1) for s in starts]).astype(np.int64)
        tokens = torch.from_numpy(rows)
        if torch.device(device).type == "cuda":
            tokens = tokens.pin_memory().to(device, non_blocking=True)
        return tokens[:, :-1], tokens[:, 1:]

    def train_starts(self, seed: int, step: int, count: int, seq_len: int) -> np.ndarray:
        """Window starts of the global batch of `step`: a pure function of (seed, step)."""
        generator = np.random.default_rng([seed, step])
        return generator.integers(0, self.num_tokens - seq_len, size=count)

    def eval_starts(self, seq_len: int, max_tokens: int) -> np.ndarray:
        """Non-overlapping windows from the start of the split, at most max_tokens targets."""
        count = max(1, min((self.num_tokens - 1) // seq_len, max_tokens // seq_len))
        return np.arange(count) * seq_len


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
    parser.add_argument("--tokenizer-memory", type=int, help="memory budget of tokenizer training, in bytes")
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
                           text_field=args.text_field, tokenizer_memory_budget=args.tokenizer_memory, part=args.part)
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
