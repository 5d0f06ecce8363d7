"""Profiling: device time from jax.profiler traces, and the kernel's own
per-instruction timings.

``trace_device_time`` runs a function under ``jax.profiler.trace`` and sums
the durations of every GPU activity (kernels, memsets, copies) that the
trace recorded on the device's streams: device time, free of Python and
launch overhead.

``mla_decode(..., timing=True)`` returns the timed kernel's records;
``decode_timings`` turns them into ``InstructionTiming`` rows, from which
``gantt``, ``chrome_trace`` and ``summarize_timings`` draw a chart (one row
per SM), write a Perfetto/Chrome trace (one track per SM) and compute the
per-op durations, idle fraction and tail.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import tempfile
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jax_thundermla import isa

OP_NAMES = {isa.OP_PARTIAL: "PARTIAL", isa.OP_REDUCE: "REDUCE"}
_COLORS = {isa.OP_PARTIAL: "tab:blue", isa.OP_REDUCE: "tab:orange"}


@dataclasses.dataclass(frozen=True)
class DeviceEvent:
  """One GPU activity of a trace.

  Attributes:
    name: the kernel (or memset/copy) name.
    start_ns: start, nanoseconds on the trace clock.
    duration_ns: duration in nanoseconds.
  """

  name: str
  start_ns: float
  duration_ns: float


def _xplane_file(trace_dir: str) -> str:
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"),
                           recursive=True), key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no .xplane.pb trace under {trace_dir}")
  return files[-1]


def device_events(trace_dir: str) -> list[DeviceEvent]:
  """GPU activities of the newest trace under ``trace_dir``.

  Args:
    trace_dir: a directory given to ``jax.profiler.trace``.

  Returns:
    Every event on a ``Stream`` line of every ``/device:GPU`` plane, in
    start order.
  """
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  data = ProfileData.from_file(_xplane_file(trace_dir))
  events = []
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if not line.name.startswith("Stream"):
        continue
      for ev in line.events:
        events.append(DeviceEvent(ev.name, float(ev.start_ns),
                                  float(ev.duration_ns)))
  return sorted(events, key=lambda e: e.start_ns)


def trace_device_time(fn: Callable[[], Any], *, repeats: int,
                      trace_dir: str | None = None
                      ) -> tuple[float, list[DeviceEvent]]:
  """Device nanoseconds per call of ``fn``, measured by the profiler.

  ``fn`` is called once untraced (warm-up), then ``repeats`` times inside
  ``jax.profiler.trace``; its results are waited on each time.

  Args:
    fn: a function that launches device work and returns jax arrays.
    repeats: traced calls.
    trace_dir: where to keep the trace (viewable in XProf/TensorBoard and
      Perfetto); a temporary directory when None.

  Returns:
    ``(ns_per_call, events)``: the summed duration of all device events
    divided by ``repeats``, and the events themselves.

  Raises:
    RuntimeError: the trace recorded no device activity (no GPU).
  """
  jax.block_until_ready(fn())
  with tempfile.TemporaryDirectory() as tmp:
    directory = trace_dir or tmp
    with jax.profiler.trace(directory):
      for _ in range(repeats):
        jax.block_until_ready(fn())
    events = device_events(directory)
  if not events:
    raise RuntimeError("the profiler recorded no GPU activity")
  return sum(e.duration_ns for e in events) / repeats, events


def summarize(events: list[DeviceEvent], *, per: int = 1,
              top: int = 8) -> list[tuple[str, int, float]]:
  """Total device time by kernel name, largest first.

  Args:
    events: device events of a trace.
    per: divide totals by this (e.g. calls in the trace).
    top: how many names to keep.

  Returns:
    ``(name, count, ns)`` tuples, ``count`` and ``ns`` divided by ``per``.
  """
  totals: dict[str, list[float]] = {}
  for e in events:
    entry = totals.setdefault(e.name, [0, 0.0])
    entry[0] += 1
    entry[1] += e.duration_ns
  rows = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
  return [(name, round(c / per), ns / per) for name, (c, ns) in rows]


@dataclasses.dataclass(frozen=True)
class InstructionTiming:
  """One executed instruction of the timed kernel.

  Times are nanoseconds from the earliest start in the launch (one
  %globaltimer clock for all SMs).

  Attributes:
    sm: the CTA (one per SM) that ran it.
    index: its position in that CTA's list.
    opcode: ``isa.OP_PARTIAL`` or ``isa.OP_REDUCE``.
    start: fetched, before any dependency wait.
    ready: dependencies met and (PARTIAL) the first KV block in smem.
    computed: last MMA or merge finished.
    end: results written and signalled.
  """

  sm: int
  index: int
  opcode: int
  start: int
  ready: int
  computed: int
  end: int

  @property
  def duration(self) -> int:
    return self.end - self.start


def decode_timings(records: Any) -> list[InstructionTiming]:
  """Decodes the timed kernel's records.

  Args:
    records: int32 ``[num_sms, max_instructions, isa.TIMING_WORDS]`` (the
      third result of ``mla_decode(..., timing=True)``).

  Returns:
    The executed instructions, ordered by SM then position, times relative
    to the earliest start.

  Raises:
    ValueError: wrong shape, or times that go backwards in a record.
  """
  r = np.asarray(records)
  if r.ndim != 3 or r.shape[2] != isa.TIMING_WORDS:
    raise ValueError(
        f"records must be [num_sms, max_instructions, {isa.TIMING_WORDS}],"
        f" got shape {r.shape}")
  words = r.astype(np.int64)

  def time(at: int) -> np.ndarray:
    return (words[..., at] & 0xFFFFFFFF) | (words[..., at + 1] << 32)

  stamps = np.stack([time(isa.TIMING_START), time(isa.TIMING_READY),
                     time(isa.TIMING_COMPUTED), time(isa.TIMING_END)], -1)
  sm, index = np.nonzero(words[..., isa.TIMING_OPCODE])
  if sm.size == 0:
    return []
  stamps = stamps[sm, index]
  if np.any(np.diff(stamps, axis=-1) < 0):
    raise ValueError("a record's times are not ordered start <= ready <="
                     " computed <= end")
  stamps -= stamps[:, 0].min()
  opcode = words[sm, index, isa.TIMING_OPCODE]
  return [InstructionTiming(int(a), int(b), int(c), *map(int, t))
          for a, b, c, t in zip(sm, index, opcode, stamps)]


@dataclasses.dataclass(frozen=True)
class TimingSummary:
  """What a launch's timings say.

  Attributes:
    makespan_ns: from the first start to the last end.
    mean_ns: mean duration per op name ("PARTIAL", "REDUCE").
    count: instructions per op name.
    idle_fraction: share of num_sms x makespan during which an SM ran no
      instruction (SMs with no instruction count as idle throughout).
    tail_ns: from the first SM to finish its list to the last.
  """

  makespan_ns: int
  mean_ns: dict[str, float]
  count: dict[str, int]
  idle_fraction: float
  tail_ns: int


def summarize_timings(timings: Sequence[InstructionTiming], *,
                      num_sms: int) -> TimingSummary:
  """Per-op mean durations, idle fraction and tail of one launch.

  Args:
    timings: from ``decode_timings``.
    num_sms: CTAs of the launch (``records.shape[0]``).

  Returns:
    A TimingSummary.

  Raises:
    ValueError: no timings, or an SM index outside ``num_sms``.
  """
  if not timings:
    raise ValueError("no instruction was timed")
  if max(t.sm for t in timings) >= num_sms:
    raise ValueError(f"an SM index is >= num_sms={num_sms}")
  makespan = max(t.end for t in timings) - min(t.start for t in timings)
  mean, count = {}, {}
  for op, name in OP_NAMES.items():
    durations = [t.duration for t in timings if t.opcode == op]
    if durations:
      mean[name] = float(np.mean(durations))
      count[name] = len(durations)
  busy = sum(t.duration for t in timings)
  finish: dict[int, int] = {}
  for t in timings:
    finish[t.sm] = max(finish.get(t.sm, 0), t.end)
  idle = 1.0 - busy / (num_sms * makespan) if makespan else 0.0
  return TimingSummary(makespan_ns=makespan, mean_ns=mean, count=count,
                       idle_fraction=idle,
                       tail_ns=max(finish.values()) - min(finish.values()))


def chrome_trace(timings: Sequence[InstructionTiming], path: str) -> None:
  """Writes a Chrome/Perfetto trace JSON: one track (thread) per SM.

  Each instruction is a complete event named by its op, with its ready and
  computed times in ``args``; open the file in ui.perfetto.dev or
  chrome://tracing.

  Args:
    timings: from ``decode_timings``.
    path: output ``.json`` file.
  """
  events = []
  for sm in sorted({t.sm for t in timings}):
    events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": sm,
                   "args": {"name": f"SM {sm}"}})
  for t in timings:
    events.append({
        "name": OP_NAMES.get(t.opcode, str(t.opcode)), "ph": "X", "pid": 0,
        "tid": t.sm, "ts": t.start / 1e3, "dur": t.duration / 1e3,
        "args": {"index": t.index, "ready_us": t.ready / 1e3,
                 "computed_us": t.computed / 1e3}})
  with open(path, "w") as f:
    json.dump({"traceEvents": events, "displayTimeUnit": "ns"}, f)


def gantt(timings: Sequence[InstructionTiming], path: str, *, num_sms: int,
          plan: Any = None, title: str | None = None) -> None:
  """Draws the measured schedule, one row per SM, into an image file.

  PARTIALs and REDUCEs have their own colours; a darker segment marks each
  instruction's wait (start to ready); idle time is blank. With ``plan``
  (a host ``DecodePlan``), its predicted schedule is drawn in a second
  panel on the same time axis.

  Args:
    timings: from ``decode_timings``.
    path: output file (``.png``).
    num_sms: CTAs of the launch.
    plan: optional DecodePlan whose predicted schedule to draw beside.
    title: figure title; by default the measured makespan.

  Raises:
    ImportError: matplotlib is not installed.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("gantt needs matplotlib: pip install matplotlib") from e
  summary = summarize_timings(timings, num_sms=num_sms)
  panels = 2 if plan is not None else 1
  height = max(3.0, min(30.0, 0.1 * num_sms))
  fig, axes = plt.subplots(panels, 1, figsize=(12, height * panels),
                           sharex=True, squeeze=False)
  ax = axes[0, 0]
  for op, color in _COLORS.items():
    sel = [t for t in timings if t.opcode == op]
    if sel:
      ax.barh([t.sm for t in sel], [t.duration / 1e3 for t in sel],
              left=[t.start / 1e3 for t in sel], height=0.8, color=color,
              label=OP_NAMES[op])
      ax.barh([t.sm for t in sel], [(t.ready - t.start) / 1e3 for t in sel],
              left=[t.start / 1e3 for t in sel], height=0.8, color="black",
              alpha=0.35)
  ax.set_ylabel("SM (measured)")
  ax.set_ylim(num_sms - 0.5, -0.5)
  ax.legend(loc="lower right")
  ax.set_title(title or (
      f"measured: makespan {summary.makespan_ns / 1e3:.1f} us, idle"
      f" {summary.idle_fraction:.0%}, tail {summary.tail_ns / 1e3:.1f} us"))
  if plan is not None:
    from jax_thundermla.plan import gantt as plan_gantt  # pylint: disable=g-import-not-at-top
    pax = axes[1, 0]
    run = plan_gantt.draw_predicted(pax, plan)
    pax.set_ylabel("SM (predicted)")
    pax.set_title(f"predicted by the cost model: makespan"
                  f" {run.makespan_ns / 1e3:.1f} us")
  axes[-1, 0].set_xlabel("time (us)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def fit_cost_model(samples: Sequence[tuple[Any, Sequence[InstructionTiming]]],
                   *, base: Any = None) -> Any:
  """Fits the planners' cost constants to measured instruction timings.

  PARTIAL durations (start to end) are fitted as ``partial_fixed_ns +
  kv_token_ns * tokens_loaded`` (whole pages, the memory-bound term), REDUCE
  durations (ready to end: the dependency wait excluded) as
  ``reduce_fixed_ns + reduce_row_input_ns * rows * inputs``, by least
  squares over every sample; ``row_token_ns`` (the compute-bound term) is
  kept from ``base``.

  Args:
    samples: ``(plan, timings)`` pairs: a host DecodePlan (d_v = 512) and the
      ``decode_timings`` of a timed launch of it.
    base: the CostModel whose other constants are kept (default CostModel()).

  Returns:
    A new CostModel.

  Raises:
    ValueError: too few PARTIAL or REDUCE timings to fit (fewer than two of
      distinct size), or a timing that names an instruction the plan lacks.
  """
  from jax_thundermla.plan import CostModel  # pylint: disable=g-import-not-at-top
  base = base or CostModel()
  partial_x, partial_y, reduce_x, reduce_y = [], [], [], []
  for plan, timings in samples:
    words = np.asarray(plan.instructions)
    for t in timings:
      if t.sm >= words.shape[0] or t.index >= words.shape[1]:
        raise ValueError(f"timing ({t.sm}, {t.index}) is outside the plan")
      w = words[t.sm, t.index]
      if w[isa.FIELD_OPCODE] != t.opcode:
        raise ValueError(f"timing ({t.sm}, {t.index}) is not the plan's op")
      if t.opcode == isa.OP_PARTIAL:
        lo, hi = int(w[isa.FIELD_KV_START]), int(w[isa.FIELD_KV_END])
        pages = (-(-hi // plan.page_size) - lo // plan.page_size
                 if hi > lo else 0)
        partial_x.append(pages * plan.page_size)
        partial_y.append(t.duration)
      elif t.opcode == isa.OP_REDUCE:
        reduce_x.append(int(w[isa.FIELD_NUM_ROWS]) * int(w[isa.FIELD_NUM_SRC]))
        reduce_y.append(t.end - t.ready)

  def line(x, y, what):
    x = np.asarray(x, np.float64)
    if len(np.unique(x)) < 2:
      raise ValueError(f"need {what} timings of at least two sizes to fit")
    a = np.stack([np.ones_like(x), x], 1)
    (fixed, slope), *_ = np.linalg.lstsq(a, np.asarray(y, np.float64),
                                         rcond=None)
    return max(float(fixed), 0.0), max(float(slope), 1e-3)

  partial_fixed, token = line(partial_x, partial_y, "PARTIAL")
  reduce_fixed, row_input = line(reduce_x, reduce_y, "REDUCE")
  return dataclasses.replace(base, partial_fixed_ns=partial_fixed,
                             kv_token_ns=token, reduce_fixed_ns=reduce_fixed,
                             reduce_row_input_ns=row_input)
