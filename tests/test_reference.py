"""The pure-JAX reference against an independent float64 numpy oracle."""

from __future__ import annotations

import itertools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_thundermla as tmla
from jax_thundermla.workloads import Workload, make_inputs

from conftest import assert_decode_close, numpy_mla_decode

D_V = 32
D_QK = D_V + 64


def _lengths(b: int, page_size: int, rng: np.random.Generator) -> tuple:
  """Lengths that hit 0, 1, page boundaries +-1 and one long sequence."""
  special = [0, 1, page_size - 1, page_size, page_size + 1,
             2 * page_size - 1, 2 * page_size + 1, 9 * page_size + 3]
  lens = [special[i % len(special)] for i in range(b)]
  if b > 1:
    lens[int(rng.integers(b))] = 40 * page_size + 5  # one very long
  return tuple(lens)


def _run(w: Workload, *, dtype=ml_dtypes.bfloat16, seed=0, scale=None,
         inputs=None):
  q, caches, table, lens = inputs or make_inputs(
      w, seed=seed, dtype=dtype, extra_pages=3)
  out, lse = tmla.mla_decode(
      jnp.asarray(q), jnp.asarray(caches[0]), jnp.asarray(table),
      jnp.asarray(lens), head_dim_v=w.d_v, softmax_scale=scale,
      causal=w.causal, backend="reference")
  want_out, want_lse = numpy_mla_decode(
      q, caches[0], table, lens, head_dim_v=w.d_v,
      softmax_scale=scale if scale is not None else w.d_qk ** -0.5,
      causal=w.causal)
  assert out.shape == (w.batch, w.s_q, w.h_q, w.d_v)
  assert out.dtype == q.dtype
  assert lse.shape == (w.batch, w.h_q, w.s_q)
  assert lse.dtype == jnp.float32
  assert_decode_close(out, lse, want_out, want_lse)
  return out, lse


# A covering subset of b x s_q x h_q x h_kv x page_size x causal: every value
# of every axis appears, with the other axes varied cyclically.
_B = (1, 3, 17)
_S_Q = (1, 2, 4, 7)
_HEADS = ((1, 1), (16, 1), (16, 2), (128, 1), (128, 2))
_PAGES = (16, 64, 256)
_CASES = [
    (b, s_q, _HEADS[(i + j) % len(_HEADS)], _PAGES[(i + 2 * j) % 3],
     bool((i + j) % 2))
    for i, b in enumerate(_B) for j, s_q in enumerate(_S_Q)
]


@pytest.mark.parametrize("b,s_q,heads,page_size,causal", _CASES)
def test_matches_float64_oracle(b, s_q, heads, page_size, causal):
  h_q, h_kv = heads
  rng = np.random.default_rng(b * 100 + s_q)
  w = Workload("t", _lengths(b, page_size, rng), s_q=s_q, h_q=h_q,
               h_kv=h_kv, d_qk=D_QK, d_v=D_V, page_size=page_size,
               causal=causal)
  _run(w, seed=b + s_q)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_dtypes_and_explicit_scale(dtype):
  w = Workload("t", (70, 3, 129), s_q=2, h_q=16, d_qk=D_QK, d_v=D_V,
               page_size=64)
  _run(w, dtype=dtype, scale=0.37)


def test_deepseek_head_dims():
  w = Workload("t", (200, 65), s_q=2, h_q=16, page_size=64)
  _run(w)


def test_causal_changes_nothing_for_single_token():
  w = Workload("t", (33, 100, 1), s_q=1, h_q=16, d_qk=D_QK, d_v=D_V,
               page_size=16, causal=True)
  inputs = make_inputs(w, seed=5, dtype=ml_dtypes.bfloat16)
  causal = _run(w, inputs=inputs)
  plain = _run(Workload("t", w.seqlens, s_q=1, h_q=16, d_qk=D_QK, d_v=D_V,
                        page_size=16, causal=False), inputs=inputs)
  np.testing.assert_array_equal(np.asarray(causal[0], np.float32),
                                np.asarray(plain[0], np.float32))


def test_causal_rows_without_keys_are_zero_with_inf_lse():
  w = Workload("t", (2, 0), s_q=4, h_q=16, d_qk=D_QK, d_v=D_V,
               page_size=16, causal=True)
  out, lse = _run(w)
  # Sequence 0 has 2 tokens and 4 queries: rows 0 and 1 see nothing.
  assert np.all(np.asarray(out[0, :2], np.float32) == 0)
  assert np.all(np.isposinf(np.asarray(lse[0, :, :2])))
  assert np.all(np.isfinite(np.asarray(lse[0, :, 2:])))
  assert np.all(np.isposinf(np.asarray(lse[1])))


def test_shared_and_permuted_pages():
  w = Workload("t", (150, 150, 40), s_q=2, h_q=16, d_qk=D_QK, d_v=D_V,
               page_size=16, causal=True)
  rng = np.random.default_rng(3)
  num_pages = 20
  kv = rng.standard_normal((num_pages, 16, 1, D_QK)).astype(ml_dtypes.bfloat16)
  shared = rng.permutation(num_pages)[:10].astype(np.int32)
  table = np.stack([shared, shared[::-1],
                    np.concatenate([shared[:3], np.full(7, 99, np.int32)])])
  q = rng.standard_normal((3, 2, 16, D_QK)).astype(ml_dtypes.bfloat16)
  _run(w, inputs=(q, [kv], table, np.asarray(w.seqlens, np.int32)))


def test_nan_in_unused_slots_and_pages_never_leaks():
  w = Workload("t", (17, 5, 64), s_q=3, h_q=16, d_qk=D_QK, d_v=D_V,
               page_size=16, causal=False)
  out, lse = _run(w)
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  assert np.all(np.isfinite(np.asarray(lse)))


def test_invalid_sequences_give_nan_without_reading_out_of_bounds():
  w = Workload("t", (20, 20, 20, 20), s_q=1, h_q=16, d_qk=D_QK, d_v=D_V,
               page_size=16)
  q, caches, table, lens = make_inputs(w, seed=1, dtype=ml_dtypes.bfloat16)
  table = table.copy()
  lens = lens.copy()
  table[0, 1] = -1                  # needed page id negative
  table[1, 0] = caches[0].shape[0]  # needed page id past the pool
  lens[2] = -5                      # negative length
  lens[3] = table.shape[1] * 16 + 1  # longer than the table
  out, lse = _run(w, inputs=(q, caches, table, lens))
  assert np.all(np.isnan(np.asarray(out, np.float32)))
  assert np.all(np.isnan(np.asarray(lse)))


def test_long_sequence_memory_is_chunked():
  # One sequence of 2**20 tokens among 15 short ones: the compiled reference
  # must not hold a [b, max_len, d] gather (16x the cache here); its temp
  # memory stays near one copy of the cache.
  w = Workload("t", (1 << 20,) + (16,) * 15, s_q=1, h_q=1, d_qk=D_QK,
               d_v=D_V, page_size=256)
  b, max_pages = w.batch, w.max_pages()
  args = (jax.ShapeDtypeStruct((b, 1, 1, D_QK), jnp.bfloat16),
          jax.ShapeDtypeStruct((max_pages + 3, 256, 1, D_QK), jnp.bfloat16),
          jax.ShapeDtypeStruct((b, max_pages), jnp.int32),
          jax.ShapeDtypeStruct((b,), jnp.int32))
  fn = jax.jit(lambda *a: tmla.mla_decode(*a, head_dim_v=D_V,
                                          backend="reference"))
  stats = fn.lower(*args).compile().memory_analysis()
  full_gather = b * (1 << 20) * D_QK * 4
  assert stats.temp_size_in_bytes < full_gather // 4


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    data=st.data(),
    b=st.integers(1, 5),
    s_q=st.integers(1, 8),
    h_kv=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2, 8]),
    page_size=st.sampled_from([16, 32, 48, 64, 256]),
    d_v=st.sampled_from([16, 64]),
    causal=st.booleans(),
)
def test_random_shapes(data, b, s_q, h_kv, group, page_size, d_v, causal):
  lens = tuple(data.draw(st.lists(st.integers(0, 5 * page_size + 3),
                                  min_size=b, max_size=b)))
  w = Workload("t", lens, s_q=s_q, h_q=h_kv * group, h_kv=h_kv, d_qk=d_v + 64,
               d_v=d_v, page_size=page_size, causal=causal)
  _run(w, seed=data.draw(st.integers(0, 1000)))


@pytest.mark.parametrize("poison", ["nan_key", "nan_rope", "inf_value"])
def test_keys_hidden_by_causality_never_affect_a_row(poison):
  # s_q = 4, causal: token t of a sequence of n tokens sees keys
  # 0 .. n - 4 + t. Key n - 2 is seen by tokens 2 and 3 only.
  w = Workload("t", (40, 19, 5), s_q=4, h_q=16, h_kv=2, d_qk=D_QK, d_v=D_V,
               page_size=16, causal=True)
  q, caches, table, lens = make_inputs(w, seed=4, dtype=ml_dtypes.bfloat16)
  kv = caches[0].copy()
  for i, n in enumerate(w.seqlens):
    pos = n - 2
    row = kv[table[i, pos // 16], pos % 16]  # [h_kv, d_qk], a view
    if poison == "nan_key":
      row[:] = np.nan
    elif poison == "nan_rope":
      row[:, D_V:] = np.nan
    else:
      row[:, 5] = np.inf
  out, lse = _run(w, inputs=(q, [kv], table, lens))
  out = np.asarray(out, np.float32)
  lse = np.asarray(lse)
  # Tokens 0 and 1 never see the poisoned key: untouched, finite.
  assert np.isfinite(out[:, :2]).all() and np.isfinite(lse[:, :, :2]).all()
  if poison != "inf_value":
    # Tokens 2 and 3 see a NaN score: all of their outputs are NaN.
    assert np.isnan(out[:, 2:]).all() and np.isnan(lse[:, :, 2:]).all()
  else:
    assert np.isnan(out[:, 2:, :, 5]).all()


@pytest.mark.parametrize("s_q", [1, 3])
def test_nan_past_the_length_inside_a_used_page_never_leaks(s_q):
  w = Workload("t", (21, 16, 1), s_q=s_q, h_q=16, d_qk=D_QK, d_v=D_V,
               page_size=16, causal=True)
  q, caches, table, lens = make_inputs(w, seed=9, dtype=ml_dtypes.bfloat16)
  assert np.isnan(caches[0][table[0, 1], 5:]).all()  # the page's tail
  out, lse = _run(w, inputs=(q, caches, table, lens))
  assert np.isfinite(np.asarray(out, np.float32)).all()
