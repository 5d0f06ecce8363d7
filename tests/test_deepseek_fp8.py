"""The DeepSeek paged cache in FP8: config, init, append, end-to-end decode."""

from __future__ import annotations

import dataclasses
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_thundermla as tmla
from jax_thundermla import deepseek
from jax_thundermla.deepseek import cache as cache_lib

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "benchmarks"))
import fp8_accuracy  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_config_flag():
  config = fp8_accuracy.tiny_deepseek(kv_cache_dtype="fp8")
  assert config.fp8_cache and config.cache_width == 656
  assert config.cache_dtype == jnp.uint8
  plain = fp8_accuracy.tiny_deepseek()
  assert not plain.fp8_cache and plain.cache_width == 576
  assert plain.cache_dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="kv_cache_dtype.*'auto'.*int8"):
    fp8_accuracy.tiny_deepseek(kv_cache_dtype="int8")
  with pytest.raises(ValueError, match="kv_lora_rank == 512, got 64"):
    fp8_accuracy.tiny_deepseek(kv_cache_dtype="fp8", kv_lora_rank=64)


def test_init_caches():
  config = fp8_accuracy.tiny_deepseek(kv_cache_dtype="fp8", num_layers=2)
  caches = deepseek.init_caches(config, 3, 16, fill=float("nan"))
  assert len(caches) == 2
  for c in caches:
    assert c.shape == (3, 16, 1, 656) and c.dtype == jnp.uint8
    assert np.isnan(np.asarray(tmla.dequantize_kv(c, jnp.float32))).all()
  zero = deepseek.init_cache(2, 16, 576, "fp8")
  np.testing.assert_array_equal(
      np.asarray(zero), np.broadcast_to(
          np.asarray(tmla.quantize_kv(jnp.zeros(576, jnp.bfloat16))),
          (2, 16, 1, 656)))
  with pytest.raises(ValueError, match="576.*got latent_dim 96"):
    deepseek.init_cache(2, 16, 96, "fp8")


@pytest.mark.parametrize("append", [deepseek.append_latent,
                                    jax.jit(deepseek.append_latent),
                                    deepseek.append_latent_jit])
def test_append_quantizes_into_the_right_slots(append):
  rng = np.random.default_rng(0)
  num_pages, page = 6, 16
  cache = deepseek.init_cache(num_pages, page, 576, "fp8", fill=1.0)
  before = np.asarray(cache).copy()
  entries = jnp.asarray(rng.standard_normal((3, 2, 576)), jnp.bfloat16)
  table = np.array([[4, 1], [0, 6], [2, 3]], np.int32)  # 6: out of range
  lens = np.array([17, 2, 40], np.int32)  # sequence 2: past its table
  got = np.asarray(append(cache, entries, jnp.asarray(table),
                          jnp.asarray(lens)))
  want = before.copy()
  rows = np.asarray(tmla.quantize_kv(entries))
  for b in range(2):
    for i in range(2):
      pos = lens[b] - 2 + i
      want[table[b, pos // page], pos % page, 0] = rows[b, i]
  np.testing.assert_array_equal(got, want)


def test_append_names_bad_shapes():
  cache = deepseek.init_cache(2, 16, 576, "fp8")
  table, lens = jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32)
  with pytest.raises(ValueError, match=r"entries must be \[b, s_q, 576\]"):
    deepseek.append_latent(cache, jnp.zeros((1, 1, 656), jnp.bfloat16),
                           table, lens)
  with pytest.raises(ValueError, match=r"FP8 cache.*656\].*600"):
    deepseek.append_latent(jnp.zeros((2, 16, 1, 600), jnp.uint8),
                           jnp.zeros((1, 1, 576), jnp.bfloat16), table, lens)


def test_decode_step_names_caches_of_the_wrong_format():
  config = fp8_accuracy.tiny_deepseek(kv_cache_dtype="fp8", num_layers=1)
  weights = deepseek.init_weights(jax.random.key(0), config)
  step = deepseek.make_decode_step(config)
  tokens = jnp.ones((1, 1), jnp.int32)
  table, lens = jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32)
  plain = deepseek.init_caches(dataclasses.replace(
      config, kv_cache_dtype="auto"), 2, 16)
  with pytest.raises(ValueError, match=r"caches\[0\].*656.*FP8.*576"):
    step(weights, plain, tokens, table, lens)
  wrong_type = (jnp.zeros((2, 16, 1, 656), jnp.int8),)
  with pytest.raises(TypeError, match=r"caches\[0\] must be uint8.*int8"):
    step(weights, wrong_type, tokens, table, lens)
  # The kernel dequantizes an FP8 cache to bfloat16: a float16 model's
  # queries cannot take it there.
  f16 = dataclasses.replace(config, dtype="float16")
  with pytest.raises(ValueError, match="bfloat16.*backend='reference'"):
    deepseek.make_decode_step(f16, backend="cuda")(
        deepseek.init_weights(jax.random.key(0), f16),
        deepseek.init_caches(f16, 2, 16), tokens, table, lens)


def test_fp8_decode_agrees_with_bf16_decode():
  """A tiny model decodes end to end with FP8 caches: teacher-forced logits
  within a few percent of the bf16 caches' and the same argmax almost
  everywhere. Measured with these sizes on seeds 0-3: logit rel error
  0.021-0.023, argmax agreement 0.875-1.0 (random weights leave near-ties;
  a free-running decode may part at any token, even the first). The
  larger run is benchmarks/fp8_accuracy.py."""
  e = fp8_accuracy.deepseek_errors(
      fp8_accuracy.tiny_deepseek(num_layers=2), batch=2, prompt_len=8,
      new_tokens=16, seed=0)
  assert 0 < e["logit_rel"] < 0.06
  assert e["argmax_agree"] >= 0.75


def test_readme_fp8_section_runs():
  """The README's FP8 snippet runs as written (in this process, CPU)."""
  with open(os.path.join(_HERE, "..", "README.md"), encoding="utf-8") as f:
    text = f.read()
  start = text.index("## FP8 KV cache")
  end = text.find("\n## ", start + 1)
  (block,) = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)
  scope = {}
  exec(block, scope)  # pylint: disable=exec-used
  assert scope["kv_fp8"].shape == (16, 64, 1, 656)
  entries = np.asarray(scope["entries"], np.float32)
  back = np.asarray(scope["back"], np.float32)
  assert (np.abs(back - entries) <= np.abs(entries) * 2.0 ** -4 + 1e-3).all()
  assert np.isfinite(np.asarray(scope["out"], np.float32)).all()
  assert scope["caches"][0].dtype == jnp.uint8
  assert np.isfinite(np.asarray(scope["logits"])).all()
