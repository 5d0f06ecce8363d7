"""Loads DeepSeek-V2/V3 weights from a Hugging Face safetensors checkpoint.

Hugging Face names and torch ``Linear`` weights (``[out, in]``) map onto
``ModelWeights`` (``[in, ..., out]``, heads explicit); ``h`` heads, ``L``
= ``model.layers.{i}.``:

- ``model.embed_tokens.weight`` [vocab, hidden] -> ``embed``.
- ``L input_layernorm``, ``L post_attention_layernorm`` -> ``attn_norm``,
  ``mlp_norm``.
- ``L self_attn.q_a_proj`` [q_lora, hidden] -> ``attn.w_dq``;
  ``q_a_layernorm`` -> ``attn.q_norm``.
- ``L self_attn.q_b_proj`` [h * (nope + rope), q_lora] -> ``attn.w_uq``
  [q_lora, h, nope + rope]; without query LoRA, ``L self_attn.q_proj``
  [h * (nope + rope), hidden] -> ``attn.w_uq`` [hidden, h, nope + rope].
- ``L self_attn.kv_a_proj_with_mqa`` [kv_lora + rope, hidden] ->
  ``attn.w_dkv`` (c_kv then k_pe); ``kv_a_layernorm`` -> ``attn.kv_norm``.
- ``L self_attn.kv_b_proj`` [h * (nope + v), kv_lora]: per head, rows
  ``:nope`` -> ``attn.w_uk`` [h, nope, kv_lora], rows ``nope:`` ->
  ``attn.w_uv`` [h, kv_lora, v].
- ``L self_attn.o_proj`` [hidden, h * v] -> ``attn.w_o`` [h, v, hidden].
- Dense layers: ``L mlp.gate_proj``, ``up_proj``, ``down_proj`` ->
  ``mlp.w_gate``, ``mlp.w_up``, ``mlp.w_down``.
- MoE layers: ``L mlp.gate.weight`` [E, hidden] -> ``mlp.router``
  [hidden, E] (float32); ``L mlp.gate.e_score_correction_bias`` [E] ->
  ``mlp.router_bias`` (``noaux_tc`` routing only; zeros otherwise);
  ``L mlp.experts.{j}.gate_proj/up_proj/down_proj`` -> expert j of
  ``mlp.w_gate``, ``mlp.w_up``, ``mlp.w_down`` (or transformers' fused
  ``L mlp.experts.gate_up_proj`` [E, 2I, hidden] and
  ``L mlp.experts.down_proj`` [E, hidden, I]);
  ``L mlp.shared_experts.*_proj`` -> ``mlp.shared``.
- ``model.norm.weight`` -> ``final_norm``; ``lm_head.weight``
  [vocab, hidden] -> ``lm_head``.

Tensors must be bfloat16, float16 or float32 (an FP8 release is converted
to bfloat16 first). Reading needs the optional ``safetensors`` package.
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_thundermla.deepseek.config import DeepSeekConfig
from jax_thundermla.deepseek.layer import AttentionWeights
from jax_thundermla.deepseek.model import LayerWeights, ModelWeights
from jax_thundermla.deepseek.moe import DenseMLP, MoEWeights

Getter = Callable[[str], np.ndarray]
READABLE_DTYPES = ("BF16", "F16", "F32")


def _fetch(get: Getter, name: str, shape: tuple[int, ...]) -> np.ndarray:
  try:
    x = get(name)
  except KeyError:
    raise ValueError(f"the checkpoint lacks the tensor {name!r}") from None
  if tuple(x.shape) != shape:
    raise ValueError(
        f"tensor {name!r} must have shape {shape}, got {tuple(x.shape)}")
  return x


def _linear(get: Getter, name: str, out_dim: int, in_dim: int
            ) -> np.ndarray:
  """A torch ``[out, in]`` weight as ``[in, out]``."""
  return _fetch(get, name, (out_dim, in_dim)).T


def _dense(get: Getter, prefix: str, hidden: int, width: int) -> DenseMLP:
  return DenseMLP(
      w_gate=_linear(get, prefix + "gate_proj.weight", width, hidden),
      w_up=_linear(get, prefix + "up_proj.weight", width, hidden),
      w_down=_linear(get, prefix + "down_proj.weight", hidden, width))


def _experts(get: Getter, prefix: str, config: DeepSeekConfig
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Routed experts stacked: gate, up [E, hidden, I], down [E, I, hidden]."""
  e, d, i = (config.n_routed_experts, config.hidden_size,
             config.moe_intermediate_size)
  if _has(get, prefix + "gate_up_proj"):
    gate_up = _fetch(get, prefix + "gate_up_proj", (e, 2 * i, d))
    down = _fetch(get, prefix + "down_proj", (e, d, i))
    return (gate_up[:, :i].transpose(0, 2, 1),
            gate_up[:, i:].transpose(0, 2, 1), down.transpose(0, 2, 1))
  per_expert = [_dense(get, f"{prefix}{j}.", d, i) for j in range(e)]
  return tuple(np.stack([getattr(m, f) for m in per_expert])
               for f in ("w_gate", "w_up", "w_down"))


def _moe(get: Getter, prefix: str, config: DeepSeekConfig) -> MoEWeights:
  c = config
  router = _linear(get, prefix + "gate.weight", c.n_routed_experts,
                   c.hidden_size).astype(np.float32)
  if c.topk_method == "noaux_tc":
    bias = _fetch(get, prefix + "gate.e_score_correction_bias",
                  (c.n_routed_experts,)).astype(np.float32)
  else:
    bias = np.zeros((c.n_routed_experts,), np.float32)
  w_gate, w_up, w_down = _experts(get, prefix + "experts.", c)
  shared = (_dense(get, prefix + "shared_experts.", c.hidden_size,
                   c.n_shared_experts * c.moe_intermediate_size)
            if c.n_shared_experts else None)
  return MoEWeights(router=router, router_bias=bias, w_gate=w_gate,
                    w_up=w_up, w_down=w_down, shared=shared)


def _layer(get: Getter, config: DeepSeekConfig, i: int) -> LayerWeights:
  """Layer i as numpy arrays in ModelWeights' layout."""
  c = config
  h, nope, v = c.num_heads, c.qk_nope_head_dim, c.v_head_dim
  p = f"model.layers.{i}."
  a = p + "self_attn."
  moe = _has(get, p + "mlp.gate.weight")
  if moe != c.is_moe_layer(i):
    raise ValueError(
        f"layer {i} has a {'mixture-of-experts' if moe else 'dense'} MLP in"
        f" the checkpoint, the config says"
        f" {'mixture-of-experts' if c.is_moe_layer(i) else 'dense'}")

  def linear(name, out_dim, in_dim):
    return _linear(get, name, out_dim, in_dim)

  kv_b = _fetch(get, a + "kv_b_proj.weight",
                (h * (nope + v), c.kv_lora_rank)).reshape(h, nope + v, -1)
  if c.q_lora_rank is None:
    query = dict(w_dq=None, q_norm=None,
                 w_uq=linear(a + "q_proj.weight", h * c.qk_head_dim,
                             c.hidden_size).reshape(c.hidden_size, h, -1))
  else:
    query = dict(
        w_dq=linear(a + "q_a_proj.weight", c.q_lora_rank, c.hidden_size),
        q_norm=_fetch(get, a + "q_a_layernorm.weight", (c.q_lora_rank,)),
        w_uq=linear(a + "q_b_proj.weight", h * c.qk_head_dim,
                    c.q_lora_rank).reshape(c.q_lora_rank, h, -1))
  attn = AttentionWeights(
      **query,
      w_dkv=linear(a + "kv_a_proj_with_mqa.weight", c.latent_dim,
                   c.hidden_size),
      kv_norm=_fetch(get, a + "kv_a_layernorm.weight", (c.kv_lora_rank,)),
      w_uk=kv_b[:, :nope, :],
      w_uv=kv_b[:, nope:, :].transpose(0, 2, 1),
      w_o=linear(a + "o_proj.weight", c.hidden_size,
                 h * v).reshape(h, v, c.hidden_size))
  return LayerWeights(
      attn_norm=_fetch(get, p + "input_layernorm.weight", (c.hidden_size,)),
      attn=attn,
      mlp_norm=_fetch(get, p + "post_attention_layernorm.weight",
                      (c.hidden_size,)),
      mlp=(_moe(get, p + "mlp.", c) if moe else
           _dense(get, p + "mlp.", c.hidden_size, c.intermediate_size)))


def _has(get: Getter, name: str) -> bool:
  try:
    get(name)
  except KeyError:
    return False
  return True


def _to_model_dtype(layer: LayerWeights, config: DeepSeekConfig
                    ) -> LayerWeights:
  """numpy -> jax in the config's dtype; MoE routers stay float32."""
  def to_jax(x, dtype=config.jnp_dtype):
    return jnp.asarray(np.ascontiguousarray(x), dtype)

  out = jax.tree.map(to_jax, layer)
  if isinstance(layer.mlp, MoEWeights):
    out = out._replace(mlp=out.mlp._replace(
        router=to_jax(layer.mlp.router, jnp.float32),
        router_bias=to_jax(layer.mlp.router_bias, jnp.float32)))
  return out


def weights_from_hf(tensors: Mapping[str, np.ndarray] | Getter,
                    config: DeepSeekConfig) -> ModelWeights:
  """Builds ``ModelWeights`` from Hugging Face-named tensors.

  Args:
    tensors: name -> array (``[out, in]`` for linear layers), as a mapping
      or a function that raises ``KeyError`` for unknown names.
    config: the model config; its first ``num_layers`` layers load.

  Returns:
    ``ModelWeights`` in ``config.dtype``.

  Raises:
    ValueError: a missing tensor, a wrong shape (both named), or a layer
      whose MLP kind (dense or MoE) is not the config's.
  """
  get = tensors.__getitem__ if isinstance(tensors, Mapping) else tensors
  c = config

  def to_jax(x: np.ndarray) -> jax.Array:
    return jnp.asarray(np.ascontiguousarray(x), c.jnp_dtype)

  layers = tuple(_to_model_dtype(_layer(get, c, i), c)
                 for i in range(c.num_layers))
  return ModelWeights(
      embed=to_jax(_fetch(get, "model.embed_tokens.weight",
                          (c.vocab_size, c.hidden_size))),
      layers=layers,
      final_norm=to_jax(_fetch(get, "model.norm.weight", (c.hidden_size,))),
      lm_head=to_jax(_fetch(get, "lm_head.weight",
                            (c.vocab_size, c.hidden_size)).T))


def load_hf_checkpoint(path: str | os.PathLike,
                       config: DeepSeekConfig | None = None
                       ) -> tuple[DeepSeekConfig, ModelWeights]:
  """Reads a Hugging Face DeepSeek-V2 or DeepSeek-V3 checkpoint.

  Args:
    path: a folder with ``config.json`` and ``*.safetensors`` files (all
      shards are searched), or one ``.safetensors`` file.
    config: the model config; default read from the folder's
      ``config.json``, all layers (``DeepSeekConfig.from_hf``).

  Returns:
    ``(config, weights)``.

  Raises:
    FileNotFoundError: ``path`` does not exist (or a folder without
      ``config.json`` and no ``config`` given).
    ImportError: ``safetensors`` is not installed.
    ValueError: no safetensors file, a tensor of another dtype, or any
      error of ``weights_from_hf``.
  """
  if not os.path.exists(os.fspath(path)):
    raise FileNotFoundError(
        f"path: no checkpoint folder or .safetensors file at"
        f" {os.fspath(path)!r}")
  try:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "loading checkpoints needs the safetensors package: pip install"
        " safetensors") from e
  path = os.fspath(path)
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if config is None:
      config = DeepSeekConfig.from_hf(path)
  else:
    files = [path]
    if config is None:
      raise ValueError(
          "config is required when path is a single file (no config.json)")
  if not files:
    raise ValueError(f"no .safetensors file in {path!r}")

  with contextlib.ExitStack() as stack:
    handles = [stack.enter_context(safe_open(f, framework="numpy"))
               for f in files]
    where = {name: h for h in handles for name in h.keys()}

    def get(name: str) -> np.ndarray:
      handle = where[name]
      dtype = handle.get_slice(name).get_dtype()
      if dtype not in READABLE_DTYPES:
        raise ValueError(
            f"tensor {name!r} is {dtype}; only {READABLE_DTYPES} load"
            f" (convert FP8 checkpoints to bfloat16 first)")
      return handle.get_tensor(name)

    return config, weights_from_hf(get, config)
