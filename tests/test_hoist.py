"""plan=None inside a loop body plans once, outside the loop.

A ``lax.scan`` over layers that closes over ``cache_seqlens`` would plan
again in every layer (XLA's GPU pipeline does not move the planner out of
the while body). ``mla_decode`` stages the planning in the trace that made
the lengths instead. These tests trace as a GPU process would (the kernel
chosen for the cuda platform) and run on the CPU, where the reference
computes the result: they check where the planning lands, that a call that
vmap batches plans per problem, and that the results are the per-layer
reference's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_thundermla as tmla
from jax_thundermla import _ffi

from conftest import assert_decode_close

L, B, S_Q, H_Q, PAGE, PAGES, MAX_PAGES = 3, 4, 2, 16, 16, 24, 5
D_QK = 576
SCALE = 0.1


@pytest.fixture(autouse=True)
def as_on_a_gpu(monkeypatch):
  """Traces as a GPU process with the kernel built does."""
  monkeypatch.setattr(_ffi, "gpu_available", lambda: True)
  monkeypatch.setattr(_ffi, "kernel_available", lambda: True)


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((L, B, S_Q, H_Q, D_QK))
  caches = rng.standard_normal((L, PAGES, PAGE, 1, D_QK))
  table = np.stack([rng.permutation(PAGES)[:MAX_PAGES] for _ in range(B)])
  lens = np.array([1, MAX_PAGES * PAGE, 0, 37])
  return (jnp.asarray(q, jnp.bfloat16), jnp.asarray(caches, jnp.bfloat16),
          jnp.asarray(table, jnp.int32), jnp.asarray(lens, jnp.int32))


def _decode(q, cache, table, lens):
  return tmla.mla_decode(q, cache, table, lens, softmax_scale=SCALE,
                         causal=True)


def _closed_over(q, caches, table, lens):
  def layer(carry, x):
    return carry, _decode(x[0], x[1], table, lens)
  return jax.lax.scan(layer, 0, (q, caches))[1]


def _subjaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def _decode_configs(jaxpr):
  """The Config of every mla_decode primitive in ``jaxpr``, nested too."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "mla_decode":
      found.append(eqn.params["config"])
    for sub in _subjaxprs(eqn.params):
      found += _decode_configs(sub)
  return found


def _scan_and_rest(closed):
  """(the scan's body, the outer equations other than the scan)."""
  scans = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan"]
  assert len(scans) == 1, closed
  rest = [e for e in closed.jaxpr.eqns if e is not scans[0]]
  return scans[0].params["jaxpr"].jaxpr, rest


def _reference(q, caches, table, lens):
  return [tmla.mla_decode(q[i], caches[i], table, lens, softmax_scale=SCALE,
                          causal=True, backend="reference")
          for i in range(L)]


def _check_equal(outs, want):
  for i, (o, l) in enumerate(want):
    assert_decode_close(outs[0][i], outs[1][i], np.asarray(o, np.float64),
                        np.asarray(l, np.float64))


def test_closed_over_lengths_are_planned_once_outside_the_scan():
  args = _inputs()
  closed = jax.make_jaxpr(_closed_over)(*args)
  body, rest = _scan_and_rest(closed)
  configs = _decode_configs(body)
  assert len(configs) == 1 and configs[0].hoisted, configs
  # The plan is made by equations of the outer program: the body takes it
  # in as constants and holds no planning of its own.
  assert rest, "no planning outside the scan"
  assert not any(c.plan is None for c in _decode_configs(body))
  _check_equal(jax.jit(_closed_over)(*args), _reference(*args))


def test_lengths_of_the_loop_are_planned_in_the_body():
  # Per-layer lengths (scanned over) cannot be planned outside the loop.
  q, caches, table, lens = _inputs(1)
  per_layer = jnp.stack([lens, lens[::-1], jnp.minimum(lens, 20)])

  def step(q, caches, table, lens):
    def layer(carry, x):
      return carry, _decode(x[0], x[1], table, x[2])
    return jax.lax.scan(layer, 0, (q, caches, per_layer))[1]

  body, _ = _scan_and_rest(jax.make_jaxpr(step)(q, caches, table, lens))
  configs = _decode_configs(body)
  assert len(configs) == 1 and configs[0].plan is None, configs
  outs = jax.jit(step)(q, caches, table, lens)
  for i in range(L):
    o, l = tmla.mla_decode(q[i], caches[i], table, per_layer[i],
                           softmax_scale=SCALE, causal=True,
                           backend="reference")
    assert_decode_close(outs[0][i], outs[1][i], np.asarray(o, np.float64),
                        np.asarray(l, np.float64))


def test_separate_calls_plan_in_their_own_trace():
  # No loop: nothing to hoist (XLA merges identical planning itself).
  q, caches, table, lens = _inputs(2)
  closed = jax.make_jaxpr(
      lambda q, c, t, l: [_decode(q[i], c[i], t, l) for i in range(L)])(
          q, caches, table, lens)
  configs = _decode_configs(closed.jaxpr)
  assert len(configs) == L and all(c.plan is None for c in configs)


@pytest.mark.parametrize("jit_inside", [False, True])
def test_vmap_inside_the_body_plans_per_problem(jit_inside):
  # vmap over q with closed-over lengths. Called under vmap, mla_decode sees
  # the batching trace: no hoist. Traced first by a jit under the vmap, it
  # hoists; then the batching rule drops the plan and folds the problems.
  # Either way the body's calls plan for the folded batch themselves.
  q, caches, table, lens = _inputs(3)
  two_q = jnp.stack([q, q[:, :, ::-1]], axis=1)   # [L, 2, B, ...]

  def step(two_q, caches, table, lens):
    def layer(carry, x):
      one = lambda qq: _decode(qq, x[1], table, lens)
      return carry, jax.vmap(jax.jit(one) if jit_inside else one)(x[0])
    return jax.lax.scan(layer, 0, (two_q, caches))[1]

  body, _ = _scan_and_rest(jax.make_jaxpr(step)(two_q, caches, table, lens))
  configs = _decode_configs(body)
  assert configs and all(c.plan is None for c in configs), configs
  outs = jax.jit(step)(two_q, caches, table, lens)
  for i in range(L):
    for j in range(2):
      o, l = tmla.mla_decode(two_q[i, j], caches[i], table, lens,
                             softmax_scale=SCALE, causal=True,
                             backend="reference")
      assert_decode_close(outs[0][i, j], outs[1][i, j],
                          np.asarray(o, np.float64),
                          np.asarray(l, np.float64))


def test_only_the_cuda_lowering_plans():
  # The hoisted planner is lowered for cuda only: a program lowered (or
  # exported) for the CPU has no planner call to resolve.
  args = _inputs(4)
  traced = jax.jit(_closed_over).trace(*args)
  cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
  cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert "tmla_plan" not in cpu
  assert cuda.count("tmla_plan") == 1
  assert cuda.index("tmla_plan") < cuda.index("stablehlo.while")
  exported = jax.export.export(
      jax.jit(_closed_over), platforms=("cpu", "cuda"),
      disabled_checks=tmla.export_safety_checks())(*args)
  _check_equal(exported.call(*args), _reference(*args))


def test_vmap_of_a_jitted_step_with_a_hoisted_plan():
  # jit traces first (the plan is hoisted in its trace), then vmap batches
  # the lengths: the hoisted plan is batched to nothing and each problem
  # plans for itself.
  q, caches, table, lens = _inputs(5)
  many = jnp.stack([lens, jnp.minimum(lens, 30)])
  outs = jax.vmap(jax.jit(_closed_over), in_axes=(None, None, None, 0))(
      q, caches, table, many)
  for j in range(2):
    _check_equal([x[j] for x in outs], _reference(q, caches, table, many[j]))
