"""The CUDA megakernel against the reference, on a GPU (skipped elsewhere).

The oracle is the pure-JAX reference run in float32 on the same GPU. Every
input has NaN in unused cache slots and unreferenced pages, permuted page
tables and out-of-range ids in table padding.

Tests marked ``quick`` together cover every feature of the kernel (page
sizes, s_q up to 16, h_q 16/64/128, h_kv > 1, causal on and off, fp16 and
bf16, plan=None and the static and makespan plans (whole-tile and
row-spread merges), zero lengths, stale and mismatched plans, bad tables,
bitwise-identical repeats): ``pytest -m quick``.
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

import jax_thundermla as tmla
from jax_thundermla import isa
from jax_thundermla.plan.plan import default_num_sms
from jax_thundermla.workloads import WORKLOADS, Workload, make_inputs

from conftest import assert_decode_close, requires_gpu

pytestmark = [requires_gpu, pytest.mark.gpu]
quick = pytest.mark.quick

SCHEDULERS = ("balanced", "static", "makespan")


def _inputs(w: Workload, seed: int, dtype=jnp.bfloat16):
  q, caches, table, lens = make_inputs(w, seed=seed, dtype=np.float32,
                                       extra_pages=2)
  return (jnp.asarray(q, dtype), jnp.asarray(caches[0], dtype),
          jnp.asarray(table), jnp.asarray(lens))


def _poison_allocator(w: Workload) -> None:
  """Leaves NaN in freed device memory of the outputs' sizes, so that an
  output element the kernel fails to write shows up as NaN."""
  for shape, dtype in (((w.batch, w.s_q, w.h_q, w.d_v), jnp.bfloat16),
                       ((w.batch, w.h_q, w.s_q), jnp.float32)):
    jax.block_until_ready(jnp.full(shape, jnp.nan, dtype)).delete()


def _check(w: Workload, *, scheduler: str | None = None, seed: int = 0,
           inputs=None):
  q, kv, table, lens = inputs or _inputs(w, seed)
  plan = None
  if scheduler is not None:
    plan = tmla.plan_decode(np.asarray(lens), s_q=w.s_q, h_q=w.h_q,
                            h_kv=w.h_kv, page_size=w.page_size,
                            scheduler=scheduler)
  want = tmla.mla_decode(q, kv, table, lens, softmax_scale=w.softmax_scale,
                         causal=w.causal, backend="reference")
  _poison_allocator(w)
  got = tmla.mla_decode(q, kv, table, lens, softmax_scale=w.softmax_scale,
                        causal=w.causal, plan=plan, backend="cuda")
  assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
  assert_decode_close(got[0], got[1], np.asarray(want[0], np.float64),
                      np.asarray(want[1], np.float64))
  return got


def _lengths(b: int, page_size: int, long: int, rng) -> tuple[int, ...]:
  special = [0, 1, page_size - 1, page_size, page_size + 1, 3 * page_size + 5,
             long, 1000]
  lens = [special[i % len(special)] for i in range(b)]
  lens = [int(n) for n in rng.permutation(lens)]
  return tuple(lens)


_B = (1, 2, 4, 33, 128)
_S_Q = (1, 2, 4, 8)
_H_Q = (16, 32, 64, 128)
_PAGES = (16, 64, 256)
_LONG = (4097, 65536, 20000, 2049, 300)
_CASES = [
    (b, s_q, _H_Q[(i + j) % 4], _PAGES[(i + 2 * j) % 3], bool((i + j) % 2),
     SCHEDULERS[(i * 4 + j) % 3] if (i + j) % 3 else None, _LONG[i])
    for i, b in enumerate(_B) for j, s_q in enumerate(_S_Q)
]


@pytest.mark.parametrize("b,s_q,h_q,page_size,causal,scheduler,long", _CASES)
def test_matches_reference(b, s_q, h_q, page_size, causal, scheduler, long):
  rng = np.random.default_rng(b * 31 + s_q)
  if b * long > 400_000:  # keep the device memory and time modest
    long = 400_000 // b
  w = Workload("t", _lengths(b, page_size, long, rng), s_q=s_q, h_q=h_q,
               page_size=page_size, causal=causal)
  _check(w, scheduler=scheduler, seed=b + s_q)


# One configuration per row; together every page size class, s_q up to 16,
# h_q 16/64/128, h_kv 1 and 2, causal on and off, fp16 and bf16.
_FEATURES = [
    # b, s_q, h_q, h_kv, page_size, causal, dtype, long
    (4, 1, 16, 1, 64, False, jnp.bfloat16, 20000),
    (9, 2, 128, 1, 16, True, jnp.float16, 3000),
    (9, 4, 64, 2, 256, True, jnp.bfloat16, 9000),
    (9, 8, 16, 1, 32, False, jnp.float16, 5000),
    (9, 16, 16, 1, 128, True, jnp.bfloat16, 12000),
    (3, 16, 128, 1, 48, True, jnp.bfloat16, 2000),
]


@quick
@pytest.mark.parametrize("b,s_q,h_q,h_kv,page_size,causal,dtype,long",
                         _FEATURES)
def test_feature_matrix(b, s_q, h_q, h_kv, page_size, causal, dtype, long):
  """plan=None, static and makespan plans on one batch of lengths 0, 1,
  page boundaries and a long one; each twice (bitwise equal); a stale
  plan."""
  special = (0, long, 1, page_size - 1, page_size, page_size + 1,
             3 * page_size + 5, 1000, s_q - 1)
  lens = [special[i % len(special)] for i in range(b)]
  lens = tuple(int(n) for n in np.random.default_rng(b).permutation(lens))
  w = Workload("t", lens, s_q=s_q, h_q=h_q, h_kv=h_kv, page_size=page_size,
               causal=causal)
  q, kv, table, lens = _inputs(w, b + s_q, dtype)
  want = tmla.mla_decode(q, kv, table, lens, softmax_scale=w.softmax_scale,
                         causal=causal, backend="reference")
  want = [np.asarray(x, np.float64) for x in want]
  host = np.asarray(lens)
  # The balanced scheduler makes the same instruction kinds as these two
  # (test_matches_reference runs it); leaving it out keeps the subset short.
  plans = [None] + [
      tmla.plan_decode(host, s_q=s_q, h_q=h_q, h_kv=h_kv,
                       page_size=page_size, scheduler=scheduler)
      for scheduler in ("static", "makespan")]
  fn = jax.jit(lambda q, kv, table, lens, plan: tmla.mla_decode(
      q, kv, table, lens, plan=plan, softmax_scale=w.softmax_scale,
      causal=causal, backend="cuda"))
  for plan in plans:
    _poison_allocator(w)
    out, lse = fn(q, kv, table, lens, plan)
    assert out.dtype == dtype
    assert_decode_close(out, lse, *want)
    again = fn(q, kv, table, lens, plan)
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(lse))
  stale = host.copy()
  longest = int(np.argmax(host))
  stale[longest] -= 1
  plan = tmla.plan_decode(stale, s_q=s_q, h_q=h_q, h_kv=h_kv,
                          page_size=page_size, scheduler="makespan")
  out, lse = fn(q, kv, table, lens, plan)
  out = np.asarray(out, np.float32)
  lse = np.asarray(lse)
  assert np.isnan(out[longest]).all() and np.isnan(lse[longest]).all()
  others = np.arange(b) != longest
  assert_decode_close(out[others], lse[others], want[0][others],
                      want[1][others])


@pytest.mark.parametrize("name", ["W1", "W2", "W4"])
@pytest.mark.parametrize("scheduler", (None,) + SCHEDULERS)
def test_anchor_workloads(name, scheduler):
  _check(WORKLOADS[name], scheduler=scheduler)


@pytest.mark.parametrize("h_kv", [2, 4])
def test_several_kv_heads(h_kv):
  w = Workload("t", (130, 1, 700), s_q=2, h_q=16, h_kv=h_kv, page_size=64,
               causal=True)
  _check(w)


def test_fp16():
  w = Workload("t", (513, 64, 7), s_q=2, h_q=16, page_size=64)
  q, kv, table, lens = _inputs(w, 3)
  want = tmla.mla_decode(q.astype(jnp.float16), kv.astype(jnp.float16),
                         table, lens, backend="reference")
  got = tmla.mla_decode(q.astype(jnp.float16), kv.astype(jnp.float16),
                        table, lens, backend="cuda")
  assert got[0].dtype == jnp.float16
  assert_decode_close(got[0], got[1], np.asarray(want[0], np.float64),
                      np.asarray(want[1], np.float64))


@quick
def test_repeated_runs_are_identical():
  w = WORKLOADS["W1"]
  q, kv, table, lens = _inputs(w, 7)
  plan = tmla.plan_decode(np.asarray(lens), s_q=w.s_q, h_q=w.h_q,
                          scheduler="makespan")
  fn = jax.jit(lambda q, kv, table, lens, plan: tmla.mla_decode(
      q, kv, table, lens, plan=plan, softmax_scale=w.softmax_scale,
      causal=True, backend="cuda"))
  first = [np.asarray(x) for x in fn(q, kv, table, lens, plan)]
  for _ in range(19):
    again = fn(q, kv, table, lens, plan)
    np.testing.assert_array_equal(np.asarray(again[0]), first[0])
    np.testing.assert_array_equal(np.asarray(again[1]), first[1])


@quick
def test_bad_tables_and_lengths_give_nan_never_a_fault():
  w = Workload("t", (300, 300, 300, 300, 300), s_q=2, h_q=16, page_size=64)
  q, kv, table, lens = _inputs(w, 11)
  table = np.asarray(table).copy()
  lens = np.asarray(lens).copy()
  table[0, 2] = 10_000_000       # page id past the pool
  table[1, 0] = -3               # negative page id
  lens[2] = table.shape[1] * 64 + 100  # longer than the table
  lens[3] = -1                   # negative length
  out, lse = tmla.mla_decode(q, kv, jnp.asarray(table), jnp.asarray(lens),
                             backend="cuda")
  out = np.asarray(out, np.float32)
  lse = np.asarray(lse)
  assert np.isnan(out[:4]).all() and np.isnan(lse[:4]).all()
  want = tmla.mla_decode(q, kv, jnp.asarray(table), jnp.asarray(lens),
                         backend="reference")
  assert_decode_close(out[4:], lse[4:], np.asarray(want[0][4:], np.float64),
                      np.asarray(want[1][4:], np.float64))


def test_plan_for_other_lengths_gives_nan_for_those_sequences():
  w = Workload("t", (500, 70), s_q=1, h_q=16, page_size=64)
  q, kv, table, lens = _inputs(w, 2)
  plan = tmla.plan_decode(np.array([400, 70]), s_q=1, h_q=16)
  out, lse = tmla.mla_decode(q, kv, table, lens, plan=plan, backend="cuda")
  out = np.asarray(out, np.float32)
  lse = np.asarray(lse)
  assert np.isnan(out[0]).all() and np.isnan(lse[0]).all()
  want = tmla.mla_decode(q, kv, table, lens, backend="reference")
  assert_decode_close(out[1:], lse[1:], np.asarray(want[0][1:], np.float64),
                      np.asarray(want[1][1:], np.float64))


@pytest.mark.parametrize("scheduler", [
    pytest.param(s, marks=quick if s == "makespan" else ())
    for s in SCHEDULERS])
def test_bad_page_in_one_piece_poisons_the_merged_sequence(scheduler):
  # Sequence 0 is cut into many pieces merged by REDUCEs (spread by rows
  # under the makespan scheduler); one bad page id in one piece must turn
  # every output row of the sequence into NaN, and leave the others exact.
  w = Workload("t", (40_000, 900, 3000), s_q=4, h_q=16, page_size=64,
               causal=True)
  q, kv, table, lens = _inputs(w, 13)
  table = np.asarray(table).copy()
  table[0, 300] = -7
  plan = tmla.plan_decode(np.asarray(lens), s_q=4, h_q=16,
                          scheduler=scheduler)
  ops = isa.Fields(np.asarray(plan.instructions)).opcode
  assert (ops == isa.OP_REDUCE).sum() >= 1
  out, lse = tmla.mla_decode(q, kv, jnp.asarray(table), lens, plan=plan,
                             causal=True, softmax_scale=w.softmax_scale,
                             backend="cuda")
  out = np.asarray(out, np.float32)
  lse = np.asarray(lse)
  assert np.isnan(out[0]).all() and np.isnan(lse[0]).all()
  want = tmla.mla_decode(q, kv, jnp.asarray(table), lens, causal=True,
                         softmax_scale=w.softmax_scale, backend="reference")
  assert_decode_close(out[1:], lse[1:], np.asarray(want[0][1:], np.float64),
                      np.asarray(want[1][1:], np.float64))


@quick
def test_scan_over_layers_with_one_plan():
  w = Workload("t", (3000, 64, 1), s_q=4, h_q=16, page_size=64, causal=True)
  q, kv, table, lens = _inputs(w, 5)
  caches = jnp.stack([kv, kv * 0.5, -kv])
  plan = tmla.plan_decode(np.asarray(lens), s_q=4, h_q=16)

  @jax.jit
  def layers(q, caches, table, lens, plan):
    def body(carry, cache):
      out, _ = tmla.mla_decode(q, cache, table, lens, causal=True, plan=plan,
                               softmax_scale=w.softmax_scale, backend="cuda")
      return carry + out.astype(jnp.float32).sum(), out
    return jax.lax.scan(body, 0.0, caches)[1]

  outs = layers(q, caches, table, lens, plan)
  for i in range(3):
    want = tmla.mla_decode(q, caches[i], table, lens, causal=True,
                           softmax_scale=w.softmax_scale, backend="reference")
    assert_decode_close(outs[i], want[1], np.asarray(want[0], np.float64),
                        np.asarray(want[1], np.float64))


@quick
def test_scan_over_layers_plans_once_outside_the_loop():
  # plan=None, lengths closed over by the scan body: one planning call,
  # staged before the loop, and every layer right.
  w = Workload("t", (3000, 64, 1, 700), s_q=2, h_q=16, page_size=64,
               causal=True)
  q, kv, table, lens = _inputs(w, 6)
  caches = jnp.stack([kv, kv * 0.5, -kv])

  @jax.jit
  def layers(q, caches, table, lens):
    def body(carry, cache):
      out, lse = tmla.mla_decode(q, cache, table, lens, causal=True,
                                 softmax_scale=w.softmax_scale)
      return carry, (out, lse)
    return jax.lax.scan(body, 0, caches)[1]

  text = layers.lower(q, caches, table, lens).as_text()
  assert text.count("tmla_plan") == 1, text.count("tmla_plan")
  assert text.index("tmla_plan") < text.index("stablehlo.while")
  outs, lses = layers(q, caches, table, lens)
  for i in range(3):
    want = tmla.mla_decode(q, caches[i], table, lens, causal=True,
                           softmax_scale=w.softmax_scale, backend="reference")
    assert_decode_close(outs[i], lses[i], np.asarray(want[0], np.float64),
                        np.asarray(want[1], np.float64))


@quick
@pytest.mark.parametrize("scheduler", [None, "makespan"])
@pytest.mark.parametrize("poison", ["nan_key", "nan_rope"])
def test_keys_hidden_by_causality_never_affect_a_row(scheduler, poison):
  # s_q = 4, causal: key n - 2 is seen by tokens 2 and 3 only. Sequence 0
  # is long enough to be cut into pieces merged by REDUCEs.
  w = Workload("t", (9000, 130, 5), s_q=4, h_q=16, page_size=64,
               causal=True)
  q, caches, table, lens = make_inputs(w, seed=8, dtype=np.float32,
                                       extra_pages=2)
  kv = caches[0]
  for i, n in enumerate(w.seqlens):
    row = kv[table[i, (n - 2) // 64], (n - 2) % 64]  # [h_kv, d_qk], a view
    if poison == "nan_key":
      row[:] = np.nan
    else:
      row[:, w.d_v:] = np.nan
  args = (jnp.asarray(q, jnp.bfloat16), jnp.asarray(kv, jnp.bfloat16),
          jnp.asarray(table), jnp.asarray(lens))
  plan = scheduler and tmla.plan_decode(lens, s_q=4, h_q=16,
                                        scheduler=scheduler)
  out, lse = tmla.mla_decode(*args, plan=plan, causal=True,
                             softmax_scale=w.softmax_scale, backend="cuda")
  out = np.asarray(out, np.float32)
  lse = np.asarray(lse)
  assert np.isfinite(out[:, :2]).all() and np.isfinite(lse[:, :, :2]).all()
  assert np.isnan(out[:, 2:]).all() and np.isnan(lse[:, :, 2:]).all()
  want = tmla.mla_decode(*args, causal=True, softmax_scale=w.softmax_scale,
                         backend="reference")
  assert_decode_close(out, lse, np.asarray(want[0], np.float64),
                      np.asarray(want[1], np.float64))


@quick
def test_mismatched_plans_are_refused_or_give_nan():
  w = Workload("t", (500, 70, 0), s_q=2, h_q=16, page_size=64)
  q, kv, table, lens = _inputs(w, 6)
  host = np.asarray(lens)
  call = lambda plan: tmla.mla_decode(q, kv, table, lens, plan=plan,
                                      backend="cuda")
  for kwargs, name in ((dict(page_size=16), "page_size"),
                       (dict(head_dim_v=128), "head_dim_v"),
                       (dict(h_kv=2, h_q=16), "h_kv"),
                       (dict(s_q=1), "s_q")):
    args = dict(s_q=2, h_q=16, page_size=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"plan: built for {name}="):
      call(tmla.plan_decode(host, **args))
  sms = default_num_sms()
  with pytest.raises(Exception, match="SMs"):
    jax.block_until_ready(call(tmla.plan_decode(host, s_q=2, h_q=16,
                                                num_sms=sms + 1)))
  # A device plan whose bound clamps a length: that sequence is NaN.
  clamped = tmla.plan_on_device(lens, s_q=2, h_q=16, max_seqlen=256)
  out, lse = call(clamped)
  out = np.asarray(out, np.float32)
  lse = np.asarray(lse)
  assert np.isnan(out[0]).all() and np.isnan(lse[0]).all()
  want = tmla.mla_decode(q, kv, table, lens, backend="reference")
  assert_decode_close(out[1:], lse[1:], np.asarray(want[0][1:], np.float64),
                      np.asarray(want[1][1:], np.float64))


_SUBPROCESS = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import jax_thundermla as tmla
    from jax_thundermla.workloads import WORKLOADS, make_inputs
    w = WORKLOADS["W4"]
    q, c, t, l = make_inputs(w, seed=1, dtype=np.float32)
    args = (jnp.asarray(q, jnp.bfloat16), jnp.asarray(c[0], jnp.bfloat16),
            jnp.asarray(t), jnp.asarray(l))
    f = jax.jit(lambda *a: tmla.mla_decode(*a, causal=True, backend="cuda"))
    g = jax.jit(lambda *a: tmla.mla_decode(*a, causal=True,
                                           backend="reference"))
    for _ in range(3):
      out, lse = f(*args)
    want = g(*args)
    err = float(jnp.linalg.norm((out - want[0]).astype(jnp.float32))
                / jnp.linalg.norm(want[0].astype(jnp.float32)))
    print("ERR", err, float(jnp.abs(lse - want[1]).max()))
""")


@pytest.mark.parametrize("flags", ["", "--xla_gpu_enable_command_buffer="])
def test_command_buffers_on_and_off(flags):
  env = dict(os.environ, XLA_FLAGS=flags)
  result = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("ERR")][-1]
  _, rel, lse_err = line.split()
  assert float(rel) <= 1e-2 and float(lse_err) <= 1e-3


def test_second_device():
  gpus = jax.devices("gpu")
  if len(gpus) < 2:
    pytest.skip("needs two GPUs")
  w = Workload("t", (900, 33), s_q=2, h_q=16, page_size=64)
  args = [jax.device_put(x, gpus[1]) for x in _inputs(w, 4)]
  out, lse = jax.jit(lambda *a: tmla.mla_decode(*a, backend="cuda"))(*args)
  assert out.devices() == {gpus[1]}
  want = tmla.mla_decode(*args, backend="reference")
  assert_decode_close(out, lse, np.asarray(want[0], np.float64),
                      np.asarray(want[1], np.float64))
