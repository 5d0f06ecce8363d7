"""Paged latent KV cache: a host page allocator and an in-jit append.

One cache entry per token is ``[c_kv | k_pe]`` (512 + 64 = 576 wide for
DeepSeek-V3), shared by all heads. A layer's cache is an array
``[num_pages, page_size, 1, latent_dim]``: ``mla_decode``'s ``kv_cache`` with
``h_kv = 1``. Every layer has its own array; all layers share one block table
(a sequence's page ids are the same in every layer).

An FP8 cache (``dtype=FP8``) holds each 576-wide entry quantized in
FlashMLA's 656-byte layout (``jax_thundermla.quantize_kv``): a uint8 array
``[num_pages, page_size, 1, 656]``, half the bytes; ``append_latent``
quantizes the new entries as it writes them.
"""

from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_thundermla import fp8_cache

# init_cache's dtype for an FP8 cache (DeepSeekConfig's kv_cache_dtype).
FP8 = "fp8"


class OutOfPagesError(RuntimeError):
  """The allocator has fewer free pages than a request needs."""


def _require_int(name: str, value) -> None:
  """Python or numpy integers only: no bools, floats or strings."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}")


class PageAllocator:
  """Host-side owner of a cache's pages: a free list and per-sequence tables.

  Pages are handed out from a free list and returned to it when a sequence is
  freed. Requests are all-or-nothing: a request that does not fit raises
  ``OutOfPagesError`` and changes nothing.

  Example::

    alloc = PageAllocator(num_pages=1024, page_size=64)
    alloc.allocate(["a", "b"], [100, 7])      # room for 100 and 7 tokens
    alloc.grow("b", 8)                        # room for one more token
    table = alloc.block_table(["a", "b"])     # int32 [2, max_pages]
    alloc.free("a")
  """

  def __init__(self, num_pages: int, page_size: int):
    """Creates an allocator over pages ``0 .. num_pages - 1``, all free.

    Args:
      num_pages: pages in the cache.
      page_size: tokens per page.

    Raises:
      TypeError: a size that is not an int.
      ValueError: a size below 1.
    """
    _require_int("num_pages", num_pages)
    _require_int("page_size", page_size)
    if num_pages < 1 or page_size < 1:
      raise ValueError(
          f"num_pages and page_size must be >= 1, got {num_pages} and"
          f" {page_size}")
    self.num_pages = int(num_pages)
    self.page_size = int(page_size)
    # Popped from the end: page 0 is handed out first.
    self._free = list(range(self.num_pages - 1, -1, -1))
    self._pages: dict[Hashable, list[int]] = {}
    self._lengths: dict[Hashable, int] = {}

  @property
  def num_free(self) -> int:
    """Pages not owned by any sequence."""
    return len(self._free)

  @property
  def pad_id(self) -> int:
    """The page id padding block tables: ``num_pages``, out of range."""
    return self.num_pages

  def pages_for(self, num_tokens: int) -> int:
    """Pages that hold ``num_tokens`` tokens."""
    return -(-num_tokens // self.page_size)

  def _need(self, seq_id: Hashable, length: int) -> int:
    return self.pages_for(length) - len(self._pages.get(seq_id, ()))

  def _take(self, requests: Sequence[tuple[Hashable, int]]) -> None:
    needed = sum(max(0, self._need(s, n)) for s, n in requests)
    if needed > len(self._free):
      raise OutOfPagesError(
          f"need {needed} more pages of {self.page_size} tokens, only"
          f" {len(self._free)} of {self.num_pages} are free")
    for seq_id, length in requests:
      pages = self._pages.setdefault(seq_id, [])
      for _ in range(self._need(seq_id, length)):
        pages.append(self._free.pop())
      self._lengths[seq_id] = length

  def allocate(self, seq_ids: Sequence[Hashable],
               lengths: Sequence[int]) -> None:
    """Adds new sequences with room for ``lengths`` tokens each.

    Args:
      seq_ids: identifiers of sequences not yet in the allocator.
      lengths: tokens each one holds (>= 0), same length as ``seq_ids``.

    Raises:
      TypeError: a length that is not an int.
      ValueError: mismatched lengths, a negative length, or an id that is
        already allocated or repeated.
      OutOfPagesError: not enough free pages (nothing is allocated).
    """
    seq_ids, lengths = list(seq_ids), list(lengths)
    for length in lengths:
      _require_int("lengths", length)
    lengths = [int(n) for n in lengths]
    if len(seq_ids) != len(lengths):
      raise ValueError(
          f"seq_ids and lengths must have the same length, got"
          f" {len(seq_ids)} and {len(lengths)}")
    if len(set(seq_ids)) != len(seq_ids):
      raise ValueError(f"seq_ids has repeated ids: {seq_ids}")
    for seq_id, length in zip(seq_ids, lengths):
      if seq_id in self._pages:
        raise ValueError(f"sequence {seq_id!r} is already allocated")
      if length < 0:
        raise ValueError(
            f"length of sequence {seq_id!r} must be >= 0, got {length}")
    self._take(list(zip(seq_ids, lengths)))

  def grow(self, seq_id: Hashable, length: int) -> None:
    """Makes room for ``length`` tokens in total in an existing sequence.

    Args:
      seq_id: an allocated sequence.
      length: its new length, not below the current one.

    Raises:
      KeyError: unknown sequence.
      TypeError: ``length`` is not an int.
      ValueError: ``length`` below the current length.
      OutOfPagesError: not enough free pages (nothing changes).
    """
    _require_int("length", length)
    current = self.length(seq_id)
    if length < current:
      raise ValueError(
          f"sequence {seq_id!r} cannot shrink from {current} to {length}"
          f" tokens")
    self._take([(seq_id, int(length))])

  def free(self, seq_id: Hashable) -> None:
    """Returns a sequence's pages to the free list and forgets it.

    Raises:
      KeyError: unknown sequence.
    """
    pages = self._pages.pop(self._known(seq_id))
    del self._lengths[seq_id]
    self._free.extend(reversed(pages))

  def _known(self, seq_id: Hashable) -> Hashable:
    if seq_id not in self._pages:
      raise KeyError(f"sequence {seq_id!r} is not allocated")
    return seq_id

  def length(self, seq_id: Hashable) -> int:
    """Tokens the sequence holds (the ``cache_seqlens`` entry)."""
    return self._lengths[self._known(seq_id)]

  def pages(self, seq_id: Hashable) -> list[int]:
    """The sequence's page ids, in token order."""
    return list(self._pages[self._known(seq_id)])

  def block_table(self, seq_ids: Iterable[Hashable],
                  max_pages: int | None = None) -> np.ndarray:
    """Block table of a batch, padded with ``pad_id``.

    Args:
      seq_ids: the batch's sequences, in batch order.
      max_pages: table width; default the most pages any of them holds.
        A fixed width keeps the decode step's shapes, and its compilation,
        the same from step to step.

    Returns:
      int32 [b, max_pages].

    Raises:
      KeyError: unknown sequence.
      TypeError: ``max_pages`` is not an int.
      ValueError: a sequence holds more than ``max_pages`` pages.
    """
    if max_pages is not None:
      _require_int("max_pages", max_pages)
    rows = [self._pages[self._known(s)] for s in seq_ids]
    width = max((len(r) for r in rows), default=0)
    if max_pages is None:
      max_pages = max(width, 1)
    elif width > max_pages:
      raise ValueError(
          f"max_pages must be >= {width} (pages of the longest sequence),"
          f" got {max_pages}")
    table = np.full((len(rows), max_pages), self.pad_id, np.int32)
    for i, row in enumerate(rows):
      table[i, :len(row)] = row
    return table

  def seqlens(self, seq_ids: Iterable[Hashable]) -> np.ndarray:
    """int32 [b]: the batch's lengths (``cache_seqlens``)."""
    return np.array([self.length(s) for s in seq_ids], np.int32)


def init_cache(num_pages: int, page_size: int, latent_dim: int,
               dtype=jnp.bfloat16, *, fill: float = 0.0) -> jax.Array:
  """One layer's cache.

  Args:
    num_pages: pages.
    page_size: tokens per page (a multiple of 16 up to 256).
    latent_dim: entry width, ``kv_lora_rank + 64``.
    dtype: bfloat16 or float16, or ``FP8`` (``"fp8"``): FlashMLA's FP8
      layout, uint8 (``latent_dim`` must then be 576).
    fill: initial value of every slot (quantized for an FP8 cache); slots a
      sequence does not hold are never read, whatever they contain.

  Returns:
    [num_pages, page_size, 1, latent_dim], or uint8
    [num_pages, page_size, 1, 656] for ``FP8``.

  Raises:
    ValueError: ``FP8`` with a ``latent_dim`` other than 576.
  """
  if isinstance(dtype, str) and dtype == FP8:
    if latent_dim != fp8_cache.ENTRY_DIM:
      raise ValueError(
          f"an FP8 cache holds {fp8_cache.ENTRY_DIM}-wide entries (512"
          f" latent + 64 rope), got latent_dim {latent_dim}")
    entry = fp8_cache.quantize_kv(
        jnp.full((latent_dim,), fill, jnp.float32))
    return jnp.broadcast_to(entry, (num_pages, page_size, 1, entry.size))
  return jnp.full((num_pages, page_size, 1, latent_dim), fill, dtype)


def entry_dim(cache: jax.Array) -> int:
  """Width of the entries a cache holds: 576 for an FP8 cache (656 bytes),
  its last dim otherwise."""
  if fp8_cache.is_fp8_cache(cache):
    return fp8_cache.ENTRY_DIM
  return cache.shape[-1]


def _scatter_rows(cache: jax.Array, rows: jax.Array, page: jax.Array,
                  slot: jax.Array) -> jax.Array:
  """One scatter; rows whose page is out of range are dropped."""
  return cache.at[page, slot, 0].set(rows, mode="drop")


def _write_rows_in_loop(cache: jax.Array, rows: jax.Array, page: jax.Array,
                        slot: jax.Array) -> jax.Array:
  """A loop of row updates; rows whose page is out of range are skipped.

  XLA:CPU has no 16-bit float scatter: it would widen the whole cache to
  float32 and back. Dynamic-update-slices stay in the cache's dtype and in
  place. The rows to keep are moved to the front and only they are written.
  """
  keep = page < cache.shape[0]
  order = jnp.argsort(~keep, stable=True)
  rows, page, slot = rows[order], page[order], slot[order]

  def write(i, cache):
    return jax.lax.dynamic_update_slice(
        cache, rows[i][None, None, None], (page[i], slot[i], 0, 0))

  return jax.lax.fori_loop(0, jnp.sum(keep), write, cache)


def _check_append(cache, entries, block_table, cache_seqlens):
  """append_latent's arguments as JAX arrays, shapes checked."""
  cache, entries = jnp.asarray(cache), jnp.asarray(entries)
  block_table, cache_seqlens = (jnp.asarray(block_table),
                                jnp.asarray(cache_seqlens))
  if cache.ndim != 4 or cache.shape[2] != 1:
    raise ValueError(
        f"cache must be [num_pages, page_size, 1, latent_dim], got shape"
        f" {cache.shape}")
  if fp8_cache.is_fp8_cache(cache) and cache.shape[3] != (
      fp8_cache.ENTRY_BYTES):
    raise ValueError(
        f"a uint8 cache is an FP8 cache and must be [num_pages, page_size,"
        f" 1, {fp8_cache.ENTRY_BYTES}], got shape {cache.shape}")
  width = entry_dim(cache)
  if entries.ndim != 3 or entries.shape[2] != width:
    raise ValueError(
        f"entries must be [b, s_q, {width}] (the cache's latent_dim), got"
        f" shape {entries.shape}")
  for name, x, rank in (("block_table", block_table, 2),
                        ("cache_seqlens", cache_seqlens, 1)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"{name} must be int32, got {x.dtype}")
    if x.ndim != rank or x.shape[0] != entries.shape[0]:
      raise ValueError(
          f"{name} must be {'[b, max_pages]' if rank == 2 else '[b]'} with"
          f" b = {entries.shape[0]} (entries' batch), got shape {x.shape}")
  return (cache, entries, block_table.astype(jnp.int32),
          cache_seqlens.astype(jnp.int32))


def append_latent(cache: jax.Array, entries: jax.Array,
                  block_table: jax.Array, cache_seqlens: jax.Array
                  ) -> jax.Array:
  """Writes the new tokens' entries into their pages; jit-friendly.

  The new tokens are the last ``s_q`` of each sequence: token ``i`` of
  sequence ``b`` lands at position ``cache_seqlens[b] - s_q + i``, in page
  ``block_table[b, pos // page_size]``, slot ``pos % page_size``. Inside
  ``jax.jit`` with the cache donated (``append_latent_jit``, or a decode
  step that donates its caches) the cache is updated in place: one scatter
  of ``b * s_q`` rows on accelerators, a loop of row updates on CPU.

  A write whose position is negative, past the table, or whose page id is
  outside ``[0, num_pages)`` is dropped. New tokens must not share slots:
  pages shared between sequences (common prefixes) are read-only.

  Args:
    cache: [num_pages, page_size, 1, latent_dim], or an FP8 cache (uint8
      [num_pages, page_size, 1, 656]).
    entries: [b, s_q, latent_dim] ``[c_kv | k_pe]`` of the new tokens; cast
      to the cache's dtype, or quantized (``quantize_kv``) for an FP8
      cache (latent_dim 576).
    block_table: int32 [b, max_pages].
    cache_seqlens: int32 [b] lengths including the new tokens.

  Returns:
    The updated cache, same shape and dtype.

  Raises:
    TypeError: non-integer block_table or cache_seqlens.
    ValueError: ranks or sizes that do not match (named).
  """
  cache, entries, block_table, cache_seqlens = _check_append(
      cache, entries, block_table, cache_seqlens)
  num_pages, page_size, _, row_width = cache.shape
  b, s_q, _ = entries.shape
  max_pages = block_table.shape[1]
  pos = cache_seqlens[:, None] - s_q + jnp.arange(s_q, dtype=jnp.int32)
  index = pos // page_size  # [b, s_q]
  page = jnp.take_along_axis(block_table,
                             jnp.clip(index, 0, max_pages - 1), axis=1)
  ok = (pos >= 0) & (index < max_pages) & (page >= 0) & (page < num_pages)
  # Dropped rows go to page num_pages (a negative id would wrap around).
  page = jnp.where(ok, page, num_pages).reshape(b * s_q)
  slot = (pos % page_size).reshape(b * s_q)
  rows = entries.reshape(b * s_q, entries.shape[2])
  if fp8_cache.is_fp8_cache(cache):
    rows = fp8_cache.quantize_kv(rows)
  rows = rows.reshape(b * s_q, row_width).astype(cache.dtype)
  return jax.lax.platform_dependent(
      cache, rows, page, slot, cpu=_write_rows_in_loop, default=_scatter_rows)


append_latent_jit = jax.jit(append_latent, donate_argnums=0)
append_latent_jit.__doc__ = (
    "``append_latent`` jitted with the cache donated: updated in place.")
