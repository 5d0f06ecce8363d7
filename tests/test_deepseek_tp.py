"""Tensor (heads), expert and data (batch) parallel decode equals the
unsharded one.

On CPU the mesh is 8 fake host devices, made in a subprocess (XLA reads
``--xla_force_host_platform_device_count`` once, before JAX starts, so the
other tests keep one device). On a machine with 2+ GPUs the same check runs
in-process over the GPUs.

Tolerances follow the dtype. The sharded program sums the same products in
another order (per-device partial sums, then a psum) and, in 16-bit
models, rounds different partial results to bfloat16, so the two runs
differ by float rounding, compounded over layers. In float32 (all matmuls
at HIGHEST precision) that is ~1e-6 relative: ``TOL_FLOAT32`` checks that
the two programs compute the same function. In bfloat16 one rounding is
up to 2^-8 relative and the differences compound; ``TOL_BFLOAT16`` allows
eight such roundings, and only checks that nothing is grossly off.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_thundermla.deepseek import model as model_lib
from jax_thundermla.deepseek.cache import PageAllocator
from jax_thundermla.deepseek.parallel import (make_decode_step, make_mesh,
                                              shard_batch, shard_weights)

from test_deepseek_oracle import jitter_norms, relative_error, tiny_config

PAGE = 16
LOCAL_PAGES = 8
TOL_FLOAT32 = 1e-5
TOL_BFLOAT16 = 8 * 2.0 ** -8


def check_sharded_matches_unsharded(dp: int, tp: int, devices=None,
                                    kv_lora_rank: int = 64, *, ep: int = 1,
                                    dtype: str = "float32",
                                    moe: bool = True) -> None:
  """Prefill and decode a batch on a (dp, ep, tp) mesh and on one device.

  Each batch shard (a (dp, ep) pair) owns ``LOCAL_PAGES`` pages with its
  own allocator; the unsharded run uses the same pages under global ids, so
  every cache is comparable element by element.
  """
  moe_fields = dict(
      num_layers=3, n_routed_experts=8, n_shared_experts=1,
      moe_intermediate_size=16, num_experts_per_tok=2,
      first_k_dense_replace=1, n_group=4, topk_group=2) if moe else {}
  config = tiny_config(num_heads=16, kv_lora_rank=kv_lora_rank, dtype=dtype,
                       **moe_fields)
  tol = TOL_FLOAT32 if dtype == "float32" else TOL_BFLOAT16
  weights = jitter_norms(model_lib.init_weights(jax.random.key(0), config))
  mesh = make_mesh(dp, tp, devices, ep=ep)
  dp = dp * ep  # batch shards
  batch = 4
  per_shard = batch // dp
  prompt_lens, chunk = [9, 16, 30, 5 + 8], 4
  rng = np.random.default_rng(0)
  tokens = [list(rng.integers(0, config.vocab_size, n)) for n in prompt_lens]
  allocs = [PageAllocator(LOCAL_PAGES, PAGE) for _ in range(dp)]
  for shard, alloc in enumerate(allocs):
    alloc.allocate(range(shard * per_shard, (shard + 1) * per_shard),
                   [0] * per_shard)
  max_pages = 3

  def tables(lengths):
    local = []
    for shard, alloc in enumerate(allocs):
      ids = range(shard * per_shard, (shard + 1) * per_shard)
      for i in ids:
        alloc.grow(i, int(lengths[i]))
      local.append(alloc.block_table(ids, max_pages))
    local = np.concatenate(local)
    offsets = np.repeat(np.arange(dp) * LOCAL_PAGES, per_shard)[:, None]
    return (local, np.where(local < LOCAL_PAGES, local + offsets,
                            dp * LOCAL_PAGES),
            np.asarray(lengths, np.int32))

  sharded_step = make_decode_step(config, mesh)
  single_step = make_decode_step(config)
  sharded_weights = shard_weights(weights, config, mesh)
  w_uk = sharded_weights.layers[0].attn.w_uk
  assert w_uk.addressable_shards[0].data.shape[0] == 16 // tp
  if moe:  # layer 1 is MoE: experts over ep, their columns over tp
    w_gate = sharded_weights.layers[1].mlp.w_gate
    assert w_gate.addressable_shards[0].data.shape == (8 // ep, 256, 16 // tp)
  caches_1 = model_lib.init_caches(config, dp * LOCAL_PAGES, PAGE)
  (caches_n,) = shard_batch(mesh, model_lib.init_caches(
      config, dp * LOCAL_PAGES, PAGE))

  def both(window, lengths):
    nonlocal caches_1, caches_n
    local, global_, lens = tables(lengths)
    window = np.asarray(window, np.int32)
    want, caches_1 = single_step(weights, caches_1, window, global_, lens)
    got, caches_n = sharded_step(
        sharded_weights, caches_n, *shard_batch(mesh, window, local, lens))
    err = relative_error(got, want)
    assert err <= tol, (dp, ep, tp, dtype, err)
    for a, b in zip(caches_n, caches_1):
      assert relative_error(a, b) <= tol
    return np.asarray(want)

  for ends in model_lib.prefill_windows(prompt_lens, chunk):
    logits = both([t[e - chunk:e] for t, e in zip(tokens, ends)], ends)
  for _ in range(2):
    for t, row in zip(tokens, logits[:, -1]):
      t.append(int(np.argmax(row)))
    logits = both([t[-1:] for t in tokens], [len(t) for t in tokens])


def check_mesh_errors() -> None:
  config = tiny_config(num_heads=12)
  with pytest.raises(ValueError, match="num_heads .12. must be a multiple"):
    make_decode_step(config, make_mesh(1, 8))
  step = make_decode_step(tiny_config(num_heads=16), make_mesh(2, 4))
  with pytest.raises(ValueError, match="needs dp == 1"):
    step(None, (), None, None, None, plan=jnp.zeros(()))
  with pytest.raises(ValueError, match="n_routed_experts .8. must be a"
                     " multiple of the ep mesh size 3"):
    make_decode_step(tiny_config(n_routed_experts=8, n_group=4,
                                 topk_group=2, num_experts_per_tok=2),
                     make_mesh(1, 2, ep=3))


_SUBPROCESS = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import jax
    assert len(jax.devices()) == 8, jax.devices()
    import test_deepseek_tp as t
    t.check_sharded_matches_unsharded(dp=1, tp=8)
    t.check_sharded_matches_unsharded(dp=2, tp=4)
    t.check_sharded_matches_unsharded(dp=1, tp=2, ep=4)
    t.check_sharded_matches_unsharded(dp=2, tp=2, ep=2)
    t.check_sharded_matches_unsharded(dp=2, tp=4, dtype="bfloat16",
                                      moe=False)
    t.check_mesh_errors()
    print("sharded == unsharded")
""")


def test_sharded_equals_unsharded_on_8_cpu_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=8"))
  script = _SUBPROCESS.format(tests=os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run([sys.executable, "-c", script], env=env,
                       capture_output=True, text=True, timeout=300,
                       check=False)
  assert run.returncode == 0, run.stdout + run.stderr
  assert "sharded == unsharded" in run.stdout


def test_make_mesh_needs_enough_devices():
  with pytest.raises(ValueError, match="devices needed"):
    make_mesh(len(jax.devices()) + 1, 1)
  with pytest.raises(ValueError, match="dp and tp must be >= 1"):
    make_mesh(0, 1)


def _gpus() -> list:
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


@pytest.mark.gpu
@pytest.mark.skipif(len(_gpus()) < 2, reason="needs 2 or more GPUs")
@pytest.mark.parametrize("kv_lora_rank", [64, 512])
@pytest.mark.parametrize("dp,tp", [(1, 2), (2, 1)])
def test_sharded_equals_unsharded_on_2_gpus(dp, tp, kv_lora_rank):
  # kv_lora_rank 512 runs the CUDA kernel where it is built.
  check_sharded_matches_unsharded(dp, tp, devices=_gpus()[:2],
                                  kv_lora_rank=kv_lora_rank,
                                  dtype="bfloat16")
  if kv_lora_rank == 64:  # float32 runs the reference attention
    check_sharded_matches_unsharded(dp, tp, devices=_gpus()[:2])
