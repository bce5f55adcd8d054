"""Tests for infra/hf.py's models: import of Hugging Face Llama/Mistral folders (checked against
transformers itself), export, --init_from in train.py (also under torchrun), sampling from a
folder, bad folders.

Everything is offline: the Hugging Face models are random tiny ones built with transformers and
saved to tmp in each weight layout. Weights are redrawn at O(1) scale (transformers initialises
with std 0.02, which makes every logit nearly 0 and would hide a wrong mapping). Tolerance: fp32
logits of a two-layer model computed in two codebases (different matmul order, RoPE angles in
fp32 there, fp64 here) agree to ~1e-6; 1e-4 leaves headroom, while a swapped or mis-sliced tensor
changes them by ~1.
"""

import dataclasses
import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
import train
from infra import checkpoint, hf
from model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
tokenizers = pytest.importorskip("tokenizers")
# its progress bars on stderr would mix with the errors checked here
transformers.utils.logging.disable_progress_bar()

ROOT = Path(__file__).resolve().parent.parent
CORPUS = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:60_000]
VOCAB = 320  # the model's; the tokenizer below has 300 tokens, so 20 rows are padding

LLAMA_GQA = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
KINDS = {
    "llama_gqa": (transformers.LlamaConfig, LLAMA_GQA),
    # Llama 3.2's shape in miniature: tied head, theta 500000 and llama3 scaling whose three
    # frequency bands all occur at head_dim 16 (wavelengths 6, 33, 167, ... against 64 / 4, 64 / 1)
    "llama3_tied": (
        transformers.LlamaConfig,
        {
            **LLAMA_GQA,
            "num_key_value_heads": 1,
            "tie_word_embeddings": True,
            "rope_theta": 500000.0,
            "max_position_embeddings": 128,
            "rope_scaling": dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        },
    ),
    # a window shorter than max_position_embeddings: the context becomes the window
    "mistral": (
        transformers.MistralConfig,
        {**LLAMA_GQA, "sliding_window": 48, "max_position_embeddings": 96, "rope_theta": 1e6},
    ),
}


def newest(run) -> Path:
    return checkpoint.latest(run, sharded=False)


def randomize_(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(
                    torch.randn(p.shape, generator=g)
                    / math.sqrt(p.shape[1] if "embed" not in name else 1)
                )
    return module


@functools.cache
def hf_tokenizer() -> tuple[str, str]:
    """tokenizer.json and tokenizer_config.json of a byte-level BPE made with the tokenizers
    library (300 tokens), which puts <s> before every text as Llama 3's does and ends documents
    with </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    return tok.to_str(), json.dumps(config)


def save_hf(kind, folder, layout="safetensors", seed=0, **changes):
    """A random transformers model of `kind` (with config `changes`) saved to `folder` in one weight
    layout, with a tokenizer; returns the model."""
    config_class, kwargs = KINDS[kind]
    kwargs = {**kwargs, **changes}
    torch.manual_seed(seed)
    model = randomize_(
        transformers.AutoModelForCausalLM.from_config(config_class(**kwargs)), seed
    ).eval()
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "bin":  # transformers 5 no longer writes this older layout, so write it as 4.x did
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, max_shard_size="40KB" if layout == "sharded" else "50GB")
    tokenizer_json, tokenizer_config = hf_tokenizer()
    (folder / "tokenizer.json").write_text(tokenizer_json)
    (folder / "tokenizer_config.json").write_text(tokenizer_config)
    return model


class Folders(dict):
    """(kind, layout) -> (folder, transformers model), each made on first use."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, key):
        folder = self.root / "-".join(key)
        self[key] = folder, save_hf(*key[:1], folder, key[1])
        return self[key]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return Folders(tmp_path_factory.mktemp("hf"))


def logits_of(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out[0]


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize(
    "kind, layout",
    [
        ("llama_gqa", "safetensors"),
        ("llama_gqa", "sharded"),
        ("llama_gqa", "bin"),
        ("llama3_tied", "sharded"),
        ("mistral", "bin"),
    ],
)
def test_import_gives_the_logits_of_transformers(folders, kind, layout):
    folder, reference = folders[kind, layout]
    if layout == "sharded":
        assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    ours = hf.load_model(folder)
    config = ours.config
    assert (
        config.tie_embeddings == (kind == "llama3_tied")
        and config.kv_heads == KINDS[kind][1]["num_key_value_heads"]
    )
    assert (config.rope_scaling is not None) == (kind == "llama3_tied")
    assert config.max_seq_len == {"llama_gqa": 64, "llama3_tied": 128, "mistral": 48}[kind]
    tokens = torch.randint(
        0, VOCAB, (2, config.max_seq_len), generator=torch.Generator().manual_seed(1)
    )
    want = logits_of(reference, tokens)
    assert want.std() > 1  # O(1) weights: a wrong tensor would show
    torch.testing.assert_close(logits_of(ours, tokens), want, atol=1e-4, rtol=1e-4)


def test_bf16_weights_are_read_as_they_are(tmp_path):
    model = save_hf("llama_gqa", tmp_path)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    ours = hf.load_model(tmp_path, dtype=torch.bfloat16)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[hf.hf_name(name)]), name


# config.json of released models as published (transformers 4.x form), with their parameter counts
LLAMA_2_7B = dict(
    architectures=["LlamaForCausalLM"],
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
    hidden_size=4096,
    initializer_range=0.02,
    intermediate_size=11008,
    max_position_embeddings=4096,
    model_type="llama",
    num_attention_heads=32,
    num_hidden_layers=32,
    num_key_value_heads=32,
    pretraining_tp=1,
    rms_norm_eps=1e-05,
    rope_scaling=None,
    tie_word_embeddings=False,
    torch_dtype="float16",
    transformers_version="4.31.0.dev0",
    use_cache=True,
    vocab_size=32000,
)
LLAMA_31_8B = dict(
    architectures=["LlamaForCausalLM"],
    attention_bias=False,
    attention_dropout=0.0,
    bos_token_id=128000,
    eos_token_id=128001,
    hidden_act="silu",
    hidden_size=4096,
    initializer_range=0.02,
    intermediate_size=14336,
    max_position_embeddings=131072,
    mlp_bias=False,
    model_type="llama",
    num_attention_heads=32,
    num_hidden_layers=32,
    num_key_value_heads=8,
    pretraining_tp=1,
    rms_norm_eps=1e-05,
    rope_scaling=dict(
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
        rope_type="llama3",
    ),
    rope_theta=500000.0,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
    transformers_version="4.43.0.dev0",
    use_cache=True,
    vocab_size=128256,
)
LLAMA_32_1B = {
    **LLAMA_31_8B,
    "head_dim": 64,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "tie_word_embeddings": True,
    "rope_scaling": {**LLAMA_31_8B["rope_scaling"], "factor": 32.0},
}
TINYLLAMA = {
    **LLAMA_2_7B,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "max_position_embeddings": 2048,
    "num_hidden_layers": 22,
    "num_key_value_heads": 4,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
}
SMOLLM_135M = {
    **LLAMA_2_7B,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "max_position_embeddings": 2048,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "vocab_size": 49152,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
MISTRAL_7B = dict(
    architectures=["MistralForCausalLM"],
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
    hidden_size=4096,
    initializer_range=0.02,
    intermediate_size=14336,
    max_position_embeddings=32768,
    model_type="mistral",
    num_attention_heads=32,
    num_hidden_layers=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-05,
    rope_theta=10000.0,
    sliding_window=4096,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
    transformers_version="4.34.0.dev0",
    use_cache=True,
    vocab_size=32000,
)


@pytest.mark.parametrize(
    "config, params, context",
    [
        (LLAMA_2_7B, 6_738_415_616, 4096),
        (LLAMA_31_8B, 8_030_261_248, 131072),
        (LLAMA_32_1B, 1_235_814_400, 131072),
        (TINYLLAMA, 1_100_048_384, 2048),
        (SMOLLM_135M, 134_515_008, 2048),
        (MISTRAL_7B, 7_241_732_096, 4096),
    ],
)
def test_released_configs(tmp_path, config, params, context):
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = hf.read_config(tmp_path)
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(tmp_path)
        )
        model = Transformer(ours)
    assert model.num_params() == sum(p.numel() for p in theirs.parameters()) == params
    assert ours.max_seq_len == context  # Mistral 7B v0.1: its 4096-token sliding window
    if "rope_scaling" in config and config["rope_scaling"]:
        assert ours.rope_scaling == (config["rope_scaling"]["factor"], 1.0, 4.0, 8192)
    assert hf.read_config(tmp_path) == ours


def test_transformers_4_and_5_config_forms_read_the_same(folders, tmp_path):
    folder = copy_of(folders, tmp_path, "llama3_tied", "sharded")
    config = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in config  # as transformers 5 writes it
    rope = config.pop("rope_parameters")
    edit_config(folder, rope_parameters=None, rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    assert hf.read_config(folder) == hf.read_config(folders["llama3_tied", "sharded"][0])


# ----------------------------------------------------------------------------- bad folders


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def copy_of(folders, tmp_path, kind="llama_gqa", layout="safetensors"):
    return Path(shutil.copytree(folders[kind, layout][0], tmp_path / "copy"))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
            "architecture 'Qwen2ForCausalLM' is not supported",
        ),
        (dict(attention_bias=True), "attention_bias true (biases) is not supported"),
        (dict(hidden_act="gelu"), 'hidden_act "gelu"'),
        (
            dict(rope_parameters=None, rope_scaling=dict(type="yarn", factor=4.0)),
            "RoPE scaling 'yarn'",
        ),
        (
            dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)),
            "RoPE scaling 'linear'",
        ),
        (
            dict(rope_scaling=dict(rope_type="llama3", factor=8.0)),
            "both rope_parameters and rope_scaling",
        ),
        (
            dict(rope_parameters=dict(rope_type="llama3", factor=8.0, rope_theta=1e4)),
            "low_freq_factor must be",
        ),
        (dict(head_dim=32), "head_dim 32"),
        (dict(attention_dropout=0.1), "attention_dropout"),
        (dict(vocab_size=321), "has shape [320, 64] but the model's config gives [321, 64]"),
        (dict(num_hidden_layers=3), "lacks model.layers.2"),
        (dict(num_hidden_layers=1), "holds model.layers.1"),
        (dict(hidden_size="64"), "hidden_size must be a positive integer"),
    ],
)
def test_unsupported_or_inconsistent_configs_are_one_line_errors(
    folders, tmp_path, change, message
):
    folder = copy_of(folders, tmp_path)
    edit_config(folder, **change)
    assert message in error(folder)


def error(folder):
    with pytest.raises(hf.HFError) as info:
        hf.load_model(folder)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_tokenizer_larger_than_the_model_is_refused(folders, tmp_path, capsys):
    folder = copy_of(folders, tmp_path)
    edit_config(folder, vocab_size=299)
    assert sample.main(["--ckpt", str(folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "has 300 tokens but the model only 299" in err and err.count("\n") == 1


def test_bad_weight_files_are_one_line_errors(folders, tmp_path):
    folder = copy_of(folders, tmp_path)
    (folder / "config.json").unlink()
    assert "has no config.json" in error(folder)
    folder = copy_of(folders, tmp_path / "a")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    assert "model.safetensors is truncated or not a safetensors file" in error(folder)
    weights.unlink()
    assert "has no weights" in error(folder)
    folder = copy_of(folders, tmp_path / "b", layout="sharded")
    next(folder.glob("model-00002-of-*.safetensors")).unlink()
    assert "model-00002-of" in error(folder) and "is missing" in error(folder)
    folder = copy_of(folders, tmp_path / "c", layout="bin")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    # as old Llama 2 files have: ignored
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, folder / "pytorch_model.bin")
    hf.load_model(folder)
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    torch.save(state, folder / "pytorch_model.bin")
    assert (
        "holds model.layers.0.self_attn.q_proj.bias, which this model does not have (biases"
        in error(folder)
    )
    state.pop("model.layers.0.self_attn.q_proj.bias")
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int8)
    torch.save(state, folder / "pytorch_model.bin")
    assert "model.norm.weight is torch.int8, not floating point" in error(folder)


# ----------------------------------------------------------------------------- train.py --init_from


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return path


def train_args(folder, corpus, data_dir, out_dir, *extra):
    return [
        f"--init_from={folder}",
        f"--inputs={corpus}",
        f"--data_dir={data_dir}",
        f"--out_dir={out_dir}",
        "--model.max_seq_len=32",
        "--micro_batch_size=4",
        "--global_batch_tokens=256",
        "--max_steps=2",
        "--optimizer=adamw",
        "--lr=1e-3",
        "--warmup_steps=1",
        "--eval_interval=1",
        "--eval_tokens=512",
        "--log_interval=1",
        "--sample_tokens=8",
        "--device=cpu",
        "--dtype=float32",
        *extra,
    ]  # compared with transformers in fp32


def log_records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def val_losses(out_dir):
    return {r["step"]: r["val_loss"] for r in log_records(out_dir) if r.get("event") == "eval"}


def reference_val_loss(reference, data_dir, seq_len=32, eval_tokens=512):
    """The validation loss train.py's first evaluation should report, computed by transformers."""
    from data import TokenData

    val = TokenData(str(data_dir), "val")
    x, y = val.batch(val.eval_starts(seq_len, eval_tokens), seq_len, "cpu")
    return torch.nn.functional.cross_entropy(
        logits_of(reference, x).flatten(0, 1), y.flatten()
    ).item()


@pytest.fixture(scope="module")
def pretrained_run(folders, corpus, tmp_path_factory):
    """A two-step run started from the tied Llama 3-style folder."""
    root = tmp_path_factory.mktemp("init_from")
    folder, _ = folders["llama3_tied", "sharded"]
    assert train.main(train_args(folder, corpus, root / "data", root / "run")) == 0
    return root


def test_init_from_starts_from_the_weights_and_tokenizer(folders, pretrained_run, capsys):
    from infra.tokenizers import load_tokenizer

    folder, reference = folders["llama3_tied", "sharded"]
    meta = json.loads((pretrained_run / "data" / "meta.json").read_text())
    assert meta["tokenizer_fingerprint"] == load_tokenizer(folder).fingerprint()
    # step 0's evaluation is the imported model's: transformers gives the same loss on the same
    # windows
    assert val_losses(pretrained_run / "run")[0] == pytest.approx(
        reference_val_loss(reference, pretrained_run / "data"), abs=1e-4
    )
    saved = checkpoint.safe_load(newest(pretrained_run / "run"))
    assert saved["step"] == 2 and saved["config"]["init_from"] == str(folder)
    assert (
        saved["config"]["model"]["max_seq_len"] == 32
        and saved["config"]["model"]["rope_scale_factor"] == 8.0
    )


def test_sampling_from_a_folder_matches_transformers(folders, capsys):
    from infra.tokenizers import load_tokenizer

    folder, reference = folders["mistral", "bin"]
    tokenizer = load_tokenizer(folder)
    prompt = [tokenizer.bos_id] + tokenizer.encode("ROMEO:")
    tokens = torch.tensor([prompt])
    want = reference.generate(
        tokens,
        attention_mask=torch.ones_like(tokens),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tokenizer.eos_id,
    )[0, len(prompt) :].tolist()
    assert sample.generate(hf.load_model(folder), prompt, 12, temperature=0) == [want]
    assert (
        sample.main(
            [
                "--ckpt",
                str(folder),
                "--prompt",
                "ROMEO:",
                "--temperature",
                "0",
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and len(out) > len("ROMEO:\n")


def test_resume_does_not_need_init_from_and_continues_exactly(
    folders, pretrained_run, corpus, tmp_path, monkeypatch
):
    """Stop pretrained_run's run after 1 of its 2 steps, delete the weights it started from, resume:
    the same model as the uninterrupted run."""
    from tests.run_train import stop_at

    folder = Path(shutil.copytree(folders["llama3_tied", "sharded"][0], tmp_path / "weights"))

    def args(*extra):
        return train_args(folder, corpus, pretrained_run / "data", tmp_path / "run", *extra)

    stop_at(1, monkeypatch.setattr)
    assert train.main(args()) == 0
    monkeypatch.undo()
    assert checkpoint.safe_load(newest(tmp_path / "run"))["step"] == 1
    shutil.rmtree(folder)  # a resumed run reads its own checkpoint, not init_from
    assert train.main(args("--resume")) == 0
    whole, resumed = (
        checkpoint.safe_load(newest(run))["model"]
        for run in (pretrained_run / "run", tmp_path / "run")
    )
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_init_from_a_run_folder_single_file_or_sharded(pretrained_run, tmp_path):
    """train.py's model built from a run folder holds that run's weights, from ckpt-N.pt or from the
    ckpt-N/ an FSDP run leaves (made here in one process)."""
    import torch.distributed.checkpoint as dcp

    from infra.distributed import setup_runtime
    from infra.run import run_config

    saved = checkpoint.safe_load(newest(pretrained_run / "run"))
    sharded = checkpoint.path_for(tmp_path, saved["step"], sharded=True)
    dcp.save({"model": saved["model"]}, checkpoint_id=sharded)
    torch.save(
        {"version": 1, "step": saved["step"], "config": saved["config"]},
        sharded / checkpoint.TRAIN_STATE_FILE,
    )
    for source in (pretrained_run / "run", tmp_path):
        cfg = run_config(None, [f"--init_from={source}", "--device=cpu"])
        assert cfg.model == ModelConfig(**saved["config"]["model"])
        model = train.build_model(
            cfg, setup_runtime(cfg), torch.float32, sharded=False, pretrained=True
        )
        assert all(
            torch.equal(tensor, saved["model"][name]) for name, tensor in model.state_dict().items()
        )
        assert model.output.weight is model.tok_embeddings.weight  # still tied
    (sharded / "__0_0.distcp").unlink()  # a lost shard: one line, not DCP's traceback
    with pytest.raises(hf.HFError, match=r"cannot load .*ckpt-\d+: .*__0_0.distcp"):
        train.build_model(cfg, setup_runtime(cfg), torch.float32, sharded=False, pretrained=True)


@pytest.mark.parametrize(
    "override, ok, message",
    [
        ("--model.dim=32", False, "--model.dim=32 contradicts"),
        ("--model.n_kv_heads=None", False, "--model.n_kv_heads=None contradicts"),
        ("--model.rope_theta=500000", False, "--model.rope_theta=500000.0 contradicts"),
        ("--model.max_seq_len=65", False, "longer than the 64 positions"),
        ("--model.n_kv_heads=2", True, None),  # the same as the folder's
        ("--model.multiple_of=64", True, None),  # irrelevant: the folder gives ffn_hidden
        ("--model.dropout=0.1", True, None),
    ],
)
def test_model_overrides_that_contradict_init_from(
    folders, corpus, tmp_path, capsys, override, ok, message
):
    folder, _ = folders["llama_gqa", "safetensors"]
    argv = train_args(
        folder,
        corpus,
        tmp_path / "data",
        tmp_path / "out",
        "--max_steps=1",
        "--sample_tokens=0",
        "--eval_interval=10",
        override,
    )
    if ok:
        argv.remove("--model.max_seq_len=32")
        assert train.main(argv + ["--dry-run"]) == 0
    else:
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_dry_run_takes_the_model_of_init_from(folders, capsys):
    """--dry-run reads only config.json, and shows the imported model's size, not the default
    model's."""
    folder, reference = folders["llama_gqa", "safetensors"]
    assert train.main([f"--init_from={folder}", "--dry-run", "--model.max_seq_len=32"]) == 0
    assert (
        f"parameters: {sum(p.numel() for p in reference.parameters()):,} "
        in capsys.readouterr().out
    )


def test_init_from_errors_are_one_line(folders, corpus, tmp_path, capsys):
    for source, message in (
        (tmp_path / "nothing", "is not a folder"),
        (tmp_path, "has neither config.json nor a checkpoint"),
    ):
        assert train.main(train_args(source, corpus, tmp_path / "data", tmp_path / "out")) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    folder = copy_of(folders, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    assert train.main(train_args(folder, corpus, tmp_path / "data", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "is truncated or not a safetensors file" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """A run folder with this project's own tokenizer (no BOS; <|endoftext|> ends documents)."""
    from tests.test_sample import make_checkpoint

    return Path(
        make_checkpoint(
            str(tmp_path_factory.mktemp("own")),
            train_steps=0,
            vocab_size=336,
            tie_embeddings=True,
            rope_scale_factor=4.0,
            rope_original_max_seq_len=16,
        )
    )


@pytest.mark.parametrize("which", ["own", "imported"])
def test_export_is_complete_and_imports_back_identically(own_run, pretrained_run, tmp_path, which):
    from infra.tokenizers import load_tokenizer

    run = own_run if which == "own" else pretrained_run / "run"
    assert sample.main(["--ckpt", str(run), "--export-hf", str(tmp_path / "hf")]) == 0
    folder = tmp_path / "hf"
    assert {p.name for p in folder.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    model, tokenizer, _ = sample.load_checkpoint(run)
    text = "ROMEO:\nWhat light? 你好"
    ids = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(text)
    assert len(ids) + 8 <= model.config.max_seq_len
    # transformers: the tokenizer, the model, and greedy generation through pipeline()
    assert transformers.AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == ids
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = torch.tensor([ids])
    torch.testing.assert_close(
        logits_of(theirs, tokens), logits_of(model, tokens), atol=1e-4, rtol=1e-4
    )
    generator = transformers.pipeline("text-generation", model=str(folder), dtype=torch.float32)
    out = generator(text, max_new_tokens=8, do_sample=False, return_full_text=False)[0][
        "generated_text"
    ]
    ours = sample.generate(model, ids, 8, temperature=0, vocab_size=tokenizer.vocab_size)[0]
    assert out == tokenizer.decode(ours)
    # and back: identical weights, config and token ids
    back = hf.load_model(folder)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    assert dataclasses.replace(
        back.config, n_kv_heads=model.config.kv_heads, dropout=model.config.dropout
    ) == dataclasses.replace(
        model.config,
        n_kv_heads=model.config.kv_heads,
        multiple_of=back.config.multiple_of,
        ffn_hidden=model.config.hidden_dim,
    )
    assert load_tokenizer(folder).encode(text) == tokenizer.encode(text)


def test_export_shards_and_replaces_an_earlier_export(own_run, tmp_path):
    model, tokenizer, _ = sample.load_checkpoint(own_run)
    folder = tmp_path / "hf"
    hf.export(model, tokenizer, folder, max_shard_bytes=100_000)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").is_file()
    back = hf.load_model(folder)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    hf.export(model, tokenizer, folder, overwrite=True)  # one file now: shards and index go
    assert (
        not list(folder.glob("model-*")) and not (folder / "model.safetensors.index.json").exists()
    )
    assert all(
        torch.equal(hf.load_model(folder).state_dict()[k], v) for k, v in model.state_dict().items()
    )


def test_export_refusals(own_run, tmp_path, capsys):
    from tests.test_sample import make_checkpoint

    layernorm = make_checkpoint(str(tmp_path / "ln"), train_steps=0, norm="layernorm")
    for argv, message in (
        (["--ckpt", layernorm, "--export-hf", str(tmp_path / "hf")], "only has RMSNorm"),
        (["--ckpt", str(own_run), "--export-hf", str(own_run)], "is a run folder"),
    ):
        assert sample.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_a_field_a_fork_adds_exports_only_at_its_default():
    """A model field infra/hf.py does not map (a fork's sliding window) never exports as a plain
    Llama: at its default the model is one, otherwise the export is refused."""

    @dataclasses.dataclass
    class WindowedConfig(ModelConfig):
        window: int | None = None

    config = WindowedConfig(vocab_size=300, dim=32, n_layers=1, n_heads=4)
    assert hf.hf_config(config, None, 0)["hidden_size"] == 32
    with pytest.raises(hf.HFError, match=r"model.window=64 has no counterpart .* hf_config"):
        hf.hf_config(dataclasses.replace(config, window=64), None, 0)


def export_error(argv, capsys):
    """sample.py's stderr for an export that must be refused, checked to be one line."""
    assert sample.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


def snapshot(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


def test_export_never_writes_into_another_models_folder(folders, own_run, tmp_path, capsys):
    """A Hugging Face folder (the --init_from one, say) or a folder holding any
    other file is refused, --overwrite or not, and left exactly as it was."""
    hf_folder = copy_of(folders, tmp_path)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    for folder in (hf_folder, notes):
        before = snapshot(folder)
        for extra in ([], ["--overwrite"]):
            argv = ["--ckpt", str(own_run), "--export-hf", str(folder), *extra]
            assert "holds files that are not an export of this project" in export_error(
                argv, capsys
            )
            assert snapshot(folder) == before
    assert not list(tmp_path.glob("*.tmp-*"))


def test_an_earlier_export_is_replaced_only_with_overwrite(own_run, tmp_path, capsys):
    """Exporting again into an export of this project needs --overwrite."""
    folder = tmp_path / "hf"
    assert sample.main(["--ckpt", str(own_run), "--export-hf", str(folder)]) == 0
    capsys.readouterr()
    before = snapshot(folder)
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    argv = ["--ckpt", str(own_run), "--export-hf", str(folder)]
    assert "holds an earlier export; add --overwrite" in export_error(argv, capsys)
    assert sample.main(argv + ["--overwrite"]) == 0
    assert snapshot(folder) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sample.main(["--ckpt", str(own_run), "--export-hf", str(empty)]) == 0
    assert snapshot(empty) == before


def test_every_exported_file_has_the_same_mode(own_run, tmp_path):
    """Safetensors writes its file 0600; the export gives every file 0644."""
    model, tokenizer, _ = sample.load_checkpoint(own_run)
    old_umask = os.umask(0o022)
    try:
        hf.export(model, tokenizer, tmp_path / "hf", max_shard_bytes=100_000)
    finally:
        os.umask(old_umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "hf").iterdir()}
    assert len(modes) > 5 and set(modes.values()) == {"0o644"}, modes


def test_export_to_the_current_folder_is_one_line(own_run, tmp_path, monkeypatch, capsys):
    """`--export-hf .` was a ValueError traceback about an empty name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("not a model")
    argv = ["--ckpt", str(own_run), "--export-hf", "."]
    assert "not an export of this project" in export_error(argv, capsys)
    (tmp_path / "corpus.txt").unlink()
    assert sample.main(argv) == 0  # an empty current folder is fine
    assert (tmp_path / "model.safetensors").is_file() and os.getcwd() == str(tmp_path)


def test_the_next_export_removes_what_a_killed_one_left(own_run, tmp_path):
    """A kill during --export-hf left DIR.tmp-PID/ with the weights forever;
    the next export into DIR removes those of processes that no longer run."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (dead.pid, alive.pid):
            left = tmp_path / f"hf.tmp-{pid}"
            left.mkdir()
            (left / "model.safetensors").write_bytes(b"\0" * 1000)
            (left / "tokenizer.json.tmp").write_text("{")
        model, tokenizer, _ = sample.load_checkpoint(own_run)
        hf.export(model, tokenizer, tmp_path / "hf")
        assert not (tmp_path / f"hf.tmp-{dead.pid}").exists()
        assert (tmp_path / f"hf.tmp-{alive.pid}").is_dir()  # a running export's is left alone
    finally:
        alive.kill()
        alive.wait()


# ----------------------------------------------------------------------------- torchrun


def test_import_under_torchrun_equals_one_process(corpus, tmp_path):
    """2 ranks (gloo): DDP, where every rank reads everything, and FSDP, where each reads its rows
    (321 vocabulary rows split 161 + 160), the loss in chunks of 8 tokens. With a negligible lr the
    weights after one step are the imported ones, equal to the file's; the validation losses before
    and after and the training loss agree with one process to 1e-5 (fp32 reduction order; a
    mis-sliced shard of these O(1) weights would move them by ~1)."""
    folder = tmp_path / "weights"
    reference = save_hf("llama3_tied", folder, vocab_size=321)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOSS_CHUNK_ELEMENTS": str(8 * 321)}

    def args(out, *extra):
        return train_args(
            folder,
            corpus,
            tmp_path / "data",
            tmp_path / out,
            "--max_steps=1",
            "--lr=1e-12",
            "--sample_tokens=0",
            "--global_batch_tokens=256",
            *extra,
        )

    assert train.main(args("single")) == 0
    for parallel in ("ddp", "fsdp"):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                str(ROOT / "tests" / "run_train.py"),
                *args(parallel, f"--parallel={parallel}"),
            ],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=300,
        )
    want = {
        name: reference.state_dict()[hf.hf_name(name)]
        for name in checkpoint.safe_load(newest(tmp_path / "single"))["model"]
    }
    for out in ("single", "ddp"):
        state = checkpoint.safe_load(newest(tmp_path / out))["model"]
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, want[name], atol=1e-6, rtol=0, msg=f"{out}: {name}")
    # FSDP's checkpoint is sharded; its evaluations before and after the step are the imported
    # model's
    for out in ("ddp", "fsdp"):
        assert [
            r.get("loss", r.get("val_loss"))
            for r in log_records(tmp_path / out)
            if "loss" in r or "val_loss" in r
        ] == pytest.approx(
            [
                r.get("loss", r.get("val_loss"))
                for r in log_records(tmp_path / "single")
                if "loss" in r or "val_loss" in r
            ],
            abs=1e-5,
        )


def test_model_keys_of_a_config_file_are_checked_too(folders, tmp_path):
    from config import ConfigError
    from infra.run import run_config

    folder, _ = folders["llama_gqa", "safetensors"]
    path = tmp_path / "continue.py"
    path.write_text(
        "from config import TrainConfig\nfrom model import ModelConfig\n"
        f"config = TrainConfig(init_from={str(folder)!r}, lr=1e-5, "
        "model=ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, "
        "ffn_hidden=96, max_seq_len=16, dropout=0.0))\n"
    )
    with pytest.raises(ConfigError, match=r"model.n_kv_heads=4 \(in the config file\) contradicts"):
        run_config(str(path), [])
    path.write_text(path.read_text().replace("n_kv_heads=4", "n_kv_heads=2"))
    config = run_config(str(path), ["--model.dropout=0.1"])
    assert (config.model.max_seq_len, config.model.dropout, config.lr) == (16, 0.1, 1e-5)
    assert config.model == dataclasses.replace(hf.read_config(folder), max_seq_len=16, dropout=0.1)
    assert config.tokenizer == str(folder)


def test_init_from_a_run_whose_newest_checkpoint_is_damaged_names_the_one_before(
    pretrained_run, tmp_path
):
    """A run folder whose newest checkpoint was cut short: --init_from says which older one there
    is and how to start from it, in one line."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pretrained_run / "run", run)
    good = newest(run)
    damaged = run / f"ckpt-{checkpoint.step_of(good) + 1:06d}.pt"
    damaged.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(hf.HFError) as error:
        hf.pretrained_config(run)
    message = str(error.value)
    assert "corrupt" in message and f"to start from the one before it ({good.name})" in message
    assert f"move {damaged.name} aside" in message and "\n" not in message
