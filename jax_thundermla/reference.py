"""Pure-JAX paged MLA decode: the CPU backend and the oracle of the kernel.

The cache is walked in chunks of pages with an online softmax, so memory
stays bounded by one chunk of the batch, however long the longest sequence.

Both products are float32 dots at ``Precision.HIGHEST`` on operands upcast
from the cache's dtype inside the loop (one chunk at a time): the products
of bf16/fp16 values are exact in float32, and a plain f32 GEMM is one that
every XLA backend compiles for any head dim (XLA's GPU autotuner finds no
Triton candidate for some bf16 dots of odd shapes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_thundermla import fp8_cache

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


def _entries_f32(entries: jax.Array) -> jax.Array:
  """Cache entries [..., d_qk] as float32: upcast, or read from FP8 bytes
  (uint8 [..., 656], as ``dequantize_kv`` reads them)."""
  if fp8_cache.is_fp8_cache(entries):
    return fp8_cache.dequantize_entries(entries, jnp.float32)
  return entries.astype(jnp.float32)


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
  # ceil(len / page_size), without overflowing int32 near 2**31.
  needed = cache_seqlens // page_size + (cache_seqlens % page_size > 0)
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
      Or an FP8 cache, uint8 [num_pages, page_size, h_kv, 656] (d_qk 576),
      read one chunk at a time as ``dequantize_kv(..., jnp.float32)``.
    block_table: int32 [b, max_pages] page ids of each sequence, in order.
    cache_seqlens: int32 [b] tokens per sequence, the s_q new ones included.
    head_dim_v: value head dim.
    softmax_scale: factor applied to QK^T.
    causal: bottom-right causal masking.

  Returns:
    ``(out, lse)``: out [b, s_q, h_q, head_dim_v] in q.dtype, lse
    [b, h_q, s_q] float32 (natural log). Rows that see no key: out 0, lse
    +inf. Invalid sequences (see ``invalid_sequences``): NaN. A non-finite
    key a row sees makes the row NaN, a non-finite value the columns it is
    in; keys a row does not see (causal mask, past the length) never
    affect it.
  """
  b, s_q, h_q, d_qk = q.shape
  num_pages, page_size, h_kv, _ = kv_cache.shape
  max_pages = block_table.shape[1]
  g = h_q // h_kv
  highest = jax.lax.Precision.HIGHEST

  cp = _chunk_pages(b, page_size, h_kv, d_qk, max_pages)
  num_chunks = -(-max_pages // cp)
  table = jnp.pad(block_table, ((0, 0), (0, num_chunks * cp - max_pages)),
                  constant_values=-1)
  table = table.reshape(b, num_chunks, cp).transpose(1, 0, 2)  # [c, b, cp]

  bad = invalid_sequences(block_table, cache_seqlens, num_pages, page_size)
  lens = jnp.clip(cache_seqlens, 0, max_pages * page_size)
  qg = q.reshape(b, s_q, h_kv, g, d_qk).astype(jnp.float32)
  scale = jnp.float32(softmax_scale)
  # Last key each query token sees (inclusive), -1 for none; [b, s_q].
  if causal:
    last = jnp.maximum(lens[:, None] - s_q + jnp.arange(s_q)[None, :], -1)
  else:
    last = jnp.broadcast_to(lens[:, None] - 1, (b, s_q))
  # Keys that some query rows see and others do not: the last s_q - 1.
  some_rows_blind = causal and s_q > 1

  tokens = cp * page_size

  def step(carry, xs):
    m, l, acc = carry
    c, pages = xs  # pages: [b, cp]
    safe = jnp.clip(pages, 0, num_pages - 1)
    # One chunk is gathered in the cache's dtype and upcast (or read from
    # FP8 bytes) here, so no f32 copy of the whole cache (which XLA would
    # hoist out of the loop) is made.
    kv = _entries_f32(kv_cache[safe]).reshape(b, tokens, h_kv, d_qk)
    # Positions relative to the chunk's first token (no int32 overflow).
    start = c * tokens
    idx = jnp.arange(tokens)  # [T]
    valid = idx[None, :] < (lens - start)[:, None]  # [b, T]
    kv = jnp.where(valid[:, :, None, None], kv, 0.0)
    seen = valid[:, None, :] & (idx[None, None, :]
                                <= (last - start)[:, :, None])  # [b, s_q, T]
    s = jnp.einsum("bthgd,bnhd->bhgtn", qg, kv, precision=highest) * scale
    s = jnp.where(seen[:, None, None], s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[..., None])
    l = l * alpha + p.sum(axis=-1)
    v = kv[..., :head_dim_v]
    if some_rows_blind:
      # P·V would multiply a non-finite value of such a key by the 0 weight
      # of a row that does not see it; zero it here and put the NaN back
      # after the loop for the rows that see it.
      blind = valid & (idx[None, :] > (lens - s_q - start)[:, None])
      v = jnp.where(blind[:, :, None, None] & ~jnp.isfinite(v), 0.0, v)
    pv = jnp.einsum("bhgtn,bnhd->bhgtd", p, v, precision=highest)
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
  if some_rows_blind:
    sees_nonfinite = _sees_nonfinite_tail_value(
        kv_cache, block_table, lens, s_q=s_q, head_dim_v=head_dim_v)
    out = jnp.where(sees_nonfinite[:, :, None], jnp.nan, out)
  out = jnp.where(bad[:, None, None, None, None], jnp.nan, out)
  lse = jnp.where(bad[:, None, None, None], jnp.nan, lse)
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, s_q, h_q, head_dim_v)
  return out.astype(q.dtype), lse.reshape(b, h_q, s_q)


def _sees_nonfinite_tail_value(kv_cache: jax.Array, block_table: jax.Array,
                               lens: jax.Array, *, s_q: int,
                               head_dim_v: int) -> jax.Array:
  """Which value columns of each causal query row see a non-finite value
  among the last ``s_q - 1`` keys of its sequence.

  With causal masking, key ``len - s_q + k`` (``1 <= k < s_q``) is seen by
  query tokens ``t >= k`` only.

  Args:
    kv_cache: [num_pages, page_size, h_kv, d_qk], or FP8 (uint8, 656).
    block_table: int32 [b, max_pages].
    lens: int32 [b] lengths clipped to ``[0, max_pages * page_size]``.
    s_q: query tokens per sequence (>= 2).
    head_dim_v: value head dim.

  Returns:
    bool [b, h_kv, s_q, head_dim_v].
  """
  num_pages, page_size = kv_cache.shape[:2]
  max_pages = block_table.shape[1]
  pos = lens[:, None] - s_q + jnp.arange(1, s_q)[None, :]  # [b, s_q - 1]
  exists = pos >= 0
  pos = jnp.maximum(pos, 0)
  page = jnp.take_along_axis(
      block_table, jnp.minimum(pos // page_size, max_pages - 1), axis=1)
  page = jnp.clip(page, 0, num_pages - 1)
  values = _entries_f32(
      kv_cache[page, pos % page_size])[..., :head_dim_v]  # [b, k, h, d_v]
  bad = exists[:, :, None, None] & ~jnp.isfinite(values)
  # Token t sees tail keys 1..t: token 0 none, token t >= 1 those up to t.
  upto = jnp.cumsum(bad.astype(jnp.int32), axis=1) > 0
  rows = jnp.concatenate([jnp.zeros_like(upto[:, :1]), upto], axis=1)
  return rows.transpose(0, 2, 1, 3)
