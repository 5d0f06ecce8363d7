"""What ``jax.export`` needs to carry mla_decode to another process."""

from __future__ import annotations

import jax

from jax_thundermla import _ffi
from jax_thundermla import kernel
from jax_thundermla.plan import device_ffi


def export_safety_checks() -> list[jax.export.DisabledSafetyCheck]:
  """The safety checks ``jax.export`` must skip for mla_decode's kernel.

  jax.export refuses custom calls it does not know to be stable; the kernel
  is one (its FFI targets are named in ``jax_thundermla.kernel``), and so
  is the planner that ``plan=None`` runs on the GPU
  (``jax_thundermla.plan.device_ffi``). Pass
  these as ``disabled_checks`` when exporting for platform ``cuda``::

    jax.export.export(fn, platforms=("cpu", "cuda"),
                      disabled_checks=tmla.export_safety_checks())(...)

  The artifact then holds a call to this package's kernel by name: the
  process that runs it on a GPU needs the same version of the package, built
  with its CUDA extension, and ``register_export_targets()``.

  Returns:
    One ``DisabledSafetyCheck.custom_call`` per FFI target of the package.
  """
  return [jax.export.DisabledSafetyCheck.custom_call(name)
          for name in (kernel.TARGET, kernel.TIMED_TARGET, device_ffi.TARGET)]


def register_export_targets() -> tuple[str, ...]:
  """Registers the kernel's FFI targets so that a deserialized artifact runs.

  Call it once in the process that deserializes and calls an exported
  function that uses mla_decode (``mla_decode`` itself registers them when
  it is traced; a deserialized artifact never calls it). Without a GPU it
  does nothing: there the artifact runs its CPU (reference) lowering.

  Returns:
    The registered target names (empty where JAX sees no GPU).

  Raises:
    RuntimeError: JAX sees a GPU but the CUDA extension is missing or stale
      (the artifact's CUDA lowering calls the kernel).
  """
  if not _ffi.gpu_available():
    return ()
  return _ffi.register_targets()
