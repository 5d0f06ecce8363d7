"""The compiled planner's plans, pinned: digests of 400 plans.

``fixtures/planner_digests.json`` holds, per case of ``_cases()``, the
SHA-256 of the plan's live rows (each list up to and including its STOP
row), its clamped lengths and its info words, as the planner made them when
the file was written (on the CPU). A faster planner must make the same plans
bit for bit, on the CPU and on the GPU.
Regenerate only for a deliberate change of the plans:

  PYTHONPATH=$PWD python tests/test_plan_compiled_fixed.py --write
"""

import hashlib
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import requires_gpu
from jax_thundermla.plan import device_ffi
from jax_thundermla.plan import timing
from jax_thundermla.plan.cost import CostModel

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "planner_digests.json"
CASES = 400

pytestmark = pytest.mark.skipif(
    not device_ffi.available(), reason="needs the compiled extension")


def _lengths(rng, b, max_seqlen):
  kind = rng.integers(0, 6)
  if kind == 0:
    lens = rng.integers(0, 8192, b)
  elif kind == 1:
    lens = rng.integers(0, 70_000, b)
  elif kind == 2:  # one huge sequence among short ones
    lens = rng.integers(0, 2000, b)
    lens[rng.integers(b)] = rng.integers(100_000, 1 << 20)
  elif kind == 3:
    lens = (rng.pareto(1.0, b) * 500).astype(np.int64).clip(0, 500_000)
  elif kind == 4:  # equal lengths, some zero
    lens = np.full(b, rng.integers(0, 9000))
  else:  # outside [0, max_seqlen]: clamped
    lens = rng.integers(-100, max_seqlen + 5000, b)
  lens[rng.random(b) < 0.1] = 0
  return lens.astype(np.int32)


def _cases():
  """``CASES`` tuples (lens, s_q, h_q, h_kv, num_sms, page_size, max_seqlen)."""
  rng = np.random.default_rng(2026)
  out = []
  while len(out) < CASES:
    b = int(rng.choice([1, 2, 3, 4, 16, 64, 128, 132, 200, 256]))
    s_q = int(rng.integers(1, 17))
    h_q = int(rng.choice([16, 32, 128]))
    h_kv = int(rng.choice([1, 1, 1, 2]))
    num_sms = int(rng.choice([1, 4, 33, 78, 132, 132, 132, 256]))
    page_size = int(rng.choice([16, 64, 64, 256]))
    max_seqlen = int(rng.choice([1 << 20, 8192, 100_000]))
    out.append((_lengths(rng, b, max_seqlen), s_q, h_q, h_kv, num_sms,
                page_size, max_seqlen))
  return out


def _digest(lens, s_q, h_q, h_kv, num_sms, page_size, max_seqlen,
            device=None):
  lens = jax.device_put(jnp.asarray(lens), device)
  ins, seqlens, info = (np.asarray(x) for x in device_ffi.plan_arrays(
      lens, s_q=s_q, h_q=h_q, h_kv=h_kv, page_size=page_size,
      max_seqlen=max_seqlen, head_dim_v=512, num_sms=num_sms,
      cost=CostModel()))
  upto = np.minimum(timing.live_mask(ins).sum(1) + 1, ins.shape[1])
  keep = np.arange(ins.shape[1])[None, :] < upto[:, None]
  live = np.where(keep[..., None], ins, 0).astype("<i4")
  h = hashlib.sha256()
  for part in (live, seqlens.astype("<i4"), info.astype("<i4")):
    h.update(part.tobytes())
  return h.hexdigest()


def _check(device):
  want = json.loads(FIXTURE.read_text())
  assert len(want) == CASES
  for k, case in enumerate(_cases()):
    assert _digest(*case, device=device) == want[k], (
        k, case[0].tolist(), case[1:])


def test_cpu_plans_equal_the_pinned_digests():
  _check(jax.devices("cpu")[0])


@pytest.mark.gpu
@requires_gpu
def test_gpu_plans_equal_the_pinned_digests():
  _check(jax.devices("gpu")[0])


if __name__ == "__main__":
  if sys.argv[1:] != ["--write"]:
    sys.exit(__doc__)
  cpu = jax.devices("cpu")[0]
  FIXTURE.write_text(json.dumps([_digest(*c, device=cpu) for c in _cases()],
                                indent=0) + "\n")
