"""Trace-time validation of mla_decode's inputs (shapes and dtypes only)."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jax_thundermla import fp8_cache
from jax_thundermla import isa

ROPE_DIM = isa.ROPE_DIM
FP8_ENTRY_BYTES = isa.FP8_ENTRY_BYTES
MAX_PAGE_SIZE = isa.MAX_PAGE_SIZE
PAGE_SIZE_MULTIPLE = isa.PAGE_SIZE_MULTIPLE
DTYPES = (jnp.bfloat16, jnp.float16)
INDEX_DTYPE = jnp.int32
# Token positions and page ids are int32 on both backends.
INT32_MAX = (1 << 31) - 1
# softmax_scale is a float32 on the device, and the kernel folds log2(e)
# (~1.44) into it: these bounds keep both finite and normal.
MIN_SOFTMAX_SCALE = float(np.finfo(np.float32).tiny)
MAX_SOFTMAX_SCALE = float(np.finfo(np.float32).max) / 2


@dataclasses.dataclass(frozen=True)
class DecodeShapes:
  """The validated dimensions of one mla_decode call."""

  batch: int
  s_q: int
  h_q: int
  h_kv: int
  d_qk: int
  d_v: int
  num_pages: int
  page_size: int
  max_pages: int
  dtype: np.dtype
  fp8_cache: bool = False

  @property
  def group(self) -> int:
    return self.h_q // self.h_kv


def _shape(x, name: str, rank: int, layout: str) -> tuple[int, ...]:
  shape = getattr(x, "shape", None)
  if shape is None:
    raise TypeError(f"{name} must be an array {layout}, got {type(x).__name__}")
  if len(shape) != rank:
    raise ValueError(
        f"{name} must have rank {rank} {layout}, got shape {tuple(shape)}")
  return tuple(shape)


def _dtype_name(dtype) -> str:
  return np.dtype(dtype).name


def check_page_size(page_size: int, name: str) -> None:
  """Raises ValueError unless ``page_size`` is one that mla_decode takes.

  Args:
    page_size: tokens per cache page.
    name: how the caller's argument is named in the message.

  Raises:
    ValueError: not a multiple of PAGE_SIZE_MULTIPLE in
      ``[PAGE_SIZE_MULTIPLE, MAX_PAGE_SIZE]``.
  """
  if (page_size % PAGE_SIZE_MULTIPLE or page_size < PAGE_SIZE_MULTIPLE
      or page_size > MAX_PAGE_SIZE):
    raise ValueError(
        f"{name} must be a multiple of {PAGE_SIZE_MULTIPLE} in"
        f" [{PAGE_SIZE_MULTIPLE}, {MAX_PAGE_SIZE}], got {page_size}")


def _check_softmax_scale(softmax_scale) -> None:
  if isinstance(softmax_scale, bool) or not isinstance(
      softmax_scale, (int, float, np.floating, np.integer)):
    raise TypeError(
        f"softmax_scale must be a Python float or None, got"
        f" {type(softmax_scale).__name__}")
  try:
    value = float(softmax_scale)
  except OverflowError:
    value = math.inf
  if not MIN_SOFTMAX_SCALE <= value <= MAX_SOFTMAX_SCALE:
    raise ValueError(
        f"softmax_scale must be finite and in [{MIN_SOFTMAX_SCALE:.3g},"
        f" {MAX_SOFTMAX_SCALE:.3g}] (a normal float32), got {value!r} as a float")


def _check_fp8_cache(d_kv: int, d_qk: int) -> None:
  """An FP8 (uint8) cache: FlashMLA's entries, for d_qk = 576 only."""
  if d_kv != FP8_ENTRY_BYTES:
    raise ValueError(
        f"kv_cache of dtype uint8 is an FP8 cache and must be [num_pages,"
        f" page_size, h_kv, {FP8_ENTRY_BYTES}] ({FP8_ENTRY_BYTES}-byte"
        f" entries from jax_thundermla.quantize_kv), got last dim {d_kv}")
  if d_qk != fp8_cache.ENTRY_DIM:
    raise ValueError(
        f"an FP8 kv_cache holds entries of {fp8_cache.LATENT_DIM} latent +"
        f" {ROPE_DIM} rope values: q's last dim (d_qk) must be"
        f" {fp8_cache.ENTRY_DIM} (head_dim_v {fp8_cache.LATENT_DIM}), got"
        f" d_qk {d_qk}")


def validate(q, kv_cache, block_table, cache_seqlens, *, head_dim_v,
             softmax_scale, causal) -> DecodeShapes:
  """Checks every argument of mla_decode; returns the dimensions.

  Raises:
    TypeError: wrong dtype or argument type.
    ValueError: wrong rank, mismatched or unsupported dimensions.
  """
  b, s_q, h_q, d_qk = _shape(q, "q", 4, "[b, s_q, h_q, d_qk]")
  num_pages, page_size, h_kv, d_kv = _shape(
      kv_cache, "kv_cache", 4, "[num_pages, page_size, h_kv, d_qk]")
  tb, max_pages = _shape(block_table, "block_table", 2, "[b, max_pages]")
  (sb,) = _shape(cache_seqlens, "cache_seqlens", 1, "[b]")

  if q.dtype not in DTYPES:
    raise TypeError(
        f"q must be bfloat16 or float16, got {_dtype_name(q.dtype)}")
  fp8 = fp8_cache.is_fp8_cache(kv_cache)
  if not fp8 and kv_cache.dtype != q.dtype:
    got = _dtype_name(kv_cache.dtype)
    hint = (" (an array of float8 values has no scales: pass the FP8 cache"
            " itself)" if got.startswith("float8") else "")
    raise TypeError(
        f"kv_cache must have q's dtype {_dtype_name(q.dtype)}, or be uint8"
        f" [num_pages, page_size, h_kv, {FP8_ENTRY_BYTES}] (an FP8 cache"
        f" from jax_thundermla.quantize_kv), got {got}{hint}")
  for name, x in (("block_table", block_table),
                  ("cache_seqlens", cache_seqlens)):
    if x.dtype != INDEX_DTYPE:
      raise TypeError(f"{name} must be int32, got {_dtype_name(x.dtype)}")

  if isinstance(head_dim_v, bool) or not isinstance(
      head_dim_v, (int, np.integer)):
    raise TypeError(f"head_dim_v must be an int, got {head_dim_v!r}")
  if head_dim_v < 1:
    raise ValueError(f"head_dim_v must be >= 1, got {head_dim_v}")
  if d_qk != head_dim_v + ROPE_DIM:
    raise ValueError(
        f"q's last dim (d_qk) must be head_dim_v + {ROPE_DIM} ="
        f" {head_dim_v + ROPE_DIM}, got {d_qk}")
  if fp8:
    _check_fp8_cache(d_kv, d_qk)
  elif d_kv != d_qk:
    hint = (f" (a {FP8_ENTRY_BYTES}-wide cache is the FP8 format: uint8)"
            if d_kv == FP8_ENTRY_BYTES else "")
    raise ValueError(
        f"kv_cache's last dim must equal q's d_qk = {d_qk}, got {d_kv}"
        f"{hint}")
  for name, value in (("batch (q.shape[0])", b), ("s_q (q.shape[1])", s_q),
                      ("h_q (q.shape[2])", h_q),
                      ("num_pages (kv_cache.shape[0])", num_pages),
                      ("h_kv (kv_cache.shape[2])", h_kv),
                      ("max_pages (block_table.shape[1])", max_pages)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  if h_q % h_kv:
    raise ValueError(
        f"h_q (q.shape[2] = {h_q}) must be a multiple of h_kv"
        f" (kv_cache.shape[2] = {h_kv})")
  check_page_size(page_size, "kv_cache's page size (kv_cache.shape[1])")
  if num_pages > INT32_MAX:
    raise ValueError(
        f"num_pages (kv_cache.shape[0]) must be <= {INT32_MAX}: page ids"
        f" are int32, got {num_pages}")
  if max_pages * page_size > INT32_MAX:
    raise ValueError(
        f"block_table.shape[1] * page_size (the tokens a table holds) must"
        f" be <= {INT32_MAX}: token positions are int32, got"
        f" {max_pages} * {page_size} = {max_pages * page_size}")
  if tb != b:
    raise ValueError(
        f"block_table.shape[0] must equal the batch size q.shape[0] = {b},"
        f" got {tb}")
  if sb != b:
    raise ValueError(
        f"cache_seqlens.shape[0] must equal the batch size q.shape[0] = {b},"
        f" got {sb}")

  if softmax_scale is not None:
    _check_softmax_scale(softmax_scale)
  if not isinstance(causal, (bool, np.bool_)):
    raise TypeError(f"causal must be a bool, got {causal!r}")

  return DecodeShapes(batch=b, s_q=s_q, h_q=h_q, h_kv=h_kv, d_qk=d_qk,
                      d_v=head_dim_v, num_pages=num_pages,
                      page_size=page_size, max_pages=max_pages,
                      dtype=np.dtype(q.dtype), fp8_cache=fp8)
