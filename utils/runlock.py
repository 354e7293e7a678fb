"""One owner per run folder: an OS-level lock on ``<dir>/.run.lock``, held for the life of the process.

Two processes writing into one ``--dir`` (two copies of the same command, or a
``--resume auto`` next to a running job) would interleave ``stats.jsonl``,
rewrite each other's ``config.json`` and delete each other's temporary files.
So every script that writes a run folder takes an exclusive lock on the lock
file first, before it reads or changes anything else in the folder,
and keeps it until it exits; a second process is refused in one line naming
the holder's PID and host, which the holder writes into the file.

The kernel drops the lock when the holder exits, also on ``kill -9`` or a
crash, so a lock file left behind never blocks a resume: the file itself means
nothing, only a live holder does. The lock is a POSIX record lock
(``fcntl.lockf``) rather than ``flock``: forked children (DataLoader workers)
would share an ``flock`` and keep a killed trainer's folder locked until they
notice their parent is gone (4 s measured), while a POSIX lock belongs to the
one process. (Its catch, that closing any descriptor of the file drops the
lock, is why a held folder is never opened again by its holder.) Under DDP
only rank 0 (the process that writes the folder) takes it. Across nodes it is
as good as the filesystem's lock support (NFSv4, Lustre mounted with
``flock``).
"""
import contextlib
import errno
import fcntl
import glob
import os
import re
import socket

from utils.errors import UserError

LOCK_NAME = ".run.lock"

_held = {}   # real path of a folder -> its open lock file, for the folders this process holds


def check_folder_name(folder, option="--dir"):
    """A folder name must be valid text: a non-UTF-8 name cannot be written into log.txt or config.json. A new
    folder's name must not hold a backslash where it is not a separator (a Windows path on Linux or macOS)."""
    try:
        os.fspath(folder).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fspath(folder).encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
        raise UserError(f"{option} {shown} is not a valid UTF-8 name; choose a folder name in UTF-8") from None
    if os.sep == "/" and "\\" in os.fspath(folder) and not os.path.isdir(folder):
        # a Windows path: here it would make one folder with backslashes in its name
        raise UserError(f"{option} {folder} holds a backslash, which is not a folder separator on this system; "
                        f"write the path with forward slashes ({os.fspath(folder).replace(chr(92), '/')})")


def _not_a_folder(path):
    """Why ``path``, which exists, is not a folder: a broken symbolic link or something else."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"is a broken symbolic link (to {os.readlink(path)})"
    return "is a file, not a folder"


def check_is_folder(folder, option="--dir"):
    """An output folder that exists must be a folder (not a file, not a symbolic link to nothing), and every
    folder above it that exists must be one too. The path is checked as written, component by component, the
    way the system resolves it: ``afile/`` and ``afile/../run`` name a path through a file even though
    ``os.path.abspath`` would drop the slash or the ``..``."""
    path = os.fspath(folder)
    separators = "/\\" if os.name == "nt" else "/"
    stripped = path.rstrip(separators) or path[:1]
    if os.path.lexists(stripped) and not os.path.isdir(stripped):
        what = _not_a_folder(stripped)
        if what.startswith("is a file"):
            what = "exists and is not a folder"
        raise UserError(f"output folder {option} {folder} {what}; choose another {option}")
    parts = re.split(f"[{re.escape(separators)}]", stripped)
    for k in range(1, len(parts)):
        prefix = os.sep.join(parts[:k]) or os.sep
        if parts[k - 1] in ("", ".") and prefix != os.sep:
            continue
        if os.path.lexists(prefix) and not os.path.isdir(prefix):   # the folder would have to be made inside it
            raise UserError(f"output folder {option} {folder} cannot be made: {prefix} {_not_a_folder(prefix)}; "
                            f"choose another {option}")


def holder(folder):
    """What the lock file of ``folder`` says about its holder (``"PID 12 on host x"``), or ``"unknown"``."""
    try:
        with open(os.path.join(folder, LOCK_NAME)) as handle:
            words = handle.read().split()
    except (OSError, UnicodeDecodeError):
        words = []
    if len(words) >= 2 and words[0].isdigit():
        return f"PID {words[0]} on host {words[1]}"
    return "a process that has not written its PID yet"


def acquire(folder, option="--dir"):
    """Create ``folder`` if needed and lock it for this process; a folder locked by another is a UserError.

    A folder this process already holds is left as it is; :func:`release` lets it go.
    """
    check_folder_name(folder, option)
    check_is_folder(folder, option)
    try:
        os.makedirs(folder, exist_ok=True)
        key = os.path.realpath(folder)
        if key in _held:
            return
        handle = open(os.path.join(folder, LOCK_NAME), "a+")
    except OSError as error:
        raise UserError(f"output folder {option} {folder} is not writable ({error.strerror or error}); "
                        f"choose another {option}") from None
    try:
        fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.close()
        if error.errno in (errno.EACCES, errno.EAGAIN):
            raise UserError(f"{option} {folder} is in use by another process ({holder(folder)}); wait for it to "
                            f"finish or stop it, or choose another {option}") from None
        raise UserError(f"cannot lock {option} {folder} ({error.strerror or error}); its filesystem may not "
                        f"support file locks: choose another {option}") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        handle.flush()
    except OSError:
        pass   # the lock is what counts; the PID only makes the refusal message more helpful
    _held[key] = handle
    remove_stale_temporaries(folder)


def remove_stale_temporaries(folder):
    """Delete the temporary files of atomic writes (``utils.io.atomic_write``: ``.<name>.<random>.tmp``) that a
    killed process left in ``folder`` and in its subfolders one level down (generate.py's ``samples/``, ...).
    Called by :func:`acquire` once this process holds the lock: no live writer owns them. A subfolder with a
    lock file of its own is another run's folder (a run inside this one, perhaps live): its owner cleans it."""
    for pattern in (".*.tmp", os.path.join("*", ".*.tmp")):
        for stale in glob.glob(os.path.join(glob.escape(folder), pattern)):
            parent = os.path.dirname(stale)
            if os.path.realpath(parent) != os.path.realpath(folder) and os.path.exists(os.path.join(parent,
                                                                                                  LOCK_NAME)):
                continue
            with contextlib.suppress(OSError):
                os.unlink(stale)


def release(folder):
    """Unlock ``folder`` if this process holds it (a folder not held, or None, is ignored)."""
    if folder is None:
        return
    handle = _held.pop(os.path.realpath(folder), None)
    if handle is not None:
        handle.close()   # closing the descriptor drops the lock; the file stays, it is harmless


@contextlib.contextmanager
def locked(folder, option="--dir"):
    """``with locked(folder):`` holds the lock for the block."""
    acquire(folder, option)
    try:
        yield
    finally:
        release(folder)
