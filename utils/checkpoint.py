"""Checkpoint formats (compatible with the paper's) and loading network weights from any of them.

Files a training run writes:
- ``flow_model_{iter}_ema.pth`` / ``forward_model_{iter}_ema.pth``: plain EMA
  state dicts (the encoder's under the prefix ``encoder.``), as the paper's.
- ``training_state_{iter}.pth`` / ``training_state_latest.pth``: a dict with the
  paper's keys ``model_state_dict``, ``forward_model_state_dict`` (absent for
  the independent coupling), ``optimizer_state_dict`` and ``iter``, plus this
  project's ``ema_model_state_dict``, ``ema_forward_model_state_dict``,
  ``args``, ``config_de``, ``config_en``, ``rng`` and ``format``. The image
  trainer also stores ``data_order`` (global batches consumed, epoch, step in
  epoch), ``counters`` (non-finite steps so far) and ``param_checksums`` (one
  weight checksum per rank); see docs/training.md.
"""
import glob
import os
import re

from utils.errors import UserError
from utils.io import did_you_mean, load_torch, strip_wrapper_prefixes

TRAINING_STATE_FORMAT = "fast-ode-training-state-v1"   # every training state; ``task``: flow (absent), distill, reflow
LEGACY_DISTILL_FORMAT = "fast-ode-distill-state-v1"     # distill.py's own format before the one loop


def upgrade_state(state):
    """A state in an earlier format of this project as the current one (distill.py's v1: ``mode`` -> ``task``,
    its one random state -> ``rng.ranks``); other states as they are."""
    if isinstance(state, dict) and state.get("format") == LEGACY_DISTILL_FORMAT:
        return {**state, "format": TRAINING_STATE_FORMAT, "task": state["mode"],
                "rng": {"world_size": 1, "ranks": [state["rng"]]}}
    return state

# which network -> keys to try in a training state, best first
_STATE_KEYS = {
    "flow": ("ema_model_state_dict", "model_state_dict"),
    "forward": ("ema_forward_model_state_dict", "forward_model_state_dict"),
}
_FILE_PATTERNS = {"flow": r"flow_model_(\d+)_ema\.pth$", "forward": r"forward_model_(\d+)_ema\.pth$"}


def newest_numbered(folder, pattern):
    """The file in ``folder`` whose name matches ``pattern`` (one integer group) with the largest number."""
    best, best_number = None, -1
    for path in glob.glob(os.path.join(folder, "*")):
        match = re.search(pattern, os.path.basename(path))
        if match and int(match.group(1)) > best_number:
            best, best_number = path, int(match.group(1))
    return best


def is_training_state(obj):
    return isinstance(obj, dict) and "iter" in obj and any(
        key in obj for key in ("model_state_dict", "ema_model_state_dict"))


def resolve_weights_path(path, which="flow"):
    """A file as is; a run folder -> its newest ``{flow,forward}_model_{i}_ema.pth`` (or its latest training state)."""
    if os.path.isdir(path):
        found = newest_numbered(path, _FILE_PATTERNS[which])
        if found is None:
            latest = os.path.join(path, "training_state_latest.pth")
            if os.path.isfile(latest):
                return latest
            raise UserError(f"no {which}_model_*_ema.pth or training_state_latest.pth in folder {path}")
        return found
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}{did_you_mean(path)}")
    return path


def load_weights(path, which="flow"):
    """State dict of the flow (``which="flow"``) or encoder (``"forward"``) network from any supported file.

    Accepts a paper-format EMA state dict, this project's training state (the
    EMA weights are used when present), or a run folder. ``module.`` and
    ``_orig_mod.`` prefixes are removed. Returns ``(state_dict, resolved_path)``.
    """
    resolved = resolve_weights_path(path, which)
    obj = load_torch(resolved, what="checkpoint")
    if is_training_state(obj):
        for key in _STATE_KEYS[which]:
            if obj.get(key) is not None:
                return strip_wrapper_prefixes(obj[key]), resolved
        raise UserError(f"training state {resolved} holds no {which} network "
                        f"(an independent-coupling run has no encoder)")
    if not isinstance(obj, dict) or not obj or not all(hasattr(v, "shape") for v in obj.values()):
        raise UserError(f"{resolved} is not a state dict or training state of this project or the paper")
    return strip_wrapper_prefixes(obj), resolved


def saved_configs(path):
    """The network configs recorded with a checkpoint: ``(config_de, config_en, where)``.

    A training state holds its own (``config_de`` / ``config_en``); a file or run folder of
    a training or distillation run has them in the folder's ``config.json``
    (``resolved_config_de`` / ``resolved_config_en``), else in its training_state_latest.pth.
    ``(None, None, None)`` when nothing records them (e.g. a bare EMA file of the paper).
    """
    from utils.io import load_json

    if os.path.isfile(path):
        obj = load_torch(path, what="checkpoint")
        if is_training_state(obj) and isinstance(obj.get("config_de"), dict):
            return obj["config_de"], obj.get("config_en"), f"the training state {path}"
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    record_path = os.path.join(folder, "config.json")
    if os.path.isfile(record_path):
        try:
            record = load_json(record_path, "config.json")
        except UserError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("resolved_config_de"), dict):
            return record["resolved_config_de"], record.get("resolved_config_en"), f"the run's {record_path}"
    latest = os.path.join(folder, "training_state_latest.pth")
    if os.path.isdir(path) and os.path.isfile(latest):
        return saved_configs(latest)
    return None, None, None
