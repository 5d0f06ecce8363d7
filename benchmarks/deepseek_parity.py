"""Parity of jax_thundermla.deepseek with transformers' DeepseekV2/V3.

Builds tiny random DeepseekV2 and DeepseekV3 models in transformers (torch,
CPU), with MoE layers, YaRN, and the query LoRA absent or present; rounds
their weights to float16 values (so a float16 file stores them exactly),
decodes two prompts greedily for 32 tokens in float32, and checks that
this package, loading the saved checkpoint under both config layouts
(transformers >= 5 ``rope_parameters``; older ``rope_scaling`` +
``rope_theta``), gives logits within 1e-4 relative at every position and
the same greedy tokens.

  python benchmarks/deepseek_parity.py                     # live check
  python benchmarks/deepseek_parity.py --write_fixtures=tests/fixtures

The fixtures (weights, both config.json layouts, the transformers tokens
and logits) let tests/test_deepseek_parity.py check the same without torch.
``check_model`` below is the package side, shared with that test.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from typing import Any

import numpy as np

NEW_TOKENS = 32
PROMPTS = ([3, 17, 42, 8, 25, 60, 11, 4], [9, 30, 2, 51, 14])
LOGIT_RTOL = 1e-4
PAGE_SIZE = 16
CHUNK = 4

_COMMON = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16,
    qk_nope_head_dim=16, qk_rope_head_dim=64, v_head_dim=16,
    moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
    first_k_dense_replace=1, max_position_embeddings=64, rms_norm_eps=1e-5,
    tie_word_embeddings=False)
# name -> (model_type, config keys beyond _COMMON, rope_parameters)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "v2_lite_like": ("deepseek_v2", dict(
        q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, routed_scaling_factor=1.5,
        norm_topk_prob=False), dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0,
            original_max_position_embeddings=16, mscale=0.707, beta_fast=32,
            beta_slow=1)),
    "v3_half_split_rope": ("deepseek_v3", dict(
        q_lora_rank=24, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_interleave=False), dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0,
            original_max_position_embeddings=16, mscale=1.0,
            mscale_all_dim=0.8, beta_fast=32, beta_slow=1)),
    "v3_no_q_lora": ("deepseek_v3", dict(
        q_lora_rank=None, n_shared_experts=1, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_interleave=True), dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0,
            original_max_position_embeddings=16, mscale=0.8,
            mscale_all_dim=0.8, beta_fast=32, beta_slow=1)),
    "v2_greedy_q_lora": ("deepseek_v2", dict(
        q_lora_rank=24, n_shared_experts=1, topk_method="greedy",
        routed_scaling_factor=1.0, norm_topk_prob=False), dict(
            rope_type="default", rope_theta=10000.0)),
}
FIXTURE_VARIANTS = ("v2_lite_like", "v3_half_split_rope")


def old_layout(config: dict[str, Any]) -> dict[str, Any]:
  """The same config in the older layout: rope_scaling + rope_theta."""
  config = dict(config)
  rope = dict(config.pop("rope_parameters"))
  config["rope_theta"] = rope.pop("rope_theta")
  kind = rope.pop("rope_type")
  config["rope_scaling"] = None if kind == "default" else {"type": kind,
                                                            **rope}
  return config


def check_model(checkpoint: str, hf_config: dict[str, Any],
                tokens: list[list[int]], prompt_lens: list[int],
                want_logits: list[np.ndarray]) -> dict[str, float]:
  """Runs this package's decode loop and compares it with the record.

  Prompts are prefilled ``CHUNK`` tokens a step, then the recorded tokens
  are fed one a step. Every position's logits are compared with the
  recorded ones; the greedy token after each position from the prompt's
  last on must be the recorded next token.

  Args:
    checkpoint: a ``.safetensors`` file.
    hf_config: the Hugging Face config.json content.
    tokens: per sequence, prompt + generated tokens.
    prompt_lens: per sequence, the prompt length.
    want_logits: per sequence, float [len(tokens) - 1, vocab] logits at
      positions 0 .. len - 2.

  Returns:
    ``{"max_rel_err", "greedy_agreement", "greedy_checked"}``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax_thundermla import deepseek  # pylint: disable=g-import-not-at-top

  config = deepseek.DeepSeekConfig.from_hf(hf_config, dtype="float32")
  config, weights = deepseek.load_hf_checkpoint(checkpoint, config)
  total = [len(t) - 1 for t in tokens]  # the last token is never fed
  max_pages = -(-max(total) // PAGE_SIZE)
  alloc = deepseek.PageAllocator(len(tokens) * max_pages, PAGE_SIZE)
  seqs = list(range(len(tokens)))
  alloc.allocate(seqs, [0] * len(seqs))
  caches = deepseek.init_caches(config, len(tokens) * max_pages, PAGE_SIZE)
  step = deepseek.make_decode_step(config)
  errors, agree, checked = [], 0, 0

  def run(ends, width):
    nonlocal caches, agree, checked
    for s, e in zip(seqs, ends):
      alloc.grow(s, int(e))
    window = np.array([t[e - width:e] for t, e in zip(tokens, ends)],
                      np.int32)
    logits, caches = step(weights, caches, jnp.asarray(window),
                          jnp.asarray(alloc.block_table(seqs, max_pages)),
                          jnp.asarray(alloc.seqlens(seqs)))
    logits = np.asarray(jax.device_get(logits), np.float64)
    for i, e in enumerate(ends):
      for j in range(width):
        pos = e - width + j
        want = np.asarray(want_logits[i][pos], np.float64)
        errors.append(np.linalg.norm(logits[i, j] - want)
                      / np.linalg.norm(want))
        if pos >= prompt_lens[i] - 1 and j == width - 1:
          checked += 1
          agree += int(np.argmax(logits[i, j]) == tokens[i][pos + 1])

  for ends in deepseek.prefill_windows(prompt_lens, CHUNK):
    run(ends, CHUNK)
  for n in range(1, max(total) - min(prompt_lens) + 1):
    ends = [min(p + n, t) for p, t in zip(prompt_lens, total)]
    run(ends, 1)
  return {"max_rel_err": float(max(errors)), "greedy_agreement": agree,
          "greedy_checked": checked}


def _build(name: str):
  """A transformers model of the variant, weights rounded to float16."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  model_type, extra, rope = VARIANTS[name]
  cls = (transformers.DeepseekV2Config if model_type == "deepseek_v2"
         else transformers.DeepseekV3Config)
  config = cls(**_COMMON, **extra, rope_parameters=dict(rope))
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  model_cls = (transformers.DeepseekV2ForCausalLM
               if model_type == "deepseek_v2"
               else transformers.DeepseekV3ForCausalLM)
  torch.manual_seed(sorted(VARIANTS).index(name))
  model = model_cls(config).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("norm.weight") or "layernorm" in pname:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif "embed_tokens" in pname:
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
      p.copy_(p.half().float())
    for bname, b in model.named_buffers():
      if bname.endswith("e_score_correction_bias"):
        b.copy_((0.1 * torch.randn_like(b)).half().float())
  return model


def _record(model) -> tuple[list[list[int]], list[np.ndarray]]:
  """Greedy decoding of PROMPTS and the logits at every position."""
  import torch  # pylint: disable=g-import-not-at-top
  tokens, logits = [], []
  with torch.no_grad():
    for prompt in PROMPTS:
      ids = list(prompt)
      for _ in range(NEW_TOKENS):
        out = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(out.argmax()))
      full = model(torch.tensor([ids[:-1]])).logits[0].numpy()
      tokens.append(ids)
      logits.append(full.astype(np.float32))
  return tokens, logits


def _save(model, folder: str) -> tuple[str, dict[str, Any]]:
  """Saves float16 weights and the new-layout config; returns both."""
  import torch  # pylint: disable=g-import-not-at-top
  model.to(torch.float16).save_pretrained(folder)
  model.to(torch.float32)
  with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  return os.path.join(folder, "model.safetensors"), config


def main(argv: list[str]) -> int:
  import tempfile  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  out_dir = None
  for arg in argv[1:]:
    if arg.startswith("--write_fixtures="):
      out_dir = arg.split("=", 1)[1]
  print(f"transformers {transformers.__version__}")
  ok = True
  for name in VARIANTS:
    model = _build(name)
    tokens, logits = _record(model)
    folder = (os.path.join(out_dir, f"deepseek_{name}")
              if out_dir and name in FIXTURE_VARIANTS
              else tempfile.mkdtemp())
    os.makedirs(folder, exist_ok=True)
    checkpoint, new = _save(model, folder)
    layouts = {"rope_parameters": new, "rope_scaling": old_layout(new)}
    # transformers reads the older layout to the same model.
    reread = dict(type(model.config).from_dict(
        copy.deepcopy(layouts["rope_scaling"])).rope_parameters)
    reread.pop("type", None)
    assert reread == model.config.rope_parameters, (
        reread, model.config.rope_parameters)
    for layout, hf_config in layouts.items():
      result = check_model(checkpoint, hf_config, tokens,
                           [len(p) for p in PROMPTS], logits)
      passed = (result["max_rel_err"] <= LOGIT_RTOL and
                result["greedy_agreement"] == result["greedy_checked"])
      ok &= passed
      print(f"{name:20s} {layout:15s} max rel err"
            f" {result['max_rel_err']:.2e}, greedy"
            f" {result['greedy_agreement']}/{result['greedy_checked']}"
            f" {'ok' if passed else 'FAIL'}")
    if out_dir and name in FIXTURE_VARIANTS:
      os.remove(os.path.join(folder, "config.json"))
      for layout, hf_config in layouts.items():
        with open(os.path.join(folder, f"config_{layout}.json"), "w",
                  encoding="utf-8") as f:
          json.dump(hf_config, f, indent=1, sort_keys=True)
      np.savez_compressed(
          os.path.join(folder, "transformers_greedy.npz"),
          prompt_lens=np.array([len(p) for p in PROMPTS], np.int32),
          **{f"tokens_{i}": np.array(t, np.int32)
             for i, t in enumerate(tokens)},
          **{f"logits_{i}": l for i, l in enumerate(logits)})
      for extra in ("generation_config.json",):
        path = os.path.join(folder, extra)
        if os.path.exists(path):
          os.remove(path)
  print("parity ok" if ok else "parity FAILED")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv))
