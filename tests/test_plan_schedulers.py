"""Every scheduler's plans are complete, ordered and deadlock free.

Checked with the virtual machine's simulation (no arithmetic): every
(sequence, KV head, query row) is written once from KV ranges that tile
[0, len); every slot is read only after its writer, through counters; no SM
can block forever; and every REDUCE starts after the instructions it waits
for have ended.
"""

import dataclasses

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from jax_thundermla import isa
from jax_thundermla import vm
from jax_thundermla.plan import SCHEDULERS
from jax_thundermla.plan import CostModel
from jax_thundermla.plan import balanced
from jax_thundermla.plan import makespan
from jax_thundermla.plan import plan_decode
from jax_thundermla.plan import static
from jax_thundermla.plan import timing
from jax_thundermla.plan.problem import Problem
from jax_thundermla.plan.problem import WorkItems
from jax_thundermla.plan.tensorize import Schedule
from jax_thundermla.plan.tensorize import capacities_of
from jax_thundermla.plan.tensorize import tensorize
from jax_thundermla.workloads import WORKLOADS


def check_plan(plan) -> vm.VMResult:
  """Structure checks of a plan; returns its simulation."""
  run = vm.simulate(plan)
  ins = np.asarray(plan.instructions)
  assert ins.dtype == np.int32
  assert ins.shape == (plan.num_sms, plan.max_instructions,
                       isa.INSTRUCTION_WORDS)
  live = timing.live_mask(ins)
  assert not ins[~live].any(), "rows after a list's STOP must be zero"
  words = ins[live]
  signal = isa.Fields(words).signal_counter
  for x in np.flatnonzero(isa.Fields(words).wait_count > 0):
    producers = signal == isa.Fields(words).wait_counter[x]
    assert producers.sum() == isa.Fields(words).wait_count[x]
    assert run.start_ns[x] >= run.end_ns[producers].max()
  # A plan whose instructions neither wait nor signal keeps no counters.
  counters_used = np.maximum(signal, isa.Fields(words).wait_counter)
  assert (plan.num_counters == 0) == (counters_used.max(initial=-1) < 0)
  caps = [plan.max_instructions, plan.num_slots]
  caps += [plan.num_counters] if plan.num_counters else []
  for cap in caps:
    assert cap >= 8 and cap & (cap - 1) == 0
  assert run.makespan_ns == pytest.approx(plan.predicted_makespan_ns)
  return run


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workloads(name, scheduler):
  w = WORKLOADS[name]
  plan = plan_decode(w.seqlens, s_q=w.s_q, h_q=w.h_q, h_kv=w.h_kv,
                     page_size=w.page_size, num_sms=132, scheduler=scheduler)
  check_plan(plan)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_makespan_scheduler_is_not_worse_than_balanced(name):
  w = WORKLOADS[name]
  plans = {s: plan_decode(w.seqlens, s_q=w.s_q, h_q=w.h_q, num_sms=132,
                          scheduler=s) for s in ("balanced", "makespan")}
  assert (plans["makespan"].predicted_makespan_ns
          <= plans["balanced"].predicted_makespan_ns)


@st.composite
def shapes(draw):
  """Shapes across the supported range (b, lengths, s_q, h_q, h_kv)."""
  b = draw(st.integers(1, 48))
  length = st.one_of(st.just(0), st.integers(0, 300), st.integers(0, 20000),
                     st.integers(900_000, 1_000_000))
  lens = draw(st.lists(length, min_size=b, max_size=b))
  s_q = draw(st.integers(1, 16))
  h_kv = draw(st.sampled_from([1, 1, 2, 4]))
  most = max(1, min(128, 2048 // s_q) // h_kv)
  h_q = h_kv * draw(st.integers(1, most))
  return dict(seqlens=lens, s_q=s_q, h_q=h_q, h_kv=h_kv,
              page_size=draw(st.sampled_from([16, 48, 64, 256])),
              num_sms=draw(st.sampled_from([1, 2, 7, 33, 132, 300])))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(shape=shapes())
def test_drawn_shapes(scheduler, shape):
  check_plan(plan_decode(scheduler=scheduler, **shape))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_largest_problem(scheduler):
  """4096 sequences of up to 1e6 tokens, 2048 query rows each."""
  rng = np.random.default_rng(4096)
  lens = rng.integers(0, 1_000_001, 4096)
  lens[rng.random(4096) < 0.3] = 0
  plan = plan_decode(lens, s_q=16, h_q=128, page_size=256, num_sms=132,
                     scheduler=scheduler)
  check_plan(plan)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_most_query_rows(scheduler):
  plan = plan_decode([1_000_000, 0, 70_000], s_q=16, h_q=128, num_sms=132,
                     page_size=256, scheduler=scheduler)
  assert plan.max_instructions >= 1
  check_plan(plan)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_deterministic(scheduler):
  w = WORKLOADS["W3"]
  a = plan_decode(w.seqlens, s_q=4, h_q=16, num_sms=132, scheduler=scheduler)
  b = plan_decode(list(w.seqlens), s_q=4, h_q=16, num_sms=132,
                  scheduler=scheduler)
  np.testing.assert_array_equal(a.instructions, b.instructions)
  assert a.predicted_makespan_ns == b.predicted_makespan_ns


def _spread_by_rows(schedule: Schedule, k: np.ndarray, num_tiles: int,
                    fanin: int, cost: CostModel) -> Schedule:
  """A schedule (h_kv = 1) whose one-level final REDUCEs are each replaced,
  one at a time, by its runs of rows on the SMs of the item's last pieces."""
  rows, sm, pos = [], [], []
  for row, s, p in zip(schedule.rows, schedule.sm, schedule.key):
    f = isa.Fields(row)
    item = f.batch * num_tiles + f.row_start // isa.TILE_ROWS
    one_level = (f.opcode == isa.OP_REDUCE
                 and f.dst_slot == isa.FINAL_OUTPUT
                 and k[item] <= fanin)
    if not one_level:
      rows.append(row)
      sm.append(s)
      pos.append(p)
      continue
    r = int(f.num_rows)
    runs = min(int(k[item]), r)
    for j in range(runs):
      lo, hi = j * r // runs, (j + 1) * r // runs
      run = row.copy()
      g = isa.Fields(run)
      g.row_start += lo
      g.num_rows = hi - lo
      g.slot_row = lo
      g.cost = cost.reduce_fixed() + k[item] * (
          cost.reduce_input_ns(hi - lo, 512))
      rows.append(run)
      sm.append(s - j)
      pos.append(p)
  return Schedule(np.stack(rows), np.asarray(sm), np.asarray(pos),
                  positional=True)


@pytest.mark.parametrize("lens, s_q, h_q, fanin", [
    (WORKLOADS["W1"].seqlens, 4, 16, isa.MAX_REDUCE_INPUTS),
    (WORKLOADS["W2"].seqlens, 1, 16, isa.MAX_REDUCE_INPUTS),
    (WORKLOADS["W4"].seqlens, 2, 16, isa.MAX_REDUCE_INPUTS),
    ((0, 1, 64, 65, 5000), 3, 40, isa.MAX_REDUCE_INPUTS),
    ((0, 1, 64, 65, 50000), 3, 40, 5),
    (WORKLOADS["W1"].seqlens, 4, 16, 12),
])
def test_one_piece_per_sm_layout_matches_emit(lens, s_q, h_q, fanin):
  """The makespan scheduler's host fast path lays out what emit would, with
  each one-level final merge spread by rows."""
  cost = CostModel()
  problem = Problem(seqlens=np.asarray(lens, np.int64), s_q=s_q, h_q=h_q,
                    h_kv=1, page_size=64, head_dim_v=512, num_sms=132,
                    cost=cost)
  st_ = dataclasses.replace(balanced.statics_for(problem), fanin=fanin)
  items = WorkItems.build(problem)
  _, k = makespan._split(items, fanin, 132)
  fast, predicted = makespan._one_per_sm(items, k, fanin, 64)
  p_item = np.repeat(np.arange(items.size), k)
  j = np.arange(p_item.shape[0]) - (np.cumsum(k) - k)[p_item]
  rows, sm, pos, _, _, _ = balanced.emit(
      np, np.int64, st_, items.length, k, p_item,
      (j * items.pages[p_item]) // k[p_item], np.arange(p_item.shape[0]))
  keep = sm < 132
  slow = _spread_by_rows(
      Schedule(rows[keep], sm[keep], pos[keep], positional=True), k,
      st_.num_tiles, fanin, cost)
  a, _ = tensorize(fast, 132)
  b, _ = tensorize(slow, 132)
  np.testing.assert_array_equal(a, b)
  assert predicted == timing.simulate(a).makespan_ns


@pytest.mark.parametrize("name", ["W1", "W2"])
def test_makespan_spreads_final_merges_by_rows(name):
  """Each cut item's merge is several REDUCEs on distinct SMs whose rows
  partition the tile, each merging all of the item's pieces."""
  w = WORKLOADS[name]
  plan = plan_decode(w.seqlens, s_q=w.s_q, h_q=w.h_q, num_sms=132)
  ins = np.asarray(plan.instructions)
  live = timing.live_mask(ins)
  sm = np.nonzero(live)[0]
  words = ins[live].astype(np.int64)
  reduce = isa.Fields(words).opcode == isa.OP_REDUCE
  assert (isa.Fields(words).dst_slot[reduce] == isa.FINAL_OUTPUT).all()
  tile = w.s_q * w.h_q
  counters = np.unique(isa.Fields(words).wait_counter[reduce])
  assert counters.size >= 1
  for counter in counters.tolist():
    runs = reduce & (isa.Fields(words).wait_counter == counter)
    pieces = (isa.Fields(words).opcode == isa.OP_PARTIAL) & (
        isa.Fields(words).signal_counter == counter)
    k = int(pieces.sum())
    assert runs.sum() == min(k, tile) > 1
    assert np.unique(sm[runs]).size == runs.sum()
    assert set(sm[runs].tolist()) <= set(sm[pieces].tolist())
    assert (isa.Fields(words).num_src[runs] == k).all()
    assert (isa.Fields(words).wait_count[runs] == k).all()
    run = words[runs][np.argsort(isa.Fields(words).slot_row[runs])]
    starts = isa.Fields(run).slot_row
    ends = starts + isa.Fields(run).num_rows
    assert starts[0] == 0 and ends[-1] == tile
    np.testing.assert_array_equal(starts[1:], ends[:-1])
    np.testing.assert_array_equal(isa.Fields(run).row_start, starts)
  check_plan(plan)


@pytest.mark.parametrize("h_q, num_sms", [(1, 500), (2, 400)])
def test_makespan_merges_in_two_levels_beyond_max_reduce_inputs(h_q,
                                                                num_sms):
  """With more SMs than one REDUCE has inputs, a long sequence of few rows is
  cut into more pieces than that and merged by a tree."""
  plan = plan_decode([1_000_000], s_q=1, h_q=h_q, num_sms=num_sms)
  ins = np.asarray(plan.instructions)
  reduce = isa.Fields(ins).opcode == isa.OP_REDUCE
  partial = isa.Fields(ins).opcode == isa.OP_PARTIAL
  assert partial.sum() > isa.MAX_REDUCE_INPUTS
  assert (isa.Fields(ins[reduce]).dst_slot >= 0).any()
  check_plan(plan)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(shape=shapes())
def test_rollout_bounds_and_workspace(shape):
  """The bounds that skip rollouts never exceed their makespans, and the
  slots and counters a scheduler counts are those its rows use."""
  problem = Problem(seqlens=np.asarray(shape.pop("seqlens"), np.int64),
                    head_dim_v=512, cost=CostModel(), **shape)
  st_ = balanced.statics_for(problem)
  pieces = balanced.cut(np, problem.seqlens, st_, np.int64)
  lists, lists_makespan = balanced.host_schedule(problem, st_, pieces)
  assert balanced.load_bound(st_, *pieces) <= lists_makespan
  items = WorkItems.build(problem)
  assert (static.load_bound(problem, items)
          <= static.schedule(problem, items)[1])
  for schedule in (lists, makespan.schedule(problem)[0]):
    if schedule.workspace is not None:
      used = capacities_of(schedule.rows, 0)
      assert schedule.workspace == (used.num_slots, used.num_counters)
