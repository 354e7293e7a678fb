"""One-line errors for command-line programs.

Every problem a user can fix (a missing file, a bad config, a mismatched
checkpoint) is raised as :class:`UserError` with a message that names the
problem and the fix. :func:`cli_main` turns it, and any other exception, into a
single line on stderr and a non-zero exit; ``--debug`` on the command line
shows the full traceback instead.
"""
import argparse
import sys
import traceback


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse help that shows defaults, except ``None`` ones (their help says what happens instead)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class UserError(Exception):
    """A problem with the user's input; printed as one line, no traceback."""


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
    try:
        main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except UserError as error:
        if debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except Exception as error:  # noqa: BLE001 - last line of defence for a CLI
        if debug:
            traceback.print_exc()
        message = str(error).strip().splitlines()
        detail = message[0] if message else ""
        print(f"error: {type(error).__name__}: {detail} (run with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)
