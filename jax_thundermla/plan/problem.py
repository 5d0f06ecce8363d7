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



@dataclasses.dataclass(frozen=True)
class WorkItems:
  """One entry per (sequence, KV head, tile), in (b, kv_head, tile) order.

  Attributes:
    tile_rows: rows of each tile of one (sequence, KV head).
    h_kv: KV heads.
    length: int64 ``[n]`` KV tokens of the item's sequence.
    pages: int64 ``[n]`` ``ceil(length / page_size)``.
    page_ns: int64 ``[n]`` cost of one page of the item's tile.
    reduce_input_ns: int64 ``[n]`` cost of one REDUCE input of the tile.
    fixed_ns: fixed cost of a PARTIAL.
    reduce_fixed_ns: fixed cost of a REDUCE.
  """

  tile_rows: tuple[int, ...]
  h_kv: int
  length: np.ndarray
  pages: np.ndarray
  page_ns: np.ndarray
  reduce_input_ns: np.ndarray
  fixed_ns: int
  reduce_fixed_ns: int

  @property
  def size(self) -> int:
    return int(self.length.shape[0])

  @property
  def num_tiles(self) -> int:
    return len(self.tile_rows)

  def cost_ns(self) -> np.ndarray:
    """int64 ``[n]``: cost of each item as one unsplit PARTIAL."""
    return self.fixed_ns + self.pages * self.page_ns

  def fields(self, item: np.ndarray) -> dict[int, np.ndarray]:
    """Instruction words naming the rows of items ``item`` (int ``[m]``):
    batch, KV head, first row and row count."""
    tile = item % self.num_tiles
    return {
        isa.FIELD_BATCH: item // (self.h_kv * self.num_tiles),
        isa.FIELD_KV_HEAD: (item // self.num_tiles) % self.h_kv,
        isa.FIELD_ROW_START: tile * isa.TILE_ROWS,
        isa.FIELD_NUM_ROWS: np.asarray(self.tile_rows, np.int64)[tile],
    }

  @classmethod
  def build(cls, problem: Problem) -> WorkItems:
    """Work items of a problem."""
    p = problem
    rows = tile_rows(p.s_q, p.h_q, p.h_kv)
    tile = np.arange(p.batch * p.h_kv * len(rows)) % len(rows)
    page_ns = [p.cost.page_ns(r, p.page_size, p.head_dim_v) for r in rows]
    input_ns = [p.cost.reduce_input_ns(r, p.head_dim_v) for r in rows]
    length = np.repeat(p.seqlens, p.h_kv * len(rows))
    return cls(
        tile_rows=rows, h_kv=p.h_kv, length=length,
        pages=-(-length // p.page_size),
        page_ns=np.asarray(page_ns, np.int64)[tile],
        reduce_input_ns=np.asarray(input_ns, np.int64)[tile],
        fixed_ns=p.cost.partial_fixed(),
        reduce_fixed_ns=p.cost.reduce_fixed())
