"""Saving images: [-1, 1] float tensors to uint8 PNGs and grids."""
import os

import numpy as np
import torch
from PIL import Image

from utils.io import atomic_write


def to_uint8(images):
    """[B, C, H, W] floats in [-1, 1] -> uint8 numpy [B, H, W, C], rounded as EDM does (x * 127.5 + 128)."""
    images = (images.detach().float() * 127.5 + 128).clip(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def save_png(array_hwc, path):
    """Write one uint8 [H, W, C] image (C = 1 or 3) as PNG, atomically."""
    array = array_hwc[:, :, 0] if array_hwc.shape[2] == 1 else array_hwc
    with atomic_write(path) as handle:
        Image.fromarray(array).save(handle, format="PNG")


def make_grid(images, nrow=8, padding=2):
    """Tile [B, C, H, W] floats in [-1, 1] into one uint8 [H', W', C] array."""
    arrays = to_uint8(images)
    count, height, width, channels = arrays.shape
    ncol = min(nrow, count)
    rows = (count + ncol - 1) // ncol
    grid = np.full((rows * (height + padding) + padding, ncol * (width + padding) + padding, channels), 255, np.uint8)
    for index, array in enumerate(arrays):
        r, c = divmod(index, ncol)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        grid[top:top + height, left:left + width] = array
    return grid


def save_grid(images, path, nrow=8):
    """Save a grid of [B, C, H, W] floats in [-1, 1] as one PNG."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_png(make_grid(images, nrow), path)
