"""A trained model to use: the newest checkpoint of a run folder, its best (RUN/best), one of its
ckpt-N.pt files, or a Hugging Face model folder; with its tokenizer (and its chat template, if
any: infra/chat.py) and config."""

import dataclasses
import zipfile
from pathlib import Path

import torch

from infra import chat, checkpoint, hf
from infra.checkpoint import CheckpointError
from infra.files import first_line
from infra.tokenizers import load_tokenizer
from model import ModelConfig, Transformer


def load_checkpoint(path, device="cpu"):
    """The model (in eval mode, on `device`), tokenizer and training config saved by train.py (a
    run folder: its newest checkpoint; RUN/best: the checkpoint of its best val; or one checkpoint
    file of it), or the model and tokenizer of a Hugging Face model folder (config {"model": ...}
    only)."""
    path = Path(path)
    if path.name == "best" and not path.exists():  # RUN/best: the checkpoint of the best val
        path = checkpoint.best(path.parent) or path
    if not path.exists():
        raise CheckpointError(f"checkpoint folder {path} not found")
    # bf16 halves the memory traffic that decoding is bound by on a GPU; CPUs stay in float32
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if (path / hf.CONFIG_FILE).is_file():
        model, tokenizer = hf.load_folder(path, device, dtype)
        chat.attach_template(tokenizer, path)
        return model, tokenizer, {"model": dataclasses.asdict(model.config)}
    if (path / ".metadata").is_file():  # one sharded checkpoint (an FSDP run's best, say)
        if not path.with_name(path.name + ".pt").is_file():
            raise CheckpointError(
                f"{path} is a sharded FSDP checkpoint; gather it into one file "
                f"first: python train.py --consolidate {path}"
            )
        path = path.with_name(path.name + ".pt")  # what --consolidate wrote
    if path.is_dir():
        ckpt_path, out_dir = checkpoint.latest(path, sharded=False), path
        if ckpt_path is None and checkpoint.latest(path, sharded=True) is not None:
            raise CheckpointError(
                f"{path} holds a sharded FSDP checkpoint; run `python train.py "
                f"--consolidate {path}` first"
            )
        if ckpt_path is None:
            raise CheckpointError(
                f"no checkpoint (ckpt-N.pt) in {path}; train first or point --ckpt at a run folder"
            )
    elif zipfile.is_zipfile(path):  # what torch.save writes
        ckpt_path, out_dir = path, path.parent
    else:
        raise CheckpointError(
            f"{path} is not a checkpoint; point --ckpt at a run folder, one of its "
            "ckpt-N.pt or a Hugging Face model folder"
        )
    tok_path = out_dir / "tokenizer.json"
    if not tok_path.is_file():  # checked before loading the weights, which can take a while
        raise CheckpointError(
            f"no tokenizer at {tok_path}; train.py writes it next to its checkpoints"
        )
    # weights_only, so that a checkpoint from elsewhere cannot run code when loaded
    try:
        ckpt = checkpoint.safe_load(ckpt_path)
    except checkpoint.CheckpointError as error:
        older = checkpoint.older_than(ckpt_path)
        raise CheckpointError(
            f"{error}; use the one before it: --ckpt {older}" if older else str(error)
        ) from None
    config = ckpt.get("config")
    if not (isinstance(config, dict) and isinstance(config.get("model"), dict) and "model" in ckpt):
        raise CheckpointError(f"checkpoint {ckpt_path} has no model weights or model config")
    try:
        model = Transformer.from_state_dict(ModelConfig(**config["model"]), ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        why = first_line(e)
        raise CheckpointError(f"checkpoint {ckpt_path} does not match model.py: {why}") from None
    tokenizer = chat.attach_template(load_tokenizer(tok_path), out_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model "
            f"only {model.config.vocab_size}; they are not from the same run"
        )
    return model.to(device=device, dtype=dtype).eval(), tokenizer, config
