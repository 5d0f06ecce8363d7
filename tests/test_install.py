"""The package says once, with the fix, when its install cannot run the kernel."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import pytest

import jax_thundermla as tmla
from jax_thundermla import _ffi


def _problem(monkeypatch, *, gpu: bool, built: bool, driver: bool):
  monkeypatch.setattr(_ffi, "gpu_available", lambda: gpu)
  monkeypatch.setattr(_ffi, "extension_available", lambda: built)
  monkeypatch.setattr(_ffi, "nvidia_driver_present", lambda: driver)
  return _ffi.install_problem()


def test_cpu_only_jax_on_a_gpu_machine(monkeypatch):
  problem = _problem(monkeypatch, gpu=False, built=True, driver=True)
  assert "JAX sees no GPU" in problem and "jax[cuda13]" in problem


def test_extension_built_on_a_machine_without_gpu(monkeypatch):
  problem = _problem(monkeypatch, gpu=False, built=True, driver=False)
  assert "reference runs" in problem and "jax[cuda13]" in problem


def test_gpu_without_the_extension(monkeypatch):
  problem = _problem(monkeypatch, gpu=True, built=False, driver=True)
  assert "extension is missing" in problem
  assert "pip install --no-build-isolation" in problem


@pytest.mark.parametrize("gpu,built", [(True, True), (False, False)])
def test_consistent_installs_say_nothing(monkeypatch, gpu, built):
  assert _problem(monkeypatch, gpu=gpu, built=built, driver=gpu) is None


def test_warns_once_per_process(monkeypatch):
  monkeypatch.setattr(_ffi, "install_problem", lambda: "jax_thundermla: X")
  _ffi.warn_about_install.cache_clear()
  args = (jnp.zeros((1, 1, 1, 96), jnp.bfloat16),
          jnp.zeros((1, 16, 1, 96), jnp.bfloat16),
          jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32))
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      for _ in range(3):
        tmla.mla_decode(*args, head_dim_v=32)
  finally:
    _ffi.warn_about_install.cache_clear()
  assert [str(w.message) for w in caught] == ["jax_thundermla: X"]
  assert caught[0].category is RuntimeWarning
