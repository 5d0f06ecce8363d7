"""DeepSeek-V2/V3 decode on ``mla_decode``: the pieces a serving loop needs.

- ``cache``: the paged latent KV cache (``PageAllocator``, ``init_cache``,
  ``append_latent``).
- ``layer``: MLA attention in absorbed form (``mla_attention``), RMSNorm,
  RoPE with YaRN frequencies.
- ``moe``: the dense SwiGLU and the mixture-of-experts MLP (routing,
  grouped expert matmuls, expert parallelism).
- ``model``: the DeepSeek-V2/V3 decoder (``decode_step``, ``init_weights``,
  ``prefill_windows``).
- ``parallel``: the jitted step, unsharded or over a ("dp", "ep", "tp")
  mesh (``make_decode_step``, ``make_mesh``, ``shard_weights``,
  ``shard_batch``).
- ``hf_config``, ``weights``: Hugging Face ``config.json`` (both layouts)
  and safetensors loading (``load_hf_checkpoint``; needs the optional
  ``safetensors`` package).
"""

from jax_thundermla.deepseek.cache import (OutOfPagesError, PageAllocator,
                                           append_latent, append_latent_jit,
                                           init_cache)
from jax_thundermla.deepseek.config import DeepSeekConfig
from jax_thundermla.deepseek.layer import (AttentionWeights, apply_rope,
                                           mla_attention, rms_norm,
                                           rope_cos_sin, rope_frequencies)
from jax_thundermla.deepseek.model import (LayerWeights, ModelWeights,
                                           decode_step, init_caches,
                                           init_weights, prefill_windows)
from jax_thundermla.deepseek.moe import (DenseMLP, MoEWeights, moe_mlp,
                                         route, swiglu)
from jax_thundermla.deepseek.parallel import (make_decode_step, make_mesh,
                                              shard_batch, shard_weights,
                                              weight_specs)
from jax_thundermla.deepseek.weights import (load_hf_checkpoint,
                                             weights_from_hf)

__all__ = [
    "AttentionWeights", "DeepSeekConfig", "DenseMLP", "LayerWeights",
    "ModelWeights", "MoEWeights", "moe_mlp", "route",
    "OutOfPagesError", "PageAllocator", "append_latent", "append_latent_jit",
    "apply_rope", "decode_step", "init_cache", "init_caches", "init_weights",
    "load_hf_checkpoint", "make_decode_step", "make_mesh", "mla_attention",
    "prefill_windows", "rms_norm", "rope_cos_sin", "rope_frequencies",
    "shard_batch", "shard_weights", "swiglu", "weight_specs",
    "weights_from_hf",
]
