"""One-line errors for command-line programs.

Every problem a user can fix (a missing file, a bad config, a mismatched
checkpoint) is raised as :class:`UserError` with a message that names the
problem and the fix. :func:`cli_main` turns it, and any other exception, into a
single line on stderr and a non-zero exit; ``--debug`` on the command line
shows the full traceback instead.
"""
import argparse
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


def _stop_on_signal(number, frame):
    name = signal.Signals(number).name
    print(f"error: stopped by {name} (files are written atomically: none is left half-written)", file=sys.stderr,
          flush=True)
    sys.exit(128 + number)


def exit_cleanly_on_signals():
    """From now on SIGINT and SIGTERM end the program with one line and exit status 128 + signal number.

    Called first thing by the entry scripts, before the slow imports: a signal during start-up (importing
    torch, loading data, building networks) then raises ``SystemExit`` where the program is, so atomic
    writes remove their temporary files, instead of a KeyboardInterrupt traceback or death by SIGTERM.
    A training loop installs its own handlers (``utils.train.StopSignals``) and restores these after.
    """
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, _stop_on_signal)


def cli_main(main, argv=None):
    """Run ``main(argv)`` and exit with 0, or with 1 and one line on stderr."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
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
