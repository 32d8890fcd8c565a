"""Networks, deterministic training and the retraining ground-truth engine.

Equalities here are exact (``array_equal``), not approximate: the engine promises that
a subset is trained with the same seed and one thread wherever it runs, and float32
CPU kernels with one thread are deterministic, so any difference is a bug.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from iif_ref.datasets import load_digits_split
from iif_ref.models import (PAPER_TRAINING, TrainConfig, count_parameters, make_mlp,
                            make_model, make_resnet9, per_sample_cross_entropy, train)
from iif_ref.retraining import ModelSpec, retrain_subsets, subset_seed

TINY = TrainConfig(epochs=3, optimiser="sgd", lr=0.05, momentum=0.9, batch_size=16)
SPEC = ModelSpec("mlp", {"in_features": 64, "hidden": (16,)}, TINY)


@pytest.fixture(scope="module")
def data():
    split = load_digits_split(40, 6, seed=0)
    masks = np.random.default_rng(0).random((5, 40)) < 0.5
    return split, masks


def test_mlp_has_table5_shape_and_parameter_count():
    model = make_mlp(64)
    # 64*128+128 + 128*64+64 + 64*10+10 = 17,226 (three linear maps of Table 5).
    assert count_parameters(model) == 17226
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 2 and all(d.p == 0.1 for d in dropouts)
    assert not model.training  # attribution evaluates in eval mode


def test_resnet9_forward_shape_and_table5_widths():
    model = make_resnet9(seed=0)
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [64, 128, 128, 128, 256, 512, 512, 512]
    out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_eval_mode_output_is_deterministic_despite_dropout():
    model = make_mlp(64, seed=1)
    x = torch.randn(5, 64)
    assert torch.equal(model(x), model(x))


def test_train_is_bit_reproducible_given_seed(data):
    split, _ = data
    a = train(make_mlp(64, seed=2), split.X_train, split.y_train, config=TINY, seed=7)
    b = train(make_mlp(64, seed=2), split.X_train, split.y_train, config=TINY, seed=7)
    c = train(make_mlp(64, seed=2), split.X_train, split.y_train, config=TINY, seed=8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert not a.training


def test_train_reduces_training_loss(data):
    split, _ = data
    model = make_mlp(64, seed=0)
    before = per_sample_cross_entropy(model, split.X_train, split.y_train).mean()
    # Table 5's optimiser on 40 samples; batch 8 so the 50 epochs make 250 steps.
    config = TrainConfig(**{**PAPER_TRAINING["mlp"].to_dict(), "batch_size": 8})
    train(model, split.X_train, split.y_train, config=config, seed=0)
    after = per_sample_cross_entropy(model, split.X_train, split.y_train).mean()
    assert after < 0.1 * before


def test_train_validates_inputs(data):
    split, _ = data
    with pytest.raises(ValueError, match="X"):
        bad = split.X_train.copy()
        bad[0, 0] = np.nan
        train(make_mlp(64), bad, split.y_train, seed=0)
    with pytest.raises(TypeError, match="y"):
        train(make_mlp(64), split.X_train, split.y_train.astype(float), seed=0)
    with pytest.raises(ValueError, match="optimiser"):
        TrainConfig(optimiser="rmsprop")
    with pytest.raises(ValueError, match="arch"):
        make_model("vgg", seed=0)


def test_retrained_losses_equal_a_direct_training_of_each_subset(data):
    split, masks = data
    res = retrain_subsets(SPEC, split.X_train, split.y_train, split.X_test, split.y_test,
                          masks[:2], seed=11, progress=False)
    for j in range(2):
        s = subset_seed(11, j)
        model = make_model("mlp", seed=s, in_features=64, hidden=(16,))
        train(model, split.X_train[masks[j]], split.y_train[masks[j]], config=TINY, seed=s)
        assert np.array_equal(res.losses[j],
                              per_sample_cross_entropy(model, split.X_test, split.y_test))


def test_same_seed_trains_every_subset_from_one_initialisation_and_batch_order(
        data, tmp_path):
    # The low-noise ground truth: subset j is trained with subset_seed(seed, 0) whatever
    # j, so two subsets with the same rows give the same losses bit for bit, and its
    # cache entries are not those of the per-subset seeds.
    split, masks = data
    same = np.stack([masks[0], masks[0], masks[1]])
    args = (SPEC, split.X_train, split.y_train, split.X_test, split.y_test, same)
    res = retrain_subsets(*args, seed=11, same_seed=True, cache_dir=tmp_path,
                          progress=False)
    assert res.config["same_seed"] and np.array_equal(res.losses[0], res.losses[1])
    s = subset_seed(11, 0)
    model = make_model("mlp", seed=s, in_features=64, hidden=(16,))
    train(model, split.X_train[masks[1]], split.y_train[masks[1]], config=TINY, seed=s)
    assert np.array_equal(res.losses[2],
                          per_sample_cross_entropy(model, split.X_test, split.y_test))
    per_subset = retrain_subsets(*args, seed=11, cache_dir=tmp_path, progress=False)
    assert per_subset.n_cached == 0
    assert not np.array_equal(per_subset.losses[0], per_subset.losses[1])


def test_resume_after_interruption_gives_identical_results(data, tmp_path):
    split, masks = data
    args = (SPEC, split.X_train, split.y_train, split.X_test, split.y_test, masks)
    reference = retrain_subsets(*args, seed=3, progress=False)
    partial = retrain_subsets(*args, seed=3, cache_dir=tmp_path, max_new=2, progress=False)
    assert not partial.config["complete"] and np.isnan(partial.losses).any()
    assert len(list(tmp_path.glob("subset_*.npz"))) == 2
    resumed = retrain_subsets(*args, seed=3, cache_dir=tmp_path, progress=False)
    assert resumed.n_cached == 2 and resumed.config["complete"]
    assert np.array_equal(resumed.losses, reference.losses)
    assert not list(Path(tmp_path).glob("*.tmp"))  # atomic writes leave no debris


def test_stale_cache_entries_are_retrained_not_reused(data, tmp_path):
    split, masks = data
    args = (SPEC, split.X_train, split.y_train, split.X_test, split.y_test, masks[:2])
    retrain_subsets(*args, seed=3, cache_dir=tmp_path, progress=False)
    # Another seed means another ground truth: the cached files must not be reused.
    other = retrain_subsets(*args, seed=4, cache_dir=tmp_path, progress=False)
    assert other.n_cached == 0
    (tmp_path / "subset_00000.npz").write_bytes(b"garbage")
    again = retrain_subsets(*args, seed=4, cache_dir=tmp_path, progress=False)
    assert again.n_cached == 1 and np.array_equal(again.losses, other.losses)


def test_parallel_equals_serial(data):
    split, masks = data
    args = (SPEC, split.X_train, split.y_train, split.X_test, split.y_test, masks)
    serial = retrain_subsets(*args, seed=5, n_workers=1, progress=False)
    parallel = retrain_subsets(*args, seed=5, n_workers=2, progress=False)
    assert np.array_equal(serial.losses, parallel.losses)
    assert np.all(np.isfinite(serial.losses)) and np.all(serial.losses > 0)


def test_retrain_subsets_validates_masks(data):
    split, masks = data
    args = (SPEC, split.X_train, split.y_train, split.X_test, split.y_test)
    with pytest.raises(TypeError, match="boolean"):
        retrain_subsets(*args, masks.astype(int), seed=0)
    with pytest.raises(ValueError, match="shape"):
        retrain_subsets(*args, masks[:, :10], seed=0)
    empty = masks.copy()
    empty[1] = False
    with pytest.raises(ValueError, match="row 1"):
        retrain_subsets(*args, empty, seed=0)
