"""The decode example's code path on a tiny V2-Lite-like model (CPU)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import jax

from jax_thundermla import deepseek

_EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                        "examples", "deepseek_decode.py")


@functools.cache  # the example defines absl flags: load it once
def _example():
  spec = importlib.util.spec_from_file_location("deepseek_decode", _EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_filled_context_decode_reports_every_step():
  example = _example()
  config = dataclasses.replace(
      example.V2_LITE, vocab_size=128, hidden_size=64, intermediate_size=96,
      num_layers=3, num_heads=4, kv_lora_rank=64, qk_nope_head_dim=32,
      v_head_dim=32, moe_intermediate_size=16, n_routed_experts=8,
      num_experts_per_tok=2)
  assert config.q_lora_rank is None and config.is_moe_layer(1)
  weights = deepseek.init_weights(jax.random.key(0), config)
  lines = []
  rate = example.decode(config, weights, prompt_lens=[0] * 4, context=40,
                        new_tokens=4, page_size=16, backend="reference",
                        report=lines.append)
  steps = [line for line in lines if "step" in line]
  assert len(steps) == 4 and "compiles" in steps[0]
  assert all("tokens/s" in line for line in steps[1:])
  assert "context now 44" in lines[-1] and rate > 0


def test_prompt_prefill_path_and_v2_lite_shape():
  example = _example()
  v2 = example.make_config("v2_lite", None)
  assert (v2.num_layers, v2.n_routed_experts, v2.q_lora_rank) == (27, 64,
                                                                  None)
  config = example.make_config("small", 1)
  config = dataclasses.replace(config, hidden_size=128, intermediate_size=64,
                               vocab_size=64, num_heads=4)
  weights = deepseek.init_weights(jax.random.key(1), config)
  lines = []
  example.decode(config, weights, prompt_lens=[5, 9], context=0,
                 new_tokens=2, page_size=16, prefill_chunk=4,
                 report=lines.append)
  assert lines[0].startswith("prefill: 14 prompt tokens")
  assert len([line for line in lines if "step" in line]) == 2


def test_filled_context_decode_with_fp8_caches():
  example = _example()
  config = dataclasses.replace(
      example.make_config("small", 1), hidden_size=128, intermediate_size=64,
      vocab_size=64, num_heads=4, kv_cache_dtype="fp8")
  weights = deepseek.init_weights(jax.random.key(2), config)
  lines = []
  rate = example.decode(config, weights, prompt_lens=[0] * 2, context=20,
                        new_tokens=2, page_size=16, report=lines.append)
  assert "context now 22" in lines[-1] and rate > 0
