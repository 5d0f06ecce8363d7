"""The compiled planner: lengths to a makespan-quality plan in one kernel.

``csrc/planner.h`` describes it: it reads the lengths where they are (one
CTA on the GPU, one thread on the CPU, the same C++ for both, bit for bit)
and writes the instruction tensor of the best of three layouts under the
cost model of ``plan/cost.py``, whose prices it receives as attributes.
Capacities come from shapes only:

* instructions per SM: ``4 + (ALPHA + 1) * items // num_sms``, the balanced
  scheduler's bound (ALPHA of ``plan/balanced.py``), which the cut layout
  never exceeds; a layout that would exceed it is not chosen;
* slots: ``2 * num_sms`` (each of the at most ``num_sms - 1`` cuts adds one
  piece to a cut item); counters: ``num_sms`` (one per cut item).

The batch may be a symbolic dimension (``jax.export``): the instruction
capacity and the scratch size are then symbolic expressions (see
``capacities`` and ``scratch_bytes``), evaluated when the artifact is called,
and the planner's limit on work items is checked when it runs.

Rows after each list's STOP row are left unwritten: the kernel, the virtual
machine and the simulated clock read a list up to its first STOP.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_thundermla import _ffi
from jax_thundermla import isa
from jax_thundermla.plan import balanced
from jax_thundermla.plan.cost import CostModel
from jax_thundermla.plan.problem import tile_rows
from jax_thundermla.plan.tensorize import MIN_CAPACITY
from jax_thundermla.plan.tensorize import bucket

TARGET = "tmla_plan"
# Words of the planner's info output (csrc/planner.h kInfo*).
INFO_LAYOUT = 0
INFO_LONGEST = 1
INFO_SLOTS = 2
INFO_COUNTERS = 3
INFO_MAKESPAN_LO = 4
INFO_MAKESPAN_HI = 5
INFO_OVERFLOW = 6
INFO_WORDS = 8
# Layouts, by the info word's value.
LAYOUTS = ("backwards", "cut", "uncut")


def available() -> bool:
  """Whether the compiled planner is in the extension."""
  return _ffi.planner_available()


# Words of the planner's scratch (csrc/planner.cuh ``Carve``) per item (the
# lengths counted as one word per item), per SM and fixed, besides two terms
# not affine in the items: the sort keys, padded to a power of two
# (< 2 * items words), and layout A's table of ``items * max(0, num_sms + 1
# - items)`` int32 entries. A test checks the bound against the extension's
# exact count.
_SCRATCH_WORDS_PER_ITEM = 16
_SCRATCH_WORDS_PER_SM = 13
_SCRATCH_FIXED_WORDS = 1


def max_sms() -> int:
  """Most SMs the compiled planner lays out.

  The extension's ``kMaxPlannerSms`` (csrc/planner.h), which equals
  ``isa.MAX_REDUCE_INPUTS`` (a test checks it): without the extension that
  value still sizes the planner's lowering for export.
  """
  if not available():
    return isa.MAX_REDUCE_INPUTS
  return int(_ffi.planner_constants()["max_sms"])


@functools.lru_cache(maxsize=64)
def capacities(batch, s_q: int, h_q: int, h_kv: int,
               num_sms: int) -> tuple:
  """``(max_instructions, num_slots, num_counters)`` of a plan's shapes.

  Args:
    batch: sequences: an int, or a symbolic dimension of ``jax.export``.
    s_q, h_q, h_kv, num_sms: the shapes.

  Returns:
    The capacities, powers of two for an int batch. For a symbolic batch
    ``max_instructions`` is the expression ``max(MIN_CAPACITY, 2 * per_sm -
    2)`` (``per_sm`` as in the module docstring): symbolic arithmetic has no
    rounding up to a power of two, and ``2 * per_sm - 2`` is at least that
    power for every ``per_sm >= 2``, so every layout that fits the capacity
    of a static batch also fits (the planner may choose a longer list of a
    shorter predicted makespan). The instruction tensor is then at most
    twice as large as for a static batch (64 bytes per entry); the kernel
    reads each list up to its STOP only.
  """
  items = batch * h_kv * len(tile_rows(s_q, h_q, h_kv))
  per_sm = 4 + (balanced.ALPHA + 1) * items // num_sms
  slots, counters = bucket(2 * num_sms), bucket(num_sms)
  if jax.export.is_symbolic_dim(per_sm):
    return jax.core.max_dim(MIN_CAPACITY, 2 * per_sm - 2), slots, counters
  return bucket(per_sm), slots, counters


def scratch_bytes(items, num_sms: int):
  """Bytes of scratch the planner gets for ``items`` work items.

  Args:
    items: work items: an int, or a symbolic dimension expression.
    num_sms: SMs of the plan.

  Returns:
    The extension's exact count for an int; for a symbolic expression an
    upper bound (``scratch_bytes_bound``).
  """
  if not jax.export.is_symbolic_dim(items):
    return int(_ffi.planner_scratch_bytes(items, num_sms))
  return scratch_bytes_bound(items, num_sms)


def scratch_bytes_bound(items, num_sms: int):
  """An upper bound of the planner's scratch bytes, as an expression.

  Args:
    items: work items: an int or a symbolic dimension expression.
    num_sms: SMs of the plan.

  Returns:
    At most ``8 * items`` bytes above the exact count (the sort keys are
    counted as ``2 * items`` words), in the type of ``items``.
  """
  table = (items * jax.core.max_dim(0, num_sms + 1 - items) + 1) // 2
  return 8 * ((_SCRATCH_WORDS_PER_ITEM + 2) * items + table
              + _SCRATCH_WORDS_PER_SM * num_sms + _SCRATCH_FIXED_WORDS)


def plan_arrays(lengths: jax.Array, *, s_q: int, h_q: int, h_kv: int,
                page_size: int, max_seqlen: int, head_dim_v: int,
                num_sms: int, cost: CostModel) -> tuple[jax.Array, ...]:
  """Runs the compiled planner on the lengths' platform (shapes validated).

  Without the extension the call is still lowered (for ``jax.export``); it
  runs where the extension is built.

  Args:
    lengths: int32 ``[b]`` tokens per sequence (traced or concrete; ``b``
      may be symbolic).
    s_q, h_q, h_kv, page_size, head_dim_v: the shapes.
    max_seqlen: lengths are clamped to ``[0, max_seqlen]``.
    num_sms: SMs of the grid (at most ``max_sms()``).
    cost: the cost model whose prices the planner uses.

  Returns:
    ``(instructions, seqlens, info)``: int32 ``[num_sms, max_instructions,
    16]``, the clamped lengths int32 ``[b]`` and int32 ``[INFO_WORDS]``
    (the chosen layout, longest list, slots, counters, predicted makespan
    in ns as two words, and an overflow flag).
  """
  if available():
    _ffi.register_planner()
  batch = lengths.shape[0]
  rows = tile_rows(s_q, h_q, h_kv)
  cap, _, _ = capacities(batch, s_q, h_q, h_kv, num_sms)
  scratch = scratch_bytes(batch * h_kv * len(rows), num_sms)
  input_ns = np.asarray([cost.reduce_input_ns(r, head_dim_v)
                         for r in range(isa.TILE_ROWS + 1)], np.int64)
  call = jax.ffi.ffi_call(TARGET, (
      jax.ShapeDtypeStruct((num_sms, cap, isa.INSTRUCTION_WORDS), jnp.int32),
      jax.ShapeDtypeStruct((batch,), jnp.int32),
      jax.ShapeDtypeStruct((INFO_WORDS,), jnp.int32),
      jax.ShapeDtypeStruct((scratch,), jnp.uint8)))
  instructions, seqlens, info, _ = call(
      lengths.astype(jnp.int32), h_kv=np.int32(h_kv),
      num_tiles=np.int32(len(rows)), last_tile_rows=np.int32(rows[-1]),
      page_size=np.int32(page_size), max_seqlen=np.int32(max_seqlen),
      partial_fixed_ns=np.int64(cost.partial_fixed()),
      reduce_fixed_ns=np.int64(cost.reduce_fixed()),
      page_ns_full=np.int64(cost.page_ns(rows[0], page_size, head_dim_v)),
      page_ns_last=np.int64(cost.page_ns(rows[-1], page_size, head_dim_v)),
      input_ns=input_ns)
  return instructions, seqlens, info


def info_makespan_ns(info) -> int:
  """Predicted makespan (ns) from an info array."""
  info = np.asarray(info).astype(np.int64)
  return int((info[INFO_MAKESPAN_HI] << 32) | (info[INFO_MAKESPAN_LO]
                                               & 0xffffffff))
