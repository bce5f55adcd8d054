"""Benchmark imported tokenizers: encode throughput of infra.tokenizers.load_tokenizer's tokenizers
(their Python encoder, and with fast_encode.accelerate) against the library that defines the ids,
on the same text.

    python bench/bench_hf_tokenizer.py [--data-dir ../shared/data] [--runs 5] [--vocab-size 32000]

Builds three tokenizers with the `tokenizers` library from Chinese and English text of the data
folder (nothing is downloaded): Llama 3 style byte-level BPE (Split + ByteLevel, ignore_merges),
the same vocabulary as a tiktoken ranks file (merge rule "ranks", as Llama 3's original
tokenizer.model), and Llama 2 style SentencePiece BPE (byte fallback, Prepend + Replace). Each is
timed cold (a fresh tokenizer: no piece cached) on held-out Chinese (pieces rarely repeat) and
English, in 100 KB documents, against the library that defines its ids (tokenizers; tiktoken for
the ranks file); runs alternate between encoders and the median is printed, with the ratio to
the reference. Single thread throughout. Needs tokenizers and tiktoken.
"""

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tiktoken
import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from infra.fast_encode import accelerate
from infra.tokenizer_formats import LLAMA3_SPLIT_PATTERN
from infra.tokenizers import load_tokenizer


def train_byte_level(texts, vocab_size, folder):
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        (line for text in texts for line in text.splitlines()),
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            show_progress=False,
            special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.save(str(folder / "tokenizer.json"))


def train_sentencepiece(texts, vocab_size, folder):
    """Llama 2's layout: <unk> <s> </s>, the byte tokens <0x00>..<0xFF>, then the trained ones.
    Trained as SentencePiece does, on lines split into words (pieces start at a space), then used
    as Llama 2's tokenizer.json does: the Prepend + Replace normalizer, no pre-tokenizer."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always", split=True
    )
    tok.train_from_iterator(
        (line for text in texts for line in text.splitlines()),
        trainers.BpeTrainer(
            vocab_size=vocab_size - 256,
            special_tokens=["<unk>", "<s>", "</s>"],
            show_progress=False,
        ),
    )
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
    (folder / "tokenizer.json").write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def write_ranks(tok, folder):
    """The byte-level vocabulary as a tiktoken ranks file with its pattern and special tokens."""
    specials = set(tok.special_tokens.values())  # tiktoken keeps them apart from the ranks
    ranks = {
        token: i for i, token in enumerate(tok.vocab) if token is not None and i not in specials
    }
    (folder / "tokenizer.tiktoken").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
    )
    (folder / "tiktoken_config.json").write_text(
        json.dumps({"pattern": LLAMA3_SPLIT_PATTERN, "special_tokens": tok.special_tokens})
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--vocab-size", type=int, default=32000)
    args = p.parse_args()
    data = Path(args.data_dir)
    train = [
        (data / "chinese_poetry.txt").read_text(encoding="utf-8")[:1_000_000],
        (data / "eltec_en" / "eltec_en_00.txt").read_text(encoding="utf-8")[:3_000_000],
    ]
    held_out = {
        "zh": (data / "zh_commonvoice_wiki.txt").read_text(encoding="utf-8")[:300_000],
        "en": (data / "eltec_en" / "eltec_en_08.txt").read_text(encoding="utf-8")[:1_000_000],
    }
    tmp = Path(tempfile.mkdtemp())
    folders = {name: tmp / name for name in ("byte_level", "tiktoken", "sentencepiece")}
    for folder in folders.values():
        folder.mkdir()
    start = time.perf_counter()
    train_byte_level(train, args.vocab_size, folders["byte_level"])
    train_sentencepiece(train, args.vocab_size, folders["sentencepiece"])
    write_ranks(load_tokenizer(folders["byte_level"]), folders["tiktoken"])
    print(
        f"built the tokenizers in {time.perf_counter() - start:.0f}s (vocab {args.vocab_size}, "
        f"{sum(map(len, train)) / 1e6:.0f}M characters)",
        flush=True,
    )

    def reference(name):
        if name == "tiktoken":
            tok = load_tokenizer(folders[name])
            enc = tiktoken.Encoding(
                "ranks", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks, special_tokens={}
            )
            return enc.encode_ordinary
        ref = tokenizers.Tokenizer.from_file(str(folders[name] / "tokenizer.json"))
        ref.encode_special_tokens = True
        return lambda text: ref.encode(text, add_special_tokens=False).ids

    def ours(name, accelerated):
        tok = load_tokenizer(folders[name])
        if accelerated:
            accelerate(tok)  # builds the accelerator outside the timing (a one-off per process)
        return tok.encode_ordinary

    print(
        f"\n## encode MB/s, cold, single thread (median of {args.runs}); "
        f"ratio to the reference library"
    )
    print("ours: with fast_encode.accelerate (tiktoken for merge rule 'ranks'); Python: without")
    print(
        f"{'tokenizer':<15}{'text':<5}{'reference':>10}{'ours':>8}{'ratio':>7}{'Python':>8}"
        f"{'ratio':>7}{'load s':>8}",
        flush=True,
    )
    for name in folders:
        start = time.perf_counter()
        accelerated = load_tokenizer(folders[name]).merge_rule == "ranks"
        load_seconds = time.perf_counter() - start
        for text_name, text in held_out.items():
            docs = [text[i : i + 100_000] for i in range(0, len(text), 100_000)]
            n_bytes = len(text.encode("utf-8"))
            encoders = {"reference": lambda: reference(name), "ours": lambda: ours(name, True)}
            if accelerated:
                encoders["python"] = lambda: ours(name, False)
            times, outputs = {key: [] for key in encoders}, {}
            for _ in range(args.runs):
                for key, make in encoders.items():
                    encode = make()
                    start = time.perf_counter()
                    outputs[key] = [encode(d) for d in docs]
                    times[key].append(time.perf_counter() - start)
            assert all(ids == outputs["reference"] for ids in outputs.values()), (
                f"{name} {text_name}: ids differ"
            )
            speed = {key: n_bytes / statistics.median(t) / 1e6 for key, t in times.items()}
            speed.setdefault("python", speed["ours"])
            print(
                f"{name:<15}{text_name:<5}{speed['reference']:>10.2f}{speed['ours']:>8.2f}"
                f"{speed['ours'] / speed['reference']:>7.2f}{speed['python']:>8.2f}"
                f"{speed['python'] / speed['reference']:>7.2f}{load_seconds:>8.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
