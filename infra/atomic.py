"""Files that survive a crash. A file is written under a temporary name, flushed to the disk, renamed
over the old one, and the rename flushed too: after a kill or a power loss a reader finds the old file
or the new one whole, never a part of one and never neither (XFS and NFS, unlike ext4's defaults, can
otherwise leave an empty file behind a rename). Checkpoints, shards, meta.json and tokenizers use it."""
import os
from pathlib import Path


def fsync(path):
    """Flush a file's data, or a folder's entries (so that a rename in it lasts), to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace(tmp, path):
    """Rename the finished file (or folder) tmp over path, durably: its data first, then the rename."""
    fsync(tmp)
    os.replace(tmp, path)
    fsync(Path(path).parent)


def write_text(path, text: str):
    """Replace path's content with text (UTF-8) atomically and durably."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
