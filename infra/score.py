"""Bits per byte of a model on any text: how well a checkpoint predicts a file it never trained on.

    python sample.py --ckpt RUN_OR_CHECKPOINT_OR_HF_FOLDER --score FILE [--stride N]

The text is encoded whole, after the token that starts a document (the tokenizer's BOS, or the
end-of-text token that precedes every document in training), and scored in windows of the
model's context. Each window predicts its tokens from the ones before it inside the window, and
counts only the tokens no earlier window scored, so every token of the text is scored exactly
once. `stride` is how far a window moves: the context (the default) gives disjoint windows; a
smaller stride gives every token at least `context - stride` tokens of context, for
context / stride times the forward passes. Bits per byte divide by the text's UTF-8 bytes, so
models with other tokenizers (or none) compare.
"""

import math

import torch

from model import IGNORE_INDEX
from tokenizer import UserError


@torch.no_grad()
def score_text(model, tokenizer, text: str, stride: int | None = None) -> dict:
    """{"tokens", "bytes", "nats", "val_loss", "bpb"} of `text` under `model` (see above)."""
    context = model.config.max_seq_len
    stride = context if stride is None else stride
    if not 1 <= stride <= context:
        raise UserError(f"--stride must be between 1 and the model's context ({context})")
    if not text:
        raise UserError("the text to score is empty")
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    ids = torch.tensor([start] + tokenizer.encode_ordinary(text), dtype=torch.long)
    device = model.output.weight.device
    nats, scored = 0.0, 1  # ids[:scored] are scored already (the first is only context)
    model.eval()
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + context, len(ids) - 1)  # inputs ids[begin:end], targets one later
        x, y = ids[begin:end].clone(), ids[begin + 1 : end + 1].clone()
        y[: max(0, scored - begin - 1)] = IGNORE_INDEX
        counted = int((y != IGNORE_INDEX).sum())
        if counted:
            _, loss = model(x[None].to(device), y[None].to(device))
            nats += loss.double().item() * counted
        scored = end + 1
        if end == len(ids) - 1:
            break
    tokens, nbytes = len(ids) - 1, len(text.encode("utf-8"))
    return {
        "tokens": tokens,
        "bytes": nbytes,
        "nats": nats,
        "val_loss": nats / tokens,
        "bpb": nats / (math.log(2) * nbytes),
    }
