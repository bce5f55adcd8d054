"""Encoding fast, with the ids of tokenizer.py's Python encoder: tiktoken as the encoder of rank
BPE, a pool of worker processes for a corpus, a fast split for ASCII text, and the cut points at
which data preparation may encode a long document in parts.

What a split pattern allows is declared here, for each pattern by its text (not by a name), so a
tokenizer whose pattern differs gets none of it and stays correct: the cut points of
infra/corpus.py are proven for the patterns in WORD_CUT_PATTERNS (tests/test_corpus.py), and the
ASCII forms in ASCII_FORMS equal their patterns on ASCII text (tests/test_tokenizer.py).
"""

import os
import re
import threading
import time
from array import array
from collections import deque
from itertools import groupby

from infra.tokenizer_formats import LLAMA3_SPLIT_PATTERN
from infra.tokenizer_variants import ImportedTokenizer
from tokenizer import Tokenizer

GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)  # GPT-4's split pattern
# Patterns no piece of which runs from a newline into a following non-space character: text can
# be cut at SAFE_CUT and each part split on its own with the pieces of the whole.
WORD_CUT_PATTERNS = frozenset({GPT4_PATTERN, LLAMA3_SPLIT_PATTERN})
SAFE_CUT = re.compile(r"(?<=\n)(?=\S)")
# For pure-ASCII text, where \p{L}, \p{N} and \s reduce to plain classes, a pattern the stdlib `re`
# runs faster than `regex` runs the Unicode one.
_WS = r"\t\n\x0b\x0c\r "
ASCII_FORMS = {
    GPT4_PATTERN: (
        rf"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?+[A-Za-z]+|[0-9]{{1,3}}"""
        rf"""| ?[^{_WS}A-Za-z0-9]++[\r\n]*|[{_WS}]*[\r\n]|[{_WS}]+(?![^{_WS}])"""
        rf"""|[{_WS}]+"""
    )
}
CHUNK_CHARS = 1 << 18  # characters of text sent to a worker at a time
WORKER_CACHE_PIECES = 1 << 18  # workers start with the parent's piece cache up to this size


def splitter(pattern: str):
    """A function text -> pieces equal to Tokenizer(pattern).split: with the pattern's ASCII form,
    where it has one, on the ASCII lines of a text (cut at SAFE_CUT)."""
    split = Tokenizer(pattern, (), ()).split
    if pattern not in ASCII_FORMS or pattern not in WORD_CUT_PATTERNS:
        return split
    ascii_findall = re.compile(ASCII_FORMS[pattern]).findall

    def fast_split(text):
        if text.isascii():
            return ascii_findall(text)
        pieces = []
        for is_ascii, lines in groupby(SAFE_CUT.split(text), str.isascii):
            pieces += (ascii_findall if is_ascii else split)("".join(lines))
        return pieces

    return fast_split


def cut_points(tokenizer: Tokenizer):
    """Where data preparation may cut a long document into parts, encoded one by one (the later
    ones as continuations), and still get the ids of the whole document:
    "words": infra/corpus.py's cut points, for a tokenizer whose first pattern is one of
        WORD_CUT_PATTERNS and whose text no space marker rewrites;
    a regex: line starts, for SentencePiece-style tokenizers that allow them
        (ImportedTokenizer.line_start_cuts);
    None: nowhere, for every other tokenizer."""
    if not isinstance(tokenizer, ImportedTokenizer):
        return "words" if tokenizer.pattern in WORD_CUT_PATTERNS else None
    if (
        tokenizer.space_marker is None
        and tokenizer.patterns[:1]
        and tokenizer.patterns[0] in WORD_CUT_PATTERNS
    ):
        return "words"
    return tokenizer.line_start_cuts()


def accelerate(tokenizer: Tokenizer) -> Tokenizer:
    """Give a rank-BPE tokenizer tiktoken's encoder (the same ids, several times faster) where
    tiktoken is installed and compiles its pattern; returns the tokenizer. Text that the pattern
    does not match is a piece of its own in tokenizer.py, and dropped by tiktoken: hence the
    pattern's extra branch."""
    encoding = tiktoken_encoding(tokenizer)
    if encoding is not None:
        tokenizer.accelerator = encoding.encode_ordinary
    return tokenizer


def tiktoken_encoding(tokenizer: Tokenizer):
    """tiktoken's Encoding of a rank-BPE tokenizer, or None where there is none."""
    if tokenizer.mergeable_ranks is None or tokenizer.pattern is None:  # not rank BPE
        return None
    try:
        import tiktoken

        pattern = f"(?:{tokenizer.pattern})|(?s:(?!(?:{tokenizer.pattern})).)+"
        return tiktoken.Encoding(
            f"minillama-{id(tokenizer)}",
            pat_str=pattern,
            mergeable_ranks=tokenizer.mergeable_ranks,
            special_tokens={},
        )
    except Exception:  # not installed, or a pattern that its regex engine does not compile
        return None


def _encoder(tokenizer: Tokenizer, allowed_special):
    """(text, continuation) -> ids: encode (allowed_special None: encode_ordinary). Continuation
    matters only to tokenizers that may put a space in front of a text (ImportedTokenizer)."""
    if isinstance(tokenizer, ImportedTokenizer):
        if allowed_special is None:
            return tokenizer.encode_ordinary
        return lambda text, continuation: tokenizer.encode(text, allowed_special, continuation)
    if allowed_special is None:
        return lambda text, continuation: tokenizer.encode_ordinary(text)
    return lambda text, continuation: tokenizer.encode(text, allowed_special)


def encode_batch(tokenizer: Tokenizer, texts, num_workers=None, allowed_special="none") -> list:
    """tokenizer.encode() each text, spread over worker processes when the input is big enough
    to pay for starting them. allowed_special=None encodes with encode_ordinary."""
    texts = list(texts)
    if sum(map(len, texts)) < 1 << 20:
        num_workers = 1
    return [ids.tolist() for ids in encode_stream(tokenizer, texts, num_workers, allowed_special)]


def encode_stream(tokenizer: Tokenizer, texts, num_workers=None, allowed_special="none"):
    """Yield the encoding of each text of an iterable, in order, as an array('I') of ids, with
    tiktoken's encoder where it applies (accelerate). An item is a text, or a pair (text,
    continuation): see ImportedTokenizer.encode_ordinary.

    Worker processes get the tokenizer (pickled as its definition) and texts in chunks of about
    CHUNK_CHARS characters, with their continuation flags as bytes; at most two chunks per worker
    are in flight, so memory stays bounded for a corpus of any size. Each chunk comes back as one
    flat array and is only sliced. A worker that dies raises BrokenProcessPool at once, and the
    workers exit when this process dies, however it dies."""
    num_workers = os.cpu_count() if num_workers is None else num_workers
    if num_workers <= 1:
        encode = _encoder(accelerate(tokenizer), allowed_special)
        for text, continuation in map(_with_flag, texts):
            yield array("I", encode(text, continuation))
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # Workers start with this process's piece cache: a cold cache encodes several times slower.
    cache = tokenizer._cache if len(tokenizer._cache) <= WORKER_CACHE_PIECES else {}
    pool = ProcessPoolExecutor(
        num_workers,
        initializer=_init_worker,
        initargs=(tokenizer, allowed_special, cache, os.getpid()),
    )
    try:
        pending = deque()
        for chunk in _chunks(texts, CHUNK_CHARS):
            pending.append(pool.submit(_encode_chunk, chunk))
            if len(pending) >= 2 * num_workers:
                yield from _unpack(*pending.popleft().result())
        while pending:
            yield from _unpack(*pending.popleft().result())
    except BrokenProcessPool:
        raise BrokenProcessPool(
            "an encoding worker process died (out of memory, or killed); "
            "with less memory to spare, use fewer workers"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_worker_encode = None  # set in each encode_stream worker process


def _init_worker(tokenizer, allowed_special, cache, parent: int):
    global _worker_encode
    _exit_with_parent(parent)
    tokenizer._cache = cache
    _worker_encode = _encoder(accelerate(tokenizer), allowed_special)


def _exit_with_parent(parent: int):
    """Exit when the process that started this worker dies, kill -9 included."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _encode_chunk(chunk):
    """Encode a chunk (texts, continuation flags) into one flat array of ids and the number of
    ids of each text: one array pickles far faster than a list of lists."""
    flat, lengths = array("I"), []
    for text, continuation in zip(*chunk):
        ids = _worker_encode(text, continuation)
        flat.extend(ids)
        lengths.append(len(ids))
    return flat, lengths


def _with_flag(item) -> tuple:
    """(text, continuation) of an encode_stream item."""
    return (item, False) if isinstance(item, str) else item


def _chunks(texts, chunk_chars):
    """Group encode_stream items into (texts, continuation flags as bytes) of about chunk_chars
    characters."""
    chunk, flags, size = [], bytearray(), 0
    for text, continuation in map(_with_flag, texts):
        chunk.append(text)
        flags.append(bool(continuation))
        size += len(text)
        if size >= chunk_chars:
            yield chunk, bytes(flags)
            chunk, flags, size = [], bytearray(), 0
    if chunk:
        yield chunk, bytes(flags)


def _unpack(flat, lengths):
    """Slices of one flat array of ids, one per text."""
    position = 0
    for n in lengths:
        yield flat[position : position + n]
        position += n
