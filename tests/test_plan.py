"""plan_decode arguments, DecodePlan as a pytree, bucketing, the cost model."""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_thundermla import isa
from jax_thundermla.plan import SCHEDULERS
from jax_thundermla.plan import CostModel
from jax_thundermla.plan import DecodePlan
from jax_thundermla.plan import plan_decode
from jax_thundermla.workloads import W3_LENS
from jax_thundermla.workloads import WORKLOADS


def _plan(**kwargs):
  args = dict(seqlens=[300, 0, 5000], s_q=2, h_q=16, num_sms=20)
  args.update(kwargs)
  return plan_decode(**args)


def test_defaults():
  plan = plan_decode([10, 20], s_q=1, h_q=16)
  assert plan.scheduler == "makespan"
  assert (plan.h_kv, plan.page_size) == (1, 64)
  if not jax.devices()[0].platform == "gpu":
    assert plan.num_sms == 132
  assert plan.batch == 2
  np.testing.assert_array_equal(plan.seqlens, [10, 20])
  assert plan.seqlens.dtype == np.int32


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(seqlens=[1.5, 2.0]), TypeError, "seqlens must hold integers"),
    (dict(seqlens=[[1, 2]]), ValueError, r"seqlens must have shape \[b\]"),
    (dict(seqlens=[]), ValueError, "b >= 1"),
    (dict(seqlens=[3, -1]), ValueError, r"seqlens must lie in \[0,"),
    (dict(seqlens=[1 << 31]), ValueError, "seqlens must lie"),
    (dict(seqlens=[1 << 30]), ValueError, "more than the int32 cost word"),
    (dict(s_q=0), ValueError, "s_q must be >= 1, got 0"),
    (dict(s_q=True), TypeError, "s_q must be an int, got bool"),
    (dict(h_q=16.0), TypeError, "h_q must be an int, got float"),
    (dict(h_kv=3), ValueError, "h_q must be a multiple of h_kv"),
    (dict(page_size=0), ValueError, "page_size must be >= 1"),
    (dict(page_size=32.0), TypeError, "page_size must be an int"),
    (dict(seqlens=np.array([1 << 32, 5], np.int64)), ValueError,
     r"seqlens must lie in \[0,"),
    (dict(head_dim_v=-4), ValueError, "head_dim_v must be >= 1"),
    (dict(num_sms=0), ValueError, "num_sms must be >= 1"),
    (dict(scheduler="fastest"), ValueError, "scheduler must be one of"),
    (dict(cost_model={"partial_fixed_ns": 1}), TypeError,
     "cost_model must be a CostModel"),
])
def test_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    _plan(**kwargs)


def test_traced_lengths_are_refused():
  with pytest.raises(TypeError, match="plan_on_device"):
    jax.jit(lambda lens: _plan(seqlens=lens).instructions)(
        jnp.array([1, 2, 3]))


def test_accepts_numpy_and_jax_host_values():
  a = _plan(seqlens=np.array([300, 0, 5000], np.int64))
  b = _plan(seqlens=jnp.array([300, 0, 5000]))
  np.testing.assert_array_equal(a.instructions, b.instructions)


def test_pytree_round_trip():
  plan = _plan()
  leaves, treedef = jax.tree_util.tree_flatten(plan)
  assert len(leaves) == 2
  assert leaves[0] is plan.instructions and leaves[1] is plan.seqlens
  back = jax.tree_util.tree_unflatten(treedef, leaves)
  assert isinstance(back, DecodePlan)
  for field in ("s_q", "h_q", "h_kv", "page_size", "head_dim_v", "num_sms",
                "max_instructions", "num_slots", "num_counters", "scheduler",
                "predicted_makespan_ns"):
    assert getattr(back, field) == getattr(plan, field)


def test_plan_passes_through_jit():
  plan = _plan()
  traces = []

  @jax.jit
  def use(p):
    traces.append(1)
    assert isinstance(p, DecodePlan) and p.num_sms == plan.num_sms
    return isa.Fields(p.instructions).opcode.sum(), p.seqlens + 1

  total, lens = use(plan)
  assert int(total) == int(plan.instructions[..., 0].sum())
  np.testing.assert_array_equal(lens, plan.seqlens + 1)
  out = jax.jit(lambda p: p)(plan)
  np.testing.assert_array_equal(out.instructions, plan.instructions)
  assert out.predicted_makespan_ns == plan.predicted_makespan_ns
  use(plan)
  assert len(traces) == 1


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_close_lengths_share_the_compiled_function(scheduler):
  near = tuple(n + (i % 7 == 0) for i, n in enumerate(W3_LENS))
  plans = [plan_decode(lens, s_q=4, h_q=16, num_sms=132, scheduler=scheduler)
           for lens in (W3_LENS, near)]
  aux = [jax.tree_util.tree_flatten(p)[1] for p in plans]
  assert aux[0] == aux[1]
  traces = []

  @jax.jit
  def use(p):
    traces.append(1)
    return p.instructions.sum()

  for p in plans:
    use(p)
  assert len(traces) == 1


def test_capacities_are_bucketed():
  plan = _plan()
  for cap in (plan.max_instructions, plan.num_slots, plan.num_counters):
    assert cap >= 8 and cap & (cap - 1) == 0
  assert plan.instructions.shape == (20, plan.max_instructions,
                                     isa.INSTRUCTION_WORDS)


@pytest.mark.parametrize("name", ["W1", "W4"])
def test_counters_only_where_instructions_wait(name):
  w = WORKLOADS[name]
  plan = plan_decode(np.asarray(w.seqlens), s_q=w.s_q, h_q=w.h_q,
                     page_size=w.page_size, scheduler="makespan")
  rows = plan.instructions.reshape(-1, isa.INSTRUCTION_WORDS)
  f = isa.Fields(rows[rows[:, 0] != isa.OP_STOP])
  used = int(np.maximum(f.wait_counter, f.signal_counter).max()) + 1
  if used == 0:
    assert plan.num_counters == 0
  else:
    assert plan.num_counters >= max(used, 8)
  # W1 merges the pieces of its long sequence; W4's sequences are whole.
  assert (used > 0) == (name == "W1")


_CALL = dict(batch=3, s_q=2, h_q=16, h_kv=1, page_size=64, head_dim_v=512)


def test_check_compatible():
  plan = _plan()
  plan.check_compatible(**_CALL)
  for name, value in (("batch", 4), ("s_q", 1), ("h_q", 8), ("h_kv", 2),
                      ("page_size", 16), ("head_dim_v", 128)):
    with pytest.raises(ValueError, match=f"built for {name}="):
      plan.check_compatible(**dict(_CALL, **{name: value}))


@pytest.mark.parametrize("change, match", [
    (dict(num_sms=21), r"instructions must have shape"),
    (dict(max_instructions=4), r"instructions must have shape"),
    (dict(instructions=np.zeros((20, 8, isa.INSTRUCTION_WORDS - 1),
                                np.int32)), r"instructions must have shape"),
    (dict(instructions=np.zeros((20, 8, isa.INSTRUCTION_WORDS), np.int64)),
     "instructions must be int32"),
    (dict(seqlens=np.array([300, 0, 5000], np.int64)),
     "seqlens must be int32"),
    (dict(num_slots=-1), "num_slots and num_counters must be >= 0"),
])
def test_check_compatible_refuses_an_inconsistent_plan(change, match):
  plan = _plan()
  if "instructions" in change:
    change["max_instructions"] = change["instructions"].shape[1]
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(plan, **change).check_compatible(**_CALL)


@pytest.mark.parametrize("page_size", [1, 8, 17, 24, 272, 512])
def test_page_sizes_are_those_mla_decode_takes(page_size):
  with pytest.raises(ValueError, match=f"page_size must be a multiple of 16"
                     rf" in \[16, 256\], got {page_size}"):
    _plan(page_size=page_size)


@pytest.mark.parametrize("kwargs, match", [
    (dict(h_q=1 << 40), "work items"),
    (dict(s_q=1 << 40), "work items"),
    (dict(seqlens=[5] * (1 << 20), h_q=512), "work items"),
    (dict(num_sms=1 << 40), "num_sms must be <= 4096"),
])
def test_sizes_past_the_limits_raise_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _plan(**kwargs)


def test_workspace_words():
  plan = _plan()
  assert plan.workspace_words(512) == isa.workspace_words(
      plan.num_slots, plan.num_counters, 512)


def test_head_dim_prices_the_plan():
  small = _plan(head_dim_v=128)
  large = _plan(head_dim_v=512)
  assert small.predicted_makespan_ns < large.predicted_makespan_ns


def test_gantt(tmp_path):
  pytest.importorskip("matplotlib")
  w = WORKLOADS["W1"]
  plan = plan_decode(w.seqlens, s_q=w.s_q, h_q=w.h_q, num_sms=132)
  path = tmp_path / "gantt.png"
  plan.gantt(str(path))
  assert path.stat().st_size > 1000


def test_gantt_without_matplotlib(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  with pytest.raises(ImportError, match="pip install matplotlib"):
    _plan().gantt(str(tmp_path / "g.png"))


@pytest.mark.parametrize("field, value, error", [
    ("partial_fixed_ns", -1.0, ValueError),
    ("kv_token_ns", 0.0, ValueError),
    ("row_token_ns", float("nan"), ValueError),
    ("reduce_fixed_ns", float("inf"), ValueError),
    ("reduce_row_input_ns", "4", TypeError),
    ("partial_fixed_ns", True, TypeError),
])
def test_cost_model_validation(field, value, error):
  with pytest.raises(error, match=field):
    CostModel(**{field: value})


def test_cost_model_prices():
  # Explicit constants: the arithmetic, not the fitted defaults, is tested.
  cost = CostModel(partial_fixed_ns=2500.0, kv_token_ns=50.3,
                   row_token_ns=0.361, reduce_fixed_ns=1500.0,
                   reduce_row_input_ns=4.0)
  # A 64-row DeepSeek tile is memory bound: one 64-token page ~ 64 * 50.3 ns.
  assert cost.page_ns(64, 64, 512) == round(64 * 50.3)
  assert cost.page_ns(16, 64, 512) == cost.page_ns(64, 64, 512)
  # Compute bound with enough rows per token.
  heavy = dataclasses.replace(cost, row_token_ns=10.0)
  assert heavy.page_ns(64, 64, 512) == 64 * 64 * 10
  assert cost.reduce_input_ns(64, 512) == 256
  words = np.concatenate([
      isa.pack(np, np.int32, 1, opcode=isa.OP_PARTIAL, num_rows=64,
               kv_start=10, kv_end=130),
      isa.pack(np, np.int32, 1, opcode=isa.OP_REDUCE, num_rows=64,
               num_src=3)])
  np.testing.assert_array_equal(
      cost.instruction_ns(words, page_size=64, head_dim_v=512),
      [2500 + 3 * cost.page_ns(64, 64, 512), 1500 + 3 * 256])
