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
from itertools import chain, compress, groupby, islice
from pathlib import Path
from typing import Iterable

import numpy as np
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


DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes that training may hold in its own structures (2 GiB)

# Training holds its sample as one array of token ids, one position per byte of text. Every
# piece ends with byte 0xFF, and a position merged into the token on its left is set to 0xFE:
# UTF-8 uses neither byte, so neither id ever starts or ends a pair. span[p] is the length in
# bytes of the token that starts at p, also stored at its last byte, so the next token starts
# at p + span[p] and the previous one at p - span[p - 1].
_SEP, _DEAD = 0xFF, 0xFE
# A pair (a, b) is the int a * _PAIR + b: ordered like (a, b), and, _PAIR being odd and not a
# power of two, its low bits (its slot in a dict) mix a and b. A heap entry is -count << 43 | pair.
_PAIR, _MAX_ID, _HEAP_SHIFT = 3_145_739, 1 << 21, 43
_BLOCK = 1 << 18  # positions read at a time when (re)counting pairs: bounds the temporaries
_SLICE = 1 << 17  # occurrences handled at a time in one merge: bounds the temporaries
# The memory model behind the budget; tests/test_tokenizer.py checks it against tracemalloc.
_BYTES_PER_POSITION = 12  # per byte of the sample: ids 2, spans 2, pair positions 4, merge temporaries
_BYTES_PER_PAIR = 240  # per tracked pair: its count, its positions' header, two dict entries
_BYTES_PER_HEAP_ENTRY = 56
_BYTES_PER_OCCURRENCE = 72  # temporaries of a merge, per occurrence of the pair merged
_BYTES_PER_BLOCK_POSITION = 80  # temporaries of (re)counting, per position of a block or slice
_DICT_SHARE = 8  # the piece-count dict may use 1/8 of the budget before its rarest pieces move out


def _count_pieces(texts: Iterable[str], pattern: str, special_tokens, max_bytes, memory_budget, verbose=False):
    """Read texts, split them into pieces and count the pieces: the only pass over the corpus.

    Special tokens are cut out first so that no piece straddles one. Reading stops at the end
    of texts, after max_bytes UTF-8 bytes, or when training on what was read would need more
    than memory_budget (_training_memory): so texts should come in an order where any prefix
    is a fair sample of the corpus. Distinct pieces are counted in a dict; when it outgrows
    1/_DICT_SHARE of the budget, its rarer half moves out to a _Sample. A piece seen again
    later starts a new entry: its count is then split over two entries, which changes no
    pair count. Returns the _Sample and a line saying what was read.
    """
    split = _splitter(pattern)
    cut = re.compile("|".join(map(re.escape, sorted(special_tokens, key=len, reverse=True)))).split if special_tokens else None
    counts, sample, n_read = Counter(), _Sample(), 0
    entry_bytes, entry_positions, top_pair_share, measure_at = 200, 20, 1 / 16, 1 << 14  # until measured
    reason, start = "the end of the input", time.perf_counter()
    for text in _parts(texts, pattern):
        if max_bytes is not None and n_read >= max_bytes:
            reason = f"max_bytes ({max_bytes:,})"
            break
        try:
            n = len(text) if text.isascii() else len(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise TokenizerError(f"the training text is not valid Unicode ({e.reason} at character {e.start}); "
                                 f"read files with errors='replace'") from None
        if max_bytes is not None and n_read + n > max_bytes:
            text = text.encode("utf-8")[:max_bytes - n_read].decode("utf-8", "ignore")
            n = max_bytes - n_read
        for part in cut(text) if cut else (text,):
            counts.update(split(part))
        n_read += n
        if len(counts) >= measure_at:  # measure again each time the dict doubles
            entry_bytes, entry_positions, top_pair_share = _dict_size(counts)
            measure_at = 2 * len(counts)
        if len(counts) * entry_bytes > memory_budget // _DICT_SHARE:
            counts = sample.add(counts)
            entry_bytes, entry_positions, top_pair_share = _dict_size(counts)
            measure_at = max(2 * len(counts), 1 << 14)
        in_dict = len(counts) * entry_positions
        need = _training_memory(sample.size + in_dict, sample.top_pair() + top_pair_share * in_dict)
        if need > memory_budget:
            reason = f"the memory budget ({memory_budget / 2**20:,.0f} MiB)"
            break
        if verbose and n_read >> 26 != (n_read - n) >> 26:  # every 64 MB
            print(f"sampling for the tokenizer: {n_read / 1e6:,.0f} MB read ({n_read / 1e6 / (time.perf_counter() - start):.1f} MB/s), "
                  f"{need / memory_budget:.0%} of the memory budget", flush=True)
    sample.add(counts, everything=True)
    return sample, (f"tokenizer sample: {n_read / 1e6:,.2f} MB of text read, {sample.pieces:,} pieces kept "
                    f"({sample.size / 1e6:,.2f} MB), stopped at {reason}")


def _training_memory(positions, largest_pair):
    """The memory model: bytes that training needs for a sample of `positions` bytes whose most
    frequent pair occurs `largest_pair` times."""
    return positions * _BYTES_PER_POSITION + _temporaries(positions, largest_pair)


def _temporaries(positions, largest_pair):
    """Bytes for the temporaries of counting pairs a block at a time and of the largest merge."""
    return (8 << 20) + min(positions, max(_BLOCK, _SLICE)) * _BYTES_PER_BLOCK_POSITION + largest_pair * _BYTES_PER_OCCURRENCE


def _parts(texts, pattern, size=1 << 20):
    """The texts, with those over `size` characters cut into parts of about that size where the
    GPT-4 pattern would cut anyway (SAFE_CUT), so that reading can stop inside a huge text."""
    for text in texts:
        if len(text) <= 2 * size or pattern != GPT4_SPLIT_PATTERN:
            yield text
            continue
        start = 0
        while cut := SAFE_CUT.search(text, start + size):
            yield text[start:cut.start()]
            start = cut.start()
        yield text[start:]


def _dict_size(counts):
    """Measured on up to 4096 entries of a piece-count dict: its bytes and positions per entry,
    and the share of those positions that start its most frequent byte pair."""
    if not counts:
        return 200, 20, 1 / 16
    keys = list(islice(counts, 4096))
    pieces = b"\xff".join(piece.encode("utf-8") for piece in keys)
    entry = sys.getsizeof(counts) / len(counts) + sum(map(sys.getsizeof, keys)) / len(keys) + 32  # + the count
    return entry, (len(pieces) + 1) / len(keys), _byte_pairs(pieces).max() / (len(pieces) + 1)


def _byte_pairs(blob: bytes):
    """How often each pair of bytes (first << 8 | second) occurs in blob, outside 0xFF."""
    counts, b = np.zeros(1 << 16, np.int64), np.frombuffer(blob, np.uint8)
    for lo in range(0, len(b) - 1, _BLOCK):  # a block at a time: few temporaries
        first, second = b[lo:lo + _BLOCK], b[lo + 1:lo + _BLOCK + 1]
        first = first[:len(second)]
        codes = first.astype(np.uint16) << 8 | second
        counts += np.bincount(codes[(first != _SEP) & (second != _SEP)], minlength=1 << 16)
    return counts


class _Sample:
    """The pieces kept for training, grouped by count: for each count, byte strings of UTF-8
    pieces each followed by 0xFF; with their number, their size in bytes (= positions), the
    longest piece, and how often each byte pair occurs in them (for the memory model)."""

    def __init__(self):
        self.blobs, self.pieces, self.size, self.longest = defaultdict(list), 0, 0, 0
        self.byte_pairs = np.zeros(1 << 16, np.int64)

    def top_pair(self) -> int:
        return int(self.byte_pairs.max())

    def add(self, counts, everything=False):
        """Move the pieces of counts seen at most as often as the median piece (all with
        everything=True) here; return a dict of the pieces left (a new one: deleting entries
        does not shrink a dict)."""
        limit = float("inf")
        if not everything:  # the smallest count such that the pieces seen at most that often are half
            total = 0
            for limit, n in sorted(Counter(counts.values()).items()):
                total += n
                if 2 * total >= len(counts):
                    break
        left, by_count = Counter(), defaultdict(list)
        for piece, count in counts.items():
            if count <= limit:
                by_count[count].append(piece)
            else:
                left[piece] = count
        del counts
        for count, pieces in by_count.items():
            # U+DCFF is byte 0xFF under surrogateescape; no piece has it (the text's UTF-8 was checked)
            blob = "\udcff".join(pieces).encode("utf-8", "surrogateescape") + b"\xff"
            self.blobs[count].append(blob)
            ends = np.flatnonzero(np.frombuffer(blob, np.uint8) == _SEP)
            self.pieces, self.size = self.pieces + len(pieces), self.size + len(blob)
            self.longest = max(self.longest, int(ends[0]), int(np.diff(ends).max(initial=1)) - 1)
            self.byte_pairs += _byte_pairs(blob)
        return left


class _Pairs:
    """BPE training state over the sample held in arrays (see _SEP above).

    Pair counts are exact sums of piece counts. A pair is tracked (its count in `counts`, the
    positions where it may occur in `where`, an entry in `heap`) when its count is at least
    `threshold`. Most pairs are rarer (in Chinese, millions of pairs of characters), and not
    tracking them keeps memory bounded. This loses nothing: only pairs born in a merge are
    new (and their count is known then), every other count can only fall, so whenever the
    heap's top count is at least `threshold` it is the most frequent pair of all. When the heap
    runs out of such pairs, all pairs are counted again with a lower threshold (index). The
    threshold starts at 2 + (sample size / 16M): in a sample that size the merges of a
    32k vocabulary never come near such counts. It rises when the tracked pairs outgrow the
    memory budget (prune): then the rarest are dropped, and counted again if they are needed.
    """

    def __init__(self, sample, vocab_size, memory_budget, verbose=False):
        size, stored = 1 + sample.size, sample.blobs
        self.tok = np.empty(size, np.uint16 if vocab_size <= 1 << 16 else np.int32)
        self.tok[0] = _SEP
        starts, weights, position = [], [], 1
        for count in sorted(stored):  # pieces grouped by count: a position's count is one search away
            starts.append(position)
            weights.append(count)
            for blob in stored.pop(count):
                self.tok[position:position + len(blob)] = np.frombuffer(blob, np.uint8)
                position += len(blob)
        self.starts, self.weights = np.array(starts, np.int64), np.array(weights, np.int64)
        self.span = np.ones(size, np.uint16 if sample.longest < 1 << 16 else np.int32)
        self.positions = np.int32 if size < 1 << 31 else np.int64
        self.budget, self.prune_above, self.verbose = memory_budget, memory_budget, verbose
        self.threshold, self.n_ids = 2 + (size >> 24), 256
        self.counts, self.where, self.heap, self.where_bytes, self.skipped, self.largest = {}, {}, [], 0, set(), 0

    def memory(self) -> int:
        """Estimated bytes held by the training structures (what the budget bounds)."""
        return (self.tok.nbytes + self.span.nbytes + self.where_bytes + len(self.counts) * _BYTES_PER_PAIR
                + len(self.heap) * _BYTES_PER_HEAP_ENTRY + _temporaries(len(self.tok), self.largest))

    def weight(self, positions):
        """The count of the piece at each position."""
        if len(self.weights) == 1:
            return np.full(len(positions), self.weights[0], np.int64)
        return self.weights[np.searchsorted(self.starts, positions, "right") - 1]

    def pairs_in(self, lo):
        """(left ids, right ids, positions) of the pairs that start in tok[lo:lo + _BLOCK]."""
        tok, span = self.tok, self.span
        p = np.flatnonzero((tok[lo:lo + _BLOCK] | 1) != _SEP) + lo  # token starts: not 0xFE or 0xFF
        right = tok[p + span[p]]
        p = p[right != _SEP]
        return tok[p].astype(np.int64), right[right != _SEP].astype(np.int64), p.astype(self.positions)

    def index(self):
        """Count every pair and track those seen at least `threshold` times (see the class).
        Two passes over the sample, a block at a time, one for the counts and one for the
        positions; with many distinct pairs, once per part of them (by key) that fits in memory."""
        self.counts, self.where, self.heap, self.where_bytes = {}, {}, [], 0
        dense = self.n_ids <= 1 << 9  # few ids (the start of training): a pair is a bincount slot
        n_parts = 1
        if not dense:  # a part's distinct pairs take ~80 bytes each while counted; pairs <= positions
            live = sum(np.count_nonzero((self.tok[lo:lo + _BLOCK] | 1) != _SEP) for lo in range(0, len(self.tok), _BLOCK))
            n_parts = -(-80 * live // max(self.budget - self.memory(), self.budget // 8))
        for part in range(n_parts):
            self._index_part(part, n_parts, dense)
        self.heap = [-count << _HEAP_SHIFT | key for key, count in self.counts.items()]
        heapq.heapify(self.heap)
        self.largest = max(map(len, self.where.values()), default=0) // np.dtype(self.positions).itemsize

    def _index_part(self, part, n_parts, dense):
        """index() for the pairs whose key % n_parts == part."""
        n_ids, blocks = self.n_ids, range(0, len(self.tok), _BLOCK)

        def pairs_in(lo):  # (codes, positions) of this part's pairs that start in tok[lo:lo + _BLOCK]
            a, b, p = self.pairs_in(lo)
            code = a * n_ids + b if dense else a * _PAIR + b
            if n_parts > 1:
                mine = code % n_parts == part
                code, p = code[mine], p[mine]
            return code, p

        if dense:
            totals, sizes = np.zeros(n_ids * n_ids, np.int64), np.zeros(n_ids * n_ids, np.int64)
        counted = []  # sparse: (codes, weighted counts, positions) of blocks, merged now and then
        for lo in blocks:  # pass 1: the weighted count and the number of positions of each pair
            code, p = pairs_in(lo)
            if dense:
                totals += np.bincount(code, self.weight(p), n_ids * n_ids).astype(np.int64)
                sizes += np.bincount(code, None, n_ids * n_ids)
                continue
            code, inverse, n = np.unique(code, return_inverse=True, return_counts=True)
            counted.append((code, np.bincount(inverse, self.weight(p), len(code)).astype(np.int64), n))
            if sum(len(c) for c, _, _ in counted[1:]) > len(counted[0][0]):
                counted = [_merge_counts(counted)]  # the merged part at least doubles each time
        if dense:
            codes = np.flatnonzero(sizes)
            totals, sizes = totals[codes], sizes[codes]
        else:
            codes, totals, sizes = _merge_counts(counted) if counted else (np.zeros(0, np.int64),) * 3
        keys = codes // n_ids * _PAIR + codes % n_ids if dense else codes
        keep = (totals >= self.threshold) & ~np.isin(keys, list(self.skipped))
        codes, keys, totals, sizes = codes[keep], keys[keep], totals[keep], sizes[keep]
        where = [np.empty(size, self.positions) for size in sizes.tolist()]
        filled = [0] * len(where)
        if dense:
            group_of = np.full(n_ids * n_ids, -1, np.int64)
            group_of[codes] = np.arange(len(codes))
        for lo in blocks:  # pass 2: the positions, into arrays of the sizes found
            code, p = pairs_in(lo)
            if dense:
                group = group_of[code]
                found = group >= 0
            else:
                group = np.minimum(np.searchsorted(codes, code), max(len(codes) - 1, 0))
                found = codes[group] == code if len(codes) else np.zeros(len(p), bool)
            group, p = group[found], p[found]
            order = np.argsort(group.astype(np.uint16) if len(codes) <= 1 << 16 else group, kind="stable")
            group, p = group[order], p[order]
            bounds = np.flatnonzero(group[1:] != group[:-1]) + 1
            starts, ends = [0, *bounds.tolist()], [*bounds.tolist(), len(p)]
            for g, s, e in zip(group[starts].tolist() if len(p) else [], starts, ends):
                where[g][filled[g]:filled[g] + e - s] = p[s:e]
                filled[g] += e - s
        for i, (key, count) in enumerate(zip(keys.tolist(), totals.tolist())):
            self.counts[key] = count
            self.where[key], where[i] = where[i].tobytes(), None  # bytes: a smaller header than an array's
        self.where_bytes += int(sizes.sum()) * np.dtype(self.positions).itemsize

    def pop(self):
        """The most frequent pair as (key, count), ties to the smallest key, or None if there is none."""
        while True:
            if self.heap:
                entry = heapq.heappop(self.heap)
                key, count = entry & (1 << _HEAP_SHIFT) - 1, -(entry >> _HEAP_SHIFT)
                current = self.counts.get(key)
                if current != count:  # stale: the pair was merged, dropped, or its count fell
                    if current is not None:
                        heapq.heappush(self.heap, -current << _HEAP_SHIFT | key)
                    continue
                if count >= self.threshold:
                    return key, count
            elif self.threshold == 1:
                return None
            else:
                count = self.threshold
            # An untracked pair may be as frequent as `count`: count them all again.
            self.threshold = max(1, min(count, self.threshold // 2))
            if self.verbose:
                print(f"counting all pairs again, tracking those seen at least {self.threshold} times", flush=True)
            self.index()

    def drop(self, key):
        """Stop tracking a pair (merged, too rare to keep, or never to be merged)."""
        del self.counts[key]
        self.where_bytes -= len(self.where.pop(key))

    def merge(self, key, new):
        """Replace every occurrence of pair `key` = (a, b) by token `new`, left to right, and move
        the counts of the pairs around each occurrence: (L, a) -> (L, new), (b, R) -> (new, R)."""
        a, b = divmod(key, _PAIR)
        tok, span = self.tok, self.span
        p = np.frombuffer(self.where[key], self.positions)
        self.drop(key)
        p = p[tok[p] == a]  # where[] keeps positions whose pair has changed since: skip those
        q = p + span[p]
        found = tok[q] == b
        p, q = p[found], q[found]
        if a == b and len(p) > 1:  # in a run of a's, merge the 1st and 2nd, the 3rd and 4th, ...
            index = np.arange(len(p))
            chained = np.concatenate([[False], p[1:] == q[:-1]])
            keep = (index - np.maximum.accumulate(np.where(chained, 0, index))) % 2 == 0
            p, q = p[keep], q[keep]
        r = q + span[q]
        # When occurrence i + 1 starts where occurrence i ends, the pair between them, (b, a) ->
        # (new, new), is handled once, as the left side of occurrence i + 1.
        follows = np.concatenate([[False], p[1:] == r[:-1], [False]])
        adjacent, weight = follows.any(), self.weight(p)
        lefts, left_positions, rights = [], [], []  # per slice: the neighbours of each occurrence
        for s in range(0, len(p), _SLICE):
            ps, qs, rs = p[s:s + _SLICE], q[s:s + _SLICE], r[s:s + _SLICE]
            left_pos = ps - span[ps - 1]
            left, right = tok[left_pos], tok[rs]
            if adjacent:
                after = np.flatnonzero(follows[s:s + len(ps)])
                left_pos[after], left[after] = p[s + after - 1], new
                right[follows[s + 1:s + 1 + len(ps)]] = _SEP  # counted as the next one's left side
            lefts.append(left)
            left_positions.append(left_pos)
            rights.append(right)
            length = span[ps] + span[qs]
            tok[ps], tok[qs], span[ps], span[rs - 1] = new, _DEAD, length, length
        self.n_ids = new + 1
        counts, where, threshold = self.counts, self.where, self.threshold
        for side, (id_slices, position_slices) in enumerate(((lefts, left_positions), (rights, [p]))):
            ids, sums, starts, positions = _group(_joined(id_slices), _joined(position_slices), weight)
            id_slices.clear()  # free them before the other side's temporaries
            position_slices.clear()
            starts = [*starts.tolist(), len(positions)]
            for i, (neighbour, count) in enumerate(zip(ids.tolist(), sums.tolist())):
                if neighbour == _SEP:  # the start or the end of a piece
                    continue
                if side == 0:
                    lost, born = (b if neighbour == new else neighbour) * _PAIR + a, neighbour * _PAIR + new
                else:
                    lost, born = b * _PAIR + neighbour, new * _PAIR + neighbour
                old = counts.get(lost)
                if old is not None:
                    if old > count:
                        counts[lost] = old - count
                    else:
                        self.drop(lost)
                if count >= threshold:
                    counts[born] = count
                    where[born] = born_positions = positions[starts[i]:starts[i + 1]].tobytes()
                    self.where_bytes += len(born_positions)
                    heapq.heappush(self.heap, -count << _HEAP_SHIFT | born)

    def prune(self, ceiling):
        """Called when over budget. Drop the rarest tracked pairs, all those below a new threshold,
        so that the pairs take at most half of the memory left to them, but keep those at least
        half as frequent as the last merge (`ceiling`): they may be next. Compact the heap."""
        keys = list(self.counts)
        counts = np.fromiter(self.counts.values(), np.int64, len(keys))
        sizes = np.fromiter(map(len, self.where.values()), np.int64, len(keys))
        self.largest = int(sizes.max(initial=0)) // np.dtype(self.positions).itemsize  # merges get smaller
        self.heap = []  # rebuilt below: one entry per pair
        sizes += _BYTES_PER_PAIR + _BYTES_PER_HEAP_ENTRY
        rest = self.memory() - self.where_bytes - len(keys) * _BYTES_PER_PAIR
        if rest + sizes.sum() > self.budget and rest < self.budget:  # else pruning does not help
            order = np.argsort(counts, kind="stable")
            kept = np.cumsum(sizes[order][::-1])[::-1]  # kept[i]: the memory of the pairs order[i:]
            i = int(np.searchsorted(-kept, -(self.budget - rest) // 2))  # the first i with kept[i] <= room / 2
            threshold = min(int(counts[order[i]]) if i < len(keys) else ceiling, ceiling // 2)
            if threshold > self.threshold:
                for key in compress(keys, (counts < threshold).tolist()):
                    self.drop(key)
                self.threshold = threshold
                if self.verbose:
                    print(f"memory budget: tracking only the pairs seen at least {threshold} times", flush=True)
        self.heap = [-count << _HEAP_SHIFT | key for key, count in self.counts.items()]
        heapq.heapify(self.heap)
        self.prune_above = max(self.budget, self.memory() + self.budget // 8)  # not at every merge


def _merge_counts(counted):
    """Add up a list of (sorted codes, counts, sizes) into one."""
    codes, inverse = np.unique(np.concatenate([c for c, _, _ in counted]), return_inverse=True)
    totals = np.bincount(inverse, np.concatenate([t for _, t, _ in counted]), len(codes)).astype(np.int64)
    return codes, totals, np.bincount(inverse, np.concatenate([s for _, _, s in counted]), len(codes)).astype(np.int64)


def _group(ids, positions, weights):
    """Sort occurrences by id, stably (each id's positions stay in order). Returns the distinct
    ids, their summed weights, where each one's run starts, and the positions in that order."""
    if not len(ids):
        return ids, weights, np.zeros(0, np.int64), positions
    order = np.argsort(ids, kind="stable")  # a radix sort for 16-bit ids
    ids = ids[order]
    starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
    return ids[starts], np.add.reduceat(weights[order], starts), starts, positions[order]


def _joined(arrays):
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _learn_merges(pairs: _Pairs, n_merges: int, verbose: bool) -> list:
    """Learn n_merges merges: repeatedly merge the most frequent pair (ties: the smallest
    (left id, right id)) everywhere in the sample, as plain BPE does (_Pairs says how it stays
    exact in bounded memory). A pair whose bytes are already a token is skipped: tiktoken maps
    bytes -> id, so two ids may not share bytes."""
    vocab = [bytes([i]) for i in range(256)]
    known = set(vocab)
    merges, start = [], time.perf_counter()
    pairs.index()
    while len(merges) < n_merges:
        top = pairs.pop()
        if top is None:
            raise TokenizerError(f"the training text is too small: it only allows {len(merges)} merges, "
                                 f"{n_merges} are needed; use more text or a smaller vocab_size")
        key, count = top
        a, b = divmod(key, _PAIR)
        new_bytes = vocab[a] + vocab[b]
        if new_bytes in known:
            pairs.skipped.add(key)
            pairs.drop(key)
            continue
        merges.append((a, b))
        vocab.append(new_bytes)
        known.add(new_bytes)
        pairs.merge(key, len(vocab) - 1)
        if pairs.memory() > pairs.prune_above:
            pairs.prune(count)
        if verbose and len(merges) % 1000 == 0:
            elapsed = time.perf_counter() - start
            print(f"merge {len(merges)}/{n_merges} ({len(merges) / elapsed:.0f} merges/s, "
                  f"ETA {elapsed * (n_merges / len(merges) - 1):.0f}s) count {count}, "
                  f"memory {pairs.memory() / 2**30:.2f} GiB", flush=True)
    return merges


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
              max_bytes=None, memory_budget=DEFAULT_MEMORY_BUDGET, verbose=False) -> "Tokenizer":
        """Learn vocab_size - 256 - len(special_tokens) merges from `texts` (a str or an iterable
        of texts, e.g. data.iter_texts(paths)).

        memory_budget (bytes, default 2 GiB) bounds the trainer's own structures whatever the
        corpus size and language: reading stops as soon as the sample read would need the whole
        budget to train on (_training_memory: about 12 bytes per byte of distinct text kept),
        so texts should come in an order where any prefix is a fair sample of the corpus; so
        does max_bytes. With verbose, a line says what was read and why reading stopped.
        Training is exact on the sample: the merges are those of plain BPE on it. The budget
        gives up no exactness, only the text left unread and, if the pairs outgrow it, time
        to count them again (_Pairs). The process adds the interpreter (~100 MB) to it.
        """
        special_tokens = list(special_tokens)
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is too small: needs at least {256 + len(special_tokens)} "
                             f"(256 bytes + {len(special_tokens)} special tokens)")
        if not memory_budget > 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, not {memory_budget!r}")
        if vocab_size > _MAX_ID:
            raise ValueError(f"vocab_size {vocab_size} is too large: at most {_MAX_ID:,}")
        if isinstance(texts, str):
            texts = [texts]
        start = time.perf_counter()
        sample, report = _count_pieces(texts, pattern, special_tokens, max_bytes, memory_budget, verbose)
        if not sample.pieces:
            raise ValueError("the training text is empty: pass some text (or check the input files)")
        if verbose:
            print(f"{report} ({time.perf_counter() - start:.1f}s)", flush=True)
        pairs = _Pairs(sample, vocab_size, memory_budget, verbose)
        return cls(pattern, _learn_merges(pairs, n_merges, verbose), special_tokens)

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
        return list(self.encode_stream(texts, num_workers, allowed_special))

    def encode_stream(self, texts, num_workers=None, allowed_special="none"):
        """Yield the encoding of each text of an iterable, in order, encoded by worker processes.

        Texts are sent in ~256K-character chunks (big enough to amortise the transfer, small
        enough to balance the workers) and at most two chunks per worker are in flight, so memory
        stays bounded for a corpus of any size. Spawn-safe: workers get plain data only.
        """
        encode = self.encode_ordinary if allowed_special is None else partial(self.encode, allowed_special=allowed_special)
        num_workers = os.cpu_count() if num_workers is None else num_workers
        if num_workers <= 1:
            yield from map(encode, texts)
            return
        import multiprocessing
        # Workers start with this process's piece cache: a cold cache encodes ~3x slower.
        cache = self._cache if len(self._cache) <= 1 << 18 else {}
        state = (self.pattern, self.merges, list(self.special_tokens), allowed_special, cache)
        with multiprocessing.get_context().Pool(num_workers, _init_worker, state) as pool:
            pending = deque()
            for chunk in _chunks(texts, 1 << 18):
                pending.append(pool.apply_async(_encode_chunk, (chunk,)))
                if len(pending) >= 2 * num_workers:
                    yield from _unpack(*pending.popleft().get())
            while pending:
                yield from _unpack(*pending.popleft().get())

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


_worker_tokenizer = None  # set in each encode_batch worker process


def _init_worker(pattern, merges, special_tokens, allowed_special, cache):
    global _worker_tokenizer
    _worker_tokenizer = (Tokenizer(pattern, merges, special_tokens), allowed_special)
    _worker_tokenizer[0]._cache = cache


def _encode_chunk(texts):
    """Encode a list of texts; one flat array pickles far faster than a list of int lists."""
    tok, allowed_special = _worker_tokenizer
    encoded = [tok.encode_ordinary(t) if allowed_special is None else tok.encode(t, allowed_special) for t in texts]
    return array("I", chain.from_iterable(encoded)), [len(e) for e in encoded]


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
    flat, position = flat.tolist(), 0
    for n in lengths:
        yield flat[position:position + n]
        position += n


# ----------------------------------------------------------------------------- CLI

def _size(text: str) -> int:
    """'512M', '2G', '1.5G' or a plain number of bytes -> bytes (K, M, G, T are powers of 1024)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 512M or 4G")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train a byte-level BPE tokenizer and save it as JSON.")
    p.add_argument("--input", nargs="+", required=True, help="text files, .jsonl files or folders")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="where to write the tokenizer JSON")
    p.add_argument("--max-bytes", type=int, default=None, help="train on only the first N bytes of input")
    p.add_argument("--memory-budget", type=_size, default=DEFAULT_MEMORY_BUDGET, metavar="SIZE",
                   help="memory that training may use, e.g. 512M or 8G (default 2G): reading stops when "
                        "the sample read would need all of it")
    args = p.parse_args(argv)
    from data import iter_texts  # the corpus reader (files, folders, .jsonl), streamed in pieces
    try:
        start = time.perf_counter()
        tok = Tokenizer.train(iter_texts(args.input), args.vocab_size, max_bytes=args.max_bytes,
                              memory_budget=args.memory_budget, verbose=True)
        print(f"trained vocab_size {tok.vocab_size} in {time.perf_counter() - start:.1f}s")
        tok.save(args.out)
        n_bytes = n_tokens = 0
        for text in iter_texts(args.input):  # a first look at compression: the first 16 MB at most
            n_bytes += len(text.encode("utf-8"))
            n_tokens += len(tok.encode_ordinary(text))
            if n_bytes >= min(args.max_bytes or 16 << 20, 16 << 20):
                break
        print(f"saved {args.out}; compression on the first {n_bytes / 1e6:.1f} MB of the input: "
              f"{n_bytes / max(n_tokens, 1):.2f} bytes/token")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
