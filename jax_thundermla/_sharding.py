"""The SPMD partitioning rule of mla_decode (for ``custom_partitioning``).

Every sequence and every query head is independent, so a call sharded over
the batch (a data axis) or over the query heads (a tensor axis) runs the
whole operation locally on each shard, on its own sequences and heads:

* batch: q, block_table and cache_seqlens are split along b; the cache is
  replicated (page ids are global), out and lse keep the batch sharding;
* heads: q is split along h_q; with one KV head the cache is replicated,
  with ``h_kv`` KV heads it is split along h_kv by the same axes when they
  divide it (query head j still meets KV head ``j // (h_q / h_kv)``), else
  the heads are not split; out and lse keep the head sharding.

What the rule asks for is what the partitioner provides: a cache sharded
over its pages is gathered (page ids name pages of the whole cache), a
dimension sharded unevenly is gathered. A host DecodePlan describes the whole
batch and all heads on one device: under batch or head sharding the rule
raises; plan on the device (``plan=None``, each shard plans its own part) or
call mla_decode inside ``jax.shard_map`` with a plan per shard. The plan that
``plan=None`` builds outside a loop body (``api``) is dropped there, and each
shard plans its own part.
"""

from __future__ import annotations

import math

from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Shardy factors: b batch, s query tokens, h query heads, d/e head dims,
# p pages, t page slots, k KV heads, m table width, v value dim; a host
# plan's instructions (i, j, w) and lengths (c).
_OPERANDS = "b s h d, p t k e, b m, b"
_PLAN_OPERANDS = ", i j w, c"
_RESULTS = "b s h v, b h s"
_REPLICATED = ("s", "d", "e", "p", "t", "m", "v")
_PLAN_REPLICATED = ("i", "j", "w", "c")


def sharding_rule(config, mesh, value_types, result_types):
  """The einsum-like Shardy rule: b and h shard, the rest is replicated."""
  del mesh, value_types, result_types
  operands, replicated = _OPERANDS, _REPLICATED
  if config.plan is not None:
    operands += _PLAN_OPERANDS
    replicated += _PLAN_REPLICATED
  rule = f"{operands} -> {_RESULTS}"
  # Shardy wants these factors in the order they first appear.
  order = list(dict.fromkeys(c for c in rule if c.isalpha()))
  return rule, {"need_replication_factors": tuple(
      sorted(replicated, key=order.index))}


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _size(mesh, axes: tuple[str, ...]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _spec(sharding, ndim: int) -> tuple:
  spec = tuple(getattr(sharding, "spec", ()) or ())
  return spec + (None,) * (ndim - len(spec))


def _entry(axes: tuple[str, ...]):
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def local_axes(mesh, q_sharding, *, batch: int, h_q: int, h_kv: int
               ) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
  """Mesh axes of the batch and of the heads that the call keeps split.

  Args:
    mesh: the mesh.
    q_sharding: q's sharding as the partitioner proposes it.
    batch: sequences (global).
    h_q: query heads (global).
    h_kv: KV heads.

  Returns:
    ``(batch_axes, head_axes, split_kv)``: axes of b and h_q (empty: not
    split) and whether the cache is split along h_kv by ``head_axes``.
  """
  spec = _spec(q_sharding, 4)
  batch_axes, head_axes = _axes(spec[0]), _axes(spec[2])
  if batch % _size(mesh, batch_axes):
    batch_axes = ()
  heads = _size(mesh, head_axes)
  if h_q % heads or (h_kv > 1 and h_kv % heads):
    head_axes = ()
  return batch_axes, head_axes, bool(head_axes) and h_kv > 1


def partition(bind, config, mesh, arg_shapes, result_shape):
  """custom_partitioning's ``partition``: shardings and the local function.

  Raises:
    ValueError: a host plan with the batch or the heads split (a hoisted
      device plan is dropped instead).
  """
  del result_shape
  q, kv_cache, _, _, plan_leaves = arg_shapes
  batch_axes, head_axes, split_kv = local_axes(
      mesh, q.sharding, batch=q.shape[0], h_q=q.shape[2],
      h_kv=kv_cache.shape[2])
  split = bool(batch_axes or head_axes)
  if plan_leaves and split and config.hoisted:
    # A hoisted device plan covers the whole call: each shard plans its own.
    config = config.unplanned()
  elif plan_leaves and split:
    raise ValueError(
        "mla_decode: a host DecodePlan covers the whole batch and all heads,"
        f" but the call is split over mesh axes {batch_axes + head_axes};"
        " pass plan=None (each shard plans on its device) or call"
        " mla_decode inside jax.shard_map with a plan per shard")
  b, h = _entry(batch_axes), _entry(head_axes)
  named = lambda *spec: NamedSharding(mesh, P(*spec))
  args = (named(b, None, h, None),
          named(None, None, h if split_kv else None, None),
          named(b, None), named(b),
          tuple(named() for _ in plan_leaves))
  results = (named(b, None, h, None), named(b, h, None))

  def lower_fn(q, kv_cache, block_table, cache_seqlens, plan_leaves):
    if config.plan is None:
      plan_leaves = ()
    return bind(config, q, kv_cache, block_table, cache_seqlens, plan_leaves)

  return mesh, lower_fn, results, args
