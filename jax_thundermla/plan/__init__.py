"""Planners of the MLA decode megakernel: instruction tensors on host or device.

Public names: ``plan_decode`` (host planners), ``plan_on_device`` (the
balanced planner in jax.numpy, for use inside jit), ``DecodePlan``,
``CostModel`` and ``SCHEDULERS``.
"""

from jax_thundermla.plan.cost import CostModel
from jax_thundermla.plan.device import plan_on_device
from jax_thundermla.plan.plan import SCHEDULERS
from jax_thundermla.plan.plan import DecodePlan
from jax_thundermla.plan.plan import plan_decode

__all__ = ["CostModel", "DecodePlan", "SCHEDULERS", "plan_decode",
           "plan_on_device"]
