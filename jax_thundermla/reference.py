"""Pure-JAX paged MLA decode: the CPU backend and the oracle of the kernel.

The cache is walked in chunks of pages with an online softmax, so memory
stays bounded by one chunk of the batch, however long the longest sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Upper bound on elements of one gathered KV chunk (f32), all sequences.
_CHUNK_ELEMENTS = 1 << 22
# The batch the chunk is sized for when the batch is symbolic (jax.export):
# the chunk must be static, so it holds this many sequences' share.
_SYMBOLIC_BATCH_CHUNK = 16


def _chunk_pages(batch, page_size: int, h_kv: int, d_qk: int,
                 max_pages: int) -> int:
  if not isinstance(batch, int):
    batch = _SYMBOLIC_BATCH_CHUNK
  per_page = batch * page_size * h_kv * d_qk
  return max(1, min(max_pages, _CHUNK_ELEMENTS // per_page))


def invalid_sequences(block_table: jax.Array, cache_seqlens: jax.Array,
                      num_pages: int, page_size: int) -> jax.Array:
  """Which sequences cannot be decoded from their table.

  A sequence is invalid when its length is negative, longer than its table
  holds (``max_pages * page_size``), or when a page id it needs (one of its
  first ``ceil(len / page_size)`` entries) is outside ``[0, num_pages)``.
  Both backends return NaN for every output and LSE of such a sequence
  instead of reading out of bounds.

  Args:
    block_table: int32 [b, max_pages].
    cache_seqlens: int32 [b].
    num_pages: pages in the cache.
    page_size: tokens per page.

  Returns:
    bool [b].
  """
  max_pages = block_table.shape[1]
  needed = (cache_seqlens + page_size - 1) // page_size  # [b]
  in_use = jnp.arange(max_pages)[None, :] < needed[:, None]
  bad_page = (block_table < 0) | (block_table >= num_pages)
  return ((cache_seqlens < 0) | (cache_seqlens > max_pages * page_size)
          | jnp.any(in_use & bad_page, axis=1))


def mla_decode_reference(
    q: jax.Array,
    kv_cache: jax.Array,
    block_table: jax.Array,
    cache_seqlens: jax.Array,
    *,
    head_dim_v: int,
    softmax_scale: float,
    causal: bool,
) -> tuple[jax.Array, jax.Array]:
  """Paged MLA decode attention in pure JAX (float32 math).

  Inputs are assumed valid (``jax_thundermla.mla_decode`` validates them);
  see it for the full contract.

  Args:
    q: [b, s_q, h_q, d_qk] queries.
    kv_cache: [num_pages, page_size, h_kv, d_qk]; V is ``[..., :head_dim_v]``.
    block_table: int32 [b, max_pages] page ids of each sequence, in order.
    cache_seqlens: int32 [b] tokens per sequence, the s_q new ones included.
    head_dim_v: value head dim.
    softmax_scale: factor applied to QK^T.
    causal: bottom-right causal masking.

  Returns:
    ``(out, lse)``: out [b, s_q, h_q, head_dim_v] in q.dtype, lse
    [b, h_q, s_q] float32 (natural log). Rows that see no key: out 0, lse
    +inf. Invalid sequences (see ``invalid_sequences``): NaN.
  """
  b, s_q, h_q, d_qk = q.shape
  num_pages, page_size, h_kv, _ = kv_cache.shape
  max_pages = block_table.shape[1]
  g = h_q // h_kv

  cp = _chunk_pages(b, page_size, h_kv, d_qk, max_pages)
  num_chunks = -(-max_pages // cp)
  table = jnp.pad(block_table, ((0, 0), (0, num_chunks * cp - max_pages)),
                  constant_values=-1)
  table = table.reshape(b, num_chunks, cp).transpose(1, 0, 2)  # [c, b, cp]

  bad = invalid_sequences(block_table, cache_seqlens, num_pages, page_size)
  lens = jnp.clip(cache_seqlens, 0, max_pages * page_size)
  qg = q.reshape(b, s_q, h_kv, g, d_qk)
  scale = jnp.float32(softmax_scale)
  # Last key each query token sees (inclusive); [b, s_q].
  if causal:
    last = lens[:, None] - s_q + jnp.arange(s_q)[None, :]
  else:
    last = jnp.broadcast_to(lens[:, None] - 1, (b, s_q))

  tokens = cp * page_size

  def step(carry, xs):
    m, l, acc = carry
    c, pages = xs  # pages: [b, cp]
    safe = jnp.clip(pages, 0, num_pages - 1)
    # The chunk stays in the cache's dtype: products are exact in f32 and
    # no f32 copy of the cache (which XLA would hoist out of the loop,
    # whole) is ever made.
    kv = kv_cache[safe].reshape(b, tokens, h_kv, d_qk)
    pos = c * tokens + jnp.arange(tokens)  # [T]
    valid = pos[None, :] < lens[:, None]  # [b, T]
    kv = jnp.where(valid[:, :, None, None], kv, jnp.zeros((), kv.dtype))
    mask = valid[:, None, :] & (pos[None, None, :] <= last[:, :, None])
    s = jnp.einsum("bthgd,bnhd->bhgtn", qg, kv,
                   preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[..., None])
    l = l * alpha + p.sum(axis=-1)
    # p in [0, 1] as a sum of two cache-dtype terms (~16 exact bits each).
    p_hi = p.astype(kv.dtype)
    p_lo = (p - p_hi.astype(jnp.float32)).astype(kv.dtype)
    v = kv[..., :head_dim_v]
    pv = sum(jnp.einsum("bhgtn,bnhd->bhgtd", part, v,
                        preferred_element_type=jnp.float32)
             for part in (p_hi, p_lo))
    acc = acc * alpha[..., None] + pv
    return (m_new, l, acc), None

  init = (jnp.full((b, h_kv, g, s_q), -jnp.inf, jnp.float32),
          jnp.zeros((b, h_kv, g, s_q), jnp.float32),
          jnp.zeros((b, h_kv, g, s_q, head_dim_v), jnp.float32))
  (m, l, acc), _ = jax.lax.scan(
      step, init, (jnp.arange(num_chunks), table))

  empty = l == 0.0
  out = jnp.where(empty[..., None], 0.0, acc / jnp.where(empty, 1.0, l)[..., None])
  lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
  out = jnp.where(bad[:, None, None, None, None], jnp.nan, out)
  lse = jnp.where(bad[:, None, None, None], jnp.nan, lse)
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, s_q, h_q, head_dim_v)
  return out.astype(q.dtype), lse.reshape(b, h_q, s_q)
