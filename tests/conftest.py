"""Shared test helpers: the gpu marker's skip rule and tolerance checks."""

import jax
import numpy as np
import pytest

from jaxinfer import _ffi

jax.config.update("jax_default_matmul_precision", "highest")


def has_cuda_build() -> bool:
    return _ffi.current_platform() == "CUDA" and "CUDA" in _ffi.family_platforms("merge")


def pytest_collection_modifyitems(config, items):
    if has_cuda_build():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and jaxinfer built with CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Relative error allowed against the float32 reference, by input dtype: the
# kernels keep fp32 accumulators, so the error is the inputs' own rounding.
RTOL = {np.dtype("float32"): 1e-5, np.dtype("float16"): 2e-3, np.dtype(jax.numpy.bfloat16): 1.6e-2}


def assert_close(out, ref, dtype=None, name="out"):
    """Same inf/NaN positions, then ||out - ref|| / ||ref|| under the dtype's tolerance."""
    out = np.asarray(jax.numpy.asarray(out, jax.numpy.float32), np.float64)
    ref = np.asarray(jax.numpy.asarray(ref, jax.numpy.float32), np.float64)
    assert out.shape == ref.shape, (name, out.shape, ref.shape)
    assert not np.isnan(out).any(), f"{name}: NaN in output"
    np.testing.assert_array_equal(np.isinf(out), np.isinf(ref), err_msg=f"{name}: inf positions")
    np.testing.assert_array_equal(out[np.isinf(out)], ref[np.isinf(ref)], err_msg=f"{name}: inf signs")
    finite = np.isfinite(ref)
    err = np.linalg.norm(out[finite] - ref[finite])
    scale = max(np.linalg.norm(ref[finite]), 1e-6)
    tol = RTOL[np.dtype(dtype if dtype is not None else np.float32)]
    assert err / scale <= tol, f"{name}: relative error {err / scale:.2e} > {tol:.1e}"
