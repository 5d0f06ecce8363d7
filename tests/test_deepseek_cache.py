"""Page allocator and the in-place append into the paged latent cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_thundermla.deepseek import cache as cache_lib
from jax_thundermla.deepseek.cache import (OutOfPagesError, PageAllocator,
                                           append_latent, append_latent_jit,
                                           init_cache)


def test_allocate_grow_free_and_tables():
  alloc = PageAllocator(num_pages=8, page_size=16)
  alloc.allocate(["a", "b"], [17, 0])
  assert alloc.pages("a") == [0, 1] and alloc.pages("b") == []
  assert alloc.num_free == 6
  alloc.grow("b", 16)
  alloc.grow("a", 32)  # still two pages
  alloc.grow("a", 33)
  assert alloc.pages("a") == [0, 1, 3] and alloc.pages("b") == [2]
  np.testing.assert_array_equal(
      alloc.block_table(["b", "a"]), [[2, 8, 8], [0, 1, 3]])
  np.testing.assert_array_equal(
      alloc.block_table(["a"], max_pages=5), [[0, 1, 3, 8, 8]])
  np.testing.assert_array_equal(alloc.seqlens(["a", "b"]), [33, 16])
  assert alloc.block_table(["a"]).dtype == np.int32
  assert alloc.seqlens(["a"]).dtype == np.int32
  alloc.free("a")
  assert alloc.num_free == 7
  alloc.allocate(["c"], [40])  # freed pages come back first
  assert alloc.pages("c") == [0, 1, 3]
  assert alloc.pad_id == 8


def test_requests_that_do_not_fit_change_nothing():
  alloc = PageAllocator(num_pages=4, page_size=16)
  alloc.allocate(["a"], [20])
  with pytest.raises(OutOfPagesError, match="need 4 more pages.*only 2 of 4"):
    alloc.allocate(["b", "c"], [16, 33])
  assert alloc.num_free == 2
  with pytest.raises(KeyError):
    alloc.length("b")
  with pytest.raises(OutOfPagesError):
    alloc.grow("a", 80)
  assert alloc.length("a") == 20 and alloc.pages("a") == [0, 1]


@pytest.mark.parametrize("call,error,words", [
    (lambda a: a.allocate(["a"], [1]), ValueError, ["already allocated"]),
    (lambda a: a.allocate(["x", "x"], [1, 1]), ValueError, ["repeated"]),
    (lambda a: a.allocate(["x"], [1, 2]), ValueError, ["same length"]),
    (lambda a: a.allocate(["x"], [-1]), ValueError, [">= 0", "-1"]),
    (lambda a: a.grow("a", 3), ValueError, ["shrink", "20", "3"]),
    (lambda a: a.grow("zz", 3), KeyError, ["zz", "not allocated"]),
    (lambda a: a.free("zz"), KeyError, ["zz"]),
    (lambda a: a.block_table(["a"], max_pages=1), ValueError,
     ["max_pages", ">= 2", "1"]),
    (lambda a: PageAllocator(0, 16), ValueError, ["num_pages"]),
])
def test_allocator_errors(call, error, words):
  alloc = PageAllocator(num_pages=8, page_size=16)
  alloc.allocate(["a"], [20])
  with pytest.raises(error) as e:
    call(alloc)
  for word in words:
    assert word in str(e.value)


def _place(cache, entries, table, lens):
  """numpy: where append_latent must put each new token."""
  cache = np.array(cache)
  num_pages, page_size = cache.shape[:2]
  s_q = entries.shape[1]
  for b in range(entries.shape[0]):
    for i in range(s_q):
      pos = lens[b] - s_q + i
      if pos < 0 or pos // page_size >= table.shape[1]:
        continue
      page = table[b, pos // page_size]
      if 0 <= page < num_pages:
        cache[page, pos % page_size, 0] = entries[b, i]
  return cache


@pytest.mark.parametrize("writer", ["cpu_loop", "scatter"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_append_places_tokens_and_drops_out_of_range(writer, dtype,
                                                     monkeypatch):
  if writer == "scatter":  # the accelerators' path, run on this CPU
    # pylint: disable-next=protected-access
    monkeypatch.setattr(cache_lib, "_write_rows_in_loop",
                        cache_lib._scatter_rows)
  rng = np.random.default_rng(0)
  num_pages, page, d = 9, 16, 24
  cache = rng.standard_normal((num_pages, page, 1, d)).astype(dtype)
  # Permuted pages. Dropped writes: row 2 reaches a padding id, row 3
  # starts before position 0, row 4 meets page id -1, row 5 runs past its
  # table.
  table = np.array([[5, 2, 7], [0, 8, 1], [3, 9, 9], [4, 6, 9], [6, -1, 9],
                    [1, 3, 7]], np.int32)
  lens = np.array([33, 17, 18, 2, 20, 50], np.int32)
  entries = rng.standard_normal((6, 4, d)).astype(np.float32)
  want = _place(cache, entries.astype(dtype), table, lens)
  got = jax.jit(append_latent)(jnp.asarray(cache), entries, table, lens)
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got), want)


def test_jitted_append_updates_the_cache_in_place():
  cache = init_cache(256, 64, 576)  # 18 MiB
  entries = jnp.ones((4, 2, 576), jnp.bfloat16)
  table = jnp.arange(16, dtype=jnp.int32).reshape(4, 4)
  lens = jnp.array([3, 70, 129, 200], jnp.int32)
  compiled = append_latent_jit.lower(cache, entries, table, lens).compile()
  assert "input_output_alias" in compiled.as_text()
  stats = compiled.memory_analysis()
  assert stats.alias_size_in_bytes == cache.nbytes
  assert stats.temp_size_in_bytes < cache.nbytes // 100
  out = append_latent_jit(cache, entries, table, lens)
  assert cache.is_deleted()
  assert float(out[0, 1, 0, 0]) == 1.0 and float(out[0, 3, 0, 0]) == 0.0


def test_append_latent_takes_numpy_outside_jit():
  from jax_thundermla.deepseek.cache import append_latent
  cache = np.zeros((2, 16, 1, 8), np.float32)
  entries = np.arange(2 * 8, dtype=np.float32).reshape(1, 2, 8)
  out = append_latent(cache, entries, np.array([[1]], np.int32),
                      np.array([3], np.int32))
  np.testing.assert_array_equal(np.asarray(out)[1, 1:3, 0], entries[0])
  assert float(np.abs(np.asarray(out)).sum()) == float(entries.sum())


@pytest.mark.parametrize("cache_shape,entries_shape,table_shape,lens_shape,"
                         "words", [
    ((2, 16, 8), (1, 1, 8), (1, 1), (1,), ["cache", "num_pages"]),
    ((2, 16, 1, 8), (1, 1, 9), (1, 1), (1,), ["entries", "latent_dim"]),
    ((2, 16, 1, 8), (2, 1, 8), (1, 1), (2,), ["block_table", "b = 2"]),
    ((2, 16, 1, 8), (1, 1, 8), (1, 1), (3,), ["cache_seqlens", "[b]"]),
])
def test_append_latent_names_mismatched_shapes(cache_shape, entries_shape,
                                               table_shape, lens_shape,
                                               words):
  from jax_thundermla.deepseek.cache import append_latent
  with pytest.raises(ValueError) as e:
    append_latent(np.zeros(cache_shape, np.float32),
                  np.zeros(entries_shape, np.float32),
                  np.zeros(table_shape, np.int32),
                  np.zeros(lens_shape, np.int32))
  for word in words:
    assert word in str(e.value)
  with pytest.raises(TypeError, match="block_table must be int32"):
    append_latent(np.zeros((2, 16, 1, 8), np.float32),
                  np.zeros((1, 1, 8), np.float32),
                  np.zeros((1, 1), np.float32), np.zeros((1,), np.int32))


@pytest.mark.parametrize("bad", [2.0, "4", True, None])
def test_page_allocator_refuses_non_integers(bad):
  with pytest.raises(TypeError, match="num_pages must be an int"):
    PageAllocator(bad, 16)
  with pytest.raises(TypeError, match="page_size must be an int"):
    PageAllocator(4, bad)
  alloc = PageAllocator(4, 16)
  with pytest.raises(TypeError, match="lengths must be an int"):
    alloc.allocate(["a"], [bad])
  alloc.allocate(["a"], [np.int64(3)])
  with pytest.raises(TypeError, match="length must be an int"):
    alloc.grow("a", bad)
  assert alloc.length("a") == 3
