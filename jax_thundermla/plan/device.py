"""Planning inside jit from traced lengths: ``plan_on_device``.

Two on-device schedulers, both with no host sync and capacities from shapes
only (changing the lengths never recompiles):

* ``"compiled"`` (the default when the extension is built): one kernel that
  reads the lengths and writes a plan of the host makespan scheduler's
  quality (``plan/device_ffi.py``, ``csrc/planner.h``), on the GPU or, with
  the same code, on the CPU.
* ``"balanced"``: the balanced scheduler (jax_thundermla.plan.balanced, the
  same code as the host's ``scheduler="balanced"``) as jax.numpy int32 ops.

The balanced scheduler's sizes:

* instructions per SM: ``4 + (ALPHA + 1) * items // num_sms`` with ``items =
  batch * h_kv * ceil(s_q * h_q / h_kv / TILE_ROWS)`` (the balanced
  scheduler's bound on one SM's list, whatever the lengths);
* slots and counters: bounds from the at most ``num_sms - 1`` cuts;
* the cost unit: from ``max_seqlen``, so that int32 cannot overflow.

Changing the lengths therefore never recompiles. A symbolic batch size
(``jax.export``) is planned by the compiled planner, whose capacities are
then symbolic expressions (``device_ffi.capacities``). For equal capacities the
instruction tensor equals the host balanced planner's for the same lengths
when ``max_seqlen`` rounds up to the same page count as the longest length.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_thundermla import _validation
from jax_thundermla import isa
from jax_thundermla.plan import balanced
from jax_thundermla.plan import device_ffi
from jax_thundermla.plan.cost import CostModel
from jax_thundermla.plan.plan import DecodePlan
from jax_thundermla.plan.plan import validate_shapes
from jax_thundermla.plan.problem import tile_rows
from jax_thundermla.plan.tensorize import MIN_CAPACITY

# int32 headroom of the on-device arithmetic (see balanced.py).
_PAGE_LIMIT = 1 << 28


def _lengths(cache_seqlens: Any) -> jax.Array:
  """The lengths as an integer jax array ``[b]``, checked.

  Host values (lists, numpy arrays) must fit in int32: turning them into a
  device array would otherwise wrap them silently (2**32 + 5 -> 5).
  """
  if not isinstance(cache_seqlens, jax.Array):  # Tracers are jax.Arrays.
    host = np.asarray(cache_seqlens)
    if host.dtype.kind not in "iu":
      raise TypeError(
          f"cache_seqlens must be an integer array, got dtype {host.dtype}")
    if host.size and (
        int(host.min()) < -_validation.INT32_MAX - 1
        or int(host.max()) > _validation.INT32_MAX):
      raise ValueError(
          f"cache_seqlens must fit in int32, got values in"
          f" [{int(host.min())}, {int(host.max())}]")
    cache_seqlens = host
  lengths = jnp.asarray(cache_seqlens)
  if lengths.ndim != 1 or lengths.shape[0] == 0:
    raise ValueError(
        f"cache_seqlens must have shape [b] with b >= 1, got shape"
        f" {lengths.shape}")
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise TypeError(
        f"cache_seqlens must be an integer array, got dtype {lengths.dtype}")
  return lengths


@functools.partial(jax.jit, static_argnames=("st", "capacity"))
def _instructions(lengths: jax.Array, st: balanced.Statics,
                  capacity: int) -> jax.Array:
  """int32 ``[num_sms, capacity, INSTRUCTION_WORDS]`` balanced lists."""
  rows, sm, pos, _, _, _ = balanced.lists(jnp, lengths, st, jnp.int32)
  out = jnp.zeros((st.num_sms, capacity, isa.INSTRUCTION_WORDS), jnp.int32)
  return out.at[sm, pos].set(rows, mode="drop")


ON_DEVICE_SCHEDULERS = ("compiled", "balanced")


def _pick_scheduler(scheduler: str | None, num_sms: int,
                    symbolic_batch: bool) -> str:
  if scheduler is not None and scheduler not in ON_DEVICE_SCHEDULERS:
    raise ValueError(
        f"scheduler must be None or one of {ON_DEVICE_SCHEDULERS}, got"
        f" {scheduler!r}")
  if symbolic_batch:
    # Only the compiled planner sizes its arrays by symbolic arithmetic; its
    # lowering needs no extension (the process that runs it does).
    if scheduler == "balanced":
      raise ValueError(
          "scheduler='balanced' needs a static batch size (its arrays are"
          " sized from it); a symbolic batch is planned by scheduler="
          "'compiled' (or None)")
    if num_sms > device_ffi.max_sms():
      raise ValueError(
          f"a symbolic batch is planned by the compiled planner, which lays"
          f" out at most {device_ffi.max_sms()} SMs, got num_sms={num_sms}")
    return "compiled"
  if scheduler is None:
    return ("compiled" if device_ffi.available()
            and num_sms <= device_ffi.max_sms() else "balanced")
  if scheduler == "compiled":
    if not device_ffi.available():
      raise RuntimeError(
          "scheduler='compiled' needs the compiled extension; reinstall with"
          " the CUDA toolkit (nvcc) or use scheduler='balanced'")
    if num_sms > device_ffi.max_sms():
      raise ValueError(
          f"scheduler='compiled' lays out at most {device_ffi.max_sms()} SMs,"
          f" got num_sms={num_sms}; use scheduler='balanced'")
  return scheduler


def plan_on_device(cache_seqlens: Any, *, s_q: int, h_q: int, h_kv: int = 1,
                   page_size: int = 64, max_seqlen: int,
                   head_dim_v: int = 512, num_sms: int | None = None,
                   cost_model: CostModel | None = None,
                   scheduler: str | None = None) -> DecodePlan:
  """Builds a plan from device lengths, inside or outside jit.

  Plan once per decode step and pass the plan to every layer: each call
  plans again. Inside ``jax.lax.scan`` over layers, build the plan before
  the scan and close over it (or pass it in the carry), so that it is not
  rebuilt once per layer (``mla_decode(..., plan=None)`` does this itself
  when the scan body closes over the lengths)::

    @jax.jit
    def step(q, caches, table, lens):
      plan = plan_on_device(lens, s_q=4, h_q=16, max_seqlen=table.shape[1] * 64)
      def layer(x, kv):
        out, _ = mla_decode(x, kv, table, lens, plan=plan, causal=True)
        return x, out
      return jax.lax.scan(layer, q, caches)[1]

  Args:
    cache_seqlens: int ``[b]`` device (or traced) array: tokens per sequence,
      the ``s_q`` new ones included. Values are clamped to
      ``[0, max_seqlen]``; the plan's ``seqlens`` holds the clamped values.
      Host values (lists, numpy arrays) must fit in int32. ``b`` may be a
      symbolic dimension of ``jax.export`` (then the compiled planner plans).
    s_q: new query tokens per sequence.
    h_q: query heads.
    h_kv: KV heads.
    page_size: tokens per cache page: a multiple of 16 up to 256, as
      mla_decode takes.
    max_seqlen: static bound on the lengths, e.g. ``max_pages * page_size``
      of the block table.
    head_dim_v: value head dim (prices the instructions).
    num_sms: SMs of the grid; by default those of the first GPU, else 132.
    cost_model: prices of the instructions; CostModel() by default.
    scheduler: ``"compiled"``, ``"balanced"`` (see the module docstring) or
      None: ``"compiled"`` when the extension is built and ``num_sms`` is at
      most ``device_ffi.max_sms()``, ``"balanced"`` otherwise; always
      ``"compiled"`` for a symbolic ``b``, whose lowering needs no extension
      (running it does).

  Returns:
    A DecodePlan whose leaves are jax arrays and whose capacities depend on
    shapes only; ``scheduler`` names the scheduler used and the predicted
    makespan is NaN (it is known on the device only).

  Raises:
    TypeError, ValueError: bad arguments, naming the argument.
  """
  lengths = _lengths(cache_seqlens)
  s_q, h_q, h_kv, page_size, head_dim_v, num_sms, cost = validate_shapes(
      batch=lengths.shape[0], s_q=s_q, h_q=h_q, h_kv=h_kv,
      page_size=page_size, head_dim_v=head_dim_v, num_sms=num_sms,
      cost_model=cost_model)
  if isinstance(max_seqlen, bool) or not isinstance(
      max_seqlen, (int, np.integer)):
    raise TypeError(
        f"max_seqlen must be a static int, got {type(max_seqlen).__name__}")
  if max_seqlen < 0:
    raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
  max_pages = -(-int(max_seqlen) // page_size)
  batch = lengths.shape[0]
  symbolic = jax.export.is_symbolic_dim(batch)
  scheduler = _pick_scheduler(scheduler, num_sms, symbolic)
  rows = tile_rows(s_q, h_q, h_kv)
  page_ns = max(cost.page_ns(r, page_size, head_dim_v) for r in rows)
  if cost.partial_fixed() + max_pages * page_ns >= 1 << 31:
    raise ValueError(
        f"max_seqlen={max_seqlen} makes one PARTIAL cost more than int32 ns;"
        " use plan_decode on the host")
  items = batch * h_kv * len(rows)
  if not symbolic and items * (1 + max_pages) > _PAGE_LIMIT:
    raise ValueError(
        f"batch * h_kv * tiles * (1 + max_pages) must be <= {_PAGE_LIMIT} for"
        f" the on-device planner, got {items} *"
        f" {1 + max_pages}; use plan_decode on the host")
  bound = min(int(max_seqlen), _validation.INT32_MAX)
  wide = jnp.iinfo(lengths.dtype).max > _validation.INT32_MAX
  if scheduler == "compiled":
    # The planner clamps to [0, bound] itself: int32 lengths go to it as they
    # are (no kernel before it); wider ones are clamped first, since a cast
    # would wrap 2**32 + 5 to 5.
    caps = device_ffi.capacities(batch, s_q, h_q, h_kv, num_sms)
    instructions, clamped, _ = device_ffi.plan_arrays(
        jnp.clip(lengths, 0, bound).astype(jnp.int32) if wide else lengths,
        s_q=s_q, h_q=h_q, h_kv=h_kv, page_size=page_size,
        max_seqlen=bound, head_dim_v=head_dim_v, num_sms=num_sms, cost=cost)
    return DecodePlan(
        instructions=instructions, seqlens=clamped, s_q=s_q, h_q=h_q,
        h_kv=h_kv, page_size=page_size, head_dim_v=head_dim_v,
        num_sms=num_sms, max_instructions=caps[0], num_slots=caps[1],
        num_counters=caps[2], scheduler="compiled",
        predicted_makespan_ns=math.nan)
  if wide:
    # Clamp in the wider type: a cast first would wrap 2**32 + 5 to 5.
    clamped = jnp.clip(lengths, 0, bound).astype(jnp.int32)
  else:
    clamped = jnp.clip(lengths.astype(jnp.int32), 0, bound)
  st = balanced.statics(
      batch=batch, s_q=s_q, h_q=h_q, h_kv=h_kv, page_size=page_size,
      head_dim_v=head_dim_v, num_sms=num_sms, max_pages=max_pages, cost=cost)
  capacity = max(MIN_CAPACITY, st.max_per_sm)
  return DecodePlan(
      instructions=_instructions(clamped, st, capacity), seqlens=clamped,
      s_q=s_q, h_q=h_q, h_kv=h_kv, page_size=page_size,
      head_dim_v=head_dim_v, num_sms=num_sms, max_instructions=capacity,
      num_slots=max(MIN_CAPACITY, st.max_slots),
      num_counters=max(MIN_CAPACITY, st.max_counters), scheduler="balanced",
      predicted_makespan_ns=math.nan)
