"""Non-finite weights are never saved (image training, distillation, the 2D example) and never sampled from.

A learning rate far too large makes the weights inf or NaN after a step whose gradient was still finite,
so skipping bad steps is not enough: each script checks the weights (and the EMA) before every save (the image
trainer and distill.py: before an iteration's first file), stops in one line and keeps the files of earlier
iterations. generate.py refuses such a checkpoint, and refuses
to report results when the samples themselves overflow.
"""
import json
import os

import numpy as np
import pytest
import torch

import distill
import generate
import train_reverse_2d_joint as script_2d
import train_reverse_img_ddp as trainer
from models import build_network, load_config
from tests.conftest import ROOT
from utils.data import write_mnist_pngs
from utils.errors import cli_main
from utils.images import save_png, to_uint8

CONFIG_DE = os.path.join(ROOT, "configs", "tiny28_de.json")
CONFIG_EN = os.path.join(ROOT, "configs", "tiny28_en.json")

pytestmark = pytest.mark.usefixtures("one_thread")


def run(main, argv, capsys):
    """(exit code, error lines) of a script's main run in this process through cli_main."""
    try:
        cli_main(main, [str(part) for part in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error")], err


def finite_file(path):
    """Whether every floating-point tensor in a saved state dict or training state is finite."""
    def tensors(obj):
        if torch.is_tensor(obj):
            yield obj
        elif isinstance(obj, dict):
            for value in obj.values():
                yield from tensors(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                yield from tensors(value)
    return all(bool(torch.isfinite(t).all()) for t in tensors(torch.load(path, weights_only=True))
               if t.is_floating_point())


def saved_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".pth"))


def strict_json(text):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_json_files_hold_no_nan_or_infinity_tokens(tmp_path):
    from utils.io import json_line, save_json
    record = {"iter": 3, "loss": float("nan"), "grad_norm": float("inf"), "kl": np.float64("-inf"),
              "nested": {"values": [1.5, float("nan"), (2, float("inf"))]}, "name": "nan"}
    expected = {"iter": 3, "loss": None, "grad_norm": None, "kl": None,
                "nested": {"values": [1.5, None, [2, None]]}, "name": "nan"}
    line = json_line(record)
    assert line.endswith("\n") and line.count("\n") == 1
    assert strict_json(line) == expected
    save_json(record, str(tmp_path / "m.json"))
    assert strict_json((tmp_path / "m.json").read_text()) == expected


def test_training_never_saves_nonfinite_weights(tmp_path, capsys):
    digits = write_mnist_pngs(str(tmp_path / "digits"), 8)
    folder = str(tmp_path / "run")
    common = ["--dataset", "folder", "--data_path", digits, "--dir", folder, "--config_de", CONFIG_DE, "--config_en",
              CONFIG_EN, "--num_workers", 0, "--batchsize", 2, "--sample_every", 1000, "--snapshot_every", 2,
              "--save_every", 2, "--log_every", 1]
    code, lines, err = run(trainer.main, common + ["--iterations", 2, "--learning_rate", "1e-3"], capsys)
    assert code == 0, err
    before = {name: os.path.getmtime(os.path.join(folder, name)) for name in saved_files(folder)}
    # the case: at 1e38 a finite gradient sends the weights to inf
    code, lines, err = run(trainer.main, common + ["--iterations", 8, "--learning_rate", "1e38", "--resume", "auto",
                                                   "--sample_every", 1], capsys)
    assert code == 1 and len(lines) == 1 and "inf or NaN" in lines[0] and "nothing was saved" in lines[0], err
    assert "last good" not in lines[0]
    for name in saved_files(folder):
        assert finite_file(os.path.join(folder, name)), name
    assert torch.load(os.path.join(folder, "training_state_latest.pth"), weights_only=True)["iter"] == 2
    assert {name: os.path.getmtime(os.path.join(folder, name)) for name in before} == before
    # the stopped iteration wrote nothing at all: no sample grid and no stats record (checked before both)
    stopped = int(lines[0].split("stopped at iteration ")[1].split(":")[0])
    assert stopped > 2
    grids = [name for name in os.listdir(folder) if name.endswith(".png")]
    assert grids and not [name for name in grids if name.endswith(f"_{stopped}.png")], grids
    with open(os.path.join(folder, "stats.jsonl")) as handle:   # strict JSON: no NaN / Infinity tokens
        records = [strict_json(line) for line in handle]
    assert [record["iter"] for record in records] == list(range(1, stopped))
    # a state holding NaN (from elsewhere) is not resumed
    state = torch.load(os.path.join(folder, "training_state_latest.pth"), weights_only=True)
    next(iter(state["ema_model_state_dict"].values())).fill_(float("nan"))
    torch.save(state, tmp_path / "diverged.pth")
    code, lines, err = run(trainer.main, common + ["--iterations", 8, "--resume", tmp_path / "diverged.pth"], capsys)
    assert code == 1 and len(lines) == 1 and "inf or NaN" in lines[0] and "ema_model_state_dict" in lines[0], err


def write_pairs(folder, count, seed):
    generator = torch.Generator().manual_seed(seed)
    os.makedirs(os.path.join(folder, "samples"))
    os.makedirs(os.path.join(folder, "zs"))
    images = to_uint8(torch.rand(count, 1, 28, 28, generator=generator) * 2 - 1)
    for k in range(count):
        save_png(images[k], os.path.join(folder, "samples", f"{k:05d}.png"))
        np.save(os.path.join(folder, "zs", f"{k:05d}.npy"),
                torch.randn(1, 28, 28, generator=generator).numpy().astype(np.float32))
    return folder


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory):
    """A smaller tiny28 config (two levels, 8 channels) and its freshly initialised weights."""
    folder = tmp_path_factory.mktemp("teacher")
    config = dict(load_config(CONFIG_DE), model_channels=8, channel_mult=[1, 2], attn_resolutions=[])
    config_path = str(folder / "small_de.json")
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    torch.manual_seed(0)
    torch.save(build_network(config).state_dict(), folder / "teacher.pth")
    return config_path, str(folder / "teacher.pth")


def test_distillation_never_saves_nonfinite_weights(tmp_path, small_teacher, capsys):
    config_path, teacher = small_teacher
    train_pairs, test_pairs = write_pairs(str(tmp_path / "train"), 8, 0), write_pairs(str(tmp_path / "test"), 4, 1)
    folder = str(tmp_path / "distilled")
    common = ["--dir", folder, "--config_de", config_path, "--ckpt", teacher, "--im_dir", f"{train_pairs}/samples",
              "--z_dir", f"{train_pairs}/zs", "--im_dir_test", f"{test_pairs}/samples", "--z_dir_test",
              f"{test_pairs}/zs", "--batchsize", 4, "--num_workers", 0, "--save_every", 2, "--eval_every", 1000,
              "--log_every", 1000]
    code, lines, err = run(distill.main, common + ["--iterations", 2, "--learning_rate", "1e-3"], capsys)
    assert code == 0, err
    code, lines, err = run(distill.main, common + ["--iterations", 12, "--learning_rate", "1e6", "--resume", "auto"],
                           capsys)
    assert code == 1 and len(lines) == 1 and "inf or NaN" in lines[0], err
    assert saved_files(folder) == ["flow_model_distilled_2.pth", "training_state_latest.pth"]
    for name in saved_files(folder):
        assert finite_file(os.path.join(folder, name)), name
    assert torch.load(os.path.join(folder, "training_state_latest.pth"), weights_only=True)["iter"] == 2
    # at 1e38 Adam's own float32 step size overflows (a RuntimeError inside torch): one line as well
    code, lines, err = run(distill.main, common + ["--iterations", 12, "--learning_rate", "1e38", "--resume", "auto"],
                           capsys)
    assert code == 1 and len(lines) == 1 and "overflows float32" in lines[0] and "--learning_rate" in lines[0], err
    assert saved_files(folder) == ["flow_model_distilled_2.pth", "training_state_latest.pth"]
    assert torch.load(os.path.join(folder, "training_state_latest.pth"), weights_only=True)["iter"] == 2


@pytest.mark.parametrize("rate, message", [("1e12", "inf or NaN"), ("1e38", "overflows float32 (learning rate 1e+38); lower --lr")])
def test_2d_never_saves_nonfinite_weights_or_metrics(tmp_path, capsys, rate, message):
    folder = tmp_path / "2d"
    code, lines, err = run(script_2d.main, ["--dir", folder, "--iterations", 20, "--lr", rate, "--eval_N", "1,2"],
                           capsys)
    assert code == 1 and len(lines) == 1 and message in lines[0], err
    assert not (folder / "metrics.json").exists()
    for name in saved_files(folder):
        assert finite_file(os.path.join(folder, name)), name


def test_generate_refuses_nonfinite_weights(tmp_path, capsys):
    state = build_network(load_config(CONFIG_DE)).state_dict()
    key = sorted(state)[3]
    state[key].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "diverged.pth")
    code, lines, err = run(generate.main, ["--dir", tmp_path / "out", "--ckpt", tmp_path / "diverged.pth",
                                           "--config_de", CONFIG_DE, "--num_samples", 2, "--N", 2], capsys)
    assert code == 1 and len(lines) == 1 and "non-finite" in lines[0] and key in lines[0], err
    assert not (tmp_path / "out" / "samples").exists()


def test_generate_never_reports_nonfinite_results(tmp_path, capsys):
    """Finite weights whose outputs overflow: the samples are inf/NaN and no result_sampling.json is written."""
    network = build_network(load_config(CONFIG_DE))
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.fill_(1e30)
    torch.save(network.state_dict(), tmp_path / "overflowing.pth")
    code, lines, err = run(generate.main, ["--dir", tmp_path / "out", "--ckpt", tmp_path / "overflowing.pth",
                                           "--config_de", CONFIG_DE, "--num_samples", 2, "--N", 2], capsys)
    assert code == 1 and len(lines) == 1 and "inf or NaN" in lines[0], err
    assert not (tmp_path / "out" / "result_sampling.json").exists()
