"""Loads the compiled extension and registers its FFI targets with XLA once."""

from __future__ import annotations

import functools
import os
import shutil
import warnings

import jax
import numpy as np

from jax_thundermla import isa

try:
  from jax_thundermla import _C  # pylint: disable=g-import-not-at-top
  _IMPORT_ERROR: ImportError | None = None
except ImportError as e:  # Built without a CUDA toolkit, or not built.
  _C = None
  _IMPORT_ERROR = e


def extension_available() -> bool:
  """Whether the CUDA extension was built and imports."""
  return _C is not None


def gpu_available() -> bool:
  """Whether JAX sees a CUDA GPU."""
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def nvidia_driver_present() -> bool:
  """Whether this machine has an NVIDIA driver (whatever JAX sees)."""
  return (os.path.exists("/proc/driver/nvidia/version")
          or shutil.which("nvidia-smi") is not None)


def install_problem() -> str | None:
  """What is wrong with this install for running the kernel, or None.

  Returns:
    A sentence with the fix when the extension is built but JAX sees no GPU,
    or JAX sees a GPU but the extension is missing; None otherwise.
  """
  gpu, built = gpu_available(), extension_available()
  if built and not gpu:
    if nvidia_driver_present():
      return ("jax_thundermla: the CUDA kernel is built and this machine has"
              " an NVIDIA driver, but JAX sees no GPU (CPU-only jax?), so the"
              " pure-JAX reference runs. Fix: pip install -U 'jax[cuda13]'.")
    return ("jax_thundermla: the CUDA kernel is built but JAX sees no GPU, so"
            " the pure-JAX reference runs. On a Hopper GPU machine install"
            " CUDA jax: pip install -U 'jax[cuda13]'.")
  if gpu and not built:
    return ("jax_thundermla: JAX sees a GPU but the CUDA extension is missing"
            f" ({_IMPORT_ERROR}), so the pure-JAX reference runs. Fix: put"
            " nvcc on PATH and reinstall: pip install --no-build-isolation"
            " -e .")
  return None


@functools.cache
def warn_about_install() -> None:
  """Warns once per process when ``install_problem`` finds something."""
  problem = install_problem()
  if problem is not None:
    warnings.warn(problem, RuntimeWarning, stacklevel=4)


def require_extension() -> None:
  """Raises a RuntimeError that says why the CUDA extension cannot be used.

  Raises:
    RuntimeError: the extension is missing, or was built from another
      version of the instruction set than this Python package (a stale
      build: its kernels would misread the planners' instructions).
  """
  if _C is None:
    raise RuntimeError(
        "jax_thundermla was installed without its CUDA extension"
        f" ({_IMPORT_ERROR}); reinstall on a machine with the CUDA toolkit"
        " (nvcc) to use backend='cuda', or use backend='reference'.")
  built = int(_C.isa_version())
  if built != isa.ISA_VERSION:
    raise RuntimeError(
        f"the CUDA extension was built for instruction set version {built},"
        f" this package plans for version {isa.ISA_VERSION}: rebuild it"
        " (pip install --no-build-isolation -e .).")


@functools.cache
def register_targets() -> tuple[str, ...]:
  """Registers every FFI target of the extension for platform CUDA.

  Returns:
    The registered target names.

  Raises:
    RuntimeError: the extension is not available.
  """
  require_extension()
  names = []
  for name, capsule in _C.registrations().items():
    jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    names.append(name)
  return tuple(sorted(names))


def smoke_scale(x: jax.Array, scale: float) -> jax.Array:
  """``x * scale`` computed by the extension's trivial CUDA kernel.

  It exists to prove the build, the FFI registration and the launch on
  XLA's stream; it runs on a GPU only.

  Args:
    x: float32 array of any shape.
    scale: the factor.

  Returns:
    ``x * scale``, float32, same shape.
  """
  register_targets()
  if x.dtype != np.float32:
    raise TypeError(f"smoke_scale: x must be float32, got {x.dtype}")
  call = jax.ffi.ffi_call(
      "tmla_smoke_scale", jax.ShapeDtypeStruct(x.shape, x.dtype))
  return call(x, scale=np.float32(scale))


def planner_available() -> bool:
  """Whether the compiled planner (CUDA and CPU handlers) is built."""
  return _C is not None and hasattr(_C, "cpu_registrations")


def planner_constants() -> dict:
  """Constants of the compiled planner (csrc/planner.h)."""
  require_extension()
  return dict(_C.planner_constants())


def planner_scratch_bytes(num_items: int, num_sms: int) -> int:
  """Scratch bytes the compiled planner needs for these shapes."""
  require_extension()
  return int(_C.planner_scratch_bytes(num_items, num_sms))


@functools.cache
def register_planner() -> None:
  """Registers the planner's FFI target for the CPU and, if JAX sees a GPU,
  for CUDA.

  Raises:
    RuntimeError: the extension is not available.
  """
  require_extension()
  for name, capsule in _C.cpu_registrations().items():
    jax.ffi.register_ffi_target(name, capsule, platform="cpu")
  if gpu_available():
    register_targets()


def kernel_available() -> bool:
  """Whether the MLA decode megakernel is compiled into the extension."""
  return _C is not None and "tmla_mla_decode" in _C.registrations()


def require_kernel() -> None:
  """Raises a RuntimeError that says why backend='cuda' cannot run."""
  require_extension()
  if not kernel_available():
    raise RuntimeError(
        "this build of jax_thundermla has no MLA decode megakernel"
        " (FFI target 'tmla_mla_decode'); use backend='reference'.")
  if not gpu_available():
    raise RuntimeError(
        "backend='cuda' needs a CUDA GPU visible to JAX; none was found."
        " Use backend='reference' (or backend=None) on this machine.")
