"""lenet_fast.data: IDX files the test writes itself, corrupt and missing files, real MNIST."""

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import write_idx, write_synthetic_mnist
from lenet_fast import data

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_DATA = Path(os.environ.get("LENET_FAST_DATA") or SHARED_DATA)


def test_loads_small_idx_files(tmp_path):
    write_synthetic_mnist(tmp_path, n_train=50, n_test=20)
    images, labels = data.load_split("mnist", tmp_path, train=True, download=False)
    assert images.dtype == torch.uint8 and images.shape == (50, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (50,)
    train, test = data.load("mnist", tmp_path, download=False, limit_train=30)
    assert train.images.shape == (30, 1, 28, 28) and train.images.dtype == torch.float32
    assert len(test) == 20
    assert len(data.load("mnist", tmp_path, download=False, limit_test=7)[1]) == 7
    # normalised on the device with the dataset's constants
    expected = (images[:30].float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(train.images[:, 0], expected)


def test_fashion_and_kmnist_use_their_folders_and_constants(tmp_path):
    write_synthetic_mnist(tmp_path, n_train=10, n_test=10, folder="FashionMNIST")
    write_synthetic_mnist(tmp_path, n_train=10, n_test=10, folder="KMNIST")
    fashion, _ = data.load("fashion-mnist", tmp_path, download=False)
    kmnist, _ = data.load("kmnist", tmp_path, download=False)
    assert fashion.images.shape == kmnist.images.shape == (10, 1, 28, 28)
    assert not torch.equal(fashion.images, kmnist.images)  # different constants (and files)


def test_batches_cover_every_image_once_in_the_given_order(tmp_path):
    write_synthetic_mnist(tmp_path, n_train=70, n_test=10)
    train, _ = data.load("mnist", tmp_path, download=False)
    order = data.shuffle_order(len(train), seed=1, epoch=0)
    batches = list(train.batches(32, order=order))
    assert [len(y) for _, y in batches] == [32, 32, 6] and train.num_batches(32) == 3
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels, train.labels[order])
    # resuming at batch 1 yields the same remaining batches
    resumed = list(train.batches(32, order=order, start=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[1:], resumed))


def test_shuffle_depends_on_seed_and_epoch_only():
    a = data.shuffle_order(100, seed=3, epoch=2)
    assert torch.equal(a, data.shuffle_order(100, seed=3, epoch=2))
    assert not torch.equal(a, data.shuffle_order(100, seed=3, epoch=3))
    assert not torch.equal(a, data.shuffle_order(100, seed=4, epoch=2))
    assert torch.equal(a.sort().values, torch.arange(100))


def test_missing_files_without_download_name_the_four_files(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("mnist", tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in message
    assert "--data-dir" in message and "LENET_FAST_DATA" in message


def test_truncated_file_is_reported_by_name(tmp_path):
    write_synthetic_mnist(tmp_path, n_train=20, n_test=10)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(data.DatasetCorruptError, match=r"train-images-idx3-ubyte is truncated or corrupt.*\(20, 28, 28\)"):
        data.load("mnist", tmp_path, download=False)


def test_wrong_magic_number(tmp_path):
    write_synthetic_mnist(tmp_path, n_train=20, n_test=10)
    path = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(data.DatasetCorruptError, match="t10k-labels-idx1-ubyte is not an IDX file"):
        data.load("mnist", tmp_path, download=False)


def test_image_and_label_counts_must_agree(tmp_path):
    write_synthetic_mnist(tmp_path, n_train=20, n_test=10)
    write_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros(19))
    with pytest.raises(data.DatasetCorruptError, match=r"shape \(20, 28, 28\) but .* holds 19 labels"):
        data.load("mnist", tmp_path, download=False)


def test_labels_out_of_range(tmp_path):
    write_synthetic_mnist(tmp_path, n_train=20, n_test=10)
    write_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.full(20, 12))
    with pytest.raises(data.DatasetCorruptError, match=r"labels outside 0..9"):
        data.load("mnist", tmp_path, download=False)


def test_a_folder_where_a_data_file_should_be_is_named(tmp_path):
    write_synthetic_mnist(tmp_path, n_train=20, n_test=10)
    path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    path.unlink()
    path.mkdir()
    with pytest.raises(data.DatasetCorruptError, match=f"{path} is not a file"):
        data.load("mnist", tmp_path, download=False)


def test_a_valid_header_with_no_images_is_named(tmp_path):
    write_synthetic_mnist(tmp_path, n_train=20, n_test=10)
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(0))
    with pytest.raises(data.DatasetCorruptError, match=f"{raw / 't10k-images-idx3-ubyte'} holds no images"):
        data.load("mnist", tmp_path, download=False)


@pytest.fixture
def silent_server():
    """A URL whose server accepts connections and never answers (a network that swallows
    requests); after 6 s it goes away, so a client without a timeout fails then."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    closer = threading.Timer(6.0, server.close)
    closer.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    closer.cancel()
    server.close()


def test_a_download_that_gets_no_answer_times_out_and_says_what_it_fetched(silent_server, tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [silent_server])
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT", 0.5)
    started = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("mnist", tmp_path, download=True)
    assert time.monotonic() - started < 4
    message = str(info.value)
    assert "no answer within 0.5 s" in message and f"{silent_server}train-images-idx3-ubyte.gz" in message
    assert "t10k-labels-idx1-ubyte" in message and "--data-dir" in message  # the offline paragraph
    err = capsys.readouterr().err
    assert f"downloading {silent_server}train-images-idx3-ubyte.gz into {tmp_path / 'MNIST' / 'raw'}" in err
    assert socket.getdefaulttimeout() is None  # restored


def test_default_data_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LENET_FAST_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    monkeypatch.delenv("LENET_FAST_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data.default_data_dir() == tmp_path / "cache" / "lenet_fast"


@pytest.mark.skipif(not (REAL_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").exists(),
                    reason="real MNIST not present (set LENET_FAST_DATA)")
def test_real_mnist():
    train, test = data.load("mnist", REAL_DATA, download=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist()[:2] == [5923, 6742]  # the published class counts
    assert abs(train.images.mean().item()) < 0.01 and abs(train.images.std().item() - 1) < 0.01
