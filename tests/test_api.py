"""mla_decode's contract: validation, jit, static arguments, no gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_thundermla as tmla

B, S_Q, H_Q, H_KV, D_V, PAGE, PAGES, MAX_PAGES = 2, 2, 4, 2, 32, 16, 6, 3
D_QK = D_V + 64


def _args(**overrides):
  args = dict(
      q=jnp.ones((B, S_Q, H_Q, D_QK), jnp.bfloat16),
      kv_cache=jnp.ones((PAGES, PAGE, H_KV, D_QK), jnp.bfloat16),
      block_table=jnp.zeros((B, MAX_PAGES), jnp.int32),
      cache_seqlens=jnp.full((B,), 5, jnp.int32),
  )
  kwargs = dict(head_dim_v=D_V)
  for k, v in overrides.items():
    (args if k in args else kwargs)[k] = v
  return args, kwargs


def _call(**overrides):
  args, kwargs = _args(**overrides)
  return tmla.mla_decode(**args, **kwargs)


@pytest.mark.parametrize("overrides,error,words", [
    (dict(q=jnp.ones((B, H_Q, D_QK), jnp.bfloat16)), ValueError,
     ["q", "rank 4", "(2, 4, 96)"]),
    (dict(kv_cache=jnp.ones((PAGES, PAGE, D_QK), jnp.bfloat16)), ValueError,
     ["kv_cache", "rank 4"]),
    (dict(block_table=jnp.zeros((B,), jnp.int32)), ValueError,
     ["block_table", "rank 2"]),
    (dict(cache_seqlens=jnp.zeros((B, 1), jnp.int32)), ValueError,
     ["cache_seqlens", "rank 1"]),
    (dict(q=jnp.ones((B, S_Q, H_Q, D_QK), jnp.float32)), TypeError,
     ["q", "bfloat16 or float16", "float32"]),
    (dict(kv_cache=jnp.ones((PAGES, PAGE, H_KV, D_QK), jnp.float16)),
     TypeError, ["kv_cache", "bfloat16", "float16"]),
    (dict(block_table=jnp.zeros((B, MAX_PAGES), jnp.int16)), TypeError,
     ["block_table", "int32", "int16"]),
    (dict(cache_seqlens=jnp.zeros((B,), jnp.uint32)), TypeError,
     ["cache_seqlens", "int32", "uint32"]),
    (dict(block_table=np.zeros((B, MAX_PAGES), np.int64)), TypeError,
     ["block_table", "int32", "int64"]),
    (dict(head_dim_v=64), ValueError, ["d_qk", "128", "96"]),
    (dict(head_dim_v=32.0), TypeError, ["head_dim_v"]),
    (dict(head_dim_v=0), ValueError, ["head_dim_v", ">= 1"]),
    (dict(kv_cache=jnp.ones((PAGES, PAGE, H_KV, D_QK + 1), jnp.bfloat16)),
     ValueError, ["kv_cache", "96", "97"]),
    (dict(kv_cache=jnp.ones((PAGES, 24, H_KV, D_QK), jnp.bfloat16)),
     ValueError, ["page size", "multiple of 16", "24"]),
    (dict(kv_cache=jnp.ones((PAGES, 512, H_KV, D_QK), jnp.bfloat16)),
     ValueError, ["page size", "256", "512"]),
    (dict(kv_cache=jnp.ones((PAGES, PAGE, 3, D_QK), jnp.bfloat16)),
     ValueError, ["h_q", "h_kv", "3"]),
    (dict(kv_cache=jnp.ones((0, PAGE, H_KV, D_QK), jnp.bfloat16)),
     ValueError, ["num_pages", ">= 1", "0"]),
    (dict(block_table=jnp.zeros((B + 1, MAX_PAGES), jnp.int32)), ValueError,
     ["block_table.shape[0]", "2", "3"]),
    (dict(block_table=jnp.zeros((B, 0), jnp.int32)), ValueError,
     ["max_pages", "0"]),
    (dict(cache_seqlens=jnp.zeros((B + 2,), jnp.int32)), ValueError,
     ["cache_seqlens.shape[0]", "2", "4"]),
    (dict(softmax_scale=-1.0), ValueError, ["softmax_scale", "-1.0"]),
    (dict(softmax_scale=float("nan")), ValueError, ["softmax_scale"]),
    (dict(softmax_scale="0.1"), TypeError, ["softmax_scale", "str"]),
    (dict(softmax_scale=1e400), ValueError, ["softmax_scale", "inf"]),
    (dict(softmax_scale=10 ** 400), ValueError, ["softmax_scale", "inf"]),
    (dict(softmax_scale=1e300), ValueError, ["softmax_scale", "float32"]),
    (dict(softmax_scale=1e-300), ValueError, ["softmax_scale", "float32"]),
    (dict(softmax_scale=0), ValueError, ["softmax_scale", "0.0"]),
    (dict(causal=1), TypeError, ["causal", "bool"]),
    (dict(backend="tpu"), ValueError, ["backend", "tpu", "reference"]),
    (dict(q=[[1.0]]), TypeError, ["q", "list"]),
])
def test_bad_input_raises_naming_argument(overrides, error, words):
  with pytest.raises(error) as info:
    _call(**overrides)
  for word in words:
    assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("kv_shape, table_shape, words", [
    ((PAGES, 256, H_KV, D_QK), (B, 1 << 23), ["block_table.shape[1]",
                                              "2147483647", "8388608 * 256"]),
    ((PAGES, 16, H_KV, D_QK), (B, 1 << 40), ["block_table.shape[1]",
                                             "2147483647"]),
    ((1 << 31, 16, H_KV, D_QK), (B, 4), ["num_pages", "2147483648"]),
])
def test_tables_and_caches_past_int32_raise_value_error(kv_shape, table_shape,
                                                        words):
  # Shapes only: jax.eval_shape traces without allocating them.
  args = (jax.ShapeDtypeStruct((B, S_Q, H_Q, D_QK), jnp.bfloat16),
          jax.ShapeDtypeStruct(kv_shape, jnp.bfloat16),
          jax.ShapeDtypeStruct(table_shape, jnp.int32),
          jax.ShapeDtypeStruct((B,), jnp.int32))
  with pytest.raises(ValueError) as info:
    jax.eval_shape(lambda *a: tmla.mla_decode(*a, head_dim_v=D_V), *args)
  for word in words:
    assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("plan_args, name", [
    (dict(page_size=32), "page_size"),
    (dict(head_dim_v=512), "head_dim_v"),
    (dict(h_kv=1), "h_kv"),
    (dict(s_q=1), "s_q"),
])
def test_plan_built_for_other_shapes_is_refused(plan_args, name):
  args = dict(s_q=S_Q, h_q=H_Q, h_kv=H_KV, page_size=PAGE, head_dim_v=D_V)
  args.update(plan_args)
  plan = tmla.plan_decode([5] * B, num_sms=8, **args)
  with pytest.raises(ValueError, match=f"plan: built for {name}="):
    _call(plan=plan)
  with pytest.raises(ValueError, match=f"plan: built for {name}="):
    jax.jit(lambda *a: tmla.mla_decode(*a, head_dim_v=D_V, plan=plan))(
        *_args()[0].values())


def test_bad_input_raises_at_trace_time_inside_jit():
  args, _ = _args()
  fn = jax.jit(lambda q, kv, bt, sl: tmla.mla_decode(q, kv, bt, sl,
                                                      head_dim_v=D_V + 1))
  with pytest.raises(ValueError, match="d_qk"):
    fn.lower(*args.values())


def test_works_inside_jit_with_static_options():
  args, _ = _args()

  @jax.jit
  def step(q, kv, bt, sl):
    return tmla.mla_decode(q, kv, bt, sl, head_dim_v=D_V, causal=True,
                           softmax_scale=0.25)

  out, lse = step(*args.values())
  eager = tmla.mla_decode(*args.values(), head_dim_v=D_V, causal=True,
                          softmax_scale=0.25)
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(eager[0], np.float32))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(eager[1]))
  assert out.shape == (B, S_Q, H_Q, D_V) and out.dtype == jnp.bfloat16
  assert lse.shape == (B, H_Q, S_Q) and lse.dtype == jnp.float32


def test_default_scale_is_inverse_sqrt_d_qk():
  args, _ = _args()
  rng = np.random.default_rng(0)
  args["q"] = jnp.asarray(rng.standard_normal(args["q"].shape), jnp.bfloat16)
  args["kv_cache"] = jnp.asarray(
      rng.standard_normal(args["kv_cache"].shape), jnp.bfloat16)
  default = tmla.mla_decode(*args.values(), head_dim_v=D_V)
  explicit = tmla.mla_decode(*args.values(), head_dim_v=D_V,
                             softmax_scale=D_QK ** -0.5)
  np.testing.assert_array_equal(np.asarray(default[1]),
                                np.asarray(explicit[1]))


def test_grad_raises_clear_error():
  args, _ = _args()

  def loss(q):
    out, _ = tmla.mla_decode(q, *list(args.values())[1:], head_dim_v=D_V)
    return out.astype(jnp.float32).sum()

  with pytest.raises(TypeError, match="not differentiable"):
    jax.grad(loss)(args["q"].astype(jnp.bfloat16))


def test_cuda_backend_without_gpu_or_kernel_raises_runtime_error():
  if tmla.api._ffi.gpu_available() and tmla.api._ffi.kernel_available():
    pytest.skip("the CUDA kernel can run here")
  with pytest.raises(RuntimeError, match="backend='reference'"):
    _call(backend="cuda")


def test_version():
  assert isinstance(tmla.__version__, str) and tmla.__version__.count(".") == 2
