"""jax_thundermla: multi-head latent attention (MLA) decode for JAX.

``mla_decode`` runs paged MLA decode attention inside ``jax.jit``: on a GPU
through a CUDA persistent megakernel registered as an XLA FFI custom call,
elsewhere through a pure-JAX reference with the same semantics.
"""

__version__ = "0.1.0"

from jax_thundermla._export import export_safety_checks
from jax_thundermla._export import register_export_targets
from jax_thundermla.api import mla_decode
from jax_thundermla.fp8_cache import dequantize_kv
from jax_thundermla.fp8_cache import quantize_kv
from jax_thundermla.plan import CostModel
from jax_thundermla.plan import DecodePlan
from jax_thundermla.plan import plan_decode
from jax_thundermla.plan import plan_on_device
from jax_thundermla.reference import mla_decode_reference

__all__ = [
    "__version__",
    "CostModel",
    "DecodePlan",
    "dequantize_kv",
    "export_safety_checks",
    "mla_decode",
    "mla_decode_reference",
    "plan_decode",
    "plan_on_device",
    "quantize_kv",
    "register_export_targets",
]
