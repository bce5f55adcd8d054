"""Byte-level BPE tokenizer (GPT-4 style): trained here, the same ids as tiktoken.

The split pattern cuts text into pieces; in each piece's UTF-8 bytes the adjacent pair making the
lowest-rank token merges until none does. Ids: the 256 bytes, one per merge in training order
(its rank), then special tokens, as `tiktoken.Encoding` takes them. infra/bpe_train.py trains in
bounded memory; other projects' tokenizers are subclasses in infra/tokenizer_variants.py.

    python -m infra.tokenizer_cli --input data/tinyshakespeare.txt --vocab-size 4096 \
        --out out/tok.json
"""

import hashlib
import heapq
import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import regex

GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
EOT = "<|endoftext|>"
FORMAT = "minillama-bpe"  # the "format" field of a tokenizer file
CACHE_LIMIT = 1 << 20  # pieces; the encode cache starts again when full, so memory stays bounded
CACHE_PIECE_CHARS = 256  # longer pieces are not cached


class UserError(ValueError):
    """An error the user can fix; entry points print it as one line. Project errors subclass it."""


class TokenizerError(UserError):
    """A tokenizer file or training input that cannot be used; the message says why."""


def write_atomic(path, data: bytes | str) -> None:
    """Replace path's content with data (str: UTF-8) atomically: a crash leaves old or new whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    finally:
        tmp.unlink(missing_ok=True)


class Tokenizer:
    """Byte-level BPE: a split pattern, merges (the i-th id pair makes 256 + i), special tokens."""

    def __init__(self, pattern=GPT4_SPLIT_PATTERN, merges=(), special_tokens=(EOT,)):
        self.pattern = pattern
        self.merges = [tuple(m) for m in merges]
        self.vocab = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.mergeable_ranks = {token: rank for rank, token in enumerate(self.vocab)}
        if len(self.mergeable_ranks) != len(self.vocab):
            raise TokenizerError("two merges make the same bytes; the merge list is corrupt")
        self.special_tokens = {name: len(self.vocab) + k for k, name in enumerate(special_tokens)}
        if len(self.special_tokens) != len(special_tokens) or not all(self.special_tokens):
            raise TokenizerError("special tokens must be distinct non-empty strings")
        self.eos = EOT if EOT in self.special_tokens else None  # the token that ends a document
        self.bos = None  # the token put before a document: none here
        self._decode_table = self.vocab + [name.encode("utf-8") for name in self.special_tokens]
        try:
            self._regex = regex.compile(pattern)
        except regex.error as e:
            raise TokenizerError(f"invalid split pattern ({e})") from None
        self._special_re = None  # built on first use by encode()
        self._cache = {}  # piece -> its ids
        self.accelerator = None  # a faster encode_ordinary with the same ids (infra/fast_encode.py)

    def __reduce__(self):  # pickle the definition, not the compiled pattern, tables and cache
        return type(self), (self.pattern, self.merges, list(self.special_tokens))

    @property
    def vocab_size(self) -> int:
        """Ids in use: the largest id + 1, special tokens included."""
        return len(self._decode_table)

    @property
    def eos_id(self) -> int:
        """The id that ends every document (and stops sampling)."""
        if self.eos is None:
            raise KeyError(f"this tokenizer has no {EOT} token; train it with {EOT!r} in it")
        return self.special_tokens[self.eos]

    @property
    def bos_id(self) -> int | None:
        """The id put before every document, or None (tokenizers trained here mark only ends)."""
        return None if self.bos is None else self.special_tokens[self.bos]

    def _definition(self):
        """Everything that decides the ids, as JSON values."""
        return [self.pattern, self.merges, self.special_tokens]

    def fingerprint(self) -> str:
        """sha256 of the definition, not of a file's bytes: re-saving keeps the fingerprint."""
        content = json.dumps(self._definition(), sort_keys=True)
        return hashlib.sha256(content.encode("utf-8")).hexdigest()

    @classmethod
    def train(cls, texts, vocab_size: int, special_tokens=(EOT,), pattern=GPT4_SPLIT_PATTERN):
        """Learn vocab_size - 256 - len(special_tokens) merges from texts (a str or an iterable)."""
        special_tokens, least = list(special_tokens), 256 + len(special_tokens)
        if vocab_size < least:
            raise TokenizerError(f"vocab_size {vocab_size} is too small: needs at least {least}")
        split = Tokenizer(pattern, (), ()).split
        names = sorted(special_tokens, key=len, reverse=True)  # cut out, so no piece holds one
        cut = re.compile("|".join(map(re.escape, names))).split if names else lambda text: [text]
        texts = [texts] if isinstance(texts, str) else texts
        counts = Counter(piece for text in texts for part in cut(text) for piece in split(part))
        _require(counts, "the training text is empty: pass some text (or check the input files)")
        return cls(pattern, _learn_merges(counts, vocab_size - least), special_tokens)

    def split(self, text: str) -> list:
        """The text in pieces: the pattern's matches and, as pieces too, any text between them."""
        pieces = self._regex.findall(text)
        if self._regex.groups or sum(map(len, pieces)) != len(text):
            pieces, end = [], 0
            for match in self._regex.finditer(text):
                pieces += filter(None, (text[end : match.start()], match[0]))
                end = match.end()
            pieces += filter(None, (text[end:],))
        return pieces

    def _encode_piece(self, piece: str) -> list:
        """One piece's ids: merge the lowest-rank pair (leftmost on a tie) until none is a token."""
        ranks, raw = self.mergeable_ranks, piece.encode("utf-8")
        if raw in ranks:
            return [ranks[raw]]
        parts = [raw[i : i + 1] for i in range(len(raw))]
        none = len(ranks)  # a rank above every rank: "not a token"
        pair_ranks = [ranks.get(a + b, none) for a, b in zip(parts, parts[1:])]
        while pair_ranks and (best := min(pair_ranks)) != none:
            i = pair_ranks.index(best)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], none)
            if i < len(pair_ranks):
                pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], none)
        return [ranks[part] for part in parts]

    def _encode_pieces(self, pieces: list) -> list:
        """The ids of a list of pieces, each piece encoded once and remembered (text repeats)."""
        cache = self._cache
        if len(cache) > CACHE_LIMIT:
            cache.clear()
        ids = []
        for piece in pieces:
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = self._encode_piece(piece)
                if len(piece) <= CACHE_PIECE_CHARS:
                    cache[piece] = piece_ids
            ids += piece_ids
        return ids

    def encode_ordinary(self, text: str) -> list:
        """Encode text, reading special tokens' text as plain text."""
        if self.accelerator is not None:
            return self.accelerator(text)
        return self._encode_pieces(self.split(text))

    def split_special(self, text: str, allowed_special="none") -> list:
        """[text, special token, text, ...]. A special token not in allowed_special ("all", "none"
        or a set of names) is an error, as in tiktoken: usually a data bug."""
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        else:
            allowed = set() if allowed_special == "none" else set(allowed_special)
            if unknown := sorted(allowed - set(self.special_tokens)):
                raise ValueError(f"unknown special tokens {unknown}; see tokenizer.special_tokens")
        if not self.special_tokens:
            return [text]
        if self._special_re is None:  # longest first, in case one contains another
            names = sorted(self.special_tokens, key=len, reverse=True)
            self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")")
        parts = self._special_re.split(text)
        if disallowed := set(parts[1::2]) - allowed:
            name = sorted(disallowed)[0]
            what = f"allowed_special={{{name!r}}} (or 'all')"
            raise ValueError(f"text holds special token {name!r}: pass {what} or encode_ordinary")
        return parts

    def encode(self, text: str, allowed_special="none") -> list:
        """Encode text; the special tokens named in allowed_special become their ids."""
        ids = []
        for k, part in enumerate(self.split_special(text, allowed_special)):
            ids += [self.special_tokens[part]] if k % 2 else self.encode_ordinary(part)
        return ids

    def decode_bytes(self, ids) -> bytes:
        """The exact bytes of a sequence of ids, so decoding in parts gives the whole."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays, tensors
        table = self._decode_table
        if ids and (min(ids) < 0 or max(ids) >= len(table)):
            bad = next(i for i in ids if not 0 <= i < len(table))
            raise ValueError(f"token id {bad} is out of range for vocab_size {len(table)}")
        if None in (tokens := [table[i] for i in ids]):
            bad = ids[tokens.index(None)]
            raise ValueError(f"token id {bad} is not a token of this tokenizer (an unused id)")
        return b"".join(tokens)

    def decode(self, ids) -> str:
        """Decode to text; bytes that are not UTF-8 (a cut-off character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, path) -> None:
        """Write a readable JSON file (a merge per line), atomically and durably."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        head = {"format": FORMAT, "version": 1, "pattern": self.pattern}
        head["special_tokens"] = self.special_tokens
        head = json.dumps(head, ensure_ascii=False, indent=1)
        merges = ",\n  ".join(f"[{a}, {b}]" for a, b in self.merges)
        write_atomic(path, f'{head[:-2]},\n "merges": [\n  {merges}\n ]\n}}\n')  # a merge a line

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Read a file that save() wrote; anything else raises TokenizerError saying why."""
        try:
            return cls._from_json(Path(path).read_bytes())
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror})") from None
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None

    @classmethod
    def _from_json(cls, raw: bytes) -> "Tokenizer":
        try:
            obj = json.loads(raw)
        except ValueError as e:
            message = f"not valid JSON, the file is corrupt or truncated ({e})"
            raise TokenizerError(message) from None
        ours = isinstance(obj, dict) and obj.get("format") == FORMAT
        _require(ours, f'not a {FORMAT} tokenizer file (no "format": "{FORMAT}" field)')
        version = obj.get("version")
        _require(version == 1, f"version {version!r} is not supported here (load_tokenizer)")
        pattern, merges, specials = obj.get("pattern"), obj.get("merges"), obj.get("special_tokens")
        kinds = [(pattern, str), (merges, list), (specials, dict)]
        _require(all(isinstance(v, t) for v, t in kinds), "a field is missing or of a wrong type")
        for rank, m in enumerate(merges, 256):
            ok = isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m)
            if not (ok and 0 <= min(m) <= max(m) < rank):
                message = f"merge {rank - 256} is {m!r}, expected [id, id] of earlier tokens"
                raise TokenizerError(message)
        ids = [256 + len(merges) + k for k in range(len(specials))]
        _require(list(specials.values()) == ids, "special token ids must follow the merges")
        return cls(pattern, merges, list(specials))


def _require(condition, message: str) -> None:
    if not condition:
        raise TokenizerError(message)


def _learn_merges(counts: Counter, n_merges: int) -> list:
    """Plain BPE over the pieces, weighted by count: merge the most frequent pair (ties: the
    smallest) n_merges times, skipping pairs whose bytes are a token already (as tiktoken). A
    piece is a str of token ids (chr(id)): a merge is one str.replace ("aaa" -> [aa, a])."""
    words = [piece.encode("utf-8").decode("latin-1") for piece in counts]  # char i is byte i
    weights = list(counts.values())
    pair_counts, where = defaultdict(int), defaultdict(list)  # pair -> count, -> its words
    for w, (word, weight) in enumerate(zip(words, weights)):
        for k in range(len(word) - 1):
            pair_counts[word[k : k + 2]] += weight
            where[word[k : k + 2]].append(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    vocab = [bytes([b]) for b in range(256)]
    known, merges = set(vocab), []
    while len(merges) < n_merges:
        if not heap:
            raise TokenizerError(
                f"the training text is too small: it only allows {len(merges)} merges, "
                f"{n_merges} are needed; use more text or a smaller vocab_size"
            )
        negative_count, pair = heapq.heappop(heap)
        count = pair_counts[pair]
        if count != -negative_count:  # stale: the count fell since; push it again if any is left
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        a, b = map(ord, pair)
        if vocab[a] + vocab[b] in known:
            continue
        merges.append((a, b))
        vocab.append(vocab[a] + vocab[b])
        known.add(vocab[-1])
        _apply_merge(pair, chr(len(vocab) - 1), words, weights, pair_counts, where, heap)
    return merges


def _apply_merge(pair: str, new: str, words, weights, pair_counts, where, heap):
    """Replace pair (two token characters) by the token `new` in every word that holds it, and
    move the counts of the pairs around each occurrence: (L, a) -> (L, new), (b, R) -> (new, R)."""
    a, b = pair
    born, born_where = defaultdict(int), defaultdict(list)
    for w in where.pop(pair):
        if pair not in words[w]:  # the pair was taken apart by an earlier merge
            continue
        weight, word = weights[w], words[w].replace(pair, new)
        words[w] = word
        j = word.find(new)
        while j != -1:
            if j > 0:  # the left neighbour; a new token there was b before this merge
                left = word[j - 1]
                pair_counts[(b if left == new else left) + a] -= weight
                born[left + new] += weight
                born_where[left + new].append(w)
            if j < len(word) - 1 and word[j + 1] != new:  # the right one (a new one counts left)
                right = word[j + 1]
                pair_counts[b + right] -= weight
                born[new + right] += weight
                born_where[new + right].append(w)
            j = word.find(new, j + 1)
    del pair_counts[pair]
    pair_counts.update(born)
    where.update(born_where)
    for p, count in born.items():
        heapq.heappush(heap, (-count, p))
