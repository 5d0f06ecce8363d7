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
  np.testing.assert_array_equal(back[:, 512:], x[:, 512:].astype(BF16))
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
  np.testing.assert_array_equal(
      np.asarray(jitted(x)),
      np.asarray(tmla.dequantize_kv(tmla.quantize_kv(x))))
  one = tmla.quantize_kv(x[0, 0, 0, 0])
  assert one.shape == (656,)
  np.testing.assert_array_equal(np.asarray(one),
                                np.asarray(tmla.quantize_kv(x))[0, 0, 0, 0])


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
