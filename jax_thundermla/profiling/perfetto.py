"""Perfetto/Chrome trace export of the timed kernel's records."""

from __future__ import annotations

import json
from typing import Sequence

from jax_thundermla import isa
from jax_thundermla.profiling.timings import InstructionTiming


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
        "name": isa.OP_NAMES.get(t.opcode, str(t.opcode)), "ph": "X", "pid": 0,
        "tid": t.sm, "ts": t.start / 1e3, "dur": t.duration / 1e3,
        "args": {"index": t.index, "ready_us": t.ready / 1e3,
                 "computed_us": t.computed / 1e3}})
  with open(path, "w") as f:
    json.dump({"traceEvents": events, "displayTimeUnit": "ns"}, f)
