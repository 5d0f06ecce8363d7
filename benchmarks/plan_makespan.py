r"""Predicted makespan of every scheduler on the named workloads.

The makespan is the virtual machine's simulated clock under the default cost
model (jax_thundermla/plan/cost.py): a prediction, not a measurement. The
work bound is the total cost of the unsplit PARTIALs divided by the SMs.

  python benchmarks/plan_makespan.py
  python benchmarks/plan_makespan.py --gantt_dir=/tmp/gantt
"""

import os

from absl import app
from absl import flags
import numpy as np

from jax_thundermla import vm
from jax_thundermla.plan import SCHEDULERS
from jax_thundermla.plan import CostModel
from jax_thundermla.plan import plan_decode
from jax_thundermla.workloads import WORKLOADS

_WORKLOADS = flags.DEFINE_list(
    "workloads", sorted(WORKLOADS), "Workloads to plan (W1..W6).")
_NUM_SMS = flags.DEFINE_integer("num_sms", 132, "SMs of the target GPU.")
_GANTT_DIR = flags.DEFINE_string(
    "gantt_dir", None, "If set, write <workload>_<scheduler>.png charts here.")


def work_bound_us(workload, num_sms: int) -> float:
  """Unsplit PARTIAL cost of every (sequence, KV head, tile) over the SMs."""
  w = workload
  cost = CostModel()
  rows = w.s_q * (w.h_q // w.h_kv)
  tiles = [min(64, rows - t) for t in range(0, rows, 64)]
  pages = -(-np.asarray(w.seqlens) // w.page_size)
  total = sum(
      float((cost.partial_fixed() + pages
             * cost.page_ns(r, w.page_size, w.d_v)).sum()) * w.h_kv
      for r in tiles)
  return total / num_sms / 1e3


def main(argv):
  del argv
  unknown = sorted(set(_WORKLOADS.value) - set(WORKLOADS))
  if unknown:
    raise app.UsageError(f"unknown workloads {unknown}")
  if _GANTT_DIR.value:
    os.makedirs(_GANTT_DIR.value, exist_ok=True)
  print(f"predicted makespan, us (num_sms={_NUM_SMS.value}, default cost"
        " model); instructions in parentheses")
  print("| workload | work bound | " + " | ".join(SCHEDULERS) + " |")
  print("|---|---:|" + "---:|" * len(SCHEDULERS))
  for name in _WORKLOADS.value:
    w = WORKLOADS[name]
    cells = []
    for scheduler in SCHEDULERS:
      plan = plan_decode(w.seqlens, s_q=w.s_q, h_q=w.h_q, h_kv=w.h_kv,
                         page_size=w.page_size, head_dim_v=w.d_v,
                         num_sms=_NUM_SMS.value, scheduler=scheduler)
      run = vm.simulate(plan)
      cells.append(f"{run.makespan_ns / 1e3:.1f} ({run.sm.shape[0]})")
      if _GANTT_DIR.value:
        plan.gantt(os.path.join(_GANTT_DIR.value, f"{name}_{scheduler}.png"))
    bound = work_bound_us(w, _NUM_SMS.value)
    print(f"| {name} | {bound:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
