"""mla_decode over an FP8 (uint8, 656-byte) cache: the reference path, and
the CUDA kernel (bfloat16 q) where a GPU runs it.

Semantics: the cache is read as ``dequantize_kv`` reads it, then the same
math as a bf16 cache; the error bound against a float64 oracle on the
dequantized cache is the bf16 path's. The kernel dequantizes each block to
bfloat16 exactly (power-of-two scales), so on the GPU it equals the kernel
on the dequantized bf16 cache bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import jax_thundermla as tmla
from jax_thundermla import api

from conftest import assert_decode_close, numpy_mla_decode, requires_gpu

B, H_Q, D_V, D_QK, PAGE, PAGES, MAX_PAGES = 4, 4, 512, 576, 16, 12, 3
SCALE = 0.07
POISON = 0xFF  # every byte: NaN values, NaN scales, NaN rope


def fp8_inputs(seed: int = 0, *, s_q: int = 2, h_kv: int = 1,
               q_dtype=jnp.bfloat16):
  """q, an FP8 cache whose unread slots and pages are all 0xFF bytes, a
  permuted table with out-of-range padding, lengths (one empty, one
  invalid: its length exceeds the table)."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, s_q, H_Q, D_QK)), q_dtype)
  kv = rng.standard_normal((PAGES, PAGE, h_kv, D_QK)) * rng.choice(
      [0.01, 1.0, 30.0], (PAGES, PAGE, h_kv, 1))
  cache = np.array(tmla.quantize_kv(jnp.asarray(kv, jnp.bfloat16)))
  lens = np.array([37, 0, 48, 20], np.int32)
  lens[3] = MAX_PAGES * PAGE + 1  # invalid: NaN for sequence 3
  table = np.full((B, MAX_PAGES), PAGES + 3, np.int32)
  perm = rng.permutation(PAGES)
  used = np.zeros((PAGES, PAGE), bool)
  at = 0
  for i, n in enumerate(lens[:3]):
    need = -(-n // PAGE)
    table[i, :need] = perm[at:at + need]
    for p in range(need):
      used[table[i, p], :min(PAGE, n - p * PAGE)] = True
    at += need
  cache[~used] = POISON
  return q, jnp.asarray(cache), jnp.asarray(table), jnp.asarray(lens)


def oracle(q, cache, table, lens, *, causal):
  """float64 paged decode over the dequantized cache."""
  deq = np.asarray(tmla.dequantize_kv(cache, jnp.float32), np.float64)
  return numpy_mla_decode(np.asarray(q, np.float64), deq, np.asarray(table),
                          np.asarray(lens), head_dim_v=D_V,
                          softmax_scale=SCALE, causal=causal)


def decode(q, kv, table, lens, *, causal=True, **kw):
  return tmla.mla_decode(q, kv, table, lens, head_dim_v=D_V,
                         softmax_scale=SCALE, causal=causal, **kw)


@pytest.mark.parametrize("s_q,h_kv,causal,q_dtype", [
    (1, 1, False, jnp.bfloat16), (2, 1, True, jnp.bfloat16),
    (3, 2, True, jnp.bfloat16), (2, 1, True, jnp.float16)])
def test_matches_float64_oracle_on_the_dequantized_cache(s_q, h_kv, causal,
                                                        q_dtype):
  q, cache, table, lens = fp8_inputs(1, s_q=s_q, h_kv=h_kv, q_dtype=q_dtype)
  out, lse = jax.jit(lambda *a: decode(*a, causal=causal))(
      q, cache, table, lens)
  assert out.dtype == q_dtype and out.shape == (B, s_q, H_Q, D_V)
  assert lse.dtype == jnp.float32 and lse.shape == (B, H_Q, s_q)
  want_out, want_lse = oracle(q, cache, table, lens, causal=causal)
  assert_decode_close(out, lse, want_out, want_lse)
  out = np.asarray(out, np.float32)
  assert np.isnan(out[3]).all()  # invalid sequence
  assert np.isinf(np.asarray(lse[1])).all()  # empty sequence
  assert np.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("q_dtype", [jnp.bfloat16, jnp.float16])
def test_equals_the_bf16_path_on_the_dequantized_cache(q_dtype):
  """Same math on the same values: what a cache of q's dtype holding the
  dequantized values gives (they are exact in it here). The two are
  different programs, and XLA may sum their float32 products in another
  order or by another GEMM algorithm: an H100 gave differences of up to
  two units in the last place at outputs near 1, and of a 0.01 output
  that cancels values near 30 by 8e-4. So each output may differ by one
  rounding of itself plus one rounding of its row's largest output."""
  q, cache, table, lens = fp8_inputs(2, s_q=2, q_dtype=q_dtype)
  eps = float(jnp.finfo(q_dtype).eps)
  for fn in (decode, jax.jit(decode)):
    out, lse = fn(q, cache, table, lens)
    want_out, want_lse = fn(q, tmla.dequantize_kv(cache, q_dtype),
                            table, lens)
    out = np.asarray(out, np.float32)
    want_out = np.asarray(want_out, np.float32)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want_out))
    finite = np.isfinite(want_out)
    want = np.abs(np.where(finite, want_out, 0))
    bound = eps * (want + np.max(want, axis=-1, keepdims=True))
    err = np.abs(np.where(finite, out - want_out, 0))
    assert (err <= bound).all(), float(np.max(err - bound))
    np.testing.assert_array_equal(out[~finite], want_out[~finite])
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse),
                               rtol=1e-5, atol=1e-5)


def test_non_finite_scales_give_nan_rows_of_the_sequences_that_see_them():
  q, cache, table, lens = fp8_inputs(3, s_q=2)
  cache = np.array(cache)
  nan_scale = np.array([np.nan], "<f4").view(np.uint8)
  inf_scale = np.array([np.inf], "<f4").view(np.uint8)
  # Sequence 0: its last token (seen only by causal query row 1).
  pos = int(lens[0]) - 1
  cache[int(table[0, pos // PAGE]), pos % PAGE, 0, 516:520] = nan_scale
  # Sequence 2: its first token (seen by every row).
  cache[int(table[2, 0]), 0, 0, 524:528] = inf_scale
  cache = jnp.asarray(cache)
  out, lse = decode(q, cache, table, lens)
  out = np.asarray(out, np.float32)
  assert np.isfinite(out[0, 0]).all() and np.isnan(out[0, 1]).all()
  assert np.isnan(out[2]).all() and np.isnan(np.asarray(lse[2])).all()
  assert np.isinf(np.asarray(lse[1])).all()  # the empty sequence is intact
  want_out, want_lse = oracle(q, cache, table, lens, causal=True)
  assert_decode_close(out, lse, want_out, want_lse)
  # The bf16 path gives the same NaN rows for NaN keys.
  bf16_out, _ = decode(q, tmla.dequantize_kv(cache), table, lens)
  np.testing.assert_array_equal(np.isnan(out),
                                np.isnan(np.asarray(bf16_out, np.float32)))


def test_backend_choice():
  q, cache, table, lens = fp8_inputs(4)
  ref_out, ref_lse = decode(q, cache, table, lens, backend="reference")
  out, lse = decode(q, cache, table, lens)  # the kernel where a GPU runs it
  want_out, want_lse = oracle(q, cache, table, lens, causal=True)
  for o, l in ((ref_out, ref_lse), (out, lse)):
    assert_decode_close(o, l, want_out, want_lse)
  with pytest.raises(ValueError,
                     match="FP8.*bfloat16.*float16.*backend='reference'"):
    decode(q.astype(jnp.float16), cache, table, lens, backend="cuda")


@pytest.mark.parametrize("q_dtype,impl", [(jnp.bfloat16, "kernel"),
                                          (jnp.float16, "reference")])
def test_backend_none_runs_the_kernel_for_bfloat16_q(monkeypatch, q_dtype,
                                                      impl):
  monkeypatch.setattr(api._ffi, "gpu_available", lambda: True)
  monkeypatch.setattr(api._ffi, "kernel_available", lambda: True)
  monkeypatch.setattr(api._ffi, "warn_about_install", lambda: None)
  q, cache, table, lens = fp8_inputs(4, q_dtype=q_dtype)
  shapes = api._validation.validate(q, cache, table, lens, head_dim_v=D_V,
                                    softmax_scale=SCALE, causal=True)
  assert shapes.fp8_cache
  assert api._resolve_backend(None, shapes) == impl


@pytest.mark.parametrize("q_dtype,kernel", [(jnp.bfloat16, True),
                                            (jnp.float16, False)])
def test_cuda_lowering(q_dtype, kernel):
  """jax.export for cpu and cuda: the kernel in the cuda lowering of a
  bfloat16 program, the reference in a float16 one; the cpu lowering runs
  here."""
  args = fp8_inputs(5, q_dtype=q_dtype)
  exported = jax.export.export(
      jax.jit(decode), platforms=("cpu", "cuda"),
      disabled_checks=tmla.export_safety_checks())(*args)
  assert ("tmla_mla_decode" in exported.mlir_module()) == kernel
  if jax.default_backend() != "cpu":
    return
  out, lse = jax.export.deserialize(exported.serialize()).call(*args)
  want_out, want_lse = decode(*args)
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(want_out, np.float32))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("s_q,h_q,h_kv,page,causal", [
    (1, 16, 1, 64, False),
    pytest.param(2, 16, 1, 16, True, marks=pytest.mark.quick),
    (4, 32, 2, 48, True), (1, 128, 1, 256, True)])
def test_kernel_equals_the_bf16_kernel_on_the_dequantized_cache(
    s_q, h_q, h_kv, page, causal):
  """Same plans (the device plan and a host plan with splits and merges),
  same bf16 values in the stages: the same bits out."""
  rng = np.random.default_rng(s_q * 1000 + h_q + page)
  lens = np.array([1, 0, 3 * page + 5, 700, 64, 2000, 130], np.int32)
  b, max_pages = len(lens), -(-int(lens.max()) // page) + 1
  pages = b * max_pages + 3
  q = jnp.asarray(rng.standard_normal((b, s_q, h_q, D_QK)), jnp.bfloat16)
  kv = rng.standard_normal((pages, page, h_kv, D_QK)) * rng.choice(
      [0.01, 1.0, 30.0], (pages, page, h_kv, 1))
  cache = np.array(tmla.quantize_kv(jnp.asarray(kv, jnp.bfloat16)))
  cache[-1] = POISON  # a page no table holds
  table = rng.permutation(pages - 1)[:b * max_pages].reshape(b, max_pages)
  table = jnp.asarray(table, jnp.int32)
  cache = jnp.asarray(cache)
  deq = tmla.dequantize_kv(cache, jnp.bfloat16)
  host_plan = tmla.plan_decode(lens, s_q=s_q, h_q=h_q, h_kv=h_kv,
                               page_size=page, num_sms=24)
  for plan in (None, host_plan):
    fn = jax.jit(lambda q, c, t, l, plan=plan: decode(
        q, c, t, l, causal=causal, plan=plan, backend="cuda"))
    out, lse = fn(q, cache, table, jnp.asarray(lens))
    want_out, want_lse = fn(q, deq, table, jnp.asarray(lens))
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(want_out, np.float32))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(want_lse))
  want = numpy_mla_decode(
      np.asarray(q, np.float64), np.asarray(deq, np.float64),
      np.asarray(table), lens, head_dim_v=D_V, softmax_scale=SCALE,
      causal=causal)
  assert_decode_close(out, lse, *want)


def test_vmap_and_host_plan():
  q, cache, table, lens = fp8_inputs(6)
  q2, cache2, _, _ = fp8_inputs(7)
  caches, qs = jnp.stack([cache, cache2]), jnp.stack([q, q2])
  out, lse = jax.vmap(decode)(qs, caches, jnp.stack([table] * 2),
                              jnp.stack([lens] * 2))
  for i, (qi, ci) in enumerate(((q, cache), (q2, cache2))):
    want_out, want_lse = decode(qi, ci, table, lens)
    np.testing.assert_allclose(np.asarray(out[i], np.float32),
                               np.asarray(want_out, np.float32), atol=1e-2)
    np.testing.assert_allclose(np.asarray(lse[i]), np.asarray(want_lse),
                               atol=1e-4)
  valid = np.array(lens).copy()
  valid[3] = 5
  plan = tmla.plan_decode(valid, s_q=2, h_q=H_Q, page_size=PAGE)
  planned, _ = decode(q, cache, table, jnp.asarray(valid), plan=plan)
  plain, _ = decode(q, cache, table, jnp.asarray(valid))
  np.testing.assert_array_equal(np.asarray(planned, np.float32),
                                np.asarray(plain, np.float32))
  stale, _ = decode(q, cache, table, jnp.asarray(valid + 1), plan=plan)
  assert np.isnan(np.asarray(stale, np.float32)).all()


def check_sharded() -> None:
  """Batch and heads split over 8 devices: local, equal to unsharded."""
  mesh = jax.make_mesh((4, 2), ("data", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  q, cache, table, lens = fp8_inputs(8)
  q = jnp.concatenate([q, q[::-1]])
  table, lens = jnp.concatenate([table] * 2), jnp.concatenate([lens] * 2)
  fn = jax.jit(decode)
  want_out, want_lse = fn(q, cache, table, lens)
  put = lambda x, *s: jax.device_put(x, NamedSharding(mesh, P(*s)))
  args = (put(q, "data", None, "tp"), cache, put(table, "data"),
          put(lens, "data"))
  out, lse = fn(*args)
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(want_out, np.float32))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(want_lse))
  assert tuple(out.sharding.spec)[:3] == ("data", None, "tp")
  assert "all-gather" not in fn.lower(*args).compile().as_text()


def test_sharded_on_8_cpu_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=8"))
  script = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
      import test_fp8_decode as t
      t.check_sharded()
      print("sharded == unsharded")
  """)
  run = subprocess.run([sys.executable, "-c", script], env=env,
                       capture_output=True, text=True, timeout=600,
                       check=False)
  assert run.returncode == 0, run.stdout + run.stderr[-5000:]
  assert "sharded == unsharded" in run.stdout


def _bad(**overrides):
  """The call with some arguments replaced, traced (not run) under jit."""
  q, cache, table, lens = fp8_inputs(9)
  args = dict(q=q, kv_cache=cache, block_table=table, cache_seqlens=lens)
  kwargs = dict(head_dim_v=D_V)
  for k, v in overrides.items():
    (args if k in args else kwargs)[k] = v
  return jax.jit(lambda *a: tmla.mla_decode(*a, **kwargs)).trace(
      *args.values())


@pytest.mark.parametrize("overrides,error,words", [
    (dict(kv_cache=jnp.zeros((PAGES, PAGE, 1, 600), jnp.uint8)), ValueError,
     ["kv_cache", "uint8", "656", "600"]),
    (dict(kv_cache=jnp.zeros((PAGES, PAGE, 1, 576), jnp.uint8)), ValueError,
     ["kv_cache", "uint8", "656", "576"]),
    (dict(kv_cache=jnp.zeros((PAGES, PAGE, 1, 600), jnp.bfloat16)),
     ValueError, ["kv_cache", "576", "600"]),
    (dict(kv_cache=jnp.zeros((PAGES, PAGE, 1, 656), jnp.bfloat16)),
     ValueError, ["kv_cache", "576", "656", "uint8"]),
    (dict(kv_cache=jnp.zeros((PAGES, PAGE, 1, 576), jnp.float8_e4m3fn)),
     TypeError, ["kv_cache", "uint8", "656", "float8_e4m3fn", "scales"]),
    (dict(kv_cache=jnp.zeros((PAGES, PAGE, 1, 656), jnp.int8)), TypeError,
     ["kv_cache", "bfloat16", "uint8", "int8"]),
    (dict(kv_cache=jnp.zeros((PAGES, PAGE, 656), jnp.uint8)), ValueError,
     ["kv_cache", "rank 4"]),
    (dict(q=jnp.zeros((B, 2, H_Q, 96), jnp.bfloat16), head_dim_v=32),
     ValueError, ["FP8", "d_qk", "576", "96"]),
    (dict(q=jnp.zeros((B, 2, H_Q, D_QK), jnp.float32)), TypeError,
     ["q", "bfloat16 or float16", "float32"]),
])
def test_bad_input_is_named_at_trace_time(overrides, error, words):
  with pytest.raises(error) as e:
    _bad(**overrides)
  for word in words:
    assert word in str(e.value), (word, str(e.value))
