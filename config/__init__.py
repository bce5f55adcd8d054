"""Training configuration: one dataclass, plain-Python config files, validated CLI overrides.

A config file (e.g. config/7b.py) is ordinary Python that builds `config = TrainConfig(...)`;
it is run in a namespace of its own (runpy), so nothing leaks into the trainer's globals.
Overrides are `--key=value` for training keys and `--model.key=value` for model keys. Every key
is checked when the config is built: an unknown key, a value of the wrong type or out of range
is a one-line error naming what would be valid.
"""
import dataclasses
import difflib
import json
import math
import runpy
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from model import ModelConfig

PROJECT = Path(__file__).resolve().parent.parent  # the bundled defaults resolve here, not in the working folder


class ConfigError(ValueError):
    """A config file or override the user has to fix; its message says how."""


def small_model() -> ModelConfig:
    """The default model: 2.6M parameters that a 2-core CPU trains on tinyshakespeare in minutes.
    No dropout: it learns faster early without (2.30 against 2.38 val bits per byte at step 100), ends
    as low (1.86), and its steps are cheaper: no random masks, and attention takes the fused kernel
    (the curves are in the README's training figures)."""
    return ModelConfig(vocab_size=2048, dim=192, n_layers=4, n_heads=6, ffn_hidden=512, max_seq_len=128)


@dataclass
class TrainConfig:
    """Everything a run needs. The defaults are the small CPU run on the bundled corpus."""
    model: ModelConfig = field(default_factory=small_model)

    # data: raw inputs (files, folders, .jsonl) are prepared into token shards in data_dir on first use
    inputs: list[str] = field(default_factory=lambda: [str(PROJECT / "data" / "tinyshakespeare.txt")])
    data_dir: str = "out/data/tinyshakespeare"
    tokenizer: str = ""                 # an existing tokenizer file; "" trains one of model.vocab_size
    val_fraction: float = 0.1           # share of the documents held out for validation, spread over the corpus
    tokenizer_max_bytes: int = 200_000_000  # tokenizer training reads at most this much text
    val_max_bytes: int = 100_000_000    # ... but at most this much input held out (bytes on disk)
    text_field: str = "text"            # the field of .jsonl records / column of .parquet files with the text
    tokenizer_memory_budget: int | None = None  # bytes tokenizer training may use; None: the tokenizer's default

    out_dir: str = "out/default"        # checkpoints, log.jsonl, tokenizer.json
    # a Hugging Face model folder or a run folder: start from its weights, model shape and tokenizer
    init_from: str = ""

    # batch: sequences are model.max_seq_len tokens long
    micro_batch_size: int = 32          # at most this many sequences per rank per forward/backward
    global_batch_tokens: int = 4096     # per optimizer step, all ranks; sets gradient accumulation
    max_steps: int = 800

    # AdamW with linear warmup then cosine decay to min_lr_ratio * lr
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0              # max global gradient norm; 0 turns clipping off

    # evaluation, logging, checkpoints (intervals in optimizer steps)
    eval_interval: int = 100
    eval_tokens: int = 65536            # validation tokens per evaluation (whole split when it is smaller)
    log_interval: int = 25
    ckpt_interval: int = 200
    keep_checkpoints: int = 3           # the newest this many checkpoints stay on disk
    max_bad_steps: int = 3              # consecutive non-finite losses before the run stops
    sample_tokens: int = 200            # printed from the final model; 0 for none
    tensorboard: bool = False           # also log to out_dir/tensorboard (needs the tensorboard package)

    # system
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                 # auto (bf16 autocast on CUDA and on CPUs with AMX or AVX512-BF16,
                                        # else fp32) | float32 | bfloat16; weights and AdamW stay fp32
    parallel: str = "ddp"               # ddp | fsdp, under torchrun (fsdp also on a single rank)
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 1337

    def __post_init__(self):
        _check_types(self, "")
        _check_types(self.model, "model.")
        positive_ints = ("tokenizer_max_bytes", "micro_batch_size", "global_batch_tokens", "max_steps",
                         "eval_interval", "eval_tokens", "log_interval", "ckpt_interval", "keep_checkpoints",
                         "max_bad_steps")
        for key in positive_ints:
            _require(getattr(self, key) >= 1, key, getattr(self, key), "a positive integer")
        for key in ("warmup_steps", "sample_tokens"):
            _require(getattr(self, key) >= 0, key, getattr(self, key), "an integer >= 0")
        finite = math.isfinite
        _require(finite(self.lr) and self.lr > 0, "lr", self.lr, "a positive number")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        _require(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "between 0 and 1")
        _require(self.val_max_bytes >= 1, "val_max_bytes", self.val_max_bytes, "a positive number of bytes")
        _require(self.text_field != "", "text_field", self.text_field, "the name of the field that holds the text")
        _require(self.tokenizer_memory_budget is None or self.tokenizer_memory_budget >= 1, "tokenizer_memory_budget",
                 self.tokenizer_memory_budget, "a positive number of bytes, or None for the tokenizer's default")
        _require(finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        for key in ("beta1", "beta2"):
            _require(0 <= getattr(self, key) < 1, key, getattr(self, key), "in [0, 1)")
        _require(finite(self.adam_eps) and self.adam_eps > 0, "adam_eps", self.adam_eps, "a positive number")
        _require(finite(self.grad_clip) and self.grad_clip >= 0, "grad_clip", self.grad_clip,
                 "a number > 0, or 0 for no clipping")
        _require(0 <= self.seed < 2**62, "seed", self.seed, "an integer in [0, 2**62)")
        _require(self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit()),
                 "device", self.device, "auto, cpu, cuda or cuda:N")
        _require(self.dtype in ("auto", "float32", "bfloat16"), "dtype", self.dtype, "auto, float32 or bfloat16")
        _require(self.parallel in ("ddp", "fsdp"), "parallel", self.parallel, "ddp or fsdp")
        for key in ("data_dir", "out_dir"):
            _require(getattr(self, key) != "", key, getattr(self, key), "a folder path")
        _require(all(self.inputs), "inputs", self.inputs, "paths of text files or folders")
        if not self.inputs and not self.data_dir:
            raise ConfigError("give inputs to prepare or a prepared data_dir")


def _require(ok: bool, key: str, value, valid: str):
    if not ok:
        raise ConfigError(f"{key} must be {valid}, not {value!r}")


def _check_types(obj, prefix: str):
    """Every field of a config dataclass holds its declared type (config files are plain Python)."""
    for name, annotation in _field_types(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(annotation):
            continue
        optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        if optional:
            if value is None:
                continue
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        if annotation is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        elif annotation is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif typing.get_origin(annotation) is list:
            ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        else:
            ok = isinstance(value, annotation)
        if not ok:
            name_of = getattr(annotation, "__name__", str(annotation))
            raise ConfigError(f"{prefix}{name} must be of type {name_of}{' or None' if optional else ''}, not {value!r}")


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is split: micro-batches per rank per forward, and how many of them."""
    micro_batch_size: int
    accum_steps: int
    global_batch_tokens: int
    note: str  # what was adjusted from the config, for the start line; "" when nothing was


def plan_batch(cfg: TrainConfig, world_size: int) -> BatchPlan:
    """Split global_batch_tokens into world_size x accum_steps micro-batches of at most micro_batch_size.

    micro_batch_size is an upper bound: the largest micro-batch that divides each rank's share of the
    global batch is used. When the global batch is not a whole number of sequences per rank, it is
    rounded to the nearest multiple of micro_batch_size x max_seq_len x world_size, so that full
    micro-batches still fit (or, when it is smaller than that, of max_seq_len x world_size). Only a
    global batch smaller than one sequence per rank is an error.
    """
    seq = cfg.model.max_seq_len
    one_sequence_each = seq * world_size
    if cfg.global_batch_tokens < one_sequence_each:
        raise ConfigError(f"global_batch_tokens={cfg.global_batch_tokens:,} is less than one sequence per rank "
                          f"(max_seq_len {seq} x world size {world_size} = {one_sequence_each:,}); raise it or use fewer ranks")
    tokens, note = cfg.global_batch_tokens, ""
    if tokens % one_sequence_each:
        full_micro_batches = cfg.micro_batch_size * one_sequence_each
        step = full_micro_batches if tokens >= full_micro_batches else one_sequence_each
        tokens = round(tokens / step) * step
        note = (f"global_batch_tokens {cfg.global_batch_tokens:,} rounded to {tokens:,}, a whole number of "
                f"{seq}-token sequences per rank on {world_size} rank(s)")
    per_rank = tokens // one_sequence_each
    micro = next(m for m in range(min(cfg.micro_batch_size, per_rank), 0, -1) if per_rank % m == 0)
    if micro != cfg.micro_batch_size:
        note += ("; " if note else "") + f"micro_batch_size {micro} (at most {cfg.micro_batch_size}) divides the " \
                                         f"{per_rank} sequences per rank"
    return BatchPlan(micro, per_rank // micro, tokens, note)


# ----------------------------------------------------------------------------- overrides

def _parse_value(text: str, annotation, key: str):
    """Convert a CLI string to the field's declared type, or fail with a ConfigError."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if text.lower() in ("none", "null", ""):
            return None
        annotation = next(a for a in args if a is not type(None))
    name = getattr(annotation, "__name__", str(annotation))
    try:
        if annotation is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            digits = text.replace("_", "")
            try:
                return int(digits)  # exact, however large
            except ValueError:
                number = float(digits)  # 4e6; only while a double still holds the integer exactly
                if not (math.isfinite(number) and number == int(number) and abs(number) <= 2**53):
                    raise ValueError from None
                return int(number)
        if annotation is float:
            return float(text)
        if typing.get_origin(annotation) is list:
            if text.startswith("["):  # a JSON list, for paths that contain commas
                items = json.loads(text)
                if not (isinstance(items, list) and all(isinstance(item, str) for item in items)):
                    raise ValueError
                return items
            return [item for item in text.split(",") if item]
        return text
    except ValueError:
        raise ConfigError(f"--{key}={text}: expected a value of type {name}") from None


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys() -> list[str]:
    """Every key an override may name: training keys, then model.<key>."""
    train_keys = [k for k in _field_types(TrainConfig) if k != "model"]
    return train_keys + [f"model.{k}" for k in _field_types(ModelConfig)]


def parse_overrides(overrides: list[str]) -> dict:
    """`--key=value` strings -> {key: typed value} ("model.dim" for model keys), each checked by name and type."""
    train_types, model_types = _field_types(TrainConfig), _field_types(ModelConfig)
    values = {}
    for override in overrides:
        if not override.startswith("--") or "=" not in override:
            raise ConfigError(f"cannot read {override!r}: overrides look like --key=value (e.g. --lr=1e-3)")
        key, text = override[2:].split("=", 1)
        key = key.replace("-", "_")
        if key.startswith("model.") and key[6:] in model_types:
            values[key] = _parse_value(text, model_types[key[6:]], key)
        elif key in train_types and key != "model":
            values[key] = _parse_value(text, train_types[key], key)
        else:
            close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see config/__init__.py for the keys"
            raise ConfigError(f"unknown config key {key!r}{hint}")
    return values


def with_values(config: TrainConfig, values: dict) -> TrainConfig:
    """A new config with {key: value} applied ("model.KEY" for model keys); validated as a whole."""
    model = {k[6:]: v for k, v in values.items() if k.startswith("model.")}
    train = {k: v for k, v in values.items() if not k.startswith("model.")}
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **model), **train)


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Return a new config with `--key=value` overrides applied."""
    return with_values(config, parse_overrides(overrides))


def from_dict(saved: dict) -> TrainConfig:
    """The config saved in a checkpoint (dataclasses.asdict form); keys added since take their defaults."""
    model_keys, train_keys = _field_types(ModelConfig), _field_types(TrainConfig)
    model = ModelConfig(**{k: v for k, v in saved.get("model", {}).items() if k in model_keys})
    return TrainConfig(model=model, **{k: v for k, v in saved.items() if k in train_keys and k != "model"})


def flat(config: TrainConfig) -> dict:
    """{key: value} over valid_keys(), for comparing configs key by key."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if k != "model"}
    return values | {f"model.{k}": v for k, v in dataclasses.asdict(config.model).items()}


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Build the config from an optional config file, then apply the overrides; with init_from, the
    model comes from there (see start_from)."""
    values = parse_overrides(list(overrides))
    config = load_file(path)
    config = with_values(config, {k: v for k, v in values.items() if not k.startswith("model.")})
    model_values = {k: v for k, v in values.items() if k.startswith("model.")}
    if not config.init_from:
        return with_values(config, model_values)
    default_model = dataclasses.asdict(small_model())
    file_values = {k: v for k, v in dataclasses.asdict(config.model).items() if v != default_model[k]}
    return start_from(config, file_values, {k[6:]: v for k, v in model_values.items()})


def load_file(path: str | None) -> TrainConfig:
    """The config a config file defines, or the defaults when there is none."""
    if path is None:
        return TrainConfig()
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} not found (see config/ for examples)")
    try:
        config = runpy.run_path(path).get("config")
    except ConfigError:
        raise
    except Exception as error:  # the file is plain Python: report its error in one line, with where it is
        raise ConfigError(f"{path}: {type(error).__name__}: {error}") from None
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"{path} must define `config = TrainConfig(...)`")
    return config


# ----------------------------------------------------------------------------- resuming

# Keys a resumed run may change: they do not alter the weights learned so far, the data order or the
# shapes in the checkpoint. The rest (model shape, data, seed, global batch, parallel mode) stays fixed.
CHANGEABLE_ON_RESUME = {"max_steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2",
                        "adam_eps", "grad_clip", "eval_interval", "eval_tokens", "log_interval", "ckpt_interval",
                        "keep_checkpoints", "max_bad_steps", "sample_tokens", "micro_batch_size", "device", "dtype",
                        "activation_checkpointing", "compile", "data_dir", "model.dropout", "tokenizer_memory_budget",
                        "tensorboard"}


def resume_config(saved: dict, overrides: dict, out_dir: str) -> tuple[TrainConfig, dict]:
    """The config of a resumed run: the one saved in its checkpoint, in `out_dir` (where it was found,
    even if the folder moved), with the overrides that may change applied. Returns it and
    {key: (old, new)} for each change, to log; an override of a fixed key that differs is an error."""
    config = dataclasses.replace(from_dict(saved), out_dir=out_dir)
    current = flat(config)
    changes = {}
    for key, value in overrides.items():
        if key == "out_dir" or value == current[key]:
            continue
        if key not in CHANGEABLE_ON_RESUME:
            raise ConfigError(f"--{key}={value} differs from the checkpoint's {current[key]!r}, and {key} cannot change"
                              " when resuming (the run would not continue the same training); start a new run with"
                              " another --out_dir, or resume without it")
        changes[key] = (current[key], value)
    return with_values(config, {key: new for key, (_, new) in changes.items()}), changes


# With init_from these model keys may still be set: they change how the model trains, not what its
# weights mean. A shorter context uses a prefix of the same RoPE table; a longer one than the model
# was trained for would need RoPE scaling, which is part of the model, so it may only shrink.
INIT_FROM_MODEL_KEYS = ("dropout", "max_seq_len")


def _meaning(model: ModelConfig) -> dict:
    """The model keys with derived sizes in place of the keys that set them (n_kv_heads None and
    n_heads are the same; multiple_of only matters through ffn_hidden; scaling knobs only when on)."""
    values = dataclasses.asdict(model) | {"n_kv_heads": model.kv_heads, "ffn_hidden": model.hidden_dim,
                                          "multiple_of": None}
    if model.rope_scaling is None:
        values.update(rope_low_freq_factor=None, rope_high_freq_factor=None, rope_original_max_seq_len=None)
    return {k: v for k, v in values.items() if k not in INIT_FROM_MODEL_KEYS}


def start_from(config: TrainConfig, file_values: dict, cli_values: dict) -> TrainConfig:
    """`config` with the model of config.init_from (a Hugging Face model folder or a run folder).

    The model keys set by the config file (those that differ from the default model) and by
    --model.* are checked: those in INIT_FROM_MODEL_KEYS are applied (max_seq_len at most
    init_from's), and any other that would change the model is an error.
    The tokenizer comes from init_from unless `tokenizer` names one. (A resumed run takes its config,
    this model included, from its own checkpoint: it never needs init_from again.)
    """
    from infra import hf
    source = config.init_from
    try:
        pretrained = hf.pretrained_config(source)
    except hf.HFError as e:
        raise ConfigError(f"init_from: {e}") from None
    given = {**file_values, **cli_values}
    for key, value in given.items():
        try:
            same = _meaning(dataclasses.replace(pretrained, **{key: value})) == _meaning(pretrained)
        except ValueError:
            same = False
        if not same:
            origin = f"--model.{key}={value}" if key in cli_values else f"model.{key}={value} (in the config file)"
            raise ConfigError(f"{origin} contradicts {source} ({key}={getattr(pretrained, key)}): with init_from the "
                              "model comes from there; only model.dropout and a shorter model.max_seq_len may be set")
    if given.get("max_seq_len", 0) > pretrained.max_seq_len:
        raise ConfigError(f"model.max_seq_len={given['max_seq_len']} is longer than the {pretrained.max_seq_len} "
                          f"positions of {source} (its training context or sliding window); use at most that")
    model = dataclasses.replace(pretrained, **{key: given[key] for key in INIT_FROM_MODEL_KEYS if key in given})
    return dataclasses.replace(config, model=model, tokenizer=config.tokenizer or config.init_from)
