"""The jitted decode step, unsharded or over a ("dp", "ep", "tp") mesh.

Tensor parallelism ("tp") shards the attention heads, as DeepSeek-R1 is
served 8-way (16 of 128 heads per device): W_UQ's head axis, W_UK, W_UV and
the head rows of W_O, plus the dense MLP's intermediate columns. The
latent caches are replicated over "tp" (every head reads every entry); each
device computes its heads' part of the output projection and a ``psum``
adds the parts. Data parallelism ("dp") splits the batch: tokens, block
tables, lengths and the caches' page axis, so that each dp shard owns
``num_pages / dp`` pages and its block table rows hold local page ids
(``0 .. num_pages / dp - 1``; one ``PageAllocator`` per shard).

Expert parallelism ("ep") splits the routed experts of every MoE layer
(``n_routed_experts / ep`` per device) and, for attention, acts like a
second data axis: the batch and the caches' page axis are split over
``("dp", "ep")`` together, so a batch shard is one (dp, ep) pair. Each MoE
layer gathers its ep group's tokens, applies its local experts and
reduce-scatters the results back (``moe.moe_mlp``). Each expert's
intermediate columns, like the dense MLPs' and the shared experts', are
split over "tp".
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
from jax_thundermla.deepseek.moe import DenseMLP, MoEWeights

DP_AXIS = "dp"
EP_AXIS = "ep"
TP_AXIS = "tp"
AXES = (DP_AXIS, EP_AXIS, TP_AXIS)
BATCH_AXES = (DP_AXIS, EP_AXIS)

DecodeStep = Callable[..., tuple[jax.Array, tuple[jax.Array, ...]]]


def make_mesh(dp: int = 1, tp: int = 1,
              devices: Sequence[jax.Device] | None = None, *,
              ep: int = 1) -> Mesh:
  """A ``(dp, ep, tp)`` mesh with axes ``("dp", "ep", "tp")``.

  Args:
    dp: data-parallel ways.
    tp: tensor-parallel ways; neighbouring devices share a batch shard.
    devices: default ``jax.devices()``; the first ``dp * ep * tp`` are
      used.
    ep: expert-parallel ways (also splits the batch).

  Returns:
    The mesh.

  Raises:
    ValueError: fewer than ``dp * ep * tp`` devices, or a size below 1.
  """
  devices = list(jax.devices() if devices is None else devices)
  if dp < 1 or tp < 1 or ep < 1:
    raise ValueError(
        f"dp and tp must be >= 1, got {dp} and {tp}" if ep >= 1 else
        f"ep must be >= 1, got {ep}")
  n = dp * ep * tp
  if n > len(devices):
    raise ValueError(
        f"dp * ep * tp = {n} devices needed, {len(devices)} available")
  return Mesh(np.array(devices[:n]).reshape(dp, ep, tp), AXES)


def _mlp_specs(mlp) -> DenseMLP | MoEWeights:
  dense = DenseMLP(w_gate=P(None, TP_AXIS), w_up=P(None, TP_AXIS),
                   w_down=P(TP_AXIS))
  if not isinstance(mlp, MoEWeights):
    return dense
  return MoEWeights(
      router=P(), router_bias=P(), w_gate=P(EP_AXIS, None, TP_AXIS),
      w_up=P(EP_AXIS, None, TP_AXIS), w_down=P(EP_AXIS, TP_AXIS),
      shared=None if mlp.shared is None else dense)


def weight_specs(config: DeepSeekConfig) -> ModelWeights:
  """Partition specs of ``ModelWeights`` for the ("dp", "ep", "tp") mesh."""
  from jax_thundermla.deepseek.model import weight_shapes  # pylint: disable=g-import-not-at-top
  lora = config.q_lora_rank is not None
  attn = AttentionWeights(
      w_dq=P() if lora else None, q_norm=P() if lora else None,
      w_uq=P(None, TP_AXIS, None), w_dkv=P(), kv_norm=P(), w_uk=P(TP_AXIS),
      w_uv=P(TP_AXIS), w_o=P(TP_AXIS))
  layers = tuple(
      LayerWeights(attn_norm=P(), attn=attn, mlp_norm=P(),
                   mlp=_mlp_specs(shapes.mlp))
      for shapes in weight_shapes(config).layers)
  return ModelWeights(embed=P(), layers=layers, final_norm=P(), lm_head=P())


def _check_mesh(config: DeepSeekConfig, mesh: Mesh) -> tuple[int, int]:
  """Returns (batch shards, tp) after checking axes and divisibility."""
  if tuple(mesh.axis_names) != AXES:
    raise ValueError(
        f"mesh axes must be {AXES} (see make_mesh), got"
        f" {tuple(mesh.axis_names)}")
  dp, ep, tp = (mesh.shape[a] for a in AXES)
  widths = ["num_heads", "intermediate_size"]
  if config.n_routed_experts:
    widths.append("moe_intermediate_size")
    if config.n_routed_experts % ep:
      raise ValueError(
          f"config.n_routed_experts ({config.n_routed_experts}) must be a"
          f" multiple of the ep mesh size {ep}")
  for name in widths:
    if getattr(config, name) % tp:
      raise ValueError(
          f"config.{name} ({getattr(config, name)}) must be a multiple of"
          f" the tp mesh size {tp}")
  return dp * ep, tp


def shard_weights(weights: ModelWeights, config: DeepSeekConfig,
                  mesh: Mesh) -> ModelWeights:
  """Places the weights on the mesh, heads and MLP columns split over tp."""
  _check_mesh(config, mesh)
  return jax.tree.map(
      lambda w, spec: jax.device_put(w, NamedSharding(mesh, spec)),
      weights, weight_specs(config))


def shard_batch(mesh: Mesh, *arrays: Any) -> tuple[jax.Array, ...]:
  """Places batch-major arrays (tokens, tables, lengths, caches) on the mesh.

  Axis 0 of each array is split over ("dp", "ep") and replicated over
  "tp": the batch axis of tokens, block tables and lengths, the page axis
  of caches.
  """
  sharding = NamedSharding(mesh, P(BATCH_AXES))
  return tuple(jax.tree.map(lambda x: jax.device_put(x, sharding), a)
               for a in arrays)


def make_decode_step(config: DeepSeekConfig,
                     mesh: Mesh | None = None, *,
                     backend: str | None = None) -> DecodeStep:
  """The model's decode step, jitted, caches donated (updated in place).

  Args:
    config: the model config.
    mesh: None for one device; else a ("dp", "ep", "tp") mesh from
      ``make_mesh``. The batch and the caches' page count must divide by
      ``dp * ep``.
    backend: ``mla_decode``'s backend: None (the CUDA kernel on a GPU
      where it applies), ``"cuda"`` or ``"reference"`` (pure JAX).

  Returns:
    ``step(weights, caches, tokens, block_table, cache_seqlens, plan=None)
    -> (logits, caches)`` with the shapes of ``decode_step``. ``caches``
    is donated: use the returned ones. On a mesh, ``block_table`` holds
    each batch shard's local page ids, and ``plan`` (if any) is built for
    the per-device shapes (batch / (dp * ep) sequences, num_heads / tp
    heads) and replicated, so it needs dp * ep == 1.

  Raises:
    ValueError: a mesh with other axes, widths or expert counts that do
      not divide by tp or ep, or an unknown backend; at call time, a plan
      with dp * ep > 1.
  """
  if mesh is None:
    def step(weights, caches, tokens, block_table, cache_seqlens, plan=None):
      return decode_step(weights, caches, tokens, block_table, cache_seqlens,
                         config=config, plan=plan, backend=backend)
    return jax.jit(step, donate_argnums=1)

  dp, _ = _check_mesh(config, mesh)
  specs = weight_specs(config)
  cache_specs = (P(BATCH_AXES),) * config.num_layers
  batch = P(BATCH_AXES)
  ep_axis = EP_AXIS if config.n_routed_experts else None

  def local_step(weights, caches, tokens, block_table, cache_seqlens, plan):
    return decode_step(weights, caches, tokens, block_table, cache_seqlens,
                       config=config, plan=plan, tp_axis=TP_AXIS,
                       ep_axis=ep_axis, backend=backend)

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
          "a host plan is replicated over the mesh and needs dp == 1 (and"
          f" ep == 1), got dp * ep = {dp}; pass plan=None to plan on each"
          " device")
    return sharded(weights, caches, tokens, block_table, cache_seqlens, plan)

  return jax.jit(step, donate_argnums=1)
