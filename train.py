"""Train a decoder language model, from a laptop CPU to many GPUs.

    python train.py                                   # small model on the bundled corpus, CPU minutes
    python train.py config/7b.py --dry-run [--trace]  # parameters, FLOPs and memory per GPU, no run
    torchrun --standalone --nproc_per_node=8 train.py config/7b.py
    python train.py [CONFIG] [--key=value ...] [--resume[=auto]] [--overwrite]
    python train.py --consolidate OUT_DIR             # FSDP sharded checkpoint -> OUT_DIR/ckpt-N.pt

The loop: AdamW with warmup + cosine decay, gradient accumulation up to a global batch given in
tokens, gradient clipping, bf16 autocast (on CUDA, and on CPUs with native bf16 matmuls) over fp32
master weights, optional activation checkpointing and torch.compile (per block); DDP or FSDP2 under
torchrun; evaluation in nats per token and bits per byte; a log line and a JSONL record per interval
(and TensorBoard, optionally); atomic checkpoints and exact resume.
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import signal
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from infra import atomic
from infra import checkpoint
from infra import hf
from infra import memory
from config import (BatchPlan, ConfigError, TrainConfig, flat, load_config, load_file, parse_overrides,
                    plan_batch, resume_config, with_values)
from data import TOKENIZER_FILE, DataError, TokenData, bits_per_byte, check_prepared, prepare, token_byte_lengths
from model import Transformer
from infra.runtime import RankError, Runtime, check_shared_files, compute_dtype, peak_bf16_flops, setup_runtime
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------- setup


def tensorboard_writer():
    """torch's SummaryWriter class, or a one-line error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def ensure_data(cfg: TrainConfig, rt: Runtime, resuming: bool = False) -> Tokenizer:
    """Prepare the corpus on first use (rank 0, while the others wait on the host group), or check that the
    prepared folder was made with the run's settings; return its tokenizer. A resumed run does not read
    its tokenizer file again (it may be gone, with the init_from folder it came from): the checkpoint's
    tokenizer fingerprint is checked against the folder's instead (Trainer._check_resumable)."""
    failure = None
    if rt.is_main:
        settings = dict(vocab_size=cfg.model.vocab_size, tokenizer_path=None if resuming else cfg.tokenizer or None,
                        val_fraction=cfg.val_fraction, val_max_bytes=cfg.val_max_bytes,
                        tokenizer_max_bytes=cfg.tokenizer_max_bytes, text_field=cfg.text_field)
        try:
            if (Path(cfg.data_dir) / "meta.json").exists():
                # The bundled corpus is only a default: a data_dir prepared from other text is used as it is.
                check_prepared(cfg.data_dir, None if cfg.inputs == TrainConfig().inputs else cfg.inputs, **settings)
            else:  # prepares, or resumes an unfinished prepare
                prepare(cfg.inputs, cfg.data_dir, **settings, tokenizer_memory_budget=cfg.tokenizer_memory_budget)
        except (DataError, ValueError) as error:
            failure = error
    failure = rt.broadcast(None if failure is None else str(failure))
    if failure is not None:
        raise DataError(failure)
    check_shared_files(rt, Path(cfg.data_dir) / "meta.json", "prepared data")
    tokenizer = Tokenizer.load(Path(cfg.data_dir) / TOKENIZER_FILE)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens; set --model.vocab_size={tokenizer.vocab_size}")
    return tokenizer


def build_model(cfg: TrainConfig, rt: Runtime, dtype: torch.dtype, sharded: bool, resume: bool = False) -> Transformer:
    """The model on its device, sharded with FSDP2 when `sharded` (DDP wraps it later, in Trainer).

    Every rank initialises the full fp32 model from the same seed before sharding, so the starting
    weights are the same whatever the number of ranks or the parallel mode. With init_from (unless
    resuming, when the checkpoint brings the weights) nothing is initialised: the model is sharded
    while still on the meta device, then each rank allocates and reads only its own shards.
    """
    pretrained = bool(cfg.init_from) and not resume
    with torch.device("meta"):
        model = Transformer(cfg.model)
    if not pretrained:
        model.to_empty(device=rt.device)
        torch.manual_seed(cfg.seed)
        with torch.no_grad():
            model.init_weights()
    model.activation_checkpointing = cfg.activation_checkpointing
    if sharded:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = rt.mesh
        # Blocks receive the hidden state (already bf16) and the fp32 RoPE tables: casting the inputs
        # would rotate in bf16 under FSDP but in fp32 under DDP's autocast.
        block_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in model.layers:  # one all-gather per block, overlapped with the previous block's compute
            fully_shard(block, mesh=mesh, mp_policy=block_policy)
        fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
    if pretrained:
        model.to_empty(device=rt.device)
        hf.load_weights(model, cfg.init_from, verbose=rt.is_main)
    return model


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices of linear layers, not on norms, biases or embeddings."""
    decay, no_decay = [], []
    embeddings = {id(model.tok_embeddings.weight)}
    for param in model.parameters():
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             fused=device.type == "cuda")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr_ratio * lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


# ----------------------------------------------------------------------------- the run

class Trainer:
    """One training run: model, optimizer, data and the loop, with checkpoints and logs."""

    def __init__(self, cfg: TrainConfig, plan: BatchPlan, rt: Runtime, resume_from: Path | None = None,
                 changes: dict | None = None, overwrite: bool = False):
        self.cfg, self.plan, self.rt = cfg, plan, rt
        # TensorBoard's SummaryWriter class (checked before any work), opened once the first step is known
        self.summary_writer = tensorboard_writer() if cfg.tensorboard and rt.is_main else None
        self.tensorboard = None
        self.sharded = cfg.parallel == "fsdp" and rt.distributed
        self.dtype, self.dtype_reason = compute_dtype(cfg, rt.device)
        self.out_dir = Path(cfg.out_dir)
        self.start_time = time.time()
        if rt.is_main:
            self._prepare_out_dir(overwrite)
        check_shared_files(rt, self.out_dir / ".run", "run folder")
        if cfg.init_from and resume_from is None:  # checked before data preparation, which can take hours
            hf.check_weights(cfg.init_from, cfg.model)
        self.tokenizer = ensure_data(cfg, rt, resuming=resume_from is not None)
        self.train_data, self.val_data = TokenData(cfg.data_dir, "train"), TokenData(cfg.data_dir, "val")
        for split in (self.train_data, self.val_data):
            split.check_length(cfg.model.max_seq_len)
        memory.check_memory_fits(cfg, rt)
        self.model = build_model(cfg, rt, self.dtype, self.sharded, resume=resume_from is not None)
        self.optimizer = make_optimizer(cfg, self.model, rt.device)
        self.token_bytes = token_byte_lengths(self.tokenizer, cfg.model.vocab_size).to(rt.device)
        self.step, self.bad_steps, self.elapsed_before = 0, 0, 0.0
        self.stop_signal = None  # set by the signal handler; acted on once every rank agrees
        if resume_from is not None:
            self._resume(resume_from, changes or {})
        else:
            torch.manual_seed(cfg.seed + rt.rank)  # dropout differs per rank, as its data does
            self._open_tensorboard(purge_step=0)
        self._wrap_model()

    def _wrap_model(self):
        """DDP around the model when the ranks replicate it (FSDP shards it in build_model), then
        torch.compile if asked; self.forward is what the steps call."""
        rt = self.rt
        self.ddp = None
        if rt.world_size > 1 and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel
            # RoPE buffers are derived from the config, never changed: broadcasting them every forward
            # is wasted traffic. Gradients as views of DDP's buckets save 4 bytes per parameter.
            self.ddp = DistributedDataParallel(self.model, device_ids=[rt.device] if rt.device.type == "cuda" else None,
                                               forward_sync_buffers=False, gradient_as_bucket_view=True)
        if self.cfg.compile:
            # Regional compilation: each block on its own. The blocks share their code, so one graph serves
            # them all and compile time does not grow with depth. In place: parameter names are unchanged.
            for block in self.model.layers:
                block.compile()
        self.forward = self.ddp or self.model

    def _prepare_out_dir(self, overwrite: bool):
        """Clear what an interrupted save left, and with --overwrite delete the previous run's checkpoints
        and log (the user asked to start over). Runs under the out_dir lock (see `train`)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial(self.out_dir)
        if overwrite:
            for sharded in (False, True):
                for old in checkpoint.list_checkpoints(self.out_dir, sharded):
                    checkpoint.delete(old)
            (self.out_dir / "log.jsonl").unlink(missing_ok=True)
            shutil.rmtree(self.out_dir / "tensorboard", ignore_errors=True)
        (self.out_dir / ".run").write_text(f"{os.getpid()} {time.time()}")

    # -- checkpoints

    def _train_state(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.rt.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.rt.device)
        states = [rng]
        if self.rt.distributed:
            states = [None] * self.rt.world_size
            dist.all_gather_object(states, rng, group=self.rt.host_group)
        # "step" is also the data loader's whole state: a batch is a pure function of (seed, step).
        # The config saved is the effective one (global batch as rounded), which resume continues.
        config = dataclasses.asdict(dataclasses.replace(self.cfg, global_batch_tokens=self.plan.global_batch_tokens))
        return {"step": self.step, "config": config, "rng": states, "elapsed_s": self._elapsed(),
                "tokenizer_fingerprint": self.train_data.meta["tokenizer_fingerprint"],
                "train_tokens": self.train_data.num_tokens}

    def save_checkpoint(self):
        start = time.time()
        path = checkpoint.save(self.out_dir, self.step, self.model, self.optimizer, self._train_state(),
                               self.sharded, self.cfg.keep_checkpoints, self.rt.host_group)
        if self.rt.is_main:
            self.tokenizer.save(self.out_dir / TOKENIZER_FILE)  # sample.py needs only this folder
            self.log({"event": "checkpoint", "step": self.step, "path": path.name, "seconds": round(time.time() - start, 2)},
                     f"step {self.step}: checkpoint saved to {path} ({time.time() - start:.1f}s)")

    def _resume(self, path: Path, changes: dict):
        state = checkpoint.load(path, self.model, self.optimizer, self._check_resumable)
        self.step, self.elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        self._open_tensorboard(purge_step=self.step + 1)  # the steps after the checkpoint are replayed
        rng = state["rng"][self.rt.rank] if self.rt.rank < len(state["rng"]) else None
        if rng is None:  # more ranks than the run that saved: a fresh stream for the new ones
            torch.manual_seed(self.cfg.seed + self.rt.rank + self.step)
        else:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.rt.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.rt.device)
        if self.rt.is_main:
            self._truncate_log()
        self.log({"event": "resume", "step": self.step, "path": path.name},
                 f"resumed from {path} at step {self.step}")
        for key, (old, new) in changes.items():
            self.log({"event": "config_change", "step": self.step, "key": key, "old": old, "new": new},
                     f"{key} changed from {old!r} to {new!r} at step {self.step}")

    def _truncate_log(self):
        """Drop the records of steps after the checkpoint (they are replayed now, and would appear twice),
        and a last line cut short by a kill."""
        log = self.out_dir / "log.jsonl"
        if log.exists():
            kept = [line for line in log.read_text().splitlines() if _step_of_record(line) <= self.step]
            atomic.write_text(log, "".join(line + "\n" for line in kept))

    def _check_resumable(self, state: dict):
        if state.get("tokenizer_fingerprint") != self.train_data.meta["tokenizer_fingerprint"] or \
                state.get("train_tokens", self.train_data.num_tokens) != self.train_data.num_tokens:
            raise checkpoint.CheckpointError(f"the checkpoint in {self.out_dir} was trained on other data than "
                                             f"{self.cfg.data_dir} holds (another tokenizer or corpus)")

    # -- logging

    def log(self, record: dict, line: str):
        if not self.rt.is_main:
            return
        print(line, flush=True)
        now = time.time()
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"time": round(now, 3), **record}) + "\n")
        if self.tensorboard is not None:
            self._log_tensorboard(record, line, now)

    def _open_tensorboard(self, purge_step: int):
        """Events at purge_step or later already in out_dir/tensorboard (from a run that stopped after its
        last checkpoint) are hidden: the steps they describe are run again."""
        if self.summary_writer is not None:
            self.tensorboard = self.summary_writer(self.out_dir / "tensorboard", purge_step=purge_step, flush_secs=10)

    def _log_tensorboard(self, record: dict, line: str, now: float):
        """The record's numbers as scalars named "train/loss", "eval/val_bpb", "checkpoint/seconds", ...;
        the config and the lines of other events (resume, signal, ...) as text."""
        event, step = record.get("event", "train"), record["step"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.tensorboard.add_scalar(f"{event}/{key}", value, step, walltime=now)
        if event == "start":
            config = json.dumps(record["config"], indent=2)  # indented: shown as code, not as markdown
            self.tensorboard.add_text("config", "    " + config.replace("\n", "\n    "), step)
        if event not in ("train", "eval", "checkpoint"):
            self.tensorboard.add_text("events", line, step, walltime=now)

    def _elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start_time

    # -- training and evaluation

    def autocast(self):
        if self.dtype == torch.float32 or self.sharded:  # FSDP's policy already computes in bf16
            return nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.dtype)

    def stop_agreed(self) -> bool:
        """True once any rank has been signalled. Checked before every micro-step and eval batch, so a
        SIGTERM is acted on within one forward/backward, well inside torchrun's grace period; the vote
        goes over the gloo host group, so it never waits for the GPU."""
        if not self.rt.distributed:
            return self.stop_signal is not None
        vote = torch.tensor([self.stop_signal is not None], dtype=torch.int32)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.rt.host_group)
        return bool(vote.item())

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean val loss in nats per token and bits per byte over up to eval_tokens tokens (None if stopped)."""
        self.model.eval()
        seq = self.cfg.model.max_seq_len
        starts = self.val_data.eval_starts(seq, self.cfg.eval_tokens)
        # Every rank runs as many forwards as the others (FSDP's are collective): the tail is dropped,
        # and with fewer windows than ranks all ranks evaluate the first (the ratios are unchanged).
        per_rank = len(starts) // self.rt.world_size
        mine = starts[self.rt.rank * per_rank:(self.rt.rank + 1) * per_rank] if per_rank else starts[:1]
        # Sums stay on the device until the end: one host sync per evaluation, not two per batch.
        sums, tokens = torch.zeros(2, dtype=torch.float64, device=self.rt.device), 0  # nats, text bytes
        for i in range(0, len(mine), self.plan.micro_batch_size):
            if self.stop_agreed():
                self.model.train()
                return None
            x, y = self.val_data.batch(mine[i: i + self.plan.micro_batch_size], seq, self.rt.device)
            with self.autocast():
                _, loss = self.forward(x, y)
            sums += torch.stack([loss.double() * y.numel(), self.token_bytes[y].sum()])
            tokens += y.numel()
        totals = torch.cat([sums, sums.new_tensor([tokens])])
        if self.rt.distributed:
            dist.all_reduce(totals)
        nats, text_bytes, tokens = totals.tolist()
        self.model.train()
        return {"val_loss": nats / tokens, "val_bpb": bits_per_byte(nats, text_bytes)}

    def train_step(self) -> tuple[float, float] | str:
        """One optimizer step over the global batch: (loss, grad norm), or "nonfinite" when the update was
        skipped, or "stopped" when a signal came before its last micro-step (nothing is applied)."""
        cfg, rt, plan, seq = self.cfg, self.rt, self.plan, self.cfg.model.max_seq_len
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, self.step)
        starts = self.train_data.train_starts(cfg.seed, self.step, plan.micro_batch_size * plan.accum_steps * rt.world_size, seq)
        mine = starts.reshape(rt.world_size, plan.accum_steps, plan.micro_batch_size)[rt.rank]
        loss_sum = torch.zeros((), device=rt.device)
        # Under FSDP every micro-step reduce-scatters its gradients: skipping that (set_requires_gradient_sync)
        # would hold an unsharded fp32 gradient of the whole model on every GPU (25 GiB for 7B).
        for micro_step, micro_starts in enumerate(mine):
            if self.stop_agreed():
                self.optimizer.zero_grad(set_to_none=True)
                return "stopped"
            x, y = self.train_data.batch(micro_starts, seq, rt.device)
            last = micro_step == plan.accum_steps - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
                with self.autocast():
                    _, loss = self.forward(x, y)
                (loss / plan.accum_steps).backward()
            loss_sum += loss.detach()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        stats = torch.stack([loss_sum / plan.accum_steps, grad_norm.to(loss_sum.dtype)])
        if rt.distributed:  # one collective per step: the mean loss (the norm is already global)
            dist.all_reduce(stats)
        loss_sum, grad_norm = stats.tolist()
        loss_mean = loss_sum / rt.world_size
        grad_norm /= rt.world_size
        if not (math.isfinite(loss_mean) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return "nonfinite"
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_mean, grad_norm

    def _handle_signal(self, signum, frame):
        self.stop_signal = signum

    def run(self) -> bool:
        """Train to max_steps; False when non-finite losses stopped the run."""
        handlers = {signum: signal.signal(signum, self._handle_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._loop()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _loop(self) -> bool:
        cfg, rt, plan = self.cfg, self.rt, self.plan
        flops_per_token = self.model.flops_per_token()
        peak = peak_bf16_flops(torch.cuda.get_device_name(rt.device)) \
            if rt.device.type == "cuda" and self.dtype == torch.bfloat16 else None
        self.log({"event": "start", "step": self.step, "params": self.model.num_params(), "world_size": rt.world_size,
                  "grad_accum": plan.accum_steps, "micro_batch_size": plan.micro_batch_size,
                  "global_batch_tokens": plan.global_batch_tokens, "dtype": str(self.dtype).removeprefix("torch."),
                  "config": dataclasses.asdict(cfg)},
                 f"{self.model.num_params():,} parameters, {rt.world_size} rank(s) on {rt.device.type}, "
                 f"{self.dtype_reason}, {plan.accum_steps} micro-step(s) of {plan.micro_batch_size}x{cfg.model.max_seq_len} per step, "
                 f"{plan.global_batch_tokens:,} tokens per step, {cfg.max_steps} steps"
                 + (f" ({plan.note})" if plan.note else ""))
        if rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(rt.device)  # the logged peak is training's, not initialisation's
        self.start_time = last_time = time.time()
        start_step, last_step = self.step, self.step
        if self.step == 0 and not self._log_eval():  # the untrained model's loss, as a baseline
            return self._stop()
        while self.step < cfg.max_steps:
            result = self.train_step()
            if result == "stopped":
                return self._stop()
            self.step += 1  # also after a skipped update: the same batch again would fail the same way
            if result == "nonfinite":
                self.bad_steps += 1
                self.log({"event": "nonfinite", "step": self.step},
                         f"step {self.step}: loss or gradient is not finite, update skipped")
                if self.bad_steps >= cfg.max_bad_steps:
                    last_good = checkpoint.latest(self.out_dir, self.sharded)
                    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
                    self.log({"event": "abort", "step": self.step},
                             f"{self.bad_steps} non-finite steps in a row: stopping; {where}")
                    return False
                continue
            self.bad_steps = 0
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                now = time.time()
                loss, grad_norm = result
                tokens_per_s = plan.global_batch_tokens * (self.step - last_step) / (now - last_time)
                record = {"step": self.step, "loss": round(loss, 4), "lr": learning_rate(cfg, self.step - 1),
                          "grad_norm": round(grad_norm, 4), "tokens_per_s": round(tokens_per_s),
                          "flops_per_s": flops_per_token * tokens_per_s, "elapsed_s": round(self._elapsed(), 1),
                          "eta_s": round((now - self.start_time) / (self.step - start_step) * (cfg.max_steps - self.step)),
                          "epoch": round(self.train_data.epoch(self.step, plan.global_batch_tokens // cfg.model.max_seq_len,
                                                               cfg.model.max_seq_len), 3)}
                line = (f"step {self.step}/{cfg.max_steps} | loss {loss:.4f} | lr {record['lr']:.2e} | "
                        f"grad {grad_norm:.2f} | {tokens_per_s:,.0f} tok/s | "
                        f"{record['flops_per_s'] / 1e9:.1f} GFLOP/s")
                if peak:
                    record["mfu"], record["mfu_peak_flops"] = record["flops_per_s"] / (peak * rt.world_size), peak
                    line += f" | MFU {100 * record['mfu']:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16"
                if rt.device.type == "cuda":
                    record["peak_mem_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
                    record["peak_reserved_gib"] = torch.cuda.max_memory_reserved(rt.device) / 2**30
                    line += f" | mem {record['peak_mem_gib']:.1f} GiB ({record['peak_reserved_gib']:.1f} reserved)"
                self.log(record, line + f" | epoch {record['epoch']:.2f} | ETA {record['eta_s'] // 60:.0f}m{record['eta_s'] % 60:02.0f}s")
                last_time, last_step = now, self.step
            # Evaluate before saving: every record of a step then precedes its checkpoint, and a resumed
            # run continues the log exactly where the checkpoint left it.
            if (self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps) and not self._log_eval():
                return self._stop()
            if self.step % cfg.ckpt_interval == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
        return True

    def _stop(self) -> bool:
        """A signal arrived: save the last completed step and leave."""
        self.save_checkpoint()
        self.log({"event": "signal", "step": self.step}, f"stopped by signal at step {self.step}; resume with --resume")
        return True

    def _log_eval(self) -> bool:
        result = self.evaluate()
        if result is None:
            return False
        elapsed = self._elapsed()
        self.log({"event": "eval", "step": self.step, "elapsed_s": round(elapsed, 1), **result},
                 f"step {self.step}: val loss {result['val_loss']:.4f} nats/token, "
                 f"{result['val_bpb']:.4f} bits/byte ({elapsed:.0f}s)")
        return True

    def print_sample(self):
        """A short sample from the trained model (single-process runs: FSDP shards need consolidating)."""
        if self.cfg.sample_tokens <= 0 or not self.rt.is_main or self.sharded:
            return
        from sample import generate
        self.model.eval()
        prompt = self.tokenizer.encode_ordinary("\n")
        generator = torch.Generator(device=self.rt.device).manual_seed(self.cfg.seed)
        with self.autocast():
            ids = generate(self.model, prompt, self.cfg.sample_tokens, temperature=0.8, top_k=200, top_p=1.0,
                           num_samples=1, eos_id=self.tokenizer.eos_id, generator=generator,
                           vocab_size=self.tokenizer.vocab_size)[0]
        print("--- sample ---\n" + self.tokenizer.decode(ids) + "\n--------------", flush=True)


def _step_of_record(line: str) -> float:
    """The step of a log.jsonl line; infinity for a line that is not a whole JSON record."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s [CONFIG] [--key=value ...]")
    parser.add_argument("config", nargs="?", help="a config file such as config/7b.py (default: the small run)")
    parser.add_argument("--resume", nargs="?", const="yes", choices=["yes", "auto"],
                        help="continue from the newest checkpoint in out_dir; =auto also starts fresh when there is none")
    parser.add_argument("--overwrite", action="store_true", help="start over, deleting out_dir's checkpoints and log")
    parser.add_argument("--dry-run", action="store_true", help="print parameters, FLOPs and memory, then exit")
    parser.add_argument("--trace", action="store_true",
                        help="with --dry-run: also run one training step on fake tensors and print its traced memory")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                        help="ranks assumed by --dry-run")
    parser.add_argument("--consolidate", metavar="OUT_DIR", help="gather an FSDP checkpoint into OUT_DIR/ckpt-N.pt")
    return parser.parse_known_args(argv)


def start_config(args, overrides: list[str]) -> tuple[TrainConfig, Path | None, dict]:
    """The run's config, the checkpoint to resume from (None: a fresh start) and the config changes
    made on resume. Resuming takes the config saved in the checkpoint: only keys that cannot alter the
    run so far (lr, max_steps, intervals, ...) may be changed, explicitly, with --key=value."""
    values = parse_overrides(overrides)
    file_config = load_file(args.config)
    # Where the run lives and how it is sharded: enough to look for its checkpoint (the model may come later,
    # from init_from, which a resumed run must not need).
    run = with_values(file_config, {k: v for k, v in values.items() if not k.startswith("model.")})
    found = checkpoint.latest(run.out_dir, run.parallel == "fsdp")
    if args.resume == "yes" and found is None:
        raise ConfigError(f"no checkpoint in {run.out_dir} to resume; start without --resume (or use --resume=auto)")
    if found is None or not args.resume:
        if found is not None and not args.overwrite:
            raise ConfigError(f"{run.out_dir} already holds a checkpoint ({found.name}); continue it with --resume, "
                              "start over with --overwrite (deletes its checkpoints), or choose another --out_dir")
        return load_config(args.config, overrides), None, {}
    saved = checkpoint.read_train_state(found)["config"]
    cfg, changes = resume_config(saved, values, out_dir=run.out_dir)
    ignored = [k for k, v in flat(file_config).items() if k not in values and v != flat(cfg)[k] and k != "out_dir"]
    if ignored and args.config and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: {args.config} differs from the checkpoint in {', '.join(ignored)}; the checkpoint's values are"
              " used (change one with --key=value)", file=sys.stderr)
    return cfg, found, changes


def train(cfg: TrainConfig, plan: BatchPlan, rt: Runtime, resume_from: Path | None, changes: dict,
          overwrite: bool) -> int:
    """Run the training; 0 when it finished or stopped by a signal, 1 when non-finite losses stopped it."""
    with checkpoint.lock(cfg.out_dir) if rt.is_main else nullcontext():
        trainer = Trainer(cfg, plan, rt, resume_from, changes, overwrite)
        finished = trainer.run()
        if finished and trainer.step >= cfg.max_steps:
            trainer.print_sample()
    return 0 if finished else 1


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        if args.consolidate:
            print(f"wrote {checkpoint.consolidate(args.consolidate)}")
            return 0
        if args.trace and not args.dry_run:
            raise ConfigError("--trace goes with --dry-run (python train.py CONFIG --dry-run --trace)")
        if args.dry_run:
            memory.dry_run(load_config(args.config, overrides), args.world_size, args.trace)
            return 0
        cfg, resume_from, changes = start_config(args, overrides)
        plan = plan_batch(cfg, world_size)
        if resume_from is not None and plan.global_batch_tokens != cfg.global_batch_tokens:
            raise ConfigError(f"the run's global batch of {cfg.global_batch_tokens:,} tokens cannot be split over "
                              f"{world_size} rank(s) ({plan.note}); resume on a world size that divides its "
                              f"{cfg.global_batch_tokens // cfg.model.max_seq_len} sequences")
        return train(cfg, plan, setup_runtime(cfg), resume_from, changes, args.overwrite)
    except (ConfigError, DataError, checkpoint.CheckpointError, ValueError) as error:
        # The ranks share one config and one set of files, so rank 0 alone reports what they all found.
        if rank == 0 or isinstance(error, RankError):
            print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            # DDP's reducer must go before its process group: freed after it, at interpreter exit, it
            # can abort the process ("terminate called without an active exception").
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
