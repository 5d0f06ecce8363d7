"""csrc/isa.h and jax_thundermla/isa.py define the same constants."""

import pathlib
import re

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


def test_fields_fit_an_instruction():
  fields = {n: v for n, v in _python_constants().items()
            if n.startswith("FIELD_")}
  assert all(0 <= v < isa.INSTRUCTION_WORDS for v in fields.values())
  shared = {v for n, v in fields.items()
            if n not in ("FIELD_KV_START", "FIELD_KV_END", "FIELD_SRC_SLOT",
                         "FIELD_NUM_SRC")}
  assert len(shared) == len(fields) - 4, "shared fields overlap"


def test_workspace_words():
  assert isa.workspace_words(3, 5, 512) == 3 * isa.TILE_ROWS * 513 + 5
