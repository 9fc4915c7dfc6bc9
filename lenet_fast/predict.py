"""Classify your own digit images: `python -m lenet_fast.predict --checkpoint C img1.png img2.jpg`

Images of any size and mode are turned into MNIST's format: 28x28 grayscale,
white digit on black (`--invert` for dark ink on light paper).  An image that is
already 28x28 is used as it is; any other is cropped to its ink, scaled so the
longer side is 20 pixels and centred by its centre of mass in a 28x28 frame, as
MNIST's own digits were prepared.  A large image is decoded at a reduced size (see
`to_mnist_format`); one beyond PIL's decompression-bomb limit is reported and skipped.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np
import torch

from . import cli, data

PROG = "lenet_fast.predict"
# Images are brought down to at most this many pixels on their longer side before any
# conversion: the digit ends up 20 pixels tall, and float copies of a full-size photo
# (a 13000x13000 scan) would take gigabytes.
WORK_SIDE = 2048


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Classify digit images with a trained checkpoint.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files")
    p.add_argument("--checkpoint", type=cli.path_value, required=True, help="checkpoint.pt written by lenet_fast.train")
    p.add_argument("--invert", action="store_true", help="the images are dark ink on a light background")
    cli.add_runtime_options(p, default_device="cpu")
    return p


def _reduced_gray(image):
    """`image` as grayscale with its longer side at most WORK_SIDE.

    A JPEG is decoded at 1/2, 1/4 or 1/8 scale straight away (`draft`; it must not have
    been loaded yet); any image still too large is reduced by an integer factor right
    after decoding, before the conversions that copy it."""
    factor = -(-max(image.size) // WORK_SIDE)
    if factor > 1:
        image.draft(None, (max(1, image.width // factor), max(1, image.height // factor)))
        factor = -(-max(image.size) // WORK_SIDE)
    if factor > 1:
        try:
            image = image.reduce(factor)
        except ValueError:  # modes reduce does not take (palette, 1-bit): convert first
            image = image.convert("L").reduce(factor)
    return image.convert("L")


def to_mnist_format(image, *, invert: bool = False) -> np.ndarray:
    """A PIL image -> float32 array (28, 28) in [0, 1], white digit on black."""
    from PIL import Image, ImageOps

    gray = ImageOps.exif_transpose(_reduced_gray(image))
    if invert:
        gray = ImageOps.invert(gray)
    if gray.size == (data.IMAGE_SIZE, data.IMAGE_SIZE):
        return np.asarray(gray, dtype=np.float32) / 255.0
    pixels = np.asarray(gray, dtype=np.float32) / 255.0
    ink = np.argwhere(pixels > 0.1 * pixels.max()) if pixels.max() > 0 else np.empty((0, 2))
    if len(ink):
        (top, left), (bottom, right) = ink.min(0), ink.max(0) + 1
        gray = gray.crop((int(left), int(top), int(right), int(bottom)))
    scale = 20.0 / max(gray.size)
    size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
    digit = np.asarray(gray.resize(size, Image.Resampling.LANCZOS), dtype=np.float32).clip(0, 255) / 255.0
    frame = np.zeros((data.IMAGE_SIZE, data.IMAGE_SIZE), dtype=np.float32)
    top, left = (data.IMAGE_SIZE - size[1]) // 2, (data.IMAGE_SIZE - size[0]) // 2
    frame[top : top + size[1], left : left + size[0]] = digit
    mass = frame.sum()
    if mass > 0:  # shift the centre of mass to the centre, as MNIST did
        rows, cols = np.indices(frame.shape)
        dy = int(round(data.IMAGE_SIZE / 2 - 0.5 - (rows * frame).sum() / mass))
        dx = int(round(data.IMAGE_SIZE / 2 - 0.5 - (cols * frame).sum() / mass))
        frame = np.roll(frame, (dy, dx), axis=(0, 1))
    return frame


def read_digit(path: str, *, invert: bool = False) -> np.ndarray:
    """The image file at `path` in MNIST's format (see `to_mnist_format`).

    Raises OSError, ValueError (PIL's UnidentifiedImageError is an OSError) or PIL's
    DecompressionBombError for a file that cannot or should not be read."""
    from PIL import Image

    with warnings.catch_warnings():
        # Between PIL's limit and twice it, PIL only warns; such an image is decoded at
        # reduced size here, so the warning would only alarm.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return to_mnist_format(image, invert=invert)


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    args = build_parser().parse_args(argv)
    try:
        model, state, device, _ = cli.load_checkpoint_model(args)
    except cli.ERRORS as exc:
        cli.fail(PROG, str(exc))
    dataset = state["config"].get("dataset", "mnist")
    failures = 0
    for name in args.images:
        try:
            pixels = read_digit(name, invert=args.invert)
        except Image.DecompressionBombError as exc:
            print(f"{name}: image too large, skipped ({exc})", file=sys.stderr)
            failures += 1
            continue
        except (OSError, ValueError, MemoryError) as exc:
            print(f"{name}: cannot read image ({type(exc).__name__}: {exc})", file=sys.stderr)
            failures += 1
            continue
        x = data.normalise(dataset, torch.from_numpy(pixels)).reshape(1, 1, 28, 28).to(device)
        with torch.no_grad():
            probabilities = torch.softmax(model(x), dim=1)[0]
        label = int(probabilities.argmax())
        print(f"{name}: {label} (p={probabilities[label].item():.4f})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
