"""Stack PNG figures top to bottom into one PNG (white padding where widths differ).

The README's 2D figure is the independent run's overview above the learned run's:

    python train_reverse_2d_joint.py --dir runs/2d
    python train_reverse_2d_joint.py --dir runs/2d-independent --independent
    python benchmarks/stack_images.py docs/images/2d_trajectories.png runs/2d-independent/overview.png \
        runs/2d/overview.png --overwrite

An existing destination is replaced only with ``--overwrite`` (the destination comes first; with the order
mixed up, the first image would be written over).
"""
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.errors import exit_cleanly_on_signals  # noqa: E402

if __name__ == "__main__":
    exit_cleanly_on_signals()   # SIGINT/SIGTERM: one line and temporary files removed, not a traceback

from utils.errors import ArgumentParser, UserError, cli_main  # noqa: E402
from utils.io import atomic_write, did_you_mean  # noqa: E402


def stack(paths):
    """One RGB image: the images at ``paths`` from top to bottom, left-aligned."""
    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"image not found: {path}{did_you_mean(path)}")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except OSError as error:
            raise UserError(f"cannot read image {path} ({error})") from None
    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    top = 0
    for image in images:
        canvas.paste(image, (0, top))
        top += image.height
    return canvas


def main(argv):
    parser = ArgumentParser("benchmarks/stack_images.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", help="the PNG to write")
    parser.add_argument("images", nargs="+", help="PNGs to stack, top first")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DEST if it exists (without it, an existing DEST is an error and is kept)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    args = parser.parse_args(argv)
    inputs = [path for path in args.images if os.path.exists(path) and os.path.exists(args.dest)
              and os.path.samefile(path, args.dest)]
    if inputs:
        raise UserError(f"the PNG to write, {args.dest}, is also an image to stack; the destination comes first: "
                        f"python benchmarks/stack_images.py DEST IMAGE [IMAGE ...]")
    if os.path.isdir(args.dest):   # a folder is never replaced, --overwrite or not
        raise UserError(f"the PNG to write, {args.dest}, is a folder; give a file name")
    if os.path.lexists(args.dest) and not args.overwrite:
        raise UserError(f"the PNG to write, {args.dest}, exists; the destination comes first (python "
                        f"benchmarks/stack_images.py DEST IMAGE [IMAGE ...]); add --overwrite to replace it")
    canvas = stack(args.images)
    with atomic_write(args.dest) as handle:
        canvas.save(handle, format="PNG")
    print(f"wrote {args.dest} ({canvas.width}x{canvas.height}) from {len(args.images)} images")


if __name__ == "__main__":
    cli_main(main)
