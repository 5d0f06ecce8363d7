r"""Host planning time of every scheduler on the named workloads.

Times ``plan_decode`` end to end (validation, scheduling, the instruction
tensor, the predicted makespan): the median of many calls, wall clock by
``time.perf_counter``. A shared machine's speed drifts from second to
second, so every (workload, scheduler) cell is measured several times, the
cells taking turns, and the best median is printed with the slowest one.

  python benchmarks/plan_speed.py --workloads=W1,W3,W5
"""

import statistics
import time

from absl import app
from absl import flags

from jax_thundermla.plan import SCHEDULERS
from jax_thundermla.plan import plan_decode
from jax_thundermla.workloads import WORKLOADS

_WORKLOADS = flags.DEFINE_list(
    "workloads", sorted(WORKLOADS), "Workloads to plan (W1..W6).")
_SCHEDULERS = flags.DEFINE_list(
    "schedulers", list(SCHEDULERS), "Schedulers to time.")
_CALLS = flags.DEFINE_integer(
    "calls", 300, "Timed calls per scheduler and workload.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 5, "Measurements per cell; the best and worst medians print.")
_NUM_SMS = flags.DEFINE_integer("num_sms", 132, "SMs of the target GPU.")


def time_plan(workload, scheduler: str, calls: int, num_sms: int) -> float:
  """Median wall time of one plan_decode call, in milliseconds."""
  w = workload
  args = dict(s_q=w.s_q, h_q=w.h_q, h_kv=w.h_kv, page_size=w.page_size,
              head_dim_v=w.d_v, num_sms=num_sms, scheduler=scheduler)
  for _ in range(max(3, calls // 20)):
    plan_decode(w.seqlens, **args)
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    plan_decode(w.seqlens, **args)
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def main(argv):
  del argv
  unknown = sorted(set(_WORKLOADS.value) - set(WORKLOADS))
  if unknown:
    raise app.UsageError(f"unknown workloads {unknown}; known: "
                         f"{sorted(WORKLOADS)}")
  bad = sorted(set(_SCHEDULERS.value) - set(SCHEDULERS))
  if bad:
    raise app.UsageError(f"unknown schedulers {bad}; known: {SCHEDULERS}")
  schedulers = _SCHEDULERS.value
  print(f"plan_decode wall time, ms: best median of {_REPEATS.value}"
        f" measurements of {_CALLS.value} calls (slowest median)"
        f" (num_sms={_NUM_SMS.value})")
  print("| workload | " + " | ".join(schedulers) + " |")
  print("|---|" + "---:|" * len(schedulers))
  cells = [(name, scheduler) for name in _WORKLOADS.value
           for scheduler in schedulers]
  medians = {cell: [] for cell in cells}
  for _ in range(_REPEATS.value):
    for name, scheduler in cells:
      medians[name, scheduler].append(time_plan(
          WORKLOADS[name], scheduler, _CALLS.value, _NUM_SMS.value))
  for name in _WORKLOADS.value:
    row = [f"{min(medians[name, s]):.3f} ({max(medians[name, s]):.3f})"
           for s in schedulers]
    print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
  app.run(main)
