"""The makespan scheduler: built backwards from each output's final merge.

ThunderMLA's second scheduler, in this project's own form. Fix the end of
the schedule at time T and work backwards from each output: its merge ends
at T. An item of R rows cut into k pieces is merged in one level, spread by
rows: ``c = min(k, R)`` REDUCEs of all k inputs, REDUCE j over tile rows
``[j * R // c, (j + 1) * R // c)``, so that no SM reads all ``k * R`` partial
rows. Only for k > G pieces (G = MAX_REDUCE_INPUTS, so only with more SMs
than that) is it merged by a tree: balanced groups first, then one REDUCE of
the groups' results. The k pieces must end before the merge starts, so each
may hold at most ``T - merge(k) - F`` of page work, where merge(k) is the
critical path of the merge: a REDUCE's fixed cost plus k inputs of
``ceil(R / c)`` rows (its longest REDUCE), or the tree's two REDUCEs of
whole tiles. The fewest pieces that fit give the item's split; the smallest
T whose pieces fit the SMs, one piece per SM, is found exactly from the
sorted critical paths ``F + ceil(pages / k) * P + merge(k)`` of every item
and k. Every piece then starts at time 0 on its own SM. REDUCE j of a
one-level merge runs on the SM of the item's piece ``last - j``, right after
it; a tree's group REDUCE on the SM of the group's last piece, right after
it, and its final REDUCE after that on the SM of the item's last piece.

Rollouts: when this layout reaches the work bound (total cost / SMs), or
items are few (fewer than num_sms / WRAP_ITEMS_PER_SM), it is kept as is.
Otherwise (or when items outnumber the SMs, so that it does not exist) the
wrap-around layout of the balanced scheduler (equal-cost runs)
and, with at least num_sms / CHUNK_ITEMS_PER_SM items, the fixed-chunk list
schedule of the static scheduler are rolled out too, and the layout with the
smallest predicted makespan is kept. The rollouts are skipped when lower
bounds of their makespans (from the work of the SMs) already exceed T, for
then the backwards layout is kept.

No list can wait on a task stuck behind it. In the backwards layout every
PARTIAL is first on its SM and waits for nothing; a one-level REDUCE or a
group REDUCE waits only for PARTIALs; a tree's final REDUCE waits for group
REDUCEs, which follow only a PARTIAL on their SMs; nothing waits for a final
REDUCE. In the other layouts an input ends before the REDUCE that reads it
starts and each SM runs its tasks in that order (the wrap-around layout
puts all PARTIALs of an SM before its REDUCEs).
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
def _merge_terms(top: int, fanin: int) -> tuple[np.ndarray, np.ndarray,
                                                np.ndarray, np.ndarray]:
  """The merge of k pieces, for every k in ``[1, top]``.

  The merge is one level of k inputs (none for k = 1), spread by rows over
  up to k REDUCEs, or for k > fanin a tree: a REDUCE of the largest group
  followed by one REDUCE of the groups' results, both of whole tiles.

  Args:
    top: largest piece count.
    fanin: most inputs of one REDUCE.

  Returns:
    ``(ks, reduces, inputs, runs)``, read-only int64 ``[top]``: the piece
    counts 1..top, the REDUCEs on the merge's critical path, the inputs they
    merge in all, and the most REDUCEs a level is spread over (k for one
    level, 1 for a tree).
  """
  ks = np.arange(1, top + 1)
  groups = -(-ks // fanin)
  tree = groups > 1
  reduces = np.where(tree, 2, ks > 1)
  inputs = np.where(tree, -(-ks // groups) + groups, np.where(ks > 1, ks, 0))
  runs = np.where(tree, 1, ks)
  for array in (ks, reduces, inputs, runs):
    array.setflags(write=False)
  return ks, reduces, inputs, runs


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
  ks, reduces, inputs, runs = _merge_terms(top, fanin)
  # The merge of an item of R rows is spread over min(runs, R) REDUCEs; the
  # longest has ceil(R / min(runs, R)) rows.
  rows = items.rows[:, None]
  path = ((items.fixed_ns + reduces * items.reduce_fixed_ns)
          + -(-pages // ks) * items.page_ns[:, None]
          + inputs * items.row_input_ns[-(-rows // np.minimum(runs, rows))])
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
  """REDUCE rows ``[m, INSTRUCTION_WORDS]`` of items ``item`` (whole tiles)
  that wait for all their inputs; the other arguments are the words of the
  same names."""
  rows = items.partial[item]
  isa.Fields(rows).opcode = isa.OP_REDUCE
  isa.Fields(rows).src_slot = src
  isa.Fields(rows).num_src = num_src
  isa.Fields(rows).dst_slot = dst
  isa.Fields(rows).signal_counter = signal
  isa.Fields(rows).wait_counter = wait
  isa.Fields(rows).wait_count = num_src
  isa.Fields(rows).cost = cost
  return rows


def _spread_merges(items: WorkItems, item: np.ndarray, k: np.ndarray,
                   last: np.ndarray, slot0: np.ndarray,
                   ctr0: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                              np.ndarray]:
  """Final REDUCEs of items merged in one level, spread over SMs by rows.

  The R rows of item i are cut into ``c = min(k_i, R)`` runs: run j is tile
  rows ``[j * R // c, (j + 1) * R // c)``, merged from the item's k_i slots
  on the SM of its piece ``last_i - j`` once the item's counter has all k_i
  signals.

  Args:
    items: the work items.
    item: int64 ``[m]`` the items.
    k: int64 ``[n]`` pieces per item.
    last: int64 ``[n]`` SM (and index) of each item's last piece.
    slot0: int64 ``[n]`` first slot of each item.
    ctr0: int64 ``[n]`` counter of each item's pieces.

  Returns:
    ``(rows, sm, run_item)``: REDUCE rows ``[runs, INSTRUCTION_WORDS]``, the
    SM of each and its item.
  """
  r = items.rows[item]
  c = np.minimum(k[item], r)
  run_item = item.repeat(c)
  j = np.arange(run_item.shape[0]) - (np.add.accumulate(c) - c).repeat(c)
  r, c = r.repeat(c), c.repeat(c)
  lo = j * r // c
  num_rows = (j + 1) * r // c - lo
  kk = k[run_item]
  rows = _reduces(items, run_item, slot0[run_item], kk, isa.FINAL_OUTPUT,
                  isa.NO_COUNTER, ctr0[run_item],
                  items.reduce_fixed_ns + kk * items.row_input_ns[num_rows])
  isa.Fields(rows).row_start += lo
  isa.Fields(rows).num_rows = num_rows
  isa.Fields(rows).slot_row = lo
  return rows, last[run_item] - j, run_item


def _tree_merges(
    items: WorkItems, k: np.ndarray, groups: np.ndarray, slot0: np.ndarray,
    ctr0: np.ndarray, p_item: np.ndarray, j: np.ndarray, grp: np.ndarray,
    piece_ns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                   np.ndarray]:
  """REDUCEs of the items merged in two levels (those with groups > 1).

  Group g of an item's pieces (piece j is in group ``grp = j * groups //
  k``) is merged into slot ``slot0 + k + g`` on the SM of its last piece, which
  signals counter ``ctr0 + groups``; the groups' results are merged on the SM
  of the item's last piece, after its group.

  Args:
    items: the work items.
    k: int64 ``[n]`` pieces per item.
    groups: int64 ``[n]`` groups per item (1: no tree).
    slot0: int64 ``[n]`` first slot of each item.
    ctr0: int64 ``[n]`` first counter of each item.
    p_item: int64 ``[p]`` item of each piece.
    j: int64 ``[p]`` index of each piece within its item.
    grp: int64 ``[p]`` group of each piece within its item.
    piece_ns: int64 ``[p]`` cost of each piece.

  Returns:
    ``(rows, sm, pos, end)``: the REDUCE rows (first level, then final), the
    SM and position of each, and int64 ``[n]`` when each item's output is
    ready: the end of its final REDUCE for a tree, of its last piece else.
  """
  kk, m = k[p_item], groups[p_item]
  # Segments of consecutive pieces: the groups of a tree item, any other
  # item whole. A segment is ready when its pieces (and for a group, the
  # group's REDUCE) have ended; an item's output, when its segments are.
  seg_last = ((j + 1) * m // kk != grp).nonzero()[0]
  seg_first = np.concatenate(([0], seg_last[:-1] + 1))
  ready = np.maximum.reduceat(piece_ns, seg_first)
  grouped = (m[seg_last] > 1).nonzero()[0]
  at1 = seg_last[grouped]
  from1 = seg_first[grouped]
  item1 = p_item[at1]
  size = at1 + 1 - from1
  cost1 = items.reduce_fixed_ns + size * items.reduce_input_ns[item1]
  ready[grouped] += cost1
  end = np.maximum.reduceat(ready, np.add.accumulate(groups) - groups)
  level1 = _reduces(items, item1, slot0[item1] + j[from1], size,
                    (slot0 + k)[item1] + grp[at1], (ctr0 + groups)[item1],
                    ctr0[item1] + grp[at1], cost1)
  tree = (groups > 1).nonzero()[0]
  cost = items.reduce_fixed_ns + groups[tree] * items.reduce_input_ns[tree]
  final = _reduces(items, tree, (slot0 + k)[tree], groups[tree],
                   isa.FINAL_OUTPUT, isa.NO_COUNTER, (ctr0 + groups)[tree],
                   cost)
  end[tree] += cost
  last = np.add.accumulate(k) - 1
  pos = np.ones(at1.shape[0] + tree.shape[0], np.int64)
  pos[at1.shape[0]:] = 2
  return (np.concatenate([level1, final]),
          np.concatenate([at1, last[tree]]), pos, end)


def _one_per_sm(items: WorkItems, k: np.ndarray, fanin: int,
                page_size: int) -> tuple[Schedule, float]:
  """The backwards layout: piece p alone on SM p, REDUCEs right after.

  Slots and counters follow `balanced.emit`: an item's pieces take
  consecutive slots, then its groups' results; one counter per group, then
  the final one. An item of more than ``fanin`` pieces is merged in two
  levels (`_tree_merges`); the final merge of any other cut item is spread by
  rows over the SMs of its last pieces (`_spread_merges`).

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
    isa.Fields(rows).kv_end = items.length
    isa.Fields(rows).dst_slot = isa.FINAL_OUTPUT
    isa.Fields(rows).signal_counter = isa.NO_COUNTER
    isa.Fields(rows).cost = piece_ns
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
  first = last + 1 - k
  j = np.arange(num) - first[p_item]
  n_p = items.pages[p_item]
  kk = k[p_item]
  page0 = j * n_p // kk
  page1 = (j + 1) * n_p // kk
  piece_ns = items.fixed_ns + (page1 - page0) * items.page_ns[p_item]
  length = items.length[p_item]
  rows = items.partial[p_item]
  isa.Fields(rows).kv_start = np.minimum(page0 * page_size, length)
  isa.Fields(rows).kv_end = np.minimum(page1 * page_size, length)
  # The piece of an uncut item has j = 0.
  isa.Fields(rows).dst_slot = np.where(cut, slot0,
                                         isa.FINAL_OUTPUT)[p_item] + j
  isa.Fields(rows).signal_counter = np.where(cut, ctr0,
                                               isa.NO_COUNTER)[p_item]
  isa.Fields(rows).cost = piece_ns
  spread, spread_sm, spread_item = _spread_merges(
      items, (cut & ~tree).nonzero()[0], k, last, slot0, ctr0)
  tasks = [rows, spread]
  sm = [np.arange(num), spread_sm]
  pos = [np.zeros(num, np.int64), np.ones(spread.shape[0], np.int64)]
  if tree.any():
    # The pieces of a tree signal the counter of their group.
    grp = j * groups[p_item] // kk
    isa.Fields(rows).signal_counter += grp
    merges, merge_sm, merge_pos, end = _tree_merges(
        items, k, groups, slot0, ctr0, p_item, j, grp, piece_ns)
    tasks.append(merges)
    sm.append(merge_sm)
    pos.append(merge_pos)
  else:
    end = np.maximum.reduceat(piece_ns, first)
  makespan = max(
      int(end[~cut | tree].max(initial=0)),
      int((end[spread_item] + isa.Fields(spread).cost).max(initial=0)))
  return Schedule(
      np.concatenate(tasks), np.concatenate(sm), np.concatenate(pos),
      positional=True,
      workspace=(int(slots.sum()), int(counters.sum()))), float(makespan)


def schedule(problem: Problem) -> tuple[Schedule, float]:
  """Makespan schedule of a problem.

  Args:
    problem: the shapes.

  Returns:
    ``(schedule, makespan)``: the instructions with their SMs and order, from
    the best rollout, and its predicted makespan in ns.
  """
  num_sms = problem.num_sms
  fanin = isa.MAX_REDUCE_INPUTS
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
