"""Small builders shared by several test files (pytest puts ``tests/`` on ``sys.path``)."""


def trained_digits_mlp(n_train, n_test, *, hidden, epochs, batch_size, seed):
    """A digits split and an MLP trained on it, both from one ``seed``.

    Returns
    -------
    split : iif_ref.datasets.DataSplit
        ``load_digits_split(n_train, n_test, seed=seed)``.
    model : torch.nn.Module
        ``make_mlp(64, hidden=hidden, seed=seed)`` after :func:`iif_ref.models.train` for
        ``epochs`` epochs of mini-batches of ``batch_size``.
    """
    # Imported here: iif_ref.models needs torch, and callers skip without it first.
    from iif_ref.datasets import load_digits_split
    from iif_ref.models import TrainConfig, make_mlp, train

    split = load_digits_split(n_train, n_test, seed=seed)
    model = make_mlp(64, hidden=hidden, seed=seed)
    train(model, split.X_train, split.y_train,
          config=TrainConfig(epochs=epochs, batch_size=batch_size), seed=seed)
    return split, model


def fit_summed_cross_entropy(net, X, y, *, max_iter):
    """Run ``max_iter`` L-BFGS iterations on the summed cross-entropy of ``net`` (in place).

    A partial fit on random labels keeps the probabilities away from 0 and 1, so
    per-sample gradients stay O(1) instead of underflowing on a memorised training set.
    """
    import torch

    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    opt = torch.optim.LBFGS(net.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(Xt), yt, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    return net
