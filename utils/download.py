"""Downloads into a cache folder: fetched once, written atomically, one clear line when they fail.

The folder is ``$FAST_ODE_CACHE``, else ``~/.cache/fast-ode``. A file is kept
under its own name prefixed by a hash of the whole URL, so two URLs ending in the
same name do not collide.
"""
import hashlib
import os

from tqdm import tqdm

from utils.errors import UserError
from utils.io import atomic_write

DOWNLOAD_TIMEOUT_S = (15, 60)  # (connect, read) seconds


def is_url(text):
    return text.startswith(("http://", "https://"))


def cache_folder():
    return os.environ.get("FAST_ODE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fast-ode")


def cached_path(url):
    """Where ``url`` is kept: the file's own name, prefixed by a hash of the whole URL."""
    name = os.path.basename(url.split("?")[0]) or "download"
    return os.path.join(cache_folder(), hashlib.sha1(url.encode()).hexdigest()[:8] + "-" + name)


def download(url, what, verbose=True):
    """Fetch ``url`` once into the cache (atomic write, progress bar); return the local path.

    Raises :class:`UserError` naming ``what`` and the reason when the file cannot be fetched.
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
