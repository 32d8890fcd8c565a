"""Data loaders: digits split, MNIST IDX reader, CIFAR-10 batch reader, label flipping.

The IDX and CIFAR-10 files are written here by the tests themselves (tiny, random), so
the readers are checked byte for byte without any download.
"""
import gzip
import pickle
import struct

import numpy as np
import pytest

from iif_ref.datasets import (flip_labels, load_cifar10_batches, load_digits_split,
                              load_mnist_idx, read_idx)


def write_idx(path, arr, *, compress=False, code=0x08):
    arr = np.asarray(arr)
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if compress:
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def write_mnist(directory, n_train=30, n_test=12, *, compress=False, side=5, seed=0):
    rng = np.random.default_rng(seed)
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        img = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        lab = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", img, compress=compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", lab, compress=compress)
        files[prefix] = (img, lab)
    return files


def write_cifar(directory, n_per_batch=6, n_batches=2, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    names = [f"data_batch_{i}" for i in range(1, n_batches + 1)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(directory / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, fh)
        out[name] = (data, np.array(labels))
    return out


def test_digits_split_is_disjoint_reproducible_and_standardised():
    a = load_digits_split(300, 50, seed=3)
    b = load_digits_split(300, 50, seed=3)
    assert np.array_equal(a.X_train, b.X_train) and np.array_equal(a.y_test, b.y_test)
    assert not set(a.train_indices) & set(a.test_indices)
    assert a.X_train.shape == (300, 64) and a.image_shape == (8, 8)
    # Training columns with spread have mean 0 and std 1 (float64 rounding, ~1e-15).
    spread = a.X_train.std(axis=0) > 0
    assert np.allclose(a.X_train.mean(axis=0), 0, atol=1e-12)
    assert np.allclose(a.X_train.std(axis=0)[spread], 1, atol=1e-12)
    # images() undoes the standardisation exactly back to pixel/16.
    from sklearn.datasets import load_digits
    raw = load_digits().data[a.test_indices] / 16.0
    assert np.allclose(a.images(a.X_test).reshape(50, 64), raw, atol=1e-12)


def test_digits_split_rejects_too_many():
    with pytest.raises(ValueError, match="exceeds"):
        load_digits_split(1700, 200, seed=0)
    with pytest.raises(TypeError, match="n_train"):
        load_digits_split(10.5, 20, seed=0)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips_raw_and_gzip(tmp_path, compress):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", arr, compress=compress)
    out = read_idx(tmp_path / "a")
    assert out.dtype == np.uint8 and np.array_equal(out, arr)


def test_read_idx_round_trips_big_endian_int32(tmp_path):
    arr = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    write_idx(tmp_path / "b", arr, code=0x0C)
    assert np.array_equal(read_idx(tmp_path / "b"), arr)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    arr = np.zeros((4, 2, 2), dtype=np.uint8)
    write_idx(tmp_path / "t", arr)
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-3])
    with pytest.raises(ValueError, match="payload"):
        read_idx(tmp_path / "t")
    (tmp_path / "code").write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="type code"):
        read_idx(tmp_path / "code")
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing")


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_idx_draws_the_written_rows(tmp_path, compress):
    files = write_mnist(tmp_path, compress=compress)
    split = load_mnist_idx(tmp_path, n_train=20, n_test=7, standardise=False, seed=1)
    img, lab = files["train"]
    assert split.X_train.shape == (20, 25) and split.image_shape == (5, 5)
    assert np.allclose(split.X_train, img[split.train_indices].reshape(20, 25) / 255.0)
    assert np.array_equal(split.y_train, lab[split.train_indices])
    timg, tlab = files["t10k"]
    assert np.array_equal(split.y_test, tlab[split.test_indices])
    assert np.allclose(split.images(split.X_test), timg[split.test_indices] / 255.0)


def test_load_mnist_idx_reports_missing_and_inconsistent_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images"):
        load_mnist_idx(tmp_path, n_train=1, n_test=1, seed=0)
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="12 images but 3 labels"):
        load_mnist_idx(tmp_path, n_train=1, n_test=1, seed=0)


def test_load_cifar10_batches_reads_images_channel_first(tmp_path):
    files = write_cifar(tmp_path)
    split = load_cifar10_batches(tmp_path, n_train=10, n_test=4, standardise=False, seed=0)
    train_data = np.concatenate([files["data_batch_1"][0], files["data_batch_2"][0]])
    train_lab = np.concatenate([files["data_batch_1"][1], files["data_batch_2"][1]])
    assert split.X_train.shape == (10, 3, 32, 32)
    assert np.allclose(split.X_train, train_data[split.train_indices].reshape(10, 3, 32, 32) / 255)
    assert np.array_equal(split.y_train, train_lab[split.train_indices])
    std = load_cifar10_batches(tmp_path, n_train=10, n_test=4, seed=0)
    # Per-channel standardisation: each channel of the training rows has mean 0.
    assert np.allclose(std.X_train.mean(axis=(0, 2, 3)), 0, atol=1e-12)


def test_load_cifar10_batches_refuses_foreign_pickles(tmp_path):
    write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("should never run",))

    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    with pytest.raises(ValueError, match="never holds"):
        load_cifar10_batches(tmp_path, n_train=2, n_test=1, seed=0)


def test_load_cifar10_batches_rejects_wrong_shapes(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match=r"\(n, 3072\)"):
        load_cifar10_batches(tmp_path, n_train=2, n_test=1, seed=0)


def test_flip_labels_changes_exactly_the_fraction_to_other_classes():
    y = np.repeat(np.arange(10), 100)
    y_new, flipped = flip_labels(y, 0.1, n_classes=10, seed=0)
    assert flipped.sum() == 100
    assert np.all(y_new[flipped] != y[flipped]) and np.array_equal(y_new[~flipped], y[~flipped])
    assert y_new.min() >= 0 and y_new.max() <= 9
    again, flipped2 = flip_labels(y, 0.1, n_classes=10, seed=0)
    assert np.array_equal(again, y_new) and np.array_equal(flipped, flipped2)


def test_flip_labels_new_class_is_uniform_over_the_others():
    # 20,000 flips of class 0 over 9 targets: each count ~ Binomial(20000, 1/9), sd ~ 44;
    # 6 sd (±270) is a bound that a correct draw exceeds with probability < 1e-8.
    y = np.zeros(20000, dtype=np.int64)
    y_new, _ = flip_labels(y, 1.0, n_classes=10, seed=1)
    counts = np.bincount(y_new, minlength=10)
    assert counts[0] == 0
    assert np.all(np.abs(counts[1:] - 20000 / 9) < 270)


def test_flip_labels_validates_arguments():
    with pytest.raises(ValueError, match="fraction"):
        flip_labels([0, 1], 1.5, n_classes=2, seed=0)
    with pytest.raises(ValueError, match="outside"):
        flip_labels([0, 5], 0.5, n_classes=3, seed=0)
    with pytest.raises(TypeError, match="integer"):
        flip_labels([0.0, 1.0], 0.5, n_classes=2, seed=0)
    with pytest.raises(ValueError, match="n_classes"):
        flip_labels([0, 0], 0.5, n_classes=1, seed=0)
