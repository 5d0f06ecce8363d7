// Launch parameters of the MLA decode megakernel. Every pointer is device
// memory; its shape is in the comment. T is the element type (bf16/fp16).
// The K/V cache is T [num_pages, page_size, h_kv, 576] or, FP8, uint8
// [num_pages, page_size, h_kv, isa::kFp8EntryBytes] with T = bf16.
#pragma once

#include <cstdint>

#include <cuda.h>

namespace tmla {

struct MlaDecodeParams {
  const void* q;                // T [batch, s_q, h_q, 576]
  const void* kv;               // the K/V cache, read through the tensor maps
  const int32_t* block_table;   // [batch, max_pages]
  const int32_t* seqlens;       // [batch]
  const int32_t* plan_seqlens;  // [batch]: lengths the instructions are for
  const int32_t* instructions;  // [num_ctas, max_instructions, 16]
  void* out;                    // T [batch, s_q, h_q, 512]
  float* lse;                   // [batch, h_q, s_q], natural log
  void* partial_o;              // T [num_slots, 64, 512]
  float* partial_lse;           // [num_slots, 64], base 2
  int32_t* counters;            // [num_counters]
  int32_t* timings;             // [num_ctas, max_instructions, 9] or null
  int32_t batch;
  int32_t s_q;
  int32_t h_q;
  int32_t h_kv;
  int32_t page_size;
  int32_t num_pages;
  int32_t max_pages;
  int32_t max_instructions;
  int32_t num_slots;
  int32_t num_counters;
  int32_t chunk_tokens;  // TMA box height: gcd(page_size, 64)
  int32_t causal;
  float scale_log2;  // softmax_scale * log2(e)
};

// The kernel's tensor maps: the cache's boxes and, for an FP8 cache, its
// scales (16 bytes of each entry; a copy of `kv` otherwise).
struct KvMaps {
  CUtensorMap kv;
  CUtensorMap scales;
};

}  // namespace tmla
