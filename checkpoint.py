"""Checkpoints of a training run, always written atomically.

Single-process and DDP runs write one file, OUT_DIR/ckpt.pt (rank 0 writes it; the ranks hold
equal copies). FSDP runs write OUT_DIR/ckpt_dcp/ with torch.distributed.checkpoint: every rank
writes its own shards in parallel, and a run can resume on another number of ranks because DCP
reshards on load. `consolidate` turns ckpt_dcp/ into the single ckpt.pt that sample.py loads.

Every file is loaded with `torch.load(..., weights_only=True)`: nothing is unpickled.
"""
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

CKPT_FILE = "ckpt.pt"
DCP_DIR = "ckpt_dcp"
TRAIN_STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or does not fit the run; the message says what to do."""


def atomic_save(obj, path: Path):
    """torch.save to a temporary file, then rename: a crash mid-write leaves the old file intact."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def safe_load(path: Path) -> dict:
    """Load a checkpoint file with weights_only=True, turning any failure into a one-line error."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first or point --ckpt/out_dir at a run folder")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a damaged file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({first_line[:200]})") from None
    if not isinstance(obj, dict) or obj.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a version-{FORMAT_VERSION} checkpoint of this project")
    return obj


def exists(out_dir, sharded: bool) -> bool:
    return (Path(out_dir) / (DCP_DIR if sharded else CKPT_FILE)).exists()


def save(out_dir, model, optimizer, train_state: dict, sharded: bool):
    """Write model, optimizer and train_state (step, config, RNG, data position) to out_dir.

    Must be called on every rank. train_state must hold only tensors and plain Python values.
    """
    out_dir = Path(out_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if not sharded:
        if rank == 0:
            atomic_save({"version": FORMAT_VERSION, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), **train_state}, out_dir / CKPT_FILE)
        if dist.is_initialized():
            dist.barrier()
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp, old = out_dir / DCP_DIR, out_dir / (DCP_DIR + ".tmp"), out_dir / (DCP_DIR + ".old")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    if rank == 0:
        atomic_save({"version": FORMAT_VERSION, **train_state}, tmp / TRAIN_STATE_FILE)
        # At every moment one of ckpt_dcp/ and ckpt_dcp.old/ is complete; load looks at both.
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load(out_dir, model, optimizer, sharded: bool, check=lambda train_state: None) -> dict:
    """Restore model and optimizer in place from out_dir; return the saved train_state.

    `check(train_state)` runs before any tensor is loaded, to refuse a checkpoint of another run
    with a clear message instead of a shape mismatch from deep inside torch.
    """
    out_dir = Path(out_dir)
    if not sharded:
        state = safe_load(out_dir / CKPT_FILE)
        check(state)
        try:
            model.load_state_dict(state.pop("model"))
            optimizer.load_state_dict(state.pop("optimizer"))
        except (RuntimeError, KeyError, ValueError) as error:
            raise CheckpointError(f"{out_dir / CKPT_FILE} does not fit this model/optimizer: "
                                  f"{str(error).splitlines()[0]}") from None
        return state
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = _sharded_folder(out_dir)
    train_state = safe_load(folder / TRAIN_STATE_FILE)
    check(train_state)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return train_state


def _sharded_folder(out_dir: Path) -> Path:
    for folder in (out_dir / DCP_DIR, out_dir / (DCP_DIR + ".old")):
        if (folder / TRAIN_STATE_FILE).is_file() and (folder / ".metadata").is_file():
            return folder
    raise CheckpointError(f"no complete sharded checkpoint in {out_dir} ({DCP_DIR}/ missing or incomplete)")


def consolidate(out_dir) -> Path:
    """Gather OUT_DIR/ckpt_dcp/ into OUT_DIR/ckpt.pt (model weights, config, step), in one process.

    Only the model's tensors are read, so this needs memory for the weights alone (27 GB for 7B).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    out_dir = Path(out_dir)
    folder = _sharded_folder(out_dir)
    train_state = safe_load(folder / TRAIN_STATE_FILE)
    reader = FileSystemReader(folder)
    model_state = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
                   for key, meta in reader.read_metadata().state_dict_metadata.items()
                   if key.startswith("model.")}
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": model_state}, storage_reader=reader, no_dist=True)
    path = out_dir / CKPT_FILE
    atomic_save({"version": FORMAT_VERSION, "model": model_state, "step": train_state["step"],
                 "config": train_state["config"]}, path)
    return path
