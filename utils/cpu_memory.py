"""Keep freed memory in the process (glibc malloc) instead of returning it to the OS at every free.

glibc serves large blocks (above a threshold that adapts, from 128 KiB up to 32 MiB) with mmap and gives
them back with munmap when freed, so every activation of a CPU training step that is larger than the
threshold is a fresh mapping whose pages fault in one by one when first written: about 10% of a bf16
U-Net step on this project's machine (docs/speed.md). Raising the mmap and trim thresholds makes freed
blocks stay in the heap, where the next step's allocations of the same sizes find them.
The cost: the process keeps its peak memory until it exits. No effect outside glibc (macOS, musl).
"""
import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30         # blocks up to 1 GiB come from the heap
TRIM_THRESHOLD = (1 << 31) - 1   # never give the heap's top back


@functools.lru_cache(maxsize=1)
def retain_freed_memory():
    """Set the thresholds once per process; True where glibc accepted them."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
