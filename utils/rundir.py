"""Does an output folder already hold a run? One answer for every script (train, distill, generate, 2D).

A script's ``--dir`` holds a record of the run that wrote it (config.json, config_sampling.json) and its
outputs (checkpoints, samples). A new run may only write there when the record describes the same run, or
when the script is told to continue it (``--resume``) or to replace it (``--overwrite``); the scripts say so
in one line. These helpers find what is there; each script words its own fix.
"""
import glob
import os

from utils.errors import UserError
from utils.io import load_json

UNREADABLE = "unreadable"


def previous_record(folder, name="config.json"):
    """The JSON record ``name`` in ``folder``: a dict, None when absent, or :data:`UNREADABLE`."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    try:
        record = load_json(path, name)
    except UserError:
        return UNREADABLE
    return record if isinstance(record, dict) else UNREADABLE


def change(key, old, new):
    """``["key old vs new"]``; for two dicts (a network config), one entry per inner key that differs
    (``"resolved_config_de.dropout 0.1 vs 0.0"``), not both whole dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [f"{key}.{inner} {old.get(inner)!r} vs {new.get(inner)!r}" for inner in sorted(set(old) | set(new))
                if old.get(inner) != new.get(inner)]
    return [f"{key} {old!r} vs {new!r}"]


def differences(previous, current, keys=None):
    """:func:`change` for each of ``keys`` (default: every key of ``current``) that ``previous`` holds with
    another value; keys the previous record lacks (written by an older version) are not differences."""
    keys = current.keys() if keys is None else keys
    return [text for key in keys if key in previous and key in current and previous[key] != current[key]
            for text in change(key, previous[key], current[key])]


def resume_changes(saved, given, keys, precision=None, reason=""):
    """The warning line for a resumed run (None: nothing to say): each of ``keys`` that ``saved`` (the state's
    options) and ``given`` (this run's) both hold with different values, as ``--key old -> new``; and, where
    ``--amp`` was given alike but ``precision`` (what it resolves to now, with ``reason``) differs from the
    state's ``amp_used`` (``--amp auto`` picks by machine), that too."""
    changed = [f"--{key} {saved[key]} -> {given[key]}" for key in keys
               if key in saved and key in given and saved[key] != given[key]]
    before = saved.get("amp_used")
    if precision is not None and before not in (None, precision) and saved.get("amp") == given.get("amp"):
        changed.append(f"--amp {given.get('amp')} now computes in {precision}, not {before}"
                       + (f" ({reason})" if reason else ""))
    return f"warning: resuming with changed arguments: {', '.join(changed)}" if changed else None


def existing_outputs(folder, patterns):
    """The files in ``folder`` matching any of the glob ``patterns`` (relative to it), sorted."""
    found = []
    for pattern in patterns:
        found.extend(glob.glob(os.path.join(folder, pattern)))
    return sorted(found)


def inside(path, folder):
    """Whether ``path`` is ``folder`` or lies inside it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_apart(out, inputs, option="--dir"):
    """The output folder must not be, or lie inside, one of the ``inputs`` ({option: folder}) that the run
    reads: its files would become inputs (a data folder is read recursively)."""
    for name, folder in inputs.items():
        if folder is not None and os.path.isdir(folder) and inside(out, folder):
            raise UserError(f"{option} {out} is inside {name} {folder}, which this run reads; its outputs would "
                            f"mix with the inputs: choose another {option}")
