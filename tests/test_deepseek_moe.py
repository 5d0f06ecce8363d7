"""Mixture-of-experts routing and grouped expert matmuls vs numpy oracles;
decode-step input errors and the out-of-vocabulary policy."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_thundermla.deepseek import model as model_lib
from jax_thundermla.deepseek import moe as moe_lib
from jax_thundermla.deepseek.parallel import make_decode_step

from test_deepseek_oracle import tiny_config


def moe_config(**overrides):
  """Tiny float32 model: layer 0 dense, layers 1-2 MoE (8 experts)."""
  fields = dict(num_layers=3, n_routed_experts=8, n_shared_experts=1,
                moe_intermediate_size=16, num_experts_per_tok=2,
                first_k_dense_replace=1, n_group=4, topk_group=2,
                dtype="float32")
  fields.update(overrides)
  return tiny_config(**fields)


def _numpy_route(x, router, bias, c):
  logits = x.astype(np.float64) @ router.astype(np.float64)
  if c.scoring_func == "softmax":
    e = np.exp(logits - logits.max(-1, keepdims=True))
    scores = e / e.sum(-1, keepdims=True)
  else:
    scores = 1 / (1 + np.exp(-logits))
  choice = scores + (bias if c.topk_method == "noaux_tc" else 0)
  experts = []
  for row in choice:
    allowed = np.ones(row.shape, bool)
    if c.topk_method != "greedy":
      groups = row.reshape(c.n_group, -1)
      rank = (np.sort(groups, -1)[:, -2:].sum(-1)
              if c.topk_method == "noaux_tc" else groups.max(-1))
      keep = np.argsort(-rank)[:c.topk_group]
      allowed = np.isin(np.arange(row.size) // groups.shape[1], keep)
    experts.append(np.argsort(-np.where(allowed, row, -np.inf))
                   [:c.num_experts_per_tok])
  experts = np.array(experts)
  w = np.take_along_axis(scores, experts, 1)
  if c.norm_topk_prob:
    w = w / w.sum(-1, keepdims=True)
  return w * c.routed_scaling_factor, experts


def _numpy_moe(m, x, c):
  """Each token through its experts one by one (no sorting, no grouping)."""
  m = jax.tree.map(lambda a: np.asarray(a, np.float64), m)
  w, experts = _numpy_route(x, m.router, m.router_bias, c)
  silu = lambda v: v / (1 + np.exp(-v))
  out = np.zeros_like(x, np.float64)
  for t in range(x.shape[0]):
    for j, e in enumerate(experts[t]):
      h = silu(x[t] @ m.w_gate[e]) * (x[t] @ m.w_up[e])
      out[t] += w[t, j] * (h @ m.w_down[e])
  s = m.shared
  return out + (silu(x @ s.w_gate) * (x @ s.w_up)) @ s.w_down


@pytest.mark.parametrize("scoring,method,norm", [
    ("sigmoid", "noaux_tc", True),
    ("softmax", "group_limited_greedy", False),
    ("softmax", "greedy", False),
    ("sigmoid", "greedy", True),
])
def test_moe_matches_per_token_oracle(scoring, method, norm):
  c = moe_config(scoring_func=scoring, topk_method=method,
                 norm_topk_prob=norm, routed_scaling_factor=1.7)
  weights = model_lib.init_weights(jax.random.key(3), c)
  m = weights.layers[1].mlp
  assert isinstance(m, moe_lib.MoEWeights)
  m = m._replace(router_bias=jnp.asarray(
      np.random.default_rng(0).normal(0, 0.3, 8), jnp.float32))
  x = np.random.default_rng(1).standard_normal((3, 5, c.hidden_size))
  x = x.astype(np.float32)
  got = moe_lib.moe_mlp(m, jnp.asarray(x), config=c)
  want = _numpy_moe(m, x.reshape(15, -1), c).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
  w, e = moe_lib.route(jnp.asarray(x.reshape(15, -1)), m.router,
                       m.router_bias, c)
  want_w, want_e = _numpy_route(x.reshape(15, -1), np.asarray(m.router),
                                np.asarray(m.router_bias), c)
  order = np.argsort(np.asarray(e), axis=1)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(e), order, 1),
                                np.sort(want_e, 1))
  np.testing.assert_allclose(
      np.take_along_axis(np.asarray(w), order, 1),
      np.take_along_axis(want_w, np.argsort(want_e, 1), 1), rtol=1e-5)


def test_grouped_routing_stays_in_the_chosen_groups():
  c = moe_config(topk_method="group_limited_greedy", scoring_func="softmax",
                 n_group=4, topk_group=1, num_experts_per_tok=2,
                 norm_topk_prob=False)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((64, 256)),
                  jnp.float32)
  router = jnp.asarray(np.random.default_rng(3).standard_normal((256, 8)),
                       jnp.float32)
  _, experts = moe_lib.route(x, router, jnp.zeros(8), c)
  groups = np.asarray(experts) // 2
  assert np.all(groups[:, 0] == groups[:, 1])


def test_experts_split_in_two_add_up_to_all():
  """What expert parallelism relies on: local halves sum to the whole."""
  c = moe_config()
  m = model_lib.init_weights(jax.random.key(4), c).layers[2].mlp
  x = jnp.asarray(np.random.default_rng(5).standard_normal((6, 256)),
                  jnp.float32)
  w, e = moe_lib.route(x, m.router, m.router_bias, c)
  whole = moe_lib.routed_experts(m, x, w, e)
  halves = [moe_lib.routed_experts(
      m._replace(w_gate=m.w_gate[k:k + 4], w_up=m.w_up[k:k + 4],
                 w_down=m.w_down[k:k + 4]), x, w, e, k) for k in (0, 4)]
  np.testing.assert_allclose(np.asarray(halves[0] + halves[1]),
                             np.asarray(whole), rtol=1e-5, atol=1e-6)


def _step_inputs(c, tokens):
  weights = model_lib.init_weights(jax.random.key(0), c)
  caches = model_lib.init_caches(c, 4, 16)
  table = jnp.asarray([[0], [1]], jnp.int32)
  lens = jnp.asarray([tokens.shape[1]] * 2, jnp.int32)
  return weights, caches, table, lens


def test_out_of_vocabulary_tokens_give_nan_for_their_sequence_only():
  c = moe_config()
  step = make_decode_step(c)
  good = np.array([[3, 9], [5, 1]], np.int32)
  weights, caches, table, lens = _step_inputs(c, good)
  want, _ = step(weights, caches, jnp.asarray(good), table, lens)
  for bad_token in (c.vocab_size, -1, 10 ** 6):
    bad = good.copy()
    bad[1, 0] = bad_token
    _, caches, table, lens = _step_inputs(c, bad)
    got, new_caches = step(weights, caches, jnp.asarray(bad), table, lens)
    got = np.asarray(got)
    assert np.all(np.isnan(got[1])), bad_token
    np.testing.assert_array_equal(got[0], np.asarray(want)[0])
    assert np.all(np.isnan(np.asarray(new_caches[0])[1, :2]))


def test_decode_step_names_bad_tokens_and_caches():
  c = moe_config(dtype="bfloat16")
  step = make_decode_step(c)
  tokens = np.array([[3], [5]], np.int32)
  weights, caches, table, lens = _step_inputs(c, tokens)
  with pytest.raises(TypeError, match="tokens must be integer.*bfloat16"):
    step(weights, caches, jnp.asarray(tokens, jnp.bfloat16), table, lens)
  with pytest.raises(ValueError, match=r"tokens must be \[b, s_q\]"):
    step(weights, caches, jnp.asarray(tokens[:, 0]), table, lens)
  narrow = model_lib.init_caches(dataclasses.replace(c, kv_lora_rank=32), 4,
                                 16)
  with pytest.raises(ValueError, match=r"caches\[0\] must be \[num_pages,"
                     r" page_size, 1, 128\].*\(4, 16, 1, 96\)"):
    step(weights, narrow, jnp.asarray(tokens), table, lens)
  wide_type = tuple(x.astype(jnp.float16) for x in caches)
  with pytest.raises(TypeError, match=r"caches\[0\] must be bfloat16"):
    step(weights, wide_type, jnp.asarray(tokens), table, lens)
  with pytest.raises(ValueError, match="backend must be one of"):
    make_decode_step(c, backend="triton")(weights, caches,
                                          jnp.asarray(tokens), table, lens)


def test_float32_model_refuses_the_cuda_backend():
  c = moe_config()
  tokens = np.array([[3], [5]], np.int32)
  weights, caches, table, lens = _step_inputs(c, tokens)
  with pytest.raises(ValueError, match="bfloat16 or float16 model"):
    make_decode_step(c, backend="cuda")(weights, caches, jnp.asarray(tokens),
                                        table, lens)
