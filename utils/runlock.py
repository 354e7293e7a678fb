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
    path = os.fspath(folder)
    made_already, to_be_made = _split_existing(path)
    if os.sep == "/" and "\\" in to_be_made:
        # a Windows path: here it would make folders with backslashes in their names (a folder of that name
        # that exists already is the user's own and is used as it is)
        if re.match(r"[A-Za-z]:\\", path):
            raise UserError(f"{option} {folder} is a Windows path (a drive letter and backslashes), which this "
                            f"system does not have; write a path of this system with forward slashes")
        raise UserError(f"{option} {folder} holds a backslash, which is not a folder separator on this system; "
                        f"write the path with forward slashes "
                        f"({os.path.join(made_already, to_be_made.replace(chr(92), '/'))})")


def _components(path):
    """``path``'s components as the system walks them when ``os.makedirs`` makes it: repeated slashes and ``.``
    dropped, and a ``..`` after a folder that does not exist yet cancelling it (makedirs makes the folder, then
    steps out of it). Returns [(component, the path so far)], the first component "" for an absolute path."""
    separators = "/\\" if os.name == "nt" else "/"
    walked = []
    for index, part in enumerate(re.split(f"[{re.escape(separators)}]", path)):
        if index and part in ("", "."):
            continue
        if (part == ".." and walked and walked[-1][0] not in ("", ".", "..")
                and not os.path.lexists(walked[-1][1])):
            walked.pop()
            continue
        so_far = os.sep.join([name for name, _ in walked] + [part]) or os.sep
        walked.append((part, so_far))
    return walked


def _split_existing(path):
    """(the longest leading part of ``path`` that exists, the rest still to be made joined by "/")."""
    walked = _components(path)
    for index, (_, so_far) in enumerate(walked):
        if not os.path.lexists(so_far):
            return (walked[index - 1][1] if index else ""), "/".join(name for name, _ in walked[index:])
    return path, ""


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
    walked = _components(path)
    for index, (_, so_far) in enumerate(walked):
        if not os.path.lexists(so_far) or os.path.isdir(so_far):
            continue
        if index == len(walked) - 1:
            what = _not_a_folder(so_far)
            if what.startswith("is a file"):
                what = "exists and is not a folder"
            raise UserError(f"output folder {option} {folder} {what}; choose another {option}")
        # the folder would have to be made inside it
        raise UserError(f"output folder {option} {folder} cannot be made: {so_far} {_not_a_folder(so_far)}; "
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
