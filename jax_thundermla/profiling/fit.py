"""Fitting the planner's cost model to the timed kernel's records."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jax_thundermla import isa
from jax_thundermla.plan.cost import CostModel
from jax_thundermla.profiling.timings import InstructionTiming
from jax_thundermla.profiling.timings import fields_of


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
  base = base or CostModel()
  partial_x, partial_y, reduce_x, reduce_y = [], [], [], []
  for plan, timings in samples:
    words = np.asarray(plan.instructions)
    for t in timings:
      w = fields_of(words, t)
      if t.opcode == isa.OP_PARTIAL:
        lo, hi = int(w.kv_start), int(w.kv_end)
        pages = (-(-hi // plan.page_size) - lo // plan.page_size
                 if hi > lo else 0)
        partial_x.append(pages * plan.page_size)
        partial_y.append(t.duration)
      elif t.opcode == isa.OP_REDUCE:
        reduce_x.append(int(w.num_rows) * int(w.num_src))
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
