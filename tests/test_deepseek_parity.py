"""Parity with transformers' DeepseekV2/V3 from stored fixtures (no torch).

tests/fixtures/deepseek_*/ hold tiny random models written by
benchmarks/deepseek_parity.py with transformers (float16-exact weights, MoE
layers, YaRN), their config.json in both layouts, and transformers' greedy
tokens and float32 logits. The package must match them within 1e-4
relative at every position and agree on every greedy token.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("safetensors")

from jax_thundermla.deepseek.config import DeepSeekConfig

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "benchmarks"))
import deepseek_parity  # pylint: disable=g-import-not-at-top,wrong-import-position

FIXTURES = os.path.join(_HERE, "fixtures")
LAYOUTS = ("rope_parameters", "rope_scaling")


def _fixture(name: str, layout: str):
  folder = os.path.join(FIXTURES, f"deepseek_{name}")
  with open(os.path.join(folder, f"config_{layout}.json"),
            encoding="utf-8") as f:
    hf_config = json.load(f)
  record = np.load(os.path.join(folder, "transformers_greedy.npz"))
  n = len(record["prompt_lens"])
  return (os.path.join(folder, "model.safetensors"), hf_config,
          [record[f"tokens_{i}"].tolist() for i in range(n)],
          record["prompt_lens"].tolist(),
          [record[f"logits_{i}"] for i in range(n)])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", deepseek_parity.FIXTURE_VARIANTS)
def test_matches_transformers(name, layout):
  checkpoint, hf_config, tokens, prompt_lens, logits = _fixture(name, layout)
  config = DeepSeekConfig.from_hf(hf_config)
  assert config.n_routed_experts and config.num_layers > 1
  assert any(config.is_moe_layer(i) for i in range(config.num_layers))
  result = deepseek_parity.check_model(checkpoint, hf_config, tokens,
                                       prompt_lens, logits)
  assert result["max_rel_err"] <= deepseek_parity.LOGIT_RTOL, result
  assert result["greedy_checked"] >= 2 * deepseek_parity.NEW_TOKENS
  assert result["greedy_agreement"] == result["greedy_checked"], result


def test_both_layouts_read_to_the_same_config():
  for name in deepseek_parity.FIXTURE_VARIANTS:
    configs = {DeepSeekConfig.from_hf(_fixture(name, layout)[1])
               for layout in LAYOUTS}
    assert len(configs) == 1


@pytest.mark.parametrize("key,value", [
    ("rope_interleave", True),      # the file says false
    ("routed_scaling_factor", 1.0),  # the file says 2.5
])
def test_a_misread_option_breaks_parity(key, value):
  """The fixture tells options apart: changing one is far off."""
  checkpoint, hf_config, tokens, prompt_lens, logits = _fixture(
      "v3_half_split_rope", "rope_parameters")
  hf_config = {**hf_config, key: value}
  result = deepseek_parity.check_model(checkpoint, hf_config, tokens,
                                       prompt_lens, logits)
  assert result["max_rel_err"] > 100 * deepseek_parity.LOGIT_RTOL


def test_mscale_all_dim_is_read_from_either_layout():
  _, hf_config, *_ = _fixture("v3_half_split_rope", "rope_parameters")
  old = deepseek_parity.old_layout(hf_config)
  for cfg, rope in ((hf_config, "rope_parameters"), (old, "rope_scaling")):
    cfg = copy.deepcopy(cfg)
    with_it = DeepSeekConfig.from_hf(cfg)
    del cfg[rope]["mscale_all_dim"]
    without = DeepSeekConfig.from_hf(cfg)
    assert with_it.softmax_scale > without.softmax_scale
    assert without.softmax_scale == pytest.approx(80 ** -0.5)
