"""The one cost model of the planners and of the virtual machine's clock.

Every planner (balanced, static, makespan, the on-device planner) and the
virtual machine's simulated clock price instructions with `CostModel`. Prices
are integer nanoseconds so that the host and the on-device planner make the
same decisions bit for bit.

Default constants: fitted to the kernel's own per-instruction timings
(``benchmarks/fit_cost.py``, ``profiling.fit_cost_model``) on an NVIDIA
H200 on 2026-11-21, W1-W6 under the makespan scheduler, DeepSeek absorbed
MLA (d_qk = 576 = 512 + 64, d_v = 512, bf16 cache), 132 SMs:

* ``kv_token_ns = 37.1``: a PARTIAL's cost per KV token it loads (whole
  pages). The first principles estimate is one SM's share of the copy
  bandwidth: 1152 B per token / (3.35 TB/s / 132) = 45 ns.
* ``partial_fixed_ns = 9393``: the query tile load, the pipeline fill and
  the fp32/bf16 write-out, paid once per PARTIAL.
* ``reduce_fixed_ns = 22189`` and ``reduce_row_input_ns = 42.45``: a REDUCE
  (its dependency wait excluded) against rows x inputs it merges.
* ``row_token_ns = 0.361`` (not fitted: the timed workloads are memory
  bound): QK^T and PV cost 2 x (576 + 512) = 2176 FLOP per query row per
  token; one SM's share of 796 TFLOP/s is 6.03 TFLOP/s. The model charges
  the larger of the memory and the compute term per token.

The constants are plain fields: they are meant to be refitted from measured
instruction timings.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jax_thundermla import isa

# Head dims the default constants were derived for; other dims scale them.
_REFERENCE_D_V = isa.HEAD_DIM_V
_ROPE_DIM = isa.ROPE_DIM


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Predicted duration of an instruction on one SM.

  Attributes:
    partial_fixed_ns: fixed cost of one PARTIAL.
    kv_token_ns: memory cost of one KV token of one PARTIAL (d_qk = 576 bf16);
      scaled by ``(d_v + 64) / 576`` for other head dims.
    row_token_ns: compute cost of one query row against one KV token
      (d_qk = 576, d_v = 512); scaled by ``(2 d_v + 64) / 1088``.
    reduce_fixed_ns: fixed cost of one REDUCE.
    reduce_row_input_ns: cost of merging one row of one input of a REDUCE
      (d_v = 512); scaled by ``(d_v + 1) / 513``.
  """

  partial_fixed_ns: float = 9393.0
  kv_token_ns: float = 37.1
  row_token_ns: float = 0.361
  reduce_fixed_ns: float = 22189.0
  reduce_row_input_ns: float = 42.45

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, bool) or not isinstance(
          value, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"CostModel.{field.name} must be a real number, got"
            f" {type(value).__name__}")
      if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"CostModel.{field.name} must be finite and >= 0, got {value}")
    if self.kv_token_ns <= 0:
      raise ValueError(
          f"CostModel.kv_token_ns must be > 0, got {self.kv_token_ns}")

  def page_ns(self, num_rows: int, page_size: int, head_dim_v: int) -> int:
    """Cost of one KV page for a tile of ``num_rows`` rows (at least 1 ns)."""
    memory = self.kv_token_ns * (head_dim_v + _ROPE_DIM) / (
        _REFERENCE_D_V + _ROPE_DIM)
    compute = self.row_token_ns * num_rows * (2 * head_dim_v + _ROPE_DIM) / (
        2 * _REFERENCE_D_V + _ROPE_DIM)
    return max(1, int(np.rint(page_size * max(memory, compute))))

  def partial_fixed(self) -> int:
    """Fixed cost of a PARTIAL, integer ns."""
    return int(np.rint(self.partial_fixed_ns))

  def reduce_fixed(self) -> int:
    """Fixed cost of a REDUCE, integer ns."""
    return int(np.rint(self.reduce_fixed_ns))

  def reduce_input_ns(self, num_rows: int, head_dim_v: int) -> int:
    """Cost of one input of a REDUCE over ``num_rows`` rows, integer ns."""
    return int(np.rint(self.reduce_row_input_ns * num_rows * (head_dim_v + 1)
                       / (_REFERENCE_D_V + 1)))

  def instruction_ns(self, instructions: np.ndarray, *, page_size: int,
                     head_dim_v: int) -> np.ndarray:
    """Predicted duration of each instruction.

    Args:
      instructions: int array ``[..., INSTRUCTION_WORDS]``.
      page_size: tokens per cache page (a PARTIAL loads whole pages).
      head_dim_v: value head dim.

    Returns:
      int64 array ``[...]`` of nanoseconds; 0 for STOP rows.
    """
    ins = np.asarray(instructions, np.int64)
    op = isa.Fields(ins).opcode
    rows = isa.Fields(ins).num_rows
    out = np.zeros(op.shape, np.int64)
    for r in np.unique(rows[op != isa.OP_STOP]):
      r = int(r)
      partial = (op == isa.OP_PARTIAL) & (rows == r)
      start = isa.Fields(ins).kv_start[partial]
      end = isa.Fields(ins).kv_end[partial]
      pages = np.where(end > start, -(-end // page_size) - start // page_size,
                       0)
      out[partial] = (self.partial_fixed()
                      + pages * self.page_ns(r, page_size, head_dim_v))
      reduce = (op == isa.OP_REDUCE) & (rows == r)
      out[reduce] = (self.reduce_fixed() + isa.Fields(ins).num_src[reduce]
                     * self.reduce_input_ns(r, head_dim_v))
    return out
