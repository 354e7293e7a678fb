"""Property-based: every numeric option of every script, given finite, infinite, NaN, huge or negative values,
gives a clean run or one ``error:`` line, never a traceback.

Most examples go through each script's own argument parsing and checking in this process (cheap); a few
run the scripts end to end on tiny configs with the options that do not change how long a run takes. The
examples are derandomized, so every run of the suite tries the same values.
"""
import contextlib
import io
import json
import math
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import distill
import fid
import generate
import train_reverse_2d_joint as script_2d
import train_reverse_img_ddp as trainer
from models import build_network, load_config
from tests.conftest import ROOT
from tests.test_fid import ChannelMeans, save_torchscript, write_constant_images
from utils.data import write_mnist_pngs
from utils.errors import UserError, cli_main
from utils.images import save_png, to_uint8

CONFIG_DE = os.path.join(ROOT, "configs", "tiny28_de.json")
CONFIG_EN = os.path.join(ROOT, "configs", "tiny28_en.json")

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
RUNS = settings(QUICK, max_examples=5)

# What a user might type for a number: the edges of float and int parsing, and random ones.
SPECIAL = ["inf", "-inf", "nan", "NaN", "1e400", "-1e400", "1e308", "1e38", "1e-320", "0", "-0", "-1", "0.5",
           str(2**31), str(2**32), str(2**63), str(2**64), str(-(2**64)), str(10**30), "1e3"]
VALUES = st.one_of(st.sampled_from(SPECIAL), st.integers(-(2**80), 2**80).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))


# Values that parse, for whole runs: the interesting ones get past argparse.
FLOATS = st.one_of(st.sampled_from(["inf", "-inf", "nan", "1e38", "1e30", "1e308", "1e-30", "0", "-1"]),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))
INTS = st.one_of(st.sampled_from([str(2**64), str(-(2**64)), str(2**32), str(2**32 - 1), str(1 - 2**32), "0", "-1"]),
                 st.integers(-(2**70), 2**70).map(str))


def typed_assignments(floats, ints):
    """One to three (option, value) pairs whose values parse as the option's type."""
    pair = st.one_of(*([st.tuples(st.sampled_from(floats), FLOATS)] if floats else []),
                     *([st.tuples(st.sampled_from(ints), INTS)] if ints else []))
    return st.lists(pair, min_size=1, max_size=3)


def numeric_options(parser):
    """The parser's options that take an int or a float."""
    return sorted(action.option_strings[0] for action in parser._actions
                  if action.option_strings and action.type in (int, float))


def assignments(options):
    """One to three (option, value) pairs, values as typed on a command line."""
    return st.lists(st.tuples(st.sampled_from(options), VALUES), min_size=1, max_size=3)


def flatten(pairs):
    return [part for pair in pairs for part in pair]


def float_options(parser):
    return [action.dest for action in parser._actions if action.type is float]


def parse_then_check(parse, floats, check, argv):
    """The script's own parsing and checks: one UserError line (from argparse, pointing at --help, or from the
    checks), or arguments that are usable: every float finite and the seed in range (an inf learning rate only
    fails later)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parse(argv)
    except UserError as error:
        assert "\n" not in str(error) and str(error).endswith("--help)") and not stderr.getvalue(), str(error)
        return
    try:
        check(args)
    except UserError as error:
        assert str(error) and "\n" not in str(error)
        return
    # options left unset are None; the paper's unused flags (a warning says they have no effect) may hold anything
    used = [name for name in floats if getattr(args, name) is not None and name not in trainer.PAPER_ONLY_ARGS]
    assert all(math.isfinite(getattr(args, name)) for name in used), vars(args)
    assert abs(args.seed) < 2**32


def run_script(main, argv):
    """A whole run in this process: exit 0, or exit 1 with exactly one ``error:`` line and no traceback."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            cli_main(main, argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    lines = [line for line in stderr.getvalue().splitlines() if "error:" in line]
    # an unexpected exception is also one line, but one that points to --debug: not a clean error
    assert "Traceback" not in stderr.getvalue() and "--debug for the traceback" not in stderr.getvalue()
    assert (code, len(lines)) in ((0, 0), (1, 1)), (code, stderr.getvalue()[-2000:])
    return code


def all_saved_weights_finite(folder):
    for name in os.listdir(folder):
        if name.endswith(".pth"):
            state = torch.load(os.path.join(folder, name), weights_only=True)
            tensors = [value for value in (state.get("model_state_dict") or state).values() if torch.is_tensor(value)]
            assert all(bool(torch.isfinite(value).all()) for value in tensors if value.is_floating_point()), name


# ----------------------------------------------------------------------------
# Inputs shared by the examples.

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("inputs")
    digits = write_mnist_pngs(str(base / "digits"), 8)
    torch.manual_seed(0)
    network = build_network(load_config(CONFIG_DE))
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    torch.save(network.state_dict(), base / "flow.pth")
    small = dict(load_config(CONFIG_DE), model_channels=8, channel_mult=[1, 2], attn_resolutions=[])
    with open(base / "small_de.json", "w") as handle:
        json.dump(small, handle)
    torch.save(build_network(small).state_dict(), base / "small.pth")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("test", 4)):
        for folder in ("samples", "zs"):
            os.makedirs(base / split / folder)
        images = to_uint8(torch.rand(count, 1, 28, 28, generator=generator) * 2 - 1)
        for k in range(count):
            save_png(images[k], str(base / split / "samples" / f"{k:05d}.png"))
            np.save(base / split / "zs" / f"{k:05d}.npy", torch.randn(1, 28, 28, generator=generator).numpy())
    return {"base": base, "digits": digits, "flow": str(base / "flow.pth"), "small_config": str(base / "small_de.json"),
            "small": str(base / "small.pth")}


def fresh_dir(inputs):
    return tempfile.mkdtemp(dir=inputs["base"], prefix="run-")


def train_argv(inputs, folder):
    return ["--dataset", "folder", "--data_path", inputs["digits"], "--dir", folder, "--config_de", CONFIG_DE,
            "--config_en", CONFIG_EN, "--num_workers", "0", "--batchsize", "2"]


def generate_argv(inputs, folder):
    return ["--dir", folder, "--ckpt", inputs["flow"], "--config_de", CONFIG_DE, "--num_samples", "2", "--N", "3"]


def distill_argv(inputs, folder):
    base = inputs["base"]
    return ["--dir", folder, "--config_de", inputs["small_config"], "--ckpt", inputs["small"],
            "--im_dir", str(base / "train" / "samples"), "--z_dir", str(base / "train" / "zs"),
            "--im_dir_test", str(base / "test" / "samples"), "--z_dir_test", str(base / "test" / "zs"),
            "--batchsize", "4", "--num_workers", "0"]


# ----------------------------------------------------------------------------
# Each script's checks, in this process.

TRAIN_PARSER, GENERATE_PARSER, DISTILL_PARSER = trainer.build_parser(), generate.build_parser(), distill.build_parser()
OPTIONS_2D = ["--N", "--lr", "--weight_prior", "--batchsize", "--iterations", "--seed", "--ot_batch", "--eval_N",
              "--ot_reg"]


@QUICK
@given(pairs=assignments(numeric_options(TRAIN_PARSER)))
@example(pairs=[("--learning_rate", "inf")])
@example(pairs=[("--seed", str(2**64))])
def test_train_numeric_options(inputs, pairs):
    parse_then_check(trainer.parse_args, float_options(TRAIN_PARSER), trainer.check_args,
                     train_argv(inputs, fresh_dir(inputs)) + flatten(pairs))


@QUICK
@given(pairs=assignments(numeric_options(GENERATE_PARSER)), solver=st.sampled_from(["euler", "heun", "rk45"]))
@example(pairs=[("--atol", "inf")], solver="rk45")
def test_generate_numeric_options(inputs, pairs, solver):
    argv = generate_argv(inputs, fresh_dir(inputs)) + ["--solver", solver] + flatten(pairs)
    parse_then_check(generate.parse_args, float_options(GENERATE_PARSER), generate.check_args, argv)


@QUICK
@given(pairs=assignments(numeric_options(DISTILL_PARSER)), mode=st.sampled_from(["distill", "reflow"]))
@example(pairs=[("--learning_rate", "inf")], mode="distill")
def test_distill_numeric_options(inputs, pairs, mode):
    argv = distill_argv(inputs, fresh_dir(inputs)) + ["--mode", mode] + flatten(pairs)
    parse_then_check(distill.parse_args, float_options(DISTILL_PARSER), distill.check_args, argv)


@QUICK
@given(pairs=assignments(OPTIONS_2D), coupling=st.sampled_from(["learned", "independent", "ot", "sinkhorn"]))
@example(pairs=[("--lr", "inf")], coupling="learned")
@example(pairs=[("--weight_prior", "nan")], coupling="learned")
def test_2d_numeric_options(pairs, coupling):
    parse_then_check(script_2d.parse_args, ["lr", "weight_prior", "ot_reg"], script_2d.resolve,
                     ["--coupling", coupling] + flatten(pairs))


@settings(QUICK, max_examples=25)
@given(pairs=st.lists(st.tuples(st.sampled_from(["--num", "--seed", "--batch"]), VALUES), min_size=1, max_size=3))
@example(pairs=[("--seed", str(2**64))])
def test_fid_numeric_options(tmp_path_factory, pairs):
    """fid.py calc end to end with a stand-in detector (channel means): cheap enough to run every example.
    (click already checked these before this issue; a regression guard.)"""
    base = tmp_path_factory.getbasetemp() / "fid-options"
    if not base.exists():
        write_constant_images(base / "images", np.random.default_rng(0).integers(20, 200, (6, 3)))
        np.savez(base / "ref.npz", mu=np.full(3, 100.0), sigma=np.eye(3))
        save_torchscript(ChannelMeans(), base / "means.pt")
    argv = ["calc", f"--images={base / 'images'}", f"--ref={base / 'ref.npz'}", f"--detector={base / 'means.pt'}",
            "--device=cpu", "--num=4"] + [f"{option}={value}" for option, value in pairs]
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(stderr), \
            contextlib.redirect_stdout(io.StringIO()):
        fid.main(argv)
    lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    assert "Traceback" not in stderr.getvalue() and "--debug for the traceback" not in stderr.getvalue()
    assert (exit_info.value.code, len(lines)) in ((0, 0), (1, 1)), stderr.getvalue()


# ----------------------------------------------------------------------------
# Whole runs with the options that do not change a run's length: clean, and never a non-finite file.

@settings(RUNS, max_examples=8)
@given(pairs=typed_assignments(["--learning_rate", "--weight_prior", "--ema_decay", "--grad_clip"],
                               ["--seed", "--warmup_steps", "--ema_after_steps", "--max_nonfinite", "--log_every",
                                "--save_every", "--snapshot_every"]))
def test_train_runs_cleanly_with_any_value(inputs, pairs):
    folder = fresh_dir(inputs)
    run_script(trainer.main, train_argv(inputs, folder) + ["--iterations", "3", "--sample_every", "1000"]
               + flatten(pairs))
    all_saved_weights_finite(folder)


@RUNS
@given(pairs=typed_assignments(["--learning_rate"], ["--seed", "--log_every", "--eval_every", "--save_every"]))
@example(pairs=[("--seed", str(2**64))])
def test_distill_runs_cleanly_with_any_value(inputs, pairs):
    folder = fresh_dir(inputs)
    run_script(distill.main, distill_argv(inputs, folder) + ["--iterations", "3"] + flatten(pairs))
    all_saved_weights_finite(folder)


@RUNS
@given(pairs=typed_assignments([], ["--seed"]), solver=st.sampled_from(["euler", "heun"]))
def test_generate_runs_cleanly_with_any_seed(inputs, pairs, solver):
    run_script(generate.main, generate_argv(inputs, fresh_dir(inputs)) + ["--solver", solver] + flatten(pairs))


@pytest.mark.parametrize("script, options, expected_code", [
    ("train_reverse_img_ddp.py", ["--learning_rate", "nan"], 1),
    ("generate.py", ["--seed", str(2**64)], 1),
    ("train_reverse_2d_joint.py", ["--lr=-inf"], 1),
    ("train_reverse_2d_joint.py", ["--seed", "-1", "--iterations", "2", "--eval_N", "1"], 0),
])
def test_scripts_as_commands(inputs, script, options, expected_code):
    """A few of the cases above as real commands: the exit status and the one line are what a user sees."""
    import subprocess
    import sys
    folder = fresh_dir(inputs)
    argv = {"train_reverse_img_ddp.py": train_argv(inputs, folder) + ["--iterations", "1"],
            "generate.py": generate_argv(inputs, folder), "distill.py": distill_argv(inputs, folder),
            "train_reverse_2d_joint.py": ["--dir", folder]}[script]
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv, *options], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == expected_code and len(lines) == expected_code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "--debug for the traceback" not in result.stderr
