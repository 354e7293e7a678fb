"""One-line errors for command-line programs.

Every problem a user can fix (a missing file, a bad config, a mismatched
checkpoint) is raised as :class:`UserError` with a message that names the
problem and the fix. :func:`cli_main` turns it, and any other exception, into a
single line on stderr and a non-zero exit; ``--debug`` on the command line
shows the full traceback instead.
"""
import argparse
import os
import signal
import sys
import traceback


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse help that shows defaults, except ``None`` ones (their help says what happens instead)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class UserError(Exception):
    """A problem with the user's input; printed as one line, no traceback."""


def printable(text):
    """``text`` with control characters (a raw ANSI escape from a file's bytes, say) and undecodable bytes of a
    file name written as escapes, so that an error line cannot garble the terminal."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in str(text))


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while a program was starting or running without its own handlers."""

    def __init__(self, number):
        super().__init__(signal.Signals(number).name)
        self.number = number


def _exit_now(number, frame):
    # During the imports: an exception raised inside a module being imported can come out as an ImportError
    # with a traceback, and nothing has been written yet, so end the process here and now.
    print(f"error: stopped by {signal.Signals(number).name}", file=sys.stderr, flush=True)
    os._exit(128 + number)


def _raise_stopped(number, frame):
    raise Stopped(number)


def exit_cleanly_on_signals():
    """SIGINT and SIGTERM end the program with one line and exit status 128 + the signal number.

    Called first thing by the entry scripts, before the slow imports; until the program's main function
    starts the process ends at once. From then on (:func:`stop_by_exception`, called by :func:`cli_main`) the
    signal raises :class:`Stopped` where the program is, so atomic writes remove their temporary files and
    the lock is released, instead of a KeyboardInterrupt traceback or death by SIGTERM. A training loop
    installs its own handlers (``utils.train.StopSignals``) and restores these after.
    """
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, _exit_now)


def stop_by_exception():
    """Once the imports are done: a signal that :func:`exit_cleanly_on_signals` handles raises :class:`Stopped`."""
    for number in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(number) is _exit_now:
            signal.signal(number, _raise_stopped)


def exit_interrupted(error):
    """The one line and exit status for a KeyboardInterrupt (or :class:`Stopped`) that reached the top."""
    if isinstance(error, Stopped):
        print(f"error: stopped by {error} (files are written atomically: none is left half-written)",
              file=sys.stderr, flush=True)
        sys.exit(128 + error.number)
    print("error: interrupted", file=sys.stderr)
    sys.exit(130)


def cli_main(main, argv=None):
    """Run ``main(argv)`` and exit with 0, or with 1 and one line on stderr.

    A closed stdout or stderr (``| tee`` ended by Ctrl-C) never stops the work: see utils/console.py.
    """
    from utils.console import protect_console

    argv = sys.argv[1:] if argv is None else argv
    with protect_console():
        _run(main, argv)


def _run(main, argv):
    debug = "--debug" in argv
    stop_by_exception()
    try:
        main(argv)
    except KeyboardInterrupt as error:
        exit_interrupted(error)
    except UserError as error:
        if debug:
            traceback.print_exc()
        print(f"error: {printable(error)}", file=sys.stderr)
        sys.exit(1)
    except Exception as error:  # noqa: BLE001 - last line of defence for a CLI
        if debug:
            traceback.print_exc()
        message = str(error).strip().splitlines()
        detail = printable(message[0]) if message else ""
        print(f"error: {type(error).__name__}: {detail} (run with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)
