"""The balanced on-device planner: equal to the host balanced planner, static
sizes."""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_thundermla import vm
from jax_thundermla.plan import DecodePlan
from jax_thundermla.plan import balanced
from jax_thundermla.plan import plan_decode
from jax_thundermla.plan import plan_on_device
from jax_thundermla.plan.cost import CostModel
from jax_thundermla.workloads import WORKLOADS

_STATIC = ("s_q", "h_q", "h_kv", "page_size", "max_seqlen", "num_sms")
_device_plan = jax.jit(functools.partial(plan_on_device, scheduler="balanced"),
                       static_argnames=_STATIC)


def _eager_plan(lens, **kwargs) -> DecodePlan:
  """plan_on_device op by op: the same jax.numpy code, without compiling."""
  with jax.disable_jit():
    return plan_on_device(jnp.asarray(lens, jnp.int32), scheduler="balanced",
                          **kwargs)


def _same_lists(device: DecodePlan, host: DecodePlan):
  a, b = np.asarray(device.instructions), np.asarray(host.instructions)
  width = max(a.shape[1], b.shape[1])
  pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1]), (0, 0)))
  np.testing.assert_array_equal(pad(a), pad(b))
  assert device.max_instructions >= host.max_instructions // 2
  np.testing.assert_array_equal(device.seqlens, host.seqlens)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_equals_host_balanced_on_workloads(name):
  w = WORKLOADS[name]
  host = plan_decode(w.seqlens, s_q=w.s_q, h_q=w.h_q, num_sms=132,
                     scheduler="balanced")
  device = _eager_plan(w.seqlens, s_q=w.s_q, h_q=w.h_q,
                       max_seqlen=w.max_pages() * 64, num_sms=132)
  _same_lists(device, host)
  vm.simulate(device)


def test_compiled_equals_host_balanced():
  w = WORKLOADS["W1"]
  host = plan_decode(w.seqlens, s_q=w.s_q, h_q=w.h_q, num_sms=132,
                     scheduler="balanced")
  device = _device_plan(jnp.asarray(w.seqlens, jnp.int32), s_q=w.s_q,
                        h_q=w.h_q, h_kv=1, page_size=64,
                        max_seqlen=w.max_pages() * 64, num_sms=132)
  _same_lists(device, host)


@pytest.mark.parametrize("shape", [
    dict(s_q=4, h_q=16, h_kv=1, page_size=64, num_sms=132, batch=6),
    dict(s_q=3, h_q=40, h_kv=2, page_size=16, num_sms=7, batch=3),
    dict(s_q=1, h_q=8, h_kv=1, page_size=16, num_sms=5, batch=9),
])
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(data=st.data())
def test_equals_host_balanced_on_drawn_lengths(shape, data):
  shape = dict(shape)
  batch = shape.pop("batch")
  max_seqlen = 40 * shape["page_size"]
  lens = data.draw(st.lists(st.integers(0, max_seqlen), min_size=batch,
                            max_size=batch))
  # The host prices with the longest length; equal when it fills the table.
  lens[data.draw(st.integers(0, batch - 1))] = max_seqlen
  device = _eager_plan(lens, max_seqlen=max_seqlen, **shape)
  host = plan_decode(lens, scheduler="balanced", **shape)
  _same_lists(device, host)


def test_capacity_depends_on_shapes_only():
  traces = []

  def instructions(lens):
    traces.append(1)
    return plan_on_device(lens, s_q=4, h_q=16, max_seqlen=8192,
                          num_sms=132, scheduler="balanced").instructions

  run = jax.jit(instructions)
  shapes = {run(jnp.asarray(lens, jnp.int32)).shape
            for lens in ([0] * 8, [8192] * 8, [1, 5000, 3, 0, 77, 8000, 2, 9])}
  assert len(shapes) == 1 and len(traces) == 1


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    lens=st.lists(st.one_of(st.just(0), st.integers(0, 50),
                            st.integers(10_000, 1_000_000)),
                  min_size=1, max_size=40),
    num_sms=st.integers(1, 140), rows=st.sampled_from([1, 16, 64, 200]))
def test_static_bounds_hold_for_any_lengths(lens, num_sms, rows):
  st_ = balanced.statics(batch=len(lens), s_q=1, h_q=rows, h_kv=1,
                         page_size=64, head_dim_v=512, num_sms=num_sms,
                         max_pages=1_000_000 // 64 + 1, cost=CostModel())
  _, sm, _, per_sm, slots, counters = balanced.lists(
      np, np.asarray(lens), st_, np.int64)
  assert per_sm.max() <= st_.max_per_sm
  assert slots <= st_.max_slots and counters <= st_.max_counters
  assert np.bincount(sm[sm < num_sms], minlength=num_sms).max() == (
      per_sm.max())


def test_lengths_are_clamped():
  plan = _eager_plan([-5, 10, 10_000], s_q=1, h_q=16, page_size=16,
                     max_seqlen=64, num_sms=4)
  np.testing.assert_array_equal(plan.seqlens, [0, 10, 64])
  vm.simulate(plan)


def test_device_plan_aux_data_and_jit():
  w = WORKLOADS["W1"]
  plans = [_device_plan(jnp.asarray(lens, jnp.int32), s_q=4, h_q=16, h_kv=1,
                        page_size=64, max_seqlen=w.max_pages() * 64,
                        num_sms=132)
           for lens in (w.seqlens, w.seqlens[::-1])]
  aux = [jax.tree_util.tree_flatten(p)[1] for p in plans]
  assert aux[0] == aux[1]
  assert plans[0].scheduler == "balanced"
  assert np.isnan(plans[0].predicted_makespan_ns)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_seqlen=64.0), TypeError, "max_seqlen must be a static int"),
    (dict(max_seqlen=-1), ValueError, "max_seqlen must be >= 0"),
    (dict(cache_seqlens=jnp.ones((2, 2), jnp.int32)), ValueError,
     r"cache_seqlens must have shape \[b\]"),
    (dict(cache_seqlens=jnp.ones(2)), TypeError, "integer array"),
    (dict(h_kv=5), ValueError, "multiple of h_kv"),
    (dict(max_seqlen=1 << 30, cache_seqlens=jnp.ones(4096, jnp.int32)),
     ValueError, "use plan_decode on the host"),
    (dict(page_size=8), ValueError, r"page_size must be a multiple of 16"),
    (dict(page_size=512), ValueError, r"in \[16, 256\], got 512"),
    (dict(cache_seqlens=np.array([1 << 32, 3], np.int64)), ValueError,
     "cache_seqlens must fit in int32"),
    (dict(cache_seqlens=np.array([(1 << 32) - 1], np.uint32)), ValueError,
     "cache_seqlens must fit in int32"),
    (dict(cache_seqlens=[-(1 << 40)]), ValueError,
     "cache_seqlens must fit in int32"),
    (dict(h_q=1 << 40), ValueError, "work items"),
    (dict(cache_seqlens=["1", "2"]), TypeError, "integer array, got dtype <U1"),
    (dict(cache_seqlens=[1 << 70]), TypeError, "integer array, got dtype object"),
    (dict(cache_seqlens=np.array([1.0, 2.0])), TypeError, "integer array"),
])
def test_bad_arguments(kwargs, error, match):
  args = dict(cache_seqlens=jnp.array([3, 4], jnp.int32), s_q=1, h_q=12,
              max_seqlen=64, num_sms=4)
  args.update(kwargs)
  with pytest.raises(error, match=match):
    plan_on_device(**args)


@pytest.mark.parametrize("dtype", [jnp.uint32, jnp.uint8, jnp.int16])
def test_lengths_of_other_integer_dtypes_are_clamped_not_wrapped(dtype):
  lens = jnp.asarray([jnp.iinfo(dtype).max, 10], dtype)
  plan = plan_on_device(lens, s_q=1, h_q=16, page_size=16, max_seqlen=64,
                        num_sms=4)
  np.testing.assert_array_equal(plan.seqlens, [64, 10])
