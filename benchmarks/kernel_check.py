"""Compares the CUDA kernel with the reference on a few shapes and prints
where they differ (output vs LSE, per sequence), for kernel development.

  python benchmarks/kernel_check.py
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import jax_thundermla as tmla
from jax_thundermla.workloads import Workload, make_inputs

CASES = (
    Workload("one-block", (64,), s_q=1, h_q=16, causal=False),
    Workload("two-blocks", (128,), s_q=1, h_q=16, causal=False),
    Workload("ragged", (100, 1, 0, 257), s_q=2, h_q=16, causal=True),
    Workload("rows128", (300,), s_q=2, h_q=64, causal=True, page_size=16),
    Workload("split", (20000, 30), s_q=1, h_q=16, causal=False),
)


def main():
  for w in CASES:
    q, caches, table, lens = make_inputs(w, seed=0, dtype=np.float32,
                                         extra_pages=1)
    args = (jnp.asarray(q, jnp.bfloat16), jnp.asarray(caches[0], jnp.bfloat16),
            jnp.asarray(table), jnp.asarray(lens))
    kw = dict(softmax_scale=w.softmax_scale, causal=w.causal)
    want = [np.asarray(x, np.float32) for x in
            tmla.mla_decode(*args, backend="reference", **kw)]
    try:
      got = [np.asarray(x, np.float32) for x in
             tmla.mla_decode(*args, backend="cuda", **kw)]
    except Exception as e:  # pylint: disable=broad-except
      print(f"{w.name:>10}: kernel raised {type(e).__name__}: {e}")
      continue
    for i in range(w.batch):
      o, wo = got[0][i], want[0][i]
      finite = np.isfinite(wo)
      rel = (np.linalg.norm(o[finite] - wo[finite])
             / max(np.linalg.norm(wo[finite]), 1e-30))
      l, wl = got[1][i], want[1][i]
      both = np.isfinite(wl)
      lse_err = np.abs(l[both] - wl[both]).max() if both.any() else 0.0
      inf_ok = np.array_equal(np.isinf(l), np.isinf(wl))
      print(f"{w.name:>10} seq {i} len {w.seqlens[i]:>6}: out rel err"
            f" {rel:.2e}, nan {np.isnan(o).sum()}, lse max err {lse_err:.2e},"
            f" inf pattern {'ok' if inf_ok else 'WRONG'}")


if __name__ == "__main__":
  main()
