"""Decoding the timed kernel's per-instruction records, and their summary."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jax_thundermla import isa


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
    phase_ns: per op name, the mean of its three phases: waiting (start to
      ready: dependencies and, for a PARTIAL, its first K/V block), working
      (ready to computed) and writing (computed to end: results out and the
      signal).
    first_ready_ns: mean over SMs of the time from the launch's first
      start to the SM's first instruction being ready (the launch's fill).
  """

  makespan_ns: int
  mean_ns: dict[str, float]
  count: dict[str, int]
  idle_fraction: float
  tail_ns: int
  phase_ns: dict[str, tuple[float, float, float]]
  first_ready_ns: float


def _mean_phases(timings: Sequence[InstructionTiming]
                 ) -> tuple[float, float, float]:
  """Mean waiting (start to ready), working (ready to computed) and
  writing (computed to end) of some timings."""
  return tuple(float(np.mean(x)) for x in zip(
      *((t.ready - t.start, t.computed - t.ready, t.end - t.computed)
        for t in timings)))


def summarize_timings(timings: Sequence[InstructionTiming], *,
                      num_sms: int) -> TimingSummary:
  """Per-op mean durations and phases, idle fraction, tail and fill of one
  launch.

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
  first = min(t.start for t in timings)
  makespan = max(t.end for t in timings) - first
  mean, count, phases = {}, {}, {}
  for op, name in isa.OP_NAMES.items():
    of_op = [t for t in timings if t.opcode == op]
    if of_op:
      mean[name] = float(np.mean([t.duration for t in of_op]))
      count[name] = len(of_op)
      phases[name] = _mean_phases(of_op)
  busy = sum(t.duration for t in timings)
  finish: dict[int, int] = {}
  # Per SM: (index, ready) of its first instruction.
  first_ready: dict[int, tuple[int, int]] = {}
  for t in timings:
    finish[t.sm] = max(finish.get(t.sm, 0), t.end)
    if t.sm not in first_ready or t.index < first_ready[t.sm][0]:
      first_ready[t.sm] = (t.index, t.ready - first)
  idle = 1.0 - busy / (num_sms * makespan) if makespan else 0.0
  return TimingSummary(
      makespan_ns=makespan, mean_ns=mean, count=count, idle_fraction=idle,
      tail_ns=max(finish.values()) - min(finish.values()), phase_ns=phases,
      first_ready_ns=float(np.mean([r for _, r in first_ready.values()])))


def fields_of(words: np.ndarray, t: InstructionTiming) -> Any:
  """The plan's fields of the instruction a timing records.

  Args:
    words: the instruction tensor ``[num_sms, max_instructions,
      INSTRUCTION_WORDS]``.
    t: a timing of a launch of that tensor.

  Returns:
    ``isa.Fields`` of the instruction.

  Raises:
    ValueError: the timing names a slot outside the tensor, or an
      instruction of another opcode.
  """
  if t.sm >= words.shape[0] or t.index >= words.shape[1]:
    raise ValueError(f"timing ({t.sm}, {t.index}) is outside the plan")
  f = isa.Fields(words[t.sm, t.index])
  if int(f.opcode) != t.opcode:
    raise ValueError(f"timing ({t.sm}, {t.index}) is not the plan's op")
  return f


def phases_by_shape(timings: Sequence[InstructionTiming],
                    instructions: Any) -> dict[tuple[str, int, Any], Any]:
  """Mean phases per instruction shape: where a kind of instruction waits.

  A REDUCE's shape is its rows and inputs (it reads rows x inputs partial
  rows); a PARTIAL's, its rows and where it writes ("final" output or a
  "slot"), which sets the bytes of its write-out.

  Args:
    timings: from ``decode_timings``.
    instructions: the launch's instruction tensor ``[num_sms,
      max_instructions, INSTRUCTION_WORDS]`` (``plan.instructions``).

  Returns:
    ``{(op name, rows, inputs or destination): (count, (waiting, working,
    writing) mean ns)}``, as in ``TimingSummary.phase_ns``.

  Raises:
    ValueError: a timing names a slot outside the tensor or another op.
  """
  words = np.asarray(instructions)
  groups: dict[tuple[str, int, Any], list[InstructionTiming]] = {}
  for t in timings:
    f = fields_of(words, t)
    if t.opcode == isa.OP_REDUCE:
      detail = int(f.num_src)
    else:
      detail = "final" if int(f.dst_slot) == isa.FINAL_OUTPUT else "slot"
    key = (isa.OP_NAMES[t.opcode], int(f.num_rows), detail)
    groups.setdefault(key, []).append(t)
  return {key: (len(ts), _mean_phases(ts)) for key, ts in groups.items()}
