"""``benchmarks/run.py --profile`` writes a trace on every backend."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import jax
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*flags: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [_ROOT, os.environ.get("PYTHONPATH", "")]))
  return subprocess.run(
      [sys.executable, os.path.join(_ROOT, "benchmarks", "run.py"),
       "--lens=100,300", "--h_q=16", "--steps=1", "--impls=xla", *flags],
      env=env, capture_output=True, text=True, timeout=600, check=False)


def test_profile_writes_a_trace_and_says_where(tmp_path):
  run = _run(f"--profile={tmp_path}")
  assert run.returncode == 0, run.stdout + run.stderr[-3000:]
  traces = glob.glob(str(tmp_path / "custom_xla" / "**" / "*.xplane.pb"),
                     recursive=True)
  assert len(traces) == 1
  assert f"trace: {traces[0]}" in run.stdout


@pytest.mark.skipif(jax.default_backend() == "gpu",
                    reason="a GPU records the events --breakdown sums")
def test_breakdown_without_gpu_events_says_why():
  run = _run("--breakdown")
  assert run.returncode != 0
  assert "--breakdown sums GPU kernel times" in run.stderr


def test_cost_model_flag_accepts_cost_model_fields():
  run = _run("--cost_model=reduce_fixed_ns=8000,kv_token_ns=40")
  assert run.returncode == 0, run.stdout + run.stderr[-3000:]


@pytest.mark.parametrize("value, message", [
    ("no_such_field=1", "unexpected keyword argument 'no_such_field'"),
    ("reduce_fixed_ns=cheap", "'reduce_fixed_ns=cheap' is not NAME=NUMBER"),
    ("kv_token_ns=-1", "kv_token_ns must be finite and >= 0"),
])
def test_cost_model_flag_rejects_bad_fields_before_timing(value, message):
  run = _run(f"--cost_model={value}")
  assert run.returncode != 0
  assert "--cost_model: " in run.stderr and message in run.stderr, (
      run.stderr[-2000:])



def test_fp8_dtype_runs_over_an_fp8_cache():
  """--dtype=fp8: bfloat16 q over quantize_kv's cache of the same data."""
  run = _run("--dtype=fp8")
  assert run.returncode == 0, run.stdout + run.stderr[-3000:]
  assert any(l.split()[:2] == ["custom", "xla"] for l in run.stdout.splitlines())


def test_fp8_bytes_count_the_656_byte_entries():
  import jax_thundermla.workloads as wl  # pylint: disable=g-import-not-at-top
  w = wl.Workload(name="x", seqlens=(100, 300), s_q=2, h_q=16)
  rows = 2 * 2 * 16
  assert w.bytes_moved == (400 * 576 + rows * (576 + 512)) * 2
  assert w.bytes_moved_fp8 == 400 * 656 + rows * (576 + 512) * 2
