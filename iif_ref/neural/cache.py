"""Resumable runs: per-step results written atomically under a fingerprint directory.

``cache_dir/<fingerprint>/`` holds one ``.npz`` per finished unit of work (a baseline,
a path step) and ``config.json``. The fingerprint is a SHA-256 of the configuration
(minus presentation options), the data, the loss and the model's parameters and
buffers, so a rerun of the same problem resumes and a changed one starts afresh. Files
are written with :func:`iif_ref._io.atomic_write` (fsync-ed temporary file moved into
place with ``os.replace``), so an interrupted run never leaves a half-written step behind;
arrays enter the fingerprint through :func:`iif_ref._io.array_digest`.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from iif_ref._io import array_digest, atomic_write

__all__ = ["fingerprint", "StepCache"]

_PRESENTATION = ("progress", "cache_dir")


def _update(h, value):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        h.update(array_digest(value).encode())
    elif isinstance(value, dict):
        for key in sorted(value):
            h.update(str(key).encode())
            _update(h, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            _update(h, item)
    else:
        h.update(repr(value).encode())


def fingerprint(*, config, model, loss_name, arrays):
    """Hex SHA-256 of what determines the results (config, model state, loss, data)."""
    h = hashlib.sha256()
    _update(h, {k: v for k, v in config.items() if k not in _PRESENTATION})
    _update(h, type(model).__qualname__ + repr(model))
    _update(h, dict(model.state_dict()))
    _update(h, loss_name)
    _update(h, arrays)
    return h.hexdigest()[:32]


class StepCache:
    """Atomic store of named units of work; a no-op when ``cache_dir`` is None."""

    def __init__(self, cache_dir, key, config):
        self.dir = None if cache_dir is None else os.path.join(os.fspath(cache_dir), key)
        if self.dir is not None:
            os.makedirs(self.dir, exist_ok=True)
            path = os.path.join(self.dir, "config.json")
            text = json.dumps(config, sort_keys=True, default=repr)
            if os.path.exists(path):
                with open(path) as fh:
                    stored = fh.read()
                if stored != text:
                    raise ValueError(f"cache directory {self.dir} holds a different "
                                     "configuration under the same fingerprint; remove it")
            else:
                self._atomic(path, text.encode())
        self.loaded = []

    def _atomic(self, path, data):
        atomic_write(path, data)

    def load(self, name):
        """The arrays saved under ``name``, or None."""
        if self.dir is None:
            return None
        path = os.path.join(self.dir, name + ".npz")
        if not os.path.exists(path):
            return None
        with np.load(path) as data:
            out = {k: data[k] for k in data.files}
        self.loaded.append(name)
        return out

    def save(self, name, **arrays):
        if self.dir is None:
            return
        import io

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self._atomic(os.path.join(self.dir, name + ".npz"), buf.getvalue())
