"""The compiled planner (csrc/planner.h) on the CPU, and on the GPU.

Every plan it makes must run correctly in the virtual machine and be
predicted within 10 % of the host makespan scheduler's makespan; where it
picks the backwards layout it must equal the host scheduler's plan.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_decode_close
from conftest import numpy_mla_decode
from conftest import requires_gpu
from jax_thundermla import _ffi
from jax_thundermla import isa
from jax_thundermla import vm
from jax_thundermla.plan import balanced
from jax_thundermla.plan import device_ffi
from jax_thundermla.plan import plan_decode
from jax_thundermla.plan import plan_on_device
from jax_thundermla.plan import timing
from jax_thundermla.plan.cost import CostModel
from jax_thundermla.workloads import WORKLOADS

pytestmark = pytest.mark.skipif(
    not device_ffi.available(), reason="needs the compiled extension")

NUM_SMS = 132
PAGE = 64
MAX_SEQLEN = 1 << 20
# Predicted makespan of a compiled plan over the host makespan plan's.
MAX_RATIO = 1.10


def _plan(lens, *, s_q, h_q, h_kv=1, num_sms=NUM_SMS, page_size=PAGE,
          max_seqlen=MAX_SEQLEN, device=None):
  lens = jnp.asarray(np.asarray(lens, np.int32))
  if device is not None:
    lens = jax.device_put(lens, device)
  ins, seqlens, info = device_ffi.plan_arrays(
      lens, s_q=s_q, h_q=h_q, h_kv=h_kv, page_size=page_size,
      max_seqlen=max_seqlen, head_dim_v=512, num_sms=num_sms,
      cost=CostModel())
  return np.asarray(ins), np.asarray(seqlens), np.asarray(info)


def _live_rows(ins):
  """The rows each SM executes and its STOP row (the rest is unwritten)."""
  live = timing.live_mask(ins)
  upto = np.minimum(live.sum(1) + 1, ins.shape[1])
  keep = np.arange(ins.shape[1])[None, :] < upto[:, None]
  return np.where(keep[..., None], ins, 0)


def _draw_lengths(rng, b):
  kind = rng.integers(0, 5)
  if kind == 0:
    lens = rng.integers(0, 8192, b)
  elif kind == 1:
    lens = rng.integers(0, 70_000, b)
  elif kind == 2:  # one huge sequence among short ones
    lens = rng.integers(0, 2000, b)
    lens[rng.integers(b)] = rng.integers(100_000, MAX_SEQLEN)
  elif kind == 3:
    lens = (rng.pareto(1.0, b) * 500).astype(np.int64).clip(0, 500_000)
  else:
    lens = np.zeros(b, np.int64)
    lens[: rng.integers(0, b + 1)] = rng.integers(0, 300)
  lens[rng.random(b) < 0.1] = 0
  return lens


def _shapes(count, seed):
  rng = np.random.default_rng(seed)
  shapes = [(1, 1, 16), (256, 1, 16), (256, 4, 16), (1, 16, 128)]
  while len(shapes) < count:
    b = int(rng.choice([1, 2, 4, 16, 64, 128, 256]))
    shapes.append((int(rng.integers(1, b + 1)), int(rng.integers(1, 17)),
                   int(rng.choice([16, 128]))))
  return shapes


@pytest.mark.parametrize("b, s_q, h_q", _shapes(50, seed=14))
def test_plans_run_in_the_vm_and_match_the_host_makespan(b, s_q, h_q):
  """10 length vectors per shape, 500 in all."""
  rng = np.random.default_rng(b * 1000 + s_q * 10 + h_q)
  for _ in range(10):
    lens = _draw_lengths(rng, b)
    ins, seqlens, info = _plan(lens, s_q=s_q, h_q=h_q)
    np.testing.assert_array_equal(seqlens, lens)
    assert info[device_ffi.INFO_OVERFLOW] == 0
    run = vm.simulate(ins, seqlens=lens, s_q=s_q, h_q=h_q, h_kv=1)
    assert run.makespan_ns == device_ffi.info_makespan_ns(info)
    assert timing.live_mask(ins).sum(1).max() == info[
        device_ffi.INFO_LONGEST]
    host = plan_decode(lens, s_q=s_q, h_q=h_q, num_sms=NUM_SMS)
    assert run.makespan_ns <= MAX_RATIO * host.predicted_makespan_ns, (
        lens.tolist(), device_ffi.LAYOUTS[info[device_ffi.INFO_LAYOUT]])


def _other_shapes(count, seed):
  """``(b, s_q, h_q, h_kv, num_sms, page_size)`` off the 132-SM grid."""
  rng = np.random.default_rng(seed)
  shapes = [(1, 1, 16, 1, 4, 16), (256, 4, 16, 1, 256, 64),
            (64, 2, 128, 2, 33, 256), (3, 16, 128, 1, 78, 64)]
  while len(shapes) < count:
    b = int(rng.choice([1, 2, 4, 16, 64, 128, 256]))
    shapes.append((int(rng.integers(1, b + 1)), int(rng.integers(1, 17)),
                   int(rng.choice([16, 128])), int(rng.choice([1, 2])),
                   int(rng.choice([4, 33, 78, 256])),
                   int(rng.choice([16, 64, 256]))))
  return shapes


@pytest.mark.parametrize("b, s_q, h_q, h_kv, num_sms, page",
                         _other_shapes(24, seed=0))
def test_plans_for_other_grids_run_in_the_vm_and_match_the_host_makespan(
    b, s_q, h_q, h_kv, num_sms, page):
  """5 length vectors per shape, 120 in all: 4-256 SMs, 1-2 KV heads,
  pages of 16-256 tokens (each layout's pruning bound, the divisors of the
  item index and of the lengths)."""
  rng = np.random.default_rng(b * 1000 + s_q * 10 + h_q + num_sms)
  for _ in range(5):
    lens = _draw_lengths(rng, b)
    ins, seqlens, info = _plan(lens, s_q=s_q, h_q=h_q, h_kv=h_kv,
                               num_sms=num_sms, page_size=page)
    np.testing.assert_array_equal(seqlens, lens)
    assert info[device_ffi.INFO_OVERFLOW] == 0
    run = vm.simulate(ins, seqlens=lens, s_q=s_q, h_q=h_q, h_kv=h_kv)
    assert run.makespan_ns == device_ffi.info_makespan_ns(info)
    host = plan_decode(lens, s_q=s_q, h_q=h_q, h_kv=h_kv, page_size=page,
                       num_sms=num_sms)
    assert run.makespan_ns <= MAX_RATIO * host.predicted_makespan_ns, (
        lens.tolist(), device_ffi.LAYOUTS[info[device_ffi.INFO_LAYOUT]])


@pytest.mark.xfail(strict=True, reason=(
    "layout C pours the items after its kLptRounds rounds of SMs' worth"
    " into the SMs up to a common level, by the middle of each item: with"
    " 1280 items of about a fifth of the level it overshoots (1.14x the"
    " host's fixed-chunk list schedule)"))
def test_many_small_items_beyond_the_rounds_match_the_host_makespan():
  lens = np.asarray([42] * 49 + [0] * 31, np.int32)
  ins, _, info = _plan(lens, s_q=8, h_q=128, num_sms=256, page_size=16)
  assert device_ffi.LAYOUTS[info[device_ffi.INFO_LAYOUT]] == "uncut"
  host = plan_decode(lens, s_q=8, h_q=128, page_size=16, num_sms=256)
  assert device_ffi.info_makespan_ns(info) <= (
      MAX_RATIO * host.predicted_makespan_ns)


def test_prices_of_more_than_int32_ns_per_partial_are_rejected():
  """Every cost the planner handles fits the int32 cost word."""
  lens = jnp.asarray([1, 2], jnp.int32)
  error, match = jax.errors.JaxRuntimeError, "less than 2\\^31 ns"
  with pytest.raises(error, match=match):
    _plan(lens, s_q=1, h_q=16, page_size=16, max_seqlen=(1 << 31) - 1)
  slow = CostModel(kv_token_ns=2e6)
  with pytest.raises(error, match=match):
    device_ffi.plan_arrays(lens, s_q=1, h_q=16, h_kv=1, page_size=64,
                           max_seqlen=1 << 16, head_dim_v=512, num_sms=4,
                           cost=slow)


@pytest.mark.parametrize("name", ["W1", "W2", "W3", "W4", "W5"])
def test_backwards_layout_equals_the_host_makespan_plan(name):
  w = WORKLOADS[name]
  ins, _, info = _plan(w.seqlens, s_q=w.s_q, h_q=w.h_q)
  host = plan_decode(w.seqlens, s_q=w.s_q, h_q=w.h_q, num_sms=NUM_SMS)
  assert device_ffi.LAYOUTS[info[device_ffi.INFO_LAYOUT]] == "backwards"
  width = max(ins.shape[1], host.max_instructions)
  pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1]), (0, 0)))
  np.testing.assert_array_equal(pad(_live_rows(ins)),
                                pad(np.asarray(host.instructions)))


def test_uncut_layout_on_w6_matches_the_host_makespan():
  w = WORKLOADS["W6"]
  ins, _, info = _plan(w.seqlens, s_q=w.s_q, h_q=w.h_q)
  host = plan_decode(w.seqlens, s_q=w.s_q, h_q=w.h_q, num_sms=NUM_SMS)
  assert device_ffi.info_makespan_ns(info) <= host.predicted_makespan_ns


@pytest.mark.parametrize("lens, s_q, h_q, h_kv", [
    ([0, 1, 64, 65, 5000], 3, 40, 2),
    ([300, 0, 17], 2, 16, 1),
    ([5000] * 40, 1, 128, 1),
])
def test_plans_compute_the_reference_result_in_the_vm(lens, s_q, h_q, h_kv):
  """Arithmetic, not only data flow: the VM runs a plan of each layout
  family on paged inputs with NaN in every unused cache slot."""
  rng = np.random.default_rng(0)
  page, d_qk, d_v = 16, 40, 32
  num_pages = sum(-(-n // page) for n in lens) + 3
  table = np.full((len(lens), max(1, -(-max(lens) // page))), 10**6, np.int32)
  perm, at = rng.permutation(num_pages), 0
  kv = np.full((num_pages, page, h_kv, d_qk), np.nan)
  for i, n in enumerate(lens):
    for j in range(-(-n // page)):
      table[i, j] = perm[at]
      at += 1
      kv[table[i, j], :min(page, n - j * page)] = rng.standard_normal(
          (min(page, n - j * page), h_kv, d_qk))
  q = rng.standard_normal((len(lens), s_q, h_q, d_qk))
  for num_sms in (4, 33, 132):
    ins, _, _ = _plan(lens, s_q=s_q, h_q=h_q, h_kv=h_kv, num_sms=num_sms,
                      page_size=page)
    got = vm.execute(ins, q, kv, table, lens, head_dim_v=d_v, causal=True)
    want = numpy_mla_decode(q, kv, table, lens, head_dim_v=d_v,
                            softmax_scale=d_qk ** -0.5, causal=True)
    assert_decode_close(got.out, got.lse, *want, rtol=1e-9, lse_atol=1e-9)


def test_lengths_are_clamped_and_capacity_is_static():
  traces = []

  def plan(lens):
    traces.append(1)
    return plan_on_device(lens, s_q=4, h_q=16, max_seqlen=8192,
                          num_sms=NUM_SMS)

  run = jax.jit(plan)
  plans = [run(jnp.asarray(lens, jnp.int32))
           for lens in ([-5, 10, 10_000, 0], [8192] * 4, [1, 2, 3, 4])]
  assert len(traces) == 1
  assert {p.instructions.shape for p in plans} == {plans[0].instructions.shape}
  assert plans[0].scheduler == "compiled"
  np.testing.assert_array_equal(plans[0].seqlens, [0, 10, 8192, 0])
  vm.simulate(plans[0])


def test_int32_lengths_reach_the_planner_with_no_op_before_it():
  """The planner clamps the lengths itself: planning is one kernel."""
  plan = lambda lens: plan_on_device(lens, s_q=4, h_q=16, max_seqlen=8192,
                                     num_sms=NUM_SMS).instructions
  jaxpr = jax.make_jaxpr(plan)(jnp.zeros(4, jnp.int32))
  assert [e.primitive.name for e in jaxpr.eqns] == ["ffi_call"]


def test_constants_mirror_the_python_planners():
  constants = _ffi.planner_constants()
  assert constants["alpha"] == balanced.ALPHA
  assert constants["input_prices"] == isa.TILE_ROWS + 1
  assert constants["info_words"] == device_ffi.INFO_WORDS
  assert constants["max_sms"] == isa.MAX_REDUCE_INPUTS


def test_bad_scheduler_and_too_many_sms():
  lens = jnp.asarray([3, 4], jnp.int32)
  with pytest.raises(ValueError, match="scheduler must be None or one of"):
    plan_on_device(lens, s_q=1, h_q=16, max_seqlen=64, scheduler="nope")
  with pytest.raises(ValueError, match="at most 256 SMs"):
    plan_on_device(lens, s_q=1, h_q=16, max_seqlen=64, num_sms=300,
                   scheduler="compiled")
  plan = plan_on_device(lens, s_q=1, h_q=16, max_seqlen=64, num_sms=300)
  assert plan.scheduler == "balanced"


@pytest.mark.gpu
@requires_gpu
def test_gpu_plans_equal_the_cpu_twin_bit_for_bit():
  gpu, cpu = jax.devices("gpu")[0], jax.devices("cpu")[0]
  rng = np.random.default_rng(7)
  for b, s_q, h_q in _shapes(24, seed=21):
    for _ in range(8):
      lens = _draw_lengths(rng, b)
      on_gpu = _plan(lens, s_q=s_q, h_q=h_q, device=gpu)
      on_cpu = _plan(lens, s_q=s_q, h_q=h_q, device=cpu)
      np.testing.assert_array_equal(_live_rows(on_gpu[0]),
                                    _live_rows(on_cpu[0]))
      np.testing.assert_array_equal(on_gpu[1], on_cpu[1])
      np.testing.assert_array_equal(on_gpu[2], on_cpu[2])
