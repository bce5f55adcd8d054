"""Chat: conversations in, a fine-tuned chat model out, and a conversation in the terminal.

    python train.py config/sft.py --init_from=RUN_OR_HF_FOLDER --inputs=chats.jsonl
    python sample.py --ckpt out/sft --chat [--system TEXT] [--prompt TEXT]

Conversations. A .jsonl file holds one conversation a line, in either common shape:
{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} or ShareGPT's
{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}. A record that is neither,
or has no assistant reply, is skipped with a warning and counted (an error above 1% of a file's
records, as for corpora). A share val_fraction of the conversations, chosen by a hash of the
record's text (the same whatever the file's name or the record's place), is held out for
validation.

Templates. A conversation becomes tokens through a chat template. A model trained here gets
ChatML, `<|im_start|>role\\ncontent<|im_end|>\\n` per message, with <|im_start|> and <|im_end|>
added to its tokenizer as special tokens (and rows for them to its embedding and output tables):
the text of a message is encoded as plain text, so it never yields those ids. A Hugging Face model
keeps its own template (chat_template in tokenizer_config.json, or chat_template.jinja), rendered
with jinja2 as transformers renders it, so the ids equal `apply_chat_template`'s. The template
goes with the data, the run and the export (CHAT_TEMPLATE_FILE; tokenizer_config.json).

Loss mask. Only the replies train: the tokens of each assistant message and the end-of-turn token
after it (<|im_end|>, <|eot_id|>, ...). Every other target is IGNORE_INDEX, which the loss skips.

Batches. Each conversation is a row of its own, cut to the context, padded after its end to the
longest row of the batch (padding targets are ignored too): with causal attention a conversation
never sees another, so its loss is the same alone or in any batch. An epoch visits every
conversation once, in an order that is a function of (seed, epoch), as pretraining's windows.
"""

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from config import ConfigError, TrainConfig
from data import (
    META_FORMAT,
    META_VERSION,
    TOKENIZER_FILE,
    DataError,
    TokenData,
    feistel_permutation,
    read_meta,
)
from infra.corpus import MAX_BAD_SHARE, list_sources, record_split
from infra.files import error_line
from infra.prepare import input_fingerprint
from infra.progress import warn
from infra.tokenizer_variants import ImportedTokenizer
from infra.tokenizers import load_tokenizer
from model import IGNORE_INDEX
from tokenizer import Tokenizer, UserError, write_atomic

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML as a jinja template, for transformers: what ChatTemplate renders in Python for CHATML.
CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TEMPLATE_FILE = "chat_template.json"  # beside tokenizer.json in data and run folders
# a message's role: the messages shape's names, and ShareGPT's
ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "human": "user",
    "gpt": "assistant",
}
SPLIT_FILES = ("tokens", "mask", "bounds")  # a split's files: {split}.{name}


class ChatError(UserError):
    """A template, conversation or chat setting that cannot be used; the message says why."""


# ----------------------------------------------------------------------------- templates


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class ChatTemplate:
    """How a conversation (a list of {"role", "content"}) becomes text and ids. `source` is a
    jinja template; CHATML is rendered here in Python, any other with jinja2 (imported then) in
    the sandbox and with the helpers transformers gives templates."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        self._compiled = None

    def render(self, messages: list, add_generation_prompt: bool = False) -> str:
        if self.source == CHATML:
            text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
            start = self.bos_token or ""
            return start + text + (f"{IM_START}assistant\n" if add_generation_prompt else "")
        if self._compiled is None:
            self._compiled = _compile(self.source)
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        names = {k: v for k, v in names.items() if v is not None}
        try:
            return self._compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **names
            )
        except Exception as error:  # the template's own raise_exception, or a jinja error
            raise ChatError(f"the chat template refused the conversation: {error}") from None

    def encode(self, tokenizer: Tokenizer, messages: list, add_generation_prompt=False):
        """(ids, mask): the conversation's ids, and 1 for those the loss trains on (each reply and
        the end-of-turn token after it), 0 for the rest."""
        if self.source == CHATML:
            return self._encode_chatml(tokenizer, messages, add_generation_prompt)
        text = self.render(messages, add_generation_prompt)
        ids = tokenizer.encode(text, allowed_special="all")  # as transformers tokenizes it
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1]).rstrip()
            if not (text.startswith(through) and through.startswith(before)):
                raise ChatError(
                    "the chat template does not render a conversation as its earlier turns "
                    "followed by the new one, so its replies cannot be found; use another template"
                )
            first = _common_prefix(tokenizer.encode(before, allowed_special="all"), ids)
            last = _common_prefix(tokenizer.encode(through, allowed_special="all"), ids)
            mask[first:last] = [1] * (last - first)
        return ids, mask

    def _encode_chatml(self, tokenizer, messages, add_generation_prompt):
        start, end = tokenizer.special_tokens[IM_START], tokenizer.special_tokens[IM_END]
        ids = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        newline = tokenizer.encode_ordinary("\n")
        mask = [0] * len(ids)
        for message in messages:
            role, reply = message["role"], message["role"] == "assistant"
            text = tokenizer.encode_ordinary(f"{role}\n{message['content']}")
            header = _common_prefix(tokenizer.encode_ordinary(f"{role}\n"), text)
            ids += [start, *text, end, *newline]
            mask += [0] * (1 + header) + [int(reply)] * (len(text) - header + 1)
            mask += [0] * len(newline)
        if add_generation_prompt:
            header = [start, *tokenizer.encode_ordinary("assistant\n")]
            ids, mask = ids + header, mask + [0] * len(header)
        return ids, mask

    def end_of_turn(self, tokenizer: Tokenizer) -> int:
        """The id that ends a reply: the first special token after a reply's text."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        if self.source == CHATML:
            return tokenizer.special_tokens[IM_END]
        before = self.render(probe[:1], add_generation_prompt=True)
        reply = self.render(probe)[len(before) :]
        specials = set(tokenizer.special_tokens.values())
        ids = [i for i in tokenizer.encode(reply, allowed_special="all") if i in specials]
        if ids:
            return ids[0]
        if tokenizer.eos is None:
            raise ChatError("the chat template ends a reply with no special token to stop at")
        return tokenizer.eos_id

    def stop_ids(self, tokenizer) -> list:
        """The ids that end a reply: the end-of-turn token, and the end of a document."""
        ends = [self.end_of_turn(tokenizer)]
        return ends + ([tokenizer.eos_id] if tokenizer.eos is not None else [])


def _compile(source: str):
    """The template compiled as transformers compiles chat templates (a sandbox, trim_blocks,
    lstrip_blocks, loop controls, its tojson, raise_exception and strftime_now)."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatError("this model's chat template needs jinja2: pip install jinja2") from None
    from datetime import datetime

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f)
    )
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as error:
        raise ChatError(f"the chat template is not valid jinja: {error}") from None


def _token_text(value):
    """tokenizer_config.json writes a token as its text or as {"content": text, ...}."""
    return value.get("content") if isinstance(value, dict) else value


def read_template(folder) -> ChatTemplate | None:
    """The chat template of a data, run or Hugging Face model folder, or None: this project's
    CHAT_TEMPLATE_FILE, else chat_template.jinja or tokenizer_config.json's chat_template (with
    its bos_token and eos_token, which templates use)."""
    folder = Path(folder)
    try:
        if (folder / CHAT_TEMPLATE_FILE).is_file():
            saved = json.loads((folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8"))
            return ChatTemplate(saved["chat_template"], saved["bos_token"], saved["eos_token"])
        config_path = folder / "tokenizer_config.json"
        config = (
            json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        )
        source = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(source, list):  # named templates: the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ChatError(f"cannot read the chat template of {folder}: {error_line(error)}") from None
    if not isinstance(source, str):
        return None
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    return ChatTemplate(source, bos, eos)


def attach_template(tokenizer: Tokenizer, folder) -> Tokenizer:
    """Give `tokenizer` the chat template of `folder` (None when it has none), which the run's
    checkpoints, the export and `sample.py --chat` use."""
    tokenizer.chat_template = read_template(folder)
    return tokenizer


def save_template(tokenizer: Tokenizer, folder) -> None:
    """Write the tokenizer's chat template, if it has one, as CHAT_TEMPLATE_FILE in `folder`."""
    template = getattr(tokenizer, "chat_template", None)
    if template is not None:
        saved = dict(chat_template=template.source, bos_token=template.bos_token)
        saved["eos_token"] = template.eos_token
        write_atomic(Path(folder) / CHAT_TEMPLATE_FILE, json.dumps(saved, indent=1) + "\n")


def with_chatml(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with IM_START and IM_END as special tokens (the next free ids), and ChatML."""
    missing = [name for name in (IM_START, IM_END) if name not in tokenizer.special_tokens]
    if type(tokenizer) is Tokenizer:
        specials = list(tokenizer.special_tokens) + missing
        chat = Tokenizer(tokenizer.pattern, tokenizer.merges, specials)
    elif isinstance(tokenizer, ImportedTokenizer):
        ids = dict(zip(missing, range(tokenizer.vocab_size, tokenizer.vocab_size + 2)))
        specials = {**tokenizer.special_tokens, **ids}
        chat = ImportedTokenizer(**{**tokenizer._args, "special_tokens": specials})
    else:
        raise ChatError(f"cannot add chat tokens to a {type(tokenizer).__name__}")
    chat.chat_template = ChatTemplate(CHATML, tokenizer.bos, tokenizer.eos)
    return chat


def chat_tokenizer(path) -> Tokenizer:
    """The tokenizer a chat run trains with: the one at `path` with its own chat template, or,
    when it has none, with ChatML (its two special tokens added)."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    tokenizer = attach_template(load_tokenizer(path), folder)
    return tokenizer if tokenizer.chat_template is not None else with_chatml(tokenizer)


def chat_config(cfg: TrainConfig) -> TrainConfig:
    """A chat run's config: the model's vocabulary grown to hold the tokens its template adds
    (train.py --init_from fills the new rows; see infra/hf.py load_weights)."""
    if not cfg.tokenizer:
        raise ConfigError(
            "chat=true fine-tunes a model on conversations: give --init_from=RUN_OR_HF_FOLDER "
            "(or a --tokenizer to train a new model with)"
        )
    size = chat_tokenizer(cfg.tokenizer).vocab_size
    if size <= cfg.model.vocab_size:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=size))


# ----------------------------------------------------------------------------- conversations


def conversation(record) -> list | str:
    """A record's messages as [{"role", "content"}] (roles: system, user, assistant), or a line
    saying why it is not a conversation."""
    if not isinstance(record, dict):
        return "not a JSON object"
    shape = next((key for key in ("messages", "conversations") if key in record), None)
    if shape is None:
        return 'no "messages" or "conversations" field'
    role_key, text_key = ("role", "content") if shape == "messages" else ("from", "value")
    turns = record[shape]
    if not isinstance(turns, list) or not turns:
        return f'"{shape}" is not a list of messages'
    messages = []
    for k, turn in enumerate(turns, 1):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        text = turn.get(text_key) if isinstance(turn, dict) else None
        if role not in ROLES or not isinstance(text, str):
            return f'message {k} needs a "{role_key}" ({"/".join(ROLES)}) and a text "{text_key}"'
        if any("\ud800" <= c <= "\udfff" for c in text):
            return f"message {k} holds a lone surrogate escape (e.g. \\ud83d), which is not text"
        messages.append({"role": ROLES[role], "content": text})
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message to train on"
    return messages


def read_conversations(inputs, val_fraction: float):
    """(split, messages) of every conversation in the .jsonl files of `inputs`, in order, the
    split by a hash of the record's text (as infra/corpus.py splits records). Bad records are
    skipped with a warning and counted; above MAX_BAD_SHARE of a file's records (and at least 10,
    or all of them) they are an error."""
    for source in list_sources(inputs):
        if not source.path.name.endswith(".jsonl"):
            raise DataError(f"{source.path}: conversations are read from .jsonl files (one a line)")
        records = bad = 0
        first_bad = ""
        with open(source.path, "rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                records += 1
                try:
                    found = conversation(json.loads(line))
                except ValueError:
                    found = "not valid JSON"
                if isinstance(found, str):
                    bad += 1
                    first_bad = first_bad or f"{source.path}:{number}: {found}"
                    if bad <= 3:
                        warn(f"{source.path}:{number}: {found}; skipped")
                    continue
                yield record_split(line.decode("utf-8", "replace").strip(), val_fraction), found
        if bad > MAX_BAD_SHARE * records and (bad >= 10 or bad == records):
            raise DataError(
                f"{source.path}: {bad:,} of {records:,} records are not conversations (first: "
                f"{first_bad}); fix the file"
            )
        if bad:
            warn(f"{source.path}: skipped {bad:,} bad record(s) of {records:,}")


def prepare_conversations(cfg: TrainConfig, resuming: bool) -> None:
    """Encode the conversations of cfg.inputs into cfg.data_dir with the chat tokenizer of
    cfg.tokenizer, or check that the folder holds them (the same files, unchanged since)."""
    out = Path(cfg.data_dir)
    if not cfg.inputs:
        raise ConfigError("chat=true trains on conversations: give --inputs=CONVERSATIONS.jsonl")
    fingerprint = input_fingerprint(list_sources(cfg.inputs))
    if (out / "meta.json").exists():
        meta = read_meta(out)
        if "chat" not in meta:
            raise DataError(
                f"{out} holds pretraining data, not conversations; use another --data_dir"
            )
        if meta["chat"]["inputs"] != fingerprint:
            raise DataError(
                f"{out} was prepared from other conversations than {', '.join(cfg.inputs)} (or "
                "they changed since); delete it or choose another --data_dir"
            )
        if (
            not resuming
            and meta["tokenizer_fingerprint"] != chat_tokenizer(cfg.tokenizer).fingerprint()
        ):
            raise DataError(
                f"{out} was prepared with another tokenizer than {cfg.tokenizer}'s; delete it or "
                "choose another --data_dir"
            )
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} holds other files; prepare conversations into a new --data_dir")
    tokenizer = chat_tokenizer(cfg.tokenizer)
    template, context = tokenizer.chat_template, cfg.model.max_seq_len + 1
    splits = {split: ([], [], [0]) for split in ("train", "val")}  # ids, masks, bounds
    cut = dropped = refused = 0
    for split, messages in read_conversations(cfg.inputs, cfg.val_fraction):
        try:
            ids, mask = template.encode(tokenizer, messages)
        except ChatError as error:  # the template's own rule (roles alternating, say)
            refused += 1
            if refused <= 3:
                warn(f"{error}; skipped")
            continue
        if not any(mask[1:context]):  # the context ends before its first reply
            dropped += 1
            continue
        cut += len(ids) > context
        tokens, masks, bounds = splits[split]
        tokens.append(ids)
        masks.append(mask)
        bounds.append(bounds[-1] + len(ids))
    train, val = splits["train"], splits["val"]
    if refused > MAX_BAD_SHARE * (refused + len(train[0]) + len(val[0])):
        why = f"the chat template refused {refused:,} conversations"
        raise DataError(f"{why}; fix them, or use a model whose template accepts them")
    if len(train[0]) + len(val[0]) < 2:
        raise DataError(
            f"{', '.join(cfg.inputs)} hold fewer than 2 usable conversations; one is needed for "
            "training and one for validation"
        )
    for source, target in ((train, val), (val, train)):  # an empty split takes the other's last
        if not target[0]:
            target[0].append(source[0].pop())
            target[1].append(source[1].pop())
            source[2].pop()
            target[2].append(len(target[0][0]))
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / TOKENIZER_FILE)
    save_template(tokenizer, out)
    info, counts = {}, {}
    for split, (tokens, masks, bounds) in splits.items():
        flat = [np.array(sum(tokens, []), dtype), np.array(sum(masks, []), np.uint8)]
        for name, array in zip(SPLIT_FILES, flat + [np.array(bounds, np.int64)]):
            write_atomic(out / f"{split}.{name}", array.tobytes())
        shard = {"path": f"{split}.tokens", "tokens": int(bounds[-1])}
        info[split] = {"shards": [shard], "tokens": int(bounds[-1])}
        counts[split] = len(tokens)
    meta = {"format": META_FORMAT, "version": META_VERSION, "dtype": np.dtype(dtype).name}
    meta.update(splits=info, tokenizer_fingerprint=tokenizer.fingerprint())
    meta["chat"] = {"inputs": fingerprint, "conversations": counts, "cut": cut, "dropped": dropped}
    write_atomic(out / "meta.json", json.dumps(meta, indent=1) + "\n")
    notes = f"; {cut:,} longer than the context of {context - 1} tokens are cut" if cut else ""
    notes += f"; {dropped:,} without a reply inside the context left out" if dropped else ""
    notes += f"; {refused:,} refused by the chat template" if refused else ""
    done = f"prepared {counts['train']:,} train and {counts['val']:,} val conversations in {out}"
    print(done + notes, file=sys.stderr)


class ChatData(TokenData):
    """One split of a folder of conversations (prepare_conversations): a batch row is one
    conversation, cut to the context, padded after its end; the loss mask is in its targets."""

    def __init__(self, data_dir, split: str):
        super().__init__(data_dir, split)
        if "chat" not in self.meta:
            raise DataError(f"{data_dir} holds pretraining data, not conversations (chat=true)")
        folder = Path(data_dir)
        self.mask = np.memmap(folder / f"{split}.mask", dtype=np.uint8, mode="r")
        self.bounds = np.fromfile(folder / f"{split}.bounds", dtype=np.int64)
        self.conversations = len(self.bounds) - 1
        if len(self.mask) != self.num_tokens or self.bounds[-1] != self.num_tokens:
            raise DataError(f"{data_dir}: the {split} split's files disagree; prepare it again")

    def check_length(self, seq_len: int):
        pass  # every conversation is a row, whatever the context (prepare checked for a reply)

    def train_starts(self, seed: int, step: int, count: int, seq_len: int) -> np.ndarray:
        """The conversations of the global batch of `step`: each epoch visits every one once, in
        an order that depends on (seed, epoch) only."""
        first = step * count + np.arange(count, dtype=np.int64)
        epochs, positions = np.divmod(first, self.conversations)
        chosen = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            key = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
            here = epochs == epoch
            order = int.from_bytes(key, "little")
            chosen[here] = feistel_permutation(positions[here], self.conversations, order)
        return chosen

    def epoch(self, step: int, count: int, seq_len: int) -> float:
        return step * count / self.conversations

    def eval_starts(self, seq_len: int, max_tokens: int) -> np.ndarray:
        """max_tokens // seq_len conversations (at least one, at most all), spread evenly."""
        count = max(1, min(self.conversations, max_tokens // seq_len))
        return np.arange(count, dtype=np.int64) * self.conversations // count

    def batch(self, conversations, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the conversations (ids), one a row, each cut to seq_len + 1
        tokens, padded to the longest; targets outside the loss mask are IGNORE_INDEX."""
        rows = []
        for i in conversations:
            start = int(self.bounds[i])
            end = min(int(self.bounds[i + 1]), start + seq_len + 1)
            ids = torch.from_numpy(self.window(start, end - start).astype(np.int64))
            rows.append((ids, torch.from_numpy(self.mask[start:end].astype(bool))))
        width = max(len(ids) for ids, _ in rows) - 1
        x = torch.zeros(len(rows), width, dtype=torch.long)
        y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, mask) in enumerate(rows):
            x[row, : len(ids) - 1] = ids[:-1]
            y[row, : len(ids) - 1] = ids[1:].where(mask[1:], IGNORE_INDEX)
        return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- talking


class ChatSession:
    """A conversation with a model. Its KV cache stays from turn to turn: a turn computes only
    the ids after those it shares with what is cached (the cache is overwritten from there)."""

    def __init__(self, model, tokenizer, sample, stream_decoder, system: str | None = None):
        self.template = getattr(tokenizer, "chat_template", None)
        if self.template is None:
            raise ChatError(
                "this model has no chat template; fine-tune it first: "
                "python train.py config/sft.py --init_from=THIS_MODEL --inputs=CHATS.jsonl"
            )
        self.model, self.tokenizer = model, tokenizer
        self.sample, self.stream_decoder = sample, stream_decoder
        self.messages = [{"role": "system", "content": system}] if system else []
        self.stop = set(self.template.stop_ids(tokenizer))
        self.context, self.cached = model.config.max_seq_len, []  # ids in the KV cache
        weight = model.output.weight
        model.setup_kv_cache(1, self.context, weight.device, weight.dtype)

    @torch.inference_mode()
    def _run(self, ids: list, start: int):
        """The logits after `ids`, written into the KV cache from position `start`."""
        tokens = torch.tensor([ids], device=self.model.output.weight.device)
        return self.model(tokens, start_pos=start)[0][:, -1]

    def _fit(self, text: str, reserve: int, notice) -> tuple[list, str]:
        """The prompt ids of the conversation and a user message `text`, leaving `reserve`
        positions for the reply: the oldest messages dropped, then the beginning of `text`."""
        system = (
            self.messages[:1] if self.messages[:1] and self.messages[0]["role"] == "system" else []
        )
        turns, dropped, cut = self.messages[len(system) :], 0, False
        while True:
            user = {"role": "user", "content": text}
            ids = self.template.encode(self.tokenizer, system + turns + [user], True)[0]
            over = len(ids) - (self.context - reserve)
            if over <= 0:
                break
            if turns:
                dropped += min(2, len(turns))
                turns = turns[2:]
                continue
            pieces = self.tokenizer.encode_ordinary(text)
            if over >= len(pieces):
                raise ChatError(
                    f"the system message leaves no room for a message in the model's "
                    f"{self.context}-token context; shorten --system"
                )
            text, cut = self.tokenizer.decode(pieces[over:]), True
        if dropped:
            notice(
                f"[{dropped} earlier message(s) dropped to fit the {self.context}-token context]"
            )
        if cut:
            notice(
                f"[your message was cut to its last {len(pieces) - over} tokens to fit the context]"
            )
        self.messages = system + turns + [user]
        return ids, text

    def reply(self, text: str, write, notice, max_new_tokens: int) -> str:
        """Answer the user's `text`: the reply streams through write(str) as it is sampled, and
        ends at the end-of-turn token, after max_new_tokens, or when the context is full."""
        reserve = min(max_new_tokens, self.context // 4)
        ids, _ = self._fit(text, reserve, notice)
        keep = min(_common_prefix(self.cached, ids), len(ids) - 1)  # at least one id to run
        logits, self.cached = self._run(ids[keep:], keep), ids
        decoder, reply = self.stream_decoder(self.tokenizer), []
        while True:
            next_id = int(self.sample(logits[:, : self.tokenizer.vocab_size])[0])
            if next_id in self.stop:
                break
            reply.append(next_id)
            write(decoder.push([next_id]))
            if len(reply) == max_new_tokens:
                break
            if len(self.cached) == self.context:
                notice(f"[the reply filled the model's {self.context}-token context]")
                break
            logits = self._run([next_id], len(self.cached))
            self.cached = self.cached + [next_id]
        write(decoder.flush())
        answer = self.tokenizer.decode(reply)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def talk(model, tokenizer, args, scripted, sample_next, stream_decoder) -> int:
    """sample.py --chat: one turn for a `scripted` message (--prompt), else turns read from the
    terminal until end of input (Ctrl-D). sample_next and stream_decoder are sample.py's."""
    device = model.output.weight.device
    generator = None if args.seed is None else torch.Generator(device).manual_seed(args.seed)

    def sample(logits):
        return sample_next(logits, args.temperature, args.top_k, args.top_p, generator)

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    def notice(line):
        print(line, file=sys.stderr, flush=True)

    session = ChatSession(model, tokenizer, sample, stream_decoder, args.system)
    if scripted is not None:
        session.reply(scripted, write, notice, args.max_new_tokens)
        write("\n")
        return 0
    notice(f"[chat with {args.ckpt}; end with Ctrl-D]")
    while True:
        try:
            text = input("> ")
        except EOFError:
            write("\n")
            return 0
        if text.strip():
            session.reply(text, write, notice, args.max_new_tokens)
            write("\n")
