"""Profiling: device time from jax.profiler traces, and the kernel's own
per-instruction timings. One module per job:

- ``trace``: ``trace_device_time`` runs a function under
  ``jax.profiler.trace`` and reads back every GPU activity (kernels,
  memsets, copies) the trace recorded on the device's streams: device time,
  free of Python and launch overhead.
- ``device_time``: ``summarize`` sums those activities by kernel name.
- ``timings``: ``mla_decode(..., timing=True)`` returns the timed kernel's
  records; ``decode_timings`` turns them into ``InstructionTiming`` rows,
  ``summarize_timings`` computes per-op durations, idle fraction and tail,
  and ``phases_by_shape`` splits the phases by instruction shape.
- ``gantt``: a chart of the rows, one row per SM.
- ``perfetto``: ``chrome_trace`` writes a Perfetto/Chrome trace, one track
  per SM.
- ``fit``: ``fit_cost_model`` fits the planner's cost model to the rows.
"""

from jax_thundermla.isa import OP_NAMES
from jax_thundermla.profiling.device_time import summarize
from jax_thundermla.profiling.fit import fit_cost_model
from jax_thundermla.profiling.gantt import gantt
from jax_thundermla.profiling.perfetto import chrome_trace
from jax_thundermla.profiling.timings import InstructionTiming
from jax_thundermla.profiling.timings import TimingSummary
from jax_thundermla.profiling.timings import decode_timings
from jax_thundermla.profiling.timings import phases_by_shape
from jax_thundermla.profiling.timings import summarize_timings
from jax_thundermla.profiling.trace import DeviceEvent
from jax_thundermla.profiling.trace import device_events
from jax_thundermla.profiling.trace import trace_device_time
