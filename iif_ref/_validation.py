"""Input validation shared by every public function (one place, one message style).

Public functions validate once at the boundary and hand clean float arrays to
private cores. Messages name the argument and what was received.
"""
from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "as_float_array",
    "check_positive_int",
    "check_positive_real",
    "check_nonnegative_real",
    "check_same_length",
    "as_generator",
]


def as_float_array(value, name, *, ndim=None, dtype=np.float64, allow_dtypes=None,
                   min_rows=1):
    """Return ``value`` as a finite floating array, or raise naming ``name``.

    Parameters
    ----------
    value : array_like
    name : str
        Argument name used in error messages.
    ndim : int or tuple of int, optional
        Allowed numbers of dimensions.
    dtype : numpy dtype, optional
        Target dtype when ``allow_dtypes`` is None (default float64).
    allow_dtypes : tuple of dtypes, optional
        Floating dtypes kept as they are (e.g. float32 and float64 for kernels);
        other dtypes are converted to ``dtype``.
    min_rows : int
        Minimum length of the first axis (empty data is an error).
    """
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be an array of numbers, got {type(value).__name__}")
    arr = np.asarray(value)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                   or arr.dtype == np.bool_):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise TypeError(f"{name} must be real, got complex dtype {arr.dtype}")
    if allow_dtypes is not None and arr.dtype in tuple(np.dtype(d) for d in allow_dtypes):
        out = arr
    else:
        out = arr.astype(dtype, copy=False)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if out.ndim not in allowed:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, allowed))} dimension(s), "
                f"got shape {out.shape}")
    if out.ndim >= 1 and out.shape[0] < min_rows:
        raise ValueError(f"{name} is empty (shape {out.shape}); at least {min_rows} row(s) needed")
    if not _all_finite(out):
        bad = np.argwhere(~np.isfinite(out))
        where = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"{name} contains {len(bad)} non-finite value(s) (NaN or Inf), first at index {where}")
    return out


def _all_finite(arr):
    # A float64 sum is non-finite iff some entry is NaN/Inf or the sum overflows; it needs
    # O(1) memory, unlike a boolean mask the size of the input. Overflow (entries near
    # 1e308) falls back to the exact element-wise test.
    if arr.size == 0:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(arr, dtype=np.float64)):
            return True
    return bool(np.all(np.isfinite(arr)))


def check_positive_int(value, name, *, allow_none=False):
    """Return ``value`` as int >= 1, or raise naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_real(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_positive_real(value, name):
    """Return ``value`` as a finite float > 0, or raise naming ``name``."""
    value = _check_real(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_nonnegative_real(value, name):
    """Return ``value`` as a finite float >= 0, or raise naming ``name``."""
    value = _check_real(value, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_same_length(a, a_name, b, b_name):
    """Raise unless the first axes of ``a`` and ``b`` have the same length."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same number of rows, "
            f"got {a.shape[0]} and {b.shape[0]}")


def as_generator(seed, name="seed"):
    """Return a ``numpy.random.Generator`` from an int >= 0 or a Generator (passed through)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative integer or a numpy.random.Generator, "
                        f"got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"{name} must be >= 0, got {seed}")
    return np.random.default_rng(int(seed))


def check_options(fn, options, *, what, n_data=6):
    """Raise ``TypeError`` listing ``fn``'s options when ``options`` holds a name it lacks.

    For a public call that forwards ``**options`` to one of several functions (such as
    ``attribute(..., method="tracin", K=3)``), so that the error names the method and the
    options it does take instead of Python's bare "unexpected keyword argument".

    Parameters
    ----------
    fn : callable
        The function the options go to; when it takes ``**kwargs`` itself it validates them.
    options : dict
    what : str
        How the error names the call, e.g. ``"method='tracin'"``.
    n_data : int, optional
        Leading positional parameters (the data) that are not options.
    """
    import inspect

    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params[n_data:]
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"{what} does not take {', '.join(map(repr, unknown))}; its options "
                        f"are {', '.join(accepted)}")
