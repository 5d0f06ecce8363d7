"""csrc/isa.h and jax_thundermla/isa.py define the same constants."""

import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest

from jax_thundermla import isa

HEADER = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "isa.h"
_CONSTANT = re.compile(
    r"^\s*constexpr\s+int32_t\s+k(\w+)\s*=\s*(-?\d+)\s*;", re.MULTILINE)


def _snake(camel: str) -> str:
  """``OpPartial`` -> ``OP_PARTIAL``, ``IsaVersion`` -> ``ISA_VERSION``."""
  return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).upper()


def _header_constants() -> dict[str, int]:
  found = {}
  for camel, value in _CONSTANT.findall(HEADER.read_text()):
    name = _snake(camel)
    assert name not in found, f"k{camel} is defined twice in {HEADER}"
    found[name] = int(value)
  return found


def _python_constants() -> dict[str, int]:
  return {name: value for name, value in vars(isa).items()
          if re.fullmatch(r"[A-Z][A-Z0-9_]*", name)
          and isinstance(value, int)}


def test_snake_case():
  assert _snake("OpPartial") == "OP_PARTIAL"
  assert _snake("FieldKvStart") == "FIELD_KV_START"
  assert _snake("IsaVersion") == "ISA_VERSION"


def test_header_is_parsed():
  constants = _header_constants()
  for name in ("ISA_VERSION", "INSTRUCTION_WORDS", "OP_STOP", "OP_PARTIAL",
               "OP_REDUCE", "FIELD_KV_START", "FINAL_OUTPUT", "NO_COUNTER"):
    assert name in constants


def test_every_header_constant_is_mirrored():
  header, python = _header_constants(), _python_constants()
  missing = sorted(set(header) - set(python))
  assert not missing, f"in csrc/isa.h but not in isa.py: {missing}"
  wrong = {n: (header[n], python[n]) for n in header if header[n] != python[n]}
  assert not wrong, f"(header, python) values differ: {wrong}"


def test_no_python_constant_is_missing_from_the_header():
  extra = sorted(set(_python_constants()) - set(_header_constants()))
  assert not extra, f"in isa.py but not in csrc/isa.h: {extra}"


def test_fp8_entry_layout_is_contiguous():
  """The FP8 cache entry is latent fp8 bytes, then float32 scales, then
  bfloat16 rope, back to back, with one scale per group of latent values."""
  header = _header_constants()
  for name in ("FP8_ENTRY_BYTES", "FP8_SCALE_GROUP", "FP8_NUM_SCALES",
               "FP8_SCALES_OFFSET", "FP8_ROPE_OFFSET"):
    assert name in header
  assert isa.FP8_NUM_SCALES * isa.FP8_SCALE_GROUP == isa.HEAD_DIM_V
  assert isa.FP8_SCALES_OFFSET == isa.HEAD_DIM_V * 1  # one byte a value
  assert isa.FP8_ROPE_OFFSET == isa.FP8_SCALES_OFFSET + 4 * isa.FP8_NUM_SCALES
  assert isa.FP8_ENTRY_BYTES == isa.FP8_ROPE_OFFSET + 2 * isa.ROPE_DIM
  assert isa.FP8_ENTRY_BYTES == 656  # FlashMLA's bytes per token


def test_each_opcode_has_distinct_words():
  """Within PARTIAL and within REDUCE no two fields share a word, and every
  header field is named by exactly one of the named views."""
  header = {n: v for n, v in _header_constants().items()
            if n.startswith("FIELD_")}
  for own in (isa.PARTIAL_FIELDS, isa.REDUCE_FIELDS):
    words = {**isa.COMMON_FIELDS, **own}
    assert len(set(words.values())) == len(words), own
    assert all(0 <= w < isa.INSTRUCTION_WORDS for w in words.values())
  named = {**isa.COMMON_FIELDS, **isa.PARTIAL_FIELDS, **isa.REDUCE_FIELDS}
  assert {"FIELD_" + n.upper(): w for n, w in named.items()} == header


def test_fields_read_and_write_by_name():
  words = np.zeros((2, 3, isa.INSTRUCTION_WORDS), np.int32)
  f = isa.Fields(words)
  f.kv_end = 7
  f.slot_row = np.arange(3)
  assert (words[..., isa.FIELD_KV_END] == 7).all()
  np.testing.assert_array_equal(words[1, :, isa.FIELD_SLOT_ROW], [0, 1, 2])
  assert (isa.Fields(words).num_src == 7).all()  # REDUCE's name, same word
  with pytest.raises(AttributeError, match="no field 'kv_begin'"):
    _ = f.kv_begin
  with pytest.raises(AttributeError, match="no field"):
    f.kv_begin = 1
  rows = isa.pack(np, np.int32, 2, opcode=isa.OP_REDUCE, src_slot=[3, 4])
  np.testing.assert_array_equal(isa.Fields(rows).src_slot, [3, 4])
  assert (isa.Fields(rows).opcode == isa.OP_REDUCE).all()
  with pytest.raises(TypeError, match="kv_begin"):
    isa.pack(np, np.int32, 1, kv_begin=0)


_LAYOUT_PROGRAM = r"""
#include <cstdio>
#include "isa.h"
int main() {
  long long n, c, d;
  while (std::scanf("%lld %lld %lld", &n, &c, &d) == 3) {
    std::printf("%lld %lld %lld\n",
                (long long)tmla::isa::WorkspacePartialLse(n, d),
                (long long)tmla::isa::WorkspaceCounters(n, d),
                (long long)tmla::isa::WorkspaceWords(n, c, d));
  }
  return 0;
}
"""

_LAYOUT_CASES = [(0, 0, 512), (1, 0, 512), (3, 5, 512), (7, 1, 32),
                 (1000, 333, 512), (1 << 20, 1 << 16, 512)]


def test_workspace_layout_matches_the_header(tmp_path):
  """Python's workspace offsets equal isa.h's, computed by a host program
  compiled from the header itself."""
  cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  if cxx is None:
    pytest.skip("no host C++ compiler")
  src = tmp_path / "layout.cc"
  src.write_text(_LAYOUT_PROGRAM)
  exe = tmp_path / "layout"
  subprocess.run([cxx, "-std=c++17", f"-I{HEADER.parent}", str(src), "-o",
                  str(exe)], check=True, capture_output=True)
  stdin = "".join(f"{n} {c} {d}\n" for n, c, d in _LAYOUT_CASES)
  out = subprocess.run([str(exe)], input=stdin, capture_output=True,
                       text=True, check=True).stdout.split("\n")
  for (n, c, d), line in zip(_LAYOUT_CASES, out, strict=False):
    layout = isa.workspace_layout(n, c, d)
    assert (layout.partial_lse, layout.counters, layout.words) == tuple(
        int(v) for v in line.split()), (n, c, d)
    assert isa.workspace_words(n, c, d) == layout.words
  assert len([l for l in out if l]) == len(_LAYOUT_CASES)
