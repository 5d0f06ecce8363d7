"""DeepSeek-V2/V3 model dimensions as a frozen, self-validating dataclass.

``DeepSeekConfig.from_hf`` (in ``hf_config``) reads Hugging Face
``config.json`` files of both layouts into it.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jax_thundermla import fp8_cache
from jax_thundermla.deepseek import hf_config as hf
from jax_thundermla.deepseek.cache import FP8

# mla_decode's keys are [latent | rope] with a rope part of exactly 64.
ROPE_HEAD_DIM = 64
# bfloat16/float16 run mla_decode (the CUDA kernel on a GPU); float32 runs
# the pure-JAX attention with float32 matmuls (parity checks).
DTYPES = ("bfloat16", "float16", "float32")
# The KV cache's storage: "auto" in the model's dtype, FP8 in FlashMLA's
# quantized layout (uint8, 656 bytes a token; kv_lora_rank 512 only).
KV_CACHE_DTYPES = ("auto", FP8)
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
# Norm epsilon of the query and key-value latents (q_a_layernorm and
# kv_a_layernorm): fixed in DeepSeek's code, not read from the config.
LATENT_NORM_EPS = 1e-6


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


def _positive_int(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, int) and value >= 1


@dataclasses.dataclass(frozen=True)
class DeepSeekConfig:
  """Dimensions of a DeepSeek-V2/V3-style model with MLA attention.

  The defaults are DeepSeek-V3/R1's, cut to its first three layers (the
  dense ones). Hashable, so it can be a static argument of ``jax.jit``.
  Layer i has a mixture-of-experts MLP when ``n_routed_experts > 0``,
  ``i >= first_k_dense_replace`` and ``i % moe_layer_freq == 0``, a dense
  SwiGLU MLP otherwise.

  Attributes:
    vocab_size: token vocabulary.
    hidden_size: model width.
    intermediate_size: width of the dense SwiGLU MLP.
    num_layers: transformer layers.
    num_heads: attention heads.
    q_lora_rank: rank of the query LoRA (W_DQ: hidden -> q_lora_rank), or
      None for a model without query compression (DeepSeek-V2-Lite: one
      W_Q: hidden -> heads x (nope + rope)).
    kv_lora_rank: width of the compressed latent c_kv (the value head dim of
      the absorbed attention, ``head_dim_v`` of ``mla_decode``).
    qk_nope_head_dim: per-head query/key width without position encoding.
    qk_rope_head_dim: per-head rotary width, shared key; must be 64.
    v_head_dim: per-head value width.
    rms_norm_eps: epsilon of the layer and final RMSNorms (the latent norms
      use ``LATENT_NORM_EPS``).
    rope_theta: rotary base.
    rope_interleave: True: the rotary dims rotate as adjacent pairs
      ``(x[2i], x[2i+1])`` (DeepSeek's layout); False: as halves
      ``(x[i], x[i + 32])``.
    rope_factor: YaRN context extension factor; 1.0 gives plain RoPE.
    original_max_position_embeddings: YaRN's pre-extension context.
    beta_fast: YaRN: dims rotating at least this many times over the
      original context keep their frequency.
    beta_slow: YaRN: dims rotating at most this many times are interpolated
      by ``rope_factor``.
    rope_truncate: YaRN: round the ramp's ends to whole dims.
    mscale: YaRN coefficient of the cos/sin magnitude.
    mscale_all_dim: YaRN coefficient of the attention-scale magnitude (0:
      none).
    rope_attention_factor: the cos/sin magnitude itself, or None to derive
      it from ``mscale`` and ``mscale_all_dim``.
    n_routed_experts: routed experts per MoE layer; 0: dense layers only.
    n_shared_experts: shared experts (one SwiGLU of ``n_shared_experts *
      moe_intermediate_size`` columns) added to every MoE layer's output.
    moe_intermediate_size: width of one expert.
    num_experts_per_tok: routed experts per token (top-k).
    first_k_dense_replace: the first layers that stay dense.
    moe_layer_freq: after those, every this-many-th layer is MoE.
    scoring_func: expert scores from the router logits, ``"softmax"``
      (DeepSeek-V2) or ``"sigmoid"`` (V3).
    topk_method: ``"greedy"`` (top-k of all scores), ``"group_limited_greedy"``
      (V2: top-k within the ``topk_group`` groups of highest maximum
      score) or ``"noaux_tc"`` (V3: scores plus ``e_score_correction_bias``
      choose; groups ranked by the sum of their two best; the weights are
      the unbiased scores).
    n_group: expert groups (grouped methods).
    topk_group: groups a token may use (grouped methods).
    norm_topk_prob: divide the k weights by their sum.
    routed_scaling_factor: factor on the routed experts' weights.
    dtype: activation, weight and cache dtype: ``"bfloat16"``,
      ``"float16"`` or ``"float32"`` (pure-JAX attention, float32 matmuls at
      full precision: for parity checks).
    kv_cache_dtype: ``"auto"`` (the cache in ``dtype``) or ``"fp8"``: the
      latent cache in FlashMLA's FP8 layout (uint8 ``[num_pages, page_size,
      1, 656]``: e4m3 latent values with one float32 power-of-two scale per
      128, bf16 rope; ``jax_thundermla.quantize_kv``), half the bytes of
      bf16. New entries are quantized as they are appended and attention
      reads them dequantized (on the reference backend for now: the CUDA
      kernel does not take FP8 caches yet). Needs ``kv_lora_rank == 512``.
  """

  vocab_size: int = 129280
  hidden_size: int = 7168
  intermediate_size: int = 18432
  num_layers: int = 3
  num_heads: int = 128
  q_lora_rank: int | None = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = ROPE_HEAD_DIM
  v_head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_interleave: bool = True
  rope_factor: float = 40.0
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  rope_truncate: bool = True
  mscale: float = 1.0
  mscale_all_dim: float = 1.0
  rope_attention_factor: float | None = None
  n_routed_experts: int = 256
  n_shared_experts: int = 1
  moe_intermediate_size: int = 2048
  num_experts_per_tok: int = 8
  first_k_dense_replace: int = 3
  moe_layer_freq: int = 1
  scoring_func: str = "sigmoid"
  topk_method: str = "noaux_tc"
  n_group: int = 8
  topk_group: int = 4
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 2.5
  dtype: str = "bfloat16"
  kv_cache_dtype: str = "auto"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_layers", "num_heads", "kv_lora_rank",
                 "qk_nope_head_dim", "v_head_dim",
                 "original_max_position_embeddings", "moe_layer_freq",
                 "moe_intermediate_size", "num_experts_per_tok", "n_group",
                 "topk_group"):
      value = getattr(self, name)
      if not _positive_int(value):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if self.q_lora_rank is not None and not _positive_int(self.q_lora_rank):
      raise ValueError(
          f"q_lora_rank must be None or an int >= 1, got {self.q_lora_rank!r}")
    for name in ("n_routed_experts", "n_shared_experts",
                 "first_k_dense_replace"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if self.qk_rope_head_dim != ROPE_HEAD_DIM:
      raise ValueError(
          f"qk_rope_head_dim must be {ROPE_HEAD_DIM} (mla_decode's rope"
          f" width), got {self.qk_rope_head_dim!r}")
    for name in ("rms_norm_eps", "rope_theta", "beta_fast", "beta_slow",
                 "routed_scaling_factor"):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and math.isfinite(value)
              and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    for name in ("mscale", "mscale_all_dim"):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and math.isfinite(value)
              and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    if self.rope_attention_factor is not None and not (
        isinstance(self.rope_attention_factor, (int, float))
        and math.isfinite(self.rope_attention_factor)
        and self.rope_attention_factor > 0):
      raise ValueError(
          f"rope_attention_factor must be None or finite and > 0, got"
          f" {self.rope_attention_factor!r}")
    if not (isinstance(self.rope_factor, (int, float))
            and math.isfinite(self.rope_factor) and self.rope_factor >= 1):
      raise ValueError(
          f"rope_factor must be finite and >= 1 (1 = plain RoPE), got"
          f" {self.rope_factor!r}")
    if self.beta_fast <= self.beta_slow:
      raise ValueError(
          f"beta_fast ({self.beta_fast}) must exceed beta_slow"
          f" ({self.beta_slow})")
    for name in ("rope_interleave", "rope_truncate", "norm_topk_prob"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(
            f"{name} must be a bool, got {getattr(self, name)!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.kv_cache_dtype not in KV_CACHE_DTYPES:
      raise ValueError(
          f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got"
          f" {self.kv_cache_dtype!r}")
    if self.fp8_cache and self.kv_lora_rank != fp8_cache.LATENT_DIM:
      raise ValueError(
          f"kv_cache_dtype {FP8!r} (FlashMLA's layout) needs kv_lora_rank"
          f" == {fp8_cache.LATENT_DIM}, got {self.kv_lora_rank}")
    if self.scoring_func not in SCORING_FUNCS:
      raise ValueError(
          f"scoring_func must be one of {SCORING_FUNCS}, got"
          f" {self.scoring_func!r}")
    if self.topk_method not in TOPK_METHODS:
      raise ValueError(
          f"topk_method must be one of {TOPK_METHODS}, got"
          f" {self.topk_method!r}")
    if self.n_routed_experts:
      self._check_routing()

  def _check_routing(self) -> None:
    experts, k = self.n_routed_experts, self.num_experts_per_tok
    if k > experts:
      raise ValueError(
          f"num_experts_per_tok ({k}) must be <= n_routed_experts"
          f" ({experts})")
    if self.topk_method == "greedy":
      return
    if experts % self.n_group:
      raise ValueError(
          f"n_routed_experts ({experts}) must be a multiple of n_group"
          f" ({self.n_group}) for topk_method {self.topk_method!r}")
    if self.topk_group > self.n_group:
      raise ValueError(
          f"topk_group ({self.topk_group}) must be <= n_group"
          f" ({self.n_group})")
    if k > self.topk_group * (experts // self.n_group):
      raise ValueError(
          f"num_experts_per_tok ({k}) must be <= the experts of topk_group"
          f" groups ({self.topk_group * (experts // self.n_group)})")
    if self.topk_method == "noaux_tc" and experts // self.n_group < 2:
      raise ValueError(
          "topk_method 'noaux_tc' ranks a group by its two best experts:"
          f" n_routed_experts / n_group must be >= 2, got"
          f" {experts // self.n_group}")

  def is_moe_layer(self, i: int) -> bool:
    """Whether layer i has a mixture-of-experts MLP."""
    return (self.n_routed_experts > 0 and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0)

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
  def fp8_cache(self) -> bool:
    """Whether the caches are FP8 (``kv_cache_dtype == "fp8"``)."""
    return self.kv_cache_dtype == FP8

  @property
  def cache_dtype(self) -> jnp.dtype:
    """The cache arrays' dtype: uint8 for FP8, else ``dtype``'s."""
    return jnp.dtype(fp8_cache.CACHE_DTYPE if self.fp8_cache
                     else self.jnp_dtype)

  @property
  def cache_width(self) -> int:
    """The cache arrays' last dim: 656 bytes for FP8, else latent_dim."""
    return fp8_cache.ENTRY_BYTES if self.fp8_cache else self.latent_dim

  @property
  def rope_mscale(self) -> float:
    """Magnitude applied to RoPE's cos and sin (1.0 for DeepSeek-V3).

    ``rope_attention_factor`` when set; else, with both ``mscale`` and
    ``mscale_all_dim`` non-zero, the ratio of their YaRN corrections; else
    YaRN's correction with coefficient 1 (as Hugging Face computes it).
    """
    if self.rope_factor <= 1.0:
      return 1.0
    if self.rope_attention_factor is not None:
      return float(self.rope_attention_factor)
    if self.mscale and self.mscale_all_dim:
      return (yarn_mscale(self.rope_factor, self.mscale)
              / yarn_mscale(self.rope_factor, self.mscale_all_dim))
    return yarn_mscale(self.rope_factor, 1.0)

  @property
  def softmax_scale(self) -> float:
    """``qk_head_dim ** -0.5`` times the square of YaRN's attention mscale.

    Scores of the absorbed form equal the textbook ones, so the scale is the
    textbook ``1/sqrt(192)``-based one, never ``latent_dim ** -0.5``.
    """
    m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
    return self.qk_head_dim ** -0.5 * m * m

  @classmethod
  def from_hf(cls, hf_config, *, num_layers: int | None = None,
              dtype: str = "bfloat16",
              kv_cache_dtype: str = "auto") -> "DeepSeekConfig":
    """Reads a Hugging Face DeepSeek-V2/V3 ``config.json``; see
    ``jax_thundermla.deepseek.hf_config.config_fields``."""
    return cls(dtype=dtype, kv_cache_dtype=kv_cache_dtype,
               **hf.config_fields(hf_config, num_layers=num_layers))
