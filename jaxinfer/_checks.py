"""Trace-time argument checks whose errors name the argument and what was expected."""

from __future__ import annotations

import numpy as np


class Shapes:
    """Binds symbolic dimension names across arguments and checks each array.

    >>> dims = Shapes()
    >>> dims.check("v_a", v_a, ("tokens", "heads", "head_dim"), float_dtypes)
    >>> dims.check("s_a", s_a, ("tokens", "heads"), (np.float32,))
    The first argument that uses a name binds it; later ones must agree.
    A dimension given as an int must equal it.
    """

    def __init__(self, **known: int):
        self.dims: dict[str, int] = dict(known)

    def check(self, name, x, shape, dtypes=None):
        expected = self._describe(shape)
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name}: expected an array of shape {expected}, got {type(x).__name__}")
        if len(x.shape) != len(shape):
            raise ValueError(f"{name}: expected rank {len(shape)} {expected}, got shape {tuple(x.shape)}")
        for dim, size in zip(shape, x.shape):
            want = dim if isinstance(dim, int) else self.dims.get(dim)
            if want is not None and want != size:
                raise ValueError(f"{name}: expected shape {expected}, got {tuple(x.shape)}")
            if isinstance(dim, str):
                self.dims.setdefault(dim, size)
        if dtypes is not None and np.dtype(x.dtype) not in [np.dtype(d) for d in dtypes]:
            names = ", ".join(np.dtype(d).name for d in dtypes)
            raise ValueError(f"{name}: expected dtype in ({names}), got {np.dtype(x.dtype).name}")
        return x

    def _describe(self, shape):
        parts = []
        for dim in shape:
            if isinstance(dim, str) and dim in self.dims:
                parts.append(f"{dim}={self.dims[dim]}")
            else:
                parts.append(str(dim))
        return "[" + ", ".join(parts) + "]"
