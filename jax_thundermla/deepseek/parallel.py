"""The jitted decode step, unsharded or over a ("dp", "tp") device mesh.

Tensor parallelism ("tp") shards the attention heads, as DeepSeek-R1 is
served 8-way (16 of 128 heads per device): W_UQ's head axis, W_UK, W_UV and
the head rows of W_O, plus the dense MLP's intermediate columns. The
latent caches are replicated over "tp" (every head reads every entry); each
device computes its heads' part of the output projection and a ``psum``
adds the parts. Data parallelism ("dp") splits the batch: tokens, block
tables, lengths and the caches' page axis, so that each dp shard owns
``num_pages / dp`` pages and its block table rows hold local page ids
(``0 .. num_pages / dp - 1``; one ``PageAllocator`` per shard).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from jax_thundermla.deepseek.config import DeepSeekConfig
from jax_thundermla.deepseek.layer import AttentionWeights
from jax_thundermla.deepseek.model import (LayerWeights, ModelWeights,
                                           decode_step)

DP_AXIS = "dp"
TP_AXIS = "tp"

DecodeStep = Callable[..., tuple[jax.Array, tuple[jax.Array, ...]]]


def make_mesh(dp: int = 1, tp: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(dp, tp)`` mesh with axes ``("dp", "tp")``.

  Args:
    dp: data-parallel ways.
    tp: tensor-parallel ways; neighbouring devices share a dp shard.
    devices: default ``jax.devices()``; the first ``dp * tp`` are used.

  Returns:
    The mesh.

  Raises:
    ValueError: fewer than ``dp * tp`` devices, or a size below 1.
  """
  devices = list(jax.devices() if devices is None else devices)
  if dp < 1 or tp < 1:
    raise ValueError(f"dp and tp must be >= 1, got {dp} and {tp}")
  if dp * tp > len(devices):
    raise ValueError(
        f"dp * tp = {dp * tp} devices needed, {len(devices)} available")
  return Mesh(np.array(devices[:dp * tp]).reshape(dp, tp),
              (DP_AXIS, TP_AXIS))


def weight_specs(config: DeepSeekConfig) -> ModelWeights:
  """Partition specs of ``ModelWeights`` for the ("dp", "tp") mesh."""
  attn = AttentionWeights(
      w_dq=P(), q_norm=P(), w_uq=P(None, TP_AXIS, None), w_dkv=P(),
      kv_norm=P(), w_uk=P(TP_AXIS), w_uv=P(TP_AXIS), w_o=P(TP_AXIS))
  layer = LayerWeights(attn_norm=P(), attn=attn, mlp_norm=P(),
                       w_gate=P(None, TP_AXIS), w_up=P(None, TP_AXIS),
                       w_down=P(TP_AXIS))
  return ModelWeights(embed=P(), layers=(layer,) * config.num_layers,
                      final_norm=P(), lm_head=P())


def _check_mesh(config: DeepSeekConfig, mesh: Mesh) -> tuple[int, int]:
  if tuple(mesh.axis_names) != (DP_AXIS, TP_AXIS):
    raise ValueError(
        f"mesh axes must be {(DP_AXIS, TP_AXIS)} (see make_mesh), got"
        f" {tuple(mesh.axis_names)}")
  dp, tp = mesh.shape[DP_AXIS], mesh.shape[TP_AXIS]
  for name in ("num_heads", "intermediate_size"):
    if getattr(config, name) % tp:
      raise ValueError(
          f"config.{name} ({getattr(config, name)}) must be a multiple of"
          f" the tp mesh size {tp}")
  return dp, tp


def shard_weights(weights: ModelWeights, config: DeepSeekConfig,
                  mesh: Mesh) -> ModelWeights:
  """Places the weights on the mesh, heads and MLP columns split over tp."""
  _check_mesh(config, mesh)
  return jax.tree.map(
      lambda w, spec: jax.device_put(w, NamedSharding(mesh, spec)),
      weights, weight_specs(config))


def shard_batch(mesh: Mesh, *arrays: Any) -> tuple[jax.Array, ...]:
  """Places batch-major arrays (tokens, tables, lengths, caches) on the mesh.

  Axis 0 of each array is split over "dp" and replicated over "tp": the
  batch axis of tokens, block tables and lengths, the page axis of caches.
  """
  sharding = NamedSharding(mesh, P(DP_AXIS))
  return tuple(jax.tree.map(lambda x: jax.device_put(x, sharding), a)
               for a in arrays)


def make_decode_step(config: DeepSeekConfig,
                     mesh: Mesh | None = None) -> DecodeStep:
  """The model's decode step, jitted, caches donated (updated in place).

  Args:
    config: the model config.
    mesh: None for one device; else a ("dp", "tp") mesh from ``make_mesh``.
      The batch must divide by dp; the caches' page count by dp.

  Returns:
    ``step(weights, caches, tokens, block_table, cache_seqlens, plan=None)
    -> (logits, caches)`` with the shapes of ``decode_step``. ``caches``
    is donated: use the returned ones. On a mesh, ``block_table`` holds
    each dp shard's local page ids, and ``plan`` (if any) is built for
    the per-device shapes (batch / dp sequences, num_heads / tp heads)
    and replicated, so it needs dp == 1.

  Raises:
    ValueError: a mesh with other axes, or head or MLP widths that do not
      divide by tp; at call time, a plan with dp > 1.
  """
  if mesh is None:
    def step(weights, caches, tokens, block_table, cache_seqlens, plan=None):
      return decode_step(weights, caches, tokens, block_table, cache_seqlens,
                         config=config, plan=plan)
    return jax.jit(step, donate_argnums=1)

  dp, _ = _check_mesh(config, mesh)
  specs = weight_specs(config)
  cache_specs = (P(DP_AXIS),) * config.num_layers
  batch = P(DP_AXIS)

  def local_step(weights, caches, tokens, block_table, cache_seqlens, plan):
    return decode_step(weights, caches, tokens, block_table, cache_seqlens,
                       config=config, plan=plan, tp_axis=TP_AXIS)

  # check_vma=False: mla_decode's reference backend scans with a carry
  # built from constants, which the replication checker rejects once the
  # queries vary over tp. What is replicated over tp (the caches, the
  # psum'd activations) is stated by the out_specs; tests compare the
  # sharded step with the unsharded one.
  sharded = jax.shard_map(
      local_step, mesh=mesh,
      in_specs=(specs, cache_specs, batch, batch, batch, P()),
      out_specs=(batch, cache_specs), check_vma=False)

  def step(weights, caches, tokens, block_table, cache_seqlens, plan=None):
    if plan is not None and dp > 1:
      raise ValueError(
          "a host plan is replicated over the mesh and needs dp == 1, got"
          f" dp = {dp}; pass plan=None to plan on each device")
    return sharded(weights, caches, tokens, block_table, cache_seqlens, plan)

  return jax.jit(step, donate_argnums=1)
