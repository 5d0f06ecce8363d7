"""The built extension carries the MLA decode kernel as sm_90a code.

``tools/check_wheel.py`` checks a wheel (and installs it into a fresh
environment); here its inspection runs on the extension this install built,
wherever one was built (nvcc present), GPU or not.
"""

from __future__ import annotations

import os
import sys

import pytest

from jax_thundermla import _ffi

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "tools"))
import check_wheel  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.skipif(not _ffi.extension_available(),
                    reason="the CUDA extension was not built here (no nvcc)")
@pytest.mark.parametrize("use_cuobjdump", [True, False])
def test_extension_has_sm90a_kernel(monkeypatch, use_cuobjdump):
  if not use_cuobjdump:
    monkeypatch.setattr(check_wheel, "_cuobjdump", lambda: None)
  elif check_wheel._cuobjdump() is None:  # pylint: disable=protected-access
    pytest.skip("cuobjdump not found")
  images = check_wheel.check_extension(_ffi._C.__file__)  # pylint: disable=protected-access
  assert images


def test_a_library_without_device_code_fails(tmp_path, monkeypatch):
  monkeypatch.setattr(check_wheel, "_cuobjdump", lambda: None)
  fake = tmp_path / "_C.so"
  fake.write_bytes(b"\x7fELF" + bytes(60) + b"-arch sm_80 ")
  with pytest.raises(SystemExit, match="no sm_90a code"):
    check_wheel.check_extension(str(fake))
