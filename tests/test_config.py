"""Config validation: random wrong keys / values always give a ConfigError (one clear line), never a crash."""
import json
import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from models import ConfigError, build_encoder, build_network, check_encoder_decoder, load_config, validate_config
from models.config import SONGUNET_KEYS
from tests.conftest import ROOT

BASE = load_config(os.path.join(ROOT, "configs", "tiny28_de.json"))
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=True)
                           | st.text(max_size=5), lambda inner: st.lists(inner, max_size=3), max_leaves=4)


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(sorted(SONGUNET_KEYS)), value=JSON_VALUES)
def test_random_values_never_crash(key, value):
    config = dict(BASE, **{key: value})
    try:
        resolved = validate_config(config, "cfg.json")
    except ConfigError as error:
        message = str(error)
        assert "\n" not in message and message.startswith("cfg.json")
        return
    # accepted: every value must then have passed its own check
    for name, (check, _, _) in SONGUNET_KEYS.items():
        assert check(resolved[name]), name


@settings(max_examples=60, deadline=None)
@given(key=st.text(min_size=1, max_size=12).filter(lambda k: k not in SONGUNET_KEYS), value=JSON_VALUES)
def test_random_unknown_keys_are_named(key, value):
    try:
        validate_config(dict(BASE, **{key: value}), "cfg.json")
    except ConfigError as error:
        assert repr(key) in str(error)
    else:
        raise AssertionError("an unknown key was accepted")


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.none(), st.integers(), st.text(), st.lists(st.integers())))
def test_non_dict_config(value):
    try:
        validate_config(value, "cfg.json")
    except ConfigError as error:
        assert "must be a JSON object" in str(error)
    else:
        raise AssertionError("a non-dict config was accepted")


def test_missing_required_key():
    config = dict(BASE)
    del config["img_resolution"]
    try:
        build_network(config)
    except ConfigError as error:
        assert "missing required key 'img_resolution'" in str(error)
    else:
        raise AssertionError("missing key accepted")


def test_resolution_must_divide_levels():
    try:
        validate_config(dict(BASE, img_resolution=30, channel_mult=[1, 2, 2]), "cfg")
    except ConfigError as error:
        assert "not divisible" in str(error)
    else:
        raise AssertionError


def test_encoder_decoder_disagreement_is_named():
    encoder = load_config(os.path.join(ROOT, "configs", "tiny32_en.json"))
    try:
        check_encoder_decoder(BASE, encoder)
    except ConfigError as error:
        assert "disagree on img_resolution: 28 vs 32" in str(error)
    else:
        raise AssertionError
    bad = dict(load_config(os.path.join(ROOT, "configs", "tiny28_en.json")), out_channels=3)
    try:
        build_encoder(bad)
    except ConfigError as error:
        assert "out_channels must be 2 x in_channels" in str(error)
    else:
        raise AssertionError


def test_malformed_json_file_is_one_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"unet_type": "songunet",')
    code = ("import sys; from utils.errors import cli_main; from models import load_config;"
            f"cli_main(lambda argv: load_config({str(path)!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.json" in lines[0] and "not valid JSON" in lines[0]
    assert "Traceback" not in result.stderr


def test_paper_configs_are_valid():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        with open(os.path.join(ROOT, "configs", name)) as handle:
            validate_config(json.load(handle), name)
