"""Instruction set of the megakernel, mirrored from ``csrc/isa.h``.

``csrc/isa.h`` is the source of truth; ``tests/test_isa.py`` parses it and
checks that every constant here has the same value, and compiles it to check
the workspace layout. See the header for the meaning of each field and for
the workspace layout. This module is also the one decoder of instruction
words on the Python side: everything else reads and writes them by name
through `Fields` and `pack`.
"""

import dataclasses

ISA_VERSION = 2

INSTRUCTION_WORDS = 16
TILE_ROWS = 64

HEAD_DIM_V = 512
ROPE_DIM = 64
PAGE_SIZE_MULTIPLE = 16
MAX_PAGE_SIZE = 256

FP8_ENTRY_BYTES = 656
FP8_SCALE_GROUP = 128
FP8_NUM_SCALES = 4
FP8_SCALES_OFFSET = 512
FP8_ROPE_OFFSET = 528

OP_STOP = 0
OP_PARTIAL = 1
OP_REDUCE = 2

FIELD_OPCODE = 0
FIELD_BATCH = 1
FIELD_KV_HEAD = 2
FIELD_ROW_START = 3
FIELD_NUM_ROWS = 4
FIELD_DST_SLOT = 7
FIELD_SIGNAL_COUNTER = 8
FIELD_WAIT_COUNTER = 9
FIELD_WAIT_COUNT = 10
FIELD_COST = 11

FIELD_KV_START = 5
FIELD_KV_END = 6

FIELD_SRC_SLOT = 5
FIELD_NUM_SRC = 6
FIELD_SLOT_ROW = 12
MAX_REDUCE_INPUTS = 256

TIMING_WORDS = 9
TIMING_OPCODE = 0
TIMING_START = 1
TIMING_READY = 3
TIMING_COMPUTED = 5
TIMING_END = 7

FINAL_OUTPUT = -1
NO_COUNTER = -1



@dataclasses.dataclass(frozen=True)
class WorkspaceLayout:
  """Where each part of the workspace starts, in 4-byte words.

  Mirrors ``WorkspacePartialLse``/``WorkspaceCounters``/``WorkspaceWords`` of
  ``csrc/isa.h`` (partial O, two 16-bit elements per word, starts at
  word 0).

  Attributes:
    partial_lse: first word of partial LSE ``[num_slots, TILE_ROWS]``.
    counters: first word of the counters ``[num_counters]``.
    words: size of the whole workspace.
  """

  partial_lse: int
  counters: int
  words: int


def workspace_layout(num_slots: int, num_counters: int,
                     head_dim_v: int) -> WorkspaceLayout:
  """The workspace layout for these capacities (see `WorkspaceLayout`)."""
  partial_lse = num_slots * TILE_ROWS * head_dim_v // 2
  counters = partial_lse + num_slots * TILE_ROWS
  return WorkspaceLayout(partial_lse, counters, counters + num_counters)


def workspace_words(num_slots: int, num_counters: int, head_dim_v: int) -> int:
  """Number of 4-byte words of the kernel workspace (layout in isa.h)."""
  return workspace_layout(num_slots, num_counters, head_dim_v).words


# Names of the opcodes (profiles, Gantt legends, error messages) and the
# colour each is drawn in: the one list of them.
OP_NAMES = {OP_STOP: "STOP", OP_PARTIAL: "PARTIAL", OP_REDUCE: "REDUCE"}
OP_COLORS = {OP_PARTIAL: "tab:blue", OP_REDUCE: "tab:orange"}

# Field name -> word, per opcode (the names of csrc/isa.h's kField*
# constants in snake case). PARTIAL and REDUCE share words 5 and 6.
COMMON_FIELDS = {
    "opcode": FIELD_OPCODE, "batch": FIELD_BATCH, "kv_head": FIELD_KV_HEAD,
    "row_start": FIELD_ROW_START, "num_rows": FIELD_NUM_ROWS,
    "dst_slot": FIELD_DST_SLOT, "signal_counter": FIELD_SIGNAL_COUNTER,
    "wait_counter": FIELD_WAIT_COUNTER, "wait_count": FIELD_WAIT_COUNT,
    "cost": FIELD_COST,
}
PARTIAL_FIELDS = {"kv_start": FIELD_KV_START, "kv_end": FIELD_KV_END}
REDUCE_FIELDS = {"src_slot": FIELD_SRC_SLOT, "num_src": FIELD_NUM_SRC,
                 "slot_row": FIELD_SLOT_ROW}
_WORD = {**COMMON_FIELDS, **PARTIAL_FIELDS, **REDUCE_FIELDS}


class Fields:
  """Named views of instruction words: the one decoder of the tensor.

  ``Fields(words)`` over an array ``[..., INSTRUCTION_WORDS]`` reads a field
  as ``words[..., word]`` (a numpy view, so writes go through) and writes it
  with ``fields.kv_start = value`` (numpy arrays only). The PARTIAL names
  (``kv_start``, ``kv_end``) and the REDUCE names (``src_slot``, ``num_src``,
  ``slot_row``) alias the same words; which one applies follows ``opcode``.
  """

  __slots__ = ("words",)

  def __init__(self, words):
    object.__setattr__(self, "words", words)

  def __getattr__(self, name: str):
    try:
      word = _WORD[name]
    except KeyError:
      raise AttributeError(f"instructions have no field {name!r}") from None
    return self.words[..., word]

  def __setattr__(self, name: str, value) -> None:
    if name not in _WORD:
      raise AttributeError(f"instructions have no field {name!r}")
    self.words[..., _WORD[name]] = value

  @property
  def key(self):
    """``[..., 4]``: (batch, kv_head, row_start, num_rows) of each word row."""
    return self.words[..., FIELD_BATCH:FIELD_NUM_ROWS + 1]


def pack(xp, dtype, size: int, **fields):
  """Instruction rows ``[size, INSTRUCTION_WORDS]`` from named columns.

  Args:
    xp: ``numpy`` or ``jax.numpy``.
    dtype: integer dtype of the rows.
    size: number of rows.
    **fields: field name -> scalar or ``[size]`` column; others are zero.

  Returns:
    ``[size, INSTRUCTION_WORDS]`` array of ``xp``.

  Raises:
    TypeError: an unknown field name.
  """
  unknown = sorted(set(fields) - set(_WORD))
  if unknown:
    raise TypeError(f"instructions have no fields {unknown}")
  by_word = {_WORD[name]: value for name, value in fields.items()}
  if xp.__name__ == "numpy":
    out = xp.zeros((size, INSTRUCTION_WORDS), dtype)
    for word, value in by_word.items():
      out[:, word] = value
    return out
  zero = xp.zeros(size, dtype)
  cols = [xp.broadcast_to(xp.asarray(by_word[w], dtype), (size,))
          if w in by_word else zero for w in range(INSTRUCTION_WORDS)]
  return xp.stack(cols, axis=1)
