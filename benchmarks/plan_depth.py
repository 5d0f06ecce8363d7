r"""Serial depth of the device planner, measured on the CPU.

The device planner is one CTA whose time follows its serial depth: the
block barriers it crosses and the instructions a warp issues between them.
This script builds ``csrc/tests/planner_emulation.cc`` (the device code run
on the CPU, one context per thread) with ``-fsanitize-coverage=trace-pc``
and plans each workload of ``plan_device_speed.py`` once: per plan the
barriers, and summed over the phases between barriers the most basic blocks
(of -O0 host code: an instruction proxy) and shuffles of any one thread.
Needs a host C++ compiler, no GPU.

  python benchmarks/plan_depth.py
  python benchmarks/plan_depth.py --workloads=W2 --batches=256
"""

from __future__ import annotations

import ctypes
import pathlib
import shutil
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
import numpy as np

from jax_thundermla import isa
from jax_thundermla.plan import device_ffi
from jax_thundermla.plan.cost import CostModel
from jax_thundermla.plan.plan import DEFAULT_NUM_SMS
from jax_thundermla.plan.problem import tile_rows
from jax_thundermla.workloads import WORKLOADS, Workload

import common

_WORKLOADS = flags.DEFINE_list("workloads", sorted(WORKLOADS),
                               "Workloads to plan.")
_BATCHES = flags.DEFINE_list("batches", ["1", "64", "256"],
                             "Extra random workloads of these batch sizes.")
_NUM_SMS = flags.DEFINE_integer("num_sms", DEFAULT_NUM_SMS, "SMs of the plan.")

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
# Threads resumed in thread order (planner_emulation.cc's emu::Order).
ASCENDING = 1


def _build(directory: pathlib.Path):
  cxx = shutil.which("g++") or shutil.which("clang++")
  if cxx is None:
    sys.exit("plan_depth.py needs a host C++ compiler")
  lib = directory / "planner_depth.so"
  subprocess.run(
      [cxx, "-std=c++17", "-O0", "-shared", "-fPIC", "-Wno-unknown-pragmas",
       "-fsanitize-coverage=trace-pc", f"-I{CSRC}",
       str(CSRC / "tests" / "planner_emulation.cc"), "-o", str(lib)],
      check=True)
  dll = ctypes.CDLL(str(lib))
  i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
  dll.TmlaPlanEmulated.argtypes = [ptr, *[i32] * 8, *[i64] * 4, ptr, ptr,
                                   ptr, ptr, i32, ctypes.c_uint32]
  dll.TmlaPlanEmulated.restype = ctypes.c_int
  dll.TmlaEmulationError.restype = ctypes.c_char_p
  return dll


def _depth(dll, w: Workload, num_sms: int):
  """(barriers, basic blocks, shuffles, layout) of planning w."""
  cost = CostModel()
  rows = tile_rows(w.s_q, w.h_q, w.h_kv)
  cap, _, _ = device_ffi.capacities(w.batch, w.s_q, w.h_q, w.h_kv, num_sms)
  lens = np.asarray(w.seqlens, np.int32)
  ins = np.zeros((num_sms, cap, isa.INSTRUCTION_WORDS), np.int32)
  seqlens = np.zeros(lens.shape, np.int32)
  info = np.zeros(device_ffi.INFO_WORDS, np.int32)
  input_ns = np.asarray([cost.reduce_input_ns(r, w.d_v)
                         for r in range(isa.TILE_ROWS + 1)], np.int64)
  status = dll.TmlaPlanEmulated(
      lens.ctypes.data, w.batch, w.h_kv, len(rows), rows[-1], num_sms, cap,
      w.page_size, w.max_pages() * w.page_size, cost.partial_fixed(),
      cost.reduce_fixed(), cost.page_ns(rows[0], w.page_size, w.d_v),
      cost.page_ns(rows[-1], w.page_size, w.d_v), input_ns.ctypes.data,
      ins.ctypes.data, seqlens.ctypes.data, info.ctypes.data, ASCENDING, 0)
  if status != 0:
    sys.exit(f"{w.name}: {dll.TmlaEmulationError().decode()}")
  depth = (ctypes.c_int64 * 3)()
  dll.TmlaEmulationDepth(depth)
  return (*depth, device_ffi.LAYOUTS[info[device_ffi.INFO_LAYOUT]])


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as directory:
    dll = _build(pathlib.Path(directory))
    batches = [int(x) for x in _BATCHES.value]
    print(f"{_NUM_SMS.value} SMs; per plan: block barriers, and summed over"
          " the phases the most basic blocks and shuffles of a thread")
    print("| workload | b | items | layout | barriers | basic blocks |"
          " shuffles |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for w in ([WORKLOADS[n] for n in _WORKLOADS.value]
              + common.random_workloads(batches)):
      barriers, blocks, shuffles, layout = _depth(dll, w, _NUM_SMS.value)
      items = w.batch * w.h_kv * len(tile_rows(w.s_q, w.h_q, w.h_kv))
      print(f"| {w.name} | {w.batch} | {items} | {layout} | {barriers} |"
            f" {blocks} | {shuffles} |")


if __name__ == "__main__":
  app.run(main)
