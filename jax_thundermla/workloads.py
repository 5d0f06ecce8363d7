"""Named decode workloads, shared by tests, benchmarks and examples.

W1-W6 are the DeepSeek-V3/R1 absorbed-MLA decode shapes whose peer timings
are recorded in the project's performance anchors (H100 SXM, bf16, page size
64, causal, one latent KV head of 576 = 512 + 64 rope).
"""

from __future__ import annotations

import dataclasses

import numpy as np

DEEPSEEK_D_QK = 576
DEEPSEEK_D_V = 512

W3_LENS = (
    871, 568, 711, 329, 617, 1015, 348, 978, 543, 837, 650, 1020, 924, 679,
    560, 497, 650, 406, 381, 423, 511, 423, 569, 943, 645, 820, 829, 883, 937,
    765, 711, 847, 722, 546, 519, 279, 516, 315, 664, 845, 850, 546, 670, 871,
    527, 329, 446, 764, 582, 1011, 453, 655, 532, 985, 1019, 810, 317, 305,
    949, 317, 669, 768, 530, 349,
)


@dataclasses.dataclass(frozen=True)
class Workload:
  """One decode step's shapes.

  Attributes:
    name: short identifier, e.g. ``"W1"``.
    seqlens: tokens in the cache per sequence, the ``s_q`` new ones included.
    s_q: new query tokens per sequence.
    h_q: query heads.
    h_kv: KV heads (1 for MLA).
    d_qk: query/key head dim (``d_v + 64``).
    d_v: value head dim.
    page_size: tokens per cache page.
    causal: bottom-right causal masking.
  """

  name: str
  seqlens: tuple[int, ...]
  s_q: int
  h_q: int
  h_kv: int = 1
  d_qk: int = DEEPSEEK_D_QK
  d_v: int = DEEPSEEK_D_V
  page_size: int = 64
  causal: bool = True

  def __post_init__(self):
    if not self.seqlens:
      raise ValueError(f"workload {self.name!r}: seqlens is empty")
    if min(self.seqlens) < 0:
      raise ValueError(f"workload {self.name!r}: negative length in seqlens")
    for field in ("s_q", "h_q", "h_kv", "d_qk", "d_v", "page_size"):
      if getattr(self, field) < 1:
        raise ValueError(
            f"workload {self.name!r}: {field} must be >= 1, got"
            f" {getattr(self, field)}")

  @property
  def batch(self) -> int:
    return len(self.seqlens)

  @property
  def softmax_scale(self) -> float:
    return self.d_qk ** -0.5

  def _bytes_moved(self, kv_entry_bytes: int) -> int:
    """KV read once (``kv_entry_bytes`` per token and KV head), 16-bit q
    read and out written."""
    rows = self.batch * self.s_q * self.h_q
    kv = sum(self.seqlens) * self.h_kv * kv_entry_bytes
    return kv + (rows * self.d_qk + rows * self.d_v) * 2

  @property
  def bytes_moved(self) -> int:
    """Fewest bytes a decode must move (KV read once, q read, out written)."""
    return self._bytes_moved(self.d_qk * 2)

  @property
  def bytes_moved_fp8(self) -> int:
    """The same with an FP8 cache (``isa.FP8_ENTRY_BYTES`` per token and KV
    head; q and out stay 16-bit)."""
    from jax_thundermla import isa  # pylint: disable=g-import-not-at-top
    return self._bytes_moved(isa.FP8_ENTRY_BYTES)

  @property
  def flops(self) -> int:
    """Matrix FLOPs of QK^T and PV over every cached token."""
    return 2 * self.s_q * self.h_q * sum(self.seqlens) * (self.d_qk + self.d_v)

  def max_pages(self) -> int:
    return max(1, -(-max(self.seqlens) // self.page_size))


WORKLOADS: dict[str, Workload] = {
    w.name: w for w in (
        Workload("W1", (4641, 45118, 1730, 1696), s_q=4, h_q=16),
        Workload("W2", (65536,), s_q=1, h_q=16),
        Workload("W3", W3_LENS, s_q=4, h_q=16),
        Workload("W4", (512,) * 64, s_q=2, h_q=16),
        Workload("W5", (4096,) * 132, s_q=4, h_q=16),
        Workload("W6", (4096,) * 128, s_q=1, h_q=128),
    )
}

# FlashMLA's per-call device time on an H100 SXM (CUDA graph of 8 layers),
# the project's targets are measured against it.
FLASHMLA_H100_US = {"W1": 45.0, "W2": 44.5, "W3": 40.4, "W4": 30.2,
                    "W5": 224.0, "W6": 278.3}


def make_inputs(workload: Workload, *, seed: int = 0, dtype=np.float32,
                num_caches: int = 1, extra_pages: int = 0):
  """Random paged inputs for a workload, as numpy arrays.

  Pages are assigned in a random permutation; unused cache slots (past a
  sequence's length) and unreferenced pages are NaN, and table padding holds
  out-of-range page ids, so that a kernel reading anything it must not read
  produces NaN.

  Args:
    workload: the shapes.
    seed: random seed.
    dtype: numpy dtype of q and the caches (use ml_dtypes.bfloat16 for bf16).
    num_caches: how many independent KV caches to draw (benchmarks rotate
      over several to keep L2 cold).
    extra_pages: unreferenced NaN pages added to the pool.

  Returns:
    ``(q, kv_caches, block_table, cache_seqlens)`` with shapes
    ``[b, s_q, h_q, d_qk]``, a list of ``num_caches`` arrays
    ``[num_pages, page_size, h_kv, d_qk]``, ``[b, max_pages]`` int32 and
    ``[b]`` int32.
  """
  rng = np.random.default_rng(seed)
  w = workload
  pages_per_seq = [-(-n // w.page_size) for n in w.seqlens]
  max_pages = w.max_pages()
  num_used = sum(pages_per_seq)
  num_pages = num_used + extra_pages
  perm = rng.permutation(num_pages).astype(np.int32)
  block_table = np.full((w.batch, max_pages), num_pages + 7, np.int32)
  pos = 0
  for i, n in enumerate(pages_per_seq):
    block_table[i, :n] = perm[pos:pos + n]
    pos += n
  q = rng.standard_normal((w.batch, w.s_q, w.h_q, w.d_qk)).astype(dtype)
  caches = []
  for _ in range(num_caches):
    kv = np.full((num_pages, w.page_size, w.h_kv, w.d_qk), np.nan, np.float32)
    for i, n in enumerate(w.seqlens):
      for p in range(pages_per_seq[i]):
        valid = min(w.page_size, n - p * w.page_size)
        kv[block_table[i, p], :valid] = rng.standard_normal(
            (valid, w.h_kv, w.d_qk))
    caches.append(kv.astype(dtype))
  seqlens = np.asarray(w.seqlens, np.int32)
  return q, caches, block_table, seqlens


def device_inputs(workload: Workload, *, seed: int = 0, dtype=None,
                  num_caches: int = 1):
  """Random paged inputs drawn on JAX's default device (for benchmarks).

  Same layout as ``make_inputs`` (permuted pages, out-of-range ids in the
  table padding) but generated with ``jax.random``, so large workloads cost
  no host memory or transfer.

  Returns:
    ``(q, kv_caches, block_table, cache_seqlens)`` as jax arrays.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  dtype = jnp.bfloat16 if dtype is None else dtype
  w = workload
  pages_per_seq = np.asarray([-(-n // w.page_size) for n in w.seqlens])
  max_pages = w.max_pages()
  num_pages = max(1, int(pages_per_seq.sum()))
  perm = np.random.default_rng(seed).permutation(num_pages).astype(np.int32)
  table = np.full((w.batch, max_pages), num_pages + 7, np.int32)
  starts = np.concatenate([[0], np.cumsum(pages_per_seq)])
  for i, n in enumerate(pages_per_seq):
    table[i, :n] = perm[starts[i]:starts[i] + n]
  keys = jax.random.split(jax.random.key(seed), num_caches + 1)
  q = jax.random.normal(keys[0], (w.batch, w.s_q, w.h_q, w.d_qk), dtype)
  caches = [jax.random.normal(k, (num_pages, w.page_size, w.h_kv, w.d_qk),
                              dtype) for k in keys[1:]]
  return (q, caches, jnp.asarray(table),
          jnp.asarray(np.asarray(w.seqlens, np.int32)))
