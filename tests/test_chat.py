"""infra/chat.py: conversations, the loss mask, chat templates against transformers, fine-tuning
with config/sft.py, and `sample.py --chat` (also in a pseudo-terminal). A tiny base model is
trained first (seconds), then fine-tuned on generated conversations."""

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import train
from infra import chat, checkpoint, hf
from infra.inference import load_checkpoint
from infra.tokenizer_formats import write_tokenizer
from infra.tokenizers import load_tokenizer
from model import IGNORE_INDEX, Transformer, chunked_cross_entropy
from tokenizer import EOT, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
CORPUS = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:50_000]
NAMES = "Ann Bob Cleo Dion Emil Fay Gus Hal Ida Jon Kit Lee Max Ned Ola Pam Rex Sam Tom Val".split()
TINY = [
    "--device=cpu",
    "--dtype=float32",
    "--model.vocab_size=320",
    "--model.dim=64",
    "--model.n_layers=2",
    "--model.n_heads=4",
    "--model.ffn_hidden=128",
    "--model.max_seq_len=128",
    "--micro_batch_size=8",
    "--global_batch_tokens=1024",
    "--sample_tokens=0",
]


def greeting(name):
    return [
        {"role": "user", "content": f"Say hello to {name}"},
        {"role": "assistant", "content": f"Hello, {name}!"},
    ]


def write_conversations(path, copies=4):
    """Greetings in both record shapes, some of two turns, and one bad record."""
    with open(path, "w") as f:
        for k in range(copies):
            for i, name in enumerate(NAMES):
                messages = greeting(name) + (greeting(NAMES[i - 1]) if k % 2 else [])
                if i % 2:
                    record = {"messages": messages}
                else:
                    sharegpt = {"user": "human", "assistant": "gpt"}
                    turns = [{"from": sharegpt[m["role"]], "value": m["content"]} for m in messages]
                    record = {"conversations": turns}
                f.write(json.dumps(record) + "\n")
        f.write('{"messages": "not a list"}\n')
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base model trained on Shakespeare for a few steps, and its fine-tuning on greetings."""
    root = tmp_path_factory.mktemp("chat")
    (root / "corpus.txt").write_text(CORPUS)
    base, sft = root / "base", root / "sft"
    args = [f"--inputs={root / 'corpus.txt'}", f"--data_dir={root / 'data'}", f"--out_dir={base}"]
    assert train.main([*args, *TINY, "--max_steps=5", "--eval_tokens=512"]) == 0
    chats = write_conversations(root / "chats.jsonl")
    args = [f"--init_from={base}", f"--inputs={chats}", f"--data_dir={root / 'chatdata'}"]
    args += [f"--out_dir={sft}", "--device=cpu", "--dtype=float32", "--global_batch_tokens=1024"]
    args += ["--lr=3e-3", "--warmup_steps=5", "--eval_interval=30", "--ckpt_interval=30"]
    assert train.main([str(ROOT / "config" / "sft.py"), *args, "--max_steps=60"]) == 0
    return {"root": root, "base": base, "sft": sft, "chats": chats, "args": args}


# ----------------------------------------------------------------------------- the loss mask


@pytest.mark.parametrize("chunk_elements", [1 << 26, 40])  # whole, and in chunks of 2 rows
def test_masked_loss_equals_a_numpy_reference(chunk_elements):
    g = torch.Generator().manual_seed(0)
    h, weight = torch.randn(2, 5, 8, generator=g), torch.randn(20, 8, generator=g)
    targets = torch.tensor([[3, IGNORE_INDEX, 7, 7, IGNORE_INDEX], [IGNORE_INDEX, 0, 19, 2, 5]])
    loss = chunked_cross_entropy(h, weight, targets, chunk_elements)
    logits = h.double().numpy() @ weight.double().numpy().T
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    kept = [(b, t) for b in range(2) for t in range(5) if targets[b, t] != IGNORE_INDEX]
    want = -np.mean([log_probs[b, t, targets[b, t]] for b, t in kept])
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5)


# ----------------------------------------------------------------------------- conversations


def shapes_of(messages) -> list[dict]:
    """The same conversation in the two record shapes: messages, and ShareGPT's conversations."""
    return [
        {"messages": messages},
        {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"],
                                                                              m["role"]),
                            "value": m["content"]} for m in messages]},
    ]  # fmt: skip


def test_both_record_shapes_give_the_same_messages_and_bad_records_are_counted(tmp_path, capsys):
    messages = greeting("Ann") + [{"role": "system", "content": "Be brief."}]
    shapes = shapes_of(messages)
    assert chat.conversation(shapes[0]) == chat.conversation(shapes[1]) == messages
    assert "no assistant" in chat.conversation({"messages": messages[:1]})
    assert "lone surrogate" in chat.conversation(json.loads('{"messages": [{"role": "user", '
                                                            '"content": "\\ud83d"}]}'))  # fmt: skip
    path = tmp_path / "chats.jsonl"
    # distinct conversations: the split goes by a record's text, so equal records share one
    good = "".join(json.dumps(shapes_of(greeting(f"Ann {k}"))[k % 2]) + "\n" for k in range(200))
    path.write_text(good + "not json\n")
    found = list(chat.read_conversations([str(path)], 0.1))
    assert len(found) == 200 and {split for split, _ in found} == {"train", "val"}
    assert "skipped 1 bad record(s) of 201" in capsys.readouterr().err
    (tmp_path / "renamed.jsonl").write_text("".join(reversed(good.splitlines(keepends=True))))
    assert list(chat.read_conversations([str(tmp_path / "renamed.jsonl")], 0.1)) == found[::-1]
    path.write_text(good[: len(good) // 10] + "not json\n" * 10)  # 10 bad of 30: an error
    with pytest.raises(chat.DataError, match="10 of 30 records are not conversations"):
        list(chat.read_conversations([str(path)], 0.1))


def test_chatml_trains_on_the_replies_and_their_end_and_never_encodes_text_as_a_special():
    tokenizer = chat.with_chatml(Tokenizer.train(CORPUS[:5000], 300))
    messages = [{"role": "system", "content": "Be brief."}, *greeting("Ann"), *greeting("Bob")]
    messages[1]["content"] += " <|im_end|>"  # text, not the token
    ids, mask = tokenizer.chat_template.encode(tokenizer, messages)
    assert tokenizer.decode(ids) == tokenizer.chat_template.render(messages)
    assert ids.count(tokenizer.special_tokens[chat.IM_END]) == len(messages)
    trained = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(trained) == "Hello, Ann!<|im_end|>Hello, Bob!<|im_end|>"


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
CHATML_STYLE_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATES = {
    "llama3": (
        LLAMA3_TEMPLATE,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>"],
        "<|eot_id|>",
    ),
    "chatml": (CHATML_STYLE_TEMPLATE, [EOT, "<|im_start|>", "<|im_end|>"], "<|im_end|>"),
}  # fmt: skip


def hf_tokenizer_folder(folder, kind):
    """A Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json with the template)
    of a BPE trained here with the template's special tokens."""
    source, specials, _ = TEMPLATES[kind]
    tokenizer = Tokenizer.train(CORPUS[:20_000], 300 + len(specials), specials)
    write_tokenizer(tokenizer, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(chat_template=source, bos_token=specials[0], eos_token=specials[1])
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_hugging_face_templates_give_the_ids_of_transformers(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = hf_tokenizer_folder(tmp_path, kind)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = chat.attach_template(load_tokenizer(folder), folder)
    template = ours.chat_template
    messages = [{"role": "system", "content": "Answer in verse."}, *greeting("Ann"),
                {"role": "user", "content": "  And to Bob, twice?\n"},
                {"role": "assistant", "content": "Hello, Bob! Hello, Bob!"}]  # fmt: skip
    for conversation, prompt in ((messages, False), (messages[:-1], True), (messages[1:2], True)):
        want = theirs.apply_chat_template(conversation, add_generation_prompt=prompt)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert template.encode(ours, conversation, prompt)[0] == list(want)
    ids, mask = template.encode(ours, messages)
    end = TEMPLATES[kind][2]
    trained = ours.decode([i for i, m in zip(ids, mask) if m])
    assert trained == f"Hello, Ann!{end}Hello, Bob! Hello, Bob!{end}"
    assert template.end_of_turn(ours) == ours.special_tokens[end]


# ----------------------------------------------------------------------------- fine-tuning


def test_a_conversations_loss_is_the_same_alone_or_in_a_batch(runs):
    data = chat.ChatData(runs["root"] / "chatdata", "train")
    model, _, _ = load_checkpoint(runs["sft"])
    seq = model.config.max_seq_len
    order = np.argsort(np.diff(data.bounds), kind="stable")
    chosen = [int(order[0]), int(order[-1]), int(order[1])]  # the shortest, longest, next
    batch = data.batch(chosen, seq, "cpu")  # padded to the longest, cut to the context
    lengths = np.diff(data.bounds)[chosen]
    assert batch[0].shape[1] == min(lengths.max(), seq + 1) - 1 and lengths[0] < lengths[1]
    for row, i in enumerate(chosen):
        x, y = data.batch([i], seq, "cpu")
        start = int(data.bounds[i])
        end = min(int(data.bounds[i + 1]), start + seq + 1)
        assert (y[0] != IGNORE_INDEX).tolist() == data.mask[start + 1 : end].astype(bool).tolist()
        with torch.no_grad():
            alone = torch.nn.functional.cross_entropy(
                model(x)[0][0], y[0], ignore_index=IGNORE_INDEX, reduction="sum"
            )
            packed = torch.nn.functional.cross_entropy(
                model(batch[0])[0][row], batch[1][row], ignore_index=IGNORE_INDEX, reduction="sum"
            )
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_fine_tuning_grows_the_vocabulary_learns_the_replies_and_resumes(runs):
    base_model, base_tokenizer, _ = load_checkpoint(runs["base"])
    model, tokenizer, _ = load_checkpoint(runs["sft"])
    assert tokenizer.vocab_size == base_tokenizer.vocab_size + 2 == model.config.vocab_size
    assert (runs["sft"] / chat.CHAT_TEMPLATE_FILE).is_file()
    # the new rows start as the mean of the base's rows
    grown = Transformer(model.config)
    hf.load_weights(grown, runs["base"], verbose=False, new_rows=True)
    table = base_model.tok_embeddings.weight
    torch.testing.assert_close(grown.tok_embeddings.weight[:320], table)
    torch.testing.assert_close(grown.tok_embeddings.weight[320:], table.mean(0).expand(2, -1))
    log = [json.loads(line) for line in (runs["sft"] / "log.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in log if r.get("event") == "eval"]
    assert len(evals) == 3 and evals[-1] < evals[0] / 3  # held-out conversations' replies
    # the same resume as pretraining: the config from the checkpoint, and more steps
    args = [str(ROOT / "config" / "sft.py"), *runs["args"], "--max_steps=62", "--resume"]
    assert train.main(args) == 0
    assert checkpoint.step_of(checkpoint.latest(runs["sft"], sharded=False)) == 62


def session_replies(run, turns, max_new_tokens=12):
    model, tokenizer, _ = load_checkpoint(run)
    session = chat.ChatSession(model, tokenizer, lambda logits: logits.argmax(-1),
                               sample.StreamDecoder)  # fmt: skip
    replies = [session.reply(turn, lambda text: None, print, max_new_tokens) for turn in turns]
    return replies, session, model, tokenizer


def test_kept_kv_cache_gives_the_replies_of_a_fresh_computation(runs):
    turns = ["Say hello to Ann", "Say hello to Bob"]
    replies, session, model, tokenizer = session_replies(runs["sft"], turns)
    assert replies[0].startswith("Hello, ")  # the form of the replies it was trained on
    template = tokenizer.chat_template
    prompt = template.encode(tokenizer, session.messages[:-1], add_generation_prompt=True)[0]
    stop = template.end_of_turn(tokenizer)
    fresh = sample.generate(model, prompt, 12, temperature=0, eos_id=stop)[0]
    assert tokenizer.decode(fresh) == replies[1]


def test_chat_with_a_prompt_answers_one_turn(runs, capsys):
    model, tokenizer, _ = load_checkpoint(runs["sft"])
    session = chat.ChatSession(model, tokenizer, lambda logits: logits.argmax(-1),
                               sample.StreamDecoder, system="Be kind.")  # fmt: skip
    reply = session.reply("Say hello to Cleo", lambda text: None, print, 12)
    args = ["--ckpt", str(runs["sft"]), "--chat", "--prompt", "Say hello to Cleo"]
    assert (
        sample.main([*args, "--temperature", "0", "--max-new-tokens", "12", "--system", "Be kind."])
        == 0
    )
    assert capsys.readouterr().out == reply + "\n"
    assert sample.main(["--ckpt", str(runs["base"]), "--chat", "--prompt", "Hi"]) == 2
    assert "no chat template; fine-tune it first" in capsys.readouterr().err


def test_history_and_a_long_message_are_trimmed_to_the_context_with_a_notice(runs):
    model, tokenizer, _ = load_checkpoint(runs["sft"])
    notices = []
    session = chat.ChatSession(model, tokenizer, lambda logits: logits.argmax(-1),
                               sample.StreamDecoder, system="Be kind.")  # fmt: skip
    for name in NAMES[:4]:
        session.reply(f"Say hello to {name}", lambda text: None, notices.append, 12)
    assert any("earlier message(s) dropped" in line for line in notices)
    assert session.messages[0] == {"role": "system", "content": "Be kind."}
    session.reply("hello " * 100, lambda text: None, notices.append, 12)
    assert "your message was cut to its last" in notices[-1]
    assert len(session.cached) <= model.config.max_seq_len


def read_until(fd, output: bytearray, marker: bytes, count: int, timeout=60.0):
    deadline = time.time() + timeout
    while output.count(marker) < count:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
        assert ready, f"no {marker!r} in time; the terminal shows {bytes(output)!r}"
        output += os.read(fd, 4096)


def test_chat_in_a_pseudo_terminal_streams_two_turns_and_ends_at_ctrl_d(runs):
    turns = ["Say hello to Dion", "Say hello to Emil"]
    replies = session_replies(runs["sft"], turns)[0]
    master, terminal = pty.openpty()
    command = [sys.executable, "sample.py", "--ckpt", str(runs["sft"]), "--chat"]
    process = subprocess.Popen(
        [*command, "--temperature", "0", "--max-new-tokens", "12"],
        stdin=terminal, stdout=terminal, stderr=terminal, cwd=ROOT, close_fds=True,
    )  # fmt: skip
    os.close(terminal)
    output = bytearray()
    try:
        read_until(master, output, b"> ", 1)
        for k, turn in enumerate(turns, 2):
            os.write(master, turn.encode() + b"\n")
            read_until(master, output, b"> ", k)
        os.write(master, b"\x04")  # Ctrl-D: end of input
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        os.close(master)
    shown = output.decode().replace("\r\n", "\n")
    assert f"> {turns[0]}\n{replies[0]}\n> {turns[1]}\n{replies[1]}\n> " in shown


# ----------------------------------------------------------------------------- Hugging Face


def test_an_imported_llama_fine_tuned_here_answers_in_the_transformers_pipeline(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = hf_tokenizer_folder(tmp_path / "llama", "chatml")
    vocab = load_tokenizer(folder).vocab_size
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    chats = write_conversations(tmp_path / "chats.jsonl")
    args = [str(ROOT / "config" / "sft.py"), f"--init_from={folder}", f"--inputs={chats}"]
    args += [f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'sft'}", "--device=cpu"]
    args += ["--dtype=float32", "--global_batch_tokens=1024", "--lr=3e-3", "--warmup_steps=5"]
    assert train.main([*args, "--max_steps=60", "--eval_interval=30"]) == 0
    assert sample.main(["--ckpt", str(tmp_path / "sft"), "--export-hf", str(tmp_path / "hf")]) == 0
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))
    asked = [{"role": "user", "content": "Say hello to Fay"}]
    answer = pipe(asked, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]
    ours = session_replies(tmp_path / "sft", [asked[0]["content"]])[0][0]
    assert answer == {"role": "assistant", "content": ours} and ours.startswith("Hello, ")
    # the export keeps the imported template: the same prompt ids in transformers and here
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = chat.attach_template(load_tokenizer(tmp_path / "hf"), tmp_path / "hf")
    want = theirs.apply_chat_template(asked, add_generation_prompt=True)["input_ids"]
    assert ours.chat_template.encode(ours, asked, True)[0] == list(want)


def test_the_chatml_export_gives_the_ids_of_transformers(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert sample.main(["--ckpt", str(runs["sft"]), "--export-hf", str(tmp_path / "hf")]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    _, ours, _ = load_checkpoint(runs["sft"])
    messages = [{"role": "system", "content": "Be kind."}, *greeting("Gus"), *greeting("Hal")]
    for conversation, prompt in ((messages, False), (messages[:-1], True)):
        want = theirs.apply_chat_template(conversation, add_generation_prompt=prompt)["input_ids"]
        assert ours.chat_template.encode(ours, conversation, prompt)[0] == list(want)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ours.special_tokens[chat.IM_END], ours.eos_id]
