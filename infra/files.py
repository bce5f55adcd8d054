"""Files the user owns, handled so that nothing is lost: the one-line account of an error, and
(below) the crash-safe helpers for folders and files the other modules share."""

import errno
import os
from pathlib import Path

from tokenizer import write_atomic  # the one atomic write, beside the folder helpers

__all__ = ["error_line", "first_line", "fsync", "replace", "write_atomic"]


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def error_line(error: BaseException) -> str:
    """What an entry point prints for an error the user can fix: the project's own errors say what
    to do; a file-system error names the path and what to check."""
    if not isinstance(error, OSError) or error.filename is None:
        return first_line(error)
    what = f"{error.filename}: {error.strerror or first_line(error)}"
    if error.errno == errno.ENOSPC:
        return f"{what}; free space on that disk and run the same command again"
    return f"{what}; choose another path, or check that its folders exist and are writable"


def fsync(path) -> None:
    """Flush a file's data, or a folder's entries (so that a rename in it lasts), to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace(tmp, path) -> None:
    """Rename the finished file or folder tmp over path, durably: its data, then the rename."""
    fsync(tmp)
    os.replace(tmp, path)
    fsync(Path(path).parent)
