"""Other tokenizers' files <-> tokenizers of this project, in both directions.

Read (by infra.tokenizers.load_tokenizer): Hugging Face's tokenizer.json, byte-level BPE (GPT-2,
Llama 3, SmolLM) or SentencePiece-style BPE with byte fallback (Llama 2, Mistral, TinyLlama), with
tokenizer_config.json beside it; and tiktoken's ranks files (Llama 3's original/tokenizer.model,
cl100k_base). Written (by hf.export, for transformers' AutoTokenizer): tokenizer.json and
tokenizer_config.json. Everything a file says that changes the ids is mapped or refused with one
line naming it.
"""

import base64
import json
from pathlib import Path

import regex

from infra import files
from infra.tokenizer_variants import METASPACE_SPLIT, ImportedTokenizer
from tokenizer import EOT, Tokenizer, TokenizerError

GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
    r"""|\s+"""
)
LLAMA3_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Byte-level files write each token's bytes as printable characters (GPT-2's map,
# _byte_level_alphabet); SentencePiece-style ones write tokens as text with "▁" for a space and
# "<0xAB>" byte tokens.

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# the end-of-document token, where a tokenizer has one of these
_DOCUMENT_ENDS = ("<|end_of_text|>", "</s>", EOT)
_LLAMA3_RANKS = 128_000
# Llama 3.1's special tokens (ids 128000-128255; Llama 3.0 names a few reserved ones differently)
_LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]


def _byte_level_alphabet() -> list:
    """GPT-2's printable character for each byte: printable Latin-1 bytes stand for themselves,
    the other 68 for the characters from U+0100 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def _steps(node, key) -> list:
    """A normalizer / pre-tokenizer / decoder / post-processor as a flat list of its steps."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [step for child in node.get(key, []) for step in _steps(child, key)]
    return [node]


def _token_name(value):
    """tokenizer_config.json writes a token as its text or as {"content": text, ...}."""
    return value.get("content") if isinstance(value, dict) else value


def read_tokenizer_json(path, obj=None) -> ImportedTokenizer:
    """A tokenizer from a Hugging Face tokenizer.json of byte-level BPE (GPT-2, Llama 3, SmolLM:
    ByteLevel pre-tokenizer, after Split and Digits steps if any) or of SentencePiece-style BPE
    (Llama 2, Mistral, TinyLlama: byte fallback with the Prepend + Replace normalizer or the
    Metaspace pre-tokenizer). Everything else (other models, normalizers, pre-tokenizers,
    decoders; added tokens that are not special) raises TokenizerError naming it, in one line.
    bos: the special token the post-processor puts before a text (else tokenizer_config.json's,
    where add_bos_token); eos: <|end_of_text|>, </s> or <|endoftext|>, else
    tokenizer_config.json's. A token that is both bos and eos (GPT-2's <|endoftext|>) is only eos:
    it goes between documents."""
    path = Path(path)
    try:
        if obj is None:
            obj = json.loads(path.read_text(encoding="utf-8"))
        config_path = path.parent / TOKENIZER_CONFIG_FILE
        config = (
            json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        )
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise TokenizerError(
            f"{path} or its {TOKENIZER_CONFIG_FILE}: not valid JSON ({e})"
        ) from None
    try:
        return _from_tokenizer_json(obj, config if isinstance(config, dict) else {})
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None
    except (
        AttributeError,
        IndexError,
        KeyError,
        TypeError,
        ValueError,
    ) as e:  # a field of the wrong shape
        raise TokenizerError(
            f"{path}: not a tokenizer.json this code understands ({type(e).__name__}: {e})"
        ) from None


def _from_tokenizer_json(obj: dict, config: dict) -> ImportedTokenizer:
    def refuse(what):
        raise TokenizerError(f"{what} is not supported")

    model = obj["model"]
    if model.get("type", "BPE") != "BPE":
        refuse(
            f"model type {model['type']} (only BPE: byte-level, or SentencePiece-style with "
            f"byte fallback)"
        )
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            refuse(f"BPE {key}={model[key]!r}")
    strings, merges = model["vocab"], model["merges"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in merges]  # "a b" or ["a", "b"]
    if bad := next(
        (m for m in merges if not (len(m) == 2 and m[0] in strings and m[1] in strings)), None
    ):
        raise TokenizerError(f"merge {bad!r} is not two tokens of the vocabulary")

    specials = {}
    for added in obj.get("added_tokens") or []:
        name, i = added["content"], added["id"]
        if not added.get("special"):
            refuse(f"added token {name!r}, which is not special (added tokens that are plain text)")
        if added.get("lstrip") or added.get("rstrip") or added.get("single_word"):
            refuse(f"special token {name!r} with lstrip, rstrip or single_word")
        if added.get("normalized") and obj.get("normalizer"):
            refuse(f"special token {name!r} matched after normalization")
        if strings.get(name, i) != i:
            raise TokenizerError(
                f"special token {name!r} has id {i} but the vocabulary gives it {strings[name]}"
            )
        specials[name] = i

    normalizers = _steps(obj.get("normalizer"), "normalizers")
    pre = _steps(obj.get("pre_tokenizer"), "pretokenizers")
    decoders = _steps(obj.get("decoder"), "decoders")
    if model.get("byte_fallback"):
        options, to_bytes = _sentencepiece_style(normalizers, pre, decoders, strings, refuse)
        if model.get("ignore_merges"):
            refuse("ignore_merges with byte fallback")
    elif any(step["type"] == "ByteLevel" for step in pre):
        options, to_bytes = _byte_level(normalizers, pre, decoders, specials, refuse)
        options["ignore_merges"] = bool(model.get("ignore_merges"))
    else:
        refuse(
            "BPE without a ByteLevel pre-tokenizer or byte fallback (it cannot encode every text)"
        )

    vocab = [None] * (max(strings.values(), default=-1) + 1)
    for s, i in strings.items():
        if type(i) is not int or i < 0 or vocab[i] is not None:
            raise TokenizerError(
                f"token {s!r} has id {i!r}, which is not a free non-negative integer"
            )
        vocab[i] = to_bytes(s)
    merges = [(strings[a], strings[b]) for a, b in merges]
    eos = next(
        (name for name in _DOCUMENT_ENDS if name in specials), _token_name(config.get("eos_token"))
    )
    bos = next(
        (
            step["single"][0]["SpecialToken"]["id"]
            for step in _steps(obj.get("post_processor"), "processors")
            if step["type"] == "TemplateProcessing" and "SpecialToken" in step["single"][0]
        ),
        None,
    )
    if bos is None and config.get("add_bos_token"):
        bos = _token_name(config.get("bos_token"))
    return ImportedTokenizer(
        options.pop("patterns"),
        merges,
        specials,
        vocab=vocab,
        merge_rule="pairs",
        bos=bos if bos != eos and bos in specials else None,
        eos=eos if eos in specials else None,
        **options,
    )


def _byte_level(normalizers, pre, decoders, specials, refuse):
    """Options and the token text -> bytes map of a byte-level BPE tokenizer.json."""
    if normalizers:
        refuse(f"normalizer {normalizers[0]['type']} with byte-level BPE")
    *splits, last = pre
    if last["type"] != "ByteLevel" or last.get("add_prefix_space"):
        refuse(
            "a byte-level pre-tokenizer other than Split/Digits steps then "
            "ByteLevel(add_prefix_space=false)"
        )
    patterns = []
    for step in splits:
        if step["type"] == "Digits":
            patterns.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif (
            step["type"] == "Split"
            and step.get("behavior", "").lower() == "isolated"
            and not step.get("invert")
        ):
            pattern = step["pattern"]
            patterns.append(
                pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"])
            )
        else:
            refuse(f"pre-tokenizer {step['type']} {step.get('behavior', '')}".strip())
    if last.get("use_regex", True):
        patterns.append(GPT2_SPLIT_PATTERN)
    if [step["type"] for step in decoders] != ["ByteLevel"]:
        refuse(
            f"decoder {'+'.join(step['type'] for step in decoders) or 'none'} with byte-level BPE"
        )
    byte_of = {c: b for b, c in enumerate(_byte_level_alphabet())}

    def to_bytes(text):
        if all(c in byte_of for c in text):
            return bytes(byte_of[c] for c in text)
        if text in specials:  # a special token in the vocabulary written as plain text
            return text.encode("utf-8")
        raise TokenizerError(f"token {text!r} is not written in the byte-level alphabet")

    return {"patterns": patterns}, to_bytes


def _sentencepiece_style(normalizers, pre, decoders, strings, refuse):
    """Options and the token text -> bytes map of a SentencePiece-style BPE tokenizer.json."""
    kinds = [step["type"] for step in normalizers]
    marker, prefix, patterns = None, None, []
    if kinds:
        if sorted(kinds) != ["Prepend", "Replace"]:
            refuse(f"normalizer {'+'.join(kinds)} (only Prepend + Replace, as Llama 2's)")
        prepend, replace = (
            next(step for step in normalizers if step["type"] == kind)
            for kind in ("Prepend", "Replace")
        )
        marker, prefix = prepend["prepend"], "always"
        if (
            replace["pattern"].get("String") != " "
            or replace["content"] != marker
            or len(marker) != 1
        ):
            refuse(
                f"normalizer Replace {replace['pattern']} -> {replace['content']!r} "
                f"with Prepend {marker!r}"
            )
    if pre and (len(pre) > 1 or pre[0]["type"] != "Metaspace"):
        refuse(
            f"pre-tokenizer {'+'.join(step['type'] for step in pre)} with SentencePiece-style BPE"
        )
    for step in pre:
        replacement = step.get("replacement", "▁")
        if marker not in (None, replacement):
            refuse(f"Metaspace replacement {replacement!r} with normalizer {marker!r}")
        if marker is None:
            scheme = step.get("prepend_scheme") or (
                "always" if step.get("add_prefix_space", True) else "never"
            )
            if scheme not in ("always", "first", "never"):
                refuse(f"Metaspace prepend_scheme {scheme!r}")
            marker, prefix = (
                replacement,
                {"always": "unless_space", "first": "first_unless_space"}.get(scheme),
            )
        if step.get("split", True):
            patterns = [METASPACE_SPLIT]
    if marker is None:
        refuse(
            "SentencePiece-style BPE without the Metaspace pre-tokenizer or the Prepend + Replace "
            "normalizer"
        )
    for step in decoders:
        ok = {
            "Replace": step.get("pattern", {}).get("String") == marker
            and step.get("content") == " ",
            "ByteFallback": True,
            "Fuse": True,
            "Metaspace": step.get("replacement") == marker,
            "Strip": step.get("content") == " "
            and step.get("start", 0) <= 1
            and not step.get("stop"),
        }.get(step["type"])
        if not ok:
            refuse(f"decoder {step['type']} with SentencePiece-style BPE")
    byte_tokens = [strings.get(f"<0x{b:02X}>") for b in range(256)]
    if None in byte_tokens:
        raise TokenizerError(f"byte fallback without a <0x{byte_tokens.index(None):02X}> token")
    byte_names = {f"<0x{b:02X}>": b for b in range(256)}

    def to_bytes(text):
        if text in byte_names:
            return bytes([byte_names[text]])
        if " " in text:
            refuse(
                f"token {text!r}, which holds a space (the normalizer turns every space into "
                f"{marker!r})"
            )
        return text.replace(marker, " ").encode("utf-8")

    return {
        "patterns": patterns,
        "symbols": "chars",
        "byte_tokens": byte_tokens,
        "space_marker": marker,
        "prefix": prefix,
    }, to_bytes


def read_tiktoken(path, pattern=None, special_tokens=None, bos=None, eos=None) -> ImportedTokenizer:
    """A tokenizer (merge rule "ranks") from a tiktoken ranks file: a line "base64(bytes) rank" per
    token, the rank being its id. The file holds neither the split pattern nor the special tokens:
    they come from the arguments (special_tokens: {name: id}, or names that take the ids after the
    ranks); else from the tiktoken_config.json next to the file; else, for a file of 128,000
    ranks, they are Llama 3's (Meta's original/tokenizer.model): its pattern, Llama 3.1's 256
    special token names, bos <|begin_of_text|> and eos <|end_of_text|>."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror})") from None
    ranks = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            token, rank = base64.b64decode(token, validate=True), int(rank)
        except ValueError:  # also binascii.Error
            raise TokenizerError(
                f"{path}:{number}: not a tiktoken ranks line (base64 token, space, rank)"
            ) from None
        if token in ranks or rank < 0:
            raise TokenizerError(
                f"{path}:{number}: the token is given twice, or its rank {rank} is negative"
            )
        ranks[token] = rank
    vocab = [None] * (max(ranks.values(), default=-1) + 1)
    for token, rank in ranks.items():
        if vocab[rank] is not None:
            raise TokenizerError(f"{path}: two tokens have rank {rank}")
        vocab[rank] = token
    config_path = path.parent / "tiktoken_config.json"
    if pattern is None and special_tokens is None:
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            pattern, special_tokens = config["pattern"], config["special_tokens"]
        elif len(ranks) == _LLAMA3_RANKS:
            pattern, bos, eos = LLAMA3_SPLIT_PATTERN, "<|begin_of_text|>", "<|end_of_text|>"
            special_tokens = {name: _LLAMA3_RANKS + k for k, name in enumerate(_LLAMA3_SPECIALS)}
        else:
            raise TokenizerError(
                f"{path}: a tiktoken ranks file of {len(ranks)} tokens, which holds no split "
                f"pattern nor special tokens: read it with "
                f"tokenizer_formats.read_tiktoken(path, pattern, special_tokens) and save it"
            )
    try:
        return ImportedTokenizer(
            pattern,
            (),
            () if special_tokens is None else special_tokens,
            vocab=vocab,
            bos=bos,
            eos=eos,
        )
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None


def tokenizer_json(tokenizer: Tokenizer) -> str:
    """The tokenizer as Hugging Face's tokenizer.json. Merge rule "pairs" is written as it is; rule
    "ranks" (tiktoken's) as transformers writes tiktoken files: every split of every token into two
    tokens is a merge, ordered by the token's id, then the parts' ids, with whole pieces first
    (ignore_merges); ids then equal tiktoken's unless two splits of one token could merge at once,
    which BPE-trained vocabularies do not give (the tests check on random text)."""
    tok = as_imported(tokenizer)
    bytes_level = tok.symbols == "bytes"
    fallback = {i: b for b, i in enumerate(tok.byte_tokens)} if not bytes_level else {}
    alphabet = _byte_level_alphabet()

    def text(i):
        token = tok.vocab[i]
        if bytes_level:
            return "".join(alphabet[b] for b in token)
        return (
            f"<0x{fallback[i]:02X}>"
            if i in fallback
            else token.decode("utf-8").replace(" ", tok.space_marker)
        )

    vocab = {text(i): i for i, token in enumerate(tok.vocab) if token is not None}
    added = [
        {
            "id": i,
            "content": name,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for name, i in sorted(tok.special_tokens.items(), key=lambda item: item[1])
    ]
    if bytes_level:
        normalizer, decoder = (
            None,
            {
                "type": "ByteLevel",
                "add_prefix_space": True,
                "trim_offsets": True,
                "use_regex": True,
            },
        )
        pre = {
            "type": "Sequence",
            "pretokenizers": [
                *(
                    {
                        "type": "Split",
                        "pattern": {"Regex": p},
                        "behavior": "Isolated",
                        "invert": False,
                    }
                    for p in tok.patterns
                ),
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        }
    else:
        if tok.patterns not in ([], [METASPACE_SPLIT]):
            raise TokenizerError(
                f"a SentencePiece-style tokenizer with split patterns {tok.patterns} has no "
                f"tokenizer.json form"
            )
        normalizer = (
            None
            if tok.prefix != "always"
            else {
                "type": "Sequence",
                "normalizers": [
                    {"type": "Prepend", "prepend": tok.space_marker},
                    {"type": "Replace", "pattern": {"String": " "}, "content": tok.space_marker},
                ],
            }
        )
        scheme = {"unless_space": "always", "first_unless_space": "first"}.get(tok.prefix, "never")
        pre = (
            None
            if tok.prefix == "always" and not tok.patterns
            else {
                "type": "Metaspace",
                "replacement": tok.space_marker,
                "prepend_scheme": scheme,
                "split": bool(tok.patterns),
            }
        )
        decoder = {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": tok.space_marker}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                *([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if tok.prefix else []),
            ],
        }
    post = (
        None
        if tok.bos is None
        else {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": tok.bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": tok.bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": tok.bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {tok.bos: {"id": tok.bos, "ids": [tok.bos_id], "tokens": [tok.bos]}},
        }
    )
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": not bytes_level,
        "ignore_merges": tok.ignore_merges,
        "vocab": vocab,
        "merges": [[text(a), text(b)] for a, b, _ in tok.pair_merges()],
    }
    return json.dumps(
        {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre,
            "post_processor": post,
            "decoder": decoder,
            "model": model,
        },
        ensure_ascii=False,
        indent=1,
    )


def as_imported(tokenizer: Tokenizer) -> ImportedTokenizer:
    """The same tokenizer (the same ids) as an ImportedTokenizer, which knows every option."""
    if isinstance(tokenizer, ImportedTokenizer):
        return tokenizer
    return ImportedTokenizer(tokenizer.pattern, tokenizer.merges, list(tokenizer.special_tokens))


def write_tokenizer(tokenizer: Tokenizer, folder) -> None:
    """Write tokenizer.json and tokenizer_config.json (bos and eos named) into `folder`, so that
    transformers' AutoTokenizer.from_pretrained(folder) encodes as `tokenizer` does (with a BOS
    in front where the tokenizer has one, as Llama's do) and load_tokenizer(folder) reads it
    back; with the tokenizer's chat template, if it has one, for apply_chat_template."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos,
        "eos_token": tokenizer.eos,
        "add_bos_token": tokenizer.bos is not None,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    template = getattr(tokenizer, "chat_template", None)  # infra/chat.py attaches it
    if template is not None:
        config["chat_template"] = template.source
    files.write_atomic(folder / "tokenizer.json", tokenizer_json(tokenizer))
    files.write_atomic(folder / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2))
