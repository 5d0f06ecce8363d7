"""The ffi_call wrapper of the CUDA megakernel: outputs, workspace, attrs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_thundermla import _ffi
from jax_thundermla import fp8_cache
from jax_thundermla import isa
from jax_thundermla.plan import DecodePlan
from jax_thundermla.plan import plan_on_device

TARGET = "tmla_mla_decode"
TIMED_TARGET = "tmla_mla_decode_timed"
HEAD_DIM_V = isa.HEAD_DIM_V
HEAD_DIM_QK = isa.HEAD_DIM_V + isa.ROPE_DIM


def unsupported_reason(*, head_dim_v: int, d_qk: int, fp8: bool = False,
                       q_dtype=jnp.bfloat16) -> str | None:
  """Why the kernel cannot run these shapes or this cache (``fp8``: an FP8
  cache, which it dequantizes to bfloat16: q must be bfloat16), or None."""
  if fp8 and jnp.dtype(q_dtype) != jnp.bfloat16:
    return (f"the CUDA kernel takes an FP8 (uint8) kv_cache with bfloat16 q"
            f" only, got q of dtype {jnp.dtype(q_dtype).name}; pass"
            f" backend='reference' (backend=None picks it)")
  if head_dim_v != HEAD_DIM_V or d_qk != HEAD_DIM_QK:
    return (f"the CUDA kernel supports head_dim_v={HEAD_DIM_V} (d_qk="
            f"{HEAD_DIM_QK}) only, got head_dim_v={head_dim_v}")
  return None


def default_plan(cache_seqlens: jax.Array, *, s_q: int, h_q: int, h_kv: int,
                 page_size: int, max_pages: int,
                 head_dim_v: int) -> DecodePlan:
  """The device plan that the kernel runs when mla_decode gets none."""
  return plan_on_device(cache_seqlens, s_q=s_q, h_q=h_q, h_kv=h_kv,
                        page_size=page_size, max_seqlen=max_pages * page_size,
                        head_dim_v=head_dim_v)


def mla_decode_cuda(q: jax.Array, kv_cache: jax.Array,
                    block_table: jax.Array, cache_seqlens: jax.Array,
                    plan: DecodePlan | None, *, head_dim_v: int,
                    softmax_scale: float, causal: bool, timing: bool = False
                    ) -> tuple[jax.Array, ...]:
  """MLA decode by the megakernel; inputs already validated by mla_decode.

  Args:
    q: [b, s_q, h_q, 576] bf16/fp16.
    kv_cache: [num_pages, page_size, h_kv, 576], q's dtype; or an FP8
      cache, uint8 [num_pages, page_size, h_kv, 656] (``fp8_cache``), with
      bfloat16 q: the kernel dequantizes each block as ``dequantize_kv``
      does.
    block_table: int32 [b, max_pages].
    cache_seqlens: int32 [b].
    plan: a DecodePlan, or None to plan on the device from
      ``cache_seqlens`` (``plan_on_device``: the compiled planner, one
      kernel; capacities from shapes, symbolic expressions for a symbolic
      batch). The kernel checks each sequence's length
      against the plan's.
    head_dim_v: 512.
    softmax_scale: factor applied to QK^T.
    causal: bottom-right causal masking.
    timing: run the timed build of the kernel and also return its records.

  Returns:
    ``(out [b, s_q, h_q, 512] in q.dtype, lse [b, h_q, s_q] float32)``, NaN
    (written by the kernel itself) for sequences that cannot be decoded from
    their table (see ``reference.invalid_sequences``) or whose length is not
    the one the plan was built for; with ``timing``, a third element: int32
    ``[num_sms, max_instructions, isa.TIMING_WORDS]`` records (decode them
    with ``jax_thundermla.profiling.decode_timings``).

  Raises:
    ValueError: an FP8 cache with q not bfloat16, or head dims the kernel
      does not take.
  """
  reason = unsupported_reason(head_dim_v=head_dim_v, d_qk=q.shape[-1],
                              fp8=fp8_cache.is_fp8_cache(kv_cache),
                              q_dtype=q.dtype)
  if reason is not None:
    raise ValueError(reason)
  if _ffi.extension_available():
    # Lowering needs only the target's name: a machine without the
    # extension (or without a GPU) still exports the kernel's lowering.
    _ffi.register_targets()
  b, s_q, h_q, _ = q.shape
  _, page_size, h_kv, _ = kv_cache.shape
  max_pages = block_table.shape[1]
  if plan is None:
    plan = default_plan(cache_seqlens, s_q=s_q, h_q=h_q, h_kv=h_kv,
                        page_size=page_size, max_pages=max_pages,
                        head_dim_v=head_dim_v)
  results = [jax.ShapeDtypeStruct((b, s_q, h_q, head_dim_v), q.dtype),
             jax.ShapeDtypeStruct((b, h_q, s_q), jnp.float32),
             jax.ShapeDtypeStruct((plan.workspace_words(head_dim_v),),
                                  jnp.float32)]
  if timing:
    results.append(jax.ShapeDtypeStruct(
        (plan.num_sms, plan.max_instructions, isa.TIMING_WORDS), jnp.int32))
  # mla_decode batches the untimed call itself (jax_thundermla._op); the
  # timed one runs once per mapped element.
  call = jax.ffi.ffi_call(TIMED_TARGET if timing else TARGET, tuple(results),
                          vmap_method="sequential")
  out, lse, _, *timings = call(
      q, kv_cache, block_table, cache_seqlens,
      jnp.asarray(plan.seqlens, jnp.int32),
      jnp.asarray(plan.instructions, jnp.int32),
      softmax_scale=np.float32(softmax_scale), causal=np.int32(causal),
      num_slots=np.int32(plan.num_slots),
      num_counters=np.int32(plan.num_counters))
  return (out, lse, *timings)
