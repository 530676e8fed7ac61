"""Loading the compiled op families and choosing between them and the reference.

Each op family is its own extension module ``jaxinfer._<family>`` whose
``registrations()`` returns ``{platform: {target_name: capsule}}``; importing
it registers every target with XLA once. A family that was not built (no
compiler at install time) simply reports no platforms, and the ops fall back
to the pure-jnp reference.
"""

from __future__ import annotations

import functools
import importlib

import jax

IMPLEMENTATIONS = (None, "ffi", "reference")


@functools.cache
def family_platforms(family: str) -> frozenset[str]:
    """Registers the targets of ``jaxinfer._<family>``; returns the platforms it serves."""
    try:
        module = importlib.import_module(f"jaxinfer._{family}")
    except ImportError:
        return frozenset()
    registrations = module.registrations()
    for platform, targets in registrations.items():
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)
    return frozenset(registrations)


def module(family: str):
    """The compiled module ``jaxinfer._<family>`` (its host helpers, such as planners)."""
    return importlib.import_module(f"jaxinfer._{family}")


def current_platform() -> str:
    """The XLA platform name of the default backend ('cpu' or 'CUDA')."""
    backend = jax.default_backend()
    return {"gpu": "CUDA", "cuda": "CUDA"}.get(backend, backend)


def use_ffi(family: str, implementation: str | None) -> bool:
    """True to call the family's custom call, False to use the reference.

    ``implementation``: None picks the custom call when the family serves the
    current platform; "ffi" insists on it; "reference" forces the jnp path.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "reference":
        return False
    available = current_platform() in family_platforms(family)
    if implementation == "ffi" and not available:
        raise ValueError(
            f"implementation='ffi': jaxinfer was built without the '{family}' kernels for "
            f"platform {current_platform()!r} (built for: {sorted(family_platforms(family))})")
    return available
