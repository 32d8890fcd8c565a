"""One atomic, fsync-ed write and one array digest, used by every module that persists."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import iif_ref
from iif_ref import _io


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a" / "b" / "x.bin"
    assert _io.atomic_write(path, b"first") == path
    _io.atomic_write(path, lambda fh: fh.write(b"second"))
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["x.bin"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")

    def half_then_fail(fh):
        fh.write(b"partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        _io.atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_atomic_write_fsyncs_the_file_before_the_rename_and_then_its_directory(
        tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        ("fsync", os.path.isdir(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd")
         else None)), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)),
                                                      real_replace(a, b)))
    _io.atomic_write(tmp_path / "x.bin", b"data")
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    if events[0][1] is not None:  # /proc tells which descriptor was synced
        assert (events[0][1], events[2][1]) == (False, True)


def test_atomic_write_rejects_text(tmp_path):
    with pytest.raises(TypeError, match="data must be bytes-like or a callable, got str"):
        _io.atomic_write(tmp_path / "x", "text")


def test_store_write_error_names_a_full_disk_and_cleans_up(tmp_path, monkeypatch):
    from iif_ref.distributed import store

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(store.StoreWriteError, match="disk full") as info:
        store._atomic_write(tmp_path / "chunk", np.arange(3.0))
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_retraining_cache_file_round_trips(tmp_path):
    from iif_ref import retraining

    path = tmp_path / "subset_00000.npz"
    retraining._write_atomic(path, key=np.array("k"), losses=np.arange(3.0),
                             seconds=np.array(1.5))
    losses, seconds = retraining._read_cached(path, "k")
    assert losses.tolist() == [0.0, 1.0, 2.0] and seconds == 1.5
    assert retraining._read_cached(path, "another key") is None


def test_array_digest_keeps_the_feature_store_format():
    # The distributed store keys its fingerprint on this exact byte stream: changing it
    # would orphan every existing store. Recomputed here from its definition.
    a = np.arange(6.0).reshape(2, 3)
    h = hashlib.sha256()
    h.update(json.dumps([[2, 3], "<f8"]).encode())
    h.update(a.tobytes())
    assert _io.array_digest(a) == h.hexdigest()


def test_array_digest_sees_values_shape_dtype_and_extra_but_not_layout():
    a = np.arange(6.0).reshape(2, 3)
    digest = _io.array_digest(a)
    assert _io.array_digest(np.asfortranarray(a)) == digest
    assert _io.array_digest(a[:, ::-1][:, ::-1]) == digest
    for other in (a.reshape(3, 2), a.astype(np.float32), a + np.eye(2, 3) * 1e-15):
        assert _io.array_digest(other) != digest
    assert _io.array_digest(a, extra={"seed": 1}) != _io.array_digest(a, extra={"seed": 2})
    assert _io.array_digest(a, a) != digest


def test_one_implementation_of_each():
    # Every other module persists and hashes arrays through iif_ref._io.
    from iif_ref import bench, retraining
    from iif_ref.distributed import store
    from iif_ref.neural import cache

    for module in (bench, retraining, store, cache):
        assert module.atomic_write is _io.atomic_write, module.__name__
    for module in (retraining, store, cache):
        assert module.array_digest is _io.array_digest, module.__name__
    own = Path(_io.__file__).resolve()
    for root in map(Path, iif_ref.__path__):
        for path in root.rglob("*.py"):
            if path.resolve() == own:
                continue
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"os\.replace\(|tempfile\.mkstemp\(|os\.fsync\(", text), path


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path, umask):
    # Results (JSON, Markdown) and the figures written beside them by plain open() or
    # savefig must be readable alike: 0o666 less the umask, not mkstemp's 0o600.
    from iif_ref.bench import write_results, write_text_atomic

    previous = os.umask(umask)
    try:
        with open(tmp_path / "plain.png", "wb") as fh:
            fh.write(b"figure")
        written = [_io.atomic_write(tmp_path / "raw.bin", b"x"),
                   _io.atomic_write(tmp_path / "streamed.npz", lambda fh: fh.write(b"x")),
                   write_results(tmp_path / "results.json", [{"a": 1}], machine=False),
                   write_text_atomic(tmp_path / "table.md", "| a |\n")]
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert (tmp_path / "plain.png").stat().st_mode & 0o777 == expected
    for path in written:
        assert path.stat().st_mode & 0o777 == expected, path.name
