"""The progress line of a long job on stderr: done/total, the rate and the time left, rewritten in
place at most once a second, and warnings and notes printed between its updates on lines of their
own."""

import sys
import time


class Progress:
    """`label: done/total MB  rate MB/s  ETA seconds`, for work counted in bytes; with another
    unit (merges, say), `label: done/total  rate unit/s  ETA seconds`."""

    line_open = False  # a progress line is on the screen without its newline yet

    def __init__(self, label: str, total: int, done: int = 0, verbose: bool = True, unit="MB"):
        self.label, self.total, self.first, self.done = label, total, done, done
        self.verbose, self.unit = verbose, unit
        self.start = self.last = time.time()

    def update(self, done: int, final: bool = False):
        """Show that `done` (bytes, or units) are done (final: the last update, which ends the
        line)."""
        self.done = done
        now = time.time()
        if not self.verbose or (not final and now - self.last < 1):
            return
        self.last = now
        rate = (done - self.first) / max(now - self.start, 1e-9)
        eta = max(self.total - done, 0) / rate if rate and not final else 0
        if self.unit == "MB":
            counts = f"{done / 1e6:.1f}/{self.total / 1e6:.1f} MB  {rate / 1e6:.2f} MB/s"
        else:
            counts = f"{done:,}/{self.total:,}  {rate:,.0f} {self.unit}/s"
        print(
            f"\r{self.label}: {counts}  ETA {eta:4.0f}s",
            end="\n" if final else "",
            file=sys.stderr,
            flush=True,
        )
        Progress.line_open = not final

    def add(self, nbytes: int, final: bool = False):
        """Show that nbytes more are done."""
        self.update(self.done + nbytes, final)

    @classmethod
    def end_line(cls):
        """End an open progress line, so that what is printed next starts on a line of its own."""
        if cls.line_open:
            print(file=sys.stderr)
            cls.line_open = False


def warn(message: str):
    note(f"warning: {message}")


def note(message: str):
    """A line of its own on stderr, below an open progress line."""
    Progress.end_line()
    print(message, file=sys.stderr, flush=True)
