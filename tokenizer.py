"""Byte-level BPE tokenizer (GPT-2/GPT-4 style), trained from scratch, tiktoken-compatible; and the
tokenizers of open-weight models (Llama 2 and 3, Mistral, TinyLlama, SmolLM, GPT-2), read by hf.py.

Text is split into pieces by a regex (GPT-4's), each piece is UTF-8 bytes, and merges never
cross pieces. Token ids: 0..255 are the raw bytes, then one id per merge in the order learned,
then the special tokens. `mergeable_ranks` and `special_tokens` are exactly what
`tiktoken.Encoding(name, pat_str=tok.pattern, mergeable_ranks=..., special_tokens=...)` takes,
and `encode` gives the same ids as tiktoken. The Tokenizer class also holds Hugging Face's BPE
(merge rule "pairs", SentencePiece-style byte fallback): see its docstring.

    python tokenizer.py --input data/tinyshakespeare.txt --vocab-size 4096 --out out/tok.json
"""
import argparse
import contextlib
import functools
import hashlib
import heapq
import json
import os
import re
import sys
import time
from array import array
from collections import deque
from functools import partial
from itertools import chain, groupby
from pathlib import Path

import regex

from infra import atomic

GPT4_SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
# The same pattern for pure-ASCII text, where \p{L}, \p{N} and \s reduce to plain classes.
# The stdlib `re` runs it about twice as fast as `regex` runs the Unicode one, and the split
# is most of the cost of encoding. tests/test_tokenizer.py checks the two agree on ASCII.
_WS = r"\t\n\x0b\x0c\r "
_GPT4_ASCII_PATTERN = (rf"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?+[A-Za-z]+|[0-9]{{1,3}}"""
                       rf"""| ?[^{_WS}A-Za-z0-9]++[\r\n]*|[{_WS}]*[\r\n]|[{_WS}]+(?![^{_WS}])|[{_WS}]+""")
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                        r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# When SentencePiece-style tokenizers put a space in front of a text (Hugging Face: the Prepend
# normalizer; Metaspace's prepend_scheme "always" and "first"): never, always (a non-empty text),
# unless the text starts with one, or that but only at the start of the whole text (not after a
# special token).
PREFIXES = (None, "always", "unless_space", "first_unless_space")
EOT = "<|endoftext|>"
FORMAT = "minillama-bpe"
VERSION = 2  # 1: trained tokenizers (pattern, merges, special tokens); 2: any (see Tokenizer._definition)
# Where Tokenizer.load looks in a folder, in this order (Llama 3 keeps tiktoken's file in original/).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer.tiktoken", "original/tokenizer.model")
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")  # the first line of a tiktoken ranks file
_CACHE_LIMIT = 1 << 20  # pieces; the encode cache is cleared when full so data prep over GBs stays bounded
_CACHE_PIECE_CHARS = 256  # longer pieces are not cached
_WORDS = r" *[^ ]+| +"  # a piece starts at each space that follows something else
METASPACE_SPLIT = r" [^ ]*|[^ ]+"  # Hugging Face's Metaspace(split=True): a piece starts at each space


class TokenizerError(ValueError):
    """A tokenizer file or training input that cannot be used; the message says why."""


# ----------------------------------------------------------------------------- splitting text into pieces

# No GPT-4 piece runs from a newline into a following non-space character, so text can be cut
# there and each part split on its own with the same result: the ASCII fast path uses that, and
# data.py uses it to read large files in pieces.
SAFE_CUT = re.compile(r"(?<=\n)(?=\S)")


def _splitter(pattern: str):
    """Return a function text -> list of pieces: the matches of `pattern` and, as pieces of their
    own, the text between them (none for the GPT-4 pattern). For GPT-4's, the fast ASCII pattern
    is used where it applies: on the whole text, or on the runs of ASCII lines of mostly-ASCII text."""
    compiled = regex.compile(pattern)
    if pattern != GPT4_SPLIT_PATTERN:
        return partial(_split_keeping_gaps, compiled)
    findall = compiled.findall
    ascii_findall = re.compile(_GPT4_ASCII_PATTERN).findall

    def split(text):
        if text.isascii():
            return ascii_findall(text)
        pieces = []
        for is_ascii, lines in groupby(SAFE_CUT.split(text), str.isascii):
            pieces += (ascii_findall if is_ascii else findall)("".join(lines))
        return pieces
    return split


def _split_keeping_gaps(compiled, text: str) -> list:
    if not compiled.groups:
        pieces = compiled.findall(text)
        if sum(map(len, pieces)) == len(text):  # the matches cover the text: the usual case
            return pieces
    pieces, end = [], 0
    for match in compiled.finditer(text):
        start, stop = match.span()
        pieces += [text[end:start]] * (start > end) + [text[start:stop]] * (stop > start)
        end = stop
    return pieces + [text[end:]] * (end < len(text))


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """A BPE tokenizer: split patterns, a vocabulary of byte strings, merges and special tokens.

    encode_ordinary(text) runs four steps:
    1. SentencePiece-style tokenizers (space_marker "▁") read "▁" in the text as a space, as
       Hugging Face does, and put a space in front of the text (`prefix`, see PREFIXES).
    2. Each split pattern cuts every piece of the one before into its matches and, as pieces of
       their own, the text between them (Hugging Face's "isolated"); no pattern: one piece.
    3. A piece starts as symbols: its UTF-8 bytes (symbols="bytes"), or its characters that are
       tokens and the bytes of the others (symbols="chars": SentencePiece's byte fallback).
    4. Repeatedly merge the adjacent pair of lowest rank, the leftmost on a tie. Merge rule
       "ranks" (tiktoken's, and that of every tokenizer trained here): a pair's rank is the id of
       the token its bytes make together, and a piece that is a whole token is that token.
       Merge rule "pairs" (Hugging Face's BPE): a pair's rank is its place in `merges`, and whole
       pieces are looked up first only with ignore_merges. Both rules become one table, pair ->
       (rank, new token), so one loop serves both.
    Ids need not be contiguous (vocab[i] is None for an id nothing uses), byte tokens need not be
    0..255 and special tokens may have any ids; encode(text, allowed_special=...) alone makes them.
    """

    def __init__(self, pattern, merges=(), special_tokens=(EOT,), *, vocab=None, merge_rule="ranks",
                 symbols="bytes", byte_tokens=None, space_marker=None, prefix=None, ignore_merges=None,
                 bos=None, eos=None):
        """Tokenizers trained here are Tokenizer(pattern, merges, special_tokens): ids 0..255 are the
        bytes, then one per merge (a, b) of earlier ids, then the special tokens. Imported ones give
        `vocab` (id -> bytes or None) and `special_tokens` as {name: id}; see the class docstring and
        hf.py for the other arguments. `pattern` is a regex, a list of them, or None."""
        self.patterns = [pattern] if isinstance(pattern, str) else list(pattern or ())
        self.pattern = self.patterns[0] if len(self.patterns) == 1 else None
        self.merges = [tuple(m) for m in merges]
        self.merge_rule, self.symbols, self.space_marker, self.prefix = merge_rule, symbols, space_marker, prefix
        _require(merge_rule in ("ranks", "pairs"), f"unknown merge rule {merge_rule!r}")
        _require(symbols in ("bytes", "chars"), f"unknown symbols {symbols!r}")
        _require(prefix in PREFIXES, f"unknown prefix {prefix!r}")
        _require((space_marker is None) == (symbols == "bytes") and (space_marker or not prefix),
                 "a space marker and a prefix go with symbols='chars' (SentencePiece style) and only with it")
        if merge_rule == "ranks":
            _require(symbols == "bytes" and len(self.patterns) == 1 and ignore_merges in (None, True),
                     "merge rule 'ranks' is tiktoken's: one split pattern, byte symbols, whole pieces first")
            ignore_merges = True
        self.ignore_merges = bool(ignore_merges)
        _require(not (self.ignore_merges and symbols == "chars"), "ignore_merges with symbols='chars' is not supported")
        self._built_from_merges = vocab is None
        if vocab is None:
            vocab = [bytes([i]) for i in range(256)]
            for a, b in self.merges:
                vocab.append(vocab[a] + vocab[b])
        self.vocab = list(vocab)
        tokens = [(i, t) for i, t in enumerate(self.vocab) if t is not None]

        if isinstance(special_tokens, dict):
            self.special_tokens = dict(special_tokens)
        else:
            self.special_tokens = {s: len(self.vocab) + k for k, s in enumerate(special_tokens)}
            _require(len(self.special_tokens) == len(special_tokens), "special tokens must be distinct non-empty strings")
        ids = list(self.special_tokens.values())
        _require(all(isinstance(s, str) and s for s in self.special_tokens), "special tokens must be distinct non-empty strings")
        _require(all(type(i) is int and i >= 0 for i in ids) and len(set(ids)) == len(ids),
                 "special token ids must be distinct non-negative integers")
        if merge_rule == "ranks":  # tiktoken keeps specials apart from the ranks, and one id per byte string
            _require(not any(i < len(self.vocab) and self.vocab[i] is not None for i in ids),
                     "special token ids must not be ids of the vocabulary")
            self.mergeable_ranks = {t: i for i, t in tokens}
            _require(len(self.mergeable_ranks) == len(tokens), "two merges produce the same bytes; the merge list is corrupt")
        else:
            self.mergeable_ranks = None
        self.eos = eos if eos is not None else (EOT if EOT in self.special_tokens else None)
        self.bos = bos
        for role, name in (("bos", self.bos), ("eos", self.eos)):
            _require(name is None or name in self.special_tokens, f"{role} {name!r} is not one of the special tokens")

        if byte_tokens is None:
            _require(symbols == "bytes", "symbols='chars' needs byte_tokens (the byte-fallback token of each byte)")
            single = {t[0]: i for i, t in reversed(tokens) if len(t) == 1}
            if missing := [b for b in range(256) if b not in single]:
                raise TokenizerError(f"the vocabulary has no token for byte {missing[0]:#04x}, so not every text can be encoded")
            byte_tokens = [single[b] for b in range(256)]
        _require(len(byte_tokens) == 256 and all(type(i) is int and 0 <= i < len(self.vocab) and self.vocab[i] == bytes([b])
                                                 for b, i in enumerate(byte_tokens)),
                 "byte_tokens must give, for each of the 256 bytes, the id of a token that is that byte")
        self.byte_tokens = list(byte_tokens)
        self._byte_ids = None if self.byte_tokens == list(range(256)) else self.byte_tokens
        fallback = set(self.byte_tokens) if symbols == "chars" else set()
        texts = {i: t.decode("utf-8") for i, t in tokens if _is_utf8(t)}
        if symbols == "chars":  # the characters that are tokens (the lowest id where two are the same)
            self._chars = {text: i for i, text in reversed(texts.items()) if len(text) == 1 and i not in fallback}
        self._whole = {text: i for i, text in reversed(texts.items())} if self.ignore_merges else None

        self._shift = max(len(self.vocab), len(self.merges) + 1, 2).bit_length()
        self._pairs = self._merge_table(tokens, fallback)

        self._decode_table = self.vocab + [None] * (max(ids, default=-1) + 1 - len(self.vocab))
        for s, i in self.special_tokens.items():
            self._decode_table[i] = s.encode("utf-8")
        try:
            self._stages = [_splitter(p) for p in self.patterns]
        except regex.error as e:
            raise TokenizerError(f"invalid split pattern ({e})") from None
        if not self._stages and not self.ignore_merges and not self._any_merge(lambda a, b: a[-1:] != b" " == b[:1]):
            # No merge joins a space to what comes before it, as in SentencePiece's vocabularies: a text
            # cut before each space that follows something else encodes as the whole, in short pieces
            # the cache holds.
            self._stages = [_splitter(_WORDS)]
        self._args = dict(pattern=self.patterns, merges=self.merges, special_tokens=dict(self.special_tokens),
                          vocab=None if self._built_from_merges else self.vocab, merge_rule=merge_rule, symbols=symbols,
                          byte_tokens=self.byte_tokens, space_marker=space_marker, prefix=prefix,
                          ignore_merges=ignore_merges, bos=bos, eos=eos)  # what pickling sends
        self._special_re = None  # built on first use by encode()
        self.accelerate = True  # encode with tiktoken when it can; False: the Python code (the reference)
        self._fast = None
        self._cache = {}

    @classmethod
    def train(cls, texts, vocab_size: int, special_tokens=(EOT,), pattern=GPT4_SPLIT_PATTERN,
              max_bytes=None, memory_budget=None, verbose=False) -> "Tokenizer":
        """Learn vocab_size - 256 - len(special_tokens) merges from `texts` (a str or an iterable of
        texts, e.g. corpus.sample_texts(...)) by plain BPE, reading at most max_bytes of them, in at
        most memory_budget bytes (default 2 GiB): tokenizer_train.py says how."""
        from infra.tokenizer_train import DEFAULT_MEMORY_BUDGET, train_merges
        special_tokens = list(special_tokens)
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is too small: needs at least {256 + len(special_tokens)} "
                             f"(256 bytes + {len(special_tokens)} special tokens)")
        merges = train_merges([texts] if isinstance(texts, str) else texts, n_merges, pattern, special_tokens,
                              max_bytes, DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget, verbose)
        return cls(pattern, merges, special_tokens)

    def __reduce__(self):  # pickle the definition, not the compiled patterns, tables and cache
        return partial(Tokenizer, **self._args), ()

    @property
    def vocab_size(self) -> int:
        """Ids in use: the largest id + 1, special tokens included."""
        return len(self._decode_table)

    @property
    def eos_id(self) -> int:
        """The id that ends every document (and stops sampling)."""
        if self.eos is None:
            raise KeyError(f"this tokenizer has no {EOT} token (nor another end-of-document token); "
                           f"train it with special_tokens=({EOT!r},)")
        return self.special_tokens[self.eos]

    @property
    def bos_id(self) -> int | None:
        """The id put before every document, or None: tokenizers trained here mark only the end;
        Llama's put <s> or <|begin_of_text|> before each document."""
        return None if self.bos is None else self.special_tokens[self.bos]

    def fingerprint(self) -> str:
        """sha256 of what decides the ids (the definition, bos and eos included), not of a file's
        bytes: the same tokenizer re-indented or re-saved has the same fingerprint. Tokenizers
        that version 1 files hold keep the fingerprint they always had."""
        if self._fits_version_1():
            content = [self.pattern, self.merges, self.special_tokens]
        else:
            content = self._definition()
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()

    def _fits_version_1(self) -> bool:
        return (self._built_from_merges and self.merge_rule == "ranks" and self.bos is None
                and list(self.special_tokens.values()) == list(range(len(self.vocab), self.vocab_size))
                and self.eos == (EOT if EOT in self.special_tokens else None))

    def _definition(self) -> dict:
        """Everything that decides the ids, as JSON (the body of a version 2 file): token bytes as
        text, with bytes that are not UTF-8 as lone surrogates (surrogateescape)."""
        return {"merge_rule": self.merge_rule, "patterns": self.patterns, "symbols": self.symbols,
                "space_marker": self.space_marker, "prefix": self.prefix, "ignore_merges": self.ignore_merges,
                "bos": self.bos, "eos": self.eos, "special_tokens": self.special_tokens, "byte_tokens": self.byte_tokens,
                "vocab": [None if t is None else t.decode("utf-8", "surrogateescape") for t in self.vocab],
                "merges": self.merges if self.merge_rule == "pairs" else []}

    def _merge_table(self, tokens, fallback) -> dict:
        """(left << shift | right) -> (rank << shift | new token) for every pair that merges."""
        shift, pairs = self._shift, {}
        if self.merge_rule == "ranks":
            ranks = self.mergeable_ranks
            for token, rank in ranks.items():
                for k in range(1, len(token)):
                    left, right = ranks.get(token[:k]), ranks.get(token[k:])
                    if left is not None and right is not None:
                        pairs[left << shift | right] = rank << shift | rank
            return pairs
        made = {t: i for i, t in reversed(tokens) if i not in fallback}  # what a merge can make
        vocab, n = self.vocab, len(self.vocab)
        for rank, (a, b) in enumerate(self.merges):  # as in Hugging Face, a repeated pair keeps its last rank
            if not (type(a) is type(b) is int and 0 <= a < n and 0 <= b < n and None is not vocab[a] and None is not vocab[b]):
                raise TokenizerError(f"merge {rank} ({a!r}, {b!r}) names a token the vocabulary does not have")
            new = made.get(vocab[a] + vocab[b])
            if new is None:
                raise TokenizerError(f"merge {rank} ({a}, {b}) does not make a token of the vocabulary")
            pairs[a << shift | b] = rank << shift | new
        return pairs

    def pair_merges(self) -> list:
        """The merges as Hugging Face's BPE takes them, (left, right, new token) in rank order: as
        given for merge rule "pairs"; for "ranks", every split of a token into two tokens, by the
        token's id, then the parts' ids."""
        shift, mask = self._shift, (1 << self._shift) - 1
        table = sorted((value >> shift, key >> shift, key & mask, value & mask) for key, value in self._pairs.items())
        return [(a, b, new) for _, a, b, new in table]

    def _any_merge(self, joins) -> bool:
        """Whether joins(left bytes, right bytes) holds for a pair that merges."""
        shift, mask, vocab = self._shift, (1 << self._shift) - 1, self.vocab
        return any(joins(vocab[key >> shift], vocab[key & mask]) for key in self._pairs)

    @functools.cached_property
    def cut_points(self):
        """Where data.py may cut a long document into parts, encoded one by one (the later ones with
        continuation=True), and still get the ids of the whole document:
        "words": corpus.py's cut points (line starts, word starts, letter|punctuation; a hard cut
            only where a long stretch has none), proven there for GPT-4's split pattern (every
            tokenizer trained here, cl100k_base) and Llama 3's: the tokenizer's first pattern is
            one of these, and no space marker rewrites the text before it.
        a regex: line starts (a newline, then neither whitespace nor the space marker, which is a
            space by the time merges run), for tokenizers whose patterns split only at spaces
            (SentencePiece style: Llama 2, Mistral) and in which no merge joins a token that ends in a
            newline to one that does not start with whitespace, nor is a whole piece looked up.
        None: nowhere, for every other tokenizer. Other split patterns are not proven: GPT-2's splits
            the last whitespace character of a run off before a non-space one but not at the end of a
            text ("\n\n" + "x" gives "\n", "\n", "x"), so a cut after a blank line changes the ids."""
        if self.space_marker is None and self.patterns[:1] in ([GPT4_SPLIT_PATTERN], [LLAMA3_SPLIT_PATTERN]):
            return "words"
        if (not set(self.patterns) <= {_WORDS, METASPACE_SPLIT} or self.ignore_merges
                or self._any_merge(lambda a, b: a.endswith(b"\n") and not b[:1].isspace())):
            return None
        return re.compile(rf"(?<=\n)(?=[^\s{re.escape(self.space_marker or '')}])")

    # ------------------------------------------------------------------------- encode

    def _pieces(self, text: str, at_start: bool) -> list:
        """Steps 1 and 2 of encoding: the text in pieces (see the class docstring)."""
        if self.space_marker is not None:
            text = text.replace(self.space_marker, " ")
            if at_start and self.prefix and text and (self.prefix == "always" or text[0] != " "):
                text = " " + text
        if not self._stages:
            return [text] if text else []
        pieces = self._stages[0](text)
        for split in self._stages[1:]:
            pieces = [part for piece in pieces for part in split(piece)]
        return pieces

    def _bpe(self, piece: str) -> tuple:
        """Steps 3 and 4 of encoding: one piece to ids. The merges run on a linked list with a
        heap of candidate pairs, (rank, position) first, so a long piece (a whole SentencePiece
        text) costs n log n; a popped pair that no longer exists is skipped."""
        if self._whole is not None and (token := self._whole.get(piece)) is not None:
            return (token,)
        if self.symbols == "bytes":
            raw = piece.encode("utf-8")
            ids = list(raw) if self._byte_ids is None else list(map(self._byte_ids.__getitem__, raw))
        else:
            ids = list(map(self._chars.get, piece))
            if None in ids:  # byte fallback for the characters that are not tokens
                ids = [i for c, i in zip(piece, ids) for i in ([i] if i is not None else
                                                               map(self.byte_tokens.__getitem__, c.encode("utf-8")))]
        pairs, shift, n = self._pairs, self._shift, len(ids)
        mask, at = (1 << shift) - 1, max(n, 1).bit_length()  # a heap entry is rank << shift | new, << at | position
        where = (1 << at) - 1
        heap = [rank << at | i for i, rank in enumerate(map(pairs.get, [a << shift | b for a, b in zip(ids, ids[1:])]))
                if rank is not None]
        heapq.heapify(heap)
        after, before = list(range(1, n + 1)), list(range(-1, n - 1))
        while heap:
            entry = heapq.heappop(heap)
            i, rank = entry & where, entry >> at
            j = after[i]
            if j >= n or ids[i] < 0 or pairs.get(ids[i] << shift | ids[j]) != rank:
                continue  # a pair that an earlier merge took apart
            new = ids[i] = rank & mask
            ids[j] = -1
            k = after[i] = after[j]
            if k < n:
                before[k] = i
                if (rank := pairs.get(new << shift | ids[k])) is not None:
                    heapq.heappush(heap, rank << at | i)
            if (h := before[i]) >= 0 and (rank := pairs.get(ids[h] << shift | new)) is not None:
                heapq.heappush(heap, rank << at | h)
        return tuple(i for i in ids if i >= 0)

    def encode_ordinary(self, text: str, continuation=False) -> list:
        """Encode text, treating special tokens' text as plain text. continuation=True: `text`
        continues a text cut at `cut_points` (data.py reads big files in parts), so no SentencePiece
        prefix space goes in front of it."""
        if fast := self._tiktoken():
            return fast(text)
        pieces = self._pieces(text, not continuation)
        cache = self._cache
        ids = list(map(cache.get, pieces))  # the common all-hits case never loops in Python
        if None in ids:
            if len(cache) > _CACHE_LIMIT:
                cache.clear()
            new = set(pieces).difference(cache)
            for piece in new:
                cache[piece] = self._bpe(piece)
            ids = list(map(cache.__getitem__, pieces))
            for piece in new:
                if len(piece) > _CACHE_PIECE_CHARS:  # a whole SentencePiece text would only fill the cache
                    del cache[piece]
        return list(chain.from_iterable(ids))

    def _tiktoken(self):
        """tiktoken's encoder of this tokenizer (merge rule "ranks"), if tiktoken is installed: the
        same ids (tests/test_tokenizer_formats.py checks), 3x faster on English and 8x on Chinese,
        whose pieces rarely repeat (bench/bench_hf_tokenizer.py). Text that the pattern does not
        match is kept as pieces here and dropped by tiktoken, hence the pattern's extra branch."""
        if not self.accelerate or self.merge_rule != "ranks":
            return None
        if self._fast is None:
            self._fast = False
            try:
                import tiktoken
                pattern = f"(?:{self.pattern})|(?s:(?!(?:{self.pattern})).)+"
                self._fast = tiktoken.Encoding(f"minillama-{id(self)}", pat_str=pattern,
                                               mergeable_ranks=self.mergeable_ranks, special_tokens={}).encode_ordinary
            except Exception:  # not installed, or a pattern that its regex engine does not compile
                pass
        return self._fast or None

    def encode(self, text: str, allowed_special="none", continuation=False) -> list:
        """Encode text; special tokens named in allowed_special ("all", "none" or a set of
        names) become their ids. Any other special token's text in `text` is an error, as in
        tiktoken, because silently encoding it as text is usually a data bug. The text between
        special tokens is encoded as Hugging Face does: each part gets the SentencePiece prefix,
        except with prefix "first_unless_space", where only the start of the text does."""
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        elif allowed_special == "none":
            allowed = set()
        else:
            allowed = set(allowed_special)
            if unknown := allowed - set(self.special_tokens):
                raise ValueError(f"unknown special tokens {sorted(unknown)}; this tokenizer has {list(self.special_tokens)}")
        if not self.special_tokens:
            return self.encode_ordinary(text, continuation)
        if self._special_re is None:  # longest first, in case one contains another
            names = sorted(self.special_tokens, key=len, reverse=True)
            self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")")
        found = set(self._special_re.findall(text))
        if disallowed := found - allowed:
            s = sorted(disallowed)[0]
            raise ValueError(f"text contains the special token {s!r}; pass allowed_special={{{s!r}}} "
                             f"(or 'all') to encode it as a special token, or use encode_ordinary")
        if not found:
            return self.encode_ordinary(text, continuation)
        ids, later = [], self.prefix == "first_unless_space"
        for k, part in enumerate(self._special_re.split(text)):
            if k % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part, continuation if k == 0 else later))
        return ids

    def encode_batch(self, texts, num_workers=None, allowed_special="none") -> list:
        """encode() each text, spread over worker processes when the input is big enough to pay
        for starting them. allowed_special=None encodes every text with encode_ordinary."""
        texts = list(texts)
        if sum(map(len, texts)) < 1 << 20:
            num_workers = 1
        return [ids.tolist() for ids in self.encode_stream(texts, num_workers, allowed_special)]

    def encode_stream(self, texts, num_workers=None, allowed_special="none"):
        """Yield the encoding of each text of an iterable, in order, as an array('I') of ids. An
        item is a text, or a pair (text, continuation): see encode_ordinary.

        Worker processes get the tokenizer itself (pickled by __reduce__) and texts in ~256K-
        character chunks (big enough to amortise the transfer, small enough to balance the
        workers), with their continuation flags as bytes; at most two chunks per worker are in
        flight, so memory stays bounded for a corpus of any size. Each chunk comes back as one flat
        array and is only sliced, never turned into Python ints. A worker that dies (out of memory,
        killed) raises BrokenProcessPool at once instead of leaving the caller waiting.
        """
        encode = self.encode_ordinary if allowed_special is None else partial(self.encode, allowed_special=allowed_special)
        num_workers = os.cpu_count() if num_workers is None else num_workers
        if num_workers <= 1:
            for text, continuation in map(_with_flag, texts):
                yield array("I", encode(text, continuation=continuation))
            return
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool
        # Workers start with this process's piece cache: a cold cache encodes ~3x slower.
        cache = self._cache if len(self._cache) <= 1 << 18 else {}
        pool = ProcessPoolExecutor(num_workers, initializer=_init_worker, initargs=(self, allowed_special, cache))
        try:
            pending = deque()
            for chunk in _chunks(texts, 1 << 18):
                pending.append(pool.submit(_encode_chunk, chunk))
                if len(pending) >= 2 * num_workers:
                    yield from _unpack(*pending.popleft().result())
            while pending:
                yield from _unpack(*pending.popleft().result())
        except BrokenProcessPool:
            raise BrokenProcessPool("an encoding worker process died (out of memory, or killed); "
                                    "with less memory to spare, use fewer workers") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------------- decode

    def decode_bytes(self, ids) -> bytes:
        """The exact bytes of a sequence of ids: their tokens' bytes, concatenated. So decoding
        in parts (sample.py streams) gives the whole; SentencePiece style keeps the prefix space."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays, torch tensors
        table = self._decode_table
        if ids and (min(ids) < 0 or max(ids) >= len(table)):
            bad = next(i for i in ids if not 0 <= i < len(table))
            raise ValueError(f"token id {bad} is out of range for vocab_size {len(table)}")
        try:
            return b"".join(map(table.__getitem__, ids))
        except TypeError:  # None: an id that no token has
            bad = next(i for i in ids if table[i] is None)
            raise ValueError(f"token id {bad} is not a token of this tokenizer (an unused id)") from None

    def decode(self, ids) -> str:
        """Decode to text; bytes that are not valid UTF-8 (e.g. a character split across a
        cut-off sequence) become U+FFFD instead of raising. SentencePiece style: the space that
        the prefix put in front of the text is taken off again, as Hugging Face's decoder does."""
        text = self.decode_bytes(ids).decode("utf-8", errors="replace")
        return text[1:] if self.prefix and text.startswith(" ") else text

    # ------------------------------------------------------------------------- files

    def save(self, path) -> None:
        """Write one human-readable JSON file, atomically and durably (atomic.py):
        version 1 (pattern, merges, special tokens) when it can hold this tokenizer, else
        version 2 (the whole definition, see _definition), a token or a merge per line."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._fits_version_1():
            obj = {"format": FORMAT, "version": 1, "pattern": self.pattern, "special_tokens": self.special_tokens,
                   "merges": self.merges}
        else:
            obj = {"format": FORMAT, "version": VERSION, **self._definition()}
        lines = []
        for key, value in obj.items():
            if key in ("special_tokens", "vocab", "merges"):
                items = [f"{_json(k)}: {v}" for k, v in value.items()] if isinstance(value, dict) else map(_json, value)
                brackets = "{}" if isinstance(value, dict) else "[]"
                lines.append(f' "{key}": {brackets[0]}\n  ' + ",\n  ".join(items) + f"\n {brackets[1]}")
            else:
                lines.append(f' "{key}": {_json(value)}')
        atomic.write_text(path, "{\n" + ",\n".join(lines) + "\n}\n")

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Read a tokenizer: this project's file (versions 1 and 2), a Hugging Face tokenizer.json
        of byte-level or SentencePiece-style BPE, a tiktoken ranks file (see tokenizer_formats.read_tiktoken), or
        a folder holding one of them (a run, data or model folder: the first of TOKENIZER_FILES).
        Anything else raises TokenizerError saying why, in one line."""
        path = Path(path)
        if path.is_dir():
            found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
            if not found:
                raise TokenizerError(f"{path} holds no tokenizer (looked for {', '.join(TOKENIZER_FILES)})")
            path = found[0]
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror})") from None
        if _TIKTOKEN_LINE.match(raw):
            from infra.tokenizer_formats import read_tiktoken
            return read_tiktoken(path)
        if path.suffix == ".model":
            raise TokenizerError(f"{path} is a SentencePiece model, which is not supported: use the model's tokenizer.json "
                                 f"(transformers writes it: AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: not valid JSON, the file is corrupt or truncated ({e})") from None
        if isinstance(obj, dict) and "model" in obj and "format" not in obj:
            from infra.tokenizer_formats import read_tokenizer_json
            return read_tokenizer_json(path, obj)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise TokenizerError(f'{path}: not a {FORMAT} tokenizer file (no "format": "{FORMAT}" field) nor a '
                                 f"Hugging Face tokenizer.json; train one with `python tokenizer.py`")
        if obj.get("version") not in (1, VERSION):
            raise TokenizerError(f"{path}: tokenizer file version {obj.get('version')!r} is not supported "
                                 f"(this code reads versions 1 to {VERSION})")
        try:
            return cls._from_version_1(obj) if obj["version"] == 1 else cls._from_version_2(obj)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None

    @classmethod
    def _from_version_1(cls, obj) -> "Tokenizer":
        pattern, merges, specials = obj.get("pattern"), obj.get("merges"), obj.get("special_tokens")
        if not (isinstance(pattern, str) and isinstance(merges, list) and isinstance(specials, dict)):
            raise TokenizerError('"pattern", "merges" or "special_tokens" is missing or of the wrong type')
        for rank, m in enumerate(merges, 256):
            if not (isinstance(m, list) and len(m) == 2 and all(type(x) is int and 0 <= x < rank for x in m)):
                raise TokenizerError(f"merge {rank - 256} is {m!r}, expected [id, id] of earlier tokens")
        if list(specials.values()) != list(range(256 + len(merges), 256 + len(merges) + len(specials))):
            raise TokenizerError("special token ids must follow the merges contiguously")
        return cls(pattern, merges, list(specials))

    @classmethod
    def _from_version_2(cls, obj) -> "Tokenizer":
        kinds = {"merge_rule": str, "patterns": list, "symbols": str, "space_marker": (str, type(None)),
                 "prefix": (str, type(None)), "ignore_merges": bool, "bos": (str, type(None)), "eos": (str, type(None)),
                 "special_tokens": dict, "byte_tokens": list, "vocab": list, "merges": list}
        for key, kind in kinds.items():
            if not isinstance(obj.get(key, ...), kind):
                raise TokenizerError(f'"{key}" is missing or of the wrong type')
        if not all(isinstance(t, str) or t is None for t in obj["vocab"]):
            raise TokenizerError('"vocab" must hold a string (or null) per id')
        if not all(isinstance(m, list) and len(m) == 2 for m in obj["merges"]):
            raise TokenizerError('"merges" must hold [id, id] pairs')
        try:
            vocab = [None if t is None else t.encode("utf-8", "surrogateescape") for t in obj["vocab"]]
        except UnicodeEncodeError:
            raise TokenizerError('"vocab" holds a string that is not bytes written as text') from None
        return cls(obj["patterns"], obj["merges"], obj["special_tokens"], vocab=vocab, merge_rule=obj["merge_rule"],
                   symbols=obj["symbols"], byte_tokens=obj["byte_tokens"], space_marker=obj["space_marker"],
                   prefix=obj["prefix"], ignore_merges=obj["ignore_merges"], bos=obj["bos"], eos=obj["eos"])


def _require(condition, message):
    if not condition:
        raise TokenizerError(message)


def _is_utf8(token: bytes) -> bool:
    try:
        token.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _json(value) -> str:
    """JSON for one value, non-ASCII text kept readable; lone surrogates (bytes that are not
    UTF-8, see Tokenizer._definition) as \\u escapes, since UTF-8 cannot hold them."""
    return re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, ensure_ascii=False))


_worker_tokenizer = None  # set in each encode_stream worker process


def _init_worker(tokenizer, allowed_special, cache):
    global _worker_tokenizer
    tokenizer._cache = cache
    _worker_tokenizer = (tokenizer, allowed_special)


def _encode_chunk(chunk):
    """Encode a chunk (texts, continuation flags); one flat array pickles far faster than a list
    of int lists."""
    tok, allowed_special = _worker_tokenizer
    encode = tok.encode_ordinary if allowed_special is None else partial(tok.encode, allowed_special=allowed_special)
    flat, lengths = array("I"), []
    for text, continuation in zip(*chunk):
        ids = encode(text, continuation=continuation)
        flat.extend(ids)
        lengths.append(len(ids))
    return flat, lengths


def _with_flag(item) -> tuple:
    """(text, continuation) of an encode_stream item."""
    return (item, False) if isinstance(item, str) else item


def _chunks(texts, chunk_chars):
    """Group an iterable of encode_stream items into (texts, continuation flags as bytes) of about
    chunk_chars characters."""
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
        yield flat[position:position + n]
        position += n


# ----------------------------------------------------------------------------- CLI

def parse_size(text: str) -> int:
    """'512M', '2G', '1.5G' or a plain number of bytes -> bytes (K, M, G, T are powers of 1024)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 512M or 4G")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train a byte-level BPE tokenizer and save it as JSON.")
    p.add_argument("--input", nargs="+", required=True, help="text, .jsonl, .parquet (.gz, .zst) files or folders")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="where to write the tokenizer JSON")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="train on a sample of at most N bytes, spread over all the input files")
    p.add_argument("--memory-budget", type=parse_size, default=None, metavar="SIZE",
                   help="memory that training may use, e.g. 512M or 8G (default 2G): reading stops when "
                        "the sample read would need all of it")
    p.add_argument("--text-field", default="text", help="the field of .jsonl records / column of .parquet files")
    args = p.parse_args(argv)
    from infra.corpus import list_sources, sample_texts  # the corpus reader: files, folders and formats
    try:
        start = time.perf_counter()
        sources = list_sources(args.input)
        with contextlib.closing(sample_texts(sources, 0.0, args.text_field, args.max_bytes, verbose=True)) as texts:
            tok = Tokenizer.train(texts, args.vocab_size, max_bytes=args.max_bytes,
                                  memory_budget=args.memory_budget, verbose=True)
        print(f"trained vocab_size {tok.vocab_size} in {time.perf_counter() - start:.1f}s")
        tok.save(args.out)
        n_bytes = n_tokens = 0
        with contextlib.closing(sample_texts(sources, 0.0, args.text_field, 16 << 20)) as texts:
            for text in texts:  # a first look at compression, on a sample of 16 MB at most
                n_bytes += len(text.encode("utf-8"))
                n_tokens += len(tok.encode_ordinary(text))
                if n_bytes >= 16 << 20:
                    break
        print(f"saved {args.out}; compression on {n_bytes / 1e6:.1f} MB of the input: "
              f"{n_bytes / max(n_tokens, 1):.2f} bytes/token")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
