"""How far the FP8 cache moves decode results from the unquantized cache.

Two measurements, both on the pure-JAX reference (the same math as the
kernel's bf16 path, so the difference is the quantization alone):

1. W1-W6 (``jax_thundermla.workloads``): random bf16 q and cache; the
   float32 outputs and LSEs of ``mla_decode`` over the FP8 cache
   (``quantize_kv`` of the bf16 cache) against those over the bf16 cache
   itself. Printed per workload: relative (Frobenius) error, max and mean
   absolute error of out, max absolute error of lse; beside them the error
   of rounding the exact output to bf16 (what the bf16 path returns), for
   scale. On a CPU the workloads are scaled down (``--length_scale``,
   ``--max_batch``); ``--full`` runs their real sizes (a GPU's memory).
2. A tiny DeepSeek stack (random weights, real MLA head dims: 576-wide
   latent cache): greedy decoding of ``--new_tokens`` tokens with bf16
   caches, then the same token stream fed through a model with FP8 caches
   (teacher forcing). Printed: relative and max absolute error of the
   logits, the fraction of positions whose argmax agrees, and how many
   tokens a free-running FP8 decode shares with the bf16 one.
3. Which tensor-core math an FP8 cache should get (``--math``): one
   sequence per workload shape (s_q, h_q; ``--math_tokens`` keys), the
   error against a float64 oracle on the dequantized cache of (a) the
   kernel's math, bf16 operands (dequantized K/V, bf16 q and P) with
   float32 accumulation, and (b) e4m3 operands, as FP8 wgmma would take
   them: q's latent part quantized per row, the scores rescaled by the
   cache's group scales, and P times each group's scales quantized per row
   for its 128 value columns (rope stays bf16). Emulated in float32/64.

  python benchmarks/fp8_accuracy.py                  # CPU, a few minutes
  python benchmarks/fp8_accuracy.py --full           # GPU, real sizes
"""

from __future__ import annotations

import dataclasses
import time

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jax_thundermla as tmla
from jax_thundermla import deepseek
from jax_thundermla import fp8_cache
from jax_thundermla import reference
from jax_thundermla.workloads import WORKLOADS
from jax_thundermla.workloads import Workload
from jax_thundermla.workloads import device_inputs

def scaled(w: Workload, length_scale: float, max_batch: int) -> Workload:
  """The workload with lengths scaled and the batch cut (at least s_q)."""
  lens = tuple(max(w.s_q, int(n * length_scale))
               for n in w.seqlens[:max_batch])
  return dataclasses.replace(w, seqlens=lens)


@jax.jit
def _decode_f32(q, kv_cache, table, lens):
  # float32 queries and outputs: the reference takes any float q and either
  # cache; DeepSeek's W1-W6 scale and mask.
  return reference.mla_decode_reference(
      q.astype(jnp.float32), kv_cache, table, lens, head_dim_v=512,
      softmax_scale=576 ** -0.5, causal=True)


def workload_errors(w: Workload, seed: int = 0) -> dict[str, float]:
  """FP8-cache decode against the bf16 cache's, one workload.

  Returns:
    ``rel``, ``max_abs``, ``mean_abs`` of out and ``lse_max_abs``, FP8
    against bf16 (float32 outputs); ``bf16_rel``: the relative error of
    rounding the bf16 cache's float32 output to bf16.
  """
  q, (kv,), table, lens = device_inputs(w, seed=seed, dtype=jnp.bfloat16)
  out, lse = _decode_f32(q, kv, table, lens)
  out8, lse8 = _decode_f32(q, tmla.quantize_kv(kv), table, lens)
  out, out8 = np.asarray(out, np.float64), np.asarray(out8, np.float64)
  lse, lse8 = np.asarray(lse, np.float64), np.asarray(lse8, np.float64)
  diff = np.abs(out8 - out)
  norm = np.linalg.norm(out)
  rounded = np.asarray(jnp.asarray(out, jnp.bfloat16), np.float64)
  return dict(rel=float(np.linalg.norm(out8 - out) / norm),
              max_abs=float(diff.max()), mean_abs=float(diff.mean()),
              lse_max_abs=float(np.abs(lse8 - lse).max()),
              bf16_rel=float(np.linalg.norm(rounded - out) / norm))


def tiny_deepseek(**overrides) -> deepseek.DeepSeekConfig:
  """A small dense DeepSeek stack with V3's attention dims (576 latent)."""
  fields = dict(vocab_size=512, hidden_size=256, intermediate_size=512,
                num_layers=4, num_heads=8, q_lora_rank=128,
                kv_lora_rank=512, qk_nope_head_dim=32, v_head_dim=32,
                n_routed_experts=0, rope_factor=4.0,
                original_max_position_embeddings=64)
  fields.update(overrides)
  return deepseek.DeepSeekConfig(**fields)


def greedy(config: deepseek.DeepSeekConfig, weights, prompts: np.ndarray,
           new_tokens: int, *, forced: np.ndarray | None = None,
           page_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Prefills ``prompts`` in one step, then decodes one token per step.

  Args:
    config: the model (its ``kv_cache_dtype`` picks the caches).
    weights: its weights.
    prompts: int [b, prompt_len].
    new_tokens: tokens to generate per sequence.
    forced: int [b, new_tokens] tokens to feed instead of the argmax
      (teacher forcing), or None.
    page_size: tokens per cache page.

  Returns:
    ``(tokens, logits)``: int [b, new_tokens] the argmax of each step, and
    float32 [b, new_tokens, vocab] the logits they come from.
  """
  b, prompt_len = prompts.shape
  max_pages = -(-(prompt_len + new_tokens) // page_size)
  alloc = deepseek.PageAllocator(b * max_pages, page_size)
  alloc.allocate(range(b), [0] * b)
  caches = deepseek.init_caches(config, b * max_pages, page_size,
                                fill=float("nan"))
  step = deepseek.make_decode_step(config, backend="reference")
  feed, tokens, logits = prompts, [], []
  for t in range(new_tokens):
    for i in range(b):
      alloc.grow(i, alloc.length(i) + feed.shape[1])
    out, caches = step(weights, caches, jnp.asarray(feed, jnp.int32),
                       jnp.asarray(alloc.block_table(range(b), max_pages)),
                       jnp.asarray(alloc.seqlens(range(b))))
    last = np.asarray(out[:, -1], np.float32)
    tokens.append(last.argmax(-1))
    logits.append(last)
    feed = (tokens[-1] if forced is None else forced[:, t])[:, None]
  return np.stack(tokens, 1), np.stack(logits, 1)


def deepseek_errors(config: deepseek.DeepSeekConfig, *, batch: int,
                    prompt_len: int, new_tokens: int,
                    seed: int = 0) -> dict[str, float]:
  """FP8 caches against bf16 caches in a DeepSeek decode.

  Returns:
    ``logit_rel``, ``logit_max_abs``: teacher-forced logits, FP8 against
    bf16; ``argmax_agree``: fraction of positions where they pick the same
    token; ``free_agree``: fraction of the bf16 greedy tokens that a
    free-running FP8 decode reproduces before its first difference (mean
    over sequences); ``free_first_diff``: the earliest position where one
    differs (``new_tokens`` if none).
  """
  weights = deepseek.init_weights(jax.random.key(seed), config)
  prompts = np.random.default_rng(seed).integers(
      0, config.vocab_size, (batch, prompt_len))
  fp8 = dataclasses.replace(config, kv_cache_dtype="fp8")
  tokens, logits = greedy(config, weights, prompts, new_tokens)
  _, logits8 = greedy(fp8, weights, prompts, new_tokens, forced=tokens)
  free8, _ = greedy(fp8, weights, prompts, new_tokens)
  differs = free8 != tokens
  first = np.where(differs.any(1), differs.argmax(1), new_tokens)
  return dict(
      logit_rel=float(np.linalg.norm(logits8 - logits)
                      / np.linalg.norm(logits)),
      logit_max_abs=float(np.abs(logits8 - logits).max()),
      argmax_agree=float((logits8.argmax(-1) == tokens).mean()),
      free_agree=float((first / new_tokens).mean()),
      free_first_diff=int(first.min()))


def _e4m3(x: np.ndarray) -> np.ndarray:
  """x rounded to float8_e4m3fn (to nearest), back in float64."""
  return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.float8_e4m3fn)
                    .astype(jnp.float32), np.float64)


def _per_row_e4m3(x: np.ndarray) -> np.ndarray:
  """x quantized per row with scale amax / 448, then scaled back."""
  s = np.max(np.abs(x), axis=-1, keepdims=True) / 448.0
  s = np.where(s > 0, s, 1.0)
  return _e4m3(x / s) * s


def math_errors(s_q: int, h_q: int, tokens: int, seed: int = 0
                ) -> dict[str, float]:
  """Relative (Frobenius) error of out against float64, bf16 and e4m3
  tensor-core math over one FP8-cached sequence (no mask: all rows see all
  keys)."""
  rng = np.random.default_rng(seed)
  entries = rng.standard_normal((tokens, 576)) * rng.choice(
      [0.1, 1.0, 10.0], (tokens, 1))
  cache = tmla.quantize_kv(jnp.asarray(entries, jnp.bfloat16))
  kv = np.asarray(tmla.dequantize_kv(cache, jnp.float32), np.float64)
  values, scales, _ = fp8_cache.split_fp8(cache)
  k8 = np.asarray(values.astype(jnp.float32), np.float64)  # [n, 512]
  scales = np.asarray(scales, np.float64)  # [n, 4]
  q = np.asarray(jnp.asarray(rng.standard_normal((s_q * h_q, 576)),
                             jnp.bfloat16), np.float64)
  scale = 576 ** -0.5
  bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)

  def finish(scores, pv):
    m = scores.max(axis=-1, keepdims=True)
    p = np.exp(scores - m)
    return pv(p) / p.sum(axis=-1, keepdims=True)

  s64 = q @ kv.T * scale
  want = finish(s64, lambda p: p @ kv[:, :512])
  s16 = (q @ kv.T).astype(np.float32).astype(np.float64) * scale
  got16 = finish(s16, lambda p: bf16(p) @ kv[:, :512])
  q8 = _per_row_e4m3(q[:, :512])
  s8 = sum((q8[:, 128 * g:128 * g + 128] @ k8[:, 128 * g:128 * g + 128].T)
           * scales[:, g] for g in range(4))
  s8 = (s8 + q[:, 512:] @ kv[:, 512:].T) * scale

  def pv8(p):
    return np.concatenate(
        [_per_row_e4m3(p * scales[:, g]) @ k8[:, 128 * g:128 * g + 128]
         for g in range(4)], axis=-1)

  got8 = finish(s8, pv8)
  norm = np.linalg.norm(want)
  return dict(bf16=float(np.linalg.norm(got16 - want) / norm),
              e4m3=float(np.linalg.norm(got8 - want) / norm))


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workloads", default=",".join(WORKLOADS),
                      help="comma-separated workloads to measure")
  parser.add_argument("--full", action="store_true",
                      help="real workload sizes (needs a GPU's memory)")
  parser.add_argument("--length_scale", type=float, default=1 / 16,
                      help="without --full: sequence lengths times this")
  parser.add_argument("--max_batch", type=int, default=8,
                      help="without --full: the first this-many sequences")
  parser.add_argument("--new_tokens", type=int, default=64,
                      help="DeepSeek stack: greedy tokens per sequence")
  parser.add_argument("--batch", type=int, default=4,
                      help="DeepSeek stack: sequences")
  parser.add_argument("--prompt_len", type=int, default=16,
                      help="DeepSeek stack: prompt tokens")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of data and weights")
  parser.add_argument("--math", action="store_true",
                      help="only part 3: bf16 against e4m3 tensor-core math")
  parser.add_argument("--math_tokens", type=int, default=2048,
                      help="part 3: keys of the sequence")
  return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}), reference"
        f" backend, seed {args.seed}")
  if args.math:
    print(f"out against float64 on the dequantized cache, one sequence of"
          f" {args.math_tokens} keys: relative error of bf16 and of e4m3"
          f" tensor-core math")
    print(f"{'':4} {'s_q':>4} {'h_q':>4} {'bf16':>9} {'e4m3':>9}")
    for name in args.workloads.split(","):
      w = WORKLOADS[name]
      e = math_errors(w.s_q, w.h_q, args.math_tokens, args.seed)
      print(f"{name:4} {w.s_q:4d} {w.h_q:4d} {e['bf16']:9.2e}"
            f" {e['e4m3']:9.2e}", flush=True)
    return
  print("W1-W6: out/lse over the FP8 cache vs over the bf16 cache"
        + ("" if args.full else
           f" (lengths x {args.length_scale:g}, batch <= {args.max_batch})"))
  print(f"{'':4} {'batch':>5} {'tokens':>8} {'rel':>9} {'max_abs':>9}"
        f" {'mean_abs':>9} {'lse_max':>9} {'bf16_rel':>9}")
  for name in args.workloads.split(","):
    w = WORKLOADS[name]
    if not args.full:
      w = scaled(w, args.length_scale, args.max_batch)
    e = workload_errors(w, args.seed)
    print(f"{name:4} {w.batch:5d} {sum(w.seqlens):8d} {e['rel']:9.2e}"
          f" {e['max_abs']:9.2e} {e['mean_abs']:9.2e}"
          f" {e['lse_max_abs']:9.2e} {e['bf16_rel']:9.2e}", flush=True)
  config = tiny_deepseek()
  start = time.perf_counter()
  e = deepseek_errors(config, batch=args.batch, prompt_len=args.prompt_len,
                      new_tokens=args.new_tokens, seed=args.seed)
  print(f"DeepSeek stack ({config.num_layers} layers, hidden"
        f" {config.hidden_size}, {config.num_heads} heads, vocab"
        f" {config.vocab_size}; {args.batch} sequences, prompt"
        f" {args.prompt_len}, {args.new_tokens} greedy tokens,"
        f" {time.perf_counter() - start:.0f} s):")
  print(f"  teacher-forced logits: rel {e['logit_rel']:.2e}, max abs"
        f" {e['logit_max_abs']:.2e}, argmax agreement"
        f" {e['argmax_agree']:.4f}")
  print(f"  free-running greedy: {e['free_agree']:.4f} of tokens before the"
        f" first difference (earliest at token {e['free_first_diff']})")


if __name__ == "__main__":
  main(parse_args())
