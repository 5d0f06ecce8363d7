"""A CPU virtual machine for instruction tensors: the kernel's oracle.

`execute` runs an instruction tensor (or a DecodePlan) in float64 numpy with
the semantics of csrc/isa.h; `simulate` does everything but the arithmetic.
Both

* check every field (opcodes, sequence and head indices, row and KV ranges
  within the sequence, slot and counter indices) and raise ProgramError;
* run the simulated clock (jax_thundermla.plan.timing): every SM executes its
  list in order, an instruction starts when its SM is free and its wait
  counter is satisfied; a wait that can never be satisfied raises
  DeadlockError;
* follow the data, row by row of each slot: a PARTIAL writes rows ``[0,
  num_rows)`` of its slot, a REDUCE reads rows ``[slot_row, slot_row +
  num_rows)`` of its source slots and writes those of a slot destination. A
  REDUCE may read a row only if the row's writer happens before it (same SM
  earlier, or through counter waits, transitively: vector clocks), and a row
  may be overwritten only after its previous writer and readers happen
  before; otherwise HazardError. Every (sequence, KV head, query row) must be
  written exactly once, from KV ranges that tile ``[0, len)`` exactly;
  otherwise CoverageError.

Numerics: a PARTIAL over ``[kv_start, kv_end)`` computes, for each row of its
tile (row r is query token r // g of head kv_head * g + r % g, g = h_q /
h_kv), softmax attention over the keys it sees (all of the range, or with
causal masking the keys ``<= len - s_q + token``). A result written to a slot
is the normalised output and the base-2 log-sum-exp ``log2(sum 2^(score *
scale * log2 e))``, -inf for a row that saw no key. A REDUCE merges slots
with weights ``2^(lse_i - max lse)``. A final write stores the output and
the natural-log LSE; a row that saw no key gets out = 0, lse = +inf. Only KV
positions below the sequence length are read: NaN anywhere else cannot leak.
A key that a row does not see (causal mask) never affects it; a NaN in a key
that a row sees makes the row NaN, through every merge.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jax_thundermla import _vm_flow
from jax_thundermla import isa
from jax_thundermla.plan import timing
from jax_thundermla.plan.cost import CostModel
from jax_thundermla.plan.plan import DecodePlan

DeadlockError = timing.DeadlockError
ProgramError = _vm_flow.ProgramError
HazardError = _vm_flow.HazardError
CoverageError = _vm_flow.CoverageError

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class VMResult:
  """Outcome of a run.

  Attributes:
    out: float64 ``[b, s_q, h_q, d_v]`` (None from `simulate`).
    lse: float64 ``[b, h_q, s_q]``, natural log (None from `simulate`).
    makespan_ns: simulated duration.
    sm: ``[n]`` SM of each executed instruction, in (SM, position) order.
    index: ``[n]`` position of the instruction in its SM's list.
    opcode: ``[n]`` opcode.
    start_ns: ``[n]`` simulated start.
    end_ns: ``[n]`` simulated end.
  """

  out: np.ndarray | None
  lse: np.ndarray | None
  makespan_ns: float
  sm: np.ndarray
  index: np.ndarray
  opcode: np.ndarray
  start_ns: np.ndarray
  end_ns: np.ndarray


@dataclasses.dataclass
class _Machine:
  """Decoded program and the shapes it runs on."""

  instructions: np.ndarray  # int64 [S, I, W]
  seqlens: np.ndarray  # int64 [b]
  s_q: int
  h_q: int
  h_kv: int
  page_size: int | None
  num_slots: int | None
  num_counters: int | None

  @property
  def rows_per_head(self) -> int:
    return self.s_q * (self.h_q // self.h_kv)


def _machine(program: Any, seqlens: Any, s_q: Any, h_q: Any, h_kv: Any,
             page_size: Any) -> _Machine:
  if isinstance(program, DecodePlan):
    lens = program.seqlens if seqlens is None else seqlens
    m = _Machine(np.asarray(program.instructions, np.int64),
                 np.asarray(lens, np.int64), program.s_q, program.h_q,
                 program.h_kv, program.page_size, program.num_slots,
                 program.num_counters)
    given = {"s_q": s_q, "h_q": h_q, "h_kv": h_kv, "page_size": page_size}
    for name, value in given.items():
      if value is not None and value != getattr(m, name):
        raise ValueError(
            f"{name}={value} does not match the plan's {name}="
            f"{getattr(m, name)}")
  else:
    missing = [n for n, v in (("seqlens", seqlens), ("s_q", s_q),
                              ("h_q", h_q), ("h_kv", h_kv)) if v is None]
    if missing:
      raise ValueError(
          f"a raw instruction tensor needs {', '.join(missing)}")
    m = _Machine(np.asarray(program, np.int64), np.asarray(seqlens, np.int64),
                 int(s_q), int(h_q), int(h_kv),
                 None if page_size is None else int(page_size), None, None)
  ins = m.instructions
  if ins.ndim != 3 or ins.shape[2] != isa.INSTRUCTION_WORDS:
    raise ProgramError(
        f"instructions must have shape [num_sms, max_instructions,"
        f" {isa.INSTRUCTION_WORDS}], got {ins.shape}")
  if m.seqlens.ndim != 1:
    raise ValueError(f"seqlens must have shape [b], got {m.seqlens.shape}")
  if m.h_q % m.h_kv:
    raise ValueError(f"h_q={m.h_q} is not a multiple of h_kv={m.h_kv}")
  return m


def _check_fields(m: _Machine, words: np.ndarray, sm: np.ndarray,
                  index: np.ndarray) -> None:
  """Raises ProgramError at the first instruction with a bad field."""
  op = isa.Fields(words).opcode
  b = isa.Fields(words).batch
  row0 = isa.Fields(words).row_start
  rows = isa.Fields(words).num_rows
  dst = isa.Fields(words).dst_slot
  slot_row = isa.Fields(words).slot_row
  partial = op == isa.OP_PARTIAL
  reduce = op == isa.OP_REDUCE
  batch = m.seqlens.shape[0]
  length = m.seqlens[np.clip(b, 0, max(batch - 1, 0))]
  f5, f6 = words[:, 5], words[:, 6]
  slots = np.inf if m.num_slots is None else m.num_slots
  counters = np.inf if m.num_counters is None else m.num_counters
  checks = (
      (~(partial | reduce), "unknown opcode"),
      ((b < 0) | (b >= batch), "batch out of range"),
      ((isa.Fields(words).kv_head < 0)
       | (isa.Fields(words).kv_head >= m.h_kv), "kv_head out of range"),
      ((rows < 1) | (rows > isa.TILE_ROWS) | (row0 < 0)
       | (row0 + rows > m.rows_per_head), "query rows out of range"),
      (partial & ((f5 < 0) | (f5 > f6) | (f6 > length)),
       "KV range outside [0, len)"),
      (partial & (dst == isa.FINAL_OUTPUT) & ((f5 != 0) | (f6 != length)),
       "PARTIAL to the final output must cover the whole sequence"),
      (reduce & ((f5 < 0) | (f6 < 1) | (f5 + f6 > slots)),
       "source slots out of range"),
      (reduce & (f6 > isa.MAX_REDUCE_INPUTS),
       f"more than {isa.MAX_REDUCE_INPUTS} REDUCE inputs"),
      (reduce & ((slot_row < 0) | (slot_row + rows > isa.TILE_ROWS)),
       "slot rows out of the tile"),
      ((dst < isa.FINAL_OUTPUT) | (dst >= slots), "dst_slot out of range"),
      ((isa.Fields(words).signal_counter < isa.NO_COUNTER)
       | (isa.Fields(words).signal_counter >= counters),
       "signal_counter out of range"),
      ((isa.Fields(words).wait_counter < isa.NO_COUNTER)
       | (isa.Fields(words).wait_counter >= counters)
       | (isa.Fields(words).wait_count < 0), "wait counter out of range"),
  )
  for bad, what in checks:
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      raise ProgramError(
          f"SM {sm[i]} instruction {index[i]}: {what}: {words[i].tolist()}")


class _Numerics:
  """float64 attention of the paged inputs."""

  def __init__(self, m: _Machine, q, kv_cache, block_table, head_dim_v: int,
               softmax_scale: float | None, causal: bool):
    self.q = np.asarray(q, np.float64)
    self.kv = np.asarray(kv_cache, np.float64)
    self.table = np.asarray(block_table, np.int64)
    self.d_v = head_dim_v
    d_qk = self.q.shape[-1]
    self.scale = d_qk ** -0.5 if softmax_scale is None else softmax_scale
    self.causal = causal
    self.m = m
    self.group = m.h_q // m.h_kv

  def partial(self, key, start: int, end: int):
    b, k, row0, rows = key
    m = self.m
    r = np.arange(row0, row0 + rows)
    token = r // self.group
    head = k * self.group + r % self.group
    qq = self.q[b, token, head]  # [rows, d_qk]
    pos = np.arange(start, end)
    page_idx = pos // m.page_size
    if end > start and page_idx[-1] >= self.table.shape[1]:
      raise ValueError(
          f"block_table has {self.table.shape[1]} pages per sequence,"
          f" sequence {b} needs {page_idx[-1] + 1}")
    pages = self.table[b, page_idx]
    if ((pages < 0) | (pages >= self.kv.shape[0])).any():
      bad = int(page_idx[(pages < 0) | (pages >= self.kv.shape[0])][0])
      raise ValueError(
          f"block_table[{b}, {bad}] = {self.table[b, bad]} is not a page id"
          f" in [0, {self.kv.shape[0]})")
    keys = self.kv[pages, pos % m.page_size, k]  # [n, d_qk]
    scores = qq @ keys.T * self.scale
    if self.causal:
      seen = pos[None, :] <= (m.seqlens[b] - m.s_q + token)[:, None]
    else:
      seen = np.ones(scores.shape, bool)
    scores = np.where(seen, scores, -np.inf)
    # A NaN or +inf score makes its row NaN; a row that sees nothing is
    # empty (total 0).
    top = scores.max(axis=1, initial=-np.inf)
    safe = np.where(np.isneginf(top), 0.0, top)
    p = np.where(seen, np.exp(scores - safe[:, None]), 0.0)
    total = p.sum(axis=1)
    # A key a row does not see weighs 0 in it; 0 x NaN must not reach the
    # row: weights multiply finite values only, and a row gets NaN in each
    # column where a key it sees holds a non-finite value.
    values = keys[:, :self.d_v]
    finite = np.isfinite(values)
    weighted = p @ np.where(finite, values, 0.0)
    weighted[seen @ ~finite] = np.nan
    return _normalise(weighted, total, safe, np.log, _LOG2E)

  @staticmethod
  def reduce(outs: np.ndarray, lse2: np.ndarray):
    """Merges ``[n, rows, d_v]`` outputs by their ``[n, rows]`` LSEs."""
    top = lse2.max(axis=0)  # NaN inputs stay NaN
    safe = np.where(np.isneginf(top), 0.0, top)
    w = np.exp2(lse2 - safe)  # 0 for an input that saw nothing
    return _normalise((w[..., None] * outs).sum(axis=0), w.sum(axis=0), safe,
                      np.log2, 1.0)


def _normalise(weighted: np.ndarray, total: np.ndarray, top: np.ndarray,
               log, lse_factor: float):
  """``(weighted / total, (top + log(total)) * lse_factor)`` per row; rows of
  total 0 (no key seen) give out 0 and lse -inf, NaN stays NaN."""
  empty = total == 0
  with np.errstate(invalid="ignore"):
    out = weighted / np.where(empty, 1.0, total)[:, None]
    lse = (top + log(np.where(empty, 1.0, total))) * lse_factor
  out[empty] = 0.0
  return out, np.where(empty, -np.inf, lse)


class _Outputs:
  """The final output: each row written once, from KV ranges tiling
  ``[0, len)``.

  Attributes:
    out: float64 ``[b, s_q, h_q, d_v]`` (None without numerics).
    lse: float64 ``[b, h_q, s_q]``, natural log (None without numerics).
  """

  def __init__(self, m: _Machine, d_v: int | None):
    b = m.seqlens.shape[0]
    self._m = m
    self._written = np.zeros((b, m.h_kv, m.rows_per_head), bool)
    self.out = self.lse = None
    if d_v is not None:
      self.out = np.zeros((b, m.s_q, m.h_q, d_v))
      self.lse = np.zeros((b, m.h_q, m.s_q))

  def store(self, where: str, value: _vm_flow.Value,
            ranges: list[list[tuple[int, int]]]) -> None:
    """Writes a value's rows; ``ranges`` resolves its range ids.

    Raises:
      CoverageError: a row is written twice, or its KV ranges do not tile
        ``[0, len)``.
    """
    b, k, row0, rows = value.key
    if self._written[b, k, row0:row0 + rows].any():
      raise CoverageError(f"{where} writes output rows {value.key} that are"
                          " already written (double coverage)")
    self._written[b, k, row0:row0 + rows] = True
    expect = int(self._m.seqlens[b])
    for i in np.unique(value.ranges).tolist():
      got = ranges[i]
      tiled = (not got and expect == 0) or (
          got and got[0][0] == 0 and got[-1][1] == expect
          and all(e == s for (_, e), (s, _) in zip(got, got[1:])))
      if not tiled:
        raise CoverageError(
            f"{where} writes rows {value.key} from KV ranges {got}, which do"
            f" not tile [0, {expect})")
    if self.out is not None:
      group = self._m.h_q // self._m.h_kv
      r = np.arange(row0, row0 + rows)
      token, head = r // group, k * group + r % group
      self.out[b, token, head] = value.out
      self.lse[b, head, token] = np.where(np.isneginf(value.lse2), np.inf,
                                          value.lse2 / _LOG2E)

  def check_complete(self) -> None:
    """Raises CoverageError if some output row was never written."""
    if not self._written.all():
      b, k, r = (int(v[0]) for v in np.nonzero(~self._written))
      raise CoverageError(f"output row {r} of sequence {b}, KV head {k} is"
                          " never written")


def _follow(m: _Machine, numerics: _Numerics | None, words: np.ndarray,
            sm: np.ndarray, index: np.ndarray,
            t: timing.Timing) -> _Outputs:
  """Follows the data through the slots in an execution order.

  Returns:
    The final output (with numbers when ``numerics`` is given).

  Raises:
    ProgramError, HazardError, CoverageError: as named.
  """
  order, clock = _vm_flow.order_and_clocks(words, sm, index, t,
                                           m.instructions.shape[0])
  d_v = None if numerics is None else numerics.d_v
  flow = _vm_flow.Flow(sm, index, clock, d_v)
  outputs = _Outputs(m, d_v)
  for x in order:
    w = isa.Fields(words[x])
    key = tuple(int(v) for v in w.key)
    if w.opcode == isa.OP_PARTIAL:
      slot_row = 0
      start, end = int(w.kv_start), int(w.kv_end)
      value = _vm_flow.Value(key, flow.new_ranges(
          [(start, end)] if end > start else [], key[3]))
      if numerics is not None:
        value.out, value.lse2 = numerics.partial(key, start, end)
    else:
      slot_row = int(w.slot_row)
      ranges, outs, lse2 = flow.read(x, key, int(w.src_slot),
                                     int(w.num_src), slot_row)
      value = _vm_flow.Value(key, flow.merge(x, ranges))
      if numerics is not None:
        value.out, value.lse2 = numerics.reduce(outs, lse2)
    dst = int(w.dst_slot)
    if dst == isa.FINAL_OUTPUT:
      outputs.store(flow.name(x), value, flow.ranges)
    else:
      flow.write(x, dst, slot_row, value)
  outputs.check_complete()
  return outputs


def _run(m: _Machine, numerics: _Numerics | None, cost_model,
         head_dim_v: int, check: bool) -> VMResult:
  ins = m.instructions
  live = timing.live_mask(ins)
  sm, index = np.nonzero(live)
  words = ins[live]
  _check_fields(m, words, sm, index)
  durations = None
  if cost_model is not None:
    if m.page_size is None:
      raise ValueError("a cost_model needs page_size to price PARTIALs")
    durations = cost_model.instruction_ns(ins, page_size=m.page_size,
                                          head_dim_v=head_dim_v)
  t = timing.simulate(ins, durations)
  out = lse = None
  if check or numerics is not None:
    outputs = _follow(m, numerics, words, sm, index, t)
    out, lse = outputs.out, outputs.lse
  return VMResult(out, lse, t.makespan_ns, t.sm, t.index, t.opcode,
                  t.start_ns, t.end_ns)


def simulate(program: DecodePlan | Any, *, seqlens: Any = None,
             s_q: int | None = None, h_q: int | None = None,
             h_kv: int | None = None, page_size: int | None = None,
             head_dim_v: int = 512, cost_model: CostModel | None = None,
             check: bool = True) -> VMResult:
  """Runs the clock and the checks of a program, without the arithmetic.

  Args:
    program: a DecodePlan or an int ``[num_sms, max_instructions,
      INSTRUCTION_WORDS]`` instruction tensor.
    seqlens: ``[b]`` lengths (a plan's own by default; required otherwise).
    s_q, h_q, h_kv: shapes (a plan's own; required for a raw tensor).
    page_size: tokens per page (needed with ``cost_model``).
    head_dim_v: value head dim (prices instructions with ``cost_model``).
    cost_model: price instructions with it instead of their cost words.
    check: also check data flow and coverage.

  Returns:
    A VMResult without ``out``/``lse``.

  Raises:
    ProgramError, DeadlockError, HazardError, CoverageError: as named.
  """
  m = _machine(program, seqlens, s_q, h_q, h_kv, page_size)
  return _run(m, None, cost_model, head_dim_v, check)


def execute(program: DecodePlan | Any, q: Any, kv_cache: Any,
            block_table: Any, cache_seqlens: Any, *, head_dim_v: int,
            softmax_scale: float | None = None, causal: bool,
            cost_model: CostModel | None = None) -> VMResult:
  """Executes a program on paged inputs in float64.

  Args:
    program: a DecodePlan or an int ``[num_sms, max_instructions,
      INSTRUCTION_WORDS]`` instruction tensor.
    q: ``[b, s_q, h_q, d_qk]`` queries.
    kv_cache: ``[num_pages, page_size, h_kv, d_qk]``; V is ``[..., :d_v]``.
    block_table: int ``[b, max_pages]`` page ids.
    cache_seqlens: int ``[b]`` tokens per sequence.
    head_dim_v: value head dim d_v.
    softmax_scale: score scale, ``d_qk ** -0.5`` by default.
    causal: bottom-right causal masking.
    cost_model: price instructions with it instead of their cost words.

  Returns:
    A VMResult with ``out`` ``[b, s_q, h_q, d_v]`` and ``lse`` ``[b, h_q,
    s_q]``.

  Raises:
    ProgramError, DeadlockError, HazardError, CoverageError: as named.
    ValueError: shapes disagree, or a needed block table entry is no page.
  """
  q = np.asarray(q)
  kv_cache = np.asarray(kv_cache)
  if q.ndim != 4 or kv_cache.ndim != 4:
    raise ValueError(
        f"q and kv_cache must be 4-D, got shapes {q.shape} and"
        f" {kv_cache.shape}")
  b, s_q, h_q, d_qk = q.shape
  _, page_size, h_kv, _ = kv_cache.shape
  if kv_cache.shape[3] != d_qk or not 0 < head_dim_v <= d_qk:
    raise ValueError(
        f"kv_cache head dim {kv_cache.shape[3]} and head_dim_v {head_dim_v}"
        f" do not fit q head dim {d_qk}")
  lens = np.asarray(cache_seqlens, np.int64)
  if lens.shape != (b,):
    raise ValueError(f"cache_seqlens must have shape [{b}], got {lens.shape}")
  m = _machine(program, lens, s_q, h_q, h_kv, page_size)
  numerics = _Numerics(m, q, kv_cache, block_table, head_dim_v,
                       softmax_scale, causal)
  return _run(m, numerics, cost_model, head_dim_v, True)
