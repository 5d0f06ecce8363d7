"""The balanced scheduler, written once for numpy (host) and jax.numpy (device).

FlashMLA's split: the work items, in (sequence, KV head, tile) order, are laid
end to end by cost and cut into ``num_sms`` equal runs, one contiguous run
per SM. An item cut by run boundaries becomes several PARTIALs whose results
are merged by REDUCEs, which every SM runs after all its PARTIALs: PARTIALs
never wait, so no REDUCE can wait on an instruction stuck behind it.

Costs are integers in units of ``quantum`` ns (1 unless the problem is huge),
so numpy int64 on the host and int32 on the device make identical choices.
Details:

* An item costs ``F + pages * P`` units (F, P from the cost model), but is
  placed as if it cost at least ``ceil(total / (ALPHA * items))``: this bounds
  the PARTIALs of one SM by ``2 + (ALPHA + 1) * items / num_sms`` whatever the
  lengths, which fixes the on-device planner's capacity from shapes alone.
* A piece belongs to the SM whose run contains its start: the item's start
  plus F for its first piece, its first page for the others. A run boundary
  cuts an item at the first page that starts at or after the boundary; a cut
  that would leave two pieces of one item on one SM is dropped.
* An item cut into k <= G pieces (G = ceil(sqrt(num_sms))) is merged by one
  REDUCE on the SM of its last piece. A larger k is merged in two levels:
  ``m = ceil(k / G)`` balanced groups of consecutive pieces, each merged on the
  SM of its last piece, then the m results on the SM of the item's last piece.
  Every SM runs its PARTIALs, then its first-level REDUCEs, then its final
  REDUCEs, and holds at most two REDUCEs.
* Slots: an item's pieces take consecutive slots, then its group results.
  Counters: one per group, then the final one.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from jax_thundermla import isa
from jax_thundermla.plan.cost import CostModel
from jax_thundermla.plan.problem import Problem
from jax_thundermla.plan.problem import tile_rows
from jax_thundermla.plan import timing
from jax_thundermla.plan.tensorize import Schedule
from jax_thundermla.plan.tensorize import tensorize

# A work item is placed as if it cost at least 1 / ALPHA of the mean item.
ALPHA = 8
# Unit costs are kept below this bound so that int32 never overflows.
_UNIT_LIMIT = 1 << 29


def fanin_for(num_sms: int) -> int:
  """Most inputs of one REDUCE: two levels then cover num_sms pieces."""
  return max(2, math.isqrt(num_sms - 1) + 1)


@dataclasses.dataclass(frozen=True)
class Statics:
  """Everything the balanced scheduler derives from shapes alone.

  Attributes:
    batch: sequences.
    h_kv: KV heads.
    num_tiles: tiles per (sequence, KV head).
    num_sms: SMs.
    page_size: tokens per page.
    tile_rows: rows of each tile.
    page_ns: cost of one page, per tile.
    input_ns: cost of one REDUCE input, per tile.
    fixed_ns: fixed cost of a PARTIAL.
    reduce_fixed_ns: fixed cost of a REDUCE.
    quantum: ns per cost unit.
    fixed_units: fixed cost of a PARTIAL in units.
    page_units: cost of one page in units, per tile.
    fanin: G, most inputs of one REDUCE.
  """

  batch: int
  h_kv: int
  num_tiles: int
  num_sms: int
  page_size: int
  tile_rows: tuple[int, ...]
  page_ns: tuple[int, ...]
  input_ns: tuple[int, ...]
  fixed_ns: int
  reduce_fixed_ns: int
  quantum: int
  fixed_units: int
  page_units: tuple[int, ...]
  fanin: int

  @property
  def num_items(self) -> int:
    return self.batch * self.h_kv * self.num_tiles

  @property
  def max_per_sm(self) -> int:
    """Most instructions one SM can receive, whatever the lengths."""
    return 4 + (ALPHA + 1) * self.num_items // self.num_sms

  @property
  def max_slots(self) -> int:
    """Most slots used, whatever the lengths (at most num_sms - 1 cuts)."""
    cuts = 2 * (self.num_sms - 1)
    return max(1, cuts + cuts // self.fanin + cuts // (self.fanin + 1))

  @property
  def max_counters(self) -> int:
    """Most counters used, whatever the lengths."""
    cuts = 2 * (self.num_sms - 1)
    return max(1, self.num_sms - 1 + cuts // self.fanin
               + cuts // (self.fanin + 1))


@functools.lru_cache(maxsize=64)
def statics(*, batch: int, s_q: int, h_q: int, h_kv: int, page_size: int,
            head_dim_v: int, num_sms: int, max_pages: int,
            cost: CostModel) -> Statics:
  """Static parameters of the balanced scheduler.

  Args:
    batch, s_q, h_q, h_kv, page_size, head_dim_v, num_sms: the shapes.
    max_pages: most pages of one sequence (sets the cost unit).
    cost: the cost model.
  """
  rows = tile_rows(s_q, h_q, h_kv)
  num_tiles = len(rows)
  page_ns = tuple(cost.page_ns(r, page_size, head_dim_v) for r in rows)
  fixed_ns = cost.partial_fixed()
  bound = batch * h_kv * num_tiles * (fixed_ns + max_pages * max(page_ns))
  quantum = max(1, -(-bound // _UNIT_LIMIT))
  return Statics(
      batch=batch, h_kv=h_kv, num_tiles=num_tiles, num_sms=num_sms,
      page_size=page_size, tile_rows=rows, page_ns=page_ns,
      input_ns=tuple(cost.reduce_input_ns(r, head_dim_v) for r in rows),
      fixed_ns=fixed_ns, reduce_fixed_ns=cost.reduce_fixed(), quantum=quantum,
      fixed_units=max(1, fixed_ns // quantum),
      page_units=tuple(max(1, p // quantum) for p in page_ns),
      fanin=fanin_for(num_sms))


def _put(xp, array, index, values, mask=None):
  """``array[index[mask]] = values[mask]`` for numpy and jax.numpy."""
  if xp is np:
    out = array.copy()
    if mask is None:
      out[index] = values
    else:
      out[index[mask]] = values[mask] if np.ndim(values) else values
    return out
  if mask is not None:
    index = xp.where(mask, index, array.shape[0])
  return array.at[index].set(values, mode="drop")


def _count(xp, index, mask, size, dtype):
  """Number of masked entries per index in ``[0, size)``."""
  if xp is np:
    return np.bincount(index[mask], minlength=size).astype(dtype)
  index = xp.where(mask, index, size)
  return xp.zeros(size, dtype).at[index].add(1, mode="drop")


def _ranks(xp, mask, first, sm_index):
  """Rank of each masked entry among the masked entries of its SM.

  Args:
    mask: bool ``[p]`` over the pieces.
    first: ``[S + 1]`` index of each SM's first piece (and the live count).
    sm_index: ``[p]`` SM of each piece (clamped to a valid SM).

  Returns:
    ``(rank, per_sm)``: rank ``[p]`` and masked entries per SM ``[S]``.
  """
  mask = mask.astype(first.dtype)
  before = xp.cumsum(mask) - mask
  before = xp.concatenate([before, xp.sum(mask, keepdims=True)])
  rank = before[:-1] - before[first[sm_index]]
  return rank, before[first[1:]] - before[first[:-1]]


def cut(xp, lengths, st: Statics, dtype):
  """Cuts the items into one contiguous run of equal cost per SM.

  Args:
    xp: ``numpy`` or ``jax.numpy``.
    lengths: int ``[batch]`` tokens per sequence, already within bounds.
    st: static parameters.
    dtype: integer dtype of the arithmetic (int64 on host, int32 on device).

  Returns:
    ``(length, k, p_item, p_page, p_sm)``: per item its length and piece
    count ``[items]``; per piece (``items + num_sms - 1`` entries, unused ones
    last with item ``items`` and SM ``num_sms``) its item, first page and SM.
  """
  n_items, s = st.num_items, st.num_sms
  ps, fu = st.page_size, st.fixed_units
  item = xp.arange(n_items, dtype=dtype)
  tile = item % st.num_tiles
  length = xp.asarray(lengths, dtype)[item // (st.h_kv * st.num_tiles)]
  pages = (length + ps - 1) // ps
  pu = xp.asarray(st.page_units, dtype)[tile]
  cost = fu + pages * pu
  floor = (xp.sum(cost) + ALPHA * n_items - 1) // (ALPHA * n_items)
  weight = xp.maximum(cost, floor)
  end = xp.cumsum(weight)
  begin = end - weight
  quota = (end[-1] + s - 1) // s
  sm0 = (begin + xp.minimum(fu, weight - 1)) // quota

  # Run boundaries: the item each one falls in and the page it cuts at.
  bound = xp.arange(1, s, dtype=dtype) * quota
  inside = xp.searchsorted(end, bound, side="right")
  ic = xp.minimum(inside, n_items - 1)
  offset = bound - begin[ic] - fu
  page_cut = xp.where(offset > 0, (offset + pu[ic] - 1) // pu[ic], 0)
  last_page = xp.maximum(pages[ic] - 1, 0)
  smb = (begin[ic] + fu + xp.minimum(page_cut, last_page) * pu[ic]) // quota
  eff = xp.where(page_cut > 0, smb, sm0[ic])
  same = xp.concatenate([xp.zeros(1, bool), ic[1:] == ic[:-1]])[:s - 1]
  prev = xp.where(same, xp.concatenate([sm0[:1], eff[:-1]])[:s - 1], sm0[ic])
  valid = ((inside < n_items) & (page_cut > 0) & (page_cut < pages[ic])
           & (smb != prev))

  # Pieces, in (item, page) order, which is also SM order.
  k = 1 + _count(xp, ic, valid, n_items, dtype)
  start = xp.cumsum(k) - k
  at = ic + xp.cumsum(valid.astype(dtype)) - valid.astype(dtype) + 1
  n_pieces = n_items + s - 1
  p_item = _put(xp, xp.full(n_pieces, n_items, dtype), start, item)
  p_item = _put(xp, p_item, at, ic, valid)
  p_page = _put(xp, xp.zeros(n_pieces, dtype), at, page_cut, valid)
  p_sm = _put(xp, xp.full(n_pieces, s, dtype), start, sm0)
  p_sm = _put(xp, p_sm, at, smb, valid)
  return length, k, p_item, p_page, p_sm


def emit(xp, dtype, st: Statics, length, k, p_item, p_page, p_sm):
  """Instruction lists of pieces and the REDUCE trees that merge them.

  An item with k pieces (k > 1) is merged by one REDUCE on the SM of its last
  piece if k <= st.fanin, else in two levels (balanced groups of consecutive
  pieces, each merged on the SM of the group's last piece, then the groups'
  results on the SM of the last piece). Every SM runs its PARTIALs, then its
  first-level REDUCEs, then its final REDUCEs.

  Args:
    xp: ``numpy`` or ``jax.numpy``.
    dtype: integer dtype of the arithmetic.
    st: static parameters (shapes, prices, fan-in).
    length: int ``[items]`` KV tokens of each item.
    k: int ``[items]`` pieces of each item (>= 1).
    p_item: int ``[p]`` item of each piece: the pieces of an item are
      consecutive and in page order; unused entries last, equal to items.
    p_page: int ``[p]`` first page of each piece.
    p_sm: int ``[p]`` SM of each piece, nondecreasing; ``num_sms`` for
      unused entries.

  Returns:
    ``(rows, sm, pos, per_sm, num_slots, num_counters)``: instruction rows
    ``[3p, INSTRUCTION_WORDS]``, the SM of each (``num_sms`` for rows that
    are not instructions), the position in that SM's list, instructions per
    SM ``[num_sms]``, and the slots and counters used (scalars).
  """
  n_items, s, g, ps = st.num_items, st.num_sms, st.fanin, st.page_size
  n_pieces = p_item.shape[0]
  pages = (length + ps - 1) // ps
  start = xp.cumsum(k) - k
  live = p_item < n_items
  pi = xp.minimum(p_item, n_items - 1)
  sm_c = xp.minimum(p_sm, s - 1)
  kk = k[pi]
  j = xp.arange(n_pieces, dtype=dtype) - start[pi]
  is_last = j == kk - 1
  p_end = xp.where(is_last, pages[pi],
                   xp.concatenate([p_page[1:], xp.zeros(1, dtype)]))
  split = kk > 1
  tree = kk > g
  groups = xp.where(tree, (kk + g - 1) // g, 1)
  m_item = xp.where(k > g, (k + g - 1) // g, 0)
  slots = xp.where(k > 1, k + m_item, 0)
  counters = xp.where(k > 1, 1 + m_item, 0)
  slot0 = (xp.cumsum(slots) - slots)[pi]
  ctr0 = (xp.cumsum(counters) - counters)[pi]
  grp = (j * groups) // kk
  p_tile = pi % st.num_tiles
  page_ns = xp.asarray(st.page_ns, dtype)[p_tile]
  input_ns = xp.asarray(st.input_ns, dtype)[p_tile]
  common = dict(
      batch=pi // (st.h_kv * st.num_tiles),
      kv_head=(pi // st.num_tiles) % st.h_kv,
      row_start=p_tile * isa.TILE_ROWS,
      num_rows=xp.asarray(st.tile_rows, dtype)[p_tile],
  )

  partial = isa.pack(
      xp, dtype, n_pieces, **common,
      opcode=isa.OP_PARTIAL,
      kv_start=xp.minimum(p_page * ps, length[pi]),
      kv_end=xp.minimum(p_end * ps, length[pi]),
      dst_slot=xp.where(split, slot0 + j, isa.FINAL_OUTPUT),
      signal_counter=xp.where(split, ctr0 + grp, isa.NO_COUNTER),
      wait_counter=isa.NO_COUNTER,
      cost=st.fixed_ns + (p_end - p_page) * page_ns,
  )
  first = xp.searchsorted(p_sm, xp.arange(s + 1, dtype=dtype), side="left")
  per_partial = first[1:] - first[:-1]
  pos_partial = xp.arange(n_pieces, dtype=dtype) - first[sm_c]

  group_end = tree & (is_last | (((j + 1) * groups) // kk != grp))
  g_first = (grp * kk + groups - 1) // groups
  g_size = j + 1 - g_first
  level1 = isa.pack(
      xp, dtype, n_pieces, **common,
      opcode=isa.OP_REDUCE,
      src_slot=slot0 + g_first,
      num_src=g_size,
      dst_slot=slot0 + kk + grp,
      signal_counter=ctr0 + groups,
      wait_counter=ctr0 + grp,
      wait_count=g_size,
      cost=st.reduce_fixed_ns + g_size * input_ns,
  )
  rank1, per_level1 = _ranks(xp, live & group_end, first, sm_c)

  final_src = xp.where(tree, slot0 + kk, slot0)
  final_num = xp.where(tree, groups, kk)
  final = isa.pack(
      xp, dtype, n_pieces, **common,
      opcode=isa.OP_REDUCE,
      src_slot=final_src,
      num_src=final_num,
      dst_slot=isa.FINAL_OUTPUT,
      signal_counter=isa.NO_COUNTER,
      wait_counter=xp.where(tree, ctr0 + groups, ctr0),
      wait_count=final_num,
      cost=st.reduce_fixed_ns + final_num * input_ns,
  )
  rank_f, per_final = _ranks(xp, live & split & is_last, first, sm_c)

  nowhere = xp.full(n_pieces, s, dtype)
  rows = xp.concatenate([partial, level1, final])
  sm = xp.concatenate([
      p_sm,
      xp.where(live & group_end, p_sm, nowhere),
      xp.where(live & split & is_last, p_sm, nowhere)])
  pos = xp.concatenate([
      pos_partial,
      per_partial[sm_c] + rank1,
      per_partial[sm_c] + per_level1[sm_c] + rank_f])
  per_sm = per_partial + per_level1 + per_final
  return rows, sm, pos, per_sm, xp.sum(slots), xp.sum(counters)


def lists(xp, lengths, st: Statics, dtype):
  """Balanced instruction lists: `cut`, then `emit`.

  Returns:
    As `emit`.
  """
  return emit(xp, dtype, st, *cut(xp, lengths, st, dtype))


def emitted_makespan(rows: np.ndarray, sm: np.ndarray,
                     num_sms: int) -> float | None:
  """Simulated makespan of `emit`'s lists (numpy), None if not levelled.

  Exact when every SM holds at most one first-level and one final REDUCE
  (always true of the balanced layout): an SM runs its PARTIALs back to back
  in piece order, a first-level REDUCE starts when its SM's PARTIALs and its
  group have ended, a final REDUCE when its SM's earlier tasks and its inputs
  have ended.

  Args:
    rows, sm: `emit`'s rows and SMs (pieces, first-level rows, final rows).
    num_sms: SMs.
  """
  p = rows.shape[0] // 3
  level1 = np.flatnonzero(sm[p:2 * p] < num_sms)
  final = np.flatnonzero(sm[2 * p:] < num_sms)
  host1, hostf = sm[p + level1], sm[2 * p + final]
  if (np.bincount(host1, minlength=1).max() > 1
      or np.bincount(hostf, minlength=1).max() > 1):
    return None
  n = int(np.count_nonzero(sm[:p] < num_sms))
  cost = isa.Fields(rows).cost.astype(np.float64)
  piece, piece_sm = cost[:n], sm[:n]
  total = np.cumsum(piece)
  first = np.ones(n, bool)
  first[1:] = piece_sm[1:] != piece_sm[:-1]
  end = np.append(total - np.maximum.accumulate(
      np.where(first, total - piece, 0.0)), 0.0)
  busy = np.bincount(piece_sm, weights=piece, minlength=num_sms)
  # A first-level REDUCE at piece i reads pieces [i - size + 1, i].
  size = isa.Fields(rows).num_src[p + level1]
  ready = np.maximum.reduceat(end, np.stack(
      [level1 - size + 1, level1 + 1], axis=1).ravel())[::2]
  end1 = np.maximum(busy[host1], ready) + cost[p + level1]
  # What a final REDUCE waits for: pieces, or their groups' REDUCEs.
  end[level1] = np.maximum(end[level1], end1)
  busy[host1] = end1
  key = isa.Fields(rows[:n]).key[:, :3]
  item_first = np.ones(n, bool)
  item_first[1:] = (key[1:] != key[:-1]).any(axis=1)
  start = np.maximum.accumulate(np.where(item_first, np.arange(n), 0))
  ready = np.maximum.reduceat(end, np.stack(
      [start[final], final + 1], axis=1).ravel())[::2]
  endf = np.maximum(busy[hostf], ready) + cost[2 * p + final]
  return float(max(busy.max(initial=0.0), endf.max(initial=0.0)))


def statics_for(problem: Problem) -> Statics:
  """Static parameters of a host problem (the cost unit from its lengths)."""
  p = problem
  return statics(batch=p.batch, s_q=p.s_q, h_q=p.h_q, h_kv=p.h_kv,
                 page_size=p.page_size, head_dim_v=p.head_dim_v,
                 num_sms=p.num_sms,
                 max_pages=-(-int(p.seqlens.max()) // p.page_size),
                 cost=p.cost)


def load_bound(st: Statics, length, k, p_item, p_page, p_sm) -> float:
  """A lower bound of the makespan of `emit`'s lists (numpy).

  An SM runs its instructions one at a time, so the lists take at least the
  most work one SM is given; counted here are its PARTIALs and final REDUCEs.

  Args:
    st: static parameters.
    length, k, p_item, p_page, p_sm: `cut`'s result.
  """
  g, ps = st.fanin, st.page_size
  last = np.add.accumulate(k) - 1
  num = int(last[-1]) + 1
  page = p_page[:num]
  end = np.empty_like(page)
  end[:-1] = page[1:]
  end[last] = (length + ps - 1) // ps
  cost = st.fixed_ns + (end - page) * np.asarray(st.page_ns)[
      p_item[:num] % st.num_tiles]
  load = np.bincount(p_sm[:num], weights=cost, minlength=st.num_sms)
  cut = (k > 1).nonzero()[0]
  inputs = k[cut]
  inputs = np.where(inputs > g, (inputs + g - 1) // g, inputs)
  load += np.bincount(
      p_sm[last[cut]], minlength=st.num_sms,
      weights=st.reduce_fixed_ns + inputs * np.asarray(st.input_ns)[
          cut % st.num_tiles])
  return float(load.max())


def host_schedule(problem: Problem, st: Statics,
                  pieces: tuple[np.ndarray, ...] | None = None) -> tuple[
                      Schedule, float]:
  """Balanced lists of a problem (numpy) and their simulated makespan.

  Args:
    problem: the shapes.
    st: its static parameters.
    pieces: `cut`'s result for the problem, if already computed.
  """
  if pieces is None:
    pieces = cut(np, problem.seqlens, st, np.int64)
  rows, sm, pos, _, slots, counters = emit(np, np.int64, st, *pieces)
  keep = sm < problem.num_sms
  schedule = Schedule(rows[keep], sm[keep], pos[keep], positional=True,
                      workspace=(int(slots), int(counters)))
  makespan = emitted_makespan(rows, sm, problem.num_sms)
  if makespan is None:
    makespan = timing.simulate(
        tensorize(schedule, problem.num_sms)[0]).makespan_ns
  return schedule, makespan
