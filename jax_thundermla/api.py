"""mla_decode: validate once, pick a backend, call it."""

from __future__ import annotations

import functools

import jax

from jax_thundermla import _ffi
from jax_thundermla import _op
from jax_thundermla import _validation

BACKENDS = ("cuda", "reference")


def _kernel_unsupported(shapes: _validation.DecodeShapes) -> str | None:
  from jax_thundermla import kernel  # pylint: disable=g-import-not-at-top
  return kernel.unsupported_reason(head_dim_v=shapes.d_v, d_qk=shapes.d_qk,
                                  fp8=shapes.fp8_cache, q_dtype=shapes.dtype)


def _resolve_backend(backend: str | None,
                     shapes: _validation.DecodeShapes) -> str:
  """What the platform ``cuda`` runs: one of ``_op.CUDA_IMPLS``.

  Other platforms always run the reference.
  """
  if backend is None:
    _ffi.warn_about_install()
    return _op.cuda_impl_for(
        _kernel_unsupported(shapes),
        gpu_without_kernel=_ffi.gpu_available() and not _ffi.kernel_available())
  if backend not in BACKENDS:
    raise ValueError(
        f"backend must be None or one of {BACKENDS}, got {backend!r}")
  if backend == "cuda":
    reason = _kernel_unsupported(shapes)
    if shapes.fp8_cache and reason is not None:
      # No build of the kernel takes it: said before asking for a GPU.
      raise ValueError(f"backend='cuda': {reason}")
    _ffi.require_kernel()
    if reason is not None:
      raise ValueError(f"backend='cuda': {reason}")
    return "kernel"
  return "reference"


def _check_plan(plan, shapes: _validation.DecodeShapes) -> None:
  from jax_thundermla.plan import DecodePlan  # pylint: disable=g-import-not-at-top
  if not isinstance(plan, DecodePlan):
    raise TypeError(
        f"plan must be a jax_thundermla.DecodePlan (from plan_decode) or None,"
        f" got {type(plan).__name__}")
  plan.check_compatible(batch=shapes.batch, s_q=shapes.s_q, h_q=shapes.h_q,
                        h_kv=shapes.h_kv, page_size=shapes.page_size,
                        head_dim_v=shapes.d_v)


def _enclosing_trace(x):
  """The trace outside the current loop body that made ``x``, or None.

  A value that a ``lax.scan`` (``while_loop``, ``cond``, nested ``jit``) body
  closes over is a tracer of the trace around the body. Work that depends on
  it alone can be staged there, once, rather than in the body, where XLA's
  GPU pipeline leaves it (it runs no loop-invariant code motion). This reads
  JAX's trace context (``jax._src.core``); None where that is not available,
  where ``x`` belongs to the current trace, or where either trace is not a
  staging (jit/scan) trace.
  """
  try:
    from jax._src import core  # pylint: disable=g-import-not-at-top
    from jax._src.interpreters import partial_eval as pe  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  staging = getattr(pe, "DynamicJaxprTrace", None)
  current = getattr(getattr(core, "trace_ctx", None), "trace", None)
  trace = getattr(x, "_trace", None)
  if (staging is None or not hasattr(core, "set_current_trace")
      or trace is None or trace is current
      or not isinstance(trace, staging) or not isinstance(current, staging)):
    return None
  is_valid = getattr(trace, "is_valid", None)
  return trace if is_valid is None or is_valid() else None


def _hoisted_plan(cache_seqlens, shapes: _validation.DecodeShapes):
  """The device plan of ``plan=None``, built outside the loop body.

  Under ``lax.scan`` over layers with the lengths closed over, every layer
  would plan again: planning in the trace that made the lengths builds one
  plan for all of them. None when the lengths belong to the current trace
  (XLA merges the identical planning of separate calls itself).
  """
  trace = _enclosing_trace(cache_seqlens)
  if trace is None:
    return None
  from jax._src import core  # pylint: disable=g-import-not-at-top
  with core.set_current_trace(trace):
    return _op.hoisted_plan(
        cache_seqlens, s_q=shapes.s_q, h_q=shapes.h_q, h_kv=shapes.h_kv,
        page_size=shapes.page_size, max_pages=shapes.max_pages,
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
  ``jax.vmap`` maps any of the four arrays (one call over all mapped
  problems with ``plan=None``, a loop with a host plan); under ``jax.jit``
  with inputs split over the batch or the query heads each shard computes
  its own part, with no collective (a host plan cannot be split: it raises
  there); ``jax.export`` takes it with ``export_safety_checks()``.

  Args:
    q: [b, s_q, h_q, d_qk] bfloat16 or float16 queries of the s_q new tokens;
      ``d_qk = head_dim_v + 64`` (576 for DeepSeek: 512 latent + 64 rope).
    kv_cache: [num_pages, page_size, h_kv, d_qk], q's dtype. Keys are whole
      rows; values are their first ``head_dim_v`` columns. ``page_size`` is
      a multiple of 16 up to 256; ``h_q % h_kv == 0`` and query head j uses
      KV head ``j // (h_q // h_kv)``. Or an FP8 cache: uint8
      [num_pages, page_size, h_kv, 656] (FlashMLA's layout, from
      ``quantize_kv``; d_qk 576 only), read as ``dequantize_kv`` reads it
      (in float32) and then attended with the same math as a bf16 cache: a
      NaN or infinite scale makes its entry a NaN key (NaN rows for the
      query rows that see it). The CUDA kernel takes it with bfloat16 q
      (it dequantizes each block to bfloat16, which is exact for the
      power-of-two scales ``quantize_kv`` writes); with float16 q
      ``backend=None`` runs the reference and ``backend="cuda"`` raises.
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
    plan: a ``DecodePlan`` from ``plan_decode`` (host) or
      ``plan_on_device`` (inside jit) for these lengths, reused by every
      layer of a step, or None to plan on the device inside the same jit
      (one small planning kernel; XLA merges those of calls with the same
      lengths, and a ``lax.scan`` body that closes over ``cache_seqlens``
      plans once, outside the loop, not once per layer). A plan used
      with lengths other than those
      it was built for gives NaN in the outputs of every sequence whose
      length differs, never a silently wrong result.
    backend: ``"cuda"`` (the megakernel; head_dim_v 512 only; needs a GPU
      in this process), ``"reference"`` (pure JAX everywhere), or None: the
      reference on every platform but ``cuda``, where the kernel runs when
      it takes the shapes (the reference in a process that sees a GPU but
      has no kernel built; the first call then warns). The platform is
      chosen when the program is lowered, so ``jax.export`` with
      ``platforms=("cpu", "cuda")`` carries both, from any machine.
    timing: run the kernel's timed build (``backend="cuda"`` only) and also
      return its per-instruction records: int32 ``[num_sms,
      max_instructions, 9]``, %globaltimer start / ready / computed / end of
      every instruction; ``jax_thundermla.profiling`` turns them into a
      Gantt chart, a Perfetto trace and a summary. Off by default: the
      default build carries no timing code at all. The timed call is the
      kernel alone, without the batching and partitioning rules.

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
      table of more than 2**31 - 1 tokens or a cache of more pages, or an
      FP8 cache not 656 wide or with d_qk other than 576), a softmax_scale
      out of range, unknown backend (or ``"cuda"`` with an FP8 cache and
      q not bfloat16), or a plan built for other shapes, page size or
      head_dim_v.
    RuntimeError: ``backend="cuda"`` where the kernel cannot run.
  """
  shapes = _validation.validate(
      q, kv_cache, block_table, cache_seqlens, head_dim_v=head_dim_v,
      softmax_scale=softmax_scale, causal=causal)
  scale = (shapes.d_qk ** -0.5 if softmax_scale is None
           else float(softmax_scale))
  cuda_impl = _resolve_backend(backend, shapes)
  if not isinstance(timing, bool):
    raise TypeError(f"timing must be a bool, got {timing!r}")
  if timing and not (cuda_impl == "kernel" and _ffi.gpu_available()):
    raise ValueError(
        "timing=True records the CUDA kernel; this call does not run it"
        " (pass backend='cuda' on a GPU)")
  if plan is not None:
    _check_plan(plan, shapes)
  if timing:
    return _mla_decode_timed(q, kv_cache, block_table, cache_seqlens, plan,
                             head_dim_v=int(head_dim_v), softmax_scale=scale,
                             causal=bool(causal))
  hoisted = False
  if plan is None and cuda_impl == "kernel" and _ffi.gpu_available():
    plan = _hoisted_plan(cache_seqlens, shapes)
    hoisted = plan is not None
  config = _op.Config(
      head_dim_v=int(head_dim_v), softmax_scale=scale, causal=bool(causal),
      cuda_impl=cuda_impl,
      plan=None if plan is None else _op.plan_meta(plan), hoisted=hoisted)
  return _mla_decode_jit(q, kv_cache, block_table, cache_seqlens,
                         _op.plan_leaves(plan), config=config)


@functools.partial(jax.jit, static_argnames=("config",))
def _mla_decode_jit(q, kv_cache, block_table, cache_seqlens, plan_leaves, *,
                    config):
  return _op.operation(config)(q, kv_cache, block_table, cache_seqlens,
                               plan_leaves)


@functools.partial(
    jax.jit, static_argnames=("head_dim_v", "softmax_scale", "causal"))
def _mla_decode_timed(q, kv_cache, block_table, cache_seqlens, plan, *,
                      head_dim_v, softmax_scale, causal):
  # The timed build: the kernel called directly, with no transformation
  # rules (it is a profiling tool).
  from jax_thundermla import kernel  # pylint: disable=g-import-not-at-top
  return kernel.mla_decode_cuda(
      q, kv_cache, block_table, cache_seqlens, plan, head_dim_v=head_dim_v,
      softmax_scale=softmax_scale, causal=causal, timing=True)
