"""Sweeps batch, length, s_q and h_q and draws time against the memory floor.

For every point (uniform lengths) it times one implementation per call
(device time from the profiler on a GPU, as ``run.py``), prints a markdown
table (µs, floor µs = bytes / measured read bandwidth, fraction of the
floor) and draws a PNG: time against floor on log axes, one marker per
(s_q, h_q), the floor as the diagonal.

  python benchmarks/sweep.py --impl=makespan --out=sweep.png
  python benchmarks/sweep.py --batches=1,4 --lens=128,1024 --s_q=1 --h_q=16  # small, CPU
"""

from __future__ import annotations

import itertools

from absl import app
from absl import flags
import jax

from jax_thundermla.workloads import Workload, device_inputs

from common import IMPLS, read_bandwidth, time_per_call

_BATCHES = flags.DEFINE_list("batches", ["1", "4", "16", "64", "256"],
                             "Batch sizes.")
_LENS = flags.DEFINE_list("lens", ["128", "1024", "8192", "32768", "131072"],
                          "Sequence lengths (all sequences of a point equal).")
_S_Q = flags.DEFINE_list("s_q", ["1", "2", "4"], "Query tokens per sequence.")
_H_Q = flags.DEFINE_list("h_q", ["16", "128"], "Query heads.")
_IMPL = flags.DEFINE_enum("impl", None, list(IMPLS),
                          "Implementation; default makespan on a GPU, xla"
                          " elsewhere.")
_MAX_TOKENS = flags.DEFINE_integer(
    "max_tokens", 4 << 20, "Skip points whose batch x length exceeds this"
    " (cache memory: 1152 B per token per cache).")
_CACHES = flags.DEFINE_integer("caches", None,
                               "Distinct caches per step; default 4 on GPU,"
                               " 1 on CPU.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per point.")
_OUT = flags.DEFINE_string("out", "sweep.png", "PNG path ('' for none).")


def _points():
  for b, n, s_q, h_q in itertools.product(
      map(int, _BATCHES.value), map(int, _LENS.value), map(int, _S_Q.value),
      map(int, _H_Q.value)):
    if b * n <= _MAX_TOKENS.value:
      yield Workload(f"b{b}_n{n}_s{s_q}_h{h_q}", (n,) * b, s_q=s_q, h_q=h_q)


def _draw(rows, path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 6))
  markers = itertools.cycle("os^vD<>")
  for key in sorted({(w.s_q, w.h_q) for w, _, _ in rows}):
    sel = [(floor, t) for w, t, floor in rows if (w.s_q, w.h_q) == key]
    ax.scatter([f * 1e6 for f, _ in sel], [t * 1e6 for _, t in sel],
               marker=next(markers), label=f"s_q={key[0]}, h_q={key[1]}")
  lo = min(f for _, _, f in rows) * 1e6
  hi = max(t for _, t, _ in rows) * 1e6
  ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="floor")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("memory floor (us)")
  ax.set_ylabel("measured per call (us)")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  on_gpu = jax.default_backend() == "gpu"
  impl = _IMPL.value or ("makespan" if on_gpu else "xla")
  caches = _CACHES.value or (4 if on_gpu else 1)
  bandwidth = read_bandwidth() if on_gpu else None
  device = jax.devices()[0].device_kind
  print(f"{impl} on {device}, {caches} cache(s) per step, {_STEPS.value}"
        " steps" + (f", read bandwidth {bandwidth / 1e12:.2f} TB/s"
                    if bandwidth else ", wall clock"))
  print("| point | us | floor us | floor / time |")
  print("|---|---:|---:|---:|")
  rows = []
  for w in _points():
    seconds, _ = time_per_call(w, impl, device_inputs(w, num_caches=caches),
                               steps=_STEPS.value)
    floor = w.bytes_moved / bandwidth if bandwidth else float("nan")
    rows.append((w, seconds, floor))
    print(f"| {w.name} | {seconds * 1e6:.1f} | {floor * 1e6:.1f} |"
          f" {floor / seconds:.2f} |")
  if _OUT.value and bandwidth:
    _draw(rows, _OUT.value, f"{impl} on {device}")
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
