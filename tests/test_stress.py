"""benchmarks/stress.py: a smoke run on the CPU, and that it catches errors."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np

import jax_thundermla as tmla

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                     "stress.py")


def _stress():
  if "stress" not in sys.modules:
    spec = importlib.util.spec_from_file_location("stress", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["stress"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
  return sys.modules["stress"]


def test_reference_and_vm_agree_with_the_float64_oracle():
  stress = _stress()
  lines = []
  count, bad = stress.run(10, seed=1, backend="reference",
                          buckets=stress.CPU_BUCKETS, use_vm=True,
                          hidden_nan=0.5, undecodable=0.3, log=lines.append)
  assert (count, bad) == (10, 0), lines


def test_a_wrong_decode_is_reported_for_every_workload():
  stress = _stress()

  def off_by_a_little(*args, softmax_scale, **kwargs):
    return tmla.mla_decode(*args, softmax_scale=softmax_scale * 1.2,
                           backend="reference", **kwargs)

  lines = []
  count, bad = stress.run(4, seed=2, backend="reference",
                          buckets=stress.CPU_BUCKETS[1:2], use_vm=False,
                          undecodable=0.0, decode=off_by_a_little,
                          log=lines.append)
  assert bad == count == 4
  assert sum(line.startswith("MISMATCH") for line in lines) == 4


def test_mismatches_checks_nan_patterns_and_errors():
  stress = _stress()
  want_out = np.ones((2, 1, 1, 4))
  want_lse = np.zeros((2, 1, 1))
  assert not stress.mismatches(want_out, want_lse, want_out, want_lse)
  nan_out = want_out.copy()
  nan_out[1, 0, 0, 2] = np.nan
  assert stress.mismatches(nan_out, want_lse, want_out, want_lse)[0].startswith(
      "seq 1: NaN")
  assert "lse error" in stress.mismatches(want_out, want_lse + 0.01, want_out,
                                          want_lse)[0]
  assert "relative error" in stress.mismatches(want_out * 1.05, want_lse,
                                               want_out, want_lse)[0]


def test_command_line_smoke_run():
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(_PATH)),
             JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, _PATH, "--count=3", "--vm", "--backend=reference"],
      env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert "workloads: 3, mismatches: 0" in result.stdout
