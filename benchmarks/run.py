"""Decodes workloads with mla_decode and prints a short table.

On a GPU with the kernel built, every implementation runs on the same
inputs: the megakernel with ``plan=None`` in every layer call (``none``: as
separate calls in one jit; ``none_scan``: inside a ``lax.scan`` over the
layers), with one ``plan_on_device`` per step (``device``), with each host
scheduler's plan (``makespan_scan``: the makespan plan in the same scan as
``none_scan``), and the pure-XLA reference; device time comes from the
profiler trace (CUPTI): all GPU activity of the timed steps, planning
included, divided by steps x layers. Each step attends ``--layers``
distinct KV caches (cold L2, like a model's layers) sharing one plan.
Without a GPU the reference runs and is timed by wall clock.

  python benchmarks/run.py                          # defaults for this machine
  python benchmarks/run.py --workloads=W1,W3 --impls=device,makespan,xla
  python benchmarks/run.py --lens=4641,45118 --s_q=4 --h_q=16 --page_size=64
  python benchmarks/run.py --workloads=W1 --profile=/tmp/mla_trace
"""

from __future__ import annotations

import glob
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import jax_thundermla as tmla
from jax_thundermla import _ffi
from jax_thundermla import profiling
from jax_thundermla.workloads import (FLASHMLA_H100_US, WORKLOADS, Workload,
                                      device_inputs)

from common import (IMPLS, READ_BANDWIDTH_METHOD, read_bandwidth,
                    time_per_call)

_WORKLOADS = flags.DEFINE_list(
    "workloads", None,
    f"Workload names from {sorted(WORKLOADS)}; default: all on a GPU, W4 on"
    " a CPU. Ignored when --lens is given.")
_LENS = flags.DEFINE_list("lens", None, "A custom workload: its lengths.")
_S_Q = flags.DEFINE_integer("s_q", 1, "Custom workload: query tokens.")
_H_Q = flags.DEFINE_integer("h_q", 16, "Custom workload: query heads.")
_PAGE = flags.DEFINE_integer("page_size", 64, "Custom workload: page size.")
_CAUSAL = flags.DEFINE_bool("causal", True, "Custom workload: causal.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "bf16", ["bf16", "fp16", "fp8"],
    "Element type of q and the cache; fp8: bfloat16 q and an FP8 cache"
    " (quantize_kv of the bfloat16 one).")
_IMPLS = flags.DEFINE_list(
    "impls", None,
    f"Implementations from {IMPLS}: 'device' plans inside the jitted step,"
    " the scheduler names pass a host plan, 'xla' is the pure-JAX"
    " reference. Default: all on a GPU with the kernel, 'xla' otherwise.")
_LAYERS = flags.DEFINE_integer(
    "layers", None, "Distinct KV caches per step; default 8 GPU, 1 CPU.")
_STEPS = flags.DEFINE_integer(
    "steps", None, "Timed steps; default 10 on GPU, 3 on CPU.")
_COST_MODEL = flags.DEFINE_list(
    "cost_model", None, "Price the host plans with these CostModel fields"
    " instead of the defaults, e.g. reduce_fixed_ns=6000,kv_token_ns=37.")
_BREAKDOWN = flags.DEFINE_bool(
    "breakdown", False, "Also print device time per kernel name.")
_PROFILE = flags.DEFINE_string(
    "profile", None, "Keep the jax.profiler trace of every timed region"
    " under this directory (open in XProf/TensorBoard or Perfetto).")


def _workloads() -> list[Workload]:
  if _LENS.value:
    return [Workload("custom", tuple(int(n) for n in _LENS.value),
                     s_q=_S_Q.value, h_q=_H_Q.value,
                     page_size=_PAGE.value, causal=_CAUSAL.value)]
  on_gpu = jax.default_backend() == "gpu"
  names = _WORKLOADS.value or (sorted(WORKLOADS) if on_gpu else ["W4"])
  unknown = [n for n in names if n not in WORKLOADS]
  if unknown:
    sys.exit(f"unknown workload(s) {unknown}; known: {sorted(WORKLOADS)}")
  return [WORKLOADS[n] for n in names]


def _impls() -> list[str]:
  kernel = jax.default_backend() == "gpu" and _ffi.kernel_available()
  impls = _IMPLS.value or (list(IMPLS) if kernel else ["xla"])
  bad = [i for i in impls if i not in IMPLS or (i != "xla" and not kernel)]
  if bad:
    sys.exit(f"cannot run {bad}: known {IMPLS}; kernel impls need a GPU")
  return impls


def _profile_dir(w: Workload, impl: str) -> str | None:
  return f"{_PROFILE.value}/{w.name}_{impl}" if _PROFILE.value else None


def _report_trace(directory: str) -> None:
  files = glob.glob(os.path.join(directory, "**", "*.xplane.pb"),
                    recursive=True)
  if not files:
    sys.exit(f"--profile: the profiler wrote no trace under {directory}")
  print(f"    trace: {max(files, key=os.path.getmtime)}")


def _cost_model():
  if not _COST_MODEL.value:
    return None
  fields = {}
  for item in _COST_MODEL.value:
    name, _, value = item.partition("=")
    try:
      fields[name] = float(value)
    except ValueError:
      sys.exit(f"--cost_model: {item!r} is not NAME=NUMBER")
  try:
    return tmla.plan.CostModel(**fields)
  except (TypeError, ValueError) as e:
    sys.exit(f"--cost_model: {e}")


def main(argv):
  del argv
  cost_model = _cost_model()
  on_gpu = jax.default_backend() == "gpu"
  if _BREAKDOWN.value and not on_gpu:
    sys.exit("--breakdown sums GPU kernel times; JAX sees no GPU here"
             " (--profile still writes the host trace)")
  layers = _LAYERS.value or (8 if on_gpu else 1)
  steps = _STEPS.value or (10 if on_gpu else 3)
  fp8 = _DTYPE.value == "fp8"
  dtype = jnp.float16 if _DTYPE.value == "fp16" else jnp.bfloat16
  device = jax.devices()[0].device_kind
  is_h100 = "H100" in device
  bandwidth = read_bandwidth() if on_gpu else None
  method = ("CUPTI device time (jax.profiler)" if on_gpu
            else "wall clock (no GPU)")
  print(f"jax_thundermla {tmla.__version__}, jax {jax.__version__}, device:"
        f" {device}, {layers} cache(s) per step, {steps} steps, {method}")
  if bandwidth:
    print(f"memory ceiling: {bandwidth / 1e12:.2f} TB/s read"
          f" ({READ_BANDWIDTH_METHOD}); floor = bytes / ceiling")
  header = (f"{'workload':>8} {'impl':>9} {'us/call':>9} {'kernels':>7}"
            f" {'TFLOP/s':>8} {'GB/s':>7} {'floor':>6}"
            + (" vs FlashMLA" if is_h100 else ""))
  print(header)
  print("-" * len(header))
  for w in _workloads():
    q, caches, table, lens = device_inputs(w, num_caches=layers, dtype=dtype)
    if fp8:
      caches = [jax.block_until_ready(tmla.quantize_kv(c)) for c in caches]
    bytes_moved = w.bytes_moved_fp8 if fp8 else w.bytes_moved
    for impl in _impls():
      seconds, events = time_per_call(
          w, impl, (q, caches, table, lens), steps=steps,
          trace_dir=_profile_dir(w, impl), cost_model=cost_model)
      if _BREAKDOWN.value and events:
        for name, count, kns in profiling.summarize(events,
                                                    per=steps * layers):
          print(f"    {kns / 1e3:8.2f} us x{count:<3} {name[:80]}")
      floor = (f"{bytes_moved / bandwidth / seconds:>6.2f}" if bandwidth
               else f"{'-':>6}")
      kernels = (f"{len(events) / (steps * layers):>7.1f}" if events
                 else f"{'-':>7}")
      row = (f"{w.name:>8} {impl:>9} {seconds * 1e6:>9.1f} {kernels}"
             f" {w.flops / seconds / 1e12:>8.1f}"
             f" {bytes_moved / seconds / 1e9:>7.0f} {floor}")
      if is_h100 and w.name in FLASHMLA_H100_US and not fp8:
        row += f" {FLASHMLA_H100_US[w.name] / (seconds * 1e6):>10.2f}x"
      print(row)
      if _PROFILE.value:
        _report_trace(_profile_dir(w, impl))


if __name__ == "__main__":
  app.run(main)
