"""Decodes named workloads with mla_decode and prints a short table.

On a GPU with the kernel built it times the CUDA backend beside the pure-XLA
reference; elsewhere it runs the reference. Each timed step attends
``--layers`` distinct KV caches (as a model's layers would, so L2 stays
cold) inside one jit; the table reports per-call figures.

  python benchmarks/run.py                      # defaults for this machine
  python benchmarks/run.py --workloads=W1,W3 --layers=8
"""

from __future__ import annotations

import statistics
import sys
import time

from absl import app
from absl import flags
import jax

import jax_thundermla as tmla
from jax_thundermla import _ffi
from jax_thundermla.workloads import WORKLOADS, Workload, device_inputs

_WORKLOADS = flags.DEFINE_list(
    "workloads", None,
    f"Workload names from {sorted(WORKLOADS)}; default: all on a GPU, W4 on"
    " a CPU.")
_LAYERS = flags.DEFINE_integer(
    "layers", None, "Distinct KV caches per step; default 8 on GPU, 1 on CPU.")
_ITERS = flags.DEFINE_integer(
    "iters", None, "Timed steps (median reported); default 20 GPU, 3 CPU.")


def _backends() -> list[str]:
  if jax.default_backend() == "gpu" and _ffi.kernel_available():
    return ["cuda", "reference"]
  return ["reference"]


def time_step(w: Workload, backend: str, layers: int, iters: int) -> float:
  """Median wall-clock seconds of one mla_decode call (step / layers)."""
  q, caches, table, lens = device_inputs(w, num_caches=layers)

  @jax.jit
  def step(q, caches, table, lens):
    return [tmla.mla_decode(q, kv, table, lens, head_dim_v=w.d_v,
                            softmax_scale=w.softmax_scale, causal=w.causal,
                            backend=backend) for kv in caches]

  jax.block_until_ready(step(q, caches, table, lens))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(step(q, caches, table, lens))
    times.append(time.perf_counter() - start)
  return statistics.median(times) / layers


def main(argv):
  del argv
  on_gpu = jax.default_backend() == "gpu"
  names = _WORKLOADS.value or (sorted(WORKLOADS) if on_gpu else ["W4"])
  layers = _LAYERS.value or (8 if on_gpu else 1)
  iters = _ITERS.value or (20 if on_gpu else 3)
  unknown = [n for n in names if n not in WORKLOADS]
  if unknown:
    sys.exit(f"unknown workload(s) {unknown}; known: {sorted(WORKLOADS)}")
  device = jax.devices()[0].device_kind
  print(f"jax_thundermla {tmla.__version__}, jax {jax.__version__}, device:"
        f" {device}, {layers} layer(s) per step, median of {iters} steps,"
        " wall clock")
  header = (f"{'workload':>8} {'backend':>9} {'us/call':>10} {'TFLOP/s':>8}"
            f" {'GB/s':>8}")
  print(header)
  print("-" * len(header))
  for name in names:
    w = WORKLOADS[name]
    for backend in _backends():
      seconds = time_step(w, backend, layers, iters)
      print(f"{name:>8} {backend:>9} {seconds * 1e6:>10.1f}"
            f" {w.flops / seconds / 1e12:>8.2f}"
            f" {w.bytes_moved / seconds / 1e9:>8.1f}")


if __name__ == "__main__":
  app.run(main)
