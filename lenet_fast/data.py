"""MNIST-format datasets held as one normalised tensor on the training device.

torchvision's dataset classes find (and, when allowed, download) the IDX files;
their uint8 tensors are taken once, moved to the device, normalised there, and
batches are slices of that tensor: no per-sample PIL transforms, no DataLoader
workers.  For LeNet on MNIST the whole training set is 47 MB as float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Iterator

import torch

# name -> (torchvision class name, mean, std); mean/std are the training split's pixel statistics.
DATASETS = {
    "mnist": ("MNIST", 0.1307, 0.3081),
    "fashion-mnist": ("FashionMNIST", 0.2860, 0.3530),
    "kmnist": ("KMNIST", 0.1918, 0.3483),
}
SPLIT_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SIZE = 28
NUM_CLASSES = 10
# Seconds a download may wait for the server at each step (connect, each read): a network
# that never answers then fails with the offline instructions instead of hanging.
DOWNLOAD_TIMEOUT = 30.0


class DatasetError(RuntimeError):
    """The dataset cannot be used; the message is a paragraph meant for the user."""


class DatasetNotFoundError(DatasetError):
    pass


class DatasetCorruptError(DatasetError):
    pass


def default_data_dir() -> Path:
    """$LENET_FAST_DATA, else the user cache directory ($XDG_CACHE_HOME or ~/.cache)/lenet_fast."""
    if os.environ.get("LENET_FAST_DATA"):
        return Path(os.environ["LENET_FAST_DATA"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lenet_fast"


def raw_folder(name: str, root: str | os.PathLike) -> Path:
    """Where torchvision looks for the uncompressed IDX files of `name` under `root`."""
    return Path(root) / DATASETS[name][0] / "raw"


def _not_found_message(name: str, root: Path, reason: str) -> str:
    folder = raw_folder(name, root)
    files = [f for split in (True, False) for f in SPLIT_FILES[split]]
    return (
        f"The {name} dataset is not in {folder} ({reason}). Put its four IDX files there, "
        f"uncompressed ({', '.join(files)}; gunzip the .gz files from the dataset's site), "
        f"or run once with internet access and without --no-download so torchvision fetches them. "
        f"Choose another data directory with --data-dir or the LENET_FAST_DATA environment variable."
    )


def check_idx_file(path: Path, ndim: int) -> tuple[int, ...]:
    """Validate an IDX file of unsigned bytes: magic number, rank and size; return its dims.

    A truncated download or a wrong file then fails here with the file named,
    instead of deep inside a reshape.
    """
    if not path.is_file():
        raise DatasetCorruptError(f"{path} is not a file (a folder?); it should be an IDX file of the dataset.")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(4)
            if len(header) < 4 or header[:3] != b"\x00\x00\x08":
                raise DatasetCorruptError(f"{path} is not an IDX file of unsigned bytes (bad magic number {header!r}).")
            if header[3] != ndim:
                raise DatasetCorruptError(f"{path} has {header[3]} dimensions, expected {ndim}.")
            raw_dims = f.read(4 * ndim)
    except OSError as exc:
        raise DatasetCorruptError(f"{path} cannot be read: {exc.strerror or exc}.") from None
    if len(raw_dims) < 4 * ndim:
        raise DatasetCorruptError(f"{path} is truncated inside its header ({size} bytes).")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    expected = 4 + 4 * ndim + int(torch.tensor(dims).prod().item())
    if size != expected:
        raise DatasetCorruptError(
            f"{path} is truncated or corrupt: its header says {dims}, which needs {expected} bytes, "
            f"but the file has {size}. Delete it and download it again."
        )
    return dims


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """Sockets opened inside (torchvision downloads through urllib, which has no timeout of its
    own) give up after `seconds` of silence; the process's default is restored after."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _cause(exc: BaseException) -> BaseException:
    """What went wrong underneath urllib's URLError (a timeout, a refused connection...)."""
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, BaseException) else exc


def fetch(name: str, root: str | os.PathLike) -> None:
    """Fetch the dataset's missing files from torchvision's mirrors into its raw folder,
    saying what comes from where; raises DatasetNotFoundError with the offline instructions.

    The same files, mirrors and checksums as torchvision's own download, but a mirror that
    does not answer within DOWNLOAD_TIMEOUT ends the download: the next would wait as long."""
    import urllib.error

    import torchvision.datasets
    from torchvision.datasets.utils import download_and_extract_archive

    root = Path(root).expanduser()
    cls = getattr(torchvision.datasets, DATASETS[name][0])
    folder = raw_folder(name, root)
    for filename, md5 in cls.resources:
        if (folder / filename.removesuffix(".gz")).is_file():
            continue
        errors = []
        for mirror in cls.mirrors:
            url = f"{mirror}{filename}"
            print(f"lenet_fast: downloading {url} into {folder} (timeout {DOWNLOAD_TIMEOUT:g} s)",
                  file=sys.stderr, flush=True)
            try:
                with _socket_timeout(DOWNLOAD_TIMEOUT):
                    download_and_extract_archive(url, download_root=str(folder), filename=filename, md5=md5)
                break
            except (urllib.error.URLError, OSError, RuntimeError) as exc:
                cause = _cause(exc)
                errors.append(f"{url}: {type(cause).__name__}: {' '.join(str(cause).split())}")
                if isinstance(cause, TimeoutError):
                    raise DatasetNotFoundError(_not_found_message(
                        name, root, f"the download got no answer within {DOWNLOAD_TIMEOUT:g} s: {errors[-1]}")) from None
        else:
            raise DatasetNotFoundError(_not_found_message(name, root, f"the download failed: {'; '.join(errors)}"))


def load_split(name: str, root: str | os.PathLike, *, train: bool, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of one split, via torchvision."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    import torchvision.datasets

    root = Path(root).expanduser()
    cls = getattr(torchvision.datasets, DATASETS[name][0])
    images_path, labels_path = (raw_folder(name, root) / f for f in SPLIT_FILES[train])
    if not (images_path.exists() and labels_path.exists()):
        if not download:
            raise DatasetNotFoundError(_not_found_message(name, root, "downloading is off (--no-download)"))
        fetch(name, root)
    image_dims = check_idx_file(images_path, 3)
    label_dims = check_idx_file(labels_path, 1)
    if image_dims[1:] != (IMAGE_SIZE, IMAGE_SIZE) or image_dims[0] != label_dims[0]:
        raise DatasetCorruptError(
            f"{images_path} holds images of shape {image_dims} but {labels_path} holds {label_dims[0]} labels; "
            f"expected N images of 28x28 and N labels."
        )
    if image_dims[0] == 0:
        raise DatasetCorruptError(f"{images_path} holds no images (its header says {image_dims}).")
    try:
        dataset = cls(str(root), train=train, download=False)
    except Exception as exc:
        raise DatasetCorruptError(
            f"torchvision could not read {images_path} and {labels_path}: {type(exc).__name__}: {exc}") from exc
    images, labels = dataset.data, dataset.targets.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DatasetCorruptError(f"{labels_path} has labels outside 0..{NUM_CLASSES - 1}.")
    return images, labels


@dataclasses.dataclass
class DeviceData:
    """A split held on the device: normalised images (N, 1, 28, 28) and labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def batches(
        self, batch_size: int, *, order: torch.Tensor | None = None, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in `order` (a permutation of the indices; None = as stored), from batch `start`.

        The last batch is smaller when batch_size does not divide N.
        """
        n = len(self)
        if order is not None:
            order = order.to(self.images.device)
        for begin in range(start * batch_size, n, batch_size):
            if order is None:
                yield self.images[begin : begin + batch_size], self.labels[begin : begin + batch_size]
            else:
                index = order[begin : begin + batch_size]
                yield self.images.index_select(0, index), self.labels.index_select(0, index)


def shuffle_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation used in `epoch`: a function of (seed, epoch) alone, so a run resumed at
    any epoch, or mid-epoch, sees exactly the batches the uninterrupted run saw."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def to_device(name: str, images: torch.Tensor, labels: torch.Tensor, device: torch.device | str) -> DeviceData:
    """Move uint8 images to the device once and normalise them there."""
    _, mean, std = DATASETS[name]
    x = images.to(device, non_blocking=True).unsqueeze(1).float().div_(255.0).sub_(mean).div_(std)
    return DeviceData(x.contiguous(), labels.to(device, non_blocking=True))


def normalise(name: str, images_01: torch.Tensor) -> torch.Tensor:
    """Images scaled to [0, 1] -> the network's input scale for dataset `name`."""
    _, mean, std = DATASETS[name]
    return (images_01 - mean) / std


def load(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    download: bool = True,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> tuple[DeviceData, DeviceData]:
    """(train, test) splits of `name` on `device`; `limit_train`/`limit_test` keep the first N images."""
    root = default_data_dir() if root is None else root
    train_images, train_labels = load_split(name, root, train=True, download=download)
    test_images, test_labels = load_split(name, root, train=False, download=download)
    if limit_train is not None:
        train_images, train_labels = train_images[:limit_train], train_labels[:limit_train]
    if limit_test is not None:
        test_images, test_labels = test_images[:limit_test], test_labels[:limit_test]
    return to_device(name, train_images, train_labels, device), to_device(name, test_images, test_labels, device)
