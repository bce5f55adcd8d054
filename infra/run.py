"""A run folder (out_dir) from start to resume: the config a run starts or continues with, the
folder's lock and marker, the data it trains on, the state beside the weights in a checkpoint
(step, config, RNG), and the log cut back to the checkpoint a resumed run continues from.

Starting: a folder that already holds a checkpoint of either kind (ckpt-N.pt or ckpt-N/) is
continued with --resume, replaced with --overwrite, or refused. Resuming takes the config saved in
the checkpoint; only the keys in CHANGEABLE_ON_RESUME may be changed, explicitly.
"""

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from config import ConfigError, TrainConfig, bundled_corpus, small_model
from data import TOKENIZER_FILE, DataError, TokenData
from infra import chat, checkpoint, hf
from infra.configurator import flat, from_dict, load_file, parse_overrides, with_values
from infra.distributed import Runtime, check_shared_files
from infra.files import error_line
from infra.prepare import check_prepared, prepare
from infra.tokenizers import load_tokenizer
from tokenizer import UserError, write_atomic

# Keys a resumed run may change: they do not alter the weights learned so far, the data order or
# the shapes in the checkpoint. The rest (model shape, data, seed, global batch, parallel mode)
# stays fixed.
CHANGEABLE_ON_RESUME = {
    "max_steps",
    "lr",
    "schedule",
    "min_lr_ratio",
    "warmup_steps",
    "cooldown_fraction",
    "weight_decay",
    "beta1",
    "beta2",
    "adam_eps",
    "grad_clip",
    "eval_interval",
    "eval_tokens",
    "log_interval",
    "ckpt_interval",
    "ckpt_every_minutes",
    "keep_checkpoints",
    "max_bad_steps",
    "sample_tokens",
    "micro_batch_size",
    "device",
    "dtype",
    "activation_checkpointing",
    "compile",
    "data_dir",
    "model.dropout",
    "tokenizer_memory_budget",
    "loggers",
}


def run_config(path: str | None, overrides: list[str]) -> TrainConfig:
    """The config file with the overrides; with init_from, the model of that folder (hf.start_from
    checks the model keys the file and the overrides set against it); with chat, a vocabulary
    that holds the chat template's tokens."""
    values = parse_overrides(list(overrides))
    config = with_values(load_file(path), {k: v for k, v in values.items() if k[:6] != "model."})
    model_values = {k[6:]: v for k, v in values.items() if k.startswith("model.")}
    if not config.init_from:
        config = with_values(config, {f"model.{k}": v for k, v in model_values.items()})
    else:
        default_model = dataclasses.asdict(small_model())
        file_values = {
            k: v for k, v in dataclasses.asdict(config.model).items() if v != default_model[k]
        }
        config = hf.start_from(config, file_values, model_values)
    return chat.chat_config(config) if config.chat else config  # rows for the template's tokens


def newest_checkpoint(out_dir) -> Path | None:
    """The newest checkpoint of either kind (ckpt-N.pt or an FSDP run's ckpt-N/): a run relaunched
    with the other parallel mode is still that run, which continues in the mode it was saved in."""
    found = checkpoint.list_checkpoints(out_dir, False) + checkpoint.list_checkpoints(out_dir, True)
    # on a tie, the training checkpoint: `--consolidate` writes ckpt-N.pt beside ckpt-N/
    return max(found, key=lambda path: (checkpoint.step_of(path), path.is_dir()), default=None)


def start_config(
    path: str | None, overrides: list[str], resume: str | None, overwrite: bool
) -> tuple[TrainConfig, Path | None, dict]:
    """The run's config, the checkpoint to resume from (None: a fresh start) and the config changes
    made on resume ({key: (old, new)}, to log)."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run and --overwrite deletes it: give one of them")
    values = parse_overrides(overrides)
    file_config = load_file(path)
    # Where the run lives: enough to look for its checkpoint (the model may come later, from
    # init_from, which a resumed run must not need).
    run = with_values(file_config, {k: v for k, v in values.items() if k[:6] != "model."})
    found = newest_checkpoint(run.out_dir)
    if resume == "yes" and found is None:
        raise ConfigError(
            f"no checkpoint in {run.out_dir} to resume; start without --resume "
            "(or use --resume=auto)"
        )
    if found is None or not resume:
        if (
            overwrite
            and run.init_from
            and Path(run.init_from).resolve() == Path(run.out_dir).resolve()
        ):
            raise ConfigError(
                "--overwrite would delete the checkpoints init_from starts from; "
                "choose another --out_dir"
            )
        if found is not None and not overwrite:
            mode = " (a parallel=fsdp run: under torchrun)" if found.is_dir() else ""
            raise ConfigError(
                f"{run.out_dir} already holds a checkpoint ({found.name}); continue "
                f"it with --resume{mode}, start over with --overwrite (deletes its "
                "checkpoints), or choose another --out_dir"
            )
        return run_config(path, overrides), None, {}
    found, saved = readable_checkpoint(run.out_dir)
    cfg, changes = resume_config(saved, values, out_dir=run.out_dir)
    ignored = [
        k
        for k, v in flat(file_config).items()
        if k not in values and v != flat(cfg)[k] and k != "out_dir"
    ]
    if ignored and path and int(os.environ.get("RANK", 0)) == 0:
        print(
            f"note: {path} differs from the checkpoint in {', '.join(ignored)}; the "
            "checkpoint's values are used (change one with --key=value)",
            file=sys.stderr,
        )
    return cfg, found, changes


def readable_checkpoint(out_dir) -> tuple[Path, dict]:
    """The newest checkpoint whose state reads, and that state. One that does not read (a disk
    that filled, a copy cut short) is moved aside to NAME.corrupt (by rank 0), never deleted, with
    a warning: a scheduler's `--resume=auto` restart loop then recovers by itself."""
    found = checkpoint.list_checkpoints(out_dir, False) + checkpoint.list_checkpoints(out_dir, True)
    for path in sorted(found, key=lambda p: (checkpoint.step_of(p), p.is_dir()), reverse=True):
        try:
            return path, checkpoint.read_train_state(path)["config"]
        except checkpoint.CorruptCheckpoint as error:
            if int(os.environ.get("RANK", 0)) == 0:
                path.rename(path.with_name(path.name + ".corrupt"))
                print(
                    f"warning: {error}; moved it aside to {path.name}.corrupt and resuming "
                    "from the newest checkpoint before it",
                    file=sys.stderr,
                )
    raise ConfigError(
        f"no readable checkpoint in {out_dir} to resume; the unreadable ones were "
        "moved aside to *.corrupt"
    )


def resume_config(saved: dict, overrides: dict, out_dir: str) -> tuple[TrainConfig, dict]:
    """The config saved in a checkpoint, in `out_dir` (where it was found, even if the folder
    moved), with the overrides that may change applied; an override of a fixed key that differs
    is an error."""
    config = dataclasses.replace(from_dict(saved), out_dir=out_dir)
    current = flat(config)
    changes = {}
    for key, value in overrides.items():
        if key == "out_dir" or value == current[key]:
            continue
        if key not in CHANGEABLE_ON_RESUME:
            raise ConfigError(
                f"--{key}={value} differs from the checkpoint's {current[key]!r}, "
                f"and {key} cannot change when resuming (the run would not continue "
                "the same training); start a new run with another --out_dir, or "
                "resume without it"
            )
        changes[key] = (current[key], value)
    return with_values(config, {key: new for key, (_, new) in changes.items()}), changes


def prepare_out_dir(cfg: TrainConfig, rt: Runtime, overwrite: bool, resuming: bool):
    """Rank 0 clears what an interrupted save left in out_dir, and with --overwrite deletes the
    previous run's checkpoints and logs (the user asked to start over); runs under the folder's
    lock. Then every rank checks that it sees the folder, and a starting run that its init_from
    weights are there (before data preparation, which can take hours)."""
    out_dir = Path(cfg.out_dir)
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial(out_dir)
        if overwrite:
            for sharded in (False, True):
                for old in checkpoint.list_checkpoints(out_dir, sharded):
                    checkpoint.delete(old)
            (out_dir / "log.jsonl").unlink(missing_ok=True)
            (out_dir / checkpoint.BEST_FILE).unlink(missing_ok=True)
            shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
        log = out_dir / "log.jsonl"
        if log.exists() and not resuming:  # a run that died before its first checkpoint
            log.rename(out_dir / f"log-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        (out_dir / ".run").write_text(f"{os.getpid()} {time.time()}")
    check_shared_files(rt, out_dir / ".run", "run folder")
    if cfg.init_from and not resuming:
        hf.check_weights(cfg.init_from, cfg.model, new_rows=cfg.chat)


def ensure_data(cfg: TrainConfig, rt: Runtime, resuming: bool):
    """Prepare the corpus on first use (rank 0, while the others wait on the host group), or check
    that the prepared folder was made with the run's settings; return its tokenizer. A resumed run
    does not read its tokenizer file again (it may be gone, with the init_from folder it came
    from): the checkpoint's tokenizer fingerprint is checked against the folder's instead."""
    failure = None
    if rt.is_main:
        settings = dict(
            vocab_size=cfg.model.vocab_size,
            tokenizer_path=None if resuming else cfg.tokenizer or None,
            val_fraction=cfg.val_fraction,
            val_max_bytes=cfg.val_max_bytes,
            tokenizer_max_bytes=cfg.tokenizer_max_bytes,
            text_field=cfg.text_field,
        )
        try:
            if cfg.chat:  # conversations, with the loss mask: infra/chat.py
                chat.prepare_conversations(cfg, resuming)
            elif (Path(cfg.data_dir) / "meta.json").exists():  # no inputs: used as it is
                check_prepared(cfg.data_dir, cfg.inputs or None, **settings)
            else:  # prepares, or resumes an unfinished prepare
                prepare(
                    cfg.inputs or bundled_corpus(),
                    cfg.data_dir,
                    **settings,
                    tokenizer_memory_budget=cfg.tokenizer_memory_budget,
                )
        except (UserError, OSError) as error:
            failure = error_line(error)
    failure = rt.broadcast(failure)
    if failure is not None:
        raise DataError(failure)
    check_shared_files(rt, Path(cfg.data_dir) / "meta.json", "prepared data")
    tokenizer = chat.attach_template(
        load_tokenizer(Path(cfg.data_dir) / TOKENIZER_FILE), cfg.data_dir
    )
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
            f"tokenizer's {tokenizer.vocab_size} tokens; set "
            f"--model.vocab_size={tokenizer.vocab_size}"
        )
    return tokenizer


def open_splits(cfg: TrainConfig) -> tuple[TokenData, TokenData]:
    """The train and val splits of the prepared data: token windows, or conversations."""
    kind = chat.ChatData if cfg.chat else TokenData
    return kind(cfg.data_dir, "train"), kind(cfg.data_dir, "val")


# ------------------------------------------------------------------------- the run's checkpoints


class Checkpointer:
    """The run's checkpoints: when to save (every ckpt_interval steps, when ckpt_every_minutes
    passed, at the end, on a stop, and at a new best val), what goes beside the weights (step, the
    config as run, elapsed time, every rank's RNG, the data's fingerprint, the best val so far),
    resuming from one, and the tokenizer copied beside them so that sample.py needs only the run
    folder. The best val's checkpoint is kept whatever keep_checkpoints says."""

    def __init__(self, cfg: TrainConfig, plan, rt: Runtime, sharded: bool, train_data, tokenizer):
        self.cfg, self.rt, self.sharded, self.tokenizer = cfg, rt, sharded, tokenizer
        self.out_dir, self.last_save = Path(cfg.out_dir), time.time()
        # the config as run: the global batch as rounded, which a resumed run continues
        config = dataclasses.replace(cfg, global_batch_tokens=plan.global_batch_tokens)
        fingerprint = train_data.meta["tokenizer_fingerprint"]
        self.data = {"tokenizer_fingerprint": fingerprint, "train_tokens": train_data.num_tokens}
        self.config = dataclasses.asdict(config)
        self.best = None  # {"step": ..., "val_bpb": ...}
        self.saved_step = None  # the step of the newest checkpoint: no rank asks the disk
        self.eval_pending = False  # a stop cut the evaluation of the saved step short

    def is_best(self, step: int, val_bpb: float) -> bool:
        """Note an evaluation; True when it is the best so far (then save it)."""
        if self.best is not None and val_bpb >= self.best["val_bpb"]:
            return False
        self.best = {"step": step, "val_bpb": val_bpb}
        return True

    def due(self, step: int) -> bool:
        minutes = self.cfg.ckpt_every_minutes  # the ranks agree on the time: rank 0's clock
        late = bool(minutes) and self.rt.broadcast(time.time() - self.last_save >= 60 * minutes)
        return step % self.cfg.ckpt_interval == 0 or step == self.cfg.max_steps or late

    def save(self, step: int, model, optimizer, elapsed_s: float) -> tuple[Path, float] | None:
        """The checkpoint of `step`, unless the newest already is (a stop right after a resume):
        its path and the seconds it took."""
        record = None
        best = self.best and checkpoint.path_for(self.out_dir, self.best["step"], self.sharded)
        if self.saved_step != step:
            began = time.time()
            state = {
                "step": step,
                "config": self.config,
                "elapsed_s": elapsed_s,
                "rng": rng_states(self.rt),
                "best": self.best,
                "eval_pending": self.eval_pending,
                **self.data,
            }
            path = checkpoint.save(
                self.out_dir,
                step,
                model,
                optimizer,
                state,
                self.sharded,
                self.cfg.keep_checkpoints,
                self.rt.host_group,
                keep_also=best,
            )
            if self.rt.is_main:
                self.tokenizer.save(self.out_dir / TOKENIZER_FILE)
                chat.save_template(self.tokenizer, self.out_dir)
            self.last_save, self.saved_step = time.time(), step
            record = path, self.last_save - began
        if self.rt.is_main and self.best and self.best["step"] == step:
            write_atomic(
                self.out_dir / checkpoint.BEST_FILE,
                json.dumps({**self.best, "checkpoint": best.name}),
            )
        return record

    def resume(self, path: Path, model, optimizer) -> tuple[int, float]:
        """Load the checkpoint at `path` into model and optimizer; (its step, its elapsed time)."""
        state = checkpoint.load(path, model, optimizer, self._check_same_data, self.rt.host_group)
        self.best, self.saved_step = state.get("best"), state["step"]
        self.eval_pending = state.get("eval_pending", False)
        restore_rng(state["rng"], self.rt, self.cfg.seed, state["step"])
        if self.rt.is_main:
            truncate_log(self.out_dir, state["step"])
        return state["step"], state.get("elapsed_s", 0.0)

    def _check_same_data(self, state: dict):
        if any(state.get(key, value) != value for key, value in self.data.items()):
            raise checkpoint.CheckpointError(
                f"the checkpoint in {self.out_dir} was trained on other data than "
                f"{self.cfg.data_dir} holds (another tokenizer or corpus)"
            )


def rng_states(rt: Runtime) -> list[dict]:
    """Every rank's RNG state (dropout differs per rank), gathered on every rank."""
    rng = {"cpu": torch.get_rng_state()}
    if rt.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(rt.device)
    if not rt.distributed:
        return [rng]
    states = [None] * rt.world_size
    dist.all_gather_object(states, rng, group=rt.host_group)
    return states


def restore_rng(states: list[dict], rt: Runtime, seed: int, step: int):
    """This rank's saved RNG state; a fresh stream for ranks the saving run did not have."""
    if rt.rank >= len(states):
        torch.manual_seed(seed + rt.rank + step)
        return
    torch.set_rng_state(states[rt.rank]["cpu"])
    if "cuda" in states[rt.rank] and rt.device.type == "cuda":
        torch.cuda.set_rng_state(states[rt.rank]["cuda"], rt.device)


def truncate_log(out_dir: Path, step: int):
    """Drop the records of steps after the checkpoint (they are replayed now, and would appear
    twice), and a last line cut short by a kill."""
    log = out_dir / "log.jsonl"
    if log.exists():
        kept = [line for line in log.read_text().splitlines() if _step_of_record(line) <= step]
        write_atomic(log, "".join(line + "\n" for line in kept))


def _step_of_record(line: str) -> float:
    """The step of a log.jsonl line; infinity for a line that is not a whole JSON record."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf
