"""Instruction lists to the instruction tensor, with bucketed capacities."""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_thundermla import isa

# Smallest capacity of a plan (instructions per SM, slots, and counters
# where it uses any).
MIN_CAPACITY = 8


def bucket(count: int) -> int:
  """Capacity for ``count`` entries: a power of two, at least MIN_CAPACITY."""
  return max(MIN_CAPACITY, 1 << max(0, int(count) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Instructions with the SM that runs each and their order on it.

  Attributes:
    rows: int64 ``[m, INSTRUCTION_WORDS]`` instruction words.
    sm: int64 ``[m]`` SM of each instruction.
    key: ``[m]`` order key: an SM runs its instructions by increasing key
      (ties keep the order of ``rows``).
    positional: the keys are already the positions 0, 1, ... of each list.
    workspace: ``(slots, counters)`` the rows use, where the scheduler
      counted them; by default `tensorize` finds them in the rows.
  """

  rows: np.ndarray
  sm: np.ndarray
  key: np.ndarray
  positional: bool = False
  workspace: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class Capacities:
  """Sizes a plan needs, before bucketing.

  Attributes:
    max_instructions: longest instruction list.
    num_slots: partial slots used.
    num_counters: counters used.
  """

  max_instructions: int
  num_slots: int
  num_counters: int

  def bucketed(self) -> Capacities:
    """Bucketed capacities. A plan whose instructions neither wait nor
    signal keeps no counters, so that its launch zeroes none (a memset
    kernel less per call)."""
    counters = bucket(self.num_counters) if self.num_counters else 0
    return Capacities(bucket(self.max_instructions), bucket(self.num_slots),
                      counters)


def capacities_of(rows: np.ndarray, longest: int) -> Capacities:
  """Capacities used by instruction rows ``[m, W]`` in lists of at most
  ``longest`` instructions."""
  reduce = rows[isa.Fields(rows).opcode == isa.OP_REDUCE]
  src_end = isa.Fields(reduce).src_slot + isa.Fields(reduce).num_src
  f = isa.Fields(rows)
  words = np.stack([f.dst_slot, f.signal_counter, f.wait_counter], axis=1)
  dst, signal, wait = np.maximum.reduce(words, axis=0, initial=-1).tolist()
  slots = max(dst + 1, int(np.maximum.reduce(src_end, initial=0)))
  return Capacities(longest, slots, 1 + max(signal, wait))


def tensorize(schedule: Schedule, num_sms: int) -> tuple[np.ndarray,
                                                           Capacities]:
  """Lays a schedule out as an instruction tensor.

  Args:
    schedule: the instructions, their SMs and order keys.
    num_sms: SMs of the grid.

  Returns:
    ``(instructions, capacities)``: int32 ``[num_sms, max_instructions,
    INSTRUCTION_WORDS]`` with zero (STOP) rows after each list, and the
    bucketed capacities (``max_instructions`` is the tensor's second dim).
  """
  if schedule.positional:
    sm, pos, rows = schedule.sm, schedule.key, schedule.rows
    longest = int(np.maximum.reduce(pos, initial=-1)) + 1
  else:
    order = np.lexsort((schedule.key, schedule.sm))
    sm, rows = schedule.sm[order], schedule.rows[order]
    per_sm = np.bincount(sm, minlength=num_sms)
    pos = np.arange(sm.shape[0]) - (np.cumsum(per_sm) - per_sm)[sm]
    longest = int(per_sm.max(initial=0))
  if schedule.workspace is None:
    caps = capacities_of(rows, longest).bucketed()
  else:
    caps = Capacities(longest, *schedule.workspace).bucketed()
  out = np.zeros((num_sms, caps.max_instructions, isa.INSTRUCTION_WORDS),
                 np.int32)
  out[sm, pos] = rows
  return out, caps
