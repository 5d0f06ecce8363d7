"""The README's vmap, sharding and export snippets run as written.

They run in one subprocess on 8 fake CPU devices (the sharding snippet's
mesh), in order, as a reader would paste them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

_README = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "README.md")
_SECTION = "## vmap, sharding and export"


def snippets() -> list[str]:
  with open(_README, encoding="utf-8") as f:
    text = f.read()
  start = text.index(_SECTION)
  end = text.find("\n## ", start + len(_SECTION))
  return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_section_has_a_snippet_for_each_transformation():
  blocks = snippets()
  assert len(blocks) == 3
  for block, word in zip(blocks, ("jax.vmap", "NamedSharding",
                                  "export.export")):
    assert word in block


def test_snippets_run_on_8_cpu_devices():
  pytest.importorskip("flatbuffers", reason="jax.export serialization")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(
                 [os.path.dirname(_README), os.environ.get("PYTHONPATH", "")]),
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=8"))
  script = "\n".join(snippets()) + "\nprint('snippets ran')\n"
  run = subprocess.run([sys.executable, "-c", script], env=env,
                       capture_output=True, text=True, timeout=600,
                       check=False)
  assert run.returncode == 0, run.stdout + run.stderr[-5000:]
  assert "snippets ran" in run.stdout
