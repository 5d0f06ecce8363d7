"""DeepSeek-V3 model dimensions as a frozen, self-validating dataclass."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import jax.numpy as jnp

# mla_decode's keys are [latent | rope] with a rope part of exactly 64.
ROPE_HEAD_DIM = 64
DTYPES = ("bfloat16", "float16")


def yarn_mscale(factor: float, mscale: float) -> float:
  """YaRN's magnitude correction ``0.1 * mscale * ln(factor) + 1``.

  Args:
    factor: context extension factor; 1 or less means no scaling.
    mscale: the coefficient (``mscale`` or ``mscale_all_dim`` of the config).

  Returns:
    The correction, 1.0 when ``factor <= 1``.
  """
  if factor <= 1.0:
    return 1.0
  return 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class DeepSeekConfig:
  """Dimensions of a DeepSeek-V3-style model with MLA attention.

  The defaults are DeepSeek-V3/R1's (its first three layers, the dense ones;
  mixture-of-experts layers are outside this module). Hashable, so it can be
  a static argument of ``jax.jit``.

  Attributes:
    vocab_size: token vocabulary.
    hidden_size: model width.
    intermediate_size: width of the dense SwiGLU MLP.
    num_layers: transformer layers.
    num_heads: attention heads.
    q_lora_rank: rank of the query LoRA (W_DQ: hidden -> q_lora_rank).
    kv_lora_rank: width of the compressed latent c_kv (the value head dim of
      the absorbed attention, ``head_dim_v`` of ``mla_decode``).
    qk_nope_head_dim: per-head query/key width without position encoding.
    qk_rope_head_dim: per-head rotary width, shared key; must be 64.
    v_head_dim: per-head value width.
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: rotary base.
    rope_factor: YaRN context extension factor; 1.0 gives plain RoPE.
    original_max_position_embeddings: YaRN's pre-extension context.
    beta_fast: YaRN: dims rotating at least this many times over the
      original context keep their frequency.
    beta_slow: YaRN: dims rotating at most this many times are interpolated
      by ``rope_factor``.
    mscale: YaRN coefficient of the cos/sin magnitude.
    mscale_all_dim: YaRN coefficient of the attention-scale magnitude.
    dtype: activation, weight and cache dtype, ``"bfloat16"`` or
      ``"float16"``.
  """

  vocab_size: int = 129280
  hidden_size: int = 7168
  intermediate_size: int = 18432
  num_layers: int = 3
  num_heads: int = 128
  q_lora_rank: int = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = ROPE_HEAD_DIM
  v_head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_factor: float = 40.0
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 1.0
  dtype: str = "bfloat16"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_layers", "num_heads", "q_lora_rank", "kv_lora_rank",
                 "qk_nope_head_dim", "v_head_dim",
                 "original_max_position_embeddings"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if self.qk_rope_head_dim != ROPE_HEAD_DIM:
      raise ValueError(
          f"qk_rope_head_dim must be {ROPE_HEAD_DIM} (mla_decode's rope"
          f" width), got {self.qk_rope_head_dim!r}")
    for name in ("rms_norm_eps", "rope_theta", "beta_fast", "beta_slow"):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and math.isfinite(value)
              and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    if not (isinstance(self.rope_factor, (int, float))
            and math.isfinite(self.rope_factor) and self.rope_factor >= 1):
      raise ValueError(
          f"rope_factor must be finite and >= 1 (1 = plain RoPE), got"
          f" {self.rope_factor!r}")
    if self.beta_fast <= self.beta_slow:
      raise ValueError(
          f"beta_fast ({self.beta_fast}) must exceed beta_slow"
          f" ({self.beta_slow})")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

  @property
  def qk_head_dim(self) -> int:
    """Per-head query width before absorption: nope + rope (192)."""
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def latent_dim(self) -> int:
    """Width of one cache entry: c_kv then k_pe (576)."""
    return self.kv_lora_rank + self.qk_rope_head_dim

  @property
  def jnp_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def rope_mscale(self) -> float:
    """Magnitude applied to RoPE's cos and sin (1.0 for DeepSeek-V3)."""
    return (yarn_mscale(self.rope_factor, self.mscale)
            / yarn_mscale(self.rope_factor, self.mscale_all_dim))

  @property
  def softmax_scale(self) -> float:
    """``qk_head_dim ** -0.5`` times the square of YaRN's attention mscale.

    Scores of the absorbed form equal the textbook ones, so the scale is the
    textbook ``1/sqrt(192)``-based one, never ``latent_dim ** -0.5``.
    """
    m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
    return self.qk_head_dim ** -0.5 * m * m

  @classmethod
  def from_hf(cls, hf_config: Mapping[str, Any] | str | os.PathLike,
              *, num_layers: int | None = None,
              dtype: str = "bfloat16") -> "DeepSeekConfig":
    """Reads a Hugging Face DeepSeek-V3 ``config.json``.

    Args:
      hf_config: the parsed JSON, or the path of the file or of its folder.
      num_layers: layers to keep; default: the dense ones
        (``first_k_dense_replace`` when the model has routed experts, all
        layers otherwise).
      dtype: activation, weight and cache dtype.

    Returns:
      The config.

    Raises:
      ValueError: a missing key, a model without query LoRA, a rope
        scaling other than YaRN, or ``num_layers`` past the dense layers.
    """
    if not isinstance(hf_config, Mapping):
      path = os.fspath(hf_config)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      with open(path, encoding="utf-8") as f:
        hf_config = json.load(f)
    try:
      total = int(hf_config["num_hidden_layers"])
      q_lora_rank = hf_config["q_lora_rank"]
      dense = (int(hf_config.get("first_k_dense_replace", total))
               if hf_config.get("n_routed_experts") else total)
      fields = dict(
          vocab_size=int(hf_config["vocab_size"]),
          hidden_size=int(hf_config["hidden_size"]),
          intermediate_size=int(hf_config["intermediate_size"]),
          num_heads=int(hf_config["num_attention_heads"]),
          kv_lora_rank=int(hf_config["kv_lora_rank"]),
          qk_nope_head_dim=int(hf_config["qk_nope_head_dim"]),
          qk_rope_head_dim=int(hf_config["qk_rope_head_dim"]),
          v_head_dim=int(hf_config["v_head_dim"]),
          rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
          rope_theta=float(hf_config.get("rope_theta", 10000.0)))
    except KeyError as e:
      raise ValueError(f"config.json lacks the key {e.args[0]!r}") from None
    if q_lora_rank is None:
      raise ValueError(
          "config.json has q_lora_rank null (a model without query LoRA);"
          " this layer needs q_a_proj/q_b_proj")
    fields["q_lora_rank"] = int(q_lora_rank)
    scaling = hf_config.get("rope_scaling") or {}
    if scaling:
      kind = scaling.get("type", scaling.get("rope_type"))
      if kind != "yarn":
        raise ValueError(f"rope_scaling type must be 'yarn', got {kind!r}")
      fields.update(
          rope_factor=float(scaling["factor"]),
          original_max_position_embeddings=int(
              scaling["original_max_position_embeddings"]),
          beta_fast=float(scaling.get("beta_fast", 32)),
          beta_slow=float(scaling.get("beta_slow", 1)),
          mscale=float(scaling.get("mscale", 1)),
          mscale_all_dim=float(scaling.get("mscale_all_dim", 0)))
    else:
      fields["rope_factor"] = 1.0
    if num_layers is None:
      num_layers = dense
    if num_layers > dense:
      raise ValueError(
          f"num_layers must be <= {dense} (the layers with a dense MLP), got"
          f" {num_layers}")
    return cls(num_layers=num_layers, dtype=dtype, **fields)
