"""Classify your own digit images: `python -m lenet_fast.predict --checkpoint C img1.png img2.jpg`

Images of any size and mode are turned into MNIST's format: 28x28 grayscale,
white digit on black (`--invert` for dark ink on light paper).  An image that is
already 28x28 is used as it is; any other is cropped to its ink, scaled so the
longer side is 20 pixels and centred by its centre of mass in a 28x28 frame, as
MNIST's own digits were prepared.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from . import checkpoint, cli, data

PROG = "lenet_fast.predict"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Classify digit images with a trained checkpoint.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by lenet_fast.train")
    p.add_argument("--invert", action="store_true", help="the images are dark ink on a light background")
    cli.add_runtime_options(p, default_device="cpu")
    return p


def to_mnist_format(image, *, invert: bool = False) -> np.ndarray:
    """A PIL image -> float32 array (28, 28) in [0, 1], white digit on black."""
    from PIL import Image, ImageOps

    gray = ImageOps.exif_transpose(image).convert("L")
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


def main(argv: list[str] | None = None) -> int:
    from PIL import Image, UnidentifiedImageError

    args = build_parser().parse_args(argv)
    try:
        model, state, device, _ = cli.load_checkpoint_model(args)
    except (cli.UsageError, checkpoint.CheckpointError) as exc:
        cli.fail(PROG, str(exc))
    dataset = state["config"].get("dataset", "mnist")
    failures = 0
    for name in args.images:
        try:
            with Image.open(name) as image:
                pixels = to_mnist_format(image, invert=args.invert)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
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
