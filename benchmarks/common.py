"""Pieces shared by the benchmark scripts: the timed decode step, the memory
ceiling (read bandwidth), device time per call."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_thundermla as tmla
from jax_thundermla import profiling
from jax_thundermla.workloads import Workload

IMPLS = ("none", "none_scan", "device", "balanced", "static", "makespan",
         "makespan_scan", "xla")
# The implementations that run inside a lax.scan over one stacked cache.
SCAN_IMPLS = ("none_scan", "makespan_scan")


def random_workloads(batches) -> list[Workload]:
  """Per batch size two workloads (s_q=4, h_q=16 and s_q=1, h_q=128) of
  lengths drawn in [0, 8192) but the first, 65536 (the planners' random
  cases)."""
  rng = np.random.default_rng(0)
  out = []
  for b in batches:
    lens = rng.integers(0, 8192, b)
    lens[0] = 65536
    for s_q, h_q in ((4, 16), (1, 128)):
      out.append(Workload(f"b{b}_s{s_q}_h{h_q}", tuple(int(n) for n in lens),
                          s_q=s_q, h_q=h_q))
  return out


def make_step(w: Workload, impl: str, cost_model=None):
  """A jitted decode step over the caches (a list; for SCAN_IMPLS one
  stacked array), and its extra argument. Host plans are priced with
  ``cost_model`` (a CostModel; None: the default)."""
  backend = "reference" if impl == "xla" else "cuda"
  kw = dict(head_dim_v=w.d_v, softmax_scale=w.softmax_scale,
            causal=w.causal, backend=backend)

  @jax.jit
  def scan_step(q, caches, table, lens, plan):
    # Inside lax.scan over the layers, what a model loop writes: plan=None,
    # or one host plan passed to every layer.
    with jax.named_scope(f"mla_decode_{impl}"):
      def layer(carry, kv):
        return carry, tmla.mla_decode(q, kv, table, lens, plan=plan, **kw)[0]
      return jax.lax.scan(layer, 0, caches)[1]

  @jax.jit
  def step(q, caches, table, lens, plan):
    with jax.named_scope(f"mla_decode_{impl}"):
      if impl == "device":
        plan = tmla.plan_on_device(
            lens, s_q=w.s_q, h_q=w.h_q, h_kv=w.h_kv, page_size=w.page_size,
            max_seqlen=table.shape[1] * w.page_size, head_dim_v=w.d_v)
      return [tmla.mla_decode(q, kv, table, lens, plan=plan, **kw)[0]
              for kv in caches]

  plan = None
  scheduler = impl.removesuffix("_scan")
  if scheduler in ("balanced", "static", "makespan"):
    plan = tmla.plan_decode(np.asarray(w.seqlens), s_q=w.s_q, h_q=w.h_q,
                            h_kv=w.h_kv, page_size=w.page_size,
                            head_dim_v=w.d_v, scheduler=scheduler,
                            cost_model=cost_model)
  return (scan_step if impl in SCAN_IMPLS else step), plan


READ_BANDWIDTH_METHOD = ("the faster of a read-only reduction of 2 GiB and"
                         " a 1 GiB copy's bytes read + written")


def read_bandwidth() -> float:
  """Device-memory read bandwidth, bytes per second: the memory ceiling.

  The decode kernels stream the cache and write little, so their ceiling is
  the read bandwidth: a reduction of a 2 GiB array to one number reads every
  byte once and writes nothing. A copy of 1 GiB (its bytes read + written)
  is timed too and the faster figure is kept, so that the ceiling is never
  below what one of the two reached (READ_BANDWIDTH_METHOD says so).
  """
  x = jnp.ones((1 << 30,), jnp.bfloat16)
  ns_read, _ = profiling.trace_device_time(
      lambda: jnp.max(x), repeats=5)
  y = x[: 1 << 29]
  ns_copy, _ = profiling.trace_device_time(lambda: y + 1, repeats=5)
  return max(x.nbytes / (ns_read * 1e-9), 2 * y.nbytes / (ns_copy * 1e-9))


def time_per_call(w: Workload, impl: str, inputs, *, steps: int,
                  trace_dir: str | None = None, cost_model=None):
  """Seconds per mla_decode call of ``impl`` on ``inputs``.

  On a GPU: all device activity of ``steps`` traced steps (CUPTI), divided
  by steps x caches; elsewhere the median wall clock of a step over the
  caches.

  Args:
    w: the workload.
    impl: one of IMPLS.
    inputs: ``(q, caches, table, lens)`` from ``device_inputs``.
    steps: timed steps.
    trace_dir: keep the profiler trace of the steps there (on a CPU, of
      ``steps`` more steps run after the timed ones).
    cost_model: prices of the host plans (None: the default CostModel).

  Returns:
    ``(seconds, events)``: events are the trace's device events (empty
    without a GPU).
  """
  q, caches, table, lens = inputs
  layers = len(caches)
  if impl in SCAN_IMPLS:
    caches = jnp.stack(caches)  # [layers, pages, page_size, h_kv, d_qk]
  step, plan = make_step(w, impl, cost_model)
  run = lambda: step(q, caches, table, lens, plan)
  if jax.default_backend() == "gpu":
    ns, events = profiling.trace_device_time(run, repeats=steps,
                                             trace_dir=trace_dir)
    return ns * 1e-9 / layers, events
  jax.block_until_ready(run())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  if trace_dir:
    # Traced apart from the timed steps: tracing slows the host down.
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        jax.block_until_ready(run())
  return statistics.median(times) / layers, []


def kernel_timings(w: Workload, inputs, plan) -> list:
  """The timed kernel's instruction timings of one call (after a warm-up).

  Args:
    w: the workload.
    inputs: ``(q, caches, table, lens)`` from ``device_inputs``; the first
      cache is used.
    plan: a host DecodePlan for the workload.

  Returns:
    ``profiling.decode_timings`` of the call's records.
  """
  q, caches, table, lens = inputs
  fn = jax.jit(lambda q, kv, t, l, plan: tmla.mla_decode(
      q, kv, t, l, plan=plan, causal=w.causal, softmax_scale=w.softmax_scale,
      backend="cuda", timing=True)[2])
  jax.block_until_ready(fn(q, caches[0], table, lens, plan))
  return profiling.decode_timings(fn(q, caches[0], table, lens, plan))
