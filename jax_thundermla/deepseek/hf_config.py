"""Hugging Face DeepSeek-V2/V3 ``config.json`` -> ``DeepSeekConfig``.

Both layouts are read: transformers >= 5 writes ``rope_parameters`` (a dict
with ``rope_type`` and ``rope_theta`` inside); older files have
``rope_scaling`` (with ``type``) beside a top-level ``rope_theta``. Every
key either sets a field, is known to leave decode unchanged (token ids,
training-only settings, ...), or raises ``ValueError`` naming it: nothing is
dropped silently. Defaults of absent keys are transformers' per
architecture (``model_type`` ``deepseek_v2`` or ``deepseek_v3``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping


MODEL_TYPES = ("deepseek_v2", "deepseek_v3")

# Keys with no effect on the logits of a decode step.
_INERT = frozenset({
    "architectures", "auto_map", "transformers_version", "torch_dtype",
    "dtype", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
    "initializer_range", "num_key_value_heads", "head_dim", "qk_head_dim",
    "output_router_logits", "router_aux_loss_coef", "aux_loss_alpha",
    "seq_aux", "ep_size", "num_nextn_predict_layers", "num_mtp_layers",
    "attention_dropout", "pretraining_tp", "_name_or_path",
    "max_position_embeddings",  # read only as YaRN's defaults
})
_READ = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "rope_interleave", "n_routed_experts", "n_shared_experts",
    "moe_intermediate_size", "num_experts_per_tok", "first_k_dense_replace",
    "moe_layer_freq", "scoring_func", "topk_method", "n_group", "topk_group",
    "norm_topk_prob", "routed_scaling_factor", "hidden_act",
    "attention_bias", "mlp_bias", "tie_word_embeddings",
    "quantization_config",
})
_ROPE_KEYS = frozenset({
    "type", "rope_type", "rope_theta", "factor",
    "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
    "mscale_all_dim", "attention_factor", "truncate", "partial_rotary_factor",
})
# transformers' defaults of the keys that differ between the two.
_DEFAULTS = {
    "deepseek_v2": dict(
        first_k_dense_replace=0, n_shared_experts=2, routed_scaling_factor=1.0,
        scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
        max_position_embeddings=2048),
    "deepseek_v3": dict(
        first_k_dense_replace=3, n_shared_experts=1, routed_scaling_factor=2.5,
        scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
        n_group=8, topk_group=4, max_position_embeddings=4096),
}


def read_json(hf_config: Mapping[str, Any] | str | os.PathLike
              ) -> Mapping[str, Any]:
  """The parsed config: the mapping itself, or a file or folder's JSON.

  Raises:
    FileNotFoundError: the path (or the folder's ``config.json``) does not
      exist.
  """
  if isinstance(hf_config, Mapping):
    return hf_config
  path = os.fspath(hf_config)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"hf_config: no Hugging Face config.json at {path!r}")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _rope_fields(cfg: Mapping[str, Any], max_pos: int) -> dict[str, Any]:
  """RoPE/YaRN fields from either layout."""
  new, old = cfg.get("rope_parameters"), cfg.get("rope_scaling")
  if new is not None and old is not None:
    raise ValueError(
        "config.json has both rope_parameters (transformers >= 5) and"
        " rope_scaling (older layout); keep one")
  rope = dict(new if new is not None else (old or {}))
  unknown = sorted(set(rope) - _ROPE_KEYS)
  if unknown:
    raise ValueError(
        f"config.json: unsupported rope option(s) {unknown}"
        f" (known: {sorted(_ROPE_KEYS)})")
  theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
  if ("rope_theta" in rope and "rope_theta" in cfg
      and float(rope["rope_theta"]) != float(cfg["rope_theta"])):
    raise ValueError(
        f"config.json: rope_theta is {cfg['rope_theta']} at the top and"
        f" {rope['rope_theta']} in the rope parameters")
  kind = rope.get("rope_type", rope.get("type", "default"))
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(
        "config.json: partial_rotary_factor must be 1 (MLA rotates all 64"
        f" rope dims), got {rope['partial_rotary_factor']}")
  fields: dict[str, Any] = dict(rope_theta=float(theta), rope_factor=1.0)
  if kind == "default":
    return fields
  if kind != "yarn":
    raise ValueError(
        f"config.json: rope type must be 'default' or 'yarn', got {kind!r}")
  original = int(rope.get("original_max_position_embeddings", max_pos))
  factor = rope.get("factor")
  factor = max_pos / original if factor is None else float(factor)
  attention_factor = rope.get("attention_factor")
  fields.update(
      rope_factor=factor,
      original_max_position_embeddings=original,
      beta_fast=float(rope.get("beta_fast") or 32),
      beta_slow=float(rope.get("beta_slow") or 1),
      rope_truncate=bool(rope.get("truncate", True)),
      mscale=float(rope.get("mscale") or 0),
      mscale_all_dim=float(rope.get("mscale_all_dim") or 0),
      rope_attention_factor=(None if attention_factor is None
                             else float(attention_factor)))
  return fields


def _moe_fields(cfg: Mapping[str, Any], model_type: str,
                get) -> dict[str, Any]:
  experts = int(cfg.get("n_routed_experts") or 0)
  if not experts:
    return dict(n_routed_experts=0)
  scoring, method = get("scoring_func"), get("topk_method")
  norm = bool(get("norm_topk_prob"))
  if model_type == "deepseek_v3":
    if scoring != "sigmoid" or method != "noaux_tc":
      raise ValueError(
          "config.json: deepseek_v3 routes with scoring_func 'sigmoid' and"
          f" topk_method 'noaux_tc'; got scoring_func {scoring!r},"
          f" topk_method {method!r}")
  else:
    if scoring != "softmax":
      raise ValueError(
          f"config.json: deepseek_v2 needs scoring_func 'softmax', got"
          f" {scoring!r}")
    if method not in ("greedy", "group_limited_greedy"):
      raise ValueError(
          "config.json: deepseek_v2 topk_method must be 'greedy' or"
          f" 'group_limited_greedy', got {method!r}")
    if norm:
      raise ValueError(
          "config.json: norm_topk_prob true is unsupported for deepseek_v2"
          " (transformers ignores it, DeepSeek's code renormalises)")
  grouped = method != "greedy"
  try:
    fields = dict(
        n_routed_experts=experts,
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        num_experts_per_tok=int(cfg["num_experts_per_tok"]),
        n_shared_experts=int(get("n_shared_experts") or 0),
        first_k_dense_replace=int(get("first_k_dense_replace")),
        moe_layer_freq=int(cfg.get("moe_layer_freq", 1)),
        scoring_func=scoring, topk_method=method, norm_topk_prob=norm,
        routed_scaling_factor=float(get("routed_scaling_factor")))
    if grouped:
      fields.update(n_group=int(get("n_group")),
                    topk_group=int(get("topk_group")))
  except KeyError as e:
    raise ValueError(
        f"config.json lacks the key {e.args[0]!r} (needed with"
        f" n_routed_experts > 0)") from None
  except TypeError:
    raise ValueError(
        "config.json: n_group, topk_group and first_k_dense_replace must be"
        f" integers for topk_method {method!r}") from None
  return fields


def config_fields(hf_config: Mapping[str, Any] | str | os.PathLike, *,
                  num_layers: int | None = None) -> dict[str, Any]:
  """Reads a Hugging Face DeepSeek-V2 or DeepSeek-V3 ``config.json``.

  ``DeepSeekConfig.from_hf`` builds the config from these fields; this
  module does not import the config class, so the two do not import each
  other.

  Args:
    hf_config: the parsed JSON, or the path of the file or of its folder.
    num_layers: layers to keep (the first ones); default all.

  Returns:
    The ``DeepSeekConfig`` fields, ``num_layers`` included, dtype excluded.

  Raises:
    FileNotFoundError: no config at the path.
    ValueError: an unknown or unsupported key or value (named), a missing
      key, or ``num_layers`` past the model's layers.
  """
  cfg = read_json(hf_config)
  model_type = cfg.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(
        f"config.json: model_type must be one of {MODEL_TYPES}, got"
        f" {model_type!r}")
  unknown = sorted(set(cfg) - _READ - _INERT)
  if unknown:
    raise ValueError(f"config.json: unsupported option(s) {unknown}")
  defaults = _DEFAULTS[model_type]

  def get(key):
    value = cfg.get(key)
    return defaults.get(key) if value is None else value

  for key, want in (("hidden_act", "silu"), ("attention_bias", False),
                    ("mlp_bias", False), ("tie_word_embeddings", False)):
    if cfg.get(key, want) != want:
      raise ValueError(
          f"config.json: {key} must be {want!r}, got {cfg[key]!r}")
  if cfg.get("quantization_config") is not None:
    raise ValueError(
        "config.json has a quantization_config (an FP8 release): convert"
        " the checkpoint to bfloat16 first")
  if model_type == "deepseek_v2" and cfg.get("rope_interleave") is False:
    raise ValueError(
        "config.json: deepseek_v2 always rotates interleaved pairs;"
        " rope_interleave false is unsupported")
  try:
    total = int(cfg["num_hidden_layers"])
    q_lora_rank = cfg["q_lora_rank"]
    fields = dict(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_heads=int(cfg["num_attention_heads"]),
        q_lora_rank=None if q_lora_rank is None else int(q_lora_rank),
        kv_lora_rank=int(cfg["kv_lora_rank"]),
        qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
        qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
        v_head_dim=int(cfg["v_head_dim"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_interleave=bool(cfg.get("rope_interleave", True)))
  except KeyError as e:
    raise ValueError(f"config.json lacks the key {e.args[0]!r}") from None
  fields.update(_rope_fields(cfg, int(get("max_position_embeddings"))))
  fields.update(_moe_fields(cfg, model_type, get))
  if num_layers is None:
    num_layers = total
  if not 1 <= num_layers <= total:
    raise ValueError(
        f"num_layers must be in [1, {total}] (the model's layers), got"
        f" {num_layers}")
  return dict(fields, num_layers=num_layers)
