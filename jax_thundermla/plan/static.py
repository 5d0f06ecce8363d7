"""The static scheduler: fixed chunks, a k-way tree, list scheduling.

ThunderMLA's first scheduler. Every item is cut into chunks of one fixed
number of pages (enough for about one chunk per SM, and at least the pages
that cost as much as a PARTIAL's fixed cost); the chunks of an item are
merged by a FANIN-way reduction tree. Tasks are then handed out in
topological order, PARTIALs longest first and REDUCEs level by level, each to
the SM that becomes free first (a heap of SM free times), starting once that
SM is free and its inputs are done. Each SM runs its tasks in the order they
were handed out; since a task is handed out after everything it waits for,
no list can wait on a later one.
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np

from jax_thundermla import isa
from jax_thundermla.plan.problem import Problem
from jax_thundermla.plan.problem import WorkItems
from jax_thundermla.plan.tensorize import Schedule

# Inputs of one REDUCE of the static tree.
FANIN = 4


@dataclasses.dataclass(frozen=True)
class Tasks:
  """Instructions of a plan before they are given SMs, arrays ``[m]``.

  Attributes:
    rows: int64 ``[m, INSTRUCTION_WORDS]`` instruction words (cost included).
    parent: index of the REDUCE that reads the task's result, -1 for tasks
      that write the final output.
    level: 0 for PARTIALs, 1 + the deepest input's level for REDUCEs.
    cost: int64 predicted duration (ns), equal to the cost word.
  """

  rows: np.ndarray
  parent: np.ndarray
  level: np.ndarray
  cost: np.ndarray

  @property
  def size(self) -> int:
    return int(self.cost.shape[0])


def build_tree(items: WorkItems, piece_item: np.ndarray,
               piece_page: np.ndarray, fanin: int,
               page_size: int) -> Tasks:
  """PARTIAL pieces and the REDUCE trees that merge them.

  Pieces of an item are consecutive in ``piece_item`` and in page order; an
  item with one piece writes the final output directly. An item with k > 1
  pieces is merged by a tree of REDUCEs of at most ``fanin`` inputs: each
  level groups the previous one's nodes into ``ceil(m / fanin)`` balanced,
  contiguous groups until one node, the final REDUCE, remains. The inputs of
  one REDUCE occupy contiguous slots and signal one counter per REDUCE.

  Args:
    items: the work items.
    piece_item: int ``[p]`` nondecreasing item of each piece; every item has
      at least one piece.
    piece_page: int ``[p]`` first page of each piece (0 for an item's first
      piece, strictly increasing within an item, below the item's pages
      unless the item is empty).
    fanin: most inputs of one REDUCE (>= 2).
    page_size: tokens per page.

  Returns:
    The tasks: pieces first (in the given order), then REDUCEs level by level.
  """
  piece_item = np.asarray(piece_item, np.int64)
  piece_page = np.asarray(piece_page, np.int64)
  num_pieces = piece_item.shape[0]
  k = np.bincount(piece_item, minlength=items.size)
  first = np.cumsum(k) - k
  j = np.arange(num_pieces) - first[piece_item]
  last = j == k[piece_item] - 1
  next_page = np.empty_like(piece_page)
  next_page[:-1] = piece_page[1:]
  page_end = np.where(last, items.pages[piece_item], next_page)
  length = items.length[piece_item]
  pieces = items.partial[piece_item]
  isa.Fields(pieces).kv_start = np.minimum(piece_page * page_size, length)
  isa.Fields(pieces).kv_end = np.minimum(page_end * page_size, length)
  isa.Fields(pieces).dst_slot = isa.FINAL_OUTPUT
  isa.Fields(pieces).signal_counter = isa.NO_COUNTER
  piece_cost = (items.fixed_ns
                + (page_end - piece_page) * items.page_ns[piece_item])
  isa.Fields(pieces).cost = piece_cost

  blocks = [pieces]
  level_parts = [np.zeros(num_pieces, np.int64)]
  cost_parts = [piece_cost]
  parent_parts = [np.full(num_pieces, -1, np.int64)]

  # Nodes of the current level (all in the last block): index in the block,
  # item, index within the item and the item's node count at this level.
  node_local = np.arange(num_pieces)
  node_item = piece_item
  node_j = j
  node_m = k[piece_item]
  num_tasks = num_pieces
  num_reduces = 0
  next_slot = 0
  level = 0
  while True:
    active = node_m > 1
    if not active.any():
      break
    level += 1
    local = node_local[active]
    item = node_item[active]
    m = node_m[active]
    m_up = -(-m // fanin)
    up = (node_j[active] * m_up) // m
    new_group = np.ones(local.shape[0], bool)
    new_group[1:] = (item[1:] != item[:-1]) | (up[1:] != up[:-1])
    group_first = np.flatnonzero(new_group)
    num_groups = group_first.shape[0]
    group_of = np.cumsum(new_group) - 1
    num_src = np.diff(np.append(group_first, local.shape[0]))
    slot = next_slot + np.arange(local.shape[0])
    next_slot += local.shape[0]
    counter = num_reduces + np.arange(num_groups)
    num_reduces += num_groups

    # Children write a slot and signal their parent's counter.
    children = blocks[-1]
    isa.Fields(children).dst_slot[local] = slot
    isa.Fields(children).signal_counter[local] = counter[group_of]
    parent_parts[-1][local] = num_tasks + group_of

    g_item = item[group_first]
    reduces = items.partial[g_item]
    isa.Fields(reduces).opcode = isa.OP_REDUCE
    isa.Fields(reduces).src_slot = slot[group_first]
    isa.Fields(reduces).num_src = num_src
    isa.Fields(reduces).dst_slot = isa.FINAL_OUTPUT
    isa.Fields(reduces).signal_counter = isa.NO_COUNTER
    isa.Fields(reduces).wait_counter = counter
    isa.Fields(reduces).wait_count = num_src
    reduce_cost = (items.reduce_fixed_ns
                   + num_src * items.reduce_input_ns[g_item])
    isa.Fields(reduces).cost = reduce_cost
    blocks.append(reduces)
    level_parts.append(np.full(num_groups, level, np.int64))
    cost_parts.append(reduce_cost)
    parent_parts.append(np.full(num_groups, -1, np.int64))
    num_tasks += num_groups

    node_local = np.arange(num_groups)
    node_item = g_item
    node_j = up[group_first]
    node_m = m_up[group_first]

  return Tasks(rows=np.concatenate(blocks),
               parent=np.concatenate(parent_parts),
               level=np.concatenate(level_parts),
               cost=np.concatenate(cost_parts))


def chunk_pages(problem: Problem, items: WorkItems) -> int:
  """Pages of one chunk: about one chunk per SM, at least one fixed cost."""
  per_sm = -(-int(items.pages.sum()) // problem.num_sms)
  mean_page_ns = float(items.page_ns.mean())
  at_least = int(np.ceil(items.fixed_ns / mean_page_ns))
  return max(1, per_sm, at_least)


def load_bound(problem: Problem, items: WorkItems) -> float:
  """A lower bound of the static schedule's makespan: its PARTIALs' work
  spread evenly over the SMs."""
  k = np.maximum(1, -(-items.pages // chunk_pages(problem, items)))
  work = items.fixed_ns * int(k.sum()) + int((items.pages
                                               * items.page_ns).sum())
  return work / problem.num_sms


def schedule(problem: Problem,
             items: WorkItems | None = None) -> tuple[Schedule, float]:
  """Static schedule of a problem.

  Args:
    problem: the shapes.
    items: its work items, if already built.

  Returns:
    ``(schedule, makespan)``: the instructions with their SMs and order, and
    the predicted makespan in ns (list scheduling times every task as early
    as its SM and inputs allow, so it is the simulated clock's).
  """
  items = WorkItems.build(problem) if items is None else items
  chunk = chunk_pages(problem, items)
  k = np.maximum(1, -(-items.pages // chunk))
  piece_item = np.repeat(np.arange(items.size), k)
  piece_page = (np.arange(piece_item.shape[0])
                - np.repeat(np.cumsum(k) - k, k)) * chunk
  tasks = build_tree(items, piece_item, piece_page, FANIN, problem.page_size)

  # Topological order: PARTIALs longest first, then REDUCEs by level.
  order = np.lexsort((-tasks.cost, tasks.level))
  cost = tasks.cost.tolist()
  parent = tasks.parent.tolist()
  ready = [0] * tasks.size
  sm = [0] * tasks.size
  free = [(0, s) for s in range(problem.num_sms)]
  for t in order.tolist():
    clock, s = heapq.heappop(free)
    end = max(clock, ready[t]) + cost[t]
    heapq.heappush(free, (end, s))
    sm[t] = s
    p = parent[t]
    if p >= 0 and end > ready[p]:
      ready[p] = end
  key = np.empty(tasks.size, np.int64)
  key[order] = np.arange(tasks.size)
  return (Schedule(tasks.rows, np.asarray(sm, np.int64), key),
          float(max(c for c, _ in free)))
