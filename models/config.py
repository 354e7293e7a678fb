"""Validation of the JSON network configs (the paper's ``configs/*.json`` format)."""
import numbers

from utils.errors import UserError


class ConfigError(UserError, ValueError):
    """An invalid network config; a ``ValueError`` for library users, one line for CLI users."""


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_list(value):
    return isinstance(value, (list, tuple)) and all(_is_int(v) and v > 0 for v in value)


# key: (check, description of a valid value, default or REQUIRED)
REQUIRED = object()
SONGUNET_KEYS = {
    "unet_type":          (lambda v: isinstance(v, str), "a string", REQUIRED),
    "img_resolution":     (lambda v: _is_int(v) and v >= 4, "an integer >= 4", REQUIRED),
    "in_channels":        (lambda v: _is_int(v) and v >= 1, "a positive integer", REQUIRED),
    "out_channels":       (lambda v: _is_int(v) and v >= 1, "a positive integer", REQUIRED),
    "label_dim":          (lambda v: v == 0, "0 (class-conditional models are not supported)", 0),
    "augment_dim":        (lambda v: v == 0, "0 (augmentation labels are not supported)", 0),
    "model_channels":     (lambda v: _is_int(v) and v >= 4, "an integer >= 4", 128),
    "channel_mult":       (lambda v: _int_list(v) and len(v) >= 1, "a non-empty list of positive integers", [1, 2, 2, 2]),
    "channel_mult_emb":   (lambda v: _is_int(v) and v >= 1, "a positive integer", 4),
    "num_blocks":         (lambda v: _is_int(v) and v >= 1, "a positive integer", 4),
    "attn_resolutions":   (lambda v: _int_list(v), "a list of positive integers", [16]),
    "dropout":            (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)", 0.10),
    "label_dropout":      (lambda v: v == 0, "0", 0),
    "embedding_type":     (lambda v: v == "positional", '"positional" (DDPM++)', "positional"),
    "channel_mult_noise": (lambda v: _is_int(v) and v >= 1, "a positive integer", 1),
    "encoder_type":       (lambda v: v == "standard", '"standard" (DDPM++)', "standard"),
    "decoder_type":       (lambda v: v == "standard", '"standard" (DDPM++)', "standard"),
    "resample_filter":    (lambda v: _int_list(v) and len(v) >= 1, "a list of positive integers", [1, 1]),
    "num_params":         (lambda v: True, "anything (ignored)", None),
}
SUPPORTED_UNET_TYPES = ("songunet",)
KNOWN_UNSUPPORTED = {"adm": "the ADM U-Net (unet_type \"adm\") is not supported; use \"songunet\""}


def validate_config(config, name="config"):
    """Check a network config dict; return a complete copy with defaults filled in.

    Raises :class:`ConfigError` naming the first problem: not a dict, unknown
    ``unet_type``, unknown key, missing key, or a value of the wrong type/range.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"{name} must be a JSON object, got {type(config).__name__}")
    unet_type = config.get("unet_type", None)
    if not isinstance(unet_type, str):
        raise ConfigError(f"{name}: 'unet_type' must be a string naming the network; known: "
                          f"{', '.join(SUPPORTED_UNET_TYPES)}")
    if unet_type in KNOWN_UNSUPPORTED:
        raise ConfigError(f"{name}: {KNOWN_UNSUPPORTED[unet_type]}")
    if unet_type not in SUPPORTED_UNET_TYPES:
        raise ConfigError(f"{name}: unknown unet_type {unet_type!r}; known: {', '.join(SUPPORTED_UNET_TYPES)}")
    unknown = [key for key in config if key not in SONGUNET_KEYS]
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"accepted keys: {', '.join(SONGUNET_KEYS)}")
    resolved = {}
    for key, (check, description, default) in SONGUNET_KEYS.items():
        if key not in config:
            if default is REQUIRED:
                raise ConfigError(f"{name}: missing required key {key!r} ({description})")
            resolved[key] = default
            continue
        value = config[key]
        try:
            ok = bool(check(value))
        except Exception:  # noqa: BLE001 - any failure of a check means the value is wrong
            ok = False
        if not ok:
            raise ConfigError(f"{name}: key {key!r} must be {description}, got {value!r}")
        resolved[key] = value
    levels = len(resolved["channel_mult"])
    if resolved["img_resolution"] % (1 << (levels - 1)):
        raise ConfigError(f"{name}: img_resolution {resolved['img_resolution']} is not divisible by "
                          f"2^{levels - 1} for {levels} levels of channel_mult")
    return resolved


def load_config(path, role="--config_de"):
    """Read and validate a network config file; every problem is one :class:`UserError` line naming the file."""
    from utils.io import load_json

    return validate_config(load_json(path, what=f"{role} file"), name=f"{role} {path}")


def check_encoder_decoder(config_de, config_en, names=("--config_de", "--config_en")):
    """The encoder must see the decoder's images and emit mu and logvar for them."""
    if config_en["out_channels"] != 2 * config_en["in_channels"]:
        raise ConfigError(f"{names[1]}: out_channels must be 2 x in_channels = {2 * config_en['in_channels']} "
                          f"(mu and logvar), got {config_en['out_channels']}")
    for key in ("img_resolution", "in_channels"):
        if config_de[key] != config_en[key]:
            raise ConfigError(f"{names[0]} and {names[1]} disagree on {key}: {config_de[key]} vs {config_en[key]}; "
                              f"use a matching pair such as configs/cifar10_de.json + configs/cifar10_en.json")
    if config_de["out_channels"] != config_de["in_channels"]:
        raise ConfigError(f"{names[0]}: the velocity network needs out_channels = in_channels "
                          f"({config_de['in_channels']}), got {config_de['out_channels']}")


def resolve_image_options(args, config, config_path, where=None):
    """``--res`` / ``--input_nc`` default to the config's values and must agree with it when given.

    ``where`` names the config in messages (default: ``--config_de <config_path>``)."""
    where = where or f"--config_de {config_path}"
    for option, key in (("res", "img_resolution"), ("input_nc", "in_channels")):
        given = getattr(args, option)
        if given is None:
            setattr(args, option, config[key])
        elif given != config[key]:
            raise ConfigError(f"--{option} {given} disagrees with {key} = {config[key]} in {where}; omit "
                              f"--{option} or use a matching config")


def config_differences(first, second):
    """``["key first-value vs second-value", ...]`` for the keys in which two validated configs differ."""
    return [f"{key} {first.get(key)!r} vs {second.get(key)!r}" for key in sorted(set(first) | set(second))
            if first.get(key) != second.get(key)]
