"""The distributed engine on a real local cluster (2 worker processes, 1 thread each):
same answers as one process, a killed worker, a corrupt chunk, a restarted job,
an unreachable cluster, and retrainings mapped over workers."""
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed",
                                  reason="iif_ref.distributed needs the 'distributed' extra")
import cloudpickle  # noqa: E402  (a dependency of distributed)

from iif_ref.distributed import (FeaturizationError, attribute_features,  # noqa: E402
                                 connect, map_retrainings)
from iif_ref.distributed.synthetic import RandomFeatureRegression  # noqa: E402
from iif_ref.errors import NotPositiveDefiniteError  # noqa: E402
from iif_ref.kernels import projected_scores  # noqa: E402
from iif_ref.kernels import projection_matrix  # noqa: E402

# Worker processes may not have this test module on their path: ship its functions and
# classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

EPS = np.finfo(np.float64).eps


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0")
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def _problem(N=1500, d=4, M=48, P=12, K=3, n_test=9, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, d))
    y = np.tanh(X[:, 0]) + 0.1 * rng.standard_normal(N)
    theta = 0.3 * rng.standard_normal((K, M))
    fn = RandomFeatureRegression(d, theta, 0.5 * theta[-1], proj_dim=P, seed=11)
    X_test = rng.standard_normal((n_test, d))
    y_test = np.tanh(X_test[:, 0])
    return fn, X, y, fn.test_features(X_test, y_test)


def _single_process(fn, X, y, Gamma, damping=None):
    feats = fn(0, X, y)
    Phi = np.stack([feats[k][0] for k in fn.steps])
    Psi = np.stack([feats[k][1] for k in fn.steps])
    return Phi, Psi, projected_scores(Phi, Psi, Gamma, damping=damping, backend="numpy")


def _bound(Phi, Psi, Gamma, lam):
    """Summation-order bound (derivation in tests/test_distributed_store.py::score_bound)."""
    bound = 0.0
    for s in range(Phi.shape[0]):
        F = Phi[s].T @ Phi[s] + lam[s] * np.eye(Phi.shape[2])
        rel = 4 * (Phi.shape[1] + Phi.shape[2]) * Phi.shape[2] * EPS * np.linalg.cond(F)
        bound = bound + rel * np.linalg.norm(np.linalg.inv(F), 2) * np.outer(
            np.linalg.norm(Gamma[s], axis=1), np.linalg.norm(Psi[s], axis=1))
    return bound


# --------------------------------------------------------------------------- same answers
def _sign_pattern_in_worker(m, P, seed, rows):
    return np.sign(projection_matrix(m, P, seed=seed, rows=rows))


def test_projection_sign_pattern_on_workers_is_the_drivers(client):
    # A is a pure function of (seed, m, p): a worker generating a row block gets
    # exactly the driver's signs for those rows.
    full = np.sign(projection_matrix(300, 64, seed=11))
    blocks = client.gather([client.submit(_sign_pattern_in_worker, 300, 64, 11, (a, b),
                                          pure=False)
                            for a, b in ((0, 97), (97, 250), (250, 300))])
    assert np.array_equal(np.concatenate(blocks), full)


def test_distributed_scores_equal_single_process(client, tmp_path):
    fn, X, y, Gamma = _problem()
    Phi, Psi, ref = _single_process(fn, X, y, Gamma)
    got = attribute_features(fn, X, y, Gamma, client=client, store=tmp_path / "s",
                             chunk_rows=173, test_block=4, top_k=7)
    assert got.options["n_workers"] == 2
    # Stored features are the rows of the single-process features: same A, and a row
    # of G A depends only on that row of G (BLAS blocking may differ by rounding:
    # M products per entry, so <= M eps |g||a|; here checked at 64 eps of |Phi|).
    from iif_ref.distributed.featurize import open_store, read_rows
    store = open_store(tmp_path / "s", fn, X, y, chunk_rows=173)
    for s in range(len(fn.steps)):
        stored = read_rows(store, s, "Phi")
        assert np.array_equal(np.sign(stored), np.sign(Phi[s]))
        assert np.allclose(stored, Phi[s], rtol=0, atol=64 * EPS * np.abs(Phi[s]).max())
    assert np.all(np.abs(got.scores - ref) <= _bound(Phi, Psi, Gamma, got.damping))
    order = np.argsort(ref, axis=1, kind="stable")
    assert np.array_equal(got.proponents, order[:, :7])
    assert np.array_equal(got.opponents, np.argsort(-ref, axis=1, kind="stable")[:, :7])


def test_topk_without_materialising_scores_equals_full_run(client, tmp_path):
    fn, X, y, Gamma = _problem(seed=1)
    full = attribute_features(fn, X, y, Gamma, client=client, store=tmp_path / "s",
                              chunk_rows=200, top_k=5)
    lean = attribute_features(fn, X, y, Gamma, client=client, store=tmp_path / "s",
                              chunk_rows=200, top_k=5, return_scores=False)
    assert lean.scores is None
    assert lean.reused_chunks == tuple(range(8)) and lean.computed_chunks == ()
    # Same stored features, same tree shapes: bit-identical.
    for name in ("proponents", "opponents", "proponent_scores", "opponent_scores",
                 "score_sums"):
        assert np.array_equal(getattr(lean, name), getattr(full, name)), name


def test_not_positive_definite_fisher_is_reported_on_the_cluster(client, tmp_path):
    # N = 30 < P = 40 samples: the undamped Gram is singular.
    fn, X, y, Gamma = _problem(N=30, P=40)
    with pytest.raises(NotPositiveDefiniteError) as info:
        attribute_features(fn, X, y, Gamma, client=client, store=tmp_path / "s",
                           chunk_rows=8, damping=0.0)
    assert info.value.slices == (0, 1, 2) and info.value.suggested_damping > 0


# --------------------------------------------------------------------------- faults
class KillWorkerOnce:
    """Kills the worker process the first time it featurises chunk ``chunk``."""

    def __init__(self, inner, marker, chunk):
        self.inner, self.marker, self.chunk = inner, str(marker), chunk
        self.steps, self.proj_dim = inner.steps, inner.proj_dim

    def fingerprint(self):
        return self.inner.fingerprint()

    def __call__(self, shard_id, X, y):
        if shard_id == self.chunk:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os._exit(1)  # the worker dies mid-featurisation; the nanny restarts it
        return self.inner(shard_id, X, y)


class FailOn:
    """Raises on chunk ``chunk`` (a bug or a transient fault in the model code)."""

    def __init__(self, inner, chunk):
        self.inner, self.chunk = inner, chunk
        self.steps, self.proj_dim = inner.steps, inner.proj_dim

    def fingerprint(self):
        return self.inner.fingerprint()

    def __call__(self, shard_id, X, y):
        if shard_id == self.chunk:
            raise RuntimeError(f"injected failure on chunk {shard_id}")
        return self.inner(shard_id, X, y)


class RecordCalls:
    """Records which chunks were featurised (one marker file per call)."""

    def __init__(self, inner, directory):
        self.inner, self.directory = inner, str(directory)
        self.steps, self.proj_dim = inner.steps, inner.proj_dim

    def fingerprint(self):
        return self.inner.fingerprint()

    def __call__(self, shard_id, X, y):
        Path(self.directory, f"{shard_id}-{os.getpid()}-{os.urandom(4).hex()}").touch()
        return self.inner(shard_id, X, y)


def _calls(directory):
    return sorted(int(p.name.split("-")[0]) for p in Path(directory).iterdir())


def test_killed_worker_mid_featurisation_gives_identical_results(client, tmp_path):
    fn, X, y, Gamma = _problem(seed=2)
    clean = attribute_features(fn, X, y, Gamma, client=client, store=tmp_path / "a",
                               chunk_rows=150, top_k=5)
    marker = tmp_path / "killed"
    got = attribute_features(KillWorkerOnce(fn, marker, 4), X, y, Gamma, client=client,
                             store=tmp_path / "b", chunk_rows=150, top_k=5)
    assert marker.exists()  # the worker really died once
    client.wait_for_workers(2, timeout=60)
    # Same chunking, same tree: the same floating-point operations, so bit-identical.
    assert np.array_equal(got.scores, clean.scores)
    assert np.array_equal(got.proponents, clean.proponents)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_chunk_is_recomputed_never_used(client, tmp_path, damage):
    fn, X, y, Gamma = _problem(seed=3)
    first = attribute_features(fn, X, y, Gamma, client=client, store=tmp_path / "s",
                               chunk_rows=300, top_k=5)
    path = tmp_path / "s" / "step_1" / "Psi" / "c" / "2" / "0"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[1000] ^= 0x40
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    calls = tmp_path / "calls"
    calls.mkdir()
    with pytest.warns(RuntimeWarning, match=r"chunk\(s\) \[2\] failed their checksum"):
        again = attribute_features(RecordCalls(fn, calls), X, y, Gamma, client=client,
                                   store=tmp_path / "s", chunk_rows=300, top_k=5)
    assert _calls(calls) == [2]
    assert again.corrupt_chunks == (2,) and again.computed_chunks == (2,)
    assert np.array_equal(again.scores, first.scores)


def test_restarted_job_computes_only_missing_chunks(client, tmp_path):
    fn, X, y, Gamma = _problem(seed=4)
    with pytest.raises(FeaturizationError, match="injected failure on chunk 3") as info:
        attribute_features(FailOn(fn, 3), X, y, Gamma, client=client,
                           store=tmp_path / "s", chunk_rows=250)
    assert set(info.value.errors) == {3}
    calls = tmp_path / "calls"
    calls.mkdir()
    resumed = attribute_features(RecordCalls(fn, calls), X, y, Gamma, client=client,
                                 store=tmp_path / "s", chunk_rows=250)
    assert _calls(calls) == [3]
    fresh = attribute_features(fn, X, y, Gamma, client=client, store=tmp_path / "t",
                               chunk_rows=250)
    assert np.array_equal(resumed.scores, fresh.scores)


# --------------------------------------------------------------------------- bad input
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cluster_is_a_clear_error_and_writes_nothing(tmp_path):
    fn, X, y, Gamma = _problem(N=50)
    address = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(ConnectionError, match=f"could not reach a Dask scheduler at '{address}'"):
        attribute_features(fn, X, y, Gamma, client=address, store=tmp_path / "s",
                           connect_timeout=1.0)
    assert not (tmp_path / "s").exists()


def test_closed_client_is_a_clear_error():
    c = distributed.Client(distributed.LocalCluster(n_workers=1, threads_per_worker=1,
                                                    processes=False, dashboard_address=":0"))
    cluster = c.cluster
    c.close()
    cluster.close()
    with pytest.raises(ConnectionError, match="not running"):
        connect(c)


# --------------------------------------------------------------------------- retrainings
def _ridge_fit(j, mask, data):
    X, y, X_test = data
    Xm = X[mask]
    w = np.linalg.solve(Xm.T @ Xm + 1e-3 * np.eye(X.shape[1]), Xm.T @ y[mask])
    return X_test @ w


def test_map_retrainings_equals_a_serial_loop(client):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((200, 5))
    y = X @ rng.standard_normal(5)
    X_test = rng.standard_normal((3, 5))
    masks = rng.random((11, 200)) < 0.5
    got = map_retrainings(client, _ridge_fit, masks, data=(X, y, X_test), batch_size=3)
    want = np.stack([_ridge_fit(j, m, (X, y, X_test)) for j, m in enumerate(masks)])
    # Each fit runs the same float64 operations on a worker as here.
    assert np.array_equal(got, want)


def _fails_on_odd(j, mask, data):
    if j % 2:
        raise ValueError(f"subset {j} diverged")
    return np.array([float(mask.sum())])


def test_map_retrainings_reports_failed_fits_and_keeps_the_rest(client):
    from iif_ref.distributed import RetrainingError
    masks = np.eye(4, dtype=bool)
    with pytest.raises(RetrainingError, match="subset 1 diverged") as info:
        map_retrainings(client, _fails_on_odd, masks)
    assert set(info.value.errors) == {1, 3}
    assert info.value.results[0][0] == 1.0 and info.value.results[1] is None


# --------------------------------------------------------------------------- torch models
def _torch_problem():
    torch = pytest.importorskip("torch", reason="the torch bridge needs torch")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(240, 3, generator=g, dtype=torch.float64)
    y = torch.tanh(X[:, :1]) + 0.1 * torch.randn(240, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 1)).double()
    return net, X, y, X[:4] + 0.05, y[:4]


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [
    ("iif", dict(K=3, proj_dim=8, lam=0.5, unlearn_epochs=2, path_lr=1e-4)),
    ("if", dict(proj_dim=8, damping=1e-3, solver="projected")),
    # the default damping: the same measured r in both engines
    ("if", dict(proj_dim=8, solver="projected")),
])
def test_attribute_with_client_equals_single_process(client, tmp_path, method, options):
    import iif_ref

    net, X, y, X_test, y_test = _torch_problem()
    single = iif_ref.attribute(net, "mse", X, y, X_test, y_test, method=method, seed=5,
                               progress=False, **options)
    dist = iif_ref.attribute(net, "mse", X, y, X_test, y_test, method=method, seed=5,
                             client=client, store=str(tmp_path / "s"), chunk_rows=70,
                             progress=False, **options)
    assert type(dist) is type(single)
    # Path models, baseline and Gamma are computed by the same driver code; features by
    # the same per-sample code on shards. Only summation orders differ: scores agree to
    # the float64 bound of tests/test_distributed_store.py::score_bound, which for these
    # sizes (n=240, P=8, cond(F) recorded in the result) is below 1e-9 relative.
    cond = max(max(single.diagnostics["condition"]), max(dist.diagnostics["condition"]))
    tol = 4 * (240 + 8) * 8 * EPS * cond
    scale = np.abs(single.scores).max()
    assert np.max(np.abs(dist.scores - single.scores)) <= tol * scale
    if method == "iif":                                          # same driver code
        assert np.allclose(dist.delta, single.delta, rtol=0, atol=0)
        assert np.allclose(dist.delta_path, single.delta_path, rtol=0, atol=0)
    else:                                       # the result schema: no path, no Δ
        assert dist.delta is single.delta is None
    assert np.allclose(dist.damping if hasattr(dist, "damping") else
                       dist.diagnostics["damping"], single.diagnostics["damping"],
                       rtol=1e3 * EPS, atol=0)
    assert dist.diagnostics["distributed"][0]["n_workers"] == 2


@pytest.mark.slow
def test_lds_retrainings_on_the_cluster_equal_the_retraining_engine(client):
    pytest.importorskip("torch", reason="the retraining engine trains torch networks")
    from iif_ref.datasets import load_digits_split
    from iif_ref.distributed.retrain import SubsetTraining
    from iif_ref.models import TrainConfig
    from iif_ref.retraining import ModelSpec, retrain_subsets

    split = load_digits_split(40, 6, seed=0)
    masks = np.random.default_rng(0).random((4, 40)) < 0.5
    spec = ModelSpec("mlp", {"in_features": 64, "hidden": (16,)},
                     TrainConfig(epochs=2, optimiser="sgd", lr=0.05, momentum=0.9,
                                 batch_size=16))
    want = retrain_subsets(spec, split.X_train, split.y_train, split.X_test, split.y_test,
                           masks, seed=3, n_workers=1, progress=False)
    data = (np.asarray(split.X_train, dtype=np.float32), np.asarray(split.y_train, np.int64),
            np.asarray(split.X_test, dtype=np.float32), np.asarray(split.y_test, np.int64))
    got = map_retrainings(client, SubsetTraining(spec, 3), masks, data=data, stack=False)
    # Same seed per subset, one thread, float32 CPU kernels: bit-identical wherever it runs.
    assert np.array_equal(np.stack([losses for losses, _ in got]), want.losses)
