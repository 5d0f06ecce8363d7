"""Shared test helpers: the float64 numpy oracle and GPU gating."""

from __future__ import annotations

import numpy as np
import pytest

from jax_thundermla import _ffi


def gpu_kernel_ready() -> bool:
  return _ffi.gpu_available() and _ffi.extension_available()


requires_gpu = pytest.mark.skipif(
    not gpu_kernel_ready(),
    reason="needs a CUDA GPU visible to JAX and the compiled extension")


def numpy_mla_decode(q, kv_cache, block_table, seqlens, *, head_dim_v,
                     softmax_scale, causal):
  """Independent float64 paged MLA decode, a loop per sequence and row.

  Each query row attends over exactly the keys it sees, so keys it does not
  see (past the length, or masked by causality) cannot affect it, whatever
  they hold.

  Returns out [b, s_q, h_q, d_v] and lse [b, h_q, s_q] (natural log) as
  float64; rows with no visible key give out 0, lse +inf; an invalid
  sequence (negative length, longer than its table, or a needed page id out
  of range) gives NaN.
  """
  q = np.asarray(q, np.float64)
  kv_cache = np.asarray(kv_cache)
  block_table = np.asarray(block_table)
  b, s_q, h_q, _ = q.shape
  num_pages, page_size, h_kv, _ = kv_cache.shape
  g = h_q // h_kv
  out = np.zeros((b, s_q, h_q, head_dim_v))
  lse = np.full((b, h_q, s_q), np.inf)
  for i in range(b):
    n = int(seqlens[i])
    need = -(-n // page_size) if n > 0 else 0
    if (n < 0 or n > block_table.shape[1] * page_size
        or any(not 0 <= block_table[i, p] < num_pages for p in range(need))):
      out[i] = np.nan
      lse[i] = np.nan
      continue
    if n == 0:
      continue
    pages = block_table[i, :need]
    kv = kv_cache[pages].astype(np.float64).reshape(
        need * page_size, h_kv, -1)[:n]
    for t in range(s_q):
      seen = max(0, n - s_q + t + 1) if causal else n  # keys 0 .. seen-1
      if seen == 0:
        continue
      for k in range(h_kv):
        heads = slice(k * g, (k + 1) * g)
        keys = kv[:seen, k]  # [seen, d_qk]
        s = q[i, t, heads] @ keys.T * softmax_scale  # [g, seen]
        m = s.max(axis=1, keepdims=True)
        p = np.exp(s - m)
        total = p.sum(axis=1)
        out[i, t, heads] = p @ keys[:, :head_dim_v] / total[:, None]
        lse[i, heads, t] = m[:, 0] + np.log(total)
  return out, lse


def relative_error(got, want) -> float:
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def assert_decode_close(out, lse, want_out, want_lse, *, rtol=1e-2,
                        lse_atol=1e-3):
  """Relative error of out within rtol; lse within lse_atol; NaN/inf match."""
  out = np.asarray(out, np.float64)
  lse = np.asarray(lse, np.float64)
  np.testing.assert_array_equal(np.isnan(out), np.isnan(want_out))
  np.testing.assert_array_equal(np.isnan(lse), np.isnan(want_lse))
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
  finite = ~np.isnan(want_out)
  assert relative_error(out[finite], want_out[finite]) <= rtol
  ok = np.isfinite(want_lse)
  if ok.any():
    np.testing.assert_allclose(lse[ok], want_lse[ok], rtol=0, atol=lse_atol)
