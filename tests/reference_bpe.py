"""The tokenizer trainer as it was before bounded-memory training (commit 4c702eb), kept as a
reference: the tests check that tokenizer.Tokenizer.train learns the same merges on the same
text, and bench/bench_tokenizer.py measures it against the new trainer at equal memory.

One dict entry per distinct piece, one Python list of piece indices per pair: about 100 bytes
of memory per byte of Chinese text, where almost every piece is distinct.
"""
import heapq
from collections import Counter, defaultdict

from tokenizer import _splitter


def train_merges(texts, n_merges, pattern):
    """The merges (a, b) learned from an iterable of texts, without special tokens."""
    split = _splitter(pattern)
    counts = Counter()
    for text in texts:
        counts.update(split(text))
    return _learn_merges(counts, n_merges)


def _learn_merges(counts, n_merges):
    """Incremental BPE over distinct pieces; each piece is a str whose characters are token ids,
    so a merge is one str.replace. Tie-break: highest count, then the smallest (left, right)."""
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
    merges = []
    while len(merges) < n_merges:
        if not heap:
            raise ValueError(f"the text only allows {len(merges)} merges")
        neg, pair = heapq.heappop(heap)
        count = pair_counts[pair]
        if count != -neg:
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        a, b = map(ord, pair)
        new_bytes = vocab[a] + vocab[b]
        if new_bytes in known:
            continue
        new = chr(len(vocab))
        merges.append((a, b))
        vocab.append(new_bytes)
        known.add(new_bytes)
        _apply_merge(pair, new, words, freqs, pair_counts, where, heap)
    return merges


def _apply_merge(pair, new, words, freqs, pair_counts, where, heap):
    a, b = pair
    born, born_where = defaultdict(int), defaultdict(list)
    for i in where.pop(pair):
        w = words[i]
        if pair not in w:
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
            if j < last and w[j + 1] != new:
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
