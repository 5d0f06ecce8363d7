"""The shapes a host plan is built for, and the work items they imply.

A work item is one tile of query rows of one (sequence, KV head): for
sequence b and KV head k the ``R = s_q * (h_q // h_kv)`` query rows are cut
into ``ceil(R / TILE_ROWS)`` tiles of consecutive rows. Items are numbered in
(b, kv_head, tile) order. A planner covers each item's KV tokens ``[0, len)``
with one or more PARTIAL pieces and, when there are several, merges them with
REDUCEs.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jax_thundermla import isa
from jax_thundermla.plan.cost import CostModel


def tile_rows(s_q: int, h_q: int, h_kv: int) -> tuple[int, ...]:
  """Rows of each tile of one (sequence, KV head); only the last is short."""
  rows = s_q * (h_q // h_kv)
  return tuple(min(isa.TILE_ROWS, rows - start)
               for start in range(0, rows, isa.TILE_ROWS))


@dataclasses.dataclass(frozen=True)
class Problem:
  """Validated shapes of one decode step.

  Attributes:
    seqlens: int64 ``[b]`` tokens per sequence, new tokens included.
    s_q: new query tokens per sequence.
    h_q: query heads.
    h_kv: KV heads.
    page_size: tokens per cache page.
    head_dim_v: value head dim.
    num_sms: CTAs of the persistent grid (instruction lists).
    cost: the cost model.
  """

  seqlens: np.ndarray
  s_q: int
  h_q: int
  h_kv: int
  page_size: int
  head_dim_v: int
  num_sms: int
  cost: CostModel

  @property
  def batch(self) -> int:
    return int(self.seqlens.shape[0])



@functools.lru_cache(maxsize=64)
def tile_prices(s_q: int, h_q: int, h_kv: int, page_size: int,
                head_dim_v: int, cost: CostModel) -> tuple[
                    tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """``(rows, page_ns, input_ns)`` of each tile of one (sequence, KV head):
  its rows, the cost of one KV page and of one REDUCE input."""
  rows = tile_rows(s_q, h_q, h_kv)
  return (rows, tuple(cost.page_ns(r, page_size, head_dim_v) for r in rows),
          tuple(cost.reduce_input_ns(r, head_dim_v) for r in rows))


@functools.lru_cache(maxsize=64)
def row_input_prices(head_dim_v: int, cost: CostModel) -> np.ndarray:
  """Read-only int64 ``[TILE_ROWS + 1]``: entry r is the cost of one input
  of a REDUCE over r rows."""
  prices = np.asarray([cost.reduce_input_ns(r, head_dim_v)
                       for r in range(isa.TILE_ROWS + 1)], np.int64)
  prices.setflags(write=False)
  return prices


@functools.lru_cache(maxsize=8)
def _item_tables(batch: int, h_kv: int, rows: tuple[int, ...],
                 page_ns: tuple[int, ...], input_ns: tuple[int, ...]) -> tuple[
                     np.ndarray, np.ndarray, np.ndarray]:
  """Read-only `WorkItems` arrays that do not depend on the lengths.

  Returns:
    ``(page_ns, reduce_input_ns, partial)``, as the fields of `WorkItems`.
  """
  num_tiles = len(rows)
  item = np.arange(batch * h_kv * num_tiles)
  tile = item % num_tiles
  partial = np.zeros((item.shape[0], isa.INSTRUCTION_WORDS), np.int64)
  isa.Fields(partial).opcode = isa.OP_PARTIAL
  isa.Fields(partial).batch = item // (h_kv * num_tiles)
  isa.Fields(partial).kv_head = (item // num_tiles) % h_kv
  isa.Fields(partial).row_start = tile * isa.TILE_ROWS
  isa.Fields(partial).num_rows = np.asarray(rows, np.int64)[tile]
  isa.Fields(partial).wait_counter = isa.NO_COUNTER
  tables = (np.asarray(page_ns, np.int64)[tile],
            np.asarray(input_ns, np.int64)[tile], partial)
  for table in tables:
    table.setflags(write=False)
  return tables


@dataclasses.dataclass(frozen=True)
class WorkItems:
  """One entry per (sequence, KV head, tile), in (b, kv_head, tile) order.

  Attributes:
    length: int64 ``[n]`` KV tokens of the item's sequence.
    pages: int64 ``[n]`` ``ceil(length / page_size)``.
    page_ns: int64 ``[n]`` cost of one page of the item's tile.
    reduce_input_ns: int64 ``[n]`` cost of one REDUCE input of the tile.
    row_input_ns: int64 ``[TILE_ROWS + 1]`` cost of one input of a REDUCE
      over r rows, for every r; read-only.
    partial: int64 ``[n, INSTRUCTION_WORDS]`` a PARTIAL of each item with
      the words that name its rows (batch, KV head, first row, row count)
      and no wait counter; its other words are 0. Read-only: index it
      (``partial[item]``) to get rows to fill in.
    fixed_ns: fixed cost of a PARTIAL.
    reduce_fixed_ns: fixed cost of a REDUCE.
  """

  length: np.ndarray
  pages: np.ndarray
  page_ns: np.ndarray
  reduce_input_ns: np.ndarray
  row_input_ns: np.ndarray
  partial: np.ndarray
  fixed_ns: int
  reduce_fixed_ns: int

  @property
  def size(self) -> int:
    return int(self.length.shape[0])

  @property
  def rows(self) -> np.ndarray:
    """int64 ``[n]``: query rows of each item's tile (read-only)."""
    return isa.Fields(self.partial).num_rows

  def cost_ns(self) -> np.ndarray:
    """int64 ``[n]``: cost of each item as one unsplit PARTIAL."""
    return self.fixed_ns + self.pages * self.page_ns

  @classmethod
  def build(cls, problem: Problem) -> WorkItems:
    """Work items of a problem."""
    p = problem
    rows, page_ns, input_ns = tile_prices(p.s_q, p.h_q, p.h_kv, p.page_size,
                                          p.head_dim_v, p.cost)
    page_ns, input_ns, partial = _item_tables(p.batch, p.h_kv, rows, page_ns,
                                              input_ns)
    length = p.seqlens.repeat(p.h_kv * len(rows))
    return cls(length=length, pages=-(-length // p.page_size),
               page_ns=page_ns, reduce_input_ns=input_ns,
               row_input_ns=row_input_prices(p.head_dim_v, p.cost),
               partial=partial,
               fixed_ns=p.cost.partial_fixed(),
               reduce_fixed_ns=p.cost.reduce_fixed())
