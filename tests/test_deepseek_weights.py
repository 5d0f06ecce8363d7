"""Loading the Hugging Face DeepSeek layout from a synthetic checkpoint."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_thundermla.deepseek import model as model_lib
from jax_thundermla.deepseek.config import DeepSeekConfig
from jax_thundermla.deepseek.parallel import make_decode_step
from jax_thundermla.deepseek.weights import load_hf_checkpoint, weights_from_hf

from test_deepseek_oracle import jitter_norms, tiny_config

safetensors_numpy = pytest.importorskip("safetensors.numpy")

HF_CONFIG = {
    "model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 256, "intermediate_size": 384,
    "num_hidden_layers": 2, "num_attention_heads": 8, "q_lora_rank": 96,
    "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 64,
    "v_head_dim": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0,
                     "original_max_position_embeddings": 32,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.8,
                     "mscale_all_dim": 0.8},
}


def _hf_tensors(weights, config) -> dict[str, np.ndarray]:
  """The model in Hugging Face's names and torch's [out, in] layout."""
  w = jax.tree.map(np.asarray, weights)
  c = config
  h = c.num_heads
  out = {"model.embed_tokens.weight": w.embed,
         "model.norm.weight": w.final_norm, "lm_head.weight": w.lm_head.T}
  for i, layer in enumerate(w.layers):
    p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
    kv_b = np.concatenate([layer.attn.w_uk,
                           layer.attn.w_uv.transpose(0, 2, 1)], axis=1)
    out.update({
        p + "input_layernorm.weight": layer.attn_norm,
        p + "post_attention_layernorm.weight": layer.mlp_norm,
        a + "q_a_proj.weight": layer.attn.w_dq.T,
        a + "q_a_layernorm.weight": layer.attn.q_norm,
        a + "q_b_proj.weight": layer.attn.w_uq.reshape(c.q_lora_rank, -1).T,
        a + "kv_a_proj_with_mqa.weight": layer.attn.w_dkv.T,
        a + "kv_a_layernorm.weight": layer.attn.kv_norm,
        a + "kv_b_proj.weight": kv_b.reshape(-1, c.kv_lora_rank),
        a + "o_proj.weight": layer.attn.w_o.reshape(h * c.v_head_dim, -1).T,
        p + "mlp.gate_proj.weight": layer.mlp.w_gate.T,
        p + "mlp.up_proj.weight": layer.mlp.w_up.T,
        p + "mlp.down_proj.weight": layer.mlp.w_down.T,
    })
  # Layer 2 starts the mixture-of-experts layers: only its router here.
  out["model.layers.2.mlp.gate.weight"] = np.zeros((4, c.hidden_size),
                                                   ml_dtypes.bfloat16)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


@pytest.fixture(name="checkpoint")
def _checkpoint(tmp_path):
  config = tiny_config(n_routed_experts=0)
  weights = jitter_norms(model_lib.init_weights(jax.random.key(7), config))
  tensors = _hf_tensors(weights, config)
  names = sorted(tensors)
  half = len(names) // 2
  for shard, part in enumerate((names[:half], names[half:])):
    safetensors_numpy.save_file(
        {k: tensors[k] for k in part},
        str(tmp_path / f"model-0000{shard + 1}-of-00002.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
  return tmp_path, config, weights, tensors


def test_loaded_model_equals_the_weights_it_was_written_from(checkpoint):
  path, config, weights, _ = checkpoint
  loaded_config, loaded = load_hf_checkpoint(path)
  assert loaded_config == config
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a), np.asarray(b)), loaded, weights)

  step = make_decode_step(config)
  tokens = jnp.asarray([[3, 9, 27, 17], [5, 1, 60, 33]], jnp.int32)
  table = jnp.asarray([[0], [1]], jnp.int32)
  lens = jnp.asarray([4, 4], jnp.int32)
  want, _ = step(weights, model_lib.init_caches(config, 2, 16), tokens,
                 table, lens)
  got, _ = step(loaded, model_lib.init_caches(config, 2, 16), tokens, table,
                lens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_load_errors_name_the_tensor(checkpoint, tmp_path_factory):
  path, config, _, tensors = checkpoint
  with pytest.raises(ValueError, match="layer 2 has a mixture-of-experts MLP"
                     " in the checkpoint, the config says dense"):
    load_hf_checkpoint(path, dataclasses.replace(config, num_layers=3))
  missing = dict(tensors)
  del missing["model.layers.1.self_attn.kv_b_proj.weight"]
  with pytest.raises(ValueError, match="lacks the tensor.*layers.1.*kv_b"):
    weights_from_hf(missing, config)
  wrong = dict(tensors)
  wrong["model.layers.0.self_attn.o_proj.weight"] = np.zeros((256, 255))
  with pytest.raises(ValueError, match=r"o_proj.*\(256, 256\).*\(256, 255\)"):
    weights_from_hf(wrong, config)

  fp8 = tmp_path_factory.mktemp("fp8")
  tensors = dict(tensors)
  tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(
      ml_dtypes.float8_e4m3fn)
  safetensors_numpy.save_file(tensors, str(fp8 / "model.safetensors"))
  with pytest.raises(ValueError, match="model.norm.weight.*F8"):
    load_hf_checkpoint(fp8 / "model.safetensors", config)


def test_config_from_hf():
  hf = HF_CONFIG
  config = DeepSeekConfig.from_hf(hf)
  assert config == tiny_config(n_routed_experts=0)
  assert DeepSeekConfig.from_hf(hf, num_layers=1).num_layers == 1
  with pytest.raises(ValueError, match=r"num_layers must be in \[1, 2\]"):
    DeepSeekConfig.from_hf(hf, num_layers=3)
  assert DeepSeekConfig.from_hf(
      {**HF_CONFIG, "q_lora_rank": None}).q_lora_rank is None
  with pytest.raises(ValueError, match="lacks the key 'kv_lora_rank'"):
    DeepSeekConfig.from_hf({k: v for k, v in HF_CONFIG.items()
                            if k != "kv_lora_rank"})
  plain = DeepSeekConfig.from_hf({**HF_CONFIG, "rope_scaling": None})
  assert plain.rope_factor == 1.0


@pytest.mark.parametrize("change,words", [
    ({"some_new_option": 1}, ["unsupported option", "some_new_option"]),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
     ["both rope_parameters", "rope_scaling"]),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}},
     ["rope type", "linear"]),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0, "low_freq": 1}},
     ["rope option", "low_freq"]),
    ({"model_type": "llama"}, ["model_type", "llama"]),
    ({"hidden_act": "gelu"}, ["hidden_act", "gelu"]),
    ({"attention_bias": True}, ["attention_bias"]),
    ({"quantization_config": {"quant_method": "fp8"}},
     ["quantization_config", "bfloat16"]),
    ({"model_type": "deepseek_v2", "n_routed_experts": 4,
      "moe_intermediate_size": 16, "num_experts_per_tok": 2,
      "norm_topk_prob": True}, ["norm_topk_prob", "deepseek_v2"]),
    ({"n_routed_experts": 4, "moe_intermediate_size": 16,
      "num_experts_per_tok": 2, "scoring_func": "softmax"},
     ["deepseek_v3", "sigmoid", "softmax"]),
    ({"n_routed_experts": 4, "num_experts_per_tok": 2},
     ["lacks the key", "moe_intermediate_size"]),
])
def test_config_from_hf_refuses_what_it_cannot_honour(change, words):
  with pytest.raises(ValueError) as e:
    DeepSeekConfig.from_hf({**HF_CONFIG, **change})
  for word in words:
    assert word in str(e.value)


def test_config_from_hf_reads_yarn_as_transformers_does():
  def rope(**kw):
    scaling = {"type": "yarn", "factor": 4.0,
               "original_max_position_embeddings": 32, **kw}
    return DeepSeekConfig.from_hf({**HF_CONFIG, "rope_scaling": scaling})
  # Without mscale_all_dim: cos/sin get YaRN's default magnitude, the
  # softmax scale none.
  only_mscale = rope(mscale=0.707)
  assert only_mscale.rope_mscale == pytest.approx(0.1 * np.log(4.0) + 1)
  assert only_mscale.softmax_scale == pytest.approx(96 ** -0.5)
  both = rope(mscale=1.0, mscale_all_dim=0.5)
  assert both.rope_mscale == pytest.approx(
      (0.1 * np.log(4) + 1) / (0.05 * np.log(4) + 1))
  assert rope(attention_factor=1.25).rope_mscale == 1.25
  assert not rope(truncate=False).rope_truncate
  no_factor = DeepSeekConfig.from_hf({
      **HF_CONFIG, "max_position_embeddings": 256, "rope_scaling": {
          "type": "yarn", "original_max_position_embeddings": 32}})
  assert no_factor.rope_factor == 8.0
  interleave = DeepSeekConfig.from_hf({**HF_CONFIG, "rope_interleave": False})
  assert not interleave.rope_interleave


def test_missing_paths_are_named(tmp_path):
  missing = tmp_path / "no_such_checkpoint"
  with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
    load_hf_checkpoint(missing)
  with pytest.raises(FileNotFoundError, match="config.json"):
    DeepSeekConfig.from_hf(tmp_path)
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_hf_checkpoint(tmp_path)
