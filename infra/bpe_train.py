"""Training a byte-level BPE tokenizer in memory bounded by a budget (train_tokenizer).

Plain BPE, as tokenizer.py's Tokenizer.train: split the text into pieces with the tokenizer's
pattern, then repeatedly merge the most frequent adjacent pair of tokens (ties: the smallest
(left id, right id)) inside every piece, until the vocabulary is full. What this file adds is
doing it in bounded memory whatever the corpus and its language (in Chinese, with no spaces,
almost every piece is distinct):

1. One pass over the text (_count_pieces): pieces are counted in a dict, whose rarer half moves into
   compact byte strings (_Sample) whenever it outgrows its share of the budget. Reading stops when
   training on what was read would need the whole budget (_training_memory), so callers pass the
   text in an order where any prefix is a fair sample (corpus.sample_texts spreads it over every
   file in proportion to its size). A line says what was read and why reading stopped.
2. The sample as arrays, about 12 bytes per byte of distinct text (_Pairs); only pairs above a
   count threshold are tracked, and the rest are counted again when they are needed.

Training is exact on the sample: the merges are those of Tokenizer.train on it. The budget gives
up only the text left unread and, when the pairs outgrow it, the time to count them again. The
interpreter's own memory comes on top of the budget. `python bench/bench_tokenizer.py --big`
measures it.
"""

import heapq
import re
import sys
import time
from collections import Counter, defaultdict
from itertools import compress, islice
from typing import Iterable

import numpy as np

from infra.fast_encode import SAFE_CUT, WORD_CUT_PATTERNS, splitter
from infra.progress import Progress, note
from tokenizer import EOT, GPT4_SPLIT_PATTERN, Tokenizer, TokenizerError

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
_BYTES_PER_POSITION = (
    12  # per byte of the sample: ids 2, spans 2, pair positions 4, merge temporaries
)
_BYTES_PER_PAIR = 240  # per tracked pair: its count, its positions' header, two dict entries
_BYTES_PER_HEAP_ENTRY = 56
_BYTES_PER_OCCURRENCE = 72  # temporaries of a merge, per occurrence of the pair merged
_BYTES_PER_BLOCK_POSITION = 80  # temporaries of (re)counting, per position of a block or slice
_DICT_SHARE = 8  # the piece-count dict may use 1/8 of the budget before its rarest pieces move out


def _count_pieces(
    texts: Iterable[str], pattern: str, special_tokens, max_bytes, memory_budget, verbose=False
):
    """Read texts, split them into pieces and count the pieces: the only pass over the corpus.

    Special tokens are cut out first so that no piece straddles one. Reading stops at the end
    of texts, after max_bytes UTF-8 bytes, or when training on what was read would need more
    than memory_budget (_training_memory): so texts should come in an order where any prefix
    is a fair sample of the corpus. Distinct pieces are counted in a dict; when it outgrows
    1/_DICT_SHARE of the budget, its rarer half moves out to a _Sample. A piece seen again
    later starts a new entry: its count is then split over two entries, which changes no
    pair count. Returns the _Sample and a line saying what was read.
    """
    split = splitter(pattern)
    cut = (
        re.compile("|".join(map(re.escape, sorted(special_tokens, key=len, reverse=True)))).split
        if special_tokens
        else None
    )
    counts, sample, n_read = Counter(), _Sample(), 0
    # per-entry sizes guessed until _dict_size measures them, at measure_at entries
    entry_bytes, entry_positions, top_pair_share, measure_at = 200, 20, 1 / 16, 1 << 14
    reason = "the end of the input"
    for text in _parts(texts, pattern):
        if max_bytes is not None and n_read >= max_bytes:
            reason = f"max_bytes ({max_bytes:,})"
            break
        try:
            n = len(text) if text.isascii() else len(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise TokenizerError(
                f"the training text is not valid Unicode ({e.reason} at character {e.start}); "
                f"read files with errors='replace'"
            ) from None
        if max_bytes is not None and n_read + n > max_bytes:
            text = text.encode("utf-8")[: max_bytes - n_read].decode("utf-8", "ignore")
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
    sample.add(counts, everything=True)
    return sample, (
        f"tokenizer sample: {n_read / 1e6:,.2f} MB of text read, {sample.pieces:,} pieces kept "
        f"({sample.size / 1e6:,.2f} MB), stopped at {reason}"
    )


def _training_memory(positions, largest_pair):
    """The memory model: bytes that training needs for a sample of `positions` bytes whose most
    frequent pair occurs `largest_pair` times."""
    return positions * _BYTES_PER_POSITION + _temporaries(positions, largest_pair)


def _temporaries(positions, largest_pair):
    """Bytes for the temporaries of counting pairs a block at a time and of the largest merge."""
    return (
        (8 << 20)
        + min(positions, max(_BLOCK, _SLICE)) * _BYTES_PER_BLOCK_POSITION
        + largest_pair * _BYTES_PER_OCCURRENCE
    )


MIN_SAMPLE_BYTES = 64 << 10  # the smallest sample worth training on
# The smallest budget that holds it (whole MiB).
MIN_MEMORY_BUDGET = -(-_training_memory(MIN_SAMPLE_BYTES, MIN_SAMPLE_BYTES) >> 20) << 20


def _parts(texts, pattern, size=1 << 20):
    """The texts, with those over `size` characters cut into parts of about that size where the
    pattern would cut anyway (SAFE_CUT, for WORD_CUT_PATTERNS), so that reading can stop inside a
    huge text."""
    for text in texts:
        if len(text) <= 2 * size or pattern not in WORD_CUT_PATTERNS:
            yield text
            continue
        start = 0
        while cut := SAFE_CUT.search(text, start + size):
            yield text[start : cut.start()]
            start = cut.start()
        yield text[start:]


def _dict_size(counts):
    """Measured on up to 4096 entries of a piece-count dict: its bytes and positions per entry,
    and the share of those positions that start its most frequent byte pair."""
    if not counts:
        return 200, 20, 1 / 16
    keys = list(islice(counts, 4096))
    pieces = b"\xff".join(piece.encode("utf-8") for piece in keys)
    # per entry: its share of the dict, its key, and 32 bytes for its count
    entry = sys.getsizeof(counts) / len(counts) + sum(map(sys.getsizeof, keys)) / len(keys) + 32
    return entry, (len(pieces) + 1) / len(keys), _byte_pairs(pieces).max() / (len(pieces) + 1)


def _byte_pairs(blob: bytes):
    """How often each pair of bytes (first << 8 | second) occurs in blob, outside 0xFF."""
    counts, b = np.zeros(1 << 16, np.int64), np.frombuffer(blob, np.uint8)
    for lo in range(0, len(b) - 1, _BLOCK):  # a block at a time: few temporaries
        first, second = b[lo : lo + _BLOCK], b[lo + 1 : lo + _BLOCK + 1]
        first = first[: len(second)]
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
        if (
            not everything
        ):  # the smallest count such that the pieces seen at most that often are half
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
            # U+DCFF is byte 0xFF under surrogateescape; no piece has it (its UTF-8 was checked)
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
        for count in sorted(
            stored
        ):  # pieces grouped by count: a position's count is one search away
            starts.append(position)
            weights.append(count)
            for blob in stored.pop(count):
                self.tok[position : position + len(blob)] = np.frombuffer(blob, np.uint8)
                position += len(blob)
        self.starts, self.weights = np.array(starts, np.int64), np.array(weights, np.int64)
        self.span = np.ones(size, np.uint16 if sample.longest < 1 << 16 else np.int32)
        self.positions = np.int32 if size < 1 << 31 else np.int64
        self.budget, self.prune_above, self.verbose = memory_budget, memory_budget, verbose
        self.threshold, self.n_ids = 2 + (size >> 24), 256
        self.counts, self.where, self.heap, self.where_bytes, self.skipped, self.largest = (
            {},
            {},
            [],
            0,
            set(),
            0,
        )

    def memory(self) -> int:
        """Estimated bytes held by the training structures (what the budget bounds)."""
        return (
            self.tok.nbytes
            + self.span.nbytes
            + self.where_bytes
            + len(self.counts) * _BYTES_PER_PAIR
            + len(self.heap) * _BYTES_PER_HEAP_ENTRY
            + _temporaries(len(self.tok), self.largest)
        )

    def weight(self, positions):
        """The count of the piece at each position."""
        if len(self.weights) == 1:
            return np.full(len(positions), self.weights[0], np.int64)
        return self.weights[np.searchsorted(self.starts, positions, "right") - 1]

    def pairs_in(self, lo):
        """(left ids, right ids, positions) of the pairs that start in tok[lo:lo + _BLOCK]."""
        tok, span = self.tok, self.span
        # token starts: not 0xFE or 0xFF
        p = np.flatnonzero((tok[lo : lo + _BLOCK] | 1) != _SEP) + lo
        right = tok[p + span[p]]
        p = p[right != _SEP]
        return (
            tok[p].astype(np.int64),
            right[right != _SEP].astype(np.int64),
            p.astype(self.positions),
        )

    def index(self):
        """Count every pair and track those seen at least `threshold` times (see the class).
        Two passes over the sample, a block at a time, one for the counts and one for the
        positions; with many distinct pairs, once per part of them (by key) that fits in memory."""
        self.counts, self.where, self.heap, self.where_bytes = {}, {}, [], 0
        dense = self.n_ids <= 1 << 9  # few ids (the start of training): a pair is a bincount slot
        n_parts = 1
        if (
            not dense
        ):  # a part's distinct pairs take ~80 bytes each while counted; pairs <= positions
            live = sum(
                np.count_nonzero((self.tok[lo : lo + _BLOCK] | 1) != _SEP)
                for lo in range(0, len(self.tok), _BLOCK)
            )
            n_parts = -(-80 * live // max(self.budget - self.memory(), self.budget // 8))
        for part in range(n_parts):
            self._index_part(part, n_parts, dense)
        self.heap = [-count << _HEAP_SHIFT | key for key, count in self.counts.items()]
        heapq.heapify(self.heap)
        self.largest = (
            max(map(len, self.where.values()), default=0) // np.dtype(self.positions).itemsize
        )

    def _index_part(self, part, n_parts, dense):
        """index() for the pairs whose key % n_parts == part."""
        n_ids, blocks = self.n_ids, range(0, len(self.tok), _BLOCK)

        def pairs_in(
            lo,
        ):  # (codes, positions) of this part's pairs that start in tok[lo:lo + _BLOCK]
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
            counted.append(
                (code, np.bincount(inverse, self.weight(p), len(code)).astype(np.int64), n)
            )
            if sum(len(c) for c, _, _ in counted[1:]) > len(counted[0][0]):
                counted = [_merge_counts(counted)]  # the merged part at least doubles each time
        if dense:
            codes = np.flatnonzero(sizes)
            totals, sizes = totals[codes], sizes[codes]
        else:
            codes, totals, sizes = (
                _merge_counts(counted) if counted else (np.zeros(0, np.int64),) * 3
            )
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
            order = np.argsort(
                group.astype(np.uint16) if len(codes) <= 1 << 16 else group, kind="stable"
            )
            group, p = group[order], p[order]
            bounds = np.flatnonzero(group[1:] != group[:-1]) + 1
            starts, ends = [0, *bounds.tolist()], [*bounds.tolist(), len(p)]
            for g, s, e in zip(group[starts].tolist() if len(p) else [], starts, ends):
                where[g][filled[g] : filled[g] + e - s] = p[s:e]
                filled[g] += e - s
        for i, (key, count) in enumerate(zip(keys.tolist(), totals.tolist())):
            self.counts[key] = count
            self.where[key], where[i] = (
                where[i].tobytes(),
                None,
            )  # bytes: a smaller header than an array's
        self.where_bytes += int(sizes.sum()) * np.dtype(self.positions).itemsize

    def pop(self):
        """The most frequent pair as (key, count), ties to the smallest key; None if none is."""
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
                note(f"counting all pairs again, tracking those seen {self.threshold}+ times")
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
            ps, qs, rs = p[s : s + _SLICE], q[s : s + _SLICE], r[s : s + _SLICE]
            left_pos = ps - span[ps - 1]
            left, right = tok[left_pos], tok[rs]
            if adjacent:
                after = np.flatnonzero(follows[s : s + len(ps)])
                left_pos[after], left[after] = p[s + after - 1], new
                right[follows[s + 1 : s + 1 + len(ps)]] = (
                    _SEP  # counted as the next one's left side
                )
            lefts.append(left)
            left_positions.append(left_pos)
            rights.append(right)
            length = span[ps] + span[qs]
            tok[ps], tok[qs], span[ps], span[rs - 1] = new, _DEAD, length, length
        self.n_ids = new + 1
        counts, where, threshold = self.counts, self.where, self.threshold
        for side, (id_slices, position_slices) in enumerate(
            ((lefts, left_positions), (rights, [p]))
        ):
            ids, sums, starts, positions = _group(
                _joined(id_slices), _joined(position_slices), weight
            )
            id_slices.clear()  # free them before the other side's temporaries
            position_slices.clear()
            starts = [*starts.tolist(), len(positions)]
            for i, (neighbour, count) in enumerate(zip(ids.tolist(), sums.tolist())):
                if neighbour == _SEP:  # the start or the end of a piece
                    continue
                if side == 0:
                    lost, born = (
                        (b if neighbour == new else neighbour) * _PAIR + a,
                        neighbour * _PAIR + new,
                    )
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
                    where[born] = born_positions = positions[starts[i] : starts[i + 1]].tobytes()
                    self.where_bytes += len(born_positions)
                    heapq.heappush(self.heap, -count << _HEAP_SHIFT | born)

    def prune(self, ceiling):
        """Called when over budget. Drop the rarest tracked pairs, all those below a new threshold,
        so that the pairs take at most half of the memory left to them, but keep those at least
        half as frequent as the last merge (`ceiling`): they may be next. Compact the heap."""
        keys = list(self.counts)
        counts = np.fromiter(self.counts.values(), np.int64, len(keys))
        sizes = np.fromiter(map(len, self.where.values()), np.int64, len(keys))
        # merges get smaller
        self.largest = int(sizes.max(initial=0)) // np.dtype(self.positions).itemsize
        self.heap = []  # rebuilt below: one entry per pair
        sizes += _BYTES_PER_PAIR + _BYTES_PER_HEAP_ENTRY
        rest = self.memory() - self.where_bytes - len(keys) * _BYTES_PER_PAIR
        if rest + sizes.sum() > self.budget and rest < self.budget:  # else pruning does not help
            order = np.argsort(counts, kind="stable")
            kept = np.cumsum(sizes[order][::-1])[::-1]  # kept[i]: the memory of the pairs order[i:]
            # the first i with kept[i] <= room / 2
            i = int(np.searchsorted(-kept, -(self.budget - rest) // 2))
            threshold = min(int(counts[order[i]]) if i < len(keys) else ceiling, ceiling // 2)
            if threshold > self.threshold:
                for key in compress(keys, (counts < threshold).tolist()):
                    self.drop(key)
                self.threshold = threshold
                if self.verbose:
                    note(f"memory budget: tracking only the pairs seen at least {threshold} times")
        self.heap = [-count << _HEAP_SHIFT | key for key, count in self.counts.items()]
        heapq.heapify(self.heap)
        self.prune_above = max(self.budget, self.memory() + self.budget // 8)  # not at every merge


def _merge_counts(counted):
    """Add up a list of (sorted codes, counts, sizes) into one."""
    codes, inverse = np.unique(np.concatenate([c for c, _, _ in counted]), return_inverse=True)
    totals = np.bincount(inverse, np.concatenate([t for _, t, _ in counted]), len(codes)).astype(
        np.int64
    )
    return (
        codes,
        totals,
        np.bincount(inverse, np.concatenate([s for _, _, s in counted]), len(codes)).astype(
            np.int64
        ),
    )


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
    merges, progress = [], Progress("merging", n_merges, verbose=verbose, unit="merges")
    pairs.index()
    while len(merges) < n_merges:
        top = pairs.pop()
        if top is None:
            raise TokenizerError(
                f"the training text is too small: it only allows {len(merges)} merges, "
                f"{n_merges} are needed; use more text or a smaller vocab_size"
            )
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
        progress.update(len(merges), final=len(merges) == n_merges)
    return merges


def train_tokenizer(
    texts,
    vocab_size: int,
    special_tokens=(EOT,),
    pattern=GPT4_SPLIT_PATTERN,
    max_bytes=None,
    memory_budget=DEFAULT_MEMORY_BUDGET,
    verbose=False,
) -> Tokenizer:
    """The tokenizer Tokenizer.train learns from `texts` (a str or an iterable of texts, e.g.
    corpus.sample_texts(...)), reading at most max_bytes of them and holding at most
    memory_budget bytes (at least MIN_MEMORY_BUDGET) in the trainer's own structures."""
    special_tokens = list(special_tokens)
    memory_budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    check_memory_budget(memory_budget)
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small: needs at least "
            f"{256 + len(special_tokens)} (256 bytes + {len(special_tokens)} "
            f"special tokens)"
        )
    merges = train_merges(
        [texts] if isinstance(texts, str) else texts,
        n_merges,
        pattern,
        special_tokens,
        max_bytes,
        memory_budget,
        verbose,
    )
    return Tokenizer(pattern, merges, special_tokens)


def check_memory_budget(memory_budget) -> None:
    """Refuse a budget too small to hold a useful sample (MIN_SAMPLE_BYTES) for training."""
    if not (isinstance(memory_budget, int) and memory_budget >= MIN_MEMORY_BUDGET):
        raise TokenizerError(
            f"a tokenizer memory budget of {memory_budget!r} bytes is too small "
            f"to hold a useful sample: give at least "
            f"{MIN_MEMORY_BUDGET / 2**20:.0f}M (the default is "
            f"{DEFAULT_MEMORY_BUDGET >> 30}G)"
        )


def train_merges(
    texts: Iterable[str],
    n_merges: int,
    pattern: str,
    special_tokens: list,
    max_bytes=None,
    memory_budget=DEFAULT_MEMORY_BUDGET,
    verbose=False,
) -> list:
    """n_merges merges (pairs of ids) learned from texts, reading at most max_bytes and holding
    at most memory_budget bytes (any positive number) in the trainer's own structures."""
    if not memory_budget > 0:
        raise TokenizerError(
            f"memory_budget must be a positive number of bytes, not {memory_budget!r}"
        )
    if 256 + n_merges > _MAX_ID:
        raise TokenizerError(
            f"vocab_size {256 + n_merges + len(special_tokens)} is too large: at most {_MAX_ID:,}"
        )
    start = time.perf_counter()
    sample, report = _count_pieces(
        texts, pattern, special_tokens, max_bytes, memory_budget, verbose
    )
    if not sample.pieces:
        raise TokenizerError(
            "the training text is empty: pass some text (or check the input files)"
        )
    if verbose:
        note(f"{report} ({time.perf_counter() - start:.1f}s)")
    return _learn_merges(_Pairs(sample, 256 + n_merges, memory_budget, verbose), n_merges, verbose)
