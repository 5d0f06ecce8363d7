"""Fits the planners' cost model to the timed kernel and shows the effect.

For each workload: plan with the current (default) cost model, run the
timed kernel, record predicted vs measured makespan; fit the constants to
all those timings (``profiling.fit_cost_model``); re-plan with the fitted
model and measure again. Prints both tables and the fitted constants.

  python benchmarks/fit_cost.py --workloads=W1,W2,W3,W4,W5,W6
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import numpy as np

import jax_thundermla as tmla
from jax_thundermla import profiling
from jax_thundermla.workloads import WORKLOADS, device_inputs

from common import kernel_timings

_WORKLOADS = flags.DEFINE_list("workloads", ["W1", "W2", "W3", "W4", "W5",
                                             "W6"], "Workloads.")
_SCHEDULER = flags.DEFINE_enum("scheduler", "makespan",
                               ["balanced", "static", "makespan"],
                               "Host scheduler.")


def _run(w, inputs, cost_model):
  plan = tmla.plan_decode(np.asarray(w.seqlens), s_q=w.s_q, h_q=w.h_q,
                          page_size=w.page_size, scheduler=_SCHEDULER.value,
                          cost_model=cost_model)
  timings = kernel_timings(w, inputs, plan)
  measured = profiling.summarize_timings(timings, num_sms=plan.num_sms)
  return plan, timings, measured.makespan_ns


def main(argv):
  del argv
  workloads = [WORKLOADS[n] for n in _WORKLOADS.value]
  inputs = {w.name: device_inputs(w) for w in workloads}
  before = {w.name: _run(w, inputs[w.name], None) for w in workloads}
  fitted = profiling.fit_cost_model([(p, t) for p, t, _ in before.values()])
  after = {w.name: _run(w, inputs[w.name], fitted) for w in workloads}
  print(f"device: {jax.devices()[0].device_kind}, scheduler"
        f" {_SCHEDULER.value}, makespan from the kernel's own timings (us)")
  print(f"fitted: partial_fixed_ns={fitted.partial_fixed_ns:.0f}"
        f" kv_token_ns={fitted.kv_token_ns:.2f}"
        f" reduce_fixed_ns={fitted.reduce_fixed_ns:.0f}"
        f" reduce_row_input_ns={fitted.reduce_row_input_ns:.2f}")
  print(f"{'workload':>8} {'pred before':>11} {'meas before':>11}"
        f" {'pred after':>10} {'meas after':>10}")
  for w in workloads:
    pb, _, mb = before[w.name]
    pa, _, ma = after[w.name]
    print(f"{w.name:>8} {pb.predicted_makespan_ns / 1e3:>11.1f}"
          f" {mb / 1e3:>11.1f} {pa.predicted_makespan_ns / 1e3:>10.1f}"
          f" {ma / 1e3:>10.1f}")


if __name__ == "__main__":
  app.run(main)
