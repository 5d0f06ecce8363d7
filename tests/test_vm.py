"""The virtual machine: numerics against float64 numpy, and its checks."""

import math

import hypothesis
import jax
from hypothesis import strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from jax_thundermla import isa
from jax_thundermla import vm
from jax_thundermla.plan import SCHEDULERS
from jax_thundermla.plan import CostModel
from jax_thundermla.plan import plan_decode
from jax_thundermla.plan import plan_on_device
from jax_thundermla.workloads import Workload
from jax_thundermla.workloads import make_inputs

D_QK, D_V = 24, 16
# Cheap REDUCEs: the schedulers cut even short sequences.
CHEAP_MERGES = CostModel(partial_fixed_ns=100.0, reduce_fixed_ns=100.0,
                         reduce_row_input_ns=1.0)

_STATIC = ("s_q", "h_q", "h_kv", "page_size", "max_seqlen", "head_dim_v",
           "num_sms")
_device_plan = jax.jit(plan_on_device, static_argnames=_STATIC)


def reference(q, kv_cache, block_table, seqlens, *, d_v, scale, causal):
  """Paged MLA decode in float64, one (sequence, head, token) at a time.

  Returns:
    ``(out [b, s_q, h_q, d_v], lse [b, h_q, s_q])``; a row that sees no key
    has out 0 and lse +inf.
  """
  b, s_q, h_q, _ = q.shape
  page_size, h_kv = kv_cache.shape[1], kv_cache.shape[2]
  group = h_q // h_kv
  out = np.zeros((b, s_q, h_q, d_v))
  lse = np.full((b, h_q, s_q), np.inf)
  for i in range(b):
    n = int(seqlens[i])
    pos = np.arange(n)
    keys = kv_cache[block_table[i, pos // page_size], pos % page_size]
    keys = keys.astype(np.float64)  # [n, h_kv, d_qk]
    for h in range(h_q):
      k = keys[:, h // group]
      for t in range(s_q):
        seen = pos <= n - s_q + t if causal else np.ones(n, bool)
        if not seen.any():
          continue
        s = (k[seen] @ q[i, t, h].astype(np.float64)) * scale
        m = s.max()
        p = np.exp(s - m)
        out[i, t, h] = p @ k[seen, :d_v] / p.sum()
        lse[i, h, t] = m + math.log(p.sum())
  return out, lse


def _assert_matches(result, want_out, want_lse):
  assert np.isfinite(result.out).all()
  np.testing.assert_allclose(result.out, want_out, rtol=1e-9, atol=1e-12)
  np.testing.assert_array_equal(np.isinf(result.lse), np.isinf(want_lse))
  finite = np.isfinite(want_lse)
  np.testing.assert_allclose(result.lse[finite], want_lse[finite],
                             rtol=1e-9, atol=1e-12)


@st.composite
def workloads(draw):
  b = draw(st.integers(1, 5))
  short = st.integers(0, 5)
  lens = tuple(draw(st.lists(st.one_of(short, st.integers(0, 260)),
                             min_size=b, max_size=b)))
  h_kv = draw(st.sampled_from([1, 2]))
  return Workload(
      "drawn", lens, s_q=draw(st.integers(1, 4)),
      h_q=h_kv * draw(st.sampled_from([1, 3, 8, 20])), h_kv=h_kv, d_qk=D_QK,
      d_v=D_V, page_size=draw(st.sampled_from([16, 32, 64])),
      causal=draw(st.booleans()))


def _run(w: Workload, plan, seed: int = 0):
  q, (kv,), table, lens = make_inputs(w, seed=seed, extra_pages=2)
  result = vm.execute(plan, q, kv, table, lens, head_dim_v=D_V,
                      causal=w.causal)
  want = reference(q, kv, table, lens, d_v=D_V, scale=D_QK ** -0.5,
                   causal=w.causal)
  return result, want


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(w=workloads(), num_sms=st.integers(1, 12),
                  cost=st.sampled_from([CostModel(), CHEAP_MERGES]))
def test_every_scheduler_matches_reference(scheduler, w, num_sms, cost):
  plan = plan_decode(w.seqlens, s_q=w.s_q, h_q=w.h_q, h_kv=w.h_kv,
                     page_size=w.page_size, head_dim_v=D_V, num_sms=num_sms,
                     scheduler=scheduler, cost_model=cost)
  result, (out, lse) = _run(w, plan)
  _assert_matches(result, out, lse)
  assert result.makespan_ns == pytest.approx(plan.predicted_makespan_ns)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("lens, s_q, h_q, num_sms", [
    ((20000, 30), 2, 8, 24),
    ((9000,), 4, 16, 16),
    ((12000, 500, 0), 3, 40, 32),
])
def test_long_sequence_plans_match_reference(scheduler, lens, s_q, h_q,
                                             num_sms):
  """A long sequence is cut over many SMs; under the makespan scheduler its
  merge is spread by rows over several REDUCEs."""
  w = Workload("long", lens, s_q=s_q, h_q=h_q, d_qk=D_QK, d_v=D_V,
               page_size=64)
  plan = plan_decode(lens, s_q=s_q, h_q=h_q, page_size=64, head_dim_v=D_V,
                     num_sms=num_sms, scheduler=scheduler)
  words = np.asarray(plan.instructions)
  reduce = isa.Fields(words).opcode == isa.OP_REDUCE
  if scheduler == "makespan":
    assert (isa.Fields(words[reduce]).num_rows < min(64, s_q * h_q)).any()
    assert (isa.Fields(words[reduce]).slot_row > 0).any()
  np.testing.assert_array_equal(
      CostModel().instruction_ns(words, page_size=64, head_dim_v=D_V),
      isa.Fields(words).cost)
  result, (out, lse) = _run(w, plan)
  _assert_matches(result, out, lse)
  assert result.makespan_ns == pytest.approx(plan.predicted_makespan_ns)


@pytest.mark.parametrize("shape", [
    dict(s_q=2, h_q=6, h_kv=2, page_size=16, num_sms=5, causal=True),
    dict(s_q=1, h_q=40, h_kv=1, page_size=16, num_sms=3, causal=False),
])
@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(lens=st.lists(st.integers(0, 64), min_size=3, max_size=3))
def test_device_plan_matches_reference(shape, lens):
  shape = dict(shape)
  num_sms, causal = shape.pop("num_sms"), shape.pop("causal")
  w = Workload("device", tuple(lens), d_qk=D_QK, d_v=D_V, causal=causal,
               **shape)
  plan = _device_plan(jnp.asarray(lens, jnp.int32), num_sms=num_sms,
                      max_seqlen=64, head_dim_v=D_V, **shape)
  result, (out, lse) = _run(w, plan)
  _assert_matches(result, out, lse)


def test_rows_without_keys_and_causal_edges():
  # len 2 < s_q 4: causal rows of tokens 0 and 1 see no key.
  w = Workload("edge", (2, 0, 5), s_q=4, h_q=2, d_qk=D_QK, d_v=D_V,
               page_size=16, causal=True)
  plan = plan_decode(w.seqlens, s_q=4, h_q=2, page_size=16, num_sms=3,
                     head_dim_v=D_V)
  result, (out, lse) = _run(w, plan)
  _assert_matches(result, out, lse)
  assert np.isinf(result.lse[0, :, :2]).all()
  assert np.isfinite(result.lse[0, :, 2:]).all()
  assert (result.out[1] == 0).all() and np.isinf(result.lse[1]).all()
  # Sequence 2 (5 tokens) gives every causal row at least one key.
  assert np.isfinite(result.lse[2]).all()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_nan_keys_reach_exactly_the_rows_that_see_them(scheduler):
  # Causal, s_q = 3: key n - 1 is seen by token 2 only, key 100 by every
  # token of sequence 0. The plans cut sequence 0 and merge its pieces.
  w = Workload("nan", (3000, 40), s_q=3, h_q=8, d_qk=D_QK, d_v=D_V,
               page_size=16, causal=True)
  plan = plan_decode(w.seqlens, s_q=3, h_q=8, page_size=16, head_dim_v=D_V,
                     num_sms=8, scheduler=scheduler, cost_model=CHEAP_MERGES)
  assert (isa.Fields(np.asarray(plan.instructions)).opcode
          == isa.OP_REDUCE).any()
  q, (kv,), table, lens = make_inputs(w, seed=3)
  for i, n in enumerate(w.seqlens):
    kv[table[i, (n - 1) // 16], (n - 1) % 16] = np.nan
  result = vm.execute(plan, q, kv, table, lens, head_dim_v=D_V, causal=True)
  assert np.isfinite(result.out[:, :2]).all()
  assert np.isfinite(result.lse[:, :, :2]).all()
  assert np.isnan(result.out[:, 2]).all() and np.isnan(result.lse[:, :, 2]).all()
  kv[table[0, 100 // 16], 100 % 16, 0, 3] = np.nan
  result = vm.execute(plan, q, kv, table, lens, head_dim_v=D_V, causal=True)
  assert np.isnan(result.out[0]).all() and np.isnan(result.lse[0]).all()
  assert np.isfinite(result.out[1, :2]).all()


def test_cost_words_are_the_cost_model():
  w = Workload("c", (700, 0, 33), s_q=2, h_q=40, page_size=16)
  cost = CostModel(partial_fixed_ns=1000, kv_token_ns=7)
  for scheduler in SCHEDULERS:
    plan = plan_decode(w.seqlens, s_q=2, h_q=40, page_size=16, num_sms=9,
                       scheduler=scheduler, cost_model=cost)
    words = np.asarray(plan.instructions)
    np.testing.assert_array_equal(
        cost.instruction_ns(words, page_size=16, head_dim_v=512),
        isa.Fields(words).cost)
    priced = vm.simulate(plan, cost_model=cost, page_size=16)
    assert priced.makespan_ns == plan.predicted_makespan_ns


def _program(lists):
  """Instruction tensor from per-SM lists of {field name: value} dicts."""
  width = max(1, max(len(x) for x in lists))
  out = np.zeros((len(lists), width, isa.INSTRUCTION_WORDS), np.int32)
  for s, instructions in enumerate(lists):
    for i, fields in enumerate(instructions):
      row = isa.Fields(out[s, i])
      row.signal_counter = isa.NO_COUNTER
      row.wait_counter = isa.NO_COUNTER
      row.dst_slot = isa.FINAL_OUTPUT
      row.num_rows = 1
      row.cost = 10
      for name, value in fields.items():
        setattr(row, name, value)
  return out


def partial(start, end, dst=isa.FINAL_OUTPUT, signal=isa.NO_COUNTER,
            wait=isa.NO_COUNTER, count=0, batch=0, rows=1):
  return {"opcode": isa.OP_PARTIAL, "batch": batch,
          "kv_start": start, "kv_end": end,
          "dst_slot": dst, "signal_counter": signal,
          "wait_counter": wait, "wait_count": count,
          "num_rows": rows}


def reduce(src, num, wait, count, dst=isa.FINAL_OUTPUT,
           signal=isa.NO_COUNTER, rows=(0, 1), slot_row=0):
  """A REDUCE of query rows ``[rows[0], rows[1])``."""
  return {"opcode": isa.OP_REDUCE, "src_slot": src,
          "num_src": num, "dst_slot": dst,
          "signal_counter": signal, "wait_counter": wait,
          "wait_count": count, "row_start": rows[0],
          "num_rows": rows[1] - rows[0],
          "slot_row": slot_row}


def _simulate(lists, seqlens=(10,), h_q=1):
  return vm.simulate(_program(lists), seqlens=np.asarray(seqlens), s_q=1,
                     h_q=h_q, h_kv=1)


def test_valid_split_and_timing():
  run = _simulate([[partial(0, 4, dst=0, signal=0)],
                   [partial(4, 10, dst=1, signal=0), reduce(0, 2, 0, 2)]])
  assert run.makespan_ns == 20
  order = np.lexsort((run.index, run.sm))
  np.testing.assert_array_equal(run.start_ns[order], [0, 0, 10])
  np.testing.assert_array_equal(run.opcode[order],
                                [isa.OP_PARTIAL, isa.OP_PARTIAL,
                                 isa.OP_REDUCE])


def test_wait_starts_after_the_signal():
  slow = partial(0, 4, dst=0, signal=0)
  slow["cost"] = 50
  run = _simulate([[slow], [partial(4, 10, dst=1, signal=0),
                            reduce(0, 2, 0, 2)]])
  assert run.makespan_ns == 60


def test_deadlock_on_a_counter_with_too_few_signals():
  with pytest.raises(vm.DeadlockError, match="needs 3"):
    _simulate([[partial(0, 4, dst=0, signal=0)],
               [partial(4, 10, dst=1, signal=0), reduce(0, 2, 0, 3)]])


def test_deadlock_on_a_wait_cycle():
  with pytest.raises(vm.DeadlockError, match="cycle"):
    _simulate([[reduce(0, 2, 1, 1), partial(0, 4, dst=0, signal=0)],
               [reduce(0, 2, 0, 1, dst=2), partial(4, 10, dst=1, signal=1)]])


def test_read_without_waiting_for_the_writer():
  with pytest.raises(vm.HazardError, match="without waiting"):
    _simulate([[partial(0, 4, dst=0, signal=0), reduce(0, 2, 0, 1)],
               [partial(4, 10, dst=1)]])


def test_read_of_a_slot_nobody_writes():
  with pytest.raises(vm.HazardError, match="before any instruction"):
    _simulate([[partial(0, 4, dst=0, signal=0), reduce(0, 2, 0, 1)],
               [partial(4, 10, dst=3)]])


def test_overwrite_before_the_reader_is_done():
  with pytest.raises(vm.HazardError, match="overwrites slot 0"):
    _simulate([[partial(0, 4, dst=0, signal=0), partial(4, 10, dst=1,
                                                        signal=0)],
               [reduce(0, 2, 0, 2)],
               [partial(4, 10, dst=0)]], seqlens=(10,))


def test_same_sm_order_needs_no_counter():
  run = _simulate([[partial(0, 4, dst=0), partial(4, 10, dst=1),
                    reduce(0, 2, isa.NO_COUNTER, 0)]])
  assert run.makespan_ns == 30


def test_double_coverage():
  with pytest.raises(vm.CoverageError, match="double coverage"):
    _simulate([[partial(0, 10)], [partial(0, 10)]])
  with pytest.raises(vm.CoverageError, match="double coverage"):
    _simulate([[partial(0, 6, dst=0), partial(4, 10, dst=1),
                reduce(0, 2, isa.NO_COUNTER, 0)]])


def test_missing_coverage():
  with pytest.raises(vm.CoverageError, match="never written"):
    _simulate([[partial(0, 10)]], seqlens=(10, 3))
  with pytest.raises(vm.CoverageError, match="do not tile"):
    _simulate([[partial(0, 4, dst=0), partial(6, 10, dst=1),
                reduce(0, 2, isa.NO_COUNTER, 0)]])


@pytest.mark.parametrize("bad, match", [
    ({"opcode": 7}, "unknown opcode"),
    ({"kv_end": 11}, "KV range"),
    ({"kv_start": 3}, "whole sequence"),
    ({"batch": 1}, "batch"),
    ({"num_rows": 2}, "query rows"),
    ({"wait_counter": -2}, "wait counter"),
])
def test_bad_fields(bad, match):
  with pytest.raises(vm.ProgramError, match=match):
    _simulate([[{**partial(0, 10), **bad}]])


# Three pieces of one 64-row tile (s_q 4, h_q 16) of a 150-token sequence,
# each on its own SM, writing slots 0-2 and signalling counter 0.
_TILE = isa.TILE_ROWS
_PIECES = ((0, 40), (40, 100), (100, 150))


def _pieces(signals=(0, 0, 0)):
  return [[partial(a, b, dst=i, signal=c, rows=_TILE)]
          for i, ((a, b), c) in enumerate(zip(_PIECES, signals))]


def _whole_tile():
  lists = _pieces()
  lists[2].append(reduce(0, 3, 0, 3, rows=(0, _TILE)))
  return lists


def _split_by_rows():
  """The merge of rows [0, 3), [3, 10), [10, 64) on three SMs."""
  lists = _pieces()
  for sm, (lo, hi) in enumerate(((0, 3), (3, 10), (10, _TILE))):
    lists[sm].append(reduce(0, 3, 0, 3, rows=(lo, hi), slot_row=lo))
  return lists


def _two_levels_by_rows():
  """Slots 0 and 1 merged into slot 3 by rows on two SMs, then slots 2 and 3
  merged whole."""
  lists = _pieces(signals=(0, 0, 1))
  lists[0].append(reduce(0, 2, 0, 2, dst=3, signal=1, rows=(0, 10)))
  lists[1].append(reduce(0, 2, 0, 2, dst=3, signal=1, rows=(10, _TILE),
                         slot_row=10))
  lists[2].append(reduce(2, 2, 1, 3, rows=(0, _TILE)))
  return lists


def test_merge_split_by_rows_matches_whole_tile():
  w = Workload("rows", (150,), s_q=4, h_q=16, d_qk=D_QK, d_v=D_V,
               page_size=16)
  q, (kv,), table, lens = make_inputs(w, extra_pages=2)
  want = reference(q, kv, table, lens, d_v=D_V, scale=D_QK ** -0.5,
                   causal=True)
  results = [vm.execute(_program(lists), q, kv, table, lens, head_dim_v=D_V,
                        causal=True)
             for lists in (_whole_tile(), _split_by_rows(),
                           _two_levels_by_rows())]
  for result in results:
    _assert_matches(result, *want)
    np.testing.assert_allclose(result.out, results[0].out, rtol=1e-12)
  assert results[1].makespan_ns == 20
  assert (results[1].opcode == isa.OP_REDUCE).sum() == 3
  assert set(results[1].sm[results[1].opcode == isa.OP_REDUCE]) == {0, 1, 2}


@pytest.mark.parametrize("slot_row, rows", [(-1, (0, 5)), (60, (0, 5)),
                                            (1, (0, _TILE))])
def test_reduce_slot_rows_outside_the_tile(slot_row, rows):
  lists = _pieces()
  lists[2].append(reduce(0, 3, 0, 3, rows=rows, slot_row=slot_row))
  with pytest.raises(vm.ProgramError, match="slot rows out of the tile"):
    _simulate(lists, seqlens=(150,), h_q=_TILE)


def test_partial_ignores_slot_row():
  lists = _whole_tile()
  lists[0][0]["slot_row"] = 99
  assert _simulate(lists, seqlens=(150,), h_q=_TILE).makespan_ns == 20


def test_read_of_rows_nobody_writes():
  lists = [[partial(0, 4, dst=0, signal=0, rows=10)],
           [partial(4, 10, dst=1, signal=0, rows=10),
            reduce(0, 2, 0, 2, rows=(10, 20), slot_row=10)]]
  with pytest.raises(vm.HazardError, match=r"rows \[10, 20\) of slot 0"):
    _simulate(lists, h_q=20)


def test_merge_of_rows_holding_other_query_rows():
  lists = [[partial(0, 4, dst=0, signal=0, rows=10)],
           [partial(4, 10, dst=1, signal=0, rows=10),
            reduce(0, 2, 0, 2, rows=(5, 10))]]
  with pytest.raises(vm.ProgramError, match="do not hold the query rows"):
    _simulate(lists, h_q=10)


def _merge_in_place(first_row):
  """SM 1 merges rows [0, 32) of slots 0-1; SM 2 merges rows [first_row,
  64) into slot 0 without waiting for SM 1, then writes them out."""
  rows = (first_row, _TILE)
  return [[partial(0, 4, dst=0, signal=0, rows=_TILE),
           partial(4, 10, dst=1, signal=0, rows=_TILE)],
          [reduce(0, 2, 0, 2, rows=(0, 32))],
          [reduce(0, 2, 0, 2, dst=0, rows=rows, slot_row=first_row),
           reduce(0, 1, isa.NO_COUNTER, 0, rows=rows, slot_row=first_row)]]


def test_overwrite_of_rows_another_sm_reads():
  assert _simulate(_merge_in_place(32), h_q=_TILE).makespan_ns == 40
  with pytest.raises(vm.HazardError, match="overwrites slot 0"):
    _simulate(_merge_in_place(16), h_q=_TILE)


def test_rows_after_stop_are_not_executed():
  program = _program([[partial(0, 10), {}, partial(0, 10)]])
  program[0, 1] = 0
  run = vm.simulate(program, seqlens=np.array([10]), s_q=1, h_q=1, h_kv=1)
  assert run.sm.shape == (1,)


def test_raw_tensor_needs_shapes():
  with pytest.raises(ValueError, match="needs"):
    vm.simulate(_program([[partial(0, 10)]]))


def test_execute_checks_the_block_table():
  w = Workload("t", (40,), s_q=1, h_q=2, d_qk=D_QK, d_v=D_V, page_size=16)
  q, (kv,), table, lens = make_inputs(w)
  plan = plan_decode(w.seqlens, s_q=1, h_q=2, page_size=16, num_sms=2)
  table[0, 1] = kv.shape[0] + 5
  with pytest.raises(ValueError, match="not a page id"):
    vm.execute(plan, q, kv, table, lens, head_dim_v=D_V, causal=True)


def test_stale_plan_is_detected():
  w = Workload("t", (40, 9), s_q=1, h_q=2, d_qk=D_QK, d_v=D_V, page_size=16)
  q, (kv,), table, lens = make_inputs(w)
  plan = plan_decode((40, 7), s_q=1, h_q=2, page_size=16, num_sms=2)
  with pytest.raises((vm.ProgramError, vm.CoverageError)):
    vm.execute(plan, q, kv, table, lens, head_dim_v=D_V, causal=True)
