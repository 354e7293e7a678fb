"""One-line errors for command-line programs.

Every problem a user can fix (a missing file, a bad config, a mismatched
checkpoint) is raised as :class:`UserError` with a message that names the
problem and the fix. :func:`cli_main` turns it, and any other exception, into a
single line on stderr and a non-zero exit; ``--debug`` on the command line
shows the full traceback instead.
"""
import argparse
import atexit
import contextlib
import os
import signal
import sys
import threading
import time
import traceback


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse help that shows defaults, except ``None`` ones (their help says what happens instead)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class UserError(Exception):
    """A problem with the user's input; printed as one line, no traceback."""


class _StoreOnce(argparse._StoreAction):
    """argparse's ``store``, except that an option given under two of its names with different values (``--dir a
    ... --outdir b``) is a usage error instead of the last one silently winning. The same name given again keeps
    argparse's rule, the last one wins (``alias x='python train.py --batchsize 64'``, then ``x --batchsize 32``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        names = namespace.__dict__.setdefault("_given_options", {}).setdefault(self.dest, {})   # {name: last value}
        names[option_string] = values
        for other, value in names.items():
            if other != option_string and value != values:
                raise argparse.ArgumentError(self, f"given twice with different values ({other} {value}, then "
                                                   f"{option_string} {values}); give it once")
        super().__call__(parser, namespace, values, option_string)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with this project's errors: a usage problem (an unknown option, an invalid choice, a missing
    value) raises :class:`UserError`, so :func:`cli_main` prints it as one ``error:`` line that points at
    ``--help`` and exits 1, like every check made after parsing (argparse's own way is its usage block and exit
    2). ``--help`` still prints the help and exits 0. ``prog`` is the command as the docs write it
    (``generate.py``, ``benchmarks/throughput.py``); help shows defaults (:class:`HelpFormatter`)."""

    def __init__(self, prog, **options):
        options.setdefault("formatter_class", HelpFormatter)
        super().__init__(prog=prog, **options)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        parsed.__dict__.pop("_given_options", None)
        return parsed, rest

    def error(self, message):
        if _torchrun_local_rank() not in (None, 0):
            raise UsageReportedByLocalRank0()
        raise UserError(f"{message} (see python {self.prog} --help)")

    def defaults(self, names):
        """{name: its default} for the options ``names`` (an option this parser lacks: None)."""
        return {name: self.get_default(name) for name in names}


class AlreadyReported(Exception):
    """The error was printed already (by another process of the same torchrun job): exit 1, print nothing."""


class UsageReportedByLocalRank0(AlreadyReported):
    """A usage error under torchrun, on a process other than its node's first: every rank parses the same
    command line, so the node's local rank 0 prints the one line and this one exits 1 quietly, once local rank
    0 has had the time to print (torchrun stops the other processes when the first one exits)."""


def _torchrun_local_rank():
    """This process's LOCAL_RANK under torchrun (None outside it)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        return None   # torchrun sets all three; RANK alone (a shell's export, another launcher) is not torchrun
    try:
        return int(os.environ["LOCAL_RANK"])
    except ValueError:
        return None


USAGE_WAIT_SECONDS = 5.0   # how long a quiet rank waits for its local rank 0 (which exits at once) to print


def _exit_quietly_after_the_first_rank():
    def silent(number, frame):
        os._exit(1)

    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, silent)
    time.sleep(USAGE_WAIT_SECONDS)
    sys.exit(1)


def printable(text):
    """``text`` with control characters (a raw ANSI escape from a file's bytes, say) and undecodable bytes of a
    file name written as escapes, so that an error line cannot garble the terminal."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in str(text))


def first_line(error, limit=200):
    """The first line of an exception's message (at most ``limit`` printable characters), or its type's name."""
    lines = str(error).strip().splitlines()
    return printable(lines[0][:limit]) if lines else type(error).__name__


def user_message(error):
    """The message of a :class:`UserError`. One raised in a DataLoader worker comes back re-raised in the main
    process with the worker's whole traceback as its message ("Caught UserError in DataLoader worker process
    0. Original Traceback ..."); its own message is the traceback's last line."""
    text = str(error)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        _, found, message = text.rstrip().splitlines()[-1].partition(f"{type(error).__name__}: ")
        if found:
            return message
    return text


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
    if not _quiet["registered"]:
        # registered before the slow imports, so it runs after their atexit handlers (last in, first out)
        atexit.register(_ignore_signals_in_finalisation)
        _quiet["registered"] = True


def stop_by_exception():
    """Once the imports are done: a signal that :func:`exit_cleanly_on_signals` handles raises :class:`Stopped`."""
    for number in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(number) is _exit_now:
            signal.signal(number, _raise_stopped)


@contextlib.contextmanager
def signals_end_blocking_wait():
    """SIGINT and SIGTERM end the process at once, with one line, while the main thread waits inside a C++ call.

    Python runs a signal's handler only when the main thread is back in Python bytecode, and a process group's
    rendezvous (``init_process_group``) blocks in C++ until every rank has joined or its timeout: when one
    rank of a torchrun job stops with an error before joining, torchrun sends the others SIGTERM, which they
    then ignored until its SIGKILL 30 s later. Python's C-level handler also writes the signal's number to
    the wake-up fd (``signal.set_wakeup_fd``), and the wait releases the GIL, so a thread reading that fd
    ends the process. The main thread blocks the two signals meanwhile (the watcher takes them), so that they
    do not interrupt the wait's own system calls: c10d would log a retry warning with a C++ stack trace for
    an interrupted connect. For waits before a program writes anything: there is nothing to clean up (the run
    folder's lock goes with the process). Outside the main thread, it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = {int(number) for number in (signal.SIGINT, signal.SIGTERM) if callable(signal.getsignal(number))}
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch():
        while True:
            data = os.read(read_fd, 64)
            if not data:   # the write end closed: the wait is over
                return
            for number in data:
                if number in handled:
                    print(f"error: stopped by {signal.Signals(number).name}", file=sys.stderr, flush=True)
                    os._exit(128 + number)

    watcher = threading.Thread(target=watch, name="signal-watch", daemon=True)
    watcher.start()   # before the mask: a thread starts with its creator's
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        os.close(write_fd)
        watcher.join()
        os.close(read_fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


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


def click_main(group, prog_name, argv=None):
    """:func:`cli_main` for a click command group: no arguments shows the help; a usage error is one line that
    points at ``--help``; Ctrl-C (which click turns into ``Abort``) is an interruption; errors exit with 1."""
    import click

    def run(args):
        try:
            status = group.main(args=args, prog_name=prog_name, standalone_mode=False)
        except click.Abort as error:
            if isinstance(error.__cause__, KeyboardInterrupt):
                raise error.__cause__ from None
            raise UserError("aborted") from None
        except click.UsageError as error:
            if _torchrun_local_rank() not in (None, 0):   # as ArgumentParser.error: one line per node
                raise UsageReportedByLocalRank0() from None
            command = error.ctx.command_path if error.ctx is not None else prog_name
            raise UserError(f"{error.format_message()} (see python {command} --help)") from None
        except click.ClickException as error:
            raise UserError(error.format_message()) from None
        sys.exit(status or 0)

    cli_main(run, list(sys.argv[1:] if argv is None else argv) or ["--help"])


_quiet = {"handler": None, "registered": False}


def _ignore_signals_in_finalisation():
    # The last atexit handler: what remains is the interpreter's own teardown (modules, libtorch's destructors,
    # up to a few seconds with a large heap), during which Python resets its handlers to the default: a
    # SIGTERM there would kill the finished process. Python leaves an ignored signal ignored.
    for number in (signal.SIGINT, signal.SIGTERM):
        if _quiet["handler"] is not None and signal.getsignal(number) is _quiet["handler"]:
            signal.signal(number, signal.SIG_IGN)


def quiet_after_work(status=0):
    """From here on SIGINT and SIGTERM end the process at once with ``status`` and one note, for the teardown
    after a program finished (its work done, or its error reported): raising :class:`Stopped` there would
    surface as "Exception ignored in ..." from whatever teardown runs (DataLoader workers, atexit), and
    nothing is left to save. ``cli_main`` calls it when the main function returns or fails."""
    if threading.current_thread() is not threading.main_thread():
        return
    # status 0 also ends a run stopped by a first signal (its state saved): not "finished", but nothing left to save
    what = ("its files were already written (a stopped run had saved its state)" if status == 0
            else "the error above was the outcome")

    def finished(number, frame):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            print(f"note: {signal.Signals(number).name} while exiting; {what}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        os._exit(status)

    for number in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(number) in (_raise_stopped, _exit_now):
            signal.signal(number, finished)
            _quiet["handler"] = finished


def _run(main, argv):
    debug = "--debug" in argv
    stop_by_exception()
    try:
        main(argv)
        quiet_after_work()
    except SystemExit as error:
        if error.code in (None, 0):
            quiet_after_work()
        raise
    except KeyboardInterrupt as error:
        exit_interrupted(error)
    except UsageReportedByLocalRank0:
        _exit_quietly_after_the_first_rank()
    except AlreadyReported:
        quiet_after_work(1)
        sys.exit(1)
    except UserError as error:
        if debug:
            traceback.print_exc()
        print(f"error: {printable(user_message(error))}", file=sys.stderr)
        quiet_after_work(1)
        sys.exit(1)
    except Exception as error:  # noqa: BLE001 - last line of defence for a CLI
        if debug:
            traceback.print_exc()
        message = str(error).strip().splitlines()
        detail = printable(message[0]) if message else ""
        print(f"error: {type(error).__name__}: {detail} (run with --debug for the traceback)",
              file=sys.stderr)
        quiet_after_work(1)
        sys.exit(1)
