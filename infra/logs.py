"""Where a run's records go, and the throughput they report: a line on stdout and a JSON record
in out_dir/log.jsonl always, and the sinks named in the config's `loggers` (TensorBoard, Weights &
Biases) beside them; the Meter measures tokens/s, MFU and memory of the training steps.

A record is a flat dict: {"step": 25, "loss": 3.1, ...} for training, with "event" for the others
("eval", "checkpoint", "start", "resume", "signal", ...). A new sink is a class made as
`Sink(out_dir, first_step)`, with `requires` (the module to import, its package),
`log(record, line, time)` and `close()`, registered in SINKS under the name `--loggers` takes.
"""

import contextlib
import dataclasses
import importlib
import json
import time
from pathlib import Path

import torch

from tokenizer import UserError


class TensorBoardSink:
    """The record's numbers as scalars named "train/loss", "eval/val_bpb", ...; the config and the
    lines of other events (resume, signal, ...) as text. Events at `first_step` or later already in
    out_dir/tensorboard (from a run that stopped after its last checkpoint) are hidden: those steps
    run again."""

    requires = ("torch.utils.tensorboard", "tensorboard")  # the module to import, its package

    def __init__(self, out_dir: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(out_dir / "tensorboard", purge_step=first_step, flush_secs=10)

    def log(self, record: dict, line: str, now: float):
        event, step = record.get("event", "train"), record["step"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(f"{event}/{key}", value, step, walltime=now)
        if event == "start":  # indented: shown as code, not as markdown
            config = json.dumps(record["config"], indent=2)
            self.writer.add_text("config", "    " + config.replace("\n", "\n    "), step)
        if event not in ("train", "eval", "checkpoint"):
            self.writer.add_text("events", line, step, walltime=now)

    def close(self):
        self.writer.close()


class WandbSink:
    """The records as Weights & Biases metrics ("train/loss", "eval/val_bpb", ...), the config as
    the run's config. The project is the out_dir's name; WANDB_* variables set the rest."""

    requires = ("wandb", "wandb")

    def __init__(self, out_dir: Path, first_step: int):
        import wandb

        self.run = wandb.init(project=out_dir.resolve().name, dir=out_dir, resume="allow")

    def log(self, record: dict, line: str, now: float):
        event = record.get("event", "train")
        if event == "start":
            self.run.config.update(record["config"], allow_val_change=True)
        numbers = {
            f"{event}/{key}": value
            for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        self.run.log(numbers, step=record["step"])

    def close(self):
        self.run.finish()


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


def check_loggers(names: list[str]):
    """Refuse an unknown sink, or one whose package is missing, before any work."""
    for name in names:
        if name not in SINKS:
            choices = ", ".join(SINKS)
            raise UserError(
                f"unknown logger {name!r}: choose from {choices} (stdout and log.jsonl "
                "are always written)"
            )
        module, package = SINKS[name].requires
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(
                f"loggers={name} needs the {package} package: pip install {package}"
            ) from None


class Logger:
    """Rank 0's records: printed, appended to log.jsonl, and handed to each configured sink.
    Other ranks log nothing."""

    def __init__(self, out_dir, loggers: list[str], is_main: bool):
        check_loggers(loggers)
        self.out_dir, self.names, self.is_main, self.sinks = Path(out_dir), loggers, is_main, []

    def open(self, step: int, resumed_from, changes: dict):
        """Open the sinks once the run knows its step (after a resume, the steps after the
        checkpoint's are replayed), and log the resume and each config change."""
        if self.is_main:
            first = step + 1 if resumed_from else 0
            self.sinks = [SINKS[name](self.out_dir, first) for name in self.names]
        if resumed_from:
            line = f"resumed from {resumed_from} at step {step}"
            self.event("resume", step, line, path=resumed_from.name)
        for key, (old, new) in changes.items():
            line = f"{key} changed from {old!r} to {new!r} at step {step}"
            self.event("config_change", step, line, key=key, old=old, new=new)

    def event(self, name: str, step: int, line: str, **fields):
        """A record of an event other than a training step: {"event": name, "step": step, ...}."""
        self.log({"event": name, "step": step, **fields}, line)

    def start(self, step: int, cfg, plan, n_params: int, rt, dtype, dtype_reason: str):
        """The run's first record: its size, batch split, dtype and whole config."""
        line = (
            f"{n_params:,} parameters, {rt.world_size} rank(s) on {rt.device.type}, "
            f"{dtype_reason}, {plan.accum_steps} micro-step(s) of {plan.micro_batch_size}x"
            f"{cfg.model.max_seq_len} per step, {plan.global_batch_tokens:,} tokens per "
            f"step, {cfg.max_steps} steps" + (f" ({plan.note})" if plan.note else "")
        )
        self.event(
            "start",
            step,
            line,
            params=n_params,
            world_size=rt.world_size,
            grad_accum=plan.accum_steps,
            micro_batch_size=plan.micro_batch_size,
            global_batch_tokens=plan.global_batch_tokens,
            dtype=str(dtype).removeprefix("torch."),
            config=dataclasses.asdict(cfg),
        )

    def log(self, record: dict, line: str):
        if not self.is_main:
            return
        print(line, flush=True)
        now = time.time()
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"time": round(now, 3), **record}) + "\n")
        for sink in self.sinks:
            sink.log(record, line, now)

    def close(self):
        for sink in self.sinks:
            sink.close()
        self.sinks = []


class Meter:
    """Throughput of the training steps alone (evaluation and checkpoints are paused out): tokens
    per second, FLOP/s, MFU against the GPU's bf16 peak, peak memory on CUDA, and the ETA."""

    def __init__(self, rt, dtype, flops_per_token: int, tokens_per_step: int):
        from infra.distributed import peak_bf16_flops

        self.rt, self.flops_per_token, self.tokens_per_step = rt, flops_per_token, tokens_per_step
        cuda = rt.device.type == "cuda"
        self.peak = (
            peak_bf16_flops(torch.cuda.get_device_name(rt.device))
            if cuda and dtype == torch.bfloat16
            else None
        )
        if cuda:  # the logged peak is training's, not initialisation's
            torch.cuda.reset_peak_memory_stats(rt.device)

    def start(self, step: int):
        self.last_time, self.last_step, self.busy, self.total_busy = time.time(), step, 0.0, 0.0
        self.first_step = step

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is not training time."""
        began = time.time()
        yield
        self.busy += time.time() - began

    def report(self, step: int, max_steps: int, loss, lr, grad_norm, epoch) -> tuple[dict, str]:
        """The record and the line of a training step."""
        now = time.time()
        seconds = max(1e-9, now - self.last_time - self.busy)
        tokens_per_s = self.tokens_per_step * (step - self.last_step) / seconds
        self.total_busy += seconds
        eta = self.total_busy / (step - self.first_step) * (max_steps - step)
        self.last_time, self.last_step, self.busy = now, step, 0.0
        record = {
            "step": step,
            "loss": round(loss, 4),
            "lr": lr,
            "grad_norm": round(grad_norm, 4),
            "tokens_per_s": round(tokens_per_s),
            "epoch": round(epoch, 3),
            "flops_per_s": self.flops_per_token * tokens_per_s,
            "eta_s": round(eta),
        }
        line = (
            f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:.2f}"
            f" | {tokens_per_s:,.0f} tok/s | {record['flops_per_s'] / 1e9:.1f} GFLOP/s"
        )
        if self.peak:
            record["mfu"] = record["flops_per_s"] / (self.peak * self.rt.world_size)
            record["mfu_peak_flops"] = self.peak
            line += f" | MFU {100 * record['mfu']:.1f}% of {self.peak / 1e12:.0f} TFLOP/s bf16"
        if self.rt.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.rt.device) / 2**30
            record["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.rt.device) / 2**30
            line += (
                f" | mem {record['peak_mem_gib']:.1f} GiB "
                f"({record['peak_reserved_gib']:.1f} reserved)"
            )
        return record, line + f" | epoch {epoch:.2f} | ETA {eta // 60:.0f}m{eta % 60:02.0f}s"
