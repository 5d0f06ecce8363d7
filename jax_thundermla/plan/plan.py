"""DecodePlan, the instruction tensor of one decode step, and plan_decode."""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
from typing import Any

import jax
import numpy as np

from jax_thundermla import _validation
from jax_thundermla import isa
from jax_thundermla.plan import balanced
from jax_thundermla.plan import makespan
from jax_thundermla.plan import static
from jax_thundermla.plan import tensorize
from jax_thundermla.plan.cost import CostModel
from jax_thundermla.plan.problem import Problem
from jax_thundermla.plan.problem import tile_prices

SCHEDULERS = ("balanced", "static", "makespan")

# SMs assumed when no GPU is visible (H100 SXM).
DEFAULT_NUM_SMS = 132
# Most instruction lists a plan may have (far above any GPU's SM count).
MAX_NUM_SMS = 4096
# Most work items (sequence, KV head, 64-row tile) a plan may cover: the
# planners hold a few words per item on the host.
MAX_WORK_ITEMS = 1 << 22
# Largest sequence length a plan accepts (KV positions are int32 words).
MAX_SEQLEN = (1 << 31) - 1
# Largest instruction cost (ns) an int32 cost word holds.
MAX_COST_NS = (1 << 31) - 1
# The cost model used when none is given.
_DEFAULT_COST = CostModel()


@functools.lru_cache(maxsize=None)
def default_num_sms() -> int:
  """SM count of the first GPU jax sees, else DEFAULT_NUM_SMS."""
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    return DEFAULT_NUM_SMS
  count = getattr(gpus[0], "core_count", None) if gpus else None
  return int(count) if count else DEFAULT_NUM_SMS


@dataclasses.dataclass(frozen=True, eq=False)
class _Informational:
  """A value carried in a pytree's static data that never tells plans apart.

  Plans with equal capacities share a jit cache entry even though their
  predicted makespans differ.
  """

  value: float

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _Informational)

  def __hash__(self) -> int:
    return hash(_Informational)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class DecodePlan:
  """A schedule of one decode step: an instruction tensor and its lengths.

  A pytree: the leaves are ``instructions`` and ``seqlens``; everything else
  is static, and the capacities are bucketed to powers of two so that plans
  for similar lengths share one compiled kernel. Plans built on the host hold
  numpy arrays (jit moves them to the device when they are passed in); plans
  built on the device hold jax arrays.

  Attributes:
    instructions: int32 ``[num_sms, max_instructions, INSTRUCTION_WORDS]``;
      each SM's list ends at its first all-zero (STOP) row.
    seqlens: int32 ``[b]``, the lengths the plan was built for.
    s_q: new query tokens per sequence.
    h_q: query heads.
    h_kv: KV heads.
    page_size: tokens per cache page.
    head_dim_v: value head dim the instructions were priced for.
    num_sms: SMs of the grid (instruction lists).
    max_instructions: capacity of each list.
    num_slots: partial slots of the workspace.
    num_counters: counters of the workspace.
    scheduler: the scheduler that built the plan.
    predicted_makespan_ns: simulated duration under the cost model (NaN for
      plans built on the device); informational, not part of the pytree's
      identity.
  """

  instructions: Any
  seqlens: Any
  s_q: int
  h_q: int
  h_kv: int
  page_size: int
  head_dim_v: int
  num_sms: int
  max_instructions: int
  num_slots: int
  num_counters: int
  scheduler: str
  predicted_makespan_ns: float

  def static_fields(self) -> tuple:
    """The static fields from ``s_q`` to ``scheduler``, in field order."""
    names = [f.name for f in dataclasses.fields(self)][2:-1]
    return tuple(getattr(self, name) for name in names)

  def tree_flatten(self):
    aux = (*self.static_fields(), _Informational(self.predicted_makespan_ns))
    return (self.instructions, self.seqlens), aux

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    *static_fields, makespan_ns = aux
    return cls(*leaves, *static_fields, makespan_ns.value)

  @property
  def batch(self) -> int:
    return int(self.seqlens.shape[0])

  def check_compatible(self, *, batch: int, s_q: int, h_q: int, h_kv: int,
                       page_size: int, head_dim_v: int) -> None:
    """Raises ValueError unless the plan was built for these shapes.

    Every field the kernel reads from the plan takes part: the shapes the
    instructions index (batch, s_q, h_q, h_kv), the page size their KV
    ranges were cut at, the head dim they were priced for, and the plan's
    own arrays (their shapes against its capacities).

    Args:
      batch: sequences of the call.
      s_q: new query tokens per sequence.
      h_q: query heads.
      h_kv: KV heads.
      page_size: tokens per cache page.
      head_dim_v: value head dim.

    Raises:
      ValueError: naming the first mismatch.
    """
    for name, want, got in (("batch", self.batch, batch),
                            ("s_q", self.s_q, s_q), ("h_q", self.h_q, h_q),
                            ("h_kv", self.h_kv, h_kv),
                            ("page_size", self.page_size, page_size),
                            ("head_dim_v", self.head_dim_v, head_dim_v)):
      if want != got:
        raise ValueError(
            f"plan: built for {name}={want}, the call has {name}={got}; build"
            " a plan for these shapes")
    want = (self.num_sms, self.max_instructions, isa.INSTRUCTION_WORDS)
    shape = tuple(getattr(self.instructions, "shape", ()))
    if shape != want:
      raise ValueError(
          f"plan: instructions must have shape [num_sms, max_instructions,"
          f" {isa.INSTRUCTION_WORDS}] = {list(want)}, got {list(shape)}")
    for name, value in (("instructions", self.instructions),
                        ("seqlens", self.seqlens)):
      if np.dtype(value.dtype) != np.int32:
        raise ValueError(
            f"plan: {name} must be int32, got {np.dtype(value.dtype).name}")
    if min(self.num_slots, self.num_counters) < 0:
      raise ValueError(
          f"plan: num_slots and num_counters must be >= 0, got"
          f" {self.num_slots} and {self.num_counters}")

  def workspace_words(self, head_dim_v: int) -> int:
    """4-byte words of the kernel workspace (layout in csrc/isa.h)."""
    return isa.workspace_words(self.num_slots, self.num_counters, head_dim_v)

  def gantt(self, path: str, *, title: str | None = None) -> None:
    """Draws the predicted schedule, one row per SM, into an image file.

    Args:
      path: output file (any format matplotlib writes, e.g. ``.png``).
      title: figure title; by default the scheduler and the makespan.

    Raises:
      ImportError: matplotlib is not installed.
    """
    from jax_thundermla.plan import gantt  # pylint: disable=g-import-not-at-top
    gantt.draw(self, path, title=title)


def _serialize_aux(aux) -> bytes:
  *static_fields, makespan_ns = aux
  return json.dumps([*static_fields, makespan_ns.value]).encode()


def _deserialize_aux(data: bytes):
  *static_fields, makespan_ns = json.loads(data.decode())
  return (*static_fields, _Informational(makespan_ns))


# jax.export writes a plan argument's static fields into the artifact's
# calling convention (and reads them back) through this registration.
jax.export.register_pytree_node_serialization(
    DecodePlan, serialized_name="jax_thundermla.DecodePlan",
    serialize_auxdata=_serialize_aux, deserialize_auxdata=_deserialize_aux)

def _int_arg(name: str, value: Any, minimum: int) -> int:
  if type(value) is int and value >= minimum:  # Not bool, a subclass.
    return value
  if isinstance(value, bool):
    raise TypeError(f"{name} must be an int, got bool")
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(
        f"{name} must be an int, got {type(value).__name__}") from None
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return value


def validate_shapes(*, batch: int, s_q: Any, h_q: Any, h_kv: Any,
                    page_size: Any, head_dim_v: Any, num_sms: Any,
                    cost_model: Any) -> tuple[int, int, int, int, int, int,
                                              CostModel]:
  """Checks the static arguments shared by the planners.

  Page sizes are those mla_decode takes (one check for both).

  Args:
    batch: sequences to plan (already checked >= 1); may be a symbolic
      dimension of ``jax.export``.
    s_q, h_q, h_kv, page_size, head_dim_v, num_sms, cost_model: as given to
      the planner.

  Returns:
    ``(s_q, h_q, h_kv, page_size, head_dim_v, num_sms, cost_model)`` with
    ``num_sms`` and ``cost_model`` defaulted.

  Raises:
    TypeError, ValueError: naming the argument, what was expected and got.
  """
  s_q = _int_arg("s_q", s_q, 1)
  h_q = _int_arg("h_q", h_q, 1)
  h_kv = _int_arg("h_kv", h_kv, 1)
  if h_q % h_kv:
    raise ValueError(
        f"h_q must be a multiple of h_kv, got h_q={h_q}, h_kv={h_kv}")
  page_size = _int_arg("page_size", page_size, 1)
  _validation.check_page_size(page_size, "page_size")
  head_dim_v = _int_arg("head_dim_v", head_dim_v, 1)
  num_sms = default_num_sms() if num_sms is None else _int_arg(
      "num_sms", num_sms, 1)
  if num_sms > MAX_NUM_SMS:
    raise ValueError(f"num_sms must be <= {MAX_NUM_SMS}, got {num_sms}")
  tiles = -(-s_q * (h_q // h_kv) // isa.TILE_ROWS)
  # A symbolic batch (jax.export) is planned on the device only, where the
  # compiled planner checks its own limit when it runs.
  if (not jax.export.is_symbolic_dim(batch)
      and batch * h_kv * tiles > MAX_WORK_ITEMS):
    raise ValueError(
        f"batch * h_kv * ceil(s_q * h_q / h_kv / {isa.TILE_ROWS}) (work"
        f" items) must be <= {MAX_WORK_ITEMS}, got {batch} * {h_kv} *"
        f" {tiles} (s_q={s_q}, h_q={h_q})")
  if cost_model is None:
    cost_model = _DEFAULT_COST
  elif not isinstance(cost_model, CostModel):
    raise TypeError(
        f"cost_model must be a CostModel or None, got"
        f" {type(cost_model).__name__}")
  return s_q, h_q, h_kv, page_size, head_dim_v, num_sms, cost_model


def _host_seqlens(seqlens: Any) -> np.ndarray:
  if isinstance(seqlens, jax.core.Tracer):
    raise TypeError(
        "seqlens must be host values (list or numpy array), got a traced"
        " array; inside jax.jit build the plan with plan_on_device")
  lens = np.asarray(seqlens)
  # The kinds of np.integer's subtypes (timedelta64 is one), not bool's.
  if lens.dtype.kind not in "ium" and (lens.dtype == bool or lens.size):
    raise TypeError(f"seqlens must hold integers, got dtype {lens.dtype}")
  if lens.ndim != 1 or lens.shape[0] == 0:
    raise ValueError(
        f"seqlens must have shape [b] with b >= 1, got shape {lens.shape}")
  lo, hi = int(np.minimum.reduce(lens)), int(np.maximum.reduce(lens))
  if lo < 0 or hi > MAX_SEQLEN:
    raise ValueError(
        f"seqlens must lie in [0, {MAX_SEQLEN}], got values in [{lo}, {hi}]")
  return lens.astype(np.int64)


def plan_decode(seqlens: Any, *, s_q: int, h_q: int, h_kv: int = 1,
                page_size: int = 64, head_dim_v: int = 512,
                num_sms: int | None = None, scheduler: str = "makespan",
                cost_model: CostModel | None = None) -> DecodePlan:
  """Builds the instruction tensor of one decode step on the host.

  Args:
    seqlens: host ints ``[b]``: tokens in the cache per sequence, the ``s_q``
      new ones included.
    s_q: new query tokens per sequence.
    h_q: query heads.
    h_kv: KV heads (``h_q % h_kv == 0``).
    page_size: tokens per cache page: a multiple of 16 up to 256, as
      mla_decode takes.
    head_dim_v: value head dim (prices the instructions).
    num_sms: SMs of the grid (at most MAX_NUM_SMS); by default those of the
      first GPU jax sees, else 132.
    scheduler: one of SCHEDULERS: ``"balanced"`` (FlashMLA's even split,
      the same lists as the on-device planner), ``"static"`` (fixed chunks,
      a 4-way reduction tree, list scheduling) or ``"makespan"`` (built
      backwards from each output's final merge, which it spreads by rows
      over several SMs; best of several rollouts).
    cost_model: prices of the instructions; CostModel() by default.

  Returns:
    The plan, with its predicted makespan.

  Raises:
    TypeError, ValueError: bad arguments, naming the argument.
  """
  lens = _host_seqlens(seqlens)
  s_q, h_q, h_kv, page_size, head_dim_v, num_sms, cost = validate_shapes(
      batch=lens.shape[0], s_q=s_q, h_q=h_q, h_kv=h_kv, page_size=page_size,
      head_dim_v=head_dim_v, num_sms=num_sms, cost_model=cost_model)
  if scheduler not in SCHEDULERS:
    raise ValueError(
        f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
  problem = Problem(seqlens=lens, s_q=s_q, h_q=h_q, h_kv=h_kv,
                    page_size=page_size, head_dim_v=head_dim_v,
                    num_sms=num_sms, cost=cost)
  longest = int(np.maximum.reduce(lens))
  whole = cost.partial_fixed() + -(-longest // page_size) * max(tile_prices(
      s_q, h_q, h_kv, page_size, head_dim_v, cost)[1])
  if whole > MAX_COST_NS:
    raise ValueError(
        f"seqlens: a sequence of {longest} tokens costs {whole} ns as"
        f" one PARTIAL, more than the int32 cost word holds ({MAX_COST_NS})")
  if scheduler == "balanced":
    schedule, makespan_ns = balanced.host_schedule(
        problem, balanced.statics_for(problem))
  elif scheduler == "static":
    schedule, makespan_ns = static.schedule(problem)
  else:
    schedule, makespan_ns = makespan.schedule(problem)
  instructions, caps = tensorize.tensorize(schedule, num_sms)
  return DecodePlan(
      instructions=instructions, seqlens=lens.astype(np.int32), s_q=s_q,
      h_q=h_q, h_kv=h_kv, page_size=page_size, head_dim_v=head_dim_v,
      num_sms=num_sms, max_instructions=caps.max_instructions,
      num_slots=caps.num_slots, num_counters=caps.num_counters,
      scheduler=scheduler,
      predicted_makespan_ns=makespan_ns)
