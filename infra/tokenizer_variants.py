"""The BPE of other projects' tokenizers, as a subclass of tokenizer.Tokenizer: Hugging Face's
pair-rank BPE, SentencePiece's byte fallback and prefix space, several split patterns, ids in any
order. infra/tokenizer_formats.py reads their files into it; tokenizer files of version 2 hold it.

encode_ordinary(text) runs four steps:
1. SentencePiece-style tokenizers (space_marker "▁") read "▁" in the text as a space, as Hugging
   Face does, and put a space in front of the text (`prefix`, see PREFIXES).
2. Each split pattern cuts every piece of the one before into its matches and, as pieces of their
   own, the text between them (Hugging Face's "isolated"); no pattern: one piece.
3. A piece starts as symbols: its UTF-8 bytes (symbols="bytes"), or its characters that are tokens
   and the bytes of the others (symbols="chars": SentencePiece's byte fallback).
4. Repeatedly merge the adjacent pair of lowest rank, the leftmost on a tie. Merge rule "ranks"
   (tiktoken's, and that of tokenizer.Tokenizer): a pair's rank is the id of the token its bytes
   make together, and a piece that is a whole token is that token. Merge rule "pairs" (Hugging
   Face's BPE): a pair's rank is its place in `merges`, and whole pieces are looked up first only
   with ignore_merges. Both rules become one table, pair -> (rank, new token), so one loop serves
   both.
Ids need not be contiguous (vocab[i] is None for an id nothing uses), byte tokens need not be
0..255 and special tokens may have any ids.
"""

import heapq
import json
import re
from functools import partial
from pathlib import Path

from tokenizer import EOT, FORMAT, Tokenizer, TokenizerError, write_atomic

VERSION = 2  # the tokenizer file version that holds these tokenizers (save writes it)
# When SentencePiece-style tokenizers put a space in front of a text (Hugging Face: the Prepend
# normalizer; Metaspace's prepend_scheme "always" and "first"): never, always (a non-empty text),
# unless the text starts with one, or that but only at the start of the whole text (not after a
# special token).
PREFIXES = (None, "always", "unless_space", "first_unless_space")
METASPACE_SPLIT = r" [^ ]*|[^ ]+"  # Hugging Face's Metaspace(split=True): a piece starts at a space
WORDS_SPLIT = r" *[^ ]+| +"  # a piece starts at each space that follows something else


def _splitter(pattern: str):
    """text -> its pieces by `pattern`: matches and, as pieces of their own, the text between."""
    return Tokenizer(pattern, (), ()).split


class ImportedTokenizer(Tokenizer):
    """A BPE tokenizer of another project: see the module docstring for the four steps."""

    def __init__(
        self,
        pattern,
        merges=(),
        special_tokens=(EOT,),
        *,
        vocab=None,
        merge_rule="ranks",
        symbols="bytes",
        byte_tokens=None,
        space_marker=None,
        prefix=None,
        ignore_merges=None,
        bos=None,
        eos=None,
    ):
        """vocab: id -> bytes or None (default: the 256 bytes, then one token per merge);
        special_tokens: {name: id}, or names that take the ids after the vocabulary.
        pattern: a regex, a list of them, or None."""
        self.patterns = [pattern] if isinstance(pattern, str) else list(pattern or ())
        self.pattern = self.patterns[0] if len(self.patterns) == 1 else None
        self.merges = [tuple(m) for m in merges]
        self.merge_rule, self.symbols = merge_rule, symbols
        self.space_marker, self.prefix = space_marker, prefix
        _require(merge_rule in ("ranks", "pairs"), f"unknown merge rule {merge_rule!r}")
        _require(symbols in ("bytes", "chars"), f"unknown symbols {symbols!r}")
        _require(prefix in PREFIXES, f"unknown prefix {prefix!r}")
        _require(
            (space_marker is None) == (symbols == "bytes") and (space_marker or not prefix),
            "a space marker and a prefix go with symbols='chars' (SentencePiece style) "
            "and only with it",
        )
        if merge_rule == "ranks":
            _require(
                symbols == "bytes" and len(self.patterns) == 1 and ignore_merges in (None, True),
                "merge rule 'ranks' is tiktoken's: one split pattern, byte symbols, "
                "whole pieces first",
            )
            ignore_merges = True
        self.ignore_merges = bool(ignore_merges)
        _require(
            not (self.ignore_merges and symbols == "chars"),
            "ignore_merges with symbols='chars' is not supported",
        )
        if vocab is None:
            vocab = [bytes([i]) for i in range(256)]
            for a, b in self.merges:
                vocab.append(vocab[a] + vocab[b])
        self.vocab = list(vocab)
        tokens = [(i, t) for i, t in enumerate(self.vocab) if t is not None]
        self._set_special_tokens(special_tokens, tokens, bos, eos)
        self._set_byte_tokens(byte_tokens, tokens)
        fallback = set(self.byte_tokens) if symbols == "chars" else set()
        texts = {i: t.decode("utf-8") for i, t in tokens if _is_utf8(t)}
        if symbols == "chars":  # the characters that are tokens (the lowest id of equal ones)
            self._chars = {
                text: i
                for i, text in reversed(texts.items())
                if len(text) == 1 and i not in fallback
            }
        self._whole = (
            {text: i for i, text in reversed(texts.items())} if self.ignore_merges else None
        )
        self._shift = max(len(self.vocab), len(self.merges) + 1, 2).bit_length()
        self._pairs = self._merge_table(tokens, fallback)
        ids = list(self.special_tokens.values())
        self._decode_table = self.vocab + [None] * (max(ids, default=-1) + 1 - len(self.vocab))
        for name, i in self.special_tokens.items():
            self._decode_table[i] = name.encode("utf-8")
        self._stages = [_splitter(p) for p in self.patterns]
        if (
            not self._stages
            and not self.ignore_merges
            and not self._any_merge(lambda a, b: a[-1:] != b" " == b[:1])
        ):
            # No merge joins a space to what comes before it, as in SentencePiece's vocabularies:
            # a text cut before each space that follows something else encodes as the whole, in
            # short pieces the cache holds.
            self._stages = [_splitter(WORDS_SPLIT)]
        self._args = dict(
            pattern=self.patterns,
            merges=self.merges,
            special_tokens=dict(self.special_tokens),
            vocab=self.vocab,
            merge_rule=merge_rule,
            symbols=symbols,
            byte_tokens=self.byte_tokens,
            space_marker=space_marker,
            prefix=prefix,
            ignore_merges=ignore_merges,
            bos=bos,
            eos=eos,
        )  # what pickling sends
        self._special_re = None
        self._cache = {}
        self.accelerator = None

    def _set_special_tokens(self, special_tokens, tokens, bos, eos):
        if isinstance(special_tokens, dict):
            self.special_tokens = dict(special_tokens)
        else:
            self.special_tokens = {s: len(self.vocab) + k for k, s in enumerate(special_tokens)}
            _require(
                len(self.special_tokens) == len(special_tokens),
                "special tokens must be distinct non-empty strings",
            )
        ids = list(self.special_tokens.values())
        _require(
            all(isinstance(s, str) and s for s in self.special_tokens),
            "special tokens must be distinct non-empty strings",
        )
        _require(
            all(type(i) is int and i >= 0 for i in ids) and len(set(ids)) == len(ids),
            "special token ids must be distinct non-negative integers",
        )
        self.mergeable_ranks = None
        if self.merge_rule == "ranks":  # tiktoken: specials apart from the ranks, bytes -> one id
            _require(
                not any(i < len(self.vocab) and self.vocab[i] is not None for i in ids),
                "special token ids must not be ids of the vocabulary",
            )
            self.mergeable_ranks = {t: i for i, t in tokens}
            _require(
                len(self.mergeable_ranks) == len(tokens),
                "two merges produce the same bytes; the merge list is corrupt",
            )
        self.eos = eos if eos is not None else (EOT if EOT in self.special_tokens else None)
        self.bos = bos
        for role, name in (("bos", self.bos), ("eos", self.eos)):
            _require(
                name is None or name in self.special_tokens,
                f"{role} {name!r} is not one of the special tokens",
            )

    def _set_byte_tokens(self, byte_tokens, tokens):
        if byte_tokens is None:
            _require(
                self.symbols == "bytes",
                "symbols='chars' needs byte_tokens (the byte-fallback token of each byte)",
            )
            single = {t[0]: i for i, t in reversed(tokens) if len(t) == 1}
            if missing := [b for b in range(256) if b not in single]:
                raise TokenizerError(
                    f"the vocabulary has no token for byte {missing[0]:#04x}, "
                    f"so not every text can be encoded"
                )
            byte_tokens = [single[b] for b in range(256)]
        _require(
            len(byte_tokens) == 256
            and all(
                type(i) is int and 0 <= i < len(self.vocab) and self.vocab[i] == bytes([b])
                for b, i in enumerate(byte_tokens)
            ),
            "byte_tokens must give, for each of the 256 bytes, the id of a token that is that byte",
        )
        self.byte_tokens = list(byte_tokens)
        self._byte_ids = None if self.byte_tokens == list(range(256)) else self.byte_tokens

    def __reduce__(self):  # pickle the definition, not the compiled patterns, tables and cache
        return partial(ImportedTokenizer, **self._args), ()

    def _definition(self) -> dict:
        """Everything that decides the ids, as JSON (the body of a version 2 file): token bytes
        as text, with bytes that are not UTF-8 as lone surrogates (surrogateescape)."""
        return {
            "merge_rule": self.merge_rule,
            "patterns": self.patterns,
            "symbols": self.symbols,
            "space_marker": self.space_marker,
            "prefix": self.prefix,
            "ignore_merges": self.ignore_merges,
            "bos": self.bos,
            "eos": self.eos,
            "special_tokens": self.special_tokens,
            "byte_tokens": self.byte_tokens,
            "vocab": [
                None if t is None else t.decode("utf-8", "surrogateescape") for t in self.vocab
            ],
            "merges": self.merges if self.merge_rule == "pairs" else [],
        }

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
        for rank, (a, b) in enumerate(self.merges):  # a repeated pair keeps its last rank
            if not (
                type(a) is type(b) is int
                and 0 <= a < n
                and 0 <= b < n
                and vocab[a] is not None
                and vocab[b] is not None
            ):
                raise TokenizerError(
                    f"merge {rank} ({a!r}, {b!r}) names a token the vocabulary does not have"
                )
            new = made.get(vocab[a] + vocab[b])
            if new is None:
                raise TokenizerError(
                    f"merge {rank} ({a}, {b}) does not make a token of the vocabulary"
                )
            pairs[a << shift | b] = rank << shift | new
        return pairs

    def pair_merges(self) -> list:
        """The merges as Hugging Face's BPE takes them, (left, right, new token) in rank order:
        as given for merge rule "pairs"; for "ranks", every split of a token into two tokens, by
        the token's id, then the parts' ids."""
        shift, mask = self._shift, (1 << self._shift) - 1
        table = sorted(
            (value >> shift, key >> shift, key & mask, value & mask)
            for key, value in self._pairs.items()
        )
        return [(a, b, new) for _, a, b, new in table]

    def _any_merge(self, joins) -> bool:
        """Whether joins(left bytes, right bytes) holds for a pair that merges."""
        shift, mask, vocab = self._shift, (1 << self._shift) - 1, self.vocab
        return any(joins(vocab[key >> shift], vocab[key & mask]) for key in self._pairs)

    def line_start_cuts(self):
        """Where a text may be cut into parts encoded one by one (the later ones with
        continuation=True) with the ids of the whole, for a tokenizer whose patterns split only
        at spaces (SentencePiece style: Llama 2, Mistral): line starts (a newline, then neither
        whitespace nor the space marker, a space by the time merges run), provided no merge
        joins a token that ends in a newline to one that does not start with whitespace, nor is
        a whole piece looked up. None where that does not hold."""
        if (
            not set(self.patterns) <= {WORDS_SPLIT, METASPACE_SPLIT}
            or self.ignore_merges
            or self._any_merge(lambda a, b: a.endswith(b"\n") and not b[:1].isspace())
        ):
            return None
        return re.compile(rf"(?<=\n)(?=[^\s{re.escape(self.space_marker or '')}])")

    # ------------------------------------------------------------------------- encode

    def _pieces(self, text: str, at_start: bool) -> list:
        """Steps 1 and 2 of encoding: the text in pieces."""
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

    def _encode_piece(self, piece: str) -> list:
        """Steps 3 and 4 of encoding: one piece to ids. The merges run on a linked list with a
        heap of candidate pairs, (rank, position) first, so a long piece (a whole SentencePiece
        text) costs n log n; a popped pair that no longer exists is skipped."""
        if self._whole is not None and (token := self._whole.get(piece)) is not None:
            return [token]
        if self.symbols == "bytes":
            raw = piece.encode("utf-8")
            ids = list(raw) if self._byte_ids is None else [self._byte_ids[b] for b in raw]
        else:
            ids = list(map(self._chars.get, piece))
            if None in ids:  # byte fallback for the characters that are not tokens
                ids = [
                    i
                    for c, token in zip(piece, ids)
                    for i in (
                        [token]
                        if token is not None
                        else [self.byte_tokens[b] for b in c.encode("utf-8")]
                    )
                ]
        pairs, shift, n = self._pairs, self._shift, len(ids)
        # a heap entry is (rank << shift | new) << at | position
        mask, at = (1 << shift) - 1, max(n, 1).bit_length()
        where = (1 << at) - 1
        candidates = map(pairs.get, [a << shift | b for a, b in zip(ids, ids[1:])])
        heap = [rank << at | i for i, rank in enumerate(candidates) if rank is not None]
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
        return [i for i in ids if i >= 0]

    def encode_ordinary(self, text: str, continuation=False) -> list:
        """Encode text, reading special tokens' text as plain text. continuation=True: `text`
        continues a text cut at a cut point (data prep reads big files in parts), so no
        SentencePiece prefix space goes in front of it."""
        if self.accelerator is not None:
            return self.accelerator(text)
        return self._encode_pieces(self._pieces(text, not continuation))

    def encode(self, text: str, allowed_special="none", continuation=False) -> list:
        """Encode text; the special tokens named in allowed_special become their ids. The text
        between special tokens is encoded as Hugging Face does: each part gets the SentencePiece
        prefix, except with prefix "first_unless_space", where only the start of the text does."""
        ids, later = [], self.prefix == "first_unless_space"
        for k, part in enumerate(self.split_special(text, allowed_special)):
            if k % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids += self.encode_ordinary(part, continuation if k == 0 else later)
        return ids

    def decode(self, ids) -> str:
        """Decode to text (see Tokenizer.decode); SentencePiece style: the space that the prefix
        put in front of the text is taken off again, as Hugging Face's decoder does."""
        text = super().decode(ids)
        return text[1:] if self.prefix and text.startswith(" ") else text

    # ------------------------------------------------------------------------- files

    def save(self, path) -> None:
        """Write a version 2 tokenizer file (the whole definition, a token or a merge per line),
        atomically and durably."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f' "format": "{FORMAT}"', f' "version": {VERSION}']
        for key, value in self._definition().items():
            if key in ("special_tokens", "vocab", "merges"):
                if isinstance(value, dict):
                    items, brackets = [f"{_json(k)}: {v}" for k, v in value.items()], "{}"
                else:
                    items, brackets = list(map(_json, value)), "[]"
                lines.append(
                    f' "{key}": {brackets[0]}\n  ' + ",\n  ".join(items) + f"\n {brackets[1]}"
                )
            else:
                lines.append(f' "{key}": {_json(value)}')
        write_atomic(path, "{\n" + ",\n".join(lines) + "\n}\n")

    @classmethod
    def from_definition(cls, obj: dict) -> "ImportedTokenizer":
        """The tokenizer of a version 2 file's content (see _definition)."""
        kinds = {
            "merge_rule": str,
            "patterns": list,
            "symbols": str,
            "space_marker": (str, type(None)),
            "prefix": (str, type(None)),
            "ignore_merges": bool,
            "bos": (str, type(None)),
            "eos": (str, type(None)),
            "special_tokens": dict,
            "byte_tokens": list,
            "vocab": list,
            "merges": list,
        }
        for key, kind in kinds.items():
            if not isinstance(obj.get(key, ...), kind):
                raise TokenizerError(f'"{key}" is missing or of the wrong type')
        if not all(isinstance(t, str) or t is None for t in obj["vocab"]):
            raise TokenizerError('"vocab" must hold a string (or null) per id')
        if not all(isinstance(m, list) and len(m) == 2 for m in obj["merges"]):
            raise TokenizerError('"merges" must hold [id, id] pairs')
        try:
            vocab = [
                None if t is None else t.encode("utf-8", "surrogateescape") for t in obj["vocab"]
            ]
        except UnicodeEncodeError:
            raise TokenizerError(
                '"vocab" holds a string that is not bytes written as text'
            ) from None
        return cls(
            obj["patterns"],
            obj["merges"],
            obj["special_tokens"],
            vocab=vocab,
            merge_rule=obj["merge_rule"],
            symbols=obj["symbols"],
            byte_tokens=obj["byte_tokens"],
            space_marker=obj["space_marker"],
            prefix=obj["prefix"],
            ignore_merges=obj["ignore_merges"],
            bos=obj["bos"],
            eos=obj["eos"],
        )


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
    UTF-8, see _definition) as \\u escapes, since UTF-8 cannot hold them."""
    text = json.dumps(value, ensure_ascii=False)
    return re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)
