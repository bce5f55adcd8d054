"""Preparing a data folder: corpus -> tokenizer -> token shards (data.py reads them back).

`prepare` reads the corpus with infra/corpus.py, trains a tokenizer on a sample of the train split
spread over the whole corpus (or loads a given one), encodes in worker processes and appends the
tokens to numbered shards of a train and a val split. A document is cut into pieces only where the
tokenizer allows (fast_encode.cut_points) and its later pieces are encoded as continuations, so its
ids are those of encoding it whole.

Never losing work. The folder is locked while it is prepared: a second prepare of it waits for the
first, then finds it finished. `out` must be new, empty, or one of its own; a folder holding
anything else is an error and is left untouched. The progress is in out/prepare.json: the
settings, and a checkpoint (where reading stopped and how long every shard was then), rewritten
atomically every CHECKPOINT_SECONDS after the shards are fsynced. Run again with the same
settings, an interrupted prepare (killed, disk full, a worker dead) cuts its shards back to the
checkpoint and goes on from there, with the tokenizer it had already trained. meta.json, written
last and atomically, marks a complete folder; it keeps the inputs' fingerprint (paths, sizes,
modification times), so a folder whose inputs changed since is an error, not stale tokens.

Many machines: `--part I/N` (I in 0..N-1) prepares the I-th of N contiguous slices of the input
files (by size) into out/part-0000I, with a given tokenizer; `--merge` writes one meta.json over the
parts without moving their shards. Every part records the fingerprint of the whole input list, and
merge refuses parts that disagree (inputs changed between two parts).

    python -m infra.prepare --input FILE_OR_DIR [...] --out DIR [--vocab-size N | --tokenizer PATH]
    python -m infra.prepare --input FILE_OR_DIR [...] --out DIR --tokenizer PATH --part I/N
    python -m infra.prepare --merge DIR
"""

import argparse
import contextlib
import fcntl
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

from config import TrainConfig
from data import META_FORMAT, META_VERSION, TOKENIZER_FILE, DataError, read_meta
from infra import bpe_train, corpus, files
from infra.corpus import list_sources, read_documents, sample_texts, val_share
from infra.fast_encode import cut_points, encode_stream
from infra.files import error_line
from infra.progress import Progress, warn
from infra.tokenizer_cli import parse_size
from infra.tokenizers import load_tokenizer
from tokenizer import GPT4_SPLIT_PATTERN, Tokenizer, UserError

MANIFEST = "prepare.json"  # an unfinished prepare: its settings and last checkpoint
SHARD_TOKENS = 100_000_000
CHECKPOINT_SECONDS = 30
DEFAULTS = TrainConfig()  # the defaults of the settings a prepare shares with a training run
SPLITS = ("train", "val")
PART = re.compile(r"part-\d{5}")
EMPTY_VOLUME = {"lost+found"}  # the root of a fresh ext4 volume counts as empty


# ---------------------------------------------------------------------- shards


class _ShardWriter:
    """Appends one split's tokens to shards {split}_00000.bin, ... of at most SHARD_TOKENS tokens.

    Built from a checkpoint's state, it deletes the shards begun after it and cuts the last one
    back to its length then, so whatever was written after the checkpoint is gone."""

    def __init__(self, folder: Path, split: str, dtype, state: dict | None = None):
        self.folder, self.split, self.dtype = folder, split, np.dtype(dtype)
        state = state or {"shards": [], "bytes": 0, "documents": 0}
        self.shards = [dict(shard) for shard in state["shards"]]
        self.bytes, self.documents = state["bytes"], state["documents"]
        self.file, self.new_file = None, False
        kept = {shard["path"] for shard in self.shards}
        for path in folder.iterdir():
            if re.fullmatch(rf"{split}_\d{{5}}\.bin", path.name) and path.name not in kept:
                path.unlink()
        if self.shards:
            self.file = open(folder / self.shards[-1]["path"], "r+b")
            self.file.truncate(self.shards[-1]["tokens"] * self.dtype.itemsize)
            self.file.seek(0, os.SEEK_END)

    def add(self, ids, nbytes: int, bos: int | None, eos: int | None):
        """Append one piece's ids (uint32s), with BOS before / EOS after when given."""
        tokens = ids if isinstance(ids, np.ndarray) else np.frombuffer(ids, dtype=np.uint32)
        if bos is not None or eos is not None:
            before, after = [] if bos is None else [bos], [] if eos is None else [eos]
            tokens = np.concatenate([before, tokens, after])
        tokens = tokens.astype(self.dtype)
        self.bytes += nbytes
        self.documents += eos is not None
        while len(tokens):
            if self.file is None or self.shards[-1]["tokens"] == SHARD_TOKENS:
                self._next_shard()
            take = tokens[: SHARD_TOKENS - self.shards[-1]["tokens"]]
            self.file.write(take.tobytes())
            self.shards[-1]["tokens"] += len(take)
            tokens = tokens[len(take) :]

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
            files.fsync(self.folder)
            self.new_file = False
        return {
            "shards": [dict(s) for s in self.shards],
            "bytes": self.bytes,
            "documents": self.documents,
        }

    def close(self) -> dict:
        state = self.sync()
        if self.file:
            self.file.close()
        return {**state, "tokens": sum(s["tokens"] for s in self.shards)}


# ---------------------------------------------------------------------- settings


def _load_tokenizer(path) -> Tokenizer:
    if not Path(path).exists():
        raise DataError(
            f"tokenizer {path} does not exist; give a tokenizer file (python "
            f"tokenizer.py trains one) or a model folder that holds one"
        )
    try:
        return load_tokenizer(path)
    except UserError as error:
        raise DataError(str(error)) from None


def _settings(
    inputs,
    given: Tokenizer | None,
    vocab_size,
    val_fraction,
    val_max_bytes,
    tokenizer_max_bytes,
    text_field,
    pattern=None,
) -> dict:
    """What decides the tokens of a prepared folder. A given tokenizer counts by its content."""
    return {
        "inputs": None if inputs is None else [str(p) for p in inputs],
        "val_fraction": val_fraction,
        "val_max_bytes": val_max_bytes,
        "val_split": corpus.VAL_SPLIT,
        "text_field": text_field,
        "tokenizer": given.fingerprint() if given else None,
        "vocab_size": given.vocab_size if given else vocab_size,
        "tokenizer_max_bytes": None if given else tokenizer_max_bytes,
        "pattern": None if given else pattern,
    }


def input_fingerprint(sources) -> dict:
    """Identifies the input files by paths, sizes and modification times, to notice changes."""
    sha, total = hashlib.sha256(), 0
    for source in sources:
        stat = source.path.stat()
        total += stat.st_size
        line = f"{os.path.abspath(source.path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
        sha.update(line.encode("utf-8", "surrogateescape"))
    return {"files": len(sources), "bytes": total, "sha256": sha.hexdigest()}


def _same_inputs(stored: dict, inputs: list[str]) -> bool:
    if [os.path.normpath(p) for p in stored["inputs"]] == [os.path.normpath(p) for p in inputs]:
        return True
    return stored.get("input_paths") == [os.path.abspath(p) for p in inputs]


def _mismatch(stored: dict, run: dict, fingerprint: str | None) -> tuple | None:
    """The first setting of `run` (None: not checked) that differs from `stored`:
    (key, was, now)."""
    if run["inputs"] is not None and not _same_inputs(stored, run["inputs"]):
        return "inputs", stored["inputs"], run["inputs"]
    for key in ("val_split", "val_fraction", "val_max_bytes", "text_field"):
        if run[key] is not None and run[key] != stored.get(key):
            return key, stored.get(key), run[key]
    if run["tokenizer"]:
        if run["tokenizer"] != fingerprint:
            return "tokenizer", fingerprint, run["tokenizer"]
    elif stored.get("tokenizer") is None:  # both train one: on the same sample, to the same size?
        for key in ("vocab_size", "tokenizer_max_bytes", "pattern"):
            if run.get(key) is not None and run[key] != stored.get(key):
                return key, stored.get(key), run[key]
    for key in ("part", "sources"):
        if key in run and run[key] != stored.get(key):
            return key, stored.get(key), run[key]
    return None


def _settings_error(
    folder: Path, key, was, now, tokenizer_path=None, unfinished=False
) -> DataError:
    if key == "inputs":
        missing = [p for p in now if not Path(p).exists()]
        if missing:
            return DataError(
                f"input {missing[0]} does not exist, and {folder} was prepared from "
                f"{', '.join(was)}; fix the path (or give no inputs to use {folder} "
                f"as it is)"
            )
        what = f"from {', '.join(was)}, not {', '.join(now)} (inputs)"
    elif key == "sources":
        what = "from input files that have changed since (added, removed or modified"
        if was and now:
            what += (
                f": {was['files']:,} file(s) of {was['bytes']:,} bytes then, "
                f"{now['files']:,} of {now['bytes']:,} bytes now"
            )
        what += ")"
    elif key == "tokenizer":
        what = f"with another tokenizer than {tokenizer_path or 'a trained one'}"
    elif key == "pattern":  # as the regex reads, unescaped
        what = f"with the split pattern {was}, not {now}"
    else:
        what = f"with {key}={json.dumps(was)}, not {json.dumps(now)}"
    if unfinished:
        keep = ""
        if (folder / TOKENIZER_FILE).exists():
            keep = (
                f" (to keep its trained tokenizer, copy {folder / TOKENIZER_FILE} elsewhere "
                f"first and pass it as the tokenizer)"
            )
        return DataError(
            f"{folder} holds an unfinished prepare {what}; run again with the same "
            f"settings to resume it, or delete {folder} to start over{keep}"
        )
    fixed = key in ("inputs", "sources", "tokenizer", "val_split", "pattern")
    fix = "" if fixed else f", or set {key}={json.dumps(was)}"
    return DataError(
        f"{folder} was prepared {what}; delete {folder} (or choose another data "
        f"folder) to prepare it again{fix}"
    )


def check_prepared(
    data_dir,
    inputs=None,
    vocab_size=None,
    tokenizer_path=None,
    val_fraction=None,
    val_max_bytes=None,
    tokenizer_max_bytes=None,
    text_field=None,
    pattern=None,
) -> dict:
    """meta.json of a prepared folder, after checking that it was prepared with these settings
    (None: not checked) from input files unchanged since; a DataError naming the first thing
    that differs and what to do otherwise. A given tokenizer counts by content (its fingerprint),
    not by its file's bytes."""
    meta = read_meta(data_dir)
    if "settings" not in meta:
        raise DataError(
            f"{data_dir} was prepared by an older version of this code, which did not "
            f"record its settings; delete it to prepare it again"
        )
    stored = meta["settings"]
    given = _load_tokenizer(tokenizer_path) if tokenizer_path else None
    run = _settings(
        inputs,
        given,
        vocab_size,
        val_fraction,
        val_max_bytes,
        tokenizer_max_bytes,
        text_field,
        pattern,
    )
    difference = _mismatch(stored, run, meta["tokenizer_fingerprint"])
    if difference is None and inputs is not None and stored.get("sources"):
        run["sources"] = input_fingerprint(list_sources(inputs))
        difference = _mismatch(stored, run, meta["tokenizer_fingerprint"])
    if difference:
        raise _settings_error(Path(data_dir), *difference, tokenizer_path)
    return meta


def part_sources(sources: list, index: int, count: int) -> list:
    """The index-th of `count` contiguous slices of sources by size: a file goes to the slice
    that holds its middle byte."""
    total, before, mine = max(sum(s.size for s in sources), 1), 0, []
    for source in sources:
        if min(count - 1, (2 * before + source.size) * count // (2 * total)) == index:
            mine.append(source)
        before += source.size
    return mine


# ---------------------------------------------------------------------- the folder


@contextlib.contextmanager
def _locked(folder: Path):
    """Hold an exclusive lock on the folder itself (no lock file in it): a second prepare of
    the same folder waits here, saying so, until the first one ends. A filesystem that cannot
    lock a folder (some network ones) gets a warning instead."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            Progress.end_line()
            print(f"waiting for another prepare of {folder} to finish", file=sys.stderr, flush=True)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError as error:
            warn(
                f"cannot lock {folder} ({error.strerror}); make sure that no other prepare "
                f"uses it at the same time"
            )
        yield
    finally:
        os.close(descriptor)


def _claim(folder: Path, settings: dict) -> dict:
    """The progress record of folder: a new one in a new or empty folder, or the unfinished one
    with the same settings. Any other folder is an error, and nothing in it is touched."""
    path = folder / MANIFEST
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != META_FORMAT + "-progress":
            raise DataError(
                f"{path} is not a progress record of this program; choose another folder"
            )
        difference = _mismatch(manifest["settings"], settings, manifest["tokenizer_fingerprint"])
        if difference:
            raise _settings_error(folder, *difference, unfinished=True)
        return manifest
    others = sorted(set(os.listdir(folder)) - {MANIFEST + ".tmp"} - EMPTY_VOLUME)
    if others:
        raise DataError(
            f"{folder} already holds {_names(others)}, which was not prepared here; "
            f"choose a new or empty folder (nothing was changed)"
        )
    manifest = {
        "format": META_FORMAT + "-progress",
        "settings": settings,
        "tokenizer_fingerprint": None,
        "checkpoint": None,
    }
    files.write_atomic(path, json.dumps(manifest))
    return manifest


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _check_parts_folder(out: Path, merging: bool):
    """The folder of --part and --merge is new, empty, or holds parts and what a merge of them
    writes (a merge that stopped between its two files included: _check_merged_tokenizer)."""
    if not out.is_dir():
        return
    merged = (out / "meta.json").is_file() and "parts" in read_meta(out)
    if (out / "meta.json").is_file() and not merged:
        others = ["meta.json"]
    else:
        written = {TOKENIZER_FILE, "meta.json", TOKENIZER_FILE + ".tmp", "meta.json.tmp"}
        allowed = EMPTY_VOLUME | (written if merging or merged else set())
        others = sorted(
            name
            for name in set(os.listdir(out)) - allowed
            if not (PART.fullmatch(name) and (out / name).is_dir())
        )
    if others:
        raise DataError(
            f"{out} already holds {_names(others)}, which is not a part of a prepare; "
            f"choose a new or empty folder for the parts (nothing was changed)"
        )


# ---------------------------------------------------------------------- preparing


def prepare(
    inputs: list[str],
    out_dir: str,
    vocab_size: int | None = None,
    tokenizer_path: str | None = None,
    val_fraction: float = DEFAULTS.val_fraction,
    tokenizer_max_bytes: int = DEFAULTS.tokenizer_max_bytes,
    num_workers: int | None = None,
    verbose: bool = True,
    *,
    val_max_bytes: int | None = DEFAULTS.val_max_bytes,
    text_field: str = DEFAULTS.text_field,
    tokenizer_memory_budget: int | None = None,
    part: tuple[int, int] | None = None,
    pattern: str = GPT4_SPLIT_PATTERN,
) -> dict:
    """Tokenize the inputs into out_dir (train/val shards, tokenizer.json, meta.json); return meta.

    Resumes an unfinished prepare of out_dir with the same settings; returns the meta of a finished
    one with the same settings. part=(I, N): the I-th of N slices into out_dir/part-0000I. A
    tokenizer trained here splits text with `pattern`.
    """
    inputs = [str(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    given = _load_tokenizer(tokenizer_path) if tokenizer_path else None
    if given is None and not vocab_size:
        raise DataError("give a vocabulary size to train a tokenizer, or a tokenizer file")
    if given is None:
        Tokenizer(pattern, (), ())  # an invalid pattern fails now, not after reading the corpus
    if part is not None and given is None:
        raise DataError(
            "preparing a part needs a given tokenizer, the same for every part: train "
            "one first (python -m infra.tokenizer_cli --input ... --vocab-size N --out "
            "tok.json) and pass --tokenizer"
        )
    settings = _settings(
        inputs,
        given,
        vocab_size,
        val_fraction,
        val_max_bytes,
        tokenizer_max_bytes,
        text_field,
        pattern,
    )
    out = Path(out_dir)
    folder = out / f"part-{part[0]:05d}" if part else out
    for path in (out, folder):
        if path.exists() and not path.is_dir():
            raise DataError(f"{path} is a file; choose a folder for the prepared data")
    if part:
        _check_parts_folder(out, merging=False)
    sources = None if folder.is_dir() else list_sources(inputs)  # an error before any mkdir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder):
            if (folder / "meta.json").is_file():
                meta = check_prepared(
                    folder,
                    inputs,
                    vocab_size,
                    tokenizer_path,
                    val_fraction,
                    val_max_bytes,
                    tokenizer_max_bytes,
                    text_field,
                    settings["pattern"],
                )
                if verbose:
                    print(f"{folder} is already prepared with these settings", file=sys.stderr)
                return meta
            sources = sources or list_sources(inputs)
            settings["sources"] = input_fingerprint(sources)
            return _prepare(
                folder,
                inputs,
                sources,
                given,
                settings,
                tokenizer_memory_budget,
                num_workers,
                part,
                verbose,
            )
    except OSError as error:
        raise DataError(
            f"cannot write to {folder} ({error.strerror or error}); fix that (e.g. "
            f"free some space) and run the same command again to resume"
        ) from None


def _prepare(
    folder, inputs, sources, given, settings, memory_budget, num_workers, part, verbose
) -> dict:
    """prepare's work in the locked folder: claim it, get the tokenizer, encode, write meta.json."""
    share = val_share(sources, settings["val_fraction"], settings["val_max_bytes"])
    mine = part_sources(sources, *part) if part else sources
    manifest = _claim(folder, {**settings, "part": list(part) if part else None})
    tokenizer = _tokenizer(
        folder, manifest, given, sources, share, settings, memory_budget, verbose
    )
    splits, counts = _encode(
        folder, manifest, tokenizer, mine, share, settings["text_field"], num_workers, verbose
    )
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "dtype": splits.pop("dtype"),
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "settings": {**settings, "input_paths": [os.path.abspath(p) for p in inputs]},
        "skipped": counts,
        "splits": splits,
        **({"part": list(part)} if part else {}),
    }
    if not part:
        _check_splits(splits, inputs, sources, share)
    files.write_atomic(folder / "meta.json", json.dumps(meta, indent=1))
    (folder / MANIFEST).unlink()
    files.fsync(folder)
    return meta


def _check_splits(splits: dict, inputs, sources=None, share=None):
    """An empty split is an error that says what would fill it."""
    for split, info in splits.items():
        if info["tokens"]:
            continue
        where = ", ".join(map(str, inputs))
        documents = sum(s["documents"] for s in splits.values())
        one_unit = (
            sources is not None
            and documents <= 1
            and all(
                s.format is not corpus.TEXT or corpus.text_layout(s, share).whole for s in sources
            )
        )
        if one_unit:
            needed = math.ceil(corpus.MIN_BLOCK / share)
            raise DataError(
                f"the {split} split of {where} is empty: its text is a single unit (a text "
                f"file of less than {needed:,} bytes, too small to hold a val run, or a record), "
                f"which goes whole to one split; add text, {needed:,} bytes or more"
            )
        change = "raise val_fraction" if split == "val" else "lower val_fraction"
        raise DataError(f"the {split} split of {where} is empty; add text or {change}")


def _tokenizer(
    folder, manifest, given, sources, share, settings, memory_budget, verbose
) -> Tokenizer:
    """The given tokenizer, the one trained before an interruption, or a new one trained on a
    sample of the train split (tokenizer_max_bytes, spread over the corpus: sample_texts)."""
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
            print(
                f"training a {vocab_size}-token tokenizer on a sample of the train split",
                file=sys.stderr,
            )
        texts = sample_texts(sources, share, settings["text_field"], max_bytes, verbose)
        with contextlib.closing(texts):
            try:
                tokenizer = bpe_train.train_tokenizer(
                    texts,
                    vocab_size,
                    pattern=settings["pattern"],
                    max_bytes=max_bytes,
                    memory_budget=memory_budget,
                    verbose=verbose,
                )
            except UserError as error:
                raise DataError(str(error)) from None
    tokenizer.save(path)  # atomically and durably, before the manifest counts it
    manifest["tokenizer_fingerprint"] = tokenizer.fingerprint()
    files.write_atomic(folder / MANIFEST, json.dumps(manifest))
    return tokenizer


def _encode(
    folder, manifest, tokenizer, sources, share, text_field, num_workers, verbose
) -> tuple[dict, dict]:
    """Encode the documents into the shards, from the last checkpoint; return the splits' info
    and the counts of what was skipped."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    skipped = {"binary_files": 0, "bad_records": 0, "invalid_utf8_bytes": 0, "margin_bytes": 0}
    checkpoint = manifest["checkpoint"] or {"position": [0, 0, 0], "splits": {}, "skipped": skipped}
    writers = {
        split: _ShardWriter(folder, split, dtype, checkpoint["splits"].get(split))
        for split in SPLITS
    }
    counts, position = dict(checkpoint["skipped"]), tuple(checkpoint["position"])
    total = sum(s.size for s in sources)
    progress = Progress("encoding", total, sum(s.size for s in sources[: position[0]]), verbose)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    workers = num_workers or os.cpu_count() or 1
    # Later pieces of a document are encoded as continuations: it gets the ids of its whole.
    documents = read_documents(
        sources, share, text_field, position, counts, cuts=cut_points(tokenizer)
    )
    pieces, texts = itertools.tee(documents)
    flagged = ((piece.text, not piece.begins) for piece in texts)
    saved = time.monotonic()
    try:
        ids = encode_stream(tokenizer, flagged, workers, allowed_special=None)
        with contextlib.closing(ids):
            for piece, piece_ids in zip(pieces, ids):
                writers[piece.split].add(
                    piece_ids,
                    piece.nbytes,
                    bos if piece.begins else None,
                    eos if piece.ends else None,
                )
                if piece.resume and time.monotonic() - saved >= CHECKPOINT_SECONDS:
                    states = {split: writer.sync() for split, writer in writers.items()}
                    manifest["checkpoint"] = {
                        "position": list(piece.resume),
                        "skipped": dict(counts),
                        "splits": states,
                    }
                    files.write_atomic(folder / MANIFEST, json.dumps(manifest))
                    saved = time.monotonic()
                progress.update(piece.raw_done)
    except BrokenProcessPool as error:
        raise DataError(
            f"{error}; the work up to the last checkpoint is kept: run the same "
            f"command again to resume"
        ) from None
    progress.update(total, final=True)
    splits = {split: writer.close() for split, writer in writers.items()}
    return {"dtype": np.dtype(dtype).name, **splits}, counts


# ---------------------------------------------------------------------- parts


def merge_parts(out_dir, verbose: bool = True) -> dict:
    """Write out_dir/meta.json (and tokenizer.json) over the finished parts out_dir/part-*; the
    shards stay in the parts' folders."""
    out = Path(out_dir)
    if not out.is_dir():
        raise DataError(f"no parts (part-00000, ...) in {out}; prepare them with --part I/N first")
    _check_parts_folder(out, merging=True)
    with _locked(out):
        return _merge(out, verbose)


def _merge(out: Path, verbose: bool) -> dict:
    folders = sorted(p for p in out.glob("part-*") if PART.fullmatch(p.name) and p.is_dir())
    if not folders:
        raise DataError(f"no parts (part-00000, ...) in {out}; prepare them with --part I/N first")
    for folder in folders:
        if not (folder / "meta.json").is_file():
            raise DataError(f"{folder} is not finished; run its --part command again to resume it")
    metas = [read_meta(folder) for folder in folders]
    count = metas[0]["part"][1]
    missing = sorted(set(range(count)) - {m["part"][0] for m in metas})
    if missing or len(metas) != count:
        raise DataError(
            f"{out} should hold parts 0..{count - 1} of {count}; missing: "
            f"{missing or 'none'}, found: {', '.join(f.name for f in folders)}; "
            f"prepare the missing ones with --part I/{count}"
        )
    first, fingerprint = metas[0]["settings"], metas[0]["tokenizer_fingerprint"]
    for folder, meta in zip(folders, metas):
        if meta["part"][1] != count:
            difference = ("the part count",)
        else:
            difference = _mismatch(first, meta["settings"], fingerprint)
        if difference and difference[0] == "sources":
            raise DataError(
                f"{folder} and {folders[0]} were prepared from different input files "
                f"(they changed between the two: added, removed or modified); "
                f"prepare every part again from the same files"
            )
        if difference:
            raise DataError(
                f"{folder} was prepared with other settings than {folders[0]} "
                f"({difference[0]}); prepare all parts with the same command"
            )
    _check_merged_tokenizer(out, folders[0], fingerprint)
    splits = {}
    for split in SPLITS:
        shards = [
            {"path": f"{folder.name}/{s['path']}", "tokens": s["tokens"]}
            for folder, meta in zip(folders, metas)
            for s in meta["splits"][split]["shards"]
        ]
        sums = {
            key: sum(m["splits"][split][key] for m in metas)
            for key in ("tokens", "bytes", "documents")
        }
        splits[split] = {"shards": shards, **sums}
    _check_splits(splits, first["inputs"])
    skipped = {key: sum(m["skipped"][key] for m in metas) for key in metas[0]["skipped"]}
    meta = {
        **{k: v for k, v in metas[0].items() if k != "part"},
        "parts": count,
        "skipped": skipped,
        "splits": splits,
    }
    tmp = out / (TOKENIZER_FILE + ".tmp")
    shutil.copyfile(folders[0] / TOKENIZER_FILE, tmp)
    files.replace(tmp, out / TOKENIZER_FILE)
    files.write_atomic(out / "meta.json", json.dumps(meta, indent=1))
    if verbose:
        print(f"merged {count} parts into {out}", file=sys.stderr)
    return meta


def _check_merged_tokenizer(out: Path, first_part: Path, fingerprint: str):
    """A tokenizer.json in out that a merge did not write stays: merging would replace it."""
    path = out / TOKENIZER_FILE
    if not path.is_file() or (out / "meta.json").is_file():  # none, or an earlier merge's
        return
    try:
        same = load_tokenizer(path).fingerprint() == fingerprint
    except UserError:
        same = False
    if not same:
        raise DataError(
            f"{path} is not the tokenizer of the parts ({first_part / TOKENIZER_FILE}) "
            f"and merging would replace it; move it elsewhere first"
        )


# ---------------------------------------------------------------------- the command


def _part(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not int(match[1]) < int(match[2]):
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(match[1]), int(match[2])


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m infra.prepare",
        description="Tokenize a corpus into train/val token shards.",
    )
    parser.add_argument(
        "--input", nargs="+", help="text files, folders, .jsonl, .parquet, .gz, .zst files"
    )
    parser.add_argument(
        "--out", help="folder for the shards, tokenizer.json and meta.json (new or empty)"
    )
    parser.add_argument(
        "--vocab-size", type=int, help="train a tokenizer of this size on the train split"
    )
    parser.add_argument("--tokenizer", help="use this tokenizer file instead of training one")
    parser.add_argument(
        "--pattern",
        default=GPT4_SPLIT_PATTERN,
        help="the regex that splits text before merging, for the tokenizer trained here "
        "(default: GPT-4's, tokenizer.py GPT4_SPLIT_PATTERN)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULTS.val_fraction,
        help="share of documents held out for val",
    )
    parser.add_argument(
        "--val-max-bytes",
        type=int,
        default=DEFAULTS.val_max_bytes,
        help="at most this much input held out",
    )
    parser.add_argument(
        "--text-field",
        default=DEFAULTS.text_field,
        help="the field (.jsonl) or column (.parquet) with the text",
    )
    parser.add_argument(
        "--tokenizer-max-bytes",
        type=int,
        default=DEFAULTS.tokenizer_max_bytes,
        help="tokenizer sample size",
    )
    parser.add_argument(
        "--tokenizer-memory-budget",
        type=parse_size,
        metavar="SIZE",
        help="memory that tokenizer training may use, e.g. 512M or 8G "
        f"(default {bpe_train.DEFAULT_MEMORY_BUDGET >> 30}G)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="encoding processes (default: one per CPU)"
    )
    parser.add_argument(
        "--part",
        type=_part,
        help="prepare only slice I of N of the files "
        "(I in 0..N-1), into OUT/part-0000I; "
        "needs --tokenizer",
    )
    parser.add_argument(
        "--merge", metavar="DIR", help="write DIR/meta.json over the finished parts in DIR"
    )
    args = parser.parse_args(argv)
    if not args.merge:
        if not args.input or not args.out:
            parser.error("give --input and --out (or --merge DIR)")
        if not args.vocab_size and not args.tokenizer:
            parser.error("give --vocab-size N to train a tokenizer, or --tokenizer PATH")
    start = time.time()
    try:
        if args.merge:
            meta = merge_parts(args.merge)
        else:
            if args.tokenizer and args.vocab_size:
                size = _load_tokenizer(args.tokenizer).vocab_size
                if size != args.vocab_size:
                    raise DataError(
                        f"--vocab-size {args.vocab_size} differs from the {size} "
                        f"tokens of {args.tokenizer}; leave --vocab-size out to use "
                        f"that tokenizer"
                    )
            meta = prepare(
                args.input,
                args.out,
                args.vocab_size,
                args.tokenizer,
                args.val_fraction,
                args.tokenizer_max_bytes,
                args.workers,
                val_max_bytes=args.val_max_bytes,
                text_field=args.text_field,
                tokenizer_memory_budget=args.tokenizer_memory_budget,
                part=args.part,
                pattern=args.pattern,
            )
    except (UserError, OSError) as error:
        Progress.end_line()
        sys.exit(f"error: {error_line(error)}")
    seconds = time.time() - start
    for split, info in meta["splits"].items():
        print(
            f"{split}: {info['tokens']:,} tokens, {info['bytes']:,} bytes, "
            f"{info['documents']:,} documents, "
            f"{info['bytes'] / max(info['tokens'], 1):.2f} bytes/token"
        )
    if not args.merge:
        total_bytes = sum(s["bytes"] for s in meta["splits"].values())
        print(
            f"prepared {total_bytes / 1e6:.1f} MB in {seconds:.1f}s "
            f"({total_bytes / 1e6 / seconds:.2f} MB/s)"
        )


if __name__ == "__main__":
    sys.exit(main())
