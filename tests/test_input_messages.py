"""Mistakes a new user makes at the public boundary get a message that names the fix."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from iif_ref import attribute  # noqa: E402
from iif_ref._validation import check_options  # noqa: E402


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    rng = np.random.default_rng(0)
    X, Xt = rng.normal(size=(10, 4)), rng.normal(size=(2, 4))
    return model, X, rng.integers(0, 3, 10), Xt, rng.integers(0, 3, 2)


def test_float_class_labels_report_the_dtype_not_a_shape(problem):
    model, X, y, Xt, yt = problem
    with pytest.raises(TypeError, match=r"y_train .* integer class labels .* dtype float64 "
                                         r"with shape \(10,\).*astype\(int\)"):
        attribute(model, "cross_entropy", X, y.astype(float), Xt, yt, method="tracin")


def test_option_of_another_method_lists_this_methods_options(problem):
    model, X, y, Xt, yt = problem
    with pytest.raises(TypeError, match=r"method='tracin' does not take 'K'; its options are "
                                         r"checkpoints, lrs, proj_dim"):
        attribute(model, "cross_entropy", X, y, Xt, yt, method="tracin", K=3)


def test_input_of_the_wrong_width_names_x_train_and_the_model_input(problem):
    model, X, y, Xt, yt = problem
    with pytest.raises(ValueError, match=r"X_train of shape \(10, 5\); its first layer "
                                         r"\(Linear\) takes 4 input features"):
        attribute(model, "cross_entropy", np.hstack([X, X[:, :1]]), y,
                  np.hstack([Xt, Xt[:, :1]]), yt, method="tracin")


def test_check_options_leaves_functions_with_their_own_kwargs_alone():
    def strict(a, *, b=1, c=2):
        return a

    def loose(a, **options):
        return a

    check_options(strict, {"b": 0}, what="strict", n_data=1)
    check_options(loose, {"anything": 0}, what="loose", n_data=1)
    with pytest.raises(TypeError, match="strict does not take 'd', 'e'; its options are b, c"):
        check_options(strict, {"e": 0, "d": 0, "b": 0}, what="strict", n_data=1)
