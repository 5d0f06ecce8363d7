"""A textbook (non-absorbed, unpaged) float64 DeepSeek MLA model; its checks.

The other DeepSeek tests import the oracle from here. It expands every head's
key ``[c_kv W_UK_h ; k_pe]`` and value ``c_kv W_UV_h`` and runs a plain
causal softmax over all positions of one sequence; rotations use complex
numbers. Only the rotary frequencies come from the package (their own test
is below); configs must have ``rope_factor > 1`` and ``mscale ==
mscale_all_dim`` (DeepSeek-V3's case), which the oracle assumes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_thundermla.deepseek.config import DeepSeekConfig
from jax_thundermla.deepseek.layer import rope_frequencies


def tiny_config(**overrides) -> DeepSeekConfig:
  """Small dims, YaRN on (factor 4), attention mscale != 1, rope mscale 1."""
  fields = dict(
      vocab_size=64, hidden_size=256, intermediate_size=384, num_layers=2,
      num_heads=8, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
      v_head_dim=32, rope_factor=4.0, original_max_position_embeddings=32,
      mscale=0.8, mscale_all_dim=0.8)
  fields.update(overrides)
  return DeepSeekConfig(**fields)


def jitter_norms(weights, seed: int = 1):
  """Norm weights 1 + 0.2 N(0, 1) instead of 1, so that mixing them up shows."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda w: (w if w.ndim != 1 else jnp.asarray(
          (1 + 0.2 * rng.standard_normal(w.shape)).astype(w.dtype))),
      weights)


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _norm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate(x, positions, config):
  """x [T, ..., 64] rotated pairwise by angle position * frequency."""
  angles = positions[:, None] * rope_frequencies(config)  # [T, 32]
  turn = np.exp(1j * angles)  # config.mscale == config.mscale_all_dim
  turn = turn.reshape(turn.shape[:1] + (1,) * (x.ndim - 2) + turn.shape[1:])
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * turn
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


def textbook_attention(attn, h, config) -> np.ndarray:
  """Causal MLA self-attention of one sequence.

  Args:
    attn: ``AttentionWeights`` (all heads).
    h: [T, hidden] normed hidden states of positions 0 .. T-1.
    config: the model config.

  Returns:
    float64 [T, hidden].
  """
  a = _f64(attn)
  h = np.asarray(h, np.float64)
  t = h.shape[0]
  pos = np.arange(t, dtype=np.float64)
  nope, lora = config.qk_nope_head_dim, config.kv_lora_rank
  q = np.einsum("tr,rhk->thk", _norm(h @ a.w_dq, a.q_norm,
                                     config.rms_norm_eps), a.w_uq)
  q = np.concatenate([q[..., :nope], _rotate(q[..., nope:], pos, config)],
                     axis=-1)  # [T, H, nope + rope]
  kv = h @ a.w_dkv
  c_kv = _norm(kv[:, :lora], a.kv_norm, config.rms_norm_eps)  # [T, lora]
  k_pe = _rotate(kv[:, lora:], pos, config)  # [T, rope]
  k_nope = np.einsum("tc,hnc->thn", c_kv, a.w_uk)
  heads = k_nope.shape[1]
  k = np.concatenate(
      [k_nope, np.broadcast_to(k_pe[:, None], (t, heads, k_pe.shape[-1]))],
      axis=-1)
  v = np.einsum("tc,hcv->thv", c_kv, a.w_uv)
  mscale = 0.1 * config.mscale_all_dim * math.log(config.rope_factor) + 1
  scale = q.shape[-1] ** -0.5 * mscale ** 2  # YaRN with rope_factor > 1
  s = np.einsum("thd,uhd->htu", q, k) * scale
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(axis=-1, keepdims=True))
  p /= p.sum(axis=-1, keepdims=True)
  o = np.einsum("htu,uhv->thv", p, v)
  return np.einsum("thv,hvd->td", o, a.w_o)


def textbook_latents(attn, h, config) -> np.ndarray:
  """[T, kv_lora_rank + 64]: ``[c_kv | k_pe]`` of positions 0 .. T-1."""
  a = _f64(attn)
  h = np.asarray(h, np.float64)
  lora = config.kv_lora_rank
  kv = h @ a.w_dkv
  return np.concatenate(
      [_norm(kv[:, :lora], a.kv_norm, config.rms_norm_eps),
       _rotate(kv[:, lora:], np.arange(h.shape[0], dtype=np.float64),
               config)], axis=-1)


def textbook_logits(weights, tokens, config) -> np.ndarray:
  """float64 [T, vocab]: the model run over one whole sequence at once."""
  w = _f64(weights)
  eps = config.rms_norm_eps
  x = w.embed[np.asarray(tokens)]
  for layer in w.layers:
    x = x + textbook_attention(layer.attn, _norm(x, layer.attn_norm, eps),
                               config)
    h = _norm(x, layer.mlp_norm, eps)
    gate = h @ layer.mlp.w_gate
    x = x + (gate / (1 + np.exp(-gate)) * (h @ layer.mlp.w_up)) @ layer.mlp.w_down
  return _norm(x, w.final_norm, eps) @ w.lm_head


def relative_error(got, want) -> float:
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_rope_frequencies_plain_and_yarn():
  plain = rope_frequencies(tiny_config(rope_factor=1.0))
  np.testing.assert_allclose(plain, 10000.0 ** -(np.arange(32) / 32))
  config = tiny_config(rope_factor=4.0, original_max_position_embeddings=4096)
  yarn = rope_frequencies(config)
  turns = 4096 * plain / (2 * math.pi)  # rotations over the original context
  fast, slow = turns > config.beta_fast, turns < config.beta_slow
  assert fast.any() and slow.any()
  np.testing.assert_allclose(yarn[fast], plain[fast])
  np.testing.assert_allclose(yarn[slow], plain[slow] / 4.0)
  middle = ~fast & ~slow
  assert np.all((yarn[middle] <= plain[middle])
                & (yarn[middle] >= plain[middle] / 4.0))
  assert np.all(np.diff(yarn) < 0)


def test_softmax_scale_is_deepseek_v3s():
  config = DeepSeekConfig()
  mscale = 0.1 * math.log(40.0) + 1.0
  assert config.softmax_scale == pytest.approx(192 ** -0.5 * mscale ** 2)
  assert config.softmax_scale == pytest.approx(0.13523, abs=1e-5)
  assert config.rope_mscale == 1.0
  unscaled = dataclasses.replace(config, rope_factor=1.0)
  assert unscaled.softmax_scale == pytest.approx(192 ** -0.5)
  assert config.latent_dim == 576 and config.qk_head_dim == 192


@pytest.mark.parametrize("field,value,words", [
    ("qk_rope_head_dim", 32, ["qk_rope_head_dim", "64", "32"]),
    ("num_heads", 0, ["num_heads", ">= 1"]),
    ("rope_factor", 0.5, ["rope_factor", ">= 1"]),
    ("beta_slow", 64.0, ["beta_fast", "beta_slow"]),
    ("dtype", "float64", ["dtype", "float64"]),
    ("topk_method", "top2", ["topk_method", "top2"]),
    ("q_lora_rank", 0, ["q_lora_rank", "None"]),
])
def test_config_rejects_bad_fields(field, value, words):
  with pytest.raises(ValueError) as e:
    tiny_config(**{field: value})
  for word in words:
    assert word in str(e.value)
