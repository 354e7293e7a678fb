"""Image files on disk: one list of extensions, one lister (folders and zips), one reader.

Used by the ``--data_path`` training dataset (utils/data.py) and by fid.py; the
path functions at the end serve scripts that read single files (distill.py).
Every read problem, in the header or in the pixels, is an :class:`UnreadableImage`
(a :class:`UserError`) naming the file, its reason in a few words and the fix.
"""
import contextlib
import os
import zipfile
import zlib

import numpy as np
import PIL.Image
import torch

from utils.errors import UserError, first_line
from utils.io import did_you_mean

PIL.Image.init()
# Every extension Pillow registers, as EDM's dataset (and so its fid.py) lists images.
IMAGE_EXTENSIONS = tuple(sorted(PIL.Image.EXTENSION))
IMAGE_KINDS = ".png, .jpg and the other extensions PIL reads"
# What decoding a damaged file (or a damaged zip member) raises.
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, PIL.Image.DecompressionBombError)


class UnreadableImage(UserError):
    """An image that cannot be decoded. ``label`` names the file, ``reason`` says why in a few words."""

    def __init__(self, message, label=None, reason=None):
        super().__init__(message)   # one positional argument, so a DataLoader worker can re-raise it
        self.label, self.reason = label, reason


def is_image_name(name):
    """True when the file name ends with one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def read_problem(error):
    """Why an image could not be read, in a few words."""
    if isinstance(error, PIL.UnidentifiedImageError):
        return "not an image format PIL reads"
    return first_line(error, 120)


@contextlib.contextmanager
def _decoded(open_handle, label, fix):
    """The PIL image behind ``open_handle()`` (header read, pixels on demand); a read problem inside the block
    is an :class:`UnreadableImage`."""
    try:
        with open_handle() as handle, PIL.Image.open(handle) as image:
            yield image
    except READ_ERRORS as error:
        reason = read_problem(error)
        raise UnreadableImage(f"unreadable image {label} ({reason}); {fix}", label, reason) from None


def image_problem(image,            # an opened PIL image (its header is enough)
                  label,            # how the message names the file
                  size=None,        # (width, height) it must have, or None for any
                  modes=None,       # PIL modes it may have, e.g. ("L", "RGB"), or None for any
                  size_fix="",      # what to do about a wrong size, appended after "; "
                  mode_fix=""):     # what to do about a wrong mode, appended after "; "
    """One line saying why ``image`` does not fit, or None when it does."""
    if modes is not None and image.mode not in modes:
        return f"image {label} has PIL mode {image.mode}, expected {' or '.join(modes)}" + \
            (f"; {mode_fix}" if mode_fix else "")
    if size is not None and tuple(image.size) != tuple(size):
        return f"image {label} is {image.size[0]}x{image.size[1]}, expected {size[0]}x{size[1]}" + \
            (f"; {size_fix}" if size_fix else "")
    return None


def eight_bit(image):
    """``image`` with 8-bit pixels. PIL's ``convert`` clips wider pixels to 0-255 instead of scaling them: a 16-bit
    grey image (modes ``I;16*``) would come out nearly white. So 16-bit values v become round(v / 257), the full
    range onto 0-255; 32-bit integer (``I``) and float (``F``) pixels, whose range a file does not state, are
    taken as they are when they are whole numbers in 0-255 and refused otherwise (ValueError, which a reader's
    ``open`` block reports as an unreadable image, naming the file)."""
    mode = image.mode
    # PNG and the PNM formats hold at most 16 bits: their mode-I images (a 16-bit PGM; a 16-bit PNG before
    # Pillow 10.3) are 16-bit images too
    if mode.startswith("I;16") or (mode == "I" and image.format in ("PNG", "PPM")):
        values = np.asarray(image).astype(np.uint32)
        return PIL.Image.fromarray(((values * 2 + 257) // 514).astype(np.uint8), "L")
    if mode in ("I", "F"):
        values = np.asarray(image)
        if values.size == 0:
            return image.convert("L")
        low, high = values.min(), values.max()
        kind = "integer" if mode == "I" else "float"
        if not (0 <= low and high <= 255 and np.isfinite(high)) or (mode == "F" and np.any(values != np.round(values))):
            raise ValueError(f"{kind} pixels from {low:g} to {high:g}, not whole numbers in 0-255: "
                             f"save it as an 8- or 16-bit image")
        return PIL.Image.fromarray(values.astype(np.uint8), "L")
    return image


def to_pixels(image, channels, resolution=None):
    """PIL image -> uint8 numpy [C, H, W]: grey (PIL's ``convert("L")``) for one channel, RGB for three (grey is
    repeated); resized bilinearly (PIL's, as the paper's ``transforms.Resize``) to ``resolution`` squared when
    given and different. 16-bit images are scaled to 8 bits first (:func:`eight_bit`)."""
    image = eight_bit(image)
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    if resolution is not None and image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), PIL.Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    return array.transpose(2, 0, 1)


def to_float(image, channels, resolution=None):
    """PIL image -> float32 tensor [C, H, W] in [-1, 1]: ``u8 / 127.5 - 1`` of :func:`to_pixels`."""
    return torch.from_numpy(to_pixels(image, channels, resolution).copy()).float() / 127.5 - 1   # copy: C order, writable


class ImageFiles:
    """The image files in a folder or a zip, sorted by relative path (as EDM lists them).

    Folders are searched recursively unless ``recursive=False`` (then only the
    files directly inside count). A zip is opened on first use in each process, so
    the object can go to DataLoader workers. Nothing is decoded until asked for.
    """

    def __init__(self,
                 path,                          # a folder or a .zip of images
                 what="image folder",           # how errors name it, e.g. "--im_dir folder"
                 fix="remove or regenerate it",  # what to do about an unreadable image
                 hint="",                       # what to do about a missing path, in brackets after it
                 recursive=True,                # False: only the files directly in the folder
                 zips=True):                    # False: a folder only
        self.path, self.fix = path, fix
        self._zip, self._zip_pid = None, None
        if os.path.isdir(path):
            self.is_zip = False
            if recursive:
                names = [os.path.relpath(os.path.join(root, name), path)
                         for root, _folders, files in os.walk(path) for name in files]
            else:
                names = [entry.name for entry in os.scandir(path) if entry.is_file()]
        elif zips and os.path.isfile(path) and (path.lower().endswith(".zip") or zipfile.is_zipfile(path)):
            self.is_zip = True
            try:
                names = self._archive().namelist()
            except (zipfile.BadZipFile, OSError) as error:
                raise UserError(f"cannot open zip {path} ({first_line(error)})") from None
        elif os.path.exists(path):
            raise UserError(f"{path} is neither a folder nor a .zip of images" if zips else f"{path} is not a folder")
        else:
            raise UserError(f"{what} not found: {path}{did_you_mean(path)}" + (f" ({hint})" if hint else ""))
        self.names = sorted(name for name in names if is_image_name(name))

    def __len__(self):
        return len(self.names)

    def __getstate__(self):
        return dict(self.__dict__, _zip=None, _zip_pid=None)   # an open zip is reopened where it is needed

    def _archive(self):
        if self._zip is None or self._zip_pid != os.getpid():   # a forked worker opens its own handle
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def label(self, name):
        """How messages name an image: ``folder/name``, or ``archive.zip:name``."""
        return f"{self.path}:{name}" if self.is_zip else os.path.join(self.path, name)

    def open(self, name):
        """Context manager: the PIL image ``name`` (header read, pixels decoded on use inside the block)."""
        if self.is_zip:
            return _decoded(lambda: self._archive().open(name), self.label(name), self.fix)
        return _decoded(lambda: open(os.path.join(self.path, name), "rb"), self.label(name), self.fix)

    def read_pixels(self, name, channels=3, resolution=None):
        """uint8 [C, H, W] of ``name`` (see :func:`to_pixels`)."""
        with self.open(name) as image:
            return to_pixels(image, channels, resolution)

    def read_float(self, name, channels, resolution=None):
        """float32 [C, H, W] in [-1, 1] of ``name`` (see :func:`to_float`)."""
        with self.open(name) as image:
            return to_float(image, channels, resolution)

    def close(self):
        if self._zip is not None:
            if self._zip_pid == os.getpid():
                self._zip.close()
            self._zip, self._zip_pid = None, None


def no_images(path, fix=""):
    """The :class:`UserError` for a folder or zip without image files."""
    return UserError(f"no images found in {path} (looked for {IMAGE_KINDS})" + (f"; {fix}" if fix else ""))


# ----------------------------------------------------------------------------
# Single files by path.

def open_image(path, fix="remove or regenerate it"):
    """Context manager: the PIL image at ``path`` (header read); read problems are :class:`UnreadableImage`."""
    return _decoded(lambda: open(path, "rb"), path, fix)


def read_image(path, channels, resolution=None, fix="remove or regenerate it"):
    """float32 [C, H, W] in [-1, 1] of the image at ``path`` (see :func:`to_float`)."""
    with open_image(path, fix) as image:
        return to_float(image, channels, resolution)
