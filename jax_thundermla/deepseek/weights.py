"""Loads DeepSeek-V3 weights from a Hugging Face safetensors checkpoint.

Hugging Face names and torch ``Linear`` weights (``[out, in]``) map onto
``ModelWeights`` (``[in, ..., out]``, heads explicit); ``h`` heads, ``L``
= ``model.layers.{i}.``:

- ``model.embed_tokens.weight`` [vocab, hidden] -> ``embed``.
- ``L input_layernorm``, ``L post_attention_layernorm`` -> ``attn_norm``,
  ``mlp_norm``.
- ``L self_attn.q_a_proj`` [q_lora, hidden] -> ``attn.w_dq``;
  ``q_a_layernorm`` -> ``attn.q_norm``.
- ``L self_attn.q_b_proj`` [h * (nope + rope), q_lora] -> ``attn.w_uq``
  [q_lora, h, nope + rope].
- ``L self_attn.kv_a_proj_with_mqa`` [kv_lora + rope, hidden] ->
  ``attn.w_dkv`` (c_kv then k_pe); ``kv_a_layernorm`` -> ``attn.kv_norm``.
- ``L self_attn.kv_b_proj`` [h * (nope + v), kv_lora]: per head, rows
  ``:nope`` -> ``attn.w_uk`` [h, nope, kv_lora], rows ``nope:`` ->
  ``attn.w_uv`` [h, kv_lora, v].
- ``L self_attn.o_proj`` [hidden, h * v] -> ``attn.w_o`` [h, v, hidden].
- ``L mlp.gate_proj``, ``up_proj``, ``down_proj`` -> ``w_gate``, ``w_up``,
  ``w_down``.
- ``model.norm.weight`` -> ``final_norm``; ``lm_head.weight``
  [vocab, hidden] -> ``lm_head``.

Only layers with a dense MLP load (DeepSeek-V3's first three); tensors must
be bfloat16, float16 or float32 (an FP8 release is converted to bfloat16
first). Reading needs the optional ``safetensors`` package.
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


def _layer(get: Getter, config: DeepSeekConfig, i: int) -> LayerWeights:
  """Layer i as numpy arrays in ModelWeights' layout."""
  c = config
  h, nope, v = c.num_heads, c.qk_nope_head_dim, c.v_head_dim
  p = f"model.layers.{i}."
  a = p + "self_attn."
  if _has(get, p + "mlp.gate.weight"):
    raise ValueError(
        f"layer {i} has a mixture-of-experts MLP; only dense layers load"
        f" (config.num_layers must stop before it)")

  def linear(name, out_dim, in_dim):  # torch [out, in] -> [in, out]
    return _fetch(get, name, (out_dim, in_dim)).T

  kv_b = _fetch(get, a + "kv_b_proj.weight",
                (h * (nope + v), c.kv_lora_rank)).reshape(h, nope + v, -1)
  attn = AttentionWeights(
      w_dq=linear(a + "q_a_proj.weight", c.q_lora_rank, c.hidden_size),
      q_norm=_fetch(get, a + "q_a_layernorm.weight", (c.q_lora_rank,)),
      w_uq=linear(a + "q_b_proj.weight", h * c.qk_head_dim,
                  c.q_lora_rank).reshape(c.q_lora_rank, h, c.qk_head_dim),
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
      w_gate=linear(p + "mlp.gate_proj.weight", c.intermediate_size,
                    c.hidden_size),
      w_up=linear(p + "mlp.up_proj.weight", c.intermediate_size,
                  c.hidden_size),
      w_down=linear(p + "mlp.down_proj.weight", c.hidden_size,
                    c.intermediate_size))


def _has(get: Getter, name: str) -> bool:
  try:
    get(name)
  except KeyError:
    return False
  return True


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
    ValueError: a missing tensor, a wrong shape (both named), or a
      mixture-of-experts layer within ``config.num_layers``.
  """
  get = tensors.__getitem__ if isinstance(tensors, Mapping) else tensors
  c = config

  def to_jax(x: np.ndarray) -> jax.Array:
    return jnp.asarray(np.ascontiguousarray(x), c.jnp_dtype)

  layers = tuple(jax.tree.map(to_jax, _layer(get, c, i))
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
  """Reads a Hugging Face DeepSeek-V3 checkpoint.

  Args:
    path: a folder with ``config.json`` and ``*.safetensors`` files (all
      shards are searched), or one ``.safetensors`` file.
    config: the model config; default read from the folder's
      ``config.json`` with its dense layers (``DeepSeekConfig.from_hf``).

  Returns:
    ``(config, weights)``.

  Raises:
    ImportError: ``safetensors`` is not installed.
    ValueError: no safetensors file, a tensor of another dtype, or any
      error of ``weights_from_hf``.
  """
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
