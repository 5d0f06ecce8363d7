"""mla_decode: validate once, pick a backend, call it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_thundermla import _ffi
from jax_thundermla import _validation
from jax_thundermla import reference

BACKENDS = ("cuda", "reference")


def _kernel_unsupported(shapes: _validation.DecodeShapes) -> str | None:
  from jax_thundermla import kernel  # pylint: disable=g-import-not-at-top
  return kernel.unsupported_reason(head_dim_v=shapes.d_v, d_qk=shapes.d_qk)


def _resolve_backend(backend: str | None,
                     shapes: _validation.DecodeShapes) -> str:
  if backend is None:
    if (jax.default_backend() == "gpu" and _ffi.kernel_available()
        and _kernel_unsupported(shapes) is None):
      return "cuda"
    return "reference"
  if backend not in BACKENDS:
    raise ValueError(
        f"backend must be None or one of {BACKENDS}, got {backend!r}")
  if backend == "cuda":
    _ffi.require_kernel()
    reason = _kernel_unsupported(shapes)
    if reason is not None:
      raise ValueError(f"backend='cuda': {reason}")
  return backend


def _check_plan(plan, shapes: _validation.DecodeShapes) -> None:
  from jax_thundermla.plan import DecodePlan  # pylint: disable=g-import-not-at-top
  if not isinstance(plan, DecodePlan):
    raise TypeError(
        f"plan must be a jax_thundermla.DecodePlan (from plan_decode) or None,"
        f" got {type(plan).__name__}")
  plan.check_compatible(batch=shapes.batch, s_q=shapes.s_q, h_q=shapes.h_q,
                        h_kv=shapes.h_kv, page_size=shapes.page_size,
                        head_dim_v=shapes.d_v)


def mla_decode(
    q: jax.Array,
    kv_cache: jax.Array,
    block_table: jax.Array,
    cache_seqlens: jax.Array,
    *,
    head_dim_v: int = 512,
    softmax_scale: float | None = None,
    causal: bool = False,
    plan=None,
    backend: str | None = None,
    timing: bool = False,
) -> tuple[jax.Array, ...]:
  """Multi-head latent attention decode over a paged KV cache.

  FlashMLA-compatible semantics; works eagerly and inside ``jax.jit`` (the
  keyword arguments other than ``plan`` are static). Not differentiable.

  Args:
    q: [b, s_q, h_q, d_qk] bfloat16 or float16 queries of the s_q new tokens;
      ``d_qk = head_dim_v + 64`` (576 for DeepSeek: 512 latent + 64 rope).
    kv_cache: [num_pages, page_size, h_kv, d_qk], q's dtype. Keys are whole
      rows; values are their first ``head_dim_v`` columns. ``page_size`` is
      a multiple of 16 up to 256; ``h_q % h_kv == 0`` and query head j uses
      KV head ``j // (h_q // h_kv)``.
    block_table: int32 [b, max_pages]: the page ids of each sequence, in
      order. Any id may appear in any row (shared prefixes, permuted pools).
    cache_seqlens: int32 [b]: tokens in the cache per sequence, the s_q new
      ones included (they are the last s_q of each sequence).
    head_dim_v: value head dim (512 for DeepSeek).
    softmax_scale: factor applied to QK^T; default ``d_qk ** -0.5``. A
      normal float32, at most half of float32's largest value.
      DeepSeek models need an explicit one: ``1 / sqrt(qk_nope + qk_rope)``
      times the square of the YaRN mscale, not ``576 ** -0.5``.
    causal: bottom-right aligned causal mask: query token i (0-based) of s_q
      sees keys ``0 .. len - s_q + i``; the keys it hides never affect the
      row, whatever they hold. With s_q == 1 it changes nothing.
    plan: a ``DecodePlan`` from ``plan_decode`` built on the host for these
      lengths and reused by every layer of a step, or None to plan on the
      device inside the same jit. A plan used with lengths other than those
      it was built for gives NaN in the outputs of every sequence whose
      length differs, never a silently wrong result.
    backend: ``"cuda"`` (the megakernel; head_dim_v 512 only), ``"reference"``
      (pure JAX), or None: the kernel when JAX's default backend is a GPU,
      the kernel is built and supports the shapes, the reference otherwise.
    timing: run the kernel's timed build (``backend="cuda"`` only) and also
      return its per-instruction records: int32 ``[num_sms,
      max_instructions, 9]``, %globaltimer start / ready / computed / end of
      every instruction; ``jax_thundermla.profiling`` turns them into a
      Gantt chart, a Perfetto trace and a summary. Off by default: the
      default build carries no timing code at all.

  Returns:
    ``(out, lse)`` (and the timing records when ``timing``): out
    [b, s_q, h_q, head_dim_v] in q's dtype, and lse
    [b, h_q, s_q] float32, the natural-log sum of exponentiated scaled
    scores. A query row that sees no key gets out 0 and lse +inf. Cache
    slots past a sequence's length and pages outside its table are never
    read into the result. A sequence whose length is negative, exceeds
    ``max_pages * page_size``, or needs a page id outside
    ``[0, num_pages)`` gets NaN in all its outputs and LSEs; nothing is
    read out of bounds.

  Raises:
    TypeError: an argument has the wrong dtype or type.
    ValueError: wrong rank, mismatched or unsupported dimensions (also a
      table of more than 2**31 - 1 tokens or a cache of more pages), a
      softmax_scale out of range, unknown backend, or a plan built for other
      shapes, page size or head_dim_v.
    RuntimeError: ``backend="cuda"`` where the kernel cannot run.
  """
  shapes = _validation.validate(
      q, kv_cache, block_table, cache_seqlens, head_dim_v=head_dim_v,
      softmax_scale=softmax_scale, causal=causal)
  scale = (shapes.d_qk ** -0.5 if softmax_scale is None
           else float(softmax_scale))
  resolved = _resolve_backend(backend, shapes)
  if not isinstance(timing, bool):
    raise TypeError(f"timing must be a bool, got {timing!r}")
  if timing and resolved != "cuda":
    raise ValueError(
        f"timing=True records the CUDA kernel; the call runs backend"
        f" {resolved!r}")
  if plan is not None:
    _check_plan(plan, shapes)
  return _mla_decode_jit(q, kv_cache, block_table, cache_seqlens, plan,
                         head_dim_v=int(head_dim_v), softmax_scale=scale,
                         causal=bool(causal), backend=resolved,
                         timing=timing)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7, 8, 9))
def _mla_decode_nondiff(q, kv_cache, block_table, cache_seqlens, plan,
                        head_dim_v, softmax_scale, causal, backend, timing):
  if backend == "cuda":
    from jax_thundermla import kernel  # pylint: disable=g-import-not-at-top
    out, lse, *timings = kernel.mla_decode_cuda(
        q, kv_cache, block_table, cache_seqlens, plan,
        head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal,
        timing=timing)
  else:
    out, lse = reference.mla_decode_reference(
        q, kv_cache, block_table, cache_seqlens, head_dim_v=head_dim_v,
        softmax_scale=softmax_scale, causal=causal)
    timings = []
  if plan is not None and backend != "cuda":
    # A sequence whose length is not the one the host plan was built for
    # gets NaN (the kernel does this itself).
    stale = plan.seqlens != cache_seqlens
    out = jnp.where(stale[:, None, None, None], jnp.nan, out).astype(out.dtype)
    lse = jnp.where(stale[:, None, None], jnp.nan, lse)
  return (out, lse, *timings)


@_mla_decode_nondiff.defjvp
def _mla_decode_jvp(head_dim_v, softmax_scale, causal, backend, timing,
                    primals, tangents):
  del head_dim_v, softmax_scale, causal, backend, timing, primals, tangents
  raise TypeError(
      "jax_thundermla.mla_decode is not differentiable: it is a decode"
      " (inference) kernel. Wrap its inputs in jax.lax.stop_gradient if the"
      " surrounding computation is differentiated.")


@functools.partial(
    jax.jit, static_argnames=("head_dim_v", "softmax_scale", "causal",
                              "backend", "timing"))
def _mla_decode_jit(q, kv_cache, block_table, cache_seqlens, plan, *,
                    head_dim_v, softmax_scale, causal, backend, timing):
  return _mla_decode_nondiff(q, kv_cache, block_table, cache_seqlens, plan,
                             head_dim_v, softmax_scale, causal, backend,
                             timing)
