"""Profiling helpers on synthetic timing records (CPU) and the timed kernel
on W1 (GPU)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_thundermla as tmla
from jax_thundermla import isa
from jax_thundermla import profiling
from jax_thundermla.workloads import WORKLOADS, make_inputs

from conftest import requires_gpu

BASE = 5_000_000_000_123  # a %globaltimer-like value past 2**32


def _records(rows: dict[tuple[int, int], tuple[int, int, int, int, int]],
             num_sms: int = 3, max_instructions: int = 4) -> np.ndarray:
  r = np.zeros((num_sms, max_instructions, isa.TIMING_WORDS), np.int32)
  for (sm, i), (op, *times) in rows.items():
    r[sm, i, isa.TIMING_OPCODE] = op
    for at, t in zip((isa.TIMING_START, isa.TIMING_READY,
                      isa.TIMING_COMPUTED, isa.TIMING_END), times):
      t += BASE
      r[sm, i, at] = np.int64(t & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
      r[sm, i, at + 1] = t >> 32
  return r


P, R = isa.OP_PARTIAL, isa.OP_REDUCE
ROWS = {
    (0, 0): (P, 0, 100, 900, 1000),
    (0, 1): (R, 1000, 1500, 1900, 2000),
    (1, 0): (P, 200, 300, 1100, 1200),
}


def test_decode_timings_splits_words_and_rebases():
  t = profiling.decode_timings(_records(ROWS))
  assert [(x.sm, x.index, x.opcode) for x in t] == [(0, 0, P), (0, 1, R),
                                                    (1, 0, P)]
  assert (t[0].start, t[0].ready, t[0].computed, t[0].end) == (0, 100, 900,
                                                               1000)
  assert (t[2].start, t[2].end) == (200, 1200)
  assert t[1].duration == 1000


def test_decode_timings_rejects_bad_records():
  with pytest.raises(ValueError, match="TIMING|records must be"):
    profiling.decode_timings(np.zeros((2, 3, 4), np.int32))
  with pytest.raises(ValueError, match="ordered"):
    profiling.decode_timings(_records({(0, 0): (P, 10, 5, 20, 30)}))
  assert profiling.decode_timings(np.zeros((2, 3, 9), np.int32)) == []


def test_summary_exact():
  s = profiling.summarize_timings(profiling.decode_timings(_records(ROWS)),
                                  num_sms=3)
  assert s.makespan_ns == 2000
  assert s.mean_ns == {"PARTIAL": 1000.0, "REDUCE": 1000.0}
  assert s.count == {"PARTIAL": 2, "REDUCE": 1}
  # busy 3000 ns of 3 SMs x 2000 ns.
  assert s.idle_fraction == pytest.approx(0.5)
  # SM 1 finishes at 1200, SM 0 at 2000.
  assert s.tail_ns == 800
  # PARTIALs wait 100 and 100, work 800 and 800, write 100 and 100; the
  # REDUCE waits 500, works 400, writes 100.
  assert s.phase_ns == {"PARTIAL": (100.0, 800.0, 100.0),
                        "REDUCE": (500.0, 400.0, 100.0)}
  # SM 0's first instruction is ready at 100, SM 1's at 300.
  assert s.first_ready_ns == pytest.approx(200.0)


def test_chrome_trace_has_one_track_per_sm(tmp_path):
  path = tmp_path / "trace.json"
  profiling.chrome_trace(profiling.decode_timings(_records(ROWS)), str(path))
  events = json.loads(path.read_text())["traceEvents"]
  names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
  assert names == {0: "SM 0", 1: "SM 1"}
  spans = sorted((e["tid"], e["name"], e["ts"], e["dur"])
                 for e in events if e["ph"] == "X")
  assert spans == [(0, "PARTIAL", 0.0, 1.0), (0, "REDUCE", 1.0, 1.0),
                   (1, "PARTIAL", 0.2, 1.0)]


def test_gantt_writes_png(tmp_path):
  pytest.importorskip("matplotlib")
  path = tmp_path / "g.png"
  plan = tmla.plan_decode([300, 5000], s_q=2, h_q=16, num_sms=3)
  profiling.gantt(profiling.decode_timings(_records(ROWS)), str(path),
                  num_sms=3, plan=plan)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timing_needs_the_cuda_backend():
  q = jnp.ones((1, 1, 16, 576), jnp.bfloat16)
  kv = jnp.ones((2, 64, 1, 576), jnp.bfloat16)
  with pytest.raises(ValueError, match="timing=True"):
    tmla.mla_decode(q, kv, jnp.zeros((1, 2), jnp.int32),
                    jnp.ones((1,), jnp.int32), backend="reference",
                    timing=True)


@requires_gpu
def test_timed_kernel_on_w1_is_ordered_and_inside_the_kernel(tmp_path):
  w = WORKLOADS["W1"]
  q, caches, table, lens = make_inputs(w, dtype=np.float32)
  args = (jnp.asarray(q, jnp.bfloat16), jnp.asarray(caches[0], jnp.bfloat16),
          jnp.asarray(table), jnp.asarray(lens))
  plan = tmla.plan_decode(lens, s_q=w.s_q, h_q=w.h_q, scheduler="makespan")
  fn = jax.jit(lambda q, kv, t, l, plan: tmla.mla_decode(
      q, kv, t, l, plan=plan, causal=True, softmax_scale=w.softmax_scale,
      backend="cuda", timing=True))
  ns, events = profiling.trace_device_time(lambda: fn(*args, plan),
                                           repeats=1)
  kernel_ns = max(e.duration_ns for e in events if "MlaDecode" in e.name)
  out, lse, records = fn(*args, plan)
  plain = tmla.mla_decode(*args, plan=plan, causal=True,
                          softmax_scale=w.softmax_scale, backend="cuda")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(plain[0]))
  timings = profiling.decode_timings(records)
  executed = int(np.sum(np.asarray(plan.instructions)[..., 0] != 0))
  assert len(timings) == executed
  for t in timings:
    assert t.start <= t.ready <= t.computed <= t.end
  summary = profiling.summarize_timings(timings, num_sms=plan.num_sms)
  assert 0 < summary.makespan_ns <= kernel_ns
  for sm in {t.sm for t in timings}:
    mine = sorted((t for t in timings if t.sm == sm), key=lambda t: t.index)
    assert all(a.end <= b.start for a, b in zip(mine, mine[1:]))


def test_fit_cost_model_recovers_linear_costs():
  # Two partials of 128 and 256 tokens, two reduces of 2 and 4 inputs (16
  # rows), timed exactly as fixed + slope * size.
  plan = tmla.plan_decode([5000, 9000], s_q=1, h_q=16, num_sms=4,
                          page_size=64, scheduler="balanced")
  words = np.zeros_like(np.asarray(plan.instructions))
  partials, reduces = isa.Fields(words[:2, 0]), isa.Fields(words[2:4, 0])
  partials.opcode, reduces.opcode = P, R
  partials.num_rows = reduces.num_rows = 16
  partials.kv_start, partials.kv_end = [0, 64], [128, 320]
  reduces.num_src = [2, 4]
  plan = dataclasses.replace(plan, instructions=words)
  rows = {
      (0, 0): (P, 0, 10, 20, 3000 + 50 * 128),
      (1, 0): (P, 0, 10, 20, 3000 + 50 * 256),
      (2, 0): (R, 0, 500, 600, 500 + 1000 + 8 * 32),
      (3, 0): (R, 0, 700, 800, 700 + 1000 + 8 * 64),
  }
  fitted = profiling.fit_cost_model(
      [(plan, profiling.decode_timings(_records(rows, num_sms=4,
                                                max_instructions=plan.max_instructions)))])
  assert fitted.partial_fixed_ns == pytest.approx(3000)
  assert fitted.kv_token_ns == pytest.approx(50)
  assert fitted.reduce_fixed_ns == pytest.approx(1000)
  assert fitted.reduce_row_input_ns == pytest.approx(8)
  assert fitted.row_token_ns == tmla.CostModel().row_token_ns
  with pytest.raises(ValueError, match="two sizes"):
    profiling.fit_cost_model([(plan, profiling.decode_timings(
        _records({(0, 0): rows[(0, 0)], (2, 0): rows[(2, 0)],
                  (3, 0): rows[(3, 0)]}, num_sms=4,
                 max_instructions=plan.max_instructions)))])


def test_phases_by_shape_groups_reduces_by_inputs_and_partials_by_dst():
  words = np.zeros((3, 4, isa.INSTRUCTION_WORDS), np.int32)
  f = isa.Fields(words)
  # SM 0: a PARTIAL into a slot, then a REDUCE of 4 rows x 3 inputs; SM 1:
  # a PARTIAL to the final output; SM 2: another 4 x 3 REDUCE.
  for (sm, i), op, rows, dst in [((0, 0), P, 64, 0), ((0, 1), R, 4, -1),
                                 ((1, 0), P, 64, isa.FINAL_OUTPUT),
                                 ((2, 0), R, 4, -1)]:
    f.opcode[sm, i], f.num_rows[sm, i], f.dst_slot[sm, i] = op, rows, dst
  f.num_src[0, 1] = f.num_src[2, 0] = 3
  rows = dict(ROWS)
  rows[(2, 0)] = (R, 0, 300, 1000, 1100)
  shapes = profiling.phases_by_shape(profiling.decode_timings(_records(rows)),
                                     words)
  assert shapes == {
      ("PARTIAL", 64, "slot"): (1, (100.0, 800.0, 100.0)),
      ("PARTIAL", 64, "final"): (1, (100.0, 800.0, 100.0)),
      # Waiting 500 and 300, working 400 and 700, writing 100 and 100.
      ("REDUCE", 4, 3): (2, (400.0, 550.0, 100.0)),
  }
  f.opcode[2, 0] = P
  with pytest.raises(ValueError, match="not the plan's op"):
    profiling.phases_by_shape(profiling.decode_timings(_records(rows)), words)
  with pytest.raises(ValueError, match="outside the plan"):
    profiling.phases_by_shape(profiling.decode_timings(_records(rows)),
                              words[:2])
