"""Training configuration: one dataclass, plain-Python config files, validated CLI overrides.

A config file (e.g. config/7b.py) is ordinary Python that builds `config = TrainConfig(...)`;
it is run in a namespace of its own (runpy), so nothing leaks into the trainer's globals.
Overrides are `--key=value` for training keys and `--model.key=value` for model keys; an
unknown key or a value of the wrong type is a one-line error naming what would be valid.
"""
import dataclasses
import difflib
import runpy
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from model import ModelConfig


class ConfigError(ValueError):
    """A config file or override the user has to fix; its message says how."""


def small_model() -> ModelConfig:
    """The default model: 2.6M parameters that a 2-core CPU trains on tinyshakespeare in minutes."""
    return ModelConfig(vocab_size=2048, dim=192, n_layers=4, n_heads=6, ffn_hidden=512, max_seq_len=128,
                       dropout=0.1)


@dataclass
class TrainConfig:
    """Everything a run needs. The defaults are the small CPU run on the bundled corpus."""
    model: ModelConfig = field(default_factory=small_model)

    # data: raw inputs (files, folders, .jsonl) are prepared into token shards in data_dir on first use
    inputs: list[str] = field(default_factory=lambda: ["data/tinyshakespeare.txt"])
    data_dir: str = "out/data/tinyshakespeare"
    tokenizer: str = ""                 # an existing tokenizer file; "" trains one of model.vocab_size
    val_fraction: float = 0.1           # the tail of the corpus held out for validation
    tokenizer_max_bytes: int = 200_000_000  # tokenizer training reads at most this much text

    out_dir: str = "out/default"        # checkpoints, log.jsonl, tokenizer.json
    # a Hugging Face model folder or a run folder: start from its weights, model shape and tokenizer
    init_from: str = ""

    # batch: sequences are model.max_seq_len tokens long
    micro_batch_size: int = 32          # sequences per rank per forward/backward
    global_batch_tokens: int = 4096     # per optimizer step, all ranks; sets gradient accumulation
    max_steps: int = 800

    # AdamW with linear warmup then cosine decay to min_lr_ratio * lr
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0

    # evaluation, logging, checkpoints (intervals in optimizer steps)
    eval_interval: int = 100
    eval_tokens: int = 65536            # validation tokens per evaluation (whole split when it is smaller)
    log_interval: int = 25
    ckpt_interval: int = 200
    max_bad_steps: int = 3              # consecutive non-finite losses before the run stops
    sample_tokens: int = 200            # printed from the final model; 0 for none

    # system
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                 # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    parallel: str = "ddp"               # ddp | fsdp, under torchrun (fsdp also on a single rank)
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 1337

    def __post_init__(self):
        checks = [
            (self.parallel in ("ddp", "fsdp"), f"parallel must be 'ddp' or 'fsdp', not {self.parallel!r}"),
            (self.dtype in ("auto", "float32", "bfloat16"),
             f"dtype must be 'auto', 'float32' or 'bfloat16', not {self.dtype!r}"),
            (0 < self.val_fraction < 1, f"val_fraction must be between 0 and 1, not {self.val_fraction}"),
            (self.micro_batch_size > 0, "micro_batch_size must be positive"),
            (self.global_batch_tokens > 0, "global_batch_tokens must be positive"),
            (self.max_steps > 0, "max_steps must be positive"),
            (self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr must be positive and min_lr_ratio in [0, 1]"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (min(self.eval_interval, self.log_interval, self.ckpt_interval, self.eval_tokens) > 0,
             "eval_interval, log_interval, ckpt_interval and eval_tokens must be positive"),
            (bool(self.inputs) or bool(self.data_dir), "give inputs to prepare or a prepared data_dir"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step so that all ranks together see global_batch_tokens."""
        tokens_per_micro_step = self.micro_batch_size * self.model.max_seq_len * world_size
        if self.global_batch_tokens % tokens_per_micro_step:
            raise ConfigError(
                f"global_batch_tokens={self.global_batch_tokens} is not a multiple of micro_batch_size"
                f" x max_seq_len x world_size = {tokens_per_micro_step}; change one of them")
        return self.global_batch_tokens // tokens_per_micro_step


def _parse_value(text: str, annotation, key: str):
    """Convert a CLI string to the field's declared type, or fail with a ConfigError."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if text.lower() in ("none", "null", ""):
            return None
        annotation = next(a for a in args if a is not type(None))
    try:
        if annotation is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            number = float(text.replace("_", ""))  # accepts 4e6 and 4_000_000
            if number != int(number):
                raise ValueError
            return int(number)
        if annotation is float:
            return float(text)
        if typing.get_origin(annotation) is list:
            return [item for item in text.split(",") if item]
        return text
    except ValueError:
        name = getattr(annotation, "__name__", str(annotation))
        raise ConfigError(f"--{key}={text}: expected a value of type {name}") from None


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys() -> list[str]:
    """Every key an override may name: training keys, then model.<key>."""
    train_keys = [k for k in _field_types(TrainConfig) if k != "model"]
    return train_keys + [f"model.{k}" for k in _field_types(ModelConfig)]


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Return a new config with `--key=value` overrides applied; each is checked by name and type."""
    train_values, model_values = {}, {}
    train_types, model_types = _field_types(TrainConfig), _field_types(ModelConfig)
    for override in overrides:
        if not override.startswith("--") or "=" not in override:
            raise ConfigError(f"cannot read {override!r}: overrides look like --key=value (e.g. --lr=1e-3)")
        key, text = override[2:].split("=", 1)
        key = key.replace("-", "_")
        if key.startswith("model.") and key[6:] in model_types:
            model_values[key[6:]] = _parse_value(text, model_types[key[6:]], key)
        elif key in train_types and key != "model":
            train_values[key] = _parse_value(text, train_types[key], key)
        else:
            close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see config/__init__.py for the keys"
            raise ConfigError(f"unknown config key {key!r}{hint}")
    model = dataclasses.replace(config.model, **model_values)
    return dataclasses.replace(config, model=model, **train_values)


def load_config(path: str | None = None, overrides: list[str] = (), resume: bool = False) -> TrainConfig:
    """Build the config from an optional config file, then apply the overrides; with init_from,
    the model comes from there (see start_from)."""
    if path is None:
        config = TrainConfig()
    else:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} not found (see config/ for examples)")
        namespace = runpy.run_path(path)
        config = namespace.get("config")
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"{path} must define `config = TrainConfig(...)`")
    model_overrides = [o for o in overrides if o.startswith("--model.")]
    default_model = dataclasses.asdict(small_model())
    file_values = {k: v for k, v in dataclasses.asdict(config.model).items() if v != default_model[k]}
    config = apply_overrides(config, [o for o in overrides if not o.startswith("--model.")])
    if not config.init_from:
        return apply_overrides(config, model_overrides)
    return start_from(config, file_values, _model_values(model_overrides), resume)


def _model_values(overrides: list[str]) -> dict:
    """--model.KEY=VALUE overrides parsed by name and type, without building a model from them."""
    types = _field_types(ModelConfig)
    values = {}
    for override in overrides:
        key, equals, text = override[len("--model."):].partition("=")
        key = key.replace("-", "_")
        if not equals or key not in types:
            apply_overrides(TrainConfig(), [override])  # raises the usual one-line error
        values[key] = _parse_value(text, types[key], f"model.{key}")
    return values


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


def start_from(config: TrainConfig, file_values: dict, cli_values: dict, resume: bool) -> TrainConfig:
    """`config` with the model of config.init_from (a Hugging Face model folder or a run folder).

    The model keys set by the config file (those that differ from the default model) and by
    --model.* are checked: those in INIT_FROM_MODEL_KEYS are applied (max_seq_len at most
    init_from's), and any other that would change the model is an error.
    The tokenizer comes from init_from unless `tokenizer` names one. When resuming, the run's own
    checkpoint in out_dir is read instead, so a resumed run never needs init_from again.
    """
    import hf
    source = config.out_dir if resume else config.init_from
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
    return dataclasses.replace(config, model=model, tokenizer=config.tokenizer or ("" if resume else config.init_from))
