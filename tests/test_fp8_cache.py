"""quantize_kv / dequantize_kv: FlashMLA's FP8 entry, bytes and values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_thundermla as tmla
from jax_thundermla import fp8_cache

E4M3 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16
# The e4m3 magnitudes in (224, 448]: a group whose largest value is one of
# these, times 2**k, is given the scale 2**k.
TOP_E4M3 = np.array([240, 256, 288, 320, 352, 384, 416, 448], np.float32)


def flashmla_quantize(x: np.ndarray) -> np.ndarray:
  """FlashMLA's quantizer (tests/quant.py, V32_FP8Sparse) in numpy float32:
  scale = 2 ** ceil(log2(max(amax / 448, 1e-4))), values cast to e4m3, rope
  kept as bf16."""
  lead = x.shape[:-1]
  latent = x[..., :512].astype(np.float32).reshape(*lead, 4, 128)
  amax = np.abs(latent).max(axis=-1)
  inv = np.maximum(amax / np.float32(448.0), np.float32(1e-4))
  scale = np.power(np.float32(2), np.ceil(np.log2(inv))).astype(np.float32)
  values = (latent / scale[..., None]).astype(E4M3).reshape(*lead, 512)
  return np.concatenate(
      [values.view(np.uint8), scale.astype("<f4").view(np.uint8),
       x[..., 512:].astype(BF16).view(np.uint8)], axis=-1)


def parts(cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """numpy: (e4m3 values [..., 512], float32 scales [..., 4], bf16 rope)."""
  cache = np.asarray(cache)
  return (cache[..., :512].view(E4M3),
          np.ascontiguousarray(cache[..., 512:528]).view("<f4"),
          np.ascontiguousarray(cache[..., 528:]).view(BF16))


def assert_same_values(actual, desired) -> None:
  """NaN exactly where ``desired`` has NaN, the same bits elsewhere (signed
  zeros included); compared as float32, never by NaN bits, which differ
  between backends and between fused and unfused code."""
  actual = np.asarray(actual, np.float32)
  desired = np.asarray(desired, np.float32)
  assert actual.shape == desired.shape, (actual.shape, desired.shape)
  nan = np.isnan(desired)
  np.testing.assert_array_equal(np.isnan(actual), nan)
  np.testing.assert_array_equal(actual[~nan].view(np.uint32),
                                desired[~nan].view(np.uint32))


def random_entries(rng, shape, dtype=BF16) -> np.ndarray:
  """Normal values, each 128-group and the rope at its own magnitude
  (2**-20 .. 2**20), a few groups all zero."""
  x = rng.standard_normal((*shape, 576))
  mags = 2.0 ** rng.integers(-20, 21, (*shape, 5))
  mags[rng.random(mags.shape) < 0.05] = 0.0
  x *= np.repeat(mags, [128, 128, 128, 128, 64], axis=-1)
  return x.astype(dtype)


def test_layout_constants_come_from_the_isa():
  assert (fp8_cache.ENTRY_DIM, fp8_cache.ENTRY_BYTES) == (576, 656)
  assert (fp8_cache.SCALES_OFFSET, fp8_cache.ROPE_OFFSET) == (512, 528)
  assert fp8_cache.FP8_MAX == 448.0
  assert tmla.quantize_kv is fp8_cache.quantize_kv
  assert tmla.dequantize_kv is fp8_cache.dequantize_kv


def test_bytes_equal_flashmlas_quantizer_for_bf16():
  x = random_entries(np.random.default_rng(0), (3, 16, 1))
  got = np.asarray(tmla.quantize_kv(jnp.asarray(x)))
  assert got.dtype == np.uint8 and got.shape == (3, 16, 1, 656)
  np.testing.assert_array_equal(got, flashmla_quantize(x))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_bytes_for_float16_and_float32_input(dtype):
  """Same rule; the smallest power-of-two scale, exactly."""
  rng = np.random.default_rng(1)
  x = random_entries(rng, (40,), np.float64)
  if dtype == np.float16:
    x = np.clip(x, -6e4, 6e4)
  x = x.astype(dtype)
  got = np.asarray(tmla.quantize_kv(jnp.asarray(x)))
  values, scales, rope = parts(got)
  amax = np.abs(x[:, :512].astype(np.float64)).reshape(40, 4, 128).max(-1)
  # The smallest power of two >= amax / 448 and >= 2**-13.
  assert (amax <= 448.0 * scales).all()
  assert ((scales == 2.0 ** -13) | (amax > 224.0 * scales)).all()
  assert (np.log2(scales) == np.round(np.log2(scales))).all()
  want = (x[:, :512].astype(np.float64).reshape(40, 4, 128)
          / scales[..., None]).astype(np.float32).astype(E4M3)
  np.testing.assert_array_equal(values.view(np.uint8),
                                want.reshape(40, 512).view(np.uint8))
  np.testing.assert_array_equal(rope.view(np.uint16),
                                x[:, 512:].astype(BF16).view(np.uint16))


def representable_entries(rng, n: int, exponents) -> np.ndarray:
  """Entries whose every group is e4m3 values (no NaN) times 2**k with the
  group's largest magnitude in (224, 448], so the quantizer picks 2**k and
  the round trip must be exact; rope values are any bf16."""
  codes = rng.integers(0, 256, (n, 4, 128)).astype(np.uint8)
  codes[(codes & 0x7F) == 0x7F] = 0x3C  # NaN codes -> 1.5
  v = codes.view(E4M3).astype(np.float32)
  v[..., 0] = rng.choice(TOP_E4M3, (n, 4)) * rng.choice([-1, 1], (n, 4))
  k = rng.choice(exponents, (n, 4, 1))
  latent = (v * 2.0 ** k).reshape(n, 512)
  rope = rng.standard_normal((n, 64)).astype(BF16).astype(np.float32)
  return np.concatenate([latent, rope], -1), v, 2.0 ** k[..., 0]


@pytest.mark.parametrize("dtype,exponents", [
    (jnp.bfloat16, np.arange(-13, 110)), (jnp.float32, np.arange(-13, 110)),
    (jnp.float16, np.arange(-5, 8))])
def test_round_trip_is_bit_exact_for_representable_values(dtype, exponents):
  rng = np.random.default_rng(2)
  x, v, scale = representable_entries(rng, 64, exponents)
  x = jnp.asarray(x, dtype)
  cache = tmla.quantize_kv(x)
  values, scales, _ = parts(cache)
  np.testing.assert_array_equal(scales, scale)
  np.testing.assert_array_equal(values.astype(np.float32).reshape(v.shape), v)
  back = tmla.dequantize_kv(cache, dtype)
  assert back.dtype == dtype and back.shape == x.shape
  np.testing.assert_array_equal(np.asarray(back).view(np.uint8),
                                np.asarray(x).view(np.uint8))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_error_bound_on_random_data(dtype):
  """|dequant - x| <= max(|x| 2**-4, scale 2**-10): e4m3's rounding of
  normal and of subnormal values; the rope part is exact in bf16."""
  x = random_entries(np.random.default_rng(3), (8, 16))
  x = jnp.asarray(x, dtype)
  cache = tmla.quantize_kv(x)
  back = np.asarray(tmla.dequantize_kv(cache, jnp.float32), np.float64)
  x64 = np.asarray(x, np.float64)
  _, scales, _ = parts(cache)
  bound = np.maximum(np.abs(x64[..., :512]) * 2.0 ** -4,
                     np.repeat(scales, 128, axis=-1) * 2.0 ** -10)
  err = np.abs(back[..., :512] - x64[..., :512])
  assert (err <= bound).all()
  assert err.max() > 0  # data that needs rounding
  rope_err = np.abs(back[..., 512:] - x64[..., 512:])
  assert (rope_err <= np.abs(x64[..., 512:]) * 2.0 ** -8).all()
  if dtype == jnp.bfloat16:
    assert (rope_err == 0).all()


def test_all_zero_groups_get_a_finite_scale():
  cache = tmla.quantize_kv(jnp.zeros((2, 576), jnp.bfloat16))
  values, scales, rope = parts(cache)
  np.testing.assert_array_equal(scales, 2.0 ** -13)
  assert (values.astype(np.float32) == 0).all() and (rope == 0).all()
  back = tmla.dequantize_kv(cache, jnp.float32)
  assert (np.asarray(back) == 0).all()


def test_non_finite_inputs_read_back_as_nan_and_spare_their_group():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((3, 576)).astype(np.float32)
  x[0, 5], x[1, 130], x[2, 511] = np.nan, np.inf, -np.inf
  x[0, 520], x[1, 560] = np.nan, -np.inf
  cache = tmla.quantize_kv(jnp.asarray(x))
  back = np.asarray(tmla.dequantize_kv(cache, jnp.float32))
  latent_bad = ~np.isfinite(x[:, :512])
  assert np.isnan(back[:, :512][latent_bad]).all()
  assert np.isfinite(back[:, :512][~latent_bad]).all()
  assert_same_values(back[:, 512:], x[:, 512:].astype(BF16))
  # The other values of a group are quantized as if the bad one were 0.
  clean = np.where(latent_bad, 0.0, x[:, :512])
  want = np.asarray(tmla.dequantize_kv(tmla.quantize_kv(jnp.asarray(
      np.concatenate([clean, x[:, 512:]], -1))), jnp.float32))
  np.testing.assert_array_equal(back[:, :512][~latent_bad],
                                want[:, :512][~latent_bad])


@pytest.mark.parametrize("bad_scale", [np.nan, np.inf, -np.inf])
def test_non_finite_scales_read_back_as_nan_groups(bad_scale):
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 576)),
                  jnp.bfloat16)
  cache = np.array(tmla.quantize_kv(x))
  cache[1, 512 + 4 * 2:512 + 4 * 3] = np.array([bad_scale], "<f4").view(
      np.uint8)
  back = np.asarray(tmla.dequantize_kv(jnp.asarray(cache), jnp.float32))
  assert np.isnan(back[1, 256:384]).all()
  assert np.isfinite(back[1, :256]).all() and np.isfinite(back[1, 384:]).all()
  assert np.isfinite(back[0]).all()


def test_jit_and_leading_shapes():
  x = jnp.asarray(random_entries(np.random.default_rng(6), (2, 3, 1, 1)))
  jitted = jax.jit(lambda e: tmla.dequantize_kv(tmla.quantize_kv(e)))
  assert_same_values(jitted(x), tmla.dequantize_kv(tmla.quantize_kv(x)))
  one = tmla.quantize_kv(x[0, 0, 0, 0])
  assert one.shape == (656,)
  np.testing.assert_array_equal(np.asarray(one),
                                np.asarray(tmla.quantize_kv(x))[0, 0, 0, 0])


def hard_entries(dtype) -> np.ndarray:
  """[8, 576] entries at the edges of the rounding: in group 0, 448 * 2**k
  (so the scale is 2**k) and every tie between e4m3 neighbours times
  2**k, with random signs; in group 1, multiples of the dtype's smallest
  subnormal; in group 2, NaN and infinities among normal values; group 3
  and the rope random."""
  rng = np.random.default_rng(7)
  x = random_entries(rng, (8,), np.float64)
  x = np.clip(x, -6e4, 6e4)  # float16's range
  e4m3 = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float64)
  steps = np.unique(e4m3[np.isfinite(e4m3) & (e4m3 >= 0)])  # 0 .. 448
  ties = (steps[1:] + steps[:-1]) / 2
  for i, k in enumerate([-13, -8, -3, 0, 1, 2, 5, 7]):  # float16 holds all
    signs = rng.choice([-1.0, 1.0], ties.size)
    x[i, :128] = np.concatenate([[448.0], ties * signs, [0.0]]) * 2.0 ** k
  tiny = float(ml_dtypes.finfo(dtype).smallest_subnormal)
  x[:, 128:256] = rng.integers(-300, 301, (8, 128)) * tiny
  x[:, 260], x[::2, 300], x[1::2, 301] = np.nan, np.inf, -np.inf
  return x.astype(dtype)


@pytest.mark.parametrize("dtype", [BF16, np.float16, np.float32])
def test_ties_subnormals_and_non_finite_values(dtype):
  """Ties go to the even e4m3 value, subnormal input is read exactly (and
  rounds to e4m3 subnormals or signed zeros), as numpy's float32 ->
  float8_e4m3fn cast does; non-finite values become NaN."""
  x = hard_entries(dtype)
  values, scales, rope = parts(tmla.quantize_kv(jnp.asarray(x)))
  latent = x[:, :512].astype(np.float64).reshape(8, 4, 128)
  finite = np.isfinite(latent)
  amax = np.where(finite, np.abs(latent), 0.0).max(-1)
  with np.errstate(divide="ignore"):
    exponents = np.maximum(np.ceil(np.log2(amax / 448.0)), -13)
  np.testing.assert_array_equal(scales, 2.0 ** exponents)
  assert (scales[:, 0] == 2.0 ** np.array([-13, -8, -3, 0, 1, 2, 5, 7])).all()
  want = (np.where(finite, latent, 0.0) / scales[..., None]).astype(
      np.float32).astype(E4M3).reshape(8, 512)
  finite = finite.reshape(8, 512)
  np.testing.assert_array_equal(np.isnan(values.astype(np.float32)),
                                ~finite)
  np.testing.assert_array_equal(values.view(np.uint8)[finite],
                                want.view(np.uint8)[finite])
  assert_same_values(rope, x[:, 512:].astype(BF16))


def float_equations(fn, *args) -> list[tuple[str, tuple, tuple]]:
  """(primitive, input dtypes, output dtypes) of each equation of ``fn``'s
  jaxpr, nested jaxprs included, that takes or makes a floating-point
  value."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      inner = [p for v in eqn.params.values()
               for p in (v if isinstance(v, (tuple, list)) else (v,))
               if isinstance(p, (jax.extend.core.ClosedJaxpr,
                                 jax.extend.core.Jaxpr))]
      for p in inner:
        walk(getattr(p, "jaxpr", p))
      ins = tuple(np.dtype(v.aval.dtype) for v in eqn.invars)
      outs = tuple(np.dtype(v.aval.dtype) for v in eqn.outvars)
      if not inner and any(jnp.issubdtype(d, jnp.floating)
                           for d in ins + outs):
        found.append((eqn.primitive.name, ins, outs))

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_quantize_does_no_float_arithmetic(dtype):
  """quantize_kv reads its input's bits and works on integers only.
  Compilers fuse, reorder, contract and (XLA's excess-precision rule,
  e.g. its GPU compiler dropping float32 -> e4m3 -> float32 convert
  chains) skip float roundings, so float math could give other bytes
  fused than unfused; integer math they compute as written."""
  eqns = float_equations(tmla.quantize_kv, jnp.zeros((2, 576), dtype))
  assert eqns
  for name, ins, outs in eqns:
    # The input's bits, and (float16 subnormals) the exact float32 of an
    # integer below 2**10.
    assert (name == "bitcast_convert_type"
            or (name == "convert_element_type"
                and not jnp.issubdtype(ins[0], jnp.floating))), (
                    name, ins, outs)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dequantize_rounds_once(dtype):
  """dequantize_kv: exact widenings, one product (exact for power-of-two
  scales), one cast to ``dtype``; nothing whose result a compiler's
  rewrites (reciprocals, contractions, dropped convert chains) could
  change."""
  exact = {(np.dtype(E4M3), np.dtype(np.float32)),
           (np.dtype(BF16), np.dtype(np.float32)),
           (np.dtype(np.float32), np.dtype(np.float32))}
  moves = {"bitcast_convert_type", "broadcast_in_dim", "concatenate",
           "reshape", "slice", "squeeze", "select_n", "is_finite"}
  eqns = float_equations(lambda c: tmla.dequantize_kv(c, dtype),
                         jnp.zeros((2, 656), jnp.uint8))
  assert [name for name, _, _ in eqns].count("mul") == 1
  for name, ins, outs in eqns:
    if name == "convert_element_type":
      assert (ins[0], outs[0]) in exact or outs[0] == np.dtype(dtype), (
          ins, outs)
    else:
      assert name in moves | {"mul"}, (name, ins, outs)


@pytest.mark.parametrize("dtype", [BF16, np.float16, np.float32])
def test_fused_and_unfused_agree(dtype):
  """The same bytes and values op by op (jax.disable_jit: nothing fused),
  jitted, fused with a cast before and a read after, or kept apart by an
  optimization barrier."""
  x = hard_entries(dtype)
  with jax.disable_jit():
    unfused = np.asarray(tmla.quantize_kv(jnp.asarray(x)))
    read = {out: np.asarray(tmla.dequantize_kv(jnp.asarray(unfused), out))
            for out in (jnp.bfloat16, jnp.float16, jnp.float32)}
  for quantize in (tmla.quantize_kv, jax.jit(tmla.quantize_kv)):
    np.testing.assert_array_equal(np.asarray(quantize(jnp.asarray(x))),
                                  unfused)
  # A cast to the input dtype inside the same jit: its rounding stays.
  source = np.random.default_rng(8).standard_normal((8, 576)).astype(
      np.float32)
  with jax.disable_jit():
    want = np.asarray(tmla.quantize_kv(jnp.asarray(source).astype(dtype)))
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda s: tmla.quantize_kv(s.astype(dtype)))(
          jnp.asarray(source))), want)
  for out, want in read.items():
    fused = jax.jit(lambda e, out=out: tmla.dequantize_kv(
        tmla.quantize_kv(e), out))
    apart = jax.jit(lambda e, out=out: tmla.dequantize_kv(
        jax.lax.optimization_barrier(tmla.quantize_kv(e)), out))
    for fn in (fused, apart):
      got = fn(jnp.asarray(x))
      assert got.dtype == out
      assert_same_values(got, want)
    assert_same_values(tmla.dequantize_kv(jnp.asarray(unfused), out), want)


@pytest.mark.parametrize("call,error,words", [
    (lambda: tmla.quantize_kv(jnp.ones((4, 512), jnp.bfloat16)), ValueError,
     ["entries", "576", "(4, 512)"]),
    (lambda: tmla.quantize_kv(jnp.ones((4, 576), jnp.int32)), TypeError,
     ["entries", "bfloat16", "int32"]),
    (lambda: tmla.quantize_kv([1.0] * 576), TypeError, ["entries", "list"]),
    (lambda: tmla.dequantize_kv(jnp.ones((4, 576), jnp.bfloat16)), TypeError,
     ["kv_cache", "uint8", "bfloat16"]),
    (lambda: tmla.dequantize_kv(jnp.ones((4, 576), jnp.uint8)), ValueError,
     ["kv_cache", "656", "(4, 576)"]),
    (lambda: tmla.dequantize_kv(jnp.ones((4, 656), jnp.float8_e4m3fn)),
     TypeError, ["kv_cache", "uint8", "float8_e4m3fn"]),
    (lambda: tmla.dequantize_kv(jnp.ones((4, 656), jnp.uint8), jnp.int8),
     TypeError, ["dtype", "bfloat16"]),
])
def test_bad_input_is_named(call, error, words):
  with pytest.raises(error) as e:
    call()
  for word in words:
    assert word in str(e.value)
