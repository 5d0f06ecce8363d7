"""Sharded mla_decode runs locally per shard and equals the unsharded call.

On 8 fake CPU devices, in a subprocess (XLA reads
``--xla_force_host_platform_device_count`` once, before JAX starts): batch
over a data axis, heads over a tensor axis, both; the compiled program holds
no collective at all and the outputs keep the inputs' sharding. The CUDA
path is wrapped by the same rule: its lowering for platform cuda is checked
here, its run on the GPUs where there are two or more.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

import jax_thundermla as tmla
from jax_thundermla import _op
from jax_thundermla import _sharding

from conftest import assert_decode_close, requires_gpu

B, S_Q, H_Q, D_V, PAGE, PAGES, MAX_PAGES = 8, 2, 8, 512, 16, 24, 4
D_QK = D_V + 64
SCALE = 0.1
_COLLECTIVE = re.compile(
    r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter")


def inputs(h_kv: int = 1, seed: int = 0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, S_Q, H_Q, D_QK))
  kv = rng.standard_normal((PAGES, PAGE, h_kv, D_QK))
  table = rng.integers(0, PAGES, (B, MAX_PAGES))
  lens = rng.integers(0, MAX_PAGES * PAGE + 1, B)
  table[3, 0] = PAGES + 1                  # a bad page: NaN for sequence 3
  lens[3] = 5
  return (jnp.asarray(q, jnp.bfloat16), jnp.asarray(kv, jnp.bfloat16),
          jnp.asarray(table, jnp.int32), jnp.asarray(lens, jnp.int32))


def decode(q, kv, table, lens, plan=None, backend=None):
  return tmla.mla_decode(q, kv, table, lens, softmax_scale=SCALE,
                         causal=True, plan=plan, backend=backend)


def _spec(x, ndim: int) -> tuple:
  spec = tuple(x.sharding.spec)
  return spec + (None,) * (ndim - len(spec))


def check_local(mesh, q_spec, *, h_kv: int = 1, kv_spec=P(),
                backend=None, local: bool = True) -> None:
  """Sharded == unsharded; if ``local``, no collective and the outputs keep
  the sharding."""
  args = inputs(h_kv)
  fn = jax.jit(lambda *a: decode(*a, backend=backend))
  want_out, want_lse = (np.asarray(x, np.float64) for x in fn(*args))
  b, h = q_spec[0], q_spec[2] if len(q_spec) > 2 else None
  specs = (q_spec, kv_spec, P(b), P(b))
  sharded = [jax.device_put(x, NamedSharding(mesh, s))
             for x, s in zip(args, specs)]
  out, lse = fn(*sharded)
  assert_decode_close(out, lse, want_out, want_lse, rtol=1e-3,
                      lse_atol=1e-5)
  if not local:
    return
  assert _spec(out, 4) == (b, None, h, None), (q_spec, out.sharding)
  assert _spec(lse, 3) == (b, h, None), (q_spec, lse.sharding)
  hlo = fn.lower(*sharded).compile().as_text()
  assert not _COLLECTIVE.search(hlo), _COLLECTIVE.findall(hlo)


def check_vmap_over_a_sharded_axis(mesh) -> None:
  args = inputs(seed=1)
  stacked = [jnp.stack([x, x[::-1]] * 2) for x in (args[0], args[2],
                                                   args[3])]
  fn = jax.jit(jax.vmap(decode, in_axes=(0, None, 0, 0)))
  want_out, want_lse = (np.asarray(x, np.float64)
                        for x in fn(stacked[0], args[1], *stacked[1:]))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  sharded = (put(stacked[0]), args[1], put(stacked[1]), put(stacked[2]))
  out, lse = fn(*sharded)
  assert_decode_close(out, lse, want_out, want_lse, rtol=1e-3,
                      lse_atol=1e-5)
  assert out.sharding.spec[0] == "data"
  hlo = fn.lower(*sharded).compile().as_text()
  assert not _COLLECTIVE.search(hlo), _COLLECTIVE.findall(hlo)


def check_host_plan_under_batch_sharding_raises(mesh) -> None:
  q, kv, table, lens = inputs()
  plan = tmla.plan_decode(np.asarray(lens), s_q=S_Q, h_q=H_Q,
                          page_size=PAGE)
  fn = jax.jit(lambda q, kv, t, l, p: decode(q, kv, t, l, plan=p))
  with pytest.raises(Exception, match="host DecodePlan covers the whole"):
    fn(jax.device_put(q, NamedSharding(mesh, P("data"))), kv, table, lens,
       plan)
  # Replicated inputs take the plan.
  out, _ = fn(q, kv, table, lens, plan)
  assert not np.isnan(np.asarray(out[0], np.float32)).any()


def check_scan_with_a_hoisted_plan(mesh) -> None:
  """plan=None in a scan body that closes over the lengths, traced as on a
  GPU (the plan is made once, outside the loop): with the batch and heads
  split the rule drops that plan and each shard plans its own part."""
  from jax_thundermla import _ffi  # pylint: disable=g-import-not-at-top
  saved = _ffi.gpu_available, _ffi.kernel_available
  _ffi.gpu_available = _ffi.kernel_available = lambda: True
  try:
    q, kv, table, lens = inputs(seed=4)
    caches = jnp.stack([kv, -kv])

    @jax.jit
    def step(q, caches, table, lens):
      layer = lambda c, kv: (c, decode(q, kv, table, lens))
      return jax.lax.scan(layer, 0, caches)[1]

    want_out, want_lse = (np.asarray(x, np.float64)
                          for x in step(q, caches, table, lens))
    put = lambda x, *s: jax.device_put(x, NamedSharding(mesh, P(*s)))
    sharded = (put(q, "data", None, "tp"), caches, put(table, "data"),
               put(lens, "data"))
    out, lse = step(*sharded)
    for i in range(2):
      assert_decode_close(out[i], lse[i], want_out[i], want_lse[i],
                          rtol=1e-3, lse_atol=1e-5)
    hlo = step.lower(*sharded).compile().as_text()
    assert not _COLLECTIVE.search(hlo), _COLLECTIVE.findall(hlo)
  finally:
    _ffi.gpu_available, _ffi.kernel_available = saved


def check_cuda_lowering_is_partitioned(mesh) -> None:
  args = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(
      inputs(), (P("data", None, "tp"), P(), P("data"), P("data")))]
  text = jax.jit(decode).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "CustomSPMDPartitioning" in text and "sdy.sharding_rule" in text


def check_export_of_shard_map() -> None:
  """Sharded export: mla_decode inside shard_map (manual axes) exports."""
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  fn = jax.jit(jax.shard_map(
      decode, mesh=mesh, in_specs=(P("data"), P(), P("data"), P("data")),
      out_specs=(P("data"), P("data")), check_vma=False))
  args = inputs()
  sharded = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(
      args, (P("data"), P(), P("data"), P("data")))]
  exported = jax.export.export(
      fn, platforms=("cpu", "cuda"),
      disabled_checks=tmla.export_safety_checks())(*sharded)
  assert "tmla_mla_decode" in exported.mlir_module()
  assert exported.nr_devices == 8
  out, lse = jax.export.deserialize(exported.serialize()).call(*sharded)
  want_out, want_lse = (np.asarray(x, np.float64)
                        for x in jax.jit(decode)(*args))
  assert_decode_close(out, lse, want_out, want_lse, rtol=1e-3,
                      lse_atol=1e-5)


def check_all(devices=None, backend=None) -> None:
  devices = devices if devices is not None else jax.devices()
  n = len(devices)
  auto = (jax.sharding.AxisType.Auto,)
  mesh = jax.make_mesh((n // 2, 2), ("data", "tp"), devices=devices,
                       axis_types=auto * 2)
  heads = jax.make_mesh((n,), ("tp",), devices=devices, axis_types=auto)
  explicit = jax.make_mesh((n // 2, 2), ("data", "tp"), devices=devices,
                           axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  check_local(explicit, P("data", None, "tp"), backend=backend)
  check_local(mesh, P("data"), backend=backend)
  check_local(heads, P(None, None, "tp"), backend=backend)
  check_local(mesh, P("data", None, "tp"), backend=backend)
  check_local(mesh, P("data", None, "tp"), h_kv=2,
              kv_spec=P(None, None, "tp"), backend=backend)
  if backend is None:
    # 8 shards cannot split 2 KV heads: the heads are gathered, still right.
    check_local(heads, P(None, None, "tp"), h_kv=2, local=False)
    check_vmap_over_a_sharded_axis(mesh)
    check_host_plan_under_batch_sharding_raises(mesh)
    check_scan_with_a_hoisted_plan(mesh)
    check_cuda_lowering_is_partitioned(mesh)


_SUBPROCESS = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import jax
    assert len(jax.devices()) == 8, jax.devices()
    import test_sharding as t
    t.check_all()
    t.check_export_of_shard_map()
    print("sharded == unsharded")
""")


def test_sharded_runs_locally_on_8_cpu_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=8"))
  script = _SUBPROCESS.format(tests=os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run([sys.executable, "-c", script], env=env,
                       capture_output=True, text=True, timeout=600,
                       check=False)
  assert run.returncode == 0, run.stdout + run.stderr[-5000:]
  assert "sharded == unsharded" in run.stdout


def test_partition_rule_runs_the_kernel_on_local_shapes():
  # The rule's local function, lowered for cuda: one kernel call on the
  # shard's batch and heads (a mesh of abstract devices: shapes only).
  mesh = jax.sharding.AbstractMesh((4, 2), ("data", "tp"))
  config = _op.Config(head_dim_v=D_V, softmax_scale=SCALE, causal=True,
                      cuda_impl="kernel", plan=None)
  spec = lambda shape, dtype, *s: jax.ShapeDtypeStruct(
      shape, dtype, sharding=NamedSharding(mesh, P(*s)))
  args = (spec((B, S_Q, H_Q, D_QK), jnp.bfloat16, "data", None, "tp"),
          spec((PAGES, PAGE, 1, D_QK), jnp.bfloat16),
          spec((B, MAX_PAGES), jnp.int32, "data"),
          spec((B,), jnp.int32, "data"), ())
  _, lower_fn, results, arg_shardings = _sharding.partition(
      _op.bind, config, mesh, args, None)
  assert arg_shardings[0].spec == P("data", None, "tp", None)
  assert arg_shardings[1].spec == P(None, None, None, None)
  assert results[1].spec == P("data", "tp", None)
  local = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in (
      jax.ShapeDtypeStruct((B // 4, S_Q, H_Q // 2, D_QK), jnp.bfloat16),
      args[1], jax.ShapeDtypeStruct((B // 4, MAX_PAGES), jnp.int32),
      jax.ShapeDtypeStruct((B // 4,), jnp.int32))]
  text = jax.jit(lambda *a: lower_fn(*a, ())).trace(*local).lower(
      lowering_platforms=("cuda",)).as_text()
  (call,) = re.findall(r"custom_call @tmla_mla_decode\(.*", text)
  assert f"tensor<{B // 4}x{S_Q}x{H_Q // 2}x{D_QK}xbf16>" in call


@requires_gpu
@pytest.mark.gpu
@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 or more GPUs")
def test_sharded_kernel_runs_locally_on_2_gpus():
  check_all(jax.devices()[:2], backend="cuda")
