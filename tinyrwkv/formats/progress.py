"""A one-line progress display for reading large files."""

from __future__ import annotations

import sys
import time

# A progress bar is drawn automatically (on a terminal) for files larger than this.
AUTO_PROGRESS_BYTES = 256 * 2**20


def stderr_is_tty():
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressBar:
    """A one-line progress display on stderr: percentage, MB done/total, MB/s.

    Draws only when the stream is a terminal (or force=True), at most ~10 times a second (plus the
    final 100%). Use as `progress(done_bytes, total_bytes)`; call close() (or use `with`) to end
    the line.
    """

    def __init__(self, label="loading", stream=None, force=False, min_interval=0.1):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = force or bool(isatty and isatty())
        self.label, self.min_interval = label, min_interval
        self.start = time.monotonic()
        self.last_draw = None
        self.drawn = False

    def __call__(self, done, total):
        if not self.enabled:
            return
        now = time.monotonic()
        finished = done >= total
        if not finished and self.last_draw is not None and now - self.last_draw < self.min_interval:
            return
        self.last_draw = now
        percent = 100.0 * done / total if total else 100.0
        rate = done / 1e6 / max(now - self.start, 1e-9)
        self.stream.write(f"\r{self.label}: {percent:5.1f}% {done / 1e6:,.1f}/{total / 1e6:,.1f} MB "
                          f"{rate:,.0f} MB/s")
        self.stream.flush()
        self.drawn = True

    def close(self):
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def choose_progress(progress, label, file_bytes):
    """The readers' `progress` argument -> (callable or None, the ProgressBar to close or None).

    None: a ProgressBar for files over AUTO_PROGRESS_BYTES when stderr is a terminal; False:
    never; True: always; a callable progress(done_bytes, total_bytes): that."""
    if progress is None:
        big = file_bytes > AUTO_PROGRESS_BYTES
        bar = ProgressBar(label=label) if big and stderr_is_tty() else None
        return bar, bar
    if progress is True:
        bar = ProgressBar(label=label)
        return bar, bar
    if progress is False:
        return None, None
    if not callable(progress):
        raise TypeError(f"progress must be None, True, False or a callable, not {progress!r}")
    return progress, None
