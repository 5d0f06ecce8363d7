"""Greedy decoding of a DeepSeek-V3-shaped model with random weights.

Real MLA head dims (128 heads, q LoRA 1536, latent 512 + rope 64, nope 128,
v 128) over a paged latent cache; dense MLP layers. A batch of prompts of
different lengths is prefilled through the decode step ``--prefill_chunk``
tokens at a time, then decoded one token per step; tokens/s is printed.

  python examples/deepseek_decode.py --config=small        # CPU, < 1 min
  python examples/deepseek_decode.py                       # GPU: hidden 7168
  python examples/deepseek_decode.py --tp=2                # heads over 2 GPUs
  python examples/deepseek_decode.py --dp=2 --tp=4         # 8 devices
  python examples/deepseek_decode.py --host_plan           # one plan per step
"""

from __future__ import annotations

import dataclasses
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from jax_thundermla import deepseek

_CONFIG = flags.DEFINE_enum(
    "config", None, ["small", "v3"],
    "small: hidden 1024, MLP 2816, vocab 8192; v3: DeepSeek-V3's hidden 7168,"
    " MLP 18432, vocab 129280. Both keep V3's attention dims. Default: v3 on"
    " a GPU, small elsewhere.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 3, "Transformer layers.")
_PROMPT_LENS = flags.DEFINE_list(
    "prompt_lens", ["32", "45", "71", "100"],
    "Prompt length of each sequence (the batch size is their count).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 24,
                                   "Tokens generated per sequence.")
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", 16, "Prompt tokens per sequence per prefill step.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 64, "Tokens per cache page.")
_DP = flags.DEFINE_integer("dp", 1, "Data-parallel ways (splits the batch).")
_TP = flags.DEFINE_integer("tp", 1, "Tensor-parallel ways (splits heads).")
_HOST_PLAN = flags.DEFINE_bool(
    "host_plan", False,
    "Build one jax_thundermla.plan_decode schedule per step on the host and"
    " share it between all layers (needs dp == 1).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights and prompts.")


def _config() -> deepseek.DeepSeekConfig:
  name = _CONFIG.value or ("v3" if jax.default_backend() == "gpu"
                           else "small")
  config = deepseek.DeepSeekConfig(num_layers=_NUM_LAYERS.value)
  if name == "small":
    config = dataclasses.replace(config, hidden_size=1024,
                                 intermediate_size=2816, vocab_size=8192)
  return config


def _host_planner():
  """``jax_thundermla.plan_decode``, imported only when --host_plan asks."""
  from jax_thundermla import plan_decode  # pylint: disable=g-import-not-at-top
  return plan_decode


class Batch:
  """The batch's sequences, their dp shards' allocators and block tables."""

  def __init__(self, lengths: list[int], dp: int, page_size: int,
               max_tokens: int):
    self.per_shard = len(lengths) // dp
    self.max_pages = -(-max_tokens // page_size)
    self.local_pages = self.per_shard * self.max_pages  # pages per dp shard
    self.allocs = [deepseek.PageAllocator(self.local_pages, page_size)
                   for _ in range(dp)]
    for shard, alloc in enumerate(self.allocs):
      alloc.allocate(self._ids(shard), [0] * self.per_shard)

  def _ids(self, shard: int) -> range:
    return range(shard * self.per_shard, (shard + 1) * self.per_shard)

  def grow(self, lengths) -> tuple[np.ndarray, np.ndarray]:
    """Makes room for ``lengths``; returns (block_table, cache_seqlens)."""
    tables = []
    for shard, alloc in enumerate(self.allocs):
      for i in self._ids(shard):
        alloc.grow(i, int(lengths[i]))
      tables.append(alloc.block_table(self._ids(shard), self.max_pages))
    return np.concatenate(tables), np.asarray(lengths, np.int32)


def main(argv):
  del argv
  config = _config()
  dp, tp = _DP.value, _TP.value
  prompt_lens = [int(n) for n in _PROMPT_LENS.value]
  chunk, new_tokens = _PREFILL_CHUNK.value, _NEW_TOKENS.value
  if len(prompt_lens) % dp:
    raise app.UsageError(
        f"the batch ({len(prompt_lens)} prompts) must divide by --dp={dp}")
  if _HOST_PLAN.value and dp > 1:
    raise app.UsageError("--host_plan needs --dp=1")
  plan_decode = _host_planner() if _HOST_PLAN.value else None

  mesh = deepseek.make_mesh(dp, tp) if dp * tp > 1 else None
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, dp={dp},"
        f" tp={tp}; {config.num_layers} layers, hidden {config.hidden_size},"
        f" {config.num_heads} heads, latent {config.latent_dim}")
  t0 = time.perf_counter()
  weights = deepseek.init_weights(jax.random.key(_SEED.value), config)
  batch = Batch(prompt_lens, dp, _PAGE_SIZE.value,
                max(prompt_lens) + new_tokens)
  caches = deepseek.init_caches(config, dp * batch.local_pages,
                                _PAGE_SIZE.value)
  if mesh is not None:
    weights = deepseek.shard_weights(weights, config, mesh)
    (caches,) = deepseek.shard_batch(mesh, caches)
  jax.block_until_ready((weights, caches))
  print(f"weights and caches ready in {time.perf_counter() - t0:.1f} s")
  step = deepseek.make_decode_step(config, mesh)

  def run(tokens, lengths):
    nonlocal caches
    table, lens = batch.grow(lengths)
    plan = None
    if plan_decode is not None:
      plan = plan_decode(lens, s_q=tokens.shape[1],
                         h_q=config.num_heads // tp,
                         page_size=_PAGE_SIZE.value,
                         head_dim_v=config.kv_lora_rank)
    logits, caches = step(weights, caches, jnp.asarray(tokens, jnp.int32),
                          jnp.asarray(table), jnp.asarray(lens), plan=plan)
    return np.asarray(jnp.argmax(logits[:, -1], axis=-1))

  rng = np.random.default_rng(_SEED.value)
  seqs = [list(rng.integers(0, config.vocab_size, n)) for n in prompt_lens]
  t0 = time.perf_counter()
  for ends in deepseek.prefill_windows(prompt_lens, chunk):
    next_tokens = run(np.array([s[e - chunk:e] for s, e in zip(seqs, ends)]),
                      ends)
  prefill_s = time.perf_counter() - t0
  print(f"prefill: {sum(prompt_lens)} prompt tokens in {prefill_s:.2f} s"
        f" (compilation included)")

  timed_from = None
  for i in range(new_tokens):
    if i == 1:  # the first decode step compiles
      timed_from = time.perf_counter()
    for s, token in zip(seqs, next_tokens):
      s.append(int(token))
    next_tokens = run(np.array([s[-1:] for s in seqs]),
                      [len(s) for s in seqs])
  if timed_from is not None:
    elapsed = time.perf_counter() - timed_from
    generated = len(seqs) * (new_tokens - 1)
    print(f"decode: {generated} tokens in {elapsed:.2f} s ="
          f" {generated / elapsed:.1f} tokens/s (batch {len(seqs)},"
          f" lengths now {[len(s) for s in seqs]})")
  for n, s in zip(prompt_lens, seqs):
    print(f"  prompt of {n}: ... -> {s[n:n + 8]} ...")


if __name__ == "__main__":
  app.run(main)
