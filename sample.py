"""Generate text from a trained checkpoint or a Hugging Face model folder, or export a checkpoint
as a Hugging Face Llama model.

    python sample.py --ckpt out --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 50
    echo "To be" | python sample.py --ckpt out --num-samples 3 --seed 1
    python sample.py --ckpt path/to/TinyLlama-1.1B --prompt "The capital of France is"
    python sample.py --ckpt out --export-hf out/hf

Generation uses the model's KV cache: one forward pass over the prompt ("prefill"), then one
position per new token, instead of running the whole text through the model again for each token.
"""

import argparse
import codecs
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

from infra import checkpoint
from infra import hf
from model import ModelConfig, Transformer
from tokenizer import Tokenizer


class SampleError(ValueError):
    """A problem with the user's input (files, parameters, prompt); its message is one line."""


# -----------------------------------------------------------------------------
# Loading

def load_checkpoint(path, device="cpu"):
    """Load the model (in eval mode, on `device`), tokenizer and training config saved by train.py (a run
    folder: its newest checkpoint; or one checkpoint file of it), or the model and tokenizer of a Hugging
    Face model folder (config {"model": ...} only)."""
    path = Path(path)
    if not path.exists():
        raise SampleError(f"checkpoint folder {path} not found")
    # bf16 halves the memory traffic that decoding is bound by on a GPU; CPUs stay in float32
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if (path / hf.CONFIG_FILE).is_file():
        try:
            tokenizer = Tokenizer.load(path)  # before the weights, which can take a while
            config = hf.read_config(path)
            if tokenizer.vocab_size > config.vocab_size:
                raise SampleError(f"the tokenizer in {path} has {tokenizer.vocab_size} tokens but the model only "
                                  f"{config.vocab_size}")
            model = hf.load_model(path, device, dtype)
        except ValueError as e:  # HFError, TokenizerError
            raise SampleError(_first_line(e)) from None
        return model, tokenizer, {"model": dataclasses.asdict(model.config)}
    ckpt_path, out_dir = (checkpoint.latest(path, sharded=False), path) if path.is_dir() else (path, path.parent)
    if ckpt_path is None and checkpoint.latest(path, sharded=True) is not None:
        raise SampleError(f"{path} holds a sharded FSDP checkpoint; run `python train.py --consolidate {path}` first")
    if ckpt_path is None:
        raise SampleError(f"no checkpoint (ckpt-N.pt) in {path}; train first or point --ckpt at a run folder")
    tok_path = out_dir / "tokenizer.json"
    if not tok_path.is_file():  # checked before loading the weights, which can take a while
        raise SampleError(f"no tokenizer at {tok_path}; train.py writes it next to its checkpoints")
    try:  # weights_only, so that a checkpoint from elsewhere cannot run code when loaded
        ckpt = checkpoint.safe_load(ckpt_path)
    except checkpoint.CheckpointError as e:
        raise SampleError(str(e)) from None
    if not (isinstance(ckpt.get("config"), dict) and isinstance(ckpt["config"].get("model"), dict) and "model" in ckpt):
        raise SampleError(f"checkpoint {ckpt_path} has no model weights or model config")
    try:
        model = Transformer.from_state_dict(ModelConfig(**ckpt["config"]["model"]), ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise SampleError(f"checkpoint {ckpt_path} does not match model.py: {_first_line(e)}") from None
    try:
        tokenizer = Tokenizer.load(tok_path)
    except ValueError as e:
        raise SampleError(_first_line(e)) from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise SampleError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model only "
                          f"{model.config.vocab_size}; they are not from the same run")
    return model.to(device=device, dtype=dtype).eval(), tokenizer, ckpt["config"]


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# -----------------------------------------------------------------------------
# Sampling

def check_sampling_params(max_new_tokens, temperature, top_k, top_p, num_samples):
    if max_new_tokens < 1:
        raise SampleError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:  # also catches NaN
        raise SampleError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise SampleError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise SampleError(f"top_p must be in (0, 1], got {top_p}")
    if num_samples < 1:
        raise SampleError(f"num_samples must be >= 1, got {num_samples}")


def top_p_filter(probs, top_p):
    """Nucleus filtering: keep the smallest set of most likely tokens whose total probability is >= top_p
    and renormalize. A token is kept iff the tokens ranked above it sum to less than top_p, so the top
    token is always kept (the set is never empty); among equal probabilities the sort order decides."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_above >= top_p, 0.0)
    probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of `logits` (B, V): the argmax when temperature is 0 (top_k and top_p then
    change nothing), else sampled from softmax(logits / temperature) after top-k, then top-p filtering."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Shifted so the largest logit is 0, then divided in float64: a tiny temperature sends the others
    # to -inf and never turns the largest into inf or NaN (0 / 1e-45 = 0), so softmax stays defined.
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values).double() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1).float()
    if top_p is not None and top_p < 1:
        probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_prompt(model, prompt_ids, eos_id=None):
    """The prompt as a list of ids ([eos_id] when empty), or SampleError if the model cannot continue it."""
    prompt_ids = list(prompt_ids) or ([eos_id] if eos_id is not None else [])
    if not prompt_ids:
        raise SampleError("the prompt is empty and no eos_id was given to start from")
    context, vocab_size = model.config.max_seq_len, model.config.vocab_size
    if len(prompt_ids) >= context:
        raise SampleError(f"prompt is {len(prompt_ids)} tokens but the model's context is {context} "
                          f"(including at least one new token); shorten it")
    if not all(0 <= t < vocab_size for t in prompt_ids):
        raise SampleError(f"prompt token ids must be in 0..{vocab_size - 1} (the model's vocabulary)")
    return prompt_ids


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, num_samples=1,
             eos_id=None, generator=None, on_token=None, vocab_size=None):
    """Continue `prompt_ids` (a list of ints; empty = start a new document at `eos_id`) `num_samples`
    times, as one batch. Returns one list of new token ids per sample. A sample stops after
    `max_new_tokens`, when it emits `eos_id` (not included in its list), or when prompt + new tokens
    fill the model's context (max_seq_len). `on_token(ids)` is called after every step with the new
    token of each sample, None for samples that have stopped, so the caller can stream the text.
    `vocab_size` (the tokenizer's) keeps ids past it from being drawn: a model's table is often
    padded beyond the tokenizer, and those rows decode to nothing."""
    check_sampling_params(max_new_tokens, temperature, top_k, top_p, num_samples)
    prompt_ids = check_prompt(model, prompt_ids, eos_id)
    context = model.config.max_seq_len
    # the last new token is only returned, never fed back, so it needs no place in the cache
    seq_len = min(context, len(prompt_ids) + max_new_tokens - 1)
    device = model.output.weight.device
    model.setup_kv_cache(num_samples, max_seq_len=seq_len, device=device, dtype=model.output.weight.dtype)
    try:
        tokens = torch.tensor(prompt_ids, device=device).expand(num_samples, -1)
        logits = model(tokens, start_pos=0)[0][:, -1]  # prefill: the whole prompt in one pass
        pos, out, done = len(prompt_ids), [[] for _ in range(num_samples)], [False] * num_samples
        while True:
            next_ids = sample_next(logits[:, :vocab_size], temperature, top_k, top_p, generator)
            # a finished sample keeps decoding with the batch, but its tokens are dropped
            new = [None if d or t == eos_id else t for t, d in zip(next_ids.tolist(), done)]
            done = [t is None for t in new]
            for row, t in zip(out, new):
                if t is not None:
                    row.append(t)
            if on_token is not None:
                on_token(new)
            pos += 1
            if all(done) or pos == len(prompt_ids) + max_new_tokens or pos == context:
                return out
            logits = model(next_ids[:, None], start_pos=pos - 1)[0][:, -1]  # one new position
    finally:
        model.clear_kv_cache()


class StreamDecoder:
    """Token ids in, text out, never splitting a character: a token may end in the middle of a
    multi-byte UTF-8 character (common for Chinese with a small vocabulary), so the trailing bytes of an
    incomplete character are held back until the next token completes it. The pieces concatenated
    equal tokenizer.decode(all ids)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids):
        return self.utf8.decode(self.tokenizer.decode_bytes(ids))

    def flush(self):  # an incomplete character left at the very end becomes U+FFFD, as in decode()
        return self.utf8.decode(b"", final=True)


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv):
    p = argparse.ArgumentParser(description="Generate text from a checkpoint folder written by train.py "
                                            "or a Hugging Face model folder.")
    p.add_argument("--ckpt", required=True, help="a run folder (its newest ckpt-N.pt and tokenizer.json), one ckpt-N.pt,"
                                                 " or a Hugging Face Llama/Mistral folder (config.json, weights, tokenizer)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text to continue (default: stdin when piped, else a new document)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with probability >= p")
    p.add_argument("--num-samples", type=int, default=1, help="generated together as one batch")
    p.add_argument("--seed", type=int, default=None, help="for reproducible samples")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--export-hf", metavar="DIR", help="write a Hugging Face Llama folder (weights, config, "
                                                      "tokenizer) to DIR instead of sampling")
    return p.parse_args(argv)


def read_prompt(args):
    """--prompt, else --prompt-file, else stdin when something is piped in, else "" (a new document)."""
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is None and (sys.stdin is None or sys.stdin.isatty()):
        return ""
    try:
        if args.prompt_file is None:
            return sys.stdin.read()
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SampleError(f"cannot read the prompt from {args.prompt_file or 'stdin'}: {_first_line(e)}") from None


def run(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SampleError("--device cuda was given but CUDA is not available")
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if args.export_hf:
        model, tokenizer, _ = load_checkpoint(args.ckpt, "cpu")
        try:
            hf.export(model, tokenizer, args.export_hf)
        except hf.HFError as e:
            raise SampleError(str(e)) from None
        print(f"wrote a Hugging Face Llama model to {args.export_hf}", file=sys.stderr)
        return 0
    check_sampling_params(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.num_samples)
    prompt = read_prompt(args)  # before the slow load, so that a bad prompt file fails fast
    model, tokenizer, _ = load_checkpoint(args.ckpt, device)
    eos_id = tokenizer.eos_id
    # Llama-style tokenizers begin every document with BOS, so the model expects it before the prompt
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    # special tokens in a prompt mark document boundaries; checked now so errors come before any output
    prompt_ids = check_prompt(model, bos + tokenizer.encode(prompt, allowed_special="all"), eos_id)
    generator = None if args.seed is None else torch.Generator(device).manual_seed(args.seed)

    decoder, stream = StreamDecoder(tokenizer), args.num_samples == 1

    def show(new_ids):
        if stream and new_ids[0] is not None:
            sys.stdout.write(decoder.push([new_ids[0]]))
            sys.stdout.flush()

    if stream:
        sys.stdout.write(prompt)
    t0 = time.perf_counter()
    samples = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       args.num_samples, eos_id, generator, on_token=show, vocab_size=tokenizer.vocab_size)
    seconds = time.perf_counter() - t0
    if stream:
        sys.stdout.write(decoder.flush() + "\n")
    else:
        for ids in samples:
            # After a prompt, the bytes of the new tokens, as streaming writes them: decode() would take
            # a SentencePiece-style space before the first new word for the prefix space of a text.
            text = tokenizer.decode_bytes(ids).decode("utf-8", errors="replace") if prompt else tokenizer.decode(ids)
            sys.stdout.write(prompt + text + "\n" + "-" * 40 + "\n")
    n = sum(map(len, samples))
    print(f"[{n} tokens in {seconds:.2f} s, {n / seconds:.1f} tokens/s on {device}]", file=sys.stderr)
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except SampleError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
