"""jax.vmap of mla_decode equals a Python loop, on every backend.

Any of q, kv_cache, block_table and cache_seqlens may be mapped. With the
on-device plan the mapped problems are folded into one call of n times the
batch (a mapped cache's page ids offset per element); with a host plan they
run one after the other.
"""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_thundermla as tmla

from conftest import assert_decode_close, numpy_mla_decode, requires_gpu

N, B, S_Q, H_Q, D_V, PAGE, PAGES, MAX_PAGES = 3, 2, 2, 4, 512, 16, 6, 4
D_QK = D_V + 64
SCALE = 0.1


def _inputs(seed: int = 0, h_kv: int = 1):
  """Mapped inputs (leading axis N) with NaN in unused cache slots and a bad
  page id in one needed table entry."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((N, B, S_Q, H_Q, D_QK))
  kv = rng.standard_normal((N, PAGES, PAGE, h_kv, D_QK))
  table = np.stack([np.stack([rng.permutation(PAGES)[:MAX_PAGES]
                              for _ in range(B)]) for _ in range(N)])
  lens = rng.integers(S_Q, MAX_PAGES * PAGE + 1, (N, B))
  lens[0, 1] = 0                       # sees no key: out 0, lse +inf
  lens[1, 0] = 2 * PAGE + 3
  table[1, 0, 2] = PAGES + 5           # a needed page out of range: NaN
  table[2, 1, MAX_PAGES - 1] = -7      # an unneeded entry: ignored
  lens[2, 1] = PAGE
  for i in range(N):
    needed = set()
    for j in range(B):
      needed |= set(table[i, j, :-(-lens[i, j] // PAGE)].tolist())
    kv[i, [p for p in range(PAGES) if p not in needed]] = np.nan
  return (jnp.asarray(q, jnp.bfloat16), jnp.asarray(kv, jnp.bfloat16),
          jnp.asarray(table, jnp.int32), jnp.asarray(lens, jnp.int32))


def _decode(q, kv, table, lens, plan=None, backend=None):
  return tmla.mla_decode(q, kv, table, lens, softmax_scale=SCALE,
                         causal=True, plan=plan, backend=backend)


def _loop(fn, args, in_axes):
  outs = [fn(*(a[i] if ax == 0 else a for a, ax in zip(args, in_axes)))
          for i in range(N)]
  return tuple(np.stack([np.asarray(o[k], np.float64) for o in outs])
               for k in range(2))


def _check_equal_to_loop(fn, args, in_axes):
  out, lse = jax.vmap(fn, in_axes=in_axes)(*args)
  want_out, want_lse = _loop(fn, args, in_axes)
  assert out.shape == want_out.shape and lse.shape == want_lse.shape
  assert_decode_close(out, lse, want_out, want_lse, rtol=1e-3, lse_atol=1e-5)
  return want_out, want_lse


_AXES = [(0, 0, 0, 0), (0, None, None, None), (None, 0, None, None),
         (None, None, 0, None), (None, None, None, 0), (0, 0, None, None),
         (None, 0, 0, 0)]


@pytest.mark.parametrize("in_axes", _AXES)
def test_vmap_equals_loop(in_axes):
  full = _inputs()
  args = tuple(a if ax == 0 else a[1] for a, ax in zip(full, in_axes))
  want_out, want_lse = _check_equal_to_loop(_decode, args, in_axes)
  if in_axes == (0, 0, 0, 0):
    # The loop itself is right: NaN only for the bad sequence.
    assert np.isnan(want_out[1, 0]).all() and not np.isnan(np.delete(
        want_out.reshape(N * B, -1), B, axis=0)).any()
    o, l = numpy_mla_decode(*(np.asarray(a[0]) for a in full),
                            head_dim_v=D_V, softmax_scale=SCALE, causal=True)
    assert_decode_close(want_out[0], want_lse[0], o, l)


def test_vmap_with_kv_heads_and_mapped_axis_not_first():
  q, kv, table, lens = _inputs(seed=1, h_kv=2)
  args = (jnp.moveaxis(q, 0, 2), kv, table, lens)
  out, lse = jax.vmap(_decode, in_axes=(2, 0, 0, 0))(*args)
  want_out, want_lse = _loop(_decode, (q, kv, table, lens), (0, 0, 0, 0))
  assert_decode_close(out, lse, want_out, want_lse, rtol=1e-3, lse_atol=1e-5)


def test_nested_vmap_equals_loops():
  q, kv, table, lens = _inputs(seed=2)
  qq = jnp.stack([q, q[::-1]])
  inner = jax.vmap(_decode, in_axes=(0, 0, 0, 0))
  out, lse = jax.vmap(inner, in_axes=(0, None, None, None))(qq, kv, table,
                                                            lens)
  for j in range(2):
    want_out, want_lse = _loop(_decode, (qq[j], kv, table, lens), (0,) * 4)
    assert_decode_close(out[j], lse[j], want_out, want_lse, rtol=1e-3,
                        lse_atol=1e-5)


def test_vmap_with_a_host_plan_loops_and_checks_lengths():
  q, kv, table, lens = _inputs(seed=3)
  plan = tmla.plan_decode(np.asarray(lens[0]), s_q=S_Q, h_q=H_Q,
                          page_size=PAGE)
  fn = lambda q, kv, t, l: _decode(q, kv, t, l, plan=plan)
  want_out, _ = _check_equal_to_loop(fn, (q, kv, table, lens),
                                     (0, 0, 0, 0))
  # Elements whose lengths are not the plan's get NaN, the first does not.
  assert not np.isnan(want_out[0]).any()
  stale = np.asarray(lens[1:] != lens[0])
  assert np.isnan(want_out[1:][stale]).all()


def test_vmap_over_plans():
  q, kv, table, lens = _inputs(seed=4)
  plans = [tmla.plan_decode(np.asarray(lens[i]), s_q=S_Q, h_q=H_Q,
                            page_size=PAGE, scheduler="static")
           for i in range(N)]
  plans = [p for p in plans if p.max_instructions == plans[0].max_instructions
           and p.num_slots == plans[0].num_slots
           and p.num_counters == plans[0].num_counters]
  n = len(plans)
  assert n >= 2, "plans of equal capacities are needed to stack them"
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *plans)
  out, lse = jax.vmap(lambda q, kv, t, l, p: _decode(q, kv, t, l, plan=p))(
      q[:n], kv[:n], table[:n], lens[:n], stacked)
  for i in range(n):
    o, l = _decode(q[i], kv[i], table[i], lens[i], plan=plans[i])
    assert_decode_close(out[i], lse[i], np.asarray(o, np.float64),
                        np.asarray(l), rtol=1e-3, lse_atol=1e-5)
    assert not np.isnan(np.asarray(lse[i])).all()


def _cuda_text(fn, *args) -> str:
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _kernel_calls(text: str) -> list[str]:
  return re.findall(r"custom_call @tmla_mla_decode\(.*", text)


def test_cuda_lowering_folds_mapped_problems_into_one_kernel_call():
  # Lowered for platform cuda on any machine: the rule is the one a GPU runs.
  q, kv, table, lens = _inputs()
  text = _cuda_text(jax.vmap(_decode), q, kv, table, lens)
  calls = _kernel_calls(text)
  assert len(calls) == 1, calls
  assert f"tensor<{N * B}x{S_Q}x{H_Q}x{D_QK}xbf16>" in calls[0]
  assert f"tensor<{N * PAGES}x{PAGE}x1x{D_QK}xbf16>" in calls[0]


def test_cuda_lowering_with_a_plan_loops_over_the_kernel():
  q, kv, table, lens = _inputs()
  plan = tmla.plan_decode(np.asarray(lens[0]), s_q=S_Q, h_q=H_Q,
                          page_size=PAGE)
  text = _cuda_text(jax.vmap(lambda q, kv, t, l: _decode(q, kv, t, l, plan)),
                    q, kv, table, lens)
  calls = _kernel_calls(text)
  assert len(calls) == 1 and "stablehlo.while" in text
  assert f"tensor<{B}x{S_Q}x{H_Q}x{D_QK}xbf16>" in calls[0]


def test_cache_too_large_to_fold_loops():
  # n * num_pages > int32: the page ids could not be offset, so it loops
  # (shapes only: nothing of this size is allocated).
  pages = (1 << 30) + 1
  args = (jax.ShapeDtypeStruct((2, B, S_Q, H_Q, D_QK), jnp.bfloat16),
          jax.ShapeDtypeStruct((2, pages, PAGE, 1, D_QK), jnp.bfloat16),
          jax.ShapeDtypeStruct((2, B, MAX_PAGES), jnp.int32),
          jax.ShapeDtypeStruct((2, B), jnp.int32))
  (call,) = _kernel_calls(_cuda_text(jax.vmap(_decode), *args))
  assert f"tensor<{B}x{S_Q}x{H_Q}x{D_QK}xbf16>" in call
  assert f"tensor<{pages}x{PAGE}x1x{D_QK}xbf16>" in call


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("in_axes", [(0, 0, 0, 0), (0, None, None, None),
                                     (None, 0, 0, 0)])
@pytest.mark.parametrize("with_plan", [False, True])
def test_vmap_equals_loop_on_gpu(in_axes, with_plan):
  full = _inputs(seed=5)
  args = tuple(a if ax == 0 else a[1] for a, ax in zip(full, in_axes))
  plan = None
  if with_plan:
    lens = args[3][0] if in_axes[3] == 0 else args[3]
    plan = tmla.plan_decode(np.asarray(lens), s_q=S_Q, h_q=H_Q,
                            page_size=PAGE)
  fn = lambda q, kv, t, l: _decode(q, kv, t, l, plan=plan, backend="cuda")
  _check_equal_to_loop(fn, args, in_axes)
