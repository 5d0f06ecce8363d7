"""Simulated clock of an instruction tensor.

Every SM runs its list in order, all SMs at once. An instruction starts when
its SM is free and, if it waits on a counter, when the counter has received
``wait_count`` signals; a signal arrives when the signalling instruction ends.
The simulation finds these earliest start times by a fixed point: a waiting
instruction starts "never" until the signals it needs have finite times, so
instructions caught in a wait cycle, or waiting on a counter that too few
instructions signal, keep "never" and are reported as a deadlock.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_thundermla import isa


class DeadlockError(RuntimeError):
  """Some instruction can never start: the plan would hang the kernel."""


@dataclasses.dataclass(frozen=True)
class Timing:
  """Simulated start and end of every executed instruction, arrays ``[n]``.

  Entries are in (SM, position) order.

  Attributes:
    sm: SM of the instruction.
    index: position in the SM's list.
    opcode: opcode.
    start_ns: start time.
    end_ns: end time.
  """

  sm: np.ndarray
  index: np.ndarray
  opcode: np.ndarray
  start_ns: np.ndarray
  end_ns: np.ndarray

  @property
  def makespan_ns(self) -> float:
    """End of the last instruction (0 for an empty plan)."""
    return float(self.end_ns.max(initial=0.0))


def live_mask(instructions: np.ndarray) -> np.ndarray:
  """bool ``[S, I]``: rows an SM executes (those before its first STOP)."""
  op = isa.Fields(np.asarray(instructions)).opcode
  return np.cumprod(op != isa.OP_STOP, axis=1).astype(bool)


def simulate(instructions: np.ndarray,
             durations: np.ndarray | None = None) -> Timing:
  """Earliest start and end of each instruction.

  Args:
    instructions: int ``[S, I, INSTRUCTION_WORDS]``.
    durations: optional ``[S, I]`` durations in ns; by default the cost word
      of each instruction.

  Returns:
    The timing of every live instruction.

  Raises:
    DeadlockError: some instruction can never start.
    ValueError: a counter field is below -1.
  """
  ins = np.asarray(instructions)
  num_sms = ins.shape[0]
  live = live_mask(ins)
  sm, index = np.nonzero(live)
  words = ins[live].astype(np.int64)
  n = words.shape[0]
  if durations is None:
    dur = isa.Fields(words).cost.astype(np.float64)
  else:
    dur = np.asarray(durations, np.float64)[live]
  if n == 0:
    empty = np.zeros(0)
    return Timing(sm, index, isa.Fields(words).opcode, empty, empty)
  signal = isa.Fields(words).signal_counter
  wait = isa.Fields(words).wait_counter
  count = isa.Fields(words).wait_count
  if signal.min() < -1 or wait.min() < -1:
    raise ValueError("counter fields must be >= -1 (NO_COUNTER)")
  waiting = np.flatnonzero((wait >= 0) & (count > 0))
  signallers = np.flatnonzero(signal >= 0)
  num_counters = 1 + max(int(signal.max()), int(wait.max()))
  sig_counter = signal[signallers]
  per_counter = np.bincount(sig_counter, minlength=num_counters)
  counter_first = np.cumsum(per_counter) - per_counter
  wait_counter = wait[waiting]
  wait_count = count[waiting]
  satisfiable = wait_count <= per_counter[wait_counter]
  pick = counter_first[wait_counter] + np.minimum(
      wait_count, np.maximum(per_counter[wait_counter], 1)) - 1

  width = int(live.sum(1).max())
  lane = np.full((num_sms, width), -np.inf)
  cum = np.zeros((num_sms, width))
  cum[sm, index] = dur
  cum = np.cumsum(cum, axis=1)
  done = cum[sm, index]
  before = done - dur
  ready = np.zeros(n)
  ready[waiting] = np.inf
  for _ in range(n + 1):
    lane[sm, index] = ready - before
    end = np.maximum.accumulate(lane, axis=1)[sm, index] + done
    if waiting.size == 0:
      break
    ends = end[signallers]
    ordered = ends[np.lexsort((ends, sig_counter))] if ends.size else ends
    arrival = np.full(waiting.shape[0], np.inf)
    if ordered.size:
      arrival = np.where(satisfiable, ordered[np.minimum(pick, ordered.size
                                                         - 1)], np.inf)
    if np.array_equal(arrival, ready[waiting]):
      break
    ready[waiting] = arrival
  start = end - dur
  stuck = ~np.isfinite(end)
  if stuck.any():
    raise DeadlockError(_deadlock_report(
        sm, index, stuck, wait, count, per_counter, num_counters))
  return Timing(sm, index, isa.Fields(words).opcode, start, end)


def _deadlock_report(sm, index, stuck, wait, count, per_counter,
                     num_counters) -> str:
  """Names the first blocked instruction of each stuck SM."""
  lines = []
  for s in np.unique(sm[stuck]):
    i = np.flatnonzero(stuck & (sm == s))[0]
    c = int(wait[i])
    have = int(per_counter[c]) if 0 <= c < num_counters else 0
    why = (f"counter {c} has {have} signalling instructions, it needs"
           f" {int(count[i])}" if have < count[i] else
           f"counter {c} waits (transitively) on this SM or on a blocked one:"
           " a wait cycle")
    lines.append(f"SM {int(s)} blocks at instruction {int(index[i])}: {why}")
  shown = "\n  ".join(lines[:8])
  more = f"\n  ... and {len(lines) - 8} more SMs" if len(lines) > 8 else ""
  return f"the instruction lists deadlock:\n  {shown}{more}"
