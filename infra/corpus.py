"""Reading a corpus: files, folders and formats -> documents in bounded pieces, and the
tokenizer's sample.

Inputs are files and folders. A folder is walked in sorted order, following symlinked subfolders
(each real folder once, so link cycles end) and skipping hidden names (.git, .cache); what is
neither a file nor a folder (a FIFO, a socket, a broken link) is skipped with a warning. Formats
go by name, through the registry FORMATS at the end of this file: `.jsonl` is one JSON
object per line with the text in `text_field`, `.parquet` a string column `text_field` (needs
pyarrow), anything else UTF-8 text; `.gz` and `.zst` (needs zstandard) may wrap any of them, and a
file cut off inside its compressed data is an error. A file whose first 8 KB hold a NUL byte is
binary: skipped with a warning in a folder, an error when named. Bytes that are not UTF-8 become
U+FFFD with a warning, and are an error above 1% of a file. Bad records (not an object, no string
field, a lone surrogate escape such as "\\ud83d") are skipped with a `path:line` warning, and are
an error above 1% of a file.

Units. A record is a document. A text file is cut into blocks on a grid of B bytes of its text (B
grows with the text from 4 KB to 256 KB): block c runs from cut(c) to cut(c + 1), cut(c) being
the first safe cut point in bytes [c*B, (c+1)*B), a line start if there is one. The grid makes any
block findable by seeking, so the tokenizer's sample and the sequential reader agree on every
block. Consecutive blocks of the same split form one document.

Safe cut points. The GPT-4 split pattern never makes a piece across (1) a newline followed by a
non-space character, (2) a non-space character followed by a space that is not a line end, or
(3) a letter followed by punctuation or a symbol; and it has no look-behind. So text encoded in
parts cut there gives exactly the tokens of the whole (tests/test_corpus.py checks it on generated
text). Only where a whole window holds none of these (a long run of letters, e.g. Chinese without
punctuation, or a base64 blob) is the cut made at a character boundary, and the tokens of the one
piece straddling it may differ. Records longer than MAX_PIECE_CHARS are cut the same way, so the
pieces sent to the encoder stay bounded; a record itself must fit in memory once (as one line).

Other tokenizers. infra/fast_encode.py says where a tokenizer may be cut (cut_points), and
read_documents re-cuts the pieces accordingly (`recut`): tokenizers with GPT-4's or Llama 3's
pattern keep the cut points above; SentencePiece-style ones allow only line starts, so a
document's pieces are joined where they meet elsewhere and cut at their last line start once
MAX_PIECE_CHARS are held (memory then grows with the longest line); a tokenizer that allows no cut
gets each document as one piece, and memory grows with the largest document (a warning past
HUGE_DOCUMENT_CHARS). The blocks and the val split never depend on the tokenizer, only how a
document is cut into pieces: so the reader and the tokenizer's sample agree on every block, and
any two tokenizers' val splits hold the same text.

Val split. Val must measure how the model does on text it has not seen, nor seen the
surroundings of. So a unit of the split is a whole document, and membership is a function of the
content alone: the same corpus renamed, compressed with gzip or zstd, split into other files or
prepared in `--part`s gets the same split.
- A record goes to val when a hash of its text is below the share (identical records go to the
  same split).
- A text file is one document (a book, say) or many. Where its expected val share is less than
  one block, the whole file goes to val when a hash of its first CONTENT_HEAD bytes is below the
  share. Otherwise it is held out in runs of contiguous blocks, picked systematically (one run
  in every 1/share runs, from that hash as the phase), a run long enough that the file holds
  about HELD_OUT_RUNS of them: few, long stretches of a book rather than many paragraphs among
  training text. The block on each side of a run is a margin in neither split, so no val text has
  training text within a block (4 KB or more; a scene of a play, a model's whole context) of it.
  Runs of one block (a file too small for longer runs at its share) have no margin: it would
  cost twice the val share of the text.
The share is val_fraction, less where val_max_bytes of text would be passed, counted in text
bytes (decompressed) so that compression does not change it.
"""

import functools
import gzip
import hashlib
import heapq
import io
import json
import math
import os
import re
import sys
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import regex

from data import DataError
from infra.progress import Progress, warn

SNIFF_BYTES = 8192  # a NUL byte in this many leading bytes marks a binary file
MIN_BLOCK, MAX_BLOCK = 1 << 12, 1 << 18
BLOCKS_PER_FILE = 128  # block size = file size / this, within [MIN_BLOCK, MAX_BLOCK]
MAX_PIECE_CHARS = 1 << 18  # longer records are cut into pieces of at most this many characters
HUGE_DOCUMENT_CHARS = 1 << 26  # a warning when a tokenizer allows no cut in more than this
VAL_SPLIT = "content, runs with margins"  # the rule below, recorded in each prepared folder
HELD_OUT_RUNS = 2  # a text file's val split is about this many runs of blocks (see Val split)
CONTENT_HEAD = 1 << 16  # a text file's val split is hashed from this many first bytes of it
MAX_BAD_SHARE = 0.01  # bad records or non-UTF-8 bytes above this share of a file: an error
MAX_SAMPLE_STRIDE = 16  # stream-order files give the sample at least one unit in this many
COMPRESSION = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}
FORMAT_NAMES = "text files, folders, .jsonl, .parquet, .gz or .zst files"

LINE_START = regex.compile(r"(?<=\n)(?=\S)")
WORD_CUT = regex.compile(r"(?<=\S)(?=[^\S\r\n])|(?<=\p{L})(?=[^\s\p{L}\p{N}])")
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, decoded with surrogateescape
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates from JSON escapes: not encodable text


# ---------------------------------------------------------------------- files


class Source(NamedTuple):
    """One input file. `key` (its path inside the input given) seeds its val split; `named`:
    given by name rather than found in a folder."""

    path: Path
    key: str
    size: int
    named: bool

    @property
    def compression(self) -> str | None:
        return COMPRESSION.get(self.path.suffix.lower())

    @property
    def format(self) -> "Format":
        suffixes = [s.lower() for s in self.path.suffixes]
        if suffixes and suffixes[-1] in COMPRESSION:
            suffixes.pop()
        return FORMATS.get(suffixes[-1] if suffixes else "", TEXT)

    @property
    def seekable(self) -> bool:
        return self.compression is None and self.format.byte_stream


def list_sources(paths) -> list[Source]:
    """Expand files and folders into the files to read, in input order and sorted in folders."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    sources, seen = [], set()
    for given in map(Path, paths):
        if given.is_dir():
            found = _walk(given)
        elif given.is_file():
            found = [(given, given.name)]
        elif given.exists():
            raise DataError(
                f"input {given} is not a regular file or a folder (a FIFO, a socket or "
                f"a device); pass {FORMAT_NAMES}"
            )
        else:
            raise DataError(f"input {given} does not exist; pass {FORMAT_NAMES}")
        for path, key in found:
            stat = path.stat()
            if (stat.st_dev, stat.st_ino) in seen:  # the same file reached through a link
                continue
            seen.add((stat.st_dev, stat.st_ino))
            source = Source(path, key, stat.st_size, named=path == given)
            if source.named and is_binary(source):
                raise DataError(f"{path} is a binary file, not text; pass {FORMAT_NAMES}")
            sources.append(source)
    if not sources:
        raise DataError(f"no input files found in {', '.join(map(str, paths))}")
    return sources


def _walk(root: Path) -> list[tuple[Path, str]]:
    """Files under root, depth first in name order, following links to folders once each."""
    found, visited, stack = [], set(), [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        stat = folder.stat()
        if (stat.st_dev, stat.st_ino) in visited:
            continue
        visited.add((stat.st_dev, stat.st_ino))
        subfolders = []
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            raise DataError(f"cannot read the folder {folder} ({error.strerror})") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                subfolders.append((Path(entry.path), prefix + entry.name + "/"))
            elif entry.is_file():
                found.append((Path(entry.path), prefix + entry.name))
            elif not os.path.exists(entry.path):
                warn(f"{entry.path} is a broken link; skipped")
            else:
                warn(f"{entry.path} is not a regular file (a FIFO, a socket or a device); skipped")
        stack.extend(reversed(subfolders))
    found.sort(key=lambda item: item[1].split("/"))
    return found


def _require(module: str, package: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise DataError(
            f"reading {what} files needs the {package} package: pip install {package}"
        ) from None


class _ZstdStream(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame. A file that ends inside a frame
    (cut off) raises EOFError, as gzip does, instead of ending quietly where the data stops."""

    def __init__(self, raw, zstandard):
        self.raw, self.new_frame = raw, zstandard.ZstdDecompressor().decompressobj
        self.frame, self.in_frame = self.new_frame(), False
        self.out, self.at = b"", 0  # decompressed bytes not read yet: out[at:]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.at == len(self.out):
            chunk = self.raw.read(1 << 14)
            if not chunk:
                if self.in_frame:
                    raise EOFError(
                        "Compressed file ended before the end-of-stream marker was reached"
                    )
                return 0
            self.out, self.at = self._decompress(chunk), 0
        n = min(len(buffer), len(self.out) - self.at)
        buffer[:n] = self.out[self.at : self.at + n]
        self.at += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        parts = []
        while chunk:
            self.in_frame = True
            parts.append(self.frame.decompress(chunk))
            if not self.frame.eof:
                break
            chunk, self.frame, self.in_frame = self.frame.unused_data, self.new_frame(), False
        return b"".join(parts)


def _open(source: Source):
    """(file on disk, its decompressed byte stream)."""
    raw = open(source.path, "rb")
    if source.compression == "gz":
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    if source.compression == "zst":
        zstandard = _require("zstandard", "zstandard", ".zst")
        return raw, io.BufferedReader(_ZstdStream(raw, zstandard))
    return raw, raw


def _read_errors() -> tuple:
    zstandard = sys.modules.get("zstandard")
    return (OSError, EOFError) + ((zstandard.ZstdError,) if zstandard else ())


def is_binary(source: Source) -> bool:
    if not source.format.byte_stream:
        return False
    raw, stream = _open(source)
    try:
        with raw:
            return b"\0" in stream.read(SNIFF_BYTES)
    except _read_errors() as error:
        raise DataError(f"{source.path}: cannot read it ({error})") from None


def _decode(data: bytes) -> tuple[str, int]:
    """UTF-8 text with U+FFFD for each byte that is not UTF-8, and the count of those bytes."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        return _ESCAPED.subn("\ufffd", data.decode("utf-8", "surrogateescape"))


def _phase(key: str) -> float:
    return _content_hash(key.encode("utf-8"))


def _picked(index: int, share: float, phase: float) -> bool:
    """Systematic sampling: exactly one index in every 1/share, from a phase."""
    return math.floor((index + 1) * share + phase) > math.floor(index * share + phase)


def _content_hash(data: bytes) -> float:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") / 2**64


def val_share(sources: list[Source], val_fraction: float, val_max_bytes: int | None) -> float:
    """The share of units held out: val_fraction, less if that would pass val_max_bytes of text.
    Compressed files are decompressed once to count their text only where the estimate says the
    limit may matter."""
    if not val_max_bytes:
        return val_fraction
    if sum(_content_size(s) for s in sources) * val_fraction <= val_max_bytes / 2:
        return val_fraction
    total = sum(text_bytes(s) for s in sources)
    return min(val_fraction, val_max_bytes / max(total, 1))


@functools.lru_cache(maxsize=4096)
def _text_bytes(source: Source, mtime_ns: int) -> int:
    if source.format.text_size:
        return source.format.text_size(source) or source.size
    if source.compression is None:
        return source.size
    raw, stream = _open(source)
    total = 0
    try:
        with raw:
            while chunk := stream.read(1 << 20):
                total += len(chunk)
    except _read_errors() as error:
        raise DataError(f"{source.path}: cannot read it ({error})") from None
    return total


def text_bytes(source: Source) -> int:
    """Bytes of text in a file: its size, or its decompressed size (read once to count it)."""
    return _text_bytes(source, source.path.stat().st_mtime_ns)


class TextLayout(NamedTuple):
    """Where a text file's val split lies (see Val split): blocks of `block` bytes; `whole`: the
    file is one unit, in val if `phase` < `share`; else runs of `run` blocks, one in 1/share."""

    block: int
    run: int
    phase: float
    share: float
    whole: bool

    def split(self, index: int) -> str | None:
        """The split of block `index`: train, val, or None for a margin block beside a val run."""
        if self.whole:
            return "val" if self.phase < self.share else "train"
        if self._val(index):
            return "val"
        beside_val = self._val(index - 1) or self._val(index + 1)
        return None if beside_val and self.run > 1 else "train"

    def _val(self, index: int) -> bool:
        return index >= 0 and _picked(index // self.run, self.share, self.phase)


@functools.lru_cache(maxsize=4096)
def _head_hash(source: Source, mtime_ns: int) -> float:
    raw, stream = _open(source)
    try:
        with raw:
            return _content_hash(stream.read(CONTENT_HEAD))
    except _read_errors() as error:
        raise DataError(f"{source.path}: cannot read it ({error})") from None


def text_layout(source: Source, share: float) -> TextLayout:
    """The block grid and val split of a text file, from its text alone."""
    block, phase = block_size(source), _head_hash(source, source.path.stat().st_mtime_ns)
    expected_val_blocks = -(-text_bytes(source) // block) * share
    run = max(1, int(expected_val_blocks // HELD_OUT_RUNS))
    return TextLayout(block, run, phase, share, whole=expected_val_blocks < 1)


# ---------------------------------------------------------------------- cutting text


def block_size(source: Source) -> int:
    """The grid of a text file's blocks (on its text: a compressed one is counted once), or of a
    plain JSONL file's sample cells."""
    size = text_bytes(source) if source.format is TEXT else source.size
    return min(MAX_BLOCK, max(MIN_BLOCK, size // BLOCKS_PER_FILE))


def _char_start(data, i: int, end: int) -> int:
    """i, moved forward out of a UTF-8 character (at most 3 bytes, not past end)."""
    for _ in range(3):
        if i < end and 0x80 <= data[i] < 0xC0:
            i += 1
    return i


def _find_cut(data, i: int, end: int) -> int:
    """First safe cut point in data[i:end] (an index into data), preferring a line start; i moved to
    a character start when there is none. data holds whole characters before i, and after end
    unless it ends there."""
    i = _char_start(data, i, end)
    newline = data.find(b"\n", max(i - 1, 0), end - 1)
    while newline >= 0:  # LINE_START, found on the bytes
        after = data[newline + 1]
        if (
            after < 0x80
            and after not in b" \t\n\r\x0b\x0c"
            or after >= 0x80
            and not regex.match(
                r"\s", bytes(data[newline + 1 : newline + 5]).decode("utf-8", "surrogateescape")
            )
        ):
            return newline + 1
        newline = data.find(b"\n", newline + 1, end - 1)
    back = i - 1
    while back > 0 and i - back < 4 and 0x80 <= data[back] < 0xC0:
        back -= 1
    back = max(back, 0)
    lead = len(bytes(data[back:i]).decode("utf-8", "surrogateescape"))
    # a match in a short window is the first one in the long one too
    for stop in (min(end, i + 4096), end):
        while i < stop < len(data) and 0x80 <= data[stop] < 0xC0:
            stop -= 1
        text = bytes(data[back:stop]).decode("utf-8", "surrogateescape")
        if match := WORD_CUT.search(text, lead):
            return i + len(text[lead : match.start()].encode("utf-8", "surrogateescape"))
    return i


def cut_text(text: str, limit: int | None = None) -> Iterator[str]:
    """text in pieces of limit/2..limit characters (MAX_PIECE_CHARS), cut at safe cut points
    where there are some."""
    start, limit = 0, limit or MAX_PIECE_CHARS
    while len(text) - start > limit:
        low, high = start + limit // 2, start + limit
        match = LINE_START.search(text, low, high) or WORD_CUT.search(text, low, high)
        cut = match.start() if match else high
        yield text[start:cut]
        start = cut
    yield text[start:]


def _stream_blocks(stream, block: int, offset: int = 0, index: int = 0):
    """Yield (index, bytes, is_last) of the blocks of a text stream, from block `index` at
    `offset`. The buffer holds at most about three blocks, and each byte is copied a bounded
    number of times."""
    buffer, start, eof = bytearray(), offset, False  # buffer[0] is at file offset `start`
    while True:
        grid = (index + 1) * block
        # 4: the character at the window's end
        while not eof and len(buffer) < grid + block + 4 - start:
            chunk = stream.read(max(grid + block + 4 - start - len(buffer), 1 << 16))
            eof = not chunk
            buffer += chunk
        if eof and grid >= start + len(buffer):
            end = len(buffer)
        else:
            window_end = min(len(buffer), grid + block - start)
            end = min(_find_cut(buffer, grid - start, window_end), len(buffer))
        last = eof and end == len(buffer)
        if end:
            yield index, bytes(buffer[:end]), last
        if last:
            return
        del buffer[:end]
        start, index = start + end, index + 1


def read_block(source: Source, index: int) -> bytes:
    """Block `index` of a plain text file, found by seeking: the bytes the sequential reader
    gives."""
    block = block_size(source)
    base = max(0, index * block - 4)
    with open(source.path, "rb") as f:
        f.seek(base)
        data = f.read((index + 2) * block + 4 - base)
    window_end = min(len(data), (index + 1) * block - base)
    start = 0 if index == 0 else _find_cut(data, index * block - base, window_end)
    grid = (index + 1) * block - base
    end = len(data) if grid >= len(data) else _find_cut(data, grid, min(len(data), grid + block))
    return data[start : min(end, len(data))]


# ---------------------------------------------------------------------- documents


class Piece(NamedTuple):
    """A bounded piece of a document. resume, on the last piece of a unit: (file, offset, unit) to
    resume reading after it. raw_done: bytes on disk of the inputs read so far (compressed bytes
    for compressed files)."""

    text: str
    nbytes: int  # UTF-8 bytes of text
    split: str  # "train" or "val"
    begins: bool  # the first piece of a document
    ends: bool  # the last piece of a document
    resume: tuple | None
    raw_done: int


class _FileReport:
    """Counts a file's bad records and non-UTF-8 bytes; warns, and raises above MAX_BAD_SHARE."""

    def __init__(self, source: Source, counts: dict | None, quiet: bool):
        self.source, self.counts, self.quiet = source, counts, quiet
        self.records = self.bad = self.invalid = self.decoded = self.margin = 0
        self.first_bad = ""

    def bad_record(self, where: str, why: str):
        self.bad += 1
        self.first_bad = self.first_bad or f"{where}: {why}"
        if not self.quiet and self.bad <= 3:
            warn(f"{where}: {why}; skipped")

    def decoded_bytes(self, nbytes: int, invalid: int):
        self.decoded += nbytes
        self.invalid += invalid
        if self.invalid > MAX_BAD_SHARE * self.source.size and self.source.compression is None:
            self._not_utf8()

    def _not_utf8(self):
        if not self.quiet:
            raise DataError(
                f"{self.source.path} is not UTF-8 text ({self.invalid:,} bytes are "
                f"not valid UTF-8); convert it (e.g. iconv -f latin1 -t utf-8) or "
                f"remove it"
            )

    def close(self):
        path, bad, records = self.source.path, self.bad, self.records
        if self.counts is not None:
            self.counts["bad_records"] += bad
            self.counts["invalid_utf8_bytes"] += self.invalid
            self.counts["margin_bytes"] += self.margin
        if self.invalid > MAX_BAD_SHARE * max(self.decoded, 1):
            self._not_utf8()
        if bad > MAX_BAD_SHARE * records and (bad >= 10 or bad == records) and not self.quiet:
            raise DataError(
                f"{path}: {bad:,} of {records:,} records are bad (first: "
                f"{self.first_bad}); fix the file, or check the text field name "
                f"(--text-field)"
            )
        if self.quiet:
            return
        if bad:
            warn(f"{path}: skipped {bad:,} bad record(s) of {records:,}")
        if self.invalid:
            warn(f"{path}: {self.invalid:,} bytes are not valid UTF-8 and were replaced by U+FFFD")


def _record_text(line: bytes, field: str, report: _FileReport, where: str) -> str | None:
    """The text of one JSONL line, or None (blank line, bad record)."""
    text, invalid = _decode(line)
    report.decoded_bytes(len(line), invalid)
    text = text.lstrip("\ufeff")  # a byte order mark before the first record
    if not text.strip():
        return None
    report.records += 1
    try:
        record = json.loads(text)
    except ValueError:
        return report.bad_record(where, "not valid JSON")
    if not isinstance(record, dict):
        return report.bad_record(where, "not a JSON object")
    value = record.get(field)
    if not isinstance(value, str):
        if field in record:
            return report.bad_record(where, f'no text: "{field}" is {json.dumps(value)[:20]}')
        return report.bad_record(where, f'no "{field}" field')
    if "\\u" in text and _SURROGATE.search(value):
        return report.bad_record(where, "a lone surrogate escape (e.g. \\ud83d), which is not text")
    return value


def read_documents(
    sources: list[Source],
    share: float,
    text_field: str = "text",
    start=(0, 0, 0),
    counts: dict | None = None,
    quiet: bool = False,
    cuts="words",
) -> Iterator[Piece]:
    """Pieces of the documents of `sources` in order, each with its split, from `start` (a Piece's
    resume). counts, if given, accumulates binary_files, bad_records, invalid_utf8_bytes and
    margin_bytes (text beside val runs, in neither split).
    quiet: no warnings and no errors for bad records (the tokenizer's sample). cuts: where a
    document may be cut, fast_encode.cut_points(tokenizer): "words" (the safe cut points above),
    a regex, or None (see Other tokenizers)."""
    pieces = _read_documents(sources, share, text_field, start, counts, quiet)
    return pieces if cuts == "words" else recut(pieces, cuts)


def _read_documents(sources, share, text_field, start, counts, quiet):
    first, offset, unit = start
    done = sum(s.size for s in sources[:first])
    for index in range(first, len(sources)):
        source = sources[index]
        if index > first:
            offset = unit = 0
        if offset == unit == 0 and not source.named and is_binary(source):
            if counts is not None:
                counts["binary_files"] += 1
            if not quiet:
                warn(f"{source.path} is a binary file; skipped")
        else:
            report = _FileReport(source, counts, quiet)
            yield from _read_source(
                Reading(index, source, offset, unit, done), share, text_field, report
            )
            report.close()
        done += source.size


class Reading(NamedTuple):
    """A file being read: its index in the input list, where reading starts (an offset in its
    decompressed bytes and the count of its units before it), the input bytes before the file,
    and its streams (None for a format that reads the file by path): `raw`, the file on disk, and
    `stream`, its decompressed bytes from `offset`."""

    index: int
    source: Source
    offset: int
    unit: int
    done: int
    raw: io.BufferedReader | None = None
    stream: io.BufferedIOBase | None = None


def _read_source(file: Reading, share, text_field, report):
    form = file.source.format
    try:
        if not form.byte_stream:
            yield from form.pieces(file, share, text_field, report)
            return
        raw, stream = _open(file.source)
        with raw:
            if file.offset and file.source.seekable:
                raw.seek(file.offset)
            else:
                _skip(stream, file.offset)
            yield from form.pieces(file._replace(raw=raw, stream=stream), share, text_field, report)
    except _read_errors() as error:
        raise DataError(f"{file.source.path}: cannot read it ({error})") from None


def _skip(stream, count: int):
    while count > 0 and (chunk := stream.read(min(count, 1 << 20))):
        count -= len(chunk)


def _text_pieces(file: Reading, share, field, report):
    """A text file's blocks; consecutive blocks of one split form a document, and margin blocks
    (beside a val run) are left out."""
    source, offset, layout = file.source, file.offset, text_layout(file.source, share)
    for block, data, last in _stream_blocks(file.stream, layout.block, offset, file.unit):
        offset += len(data)
        text, invalid = _decode(data)
        report.decoded_bytes(len(data), invalid)
        split = layout.split(block)
        if split is None:
            report.margin += len(data)
            continue
        begins = block == 0 or layout.split(block - 1) != split
        ends = last or layout.split(block + 1) != split
        done = file.done + (file.raw.tell() if source.compression else offset)
        yield Piece(
            text,
            len(data) + 2 * invalid,
            split,
            begins,
            ends,
            (file.index, offset, block + 1),
            done,
        )


def _jsonl_pieces(file: Reading, share, field, report):
    """One document per line: a JSON object with the text in `field`."""
    offset, line_number = file.offset, file.unit
    for line in file.stream:
        line_number += 1
        offset += len(line)
        text = _record_text(line, field, report, f"{file.source.path}:{line_number}")
        if text:
            split = record_split(text, share)
            resume = (file.index, offset, line_number)
            yield from _document(text, split, resume, file.done + file.raw.tell())


def _parquet_pieces(file: Reading, share, field, report):
    """One document per row: the string column `field`."""
    source = file.source
    parquet = _require("pyarrow.parquet", "pyarrow", ".parquet")
    try:
        table = parquet.ParquetFile(source.path)
    except Exception as error:  # pyarrow raises its own types for a file that is not parquet
        raise DataError(f"{source.path}: not a readable parquet file ({error})") from None
    names = table.schema_arrow.names
    if field not in names:
        raise DataError(
            f"{source.path} has no column {field!r} (it has {', '.join(names)}); "
            f"choose one with --text-field"
        )
    rows, row = max(table.metadata.num_rows, 1), 0
    for batch in table.iter_batches(batch_size=1024, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if row <= file.unit:
                continue
            report.records += 1
            where = f"{source.path}: row {row}"
            if not isinstance(value, str):
                report.bad_record(where, f"{field} is {json.dumps(value)[:20]}")
            elif _SURROGATE.search(value):
                report.bad_record(where, "a lone surrogate, which is not text")
            elif value:
                split = record_split(value, share)
                done = file.done + source.size * row // rows
                yield from _document(value, split, (file.index, 0, row), done)


def record_split(text: str, share: float) -> str:
    """A record's split: val when a hash of its text is below the share."""
    return "val" if _content_hash(text.encode("utf-8")) < share else "train"


def _parquet_text_size(source: Source) -> int:
    meta = _require("pyarrow.parquet", "pyarrow", ".parquet").ParquetFile(source.path).metadata
    return sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))


def _document(text, split, resume, raw_done):
    pieces = list(cut_text(text)) if len(text) > MAX_PIECE_CHARS else [text]
    for k, piece in enumerate(pieces):
        last = k == len(pieces) - 1
        yield Piece(
            piece,
            len(piece.encode("utf-8")),
            split,
            k == 0,
            last,
            resume if last else None,
            raw_done,
        )


def recut(pieces: Iterator[Piece], cut, limit: int | None = None) -> Iterator[Piece]:
    """The pieces of documents cut again where a tokenizer allows. cut: a regex of the cut points
    that looks at one character either side (as tokenizer.SAFE_CUT), or None: there are none.
    Pieces are joined where they meet elsewhere than at a cut point; when more than `limit`
    (MAX_PIECE_CHARS) characters are held and the next piece does not begin at one, the held text
    is cut at its last cut point. A piece given out ends at a cut point or where its document
    ends, and keeps `resume` only if it ends where a piece read ends: reading resumes only there."""
    limit, warned = limit or MAX_PIECE_CHARS, False
    # the pieces of the document not given out yet; held[:searched] hold no cut point
    held, size, searched = [], 0, 0
    for piece in pieces:
        if held and cut and cut.match(held[-1].text[-1:] + piece.text[:1], 1):
            yield _joined(held)
            held, size, searched = [], 0, 0
        elif cut and size > limit:
            head, held = _cut_last(held, cut, searched)
            if head:
                yield head
                size = sum(len(p.text) for p in held)
            searched = len(held)
        held.append(piece)
        size += len(piece.text)
        if size > HUGE_DOCUMENT_CHARS and not warned:
            warned = True
            why = "a line that long" if cut else "it never cuts a document"
            warn(
                f"the tokenizer allows no cut in more than {HUGE_DOCUMENT_CHARS / 1e6:.0f}M "
                f"characters of a document ({why}); they are held in memory and encoded as one "
                f"text"
            )
        if piece.ends:
            yield _joined(held)
            held, size, searched = [], 0, 0


def _cut_last(held: list[Piece], cut, searched: int) -> tuple[Piece | None, list[Piece]]:
    """(the held text up to its last cut point as one piece, the rest), or (None, held) if
    held[searched:] has none. The points between held pieces are known not to be cut points."""
    for k in range(len(held) - 1, searched - 1, -1):
        text = held[k].text
        last = None
        for last in cut.finditer(text, 1):
            pass
        if last is not None:
            at = last.start()
            head_bytes = len(text[:at].encode("utf-8"))
            head = held[k]._replace(text=text[:at], nbytes=head_bytes, ends=False, resume=None)
            tail = held[k]._replace(
                text=text[at:], nbytes=held[k].nbytes - head_bytes, begins=False
            )
            return _joined(held[:k] + [head]), [tail] + held[k + 1 :]
    return None, held


def _joined(pieces: list[Piece]) -> Piece:
    """Consecutive pieces of one document as one piece."""
    if len(pieces) == 1:
        return pieces[0]
    last = pieces[-1]
    return last._replace(
        text="".join(p.text for p in pieces),
        nbytes=sum(p.nbytes for p in pieces),
        begins=pieces[0].begins,
    )


def iter_texts(paths, text_field: str = "text") -> Iterator[str]:
    """All the text of files, folders and records, in bounded pieces, in order (both splits)."""
    return (piece.text for piece in read_documents(list_sources(paths), 0.0, text_field))


# ---------------------------------------------------------------------- the tokenizer's sample


def _bit_reversed(n: int, j: int) -> tuple[int, int]:
    """The next index of range(n) in bit-reversed (van der Corput) order from position j, and the
    position after it; (-1, j) when done. Every prefix of this order is spread over range(n)."""
    bits = max(n - 1, 1).bit_length()
    while j < 1 << bits:
        index = int(format(j, f"0{bits}b")[::-1], 2)
        j += 1
        if index < n:
            return index, j
    return -1, j


def _sample_block(source, share, text_field, j) -> tuple[list[str] | None, int]:
    """The next block of a plain text file in bit-reversed order ([] for a val block)."""
    layout = text_layout(source, share)
    index, j = _bit_reversed(-(-source.size // layout.block), j)
    if index < 0:
        return None, j
    if layout.split(index) != "train":
        return [], j
    return [_decode(read_block(source, index))[0]], j


def _next_line_start(f, position: int, limit: int) -> int | None:
    """Offset of the first line start at or after `position` (> 0), or None past `limit`."""
    f.seek(position - 1)
    while position - 1 <= limit:
        chunk = f.read(1 << 16)
        if not chunk:
            return None
        newline = chunk.find(b"\n")
        if newline >= 0:
            return position + newline
        position += len(chunk)
    return None


def _sample_records(source, share, text_field, j) -> tuple[list[str] | None, int]:
    """The train records of cell `index` of a plain JSONL file: those whose line starts in it."""
    cell = block_size(source)
    index, j = _bit_reversed(-(-source.size // cell), j)
    if index < 0:
        return None, j
    texts, report = [], _FileReport(source, None, quiet=True)
    with open(source.path, "rb") as f:
        offset = 0 if index == 0 else _next_line_start(f, index * cell, (index + 1) * cell)
        if offset is None:
            return [], j
        f.seek(offset)
        while offset < (index + 1) * cell and (line := f.readline()):
            text = _record_text(line, text_field, report, "")
            if text and record_split(text, share) == "train":
                texts += cut_text(text)
            offset += len(line)
    return texts, j


def _content_size(source: Source) -> float:
    """Bytes of text in a file, estimated for compressed ones from their first 64 KB."""
    try:
        if source.format.text_size:
            return source.format.text_size(source) or source.size
        if source.compression is None:
            return source.size
        with open(source.path, "rb") as f:
            head = f.read(1 << 16)
        if source.compression == "gz":
            inflate = zlib.decompressobj(31)
            text = inflate.decompress(head, 1 << 24)
            used = len(head) - len(inflate.unconsumed_tail) - len(inflate.unused_data)
        else:
            zstandard = _require("zstandard", "zstandard", ".zst")
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(head))
            text, used = reader.read(1 << 24), len(head)
        return source.size * len(text) / max(used, 1)
    except Exception:  # a damaged file: reading it later says what is wrong
        return source.size


def sample_texts(
    sources: list[Source],
    share: float,
    text_field: str = "text",
    expected_bytes: int | None = None,
    verbose: bool = False,
    max_open: int = 32,
) -> Iterator[str]:
    """Train-split texts spread over the whole corpus, in an order of which every prefix is spread.

    Files are interleaved by stride scheduling: the next unit always comes from the file whose
    sampled bytes are the smallest fraction of its text (starting from a hashed phase), so at any
    point every file has given text in proportion to its size. Inside a plain file, blocks (text)
    or cells of lines (JSONL) come in bit-reversed order, which spreads every prefix over the file.
    Compressed and parquet files cannot seek: they give units in stream order, one in every
    `stride` (total / expected_bytes, at most MAX_SAMPLE_STRIDE), so when the sample is much
    smaller than the corpus theirs comes from their beginning; their text is estimated from their
    first 64 KB. The stream ends when every file is exhausted (the whole train split); a consumer
    that needs less stops it earlier.
    """
    total = sum(s.size for s in sources) or 1
    stride = max(1, min(MAX_SAMPLE_STRIDE, round(total / expected_bytes))) if expected_bytes else 1
    heap = [
        (_phase(s.key) * min(1.0, block_size(s) / s.size), i, 0, s.size)
        for i, s in enumerate(sources)
        if s.size
    ]
    heapq.heapify(heap)
    streams = OrderedDict()  # the open stream-order readers, least recently used first
    progress = Progress("tokenizer sample", min(expected_bytes or total, total), verbose=verbose)
    sampled = 0
    try:
        while heap:
            rank, i, position, size = heapq.heappop(heap)
            source = sources[i]
            if position == 0:
                if not source.named and is_binary(source):
                    continue
                size = _content_size(source)
            if source.seekable and source.format.sample:
                texts, position = source.format.sample(source, share, text_field, position)
            else:
                texts, position = _sample_stream(
                    source, i, share, text_field, stride, position, streams, max_open
                )
            if texts is None:
                continue
            nbytes = 0
            for text in texts:
                nbytes += len(text.encode("utf-8"))
                yield text
            sampled += nbytes
            progress.update(sampled)
            heapq.heappush(heap, (rank + nbytes / size, i, position, size))
    finally:
        for reader in streams.values():
            reader.close()
        progress.update(sampled, final=True)


def _sample_stream(source, i, share, text_field, stride, position, streams, max_open):
    """The next sampled unit of a stream-order file; position: 0 at first, then the resume of the
    last unit read."""
    if i in streams:
        streams.move_to_end(i)
    else:
        streams[i] = read_documents([source], share, text_field, position or (0, 0, 0), quiet=True)
        if len(streams) > max_open:
            streams.popitem(last=False)[1].close()
    texts, phase = [], int(_phase(source.key) * stride)
    for piece in streams[i]:
        texts.append(piece.text)
        if piece.resume:
            position = piece.resume
            if piece.split == "train" and (piece.resume[2] + phase) % stride == 0:
                return texts, position
            texts = []
    streams.pop(i).close()
    return None, position


# ---------------------------------------------------------------------- formats


class Format(NamedTuple):
    """How one kind of file is read.

    pieces(file: Reading, share, text_field, report): its documents' Pieces from file.offset and
    file.unit, the last piece of each unit with its resume point (file.index, offset, unit);
    split a document with _document. sample(source, share, text_field, j): the train texts of the
    j-th unit of a plain file in a spread order, found by seeking, and the next j (None: the
    sample reads it in stream order). byte_stream: read from its (decompressed) bytes, else by
    path. text_size(source): bytes of text in it, when that is not its size on disk."""

    pieces: Callable
    sample: Callable | None = None
    byte_stream: bool = True
    text_size: Callable | None = None


TEXT = Format(_text_pieces, _sample_block)  # a file of any other name
FORMATS = {  # by the file name's last suffix, after .gz or .zst
    ".jsonl": Format(_jsonl_pieces, _sample_records),
    ".ndjson": Format(_jsonl_pieces, _sample_records),
    ".parquet": Format(_parquet_pieces, byte_stream=False, text_size=_parquet_text_size),
}
