"""Checks a built wheel: the CUDA extension with sm_90a code, installable.

  python -m pip wheel --no-build-isolation --no-deps -w dist .
  python tools/check_wheel.py dist/jax_thundermla-*.whl

1. The wheel holds ``jax_thundermla/_C*.so``.
2. The extension carries an sm_90a cubin of the MLA decode kernel
   (``cuobjdump --list-elf`` where cuobjdump is found, else the cubins
   embedded in the library are read directly).
3. Installed with ``--no-deps`` into a fresh virtual environment (which sees
   this interpreter's packages for jax, numpy and absl: the extension is
   built against this jax's FFI headers), it imports from there, its
   instruction-set version matches the Python package's, and its FFI targets
   register.

Exits non-zero with the reason on the first failed check.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

ARCH = "sm_90a"
KERNEL = "mla_decode"
_EM_CUDA = 190  # ELF e_machine of a CUDA cubin.

_IMPORT_CHECK = """
import os, sys
import jax_thundermla as tmla
from jax_thundermla import _ffi, isa
assert tmla.__file__.startswith(sys.prefix), tmla.__file__
assert _ffi.extension_available(), _ffi._IMPORT_ERROR
assert int(_ffi._C.isa_version()) == isa.ISA_VERSION
names = _ffi.register_targets()
assert "tmla_mla_decode" in names, names
print("installed:", os.path.dirname(tmla.__file__), names)
"""


def _cuobjdump() -> str | None:
  found = shutil.which("cuobjdump")
  if found:
    return found
  site = sysconfig.get_paths()["purelib"]
  candidates = sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin",
                                             "cuobjdump")))
  return candidates[0] if candidates else None


def embedded_cubins(library: bytes) -> list[bytes]:
  """The CUDA ELF images (cubins) embedded in a host shared library."""
  cubins, at = [], library.find(b"\x7fELF", 1)
  while at > 0:
    if int.from_bytes(library[at + 18:at + 20], "little") == _EM_CUDA:
      cubins.append(library[at:])
    at = library.find(b"\x7fELF", at + 1)
  return cubins


def sm90a_kernel_images(path: str) -> list[str]:
  """Names (or descriptions) of the library's sm_90a cubins.

  Args:
    path: the extension's shared library.

  Returns:
    One entry per sm_90a cubin found.
  """
  tool = _cuobjdump()
  if tool:
    listing = subprocess.run([tool, "--list-elf", path], capture_output=True,
                             text=True, check=True).stdout
    return [line.split(":")[-1].strip() for line in listing.splitlines()
            if f".{ARCH}.cubin" in line]
  with open(path, "rb") as f:
    data = f.read()
  # Each cubin records the options it was compiled with, "-arch sm_90a".
  return [f"cubin {i} (-arch {ARCH})"
          for i, cubin in enumerate(embedded_cubins(data))
          if f"-arch {ARCH} ".encode() in cubin[:1 << 24]]


def check_extension(path: str) -> list[str]:
  """Raises SystemExit unless the library holds the kernel for sm_90a."""
  images = sm90a_kernel_images(path)
  if not images:
    sys.exit(f"{path}: no {ARCH} code")
  if _cuobjdump() and not any(KERNEL in name for name in images):
    sys.exit(f"{path}: {ARCH} cubins {images}, none of {KERNEL}")
  return images


def check_wheel(wheel: str, *, install: bool = True) -> None:
  """Runs every check on one wheel; raises SystemExit on a failure."""
  with zipfile.ZipFile(wheel) as z:
    libs = [n for n in z.namelist()
            if n.startswith("jax_thundermla/_C") and n.endswith(".so")]
    if len(libs) != 1:
      sys.exit(f"{wheel}: expected one jax_thundermla/_C*.so, found {libs}")
    with tempfile.TemporaryDirectory() as tmp:
      print(f"{libs[0]}: {ARCH} code in",
            check_extension(z.extract(libs[0], tmp)))
  if not install:
    return
  with tempfile.TemporaryDirectory() as tmp:
    venv = os.path.join(tmp, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages",
                    venv], check=True)
    python = os.path.join(venv, "bin", "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-index", os.path.abspath(wheel)], check=True)
    # From an empty directory, so that a source checkout cannot shadow it.
    subprocess.run([python, "-c", _IMPORT_CHECK], cwd=tmp, check=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("wheel")
  parser.add_argument("--no-install", action="store_true",
                      help="only inspect the wheel")
  args = parser.parse_args()
  check_wheel(args.wheel, install=not args.no_install)
  print("wheel OK")


if __name__ == "__main__":
  main()
