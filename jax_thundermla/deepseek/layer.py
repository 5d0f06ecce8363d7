"""DeepSeek MLA attention for decode, in absorbed form over the paged cache.

Per token, MLA caches one latent ``c_kv`` (kv_lora_rank wide) and one rope
key ``k_pe`` (64 wide) shared by all heads. The textbook per-head key and
value are ``k_h = [W_UK_h c_kv ; k_pe]`` and ``v_h = W_UV_h c_kv``. Absorbing
W_UK into the query (``q_lat_h = q_nope_h W_UK_h``) makes every head attend
the cache entries ``[c_kv ; k_pe]`` themselves, which is exactly
``mla_decode`` with ``h_kv = 1``; W_UV is applied after attention to the
head's latent output. Scores, and so the softmax scale, are the textbook ones.

RoPE convention: with ``rope_interleave`` (DeepSeek's checkpoints) the
rotary dims are adjacent pairs ``(x[2i], x[2i+1])`` rotated by frequency i,
as DeepSeek's reference code does with complex numbers; without it, the
halves ``(x[i], x[i + 32])`` (transformers' ``rope_interleave = false``).
Frequencies follow YaRN (plain RoPE when ``rope_factor == 1``).

Dtypes: bfloat16 and float16 models attend with ``mla_decode`` (the CUDA
kernel on a GPU); float32 models attend with its pure-JAX reference, and
all their matmuls run at full float32 precision (no TF32/bf16 passes on
GPUs), so that float32 results compare with other float32 implementations.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jax_thundermla
from jax_thundermla import reference
from jax_thundermla.deepseek.config import LATENT_NORM_EPS, DeepSeekConfig
from jax_thundermla.deepseek.cache import append_latent

ATTENTION_BACKENDS = (None, "cuda", "reference")


class AttentionWeights(NamedTuple):
  """One layer's MLA weights, laid out ``[in, ..., out]``.

  The head axis is explicit so that tensor parallelism shards it directly.
  Under a ``tp``-way shard_map, ``n_heads`` below is the local head count.

  Attributes:
    w_dq: [hidden, q_lora_rank] query down-projection W_DQ; None without
      query LoRA (``q_lora_rank`` None).
    q_norm: [q_lora_rank] RMSNorm weight of the query latent; None without
      query LoRA.
    w_uq: [q_lora_rank, n_heads, qk_nope + qk_rope] query up-projection
      W_UQ (without query LoRA: [hidden, n_heads, qk_nope + qk_rope], the
      query projection W_Q); each head's output is ``[q_nope | q_pe]``.
    w_dkv: [hidden, kv_lora_rank + qk_rope] W_DKV: ``[c_kv | k_pe]``.
    kv_norm: [kv_lora_rank] RMSNorm weight of c_kv.
    w_uk: [n_heads, qk_nope, kv_lora_rank] key up-projection W_UK
      (``k_nope_h = W_UK_h c_kv``).
    w_uv: [n_heads, kv_lora_rank, v_head_dim] value up-projection W_UV
      (``v_h = c_kv W_UV_h``).
    w_o: [n_heads, v_head_dim, hidden] output projection W_O.
  """

  w_dq: jax.Array
  q_norm: jax.Array
  w_uq: jax.Array
  w_dkv: jax.Array
  kv_norm: jax.Array
  w_uk: jax.Array
  w_uv: jax.Array
  w_o: jax.Array


def attention_shapes(config: DeepSeekConfig) -> AttentionWeights:
  """The shape of every ``AttentionWeights`` field (global head count)."""
  c = config
  lora = c.q_lora_rank is not None
  return AttentionWeights(
      w_dq=(c.hidden_size, c.q_lora_rank) if lora else None,
      q_norm=(c.q_lora_rank,) if lora else None,
      w_uq=(c.q_lora_rank if lora else c.hidden_size, c.num_heads,
            c.qk_head_dim),
      w_dkv=(c.hidden_size, c.latent_dim),
      kv_norm=(c.kv_lora_rank,),
      w_uk=(c.num_heads, c.qk_nope_head_dim, c.kv_lora_rank),
      w_uv=(c.num_heads, c.kv_lora_rank, c.v_head_dim),
      w_o=(c.num_heads, c.v_head_dim, c.hidden_size))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis, computed in float32.

  Args:
    x: [..., d].
    weight: [d].
    eps: added to the mean square.

  Returns:
    [..., d] in x's dtype.
  """
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                               + eps)
  return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(config: DeepSeekConfig) -> np.ndarray:
  """Rotary angular frequencies, with YaRN interpolation when scaled.

  With ``rope_factor > 1``, dims that turn more than ``beta_fast`` times
  over the original context keep their frequency, dims that turn fewer than
  ``beta_slow`` times are slowed down by ``rope_factor``, and the ones in
  between are blended linearly.

  Args:
    config: the model config.

  Returns:
    float64 [qk_rope_head_dim // 2].
  """
  dim = config.qk_rope_head_dim
  base = config.rope_theta
  freqs = base ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
  if config.rope_factor <= 1.0:
    return freqs

  def dim_of(turns: float) -> float:
    # The (fractional) pair index whose wavelength fits `turns` times into
    # the original context.
    wavelength = config.original_max_position_embeddings / turns
    return dim * math.log(wavelength / (2 * math.pi)) / (2 * math.log(base))

  low, high = dim_of(config.beta_fast), dim_of(config.beta_slow)
  if config.rope_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
  return freqs * (1 - ramp) + freqs / config.rope_factor * ramp


def rope_cos_sin(positions: jax.Array, config: DeepSeekConfig
                 ) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables of the given token positions.

  Args:
    positions: int32 [...] absolute positions.
    config: the model config.

  Returns:
    ``(cos, sin)``, float32 [..., qk_rope_head_dim // 2], each scaled by
    ``config.rope_mscale``.
  """
  freqs = jnp.asarray(rope_frequencies(config), jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * freqs
  return (jnp.cos(angles) * config.rope_mscale,
          jnp.sin(angles) * config.rope_mscale)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array,
               interleave: bool = True) -> jax.Array:
  """Rotates pairs of the last axis: adjacent ones, or the two halves.

  Args:
    x: [..., rope_dim].
    cos: [..., rope_dim // 2], broadcastable to x's leading axes.
    sin: like cos.
    interleave: pairs ``(x[2i], x[2i+1])`` if True, ``(x[i], x[i + d/2])``
      if False; pair i turns by the angle of cos[i], sin[i].

  Returns:
    [..., rope_dim] in x's dtype.
  """
  x32 = x.astype(jnp.float32)
  if interleave:
    real, imag = x32[..., 0::2], x32[..., 1::2]
  else:
    real, imag = jnp.split(x32, 2, axis=-1)
  a, b = real * cos - imag * sin, real * sin + imag * cos
  if interleave:
    rotated = jnp.stack([a, b], axis=-1).reshape(x.shape)
  else:
    rotated = jnp.concatenate([a, b], axis=-1)
  return rotated.astype(x.dtype)


def matmul_precision(dtype) -> jax.lax.Precision:
  """HIGHEST for float32 operands (never TF32/bf16 passes), else DEFAULT."""
  return (jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32
          else jax.lax.Precision.DEFAULT)


def project(x: jax.Array, w: jax.Array, spec: str) -> jax.Array:
  """``einsum(spec, x, w)`` in x's dtype (float32: at full precision)."""
  return jnp.einsum(spec, x, w,
                    precision=matmul_precision(x.dtype)).astype(x.dtype)


def _attend(q, cache, block_table, cache_seqlens, config, plan, backend):
  """mla_decode for 16-bit models; its pure-JAX reference for float32."""
  if config.jnp_dtype != jnp.float32:
    return jax_thundermla.mla_decode(
        q, cache, block_table, cache_seqlens, head_dim_v=config.kv_lora_rank,
        softmax_scale=config.softmax_scale, causal=True, plan=plan,
        backend=backend)[0]
  if backend == "cuda":
    raise ValueError(
        "backend='cuda' needs a bfloat16 or float16 model, got dtype"
        " float32")
  with jax.default_matmul_precision("highest"):
    out = reference.mla_decode_reference(
        q, cache, block_table, cache_seqlens, head_dim_v=config.kv_lora_rank,
        softmax_scale=config.softmax_scale, causal=True)[0]
  if plan is not None:
    stale = plan.seqlens != cache_seqlens
    out = jnp.where(stale[:, None, None, None], jnp.nan, out)
  return out


def mla_attention(
    weights: AttentionWeights,
    x: jax.Array,
    cache: jax.Array,
    block_table: jax.Array,
    cache_seqlens: jax.Array,
    *,
    config: DeepSeekConfig,
    plan: Any = None,
    tp_axis: str | None = None,
    backend: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """MLA attention of the new tokens, absorbed form, paged latent cache.

  Appends the new tokens' ``[c_kv | k_pe]`` to ``cache``, then attends
  every cached token of each sequence (causally among the new ones) with
  ``jax_thundermla.mla_decode``.

  Args:
    weights: the layer's weights (local heads under tensor parallelism).
    x: [b, s_q, hidden] the new tokens' normed hidden states.
    cache: [num_pages, page_size, 1, latent_dim] this layer's cache, or
      its FP8 form (uint8 [num_pages, page_size, 1, 656]): the new entries
      are quantized into it and attention reads it dequantized.
    block_table: int32 [b, max_pages] page ids of each sequence.
    cache_seqlens: int32 [b] tokens per sequence, the s_q new ones
      included; the new tokens sit at positions ``len - s_q .. len - 1``.
    config: the model config.
    plan: a host-built ``DecodePlan`` for these lengths (shared by all
      layers of a step), or None to plan on the device.
    tp_axis: the mesh axis that shards the heads, inside ``jax.shard_map``;
      the output projection's partial sums are summed over it. None when
      unsharded.
    backend: ``mla_decode``'s backend (None: the CUDA kernel on a GPU
      where it applies, else the pure-JAX reference; ``"cuda"``;
      ``"reference"``). float32 models always use the reference.

  Returns:
    ``(out, cache)``: out [b, s_q, hidden] in x's dtype, and the updated
    cache.
  """
  dtype = x.dtype
  s_q = x.shape[1]
  nope, lora = config.qk_nope_head_dim, config.kv_lora_rank
  positions = (cache_seqlens[:, None] - s_q
               + jnp.arange(s_q, dtype=jnp.int32))  # [b, s_q]
  cos, sin = rope_cos_sin(positions, config)  # [b, s_q, rope / 2]

  interleave = config.rope_interleave
  if weights.w_dq is None:
    q_a = x
  else:
    q_a = rms_norm(project(x, weights.w_dq, "bsd,dr->bsr"), weights.q_norm,
                   LATENT_NORM_EPS)
  q = project(q_a, weights.w_uq, "bsr,rhk->bshk")  # [b, s_q, h, nope+rope]
  q_pe = apply_rope(q[..., nope:], cos[:, :, None], sin[:, :, None],
                    interleave)
  q_lat = project(q[..., :nope], weights.w_uk, "bshn,hnc->bshc")
  q_full = jnp.concatenate([q_lat, q_pe], axis=-1)  # [b, s_q, h, latent]

  kv_a = project(x, weights.w_dkv, "bsd,dc->bsc")  # [b, s_q, latent]
  c_kv = rms_norm(kv_a[..., :lora], weights.kv_norm, LATENT_NORM_EPS)
  k_pe = apply_rope(kv_a[..., lora:], cos, sin, interleave)
  cache = append_latent(cache, jnp.concatenate([c_kv, k_pe], axis=-1),
                        block_table, cache_seqlens)

  out_lat = _attend(q_full, cache, block_table, cache_seqlens, config, plan,
                    backend)
  out = project(out_lat, weights.w_uv, "bshc,hcv->bshv")  # [b, s_q, h, v]
  y = jnp.einsum("bshv,hvd->bsd", out, weights.w_o,
                 preferred_element_type=jnp.float32,
                 precision=matmul_precision(dtype))  # partial over heads
  if tp_axis is not None:
    y = jax.lax.psum(y, tp_axis)
  return y.astype(dtype), cache
