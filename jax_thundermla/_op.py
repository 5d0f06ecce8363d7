"""The mla_decode operation as JAX sees it: one primitive and its rules.

Layers, from the outside in (each is a public JAX mechanism):

* ``jax.custom_jvp``: differentiation raises a clear error.
* ``jax.custom_batching.custom_vmap``: the batching rule (``_vmap_rule``).
* ``custom_partitioning``: the SPMD rule (``_sharding.partition``): batch-
  and head-sharded inputs run locally on each shard.
* the primitive ``mla_decode``: lowered per platform, to the pure-JAX
  reference everywhere and to the CUDA megakernel (an FFI custom call) for
  platform ``cuda``. ``jax.export(..., platforms=("cpu", "cuda"))`` therefore
  carries both lowerings, from any machine.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import mlir
import jax.numpy as jnp

from jax_thundermla import _sharding
from jax_thundermla import _validation
from jax_thundermla import reference

# What the ``cuda`` lowering runs: the megakernel, or the reference (shapes
# the kernel does not take, or a GPU process without the extension).
CUDA_IMPLS = ("kernel", "reference")


@dataclasses.dataclass(frozen=True)
class Config:
  """Static parameters of one mla_decode call (hashable).

  Attributes:
    head_dim_v: value head dim.
    softmax_scale: factor applied to QK^T.
    causal: bottom-right causal masking.
    cuda_impl: one of CUDA_IMPLS, what the ``cuda`` lowering runs.
    plan: the static fields of a host plan, or None (plan on the device).
    hoisted: the plan is the device plan of this call's own lengths, built
      outside the loop body that makes the call (``api.mla_decode``); the
      reference ignores it, and a rule that batches or splits the call
      drops it and plans on the device as with ``plan=None``.
  """

  head_dim_v: int
  softmax_scale: float
  causal: bool
  cuda_impl: str
  plan: tuple | None
  hoisted: bool = False

  def __post_init__(self):
    if self.cuda_impl not in CUDA_IMPLS:
      raise ValueError(
          f"cuda_impl must be one of {CUDA_IMPLS}, got {self.cuda_impl!r}")
    if self.hoisted and self.plan is None:
      raise ValueError("a hoisted plan needs the plan's static fields")

  def unplanned(self) -> Config:
    """This configuration planning on the device (a hoisted plan dropped)."""
    return dataclasses.replace(self, plan=None, hoisted=False)


def _abstract_eval(q, kv_cache, block_table, cache_seqlens, *plan_leaves,
                   config: Config):
  del kv_cache, block_table, cache_seqlens, plan_leaves
  b, s_q, h_q, _ = q.shape
  return (jax.core.ShapedArray((b, s_q, h_q, config.head_dim_v), q.dtype),
          jax.core.ShapedArray((b, h_q, s_q), jnp.float32))


def _reference_impl(q, kv_cache, block_table, cache_seqlens, *plan_leaves,
                    config: Config):
  out, lse = reference.mla_decode_reference(
      q, kv_cache, block_table, cache_seqlens, head_dim_v=config.head_dim_v,
      softmax_scale=config.softmax_scale, causal=config.causal)
  if plan_leaves and not config.hoisted:
    # A sequence whose length is not the one the host plan was built for
    # gets NaN (the kernel does this itself).
    stale = plan_leaves[1] != cache_seqlens
    out = jnp.where(stale[:, None, None, None], jnp.nan, out).astype(out.dtype)
    lse = jnp.where(stale[:, None, None], jnp.nan, lse)
  return out, lse


def _plan(plan_leaves, meta: tuple | None):
  if meta is None:
    return None
  from jax_thundermla.plan import DecodePlan  # pylint: disable=g-import-not-at-top
  return DecodePlan(*plan_leaves, *meta, float("nan"))


def _kernel_impl(q, kv_cache, block_table, cache_seqlens, *plan_leaves,
                 config: Config):
  from jax_thundermla import kernel  # pylint: disable=g-import-not-at-top
  return tuple(kernel.mla_decode_cuda(
      q, kv_cache, block_table, cache_seqlens,
      _plan(plan_leaves, config.plan), head_dim_v=config.head_dim_v,
      softmax_scale=config.softmax_scale, causal=config.causal))


def _cuda_impl(*args, config: Config):
  impl = _kernel_impl if config.cuda_impl == "kernel" else _reference_impl
  return impl(*args, config=config)


@functools.cache
def _jitted_bind(prim: Primitive, params: tuple):
  """``prim.bind`` with these (name, value) params, jitted once."""
  return jax.jit(functools.partial(prim.bind, **dict(params)))


def _primitive(name: str, abstract_eval, lowering, cuda_lowering
               ) -> Primitive:
  """A multiple-results primitive lowered by ``cuda_lowering`` on cuda and
  ``lowering`` elsewhere (functions of JAX arrays), run eagerly by jit (one
  compiled function per set of params, not one per call)."""
  prim = Primitive(name)
  prim.multiple_results = True
  prim.def_abstract_eval(abstract_eval)
  prim.def_impl(lambda *args, **params: _jitted_bind(
      prim, tuple(sorted(params.items())))(*args))
  mlir.register_lowering(
      prim, mlir.lower_fun(lowering, multiple_results=True))
  mlir.register_lowering(
      prim, mlir.lower_fun(cuda_lowering, multiple_results=True),
      platform="cuda")
  return prim


mla_decode_p = _primitive("mla_decode", _abstract_eval, _reference_impl,
                          _cuda_impl)


# The device plan of plan=None built outside a loop body (api.mla_decode):
# its cuda lowering runs the planner; other platforms' lowerings (a program
# exported for several) give zeros, since only the kernel reads the plan.
# ``request`` holds ``kernel.default_plan``'s keyword arguments as sorted
# (name, value) pairs and ``out_shapes`` the plan's leaf shapes.
def _default_plan(lengths, request: tuple):
  from jax_thundermla import kernel  # pylint: disable=g-import-not-at-top
  return kernel.default_plan(lengths, **dict(request))


def _planned(lengths, *, request, out_shapes):
  del out_shapes
  return jax.tree.leaves(_default_plan(lengths, request))


def _unplanned(lengths, *, request, out_shapes):
  del lengths, request
  return [jnp.zeros(shape, jnp.int32) for shape in out_shapes]


def _hoisted_plan_batch(args, dims, *, request, out_shapes):
  # Every mla_decode call that vmap batches drops a hoisted plan (its
  # batching rule plans per problem), so no per-element plan is made.
  del request
  (lengths,), (dim,) = args, dims
  n = lengths.shape[dim]
  return ([jnp.zeros((n, *shape), jnp.int32) for shape in out_shapes],
          [0] * len(out_shapes))


hoisted_plan_p = _primitive(
    "mla_decode_hoisted_plan",
    lambda lengths, *, request, out_shapes: [
        jax.core.ShapedArray(shape, jnp.int32) for shape in out_shapes],
    _unplanned, _planned)
jax.interpreters.batching.primitive_batchers[hoisted_plan_p] = (
    _hoisted_plan_batch)


def hoisted_plan(cache_seqlens, **shapes):
  """``kernel.default_plan(cache_seqlens, **shapes)`` as a primitive lowered
  per platform (see above)."""
  request = tuple(sorted(shapes.items()))
  like = jax.eval_shape(functools.partial(_default_plan, request=request),
                        cache_seqlens)
  flat, tree = jax.tree.flatten(like)
  leaves = hoisted_plan_p.bind(
      cache_seqlens, request=request,
      out_shapes=tuple(tuple(x.shape) for x in flat))
  return jax.tree.unflatten(tree, leaves)


def bind(config: Config, q, kv_cache, block_table, cache_seqlens,
         plan_leaves) -> tuple[jax.Array, jax.Array]:
  """Binds the primitive on (local) arrays; no transformation rules."""
  out, lse = mla_decode_p.bind(q, kv_cache, block_table, cache_seqlens,
                               *plan_leaves, config=config)
  return out, lse


@functools.partial(custom_partitioning, static_argnums=(0,))
def _partitioned(config, q, kv_cache, block_table, cache_seqlens,
                 plan_leaves):
  return bind(config, q, kv_cache, block_table, cache_seqlens, plan_leaves)


_partitioned.def_partition(
    functools.partial(_sharding.partition, bind),
    sharding_rule=_sharding.sharding_rule,
    decode_shardings=True)


def _lead(x, batched: bool, n: int):
  return x if batched else jnp.broadcast_to(x, (n, *x.shape))


def _fold(op, n: int, in_batched, q, kv_cache, block_table, cache_seqlens):
  """Runs n problems as one of n times the batch (plan on the device).

  A mapped cache becomes one cache of ``n * num_pages`` pages: element i's
  page ids are offset by ``i * num_pages``, and ids outside
  ``[0, num_pages)`` become -1, so that they stay out of range (NaN output)
  instead of naming another element's page.
  """
  qb, kvb, tb, lb = in_batched
  b = q.shape[1] if qb else q.shape[0]
  table = _lead(block_table, tb, n)
  if kvb:
    num_pages = kv_cache.shape[1]
    offsets = (jnp.arange(n, dtype=jnp.int32) * num_pages)[:, None, None]
    table = jnp.where((table >= 0) & (table < num_pages), table + offsets,
                      -1)
    kv_cache = kv_cache.reshape(n * num_pages, *kv_cache.shape[2:])
  q = _lead(q, qb, n).reshape(n * b, *q.shape[-3:])
  table = table.reshape(n * b, table.shape[-1])
  lens = _lead(cache_seqlens, lb, n).reshape(n * b)
  out, lse = op(q, kv_cache, table, lens, ())
  return out.reshape(n, b, *out.shape[1:]), lse.reshape(n, b, *lse.shape[1:])


def _loop(op, in_batched, args):
  """Runs the n problems one after the other (``lax.map``)."""
  flat, tree = jax.tree.flatten(args)
  flags = jax.tree.leaves(in_batched)
  mapped = [x for x, f in zip(flat, flags) if f]

  def one(xs):
    it = iter(xs)
    return op(*jax.tree.unflatten(
        tree, [next(it) if f else x for x, f in zip(flat, flags)]))

  return jax.lax.map(one, mapped)


@functools.cache
def operation(config: Config):
  """The mla_decode function of one static configuration, every rule on.

  Args:
    config: the static parameters.

  Returns:
    ``f(q, kv_cache, block_table, cache_seqlens, plan_leaves) -> (out,
    lse)`` where ``plan_leaves`` is ``()`` or a host plan's
    ``(instructions, seqlens)``.
  """

  @jax.custom_batching.custom_vmap
  def batched(q, kv_cache, block_table, cache_seqlens, plan_leaves):
    return _partitioned(config, q, kv_cache, block_table, cache_seqlens,
                        plan_leaves)

  @batched.def_vmap
  def _vmap_rule(n, in_batched, q, kv_cache, block_table, cache_seqlens,
                 plan_leaves):
    args = (q, kv_cache, block_table, cache_seqlens, plan_leaves)
    kvb = in_batched[1]
    op = batched
    if config.hoisted:
      # The hoisted plan is that of the unmapped lengths: plan per problem.
      op = operation(config.unplanned())
      args, in_batched = (*args[:4], ()), (*in_batched[:4], ())
    # A host plan describes one problem: loop. So does a folded cache whose
    # page ids would not fit in int32.
    too_many_pages = n * kv_cache.shape[1] > _validation.INT32_MAX
    if args[4] or (kvb and too_many_pages):
      out = _loop(op, in_batched, args)
    else:
      out = _fold(op, n, in_batched[:4], *args[:4])
    return out, (True, True)

  @jax.custom_jvp
  def op(q, kv_cache, block_table, cache_seqlens, plan_leaves):
    return batched(q, kv_cache, block_table, cache_seqlens, plan_leaves)

  @op.defjvp
  def _jvp(primals, tangents):
    del primals, tangents
    raise TypeError(
        "jax_thundermla.mla_decode is not differentiable: it is a decode"
        " (inference) kernel. Wrap its inputs in jax.lax.stop_gradient if"
        " the surrounding computation is differentiated.")

  return op


def cuda_impl_for(kernel_reason: str | None, gpu_without_kernel: bool) -> str:
  """What the cuda lowering runs under backend=None.

  Args:
    kernel_reason: why the kernel cannot take these shapes, or None.
    gpu_without_kernel: this process sees a GPU but has no kernel built (the
      reference runs there rather than a custom call that cannot).

  Returns:
    One of CUDA_IMPLS.
  """
  if kernel_reason is not None or gpu_without_kernel:
    return "reference"
  return "kernel"


def plan_meta(plan) -> tuple:
  """The static fields of a DecodePlan (``DecodePlan.static_fields``)."""
  return plan.static_fields()


def plan_leaves(plan) -> tuple:
  """A plan's arrays as int32 operands, ``()`` for None."""
  if plan is None:
    return ()
  return (jnp.asarray(plan.instructions, jnp.int32),
          jnp.asarray(plan.seqlens, jnp.int32))

