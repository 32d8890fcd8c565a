"""Feature store and in-process engine: atomicity, checksums, fingerprint, full disk,
and the engine equal to the single-process kernels on random shapes (no cluster)."""
import errno
import os
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("distributed", reason="iif_ref.distributed needs the 'distributed' extra")
zarr = pytest.importorskip("zarr", reason="the store layout check needs zarr")

from iif_ref.distributed import (ChunkCorruptError, StoreMismatchError,  # noqa: E402
                                 StoreWriteError, attribute_features)
from iif_ref.distributed.featurize import featurize, open_store, read_rows  # noqa: E402
from iif_ref.distributed.reduce import _select, topk_merge  # noqa: E402
from iif_ref.distributed.synthetic import RandomFeatureRegression  # noqa: E402
from iif_ref.errors import NotPositiveDefiniteError  # noqa: E402
from iif_ref.kernels import projected_scores  # noqa: E402

EPS = np.finfo(np.float64).eps


class ArrayFeatures:
    """Feature function serving fixed arrays: row ``i`` of the shard is sample ``X[i, 0]``."""

    def __init__(self, Phi, Psi, tag=0):
        self.Phi, self.Psi, self.tag = Phi, Psi, tag
        self.steps = tuple(range(Phi.shape[0]))
        self.proj_dim = Phi.shape[2]

    def fingerprint(self):
        return {"kind": "ArrayFeatures", "tag": self.tag, "shape": list(self.Phi.shape)}

    def __call__(self, shard_id, X, y):
        rows = X[:, 0].astype(np.int64)
        return {s: (self.Phi[s, rows], self.Psi[s, rows]) for s in self.steps}


def score_bound(Phi, Psi, Gamma, damping):
    """Entrywise bound on |distributed - single-process| scores.

    Both evaluate ``-Gamma_s F_s^{-1} Psi_s^T`` in float64 and differ only in summation
    order (Gram: chunked tree vs one GEMM; solve: different right-hand sides). The Gram
    entries then differ by <= n*eps*Σ|phi||phi| <= n*eps*tr(G), a relative perturbation
    of F of at most n*eps*P (tr <= P ||F||), which moves F^{-1} by cond(F) times that;
    the solves add O(P eps cond(F)). Times the size |gamma| ||F^{-1}|| |psi| of a term,
    with a factor 4 for the remaining O(1) constants.
    """
    bound = np.zeros((Gamma.shape[1], Phi.shape[1]))
    for s in range(Phi.shape[0]):
        F = Phi[s].T @ Phi[s] + damping * np.eye(Phi.shape[2])
        kappa = np.linalg.cond(F)
        rel = 4 * (Phi.shape[1] + Phi.shape[2]) * Phi.shape[2] * EPS * kappa
        bound += rel * np.linalg.norm(np.linalg.inv(F), 2) * np.outer(
            np.linalg.norm(Gamma[s], axis=1), np.linalg.norm(Psi[s], axis=1))
    return bound


def _problem(rng, n, P, S, n_test):
    Phi = rng.standard_normal((S, n, P))
    Psi = rng.standard_normal((S, n, P))
    Gamma = rng.standard_normal((S, n_test, P))
    X = np.arange(n, dtype=np.float64)[:, None]
    return Phi, Psi, Gamma, X, np.zeros(n)


# --------------------------------------------------------------------------- layout
def test_store_round_trip_and_zarr_reads_the_layout(tmp_path):
    rng = np.random.default_rng(0)
    Phi, Psi, _, X, y = _problem(rng, 23, 5, 2, 1)
    fn = ArrayFeatures(Phi, Psi)
    store = open_store(tmp_path / "s", fn, X, y, chunk_rows=7)
    featurize(None, store, fn, X, y)
    for s in range(2):
        # The store's own reader: exact bytes back.
        assert np.array_equal(read_rows(store, s, "Phi"), Phi[s])
        assert np.array_equal(read_rows(store, s, "Psi"), Psi[s])
        # Zarr v3 reads the same arrays (and checks the crc32c codec itself).
        arr = zarr.open_array(str(tmp_path / "s" / f"step_{s}" / "Psi"), mode="r")
        assert arr.shape == (23, 5) and np.array_equal(arr[:], Psi[s])
    group = zarr.open_group(str(tmp_path / "s"), mode="r")
    assert group.attrs["iif_ref"]["fingerprint"] == store.fingerprint


def test_corrupt_or_truncated_chunk_is_detected_never_returned(tmp_path):
    rng = np.random.default_rng(1)
    Phi, Psi, _, X, y = _problem(rng, 20, 4, 1, 1)
    fn = ArrayFeatures(Phi, Psi)
    store = open_store(tmp_path / "s", fn, X, y, chunk_rows=5)
    featurize(None, store, fn, X, y)
    path = store.chunk_path(0, "Phi", 2)
    data = bytearray(path.read_bytes())
    data[17] ^= 0x01  # one flipped bit in the payload
    path.write_bytes(bytes(data))
    with pytest.raises(ChunkCorruptError, match="CRC32C") as info:
        store.read(0, "Phi", 2)
    assert info.value.chunk == 2
    assert store.chunk_status(2) == "corrupt"
    path.write_bytes(bytes(data[:-9]))  # truncated
    with pytest.raises(ChunkCorruptError, match="bytes"):
        store.read(0, "Phi", 2)
    # The error survives the trip from a worker to the driver.
    again = pickle.loads(pickle.dumps(info.value))
    assert isinstance(again, ChunkCorruptError) and again.chunk == 2


def test_resume_recomputes_only_missing_corrupt_and_half_written_chunks(tmp_path):
    rng = np.random.default_rng(2)
    Phi, Psi, _, X, y = _problem(rng, 30, 3, 2, 1)
    fn = ArrayFeatures(Phi, Psi)
    store = open_store(tmp_path / "s", fn, X, y, chunk_rows=6)
    first = featurize(None, store, fn, X, y)
    assert first.computed == (0, 1, 2, 3, 4) and first.reused == ()
    store.chunk_path(1, "Psi", 1).unlink()            # half-written chunk 1 (a killed writer)
    dead = store.chunk_path(0, "Phi", 1).parent / ".0.dead.tmp"
    dead.write_bytes(b"partial")                     # left by a writer killed 2 h ago
    os.utime(dead, (dead.stat().st_atime - 7200, dead.stat().st_mtime - 7200))
    young = store.chunk_path(0, "Phi", 2).parent / ".0.live.tmp"
    young.write_bytes(b"in flight")                  # a writer that may still be running
    p = store.chunk_path(0, "Psi", 3)
    p.write_bytes(p.read_bytes()[:-1] + b"\x00")     # corrupt checksum of chunk 3
    with pytest.warns(RuntimeWarning, match=r"chunk\(s\) \[3\]"):
        second = featurize(None, store, fn, X, y)
    assert second.computed == (1, 3) and second.corrupt == (3,)
    assert second.reused == (0, 2, 4)
    for s in range(2):
        assert np.array_equal(read_rows(store, s, "Psi"), Psi[s])
    assert not dead.exists() and young.exists()


# --------------------------------------------------------------------------- fingerprint
@pytest.mark.parametrize("change", ["seed", "proj_dim", "model", "data", "chunk_rows"])
def test_store_written_by_other_configuration_is_refused_and_kept(tmp_path, change):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((40, 3))
    y = rng.standard_normal(40)
    theta = rng.standard_normal((2, 12)) * 0.1
    base = dict(proj_dim=4, seed=1, model_seed=0)
    fn = RandomFeatureRegression(3, theta, theta[0], **base)
    store = open_store(tmp_path / "s", fn, X, y, chunk_rows=16)
    featurize(None, store, fn, X, y)
    before = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    X2, chunk_rows = X, 16
    if change == "seed":
        fn = RandomFeatureRegression(3, theta, theta[0], **{**base, "seed": 2})
    elif change == "proj_dim":
        fn = RandomFeatureRegression(3, theta, theta[0], **{**base, "proj_dim": 5})
    elif change == "model":
        fn = RandomFeatureRegression(3, theta * 1.01, theta[0], **base)
    elif change == "data":
        X2 = X.copy()
        X2[7, 1] += 1e-9
    else:
        chunk_rows = 8
    with pytest.raises(StoreMismatchError, match="different configuration") as info:
        open_store(tmp_path / "s", fn, X2, y, chunk_rows=chunk_rows)
    assert info.value.differences  # names what changed
    after = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    assert after == before


def test_same_configuration_reopens_the_store(tmp_path):
    rng = np.random.default_rng(4)
    Phi, Psi, _, X, y = _problem(rng, 10, 2, 1, 1)
    a = open_store(tmp_path / "s", ArrayFeatures(Phi, Psi), X, y, chunk_rows=4)
    b = open_store(tmp_path / "s", ArrayFeatures(Phi, Psi), X, y, chunk_rows=4)
    assert a == b


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    rng = np.random.default_rng(5)
    Phi, Psi, _, X, y = _problem(rng, 5, 2, 1, 1)
    with pytest.raises(StoreMismatchError, match="not an iif_ref feature store"):
        open_store(tmp_path / "d", ArrayFeatures(Phi, Psi), X, y, chunk_rows=2)
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- disk full
def test_disk_full_raises_clearly_and_keeps_written_chunks(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    Phi, Psi, _, X, y = _problem(rng, 24, 3, 2, 1)
    fn = ArrayFeatures(Phi, Psi)
    store = open_store(tmp_path / "s", fn, X, y, chunk_rows=6)
    real_write = os.write
    calls = {"n": 0}

    def full_after_ten(fd, data):
        calls["n"] += 1
        if calls["n"] > 10:  # chunks 0 and 1 (4 files each) fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_after_ten)
    with pytest.raises(StoreWriteError, match="disk full") as info:
        featurize(None, store, fn, X, y)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "write", real_write)
    assert not list((tmp_path / "s").rglob("*.tmp"))  # no partial files left behind
    assert [store.chunk_status(c) for c in range(4)][:2] == ["ok", "ok"]
    report = featurize(None, store, fn, X, y)     # space is back: resume
    assert set(report.reused) >= {0, 1} and 0 not in report.computed
    for s in range(2):
        assert np.array_equal(read_rows(store, s, "Phi"), Phi[s])


# --------------------------------------------------------------------------- top-k
def test_topk_select_breaks_ties_by_index_like_a_full_sort():
    rng = np.random.default_rng(7)
    vals = rng.integers(-3, 4, size=(5, 40)).astype(float)  # many exact ties
    idx = np.broadcast_to(np.arange(40), vals.shape)
    for largest in (False, True):
        v, i = _select(vals, idx, 6, largest)
        for t in range(5):
            key = -vals[t] if largest else vals[t]
            order = np.lexsort((np.arange(40), key))[:6]
            assert np.array_equal(i[t], order) and np.array_equal(v[t], vals[t, order])
    # Merging partials of any split equals selecting from the whole.
    parts = []
    for a, b in ((0, 13), (13, 14), (14, 40)):
        sub = vals[:, a:b]
        sidx = np.broadcast_to(np.arange(a, b), sub.shape)
        parts.append({"sum": sub.sum(1), "neg": _select(sub, sidx, 6, False),
                      "pos": _select(sub, sidx, 6, True)})
    merged = topk_merge(parts, k=6)
    assert np.array_equal(merged["neg"][1], _select(vals, idx, 6, False)[1])
    assert np.array_equal(merged["pos"][1], _select(vals, idx, 6, True)[1])


# --------------------------------------------------------------------------- twin
@settings(max_examples=20)
@given(n=st.integers(1, 40), P=st.integers(1, 6), S=st.integers(1, 3),
       n_test=st.integers(1, 5), chunk=st.integers(1, 45), test_block=st.integers(1, 6),
       k=st.integers(1, 8), damping=st.sampled_from([None, 0.5]),
       seed=st.integers(0, 2**32 - 1))
def test_engine_equals_projected_scores_single_process(tmp_path_factory, n, P, S, n_test,
                                                       chunk, test_block, k, damping, seed):
    rng = np.random.default_rng(seed)
    Phi, Psi, Gamma, X, y = _problem(rng, n, P, S, n_test)
    fn = ArrayFeatures(Phi, Psi)
    store = tmp_path_factory.mktemp("twin") / "s"
    try:
        ref = projected_scores(Phi, Psi, Gamma, damping=damping, backend="numpy")
    except NotPositiveDefiniteError:
        # n < P without damping: the engine must refuse the same problem.
        with pytest.raises(NotPositiveDefiniteError):
            attribute_features(fn, X, y, Gamma, client=None, store=store, chunk_rows=chunk,
                               damping=damping)
        return
    got = attribute_features(fn, X, y, Gamma, client=None, store=store, chunk_rows=chunk,
                             test_block=test_block, damping=damping, top_k=k)
    lam = got.damping[0] if damping is None else damping
    assert np.all(np.abs(got.scores - ref) <= score_bound(Phi, Psi, Gamma, lam) + 1e-300)
    # Top-k: exactly the full sort of the returned scores (ties by index).
    kk = min(k, n)
    for t in range(n_test):
        assert np.array_equal(got.proponents[t], np.lexsort((np.arange(n), got.scores[t]))[:kk])
        assert np.array_equal(got.opponents[t], np.lexsort((np.arange(n), -got.scores[t]))[:kk])
    # Score sums: n additions more than the scores themselves.
    assert np.allclose(got.score_sums, ref.sum(axis=1), rtol=0,
                       atol=n * EPS * np.abs(ref).sum(axis=1).max() + np.sum(
                           score_bound(Phi, Psi, Gamma, lam), axis=1).max())


def test_relative_damping_matches_the_kernels_default(tmp_path):
    rng = np.random.default_rng(8)
    Phi, Psi, Gamma, X, y = _problem(rng, 50, 4, 2, 3)
    got = attribute_features(ArrayFeatures(Phi, Psi), X, y, Gamma, client=None,
                             store=tmp_path / "s", chunk_rows=9)
    from iif_ref.kernels import resolve_damping
    # Same rule, traces summed in another order: n*eps relative.
    assert np.allclose(got.damping, resolve_damping(Phi), rtol=50 * EPS, atol=0)


def test_bad_inputs_are_named(tmp_path):
    rng = np.random.default_rng(9)
    Phi, Psi, Gamma, X, y = _problem(rng, 10, 3, 1, 2)
    fn = ArrayFeatures(Phi, Psi)
    with pytest.raises(ValueError, match="Gamma must have shape"):
        attribute_features(fn, X, y, Gamma[:, :, :2], client=None, store=tmp_path / "a")
    assert not (tmp_path / "a").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="X_train and y_train"):
        attribute_features(fn, X, y[:5], Gamma, client=None, store=tmp_path / "b")
    bad = X.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="X_train contains 1 non-finite"):
        attribute_features(fn, bad, y, Gamma, client=None, store=tmp_path / "c")
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        attribute_features(fn, X, y, Gamma, client=None, chunk_rows=0)
    with pytest.raises(TypeError, match="client must be"):
        attribute_features(fn, X, y, Gamma, client=42)
    with pytest.raises(ValueError, match="damping must be finite"):
        attribute_features(fn, X, y, Gamma, client=None, store=tmp_path / "d", damping=-1.0)

    class NaNFeatures(ArrayFeatures):
        def __call__(self, shard_id, X, y):
            out = super().__call__(shard_id, X, y)
            out[0][0][0, 0] = np.nan
            return out

    from iif_ref.distributed import FeaturizationError
    with pytest.raises(FeaturizationError, match="non-finite"):
        attribute_features(NaNFeatures(Phi.copy(), Psi), X, y, Gamma, client=None,
                           store=tmp_path / "e")


def test_attribute_distributed_refuses_what_it_cannot_distribute():
    torch = pytest.importorskip("torch", reason="attribute_distributed serves torch models")
    from iif_ref.distributed import attribute_distributed

    net = torch.nn.Linear(2, 1).double()
    X = torch.randn(6, 2, dtype=torch.float64)
    y = torch.randn(6, 1, dtype=torch.float64)
    # Checked before any connection is attempted (this address is never dialled).
    with pytest.raises(ValueError, match="method='tracin' has no distributed engine"):
        attribute_distributed(net, "mse", X, y, X, y, client="tcp://127.0.0.1:1",
                              method="tracin")
    with pytest.raises(ValueError, match="needs proj_dim"):
        attribute_distributed(net, "mse", X, y, X, y, client="tcp://127.0.0.1:1",
                              proj_dim=None)
    with pytest.raises(ValueError, match="solver='projected'"):
        attribute_distributed(net, "mse", X, y, X, y, client="tcp://127.0.0.1:1",
                              method="if", solver="exact")
