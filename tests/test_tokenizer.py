import argparse
import base64
import itertools
import json
import os
import pickle
import random
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenizer
from infra import bpe_train
from infra.fast_encode import ASCII_FORMS, cut_points, encode_batch, splitter
from infra.tokenizer_cli import main, parse_size
from infra.tokenizers import load_tokenizer
from tokenizer import EOT, GPT4_SPLIT_PATTERN, Tokenizer, TokenizerError

ROOT = Path(__file__).resolve().parents[1]
CORPUS = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
SHARED_ZH = ROOT.parent / "shared" / "data" / "chinese_poetry.txt"
ZH = "".join(
    [
        "我们今天学习了自然语言处理，分词器把文字变成数字。",
        "你好，世界！春眠不觉晓，处处闻啼鸟。\n",
    ]
)
MIXED = "Hello, world! 你好😀 don't   stop\r\n\r\n  12345 x\t\ty 'LL 've"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([CORPUS[:300_000], ZH * 20, MIXED], vocab_size=1200)


# ----------------------------------------------------------------------------- round trips

weird = st.lists(
    st.sampled_from(
        [
            *"ab Z'sl\r\n\t 09中文字😀é\u00a0\u3000,.!?",
            *["'ll", "\r\n", "   "],
        ]
    )
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), weird))
def test_round_trip(tok, s):
    ids = tok.encode_ordinary(s)
    assert tok.decode(ids) == s
    assert all(0 <= i < tok.vocab_size for i in ids)


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_decode_bytes_round_trip(tok, b):
    text = b.decode("utf-8", errors="replace")
    assert tok.decode_bytes(tok.encode_ordinary(text)) == text.encode("utf-8")
    assert tok.decode_bytes(list(b)) == b  # ids 0..255 are the raw bytes


def test_decode_split_utf8_char_gives_replacement(tok):
    ids = tok.encode_ordinary("中")
    raw = tok.decode_bytes(ids)
    assert tok.decode(list(raw[:2])) == "\ufffd"
    assert tok.decode(list(raw[:2]) + tok.encode_ordinary("ok")) == "\ufffdok"


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127)))
def test_ascii_fast_split_matches_regex(s):
    assert GPT4_SPLIT_PATTERN in ASCII_FORMS  # the default pattern has its fast form
    for pattern in ASCII_FORMS:
        assert splitter(pattern)(s) == regex.findall(pattern, s)


lines = st.lists(
    st.one_of(weird, st.text(alphabet=st.characters(max_codepoint=127)), st.just("\n"))
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(lines, st.text()))
def test_mixed_fast_split_matches_regex(s):
    for pattern in ASCII_FORMS:
        assert splitter(pattern)(s) == regex.findall(pattern, s)


def test_compresses(tok):
    text = CORPUS[300_000:400_000]
    assert len(text.encode()) / len(tok.encode_ordinary(text)) > 2.5


# ----------------------------------------------------------------------------- training


def test_hand_worked_merges():
    # "aaabdaaabac" is one piece. Pair counts: aa 4, ab 2, the rest 1 -> merge (a, a) = 256;
    # left to right "aaab" becomes [aa, a, b]. Now (256, a) and (a, b) both occur twice: the tie
    # goes to the smaller id pair (97, 98) = 257. Then (256, 257) "aaab" occurs twice = 258.
    # Left: [258, d, 258, a, c], four pairs once each; smallest ids first: (a, c) = 259, then
    # (d, 258) = 260 beats (258, d) and (258, 259).
    tok = Tokenizer.train("aaabdaaabac", vocab_size=256 + 5 + 1)
    assert tok.merges == [(97, 97), (97, 98), (256, 257), (97, 99), (100, 258)]
    assert tok.encode("aaabdaaabac") == [258, 260, 259]
    assert tok.special_tokens == {EOT: 261}


def test_merges_never_cross_pieces():
    # Pieces: "ab", " ab", " ab". ab occurs 3 times -> 256; then (" ", 256) twice -> 257.
    # "b" and " " are never adjacent inside a piece, so that pair is never counted.
    tok = Tokenizer.train("ab ab ab", vocab_size=256 + 2, special_tokens=())
    assert tok.merges == [(97, 98), (32, 256)]
    with pytest.raises(TokenizerError, match="too small: it only allows 2 merges"):
        Tokenizer.train("ab ab ab", vocab_size=256 + 3, special_tokens=())


def naive_merges(text, n_merges):
    """minbpe's algorithm, recounting every pair of every piece for each merge, with the same
    tie-break (highest count, then the smallest id pair) and the same rule for a pair whose bytes
    are already a token (skipped, as tiktoken maps bytes to one id)."""
    words = {
        tuple(piece.encode()): count
        for piece, count in Counter(regex.findall(GPT4_SPLIT_PATTERN, text)).items()
    }
    vocab, merges = [bytes([i]) for i in range(256)], []
    while len(merges) < n_merges:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        a, b = min(
            (p for p in pairs if vocab[p[0]] + vocab[p[1]] not in vocab),
            key=lambda p: (-pairs[p], p),
        )
        new, merges = len(vocab), merges + [(a, b)]
        vocab.append(vocab[a] + vocab[b])
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == (a, b):
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet="ab c\n中文1", min_size=30, max_size=300), st.integers(1, 40))
def test_training_equals_naive_recount_on_random_text_under_any_budget(text, n_merges):
    """memory_budget=1: the sample is the first text, and the tracked pairs are always over
    budget."""
    try:
        expected = naive_merges(text, n_merges)
    except ValueError:  # min() of no pairs: the text allows fewer merges
        return
    assert Tokenizer.train(text, 256 + n_merges, special_tokens=()).merges == expected
    assert bpe_train.train_tokenizer(text, 256 + n_merges, special_tokens=()).merges == expected
    assert (
        bpe_train.train_merges(
            [text, "never read"], n_merges, GPT4_SPLIT_PATTERN, [], memory_budget=1
        )
        == expected
    )


def test_incremental_training_equals_naive_recount_on_real_text():
    poem = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
    text = CORPUS[:15_000] + poem * 3
    assert Tokenizer.train(text, 256 + 150, special_tokens=()).merges == naive_merges(text, 150)
    assert bpe_train.train_tokenizer(text, 256 + 150, special_tokens=()).merges == naive_merges(
        text, 150
    )


@pytest.mark.parametrize("train", [Tokenizer.train, bpe_train.train_tokenizer])
def test_training_is_deterministic(train):
    a = train(CORPUS[:50_000], 600)
    b = train(iter([CORPUS[:25_000], CORPUS[25_000:50_000]]), 600)
    c = train(CORPUS[:50_000], 600)
    assert a.merges == c.merges
    assert len(b.merges) == len(a.merges)


@pytest.mark.parametrize("train", [Tokenizer.train, bpe_train.train_tokenizer])
def test_special_tokens_are_cut_out_of_training_text(train):
    tok = train(("xy" + EOT) * 50, vocab_size=256 + 1 + 1)
    assert tok.merges == [(120, 121)]  # no pair from "<|endoftext|>" was counted


def test_max_bytes_limits_the_sample():
    full = bpe_train.train_tokenizer(["ab" * 100, "cd" * 1000], 257, special_tokens=())
    sample = bpe_train.train_tokenizer(
        ["ab" * 100, "cd" * 1000], 257, special_tokens=(), max_bytes=210
    )
    assert full.merges == [(99, 100)] and sample.merges == [(97, 98)]


@pytest.mark.parametrize("train", [Tokenizer.train, bpe_train.train_tokenizer])
def test_training_errors(train):
    with pytest.raises(ValueError, match="vocab_size 200 is too small: needs at least 257"):
        train(CORPUS[:1000], 200)
    with pytest.raises(ValueError, match="training text is empty"):
        train("", 300)
    with pytest.raises(ValueError, match="training text is empty"):
        train([], 300)
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        bpe_train.train_merges([CORPUS[:1000]], 300, GPT4_SPLIT_PATTERN, [], memory_budget=0)
    with pytest.raises(TokenizerError, match="too small to hold a useful sample"):
        bpe_train.train_tokenizer(CORPUS[:1000], 300, memory_budget=bpe_train.MIN_MEMORY_BUDGET - 1)


def chinese_like(n_chars, seed):
    """Text shaped like Chinese for the GPT-4 pattern: clauses of 2-16 characters drawn from 3000
    CJK characters with Zipf frequencies, each clause a distinct piece, as in real Chinese."""
    rng = random.Random(seed)
    chars = [chr(0x4E00 + i) for i in range(3000)]
    drawn = iter(rng.choices(chars, [1 / (i + 1) for i in range(3000)], k=n_chars))
    clauses, total = [], 0
    while total < n_chars:
        length = rng.randint(2, 16)
        clause = "".join(itertools.islice(drawn, length))
        clauses.append(clause + rng.choice("，，，。。、；！\n"))
        total += length
    return "".join(clauses)


@pytest.fixture(scope="module")
def zh():
    return (
        SHARED_ZH.read_text(encoding="utf-8")[:120_000]
        if SHARED_ZH.exists()
        else chinese_like(120_000, 0)
    )


def readable_merges(texts, n_merges):
    """The merges of the readable trainer, tokenizer.py's Tokenizer.train."""
    return Tokenizer.train(texts, 256 + n_merges, special_tokens=()).merges


def test_bounded_memory_trainer_equals_the_readable_one(zh):
    """infra/bpe_train.py learns the merges of Tokenizer.train on the same text."""
    texts = [CORPUS[:200_000], zh, MIXED]
    assert bpe_train.train_tokenizer(
        texts, 256 + 1500, special_tokens=()
    ).merges == readable_merges(texts, 1500)


def test_training_stays_exact_when_pairs_are_dropped_and_counted_again(zh, monkeypatch):
    """A budget just above what the sample itself takes: the pairs outgrow it, the rarest are
    dropped, and all pairs are counted again (in parts, and past 512 ids without the dense
    table) when the merges come down to their counts. Small blocks and slices, so that every
    path runs on a small text. The merges stay the same."""
    texts = [CORPUS[:60_000], zh[:30_000]]
    monkeypatch.setattr(bpe_train, "_BLOCK", 1 << 12)
    monkeypatch.setattr(bpe_train, "_SLICE", 1 << 10)
    sample, _ = bpe_train._count_pieces(
        texts, GPT4_SPLIT_PATTERN, [], None, bpe_train.DEFAULT_MEMORY_BUDGET
    )
    # so that only the pairs' memory varies
    monkeypatch.setattr(bpe_train, "_BYTES_PER_OCCURRENCE", 0)
    pairs = bpe_train._Pairs(sample, 2000, memory_budget=1)
    pairs.index()
    # 64 KB for the positions of pairs
    pairs.budget = pairs.memory() - pairs.where_bytes + (1 << 16)
    indexed = []
    index_part = bpe_train._Pairs._index_part
    monkeypatch.setattr(
        bpe_train._Pairs,
        "_index_part",
        lambda self, part, n_parts, dense: (
            indexed.append((n_parts, dense)) or index_part(self, part, n_parts, dense)
        ),
    )
    merges = bpe_train._learn_merges(pairs, 1700, False)
    assert {dense for _, dense in indexed} == {True, False} and max(n for n, _ in indexed) > 1
    assert merges == readable_merges(texts, 1700)


def test_training_with_ids_past_16_bits_and_pieces_past_64_kb(zh):
    """Vocabularies over 65,536 ids and pieces over 65,535 bytes take wider arrays."""
    texts = [CORPUS[:30_000], zh[:10_000], "a" * 70_000]
    sample, _ = bpe_train._count_pieces(
        texts, GPT4_SPLIT_PATTERN, [], None, bpe_train.DEFAULT_MEMORY_BUDGET
    )
    pairs = bpe_train._Pairs(sample, 1 << 17, bpe_train.DEFAULT_MEMORY_BUDGET)
    assert pairs.tok.dtype == pairs.span.dtype == "int32"
    assert bpe_train._learn_merges(pairs, 300, False) == readable_merges(texts, 300)


def test_memory_budget_bounds_training_on_an_endless_corpus(monkeypatch, capsys):
    """Reading stops when the sample would need the budget; the trainer's own accounting
    (memory()) bounds what tracemalloc sees after every merge, and the peak stays in budget."""
    budget, read, accounted = 48 << 20, [], []

    def endless():
        for seed in itertools.count():
            read.append(chinese_like(20_000, seed))
            yield read[-1]

    merge = bpe_train._Pairs.merge

    def traced_merge(self, key, new):
        merge(self, key, new)
        accounted.append((tracemalloc.get_traced_memory()[0] - baseline, self.memory()))

    monkeypatch.setattr(bpe_train._Pairs, "merge", traced_merge)
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        bpe_train.train_tokenizer(endless(), 256 + 600, memory_budget=budget, verbose=True)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert "stopped at the memory budget (48 MiB)" in capsys.readouterr().err
    kept = sum(len(text.encode()) for text in read)
    assert budget / 2 < bpe_train._training_memory(kept, kept / 20) < 1.2 * budget
    assert all(traced <= estimate for traced, estimate in accounted)
    assert peak <= budget


def test_huge_texts_are_read_in_parts():
    text = (CORPUS[:50_000] + ZH + "   \n\n  x") * 8
    parts = list(bpe_train._parts([text, "b"], GPT4_SPLIT_PATTERN, size=10_000))
    assert "".join(parts) == text + "b" and 30 < len(parts) < 60
    split = splitter(GPT4_SPLIT_PATTERN)
    assert [piece for part in parts[:-1] for piece in split(part)] == split(text)


# ----------------------------------------------------------------------------- special tokens


def test_special_tokens(tok):
    text = f"end{EOT}start"
    ids = tok.encode(text, allowed_special="all")
    assert tok.eos_id in ids and ids.count(tok.eos_id) == 1
    assert tok.encode(text, allowed_special={EOT}) == ids
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="allowed_special.*encode_ordinary"):
        tok.encode(text)
    plain = tok.encode_ordinary(text)
    assert tok.eos_id not in plain and tok.decode(plain) == text
    with pytest.raises(ValueError, match="unknown special tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_ids_are_contiguous(tok):
    ids = sorted(list(tok.mergeable_ranks.values()) + list(tok.special_tokens.values()))
    assert ids == list(range(tok.vocab_size))
    assert tok.vocab_size == 1200 and tok.eos_id == 1199
    assert sorted(tok.mergeable_ranks.values())[:256] == list(range(256))


def test_eot_missing():
    tok = Tokenizer.train("ab ab", 257, special_tokens=())
    with pytest.raises(KeyError, match="no <\\|endoftext\\|> token"):
        tok.eos_id


# ----------------------------------------------------------------------------- files


def test_save_load(tok, tmp_path):
    path = tmp_path / "sub" / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    text = CORPUS[-20_000:] + ZH + MIXED + EOT
    assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    assert loaded.special_tokens == tok.special_tokens and loaded.pattern == tok.pattern
    assert json.loads(path.read_text())["format"] == "minillama-bpe"
    assert pickle.loads(pickle.dumps(tok)).encode_ordinary(text) == tok.encode_ordinary(text)
    assert [p.name for p in path.parent.iterdir()] == ["tok.json"]  # no temp file left behind


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\xff garbage", "not valid JSON"),
        (None, "not valid JSON"),  # truncated
        (
            json.dumps({"version": "1.0", "model": {"type": "WordPiece", "vocab": {}}}).encode(),
            "model type WordPiece .* is not supported",
        ),
        (b"[1, 2]", "not a minillama-bpe tokenizer file"),
        (None, "version 3 is not supported"),
        (None, "merge 1 is"),
        (None, "special token ids must follow"),
    ],
)
def test_load_rejects_bad_files(tok, tmp_path, content, message):
    good = tmp_path / "good.json"
    tok.save(good)
    obj = json.loads(good.read_text())
    if content is None and message == "not valid JSON":
        content = good.read_bytes()[: good.stat().st_size // 2]
    elif message.startswith("version"):
        content = json.dumps({**obj, "version": 3}).encode()
    elif message.startswith("merge"):
        content = json.dumps({**obj, "merges": [[97, 98], [1000, 2]]}).encode()
    elif message.startswith("special"):
        content = json.dumps({**obj, "special_tokens": {EOT: 5}}).encode()
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    with pytest.raises(TokenizerError, match=message) as e:
        load_tokenizer(bad)
    assert "\n" not in str(e.value)
    if "WordPiece" not in message:  # a file of this project's format: the core says the same
        with pytest.raises(TokenizerError, match=message):
            Tokenizer.load(bad)
    for load in (load_tokenizer, Tokenizer.load):
        with pytest.raises(TokenizerError, match="cannot read"):
            load(tmp_path / "missing.json")


# --------------------------------------------------------------------------- batch, interop, input


def test_encode_batch_matches_encode(tok):
    lines = CORPUS.splitlines(keepends=True)
    texts = ["".join(lines[i : i + 40]) for i in range(0, len(lines), 40)] + [
        ZH * 10,
        f"a{EOT}b",
        "",
    ]
    assert sum(map(len, texts)) > 1 << 20  # big enough to really use the workers
    assert encode_batch(tok, texts, num_workers=2, allowed_special="all") == [
        tok.encode(t, allowed_special="all") for t in texts
    ]
    assert encode_batch(tok, texts[:3], num_workers=1) == [tok.encode(t) for t in texts[:3]]


def test_tiktoken_interop(tok):
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding(
        name="x",
        pat_str=tok.pattern,
        mergeable_ranks=tok.mergeable_ranks,
        special_tokens=tok.special_tokens,
    )
    for text in [CORPUS[:400_000], ZH, MIXED, "aaabdaaabac  \n\n x"]:
        assert tok.encode_ordinary(text) == enc.encode_ordinary(text)
    assert tok.encode(EOT + "hi", allowed_special="all") == enc.encode(
        EOT + "hi", allowed_special="all"
    )
    if SHARED_ZH.exists():
        zh = SHARED_ZH.read_text(encoding="utf-8")[:20_000]
        zh_tok = Tokenizer.train(zh, 1500)
        zh_enc = tiktoken.Encoding(
            name="zh",
            pat_str=zh_tok.pattern,
            mergeable_ranks=zh_tok.mergeable_ranks,
            special_tokens=zh_tok.special_tokens,
        )
        held_out = SHARED_ZH.read_text(encoding="utf-8")[20_000:30_000] + ZH
        assert zh_tok.encode_ordinary(held_out) == zh_enc.encode_ordinary(held_out)
        assert tok.encode_ordinary(held_out) == enc.encode_ordinary(held_out)


def test_cli(tmp_path, capsys):
    (tmp_path / "in.txt").write_text(CORPUS[:30_000])
    main(
        [
            "--input",
            str(tmp_path / "in.txt"),
            "--vocab-size",
            "400",
            "--out",
            str(tmp_path / "t.json"),
        ]
    )
    assert "bytes/token" in capsys.readouterr().out
    assert Tokenizer.load(tmp_path / "t.json").vocab_size == 400
    (tmp_path / "zh.txt").write_text(chinese_like(150_000, 1))
    main(
        [
            "--input",
            str(tmp_path / "zh.txt"),
            "--vocab-size",
            "300",
            "--out",
            str(tmp_path / "t.json"),
            "--memory-budget",
            "24M",
        ]
    )
    assert "stopped at the memory budget (24 MiB)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "--input",
                str(tmp_path / "in.txt"),
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "t.json"),
                "--memory-budget",
                "lots",
            ]
        )
    with pytest.raises(SystemExit, match="error: vocab_size 10 is too small"):
        main(
            [
                "--input",
                str(tmp_path / "in.txt"),
                "--vocab-size",
                "10",
                "--out",
                str(tmp_path / "u.json"),
            ]
        )


def test_cli_samples_every_file_of_a_folder(tmp_path, capsys):
    """--max-bytes of a third of the folder: a prefix would be the English file alone; the sample
    takes from both."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a_english.txt").write_text(CORPUS[:60_000])
    (folder / "b_chinese.txt").write_text(chinese_like(20_000, 2))
    total = sum(len(f.read_bytes()) for f in folder.iterdir())
    main(
        [
            "--input",
            str(folder),
            "--vocab-size",
            "600",
            "--out",
            str(tmp_path / "t.json"),
            "--max-bytes",
            str(total // 3),
        ]
    )
    assert "stopped at max_bytes" in capsys.readouterr().err
    tokens = [
        token.decode("utf-8", "ignore")
        for token in Tokenizer.load(tmp_path / "t.json").mergeable_ranks
    ][256:]
    assert any("\u4e00" <= c <= "\u9fff" for token in tokens for c in token)
    assert any(token.strip().isascii() and token.strip().isalpha() for token in tokens)


def test_memory_budget_sizes():
    assert [parse_size(s) for s in ("512M", "2G", "1.5g", "64KiB", "1000")] == [
        512 << 20,
        2 << 30,
        3 << 29,
        64 << 10,
        1000,
    ]
    for bad in ("", "2X", "-1G", "G"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a size"):
            parse_size(bad)


def test_the_tokenizer_benchmark_skips_the_corpora_it_cannot_find(tmp_path):
    """bench/bench_tokenizer.py without ../shared/data (a fresh clone): the bundled corpus only,
    and a message."""
    result = subprocess.run(
        [sys.executable, "bench/bench_tokenizer.py", f"--data-dir={tmp_path}", "--runs=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skipping what needs {tmp_path / 'chinese_poetry.txt'}" in result.stdout
    assert "tinyshakespeare.txt" in result.stdout
    # named only as missing
    assert "peps.jsonl" not in result.stdout.replace(str(tmp_path / "peps.jsonl"), "")


# ---------------------------------------------------------------------- refusals, files by content


def run_cli(tmp_path, *args) -> subprocess.CompletedProcess:
    """`python -m infra.tokenizer_cli --input (30 KB of Shakespeare) --vocab-size 300 ARGS` in a
    new process."""
    (tmp_path / "in.txt").write_text(CORPUS[:30_000])
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "infra.tokenizer_cli",
            "--input",
            str(tmp_path / "in.txt"),
            "--vocab-size",
            "300",
            *args,
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_tokenizer_file_is_recognised_by_its_content_not_its_name(tmp_path):
    """`python -m infra.tokenizer_cli --out tok.model` writes this project's JSON under a name that
    SentencePiece models also use: loading it reads what it holds."""
    result = run_cli(tmp_path, "--out", "tok.model")
    assert result.returncode == 0, result.stderr
    tok = load_tokenizer(tmp_path / "tok.model")
    assert tok.encode(CORPUS[:2000]) == Tokenizer.load(tmp_path / "tok.model").encode(CORPUS[:2000])
    assert tok.vocab_size == 300
    (tmp_path / "ranks.json").write_text(
        "".join(  # a tiktoken ranks file named .json
            f"{base64.b64encode(t).decode()} {r}\n" for t, r in tok.mergeable_ranks.items()
        )
    )
    (tmp_path / "tiktoken_config.json").write_text(
        json.dumps({"pattern": tok.pattern, "special_tokens": tok.special_tokens})
    )
    assert load_tokenizer(tmp_path / "ranks.json").encode(CORPUS[:2000]) == tok.encode(
        CORPUS[:2000]
    )
    (tmp_path / "sp.json").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    with pytest.raises(TokenizerError, match="is a SentencePiece model"):
        load_tokenizer(tmp_path / "sp.json")


def test_an_unwritable_out_fails_before_training(tmp_path):
    """--out under a file, or naming a folder: one line, and no time spent on training."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    for out in ("a_file/tok.json", "a_folder"):
        result = run_cli(tmp_path, "--out", out)
        assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
        assert "tokenizer sample" not in result.stdout + result.stderr
        assert "trained" not in result.stdout
    assert [p.name for p in (tmp_path / "a_folder").iterdir()] == []


def test_a_memory_budget_too_small_for_a_useful_sample_is_refused(tmp_path):
    result = run_cli(tmp_path, "--out", "tok.json", "--memory-budget", "1")
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "too small to hold a useful sample" in result.stderr
    assert "tokenizer sample" not in result.stdout + result.stderr
    assert not (tmp_path / "tok.json").exists()
    smallest = f"{bpe_train.MIN_MEMORY_BUDGET >> 20}M"
    assert run_cli(tmp_path, "--out", "tok.json", "--memory-budget", smallest).returncode == 0


# -------------------------------------------------------------------- the split pattern, a setting

FORK_PATTERN = GPT4_SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}{1,2}")  # numbers in pairs


def test_the_tokenizer_command_line_takes_a_split_pattern(tmp_path):
    result = run_cli(tmp_path, "--out", "tok.json", "--pattern", FORK_PATTERN)
    assert result.returncode == 0, result.stderr
    assert Tokenizer.load(tmp_path / "tok.json").pattern == FORK_PATTERN
    result = run_cli(tmp_path, "--out", "bad.json", "--pattern", "(unclosed")
    assert result.returncode != 0 and result.stderr.startswith("error: invalid split pattern")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "bad.json").exists()


def test_a_changed_split_pattern_gets_none_of_the_default_patterns_fast_paths(monkeypatch):
    """A fork that edits GPT4_SPLIT_PATTERN in tokenizer.py: the ASCII fast split, the cut points
    and the trainer's parts are declared for patterns by their text, so the new pattern gets
    none of them, and its ids are those of the pattern itself."""
    monkeypatch.setattr(tokenizer, "GPT4_SPLIT_PATTERN", FORK_PATTERN)
    text = "In 12345 years, 678 lines.\n" * 3
    assert splitter(FORK_PATTERN)(text) == regex.findall(FORK_PATTERN, text)
    assert "12" in splitter(FORK_PATTERN)(text) and "123" not in splitter(FORK_PATTERN)(text)
    fork = Tokenizer.train(CORPUS[:20_000] + text, 300, pattern=FORK_PATTERN)
    assert cut_points(fork) is None and cut_points(Tokenizer.train(CORPUS[:20_000], 300)) == "words"
    big = (CORPUS[:50_000] + text) * 30  # over 2 MB: the trainer reads it in parts when it may
    assert list(bpe_train._parts([big], FORK_PATTERN)) == [big]
    assert (
        bpe_train.train_tokenizer(big, 300, pattern=FORK_PATTERN).merges
        == Tokenizer.train(big, 300, pattern=FORK_PATTERN).merges
    )
