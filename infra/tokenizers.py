"""Any tokenizer file or folder -> a tokenizer, the file recognised by its content, not its name:
this project's files (version 1: tokenizer.Tokenizer; version 2: ImportedTokenizer), Hugging
Face's tokenizer.json and tiktoken's ranks files (infra/tokenizer_formats.py). SentencePiece
models are recognised, and refused with what to use instead."""

import json
import re
from pathlib import Path

from infra.tokenizer_formats import read_tiktoken, read_tokenizer_json
from infra.tokenizer_variants import VERSION, ImportedTokenizer
from tokenizer import FORMAT, Tokenizer, TokenizerError

# Where a folder's tokenizer is, the first of these that exists (Llama 3 keeps tiktoken's file
# in original/): a run, data or model folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer.tiktoken",
    "original/tokenizer.model",
)
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")  # the first line of a ranks file


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer in a file, or in a folder (the first of TOKENIZER_FILES). Anything else
    raises TokenizerError saying why, in one line."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not found:
            raise TokenizerError(
                f"{path} holds no tokenizer (looked for {', '.join(TOKENIZER_FILES)})"
            )
        path = found[0]
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror})") from None
    if _TIKTOKEN_LINE.match(raw):
        return read_tiktoken(path)
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if _is_sentencepiece_model(raw):
            raise TokenizerError(
                f"{path} is a SentencePiece model, which is not supported: use the model's "
                f"tokenizer.json (transformers writes it: "
                f"AutoTokenizer.from_pretrained(folder).save_pretrained(folder))"
            ) from None
        raise TokenizerError(
            f"{path}: not valid JSON, the file is corrupt or truncated ({e})"
        ) from None
    if isinstance(obj, dict) and "model" in obj and "format" not in obj:
        return read_tokenizer_json(path, obj)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise TokenizerError(
            f'{path}: not a {FORMAT} tokenizer file (no "format": "{FORMAT}" '
            f"field) nor a Hugging Face tokenizer.json; train one with "
            f"`python -m infra.tokenizer_cli`"
        )
    if obj.get("version") == 1:
        return Tokenizer.load(path)
    if obj.get("version") != VERSION:
        raise TokenizerError(
            f"{path}: tokenizer file version {obj.get('version')!r} is not "
            f"supported (this code reads versions 1 to {VERSION})"
        )
    try:
        return ImportedTokenizer.from_definition(obj)
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None


def _is_sentencepiece_model(raw: bytes) -> bool:
    """Whether raw starts as a SentencePiece model does (a protobuf message): field 1 (its first
    piece, a message), a varint length, then that message's field 1 (the piece's text)."""
    if raw[:1] != b"\n":
        return False
    at = 1
    while at < len(raw) and raw[at] & 0x80:  # the varint's continuation bytes
        at += 1
    return raw[at + 1 : at + 2] == b"\n"
