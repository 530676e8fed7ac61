"""merge_state / merge_states: the custom calls (CPU and GPU) against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from capture import assert_captured
from conftest import assert_close

import jaxinfer
from jaxinfer import reference

RNG = np.random.default_rng()
DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]


def random_states(tokens, num_states, heads, dim, dtype):
    v = jnp.asarray(RNG.standard_normal((tokens, num_states, heads, dim)), dtype)
    s = RNG.standard_normal((tokens, num_states, heads)).astype(np.float32) * 4
    s[RNG.random(s.shape) < 0.2] = -np.inf  # empty partial states
    s[0] = -np.inf  # one token with no keys at all
    return v, jnp.asarray(s)


def check_merge_states(v, s):
    out, lse = jax.jit(jaxinfer.merge_states)(v, s)
    want, want_lse = reference.merge_states(v, s)
    assert out.dtype == v.dtype and lse.dtype == jnp.float32
    assert_close(out, want, v.dtype)
    assert_close(lse, want_lse)
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0)


def check_merge_state(v, s):
    out, lse = jax.jit(jaxinfer.merge_state)(v[:, 0], s[:, 0], v[:, 1], s[:, 1])
    want, want_lse = reference.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1])
    assert_close(out, want, v.dtype)
    assert_close(lse, want_lse)


def test_cpu_lowers_to_the_custom_call():
    v, s = random_states(3, 2, 2, 8, jnp.float32)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        text = jax.jit(jaxinfer.merge_states).lower(v, s).as_text()
        assert "jaxinfer_merge_states" in text
        text = jax.jit(jaxinfer.merge_state).lower(v[:, 0], s[:, 0], v[:, 1], s[:, 1]).as_text()
        assert "jaxinfer_merge_state" in text
        ref_text = jax.jit(lambda v, s: jaxinfer.merge_states(v, s, implementation="reference")
                           ).lower(v, s).as_text()
        assert "jaxinfer" not in ref_text


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,num_states,heads,dim", [(1, 1, 1, 64), (7, 3, 4, 128), (33, 5, 8, 256),
                                                         (5, 2, 3, 20)])
def test_merge_on_default_device(dtype, tokens, num_states, heads, dim):
    v, s = random_states(tokens, num_states, heads, dim, dtype)
    check_merge_states(v, s)
    if num_states >= 2:
        check_merge_state(v, s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_state_in_place(dtype):
    v, s = random_states(9, 2, 4, 64, dtype)
    want = reference.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1])
    step = jax.jit(jaxinfer.merge_state_in_place, donate_argnums=(0, 1))
    out, lse = step(v[:, 0] + 0, s[:, 0] + 0, v[:, 1], s[:, 1])  # fresh buffers to donate
    assert out.dtype == dtype
    assert_close(out, want[0], dtype)
    assert_close(lse, want[1])
    if dtype == jnp.float32:  # the custom call writes over v's and s's buffers
        text = jax.jit(jaxinfer.merge_state_in_place).lower(v[:, 0], s[:, 0], v[:, 1], s[:, 1]).as_text()
        assert "output_operand_alias<output_tuple_indices = [0], operand_index = 0" in text
        assert "output_operand_alias<output_tuple_indices = [1], operand_index = 1" in text


def test_merge_under_vmap():
    v, s = random_states(4, 3, 2, 16, jnp.float32)
    vb, sb = jnp.stack([v, v * 2]), jnp.stack([s, s - 1])
    out, lse = jax.jit(jax.vmap(jaxinfer.merge_states))(vb, sb)
    want, want_lse = jax.vmap(reference.merge_states)(vb, sb)
    assert_close(out, want)
    assert_close(lse, want_lse)


def test_bad_inputs_name_the_argument():
    v, s = random_states(4, 3, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"^v: expected rank 4"):
        jaxinfer.merge_states(v[0], s)
    with pytest.raises(ValueError, match=r"^s: expected shape \[tokens=4, num_states=3, heads=2\]"):
        jaxinfer.merge_states(v, s[:, :2])
    with pytest.raises(ValueError, match=r"^s: expected dtype in \(float32\), got float16"):
        jaxinfer.merge_states(v, s.astype(jnp.float16))
    with pytest.raises(ValueError, match=r"^v: expected dtype in .*got int32"):
        jaxinfer.merge_states(v.astype(jnp.int32), s)
    with pytest.raises(ValueError, match=r"^v_b: expected dtype in \(float32\), got bfloat16"):
        jaxinfer.merge_state(v[:, 0], s[:, 0], v[:, 1].astype(jnp.bfloat16), s[:, 1])
    with pytest.raises(ValueError, match=r"^s_b: expected shape \[tokens=4, heads=2\]"):
        jaxinfer.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:3, 1])
    with pytest.raises(ValueError, match=r"^implementation: expected one of"):
        jaxinfer.merge_states(v, s, implementation="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_merge_large(dtype):
    v, s = random_states(4096, 4, 32, 128, dtype)
    assert "jaxinfer_merge_states" in jax.jit(jaxinfer.merge_states).lower(v, s).as_text()
    check_merge_states(v, s)
    check_merge_state(v, s)


@pytest.mark.gpu
def test_gpu_merge_is_captured_in_a_command_buffer():
    assert_captured("""
        import jax, jax.numpy as jnp, jaxinfer
        def step(v, s):
            o, lse = jaxinfer.merge_states(v * 2, s + 1)
            o2, lse2 = jaxinfer.merge_state(o, lse, o + 1, lse)
            return o2 * 3, lse2
        v = jnp.ones((64, 3, 8, 128), jnp.bfloat16); s = jnp.zeros((64, 3, 8), jnp.float32)
        f = jax.jit(step)
        for _ in range(3):
            jax.block_until_ready(f(v, s))
    """, module="step", target="jaxinfer_merge_state")
