"""The extension's FFI path end to end (the smoke kernel), on a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_thundermla import _ffi
from jax_thundermla import isa

from conftest import requires_gpu


def test_extension_state_is_reported():
  if _ffi.extension_available():
    assert "tmla_smoke_scale" in _ffi.register_targets()
  else:
    with pytest.raises(RuntimeError, match="CUDA extension"):
      _ffi.register_targets()


def test_extension_of_another_instruction_set_is_refused(monkeypatch):
  class StaleBuild:
    """An extension built from an older csrc/isa.h."""

    @staticmethod
    def isa_version():
      return isa.ISA_VERSION - 1

    @staticmethod
    def registrations():
      return {}

  monkeypatch.setattr(_ffi, "_C", StaleBuild)
  with pytest.raises(RuntimeError, match="rebuild"):
    _ffi.require_extension()


def test_built_extension_matches_the_instruction_set():
  if not _ffi.extension_available():
    pytest.skip("built without the CUDA extension")
  _ffi.require_extension()


@requires_gpu
def test_smoke_kernel_through_ffi_call_in_jit_and_scan():
  x = jax.random.normal(jax.random.key(0), (3, 1000), jnp.float32)

  @jax.jit
  def f(x):
    y = _ffi.smoke_scale(x, 2.5)

    def body(carry, _):
      return _ffi.smoke_scale(carry, 0.5), None

    z, _ = jax.lax.scan(body, y, None, length=3)
    return y, z

  y, z = f(x)
  np.testing.assert_allclose(np.asarray(y), 2.5 * np.asarray(x), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(z), 2.5 / 8 * np.asarray(x),
                             rtol=1e-6)


@requires_gpu
def test_smoke_kernel_on_every_gpu():
  for device in jax.devices("gpu"):
    x = jax.device_put(jnp.arange(5000, dtype=jnp.float32), device)
    y = jax.jit(lambda x: _ffi.smoke_scale(x, -3.0))(x)
    assert y.devices() == {device}
    np.testing.assert_array_equal(np.asarray(y), -3.0 * np.arange(5000))


def test_smoke_rejects_wrong_dtype():
  if not _ffi.extension_available():
    pytest.skip("no extension")
  with pytest.raises(TypeError, match="float32"):
    _ffi.smoke_scale(jnp.ones(3, jnp.int32), 1.0)
