"""The makespan scheduler: built backwards from each output's final reduction.

ThunderMLA's second scheduler, in this project's own form. Fix the end of
the schedule at time T and work backwards from each output: its final REDUCE
ends at T; before it runs its reduction tree (one REDUCE of k inputs, or for
k > G pieces a level of balanced groups first, G = ceil(sqrt(num_sms))); the
k pieces must end before the tree starts, so each may hold at most ``T -
tree(k) - F`` of page work. The fewest pieces that fit give the output's
split; the smallest T whose pieces fit the SMs, one piece per SM, is found
exactly from the sorted critical paths ``F + ceil(pages / k) * P + tree(k)``
of every item and k. Every piece then starts at time 0 on its own SM and
each REDUCE runs on the SM of the last piece it reads, right after it.

Rollouts: when this layout reaches the work bound (total cost / SMs), or
items are few (fewer than num_sms / WRAP_ITEMS_PER_SM), it is kept as is.
Otherwise (or when items outnumber the SMs, so that it does not exist) the
wrap-around layout of the balanced scheduler (equal-cost runs)
and, with at least num_sms / CHUNK_ITEMS_PER_SM items, the fixed-chunk list
schedule of the static scheduler are rolled out too, and the layout with the
smallest predicted makespan is kept. The rollouts are skipped when lower
bounds of their makespans (from the work of the SMs) already exceed T, for
then the backwards layout is kept. In every layout an input ends before
the REDUCE that reads it starts and each SM runs its tasks in that order
(the backwards and wrap-around layouts put all PARTIALs of an SM before its
REDUCEs), so no list can wait on a task stuck behind it.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from jax_thundermla import isa
from jax_thundermla.plan import balanced
from jax_thundermla.plan import static
from jax_thundermla.plan.problem import Problem
from jax_thundermla.plan.problem import WorkItems
from jax_thundermla.plan.tensorize import Schedule

# The wrap-around layout is tried when items * this >= num_sms.
WRAP_ITEMS_PER_SM = 4
# The fixed-chunk layout is tried when items * this >= num_sms.
CHUNK_ITEMS_PER_SM = 2
# Path of a piece count that cannot be used (more pieces than pages).
_NEVER = np.iinfo(np.int64).max


@functools.lru_cache(maxsize=256)
def _tree_terms(top: int, fanin: int) -> tuple[np.ndarray, np.ndarray,
                                               np.ndarray]:
  """The reduction tree of k pieces, for every k in ``[1, top]``.

  The tree is one REDUCE of k inputs (none for k = 1), or for k > fanin a
  REDUCE of the largest group followed by one of the groups' results.

  Args:
    top: largest piece count.
    fanin: most inputs of one REDUCE.

  Returns:
    ``(ks, reduces, inputs)``, read-only int64 ``[top]``: the piece counts
    1..top, the REDUCEs on the tree's critical path and the inputs they
    merge in all.
  """
  ks = np.arange(1, top + 1)
  groups = -(-ks // fanin)
  tree = groups > 1
  reduces = np.where(tree, 2, ks > 1)
  inputs = np.where(tree, -(-ks // groups) + groups, np.where(ks > 1, ks, 0))
  for array in (ks, reduces, inputs):
    array.setflags(write=False)
  return ks, reduces, inputs


def _split(items: WorkItems, fanin: int,
           num_sms: int) -> tuple[float, np.ndarray] | None:
  """Fewest pieces per item for the smallest end time with one piece per SM.

  Args:
    items: the work items.
    fanin: most inputs of one REDUCE.
    num_sms: SMs.

  Returns:
    ``(T, k)``: the end time bound and int64 pieces per item ``[n]``, or None
    when there are more items than SMs.
  """
  n = items.size
  if n > num_sms:
    return None
  pages = items.pages[:, None]
  top = max(1, min(num_sms - n + 1, fanin * fanin, int(pages.max())))
  if top == 1:
    # One piece per item: each item's path is its own cost.
    return float(items.cost_ns().max()), np.ones(n, np.int64)
  ks, reduces, inputs = _tree_terms(top, fanin)
  path = ((items.fixed_ns + reduces * items.reduce_fixed_ns)
          + -(-pages // ks) * items.page_ns[:, None]
          + inputs * items.reduce_input_ns[:, None])
  np.putmask(path, ks > np.maximum(pages, 1), _NEVER)
  best = np.minimum.accumulate(path, axis=1)
  # Item i needs 1 + #{k : best[i, k] > T} pieces (`best` is below _NEVER:
  # one piece always fits); they fit the SMs once at most num_sms - n entries
  # of `best` exceed T. The smallest such T is the (num_sms - n + 1)-th
  # largest entry, or each item's own shortest path, whichever is larger.
  end = int(best[:, -1].max())
  rank = best.size - 1 - (num_sms - n)
  if rank >= 0:
    end = max(end, int(np.partition(best.ravel(), rank)[rank]))
  # Rows of `best` do not increase and end at or below T: the entries above
  # T lead each row.
  k = 1 + (best <= end).argmax(axis=1)
  return float(end), k


def _reduces(items: WorkItems, item: np.ndarray, src: np.ndarray,
             num_src: np.ndarray, dst: Any, signal: Any, wait: np.ndarray,
             cost: np.ndarray) -> np.ndarray:
  """REDUCE rows ``[m, INSTRUCTION_WORDS]`` of items ``item`` that wait for
  all their inputs; the other arguments are the words of the same names."""
  rows = items.partial[item]
  rows[:, isa.FIELD_OPCODE] = isa.OP_REDUCE
  rows[:, isa.FIELD_SRC_SLOT] = src
  rows[:, isa.FIELD_NUM_SRC] = num_src
  rows[:, isa.FIELD_DST_SLOT] = dst
  rows[:, isa.FIELD_SIGNAL_COUNTER] = signal
  rows[:, isa.FIELD_WAIT_COUNTER] = wait
  rows[:, isa.FIELD_WAIT_COUNT] = num_src
  rows[:, isa.FIELD_COST] = cost
  return rows


def _one_per_sm(items: WorkItems, k: np.ndarray, fanin: int,
                page_size: int) -> tuple[Schedule, float]:
  """The backwards layout: piece p alone on SM p, REDUCEs right after.

  Slots and counters follow `balanced.emit`: an item's pieces take
  consecutive slots, then its groups' results; one counter per group, then
  the final one. A first-level REDUCE runs on the SM of its group's last
  piece, the final REDUCE on the SM of the item's last piece.

  Args:
    items: the work items.
    k: int ``[n]`` pieces per item, at most num_sms in all.
    fanin: most inputs of one REDUCE.
    page_size: tokens per page.

  Returns:
    The schedule and its makespan (each piece starts at 0; a REDUCE starts
    when the inputs it waits for have ended, its own SM's earlier task among
    them).
  """
  n = items.size
  last = np.add.accumulate(k) - 1
  num = int(last[-1]) + 1
  if num == n:
    # No item is cut: item i is one PARTIAL, alone on SM i.
    piece_ns = items.cost_ns()
    rows = items.partial.copy()
    rows[:, isa.FIELD_KV_END] = items.length
    rows[:, isa.FIELD_DST_SLOT] = isa.FINAL_OUTPUT
    rows[:, isa.FIELD_SIGNAL_COUNTER] = isa.NO_COUNTER
    rows[:, isa.FIELD_COST] = piece_ns
    return (Schedule(rows, np.arange(n), np.zeros(n, np.int64),
                     positional=True, workspace=(0, 0)),
            float(piece_ns.max()))
  p_item = np.arange(n).repeat(k)
  groups = -(-k // fanin)
  tree = groups > 1
  cut = k > 1
  extra = tree * groups
  slots = cut * (k + extra)
  counters = cut * (1 + extra)
  slot0 = np.add.accumulate(slots) - slots
  ctr0 = np.add.accumulate(counters) - counters
  kk = k[p_item]
  m = groups[p_item]
  j = np.arange(num) - (last + 1 - k)[p_item]
  grp = j * m // kk
  n_p = items.pages[p_item]
  page0 = j * n_p // kk
  page1 = (j + 1) * n_p // kk
  piece_ns = items.fixed_ns + (page1 - page0) * items.page_ns[p_item]
  length = items.length[p_item]
  rows = items.partial[p_item]
  rows[:, isa.FIELD_KV_START] = np.minimum(page0 * page_size, length)
  rows[:, isa.FIELD_KV_END] = np.minimum(page1 * page_size, length)
  # The piece of an uncut item has j = grp = 0.
  rows[:, isa.FIELD_DST_SLOT] = np.where(cut, slot0,
                                         isa.FINAL_OUTPUT)[p_item] + j
  rows[:, isa.FIELD_SIGNAL_COUNTER] = np.where(cut, ctr0,
                                               isa.NO_COUNTER)[p_item] + grp
  rows[:, isa.FIELD_COST] = piece_ns

  # Segments of consecutive pieces: the groups of a tree item, any other
  # item whole. A segment is ready when its pieces (and for a group, the
  # group's REDUCE) have ended; an item's output, when its segments are.
  fixed = items.reduce_fixed_ns
  seg_last = ((j + 1) * m // kk != grp).nonzero()[0]
  seg_first = np.concatenate(([0], seg_last[:-1] + 1))
  ready = np.maximum.reduceat(piece_ns, seg_first)
  grouped = (m[seg_last] > 1).nonzero()[0]
  at1 = seg_last[grouped]
  from1 = seg_first[grouped]
  item1 = p_item[at1]
  size = at1 + 1 - from1
  cost1 = fixed + size * items.reduce_input_ns[item1]
  ready[grouped] += cost1
  ready = np.maximum.reduceat(ready, np.add.accumulate(groups) - groups)
  level1 = _reduces(items, item1, rows[from1, isa.FIELD_DST_SLOT], size,
                    (slot0 + k)[item1] + grp[at1], (ctr0 + groups)[item1],
                    rows[at1, isa.FIELD_SIGNAL_COUNTER], cost1)

  done = float(ready[~cut].max(initial=0))
  cut = cut.nonzero()[0]
  inputs = np.where(tree, groups, k)[cut]
  cost = fixed + inputs * items.reduce_input_ns[cut]
  final = _reduces(items, cut, (slot0 + tree * k)[cut], inputs,
                   isa.FINAL_OUTPUT, isa.NO_COUNTER, (ctr0 + extra)[cut], cost)
  pos = np.zeros(num + at1.shape[0] + cut.shape[0], np.int64)
  pos[num:] = 1
  pos[num + at1.shape[0]:] += tree[cut]
  return Schedule(
      np.concatenate([rows, level1, final]),
      np.concatenate([np.arange(num), at1, last[cut]]), pos, positional=True,
      workspace=(int(slots.sum()), int(counters.sum()))), max(
          done, int((ready[cut] + cost).max()))


def schedule(problem: Problem) -> tuple[Schedule, float]:
  """Makespan schedule of a problem.

  Args:
    problem: the shapes.

  Returns:
    ``(schedule, makespan)``: the instructions with their SMs and order, from
    the best rollout, and its predicted makespan in ns.
  """
  num_sms = problem.num_sms
  fanin = balanced.fanin_for(num_sms)
  items = WorkItems.build(problem)
  split = _split(items, fanin, num_sms)
  if split is not None and (
      items.size * WRAP_ITEMS_PER_SM < num_sms
      or split[0] <= float(items.cost_ns().sum()) / num_sms):
    return _one_per_sm(items, split[1], fanin, problem.page_size)
  st = balanced.statics_for(problem)
  pieces = balanced.cut(np, problem.seqlens, st, np.int64)
  with_chunks = items.size * CHUNK_ITEMS_PER_SM >= num_sms
  # Rollouts whose makespan is bounded below by more than T cannot win.
  if (split is not None and split[0] < balanced.load_bound(st, *pieces)
      and not (with_chunks
               and split[0] >= static.load_bound(problem, items))):
    return _one_per_sm(items, split[1], fanin, problem.page_size)
  best, best_makespan = balanced.host_schedule(problem, st, pieces)
  if with_chunks:
    chunks, chunks_makespan = static.schedule(problem, items)
    if chunks_makespan < best_makespan:
      best, best_makespan = chunks, chunks_makespan
  if split is not None and split[0] < best_makespan:
    return _one_per_sm(items, split[1], fanin, problem.page_size)
  return best, best_makespan
