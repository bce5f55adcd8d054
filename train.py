"""Train a decoder language model, from a laptop CPU to many GPUs.

    python train.py                                   # small model, bundled corpus, CPU minutes
    python train.py config/7b.py --dry-run [--trace]  # parameters, FLOPs, memory per GPU; no run
    torchrun --standalone --nproc_per_node=8 train.py config/7b.py
    python train.py [CONFIG] [--key=value ...] [--resume[=auto]] [--overwrite]
    python train.py --consolidate OUT_DIR             # FSDP checkpoint -> OUT_DIR/ckpt-N.pt

This file is the recipe (schedules, optimizer, model, one optimizer step, evaluation) and the
loop; the run folder, ranks, logs and checkpoints are infra/'s.
"""

import argparse
import dataclasses
import gc
import math
import os
import sys
import time
from contextlib import closing, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from config import ConfigError, TrainConfig, plan_batch
from data import TokenData, bits_per_byte, token_byte_lengths
from infra import checkpoint, distributed, hf, memory, muon, run
from infra.files import error_line
from infra.logs import Logger, Meter
from model import IGNORE_INDEX, Transformer
from tokenizer import UserError

# ----------------------------------------------------------------------------- the recipe

def cosine(cfg: TrainConfig, step: int) -> float:
    """Cosine decay from 1 to min_lr_ratio between warmup_steps and max_steps."""
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def wsd(cfg: TrainConfig, step: int) -> float:
    """Warmup-stable-decay: 1 until the last cooldown_fraction of the steps, then a linear decay
    to min_lr_ratio at max_steps."""
    cooldown = max(1, round(cfg.cooldown_fraction * cfg.max_steps))
    progress = max(0, step - (cfg.max_steps - cooldown)) / cooldown
    return 1 - (1 - cfg.min_lr_ratio) * progress


SCHEDULES = {"cosine": cosine, "wsd": wsd}  # name -> (cfg, step) -> multiplier of lr after warmup


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to lr over warmup_steps, then the schedule's multiple of lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * SCHEDULES[cfg.schedule](cfg, min(step, cfg.max_steps))


def adamw(cfg: TrainConfig, model: torch.nn.Module, device: torch.device):
    """AdamW; weight decay only on matrices of linear layers, not on norms or embeddings."""
    decay, no_decay = [], []
    embeddings = {id(model.tok_embeddings.weight)}
    for param in model.parameters():
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay, lr_scale=1.0),
              dict(params=no_decay, weight_decay=0.0, lr_scale=1.0)]
    betas, fused = (cfg.beta1, cfg.beta2), device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, fused=fused)


# name -> (cfg, model, device) -> optimizer; each param group has an lr_scale (lr x lr_scale)
OPTIMIZERS = {"adamw": adamw, "muon": muon.muon_adamw}


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device):
    return OPTIMIZERS[cfg.optimizer](cfg, model, device)


def build_model(cfg: TrainConfig, rt, dtype: torch.dtype, sharded: bool, pretrained: bool):
    """The model on its device, sharded with FSDP2 when `sharded`. Every rank initialises the full
    fp32 model from the same seed before sharding, so the starting weights are the same whatever
    the number of ranks. A pretrained model is sharded while still on the meta device, then each
    rank allocates and reads only its own shards."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    if not pretrained:
        model.to_empty(device=rt.device)
        torch.manual_seed(cfg.seed)
        with torch.no_grad():
            model.init_weights()
    model.activation_checkpointing = cfg.activation_checkpointing
    if sharded:
        distributed.shard_model(model, rt, dtype)
    if pretrained:
        model.to_empty(device=rt.device)
        try:
            hf.load_weights(model, cfg.init_from, rt.is_main, new_rows=cfg.chat)  # chat: its tokens
        except UserError as error:  # each rank reads its own shards: each reports its failure
            if rt.is_main:
                raise
            raise distributed.RankError(f"rank {rt.rank}: {error}") from None
    return model


def train_step(model, optimizer, micro_batches, grad_clip: float, autocast, stop=lambda: False):
    """One optimizer step over the global batch: forward and backward over each micro-batch
    (x, y), the mean loss, the gradient clipped to grad_clip (0: not clipped), the update.
    Returns (loss, grad norm), averaged over the ranks; the update is skipped when either is not
    finite. Returns None, applying nothing, when `stop()` turns true before the last micro-step."""
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    # Under FSDP every micro-step reduce-scatters its gradients (holding them unsharded instead
    # would take 25 GiB per GPU at 7B); DDP all-reduces only after the last.
    for i in range(len(micro_batches)):
        if stop():
            optimizer.zero_grad(set_to_none=True)
            return None
        x, y = micro_batches[i]
        last = i == len(micro_batches) - 1
        with model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext():
            with autocast():
                _, loss = model(x, y)
            (loss / len(micro_batches)).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    stats = torch.stack([loss_sum / len(micro_batches), grad_norm.to(loss_sum.dtype)])
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size > 1:  # one collective per step: the mean loss (the norm is already global)
        dist.all_reduce(stats)
    loss, grad_norm = (value / world_size for value in stats.tolist())
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


@torch.no_grad()
def evaluate(model, val_data: TokenData, cfg, batch_size, token_bytes, rt, autocast,
             stop=lambda: False):
    """Mean val loss in nats per token and bits per byte over up to eval_tokens tokens, split over
    the ranks (None if `stop()` turned true). Every rank runs as many forwards as the others
    (FSDP's are collective): the tail is dropped, and with fewer windows than ranks all evaluate
    the first."""
    model.eval()
    seq = cfg.model.max_seq_len
    starts = val_data.eval_starts(seq, cfg.eval_tokens)
    per_rank = len(starts) // rt.world_size
    mine = starts[rt.rank * per_rank : (rt.rank + 1) * per_rank] if per_rank else starts[:1]
    # Sums stay on the device until the end: one host sync per evaluation.
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # nats, text bytes, tokens
    for i in range(0, len(mine), batch_size):
        if stop():
            model.train()
            return None
        x, y = val_data.batch(mine[i : i + batch_size], seq, rt.device)
        with autocast():
            _, loss = model(x, y)
        counted = y != IGNORE_INDEX  # the loss mask: chat data trains on the replies only
        n = counted.sum().double()
        sums += torch.stack([loss.double() * n, (token_bytes[y * counted] * counted).sum(), n])
    if rt.distributed:
        dist.all_reduce(sums)
    nats, text_bytes, tokens = sums.tolist()
    model.train()
    return {"val_loss": nats / tokens, "val_bpb": bits_per_byte(nats, text_bytes)}


# ----------------------------------------------------------------------------- the run

def train(cfg: TrainConfig, plan, rt, resume_from: Path | None, changes: dict, overwrite: bool):
    """Run the training: 0 when it finished or a signal stopped it, 1 when non-finite losses did."""
    out_dir, resuming = Path(cfg.out_dir), resume_from is not None
    sharded = cfg.parallel == "fsdp" and rt.distributed
    dtype, dtype_reason = distributed.compute_dtype(cfg, rt.device)
    logger = Logger(out_dir, cfg.loggers, rt.is_main)  # a missing logger package: before any work
    run.prepare_out_dir(cfg, rt, overwrite, resuming)

    # data: prepared on first use; a batch is a pure function of (seed, step)
    tokenizer = run.ensure_data(cfg, rt, resuming)
    train_data, val_data = run.open_splits(cfg)  # TokenData, or ChatData for conversations
    for split in (train_data, val_data):
        split.check_length(cfg.model.max_seq_len)
    token_bytes = token_byte_lengths(tokenizer, cfg.model.vocab_size).to(rt.device)

    # model and optimizer, then the checkpoint's state when resuming
    memory.check_memory_fits(cfg, rt)
    model = build_model(cfg, rt, dtype, sharded, pretrained=bool(cfg.init_from) and not resuming)
    optimizer = make_optimizer(cfg, model, rt.device)
    checkpointer = run.Checkpointer(cfg, plan, rt, sharded, train_data, tokenizer)
    step, elapsed_before = 0, 0.0
    if resuming:
        step, elapsed_before = checkpointer.resume(resume_from, model, optimizer)
    else:
        torch.manual_seed(cfg.seed + rt.rank)  # dropout differs per rank, as its data does
    logger.open(step, resume_from, changes)
    forward = distributed.replicate_model(model, rt, sharded, cfg.compile)
    autocast = distributed.autocast(rt.device, dtype, sharded)
    start_time = time.time()

    def elapsed():
        return elapsed_before + time.time() - start_time

    def save():
        saved = checkpointer.save(step, model, optimizer, elapsed())
        if saved is not None:
            path, seconds = saved
            line = f"step {step}: checkpoint saved to {path} ({seconds:.1f}s)"
            logger.event("checkpoint", step, line, path=path.name, seconds=round(seconds, 2))

    def log_eval(stop) -> dict | None:
        batch = 2 * plan.micro_batch_size  # no gradients or activations kept: twice training's
        result = evaluate(model, val_data, cfg, batch, token_bytes, rt, autocast, stop)
        if result is not None:
            loss, bpb, seconds = result["val_loss"], result["val_bpb"], elapsed()
            line = f"step {step}: val loss {loss:.4f} nats/token, {bpb:.4f} bits/byte "
            logger.event("eval", step, line + f"({seconds:.0f}s)", elapsed_s=round(seconds, 1),
                         **result)
        return result

    # the loop: schedule, step, log, eval, checkpoint
    logger.start(step, cfg, plan, model.num_params(), rt, dtype, dtype_reason)
    meter = Meter(rt, dtype, model.flops_per_token(), plan.global_batch_tokens)
    seq, bad_steps = cfg.model.max_seq_len, 0
    sequences = plan.global_batch_tokens // seq
    with distributed.StopVote(rt) as vote, closing(logger):
        # the untrained model's loss as a baseline, or the evaluation a stop cut short
        if (step == 0 or checkpointer.eval_pending) and (result := log_eval(vote.agreed)) is None:
            return stopped(save, logger, step)
        if step > 0 and checkpointer.eval_pending and checkpointer.is_best(step, result["val_bpb"]):
            save()  # writes best.json: this step's checkpoint is there already
        checkpointer.eval_pending = False
        meter.start(step)
        while step < cfg.max_steps:
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            starts = train_data.train_starts(cfg.seed, step, sequences, seq)
            mine = starts.reshape(rt.world_size, plan.accum_steps, plan.micro_batch_size)[rt.rank]
            batches = [train_data.batch(micro, seq, rt.device) for micro in mine]
            result = train_step(forward, optimizer, batches, cfg.grad_clip, autocast, vote.agreed)
            if result is None:
                return stopped(save, logger, step)
            step += 1  # also after a skipped update: the same batch again would fail the same way
            loss, grad_norm = result
            bad_steps = 0 if math.isfinite(loss) and math.isfinite(grad_norm) else bad_steps + 1
            if bad_steps:  # the weights are still the last good step's
                line = f"step {step}: loss or gradient is not finite, update skipped"
                logger.event("nonfinite", step, line)
                if bad_steps >= cfg.max_bad_steps:
                    good = run.newest_checkpoint(out_dir)
                    where = good and f"the last good checkpoint is {good}"
                    line = f"{bad_steps} non-finite steps in a row: stopping; "
                    logger.event("abort", step, line + (where or "no checkpoint was saved yet"))
                    return 1
            elif step % cfg.log_interval == 0 or step == cfg.max_steps:
                epoch = train_data.epoch(step, sequences, seq)
                record, line = meter.report(step, cfg.max_steps, loss, lr, grad_norm, epoch)
                logger.log({**record, "elapsed_s": round(elapsed(), 1)}, line)
            # Evaluate before saving: every record of a step then precedes its checkpoint, and a
            # resumed run continues the log exactly where the checkpoint left it.
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                with meter.paused():
                    checkpointer.eval_pending = True  # until it is done: a stop saves that
                    result = log_eval(vote.agreed)
                    if result is None:
                        return stopped(save, logger, step)
                    checkpointer.eval_pending = False
                    if checkpointer.is_best(step, result["val_bpb"]):
                        save()  # kept as the best whatever keep_checkpoints says
            if checkpointer.due(step):
                with meter.paused():
                    save()
    if rt.is_main and not sharded and cfg.sample_tokens > 0:
        print_sample(model, tokenizer, cfg, rt, autocast)
    return 0


def stopped(save, logger, step: int) -> int:
    """A signal arrived: save the last completed step and leave."""
    save()
    logger.event("signal", step, f"stopped by signal at step {step}; resume with --resume")
    return 0


def print_sample(model, tokenizer, cfg: TrainConfig, rt, autocast):
    """A short sample from the trained model (FSDP's shards need consolidating first)."""
    from sample import generate
    model.eval()
    prompt = tokenizer.encode_ordinary("\n")
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    with autocast():
        ids = generate(model, prompt, cfg.sample_tokens, 0.8, top_k=200, eos_id=tokenizer.eos_id,
                       generator=generator, vocab_size=tokenizer.vocab_size)[0]
    print("--- sample ---\n" + tokenizer.decode(ids) + "\n--------------", flush=True)


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("config", nargs="?", help="a config file such as config/7b.py (default: the small run)")
    resume = "continue from out_dir's newest checkpoint; =auto: or start fresh when there is none"
    add("--resume", nargs="?", const="yes", choices=["yes", "auto"], help=resume)
    add("--overwrite", action="store_true", help="start over: delete out_dir's checkpoints, log")
    add("--dry-run", action="store_true", help="print parameters, FLOPs and memory, then exit")
    add("--trace", action="store_true", help="with --dry-run: trace a step on fake tensors too")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    add("--world-size", type=int, default=world_size, help="ranks assumed by --dry-run")
    add("--consolidate", metavar="DIR", help="gather an FSDP checkpoint (a run's newest, or one "
        "ckpt-N/) into ckpt-N.pt")
    return parser.parse_known_args(argv)


RECIPE = memory.Recipe(build_model, make_optimizer, distributed.replicate_model, train_step)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        if args.consolidate:
            print(f"wrote {checkpoint.consolidate(args.consolidate)}")
            return 0
        if args.trace and not args.dry_run:
            raise ConfigError("--trace goes with --dry-run (train.py CONFIG --dry-run --trace)")
        if args.dry_run:
            cfg = run.run_config(args.config, overrides)
            memory.dry_run(cfg, args.world_size, RECIPE if args.trace else None)
            return 0
        cfg, resume_from, changes = run.start_config(args.config, overrides, args.resume,
                                                     args.overwrite)
        for key, names in (("schedule", SCHEDULES), ("optimizer", OPTIMIZERS)):
            if (value := getattr(cfg, key)) not in names:
                raise ConfigError(f"{key} must be one of {', '.join(names)}, not {value!r}")
        rt = distributed.setup_runtime(cfg)
        if cfg.micro_batch_size == 0:
            size = memory.fit_micro_batch(cfg, world_size, distributed.device_memory(rt.device))
            cfg = dataclasses.replace(cfg, micro_batch_size=size)
        plan = plan_batch(cfg, world_size)
        if resume_from is not None and plan.global_batch_tokens != cfg.global_batch_tokens:
            sequences = cfg.global_batch_tokens // cfg.model.max_seq_len
            raise ConfigError(f"the run's global batch of {cfg.global_batch_tokens:,} tokens "
                              f"cannot be split over {world_size} rank(s) ({plan.note}); resume "
                              f"on a world size that divides its {sequences} sequences")
        with checkpoint.lock(cfg.out_dir) if rt.is_main else nullcontext():
            return train(cfg, plan, rt, resume_from, changes, args.overwrite)
    except (UserError, OSError) as error:
        # The ranks share one config and one set of files: rank 0 alone reports what they found.
        if rank == 0 or isinstance(error, distributed.RankError):
            print(f"error: {error_line(error)}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            # DDP's reducer must go before its process group: freed after it, at interpreter exit,
            # it can abort the process ("terminate called without an active exception").
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
