"""Byte-level BPE tokenizer (GPT-2/GPT-4 style), trained from scratch, tiktoken-compatible.

Text is split into pieces by a regex (GPT-4's), each piece is UTF-8 bytes, and merges never
cross pieces. Token ids: 0..255 are the raw bytes, then one id per merge in the order learned,
then the special tokens. `mergeable_ranks` and `special_tokens` are exactly what
`tiktoken.Encoding(name, pat_str=tok.pattern, mergeable_ranks=..., special_tokens=...)` takes,
and `encode` gives the same ids as tiktoken.

    python tokenizer.py --input data/tinyshakespeare.txt --vocab-size 4096 --out out/tok.json
"""
import argparse
import hashlib
import heapq
import json
import os
import re
import sys
import time
from array import array
from collections import Counter, defaultdict, deque
from functools import partial
from itertools import chain, groupby
from pathlib import Path
from typing import Iterable

import regex

GPT4_SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
# The same pattern for pure-ASCII text, where \p{L}, \p{N} and \s reduce to plain classes.
# The stdlib `re` runs it about twice as fast as `regex` runs the Unicode one, and the split
# is most of the cost of encoding. tests/test_tokenizer.py checks the two agree on ASCII.
_WS = r"\t\n\x0b\x0c\r "
_GPT4_ASCII_PATTERN = (rf"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?+[A-Za-z]+|[0-9]{{1,3}}"""
                       rf"""| ?[^{_WS}A-Za-z0-9]++[\r\n]*|[{_WS}]*[\r\n]|[{_WS}]+(?![^{_WS}])|[{_WS}]+""")
EOT = "<|endoftext|>"
FORMAT = "minillama-bpe"
VERSION = 1
_CACHE_LIMIT = 1 << 20  # pieces; the encode cache is cleared when full so data prep over GBs stays bounded


class TokenizerError(ValueError):
    """A tokenizer file or training input that cannot be used; the message says why."""


# ----------------------------------------------------------------------------- training

# No GPT-4 piece runs from a newline into a following non-space character, so text can be cut
# there and each part split on its own with the same result: the ASCII fast path uses that, and
# data.py uses it to read large files in pieces.
SAFE_CUT = re.compile(r"(?<=\n)(?=\S)")


def _splitter(pattern: str):
    """Return a function text -> list of pieces, using the fast ASCII pattern where it applies:
    on the whole text, or on the runs of ASCII lines of mostly-ASCII text."""
    findall = regex.compile(pattern).findall
    if pattern != GPT4_SPLIT_PATTERN:
        return findall
    ascii_findall = re.compile(_GPT4_ASCII_PATTERN).findall

    def split(text):
        if text.isascii():
            return ascii_findall(text)
        pieces = []
        for is_ascii, lines in groupby(SAFE_CUT.split(text), str.isascii):
            pieces += (ascii_findall if is_ascii else findall)("".join(lines))
        return pieces
    return split


def _count_pieces(texts: Iterable[str], pattern: str, special_tokens, max_bytes) -> Counter:
    """Count each distinct piece once over the whole stream (the only pass over the corpus).
    Special tokens are cut out first so that no piece straddles one. With max_bytes, reading
    stops after that many UTF-8 bytes, i.e. training uses a prefix sample."""
    split = _splitter(pattern)
    cut = re.compile("|".join(map(re.escape, sorted(special_tokens, key=len, reverse=True)))).split if special_tokens else None
    counts, seen = Counter(), 0
    for text in texts:
        if max_bytes is not None:
            if seen >= max_bytes:
                break
            raw = text.encode("utf-8")
            seen += len(raw)
            if seen > max_bytes:
                text = raw[:len(raw) - (seen - max_bytes)].decode("utf-8", "ignore")
        for part in cut(text) if cut else (text,):
            counts.update(split(part))
    return counts


def _learn_merges(counts: dict, n_merges: int, verbose: bool) -> list:
    """Learn n_merges merges by incremental BPE.

    Each distinct piece is a str whose characters are token ids (chr(id)), so a merge is one
    C-speed str.replace. pair_counts holds the frequency-weighted count of every adjacent pair
    and where[pair] the pieces that may contain it (a list,
    smaller than a set); a merge only visits those pieces and only
    adjusts the pairs next to each merged occurrence. A max-heap gives the next pair, with lazy
    invalidation: counts of existing pairs only ever fall, so a popped entry whose count is stale
    is pushed back with its current count; pairs born in a merge are pushed after it.
    Tie-break (deterministic): highest count, then the smallest (left id, right id).
    """
    words = [w.encode("utf-8").decode("latin-1") for w in counts]  # char i == byte i
    freqs = list(counts.values())
    pair_counts, where = defaultdict(int), defaultdict(list)
    for i, (w, f) in enumerate(zip(words, freqs)):
        for k in range(len(w) - 1):
            pair = w[k:k + 2]
            pair_counts[pair] += f
            where[pair].append(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    vocab = [bytes([i]) for i in range(256)]
    known = set(vocab)
    merges, start = [], time.perf_counter()
    while len(merges) < n_merges:
        if not heap:
            raise TokenizerError(f"the training text is too small: it only allows {len(merges)} merges, "
                                 f"{n_merges} are needed; use more text or a smaller vocab_size")
        neg, pair = heapq.heappop(heap)
        count = pair_counts[pair]
        if count != -neg:
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        a, b = map(ord, pair)
        new_bytes = vocab[a] + vocab[b]
        if new_bytes in known:  # tiktoken maps bytes -> id, so two ids may not share bytes: skip
            continue
        new = chr(len(vocab))
        merges.append((a, b))
        vocab.append(new_bytes)
        known.add(new_bytes)
        _apply_merge(pair, new, words, freqs, pair_counts, where, heap)
        if verbose and len(merges) % 1000 == 0:
            rate = len(merges) / (time.perf_counter() - start)
            print(f"merge {len(merges)}/{n_merges} ({rate:.0f} merges/s) count {count}", flush=True)
    return merges


def _apply_merge(pair, new, words, freqs, pair_counts, where, heap):
    """Replace pair by token `new` in every piece that has it, updating only the pairs that touch
    each occurrence: (L, a) -> (L, new) on the left, (b, R) -> (new, R) on the right."""
    a, b = pair
    born, born_where = defaultdict(int), defaultdict(list)  # pairs with `new`: none existed before
    for i in where.pop(pair):
        w = words[i]
        if pair not in w:  # where[] lists are never pruned or deduplicated: skip stale entries
            continue
        f = freqs[i]
        w = words[i] = w.replace(pair, new)
        last = len(w) - 1
        j = w.find(new)
        while j != -1:
            if j > 0:
                left = w[j - 1]
                pair_counts[(b if left == new else left) + a] -= f
                born[left + new] += f
                born_where[left + new].append(i)
            if j < last and w[j + 1] != new:  # a following `new` is handled as that one's left
                right = w[j + 1]
                pair_counts[b + right] -= f
                born[new + right] += f
                born_where[new + right].append(i)
            j = w.find(new, j + 1)
    del pair_counts[pair]
    pair_counts.update(born)
    where.update(born_where)
    for p, c in born.items():
        heapq.heappush(heap, (-c, p))


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """A trained BPE tokenizer: a split pattern, merges in rank order, and special tokens."""

    def __init__(self, pattern: str, merges, special_tokens=(EOT,)):
        self.pattern = pattern
        self.merges = [tuple(m) for m in merges]
        self._vocab = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            self._vocab.append(self._vocab[a] + self._vocab[b])
        self.mergeable_ranks = {tok: i for i, tok in enumerate(self._vocab)}
        if len(self.mergeable_ranks) != len(self._vocab):
            raise TokenizerError("two merges produce the same bytes; the merge list is corrupt")
        self.special_tokens = {s: len(self._vocab) + k for k, s in enumerate(special_tokens)}
        if len(self.special_tokens) != len(special_tokens) or not all(special_tokens):
            raise TokenizerError("special tokens must be distinct non-empty strings")
        self._vocab += [s.encode("utf-8") for s in self.special_tokens]
        self._split = _splitter(pattern)
        self._cache = {}

    @classmethod
    def train(cls, texts, vocab_size: int, special_tokens=(EOT,), pattern=GPT4_SPLIT_PATTERN,
              max_bytes=None, verbose=False) -> "Tokenizer":
        """Learn vocab_size - 256 - len(special_tokens) merges from `texts` (a str or an iterable
        of texts, e.g. data.iter_texts(paths)); see _learn_merges for the algorithm."""
        special_tokens = list(special_tokens)
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is too small: needs at least {256 + len(special_tokens)} "
                             f"(256 bytes + {len(special_tokens)} special tokens)")
        if isinstance(texts, str):
            texts = [texts]
        start = time.perf_counter()
        counts = _count_pieces(texts, pattern, special_tokens, max_bytes)
        if not counts:
            raise ValueError("the training text is empty: pass some text (or check the input files)")
        if verbose:
            print(f"counted {len(counts):,} distinct pieces in {time.perf_counter() - start:.1f}s", flush=True)
        return cls(pattern, _learn_merges(counts, n_merges, verbose), special_tokens)

    def __reduce__(self):  # pickle the definition, not the compiled pattern and the cache
        return Tokenizer, (self.pattern, self.merges, list(self.special_tokens))

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def eos_id(self) -> int:
        """The id that ends every document (and stops sampling)."""
        if EOT not in self.special_tokens:
            raise KeyError(f"this tokenizer has no {EOT} token; train it with special_tokens=({EOT!r},)")
        return self.special_tokens[EOT]

    @property
    def bos_id(self) -> int | None:
        """The id put before every document, or None: tokenizers trained here mark only the end."""
        return None

    def fingerprint(self) -> str:
        """sha256 of what decides the ids (pattern, merges, special tokens), not of a file's bytes:
        the same tokenizer re-indented or re-saved has the same fingerprint."""
        content = json.dumps([self.pattern, self.merges, self.special_tokens], sort_keys=True)
        return hashlib.sha256(content.encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------------- encode

    def _bpe(self, piece: bytes) -> tuple:
        """Encode one piece the way tiktoken does: a whole-piece token if there is one, else
        repeatedly merge the leftmost adjacent pair whose concatenation has the lowest rank."""
        ranks = self.mergeable_ranks
        if piece in ranks:
            return (ranks[piece],)
        parts = [piece[i:i + 1] for i in range(len(piece))]
        none = len(ranks)
        pair_ranks = [ranks.get(x + y, none) for x, y in zip(parts, parts[1:])]
        while pair_ranks:
            best = min(pair_ranks)
            if best == none:
                break
            i = pair_ranks.index(best)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], none)
            if i < len(pair_ranks):
                pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], none)
        return tuple(map(ranks.__getitem__, parts))

    def encode_ordinary(self, text: str) -> list:
        """Encode text, treating special tokens' text as plain text."""
        pieces = self._split(text)
        cache = self._cache
        ids = list(map(cache.get, pieces))  # the common all-hits case never loops in Python
        if None in ids:
            if len(cache) > _CACHE_LIMIT:
                cache.clear()
            for piece in set(pieces).difference(cache):
                cache[piece] = self._bpe(piece.encode("utf-8"))
            ids = list(map(cache.__getitem__, pieces))
        return list(chain.from_iterable(ids))

    def encode(self, text: str, allowed_special="none") -> list:
        """Encode text; special tokens named in allowed_special ("all", "none" or a set of
        names) become their ids. Any other special token's text in `text` is an error, as in
        tiktoken, because silently encoding it as text is usually a data bug."""
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        elif allowed_special == "none":
            allowed = set()
        else:
            allowed = set(allowed_special)
            if unknown := allowed - set(self.special_tokens):
                raise ValueError(f"unknown special tokens {sorted(unknown)}; this tokenizer has {list(self.special_tokens)}")
        for s in self.special_tokens:
            if s not in allowed and s in text:
                raise ValueError(f"text contains the special token {s!r}; pass allowed_special={{{s!r}}} "
                                 f"(or 'all') to encode it as a special token, or use encode_ordinary")
        if not allowed or not any(s in text for s in allowed):
            return self.encode_ordinary(text)
        ids = []
        specials = sorted(allowed, key=len, reverse=True)  # longest first, in case one contains another
        for k, part in enumerate(re.split("(" + "|".join(map(re.escape, specials)) + ")", text)):
            ids.extend([self.special_tokens[part]] if k % 2 else self.encode_ordinary(part))
        return ids

    def encode_batch(self, texts, num_workers=None, allowed_special="none") -> list:
        """encode() each text, spread over worker processes when the input is big enough to pay
        for starting them. allowed_special=None encodes every text with encode_ordinary."""
        texts = list(texts)
        if sum(map(len, texts)) < 1 << 20:
            num_workers = 1
        return [ids.tolist() for ids in self.encode_stream(texts, num_workers, allowed_special)]

    def encode_stream(self, texts, num_workers=None, allowed_special="none"):
        """Yield the encoding of each text of an iterable, in order, as an array('I') of ids.

        Worker processes get the tokenizer itself (pickled by __reduce__) and texts in ~256K-
        character chunks (big enough to amortise the transfer, small enough to balance the
        workers); at most two chunks per worker are in flight, so memory stays bounded for a
        corpus of any size. Each chunk comes back as one flat array and is only sliced, never
        turned into Python ints. A worker that dies (out of memory, killed) raises
        BrokenProcessPool at once instead of leaving the caller waiting.
        """
        encode = self.encode_ordinary if allowed_special is None else partial(self.encode, allowed_special=allowed_special)
        num_workers = os.cpu_count() if num_workers is None else num_workers
        if num_workers <= 1:
            for text in texts:
                yield array("I", encode(text))
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
        """The exact bytes of a sequence of ids."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays, torch tensors
        if ids and (min(ids) < 0 or max(ids) >= len(self._vocab)):
            bad = next(i for i in ids if not 0 <= i < len(self._vocab))
            raise ValueError(f"token id {bad} is out of range for vocab_size {len(self._vocab)}")
        return b"".join(map(self._vocab.__getitem__, ids))

    def decode(self, ids) -> str:
        """Decode to text; bytes that are not valid UTF-8 (e.g. a character split across a
        cut-off sequence) become U+FFFD instead of raising."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------------- files

    def save(self, path) -> None:
        """Write one human-readable JSON file, atomically (a crash never leaves half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps({"format": FORMAT, "version": VERSION, "pattern": self.pattern,
                             "special_tokens": self.special_tokens}, indent=1, ensure_ascii=False)
        merges = ",\n  ".join(f"[{a}, {b}]" for a, b in self.merges)
        text = header[:-2] + f',\n "merges": [\n  {merges}\n ]\n}}\n'
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Read a file written by save(); anything else raises TokenizerError saying why."""
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: not valid JSON, the file is corrupt or truncated ({e})") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise TokenizerError(f'{path}: not a {FORMAT} tokenizer file (no "format": "{FORMAT}" field); '
                                 f"train one with `python tokenizer.py`")
        if obj.get("version") != VERSION:
            raise TokenizerError(f"{path}: tokenizer file version {obj.get('version')!r} is not supported "
                                 f"(this code reads version {VERSION})")
        pattern, merges, specials = obj.get("pattern"), obj.get("merges"), obj.get("special_tokens")
        if not (isinstance(pattern, str) and isinstance(merges, list) and isinstance(specials, dict)):
            raise TokenizerError(f'{path}: "pattern", "merges" or "special_tokens" is missing or of the wrong type')
        for rank, m in enumerate(merges, 256):
            if not (isinstance(m, list) and len(m) == 2 and all(type(x) is int and 0 <= x < rank for x in m)):
                raise TokenizerError(f"{path}: merge {rank - 256} is {m!r}, expected [id, id] of earlier tokens")
        if list(specials.values()) != list(range(256 + len(merges), 256 + len(merges) + len(specials))):
            raise TokenizerError(f"{path}: special token ids must follow the merges contiguously")
        try:
            regex.compile(pattern)
        except regex.error as e:
            raise TokenizerError(f"{path}: invalid split pattern ({e})") from None
        return cls(pattern, merges, list(specials))


_worker_tokenizer = None  # set in each encode_stream worker process


def _init_worker(tokenizer, allowed_special, cache):
    global _worker_tokenizer
    tokenizer._cache = cache
    _worker_tokenizer = (tokenizer, allowed_special)


def _encode_chunk(texts):
    """Encode a list of texts; one flat array pickles far faster than a list of int lists."""
    tok, allowed_special = _worker_tokenizer
    flat, lengths = array("I"), []
    for text in texts:
        ids = tok.encode_ordinary(text) if allowed_special is None else tok.encode(text, allowed_special)
        flat.extend(ids)
        lengths.append(len(ids))
    return flat, lengths


def _chunks(texts, chunk_chars):
    """Group an iterable of texts into lists of about chunk_chars characters."""
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _unpack(flat, lengths):
    """Slices of one flat array of ids, one per text."""
    position = 0
    for n in lengths:
        yield flat[position:position + n]
        position += n


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train a byte-level BPE tokenizer and save it as JSON.")
    p.add_argument("--input", nargs="+", required=True, help="text files, .jsonl files or folders")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="where to write the tokenizer JSON")
    p.add_argument("--max-bytes", type=int, default=None, help="train on only the first N bytes of input")
    args = p.parse_args(argv)
    from data import iter_texts  # the corpus reader (files, folders, .jsonl), streamed in pieces
    try:
        start = time.perf_counter()
        tok = Tokenizer.train(iter_texts(args.input), args.vocab_size, max_bytes=args.max_bytes, verbose=True)
        print(f"trained vocab_size {tok.vocab_size} in {time.perf_counter() - start:.1f}s")
        tok.save(args.out)
        n_bytes = n_tokens = 0
        for text in iter_texts(args.input):
            n_bytes += len(text.encode("utf-8"))
            n_tokens += len(tok.encode_ordinary(text))
            if args.max_bytes is not None and n_bytes >= args.max_bytes:
                break
        print(f"saved {args.out}; compression on the input: {n_bytes / max(n_tokens, 1):.2f} bytes/token")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
