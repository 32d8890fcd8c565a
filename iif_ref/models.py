"""The paper's networks (Table 5) and a deterministic trainer.

* :func:`make_mlp` — the "4-layer MLP": input → 128 → 64 → 10 (three linear maps plus the
  input layer), ReLU, dropout 0.1 after each hidden activation.
* :func:`make_resnet9` — ResNet-9 with the widths of Table 5
  ``[64, 128, 128, 128, 256, 512, 512, 512, 10]``: a 64-channel stem, then
  (conv 128 + pool, residual block 128/128), (conv 256 + pool),
  (conv 512 + pool, residual block 512/512), global max pool, dropout 0.1, linear 10.
* :func:`train` — minibatch training, deterministic given ``seed`` and ``threads``.

Dropout is part of *training* only: every attribution, self-influence and retraining
loss is evaluated with the model in ``eval()`` mode, where dropout is the identity and
batch normalisation uses its running statistics, so ``f(x; θ)`` is a deterministic
function of θ — which Eq. (9) assumes. :func:`train` returns the model in eval mode.

The paper's settings (Table 5): MLP — SGD, lr 0.01, momentum 0.9, 50 epochs;
ResNet-9 — Adam, lr 1e-3, 10 epochs. :data:`PAPER_TRAINING` holds them; the
reproductions' quick modes use fewer epochs and say so in their reports.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import numpy as np

from iif_ref._optional import require

torch = require("torch", "iif_ref.models")
from torch import nn  # noqa: E402

from iif_ref._validation import as_float_array, check_positive_int, check_positive_real  # noqa: E402

__all__ = ["make_mlp", "make_resnet9", "make_model", "TrainConfig", "PAPER_TRAINING", "train",
           "per_sample_cross_entropy", "count_parameters"]


def _seeded_init(seed):
    """Context in which torch's global generator is seeded, restored afterwards."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[]))
    torch.manual_seed(int(seed))
    return stack


def make_mlp(in_features, *, hidden=(128, 64), n_classes=10, dropout=0.1, seed=0):
    """The paper's 4-layer MLP (Table 5), initialised deterministically from ``seed``.

    Parameters
    ----------
    in_features : int
        Input dimension (64 for digits, 784 for MNIST).
    hidden : tuple of int, keyword-only
        Hidden widths (Table 5: 128, 64).
    n_classes : int, keyword-only
    dropout : float, keyword-only
        Dropout probability after each hidden ReLU (Table 5: 0.1); inactive in eval mode.
    seed : int, keyword-only
        Seed of the initialisation (PyTorch's default uniform fan-in init).

    Returns
    -------
    torch.nn.Sequential
        float32, in eval mode. For ``in_features=64`` it has 17,226 parameters.
    """
    in_features = check_positive_int(in_features, "in_features")
    n_classes = check_positive_int(n_classes, "n_classes")
    widths = [in_features] + [check_positive_int(h, "hidden") for h in hidden]
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    with _seeded_init(seed):
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(widths[-1], n_classes))
        model = nn.Sequential(*layers)
    return model.eval()


def _conv_bn(c_in, c_out, *, pool=False):
    layers = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
              nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


def make_resnet9(*, in_channels=3, n_classes=10, dropout=0.1, widths=(64, 128, 256, 512),
                 seed=0):
    """ResNet-9 with the widths of Table 5, initialised deterministically from ``seed``.

    Parameters
    ----------
    in_channels : int, keyword-only
    n_classes : int, keyword-only
    widths : tuple of 4 int, keyword-only
        Channels of the stem and the three stages (Table 5: 64, 128, 256, 512). Smaller
        widths keep the topology for smoke tests on a CPU.
    dropout : float, keyword-only
        Before the final linear layer (Table 5: 0.1); inactive in eval mode.
    seed : int, keyword-only

    Returns
    -------
    torch.nn.Sequential
        float32, in eval mode; input ``(n, in_channels, H, W)`` with H, W divisible by 8.
    """
    in_channels = check_positive_int(in_channels, "in_channels")
    n_classes = check_positive_int(n_classes, "n_classes")
    if len(widths) != 4:
        raise ValueError(f"widths must have 4 entries (stem, 3 stages), got {widths!r}")
    w0, w1, w2, w3 = (check_positive_int(w, "widths") for w in widths)
    with _seeded_init(seed):
        model = nn.Sequential(
            _conv_bn(in_channels, w0),
            _conv_bn(w0, w1, pool=True), _Residual(w1),
            _conv_bn(w1, w2, pool=True),
            _conv_bn(w2, w3, pool=True), _Residual(w3),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(w3, n_classes),
        )
    return model.eval()


_FACTORIES = {"mlp": make_mlp, "resnet9": make_resnet9}


def make_model(arch, *, seed, **kwargs):
    """Build a registered architecture by name (``"mlp"`` or ``"resnet9"``).

    A name (rather than a callable) lets worker processes rebuild the model from a
    picklable description; see :mod:`iif_ref.retraining`.
    """
    if arch not in _FACTORIES:
        raise ValueError(f"arch must be one of {sorted(_FACTORIES)}, got {arch!r}")
    return _FACTORIES[arch](seed=seed, **kwargs)


def count_parameters(model):
    """Number of trainable scalars in ``model``."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings of :func:`train` (serialisable; stored in every result).

    Attributes
    ----------
    epochs : int
    optimiser : {"sgd", "adam"}
    lr : float
    momentum : float
        SGD only.
    batch_size : int
    weight_decay : float
        L2 penalty of the optimiser (0 in the paper's Table 5).
    """

    epochs: int = 50
    optimiser: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64
    weight_decay: float = 0.0

    def __post_init__(self):
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        check_positive_real(self.lr, "lr")
        if self.optimiser not in ("sgd", "adam"):
            raise ValueError(f"optimiser must be 'sgd' or 'adam', got {self.optimiser!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def to_dict(self):
        return asdict(self)


#: Table 5 of the paper. The batch size is not stated there; 64 is our choice.
PAPER_TRAINING = {
    "mlp": TrainConfig(epochs=50, optimiser="sgd", lr=0.01, momentum=0.9, batch_size=64),
    "resnet9": TrainConfig(epochs=10, optimiser="adam", lr=1e-3, momentum=0.0, batch_size=64),
}


@contextlib.contextmanager
def _torch_threads(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _as_inputs(X, name):
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    return torch.as_tensor(as_float_array(X, name), dtype=torch.float32)


def _as_labels(y, name, n):
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    return torch.as_tensor(arr.astype(np.int64))


def train(model, X, y, *, config=None, seed, threads=1, callback=None):
    """Train ``model`` in place on ``(X, y)`` with cross-entropy; deterministic given ``seed``.

    Minibatches are drawn by a ``torch.Generator`` seeded with ``seed``; dropout draws
    come from torch's global generator, which is seeded here and restored afterwards, so
    two calls with the same inputs, ``seed`` and ``threads`` give bit-identical
    parameters on the same machine. The optimiser minimises the *batch mean* of the
    per-sample cross-entropy (the usual scaling of the step size); the minimiser is the
    same as that of the summed loss of ``docs/conventions.md``.

    Parameters
    ----------
    model : torch.nn.Module
        float32 module mapping ``(n, ...)`` to logits ``(n, n_classes)``.
    X : array_like, shape (n, ...)
    y : array_like of int, shape (n,)
    config : TrainConfig, keyword-only
        Defaults to ``TrainConfig()`` (the MLP settings of Table 5).
    seed : int, keyword-only
    threads : int, keyword-only
        ``torch.set_num_threads`` during training (restored afterwards). Results are
        reproducible for a fixed value; different values may differ in the last bits.
    callback : callable, optional, keyword-only
        ``callback(epoch, model)`` after each epoch (1-based), e.g. to keep TracIn
        checkpoints (``copy.deepcopy(model.state_dict())``); must not modify ``model``.

    Returns
    -------
    torch.nn.Module
        ``model``, in eval mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    threads = check_positive_int(threads, "threads")
    Xt = _as_inputs(X, "X")
    yt = _as_labels(y, "y", len(Xt))
    n = len(Xt)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimiser == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    loss_fn = nn.CrossEntropyLoss()
    with _torch_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) + 1)
        model.train()
        for epoch in range(config.epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, config.batch_size):
                idx = order[start:start + config.batch_size]
                if len(idx) < 2 and n >= 2 and any(isinstance(m, nn.BatchNorm2d)
                                                   for m in model.modules()):
                    continue  # batch norm cannot train on a single sample
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(Xt[idx]), yt[idx])
                loss.backward()
                opt.step()
            if callback is not None:
                callback(epoch + 1, model)
        model.eval()
    return model


def per_sample_cross_entropy(model, X, y, *, batch_size=1024, threads=1):
    """Per-sample cross-entropy ``−log softmax(f(x; θ))_y`` with ``model`` in eval mode.

    Parameters
    ----------
    model : torch.nn.Module
    X : array_like, shape (n, ...)
    y : array_like of int, shape (n,)

    Returns
    -------
    ndarray, shape (n,)
        float64 losses.
    """
    Xt = _as_inputs(X, "X")
    yt = _as_labels(y, "y", len(Xt))
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad(), _torch_threads(check_positive_int(threads, "threads")):
        for start in range(0, len(Xt), batch_size):
            logits = model(Xt[start:start + batch_size]).double()
            out.append(nn.functional.cross_entropy(logits, yt[start:start + batch_size],
                                                   reduction="none"))
    model.train(was_training)
    return torch.cat(out).numpy()
