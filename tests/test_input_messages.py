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


# ---- the model and the projection dimension ------------------------------------------
def _mlp_106(dtype=torch.float64, **factory):
    # 10·8 + 8 + 8·2 + 2 = 106 trainable parameters.
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 8, **factory), torch.nn.Tanh(),
                               torch.nn.Linear(8, 2, **factory)).to(dtype)


@pytest.fixture(scope="module")
def data_10():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(24, 10)), rng.integers(0, 2, 24)
    return X, y, X[:3] + 0.5, y[:3]


FAST = {"iif": dict(K=1, baseline="prediction", progress=False), "if": {}, "tracin": {},
        "trak": {}}


@pytest.mark.parametrize("method", ["iif", "if", "tracin", "trak"])
def test_proj_dim_zero_is_refused_naming_proj_dim_by_every_method(method, data_10):
    # method="if" used to accept it: its default solver does not project.
    with pytest.raises(ValueError, match=r"proj_dim must be >= 1, got 0"):
        attribute(_mlp_106(), "cross_entropy", *data_10, method=method, proj_dim=0,
                  **FAST[method])


@pytest.mark.parametrize("method, options", [("iif", FAST["iif"]),
                                             ("if", {"solver": "projected"}),
                                             ("tracin", {}), ("trak", {})])
def test_proj_dim_above_the_parameter_count_warns_naming_proj_dim(method, options, data_10):
    from iif_ref.errors import ProjectionDimensionWarning

    with pytest.warns(ProjectionDimensionWarning,
                      match=r"proj_dim=200 exceeds the model's 106 trainable parameters.*"
                            r"proj_dim=None"):
        result = attribute(_mlp_106(), "cross_entropy", *data_10, method=method,
                           proj_dim=200, **options)
    assert np.all(np.isfinite(result.scores))      # a warning, not a refusal


def test_proj_dim_at_most_the_parameter_count_does_not_warn(data_10):
    import warnings

    from iif_ref.errors import ProjectionDimensionWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", ProjectionDimensionWarning)
        attribute(_mlp_106(), "cross_entropy", *data_10, method="tracin", proj_dim=106)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_model_is_refused_naming_the_dtype_option(half, data_10):
    with pytest.raises(TypeError, match=r"model has (float16|bfloat16) parameters.*"
                                         r"dtype='float32'"):
        attribute(_mlp_106(half), "cross_entropy", *data_10, method="tracin")
    # The fix the message names: the same model computed in float32 (not converted).
    model = _mlp_106(half)
    got = attribute(model, "cross_entropy", *data_10, method="tracin", dtype="float32")
    ref = attribute(model.float(), "cross_entropy", *data_10, method="tracin")
    np.testing.assert_array_equal(got.scores, ref.scores)


def test_meta_device_model_is_refused_naming_model_and_the_fix(data_10):
    with pytest.raises(ValueError, match=r"model has 4 parameter\(s\) or buffer\(s\) on the "
                                         r"meta device.*to_empty"):
        attribute(_mlp_106(device="meta"), "cross_entropy", *data_10, method="iif",
                  **FAST["iif"])


@pytest.mark.parametrize("method", ["iif", "if", "tracin", "trak"])
def test_plain_function_as_model_is_refused_naming_model(method, data_10):
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module .*got function; "
                                         r"a plain function has no parameters"):
        attribute(lambda x: x[:, :2], "cross_entropy", *data_10, method=method,
                  **FAST[method])


@pytest.mark.parametrize("argument", ["y_train", "y_test"])
def test_string_class_labels_are_told_to_encode_not_astype_int(argument, data_10):
    X, y, Xt, yt = data_10
    labels = {"y_train": np.array(["cat", "dog"])[y], "y_test": np.array(["cat", "dog"])[yt]}
    data = {"y_train": y, "y_test": yt, argument: labels[argument]}
    with pytest.raises(TypeError, match=rf"{argument} for the 'cross_entropy' loss must hold "
                                         r"integer class labels.*dtype <U3.*np.unique") as exc:
        attribute(_mlp_106(), "cross_entropy", X, data["y_train"], Xt, data["y_test"],
                  method="tracin")
    assert "astype(int)" not in str(exc.value)      # it would fail on strings


def test_one_dimensional_x_test_is_told_to_add_the_sample_axis(data_10):
    X, y, Xt, yt = data_10
    with pytest.raises(ValueError, match=r"X_test of shape \(10,\) looks like one test point "
                                         r"without its sample axis: pass X_test\[None\].*"
                                         r"shape \(1, 10\)"):
        attribute(_mlp_106(), "cross_entropy", X, y, Xt[0], yt[:1], method="tracin")
    one = attribute(_mlp_106(), "cross_entropy", X, y, Xt[0][None], yt[:1], method="tracin")
    assert one.scores.shape == (1, 24)


def test_one_dimensional_x_train_is_told_to_reshape_to_one_feature():
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 2).double()
    x = np.linspace(-1, 1, 12)
    with pytest.raises(ValueError, match=r"a 1-D X_train is 12 samples without features: "
                                         r"for one feature per sample pass "
                                         r"X_train.reshape\(-1, 1\)"):
        attribute(model, "cross_entropy", x, np.arange(12) % 2, x[:2], [0, 1],
                  method="tracin")
