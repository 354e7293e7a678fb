"""File I/O that never damages what a run already wrote.

Every checkpoint, JSON and npz goes through :func:`atomic_write`: the bytes go
to a temporary file in the same folder, are flushed and fsynced, and only then
renamed over the destination, so a crash or a full disk mid-write leaves the
previous file intact.
"""
import contextlib
import errno
import json
import math
import os
import signal
import tempfile
import zipfile

import torch

from utils.errors import UserError, printable

_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def full_disk_error(error, path):
    """A one-line :class:`UserError` naming ``path`` when ``error`` (or an exception it wraps, as torch.save's
    ``RuntimeError: ... unexpected pos`` wraps the OSError) is a full disk or quota; otherwise None."""
    seen = set()
    while error is not None and id(error) not in seen and not isinstance(error, UserError):
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FULL:
            return UserError(f"{_FULL[error.errno]} writing {path}; the previous version of the file, if any, is "
                             f"kept: free some space and run the command again")
        error = error.__cause__ or error.__context__
    return None


def append_text(path, text):
    """Append ``text`` to a log file; a full disk is one line naming the file."""
    try:
        with open(path, "a") as handle:
            handle.write(text)
    except OSError as error:
        problem = full_disk_error(error, path)
        if problem is None:
            raise
        raise problem from None


@contextlib.contextmanager
def _staged(path, mode, done):
    """Open a temporary file next to ``path``, written and synced at the end of the block; ``done(tmp)`` then gets
    its name. Any failure removes it (a full disk is one line naming ``path``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates files readable by the owner only; give the usual permissions (0666 minus umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        done(tmp)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        problem = full_disk_error(error, path)
        if problem is None:
            raise
        raise problem from None


def atomic_write(path, mode="wb"):
    """Context manager: a temporary file next to ``path``, renamed over ``path`` on success."""
    return _staged(path, mode, lambda tmp: os.replace(tmp, os.fspath(path)))


def check_writable_file(path, option, example):
    """``path`` (the value of ``option``) must name a file in a folder this process can write, created if
    missing: checked before long work, so that its result has somewhere to go. ``example`` is a good value."""
    if not path.strip():
        raise UserError(f"{option} is empty; give the file to write, e.g. {option}={example}")
    if os.path.isdir(path):
        raise UserError(f"{option} {path} is a folder; give the file to write inside it, e.g. "
                        f"{option}={os.path.join(path, os.path.basename(example))}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"{option} {path}: cannot write into {folder} ({error.strerror or error}); choose "
                        f"another {option}") from None


def save_torch(obj, path):
    """``torch.save`` through :func:`atomic_write`."""
    with atomic_write(path) as handle:
        torch.save(obj, handle)


def save_torch_all(items):
    """``torch.save`` of every ``(obj, path)`` in ``items``, all or none: each goes to a temporary file next to its
    path, and only when all are written are they renamed over their paths, in order. A failure on the way (a full
    disk, a signal) removes the temporary files and leaves every path as it was, so a run's checkpoint files never
    get ahead of its training state, where a resume would find weights of an iteration it cannot continue from."""
    staged = []
    try:
        for obj, path in items:
            with _staged(path, "wb", lambda tmp, path=path: staged.append((tmp, os.fspath(path)))) as handle:
                torch.save(obj, handle)
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})   # no signal between
        try:
            for tmp, path in staged:
                os.replace(tmp, path)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    except BaseException:
        for tmp, _ in staged:   # those not renamed yet (a renamed one's name is gone)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def finite_json(obj):
    """``obj`` with every inf or NaN float (also numpy's, in dicts, lists and tuples) as None: JSON has no such
    numbers, and Python's ``NaN`` / ``Infinity`` tokens are refused by strict readers (JavaScript, Go, Rust)."""
    if isinstance(obj, dict):
        return {key: finite_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(value) for value in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_line(record):
    """One line of a .jsonl file: ``record`` as strict JSON (inf and NaN as null)."""
    return json.dumps(finite_json(record), allow_nan=False) + "\n"


def save_json(obj, path):
    """Write ``obj`` as indented JSON through :func:`atomic_write` (inf and NaN as null)."""
    text = json.dumps(finite_json(obj), indent=2, sort_keys=False, allow_nan=False)
    with atomic_write(path, "w") as handle:
        handle.write(text + "\n")


def _with_separators(base, rest, depth=0):
    """An existing path made of folder ``base`` and ``rest`` with ``/`` put back between folder names."""
    if depth > 8:
        return None
    if base and os.path.exists(os.path.join(base, rest)):
        return os.path.join(base, rest)
    for cut in range(1, len(rest)):
        folder = os.path.join(base, rest[:cut]) if base else rest[:cut]
        if os.path.isdir(folder):
            found = _with_separators(folder, rest[cut:], depth + 1)
            if found:
                return found
    return None


def did_you_mean(path):
    """``"; did you mean configs/cifar10_de.json?"`` when ``path`` is missing but exists with ``/`` put back.

    A Windows path such as the paper's ``configs\\cifar10_de.json`` reaches a program started from a
    POSIX shell as ``configscifar10_de.json``: the shell drops the backslashes. Returns "" otherwise.
    """
    path = os.fspath(path) if path is not None else ""
    if not path or os.path.exists(path):
        return ""
    slashed = path.replace("\\", "/")
    if slashed != path and os.path.exists(slashed):   # quoted, so the backslashes survived
        return f"; did you mean {slashed}? (this is a POSIX system: folders are separated by /)"
    # the longest existing folder at the start of the path, then the part that lost its separators
    base, rest = "", path
    parts = path.split("/")
    for count in range(len(parts) - 1, 0, -1):
        head = "/".join(parts[:count]) or "/"
        if os.path.isdir(head):
            base, rest = head, "/".join(parts[count:])
            break
    found = _with_separators(base, rest) if rest else None
    if found is None:
        return ""
    return f"; did you mean {os.path.normpath(found)}? (a Windows path loses its backslashes in a POSIX shell)"


def not_found(path, what, kind="file"):
    """The one line for ``path`` that is not the ``kind`` ("file" or "folder") it should be: missing (with
    :func:`did_you_mean`'s hint), or there but the other kind."""
    name = what.removesuffix(f" {kind}")   # "--config_de file" -> "--config_de configs is a folder, ..."
    if kind == "file" and os.path.isdir(path):
        return f"{name} {path} is a folder, not a file"
    if kind == "folder" and os.path.exists(path):
        return f"{name} {path} is a file, not a folder"
    return f"{what} not found: {path}{did_you_mean(path)}"


def load_json(path, what="JSON file"):
    """Read a JSON file; a missing or malformed file is a one-line :class:`UserError`."""
    if not os.path.isfile(path):
        raise UserError(not_found(path, what))
    try:
        with open(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{what} {path} is not valid JSON ({error})") from None


def load_problem(error):
    """The informative part of a torch.load error, in printable characters: for a refused pickle, the line after
    torch's boilerplate about ``weights_only`` (which holds a terminal escape of its own)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    for index, line in enumerate(lines):
        if marker in line:
            detail = line.split(marker, 1)[1].strip()
            lines = [detail] if detail else lines[index + 1:index + 2]
            break
    return printable(lines[0][:120]) if lines else type(error).__name__


def starts_with(path, prefixes):
    """Whether the file at ``path`` begins with one of the byte strings ``prefixes`` (its format's magic)."""
    with open(path, "rb") as handle:
        return handle.read(max(map(len, prefixes))).startswith(tuple(prefixes))


def load_torch(path, what="checkpoint", map_location="cpu"):
    """Load a torch file (weights only); missing, truncated or corrupt files give one clear line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(not_found(path, what))
    # torch.save writes a zip archive (b"PK"); before PyTorch 1.6, a pickle (protocol byte 0x80)
    if os.path.getsize(path) and not starts_with(path, (b"PK", b"\x80")):
        raise UserError(f"{what} {path} is not a PyTorch file (neither a zip archive nor a pickle); use another file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError,
            __import__("pickle").UnpicklingError) as error:
        raise UserError(f"{what} {path} is truncated or corrupt and cannot be read ({load_problem(error)}); "
                        f"use another file") from None


def strip_wrapper_prefixes(state_dict):
    """Remove DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) wrappers from keys, wherever they sit."""
    cleaned = {}
    for key, value in state_dict.items():
        parts = [part for part in key.split(".") if part not in ("module", "_orig_mod")]
        cleaned[".".join(parts)] = value
    return cleaned


def load_state_dict_strict(module, state_dict, path, what="checkpoint"):
    """``load_state_dict(strict=True)`` with a one-line error naming the first mismatches."""
    state_dict = strip_wrapper_prefixes(state_dict)
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
              for k, v in own.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}")
        if shapes:
            parts.append(f"shape mismatch (file vs config) {shapes[:3]}")
        raise UserError(f"{what} {path} does not match the network config: " + "; ".join(parts)
                        + " (check --config_de / --config_en)")
    module.load_state_dict(state_dict, strict=True)
    return module
