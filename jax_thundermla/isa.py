"""Instruction set of the megakernel, mirrored from ``csrc/isa.h``.

``csrc/isa.h`` is the source of truth; ``tests/test_isa.py`` parses it and
checks that every constant here has the same value. See the header for the
meaning of each field and for the workspace layout.
"""

ISA_VERSION = 2

INSTRUCTION_WORDS = 16
TILE_ROWS = 64

OP_STOP = 0
OP_PARTIAL = 1
OP_REDUCE = 2
NUM_OPCODES = 3

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


def workspace_words(num_slots: int, num_counters: int, head_dim_v: int) -> int:
  """Number of 4-byte words of the kernel workspace (layout in isa.h)."""
  return num_slots * TILE_ROWS * (head_dim_v + 1) + num_counters
