"""Greedy decoding of a DeepSeek-V3- or V2-Lite-shaped model, random weights.

Real MLA head dims over a paged latent cache, dense and mixture-of-experts
layers. Two ways to start:

- prompts (``--prompt_lens``): prefilled through the decode step
  ``--prefill_chunk`` tokens at a time, then decoded one token per step;
- a filled context (``--context=N``): ``--batch`` sequences whose caches
  already hold N tokens (random latents), decoded from there; the way to
  time decode at long context without a long prefill.

Every step prints its tokens/s as it goes; after the first (compiling)
step, the steady rate is printed per attention backend (``--backends``).

  python examples/deepseek_decode.py --config=small        # CPU, < 1 min
  python examples/deepseek_decode.py                       # GPU: hidden 7168
  python examples/deepseek_decode.py --config=v2_lite --batch=64 \\
      --context=4096 --new_tokens=8 --backends=cuda,reference   # one H100
  python examples/deepseek_decode.py --tp=2                # heads over 2 GPUs
  python examples/deepseek_decode.py --dp=2 --tp=4         # 8 devices
  python examples/deepseek_decode.py --host_plan           # one plan per step
  python examples/deepseek_decode.py --config=small --kv_cache_dtype=fp8
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import jax_thundermla as tmla
from jax_thundermla import deepseek
from jax_thundermla.deepseek.config import KV_CACHE_DTYPES

# DeepSeek-V2-Lite (27 layers: 1 dense, 26 MoE with 64 routed experts).
V2_LITE = deepseek.DeepSeekConfig(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944,
    num_layers=27, num_heads=16, q_lora_rank=None, kv_lora_rank=512,
    qk_nope_head_dim=128, v_head_dim=128, rope_factor=40.0,
    original_max_position_embeddings=4096, mscale=0.707,
    mscale_all_dim=0.707, n_routed_experts=64, n_shared_experts=2,
    moe_intermediate_size=1408, num_experts_per_tok=6,
    first_k_dense_replace=1, scoring_func="softmax", topk_method="greedy",
    norm_topk_prob=False, routed_scaling_factor=1.0)
CONFIGS = ("small", "v3", "v2_lite")

_CONFIG = flags.DEFINE_enum(
    "config", None, CONFIGS,
    "small: hidden 1024, MLP 2816, vocab 8192, V3's attention dims, dense;"
    " v3: DeepSeek-V3's hidden 7168, MLP 18432, vocab 129280 (its first"
    " --num_layers layers); v2_lite: DeepSeek-V2-Lite (27 layers, MoE)."
    " Default: v3 on a GPU, small elsewhere.")
_NUM_LAYERS = flags.DEFINE_integer(
    "num_layers", None, "Transformer layers (default: 3, all for v2_lite).")
_PROMPT_LENS = flags.DEFINE_list(
    "prompt_lens", ["32", "45", "71", "100"],
    "Prompt length of each sequence (the batch size is their count).")
_BATCH = flags.DEFINE_integer(
    "batch", 64, "Sequences with --context > 0 (else --prompt_lens).")
_CONTEXT = flags.DEFINE_integer(
    "context", 0, "Start every sequence with this many cached tokens"
    " (random latents) instead of prefilling prompts.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 24,
                                   "Tokens generated per sequence.")
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", 16, "Prompt tokens per sequence per prefill step.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 64, "Tokens per cache page.")
_BACKENDS = flags.DEFINE_list(
    "backends", ["default"],
    "mla_decode backends to time one after the other: default (the kernel"
    " on a GPU), cuda, reference.")
_KV_CACHE_DTYPE = flags.DEFINE_enum(
    "kv_cache_dtype", "auto", KV_CACHE_DTYPES,
    "auto: caches in the model's dtype; fp8: FlashMLA's FP8 layout (656"
    " bytes a token; the reference attention until the kernel takes it).")
_DP = flags.DEFINE_integer("dp", 1, "Data-parallel ways (splits the batch).")
_EP = flags.DEFINE_integer("ep", 1, "Expert-parallel ways (splits experts"
                           " and the batch).")
_TP = flags.DEFINE_integer("tp", 1, "Tensor-parallel ways (splits heads).")
_HOST_PLAN = flags.DEFINE_bool(
    "host_plan", False,
    "Build one jax_thundermla.plan_decode schedule per step on the host and"
    " share it between all layers (needs dp == ep == 1).")
# allow_override: the tests import this example and benchmarks/stress.py,
# which also has --seed, into one process.
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights and prompts.",
                             allow_override=True)


def make_config(name: str, num_layers: int | None
                ) -> deepseek.DeepSeekConfig:
  """The named model shape, cut to ``num_layers`` layers if given."""
  if name == "v2_lite":
    config = V2_LITE
  else:
    config = deepseek.DeepSeekConfig(num_layers=3)
    if name == "small":
      config = dataclasses.replace(config, hidden_size=1024,
                                   intermediate_size=2816, vocab_size=8192)
  if num_layers is not None:
    config = dataclasses.replace(config, num_layers=num_layers)
  return config


class Batch:
  """The batch's sequences, their shards' allocators and block tables."""

  def __init__(self, size: int, shards: int, page_size: int,
               max_tokens: int):
    self.per_shard = size // shards
    self.max_pages = -(-max_tokens // page_size)
    self.local_pages = self.per_shard * self.max_pages  # pages per shard
    self.allocs = [deepseek.PageAllocator(self.local_pages, page_size)
                   for _ in range(shards)]
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


def decode(config: deepseek.DeepSeekConfig, weights: deepseek.ModelWeights,
           *, prompt_lens: Sequence[int], context: int, new_tokens: int,
           page_size: int = 64, prefill_chunk: int = 16,
           backend: str | None = None, mesh=None, shards: int = 1,
           host_plan: bool = False, seed: int = 0,
           report: Callable[[str], None] = print) -> float:
  """Prefills (or fills) a batch and decodes it greedily, reporting each step.

  Args:
    config: the model config.
    weights: its weights (sharded already when ``mesh`` is given).
    prompt_lens: with ``context == 0``, each sequence's prompt length;
      else only their count (the batch size) is used.
    context: tokens each sequence starts with in its caches (random
      latents, no prefill), or 0 to prefill random prompts.
    new_tokens: tokens generated per sequence.
    page_size: tokens per cache page.
    prefill_chunk: prompt tokens per sequence per prefill step.
    backend: ``mla_decode``'s backend (None, ``"cuda"``, ``"reference"``).
    mesh: a mesh from ``deepseek.make_mesh``, or None.
    shards: batch shards of the mesh (dp * ep).
    host_plan: build one host plan per step (needs ``shards == 1``).
    seed: seed of prompts and cache contents.
    report: called with one line per step (tokens/s so far) and a summary.

  Returns:
    Decode tokens/s after the first decode step (which compiles); 0 when
    ``new_tokens < 2``.
  """
  b = len(prompt_lens)
  lengths = [context] * b if context else list(prompt_lens)
  batch = Batch(b, shards, page_size, max(lengths) + new_tokens)
  num_pages = shards * batch.local_pages
  if context:
    keys = jax.random.split(jax.random.key(seed), config.num_layers)
    caches = tuple(jax.random.normal(
        k, (num_pages, page_size, 1, config.latent_dim), config.jnp_dtype)
                   for k in keys)
    if config.fp8_cache:
      caches = tuple(tmla.quantize_kv(c) for c in caches)
  else:
    caches = deepseek.init_caches(config, num_pages, page_size)
  if mesh is not None:
    (caches,) = deepseek.shard_batch(mesh, caches)
  step = deepseek.make_decode_step(config, mesh, backend=backend)
  tp = 1 if mesh is None else mesh.shape["tp"]

  def run(tokens, lens):
    nonlocal caches
    table, lens = batch.grow(lens)
    plan = None
    if host_plan:
      plan = jax_thundermla_plan()(lens, s_q=tokens.shape[1],
                                   h_q=config.num_heads // tp,
                                   page_size=page_size,
                                   head_dim_v=config.kv_lora_rank)
    logits, caches = step(weights, caches, jnp.asarray(tokens, jnp.int32),
                          jnp.asarray(table), jnp.asarray(lens), plan=plan)
    return np.asarray(jnp.argmax(logits[:, -1], axis=-1))

  rng = np.random.default_rng(seed)
  if context:
    batch.grow(lengths)
    seqs = [[int(t)] for t in rng.integers(0, config.vocab_size, b)]
    next_tokens = np.array([s[-1] for s in seqs])
    seqs = [[] for _ in range(b)]
  else:
    seqs = [list(rng.integers(0, config.vocab_size, n)) for n in lengths]
    t0 = time.perf_counter()
    for ends in deepseek.prefill_windows(lengths, prefill_chunk):
      next_tokens = run(np.array([s[e - prefill_chunk:e]
                                  for s, e in zip(seqs, ends)]), ends)
    report(f"prefill: {sum(lengths)} prompt tokens in"
           f" {time.perf_counter() - t0:.2f} s (compilation included)")

  rate, timed_from, timed = 0.0, None, 0
  for i in range(new_tokens):
    t0 = time.perf_counter()
    for s, token in zip(seqs, next_tokens):
      s.append(int(token))
    lengths = [n + 1 for n in lengths]
    next_tokens = run(np.array([s[-1:] for s in seqs]), lengths)
    now = time.perf_counter()
    if i == 0:
      report(f"  step 1/{new_tokens}: {now - t0:.2f} s (compiles)")
      timed_from = now
      continue
    timed += b
    rate = timed / (now - timed_from)
    report(f"  step {i + 1}/{new_tokens}: {b / (now - t0):.1f} tokens/s,"
           f" {rate:.1f} tokens/s since step 2")
  report(f"decode: batch {b}, context now {max(lengths)}:"
         f" {rate:.1f} tokens/s after warm-up")
  return rate


def jax_thundermla_plan():
  """``jax_thundermla.plan_decode``, imported only when a host plan is used."""
  from jax_thundermla import plan_decode  # pylint: disable=g-import-not-at-top
  return plan_decode


def main(argv):
  del argv
  name = _CONFIG.value or ("v3" if jax.default_backend() == "gpu"
                           else "small")
  config = dataclasses.replace(make_config(name, _NUM_LAYERS.value),
                               kv_cache_dtype=_KV_CACHE_DTYPE.value)
  dp, ep, tp = _DP.value, _EP.value, _TP.value
  context = _CONTEXT.value
  prompt_lens = ([context] * _BATCH.value if context
                 else [int(n) for n in _PROMPT_LENS.value])
  if len(prompt_lens) % (dp * ep):
    raise app.UsageError(
        f"the batch ({len(prompt_lens)}) must divide by dp * ep = {dp * ep}")
  if _HOST_PLAN.value and dp * ep > 1:
    raise app.UsageError("--host_plan needs --dp=1 --ep=1")
  backends = [None if b == "default" else b for b in _BACKENDS.value]

  mesh = deepseek.make_mesh(dp, tp, ep=ep) if dp * ep * tp > 1 else None
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, dp={dp},"
        f" ep={ep}, tp={tp}; {name}: {config.num_layers} layers, hidden"
        f" {config.hidden_size}, {config.num_heads} heads, latent"
        f" {config.latent_dim}, {config.n_routed_experts} routed experts,"
        f" {config.dtype}, kv cache {config.kv_cache_dtype}", flush=True)
  t0 = time.perf_counter()
  weights = deepseek.init_weights(jax.random.key(_SEED.value), config)
  if mesh is not None:
    weights = deepseek.shard_weights(weights, config, mesh)
  jax.block_until_ready(weights)
  print(f"weights ready in {time.perf_counter() - t0:.1f} s", flush=True)
  rates = {}
  for backend in backends:
    print(f"backend {backend or 'default'}:", flush=True)
    rates[backend or "default"] = decode(
        config, weights, prompt_lens=prompt_lens, context=context,
        new_tokens=_NEW_TOKENS.value, page_size=_PAGE_SIZE.value,
        prefill_chunk=_PREFILL_CHUNK.value, backend=backend, mesh=mesh,
        shards=dp * ep, host_plan=_HOST_PLAN.value, seed=_SEED.value,
        report=lambda line: print(line, flush=True))
  print("tokens/s after warm-up: " + ", ".join(
      f"{k} {v:.1f}" for k, v in rates.items()), flush=True)


if __name__ == "__main__":
  app.run(main)
