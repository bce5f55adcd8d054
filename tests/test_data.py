"""infra/prepare.py and data.py: preparing shards (resumable, in place, by parts), reading them
back, batches, bits per byte."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from array import array
from pathlib import Path

import numpy as np
import pytest
import torch

from data import DataError, TokenData, bits_per_byte, read_meta, token_byte_lengths
from infra import bpe_train, corpus
from infra import prepare as preparing
from infra.corpus import iter_texts
from infra.fast_encode import encode_stream
from infra.prepare import check_prepared, merge_parts, prepare
from infra.tokenizer_variants import ImportedTokenizer
from tokenizer import EOT, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = (ROOT / "data" / "tinyshakespeare.txt").read_text()


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(SHAKESPEARE[:100_000] + "你好，世界。", 400).save(path)
    return path


def read_split(out: Path, split: str) -> np.ndarray:
    """The tokens of a split, read from the shards meta.json names (paths relative to out)."""
    meta = json.loads((Path(out) / "meta.json").read_text())
    shards = [
        np.fromfile(Path(out) / s["path"], dtype=meta["dtype"])
        for s in meta["splits"][split]["shards"]
    ]
    return np.concatenate(shards) if shards else np.zeros(0, dtype=meta["dtype"])


def expected_split(inputs, tok: Tokenizer, split: str, share: float) -> list[int]:
    """Each document of the split encoded on its own, with EOS after it."""
    ids, text = [], ""
    for piece in corpus.read_documents(corpus.list_sources(inputs), share):
        if piece.split == split:
            text += piece.text
            if piece.ends:
                ids += tok.encode_ordinary(text) + [tok.eos_id]
                text = ""
    return ids


def test_prepare_round_trips_documents(tmp_path, tokenizer_file):
    docs = [f"Document {i}.\nWith two lines.\n" for i in range(30)] + [
        "第二个文档，中文。",
        "Third <|endoftext|> text.",
    ]
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "a.txt").write_text(docs[0])
    (corpus_dir / "b.jsonl").write_text(
        "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs[1:]))
    )
    out = tmp_path / "prepared"
    meta = prepare(
        [str(corpus_dir)],
        str(out),
        tokenizer_path=str(tokenizer_file),
        val_fraction=0.3,
        verbose=False,
    )
    tok = Tokenizer.load(out / "tokenizer.json")
    ids = np.concatenate([read_split(out, "train"), read_split(out, "val")]).tolist()
    # every document ends with one EOS; the literal "<|endoftext|>" inside a document stays text
    assert ids.count(tok.eos_id) == len(docs)
    ends = [i for i, t in enumerate(ids) if t == tok.eos_id]
    assert sorted(tok.decode(ids[a + 1 : b]) for a, b in zip([-1] + ends, ends)) == sorted(docs)
    assert (
        3 <= meta["splits"]["val"]["documents"] <= 20 and meta["splits"]["train"]["documents"] >= 10
    )
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == sum(
        len(d.encode()) for d in docs
    )
    assert meta["dtype"] == "uint16" and meta["splits"]["train"]["shards"] == [
        {"path": "train_00000.bin", "tokens": meta["splits"]["train"]["tokens"]}
    ]
    assert sorted(os.listdir(out)) == [
        "meta.json",
        "tokenizer.json",
        "train_00000.bin",
        "val_00000.bin",
    ]
    assert sorted(os.listdir(tmp_path)) == ["corpus", "prepared"]


def test_a_text_file_is_encoded_as_its_documents_in_several_shards(
    tmp_path, tokenizer_file, monkeypatch
):
    text = SHAKESPEARE[:60_000]
    (tmp_path / "play.txt").write_text(text)
    monkeypatch.setattr(corpus, "MIN_BLOCK", 512)
    monkeypatch.setattr(corpus, "MAX_BLOCK", 1000)
    monkeypatch.setattr(preparing, "SHARD_TOKENS", 1500)  # several shards per split
    meta = prepare(
        [str(tmp_path / "play.txt")],
        str(tmp_path / "out"),
        tokenizer_path=str(tokenizer_file),
        val_fraction=0.25,
        num_workers=2,
        verbose=False,
    )
    tok = Tokenizer.load(tokenizer_file)
    assert len(meta["splits"]["train"]["shards"]) > 3
    for split in ("train", "val"):
        assert read_split(tmp_path / "out", split).tolist() == expected_split(
            tmp_path / "play.txt", tok, split, 0.25
        )
    # the file's blocks (none held out, so no margin left out), cut at safe points, give the
    # tokens of the whole file
    pieces = list(corpus.read_documents(corpus.list_sources(tmp_path / "play.txt"), 0.0))
    assert [t for p in pieces for t in tok.encode_ordinary(p.text)] == tok.encode_ordinary(text)
    assert 0.15 < meta["splits"]["val"]["bytes"] / len(text) < 0.35


def test_an_interrupted_prepare_is_not_complete_and_resumes(tmp_path, tokenizer_file, monkeypatch):
    (tmp_path / "t.txt").write_text(SHAKESPEARE[:40_000])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(preparing._ShardWriter, "add", crash)
        with pytest.raises(KeyboardInterrupt):
            prepare(
                [str(tmp_path / "t.txt")],
                str(tmp_path / "out"),
                tokenizer_path=str(tokenizer_file),
                verbose=False,
            )
    assert sorted(os.listdir(tmp_path / "out")) == ["prepare.json", "tokenizer.json"]
    with pytest.raises(DataError, match="no prepared data in .*meta.json missing"):
        read_meta(tmp_path / "out")
    with pytest.raises(
        DataError,
        match="holds an unfinished prepare with val_fraction=0.1, not 0.2; run again with "
        "the same settings to resume it, or delete .*out to start over",
    ):
        prepare(
            [str(tmp_path / "t.txt")],
            str(tmp_path / "out"),
            tokenizer_path=str(tokenizer_file),
            val_fraction=0.2,
        )
    prepare(
        [str(tmp_path / "t.txt")],
        str(tmp_path / "out"),
        tokenizer_path=str(tokenizer_file),
        verbose=False,
    )
    assert read_split(tmp_path / "out", "train").tolist() == expected_split(
        tmp_path / "t.txt", Tokenizer.load(tokenizer_file), "train", 0.1
    )
    assert not (tmp_path / "out" / "prepare.json").exists()


def test_folders_of_the_user_are_never_emptied(tmp_path, tokenizer_file):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "corpus.txt").write_text(SHAKESPEARE[:40_000])
    with pytest.raises(
        DataError, match=r"d already holds corpus.txt, which was not prepared here; choose a new"
    ):
        prepare(
            [str(tmp_path / "d" / "corpus.txt")],
            str(tmp_path / "d"),
            tokenizer_path=str(tokenizer_file),
        )
    assert sorted(os.listdir(tmp_path / "d")) == ["corpus.txt"]
    (tmp_path / "mount" / "lost+found").mkdir(parents=True)  # an empty volume is prepared in place
    prepare(
        [str(tmp_path / "d")],
        str(tmp_path / "mount"),
        tokenizer_path=str(tokenizer_file),
        verbose=False,
    )
    assert "lost+found" in os.listdir(tmp_path / "mount")
    assert sorted(os.listdir(tmp_path)) == ["d", "mount"]
    meta = prepare(
        [str(tmp_path / "d")],
        str(tmp_path / "mount"),
        tokenizer_path=str(tokenizer_file),
        verbose=False,
    )
    # already prepared with these settings: nothing to do
    assert meta == read_meta(tmp_path / "mount")
    with pytest.raises(
        DataError, match="mount was prepared with val_fraction=0.1, not 0.3; delete"
    ):
        prepare(
            [str(tmp_path / "d")],
            str(tmp_path / "mount"),
            tokenizer_path=str(tokenizer_file),
            val_fraction=0.3,
        )


def run_script(tmp_path, setup: str, argv: list[str], timeout=120) -> subprocess.CompletedProcess:
    """Run `python -m infra.prepare` (infra.prepare.main) with argv in a fresh process after `setup`
    (small constants, injected faults)."""
    script = tmp_path / "run.py"
    script.write_text(
        f"import os, signal, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport tokenizer\n"
        f"from infra import corpus, prepare as preparing\n"
        f"preparing.CHECKPOINT_SECONDS = 0\ncorpus.MIN_BLOCK = corpus.MAX_BLOCK = 2048\n"
        f"{setup}\npreparing.main({argv!r})\n"
    )
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, cwd=tmp_path
    )


KILL_AT_40TH_WRITE = """
calls, add = 0, preparing._ShardWriter.add
def add_then_die(self, *args):
    global calls
    calls += 1
    if calls == 40:
        os.kill(os.getpid(), signal.SIGKILL)
    add(self, *args)
preparing._ShardWriter.add = add_then_die
preparing.SHARD_TOKENS = 3000
"""


def test_a_killed_prepare_resumes_where_it_stopped(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text(SHAKESPEARE[:150_000])
    argv = [
        "--input",
        str(tmp_path / "t.txt"),
        "--out",
        str(tmp_path / "out"),
        "--vocab-size",
        "300",
        "--workers",
        "1",
    ]
    killed = run_script(tmp_path, KILL_AT_40TH_WRITE, argv)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(os.listdir(tmp_path)) == [
        "out",
        "run.py",
        "t.txt",
    ]  # no temporary copies beside it
    manifest = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert manifest["checkpoint"]["splits"]["train"]["shards"]  # work was done and is kept
    monkeypatch.setattr(corpus, "MIN_BLOCK", 2048)
    monkeypatch.setattr(corpus, "MAX_BLOCK", 2048)
    monkeypatch.setattr(preparing, "SHARD_TOKENS", 3000)
    # the tokenizer trained before the kill is reused
    monkeypatch.setattr(bpe_train, "train_tokenizer", None)
    monkeypatch.setattr(preparing, "read_documents", counting(preparing.read_documents))
    meta = prepare([str(tmp_path / "t.txt")], str(tmp_path / "out"), 300, verbose=False)
    assert (
        preparing.read_documents.starts
        == [tuple(manifest["checkpoint"]["position"])]
        != [(0, 0, 0)]
    )
    tok = Tokenizer.load(tmp_path / "out" / "tokenizer.json")
    for split in ("train", "val"):
        assert read_split(tmp_path / "out", split).tolist() == expected_split(
            tmp_path / "t.txt", tok, split, 0.1
        )
    assert len(meta["splits"]["train"]["shards"]) > 10
    shards = {s["path"] for split in meta["splits"].values() for s in split["shards"]}
    assert set(os.listdir(tmp_path / "out")) == shards | {
        "meta.json",
        "tokenizer.json",
    }  # no leftovers


def counting(read_documents):
    def wrapper(sources, share, text_field="text", start=(0, 0, 0), *args, **kwargs):
        wrapper.starts.append(tuple(start))
        return read_documents(sources, share, text_field, start, *args, **kwargs)

    wrapper.starts = []
    return wrapper


def test_a_full_disk_is_a_one_line_error_and_the_prepare_resumes(
    tmp_path, tokenizer_file, monkeypatch
):
    (tmp_path / "t.txt").write_text(SHAKESPEARE[:100_000])
    full = (
        "import resource\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))\n"
    )
    argv = [
        "--input",
        str(tmp_path / "t.txt"),
        "--out",
        str(tmp_path / "out"),
        "--tokenizer",
        str(tokenizer_file),
    ]
    result = run_script(tmp_path, full, argv + ["--workers", "2"])
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(
        f"error: cannot write to {tmp_path / 'out'} (File too large);"
    )
    assert "Traceback" not in result.stderr
    monkeypatch.setattr(corpus, "MIN_BLOCK", 2048)  # as in the script
    monkeypatch.setattr(corpus, "MAX_BLOCK", 2048)
    prepare(
        [str(tmp_path / "t.txt")],
        str(tmp_path / "out"),
        tokenizer_path=str(tokenizer_file),
        verbose=False,
    )
    for split in ("train", "val"):
        assert read_split(tmp_path / "out", split).tolist() == expected_split(
            tmp_path / "t.txt", Tokenizer.load(tokenizer_file), split, 0.1
        )


def test_a_dead_worker_is_an_error_not_a_hang(tmp_path, tokenizer_file):
    (tmp_path / "t.txt").write_text(SHAKESPEARE[:100_000])
    die = (
        "from infra import fast_encode\n"
        "def die(texts):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        "fast_encode._encode_chunk = die\n"
    )
    result = run_script(
        tmp_path,
        die,
        [
            "--input",
            str(tmp_path / "t.txt"),
            "--out",
            str(tmp_path / "out"),
            "--tokenizer",
            str(tokenizer_file),
            "--workers",
            "2",
        ],
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(
        "error: an encoding worker process died (out of memory, or killed)"
    )
    assert (
        "run the same command again to resume" in result.stderr and "Traceback" not in result.stderr
    )


def test_shards_tokenizer_and_meta_are_fsynced_before_they_count(
    tmp_path, tokenizer_file, monkeypatch
):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced files")
    synced, fsync = [], os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd))
    )
    monkeypatch.setattr(preparing, "SHARD_TOKENS", 2000)
    (tmp_path / "t.txt").write_text(SHAKESPEARE[:40_000])
    meta = prepare(
        [str(tmp_path / "t.txt")],
        str(tmp_path / "out"),
        tokenizer_path=str(tokenizer_file),
        verbose=False,
    )
    out = str(tmp_path / "out")
    shards = [f"{out}/{s['path']}" for split in meta["splits"].values() for s in split["shards"]]
    assert set(shards + [out, f"{out}/tokenizer.json.tmp", f"{out}/meta.json.tmp"]) <= set(synced)
    assert synced.index(f"{out}/meta.json.tmp") > max(synced.index(s) for s in shards)


def test_parts_merged_give_the_tokens_of_one_prepare(tmp_path, tokenizer_file, monkeypatch):
    monkeypatch.setattr(preparing, "SHARD_TOKENS", 5000)
    (tmp_path / "c" / "web").mkdir(parents=True)
    for k in range(4):
        (tmp_path / "c" / f"book{k}.txt").write_text(SHAKESPEARE[k * 25_000 : (k + 1) * 25_000])
        (tmp_path / "c" / "web" / f"{k}.jsonl").write_text(
            "".join(
                json.dumps({"text": SHAKESPEARE[i : i + 700]}) + "\n"
                for i in range(k * 20_000, (k + 1) * 20_000, 700)
            )
        )
    inputs, tok = [str(tmp_path / "c")], str(tokenizer_file)
    whole = prepare(inputs, str(tmp_path / "whole"), tokenizer_path=tok, verbose=False)
    for i in range(3):
        part = prepare(
            inputs, str(tmp_path / "parts"), tokenizer_path=tok, part=(i, 3), verbose=False
        )
        assert part["part"] == [i, 3]
    with pytest.raises(DataError, match="needs a given tokenizer"):
        prepare(inputs, str(tmp_path / "parts"), 400, part=(0, 3))
    merged = merge_parts(tmp_path / "parts", verbose=False)
    assert merged == read_meta(tmp_path / "parts") and merged["parts"] == 3
    assert os.listdir(tmp_path / "parts" / "part-00001") and not list(
        (tmp_path / "parts").glob("*.bin")
    )
    assert merged["splits"]["train"]["shards"][-1]["path"].startswith("part-00002/train_")
    for split in ("train", "val"):
        assert (
            read_split(tmp_path / "parts", split).tolist()
            == read_split(tmp_path / "whole", split).tolist()
        )
        for key in ("tokens", "bytes", "documents"):
            assert merged["splits"][split][key] == whole["splits"][split][key]
    check_prepared(tmp_path / "parts", inputs, tokenizer_path=tok, val_fraction=0.1)
    (tmp_path / "lonely").mkdir()
    prepare(inputs, str(tmp_path / "lonely"), tokenizer_path=tok, part=(1, 3), verbose=False)
    with pytest.raises(DataError, match=r"missing: \[0, 2\].*--part I/3"):
        merge_parts(tmp_path / "lonely")


def test_check_prepared_names_the_setting_that_differs(tmp_path, tokenizer_file, monkeypatch):
    (tmp_path / "t.txt").write_text(SHAKESPEARE[:40_000])
    (tmp_path / "u.txt").write_text(SHAKESPEARE[40_000:80_000])
    out, inputs = tmp_path / "out", [str(tmp_path / "t.txt")]
    prepare(inputs, str(out), 300, val_fraction=0.1, tokenizer_max_bytes=30_000, verbose=False)
    same = dict(
        inputs=inputs,
        vocab_size=300,
        val_fraction=0.1,
        tokenizer_max_bytes=30_000,
        text_field="text",
    )
    assert check_prepared(out, **same)["vocab_size"] == 300
    monkeypatch.chdir(tmp_path)
    check_prepared(out, **{**same, "inputs": ["t.txt"]})  # the same file, named relative to here
    check_prepared(out)  # nothing to compare
    for change, message in [
        (
            {"inputs": [str(tmp_path / "u.txt")]},
            r"was prepared from .*t.txt, not .*u.txt \(inputs\)"
            r"; delete .*out \(or choose another data folder\) to prepare it again$",
        ),
        (
            {"inputs": ["missing.txt"]},
            "input missing.txt does not exist, and .*out was prepared from",
        ),
        ({"val_fraction": 0.2}, r"with val_fraction=0.1, not 0.2; .*, or set val_fraction=0.1$"),
        ({"vocab_size": 512}, "with vocab_size=300, not 512"),
        ({"tokenizer_max_bytes": 10**6}, "with tokenizer_max_bytes=30000, not 1000000"),
        ({"text_field": "body"}, 'with text_field="text", not "body"'),
        ({"pattern": WORDS_AND_SPACES}, r"split pattern '\(\?i:.*, not \\S\+\|\\s\+; delete"),
        ({"tokenizer_path": str(tokenizer_file)}, "with another tokenizer than .*tokenizer.json"),
        ({"tokenizer_path": "nope.json"}, "tokenizer nope.json does not exist"),
    ]:
        with pytest.raises(DataError, match=message):
            check_prepared(out, **{**same, **change})
    # the folder's own tokenizer, saved differently: the same content
    reindented = tmp_path / "reindented.json"
    reindented.write_text(json.dumps(json.loads((out / "tokenizer.json").read_text()), indent=4))
    check_prepared(out, **{**same, "tokenizer_path": str(reindented)})


WORDS_AND_SPACES = r"\S+|\s+"


def test_the_split_pattern_is_a_setting_of_data_prep(tmp_path, capsys):
    """`python -m infra.prepare --pattern REGEX` trains the folder's tokenizer with that pattern
    (and the folder records it); an invalid pattern is one line, before any corpus is read."""
    (tmp_path / "t.txt").write_text(SHAKESPEARE[:40_000])
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "t.txt"), "--out", str(out), "--vocab-size", "300"]
    assert preparing.main([*argv, "--pattern", WORDS_AND_SPACES]) is None
    tokenizer = Tokenizer.load(out / "tokenizer.json")
    assert tokenizer.pattern == WORDS_AND_SPACES
    assert tokenizer.split("to be,\n") == ["to", " ", "be,", "\n"]
    assert check_prepared(out, pattern=WORDS_AND_SPACES)["vocab_size"] == 300
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"^error: invalid split pattern"):
        preparing.main(
            [
                "--input",
                "nowhere",
                "--out",
                str(tmp_path / "bad"),
                "--vocab-size",
                "300",
                "--pattern",
                "(unclosed",
            ]
        )
    assert not (tmp_path / "bad").exists()


def test_the_tokenizer_trains_on_a_sample_of_the_train_split(tmp_path, monkeypatch, capsys):
    docs = [f"doc{i} " + SHAKESPEARE[i * 500 : (i + 1) * 500] for i in range(100)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    seen, train = [], bpe_train.train_tokenizer

    def spy(texts, vocab_size, **kwargs):
        texts = list(texts)
        seen.extend(texts)
        return train(texts, vocab_size, **kwargs)

    monkeypatch.setattr(bpe_train, "train_tokenizer", spy)
    prepare([str(tmp_path / "d.jsonl")], str(tmp_path / "out"), 300, val_fraction=0.2)
    err, size = capsys.readouterr().err, (tmp_path / "d.jsonl").stat().st_size / 1e6
    for stage in (
        "tokenizer sample",
        "encoding",
    ):  # every stage ends with a progress line: MB, MB/s, ETA
        assert re.search(rf"{stage}: [0-9.]+/{size:.1f} MB  [0-9.]+ MB/s  ETA +0s\n", err), (
            stage,
            err,
        )
    tok = Tokenizer.load(tmp_path / "out" / "tokenizer.json")
    val = {
        doc.split()[0]
        for doc in tok.decode(read_split(tmp_path / "out", "val").tolist()).split(EOT)[:-1]
    }
    assert len(val) > 5 and not val & {text.split()[0] for text in seen}
    assert len(seen) + len(val) == len(docs)


def test_bos_goes_before_each_document_when_the_tokenizer_has_one(
    tmp_path, tokenizer_file, monkeypatch
):
    monkeypatch.setattr(Tokenizer, "bos_id", property(lambda self: 7))
    docs = [f"document {i}\n" for i in range(50)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare(
        [str(tmp_path / "d.jsonl")],
        str(tmp_path / "out"),
        tokenizer_path=str(tokenizer_file),
        val_fraction=0.2,
        verbose=False,
    )
    tok = Tokenizer.load(tokenizer_file)
    for split in ("train", "val"):
        ids = read_split(tmp_path / "out", split).tolist()
        assert ids.count(7) == ids.count(tok.eos_id) == meta["splits"][split]["documents"]
        assert (
            ids[0] == 7
            and ids[-1] == tok.eos_id
            and all(ids[i + 1] == 7 for i, t in enumerate(ids[:-1]) if t == tok.eos_id)
        )
    assert meta["bos_id"] == 7


def test_encoded_ids_stay_arrays(tokenizer_file):
    tok = Tokenizer.load(tokenizer_file)
    texts = [SHAKESPEARE[i : i + 5000] for i in range(0, 600_000, 5000)]
    for workers in (1, 2):
        encoded = list(encode_stream(tok, texts, workers, allowed_special=None))
        assert all(type(ids) is array for ids in encoded)
        assert [ids.tolist() for ids in encoded] == [tok.encode_ordinary(t) for t in texts]


def test_clear_errors(tmp_path, tokenizer_file, capsys):
    with pytest.raises(DataError, match="does not exist"):
        prepare(
            [str(tmp_path / "missing.txt")],
            str(tmp_path / "out"),
            tokenizer_path=str(tokenizer_file),
        )
    (tmp_path / "short.txt").write_text("tiny text\nmore\n")
    with pytest.raises(
        DataError, match="the val split of .*short.txt is empty: its text is a single unit"
    ) as error:
        prepare(
            [str(tmp_path / "short.txt")],
            str(tmp_path / "short"),
            tokenizer_path=str(tokenizer_file),
            verbose=False,
        )
    assert str(error.value).endswith(
        "; add text, 40,960 bytes or more"
    ) and "val_fraction" not in str(error.value)
    (tmp_path / "t.txt").write_text(SHAKESPEARE[:40_000])
    prepare(
        [str(tmp_path / "t.txt")],
        str(tmp_path / "ok"),
        tokenizer_path=str(tokenizer_file),
        verbose=False,
    )
    with pytest.raises(DataError, match="fewer than max_seq_len"):
        TokenData(str(tmp_path / "ok"), "val").check_length(4096)
    (tmp_path / "ok" / "train_00000.bin").unlink()
    with pytest.raises(DataError, match="missing or empty"):
        TokenData(str(tmp_path / "ok"), "train")
    meta = json.loads((tmp_path / "ok" / "meta.json").read_text())
    del meta["settings"]  # as the previous version wrote it
    (tmp_path / "ok" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        DataError, match="prepared by an older version of this code.*; delete it to prepare it"
    ):
        check_prepared(tmp_path / "ok", inputs=[str(tmp_path / "t.txt")])
    (tmp_path / "ok" / "meta.json").write_text('{"format": "llm-tokens", "vers')
    with pytest.raises(DataError, match="meta.json is corrupt or from another version"):
        TokenData(str(tmp_path / "ok"), "val")
    with pytest.raises(
        SystemExit, match=r"error: --vocab-size 999 differs from the 400 tokens of .*; leave"
    ):
        preparing.main(
            [
                "--input",
                str(tmp_path / "t.txt"),
                "--out",
                str(tmp_path / "v"),
                "--tokenizer",
                str(tokenizer_file),
                "--vocab-size",
                "999",
            ]
        )
    assert not (tmp_path / "v").exists()


def test_bits_per_byte_by_hand():
    # 10 tokens at ln(4) nats each, encoding 8 bytes: 10 * 2 bits / 8 bytes = 2.5 bits per byte
    assert bits_per_byte(10 * math.log(4), 8) == pytest.approx(2.5)
    # merges: (a, b) -> 256, then one more; EOT is 258
    tok = Tokenizer.train("ab ab ab abc abc", 259)
    lengths = token_byte_lengths(tok, 300)
    assert (
        lengths[ord("a")] == 1
        and lengths[256] == 2
        and lengths[257] == len(tok.decode_bytes([257]))
    )
    # special and unused ids stand for no text
    assert lengths[tok.eos_id] == 0 and lengths[299] == 0


def test_token_byte_lengths_skip_the_gaps_of_an_imported_vocabulary():
    """Imported vocabularies may leave ids unused (vocab[i] is None), which decode_bytes refuses."""
    vocab = [bytes([b]) for b in range(256)] + [None, b"ab", None]
    tok = ImportedTokenizer(r"\w+| ", (), {EOT: 260}, vocab=vocab)
    assert tok.encode_ordinary("ab a") == [257, 32, 97] and tok.vocab_size == 261
    lengths = token_byte_lengths(tok, 264)
    assert lengths.tolist() == [1.0] * 256 + [0.0, 2.0] + [0.0] * 6


def test_evaluation_bits_per_byte_matches_a_hand_computation(tmp_path, tokenizer_file):
    """A model with uniform logits loses ln(V) nats on every token:
    bpb = n ln V / (ln 2 * bytes)."""
    from contextlib import nullcontext

    import train
    from config import TrainConfig
    from infra import run
    from infra.distributed import Runtime
    from model import ModelConfig

    (tmp_path / "t.txt").write_text(SHAKESPEARE[:40_000])
    cfg = TrainConfig(
        model=ModelConfig(vocab_size=400, dim=32, n_layers=1, n_heads=2, max_seq_len=32),
        inputs=[str(tmp_path / "t.txt")],
        data_dir=str(tmp_path / "data"),
        out_dir=str(tmp_path / "run"),
        tokenizer=str(tokenizer_file),
        micro_batch_size=4,
        global_batch_tokens=128,
        eval_tokens=320,
    )
    rt = Runtime(0, 0, 1, torch.device("cpu"))
    tokenizer = run.ensure_data(cfg, rt, resuming=False)
    model = train.build_model(cfg, rt, torch.float32, sharded=False, pretrained=False)
    with torch.no_grad():
        model.output.weight.zero_()
    result = train.evaluate(
        model,
        TokenData(cfg.data_dir, "val"),
        cfg,
        4,
        token_byte_lengths(tokenizer, cfg.model.vocab_size),
        rt,
        nullcontext,
    )
    stream, tok = TokenData(cfg.data_dir, "val"), Tokenizer.load(tokenizer_file)
    targets = [
        t for s in stream.eval_starts(32, 320) for t in stream.window(int(s) + 1, 32).tolist()
    ]
    assert len(targets) == 320
    text_bytes = sum(len(tok.decode_bytes([t])) for t in targets if t != tok.eos_id)
    assert result["val_loss"] == pytest.approx(math.log(400), rel=1e-6)
    assert result["val_bpb"] == pytest.approx(
        len(targets) * math.log(400) / (math.log(2) * text_bytes), rel=1e-6
    )


def test_iter_texts(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "third", "id": 1}) + "\n\n" + json.dumps({"text": "fourth 中"}) + "\n"
    )
    assert list(iter_texts(tmp_path)) == ["first", "second", "third", "fourth 中"]
    assert list(iter_texts([tmp_path / "a.txt", str(tmp_path / "c.jsonl")])) == [
        "first",
        "third",
        "fourth 中",
    ]
    with pytest.raises(DataError, match="does not exist"):
        list(iter_texts(tmp_path / "nope"))
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match='bad.jsonl: 1 of 1 records are bad .*no "text" field'):
        list(iter_texts(tmp_path / "bad.jsonl"))


def test_the_data_keys_of_the_config():
    from config import ConfigError
    from infra.configurator import load_config

    cfg = load_config(
        None, ["--val_max_bytes=1e6", "--text_field=body", "--tokenizer_memory_budget=2e9"]
    )
    assert (cfg.val_max_bytes, cfg.text_field, cfg.tokenizer_memory_budget) == (
        10**6,
        "body",
        2 * 10**9,
    )
    assert load_config().tokenizer_memory_budget is None
    for bad in ["--val_max_bytes=0", "--text_field=", "--tokenizer_memory_budget=-1"]:
        with pytest.raises(ConfigError, match=bad[2:].split("=")[0]):
            load_config(None, [bad])


# ----------------------------------------------------------------------------- never losing work


def wait_for(predicate, seconds=60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def start_script(tmp_path, name: str, setup: str, argv: list[str]) -> subprocess.Popen:
    """run_script's process, started in the background with stderr to tmp_path/name.err."""
    script = tmp_path / f"{name}.py"
    script.write_text(
        f"import os, signal, sys, time\nsys.path.insert(0, {str(ROOT)!r})\n"
        f"from infra import corpus, prepare as preparing\n"
        f"preparing.CHECKPOINT_SECONDS = 0\ncorpus.MIN_BLOCK = corpus.MAX_BLOCK = 2048\n"
        f"{setup}\npreparing.main({argv!r})\n"
    )
    return subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / f"{name}.err", "w"),
        cwd=tmp_path,
    )


PAUSE_AT_10TH_WRITE = """
calls, add = 0, preparing._ShardWriter.add
def add_then_pause(self, *args):
    global calls
    calls += 1
    if calls == 10:
        open("paused", "w").close()
        while not os.path.exists("go"):
            time.sleep(0.05)
    add(self, *args)
preparing._ShardWriter.add = add_then_pause
preparing.SHARD_TOKENS = 3000
"""


def test_a_second_prepare_of_a_folder_waits_for_the_first(tmp_path, tokenizer_file, monkeypatch):
    """The second prepare of a folder in use "resumed" the first one's and cut
    its shards. It waits, saying so, then finds the folder prepared."""
    (tmp_path / "t.txt").write_text(SHAKESPEARE[:100_000])
    argv = [
        "--input",
        str(tmp_path / "t.txt"),
        "--out",
        str(tmp_path / "out"),
        "--tokenizer",
        str(tokenizer_file),
        "--workers",
        "1",
    ]
    first = start_script(tmp_path, "first", PAUSE_AT_10TH_WRITE, argv)
    second = None
    try:
        assert wait_for(lambda: (tmp_path / "paused").exists())
        second = start_script(tmp_path, "second", "", argv)
        waiting = f"waiting for another prepare of {tmp_path / 'out'} to finish"
        assert wait_for(lambda: waiting in (tmp_path / "second.err").read_text(), 30)
        assert second.poll() is None  # still waiting
        (tmp_path / "go").touch()
        assert first.wait(120) == 0 and second.wait(120) == 0
    finally:
        for process in (first, second):
            if process and process.poll() is None:
                process.kill()
    assert "is already prepared with these settings" in (tmp_path / "second.err").read_text()
    monkeypatch.setattr(corpus, "MIN_BLOCK", 2048)  # as in the script
    monkeypatch.setattr(corpus, "MAX_BLOCK", 2048)
    meta = read_meta(tmp_path / "out")
    for split in ("train", "val"):
        assert len(read_split(tmp_path / "out", split)) == meta["splits"][split]["tokens"]
        assert read_split(tmp_path / "out", split).tolist() == expected_split(
            tmp_path / "t.txt", Tokenizer.load(tokenizer_file), split, 0.1
        )


def test_parts_and_merge_refuse_a_folder_of_other_files(tmp_path, tokenizer_file):
    """--part and --merge wrote into a folder holding other files, and --merge
    replaced a tokenizer.json it had not written."""
    (tmp_path / "c").mkdir()
    for k in range(2):
        (tmp_path / "c" / f"{k}.txt").write_text(SHAKESPEARE[k * 40_000 : (k + 1) * 40_000])
    inputs, tok = [str(tmp_path / "c")], str(tokenizer_file)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    with pytest.raises(
        DataError,
        match=r"mine already holds notes.txt, which is not a part of a "
        r"prepare; choose a new or empty folder",
    ):
        prepare(inputs, str(tmp_path / "mine"), tokenizer_path=tok, part=(0, 2), verbose=False)
    with pytest.raises(DataError, match="mine already holds notes.txt"):
        merge_parts(tmp_path / "mine", verbose=False)
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    for i in range(2):
        prepare(inputs, str(tmp_path / "parts"), tokenizer_path=tok, part=(i, 2), verbose=False)
    other = tmp_path / "parts" / "tokenizer.json"
    Tokenizer.train(SHAKESPEARE[:20_000], 300).save(other)
    before = other.read_bytes()
    with pytest.raises(
        DataError,
        match=r"parts/tokenizer.json is not the tokenizer of the parts .*"
        r"merging would replace it; move it elsewhere first",
    ):
        merge_parts(tmp_path / "parts", verbose=False)
    assert other.read_bytes() == before and not (tmp_path / "parts" / "meta.json").exists()
    other.unlink()
    merge_parts(tmp_path / "parts", verbose=False)
    merge_parts(tmp_path / "parts", verbose=False)  # an earlier merge of these parts: done again
    prepare(inputs, str(tmp_path / "parts"), tokenizer_path=tok, part=(1, 2), verbose=False)


def test_merge_refuses_parts_prepared_from_inputs_that_changed_between_them(
    tmp_path, tokenizer_file
):
    """Part 0/2, a file appended to, part 1/2: the merge lost or doubled text."""
    (tmp_path / "c").mkdir()
    for k in range(2):
        (tmp_path / "c" / f"{k}.txt").write_text(SHAKESPEARE[k * 40_000 : (k + 1) * 40_000])
    inputs, tok = [str(tmp_path / "c")], str(tokenizer_file)
    prepare(inputs, str(tmp_path / "parts"), tokenizer_path=tok, part=(0, 2), verbose=False)
    with open(tmp_path / "c" / "0.txt", "a") as f:
        f.write(SHAKESPEARE[60_000:100_000])
    prepare(inputs, str(tmp_path / "parts"), tokenizer_path=tok, part=(1, 2), verbose=False)
    with pytest.raises(
        DataError,
        match=r"part-00001 and .*part-00000 were prepared from different input "
        r"files .*; prepare every part again from the same files",
    ):
        merge_parts(tmp_path / "parts", verbose=False)
    assert not (tmp_path / "parts" / "meta.json").exists()


def test_a_finished_folder_whose_inputs_changed_is_an_error(tmp_path, tokenizer_file):
    """A prepared folder kept serving the old tokens after its input grew."""
    (tmp_path / "t.txt").write_text(SHAKESPEARE[:40_000])
    inputs, out, tok = [str(tmp_path / "t.txt")], tmp_path / "out", str(tokenizer_file)
    meta = prepare(inputs, str(out), tokenizer_path=tok, verbose=False)
    assert meta["settings"]["sources"]["files"] == 1
    assert meta["settings"]["sources"]["bytes"] == 40_000
    assert check_prepared(out, inputs, tokenizer_path=tok) == meta
    with open(tmp_path / "t.txt", "a") as f:
        f.write(SHAKESPEARE[40_000:90_000])
    message = (
        r"out was prepared from input files that have changed since \(added, removed or modified: "
        r"1 file\(s\) of 40,000 bytes then, 1 of 90,000 bytes now\); delete .*out \(or choose "
        r"another data folder\) to prepare it again$"
    )
    with pytest.raises(DataError, match=message):
        prepare(inputs, str(out), tokenizer_path=tok, verbose=False)
    with pytest.raises(DataError, match=message):  # what train.py calls on a prepared folder
        check_prepared(out, inputs, tokenizer_path=tok)
    check_prepared(out)  # without inputs the folder is used as it is


def test_a_single_unit_corpus_is_not_told_to_change_val_fraction(tmp_path, tokenizer_file):
    """One record, or a text file too small to hold a val run, is one document, which cannot be
    split whatever val_fraction is; a corpus of several units can be, by raising it."""
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": SHAKESPEARE[:10_000]}) + "\n")
    with pytest.raises(
        DataError,
        match=r"the val split of .*one.jsonl is empty: its text is a single unit "
        r"\(a text file of less than 40,960 bytes, too small to hold a val run, or a record\)",
    ) as error:
        prepare(
            [str(tmp_path / "one.jsonl")],
            str(tmp_path / "a"),
            tokenizer_path=str(tokenizer_file),
            verbose=False,
        )
    assert "val_fraction" not in str(error.value)
    (tmp_path / "few.txt").write_text(SHAKESPEARE[:12_000])  # three blocks: one document
    with pytest.raises(DataError, match=r"few.txt is empty: .* add text, 409,600 bytes or more"):
        prepare(
            [str(tmp_path / "few.txt")],
            str(tmp_path / "b"),
            tokenizer_path=str(tokenizer_file),
            val_fraction=0.01,
            verbose=False,
        )
    (tmp_path / "few.jsonl").write_text(
        "".join(json.dumps({"text": SHAKESPEARE[i : i + 900]}) + "\n" for i in range(0, 9000, 900))
    )
    with pytest.raises(
        DataError, match="the val split of .*few.jsonl is empty; add text or raise val_fraction"
    ):
        prepare(
            [str(tmp_path / "few.jsonl")],
            str(tmp_path / "c"),
            tokenizer_path=str(tokenizer_file),
            val_fraction=0.01,
            verbose=False,
        )


WORKERS_THEN_DIE = """
calls, add = 0, preparing._ShardWriter.add
def add_then_die(self, *args):
    global calls
    calls += 1
    if calls == 20:
        import multiprocessing
        pids = [str(child.pid) for child in multiprocessing.active_children()]
        open("workers.tmp", "w").write(" ".join(pids))
        os.replace("workers.tmp", "workers")
        os.kill(os.getpid(), signal.SIGKILL)
    add(self, *args)
preparing._ShardWriter.add = add_then_die
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; its new parent may not reap it


def test_encode_workers_exit_when_the_prepare_is_killed(tmp_path, tokenizer_file):
    """Kill -9 of data.py left its encode workers running for ever."""
    if not Path("/proc/self/stat").is_file():
        pytest.skip("needs /proc to see the workers")
    (tmp_path / "t.txt").write_text(SHAKESPEARE[:300_000])
    argv = [
        "--input",
        str(tmp_path / "t.txt"),
        "--out",
        str(tmp_path / "out"),
        "--tokenizer",
        str(tokenizer_file),
        "--workers",
        "2",
    ]
    assert start_script(tmp_path, "killed", WORKERS_THEN_DIE, argv).wait(120) == -signal.SIGKILL
    pids = [int(pid) for pid in (tmp_path / "workers").read_text().split()]
    try:
        assert len(pids) == 2
        assert wait_for(lambda: not any(alive(pid) for pid in pids), 10)
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_folder_prepared_under_another_val_split_rule_is_not_used(tmp_path, tokenizer_file):
    """meta.json records the rule of the val split; a folder prepared under another is an error
    that says to prepare it again, not a run quietly measured on another split."""
    (tmp_path / "t.txt").write_text(SHAKESPEARE[:40_000])
    inputs, tok = [str(tmp_path / "t.txt")], str(tokenizer_file)
    prepare(inputs, str(tmp_path / "out"), tokenizer_path=tok, verbose=False)
    check_prepared(tmp_path / "out", inputs, tokenizer_path=tok)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    meta["settings"]["val_split"] = "every tenth block"
    (tmp_path / "out" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"with val_split=\"every tenth block\", not .*; delete"):
        check_prepared(tmp_path / "out", inputs, tokenizer_path=tok)
