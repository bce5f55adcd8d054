"""data.py: preparing shards, reading them back, batches, bits per byte."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import DataError, TokenData, bits_per_byte, iter_texts, prepare, token_byte_lengths
from tokenizer import EOT, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = (ROOT / "data" / "tinyshakespeare.txt").read_text()


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(SHAKESPEARE[:100_000] + "你好，世界。", 400).save(path)
    return path


def read_split(out: Path, split: str) -> np.ndarray:
    stream = TokenData(str(out), split)
    return stream.window(0, stream.num_tokens)


def test_prepare_round_trips_documents_and_splits_at_the_tail(tmp_path, tokenizer_file):
    docs = ["First document.\nWith two lines.\n", "第二个文档，中文。", "Third <|endoftext|> has the special text."]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(docs[0])
    (corpus / "b.jsonl").write_text("\n".join(json.dumps({"id": i, "text": d}) for i, d in enumerate(docs[1:])) + "\n")
    out = tmp_path / "prepared"
    meta = prepare([str(corpus)], str(out), tokenizer_path=str(tokenizer_file), val_fraction=0.3, verbose=False)
    tok = Tokenizer.load(out / "tokenizer.json")
    ids = np.concatenate([read_split(out, "train"), read_split(out, "val")]).tolist()
    # every document ends with one EOT; the literal "<|endoftext|>" inside a document stays text
    assert ids.count(tok.eos_id) == 3
    assert tok.decode(ids) == EOT.join(docs) + EOT
    assert meta["splits"]["val"]["documents"] >= 1 and meta["splits"]["train"]["documents"] >= 1
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in docs)
    assert meta["dtype"] == "uint16"
    assert not list(tmp_path.glob("prepared.tmp*"))


def test_chunked_reading_gives_the_tokens_of_the_whole_file(tmp_path, tokenizer_file, monkeypatch):
    text = SHAKESPEARE[:60_000]
    (tmp_path / "play.txt").write_text(text)
    monkeypatch.setattr(data, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(data, "SHARD_TOKENS", 1500)  # several shards per split
    prepare([str(tmp_path / "play.txt")], str(tmp_path / "out"), tokenizer_path=str(tokenizer_file),
            val_fraction=0.25, verbose=False)
    tok = Tokenizer.load(tokenizer_file)
    train, val = read_split(tmp_path / "out", "train"), read_split(tmp_path / "out", "val")
    assert len(TokenData(str(tmp_path / "out"), "train").shards) > 3
    assert np.concatenate([train, val]).tolist() == tok.encode_ordinary(text) + [tok.eos_id]
    # the split falls on a line start near 75% of the bytes
    train_text = tok.decode(train.tolist())
    assert train_text.endswith("\n") and abs(len(train_text) / len(text) - 0.75) < 0.01


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, tokenizer_file, monkeypatch):
    (tmp_path / "t.txt").write_text(SHAKESPEARE[:20_000])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data._ShardWriter, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "t.txt")], str(tmp_path / "out"), tokenizer_path=str(tokenizer_file), verbose=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.tmp*"))
    with pytest.raises(DataError, match="no prepared data in .*meta.json missing"):
        TokenData(str(tmp_path / "out"), "train")


def test_clear_errors(tmp_path, tokenizer_file):
    with pytest.raises(DataError, match="does not exist"):
        prepare([str(tmp_path / "missing.txt")], str(tmp_path / "out"), tokenizer_path=str(tokenizer_file))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="bad.jsonl:2 is not a JSON object"):
        prepare([str(tmp_path / "bad.jsonl")], str(tmp_path / "out"), tokenizer_path=str(tokenizer_file))
    (tmp_path / "short.txt").write_text("tiny text\nmore\n")
    prepare([str(tmp_path / "short.txt")], str(tmp_path / "short"), tokenizer_path=str(tokenizer_file),
            val_fraction=0.5, verbose=False)
    with pytest.raises(DataError, match="fewer than max_seq_len"):
        TokenData(str(tmp_path / "short"), "val").check_length(64)
    (tmp_path / "short" / "train_00000.bin").unlink()
    with pytest.raises(DataError, match="missing or empty"):
        TokenData(str(tmp_path / "short"), "train")
    (tmp_path / "short" / "meta.json").write_text('{"format": "llm-tokens", "vers')
    with pytest.raises(DataError, match="meta.json is corrupt or from another version"):
        TokenData(str(tmp_path / "short"), "val")


def test_bits_per_byte_by_hand():
    # 10 tokens at ln(4) nats each, encoding 8 bytes: 10 * 2 bits / 8 bytes = 2.5 bits per byte
    assert bits_per_byte(10 * math.log(4), 8) == pytest.approx(2.5)
    tok = Tokenizer.train("ab ab ab abc abc", 259)  # merges: (a, b) -> 256, then one more; EOT is 258
    lengths = token_byte_lengths(tok, 300)
    assert lengths[ord("a")] == 1 and lengths[256] == 2 and lengths[257] == len(tok.decode_bytes([257]))
    assert lengths[tok.eos_id] == 0 and lengths[299] == 0  # special and unused ids stand for no text


def test_evaluation_bits_per_byte_matches_a_hand_computation(tmp_path, tokenizer_file):
    """A model with uniform logits loses ln(V) nats on every token: bpb = n ln V / (ln 2 * bytes)."""
    from config import TrainConfig, plan_batch
    from model import ModelConfig
    from train import Runtime, Trainer

    (tmp_path / "t.txt").write_text(SHAKESPEARE[:40_000])
    cfg = TrainConfig(model=ModelConfig(vocab_size=400, dim=32, n_layers=1, n_heads=2, max_seq_len=32),
                      inputs=[str(tmp_path / "t.txt")], data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"),
                      tokenizer=str(tokenizer_file), micro_batch_size=4, global_batch_tokens=128, eval_tokens=320)
    trainer = Trainer(cfg, plan_batch(cfg, 1), Runtime(0, 0, 1, torch.device("cpu")))
    with torch.no_grad():
        trainer.model.output.weight.zero_()
    result = trainer.evaluate()
    stream, tok = TokenData(cfg.data_dir, "val"), Tokenizer.load(tokenizer_file)
    targets = [t for s in stream.eval_starts(32, 320) for t in stream.window(int(s) + 1, 32).tolist()]
    assert len(targets) == 320
    text_bytes = sum(len(tok.decode_bytes([t])) for t in targets if t != tok.eos_id)
    assert result["val_loss"] == pytest.approx(math.log(400), rel=1e-6)
    assert result["val_bpb"] == pytest.approx(len(targets) * math.log(400) / (math.log(2) * text_bytes), rel=1e-6)


def test_iter_texts(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "third", "id": 1}) + "\n\n"
                                      + json.dumps({"text": "fourth 中"}) + "\n")
    assert list(iter_texts(tmp_path)) == ["first", "second", "third", "fourth 中"]
    assert list(iter_texts([tmp_path / "a.txt", str(tmp_path / "c.jsonl")])) == ["first", "third", "fourth 中"]
    with pytest.raises(DataError, match="does not exist"):
        list(iter_texts(tmp_path / "nope"))
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match='bad.jsonl:1 is not a JSON object with a "text" field'):
        list(iter_texts(tmp_path / "bad.jsonl"))
