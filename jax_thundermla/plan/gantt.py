"""Gantt chart of a plan's predicted schedule (matplotlib, optional)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from jax_thundermla import isa
from jax_thundermla.plan import timing

if TYPE_CHECKING:
  from jax_thundermla.plan.plan import DecodePlan


def draw(plan: DecodePlan, path: str, *, title: str | None = None) -> None:
  """Draws one row per SM: PARTIALs and REDUCEs in two colours, idle blank.

  Args:
    plan: the plan; its instructions are timed by their cost words
      (`timing.simulate`, the virtual machine's clock).
    path: output image file.
    title: figure title; by default the scheduler and the makespan.

  Raises:
    ImportError: matplotlib is not installed.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "DecodePlan.gantt needs matplotlib: pip install matplotlib") from e
  height = max(3.0, min(40.0, 0.12 * plan.num_sms))
  fig, ax = plt.subplots(figsize=(12, height))
  run = draw_predicted(ax, plan)
  ax.set_xlabel("predicted time (us)")
  ax.set_xlim(0, max(run.makespan_ns / 1e3, 1e-3))
  ax.legend(loc="lower right")
  if title is None:
    title = (f"{plan.scheduler}: predicted makespan"
             f" {run.makespan_ns / 1e3:.1f} us,"
             f" {int(np.sum(run.opcode == isa.OP_PARTIAL))} PARTIALs,"
             f" {int(np.sum(run.opcode == isa.OP_REDUCE))} REDUCEs")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def draw_predicted(ax, plan: DecodePlan):
  """Draws the plan's simulated schedule on a matplotlib axis.

  One row per SM, PARTIALs and REDUCEs in their own colours, idle blank.

  Args:
    ax: the axis.
    plan: the plan; timed by its cost words (`timing.simulate`).

  Returns:
    The `timing.Timing` drawn (its makespan, per-instruction times).
  """
  run = timing.simulate(np.asarray(plan.instructions))
  for op, color in isa.OP_COLORS.items():
    sel = run.opcode == op
    if sel.any():
      ax.barh(run.sm[sel], (run.end_ns[sel] - run.start_ns[sel]) / 1e3,
              left=run.start_ns[sel] / 1e3, height=0.8, color=color,
              edgecolor="black", linewidth=0.2, label=isa.OP_NAMES[op])
  ax.set_ylabel("SM")
  ax.set_ylim(plan.num_sms - 0.5, -0.5)
  return run
