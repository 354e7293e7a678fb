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


def save_labelled_grid(images,          # uint8 arrays [H, W] or [H, W, C], one size
                       labels,          # one caption per image, e.g. "seed 3"
                       title,           # a line above the grid (solver, NFE, checkpoint)
                       path,            # where the PNG goes (written atomically)
                       columns=8,       # images per row
                       min_tile=64):    # small images are enlarged (nearest) to at least this width
    """One PNG of images in rows, each with its caption underneath, and a title line on top."""
    from PIL import ImageDraw, ImageFont

    arrays = [np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else
              (np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a[:, :, :3]) for a in images]
    scale = max(1, -(-min_tile // arrays[0].shape[1]))
    arrays = [a.repeat(scale, axis=0).repeat(scale, axis=1) for a in arrays]
    height, width = arrays[0].shape[:2]
    caption, top, padding = 14, 18, 4
    columns = min(columns, len(arrays))
    rows = -(-len(arrays) // columns)
    canvas = Image.new("RGB", (padding + columns * (width + padding),
                               top + rows * (height + caption + padding)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((padding, 3), title, fill="black", font=font)
    for index, (array, label) in enumerate(zip(arrays, labels)):
        row, column = divmod(index, columns)
        left, upper = padding + column * (width + padding), top + row * (height + caption + padding)
        canvas.paste(Image.fromarray(array), (left, upper))
        draw.text((left, upper + height + 1), label, fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as handle:
        canvas.save(handle, format="PNG")
