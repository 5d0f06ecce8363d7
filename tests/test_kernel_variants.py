"""The kernel variants of csrc/config.h: declared with their defaults, and
all of them compile (where nvcc is present) without spilling in the untimed
kernels of a 16-bit cache and without serialized wgmma.

A variant is a `TMLA_*` macro that selects other code for a kernel change
whose speed is still being measured (docs/architecture.md); the package
build compiles only the defaults, so this is what keeps the others building.
"""

import concurrent.futures
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "csrc" / "config.h"


def _variants():
  """{name: default} of the `#ifndef NAME / #define NAME value` pairs."""
  text = CONFIG.read_text()
  return {
      m.group(1): int(m.group(2))
      for m in re.finditer(
          r"#ifndef (TMLA_\w+)\n#define \1 (\d+)\n#endif", text)
  }


def test_every_variant_is_off_by_default_and_documented():
  variants = _variants()
  assert variants, "csrc/config.h declares no kernel variant"
  text = CONFIG.read_text()
  for name, default in variants.items():
    assert default == 0, f"{name} must default to the measured code (0)"
    assert re.search(rf"^//  {name}: ", text, re.M), (
        f"{name} has no line of its own in config.h's list of variants")


# The mangled names of MlaDecodeKernel<T, false, false> (a 16-bit cache,
# untimed: the kernels that are timed) and <T, true, false> (the timed
# build, with its records' registers).
_UNTIMED = re.compile(r"MlaDecodeKernelI\w+Lb0ELb0EEEv")
_TIMED = re.compile(r"MlaDecodeKernelI\w+Lb1ELb0EEEv")
# What the timed build of a 16-bit cache may spill.
_TIMED_SPILL_BYTES = 16


def _spills(ptxas_log):
  """{kernel: spill-store bytes} of the decode kernels in ptxas's -v log."""
  spills = {}
  kernel = None
  for line in ptxas_log.splitlines():
    m = re.search(r"Compiling entry function '(\w*MlaDecodeKernel\w*)'", line)
    if m:
      kernel = m.group(1)
      continue
    m = re.search(r"(\d+) bytes spill stores", line)
    if m and kernel is not None:
      spills[kernel] = int(m.group(1))
      kernel = None
  return spills


def _compile(defines, cubin):
  nvcc = shutil.which("nvcc")
  name = "+".join(defines) or "defaults"
  cmd = [nvcc, "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a",
         "--expt-relaxed-constexpr", "-Xptxas", "-v", f"-I{ROOT / 'csrc'}",
         *[f"-D{d}=1" for d in defines], "-cubin",
         str(ROOT / "csrc" / "mla_decode.cu"),
         "-o", str(cubin)]
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  return name, result


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_each_variant_compiles_without_spills_or_serialized_mma(tmp_path):
  # The defaults, and every variant on at once (the variants are
  # independent, and together they press hardest on the registers).
  builds = [(), tuple(sorted(_variants()))]
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    results = list(pool.map(
        lambda k: _compile(builds[k], tmp_path / f"build{k}.cubin"),
        range(len(builds))))
  for name, result in results:
    assert result.returncode == 0, f"{name}:\n{result.stderr[-3000:]}"
    # ptxas serializes wgmma when one sits on a path it deems divergent.
    assert "wgmma.mma_async instructions are serialized" not in result.stderr, (
        f"{name}:\n{result.stderr[-3000:]}")
    spills = _spills(result.stderr)
    # The six instantiations: two element types untimed and timed, and the
    # FP8 cache's two.
    assert len(spills) == 6, f"{name}: {sorted(spills)}"
    # A 16-bit cache's kernels spill nothing; their timed build little.
    untimed = {k: v for k, v in spills.items() if _UNTIMED.search(k)}
    timed = {k: v for k, v in spills.items() if _TIMED.search(k)}
    assert len(untimed) == 2 and len(timed) == 2, f"{name}: {sorted(spills)}"
    assert all(v == 0 for v in untimed.values()), f"{name}: {untimed}"
    assert all(v <= _TIMED_SPILL_BYTES for v in timed.values()), (
        f"{name}: {timed}")
