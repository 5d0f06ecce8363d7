"""A DeepSeek-V2/V3 decoder, one decode step at a time.

Each layer: RMSNorm, MLA attention (absorbed, paged latent cache), residual,
RMSNorm, MLP (dense SwiGLU or mixture of experts, ``moe``), residual; then a
final RMSNorm and the LM head. Every layer has its own cache array; all
share one block table, one set of lengths and one decode plan per step.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_thundermla.deepseek.cache import FP8, init_cache
from jax_thundermla.deepseek.config import DeepSeekConfig
from jax_thundermla.deepseek.layer import (ATTENTION_BACKENDS,
                                           AttentionWeights,
                                           attention_shapes,
                                           matmul_precision, mla_attention,
                                           rms_norm)
from jax_thundermla.deepseek.moe import (DenseMLP, MoEWeights, dense_shapes,
                                         moe_mlp, moe_shapes, swiglu)


class LayerWeights(NamedTuple):
  """One transformer layer.

  Attributes:
    attn_norm: [hidden] RMSNorm weight before attention.
    attn: the MLA weights.
    mlp_norm: [hidden] RMSNorm weight before the MLP.
    mlp: a ``DenseMLP`` (``intermediate_size`` wide) or, on the layers
      where ``config.is_moe_layer(i)``, ``MoEWeights``.
  """

  attn_norm: jax.Array
  attn: AttentionWeights
  mlp_norm: jax.Array
  mlp: DenseMLP | MoEWeights


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
  layers = tuple(
      LayerWeights(
          attn_norm=(c.hidden_size,), attn=attention_shapes(c),
          mlp_norm=(c.hidden_size,),
          mlp=(moe_shapes(c) if c.is_moe_layer(i)
               else dense_shapes(c.hidden_size, c.intermediate_size)))
      for i in range(c.num_layers))
  return ModelWeights(
      embed=(c.vocab_size, c.hidden_size), layers=layers,
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
  if name == "w_uq":  # [q_lora_rank or hidden, heads, out]
    return shape[0]
  return shape[-2]  # [in, out] and experts' [experts, in, out]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw(key: jax.Array, named_shapes: tuple[tuple[str, tuple[int, ...]], ...],
          dtype: str) -> list[jax.Array]:
  """Random leaves from one flat normal draw (one RNG op compiles fast)."""
  matrices = [s for _, s in named_shapes if len(s) > 1]
  flat = jax.random.normal(key, (sum(math.prod(s) for s in matrices),),
                           jnp.float32)
  out, offset = [], 0
  for name, shape in named_shapes:
    leaf_dtype = jnp.float32 if name in _FLOAT32_LEAVES else dtype
    if len(shape) == 1:
      out.append(jnp.full(shape, name != "router_bias", leaf_dtype))
      continue
    size = math.prod(shape)
    w = flat[offset:offset + size].reshape(shape) * _fan_in(name, shape)**-0.5
    out.append(w.astype(leaf_dtype))
    offset += size
  return out


# The router stays float32 whatever the model's dtype (as in DeepSeek's
# checkpoints).
_FLOAT32_LEAVES = ("router", "router_bias")


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
    ``ModelWeights`` in ``config.dtype`` (routers in float32, router
    biases 0).
  """
  shapes = weight_shapes(config)
  keys = jax.random.split(key, config.num_layers + 1)
  layers = tuple(
      jax.tree.unflatten(jax.tree.structure(layer_shapes, is_leaf=_is_shape),
                         _draw(k, _named_shapes(layer_shapes), config.dtype))
      for k, layer_shapes in zip(keys[1:], shapes.layers))
  top = shapes._replace(layers=())
  top_leaves = _draw(keys[0], _named_shapes(top), config.dtype)
  return jax.tree.unflatten(jax.tree.structure(top, is_leaf=_is_shape),
                            top_leaves)._replace(layers=layers)


def init_caches(config: DeepSeekConfig, num_pages: int, page_size: int,
                *, fill: float = 0.0) -> tuple[jax.Array, ...]:
  """One cache per layer, each [num_pages, page_size, 1, cache_width].

  Args:
    config: the model config.
    num_pages: pages per layer (under data parallelism: all shards').
    page_size: tokens per page.
    fill: initial value of every slot.

  Returns:
    A tuple of ``config.num_layers`` caches: [..., latent_dim] in
    ``config.dtype``, or with ``kv_cache_dtype="fp8"`` uint8 [..., 656]
    FP8 caches.
  """
  dtype = FP8 if config.fp8_cache else config.jnp_dtype
  return tuple(init_cache(num_pages, page_size, config.latent_dim, dtype,
                          fill=fill)
               for _ in range(config.num_layers))


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
    ep_axis: str | None = None,
    backend: str | None = None,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """Runs ``s_q`` new tokens per sequence through the model.

  The new tokens are appended to every layer's cache; the same block table,
  lengths and plan serve all layers. Prefill is this step with ``s_q > 1``.
  ``make_decode_step`` wraps it in ``jax.jit`` with the caches donated.

  Args:
    weights: the model (local shards inside ``jax.shard_map``).
    caches: one [num_pages, page_size, 1, latent_dim] cache per layer
      (uint8 [num_pages, page_size, 1, 656] with ``kv_cache_dtype="fp8"``;
      see ``init_caches``).
    tokens: integer [b, s_q] the new tokens. A sequence with a token
      outside ``[0, vocab_size)`` gets NaN logits (and NaN cache entries
      for its new positions, so later steps stay NaN), never a clamped
      token; the other sequences are unaffected.
    block_table: int32 [b, max_pages] page ids of each sequence; pages for
      the new tokens must already be in it.
    cache_seqlens: int32 [b] lengths including the new tokens.
    config: the model config.
    plan: one host-built ``DecodePlan`` for these lengths, reused by every
      layer, or None to plan on the device.
    tp_axis: mesh axis sharding heads and MLP columns, or None.
    ep_axis: mesh axis sharding the routed experts (and the batch), or None.
    backend: ``mla_decode``'s backend: None, ``"cuda"`` or
      ``"reference"``.

  Returns:
    ``(logits, caches)``: float32 [b, s_q, vocab], and the updated caches.

  Raises:
    TypeError: non-integer tokens, or a cache of another dtype than the
      config's (``config.cache_dtype``).
    ValueError: the number of caches is not the number of layers, a cache
      is not [num_pages, page_size, 1, config.cache_width], tokens are not
      [b, s_q], or an unknown backend (or ``"cuda"`` with FP8 caches).
  """
  _check_inputs(weights, caches, tokens, config, backend)
  eps = config.rms_norm_eps
  tokens = jnp.asarray(tokens)
  vocab = weights.embed.shape[0]
  oov = jnp.any((tokens < 0) | (tokens >= vocab), axis=1)  # [b]
  x = weights.embed[jnp.clip(tokens, 0, vocab - 1)]  # [b, s_q, hidden]
  x = jnp.where(oov[:, None, None], jnp.nan, x).astype(x.dtype)
  new_caches = []
  for i, (layer, cache) in enumerate(zip(weights.layers, caches)):
    h, cache = mla_attention(
        layer.attn, rms_norm(x, layer.attn_norm, eps), cache, block_table,
        cache_seqlens, config=config, plan=plan, tp_axis=tp_axis,
        backend=backend)
    x = x + h
    normed = rms_norm(x, layer.mlp_norm, eps)
    if isinstance(layer.mlp, MoEWeights):
      x = x + moe_mlp(layer.mlp, normed, config=config, tp_axis=tp_axis,
                      ep_axis=ep_axis)
    else:
      if config.is_moe_layer(i):
        raise ValueError(f"layer {i} must have MoEWeights, got a DenseMLP")
      x = x + swiglu(layer.mlp, normed, tp_axis)
    new_caches.append(cache)
  logits = jnp.einsum("bsd,dv->bsv", rms_norm(x, weights.final_norm, eps),
                      weights.lm_head, preferred_element_type=jnp.float32,
                      precision=matmul_precision(x.dtype))
  return logits, tuple(new_caches)


def _check_inputs(weights: ModelWeights, caches, tokens, config, backend
                  ) -> None:
  """Trace-time checks of decode_step's arguments (shapes and dtypes)."""
  if backend not in ATTENTION_BACKENDS:
    raise ValueError(
        f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
  if len(caches) != len(weights.layers):
    raise ValueError(
        f"caches must hold one cache per layer ({len(weights.layers)}), got"
        f" {len(caches)}")
  if not hasattr(tokens, "dtype"):
    tokens = np.asarray(tokens)
  if not np.issubdtype(tokens.dtype, np.integer):
    raise TypeError(
        f"tokens must be integer token ids, got dtype"
        f" {np.dtype(tokens.dtype).name}")
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [b, s_q], got shape {tokens.shape}")
  what = ("FP8 entries, kv_cache_dtype 'fp8'" if config.fp8_cache else
          "latent_dim = kv_lora_rank + 64")
  for i, cache in enumerate(caches):
    shape = tuple(cache.shape)
    if len(shape) != 4 or shape[2] != 1 or shape[3] != config.cache_width:
      raise ValueError(
          f"caches[{i}] must be [num_pages, page_size, 1,"
          f" {config.cache_width}] ({what}), got {shape}")
    if cache.dtype != config.cache_dtype:
      raise TypeError(
          f"caches[{i}] must be {config.cache_dtype.name} (the config's"
          f" {'kv_cache_dtype' if config.fp8_cache else 'dtype'}), got"
          f" {np.dtype(cache.dtype).name}")


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
