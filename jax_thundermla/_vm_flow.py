"""Data flow of the CPU VM: happens-before clocks and per-row slot hazards.

`order_and_clocks` puts the instructions of a simulated run in an execution
order and gives each a vector clock of the instructions that happen before it
(same SM earlier, or through counter waits, transitively). `Flow` follows the
workspace slots row by row in that order: it checks that a row is read only
after its writer happens before, and overwritten only after its previous
writer and readers do, and records the KV ranges each row covers. The VM's
error classes live here because both this module and jax_thundermla.vm raise
them; jax_thundermla.vm re-exports them.
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np

from jax_thundermla import isa
from jax_thundermla.plan import timing


class ProgramError(ValueError):
  """An instruction has a field the instruction set does not allow."""


class HazardError(RuntimeError):
  """A slot is read or overwritten without the ordering that makes it safe."""


class CoverageError(RuntimeError):
  """An output row is missing, written twice, or covers KV tokens wrongly."""


def order_and_clocks(words: np.ndarray, sm: np.ndarray, index: np.ndarray,
                     t: timing.Timing, num_sms: int):
  """Topological execution order and happens-before vector clocks.

  Returns:
    ``(order, clock)``: instruction ids in an order that respects program
    order and counter waits, and int64 ``[n, num_sms]`` where ``clock[x, s]``
    is how many instructions of SM s happen before or at x.
  """
  n = words.shape[0]
  signal = isa.Fields(words).signal_counter
  wait = isa.Fields(words).wait_counter
  count = isa.Fields(words).wait_count
  signallers: dict[int, list[int]] = {}
  for x in np.flatnonzero(signal >= 0).tolist():
    signallers.setdefault(int(signal[x]), []).append(x)
  needs = [0] * n
  succs: list[list[int]] = [[] for _ in range(n)]
  for x in range(n):
    if index[x] > 0:
      succs[x - 1].append(x)
      needs[x] += 1
    if wait[x] >= 0 and count[x] > 0:
      group = signallers[int(wait[x])]
      first = sorted(group, key=lambda y: t.end_ns[y])[:int(count[x])]
      for y in first:
        succs[y].append(x)
        needs[x] += 1
  heap = [(t.start_ns[x], x) for x in range(n) if needs[x] == 0]
  heapq.heapify(heap)
  order = []
  clock = np.zeros((n, num_sms), np.int64)
  while heap:
    _, x = heapq.heappop(heap)
    order.append(x)
    if index[x] > 0:
      clock[x] = clock[x - 1]
    if wait[x] >= 0 and count[x] > 0:
      group = signallers[int(wait[x])]
      k = int(count[x])
      known = np.sort(clock[group], axis=0)[k - 1]
      clock[x] = np.maximum(clock[x], known)
    clock[x, sm[x]] = index[x] + 1
    for y in succs[x]:
      needs[y] -= 1
      if needs[y] == 0:
        heapq.heappush(heap, (t.start_ns[y], y))
  return order, clock


# Writer of a slot row that no instruction has written.
_UNWRITTEN = -1


@dataclasses.dataclass
class Value:
  """The rows an instruction produces.

  Attributes:
    key: ``(batch, kv_head, row_start, num_rows)`` of the instruction.
    ranges: int64 ``[num_rows]`` id (in `Flow.ranges`) of the KV ranges
      each row covers.
    out: ``[num_rows, d_v]`` normalised outputs (None without numerics).
    lse2: ``[num_rows]`` base-2 LSEs (None without numerics).
  """

  key: tuple[int, int, int, int]
  ranges: np.ndarray
  out: np.ndarray | None = None
  lse2: np.ndarray | None = None


@dataclasses.dataclass
class _Slot:
  """One workspace slot, row by row.

  Attributes:
    writer: int64 ``[TILE_ROWS]`` last instruction that wrote each row, or
      _UNWRITTEN.
    rows: int64 ``[TILE_ROWS, 3]`` (batch, KV head, query row) of each row.
    ranges: int64 ``[TILE_ROWS]`` id of the KV ranges each row covers.
    out: ``[TILE_ROWS, d_v]`` outputs (None without numerics).
    lse2: ``[TILE_ROWS]`` base-2 LSEs (None without numerics).
    readers: ``(instruction, first row, end row)`` of the reads of rows
      that have not been wholly overwritten since.
  """

  writer: np.ndarray
  rows: np.ndarray
  ranges: np.ndarray
  out: np.ndarray | None
  lse2: np.ndarray | None
  readers: list[tuple[int, int, int]]

  @classmethod
  def empty(cls, d_v: int | None) -> _Slot:
    tile = isa.TILE_ROWS
    return cls(np.full(tile, _UNWRITTEN), np.zeros((tile, 3), np.int64),
               np.zeros(tile, np.int64),
               None if d_v is None else np.zeros((tile, d_v)),
               None if d_v is None else np.zeros(tile), [])


def _query_rows(key: tuple[int, int, int, int]) -> np.ndarray:
  """int64 ``[num_rows, 3]``: (batch, KV head, query row) of a key's rows."""
  b, k, row0, rows = key
  out = np.empty((rows, 3), np.int64)
  out[:, 0], out[:, 1] = b, k
  out[:, 2] = np.arange(row0, row0 + rows)
  return out


class Flow:
  """The slots, row by row, and the happens-before checks of their use.

  Attributes:
    slots: the slots written so far.
    ranges: KV range lists; rows refer to them by index.
  """

  def __init__(self, sm: np.ndarray, index: np.ndarray, clock: np.ndarray,
               d_v: int | None):
    self._sm, self._index, self._clock, self._d_v = sm, index, clock, d_v
    self.slots: dict[int, _Slot] = {}
    self.ranges: list[list[tuple[int, int]]] = []

  def hb(self, x: int, y: int) -> bool:
    """Whether instruction x happens before instruction y (or is y)."""
    return self._clock[y, self._sm[x]] >= self._index[x] + 1

  def name(self, x: int) -> str:
    return f"SM {self._sm[x]} instruction {self._index[x]}"

  def new_ranges(self, ranges: list[tuple[int, int]],
                 rows: int) -> np.ndarray:
    """Range ids ``[rows]`` of rows that all cover ``ranges``."""
    self.ranges.append(ranges)
    return np.full(rows, len(self.ranges) - 1)

  def read(self, x: int, key: tuple[int, int, int, int], src: int, num: int,
           slot_row: int) -> tuple[np.ndarray, np.ndarray | None,
                                   np.ndarray | None]:
    """Rows ``[slot_row, slot_row + num_rows)`` of slots ``[src, src + num)``.

    Returns:
      ``(ranges, out, lse2)``: range ids ``[num, num_rows]``, outputs
      ``[num, num_rows, d_v]`` and LSEs ``[num, num_rows]`` (these two None
      without numerics).

    Raises:
      HazardError: a row is unwritten or its writer does not happen before.
      ProgramError: a row holds another query row than the key's.
    """
    lo, hi = slot_row, slot_row + key[3]
    want = _query_rows(key)
    held = []
    for s in range(src, src + num):
      slot = self.slots.get(s)
      if slot is None or (slot.writer[lo:hi] == _UNWRITTEN).any():
        raise HazardError(f"{self.name(x)} reads rows [{lo}, {hi}) of slot"
                          f" {s} before any instruction writes them")
      for writer in np.unique(slot.writer[lo:hi]).tolist():
        if not self.hb(writer, x):
          raise HazardError(
              f"{self.name(x)} reads slot {s} without waiting for its writer"
              f" ({self.name(writer)})")
      if not np.array_equal(slot.rows[lo:hi], want):
        raise ProgramError(
            f"{self.name(x)} merges rows [{lo}, {hi}) of slot {s}, which do"
            f" not hold the query rows {key}")
      slot.readers.append((x, lo, hi))
      held.append(slot)
    ranges = np.stack([slot.ranges[lo:hi] for slot in held])
    if self._d_v is None:
      return ranges, None, None
    return (ranges, np.stack([slot.out[lo:hi] for slot in held]),
            np.stack([slot.lse2[lo:hi] for slot in held]))

  def merge(self, x: int, ranges: np.ndarray) -> np.ndarray:
    """Range ids ``[rows]`` of the unions of the columns of ``ranges``.

    Raises:
      CoverageError: two merged ranges overlap.
    """
    columns, inverse = np.unique(ranges, axis=1, return_inverse=True)
    merged = []
    for column in columns.T.tolist():
      union = sorted(r for i in column for r in self.ranges[i])
      for (_, e0), (s1, _) in zip(union, union[1:]):
        if s1 < e0:
          raise CoverageError(
              f"{self.name(x)}: KV tokens merged twice (double coverage) in"
              f" ranges {union}")
      merged.append(self.new_ranges(union, 1)[0])
    return np.asarray(merged, np.int64)[inverse.ravel()]

  def write(self, x: int, dst: int, slot_row: int, value: Value) -> None:
    """Stores a value in rows ``[slot_row, slot_row + num_rows)`` of dst.

    Raises:
      HazardError: a previous writer or reader of those rows does not
        happen before x.
    """
    lo, hi = slot_row, slot_row + value.key[3]
    slot = self.slots.setdefault(dst, _Slot.empty(self._d_v))
    users = [w for w in np.unique(slot.writer[lo:hi]).tolist()
             if w != _UNWRITTEN]
    users += [y for y, a, b in slot.readers if a < hi and lo < b]
    for y in users:
      if not self.hb(y, x):
        raise HazardError(f"{self.name(x)} overwrites slot {dst} while"
                          f" {self.name(y)} may still use it")
    slot.readers = [(y, a, b) for y, a, b in slot.readers
                    if not lo <= a < b <= hi]
    slot.writer[lo:hi] = x
    slot.rows[lo:hi] = _query_rows(value.key)
    slot.ranges[lo:hi] = value.ranges
    if self._d_v is not None:
      slot.out[lo:hi] = value.out
      slot.lse2[lo:hi] = value.lse2
