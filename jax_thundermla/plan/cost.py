"""The one cost model of the planners and of the virtual machine's clock.

Every planner (balanced, static, makespan, the on-device planner) and the
virtual machine's simulated clock price instructions with `CostModel`. Prices
are integer nanoseconds so that the host and the on-device planner make the
same decisions bit for bit.

Default constants, H100 SXM (132 SMs, 3.02 TB/s measured copy bandwidth,
796 TFLOP/s measured dense bf16), DeepSeek absorbed MLA (d_qk = 576 =
512 + 64, d_v = 512, bf16 cache). All SMs stream at once, so each gets a
1/132 share of the chip:

* ``kv_token_ns = 50.3``: a PARTIAL reads every KV token of its range once,
  576 x 2 B = 1152 B; one SM's share of the bandwidth is 3.02e12 / 132 =
  22.9 GB/s, so 1152 B / 22.9 GB/s = 50.3 ns per token (the chip as a whole
  moves a token every 0.38 ns).
* ``row_token_ns = 0.361``: QK^T and PV cost 2 x (576 + 512) = 2176 FLOP per
  query row per token; one SM's share of 796 TFLOP/s is 6.03 TFLOP/s, so
  0.361 ns per row and token (23.1 ns for a full 64-row tile). A PARTIAL is
  memory bound while ``rows x row_token_ns < kv_token_ns``; the model charges
  the larger of the two per token.
* ``partial_fixed_ns = 2500``: loading the query tile (64 x 576 bf16), filling
  the KV pipeline and writing the result, paid once per PARTIAL.
* ``reduce_fixed_ns = 1500`` and ``reduce_row_input_ns = 4.0``: a REDUCE reads
  rows x (d_v + 1) fp32 words per input from L2 (2052 B per row, ~500 GB/s
  for one SM with bulk copies), about 256 ns per 64-row input.

The constants are plain fields: they are meant to be refitted from measured
instruction timings.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jax_thundermla import isa

# Head dims the default constants were derived for; other dims scale them.
_REFERENCE_D_V = 512
_ROPE_DIM = 64


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

  partial_fixed_ns: float = 2500.0
  kv_token_ns: float = 50.3
  row_token_ns: float = 0.361
  reduce_fixed_ns: float = 1500.0
  reduce_row_input_ns: float = 4.0

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
    op = ins[..., isa.FIELD_OPCODE]
    rows = ins[..., isa.FIELD_NUM_ROWS]
    out = np.zeros(op.shape, np.int64)
    for r in np.unique(rows[op != isa.OP_STOP]):
      r = int(r)
      partial = (op == isa.OP_PARTIAL) & (rows == r)
      start = ins[..., isa.FIELD_KV_START][partial]
      end = ins[..., isa.FIELD_KV_END][partial]
      pages = np.where(end > start, -(-end // page_size) - start // page_size,
                       0)
      out[partial] = (self.partial_fixed()
                      + pages * self.page_ns(r, page_size, head_dim_v))
      reduce = (op == isa.OP_REDUCE) & (rows == r)
      out[reduce] = (self.reduce_fixed() + ins[..., isa.FIELD_NUM_SRC][reduce]
                     * self.reduce_input_ns(r, head_dim_v))
    return out
