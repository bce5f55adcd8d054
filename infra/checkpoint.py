"""Checkpoints of a training run: named by step, the newest few kept, always written atomically.

Single-process and DDP runs write OUT/ckpt-000200.pt (rank 0 writes it; the ranks hold equal
copies). FSDP runs write the folder OUT/ckpt-000200/ with torch.distributed.checkpoint: every
rank writes its own shards in parallel, and a run can resume on another number of ranks because
DCP reshards on load. `consolidate` gathers the newest such folder into ckpt-000200.pt (the
model alone), which sample.py loads.

A checkpoint is written under a temporary name, fsynced, then renamed, and only then are the
oldest beyond `keep` deleted: a crash at any moment leaves every earlier checkpoint intact, and
resume takes the newest complete one. Every file is loaded with `torch.load(...,
weights_only=True)`: nothing is unpickled.
"""

import fcntl
import json
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from infra import files
from infra.files import first_line
from tokenizer import UserError

TRAIN_STATE_FILE = "train_state.pt"
BEST_FILE = "best.json"  # which checkpoint holds the run's best val: `--ckpt RUN/best` reads it
FORMAT_VERSION = 1
_NAME = re.compile(r"ckpt-(\d+)(\.pt)?")


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or does not fit the run; its message says what to
    do."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint file that cannot be read at all (cut short, overwritten): resume moves it
    aside and takes the one before."""


def dcp_failure(error: BaseException) -> str:
    """One line for a failure of torch.distributed.checkpoint: its CheckpointException (a
    BaseException in torch 2.13) holds each failed rank's error; the first one's first line."""
    failures = getattr(error, "failures", None)
    if not failures:
        return first_line(error)
    rank, failure = min(failures.items(), key=lambda item: item[0])
    cause = failure[0] if isinstance(failure, tuple) else failure  # (error, its traceback)
    return f"rank {rank}: {first_line(cause)}"


def _dcp(call, *args, **kwargs):
    """A torch.distributed.checkpoint call; its failures (a full disk, a missing shard) become
    one line."""
    try:
        return call(*args, **kwargs)
    except BaseException as error:  # torch's CheckpointException is not an Exception
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(
            f"a sharded checkpoint failed ({dcp_failure(error)[:300]}); if a disk "
            "is full, free space and resume (older checkpoints are kept)"
        ) from None


def path_for(out_dir, step: int, sharded: bool) -> Path:
    return Path(out_dir) / f"ckpt-{step:06d}{'' if sharded else '.pt'}"


def step_of(path: Path) -> int:
    return int(_NAME.fullmatch(Path(path).name).group(1))


def list_checkpoints(out_dir, sharded: bool) -> list[Path]:
    """The complete checkpoints of one kind in out_dir (files, or DCP folders when sharded),
    oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for path in out_dir.iterdir():
        match = _NAME.fullmatch(path.name)
        if not match or bool(match.group(2)) == sharded:
            continue
        complete = (
            ((path / ".metadata").is_file() and (path / TRAIN_STATE_FILE).is_file())
            if sharded
            else path.is_file()
        )
        if complete:
            found.append(path)
    return sorted(found, key=step_of)


def older_than(path: Path) -> Path | None:
    """The newest checkpoint of either kind before `path` in its folder: what to use instead of a
    damaged one."""
    folder, step = Path(path).parent, step_of(path)
    found = [
        p
        for p in list_checkpoints(folder, False) + list_checkpoints(folder, True)
        if step_of(p) < step
    ]
    return max(found, key=step_of, default=None)


def best(run_dir) -> Path | None:
    """The checkpoint of the run's best val, which best.json names (train.py writes it)."""
    pointer = Path(run_dir) / BEST_FILE
    if not pointer.is_file():
        return None
    return Path(run_dir) / json.loads(pointer.read_text())["checkpoint"]


def latest(out_dir, sharded: bool) -> Path | None:
    checkpoints = list_checkpoints(out_dir, sharded)
    return checkpoints[-1] if checkpoints else None


@contextmanager
def lock(out_dir):
    """An exclusive lock on out_dir, held by rank 0 for the whole run: two runs writing the same
    checkpoints (or one deleting the other's partial save, remove_partial) would lose work."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / ".lock", "w") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(
                f"another run is using {out_dir} (it holds {Path(out_dir) / '.lock'}); "
                "wait for it to finish or choose another --out_dir"
            ) from None
        yield


def delete(path: Path):
    """Remove a checkpoint: a file, or a sharded checkpoint's folder."""
    shutil.rmtree(path) if Path(path).is_dir() else Path(path).unlink()


def atomic_save(obj, path: Path):
    """torch.save to a temporary file, fsync, rename: a crash mid-write leaves any old file intact.
    A write that fails (torch reports a full disk as "unexpected pos") is a one-line error."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        files.replace(tmp, path)
    except RuntimeError as error:
        free = shutil.disk_usage(path.parent).free
        raise CheckpointError(
            f"could not write {path} ({first_line(error)}); {free / 2**30:.1f} GiB "
            "are free there: if the disk is full, free space and resume (the "
            "previous checkpoint is kept)"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def remove_partial(out_dir):
    """Delete what an interrupted save left behind (a SIGKILL skips every cleanup). Only the run
    that owns out_dir may call this, or it would delete another run's save in progress."""
    for path in Path(out_dir).glob("ckpt-*.tmp"):  # ckpt-N.tmp/ folders and ckpt-N.pt.tmp files
        delete(path)


def safe_load(path: Path, mmap: bool = False) -> dict:
    """Load a checkpoint file with weights_only=True, turning any failure into a one-line error.
    mmap=True maps the tensors instead of reading them (to look at the step and config only)."""
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; train first or point --ckpt/out_dir at a run folder"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many kinds for a damaged file
        raise CorruptCheckpoint(
            f"checkpoint {path} is corrupt or not a checkpoint ({first_line(error)[:200]})"
        ) from None
    if not isinstance(obj, dict) or obj.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a version-{FORMAT_VERSION} checkpoint of this project"
        )
    return obj


def read_train_state(path: Path) -> dict:
    """Step, config and RNG states of a checkpoint, without reading its tensors."""
    path = Path(path)
    if path.is_dir():
        return safe_load(path / TRAIN_STATE_FILE)
    state = safe_load(path, mmap=True)
    return {k: v for k, v in state.items() if k not in ("model", "optimizer")}


def save(
    out_dir,
    step: int,
    model,
    optimizer,
    train_state: dict,
    sharded: bool,
    keep: int,
    group=None,
    keep_also: Path | None = None,
) -> Path:
    """Write model, optimizer and train_state (step, config, RNG) as the checkpoint of `step`, then
    delete the oldest of its kind beyond the newest `keep`, except `keep_also` (the best one).
    Called on every rank; `group` is the process group to wait on (a gloo group with a long timeout:
    deleting an old 7B checkpoint takes a while). train_state must hold only tensors and plain
    Python values.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = path_for(out_dir, step, sharded)
    if not sharded:
        if rank == 0:
            atomic_save(
                {
                    "version": FORMAT_VERSION,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    **train_state,
                },
                final,
            )
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        tmp = final.with_name(final.name + ".tmp")
        model_state, optimizer_state = get_state_dict(model, optimizer)
        # DCP's own collectives on the host group: a slow filesystem must not trip NCCL's watchdog
        _dcp(
            dcp.save,
            {"model": model_state, "optimizer": optimizer_state},
            checkpoint_id=tmp,
            process_group=group,
        )  # fsyncs its files
        dist.barrier(group)
        if rank == 0:
            atomic_save({"version": FORMAT_VERSION, **train_state}, tmp / TRAIN_STATE_FILE)
            files.replace(tmp, final)
    if rank == 0:
        for old in list_checkpoints(out_dir, sharded)[:-keep]:
            if old != keep_also:
                delete(old)
    if dist.is_initialized():
        dist.barrier(group)
    return final


def load(path: Path, model, optimizer, check=lambda train_state: None, group=None) -> dict:
    """Restore model and optimizer in place from the checkpoint at `path`; return its train_state.

    `check(train_state)` runs before any tensor is loaded, to refuse a checkpoint of another run
    with a clear message instead of a shape mismatch from deep inside torch. `group` is the
    process group DCP waits on (the host group, as in `save`). A file is memory-mapped: every rank
    of a DDP run reads it, and only the pages it copies are read.
    """
    path = Path(path)
    if path.is_file():
        state = safe_load(path, mmap=True)
        check(state)
        if "optimizer" not in state:
            raise CheckpointError(
                f"{path} holds only model weights (a consolidated or exported checkpoint); "
                "resume from a training checkpoint, or start from it with --init_from"
            )
        try:
            model.load_state_dict(state.pop("model"))
            optimizer.load_state_dict(state.pop("optimizer"))
        except (RuntimeError, KeyError, ValueError) as error:
            raise CheckpointError(
                f"{path} does not fit this model/optimizer: {first_line(error)}"
            ) from None
        return state
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    train_state = safe_load(path / TRAIN_STATE_FILE)
    check(train_state)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    _dcp(dcp.load, state, checkpoint_id=path, process_group=group)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    return train_state


def consolidate(path) -> Path:
    """Gather a sharded checkpoint RUN/ckpt-N/ (`path` itself, or the newest of the run folder
    `path`) into RUN/ckpt-N.pt (model weights, config, step), in one process. Only the model's
    tensors are read, so this needs memory for the weights alone (27 GB for 7B)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    out_dir = Path(path)
    folder = out_dir if (out_dir / ".metadata").is_file() else latest(out_dir, sharded=True)
    if folder is None:
        raise CheckpointError(f"no complete sharded checkpoint (ckpt-N/ folder) in {out_dir}")
    train_state = safe_load(folder / TRAIN_STATE_FILE)
    reader = FileSystemReader(folder)
    model_state = {
        key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith("model.")
    }
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point
        warnings.simplefilter("ignore", UserWarning)
        _dcp(dcp.load, {"model": model_state}, storage_reader=reader, no_dist=True)
    target = path_for(folder.parent, step_of(folder), sharded=False)
    atomic_save(
        {
            "version": FORMAT_VERSION,
            "model": model_state,
            "step": train_state["step"],
            "config": train_state["config"],
        },
        target,
    )
    return target
