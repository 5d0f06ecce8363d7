"""The compiled planner's device code, run on the CPU, equals its host code.

The device planner (one CTA, ``csrc/planner.cuh`` under ``__CUDA_ARCH__``)
and the CPU handler (one thread) are one source with two bodies for every
block-wide step. ``csrc/tests/planner_emulation.cc`` runs the device body on
the CPU, every thread a cooperative context that runs alone from one
barrier or shuffle to the next; its plans must equal the CPU handler's bit
for bit with the threads resumed in thread order, in reverse thread order
and in a random order: a read of another thread's write that no barrier
orders sees the stale word in one of the first two. A GPU runs the same
comparison in
``test_plan_compiled.py::test_gpu_plans_equal_the_cpu_twin_bit_for_bit``.
"""

import ctypes
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_thundermla import isa
from jax_thundermla.plan import device_ffi
from jax_thundermla.plan import timing
from jax_thundermla.plan.cost import CostModel
from jax_thundermla.plan.problem import tile_rows

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
RANDOM_CASES = 24
# Layout C past its rounds (more items than kLptRounds per SM, the rest
# poured), which the random cases seldom pick: (b, s_q, num_sms, page size,
# lengths below).
POURED = [(256, 2, 33, 64, 1000), (64, 6, 132, 64, 100), (64, 5, 33, 16, 100)]
CASES = RANDOM_CASES + len(POURED)
D_V = 512
# How the emulated threads are resumed (planner_emulation.cc's emu::Order).
ORDERS = {"random": 0, "ascending": 1, "descending": 2}

pytestmark = pytest.mark.skipif(
    not device_ffi.available(), reason="needs the compiled extension")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
  cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  if cxx is None:
    pytest.skip("no host C++ compiler")
  lib = tmp_path_factory.mktemp("emulation") / "planner_emulation.so"
  # -O0: no call is copied or inlined, so the calls that lead to a barrier
  # name it (planner_emulation.cc checks that all threads wait at one).
  subprocess.run(
      [cxx, "-std=c++17", "-O0", "-shared", "-fPIC", "-Wno-unknown-pragmas",
       f"-I{CSRC}", str(CSRC / "tests" / "planner_emulation.cc"), "-o",
       str(lib)], check=True, capture_output=True)
  dll = ctypes.CDLL(str(lib))
  i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
  dll.TmlaPlanEmulated.argtypes = [ptr, *[i32] * 8, *[i64] * 4, ptr, ptr,
                                   ptr, ptr, i32, ctypes.c_uint32]
  dll.TmlaPlanEmulated.restype = ctypes.c_int
  dll.TmlaLowerBoundB.argtypes = [ptr, *[i32] * 8, *[i64] * 4, ptr, ptr, ptr,
                                  ptr, ptr]
  dll.TmlaLowerBoundB.restype = ctypes.c_int
  dll.TmlaEmulationError.restype = ctypes.c_char_p
  return dll


@pytest.fixture(scope="module")
def emulated(library):
  def plan(*args):
    assert library.TmlaPlanEmulated(*args) == 0, (
        library.TmlaEmulationError().decode())

  return plan


def _live(ins):
  """Each list up to and including its STOP row; the rest zeroed."""
  upto = np.minimum(timing.live_mask(ins).sum(1) + 1, ins.shape[1])
  keep = np.arange(ins.shape[1])[None, :] < upto[:, None]
  return np.where(keep[..., None], ins, 0)


def _draw_shape(rng, sms_choices):
  """s_q, h_q, h_kv, num_sms (one of `sms_choices`) and page size of a
  random case, drawn in that order."""
  s_q, h_q = int(rng.integers(1, 17)), int(rng.choice([16, 128]))
  h_kv = int(rng.choice([1, 1, 2]))
  num_sms = int(rng.choice(sms_choices))
  page = int(rng.choice([16, 64, 256]))
  return s_q, h_q, h_kv, num_sms, page


def _cases():
  rng = np.random.default_rng(31)
  out = []
  while len(out) < RANDOM_CASES:
    b = int(rng.choice([1, 1, 2, 3, 16, 64, 132, 200, 256]))
    s_q, h_q, h_kv, num_sms, page = _draw_shape(rng, [1, 4, 33, 132, 132, 256])
    max_seqlen = int(rng.choice([1 << 20, 8192]))
    if b * h_kv * len(tile_rows(s_q, h_q, h_kv)) > 1024:
      continue
    kind = rng.integers(0, 4)
    if kind == 0:
      lens = rng.integers(0, 70_000, b)
    elif kind == 1:  # one huge sequence among short ones
      lens = rng.integers(0, 2000, b)
      lens[rng.integers(b)] = max_seqlen
    elif kind == 2:  # equal lengths
      lens = np.full(b, rng.integers(0, 9000))
    else:  # outside [0, max_seqlen]: clamped
      lens = rng.integers(-100, max_seqlen + 5000, b)
    lens[rng.random(b) < 0.15] = 0
    out.append((lens.astype(np.int32), s_q, h_q, h_kv, num_sms, page,
                max_seqlen))
  for b, s_q, num_sms, page, below in POURED:
    lens = rng.integers(0, below, b).astype(np.int32)
    out.append((lens, s_q, 128, 1, num_sms, page, 8192))
  return out


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", range(CASES))
def test_device_code_equals_host_code(emulated, case, order):
  lens, s_q, h_q, h_kv, num_sms, page, max_seqlen = _cases()[case]
  cost = CostModel()
  host = [np.asarray(x) for x in device_ffi.plan_arrays(
      jax.device_put(jnp.asarray(lens), jax.devices("cpu")[0]), s_q=s_q,
      h_q=h_q, h_kv=h_kv, page_size=page, max_seqlen=max_seqlen,
      head_dim_v=D_V, num_sms=num_sms, cost=cost)]
  rows = tile_rows(s_q, h_q, h_kv)
  ins = np.zeros(host[0].shape, np.int32)
  seqlens = np.zeros(lens.shape, np.int32)
  info = np.zeros(device_ffi.INFO_WORDS, np.int32)
  input_ns = np.asarray([cost.reduce_input_ns(r, D_V)
                         for r in range(isa.TILE_ROWS + 1)], np.int64)
  emulated(lens.ctypes.data, len(lens), h_kv, len(rows), rows[-1], num_sms,
           ins.shape[1], page, max_seqlen, cost.partial_fixed(),
           cost.reduce_fixed(), cost.page_ns(rows[0], page, D_V),
           cost.page_ns(rows[-1], page, D_V), input_ns.ctypes.data,
           ins.ctypes.data, seqlens.ctypes.data, info.ctypes.data,
           ORDERS[order], case)
  if case >= RANDOM_CASES:
    assert device_ffi.LAYOUTS[host[2][device_ffi.INFO_LAYOUT]] == "uncut"
  np.testing.assert_array_equal(_live(ins), _live(host[0]))
  np.testing.assert_array_equal(seqlens, host[1])
  np.testing.assert_array_equal(info, host[2])


BOUND_CASES = 40


def _bound_cases():
  """Shapes, lengths and prices (each drawn at random: fixed prices from 0,
  input prices that may fall with the rows) for layout B's bound."""
  rng = np.random.default_rng(7)
  out = []
  while len(out) < BOUND_CASES:
    b = int(rng.choice([1, 2, 4, 16, 64, 132, 256]))
    s_q, h_q, h_kv, num_sms, page = _draw_shape(rng, [4, 33, 132, 132, 256])
    rows = tile_rows(s_q, h_q, h_kv)
    if b * h_kv * len(rows) > 1024:
      continue
    kind = rng.integers(0, 4)
    if kind == 0:
      lens = rng.integers(0, 70_000, b)
    elif kind == 1:  # one huge sequence among short ones
      lens = rng.integers(0, 2000, b)
      lens[rng.integers(b)] = int(rng.integers(30_000, 300_000))
    elif kind == 2:  # short: a page costs more than a quota of work
      lens = rng.integers(0, 3 * page, b)
    else:
      lens = np.exp(rng.uniform(0, 12, b)).astype(np.int64)
    fixed = [int(rng.choice([0, 1, 700, 2500])) for _ in range(2)]
    page_ns = [int(rng.integers(1, 400)) for _ in range(2)]
    input_ns = rng.integers(1, 300, isa.TILE_ROWS + 1)
    if rng.random() < 0.5:
      input_ns = np.sort(input_ns)
    out.append((lens.astype(np.int32), h_kv, rows, num_sms, page, fixed,
                page_ns, input_ns.astype(np.int64)))
  return out


@pytest.mark.parametrize("case", range(BOUND_CASES))
def test_layout_b_lower_bound_is_at_most_its_makespan(library, case):
  """The planner skips layout B when LowerBoundB reaches the best makespan
  so far: the bound must hold for every input."""
  lens, h_kv, rows, num_sms, page, fixed, page_ns, input_ns = (
      _bound_cases()[case])
  items = len(lens) * h_kv * len(rows)
  ins = np.zeros((num_sms, 4 + 9 * items // num_sms, isa.INSTRUCTION_WORDS),
                 np.int32)
  seqlens = np.zeros(lens.shape, np.int32)
  info = np.zeros(device_ffi.INFO_WORDS, np.int32)
  out = np.zeros(2, np.int64)
  status = library.TmlaLowerBoundB(
      lens.ctypes.data, len(lens), h_kv, len(rows), rows[-1], num_sms,
      ins.shape[1], page, 1 << 20, fixed[0], fixed[1], page_ns[0],
      page_ns[1], input_ns.ctypes.data, ins.ctypes.data, seqlens.ctypes.data,
      info.ctypes.data, out.ctypes.data)
  assert status == 0, library.TmlaEmulationError().decode()
  makespan, bound = out
  assert bound <= makespan
