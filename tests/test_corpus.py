"""infra/corpus.py: files, folders and formats -> documents in bounded pieces; the val split;
the tokenizer's sample."""

import gzip
import json
import os
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from infra import corpus
from infra.corpus import (
    LINE_START,
    WORD_CUT,
    DataError,
    cut_text,
    list_sources,
    read_block,
    read_documents,
    sample_texts,
    val_share,
)
from infra.fast_encode import GPT4_PATTERN as GPT4_SPLIT_PATTERN  # cut points proven here
from infra.fast_encode import SAFE_CUT
from infra.tokenizer_formats import LLAMA3_SPLIT_PATTERN

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = (ROOT / "data" / "tinyshakespeare.txt").read_text()
split_pieces = regex.compile(GPT4_SPLIT_PATTERN).findall
split_llama3 = regex.compile(LLAMA3_SPLIT_PATTERN).findall
TRICKY = list("ab Z1 2\n\r\t.,!'s") + [
    "中文",
    "，",
    "。",
    "\u3000",
    "\xa0",
    "\x1c",
    "\x85",
    "\u2028",
    "é",
    "٣",
    "ll",
    "  ",
    "\r\n",
    "😀",
    " \n",
    "'S",
]


def pieces_of(paths, share=0.0, **kwargs):
    return list(read_documents(list_sources(paths), share, **kwargs))


def documents(pieces):
    """(split, text) of each document, pieces joined."""
    docs, current = [], []
    for piece in pieces:
        current.append(piece.text)
        if piece.ends:
            docs.append((piece.split, "".join(current)))
            current = []
    return docs


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TRICKY), max_size=40).map("".join))
def test_safe_cut_points_keep_the_pieces_of_the_whole_text(text):
    """For GPT-4's split pattern and Llama 3's (fast_encode.cut_points "words")."""
    for split in (split_pieces, split_llama3):
        whole = split(text)
        for pattern in (LINE_START, WORD_CUT):
            for match in pattern.finditer(text):
                cut = match.start()
                assert split(text[:cut]) + split(text[cut:]) == whole, (text, cut)
    parts = list(cut_text(text, limit=6))
    assert "".join(parts) == text and all(len(p) <= 6 for p in parts)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TRICKY), min_size=1, max_size=40).map("".join), st.integers(0, 200))
def test_cut_points_found_on_bytes_are_the_first_safe_ones(text, at):
    raw = text.encode()
    i = min(at, len(raw))
    start = corpus._char_start(raw, i, len(raw))
    k = len(raw[:start].decode())  # the character index of the aligned start
    match = LINE_START.search(text, k) or WORD_CUT.search(text, k)
    assert corpus._find_cut(raw, i, len(raw)) == (
        len(text[: match.start()].encode()) if match else start
    )


@pytest.mark.parametrize(
    "kind", ["single line", "CR line ends", "lines start with a space", "chinese, no newline"]
)
def test_text_without_line_starts_is_cut_in_bounded_pieces_with_the_same_tokens(
    tmp_path, monkeypatch, kind
):
    monkeypatch.setattr(corpus, "MAX_BLOCK", 4096)
    words = SHAKESPEARE[:60_000].split()
    text = {
        "single line": " ".join(words),
        "CR line ends": SHAKESPEARE[:60_000].replace("\n", "\r"),
        "lines start with a space": "".join(
            f" = {line} =\n" for line in SHAKESPEARE[:60_000].splitlines()
        ),
        "chinese, no newline": "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张" * 2000,
    }[kind]
    (tmp_path / "t.txt").write_text(text, newline="")
    pieces = pieces_of(tmp_path / "t.txt")
    assert "".join(p.text for p in pieces) == text
    assert len(pieces) > 10 and max(p.nbytes for p in pieces) <= 2 * 4096
    assert [t for p in pieces for t in split_pieces(p.text)] == split_pieces(text)


def test_a_huge_record_is_cut_into_bounded_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "MAX_PIECE_CHARS", 1000)
    text = " ".join(SHAKESPEARE[:50_000].split())
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"text": text}) + "\n" + json.dumps({"text": "short"}) + "\n"
    )
    pieces = pieces_of(tmp_path / "d.jsonl")
    assert [p.ends for p in pieces].count(True) == 2 and pieces[0].begins and not pieces[1].begins
    assert max(len(p.text) for p in pieces) <= 1000 and len(pieces) > 50
    assert [t for p in pieces[:-1] for t in split_pieces(p.text)] == split_pieces(text)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(["ab", " ", "\n", "xy\n", "  z\n", "é", "|"]), min_size=1, max_size=60
    ).map("".join),
    st.lists(st.integers(1, 12), min_size=1, max_size=20),
    st.sampled_from([SAFE_CUT, None]),
)
def test_recut_gives_pieces_that_end_at_cut_points(text, sizes, cut):
    """Documents ("|" between them) read in pieces of `sizes` characters, re-cut with limit 8."""
    pieces, by_end, position, k = [], {}, 0, 0
    for document in text.split("|"):
        start = 0
        while start < len(document):
            end = min(len(document), start + sizes[k % len(sizes)])
            by_end[position + end] = (0, position + end, k)
            pieces.append(
                corpus.Piece(
                    document[start:end],
                    len(document[start:end].encode()),
                    "train",
                    start == 0,
                    end == len(document),
                    by_end[position + end],
                    position + end,
                )
            )
            start, k = end, k + 1
        position += len(document)
    out, position = list(corpus.recut(iter(pieces), cut, limit=8)), 0
    assert documents(out) == documents(pieces)
    whole = text.replace("|", "")
    points = [0] + [m.start() for m in SAFE_CUT.finditer(whole)] + [len(whole)]
    for piece in out:
        position += len(piece.text)
        assert piece.nbytes == len(piece.text.encode()) and piece.resume == by_end.get(position)
        assert piece.ends or cut and cut.match(whole, position)
        assert not cut or len(piece.text) <= 8 + 12 + max(b - a for a, b in zip(points, points[1:]))


def test_documents_are_cut_only_where_the_tokenizer_allows(tmp_path, monkeypatch, capsys):
    """cuts=SAFE_CUT (SentencePiece style): pieces meet only at line starts, a long line is held
    whole, the documents and splits are those of the default cuts, and reading resumed from any
    piece's resume gives the pieces after it. cuts=None: each document is one piece."""
    monkeypatch.setattr(corpus, "MAX_BLOCK", 4096)
    monkeypatch.setattr(corpus, "MAX_PIECE_CHARS", 3000)
    lines = SHAKESPEARE[:60_000].splitlines(keepends=True)
    words = SHAKESPEARE[:60_000].split()
    text = (
        "".join(lines[:800])
        + " ".join(words[:5000])
        + "\n"
        + "".join(f"  {line}" for line in lines[800:1000])
        + "".join(" ".join(words[i : i + 1000]) + "\n" for i in range(0, 8000, 1000))
        + "".join(lines[1000:])
    )
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "r.jsonl").write_text(
        "".join(json.dumps({"text": "".join(lines[i : i + 400])}) + "\n" for i in (0, 400))
    )
    sources = list_sources([tmp_path / "t.txt", tmp_path / "r.jsonl"])
    default = pieces_of(sources[0].path, 0.2) + pieces_of(sources[1].path, 0.2)
    pieces = list(read_documents(sources, 0.2, cuts=SAFE_CUT))
    assert documents(pieces) == documents(default) and len(pieces) > 10
    for before, piece in zip(pieces, pieces[1:]):
        assert piece.begins or SAFE_CUT.match(before.text[-1] + piece.text[0], 1), (
            before.text[-30:],
            piece.text[:30],
        )
    # bounded but for the longest stretch without a cut point (the long line, the indented lines)
    for piece in pieces:
        cuts = [0] + [m.start() for m in SAFE_CUT.finditer(piece.text)] + [len(piece.text)]
        assert len(piece.text) <= 3000 + 2 * 4096 + max(b - a for a, b in zip(cuts, cuts[1:]))
    # a stretch without a cut point, held whole
    assert max(len(p.text) for p in pieces) > 3000 + 2 * 4096
    assert any(p.resume and not p.ends for p in pieces)  # resumable inside a document
    for k, piece in enumerate(pieces):
        if piece.resume:
            assert (
                list(read_documents(sources, 0.2, start=piece.resume, cuts=SAFE_CUT))
                == pieces[k + 1 :]
            )
    monkeypatch.setattr(corpus, "HUGE_DOCUMENT_CHARS", 10_000)  # several documents are longer
    whole = list(read_documents(sources, 0.2, cuts=None))
    assert [(p.split, p.text) for p in whole] == documents(default) and all(
        p.begins and p.ends for p in whole
    )
    assert capsys.readouterr().err.count("allows no cut in more than") == 1


def test_blocks_found_by_seeking_are_the_blocks_read_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "MAX_BLOCK", 4096)
    text = (
        SHAKESPEARE[:20_000]
        + "中文没有空格" * 3000
        + "x" * 9000
        + " leading\n" * 500
        + "é\r" * 3000
        + "\n\n"
        + SHAKESPEARE[:5000]
    )
    path = tmp_path / "mixed.txt"
    path.write_bytes(text.encode() + b"\xff\xfe tail")
    source = list_sources(path)[0]
    with open(path, "rb") as f:
        in_order = [data for _, data, _ in corpus._stream_blocks(f, corpus.block_size(source))]
    assert b"".join(in_order) == path.read_bytes()
    assert [read_block(source, c) for c in range(len(in_order))] == in_order


def write_formats(folder: Path, docs: list[str], field="text"):
    lines = "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()
    (folder / "a.jsonl").write_bytes(lines)
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    paths = [folder / "a.jsonl", folder / "b.jsonl.gz"]
    zstandard = pytest.importorskip("zstandard")
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pyarrow, parquet = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    parquet.write_table(
        pyarrow.table({field: docs, "id": list(range(len(docs)))}),
        folder / "d.parquet",
        row_group_size=7,
    )
    return paths + [folder / "c.jsonl.zst", folder / "d.parquet"]


def test_every_format_gives_the_documents_of_plain_jsonl(tmp_path):
    docs = [f"document {i}: " + SHAKESPEARE[i * 300 : (i + 1) * 300] for i in range(40)] + [
        "中文，😀"
    ]
    paths = write_formats(tmp_path, docs, field="body")
    for path in paths:
        assert [text for _, text in documents(pieces_of(path, text_field="body"))] == docs, path
    text = "".join(docs)
    (tmp_path / "plain.txt").write_text(text)
    (tmp_path / "plain.txt.gz").write_bytes(gzip.compress(text.encode()))
    for name in ("plain.txt", "plain.txt.gz"):
        pieces = pieces_of(tmp_path / name, share=0.3)
        assert "".join(p.text for p in pieces) == text
    assert [p.split for p in pieces_of(tmp_path / "plain.txt", 0.3)] == [
        p.split for p in pieces_of(tmp_path / "plain.txt.gz", 0.3)
    ]
    with pytest.raises(DataError, match="no column 'text'.*--text-field"):
        pieces_of(tmp_path / "d.parquet")


def test_binary_files_and_text_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.txt").write_text("hello world\n" * 1000)
    (tmp_path / "in" / "image.png").write_bytes(
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 4
    )
    (tmp_path / "in" / "latin1.txt").write_bytes(
        ("café " * 10 + "\n").encode("latin-1") + b"plain\n" * 1000
    )
    counts = {"binary_files": 0, "bad_records": 0, "invalid_utf8_bytes": 0, "margin_bytes": 0}
    pieces = list(read_documents(list_sources(tmp_path / "in"), 0.0, counts=counts))
    err = capsys.readouterr().err
    assert "image.png is a binary file; skipped" in err
    assert "latin1.txt: 10 bytes are not valid UTF-8 and were replaced by U+FFFD" in err
    assert counts == dict(binary_files=1, bad_records=0, invalid_utf8_bytes=10, margin_bytes=0)
    assert "caf\ufffd " in "".join(p.text for p in pieces)
    with pytest.raises(DataError, match="image.png is a binary file, not text"):
        list_sources(tmp_path / "in" / "image.png")
    (tmp_path / "mostly.txt").write_bytes("é".encode("latin-1") * 50 + b"x" * 1000)
    with pytest.raises(DataError, match=r"mostly.txt is not UTF-8 text \(50 bytes"):
        pieces_of(tmp_path / "mostly.txt")
    (tmp_path / "gz.txt.gz").write_bytes(gzip.compress(b"text\n" * 10)[:-8] + b"garbage!")
    with pytest.raises(DataError, match="gz.txt.gz: cannot read it"):
        pieces_of(tmp_path / "gz.txt.gz")


def test_a_truncated_zst_is_an_error_like_a_truncated_gz(tmp_path):
    """A .zst cut inside a frame is a one-line error, as the same cut .gz is; a file of several
    frames is read whole."""
    zstandard = pytest.importorskip("zstandard")
    text = "".join(f"line {i} of a compressed corpus\n" for i in range(30_000)).encode()
    whole = zstandard.ZstdCompressor().compress(text)
    (tmp_path / "two_frames.txt.zst").write_bytes(whole + zstandard.ZstdCompressor().compress(text))
    assert "".join(p.text for p in pieces_of(tmp_path / "two_frames.txt.zst")).encode() == text * 2
    (tmp_path / "cut.txt.zst").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(text)[: len(whole) // 2])
    for name in ("cut.txt.gz", "cut.txt.zst"):
        with pytest.raises(
            DataError, match=rf"{name}: cannot read it \(Compressed file ended before"
        ):
            pieces_of(tmp_path / name)
    with pytest.raises(
        DataError, match="cut.txt.zst: cannot read it"
    ):  # the tokenizer's sample too
        list(sample_texts(list_sources(tmp_path / "cut.txt.zst"), 0.0))


def test_a_fifo_is_skipped_with_a_warning_and_named_is_an_error_that_says_what_it_is(
    tmp_path, capsys
):
    """A FIFO in a folder was skipped silently, a named one "did not exist"."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("some text\n")
    os.mkfifo(tmp_path / "in" / "pipe")
    assert [s.key for s in list_sources(tmp_path / "in")] == ["a.txt"]
    assert (
        "pipe is not a regular file (a FIFO, a socket or a device); skipped"
        in capsys.readouterr().err
    )
    with pytest.raises(DataError, match="input .*pipe is not a regular file or a folder \\(a FIFO"):
        list_sources(tmp_path / "in" / "pipe")


def test_bad_records_are_skipped_counted_and_located(tmp_path, capsys):
    good = [json.dumps({"text": f"record {i}"}) for i in range(500)]
    bad = [
        '{"text": "\\ud83d broken emoji"}',
        '{"text": null}',
        '["a list"]',
        "not json",
        '{"txt": "x"}',
    ]
    lines = good[:100] + bad + good[100:]
    (tmp_path / "web.jsonl").write_text("\n".join(lines) + "\n")
    counts = {"binary_files": 0, "bad_records": 0, "invalid_utf8_bytes": 0, "margin_bytes": 0}
    docs = documents(read_documents(list_sources(tmp_path / "web.jsonl"), 0.0, counts=counts))
    assert [text for _, text in docs] == [f"record {i}" for i in range(500)]
    err = capsys.readouterr().err
    assert "web.jsonl:101: a lone surrogate escape" in err and "web.jsonl:102: no text" in err
    assert "skipped 5 bad record(s) of 505" in err and counts["bad_records"] == 5
    (tmp_path / "mostly_bad.jsonl").write_text("\n".join(good[:100] + bad * 3) + "\n")
    with pytest.raises(
        DataError, match=r"mostly_bad.jsonl: 15 of 115 records are bad \(first: .*:101"
    ):
        pieces_of(tmp_path / "mostly_bad.jsonl")
    with pytest.raises(
        DataError, match=r"505 of 505 records are bad .*no \"body\" field.*--text-field"
    ):
        pieces_of(tmp_path / "web.jsonl", text_field="body")


def test_folders_follow_links_once_and_skip_hidden_parts(tmp_path):
    root, other = tmp_path / "corpus", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".cache").mkdir()
    other.mkdir()
    (root / "a.txt").write_text("a")
    (root / "sub" / "b.txt").write_text("b")
    (root / ".git" / "objects" / "x").write_text("git")
    (root / ".cache" / "y.txt").write_text("cache")
    (root / ".hidden.txt").write_text("hidden")
    (other / "c.txt").write_text("c")
    os.symlink(other, root / "linked")
    os.symlink(root, root / "sub" / "loop")  # a cycle
    os.symlink(tmp_path / "gone", root / "broken")
    assert [s.key for s in list_sources(root)] == ["a.txt", "linked/c.txt", "sub/b.txt"]


def test_val_is_spread_over_every_source_and_capped(tmp_path):
    for source in ("arxiv", "books", "wiki"):
        (tmp_path / source).mkdir()
        for k in range(3):
            (tmp_path / source / f"{k}.jsonl").write_text(
                "".join(json.dumps({"text": f"{source} {k} {i}"}) + "\n" for i in range(200))
            )
    sources = list_sources(tmp_path)
    docs = documents(read_documents(sources, 0.1))
    for source in ("arxiv", "books", "wiki"):
        held = [text for split, text in docs if split == "val" and text.startswith(source)]
        assert 35 < len(held) < 85  # about 10% of its 600 documents
    # the split of a file does not depend on the files read with it (as in --part)
    alone = documents(read_documents(sources[4:5], 0.1))
    assert alone == docs[800:1000]
    total = sum(s.size for s in sources)
    assert val_share(sources, 0.1, None) == 0.1 and val_share(
        sources, 0.1, total // 100
    ) == pytest.approx(0.01, rel=0.01)


def spans(pieces):
    """(split, start, end) in bytes of each piece of one plain text file, margins left out."""
    return [(p.split, p.resume[1] - p.nbytes, p.resume[1]) for p in pieces]


def test_a_book_is_held_out_in_long_runs_with_margins_around_them():
    """tinyshakespeare at a tenth held out: a few runs of several blocks each, about a tenth of
    the text, and no training text within a block of any val text; train, val and the margins
    are the whole text."""
    source = list_sources(ROOT / "data" / "tinyshakespeare.txt")[0]
    layout, pieces = corpus.text_layout(source, 0.1), pieces_of(source.path, share=0.1)
    assert not layout.whole and layout.run >= 4
    val_docs = [text for split, text in documents(pieces) if split == "val"]
    assert 2 <= len(val_docs) <= 3 and all(len(t) >= 4 * layout.block * 0.9 for t in val_docs)
    val_bytes = sum(p.nbytes for p in pieces if p.split == "val")
    assert 0.07 < val_bytes / len(SHAKESPEARE) < 0.15
    placed = spans(pieces)
    train = [(a, b) for split, a, b in placed if split == "train"]
    for split, a, b in placed:
        if split == "val":  # the nearest training text is a whole block away (lines are short)
            gap = min(min(abs(a - tb), abs(ta - b)) for ta, tb in train)
            assert gap >= layout.block - 100
    covered = sorted((a, b) for _, a, b in placed)
    margins = [(b0, a1) for (_, b0), (a1, _) in zip(covered, covered[1:]) if a1 != b0]
    assert len(margins) == 2 * len(val_docs)  # one margin block on each side of each run
    assert all(layout.block * 0.9 < m1 - m0 < layout.block * 1.1 for m0, m1 in margins)
    text = SHAKESPEARE.encode()
    assert b"".join(text[a:b] for a, b in sorted(covered + margins)) == text


def test_a_small_text_file_goes_whole_to_one_split(tmp_path):
    """Files too small to hold a val run at their share are documents: each goes whole to one
    split, by its content, and about the share of them go to val."""
    lines = SHAKESPEARE.splitlines(keepends=True)
    for k in range(300):
        (tmp_path / f"{k:03}.txt").write_text("".join(lines[k * 20 : k * 20 + 20]))
    docs = documents(pieces_of(tmp_path, share=0.1))
    assert len(docs) == 300 and 15 <= sum(split == "val" for split, _ in docs) <= 45


def held_out(paths, share=0.1) -> list[str]:
    docs = documents(pieces_of(paths, share=share))
    return sorted(text for split, text in docs if split == "val")


def test_val_membership_is_a_function_of_the_content(tmp_path):
    """The same text renamed, gzip- or zstd-compressed, or prepared one file at a time (as
    `--part` does) holds out the same text; records keep their split when re-sharded."""
    zstandard = pytest.importorskip("zstandard")
    text = SHAKESPEARE.encode()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "shakespeare.txt").write_bytes(text)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "renamed.md").write_bytes(text)
    (tmp_path / "b" / "book.txt.gz").write_bytes(gzip.compress(text))
    (tmp_path / "b" / "book.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    expected = held_out(tmp_path / "a")
    assert expected and sum(map(len, expected)) > len(text) // 20
    for name in ("renamed.md", "book.txt.gz", "book.txt.zst"):
        assert held_out(tmp_path / "b" / name) == expected, name
    assert held_out(tmp_path / "b") == sorted(expected * 3)  # the three read together
    # records: one file, or shuffled into three files of which some are compressed
    lines = SHAKESPEARE.splitlines()
    records = [json.dumps({"text": "\n".join(lines[i : i + 6])}) + "\n" for i in range(0, 6000, 6)]
    (tmp_path / "one.jsonl").write_text("".join(records))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "0.jsonl").write_text("".join(records[2::3]))
    (tmp_path / "shards" / "1.jsonl.gz").write_bytes(gzip.compress("".join(records[::3]).encode()))
    (tmp_path / "shards" / "2.jsonl").write_text("".join(records[1::3]))
    whole = held_out(tmp_path / "one.jsonl")
    assert 60 <= len(whole) <= 140  # about a tenth of the 1,000 records
    assert held_out(tmp_path / "shards") == whole
    parts = [held_out(tmp_path / "shards" / n) for n in ("0.jsonl", "1.jsonl.gz", "2.jsonl")]
    assert sorted(sum(parts, [])) == whole


def make_sources(tmp_path):
    """Three sources of about 1:3:6 bytes of text (plain, JSONL, gzip); every line names its
    source."""
    (tmp_path / "c").mkdir()
    lines = [line for line in SHAKESPEARE.splitlines() if line.strip()]
    (tmp_path / "c" / "a.txt").write_text("".join(f"A {line}\n" for line in lines[:2000]))
    records = ("".join(f"B {i} {line}\n" for line in lines[i : i + 8]) for i in range(0, 6000, 8))
    (tmp_path / "c" / "b.jsonl").write_text(
        "".join(json.dumps({"text": text}) + "\n" for text in records)
    )
    big = "".join(f"C {line}\n" for line in (lines * 2)[:12000]).encode()
    (tmp_path / "c" / "c.txt.gz").write_bytes(gzip.compress(big, compresslevel=1))
    return list_sources(tmp_path / "c")


def test_the_sample_is_spread_over_files_in_proportion_in_every_prefix(tmp_path):
    sources = make_sources(tmp_path)
    share = 0.1
    train = {text for split, text in documents(read_documents(sources, share)) if split == "train"}
    val = {text for split, text in documents(read_documents(sources, share)) if split == "val"}
    sample = list(sample_texts(sources, share))
    lines = [line for text in sample for line in text.splitlines()]
    assert not any(text in val for text in sample)  # the tokenizer trains on the train split only
    # all of it, once
    assert sorted(lines) == sorted(line for text in train for line in text.splitlines())
    sizes = {"A": 0, "B": 0, "C": 0}
    for text in train:
        sizes[text[0]] += len(text)
    total, got, checks = sum(sizes.values()), {"A": 0, "B": 0, "C": 0}, [0.1, 0.25, 0.5]
    for text in sample:  # every prefix of the stream, in bytes, holds each source in proportion
        for line in text.splitlines(keepends=True):
            got[line[0]] += len(line)
        if checks and sum(got.values()) >= checks[0] * total:
            checks.pop(0)
            for name in got:
                assert got[name] / sum(got.values()) == pytest.approx(
                    sizes[name] / total, abs=0.05
                ), got


def test_the_sample_of_a_plain_file_is_spread_over_it(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "MAX_BLOCK", 4096)
    (tmp_path / "t.txt").write_text(SHAKESPEARE)
    positions = [
        SHAKESPEARE.index(text) / len(SHAKESPEARE)
        for text in list(sample_texts(list_sources(tmp_path / "t.txt"), 0.1))[:6]
    ]
    assert all(any(q <= p < q + 0.25 for p in positions) for q in (0, 0.25, 0.5, 0.75))


def test_progress_counts_bytes_on_disk(tmp_path):
    docs = ["中文的文本" * 50 for _ in range(100)]
    # json.dumps writes the Chinese text as \\uXXXX escapes, 6 bytes a character
    (tmp_path / "escaped.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "z.txt.gz").write_bytes(gzip.compress(("text " * 20_000).encode()))
    pieces = pieces_of(tmp_path)
    raw = (tmp_path / "escaped.jsonl").stat().st_size
    assert pieces[99].raw_done == raw and sum(p.nbytes for p in pieces[:100]) < raw / 1.5
    assert pieces[-1].raw_done == raw + (tmp_path / "z.txt.gz").stat().st_size
