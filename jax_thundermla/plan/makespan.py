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
smallest predicted makespan is kept. In every layout an input ends before
the REDUCE that reads it starts and each SM runs its tasks in that order
(the backwards and wrap-around layouts put all PARTIALs of an SM before its
REDUCEs), so no list can wait on a task stuck behind it.
"""

from __future__ import annotations

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


def _tail(ks: np.ndarray, fanin: int, fixed: int,
          per_input: np.ndarray) -> np.ndarray:
  """Duration of the reduction tree of k pieces (0 for k = 1).

  Args:
    ks: int ``[K]`` piece counts.
    fanin: most inputs of one REDUCE.
    fixed: fixed cost of a REDUCE.
    per_input: ``[n, 1]`` cost of one input, per item.

  Returns:
    ``[n, K]`` ns: one REDUCE of k inputs, or for k > fanin a REDUCE of the
    largest group followed by one of the groups' results.
  """
  groups = -(-ks // fanin)
  tree = groups > 1
  widest = -(-ks // groups)
  flat = np.where(ks > 1, fixed + ks * per_input, 0)
  return np.where(tree, 2 * fixed + (widest + groups) * per_input, flat)


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
  ks = np.arange(1, top + 1)
  path = (items.fixed_ns + -(-pages // ks) * items.page_ns[:, None]
          + _tail(ks, fanin, items.reduce_fixed_ns,
                  items.reduce_input_ns[:, None]))
  path = np.where(ks <= np.maximum(pages, 1), path, np.inf)
  best = np.minimum.accumulate(path, axis=1)
  # Item i needs 1 + #{k : best[i, k] > T} pieces (`best` is finite: one
  # piece always fits); they fit the SMs once at most num_sms - n entries of
  # `best` exceed T. The smallest such T is the (num_sms - n + 1)-th largest
  # entry, or each item's own shortest path, whichever is larger.
  end = float(best[:, -1].max())
  spare = num_sms - n
  if best.size > spare:
    end = max(end, float(-np.partition(-best.ravel(), spare)[spare]))
  k = 1 + np.count_nonzero(best > end, axis=1)
  return end, k


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
  p_item = np.repeat(np.arange(items.size), k)
  num = p_item.shape[0]
  first = np.cumsum(k) - k
  kk = k[p_item]
  j = np.arange(num) - first[p_item]
  n_p = items.pages[p_item]
  page0 = j * n_p // kk
  page1 = (j + 1) * n_p // kk
  groups = np.where(k > fanin, -(-k // fanin), 1)
  extra = np.where(k > fanin, groups, 0)
  slots = np.where(k > 1, k + extra, 0)
  counters = np.where(k > 1, 1 + extra, 0)
  slot0 = np.cumsum(slots) - slots
  ctr0 = np.cumsum(counters) - counters
  split = kk > 1
  piece_ns = items.fixed_ns + (page1 - page0) * items.page_ns[p_item]
  length = items.length[p_item]
  rows = np.zeros((num, isa.INSTRUCTION_WORDS), np.int64)
  for word, value in items.fields(p_item).items():
    rows[:, word] = value
  rows[:, isa.FIELD_OPCODE] = isa.OP_PARTIAL
  rows[:, isa.FIELD_KV_START] = np.minimum(page0 * page_size, length)
  rows[:, isa.FIELD_KV_END] = np.minimum(page1 * page_size, length)
  rows[:, isa.FIELD_DST_SLOT] = np.where(split, slot0[p_item] + j,
                                         isa.FINAL_OUTPUT)
  rows[:, isa.FIELD_SIGNAL_COUNTER] = np.where(
      split, ctr0[p_item] + j * groups[p_item] // kk, isa.NO_COUNTER)
  rows[:, isa.FIELD_WAIT_COUNTER] = isa.NO_COUNTER
  rows[:, isa.FIELD_COST] = piece_ns

  # REDUCEs of the cut items, and the time each item's output is ready.
  fixed = items.reduce_fixed_ns
  done = float(piece_ns[~split].max(initial=0))
  reduces, at = [], []
  cost = piece_ns.tolist()
  for i in np.flatnonzero(k > 1).tolist():
    head = rows[first[i], isa.FIELD_BATCH:isa.FIELD_NUM_ROWS + 1].tolist()
    ki, m, s0, c0 = int(k[i]), int(groups[i]), int(slot0[i]), int(ctr0[i])
    f, r = int(first[i]), int(items.reduce_input_ns[i])
    if m == 1:
      ready = max(cost[f:f + ki])
      src, inputs, wait, pos = s0, ki, c0, 1
    else:
      ready = 0
      for grp in range(m):
        lo, hi = -(-grp * ki // m), -(-(grp + 1) * ki // m)
        size = hi - lo
        ready = max(ready, max(cost[f + lo:f + hi]) + fixed + size * r)
        reduces.append([isa.OP_REDUCE, *head, s0 + lo, size, s0 + ki + grp,
                        c0 + m, c0 + grp, size, fixed + size * r])
        at.append((f + hi - 1, 1))
      src, inputs, wait, pos = s0 + ki, m, c0 + m, 2
    reduces.append([isa.OP_REDUCE, *head, src, inputs, isa.FINAL_OUTPUT,
                    isa.NO_COUNTER, wait, inputs, fixed + inputs * r])
    at.append((f + ki - 1, pos))
    done = max(done, ready + fixed + inputs * r)
  sm = np.arange(num)
  pos = np.zeros(num, np.int64)
  if reduces:
    more = np.zeros((len(reduces), isa.INSTRUCTION_WORDS), np.int64)
    more[:, :isa.FIELD_COST + 1] = reduces
    rows = np.concatenate([rows, more])
    where = np.asarray(at)
    sm = np.concatenate([sm, where[:, 0]])
    pos = np.concatenate([pos, where[:, 1]])
  return Schedule(rows, sm, pos, positional=True), done


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
  work = float(items.cost_ns().sum()) / num_sms
  if split is not None and (split[0] <= work
                            or items.size * WRAP_ITEMS_PER_SM < num_sms):
    return _one_per_sm(items, split[1], fanin, problem.page_size)
  best, best_makespan = balanced.host_schedule(
      problem, balanced.statics_for(problem))
  if items.size * CHUNK_ITEMS_PER_SM >= num_sms:
    chunks, chunks_makespan = static.schedule(problem, items)
    if chunks_makespan < best_makespan:
      best, best_makespan = chunks, chunks_makespan
  if split is not None and split[0] < best_makespan:
    return _one_per_sm(items, split[1], fanin, problem.page_size)
  return best, best_makespan
