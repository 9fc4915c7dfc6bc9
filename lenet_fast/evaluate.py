"""Evaluate a checkpoint: `python -m lenet_fast.evaluate --checkpoint runs/x/checkpoint.pt`

Prints test accuracy and per-class accuracy, and saves a confusion-matrix PNG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import checkpoint, cli, data
from .train import evaluate

PROG = "lenet_fast.evaluate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Test accuracy, per-class accuracy and confusion matrix.")
    p.add_argument("--checkpoint", type=cli.path_value, required=True, help="checkpoint.pt written by lenet_fast.train")
    cli.add_runtime_options(p)
    cli.add_data_options(p)
    p.add_argument("--confusion", type=cli.path_value, default=None,
                   help="confusion-matrix image: .png, or another format matplotlib writes (.pdf, .svg...) "
                        "(default: confusion.png beside the checkpoint)")
    return p


def check_confusion_path(path: Path) -> None:
    """Fail before the evaluation, not after it, if the confusion matrix cannot be saved there."""
    from matplotlib.backend_bases import FigureCanvasBase

    checkpoint.check_output_file(path, "--confusion")
    formats = FigureCanvasBase.get_supported_filetypes()
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in formats:
        named = f"format {fmt!r}" if fmt else "no extension"
        raise cli.UsageError(f"--confusion {path}: {named}; name the image .png (or {', '.join(sorted(formats))})")


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int = data.NUM_CLASSES) -> torch.Tensor:
    """counts[true, predicted]."""
    index = labels.cpu() * num_classes + predictions.cpu()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def plot_confusion(matrix: torch.Tensor, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(matrix.numpy(), cmap="Blues")
    fig.colorbar(image, ax=ax)
    n = matrix.shape[0]
    threshold = matrix.max().item() / 2
    for i in range(n):
        for j in range(n):
            value = matrix[i, j].item()
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                    color="white" if value > threshold else "black")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    checkpoint.write_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.confusion) if args.confusion else Path(args.checkpoint).with_name("confusion.png")
    try:
        model, state, device, backend = cli.load_checkpoint_model(args)
        check_confusion_path(out)
        dataset = args.dataset or state["config"].get("dataset", "mnist")
        # Never a path read from the checkpoint: the file does not decide where data is downloaded.
        root = args.data_dir or data.default_data_dir()
        images, labels = data.load_split(dataset, root, train=False, download=not args.no_download)
    except cli.ERRORS as exc:
        cli.fail(PROG, str(exc))
    test_set = data.to_device(dataset, images, labels, device)
    loss, accuracy, predictions = evaluate(model, test_set)
    matrix = confusion_matrix(test_set.labels, predictions)
    print(f"{dataset} test set: {len(test_set)} images, loss {loss:.4f}, accuracy {100 * accuracy:.2f}% "
          f"(backend {backend}, {device})")
    per_class = matrix.diag().double() / matrix.sum(1).clamp(min=1).double()
    for cls, (acc, count) in enumerate(zip(per_class.tolist(), matrix.sum(1).tolist())):
        print(f"  class {cls}: {100 * acc:6.2f}%  ({count} images)")
    plot_confusion(matrix, f"{dataset}: accuracy {100 * accuracy:.2f}%", out)
    print(f"confusion matrix: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
