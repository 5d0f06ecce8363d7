r"""Device time of planning inside jit: the compiled planner and the
balanced planner's XLA ops, per plan, from the profiler trace (CUPTI).

For each workload (and each extra batch size of --batches, lengths drawn
at random with one long sequence) it times a jitted
``plan_on_device(lens, ...)`` alone: all device activity of the traced calls
divided by the calls, the kernels per plan, and the compiled planner's
predicted makespan beside the host makespan scheduler's. Needs a GPU.

  python benchmarks/plan_device_speed.py
  python benchmarks/plan_device_speed.py --workloads=W1,W6 --batches=64,256
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from jax_thundermla import profiling
from jax_thundermla.plan import CostModel
from jax_thundermla.plan import device_ffi
from jax_thundermla.plan import plan_decode
from jax_thundermla.plan import plan_on_device
from jax_thundermla.plan.plan import default_num_sms
from jax_thundermla.workloads import WORKLOADS

import common

_WORKLOADS = flags.DEFINE_list("workloads", sorted(WORKLOADS),
                               "Workloads to plan.")
_BATCHES = flags.DEFINE_list(
    "batches", ["1", "64", "256"],
    "Extra random workloads of these batch sizes (s_q=4, h_q=16 and"
    " s_q=1, h_q=128).")
_CALLS = flags.DEFINE_integer("calls", 50, "Traced plans per cell.")
_SCHEDULERS = ("compiled", "balanced")


def main(argv):
  del argv
  if jax.default_backend() != "gpu":
    sys.exit("plan_device_speed.py needs a GPU")
  unknown = sorted(set(_WORKLOADS.value) - set(WORKLOADS))
  if unknown:
    sys.exit(f"unknown workloads {unknown}; known: {sorted(WORKLOADS)}")
  num_sms = default_num_sms()
  print(f"device: {jax.devices()[0].device_kind}, {num_sms} SMs, jax"
        f" {jax.__version__}; CUPTI device time per plan, {_CALLS.value}"
        " traced plans per cell")
  print("| workload | b | items | compiled µs | kernels | balanced µs |"
        " kernels | layout | predicted / host makespan |")
  print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
  batches = [int(x) for x in _BATCHES.value]
  for w in ([WORKLOADS[n] for n in _WORKLOADS.value]
            + common.random_workloads(batches)):
    lens = jnp.asarray(np.asarray(w.seqlens, np.int32))
    max_seqlen = w.max_pages() * w.page_size
    cells = []
    for scheduler in _SCHEDULERS:
      fn = jax.jit(lambda l, s=scheduler: plan_on_device(
          l, s_q=w.s_q, h_q=w.h_q, h_kv=w.h_kv, page_size=w.page_size,
          max_seqlen=max_seqlen, head_dim_v=w.d_v,
          scheduler=s).instructions)
      ns, events = profiling.trace_device_time(lambda: fn(lens),
                                               repeats=_CALLS.value)
      cells.append(f"{ns / 1e3:.2f} | {len(events) / _CALLS.value:.1f}")
    _, _, info = device_ffi.plan_arrays(
        lens, s_q=w.s_q, h_q=w.h_q, h_kv=w.h_kv, page_size=w.page_size,
        max_seqlen=max_seqlen, head_dim_v=w.d_v, num_sms=num_sms,
        cost=CostModel())
    info = np.asarray(info)
    host = plan_decode(w.seqlens, s_q=w.s_q, h_q=w.h_q, h_kv=w.h_kv,
                       page_size=w.page_size, head_dim_v=w.d_v,
                       num_sms=num_sms)
    ratio = device_ffi.info_makespan_ns(info) / host.predicted_makespan_ns
    items = w.batch * w.h_kv * -(-w.s_q * w.h_q // w.h_kv // 64)
    print(f"| {w.name} | {w.batch} | {items} | {cells[0]} | {cells[1]} |"
          f" {device_ffi.LAYOUTS[info[device_ffi.INFO_LAYOUT]]} |"
          f" {ratio:.3f} |")


if __name__ == "__main__":
  app.run(main)
