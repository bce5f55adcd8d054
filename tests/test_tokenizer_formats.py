"""Tokenizers of other formats: Hugging Face tokenizer.json (byte-level and SentencePiece-style
BPE), tiktoken ranks files, this project's version 2 files; export to Hugging Face; the accelerated
encoders.

Every tokenizer file here is built in the test from a small corpus with the `tokenizers` library
(nothing is downloaded), and every id is compared with the library that defines it: `tokenizers`
for tokenizer.json files, tiktoken for ranks files and for tokenizers trained here.
"""

import base64
import codecs
import hashlib
import json
import pickle
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra import corpus, tokenizer_formats
from infra import prepare as preparing
from infra.fast_encode import accelerate, cut_points, encode_stream
from infra.tokenizer_formats import LLAMA3_SPLIT_PATTERN
from infra.tokenizer_variants import ImportedTokenizer
from infra.tokenizers import load_tokenizer
from tests.test_tokenizer import CORPUS
from tokenizer import EOT, GPT4_SPLIT_PATTERN, Tokenizer, TokenizerError

tokenizers = pytest.importorskip("tokenizers")
tiktoken = pytest.importorskip("tiktoken")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

ZH = "".join(
    [
        "我们今天学习了自然语言处理，分词器把文字变成数字。",
        "你好，世界！春眠不觉晓，处处闻啼鸟。\n",
    ]
)
TRAIN = (
    CORPUS[:150_000].splitlines()
    + [ZH * 3, "emoji 😀😀 x\t\ty  12345 678\r\n", "  ¡hola!  ça   ﬁ"] * 30
)
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]

# Characters assigned by Unicode 14 (Python 3.11's tables): the three regex engines (the regex
# module here, Oniguruma in tokenizers, fancy-regex in tiktoken) know newer ones differently.
any_char = st.characters(exclude_categories=("Cs", "Cn"))
pieces = st.sampled_from(
    list("ab Z'sl\r\n\t 09中文字😀é\u00a0\u3000,.!?▁\x00\x1b")
    + ["'ll", "\r\n", "   ", "\n\n", " 12345", "你好", "Hello", "<s>", "é"]
)
texts = st.one_of(st.text(any_char, max_size=40), st.lists(pieces, max_size=25).map("".join))


# ----------------------------------------------------------------------------- building files


def _train(pre_tokenizer, vocab_size=700, special_tokens=(EOT,), **model_args):
    tok = tokenizers.Tokenizer(models.BPE(**model_args))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAIN, trainer)
    return tok


def byte_level_json(kind):
    """GPT-2 (ByteLevel), Llama 3 (Split + ByteLevel, ignore_merges, BOS), SmolLM (Digits +
    ByteLevel) and DeepSeek-like (Split digits, text between kept, then ByteLevel) tokenizer.json
    files."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind != "llama3")
    pre = {
        "gpt2": byte_level,
        "llama3": pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), "isolated"), byte_level]
        ),
        "smollm": pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        ),
        "digits_split": pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), "isolated"), byte_level]
        ),
    }
    tok = _train(pre.get(kind, byte_level), special_tokens=() if kind == "llama3" else (EOT,))
    obj = json.loads(tok.to_str())
    if (
        kind == "shuffled"
    ):  # ids in no particular order, merges in another: ranks are the merges' places
        strings, rng = list(obj["model"]["vocab"]), random.Random(0)
        rng.shuffle(strings)
        obj["model"]["vocab"] = {s: i for i, s in enumerate(strings)}
        obj["added_tokens"][0]["id"] = obj["model"]["vocab"][EOT]
        merges = obj["model"]["merges"]
        obj["model"]["merges"] = merges[:50] + sorted(
            merges[50:], key=lambda m: rng.random() + len(m[0] + m[1])
        )
    if (
        kind == "llama3"
    ):  # special tokens after the vocabulary, not in it; BOS put in front of a text
        n = len(obj["model"]["vocab"])
        obj["model"]["ignore_merges"] = True
        obj["added_tokens"] = [
            {
                "id": n + k,
                "content": name,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for k, name in enumerate(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
        ]
        obj["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {
                "<|begin_of_text|>": {
                    "id": "<|begin_of_text|>",
                    "ids": [n],
                    "tokens": ["<|begin_of_text|>"],
                }
            },
        }
    return obj


def sentencepiece_json(kind):
    """Llama 2 style (Prepend + Replace normalizer, no pre-tokenizer), and Mistral-style Metaspace
    variants, all with <unk> <s> </s> at 0-2 and the 256 byte tokens <0x00>..<0xFF> at 3-258.
    Trained on words, as SentencePiece does (no merge across a space), except mistral_first_whole,
    whose merges join words too. No newline in the training text: it is a byte token, as in
    Llama's."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always", split=kind != "mistral_first_whole"
    )
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=LLAMA_SPECIALS, limit_alphabet=70, show_progress=False
    )
    tok.train_from_iterator([text.replace("\n", " ") for text in TRAIN], trainer)
    tok.pre_tokenizer = None
    spaces_to_underscores = [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence(spaces_to_underscores)
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    obj = json.loads(tok.to_str())
    vocab = {s: i if i < 3 else i + 256 for s, i in obj["model"]["vocab"].items()}
    obj["model"]["vocab"] = {**vocab, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    obj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    if kind != "llama2":
        scheme, split = kind.split("_")[1:]
        obj["normalizer"] = None
        obj["pre_tokenizer"] = {
            "type": "Metaspace",
            "replacement": "▁",
            "prepend_scheme": scheme,
            "split": split == "split",
        }
    return obj


BYTE_LEVEL_KINDS = ["gpt2", "llama3", "smollm", "digits_split", "shuffled"]
HF_KINDS = BYTE_LEVEL_KINDS + ["llama2", "mistral_first_whole", "mistral_always_split"]


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    """kind -> (folder with tokenizer.json, the tokenizers library's Tokenizer of it)."""
    files = {}
    for kind in HF_KINDS:
        obj = (byte_level_json if kind in BYTE_LEVEL_KINDS else sentencepiece_json)(kind)
        folder = tmp_path_factory.mktemp(kind)
        (folder / "tokenizer.json").write_text(
            json.dumps(obj, ensure_ascii=False), encoding="utf-8"
        )
        files[kind] = folder, tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    return files


@pytest.fixture(scope="module")
def ours():
    return accelerate(
        Tokenizer.train([CORPUS[:200_000], ZH * 20, "emoji 😀😀 x\t\ty"], vocab_size=900)
    )


def load(path):
    """A tokenizer file or folder, loaded and accelerated as data preparation encodes with it."""
    return accelerate(load_tokenizer(path))


def reference_ids(reference, text, special=False):
    """The tokenizers library's ids, special tokens' text read as text unless `special`."""
    reference.encode_special_tokens = not special
    return reference.encode(text, add_special_tokens=False).ids


def python_encoder(tok):
    slow = pickle.loads(pickle.dumps(tok))
    slow.accelerator = None  # pickling sends the definition alone: this is already so
    return slow


# ------------------------------------------------------------------------- ids equal the reference


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hugging_face_ids(hf_files, kind):
    folder, reference = hf_files[kind]
    tok = load(folder)
    copy = pickle.loads(pickle.dumps(tok))  # as infra/prepare.py's workers get it
    if kind in ("llama2", "mistral_first_whole"):  # whole texts, in words where no merge joins them
        assert len(tok._stages) == (kind == "llama2") and not tok.patterns

    @settings(max_examples=60, deadline=None)
    @given(texts)
    def check(text):
        expected = reference_ids(reference, text)
        assert tok.encode_ordinary(text) == copy.encode_ordinary(text) == expected
        decoded = tok.decode(expected)
        if tok.space_marker is None:
            assert decoded == text
        elif "▁" not in text and (tok.prefix == "always" or not text.startswith(" ")):
            # Hugging Face reads "▁" as a space, and can't tell " x" from "x" here
            assert decoded == text

    check()
    long_text = (ZH + CORPUS[:3000]) * 3  # mistral_first_whole: one piece, thousands of merges
    assert tok.encode_ordinary(long_text) == reference_ids(reference, long_text)


@pytest.mark.parametrize(
    "kind", ["gpt2", "llama3", "llama2", "mistral_first_whole", "mistral_always_split"]
)
def test_special_tokens_split_as_hugging_face_does(hf_files, kind):
    folder, reference = hf_files[kind]
    tok = load(folder)
    for text in [
        "<s>hello</s>world",
        "hi<s> x",
        "<s>",
        "a</s>",
        "x</s>  y",
        f"{EOT}a b{EOT}",
        "<|begin_of_text|>Hi<|eot_id|> there",
        " <|end_of_text|>",
    ]:
        for encoder in (tok, python_encoder(tok)):
            assert encoder.encode(text, allowed_special="all") == reference_ids(
                reference, text, special=True
            )


def test_whole_pieces_first(hf_files, tmp_path):
    """tiktoken, and Hugging Face with ignore_merges, take a piece that is a token as that token
    even where no merges lead to it."""
    tok = ImportedTokenizer(
        GPT4_SPLIT_PATTERN, (), [], vocab=[bytes([b]) for b in range(256)] + [b"xyz"]
    )
    enc = tiktoken.Encoding(
        "x", pat_str=GPT4_SPLIT_PATTERN, mergeable_ranks=tok.mergeable_ranks, special_tokens={}
    )
    assert (
        python_encoder(tok).encode_ordinary("xyz xyzw")
        == enc.encode_ordinary("xyz xyzw")
        == [256, 32, 120, 121, 122, 119]
    )
    obj = json.loads((hf_files["llama3"][0] / "tokenizer.json").read_text(encoding="utf-8"))
    obj["model"]["vocab"]["qqqq"] = len(obj["model"]["vocab"]) + len(obj["added_tokens"])
    for ignore_merges in (True, False):
        obj["model"]["ignore_merges"] = ignore_merges
        (tmp_path / "tokenizer.json").write_text(json.dumps(obj))
        reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
        tok = load(tmp_path)
        assert (
            python_encoder(tok).encode_ordinary("qqqq")
            == tok.encode_ordinary("qqqq")
            == reference_ids(reference, "qqqq")
        )
        assert (len(tok.encode_ordinary("qqqq")) == 1) == ignore_merges


def test_bos_eos_and_sizes(hf_files):
    expected = {
        "gpt2": (None, EOT),
        "llama3": ("<|begin_of_text|>", "<|end_of_text|>"),
        "llama2": ("<s>", "</s>"),
    }
    for kind, (bos, eos) in expected.items():
        folder, reference = hf_files[kind]
        tok = load(folder / "tokenizer.json")
        assert (tok.bos, tok.eos) == (bos, eos)
        assert tok.eos_id == reference.token_to_id(eos)
        assert tok.bos_id == (None if bos is None else reference.token_to_id(bos))
        assert (
            tok.vocab_size == reference.get_vocab_size() == max(reference.get_vocab().values()) + 1
        )
    llama2 = load(hf_files["llama2"][0])
    assert llama2.byte_tokens == list(range(3, 259)) and llama2.special_tokens == {
        "<unk>": 0,
        "<s>": 1,
        "</s>": 2,
    }


@pytest.mark.parametrize("kind", HF_KINDS)
def test_encoding_in_parts_at_the_cut_points(hf_files, kind):
    """What infra/prepare.py does with a big file: cut where cut_points(tok) allows (a regex: line
    starts, for the SentencePiece-style kinds), the later parts with continuation=True. "words"
    (GPT-4's and Llama 3's patterns) is proven in tests/test_corpus.py; other patterns are never
    cut."""
    tok = load(hf_files[kind][0])
    expected = (
        "words"
        if kind == "llama3"
        else "regex"
        if kind in ("llama2", "mistral_first_whole", "mistral_always_split")
        else None
    )
    rule = cut_points(tok)
    assert (rule if rule in ("words", None) else "regex") == expected
    if expected != "regex":
        return
    text = "  Intro line\n" + CORPUS[:4000] + "\n中文开头\n  indented\nLast" + ZH
    cuts = [m.start() for m in rule.finditer(text)][::7] + [len(text)]
    parts = [text[a:b] for a, b in zip([0] + cuts, cuts)]
    for encoder in (tok, python_encoder(tok)):
        ids = [
            i
            for k, part in enumerate(parts)
            for i in encoder.encode_ordinary(part, continuation=k > 0)
        ]
        assert ids == encoder.encode_ordinary(text)


def test_no_cut_points_where_a_merge_joins_lines(hf_files, tmp_path):
    obj = json.loads((hf_files["llama2"][0] / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = obj["model"]["vocab"]
    vocab["\n"], vocab["\nT"] = len(vocab), len(vocab) + 1
    obj["model"]["merges"].append(["\n", "T"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(obj))
    assert cut_points(load(tmp_path)) is None


@pytest.mark.parametrize(
    "kind, workers", [("llama2", 2), ("mistral_always_split", 1), ("gpt2", 1), ("llama3", 1)]
)
def test_prepare_gives_each_document_the_ids_of_the_whole(
    hf_files, tmp_path, monkeypatch, kind, workers
):
    """data.prepare cuts a text file into blocks and long records into pieces, and encodes the
    pieces one by one; every document still gets the tokenizers library's ids of the whole of it,
    with BOS before and EOS after. Each kind has its own cut points (fast_encode.cut_points):
    SentencePiece style only line starts, and no prefix space inside a document; GPT-2's pattern
    none (it splits "\n\n" before a letter, not at the end of a text); Llama 3's corpus.py's."""
    folder, reference = hf_files[kind]
    if kind == "gpt2":  # GPT-2's "\n\n" token, which this small vocabulary lacks
        obj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        obj["model"]["vocab"]["ĊĊ"] = max(obj["model"]["vocab"].values()) + 1
        obj["model"]["merges"].append(["Ċ", "Ċ"])
        folder = tmp_path / "gpt2"
        folder.mkdir()
        (folder / "tokenizer.json").write_text(json.dumps(obj), encoding="utf-8")
        reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        # so a cut there shows
        assert reference_ids(reference, "a\n\n") != reference_ids(reference, "a\n\nb")[:-1]
    tok = load(folder)
    monkeypatch.setattr(corpus, "MAX_BLOCK", 1024)
    monkeypatch.setattr(corpus, "MAX_PIECE_CHARS", 2000)
    flags = []
    monkeypatch.setattr(
        preparing,
        "encode_stream",
        lambda tok, items, *args, **kwargs: encode_stream(
            tok, (flags.append(item[1]) or item for item in items), *args, **kwargs
        ),
    )
    lines = CORPUS[:30_000].splitlines(keepends=True)
    long_line = " ".join(lines[500:700]).replace("\n", "") + "\n"
    text = (
        "".join(line.replace("\n", "\r\n") if k % 3 else line for k, line in enumerate(lines[:300]))
        + "".join(lines[300:500])
        + "▁marker at a line start\n"
        + long_line
        + ZH * 50
        + "".join(lines[700:])
    )
    (tmp_path / "a.txt").write_text(text, newline="")
    records = ["".join(lines[:150]), "short", "  " + "".join(lines[150:300]), ZH * 100]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    meta = preparing.prepare(
        inputs,
        str(tmp_path / "out"),
        tokenizer_path=str(folder),
        val_fraction=0.2,
        num_workers=workers,
        verbose=False,
    )
    sources = corpus.list_sources(inputs)
    expected, document, bos = (
        {"train": [], "val": []},
        "",
        [tok.bos_id] if tok.bos_id is not None else [],
    )
    for piece in corpus.read_documents(
        sources, corpus.val_share(sources, 0.2, preparing.DEFAULTS.val_max_bytes)
    ):
        document += piece.text
        if piece.ends:
            expected[piece.split] += bos + reference_ids(reference, document) + [tok.eos_id]
            document = ""
    for split in ("train", "val"):
        shards = meta["splits"][split]["shards"]
        ids = np.concatenate(
            [np.fromfile(tmp_path / "out" / s["path"], dtype=meta["dtype"]) for s in shards]
        )
        assert ids.tolist() == expected[split], split
    rule = cut_points(tok)
    assert (rule is None) == (kind == "gpt2") and (rule == "words") == (kind == "llama3")
    # pieces encoded as continuations of their document
    assert sum(flags) > 20 if rule else not any(flags)


def test_streaming_decode_equals_whole_decode(hf_files):
    """sample.py streams with decode_bytes and an incremental UTF-8 decoder; SentencePiece style
    keeps the prefix space there, which decode takes off."""
    for kind in ("llama2", "gpt2"):
        tok = load(hf_files[kind][0])
        ids = tok.encode_ordinary("Hello wörld 你好😀 x")
        utf8 = codecs.getincrementaldecoder("utf-8")()
        streamed = "".join(utf8.decode(tok.decode_bytes([i])) for i in ids) + utf8.decode(
            b"", final=True
        )
        assert streamed == tok.decode_bytes(ids).decode()
        assert streamed == (" " if tok.prefix else "") + tok.decode(ids)


# -------------------------------------------------------------- tiktoken files, our own tokenizers


def test_ours_python_and_tiktoken_agree(ours):
    enc = tiktoken.Encoding(
        "ours",
        pat_str=ours.pattern,
        mergeable_ranks=ours.mergeable_ranks,
        special_tokens=ours.special_tokens,
    )
    slow = python_encoder(ours)

    @settings(max_examples=150, deadline=None)
    @given(texts)
    def check(text):
        assert slow.encode_ordinary(text) == ours.encode_ordinary(text) == enc.encode_ordinary(text)

    check()


def test_cold_chinese_python_and_accelerated_agree(ours):
    # pieces that rarely repeat
    text = ZH * 30 + "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(3000))
    assert ours.accelerator is not None
    assert python_encoder(ours).encode_ordinary(text) == ours.encode_ordinary(text)


def write_ranks(path, ranks):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def test_tiktoken_file_with_config(ours, tmp_path):
    """This project's older export: tokenizer.tiktoken + tiktoken_config.json."""
    write_ranks(tmp_path / "tokenizer.tiktoken", ours.mergeable_ranks)
    (tmp_path / "tiktoken_config.json").write_text(
        json.dumps({"pattern": ours.pattern, "special_tokens": ours.special_tokens})
    )
    tok = load(tmp_path)
    text = CORPUS[-5000:] + ZH + EOT
    assert tok.encode(text, allowed_special="all") == ours.encode(text, allowed_special="all")
    assert (tok.eos, tok.bos, tok.vocab_size) == (EOT, None, ours.vocab_size)


def test_llama3_tiktoken_defaults(tmp_path):
    """A ranks file of 128,000 tokens is Llama 3's: its pattern and special tokens; byte tokens
    are not 0-255."""
    ranks = {
        bytes([a, b]): k
        for k, (a, b) in enumerate((a, b) for a in range(97, 123) for b in range(97, 123))
    }
    ranks.update({bytes([b]): len(ranks) + k for k, b in enumerate(range(256))})
    filler = (bytes([0xF0 + k // 65536, 0x90 + k // 256 % 256 % 48, k % 256]) for k in range(10**6))
    while len(ranks) < 128_000:
        ranks.setdefault(next(filler), len(ranks))
    write_ranks(tmp_path / "tokenizer.model", ranks)
    tok = load(tmp_path / "tokenizer.model")
    enc = tiktoken.Encoding(
        "llama3",
        pat_str=LLAMA3_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={
            "<|begin_of_text|>": 128000,
            "<|end_of_text|>": 128001,
            "<|eot_id|>": 128009,
        },
    )
    text = "hello there, don't 12345 ab\n\n  x" + ZH
    assert tok.encode(text + "<|eot_id|>", allowed_special="all") == enc.encode(
        text + "<|eot_id|>", allowed_special="all"
    )
    assert python_encoder(tok).encode_ordinary(text) == enc.encode_ordinary(text)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (128000, 128001, 128256)
    assert tok.special_tokens["<|reserved_special_token_246|>"] == 128255
    with pytest.raises(TokenizerError, match="holds no split pattern nor special tokens"):
        write_ranks(tmp_path / "small.tiktoken", dict(list(ranks.items())[:1000]))
        load(tmp_path / "small.tiktoken")
    small = tokenizer_formats.read_tiktoken(
        tmp_path / "small.tiktoken", GPT4_SPLIT_PATTERN, ["<|x|>"], eos="<|x|>"
    )
    assert small.eos_id == 1000 and small.encode_ordinary("abab") == [1, 1]


# --------------------------------------------------------------------- files: save, export, import


@pytest.mark.parametrize("kind", ["ours", "llama3", "llama2", "mistral_first_whole", "smollm"])
def test_export_then_autotokenizer_and_import(hf_files, ours, tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    tok = ours if kind == "ours" else load(hf_files[kind][0])
    tokenizer_formats.write_tokenizer(tok, tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    back = load(tmp_path)
    slow = python_encoder(back)
    assert (auto.bos_token, auto.eos_token, back.bos, back.eos) == (
        tok.bos,
        tok.eos,
        tok.bos,
        tok.eos,
    )

    @settings(max_examples=40, deadline=None)
    @given(texts)
    def check(text):
        ids = tok.encode_ordinary(text)
        bos = [] if tok.bos_id is None else [tok.bos_id]
        if not any(name in text for name in tok.special_tokens):
            assert auto(text)["input_ids"] == bos + ids
            assert auto(text, add_special_tokens=False)["input_ids"] == ids
        assert back.encode_ordinary(text) == slow.encode_ordinary(text) == ids
        assert auto.decode(ids) == tok.decode(ids)

    check()
    text = CORPUS[:20_000] + ZH
    assert back.encode_ordinary(text) == tok.encode_ordinary(text)


@pytest.mark.parametrize(
    "kind", ["gpt2", "llama3", "llama2", "mistral_always_split", "digits_split"]
)
def test_save_load_version_2(hf_files, tmp_path, kind):
    tok = load(hf_files[kind][0])
    tok.save(tmp_path / "tok.json")
    obj = json.loads((tmp_path / "tok.json").read_text(encoding="utf-8"))
    assert (obj["format"], obj["version"]) == ("minillama-bpe", 2)
    back = load(tmp_path / "tok.json")
    assert back.fingerprint() == tok.fingerprint() == pickle.loads(pickle.dumps(tok)).fingerprint()
    text = CORPUS[:5000] + ZH + "😀 ▁x"
    assert (
        back.encode_ordinary(text)
        == tok.encode_ordinary(text)
        == python_encoder(back).encode_ordinary(text)
    )
    assert (back.bos_id, back.eos_id, back.vocab_size) == (tok.bos_id, tok.eos_id, tok.vocab_size)
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]


def test_version_1_files_and_fingerprints(ours, hf_files, tmp_path):
    ours.save(tmp_path / "tok.json")
    obj = json.loads((tmp_path / "tok.json").read_text())
    assert obj["version"] == 1 and set(obj) == {
        "format",
        "version",
        "pattern",
        "special_tokens",
        "merges",
    }
    v1_content = json.dumps(
        [ours.pattern, ours.merges, ours.special_tokens], sort_keys=True
    ).encode()
    # data prepared before stays valid
    assert ours.fingerprint() == hashlib.sha256(v1_content).hexdigest()
    fingerprints = {load(folder).fingerprint() for folder, _ in hf_files.values()}
    assert (
        len(
            fingerprints | {ours.fingerprint(), Tokenizer.train(CORPUS[:50_000], 300).fingerprint()}
        )
        == len(hf_files) + 2
    )


def test_empty_folder(tmp_path):
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load(tmp_path)


# ----------------------------------------------------------------------------- refused


def _edit(obj, path, value):
    *keys, last = path
    for key in keys:
        obj = obj[key]
    obj[last] = value


@pytest.mark.parametrize(
    "path, value, message",
    [
        (["model", "type"], "WordPiece", "model type WordPiece"),
        (["normalizer"], {"type": "NFKC"}, "normalizer NFKC with byte-level BPE is not supported"),
        (
            ["pre_tokenizer"],
            {"type": "BertPreTokenizer"},
            "BPE without a ByteLevel pre-tokenizer or byte fallback",
        ),
        (
            ["pre_tokenizer"],
            {"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, {"type": "ByteLevel"}]},
            "pre-tokenizer Whitespace is not supported",
        ),
        (["pre_tokenizer", "add_prefix_space"], True, "ByteLevel\\(add_prefix_space=false\\)"),
        (
            ["added_tokens", 0, "special"],
            False,
            "added token '<\\|endoftext\\|>', which is not special",
        ),
        (
            ["added_tokens", 0, "lstrip"],
            True,
            "with lstrip, rstrip or single_word is not supported",
        ),
        (["model", "dropout"], 0.1, "BPE dropout=0.1 is not supported"),
        (["decoder"], {"type": "WordPiece"}, "decoder WordPiece with byte-level BPE"),
    ],
)
def test_refused_byte_level_files(hf_files, tmp_path, path, value, message):
    obj = json.loads((hf_files["gpt2"][0] / "tokenizer.json").read_text(encoding="utf-8"))
    _edit(obj, path, value)
    (tmp_path / "tokenizer.json").write_text(json.dumps(obj))
    with pytest.raises(TokenizerError, match=message) as e:
        load(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


@pytest.mark.parametrize(
    "path, value, message",
    [
        (
            ["normalizer"],
            {
                "type": "Sequence",
                "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "NFKC"}],
            },
            "normalizer Prepend\\+NFKC",
        ),
        (
            ["normalizer"],
            None,
            "without the Metaspace pre-tokenizer or the Prepend \\+ Replace normalizer",
        ),
        (["model", "vocab", "<0x41>"], None, "byte fallback without a <0x41> token"),
        (["model", "ignore_merges"], True, "ignore_merges with byte fallback"),
        (["decoder"], {"type": "ByteLevel"}, "decoder ByteLevel with SentencePiece-style BPE"),
        (["pre_tokenizer"], {"type": "Digits", "individual_digits": True}, "pre-tokenizer Digits"),
    ],
)
def test_refused_sentencepiece_files(hf_files, tmp_path, path, value, message):
    obj = json.loads((hf_files["llama2"][0] / "tokenizer.json").read_text(encoding="utf-8"))
    if value is None and path[-1] != "normalizer":
        del obj["model"]["vocab"][path[-1]]
    else:
        _edit(obj, path, value)
    (tmp_path / "tokenizer.json").write_text(json.dumps(obj))
    with pytest.raises(TokenizerError, match=message) as e:
        load(tmp_path / "tokenizer.json")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "tokenizer.model",
            b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02",
            "SentencePiece model, which is not supported",
        ),
        ("tokenizer.model", b"YQ== 0\nYg== x\n", "not a tiktoken ranks line"),
        ("tokenizer.model", b"YQ== 0\nYg== 0\n", "two tokens have rank 0"),
        ("tokenizer.model", b"YQ== 0\nYQ== 1\n", ":2: the token is given twice"),
        (
            "tokenizer.json",
            b'{"model": {"type": "BPE", "vocab": []}}',
            "not a tokenizer.json this code understands",
        ),
        ("tokenizer.json", b'{"model": {"type": "Unigram", "vocab": []}}', "model type Unigram"),
    ],
)
def test_refused_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TokenizerError, match=message) as e:
        load(tmp_path)
    assert "\n" not in str(e.value)
