"""Randomized stress test of mla_decode against a float64 numpy oracle.

Draws ``--count`` random workloads (batch, lengths including 0, page
boundaries and long ones, s_q, h_q, h_kv, page size, dtype, causal, the
planner: plan=None or a host scheduler) and checks every output and LSE
against the float64 oracle of the tests (``tests/conftest.py``). Every
input is hostile: NaN in cache slots past each length and in unreferenced
pages, out-of-range and unrelated page ids in the table padding, shared
prefix pages, NaN in keys that causality hides from some rows, and now and
then an undecodable sequence (a bad page id, a length past its table) that
must come back NaN. Shapes come from a few fixed buckets, so jit compiles
a bounded number of times however many workloads run.

On a GPU it checks the CUDA kernel; elsewhere the reference backend and,
with ``--vm``, the numpy VM executing the same plans.

  python benchmarks/stress.py --count=1000          # on a GPU
  python benchmarks/stress.py --count=8 --vm        # CPU smoke test

Prints one line per mismatch and a summary; exits 1 on any mismatch.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import jax_thundermla as tmla
from jax_thundermla import _ffi
from jax_thundermla import vm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
# The float64 oracle of the tests.
from conftest import numpy_mla_decode  # pylint: disable=wrong-import-position

PLANNERS = (None, "balanced", "static", "makespan")
RTOL = 1e-2  # relative error of each sequence's output (DESIGN.md)
LSE_ATOL = 1e-3


@dataclasses.dataclass(frozen=True)
class Bucket:
  """The static shapes of a family of workloads (one compile per planner
  capacity, causal flag and planner)."""

  batch: int
  s_q: int
  h_q: int
  h_kv: int
  page_size: int
  max_pages: int
  dtype: type
  d_v: int = 512

  @property
  def d_qk(self) -> int:
    return self.d_v + 64

  @property
  def num_pages(self) -> int:
    """Pages of the pool: room for half of the tables, full."""
    return self.batch * self.max_pages // 2 + 4


_BF16, _FP16 = ml_dtypes.bfloat16, np.float16
# DeepSeek head dims (the kernel's), lengths up to 64 Ki tokens.
GPU_BUCKETS = (
    Bucket(1, 1, 16, 1, 64, 1024, _BF16),
    Bucket(4, 4, 16, 1, 64, 256, _BF16),
    Bucket(16, 2, 128, 1, 16, 64, _FP16),
    Bucket(8, 16, 16, 1, 256, 16, _BF16),
    Bucket(3, 16, 128, 1, 32, 32, _BF16),
    Bucket(33, 1, 64, 1, 128, 16, _FP16),
    Bucket(64, 2, 16, 1, 64, 16, _BF16),
    Bucket(5, 3, 32, 2, 48, 64, _FP16),
    Bucket(6, 8, 64, 4, 16, 128, _BF16),
)
# Small head dims for a CPU, where the reference and the VM run.
CPU_BUCKETS = (
    Bucket(1, 1, 16, 1, 64, 32, _BF16, d_v=32),
    Bucket(4, 4, 16, 1, 16, 16, _FP16, d_v=32),
    Bucket(3, 16, 16, 2, 32, 4, _BF16, d_v=32),
    Bucket(6, 2, 8, 1, 48, 8, _BF16, d_v=32),
)


@dataclasses.dataclass
class Case:
  """One drawn workload and what was done to it."""

  index: int
  bucket: Bucket
  causal: bool
  planner: str | None
  lens: np.ndarray  # int32 [b]
  table: np.ndarray  # int32 [b, max_pages]
  q: np.ndarray  # [b, s_q, h_q, d_qk]
  kv: np.ndarray  # [num_pages, page_size, h_kv, d_qk]
  notes: tuple[str, ...]

  def describe(self) -> str:
    w = self.bucket
    return (f"#{self.index} b={w.batch} s_q={w.s_q} h_q={w.h_q} h_kv={w.h_kv}"
            f" page={w.page_size} {np.dtype(w.dtype).name}"
            f" causal={self.causal} plan={self.planner}"
            f" lens={self.lens.tolist()} {' '.join(self.notes)}")


def _draw_lengths(rng, w: Bucket) -> np.ndarray:
  most = w.max_pages * w.page_size
  ps = w.page_size
  lens = []
  for _ in range(w.batch):
    kind = rng.integers(6)
    if kind == 0:
      n = 0
    elif kind == 1:
      n = rng.integers(1, w.s_q + 2)
    elif kind == 2:
      n = ps * rng.integers(1, w.max_pages + 1) + rng.integers(-1, 2)
    elif kind == 3:
      n = most - rng.integers(0, ps)
    else:
      n = rng.integers(0, most + 1)
    lens.append(int(np.clip(n, 0, most)))
  lens = np.asarray(lens, np.int64)
  # Fit the pool: shorten the longest until the pages needed fit.
  while (-(-lens // ps)).sum() > w.num_pages:
    i = int(np.argmax(lens))
    lens[i] = rng.integers(0, lens[i])
  return lens


def draw_case(rng, index: int, buckets, base_pools, *, hidden_nan: float,
              undecodable: float) -> Case:
  """A random workload of a random bucket, with its hostile inputs."""
  w = buckets[rng.integers(len(buckets))]
  lens = _draw_lengths(rng, w)
  ps, notes = w.page_size, []
  pages = -(-lens // ps)
  table = np.empty((w.batch, w.max_pages), np.int64)
  pool = rng.permutation(w.num_pages)
  used = 0
  for i in range(w.batch):
    table[i, :pages[i]] = pool[used:used + pages[i]]
    used += pages[i]
  # Shared prefixes: full pages of an earlier sequence, in order.
  for j in range(1, w.batch):
    i = rng.integers(j)
    share = min(lens[i] // ps, lens[j] // ps)
    if share and rng.random() < 0.2:
      table[j, :share] = table[i, :share]
      notes.append(f"shares:{j}<{i}:{share}")
  # Padding: ids past the pool, negative ids, and ids of real pages.
  for i in range(w.batch):
    pad = w.max_pages - pages[i]
    choices = np.asarray([w.num_pages, w.num_pages + 7, -1, 1 << 30,
                          -(1 << 31), int(pool[0])])
    table[i, pages[i]:] = choices[rng.integers(len(choices), size=pad)]
  kv = base_pools[w].copy()
  referenced = np.zeros(w.num_pages, bool)
  for i in range(w.batch):
    referenced[table[i, :pages[i]]] = True
  kv[~referenced] = np.nan
  for i in range(w.batch):
    if lens[i] % ps:
      kv[table[i, pages[i] - 1], lens[i] % ps:] = np.nan
  causal = bool(rng.random() < 0.5)
  if causal and w.s_q > 1 and rng.random() < hidden_nan:
    # The last key of a sequence is seen by its last query token only.
    i = rng.integers(w.batch)
    if lens[i] >= 1:
      n = lens[i] - 1
      cols = slice(None) if rng.random() < 0.5 else slice(w.d_v, None)
      kv[table[i, n // ps], n % ps, :, cols] = np.nan
      notes.append(f"hidden-nan:{i}")
  if rng.random() < undecodable:
    i = rng.integers(w.batch)
    if pages[i] and rng.random() < 0.5:
      table[i, rng.integers(pages[i])] = w.num_pages + rng.integers(1, 99)
      notes.append(f"bad-page:{i}")
    else:
      lens[i] = w.max_pages * ps + rng.integers(1, ps + 1)
      notes.append(f"too-long:{i}")
  q = rng.standard_normal((w.batch, w.s_q, w.h_q, w.d_qk), np.float32)
  return Case(index=index, bucket=w, causal=causal,
              planner=PLANNERS[rng.integers(len(PLANNERS))],
              lens=lens.astype(np.int32), table=table.astype(np.int32),
              q=q.astype(w.dtype), kv=kv, notes=tuple(notes))


def make_plan(case: Case):
  """The host plan of the case's planner, or None for plan=None."""
  if case.planner is None:
    return None
  w = case.bucket
  return tmla.plan_decode(case.lens, s_q=w.s_q, h_q=w.h_q, h_kv=w.h_kv,
                          page_size=w.page_size, head_dim_v=w.d_v,
                          scheduler=case.planner)


def mismatches(out, lse, want_out, want_lse) -> list[str]:
  """What differs, sequence by sequence (empty when all agree)."""
  out = np.asarray(out, np.float64)
  lse = np.asarray(lse, np.float64)
  problems = []
  for i in range(want_out.shape[0]):
    if not np.array_equal(np.isnan(out[i]), np.isnan(want_out[i])):
      problems.append(f"seq {i}: NaN in out where the oracle has"
                      f" {int(np.isnan(want_out[i]).sum())} NaN,"
                      f" got {int(np.isnan(out[i]).sum())}")
      continue
    if not (np.array_equal(np.isnan(lse[i]), np.isnan(want_lse[i]))
            and np.array_equal(np.isinf(lse[i]), np.isinf(want_lse[i]))):
      problems.append(f"seq {i}: NaN/inf pattern of lse differs")
      continue
    ok = ~np.isnan(want_out[i])
    diff = np.linalg.norm(out[i][ok] - want_out[i][ok])
    norm = np.linalg.norm(want_out[i][ok])
    if diff > RTOL * norm or (norm == 0 and diff > 0):
      problems.append(
          f"seq {i}: out relative error {diff / max(norm, 1e-30):.3g}")
    finite = np.isfinite(want_lse[i])
    if finite.any():
      err = np.abs(lse[i][finite] - want_lse[i][finite]).max()
      if err > LSE_ATOL:
        problems.append(f"seq {i}: lse error {err:.3g}")
  return problems


def run(count: int, *, seed: int, backend: str, buckets, use_vm: bool,
        hidden_nan: float = 0.25, undecodable: float = 0.05,
        decode: Callable | None = None, log=print) -> tuple[int, int]:
  """Draws and checks ``count`` workloads.

  Args:
    count: workloads to draw.
    seed: random seed.
    backend: mla_decode's backend.
    buckets: the shape buckets to draw from.
    use_vm: also execute each decodable case's plan on the numpy VM.
    hidden_nan: probability of a NaN key hidden from some rows (causal).
    undecodable: probability of a sequence that cannot be decoded.
    decode: the call under test, ``decode(q, kv, table, lens, plan=,
      head_dim_v=, softmax_scale=, causal=)``; mla_decode with ``backend``
      by default.

  Returns:
    ``(workloads checked, workloads with a mismatch)``.
  """
  rng = np.random.default_rng(seed)
  pools = {w: rng.standard_normal(
      (w.num_pages, w.page_size, w.h_kv, w.d_qk), np.float32).astype(w.dtype)
           for w in buckets}
  if decode is None:
    decode = lambda *a, **k: tmla.mla_decode(*a, backend=backend, **k)
  bad = 0
  for index in range(count):
    case = draw_case(rng, index, buckets, pools, hidden_nan=hidden_nan,
                     undecodable=undecodable)
    w = case.bucket
    scale = w.d_qk ** -0.5
    plan = make_plan(case)
    got = decode(jnp.asarray(case.q), jnp.asarray(case.kv),
                 jnp.asarray(case.table), jnp.asarray(case.lens), plan=plan,
                 head_dim_v=w.d_v, softmax_scale=scale, causal=case.causal)
    want = numpy_mla_decode(case.q, case.kv, case.table, case.lens,
                            head_dim_v=w.d_v, softmax_scale=scale,
                            causal=case.causal)
    problems = mismatches(got[0], got[1], *want)
    decodable = not any(n.startswith(("bad-page", "too-long"))
                        for n in case.notes)
    if use_vm and decodable:
      program = plan or tmla.plan_on_device(
          case.lens, s_q=w.s_q, h_q=w.h_q, h_kv=w.h_kv, page_size=w.page_size,
          max_seqlen=w.max_pages * w.page_size, head_dim_v=w.d_v)
      result = vm.execute(program, case.q, case.kv, case.table, case.lens,
                          head_dim_v=w.d_v, softmax_scale=scale,
                          causal=case.causal)
      problems += [f"vm {p}" for p in mismatches(result.out, result.lse,
                                                  *want)]
    if problems:
      bad += 1
      log(f"MISMATCH {case.describe()}")
      for p in problems[:8]:
        log(f"  {p}")
  return count, bad


_COUNT = flags.DEFINE_integer("count", 1000, "Workloads to draw.")
# allow_override: the tests import this script and the DeepSeek example,
# which also has --seed, into one process.
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.", allow_override=True)
_BACKEND = flags.DEFINE_enum(
    "backend", None, ["cuda", "reference"],
    "mla_decode backend; default: cuda on a GPU with the kernel built, else"
    " reference.")
_VM = flags.DEFINE_bool(
    "vm", False, "Also execute every decodable case's plan on the numpy VM.")
_HIDDEN_NAN = flags.DEFINE_float(
    "hidden_nan", 0.25, "Probability of a NaN key hidden by causality.")


def main(argv):
  del argv
  backend = _BACKEND.value
  if backend is None:
    backend = ("cuda" if _ffi.gpu_available() and _ffi.kernel_available()
               else "reference")
  buckets = GPU_BUCKETS if backend == "cuda" else CPU_BUCKETS
  print(f"device: {jax.devices()[0].device_kind}, backend: {backend},"
        f" {_COUNT.value} workloads from {len(buckets)} shape buckets,"
        f" seed {_SEED.value}", flush=True)
  start = time.perf_counter()
  count, bad = run(_COUNT.value, seed=_SEED.value, backend=backend,
                   buckets=buckets, use_vm=_VM.value,
                   hidden_nan=_HIDDEN_NAN.value)
  print(f"workloads: {count}, mismatches: {bad},"
        f" {time.perf_counter() - start:.0f} s")
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  app.run(main)
