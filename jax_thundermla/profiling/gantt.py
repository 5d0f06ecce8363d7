"""Gantt chart of the timed kernel's records (matplotlib, optional)."""

from __future__ import annotations

from typing import Any, Sequence

from jax_thundermla import isa
from jax_thundermla.plan import gantt as plan_gantt
from jax_thundermla.profiling.timings import InstructionTiming
from jax_thundermla.profiling.timings import summarize_timings


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
  for op, color in isa.OP_COLORS.items():
    sel = [t for t in timings if t.opcode == op]
    if sel:
      ax.barh([t.sm for t in sel], [t.duration / 1e3 for t in sel],
              left=[t.start / 1e3 for t in sel], height=0.8, color=color,
              label=isa.OP_NAMES[op])
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
    pax = axes[1, 0]
    run = plan_gantt.draw_predicted(pax, plan)
    pax.set_ylabel("SM (predicted)")
    pax.set_title(f"predicted by the cost model: makespan"
                  f" {run.makespan_ns / 1e3:.1f} us")
  axes[-1, 0].set_xlabel("time (us)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
