"""Reading jax.profiler traces: the GPU activities a function ran."""

from __future__ import annotations

import dataclasses
import glob
import os
import tempfile
from typing import Any, Callable

import jax


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
