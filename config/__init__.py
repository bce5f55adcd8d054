"""Training configuration: one dataclass, every field checked when a config is built.

A config file (e.g. config/7b.py) is plain Python that builds `config = TrainConfig(...)`;
infra/configurator.py runs it and applies the `--key=value` overrides. A wrong type or a value
out of range is one line naming what would be valid.
"""

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from model import ModelConfig
from tokenizer import UserError

PROJECT = Path(__file__).resolve().parent.parent  # the bundled corpus is found from here


class ConfigError(UserError):
    """A config file or override the user has to fix; its message says how."""


def small_model() -> ModelConfig:
    """The default model: 2.2M parameters that a 2-core CPU trains on tinyshakespeare in minutes,
    with dropout on the residual branches (attention keeps its fused kernel)."""
    return ModelConfig(vocab_size=1024, dim=192, n_layers=4, n_heads=6, ffn_hidden=512,
                       max_seq_len=128, dropout=0.1)


def bundled_corpus() -> list[str]:
    return [str(PROJECT / "data" / "tinyshakespeare.txt")]


@dataclass
class TrainConfig:
    """Everything a run needs. The defaults are the small CPU run on the bundled corpus."""
    model: ModelConfig = field(default_factory=small_model)

    # data: inputs (files, folders, .jsonl, ...) are prepared into token shards in data_dir; none
    # given: the folder as prepared, else the bundled corpus
    inputs: list[str] = field(default_factory=list)
    data_dir: str = "out/data/tinyshakespeare"
    tokenizer: str = ""  # an existing tokenizer file; "" trains one of model.vocab_size
    val_fraction: float = 0.1  # share of the documents held out for validation
    tokenizer_max_bytes: int = 200_000_000  # tokenizer training reads at most this much text
    val_max_bytes: int = 100_000_000  # ... and at most this much input is held out
    text_field: str = "text"  # the field of .jsonl records / column of .parquet files
    chat: bool = False  # inputs are conversations; the loss is on the replies (infra/chat.py)
    tokenizer_memory_budget: int | None = None  # bytes; None: the trainer's default

    out_dir: str = "out/default"  # checkpoints, log.jsonl, tokenizer.json
    init_from: str = ""  # a Hugging Face model folder or a run folder to start from

    # batch: sequences are model.max_seq_len tokens long
    micro_batch_size: int = 32  # at most this many sequences per rank per forward; 0: fit the GPU
    global_batch_tokens: int = 4096  # per optimizer step, all ranks; sets gradient accumulation
    max_steps: int = 800

    # optimizer (train.py OPTIMIZERS): adamw, or muon (Muon at muon_lr for the blocks' matrices,
    # AdamW at lr for the rest). Rates warm up linearly, then follow `schedule` (SCHEDULES): cosine
    # decays to min_lr_ratio x at max_steps, wsd holds them until the last cooldown_fraction
    optimizer: str = "muon"
    lr: float = 2e-3
    muon_lr: float = 0.02
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    warmup_steps: int = 10
    cooldown_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off

    # evaluation, logging, checkpoints (intervals in optimizer steps)
    eval_interval: int = 100
    eval_tokens: int = 65536  # validation tokens per evaluation (the whole split if smaller)
    log_interval: int = 25
    ckpt_interval: int = 200
    ckpt_every_minutes: float = 0  # also save when this long passed since the last save; 0: off
    keep_checkpoints: int = 3  # the newest this many stay on disk (and the best val's)
    max_bad_steps: int = 3  # consecutive non-finite losses before the run stops
    sample_tokens: int = 200  # printed from the final model; 0 for none
    loggers: list[str] = field(default_factory=list)  # besides stdout and log.jsonl

    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 where matmuls are native) | float32 | bfloat16
    parallel: str = "ddp"  # ddp | fsdp, under torchrun (fsdp also on a single rank)
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 1337

    def __post_init__(self):
        _check_types(self, "")
        _check_types(self.model, "model.")
        for key, (valid, what) in RULES.items():
            if not valid(getattr(self, key)):
                raise ConfigError(f"{key} must be {what}, not {getattr(self, key)!r}")


def _positive(value) -> bool:
    return math.isfinite(value) and value > 0


def _at_least_0(value) -> bool:
    return math.isfinite(value) and value >= 0


COUNTS = "tokenizer_max_bytes max_steps eval_interval eval_tokens log_interval ckpt_interval"
COUNTS += " keep_checkpoints max_bad_steps"

# key -> (is the value valid?, what a valid value is); types are checked before
RULES = {
    **dict.fromkeys(COUNTS.split(), (_positive, "a positive integer")),
    **dict.fromkeys(["warmup_steps", "sample_tokens", "micro_batch_size"],
                    (_at_least_0, "an integer >= 0")),
    # beyond this a step's list of windows alone would not fit in memory (Llama 2 used 2**22)
    "global_batch_tokens": (lambda v: 0 < v <= 2**32, "a positive integer, at most 2**32"),
    **dict.fromkeys(["lr", "muon_lr"], (_positive, "a positive number")),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "cooldown_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "ckpt_every_minutes": (_at_least_0, "a number of minutes >= 0"),
    "val_fraction": (lambda v: 0 < v < 1, "between 0 and 1"),
    "val_max_bytes": (_positive, "a positive number of bytes"),
    "text_field": (bool, "the name of the field that holds the text"),
    "tokenizer_memory_budget": (lambda v: v is None or v > 0, "a positive number of bytes"),
    "weight_decay": (_at_least_0, "a number >= 0"),
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_eps": (_positive, "a positive number"),
    "grad_clip": (_at_least_0, "a number > 0, or 0 for no clipping"),
    "seed": (lambda v: 0 <= v < 2**62, "an integer in [0, 2**62)"),
    "device": (lambda v: v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v),
               "auto, cpu, cuda or cuda:N"),
    "dtype": (lambda v: v in ("auto", "float32", "bfloat16"), "auto, float32 or bfloat16"),
    "parallel": (lambda v: v in ("ddp", "fsdp"), "ddp or fsdp"),
    "data_dir": (bool, "a folder path"),
    "out_dir": (bool, "a folder path"),
    "inputs": (all, "paths of text files or folders"),
}


def _check_types(obj, prefix: str):
    """Every field of a config dataclass holds its declared type (config files are plain Python)."""
    for name, annotation in field_types(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(annotation):
            continue
        optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        if optional:
            if value is None:
                continue
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        if annotation is float:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = number and not math.isnan(value)
        elif annotation is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif typing.get_origin(annotation) is list:
            ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        else:
            ok = isinstance(value, annotation)
        if not ok:
            name_of = getattr(annotation, "__name__", str(annotation))
            name_of += " or None" if optional else ""
            raise ConfigError(f"{prefix}{name} must be of type {name_of}, not {value!r}")


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is split: micro-batches per rank per forward, and how many of them."""
    micro_batch_size: int
    accum_steps: int
    global_batch_tokens: int
    note: str  # what was adjusted from the config, for the start line; "" when nothing was


def plan_batch(cfg: TrainConfig, world_size: int) -> BatchPlan:
    """Split global_batch_tokens into world_size x accum_steps micro-batches of the largest size
    up to micro_batch_size that divides each rank's share. A global batch that is not a whole
    number of sequences per rank is rounded to the nearest multiple of micro_batch_size x
    max_seq_len x world_size (or of max_seq_len x world_size when smaller than that)."""
    if cfg.micro_batch_size == 0:
        raise ConfigError("micro_batch_size=0 is fitted to the GPU as the run starts; give a size")
    seq = cfg.model.max_seq_len
    one_sequence_each = seq * world_size
    if cfg.global_batch_tokens < one_sequence_each:
        raise ConfigError(f"global_batch_tokens={cfg.global_batch_tokens:,} is less than one "
                          f"sequence per rank (max_seq_len {seq} x world size {world_size} = "
                          f"{one_sequence_each:,}); raise it or use fewer ranks")
    tokens, note = cfg.global_batch_tokens, ""
    if tokens % one_sequence_each:
        full_micro_batches = cfg.micro_batch_size * one_sequence_each
        step = full_micro_batches if tokens >= full_micro_batches else one_sequence_each
        tokens = round(tokens / step) * step
        note = (f"global_batch_tokens {cfg.global_batch_tokens:,} rounded to {tokens:,}, a whole "
                f"number of {seq}-token sequences per rank on {world_size} rank(s)")
    per_rank = tokens // one_sequence_each
    micro = next(m for m in range(min(cfg.micro_batch_size, per_rank), 0, -1) if per_rank % m == 0)
    if micro != cfg.micro_batch_size:
        why = f"micro_batch_size {micro} (at most {cfg.micro_batch_size}) divides the {per_rank}"
        note += ("; " if note else "") + why + " sequences per rank"
    return BatchPlan(micro, per_rank // micro, tokens, note)


def field_types(cls) -> dict:
    """{field name: its declared type} of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}
