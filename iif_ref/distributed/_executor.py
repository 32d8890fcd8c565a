"""Where tasks run: a Dask ``Client``, or this process when no client is given.

The engine submits every piece of work through :func:`submit` and collects it with
:func:`settle`, so the same code runs on a cluster and, with ``client=None``, serially
in-process (for debugging, and for fault tests that patch this process).
"""
from __future__ import annotations

import uuid

__all__ = ["submit", "settle", "gather", "scatter", "tree_reduce", "check_client",
           "completed"]


class _Done:
    """A finished in-process task with the surface of a ``distributed.Future`` we use."""

    def __init__(self, fn, args):
        try:
            # Like Dask, a task whose argument is another task receives its result.
            args = [a.result() if isinstance(a, _Done) else a for a in args]
            self._value, self._error = fn(*args), None
        except Exception as exc:  # recorded like a remote task failure
            self._value, self._error = None, exc
        self.status = "error" if self._error is not None else "finished"

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self):
        return self._error


def check_client(client):
    """Raise ``TypeError`` unless ``client`` is None or a ``distributed.Client``."""
    if client is None:
        return None
    from distributed import Client
    if not isinstance(client, Client):
        raise TypeError(f"client must be a distributed.Client, an address string or None, "
                        f"got {type(client).__name__}")
    if client.status != "running":
        raise ConnectionError(f"the Dask client is not running (status {client.status!r}); "
                              f"reconnect or pass a new client")
    return client


def submit(client, fn, *args, name="task"):
    """Run ``fn(*args)`` on the cluster (a future) or here (a finished ``_Done``)."""
    if client is None:
        return _Done(fn, args)
    # Unique keys: a rerun after a failure must not pick up the failed task's state.
    return client.submit(fn, *args, key=f"iif-{name}-{uuid.uuid4().hex[:12]}", pure=False)


def scatter(client, value):
    """Send ``value`` to every worker once (a future), or return it unchanged."""
    if client is None:
        return value
    return client.scatter(value, broadcast=True, hash=False)


def settle(client, futures):
    """Wait for every future; return ``(results, errors)`` dicts keyed like ``futures``.

    Unlike ``gather`` this does not stop at the first failure, so a caller can report
    every failed piece and keep what succeeded.
    """
    if client is not None and futures:
        from distributed import wait
        wait(list(futures.values()))
    results, errors = {}, {}
    for key, fut in futures.items():
        if fut.status == "finished":
            results[key] = fut.result()
        else:
            try:
                errors[key] = fut.exception()
            except Exception as exc:  # cancelled futures raise instead of returning
                errors[key] = exc
    return results, errors


def gather(client, futures):
    """Results of a list of futures, raising the first remote exception."""
    if client is None:
        return [f.result() for f in futures]
    return client.gather(list(futures))


def completed(client, futures):
    """Yield ``(index, result)`` for a list of futures, in order of completion."""
    if client is None:
        for i, fut in enumerate(futures):
            yield i, fut.result()
        return
    from distributed import as_completed
    where = {fut.key: i for i, fut in enumerate(futures)}
    for fut, value in as_completed(futures, with_results=True):
        yield where[fut.key], value


def tree_reduce(client, futures, combine, *, fan_in=4, name="reduce"):
    """Reduce futures with an associative ``combine(list) -> value`` as a tree.

    Each level combines groups of ``fan_in`` partial results on the workers, so no
    worker holds more than ``fan_in`` partials and the depth is ``log_fan_in(n)``.
    Returns a future (or a finished ``_Done``) of the total.
    """
    level = list(futures)
    if not level:
        raise ValueError("tree_reduce needs at least one input")
    while len(level) > 1:
        level = [submit(client, _combine_args, combine, *level[i:i + fan_in], name=name)
                 for i in range(0, len(level), fan_in)]
    return level[0]


def _combine_args(combine, *parts):
    return combine(list(parts))
