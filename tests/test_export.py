"""jax.export of mla_decode: one artifact, CPU and CUDA lowerings, round trip.

Serialization needs the ``flatbuffers`` package (the ``test`` extra).
"""

from __future__ import annotations

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

import jax_thundermla as tmla
from jax_thundermla import _ffi
from jax_thundermla import vm
from jax_thundermla.plan import balanced
from jax_thundermla.plan import device_ffi
from jax_thundermla.plan import tensorize

from conftest import assert_decode_close, numpy_mla_decode, requires_gpu

pytest.importorskip("flatbuffers", reason="jax.export serialization needs it")

S_Q, H_Q, D_V, PAGE, PAGES, MAX_PAGES = 2, 16, 512, 64, 12, 3
D_QK = D_V + 64
SCALE = 0.1


def _inputs(b: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, S_Q, H_Q, D_QK))
  kv = rng.standard_normal((PAGES, PAGE, 1, D_QK))
  table = rng.integers(0, PAGES, (b, MAX_PAGES))
  lens = rng.integers(S_Q, MAX_PAGES * PAGE + 1, b)
  return (jnp.asarray(q, jnp.bfloat16), jnp.asarray(kv, jnp.bfloat16),
          jnp.asarray(table, jnp.int32), jnp.asarray(lens, jnp.int32))


def _decode(q, kv, table, lens, plan=None):
  return tmla.mla_decode(q, kv, table, lens, softmax_scale=SCALE,
                         causal=True, plan=plan)


def _want(args):
  return numpy_mla_decode(*(np.asarray(a) for a in args), head_dim_v=D_V,
                          softmax_scale=SCALE, causal=True)


def _export(fn, *specs, platforms=("cpu", "cuda")):
  return export.export(jax.jit(fn), platforms=platforms,
                       disabled_checks=tmla.export_safety_checks())(*specs)


def _round_trip(exported):
  return export.deserialize(exported.serialize())


def test_one_artifact_carries_cpu_and_cuda_lowerings():
  args = _inputs(3)
  exported = _export(_decode, *args)
  assert exported.platforms == ("cpu", "cuda")
  text = exported.mlir_module()
  assert "custom_call @tmla_mla_decode" in text   # the kernel, for cuda
  assert "stablehlo.case" in text                 # chosen by platform
  tmla.register_export_targets()                  # a no-op without a GPU
  out, lse = _round_trip(exported).call(*args)
  assert_decode_close(out, lse, *_want(args))
  direct_out, direct_lse = _decode(*args)
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(direct_out, np.float32))
  np.testing.assert_array_equal(lse, direct_lse)


def test_export_needs_the_safety_checks():
  with pytest.raises(ValueError, match="tmla_mla_decode"):
    export.export(jax.jit(_decode), platforms=("cpu", "cuda"))(*_inputs(2))
  assert {str(c) for c in tmla.export_safety_checks()} >= {
      "custom_call:tmla_mla_decode"}


def test_symbolic_batch_on_cpu():
  b, = export.symbolic_shape("b")
  _, kv, _, _ = _inputs(1)
  exported = _round_trip(_export(
      _decode, jax.ShapeDtypeStruct((b, S_Q, H_Q, D_QK), jnp.bfloat16), kv,
      jax.ShapeDtypeStruct((b, MAX_PAGES), jnp.int32),
      jax.ShapeDtypeStruct((b,), jnp.int32), platforms=("cpu",)))
  cpu = jax.devices("cpu")[0]  # The artifact has a CPU lowering only.
  for batch in (1, 5):
    args = _inputs(batch, seed=batch)
    args = jax.device_put((args[0], kv, *args[2:]), cpu)
    out, lse = exported.call(*args)
    assert out.shape == (batch, S_Q, H_Q, D_V)
    assert_decode_close(out, lse, *_want(args))


def _symbolic_specs():
  b, = export.symbolic_shape("b")
  return (jax.ShapeDtypeStruct((b, S_Q, H_Q, D_QK), jnp.bfloat16),
          jax.ShapeDtypeStruct((PAGES, PAGE, 1, D_QK), jnp.bfloat16),
          jax.ShapeDtypeStruct((b, MAX_PAGES), jnp.int32),
          jax.ShapeDtypeStruct((b,), jnp.int32))


@pytest.mark.parametrize("extension", ["built", "absent"])
def test_symbolic_batch_carries_both_lowerings(extension, monkeypatch):
  # plan=None on CUDA runs the compiled planner, whose sizes are symbolic
  # expressions; its lowering needs only the targets' names, so an artifact
  # exported where the extension is missing is the same.
  if extension == "built" and not device_ffi.available():
    pytest.skip("needs the compiled extension")
  if extension == "absent":
    monkeypatch.setattr(_ffi, "_C", None)
  exported = _round_trip(_export(
      lambda *args: _decode(*args), *_symbolic_specs()))
  assert exported.platforms == ("cpu", "cuda")
  text = exported.mlir_module()
  assert "custom_call @tmla_plan" in text
  assert "custom_call @tmla_mla_decode" in text
  assert "stablehlo.case" in text
  tmla.register_export_targets()
  for batch in (1, 5):
    args = _inputs(batch, seed=batch)
    out, lse = exported.call(*args)
    assert out.shape == (batch, S_Q, H_Q, D_V)
    assert_decode_close(out, lse, *_want(args))


def test_symbolic_batch_is_not_planned_by_the_balanced_scheduler():
  def plan(lens):
    return tmla.plan_on_device(lens, s_q=S_Q, h_q=H_Q, page_size=PAGE,
                               max_seqlen=MAX_PAGES * PAGE,
                               scheduler="balanced").instructions
  with pytest.raises(ValueError, match="needs a static batch size"):
    _export(plan, _symbolic_specs()[3], platforms=("cpu",))


@pytest.mark.skipif(not device_ffi.available(),
                    reason="needs the compiled extension")
def test_symbolic_batch_plan_runs_on_cpu():
  # The compiled planner with symbolic capacities, run by its CPU handler:
  # each batch gets at least a static batch's capacity, and the plan
  # computes attention (numpy virtual machine).
  num_sms = 8

  def plan(lens):
    return tmla.plan_on_device(lens, s_q=S_Q, h_q=H_Q, page_size=PAGE,
                               max_seqlen=MAX_PAGES * PAGE,
                               num_sms=num_sms).instructions

  exported = _round_trip(_export(plan, _symbolic_specs()[3],
                                 platforms=("cpu",)))
  for batch in (1, 3, 20):  # items below, near and above num_sms
    args = _inputs(batch, seed=batch)
    instructions = np.asarray(exported.call(args[3]))
    static_cap = device_ffi.capacities(batch, S_Q, H_Q, 1, num_sms)[0]
    per_sm = 4 + (balanced.ALPHA + 1) * batch // num_sms
    assert instructions.shape[:2] == (
        num_sms, max(tensorize.MIN_CAPACITY, 2 * per_sm - 2))
    assert instructions.shape[1] >= static_cap
    got = vm.execute(instructions, *(np.asarray(a) for a in args),
                     head_dim_v=D_V, softmax_scale=SCALE, causal=True)
    assert_decode_close(got.out, got.lse, *_want(args))


@pytest.mark.skipif(not device_ffi.available(),
                    reason="needs the compiled extension")
def test_symbolic_scratch_bound_covers_the_planner():
  for num_sms in (1, 2, 7, 66, 132, 256):
    for items in [*range(1, 300), 1000, 4097, 1 << 16]:
      exact = _ffi.planner_scratch_bytes(items, num_sms)
      bound = device_ffi.scratch_bytes_bound(items, num_sms)
      assert exact <= bound <= exact + 8 * items, (items, num_sms)


def test_host_plan_is_an_exportable_argument():
  args = _inputs(4, seed=1)
  plan = tmla.plan_decode(np.asarray(args[3]), s_q=S_Q, h_q=H_Q,
                          page_size=PAGE)
  exported = _round_trip(_export(_decode, *args, plan))
  assert "custom_call @tmla_mla_decode" in exported.mlir_module()
  out, lse = exported.call(*args, plan)
  assert_decode_close(out, lse, *_want(args))
  # Another plan of the same capacities is a valid argument; used with
  # lengths it was not built for it poisons those sequences, as direct calls.
  other = tmla.plan_decode(np.asarray(args[3]) - 1, s_q=S_Q, h_q=H_Q,
                           page_size=PAGE)
  assert other.max_instructions == plan.max_instructions
  out, lse = exported.call(*args, other)
  assert np.isnan(np.asarray(lse)).all()


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("with_plan", [False, True])
def test_round_trip_on_gpu(with_plan):
  args = _inputs(3, seed=2)
  extra = ()
  if with_plan:
    extra = (tmla.plan_decode(np.asarray(args[3]), s_q=S_Q, h_q=H_Q,
                              page_size=PAGE),)
  exported = _round_trip(_export(_decode, *args, *extra))
  assert "tmla_mla_decode" in tmla.register_export_targets()
  out, lse = exported.call(*args, *extra)
  assert_decode_close(out, lse, *_want(args))
  direct_out, _ = _decode(*args, *extra)
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(direct_out, np.float32))


@requires_gpu
@pytest.mark.gpu
def test_symbolic_batch_round_trip_on_gpu():
  exported = _round_trip(_export(_decode, *_symbolic_specs()))
  assert "tmla_plan" in tmla.register_export_targets()
  for batch in (3, 37):
    args = _inputs(batch, seed=batch)
    out, lse = exported.call(*args)
    assert out.shape == (batch, S_Q, H_Q, D_V)
    assert_decode_close(out, lse, *_want(args))
