"""Train a decoder language model, from a laptop CPU to many GPUs.

    python train.py                                   # small model on the bundled corpus, CPU minutes
    python train.py config/7b.py --dry-run            # parameters, FLOPs and memory per GPU, no run
    torchrun --standalone --nproc_per_node=8 train.py config/7b.py
    python train.py [CONFIG] [--key=value ...] [--resume]
    python train.py --consolidate OUT_DIR             # FSDP sharded checkpoint -> OUT_DIR/ckpt.pt

The loop: AdamW with warmup + cosine decay, gradient accumulation up to a global batch given in
tokens, gradient clipping, bf16 autocast on CUDA over fp32 master weights, optional activation
checkpointing and torch.compile; DDP or FSDP2 under torchrun; evaluation in nats per token and
bits per byte; a log line and a JSONL record per interval; atomic checkpoints and exact resume.
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint
import hf
from config import ConfigError, TrainConfig, load_config
from data import (TOKENIZER_FILE, DataError, TokenData, bits_per_byte, prepare, read_meta,
                  token_byte_lengths)
from model import Transformer
from tokenizer import Tokenizer

# Dense bf16 peak of common accelerators, for MFU; unknown devices report achieved FLOP/s only.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


# ----------------------------------------------------------------------------- setup

@dataclasses.dataclass
class Runtime:
    """Where this process runs: its rank in the job and its device."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1 or dist.is_initialized()


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Join the torchrun job if there is one: nccl on CUDA, gloo on CPU, one device per local rank."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device} but CUDA is not available; use --device=cpu")
    if use_cuda:
        device = torch.device(cfg.device if ":" in cfg.device and world_size == 1 else f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    elif cfg.parallel == "fsdp":
        raise ConfigError("parallel=fsdp needs torchrun (e.g. torchrun --standalone --nproc_per_node=1 train.py ...)")
    return Runtime(rank, local_rank, world_size, device)


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def ensure_data(cfg: TrainConfig, rt: Runtime) -> Tokenizer:
    """Prepare the corpus on first use (rank 0), check it matches the run, and return its tokenizer."""
    meta_path = Path(cfg.data_dir) / "meta.json"
    if rt.is_main and not meta_path.exists():
        if not cfg.inputs:
            raise DataError(f"no prepared data in {cfg.data_dir} and no inputs to prepare it from")
        prepare(cfg.inputs, cfg.data_dir, cfg.model.vocab_size, cfg.tokenizer or None, cfg.val_fraction,
                cfg.tokenizer_max_bytes)
    if rt.distributed:
        dist.barrier()
    meta = read_meta(cfg.data_dir)
    if cfg.tokenizer:
        if Tokenizer.load(cfg.tokenizer).fingerprint() != meta["tokenizer_fingerprint"]:
            raise DataError(f"{cfg.data_dir} was prepared with another tokenizer than {cfg.tokenizer};"
                            " prepare it again or set data_dir to a new folder")
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
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.layers:  # one all-gather per block, overlapped with the previous block's compute
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=device.type == "cuda")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr_ratio * lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


# ----------------------------------------------------------------------------- memory estimate

def estimate_memory(cfg: TrainConfig, world_size: int) -> dict:
    """Bytes per GPU for weights, gradients, AdamW state and activations (an estimate, not a bound).

    fp32 master weights and gradients, two fp32 Adam moments: 16 bytes per parameter, divided by the
    world size under FSDP (plus two all-gathered bf16 blocks in flight). Activations per token and
    layer, in the compute dtype: q, k, v, attention output, the norm outputs and the SwiGLU
    intermediates (~10 x dim + 4 x ffn_hidden values; the fp32 residual stream adds 8 x dim bytes);
    with activation checkpointing only each block's fp32 input is kept, plus one block recomputed.
    Logits take three fp32 copies (logits, softmax, gradient) per token.
    """
    with torch.device("meta"):
        model = Transformer(cfg.model)
    m, n_params = cfg.model, model.num_params()
    act_bytes = 2 if cfg.dtype == "bfloat16" or cfg.dtype == "auto" else 4
    tokens = cfg.micro_batch_size * m.max_seq_len
    ffn = model.layers[0].feed_forward.w1.out_features
    per_layer_token = act_bytes * (10 * m.dim + 4 * ffn) + 8 * m.dim
    if cfg.activation_checkpointing:
        activations = tokens * (m.n_layers * 4 * m.dim + per_layer_token)
    else:
        activations = tokens * m.n_layers * per_layer_token
    shards = world_size if cfg.parallel == "fsdp" else 1
    block_params = sum(p.numel() for p in model.layers[0].parameters())
    estimate = {
        "weights (fp32)": 4 * n_params / shards,
        "gradients (fp32)": 4 * n_params / shards,
        "AdamW moments (fp32)": 8 * n_params / shards,
        "activations": activations,
        "logits": 12 * tokens * m.vocab_size,
    }
    if cfg.parallel == "fsdp":
        estimate["gathered blocks (bf16)"] = 2 * 2 * block_params
    estimate["total"] = sum(estimate.values())
    # build_model initialises the whole fp32 model on every device before sharding it
    estimate["peak at initialisation"] = 4 * n_params
    return estimate


def dry_run(cfg: TrainConfig, world_size: int):
    """Build the model on the meta device and print its size, FLOPs and memory per GPU."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    n_params = model.num_params()
    print(f"parameters: {n_params:,} ({n_params / 1e9:.2f}B; {model.num_params(exclude_embedding=True):,}"
          " without the embedding table)")
    print(f"training FLOPs per token: {model.flops_per_token():,} (context {cfg.model.max_seq_len})")
    accum = cfg.grad_accum_steps(world_size)
    print(f"world size {world_size}, parallel={cfg.parallel if world_size > 1 else 'none'}, micro-batch "
          f"{cfg.micro_batch_size} x {cfg.model.max_seq_len} tokens, {accum} accumulation steps, "
          f"{cfg.global_batch_tokens:,} tokens per step")
    print(f"estimated memory per GPU (activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}):")
    for name, size in estimate_memory(cfg, world_size).items():
        print(f"  {name:<24} {size / 2**30:8.1f} GiB")


def check_memory_fits(cfg: TrainConfig, rt: Runtime):
    """Stop before a CUDA run whose estimate exceeds the GPU, saying what to change."""
    if rt.device.type != "cuda":
        return
    estimate = estimate_memory(cfg, rt.world_size)
    need = max(estimate["total"], estimate["peak at initialisation"])
    have = torch.cuda.get_device_properties(rt.device).total_memory
    if need > have:
        raise ConfigError(
            f"estimated {need / 2**30:.0f} GiB per GPU but the GPU has {have / 2**30:.0f} GiB; use "
            "--parallel=fsdp with more GPUs, a smaller --micro_batch_size, or --activation_checkpointing=true"
            " (python train.py CONFIG --dry-run shows the breakdown)")


# ----------------------------------------------------------------------------- the run

class Trainer:
    """One training run: model, optimizer, data and the loop, with checkpoints and logs."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, resume: bool):
        self.cfg, self.rt = cfg, rt
        self.sharded = cfg.parallel == "fsdp" and rt.distributed
        self.dtype = compute_dtype(cfg, rt.device)
        self.out_dir = Path(cfg.out_dir)
        if cfg.init_from and not resume:  # its weight files are checked before data preparation, which can take hours
            hf.check_weights(cfg.init_from, cfg.model)
        self.tokenizer = ensure_data(cfg, rt)
        self.train_data, self.val_data = TokenData(cfg.data_dir, "train"), TokenData(cfg.data_dir, "val")
        for split in (self.train_data, self.val_data):
            split.check_length(cfg.model.max_seq_len)
        self.accum = cfg.grad_accum_steps(rt.world_size)
        check_memory_fits(cfg, rt)
        self.model = build_model(cfg, rt, self.dtype, self.sharded, resume)
        self.optimizer = make_optimizer(cfg, self.model, rt.device)
        self.token_bytes = token_byte_lengths(self.tokenizer, cfg.model.vocab_size).to(rt.device)
        self.step, self.bad_steps = 0, 0
        self.stop_signal, self.stop_requested = None, False  # set by the handler; agreed by all ranks
        if rt.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()
        else:
            torch.manual_seed(cfg.seed + rt.rank)  # dropout differs per rank, as its data does
        self.ddp = None
        if rt.world_size > 1 and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel
            self.ddp = DistributedDataParallel(self.model, device_ids=[rt.device] if rt.device.type == "cuda" else None)
        forward = self.ddp or self.model
        self.forward = torch.compile(forward) if cfg.compile else forward

    # -- checkpoints

    def _train_state(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.rt.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.rt.device)
        states = [rng]
        if self.rt.distributed:
            states = [None] * self.rt.world_size
            dist.all_gather_object(states, rng)
        # "step" is also the data loader's whole state: a batch is a pure function of (seed, step).
        return {"step": self.step, "config": dataclasses.asdict(self.cfg), "rng": states,
                "tokenizer_fingerprint": self.train_data.meta["tokenizer_fingerprint"]}

    def save_checkpoint(self):
        start = time.time()
        checkpoint.save(self.out_dir, self.model, self.optimizer, self._train_state(), self.sharded)
        if self.rt.is_main:
            self.tokenizer.save(self.out_dir / TOKENIZER_FILE)  # sample.py needs only this folder
            self.log({"event": "checkpoint", "step": self.step, "seconds": round(time.time() - start, 2)},
                     f"step {self.step}: checkpoint saved to {self.out_dir} ({time.time() - start:.1f}s)")

    def _resume(self):
        state = checkpoint.load(self.out_dir, self.model, self.optimizer, self.sharded, self._check_resumable)
        self.step = state["step"]
        rng = state["rng"][self.rt.rank] if self.rt.rank < len(state["rng"]) else None
        if rng is None:  # more ranks than the run that saved: a fresh stream for the new ones
            torch.manual_seed(self.cfg.seed + self.rt.rank + self.step)
        else:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.rt.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.rt.device)
        self.log({"event": "resume", "step": self.step}, f"resumed from {self.out_dir} at step {self.step}")

    def _check_resumable(self, state: dict):
        saved_model = state["config"]["model"]
        if saved_model != dataclasses.asdict(self.cfg.model):
            changed = [k for k in saved_model if saved_model[k] != getattr(self.cfg.model, k, None)]
            raise checkpoint.CheckpointError(f"the checkpoint in {self.out_dir} has another model shape "
                                             f"({', '.join('model.' + k for k in changed)}); resume with its config")
        if state.get("tokenizer_fingerprint") != self.train_data.meta["tokenizer_fingerprint"]:
            raise checkpoint.CheckpointError(f"the checkpoint in {self.out_dir} was trained on data prepared with"
                                             f" another tokenizer than {self.cfg.data_dir}")

    # -- logging

    def log(self, record: dict, line: str):
        if not self.rt.is_main:
            return
        print(line, flush=True)
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def _all_reduce(self, values: list[float]) -> list[float]:
        """Sums over all ranks."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.rt.device)
        if self.rt.distributed:
            dist.all_reduce(tensor)
        return tensor.tolist()

    # -- training and evaluation

    def autocast(self):
        if self.dtype == torch.float32 or self.sharded:  # FSDP's policy already computes in bf16
            return nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.dtype)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean val loss in nats per token and bits per byte over up to eval_tokens tokens."""
        self.model.eval()
        seq = self.cfg.model.max_seq_len
        starts = self.val_data.eval_starts(seq, self.cfg.eval_tokens)
        # Every rank runs as many forwards as the others (FSDP's are collective): the tail is dropped,
        # and with fewer windows than ranks all ranks evaluate the first (the ratios are unchanged).
        per_rank = len(starts) // self.rt.world_size
        mine = starts[self.rt.rank * per_rank:(self.rt.rank + 1) * per_rank] if per_rank else starts[:1]
        # Sums stay on the device until the end: one host sync per evaluation, not two per batch.
        nats = text_bytes = torch.zeros((), dtype=torch.float64, device=self.rt.device)
        tokens = 0
        for i in range(0, len(mine), self.cfg.micro_batch_size):
            x, y = self.val_data.batch(mine[i: i + self.cfg.micro_batch_size], seq, self.rt.device)
            with self.autocast():
                _, loss = self.forward(x, y)
            nats = nats + loss.double() * y.numel()
            text_bytes = text_bytes + self.token_bytes[y].sum()
            tokens += y.numel()
        nats, tokens, text_bytes = self._all_reduce([nats.item(), tokens, text_bytes.item()])
        self.model.train()
        return {"val_loss": nats / tokens, "val_bpb": bits_per_byte(nats, text_bytes)}

    def train_step(self) -> tuple[float, float] | None:
        """One optimizer step over the global batch; None when the loss was not finite."""
        cfg, rt, seq = self.cfg, self.rt, self.cfg.model.max_seq_len
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, self.step)
        starts = self.train_data.train_starts(cfg.seed, self.step, cfg.micro_batch_size * self.accum * rt.world_size, seq)
        mine = starts.reshape(rt.world_size, self.accum, cfg.micro_batch_size)[rt.rank]
        loss_sum = torch.zeros((), device=rt.device)
        for micro_step, micro_starts in enumerate(mine):
            last = micro_step == self.accum - 1
            x, y = self.train_data.batch(micro_starts, seq, rt.device)
            if self.sharded:
                self.model.set_requires_gradient_sync(last)
            sync = self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()
            with sync:
                with self.autocast():
                    _, loss = self.forward(x, y)
                (loss / self.accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        # One collective per step: the mean loss, and whether any rank was signalled to stop.
        loss_mean, stop_votes = self._all_reduce([loss_sum.item() / self.accum, float(self.stop_signal is not None)])
        loss_mean /= rt.world_size
        self.stop_requested = stop_votes > 0
        if not (math.isfinite(loss_mean) and math.isfinite(grad_norm.item())):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_mean, grad_norm.item()

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

    def _loop(self) -> bool:
        cfg, rt = self.cfg, self.rt
        tokens_per_step = cfg.global_batch_tokens
        flops_per_token = self.model.flops_per_token()
        peak = next((f for name, f in PEAK_BF16_FLOPS.items() if rt.device.type == "cuda"
                     and name in torch.cuda.get_device_name(rt.device)), None)
        self.log({"event": "start", "step": self.step, "params": self.model.num_params(),
                  "world_size": rt.world_size, "grad_accum": self.accum, "config": dataclasses.asdict(cfg)},
                 f"{self.model.num_params():,} parameters, {rt.world_size} rank(s) on {rt.device.type}, "
                 f"{self.accum} micro-step(s) of {cfg.micro_batch_size}x{cfg.model.max_seq_len} per step, "
                 f"{tokens_per_step:,} tokens per step, {cfg.max_steps} steps")
        start_time = last_time = time.time()
        start_step, last_step = self.step, self.step
        while self.step < cfg.max_steps:
            if self.step % cfg.eval_interval == 0:
                self._log_eval(time.time() - start_time)
            result = self.train_step()
            self.step += 1  # also after a skipped update: the same batch again would fail the same way
            if result is None:
                self.bad_steps += 1
                self.log({"event": "nonfinite", "step": self.step},
                         f"step {self.step}: loss or gradient is not finite, update skipped")
                if self.bad_steps >= cfg.max_bad_steps:
                    self.log({"event": "abort", "step": self.step},
                             f"{self.bad_steps} non-finite steps in a row: stopping; the last good checkpoint is"
                             f" in {self.out_dir}")
                    return False
                continue
            self.bad_steps = 0
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                now = time.time()
                loss, grad_norm = result
                step_time = (now - last_time) / (self.step - last_step)
                tokens_per_s = tokens_per_step / step_time
                record = {"step": self.step, "loss": round(loss, 4), "lr": learning_rate(cfg, self.step - 1),
                          "grad_norm": round(grad_norm, 4), "tokens_per_s": round(tokens_per_s),
                          "flops_per_s": flops_per_token * tokens_per_s,
                          "elapsed_s": round(now - start_time, 1),
                          "eta_s": round((now - start_time) / (self.step - start_step) * (cfg.max_steps - self.step))}
                line = (f"step {self.step}/{cfg.max_steps} | loss {loss:.4f} | lr {record['lr']:.2e} | "
                        f"grad {grad_norm:.2f} | {tokens_per_s:,.0f} tok/s | "
                        f"{record['flops_per_s'] / 1e9:.1f} GFLOP/s")
                if peak:
                    record["mfu"] = record["flops_per_s"] / (peak * rt.world_size)
                    line += f" | MFU {100 * record['mfu']:.1f}%"
                if rt.device.type == "cuda":
                    record["peak_mem_gb"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
                    line += f" | mem {record['peak_mem_gb']:.1f} GiB"
                self.log(record, line + f" | ETA {record['eta_s'] // 60:.0f}m{record['eta_s'] % 60:02.0f}s")
                last_time, last_step = now, self.step
            if self.stop_requested:
                self.save_checkpoint()
                self.log({"event": "signal", "step": self.step},
                         f"stopped by signal at step {self.step}; resume with --resume")
                return True
            if self.step % cfg.ckpt_interval == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
        self._log_eval(time.time() - start_time)
        self.save_checkpoint()
        return True

    def _log_eval(self, elapsed: float):
        result = self.evaluate()
        self.log({"event": "eval", "step": self.step, "elapsed_s": round(elapsed, 1), **result},
                 f"step {self.step}: val loss {result['val_loss']:.4f} nats/token, "
                 f"{result['val_bpb']:.4f} bits/byte ({elapsed:.0f}s)")

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


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s [CONFIG] [--key=value ...]")
    parser.add_argument("config", nargs="?", help="a config file such as config/7b.py (default: the small run)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in out_dir")
    parser.add_argument("--dry-run", action="store_true", help="print parameters, FLOPs and memory, then exit")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                        help="ranks assumed by --dry-run")
    parser.add_argument("--consolidate", metavar="OUT_DIR", help="gather an FSDP checkpoint into OUT_DIR/ckpt.pt")
    return parser.parse_known_args(argv)


def train(cfg: TrainConfig, rt: Runtime, resume: bool) -> int:
    """Run the training; 0 when it finished or stopped by a signal, 1 when non-finite losses stopped it."""
    trainer = Trainer(cfg, rt, resume)
    finished = trainer.run()
    if finished and trainer.step >= cfg.max_steps:
        trainer.print_sample()
    return 0 if finished else 1


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    try:
        if args.consolidate:
            print(f"wrote {checkpoint.consolidate(args.consolidate)}")
            return 0
        cfg = load_config(args.config, overrides, resume=args.resume)
        if args.dry_run:
            dry_run(cfg, args.world_size)
            return 0
        return train(cfg, setup_runtime(cfg), args.resume)
    except (ConfigError, DataError, checkpoint.CheckpointError, ValueError) as error:
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
