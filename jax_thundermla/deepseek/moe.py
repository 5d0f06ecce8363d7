"""DeepSeek MLPs: the dense SwiGLU and the mixture of experts.

A MoE layer scores every routed expert from the token (float32 router),
picks ``num_experts_per_tok`` of them (``DeepSeekConfig.topk_method``),
runs each token through its experts and adds the shared experts' SwiGLU.
The routed experts run as grouped matmuls: the (token, expert) pairs are
sorted by expert and ``jax.lax.ragged_dot`` multiplies each expert's rows
by that expert's weights, so the work is ``tokens * k`` rows, never
``tokens * n_routed_experts``.

Expert parallelism: under ``jax.shard_map`` with the experts split over an
``ep`` mesh axis, each device holds ``n_routed_experts / ep`` experts and
the batch is split over ``ep`` too. The MoE gathers the tokens of its ep
group, computes what its own experts give every token, and a
reduce-scatter sums the contributions and hands each device its tokens
back. Tensor parallelism (``tp``) splits each expert's and each dense
MLP's intermediate columns; a ``psum`` adds the parts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_thundermla.deepseek.config import DeepSeekConfig


class DenseMLP(NamedTuple):
  """A SwiGLU MLP ``W_down(silu(W_gate x) * W_up x)``.

  Attributes:
    w_gate: [hidden, intermediate].
    w_up: [hidden, intermediate].
    w_down: [intermediate, hidden].
  """

  w_gate: jax.Array
  w_up: jax.Array
  w_down: jax.Array


class MoEWeights(NamedTuple):
  """A mixture-of-experts MLP (``E`` routed experts of width ``I``).

  Attributes:
    router: float32 [hidden, E] router (gate) weight.
    router_bias: float32 [E] ``e_score_correction_bias`` (zeros unless
      ``topk_method == "noaux_tc"``).
    w_gate: [E, hidden, I] experts' gate projections.
    w_up: [E, hidden, I] experts' up projections.
    w_down: [E, I, hidden] experts' down projections.
    shared: the shared experts as one ``DenseMLP`` of width
      ``n_shared_experts * I``, or None without shared experts.
  """

  router: jax.Array
  router_bias: jax.Array
  w_gate: jax.Array
  w_up: jax.Array
  w_down: jax.Array
  shared: DenseMLP | None


def dense_shapes(hidden: int, intermediate: int) -> DenseMLP:
  return DenseMLP(w_gate=(hidden, intermediate), w_up=(hidden, intermediate),
                  w_down=(intermediate, hidden))


def moe_shapes(config: DeepSeekConfig) -> MoEWeights:
  """The shape of every ``MoEWeights`` field (all experts)."""
  c = config
  e, d, i = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
  return MoEWeights(
      router=(d, e), router_bias=(e,), w_gate=(e, d, i), w_up=(e, d, i),
      w_down=(e, i, d),
      shared=(dense_shapes(d, c.n_shared_experts * i)
              if c.n_shared_experts else None))


def _precision(dtype) -> jax.lax.Precision:
  return (jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32
          else jax.lax.Precision.DEFAULT)


def swiglu(mlp: DenseMLP, x: jax.Array,
           tp_axis: str | None = None) -> jax.Array:
  """The dense MLP ``W_down(silu(W_gate x) * W_up x)``.

  Args:
    mlp: the weights (local intermediate columns under tensor parallelism).
    x: [..., hidden] normed hidden states.
    tp_axis: mesh axis sharding the intermediate dim, or None.

  Returns:
    [..., hidden] in x's dtype.
  """
  kw = dict(preferred_element_type=jnp.float32,
            precision=_precision(x.dtype))
  gate = jnp.einsum("...d,df->...f", x, mlp.w_gate, **kw)
  up = jnp.einsum("...d,df->...f", x, mlp.w_up, **kw)
  h = (jax.nn.silu(gate) * up).astype(x.dtype)
  y = jnp.einsum("...f,fd->...d", h, mlp.w_down, **kw)
  if tp_axis is not None:
    y = jax.lax.psum(y, tp_axis)
  return y.astype(x.dtype)


def route(x: jax.Array, router: jax.Array, router_bias: jax.Array,
          config: DeepSeekConfig) -> tuple[jax.Array, jax.Array]:
  """Picks each token's experts and their weights.

  Args:
    x: [T, hidden] normed hidden states.
    router: float32 [hidden, E].
    router_bias: float32 [E] (used by ``noaux_tc`` only).
    config: the model config (routing fields).

  Returns:
    ``(weights, experts)``: float32 [T, k] and int32 [T, k], k =
    ``num_experts_per_tok``.
  """
  c = config
  logits = jnp.einsum("td,de->te", x.astype(jnp.float32),
                      router.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  scores = (jax.nn.softmax(logits, axis=-1) if c.scoring_func == "softmax"
            else jax.nn.sigmoid(logits))
  choice = scores
  if c.topk_method == "noaux_tc":
    choice = scores + router_bias.astype(jnp.float32)
  if c.topk_method != "greedy":
    t, e = choice.shape
    grouped = choice.reshape(t, c.n_group, e // c.n_group)
    if c.topk_method == "noaux_tc":
      group_score = jax.lax.top_k(grouped, 2)[0].sum(axis=-1)
    else:
      group_score = grouped.max(axis=-1)
    _, top_groups = jax.lax.top_k(group_score, c.topk_group)  # [T, g]
    keep = jnp.zeros((t, c.n_group), bool).at[
        jnp.arange(t)[:, None], top_groups].set(True)
    choice = jnp.where(jnp.repeat(keep, e // c.n_group, axis=1), choice,
                       -jnp.inf)
  _, experts = jax.lax.top_k(choice, c.num_experts_per_tok)
  weights = jnp.take_along_axis(scores, experts, axis=1)
  if c.norm_topk_prob:
    weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
  return weights * c.routed_scaling_factor, experts.astype(jnp.int32)


def routed_experts(moe: MoEWeights, x: jax.Array, weights: jax.Array,
                   experts: jax.Array, first_expert: jax.Array | int = 0
                   ) -> jax.Array:
  """What the local experts add to each token, by grouped matmuls.

  Args:
    moe: the MoE weights; ``w_gate`` etc. hold the local experts
      ``first_expert .. first_expert + E_local - 1``.
    x: [T, hidden] normed hidden states.
    weights: float32 [T, k] routing weights.
    experts: int32 [T, k] global expert ids.
    first_expert: global id of the first local expert.

  Returns:
    float32 [T, hidden]: the sum over the token's local experts of weight
    times expert output (other experts contribute 0).
  """
  t, k = experts.shape
  local_count = moe.w_gate.shape[0]
  local = experts - first_expert
  mine = (local >= 0) & (local < local_count)
  key = jnp.where(mine, local, local_count).reshape(t * k)  # others last
  order = jnp.argsort(key, stable=True)
  token = order // k
  group_sizes = jnp.zeros((local_count,), jnp.int32).at[key].add(
      1, mode="drop")
  rows = x[token]  # [T * k, hidden], grouped by expert
  kw = dict(preferred_element_type=jnp.float32,
            precision=_precision(x.dtype))
  gate = jax.lax.ragged_dot(rows, moe.w_gate, group_sizes, **kw)
  up = jax.lax.ragged_dot(rows, moe.w_up, group_sizes, **kw)
  h = (jax.nn.silu(gate) * up).astype(x.dtype)
  y = jax.lax.ragged_dot(h, moe.w_down, group_sizes, **kw)  # [T * k, hidden]
  scale = jnp.where(mine.reshape(t * k)[order],
                    weights.reshape(t * k)[order], 0.0)
  y = jnp.where(scale[:, None] != 0, y * scale[:, None], 0.0)
  return jnp.zeros((t, x.shape[-1]), jnp.float32).at[token].add(y)


def moe_mlp(moe: MoEWeights, x: jax.Array, *, config: DeepSeekConfig,
            tp_axis: str | None = None, ep_axis: str | None = None
            ) -> jax.Array:
  """A mixture-of-experts MLP: routed plus shared experts.

  Args:
    moe: the weights (local experts and columns inside ``jax.shard_map``).
    x: [b, s, hidden] normed hidden states (the local batch).
    config: the model config.
    tp_axis: mesh axis splitting the experts' intermediate columns, or None.
    ep_axis: mesh axis splitting the experts and the batch, or None.

  Returns:
    [b, s, hidden] in x's dtype.
  """
  b, s, d = x.shape
  tokens = x.reshape(b * s, d)
  first = 0
  if ep_axis is not None:
    tokens = jax.lax.all_gather(tokens, ep_axis, axis=0, tiled=True)
    first = jax.lax.axis_index(ep_axis) * moe.w_gate.shape[0]
  weights, experts = route(tokens, moe.router, moe.router_bias, config)
  y = routed_experts(moe, tokens, weights, experts, first)
  if ep_axis is not None:
    y = jax.lax.psum_scatter(y, ep_axis, scatter_dimension=0, tiled=True)
  if tp_axis is not None:
    y = jax.lax.psum(y, tp_axis)
  y = y.reshape(b, s, d)
  if moe.shared is not None:
    y = y + swiglu(moe.shared, x, tp_axis).astype(jnp.float32)
  return y.astype(x.dtype)
