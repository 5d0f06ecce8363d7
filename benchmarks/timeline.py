"""Runs the timed kernel on one workload and writes its timeline.

Writes ``<out>/<workload>_<scheduler>_gantt.png`` (measured, and the plan's
predicted schedule beside it) and ``..._trace.json`` (Perfetto/Chrome, one
track per SM), and prints the summary: makespan, per-op mean duration and
its phases (waiting, working, writing), the same per instruction shape
(REDUCE rows x inputs, PARTIAL rows and destination), idle fraction, tail
and the launch's fill, next to the cost model's prediction.

  python benchmarks/timeline.py --workload=W1 --scheduler=makespan --out=/tmp/tl
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import jax
import numpy as np

import jax_thundermla as tmla
from jax_thundermla import profiling
from jax_thundermla.workloads import WORKLOADS, device_inputs

from common import kernel_timings

_WORKLOAD = flags.DEFINE_enum("workload", "W1", sorted(WORKLOADS),
                              "Workload to time.")
_SCHEDULER = flags.DEFINE_enum("scheduler", "makespan",
                               ["balanced", "static", "makespan"],
                               "Host scheduler of the plan.")
_OUT = flags.DEFINE_string("out", "timeline", "Output directory.")
_SHAPES = flags.DEFINE_integer(
    "shapes", 8, "Instruction shapes (op, rows, inputs or destination) to"
    " list with their phases, the most frequent first.")


def main(argv):
  del argv
  w = WORKLOADS[_WORKLOAD.value]
  plan = tmla.plan_decode(np.asarray(w.seqlens), s_q=w.s_q, h_q=w.h_q,
                          page_size=w.page_size, scheduler=_SCHEDULER.value)
  timings = kernel_timings(w, device_inputs(w), plan)
  summary = profiling.summarize_timings(timings, num_sms=plan.num_sms)
  os.makedirs(_OUT.value, exist_ok=True)
  stem = os.path.join(_OUT.value, f"{w.name}_{_SCHEDULER.value}")
  profiling.gantt(timings, stem + "_gantt.png", num_sms=plan.num_sms,
                  plan=plan)
  profiling.chrome_trace(timings, stem + "_trace.json")
  print(f"{w.name} {_SCHEDULER.value} on {jax.devices()[0].device_kind}:"
        f" measured makespan {summary.makespan_ns / 1e3:.1f} us, predicted"
        f" {plan.predicted_makespan_ns / 1e3:.1f} us")
  for name, mean in summary.mean_ns.items():
    wait, work, write = (x / 1e3 for x in summary.phase_ns[name])
    print(f"  {name}: {summary.count[name]} x {mean / 1e3:.2f} us mean"
          f" (waiting {wait:.2f}, working {work:.2f}, writing {write:.2f})")
  shapes = profiling.phases_by_shape(timings, plan.instructions)
  for (name, rows, detail), (count, phases) in sorted(
      shapes.items(), key=lambda kv: -kv[1][0])[:_SHAPES.value]:
    what = f"{detail} inputs" if name == "REDUCE" else f"to {detail}"
    wait, work, write = (x / 1e3 for x in phases)
    print(f"    {count:4d} x {name} of {rows} rows, {what}: waiting"
          f" {wait:.2f}, working {work:.2f}, writing {write:.2f}")
  print(f"  first instruction ready {summary.first_ready_ns / 1e3:.2f} us"
        " after the launch's first start, mean over SMs")
  print(f"  idle fraction {summary.idle_fraction:.1%}, tail"
        f" {summary.tail_ns / 1e3:.1f} us")
  print(f"  wrote {stem}_gantt.png and {stem}_trace.json")


if __name__ == "__main__":
  app.run(main)
