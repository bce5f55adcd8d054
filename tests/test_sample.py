"""Tests for sample.py: KV-cache generation, sampling filters, streaming decode, CLI errors (the
Hugging Face export and sampling from a Hugging Face folder are in test_hf.py)."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import ModelConfig, Transformer
from sample import (
    SampleError,
    StreamDecoder,
    generate,
    load_checkpoint,
    main,
    sample_next,
    top_p_filter,
)
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHINESE = (
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"
)


def make_checkpoint(out_dir, train_steps=30, **model_kwargs):
    """Write a tiny checkpoint folder like train.py's: a tokenizer trained on Shakespeare plus some
    Chinese, and a small model trained for a few steps so that its predictions are not uniform."""
    with open(os.path.join(ROOT, "data", "tinyshakespeare.txt")) as f:
        text = f.read()[:20000] + CHINESE * 3
    tokenizer = Tokenizer.train(text, 320)
    cfg = ModelConfig(
        **{
            **dict(
                vocab_size=tokenizer.vocab_size,
                dim=64,
                n_layers=2,
                n_heads=4,
                n_kv_heads=2,
                max_seq_len=64,
                multiple_of=32,
            ),
            **model_kwargs,
        }
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    if train_steps:
        data = torch.tensor(tokenizer.encode_ordinary(text))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(train_steps):
            i = torch.randint(len(data) - 33, (8,))
            batch = torch.stack([data[j : j + 33] for j in i])
            _, loss = model(batch[:, :-1], targets=batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    os.makedirs(out_dir, exist_ok=True)
    torch.save(
        {
            "version": 1,
            "model": model.state_dict(),
            "config": {"model": dataclasses.asdict(cfg)},
            "step": 0,
        },
        os.path.join(out_dir, "ckpt-000000.pt"),
    )
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    return out_dir


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def loaded(ckpt_dir):
    model, tokenizer, _ = load_checkpoint(ckpt_dir, "cpu")
    return model, tokenizer


def greedy_by_recompute(model, prompt_ids, n):
    """Reference: no cache, the whole growing sequence through a plain forward pass each step."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


# ----------------------------------------------------------------------------- generation


def test_greedy_with_kv_cache_equals_full_recompute(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("ROMEO:\nWhat")
    expected = greedy_by_recompute(model, prompt, 40)
    out = generate(model, prompt, 40, temperature=0, num_samples=3)
    assert out == [expected] * 3


def test_seeded_sampling_is_reproducible(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("To be")

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return generate(
            model,
            prompt,
            30,
            temperature=1.0,
            top_k=50,
            top_p=0.95,
            num_samples=2,
            generator=generator,
        )

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_1_equals_greedy(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("KING")
    assert generate(model, prompt, 20, temperature=1.5, top_k=1) == generate(
        model, prompt, 20, temperature=0
    )


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    # 0.5 + 0.3 reaches 0.8
    assert torch.allclose(top_p_filter(probs, 0.8), torch.tensor([[0, 0.625, 0, 0.375]]))
    assert (top_p_filter(probs, 0.81) > 0).tolist() == [[True, True, False, True]]
    # always the top token
    assert torch.allclose(top_p_filter(probs, 0.1), torch.tensor([[0.0, 1, 0, 0]]))
    assert torch.allclose(top_p_filter(probs, 1.0), probs)
    draws = sample_next(
        probs.log().expand(200, 4), top_p=0.8, generator=torch.Generator().manual_seed(0)
    )
    assert set(draws.tolist()) == {1, 3}


def test_stops_at_eot_per_sample(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("First Citizen:")
    free = generate(model, prompt, 40, temperature=0)[0]
    eot = free[5]  # pretend a token greedy decoding emits is the end of text
    assert generate(model, prompt, 40, temperature=0, eos_id=eot) == [free[: free.index(eot)]]
    # sampled rows stop independently (the random draws do not depend on which rows have stopped)
    kw = dict(temperature=1.0, num_samples=4)
    free = generate(model, prompt, 40, generator=torch.Generator().manual_seed(3), **kw)
    eot = free[0][2]
    steps = []
    out = generate(
        model,
        prompt,
        40,
        eos_id=eot,
        generator=torch.Generator().manual_seed(3),
        on_token=steps.append,
        **kw,
    )
    assert out == [row[: row.index(eot)] if eot in row else row for row in free]
    # the batch runs until its last row stops; a stopped row reports None
    assert (
        len(steps)
        == max(row.index(eot) + 1 if eot in row else len(row) for row in free)
        > len(out[0]) + 1
    )
    assert all(step[0] is None for step in steps[len(out[0]) :])


def test_empty_prompt_starts_from_eot(loaded):
    model, tokenizer = loaded
    assert generate(model, [], 10, temperature=0, eos_id=tokenizer.eos_id) == generate(
        model, [tokenizer.eos_id], 10, temperature=0, eos_id=tokenizer.eos_id
    )


def test_stops_at_context_limit_and_rejects_long_prompt(loaded):
    model, tokenizer = loaded
    ctx = model.config.max_seq_len
    prompt = tokenizer.encode_ordinary(
        "All the world's a stage, and all the men and women merely players. " * 20
    )
    assert len(generate(model, prompt[: ctx - 5], 100, temperature=0)[0]) == 5
    with pytest.raises(
        SampleError,
        match=f"prompt is {ctx + 3} tokens but the model's context is {ctx}.*shorten it",
    ):
        generate(model, prompt[: ctx + 3], 10)
    with pytest.raises(SampleError, match="vocabulary"):
        generate(model, [model.config.vocab_size], 10)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_new_tokens=0),
        dict(temperature=-0.1),
        dict(top_k=0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(num_samples=0),
    ],
)
def test_bad_sampling_parameters(loaded, kwargs):
    model, _ = loaded
    with pytest.raises(SampleError, match=next(iter(kwargs))):
        generate(model, [1, 2, 3], **{"max_new_tokens": 5, **kwargs})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_generation(ckpt_dir):
    model, tokenizer, _ = load_checkpoint(ckpt_dir, "cuda")
    assert model.output.weight.dtype == torch.bfloat16
    out = generate(
        model,
        tokenizer.encode("ROMEO:"),
        20,
        temperature=0.8,
        top_k=20,
        generator=torch.Generator("cuda").manual_seed(0),
    )
    assert len(out[0]) > 0


# ----------------------------------------------------------------------------- streaming


def test_stream_decoder_never_splits_a_character(loaded):
    _, tokenizer = loaded
    text = "ROMEO: " + CHINESE + " 你好，世界！"
    ids = tokenizer.encode(text)
    # the test only means something if some token ends inside a multi-byte character
    assert any(not _is_utf8(tokenizer.decode_bytes([i])) for i in ids)
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push([i]) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == tokenizer.decode(ids) == text


class BytesTokenizer:  # token ids are the bytes themselves
    decode_bytes = staticmethod(b"".join)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=6)), st.text(max_size=20))
def test_stream_decoder_matches_decode_on_any_bytes(chunks, text):
    chunks = chunks + [text.encode()[i : i + 1] for i in range(len(text.encode()))]
    decoder = StreamDecoder(BytesTokenizer)
    streamed = "".join(decoder.push([c]) for c in chunks) + decoder.flush()
    assert streamed == b"".join(chunks).decode("utf-8", errors="replace")


def _is_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ----------------------------------------------------------------------------- command line


def test_cli_streams_greedy_output(ckpt_dir, loaded, capsys):
    model, tokenizer = loaded
    assert (
        main(
            [
                "--ckpt",
                ckpt_dir,
                "--prompt",
                "ROMEO:",
                "--temperature",
                "0",
                "--max-new-tokens",
                "20",
            ]
        )
        == 0
    )
    expected = generate(
        model, tokenizer.encode("ROMEO:"), 20, temperature=0, eos_id=tokenizer.eos_id
    )[0]
    assert capsys.readouterr().out == "ROMEO:" + tokenizer.decode(expected) + "\n"
    assert (
        main(
            [
                "--ckpt",
                ckpt_dir,
                "--prompt",
                "你",
                "--num-samples",
                "3",
                "--max-new-tokens",
                "5",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("-" * 40) == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temperature", "-1"], "temperature must be finite and >= 0"),
        (["--temperature", "inf"], "temperature must be finite"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read the prompt from"),
        (["--prompt", "to be or not " * 50], "shorten it"),
    ],
)
def test_cli_bad_parameters(ckpt_dir, capsys, argv, message):
    assert main(["--ckpt", ckpt_dir] + argv) == 2
    out, err = capsys.readouterr()
    assert message in err and err.count("\n") == 1 and out == ""


def test_cli_bad_checkpoints(ckpt_dir, tmp_path, capsys):
    def error(folder):
        assert main(["--ckpt", str(folder), "--prompt", "x"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err

    assert "checkpoint folder" in error(tmp_path / "nope") and "not found" in error(
        tmp_path / "nope"
    )
    assert "no checkpoint (ckpt-N.pt) in" in error(tmp_path)
    (tmp_path / "ckpt-000001").mkdir()
    for name in (".metadata", "train_state.pt"):
        (tmp_path / "ckpt-000001" / name).write_bytes(b"")
    assert "train.py --consolidate" in error(tmp_path)
    (tmp_path / "ckpt-000001.pt").write_bytes(b"this is not a checkpoint")
    assert "no tokenizer at" in error(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(
        open(os.path.join(ckpt_dir, "tokenizer.json"), "rb").read()
    )
    assert "is corrupt or not a checkpoint" in error(tmp_path)
    torch.save(
        {"version": 1, "model": {}, "config": {"model": {"dim": 64}}}, tmp_path / "ckpt-000001.pt"
    )
    assert "does not match model.py" in error(tmp_path)
    torch.save(
        torch.load(os.path.join(ckpt_dir, "ckpt-000000.pt"), weights_only=True),
        tmp_path / "ckpt-000001.pt",
    )
    (tmp_path / "tokenizer.json").write_text("{garbage")
    assert "tokenizer.json" in error(tmp_path)


def test_cli_ckpt_that_is_not_a_checkpoint_file(ckpt_dir, tmp_path, capsys):
    """--ckpt naming a file that is no checkpoint says so (it blamed a missing
    tokenizer); a checkpoint file itself still samples."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    assert main(["--ckpt", str(notes), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"{notes} is not a checkpoint" in err and "tokenizer" not in err and err.count("\n") == 1
    ckpt = os.path.join(ckpt_dir, "ckpt-000000.pt")
    assert main(["--ckpt", ckpt, "--prompt", "x", "--max-new-tokens", "2"]) == 0


def test_cli_subprocess(ckpt_dir):
    """The real entry point: stdin prompt, and a clean one-line error rather than a traceback."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "sample.py"),
        "--ckpt",
        ckpt_dir,
        "--max-new-tokens",
        "8",
    ]
    ok = subprocess.run(
        cmd + ["--seed", "0"], input="ROMEO:", capture_output=True, text=True, cwd=ROOT
    )
    assert ok.returncode == 0 and ok.stdout.startswith("ROMEO:") and "tokens/s" in ok.stderr
    bad = subprocess.run(cmd[:3] + ["/nonexistent"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not found" in bad.stderr


# -------------------------------------------------------- padded vocabularies and tiny temperatures


def padded_checkpoint(ckpt_dir, folder, padding=64):
    """The checkpoint of ckpt_dir with `padding` extra rows in the model's vocabulary, as when
    model.vocab_size exceeds the tokenizer's."""
    model, tokenizer, _ = load_checkpoint(ckpt_dir, "cpu")
    config = dataclasses.replace(model.config, vocab_size=model.config.vocab_size + padding)
    state = model.state_dict()
    for name in ("tok_embeddings.weight", "output.weight"):
        state[name] = torch.cat([state[name], torch.randn(padding, config.dim)])
    os.makedirs(folder, exist_ok=True)
    torch.save(
        {"version": 1, "model": state, "config": {"model": dataclasses.asdict(config)}, "step": 0},
        os.path.join(folder, "ckpt-000000.pt"),
    )
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return folder, tokenizer


def favour_padding(monkeypatch, tokenizer_vocab_size):
    """Make every model's logits for ids past the tokenizer's the largest (an undertrained row
    can win)."""
    forward = Transformer.forward

    def padding_first(self, tokens, targets=None, start_pos=None):
        logits, loss = forward(self, tokens, targets, start_pos)
        if logits is not None:
            logits[..., tokenizer_vocab_size:] += 1000
        return logits, loss

    monkeypatch.setattr(Transformer, "forward", padding_first)


def test_samples_keep_the_space_after_the_prompt_sentencepiece_style(
    ckpt_dir, tmp_path, capsys, monkeypatch
):
    """decode() takes a SentencePiece-style leading space for a text's prefix space; after a prompt
    it is the space before the first new word, and only after an empty one a prefix."""
    import shutil

    import sample
    from infra.tokenizer_variants import ImportedTokenizer

    folder = tmp_path / "run"
    shutil.copytree(ckpt_dir, folder)
    tok = ImportedTokenizer(
        None,
        (),
        {"<unk>": 0, "<s>": 1, "</s>": 2},
        vocab=[b"<unk>", b"<s>", b"</s>"] + [bytes([b]) for b in range(256)] + [b" "],
        merge_rule="pairs",
        symbols="chars",
        byte_tokens=list(range(3, 259)),
        space_marker="\u2581",
        prefix="always",
        bos="<s>",
        eos="</s>",
    )
    tok.save(folder / "tokenizer.json")
    world = tok.encode_ordinary(" world", continuation=True)
    assert world[0] == 259 and tok.decode(world) == "world"
    # args[6]: num_samples
    monkeypatch.setattr(sample, "generate", lambda *args, **kwargs: [world] * args[6])
    for prompt, text in (("Hello", "Hello world"), ("", "world")):
        assert main(["--ckpt", str(folder), "--prompt", prompt, "--num-samples", "2"]) == 0
        assert capsys.readouterr().out == (text + "\n" + "-" * 40 + "\n") * 2


def test_padding_rows_of_the_vocabulary_are_never_sampled(ckpt_dir, tmp_path, capsys, monkeypatch):
    folder, tokenizer = padded_checkpoint(ckpt_dir, str(tmp_path))
    favour_padding(monkeypatch, tokenizer.vocab_size)
    model, _, _ = load_checkpoint(folder, "cpu")
    prompt = tokenizer.encode("ROMEO:")
    assert all(t >= tokenizer.vocab_size for t in generate(model, prompt, 8, temperature=0)[0])
    for kwargs in (
        dict(temperature=0),
        dict(temperature=1.0),
        dict(temperature=1.0, top_k=5, top_p=0.9),
    ):
        out = generate(
            model,
            prompt,
            8,
            num_samples=2,
            generator=torch.Generator().manual_seed(0),
            vocab_size=tokenizer.vocab_size,
            **kwargs,
        )
        assert all(0 <= t < tokenizer.vocab_size for row in out for t in row)
    for seed in range(2):
        assert (
            main(
                [
                    "--ckpt",
                    folder,
                    "--prompt",
                    "ROMEO:",
                    "--max-new-tokens",
                    "10",
                    "--seed",
                    str(seed),
                ]
            )
            == 0
        )
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_final_sample_of_a_training_run_skips_padding_rows(ckpt_dir, tmp_path, capsys, monkeypatch):
    """train.py --tokenizer with a larger model.vocab_size: the run's closing sample."""

    import train

    favour_padding(monkeypatch, Tokenizer.load(os.path.join(ckpt_dir, "tokenizer.json")).vocab_size)
    (tmp_path / "corpus.txt").write_text(
        open(os.path.join(ROOT, "data", "tinyshakespeare.txt")).read()[:40000]
    )
    assert (
        train.main(
            [
                f"--inputs={tmp_path / 'corpus.txt'}",
                f"--data_dir={tmp_path / 'data'}",
                f"--out_dir={tmp_path / 'out'}",
                f"--tokenizer={os.path.join(ckpt_dir, 'tokenizer.json')}",
                "--model.vocab_size=384",
                "--model.dim=32",
                "--model.n_layers=1",
                "--model.n_heads=2",
                "--model.max_seq_len=32",
                "--micro_batch_size=4",
                "--global_batch_tokens=128",
                "--max_steps=1",
                "--eval_tokens=128",
                "--sample_tokens=20",
                "--device=cpu",
            ]
        )
        == 0
    )
    assert "--- sample ---" in capsys.readouterr().out


def test_tiny_temperatures_are_greedy_and_never_overflow(loaded):
    logits = torch.tensor([[1.0, 3.0, 2.0, -float("inf")], [0.5, 0.5 + 1e-6, 0.0, 0.1]])
    for temperature in (1e-45, 1e-300, 5e-324, 1e-30):
        draws = sample_next(
            logits.repeat(2, 1), temperature=temperature, generator=torch.Generator().manual_seed(0)
        )
        assert draws.tolist() == [1, 1, 1, 1]
        ties = sample_next(
            torch.tensor([[2.0, 0.0, 2.0]]).expand(400, 3),
            temperature=temperature,
            top_k=2,
            generator=torch.Generator().manual_seed(0),
        )
        assert set(ties.tolist()) == {0, 2}  # equal logits stay equally likely
    model, tokenizer = loaded
    prompt = tokenizer.encode("To be")
    assert generate(
        model, prompt, 12, temperature=1e-45, generator=torch.Generator().manual_seed(0)
    ) == generate(model, prompt, 12, temperature=0)


def test_a_corrupt_newest_checkpoint_names_the_one_before_and_best_names_the_best(tmp_path, capsys):
    """sample.py on a run folder whose newest checkpoint is damaged says which older one to use;
    RUN/best is the checkpoint best.json names."""
    import json

    from sample import main

    run = Path(make_checkpoint(tmp_path / "run"))
    older, newest = run / "ckpt-000000.pt", run / "ckpt-000005.pt"
    newest.write_bytes(older.read_bytes()[:1000])
    (run / "best.json").write_text(
        json.dumps({"step": 0, "val_bpb": 1.0, "checkpoint": older.name})
    )
    assert main(["--ckpt", str(run / "best"), "--prompt", "ROMEO:", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["--ckpt", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "corrupt" in err and f"use the one before it: --ckpt {older}" in err
    assert len(err.splitlines()) == 1


def test_score_counts_every_token_once_whatever_the_stride(ckpt_dir):
    """A text inside one context window: every stride scores each token once, so all give the
    nats of one forward pass over the whole text; a longer text is scored token for token too."""
    import math

    from infra.score import score_text

    model, tokenizer, _ = load_checkpoint(ckpt_dir, "cpu")
    context = model.config.max_seq_len
    text = "ROMEO: But soft, what light"
    ids = [tokenizer.eos_id] + tokenizer.encode_ordinary(text)
    assert len(ids) <= context
    _, loss = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    whole = loss.item() * (len(ids) - 1)
    for stride in (1, 3, context):
        result = score_text(model, tokenizer, text, stride)
        assert result["tokens"] == len(ids) - 1
        assert result["nats"] == pytest.approx(whole, rel=1e-5)
        assert result["bpb"] == pytest.approx(whole / (math.log(2) * len(text.encode())), rel=1e-5)
    long_text = text * 40
    assert len(tokenizer.encode_ordinary(long_text)) > 3 * context
    disjoint, overlapping = (score_text(model, tokenizer, long_text, s) for s in (context, 8))
    assert disjoint["tokens"] == overlapping["tokens"] == len(tokenizer.encode_ordinary(long_text))


def test_score_of_uniform_logits_is_log_vocab_per_token(ckpt_dir, tmp_path, capsys):
    """A model with all-zero logits loses ln(V) nats on every token: bpb = n ln V / (ln 2 bytes).
    The command line prints that number last."""
    import math

    import sample
    from infra.score import score_text

    model, tokenizer, _ = load_checkpoint(ckpt_dir, "cpu")
    with torch.no_grad():
        model.output.weight.zero_()
    text = "To be, or not to be, that is the question.\n" * 30
    result = score_text(model, tokenizer, text, stride=16)
    vocab = model.config.vocab_size
    want = result["tokens"] * math.log(vocab) / (math.log(2) * len(text.encode()))
    assert result["bpb"] == pytest.approx(want, rel=1e-6)
    (tmp_path / "text.txt").write_text(text)
    assert sample.main(["--ckpt", str(ckpt_dir), "--score", str(tmp_path / "text.txt")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith(
        f"bits per byte {score_text(*load_checkpoint(ckpt_dir)[:2], text)['bpb']:.4f}"
    )
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    assert sample.main(["--ckpt", str(ckpt_dir), "--score", str(tmp_path / "bad.txt")]) == 2
    assert "cannot read the text to score" in capsys.readouterr().err


def test_a_sharded_checkpoint_folder_says_to_consolidate_it(tmp_path):
    from infra.checkpoint import CheckpointError

    folder = tmp_path / "run" / "ckpt-000004"
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError, match="python train.py --consolidate .*ckpt-000004"):
        load_checkpoint(folder)
