"""A DeepSeek-V3-style decoder with dense MLPs, one decode step at a time.

Each layer: RMSNorm, MLA attention (absorbed, paged latent cache), residual,
RMSNorm, SwiGLU MLP, residual; then a final RMSNorm and the LM head. Every
layer has its own cache array; all share one block table, one set of
lengths and one decode plan per step.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_thundermla.deepseek.cache import init_cache
from jax_thundermla.deepseek.config import DeepSeekConfig
from jax_thundermla.deepseek.layer import (AttentionWeights,
                                           attention_shapes, mla_attention,
                                           rms_norm)


class LayerWeights(NamedTuple):
  """One transformer layer.

  Attributes:
    attn_norm: [hidden] RMSNorm weight before attention.
    attn: the MLA weights.
    mlp_norm: [hidden] RMSNorm weight before the MLP.
    w_gate: [hidden, intermediate] SwiGLU gate projection.
    w_up: [hidden, intermediate] SwiGLU up projection.
    w_down: [intermediate, hidden] SwiGLU down projection.
  """

  attn_norm: jax.Array
  attn: AttentionWeights
  mlp_norm: jax.Array
  w_gate: jax.Array
  w_up: jax.Array
  w_down: jax.Array


class ModelWeights(NamedTuple):
  """The whole model.

  Attributes:
    embed: [vocab, hidden] token embedding.
    layers: one ``LayerWeights`` per layer.
    final_norm: [hidden] RMSNorm weight before the LM head.
    lm_head: [hidden, vocab] output projection.
  """

  embed: jax.Array
  layers: tuple[LayerWeights, ...]
  final_norm: jax.Array
  lm_head: jax.Array


def weight_shapes(config: DeepSeekConfig) -> ModelWeights:
  """The shape of every ``ModelWeights`` leaf, as tuples."""
  c = config
  layer = LayerWeights(
      attn_norm=(c.hidden_size,), attn=attention_shapes(c),
      mlp_norm=(c.hidden_size,),
      w_gate=(c.hidden_size, c.intermediate_size),
      w_up=(c.hidden_size, c.intermediate_size),
      w_down=(c.intermediate_size, c.hidden_size))
  return ModelWeights(
      embed=(c.vocab_size, c.hidden_size), layers=(layer,) * c.num_layers,
      final_norm=(c.hidden_size,), lm_head=(c.hidden_size, c.vocab_size))


def _is_shape(x: Any) -> bool:
  return (isinstance(x, tuple) and bool(x)
          and all(isinstance(d, int) for d in x))


def _fan_in(name: str, shape: tuple[int, ...]) -> int:
  """Elements each output of a weight sums over in the forward pass."""
  if name == "embed":
    return 1
  if name == "w_uk":  # [heads, qk_nope, kv_lora_rank]: k_nope = W_UK c_kv
    return shape[2]
  if name == "w_uv":  # [heads, kv_lora_rank, v_head_dim]
    return shape[1]
  if name == "w_o":  # [heads, v_head_dim, hidden]
    return shape[0] * shape[1]
  return shape[0]  # [in, out] and w_uq [q_lora_rank, heads, out]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw(key: jax.Array, named_shapes: tuple[tuple[str, tuple[int, ...]], ...],
          dtype: str) -> list[jax.Array]:
  """Random leaves from one flat normal draw (one RNG op compiles fast)."""
  matrices = [s for _, s in named_shapes if len(s) > 1]
  flat = jax.random.normal(key, (sum(math.prod(s) for s in matrices),),
                           jnp.float32)
  out, offset = [], 0
  for name, shape in named_shapes:
    if len(shape) == 1:
      out.append(jnp.ones(shape, dtype))
      continue
    size = math.prod(shape)
    w = flat[offset:offset + size].reshape(shape) * _fan_in(name, shape)**-0.5
    out.append(w.astype(dtype))
    offset += size
  return out


def _named_shapes(tree: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
  return tuple((path[-1].name, shape) for path, shape in
               jax.tree_util.tree_flatten_with_path(tree,
                                                    is_leaf=_is_shape)[0])


def init_weights(key: jax.Array, config: DeepSeekConfig) -> ModelWeights:
  """Random weights: norms 1, embedding N(0, 1), matrices N(0, 1/fan_in).

  Args:
    key: a PRNG key.
    config: the model config.

  Returns:
    ``ModelWeights`` in ``config.dtype``.
  """
  shapes = weight_shapes(config)
  keys = jax.random.split(key, config.num_layers + 1)
  layer_shapes = shapes.layers[0]
  layers = tuple(
      jax.tree.unflatten(jax.tree.structure(layer_shapes, is_leaf=_is_shape),
                         _draw(k, _named_shapes(layer_shapes), config.dtype))
      for k in keys[1:])
  top = shapes._replace(layers=())
  top_leaves = _draw(keys[0], _named_shapes(top), config.dtype)
  return jax.tree.unflatten(jax.tree.structure(top, is_leaf=_is_shape),
                            top_leaves)._replace(layers=layers)


def init_caches(config: DeepSeekConfig, num_pages: int, page_size: int,
                *, fill: float = 0.0) -> tuple[jax.Array, ...]:
  """One cache per layer, each [num_pages, page_size, 1, latent_dim].

  Args:
    config: the model config.
    num_pages: pages per layer (under data parallelism: all shards').
    page_size: tokens per page.
    fill: initial value of every slot.

  Returns:
    A tuple of ``config.num_layers`` caches in ``config.dtype``.
  """
  return tuple(init_cache(num_pages, page_size, config.latent_dim,
                          config.jnp_dtype, fill=fill)
               for _ in range(config.num_layers))


def swiglu(layer: LayerWeights, x: jax.Array,
           tp_axis: str | None = None) -> jax.Array:
  """The dense MLP ``W_down(silu(W_gate x) * W_up x)``.

  Args:
    layer: the layer's weights (local intermediate columns under tensor
      parallelism).
    x: [b, s, hidden] normed hidden states.
    tp_axis: mesh axis sharding the intermediate dim, or None.

  Returns:
    [b, s, hidden] in x's dtype.
  """
  gate = jnp.einsum("bsd,df->bsf", x, layer.w_gate,
                    preferred_element_type=jnp.float32)
  up = jnp.einsum("bsd,df->bsf", x, layer.w_up,
                  preferred_element_type=jnp.float32)
  h = (jax.nn.silu(gate) * up).astype(x.dtype)
  y = jnp.einsum("bsf,fd->bsd", h, layer.w_down,
                 preferred_element_type=jnp.float32)
  if tp_axis is not None:
    y = jax.lax.psum(y, tp_axis)
  return y.astype(x.dtype)


def decode_step(
    weights: ModelWeights,
    caches: tuple[jax.Array, ...],
    tokens: jax.Array,
    block_table: jax.Array,
    cache_seqlens: jax.Array,
    *,
    config: DeepSeekConfig,
    plan: Any = None,
    tp_axis: str | None = None,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """Runs ``s_q`` new tokens per sequence through the model.

  The new tokens are appended to every layer's cache; the same block table,
  lengths and plan serve all layers. Prefill is this step with ``s_q > 1``.
  ``make_decode_step`` wraps it in ``jax.jit`` with the caches donated.

  Args:
    weights: the model (local shards inside ``jax.shard_map``).
    caches: one [num_pages, page_size, 1, latent_dim] cache per layer.
    tokens: int32 [b, s_q] the new tokens.
    block_table: int32 [b, max_pages] page ids of each sequence; pages for
      the new tokens must already be in it.
    cache_seqlens: int32 [b] lengths including the new tokens.
    config: the model config.
    plan: one host-built ``DecodePlan`` for these lengths, reused by every
      layer, or None to plan on the device.
    tp_axis: mesh axis sharding heads and MLP columns, or None.

  Returns:
    ``(logits, caches)``: float32 [b, s_q, vocab], and the updated caches.

  Raises:
    ValueError: the number of caches is not ``config.num_layers``.
  """
  if len(caches) != len(weights.layers):
    raise ValueError(
        f"caches must hold one cache per layer ({len(weights.layers)}), got"
        f" {len(caches)}")
  eps = config.rms_norm_eps
  x = weights.embed[tokens]  # [b, s_q, hidden]
  new_caches = []
  for layer, cache in zip(weights.layers, caches):
    h, cache = mla_attention(
        layer.attn, rms_norm(x, layer.attn_norm, eps), cache, block_table,
        cache_seqlens, config=config, plan=plan, tp_axis=tp_axis)
    x = x + h
    x = x + swiglu(layer, rms_norm(x, layer.mlp_norm, eps), tp_axis)
    new_caches.append(cache)
  logits = jnp.einsum("bsd,dv->bsv", rms_norm(x, weights.final_norm, eps),
                      weights.lm_head, preferred_element_type=jnp.float32)
  return logits, tuple(new_caches)


def prefill_windows(prompt_lengths: Sequence[int], chunk: int) -> np.ndarray:
  """Window ends of a chunked prefill that keeps one step shape.

  Prefill runs the decode step with ``s_q = chunk``: at step k sequence i
  feeds its prompt tokens ``end - chunk .. end - 1`` with ``end =
  min((k + 1) * chunk, len_i)`` and ``cache_seqlens = end``. A prompt whose
  length is not a multiple of ``chunk`` ends with a window that overlaps the
  previous one; a finished prompt repeats its last window. Re-feeding a
  token rewrites its cache entries with the values they already hold (a
  token's entry depends only on the tokens up to it), so every step has the
  same shape and compiles once. After the last step, each sequence's logits
  at query row ``chunk - 1`` predict its first new token.

  Args:
    prompt_lengths: tokens per prompt, each >= chunk.
    chunk: tokens per sequence per step.

  Returns:
    int32 [num_steps, b], ``num_steps = ceil(max(prompt_lengths) / chunk)``.

  Raises:
    ValueError: an empty batch, ``chunk < 1`` or a prompt shorter than
      ``chunk``.
  """
  lengths = np.asarray(prompt_lengths, np.int64)
  if chunk < 1 or lengths.size == 0:
    raise ValueError(
        f"chunk must be >= 1 and the batch non-empty, got chunk={chunk} and"
        f" {lengths.size} prompts")
  if lengths.min() < chunk:
    raise ValueError(
        f"every prompt must hold at least chunk={chunk} tokens, got lengths"
        f" {lengths.tolist()}")
  steps = -(-int(lengths.max()) // chunk)
  ends = np.arange(1, steps + 1)[:, None] * chunk
  return np.minimum(ends, lengths[None, :]).astype(np.int32)
