"""The FP8 latent cache: FlashMLA's 656-byte entry, quantized and read back.

A cache entry ``[c_kv | k_pe]`` of ``HEAD_DIM_V + ROPE_DIM`` (576) values is
stored in ``ENTRY_BYTES`` (656) bytes (``csrc/isa.h`` defines the layout):

* bytes ``0 .. 511``: the 512 latent values as float8_e4m3fn;
* bytes ``512 .. 527``: 4 little-endian float32 scales, scale i for latent
  values ``128 i .. 128 i + 127``; a latent value is ``fp8 * scale``;
* bytes ``528 .. 655``: the 64 rope values as bfloat16.

An FP8 cache is a uint8 array ``[num_pages, page_size, h_kv, 656]``; it
passes through ``jax.jit``, donation and sharding like any array, and
``mla_decode`` takes it in place of a bf16/fp16 cache.

Scales are the smallest power of two at least ``amax / 448`` of their 128
values (448: float8_e4m3fn's largest finite value) and at least
``2**MIN_SCALE_EXPONENT``, FlashMLA's rule, so the two quantize bf16 data to
the same bytes. A power of two makes the scaling itself exact: a value
loses only the e4m3 rounding (relative error at most 2**-4, absolute at
most ``scale * 2**-10`` for values in e4m3's subnormal range; like any
rounding to 3 mantissa bits, magnitudes within 2**-5 of float32's largest
round up to infinity).
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jax_thundermla import isa

LATENT_DIM = isa.HEAD_DIM_V
ROPE_DIM = isa.ROPE_DIM
ENTRY_DIM = LATENT_DIM + ROPE_DIM  # 576 values, unquantized
ENTRY_BYTES = isa.FP8_ENTRY_BYTES  # 656 bytes, quantized
SCALE_GROUP = isa.FP8_SCALE_GROUP
NUM_SCALES = isa.FP8_NUM_SCALES
SCALES_OFFSET = isa.FP8_SCALES_OFFSET
ROPE_OFFSET = isa.FP8_ROPE_OFFSET
# The array dtype of an FP8 cache (bytes), and the dtypes of its parts.
CACHE_DTYPE = jnp.uint8
VALUE_DTYPE = jnp.float8_e4m3fn
ROPE_STORAGE_DTYPE = jnp.bfloat16
FP8_MAX = float(jnp.finfo(VALUE_DTYPE).max)  # 448
# FlashMLA's quantizer clamps amax / 448 at 1e-4 before rounding it up to a
# power of two: scales are at least 2**-13 (an all-zero group gets 2**-13).
MIN_SCALE_EXPONENT = -13
INPUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _dtype_name(dtype) -> str:
  return np.dtype(dtype).name


def is_fp8_cache(kv_cache) -> bool:
  """Whether an array is in the FP8 cache format's dtype (uint8)."""
  return getattr(kv_cache, "dtype", None) == CACHE_DTYPE


# float32's bit fields: sign, 8 exponent bits (bias 127), 23 mantissa bits.
_F32_MANTISSA_BITS = 23
_F32_BIAS = 127
_F32_MAGNITUDE = 0x7FFFFFFF
_F32_INF = 0x7F800000  # magnitudes above it are NaN
# float8_e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; its
# subnormals are multiples of 2**-9, 0x7F is NaN, and 448 = 1.75 * 2**8.
_E4M3_MANTISSA_BITS = 3
_E4M3_BIAS = 7
_E4M3_SUBNORMAL_EXPONENT = -9
_E4M3_NAN = 0x7F
_FP8_MAX_EXPONENT = 8
_FP8_MAX_MANTISSA = 0x600000  # 448's float32 mantissa field (0.75 * 2**23)


def _float32_bits(x: jax.Array) -> jax.Array:
  """uint32: the bits of ``x``'s values as float32 (x: bfloat16, float16 or
  float32), widened by moving bit fields, so exactly and with no float
  conversion that a compiler could merge with an earlier rounding (XLA
  drops float convert chains such as float32 -> bfloat16 -> float32)."""
  if x.dtype == jnp.float32:
    return lax.bitcast_convert_type(x, jnp.uint32)
  h = lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if x.dtype == jnp.bfloat16:
    return h << 16
  # float16: sign, 5 exponent bits (bias 15), 10 mantissa bits.
  exponent, mantissa = (h >> 10) & 0x1F, h & 0x3FF
  normal = (((exponent + (_F32_BIAS - 15)) << _F32_MANTISSA_BITS)
            | (mantissa << 13))
  inf_or_nan = _F32_INF | (mantissa << 13)
  # A subnormal is mantissa * 2**-24: the float32 of an integer below 2**10
  # (exact), its exponent lowered by 24.
  subnormal = lax.bitcast_convert_type(mantissa.astype(jnp.float32),
                                       jnp.uint32)
  subnormal = jnp.where(mantissa == 0, 0,
                        subnormal - (24 << _F32_MANTISSA_BITS))
  magnitude = jnp.where(exponent == 0, subnormal,
                        jnp.where(exponent == 0x1F, inf_or_nan, normal))
  return ((h & 0x8000) << 16) | magnitude


def _round_to_bfloat16(bits: jax.Array) -> jax.Array:
  """uint16 bfloat16 bits of float32 values (uint32 ``bits``), rounded to
  nearest, ties to even (overflowing to infinity); a NaN stays a NaN of
  the same sign."""
  rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
  is_nan = (bits & _F32_MAGNITUDE) > _F32_INF
  return jnp.where(is_nan, (bits >> 16) | 0x40, rounded).astype(jnp.uint16)


def _shift_right_to_nearest_even(m: jax.Array, shift: jax.Array) -> jax.Array:
  """``m / 2**shift`` rounded to nearest, ties to even (int32, m >= 0,
  1 <= shift <= 30)."""
  q = m >> shift
  rest = m & ((1 << shift) - 1)
  half = 1 << (shift - 1)
  return q + ((rest > half) | ((rest == half) & ((q & 1) == 1)))


def _scale_exponents(amax: jax.Array) -> jax.Array:
  """int32: the smallest k >= MIN_SCALE_EXPONENT with amax <= 448 * 2**k.

  ``amax``: int32 bits of finite non-negative float32 values. With
  ``amax = (1 + f) * 2**(e - 127)`` (``e``, ``f``: its exponent and
  mantissa fields) and ``448 = 1.75 * 2**8``, ``amax <= 448 * 2**k`` iff
  ``k >= e - 135`` when ``f <= 0.75``, else ``k >= e - 134``; zero and
  subnormals get the floor.
  """
  exponent = amax >> _F32_MANTISSA_BITS
  above = ((amax & 0x7FFFFF) > _FP8_MAX_MANTISSA).astype(jnp.int32)
  k = exponent - (_F32_BIAS + _FP8_MAX_EXPONENT) + above
  return jnp.maximum(k, MIN_SCALE_EXPONENT)


def _e4m3_codes(magnitude: jax.Array, k: jax.Array) -> jax.Array:
  """int32 float8_e4m3fn codes (sign bit clear) of ``magnitude * 2**-k``,
  rounded to nearest, ties to even.

  Args:
    magnitude: int32 bits of finite non-negative float32 values, each at
      most ``448 * 2**k``.
    k: int32 scale exponents, broadcastable to ``magnitude``.

  Returns:
    int32 codes in ``[0, 0x7E]``.
  """
  exponent = magnitude >> _F32_MANTISSA_BITS
  # At least 2**-6 once scaled: a normal e4m3 value. Scaling subtracts k
  # from the exponent field; dropping 20 mantissa bits rounds it to 3, a
  # carry moving into the exponent as it should; the two formats' exponent
  # fields differ by their biases.
  min_normal = _F32_BIAS + _E4M3_SUBNORMAL_EXPONENT + _E4M3_MANTISSA_BITS
  drop = _F32_MANTISSA_BITS - _E4M3_MANTISSA_BITS
  scaled = magnitude - (k << _F32_MANTISSA_BITS)
  normal = (_shift_right_to_nearest_even(scaled, drop)
            - ((_F32_BIAS - _E4M3_BIAS) << _E4M3_MANTISSA_BITS))
  # Below 2**-6: a multiple of 2**-9, i.e. the 24-bit significand (no
  # implicit bit for float32 subnormals) shifted right; 8 such units are
  # the smallest normal value, whose code is 8 too. A shift of 25 already
  # rounds every significand to 0.
  significand = ((magnitude & 0x7FFFFF)
                 | jnp.where(exponent > 0, 1 << _F32_MANTISSA_BITS, 0))
  shift = (_F32_BIAS + _F32_MANTISSA_BITS + _E4M3_SUBNORMAL_EXPONENT + k
           - jnp.maximum(exponent, 1))
  subnormal = _shift_right_to_nearest_even(significand,
                                           jnp.clip(shift, 1, 25))
  return jnp.where(exponent - k >= min_normal, normal, subnormal)


def quantize_kv(entries: jax.Array) -> jax.Array:
  """Quantizes cache entries to the FP8 cache format (FlashMLA's).

  Pure JAX, jit-able, any leading shape. Each group of 128 latent values
  gets the smallest power-of-two scale at least its largest magnitude / 448
  (and at least ``2**-13``, as FlashMLA's quantizer; an all-zero group gets
  that); the values divided by it are rounded to float8_e4m3fn (to
  nearest, ties to even). The rope values are stored as bfloat16 (exact
  for bfloat16 input, rounded to nearest even for float16 and float32).

  All of it is integer arithmetic on the values' bits, with no
  floating-point rounding anywhere, so the bytes are the same on every
  backend, eagerly or inside any ``jax.jit``, fused with whatever
  surrounds them.

  Non-finite input never becomes a finite value: a NaN or infinite latent
  value is stored as e4m3 NaN (it reads back as NaN; e4m3fn has no
  infinity) and the group's scale comes from its finite values, so the
  rest of the group is unaffected; rope values keep NaN and infinities.

  Args:
    entries: [..., 576] bfloat16, float16 or float32 ``[c_kv | k_pe]``
      entries (512 latent values, 64 rope values).

  Returns:
    uint8 [..., 656]: the entries in FP8 cache format.

  Raises:
    TypeError: ``entries`` is not an array of one of those dtypes.
    ValueError: its last dim is not 576.
  """
  if not hasattr(entries, "dtype") or not hasattr(entries, "shape"):
    raise TypeError(
        f"entries must be an array [..., {ENTRY_DIM}], got"
        f" {type(entries).__name__}")
  if entries.dtype not in INPUT_DTYPES:
    raise TypeError(
        f"entries must be bfloat16, float16 or float32, got"
        f" {_dtype_name(entries.dtype)}")
  if entries.ndim < 1 or entries.shape[-1] != ENTRY_DIM:
    raise ValueError(
        f"entries must be [..., {ENTRY_DIM}] ({LATENT_DIM} latent + {ROPE_DIM}"
        f" rope values), got shape {tuple(entries.shape)}")
  return _quantize(jnp.asarray(entries))


@jax.jit
def _quantize(entries: jax.Array) -> jax.Array:
  lead = entries.shape[:-1]
  bits = _float32_bits(entries)
  latent = bits[..., :LATENT_DIM].reshape(*lead, NUM_SCALES, SCALE_GROUP)
  magnitude = (latent & _F32_MAGNITUDE).astype(jnp.int32)
  finite = magnitude < _F32_INF
  magnitude = jnp.where(finite, magnitude, 0)
  # Non-negative floats order as their bits do.
  k = _scale_exponents(jnp.max(magnitude, axis=-1))
  sign = ((latent >> 24) & 0x80).astype(jnp.int32)
  values = jnp.where(finite, _e4m3_codes(magnitude, k[..., None]) | sign,
                     _E4M3_NAN).astype(CACHE_DTYPE).reshape(*lead, LATENT_DIM)
  scales = ((k + _F32_BIAS) << _F32_MANTISSA_BITS).astype(jnp.uint32)
  rope = _round_to_bfloat16(bits[..., LATENT_DIM:])
  as_bytes = lambda x: lax.bitcast_convert_type(x, CACHE_DTYPE).reshape(
      *lead, -1)
  return jnp.concatenate([values, as_bytes(scales), as_bytes(rope)], axis=-1)


def split_fp8(kv_cache: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The three parts of FP8 cache entries, as their own dtypes.

  Args:
    kv_cache: uint8 [..., 656].

  Returns:
    ``(values, scales, rope)``: float8_e4m3fn [..., 512], float32 [..., 4],
    bfloat16 [..., 64].
  """
  lead = kv_cache.shape[:-1]
  from_bytes = lambda x, dtype, n: jax.lax.bitcast_convert_type(
      x.reshape(*lead, n, -1), dtype)
  values = jax.lax.bitcast_convert_type(kv_cache[..., :SCALES_OFFSET],
                                        VALUE_DTYPE)
  scales = from_bytes(kv_cache[..., SCALES_OFFSET:ROPE_OFFSET], jnp.float32,
                      NUM_SCALES)
  rope = from_bytes(kv_cache[..., ROPE_OFFSET:], ROPE_STORAGE_DTYPE, ROPE_DIM)
  return values, scales, rope


def dequantize_entries(kv_cache: jax.Array, dtype) -> jax.Array:
  """dequantize_kv without argument checks (callers have validated)."""
  lead = kv_cache.shape[:-1]
  values, scales, rope = split_fp8(kv_cache)
  values = values.astype(jnp.float32).reshape(*lead, NUM_SCALES, SCALE_GROUP)
  # A non-finite scale poisons its whole group: NaN, never inf or 0 * inf.
  scales = jnp.where(jnp.isfinite(scales), scales, jnp.nan)[..., None]
  latent = (values * scales).reshape(*lead, LATENT_DIM)
  return jnp.concatenate(
      [latent.astype(dtype), rope.astype(dtype)], axis=-1)


def dequantize_kv(kv_cache: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
  """Reads FP8 cache entries back as ``[c_kv | k_pe]`` values.

  Pure JAX, jit-able, any leading shape. Latent value j is
  ``float(fp8[j]) * scales[j // 128]``, computed in float32 (exact for the
  power-of-two scales ``quantize_kv`` writes) and then cast to ``dtype``:
  exact in bfloat16 and float32; float16 overflows to inf beyond 65504 and
  rounds below its normal range, as any cast to float16 does. A group whose
  scale is NaN or infinite reads back as NaN (all 128 values); an e4m3 NaN
  reads back as NaN.

  Each step is one correctly rounded operation (a widening conversion, a
  product, a cast), exact for the caches ``quantize_kv`` writes (but for
  float16's overflow), so the values do not depend on how a compiler fuses
  or reorders them: eager, jitted or fused with ``quantize_kv`` they agree
  bit for bit.

  Args:
    kv_cache: uint8 [..., 656] FP8 cache entries (e.g. a whole cache
      ``[num_pages, page_size, h_kv, 656]``).
    dtype: bfloat16, float16 or float32, the result's dtype.

  Returns:
    [..., 576] in ``dtype``.

  Raises:
    TypeError: ``kv_cache`` is not a uint8 array, or ``dtype`` is not one
      of those three.
    ValueError: its last dim is not 656.
  """
  if not hasattr(kv_cache, "dtype") or not hasattr(kv_cache, "shape"):
    raise TypeError(
        f"kv_cache must be a uint8 array [..., {ENTRY_BYTES}], got"
        f" {type(kv_cache).__name__}")
  if kv_cache.dtype != CACHE_DTYPE:
    raise TypeError(
        f"kv_cache must be uint8 (FP8 cache entries of {ENTRY_BYTES} bytes,"
        f" from quantize_kv), got {_dtype_name(kv_cache.dtype)}")
  if kv_cache.ndim < 1 or kv_cache.shape[-1] != ENTRY_BYTES:
    raise ValueError(
        f"kv_cache must be uint8 [..., {ENTRY_BYTES}] (FP8 cache entries),"
        f" got shape {tuple(kv_cache.shape)}")
  try:
    out_dtype = jnp.dtype(dtype)
  except TypeError:
    out_dtype = None
  if out_dtype not in INPUT_DTYPES:
    raise TypeError(
        f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
  return _dequantize(jnp.asarray(kv_cache), out_dtype)


_dequantize = jax.jit(dequantize_entries, static_argnums=1)
