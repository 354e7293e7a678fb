"""The terminal side of the scripts: streams that survive a closed pipe, and progress that reaches logs.

``python train_reverse_img_ddp.py ... 2>&1 | tee log`` then Ctrl-C: the shell sends
SIGINT to both processes, ``tee`` dies first, and the next write to stdout raises
``BrokenPipeError``. A run must still save its state and finish its files, so
:func:`protect_console` wraps ``sys.stdout`` / ``sys.stderr``: the first failed
write points the stream's file descriptor at ``/dev/null`` and every later write
(also those of the interpreter at exit) goes nowhere instead of raising.

:func:`progress_bar` is a tqdm bar on a terminal, and on anything else (a file, a
pipe) a plain line every ``FAST_ODE_PROGRESS_SECONDS`` seconds (default 30) and at
the end, so that a redirected log of long work shows it advancing (work shorter than
that interval prints nothing).
"""
import contextlib
import os
import sys
import time

from tqdm import tqdm

PROGRESS_SECONDS_VARIABLE = "FAST_ODE_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 30.0


class SafeStream:
    """A text stream whose writes and flushes never raise ``OSError`` (a closed pipe, a vanished terminal)."""

    def __init__(self, stream):
        self._stream = stream
        self.broken = False

    def _give_up(self):
        """Point the descriptor at /dev/null so that buffered bytes, later writes and the exit flush succeed."""
        self.broken = True
        with contextlib.suppress(Exception):
            fd = self._stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)

    def write(self, text):
        if not self.broken:
            try:
                return self._stream.write(text)
            except OSError:   # BrokenPipeError, EIO from a closed terminal, ...
                self._give_up()
        return len(text)

    def flush(self):
        if not self.broken:
            try:
                self._stream.flush()
            except OSError:
                self._give_up()

    def isatty(self):
        if self.broken:
            return False
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def protect_console():
    """Wrap ``sys.stdout`` and ``sys.stderr`` in :class:`SafeStream` for the duration (re-entrant)."""
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, SafeStream):
        sys.stdout = SafeStream(sys.stdout)
    if not isinstance(sys.stderr, SafeStream):
        sys.stderr = SafeStream(sys.stderr)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        sys.stdout, sys.stderr = saved


def progress_seconds():
    """Seconds between progress lines in a log (``FAST_ODE_PROGRESS_SECONDS``, default 30)."""
    try:
        return max(0.0, float(os.environ.get(PROGRESS_SECONDS_VARIABLE, DEFAULT_PROGRESS_SECONDS)))
    except ValueError:
        return DEFAULT_PROGRESS_SECONDS


class LineProgress:
    """tqdm's interface (update, set_postfix, close, context manager) as plain lines for logs."""

    def __init__(self, total=None, initial=0, desc="progress", unit="it", file=None, interval=None):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.file = file
        self.interval = progress_seconds() if interval is None else interval
        self.start = self.last = time.time()
        self.initial = initial
        self.postfix = ""
        self.closed = False
        self.printed = initial

    def _line(self):
        elapsed = time.time() - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        percent = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        left = ""
        if self.total and rate > 0 and self.n < self.total:
            left = f", about {format_seconds((self.total - self.n) / rate)} left"
        postfix = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done} {self.unit}{percent}, {format_seconds(elapsed)} elapsed{left}{postfix}"

    def _print(self):
        print(self._line(), file=self.file or sys.stderr, flush=True)
        self.last, self.printed = time.time(), self.n

    def update(self, count=1):
        self.n += count
        if time.time() - self.last >= self.interval:
            self._print()

    def set_postfix(self, refresh=True, **values):
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def close(self):
        if not self.closed:
            self.closed = True
            # the end is reported once, unless the work was too short to report at all
            reported = self.printed != self.initial or time.time() - self.start >= self.interval
            if self.n != self.printed and reported:
                self._print()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __iter__(self):
        raise TypeError("LineProgress counts with update(); wrap no iterable in it")


def format_seconds(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_bar(total=None, initial=0, desc="progress", unit="it", disable=False, **tqdm_options):
    """A tqdm bar on a terminal; :class:`LineProgress` lines when stderr is a file or a pipe; nothing if
    ``disable``."""
    if disable:
        return tqdm(total=total, initial=initial, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, **tqdm_options)
    return LineProgress(total=total, initial=initial, desc=desc, unit=unit)
