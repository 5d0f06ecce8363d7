"""Device-time sums of a trace's GPU activities, by kernel name."""

from __future__ import annotations


from jax_thundermla.profiling.trace import DeviceEvent


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
