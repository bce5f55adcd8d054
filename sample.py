"""Generate text from a trained checkpoint or a Hugging Face model folder, or export a checkpoint
as a Hugging Face Llama model.

    python sample.py --ckpt out --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 50
    echo "To be" | python sample.py --ckpt out --num-samples 3 --seed 1
    python sample.py --ckpt path/to/TinyLlama-1.1B --prompt "The capital of France is"
    python sample.py --ckpt out --export-hf out/hf
    python sample.py --ckpt out/best --score data/tinyshakespeare.txt   # bits per byte on a text
    python sample.py --ckpt out/sft --chat [--system TEXT] [--prompt TEXT]  # talk (infra/chat.py)

Generation uses the model's KV cache: one forward pass over the prompt ("prefill"), then one
position per new token, instead of running the whole text through the model again for each token.
"""

import argparse
import codecs
import math
import sys
import time

import torch

from infra import chat, hf
from infra.files import error_line, first_line
from infra.inference import load_checkpoint
from infra.score import score_text
from tokenizer import UserError


class SampleError(UserError):
    """A problem with the user's input (files, parameters, prompt); its message is one line."""


# ----------------------------------------------------------------------------- sampling

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
    """Nucleus filtering: keep the smallest set of most likely tokens whose total probability is
    >= top_p and renormalize. A token is kept iff the tokens ranked above it sum to less than
    top_p, so the top token is always kept; among equal probabilities the sort order decides."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_above >= top_p, 0.0)
    probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of `logits` (B, V): the argmax at temperature 0 (top_k and top_p change
    nothing), else a draw from softmax(logits / temperature) after top-k, then top-p filtering."""

    if temperature == 0:
        return logits.argmax(dim=-1)
    # Shifted so the largest logit is 0, then divided in float64: a tiny temperature sends the
    # others to -inf and never turns the largest into inf or NaN, so softmax stays defined.
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
    """The prompt as a list of ids ([eos_id] if empty), or SampleError if it cannot be continued."""
    prompt_ids = list(prompt_ids) or ([eos_id] if eos_id is not None else [])
    if not prompt_ids:
        raise SampleError("the prompt is empty and no eos_id was given to start from")
    context, vocab_size = model.config.max_seq_len, model.config.vocab_size
    if len(prompt_ids) >= context:
        raise SampleError(f"prompt is {len(prompt_ids)} tokens but the model's context is "
                          f"{context} (including at least one new token); shorten it")
    if not all(0 <= t < vocab_size for t in prompt_ids):
        raise SampleError(f"prompt token ids must be in 0..{vocab_size - 1} (the model's "
                          "vocabulary)")
    return prompt_ids


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             num_samples=1, eos_id=None, generator=None, on_token=None, vocab_size=None):
    """Continue `prompt_ids` (a list of ints; empty = start a new document at `eos_id`)
    `num_samples` times, as one batch. Returns one list of new token ids per sample. A sample stops
    after `max_new_tokens`, when it emits `eos_id` (not included in its list), or when prompt + new
    tokens fill the model's context (max_seq_len). `on_token(ids)` is called after every step with
    the new token of each sample, None for samples that have stopped, so the caller can stream the
    text. `vocab_size` (the tokenizer's) keeps ids past it from being drawn: a model's table is
    often padded beyond the tokenizer, and those rows decode to nothing."""
    check_sampling_params(max_new_tokens, temperature, top_k, top_p, num_samples)
    prompt_ids = check_prompt(model, prompt_ids, eos_id)
    context, end = model.config.max_seq_len, len(prompt_ids) + max_new_tokens
    # the last new token is only returned, never fed back, so it needs no place in the cache
    weight = model.output.weight
    model.setup_kv_cache(num_samples, min(context, end - 1), weight.device, weight.dtype)
    try:
        tokens = torch.tensor(prompt_ids, device=weight.device).expand(num_samples, -1)
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
            if all(done) or pos == end or pos == context:
                return out
            logits = model(next_ids[:, None], start_pos=pos - 1)[0][:, -1]  # one new position
    finally:
        model.clear_kv_cache()


class StreamDecoder:
    """Token ids in, text out, never splitting a character: a token may end in the middle of a
    multi-byte UTF-8 character (common for Chinese with a small vocabulary), so the trailing bytes
    of an incomplete character are held back until the next token completes it. The pieces
    concatenated equal tokenizer.decode(all ids)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids):
        return self.utf8.decode(self.tokenizer.decode_bytes(ids))

    def flush(self):  # an incomplete character left at the very end becomes U+FFFD, as in decode()
        return self.utf8.decode(b"", final=True)


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--ckpt", required=True, help="a run folder (its newest ckpt-N.pt), RUN/best, one "
        "ckpt-N.pt, or a Hugging Face Llama/Mistral folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text to continue (default: piped stdin, else a new text)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    add("--max-new-tokens", type=int, default=256)
    add("--temperature", type=float, default=0.8, help="0 = greedy")
    add("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    add("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of mass p")
    add("--num-samples", type=int, default=1, help="generated together as one batch")
    add("--seed", type=int, default=None, help="for reproducible samples")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add("--export-hf", metavar="DIR", help="write a Hugging Face Llama folder (weights, config, "
        "tokenizer) to DIR, new or empty, instead of sampling")
    add("--overwrite", action="store_true", help="with --export-hf: replace an earlier export")
    add("--score", metavar="FILE", help="print the model's bits per byte on FILE (last number)")
    add("--stride", type=int, help="with --score: how far each window moves (default: context)")
    add("--chat", action="store_true", help="talk: turns from the terminal, or one --prompt")
    add("--system", help="with --chat: the system message")
    return p.parse_args(argv)


def read_text(path, what: str) -> str:
    """A UTF-8 file (or stdin for None), or one line saying why it cannot be read."""
    try:
        if path is None:
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SampleError(f"cannot read {what} from {path or 'stdin'}: {first_line(e)}") from None


def read_prompt(args):
    """--prompt, else --prompt-file, else piped stdin, else "" (a new document)."""
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is None and (sys.stdin is None or sys.stdin.isatty()):
        return ""
    return read_text(args.prompt_file, "the prompt")


def run(args):
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SampleError("--device cuda was given but CUDA is not available")
    device = args.device if args.device != "auto" else "cuda" if cuda else "cpu"
    if args.export_hf is not None:
        model, tokenizer, _ = load_checkpoint(args.ckpt, "cpu")
        hf.export(model, tokenizer, args.export_hf, overwrite=args.overwrite)
        print(f"wrote a Hugging Face Llama model to {args.export_hf}", file=sys.stderr)
        return 0
    if args.score is not None:  # infra/score.py: every token once, in windows of the context
        text = read_text(args.score, "the text to score")
        model, tokenizer, _ = load_checkpoint(args.ckpt, device)
        r = score_text(model, tokenizer, text, args.stride)
        print(f"{args.score}: {r['tokens']:,} tokens, {r['bytes']:,} bytes, {r['val_loss']:.4f} "
              f"nats/token, bits per byte {r['bpb']:.4f}")
        return 0
    check_sampling_params(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          args.num_samples)
    if args.chat:  # a conversation through the model's chat template (infra/chat.py)
        scripted = read_prompt(args) if args.prompt or args.prompt_file else None
        model, tokenizer, _ = load_checkpoint(args.ckpt, device)
        return chat.talk(model, tokenizer, args, scripted, sample_next, StreamDecoder)
    prompt = read_prompt(args)  # before the slow load, so that a bad prompt file fails fast
    model, tokenizer, _ = load_checkpoint(args.ckpt, device)
    eos_id = tokenizer.eos_id
    # Llama-style tokenizers begin every document with BOS: the model expects it before the prompt
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    # special tokens in a prompt mark document boundaries; checked now, before any output
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
    samples = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k,
                       args.top_p, args.num_samples, eos_id, generator, on_token=show,
                       vocab_size=tokenizer.vocab_size)
    seconds = time.perf_counter() - t0
    if stream:
        sys.stdout.write(decoder.flush() + "\n")
    else:
        for ids in samples:
            # After a prompt, the bytes of the new tokens, as streaming writes them: decode() would
            # take a SentencePiece-style space before the first new word for a text's prefix space.
            text = tokenizer.decode_bytes(ids).decode("utf-8", "replace") if prompt \
                else tokenizer.decode(ids)
            sys.stdout.write(prompt + text + "\n" + "-" * 40 + "\n")
    n = sum(map(len, samples))
    print(f"[{n} tokens in {seconds:.2f} s, {n / seconds:.1f} tokens/s on {device}]",
          file=sys.stderr)
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (UserError, OSError) as e:
        print(f"sample.py: error: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
