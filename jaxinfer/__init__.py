"""jaxinfer: LLM-serving attention and sampling kernels for JAX.

Every op is a plain function usable inside ``jax.jit``. On a CUDA GPU it
lowers to a jaxinfer custom call (XLA FFI); on the CPU to a C++ handler or,
where none exists, to the pure-jnp reference in ``jaxinfer.reference``.
Pass ``implementation="reference"`` to any op to force the jnp path.
"""

from jaxinfer import reference, sampling
from jaxinfer.cascade import CascadePlan, cascade_attention, plan_cascade
from jaxinfer.decode import DecodePlan, batch_decode, plan_decode
from jaxinfer.merge import merge_state, merge_state_in_place, merge_states
from jaxinfer.prefill import PrefillPlan, batch_prefill, batch_prefill_ragged, plan_prefill

__version__ = "0.1.0"

__all__ = ["CascadePlan", "DecodePlan", "PrefillPlan", "batch_decode", "batch_prefill",
           "batch_prefill_ragged", "cascade_attention", "merge_state", "merge_state_in_place",
           "merge_states", "plan_cascade", "plan_decode", "plan_prefill", "reference", "sampling"]
