"""`python -m infra.tokenizer_cli ...`: train a byte-level BPE tokenizer on files or folders in
bounded memory (infra/bpe_train.py) and save it."""

import argparse
import contextlib
import re
import sys
import time
from pathlib import Path

from config import TrainConfig
from infra.bpe_train import (
    DEFAULT_MEMORY_BUDGET,
    MIN_MEMORY_BUDGET,
    check_memory_budget,
    train_tokenizer,
)
from infra.fast_encode import accelerate
from infra.files import error_line
from tokenizer import GPT4_SPLIT_PATTERN, Tokenizer, UserError

COMPRESSION_SAMPLE_BYTES = 16 << 20  # the compression printed at the end is measured on this much


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5G' or a plain number of bytes -> bytes (K, M, G, T are powers of 1024)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 512M or 4G")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


def check_writable(path: Path) -> None:
    """Fail now, not after training, where `path` cannot be written: its folder is made and a
    file is created beside it (and removed)."""
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file name, e.g. {path / 'tok.json'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = path.with_name(path.name + ".tmp")
    with open(probe, "wb"):
        pass
    probe.unlink()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m infra.tokenizer_cli",
        description="Train a byte-level BPE tokenizer and save it as JSON.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="text, .jsonl, .parquet (.gz, .zst) files or folders",
    )
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="where to write the tokenizer JSON")
    p.add_argument(
        "--pattern",
        default=GPT4_SPLIT_PATTERN,
        help="the regex that splits text before merging (default: GPT-4's, tokenizer.py "
        "GPT4_SPLIT_PATTERN)",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="train on a sample of at most N bytes, spread over all the input files",
    )
    p.add_argument(
        "--memory-budget",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help=f"memory that training may use, e.g. 512M or 8G (default "
        f"{DEFAULT_MEMORY_BUDGET >> 30}G, at least {MIN_MEMORY_BUDGET >> 20}M): reading stops "
        "when the sample read would need all of it",
    )
    p.add_argument(
        "--text-field",
        default=TrainConfig().text_field,
        help="the field of .jsonl records / column of .parquet files",
    )
    args = p.parse_args(argv)
    from infra.corpus import list_sources, sample_texts  # files, folders and formats

    try:
        if args.memory_budget is not None:
            check_memory_budget(args.memory_budget)
        Tokenizer(args.pattern, (), ())  # an invalid pattern fails now, not after reading
        out = Path(args.out)
        check_writable(out)
        start = time.perf_counter()
        sources = list_sources(args.input)
        with contextlib.closing(
            sample_texts(sources, 0.0, args.text_field, args.max_bytes, verbose=True)
        ) as texts:
            tok = train_tokenizer(
                texts,
                args.vocab_size,
                pattern=args.pattern,
                max_bytes=args.max_bytes,
                memory_budget=args.memory_budget,
                verbose=True,
            )
        print(f"trained vocab_size {tok.vocab_size} in {time.perf_counter() - start:.1f}s")
        tok.save(out)
        accelerate(tok)
        n_bytes = n_tokens = 0
        with contextlib.closing(
            sample_texts(sources, 0.0, args.text_field, COMPRESSION_SAMPLE_BYTES)
        ) as texts:
            for text in texts:  # a first look at compression
                n_bytes += len(text.encode("utf-8"))
                n_tokens += len(tok.encode_ordinary(text))
                if n_bytes >= COMPRESSION_SAMPLE_BYTES:
                    break
        print(
            f"saved {args.out}; compression on {n_bytes / 1e6:.1f} MB of the input: "
            f"{n_bytes / max(n_tokens, 1):.2f} bytes/token"
        )
    except (UserError, OSError) as e:
        sys.exit(f"error: {error_line(e)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
