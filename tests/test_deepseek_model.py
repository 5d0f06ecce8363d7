"""Absorbed MLA over the paged cache equals textbook MLA, layer and model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_thundermla
from jax_thundermla.deepseek import cache as cache_lib
from jax_thundermla.deepseek import layer as layer_lib
from jax_thundermla.deepseek import model as model_lib
from jax_thundermla.deepseek.parallel import make_decode_step

from conftest import requires_gpu
from test_deepseek_oracle import (jitter_norms, relative_error,
                                  textbook_attention, textbook_latents,
                                  textbook_logits, tiny_config)

PAGE = 16
TOL = 2e-2


def _grow_all(alloc, ids, lengths, max_pages):
  for seq_id, n in zip(ids, lengths):
    alloc.grow(seq_id, int(n))
  return (jnp.asarray(alloc.block_table(ids, max_pages)),
          jnp.asarray(alloc.seqlens(ids)))


def test_attention_layer_matches_textbook_over_decode_steps():
  config = tiny_config()
  weights = jitter_norms(model_lib.init_weights(jax.random.key(0), config))
  attn = weights.layers[0].attn
  rng = np.random.default_rng(0)
  ids, cached = ["a", "b", "c"], [5, 17, 33]
  s_qs = [3, 1, 1]  # new tokens per step, all sequences alike
  total = [n + sum(s_qs) for n in cached]
  hidden = [rng.standard_normal((n, config.hidden_size)).astype(jnp.bfloat16)
            for n in total]

  alloc = cache_lib.PageAllocator(num_pages=12, page_size=PAGE)
  alloc.allocate(ids, [0, 0, 0])
  # Pages of different sequences interleave: grow them a page at a time.
  for n in range(PAGE, max(cached) + PAGE, PAGE):
    for seq_id, length in zip(ids, cached):
      alloc.grow(seq_id, min(n, length))
  max_pages = 4
  cache = cache_lib.init_cache(12, PAGE, config.latent_dim, jnp.bfloat16,
                               fill=float("nan"))
  # The earlier tokens' entries, as previous steps would have written them:
  # one append of left-padded rows (rows at negative positions are dropped).
  entries = np.zeros((len(ids), max(cached), config.latent_dim))
  for i, n in enumerate(cached):
    entries[i, max(cached) - n:] = textbook_latents(attn, hidden[i][:n],
                                                    config)
  cache = cache_lib.append_latent_jit(
      cache, entries.astype(jnp.bfloat16),
      jnp.asarray(alloc.block_table(ids, max_pages)),
      jnp.asarray(alloc.seqlens(ids)))

  attend = jax.jit(
      lambda a, x, c, t, l: layer_lib.mla_attention(a, x, c, t, l,
                                                    config=config),
      donate_argnums=2)
  lengths = list(cached)
  for s_q in s_qs:
    lengths = [n + s_q for n in lengths]
    table, seqlens = _grow_all(alloc, ids, lengths, max_pages)
    x = np.stack([h[n - s_q:n] for h, n in zip(hidden, lengths)])
    out, cache = attend(attn, x, cache, table, seqlens)
    out = np.asarray(out)
    for i, n in enumerate(lengths):
      want = textbook_attention(attn, hidden[i][:n], config)[n - s_q:]
      assert relative_error(out[i], want) <= TOL, (s_q, i)


@pytest.mark.parametrize("kv_lora_rank", [
    64, pytest.param(512, marks=(requires_gpu, pytest.mark.gpu))])
def test_model_decode_matches_textbook_with_chunked_prefill(kv_lora_rank):
  # With kv_lora_rank 512 (576-wide entries) a GPU runs the CUDA kernel.
  config = tiny_config(kv_lora_rank=kv_lora_rank)
  weights = jitter_norms(model_lib.init_weights(jax.random.key(1), config))
  rng = np.random.default_rng(1)
  ids, prompt_lens, chunk, new_tokens = [0, 1, 2], [8, 21, 37], 8, 3
  tokens = [list(rng.integers(0, config.vocab_size, n)) for n in prompt_lens]
  num_pages, max_pages = 12, 4
  alloc = cache_lib.PageAllocator(num_pages, PAGE)
  alloc.allocate(ids, [0, 0, 0])
  caches = model_lib.init_caches(config, num_pages, PAGE, fill=float("nan"))
  step = make_decode_step(config)

  for ends in model_lib.prefill_windows(prompt_lens, chunk):
    table, seqlens = _grow_all(alloc, ids, ends, max_pages)
    window = jnp.asarray([t[e - chunk:e] for t, e in zip(tokens, ends)],
                         jnp.int32)
    logits, caches = step(weights, caches, window, table, seqlens)
    logits = np.asarray(logits)
    for i, e in enumerate(ends):
      want = textbook_logits(weights, tokens[i][:e], config)[e - chunk:]
      assert relative_error(logits[i], want) <= TOL, ("prefill", i, e)

  for _ in range(new_tokens):
    for t, row in zip(tokens, logits[:, -1]):
      t.append(int(np.argmax(row)))
    table, seqlens = _grow_all(alloc, ids, [len(t) for t in tokens],
                               max_pages)
    logits, caches = step(weights, caches,
                          jnp.asarray([t[-1:] for t in tokens], jnp.int32),
                          table, seqlens)
    logits = np.asarray(logits)
    for i, t in enumerate(tokens):
      want = textbook_logits(weights, t, config)[-1:]
      assert relative_error(logits[i], want) <= TOL, ("decode", i, len(t))


def test_decode_step_updates_caches_in_place():
  config = tiny_config(num_layers=1)
  weights = model_lib.init_weights(jax.random.key(2), config)
  caches = model_lib.init_caches(config, 1024, PAGE)
  step = make_decode_step(config)
  args = (weights, caches, jnp.zeros((2, 1), jnp.int32),
          jnp.zeros((2, 4), jnp.int32), jnp.ones((2,), jnp.int32))
  compiled = step.lower(*args).compile()
  assert "input_output_alias" in compiled.as_text()
  assert compiled.memory_analysis().temp_size_in_bytes < caches[0].nbytes
  _, new_caches = step(*args)
  assert caches[0].is_deleted() and not new_caches[0].is_deleted()


def test_decode_step_rejects_wrong_cache_count():
  config = tiny_config()
  weights = model_lib.init_weights(jax.random.key(3), config)
  caches = model_lib.init_caches(config, 4, PAGE)[:1]
  with pytest.raises(ValueError, match="one cache per layer"):
    model_lib.decode_step(weights, caches, jnp.zeros((1, 1), jnp.int32),
                          jnp.zeros((1, 1), jnp.int32),
                          jnp.ones((1,), jnp.int32), config=config)


def test_prefill_windows():
  ends = model_lib.prefill_windows([8, 21, 37], 8)
  np.testing.assert_array_equal(
      ends, [[8, 8, 8], [8, 16, 16], [8, 21, 24], [8, 21, 32], [8, 21, 37]])
  assert ends.dtype == np.int32
  with pytest.raises(ValueError, match="at least chunk=8"):
    model_lib.prefill_windows([8, 7], 8)
  with pytest.raises(ValueError, match="chunk must be >= 1"):
    model_lib.prefill_windows([8], 0)


def test_one_host_plan_serves_every_layer():
  plan_decode = getattr(jax_thundermla, "plan_decode", None)
  if plan_decode is None:
    pytest.skip("jax_thundermla.plan_decode is not available")
  config = tiny_config()
  weights = model_lib.init_weights(jax.random.key(4), config)
  step = make_decode_step(config)
  tokens = jnp.asarray([[1, 2, 3], [4, 5, 6]], jnp.int32)
  table = jnp.asarray([[0, 1], [2, 3]], jnp.int32)
  lens = np.array([3, 29], np.int32)

  def run(plan):
    caches = model_lib.init_caches(config, 4, PAGE)
    return np.asarray(step(weights, caches, tokens, table, jnp.asarray(lens),
                           plan=plan)[0])

  kwargs = dict(s_q=3, h_q=config.num_heads, page_size=PAGE,
                head_dim_v=config.kv_lora_rank)
  want = run(None)
  np.testing.assert_array_equal(run(plan_decode(lens, **kwargs)), want)
  stale = run(plan_decode(lens + 1, **kwargs))
  assert np.isnan(stale).all()
