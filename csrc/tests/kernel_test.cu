// Stand-alone test of the MLA decode megakernel, no JAX: random paged
// inputs (NaN in every unused slot and page, permuted tables, bad page ids
// in the padding), a simple split plan built here, a float64 CPU reference;
// the FP8 cases quantize the cache here (isa.h's 656-byte entries, 0xFF in
// every unused slot and page) and check against the dequantized values.
// Small enough to run under compute-sanitizer. Exit status 0 = all passed.
//
//   nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
//     --expt-relaxed-constexpr -Icsrc csrc/tests/kernel_test.cu \
//     csrc/mla_decode.cu -o kernel_test && ./kernel_test [NAME_PREFIX]
//
// With NAME_PREFIX only the cases whose name starts with it run.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "config.h"
#include "isa.h"
#include "mla_decode.h"

namespace {

using tmla::config::kHeadDimQK;
using tmla::config::kHeadDimV;
using tmla::config::kTileRows;
namespace isa = tmla::isa;

#define CHECK_CUDA(expr)                                                   \
  do {                                                                     \
    cudaError_t e = (expr);                                                \
    if (e != cudaSuccess) {                                                \
      std::fprintf(stderr, "%s failed: %s\n", #expr, cudaGetErrorString(e)); \
      std::exit(2);                                                        \
    }                                                                      \
  } while (0)

struct Case {
  const char* name;
  std::vector<int> lens;
  int s_q, h_q, page_size;
  bool causal;
  int split_tokens;  // PARTIAL length before a sequence is split
  int num_ctas;
  int reduce_rows;   // rows of one REDUCE of a split tile (its merge is
                     // spread over several REDUCEs by rows)
  bool fp8 = false;  // an FP8 cache
  // The PARTIALs of unsplit tiles go after the REDUCEs of their list (they
  // wait for nothing, so no wait can block them): a REDUCE then has a
  // PARTIAL's loads after it.
  bool partials_after_reduces = false;
};

// One token's FP8 entry from its 576 values (FlashMLA's quantizer: per
// 128-value group the smallest power-of-two scale >= amax / 448, at least
// 2^-13); the values become what the entry dequantizes to. Non-finite
// values (unused slots) leave the entry all 0xFF (NaN values and scales).
void QuantizeEntry(float* v, uint8_t* entry) {
  for (int d = 0; d < kHeadDimQK; ++d) {
    if (!std::isfinite(v[d])) return;
  }
  for (int g = 0; g < isa::kFp8NumScales; ++g) {
    float* x = v + g * isa::kFp8ScaleGroup;
    float amax = 0.f;
    for (int k = 0; k < isa::kFp8ScaleGroup; ++k) {
      amax = std::max(amax, std::fabs(x[k]));
    }
    const float scale = std::ldexp(
        1.f, static_cast<int>(std::ceil(std::log2(std::max(amax / 448.f,
                                                           0x1p-13f)))));
    for (int k = 0; k < isa::kFp8ScaleGroup; ++k) {
      const __nv_fp8_e4m3 e(x[k] / scale);
      entry[g * isa::kFp8ScaleGroup + k] = e.__x;
      x[k] = static_cast<float>(e) * scale;
    }
    std::memcpy(entry + isa::kFp8ScalesOffset + 4 * g, &scale, 4);
  }
  for (int d = 0; d < tmla::config::kRopeDim; ++d) {
    const __nv_bfloat16 r = __float2bfloat16(v[kHeadDimV + d]);
    std::memcpy(entry + isa::kFp8RopeOffset + 2 * d, &r, 2);
    v[kHeadDimV + d] = __bfloat162float(r);
  }
}

struct Plan {
  std::vector<int32_t> words;  // [num_ctas, max_instructions, 16]
  int max_instructions, num_slots, num_counters;
};

// Splits each (sequence, tile) into ranges of split_tokens; partials go
// round-robin over the CTAs, every REDUCE after all partials of its CTA (or
// of split tiles, with partials_after_reduces), so no wait can block a
// partial.
Plan BuildPlan(const Case& c) {
  std::vector<std::vector<std::vector<int32_t>>> lists(c.num_ctas);
  std::vector<std::vector<int32_t>> reduces;
  int slots = 0, counters = 0, next = 0;
  const int rows = c.s_q * c.h_q;
  auto word = [](int op) {
    std::vector<int32_t> w(isa::kInstructionWords, 0);
    w[isa::kFieldOpcode] = op;
    w[isa::kFieldSignalCounter] = isa::kNoCounter;
    w[isa::kFieldWaitCounter] = isa::kNoCounter;
    return w;
  };
  for (int b = 0; b < static_cast<int>(c.lens.size()); ++b) {
    for (int r0 = 0; r0 < rows; r0 += kTileRows) {
      const int len = std::max(c.lens[b], 0);
      const int pieces = std::max(1, (len + c.split_tokens - 1) / c.split_tokens);
      const int counter = pieces > 1 ? counters++ : isa::kNoCounter;
      const int first_slot = slots;
      for (int k = 0; k < pieces; ++k) {
        auto w = word(isa::kOpPartial);
        w[isa::kFieldBatch] = b;
        w[isa::kFieldRowStart] = r0;
        w[isa::kFieldNumRows] = std::min(kTileRows, rows - r0);
        w[isa::kFieldKvStart] = k * c.split_tokens;
        w[isa::kFieldKvEnd] = pieces > 1 ? std::min(len, (k + 1) * c.split_tokens)
                                         : c.lens[b];
        w[isa::kFieldDstSlot] = pieces > 1 ? slots++ : isa::kFinalOutput;
        w[isa::kFieldSignalCounter] = counter;
        lists[next++ % c.num_ctas].push_back(w);
      }
      const int tile_rows = std::min(kTileRows, rows - r0);
      for (int rr = 0; pieces > 1 && rr < tile_rows; rr += c.reduce_rows) {
        auto w = word(isa::kOpReduce);
        w[isa::kFieldBatch] = b;
        w[isa::kFieldRowStart] = r0 + rr;
        w[isa::kFieldNumRows] = std::min(c.reduce_rows, tile_rows - rr);
        w[isa::kFieldSlotRow] = rr;
        w[isa::kFieldSrcSlot] = first_slot;
        w[isa::kFieldNumSrc] = pieces;
        w[isa::kFieldDstSlot] = isa::kFinalOutput;
        w[isa::kFieldWaitCounter] = counter;
        w[isa::kFieldWaitCount] = pieces;
        lists[next++ % c.num_ctas].push_back(w);
      }
    }
  }
  // Move REDUCEs behind every PARTIAL of their list (or of a split tile).
  for (auto& l : lists) {
    std::stable_sort(l.begin(), l.end(), [&c](const auto& a, const auto& b) {
      auto rank = [&c](const auto& w) {
        if (w[isa::kFieldOpcode] == isa::kOpReduce) return 1;
        const bool split = w[isa::kFieldDstSlot] != isa::kFinalOutput;
        return c.partials_after_reduces && !split ? 2 : 0;
      };
      return rank(a) < rank(b);
    });
  }
  Plan plan;
  plan.max_instructions = 1;
  for (auto& l : lists) {
    plan.max_instructions = std::max<int>(plan.max_instructions, l.size() + 1);
  }
  plan.words.assign(static_cast<size_t>(c.num_ctas) * plan.max_instructions *
                        isa::kInstructionWords, 0);
  for (int cta = 0; cta < c.num_ctas; ++cta) {
    for (size_t i = 0; i < lists[cta].size(); ++i) {
      std::copy(lists[cta][i].begin(), lists[cta][i].end(),
                plan.words.begin() +
                    (static_cast<size_t>(cta) * plan.max_instructions + i) *
                        isa::kInstructionWords);
    }
  }
  plan.num_slots = std::max(slots, 1);
  plan.num_counters = std::max(counters, 1);
  return plan;
}

template <typename T>
T* ToDevice(const std::vector<T>& host) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(host.size(), 1) * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(d, host.data(), host.size() * sizeof(T),
                        cudaMemcpyHostToDevice));
  return d;
}

bool RunCase(const Case& c, std::mt19937& rng) {
  const int batch = c.lens.size();
  int max_len = 1;
  for (int n : c.lens) max_len = std::max(max_len, n);
  const int max_pages = (max_len + c.page_size - 1) / c.page_size + 1;
  int used = 0;
  for (int n : c.lens) used += (std::max(n, 0) + c.page_size - 1) / c.page_size;
  const int num_pages = used + 2;
  std::vector<int> perm(num_pages);
  for (int i = 0; i < num_pages; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> table(static_cast<size_t>(batch) * max_pages);
  std::normal_distribution<float> normal;
  std::vector<float> kv(static_cast<size_t>(num_pages) * c.page_size *
                            kHeadDimQK, NAN);
  for (int b = 0, pos = 0; b < batch; ++b) {
    for (int p = 0; p < max_pages; ++p) {
      const int base = p * c.page_size;
      if (base < c.lens[b]) {
        table[b * max_pages + p] = perm[pos++];
        for (int t = 0; t < std::min(c.page_size, c.lens[b] - base); ++t) {
          for (int d = 0; d < kHeadDimQK; ++d) {
            kv[(static_cast<size_t>(table[b * max_pages + p]) * c.page_size + t) *
                   kHeadDimQK + d] = normal(rng);
          }
        }
      } else {
        table[b * max_pages + p] = (p % 2) ? -7 : num_pages + 100;
      }
    }
  }
  std::vector<float> q(static_cast<size_t>(batch) * c.s_q * c.h_q * kHeadDimQK);
  for (auto& x : q) x = normal(rng);
  std::vector<__nv_bfloat16> q16(q.size()), kv16(kv.size());
  for (size_t i = 0; i < q.size(); ++i) {
    q16[i] = __float2bfloat16(q[i]);
    q[i] = __bfloat162float(q16[i]);
  }
  for (size_t i = 0; i < kv.size(); ++i) {
    kv16[i] = __float2bfloat16(kv[i]);
    kv[i] = __bfloat162float(kv16[i]);
  }
  std::vector<uint8_t> kv8;
  if (c.fp8) {
    kv8.assign(kv.size() / kHeadDimQK * isa::kFp8EntryBytes, 0xFF);
    for (size_t t = 0; t < kv.size() / kHeadDimQK; ++t) {
      QuantizeEntry(&kv[t * kHeadDimQK], &kv8[t * isa::kFp8EntryBytes]);
    }
  }
  const Plan plan = BuildPlan(c);
  const size_t out_elems = static_cast<size_t>(batch) * c.s_q * c.h_q * kHeadDimV;
  const size_t lse_elems = static_cast<size_t>(batch) * c.h_q * c.s_q;
  const size_t ws_words =
      isa::WorkspaceWords(plan.num_slots, plan.num_counters, kHeadDimV);

  tmla::MlaDecodeLaunch l{};
  auto* d_q = ToDevice(q16);
  void* d_kv = c.fp8 ? static_cast<void*>(ToDevice(kv8))
                     : static_cast<void*>(ToDevice(kv16));
  auto* d_table = ToDevice(table);
  auto* d_lens = ToDevice(std::vector<int32_t>(c.lens.begin(), c.lens.end()));
  auto* d_ins = ToDevice(plan.words);
  // Outputs poisoned with NaN (0xFF bytes) so an unwritten element fails.
  __nv_bfloat16* d_out;
  float *d_lse, *d_ws;
  CHECK_CUDA(cudaMalloc(&d_out, out_elems * 2));
  CHECK_CUDA(cudaMalloc(&d_lse, lse_elems * 4));
  CHECK_CUDA(cudaMalloc(&d_ws, ws_words * 4));
  CHECK_CUDA(cudaMemset(d_out, 0xFF, out_elems * 2));
  CHECK_CUDA(cudaMemset(d_lse, 0xFF, lse_elems * 4));
  tmla::MlaDecodeParams& p = l.params;
  p.q = d_q;
  p.block_table = d_table;
  p.seqlens = d_lens;
  p.plan_seqlens = d_lens;
  p.instructions = d_ins;
  p.out = d_out;
  p.lse = d_lse;
  p.partial_o = d_ws;
  p.partial_lse = d_ws + isa::WorkspacePartialLse(plan.num_slots, kHeadDimV);
  p.counters = reinterpret_cast<int32_t*>(
      d_ws + isa::WorkspaceCounters(plan.num_slots, kHeadDimV));
  p.batch = batch;
  p.s_q = c.s_q;
  p.h_q = c.h_q;
  p.h_kv = 1;
  p.page_size = c.page_size;
  p.num_pages = num_pages;
  p.max_pages = max_pages;
  p.max_instructions = plan.max_instructions;
  p.num_slots = plan.num_slots;
  p.num_counters = plan.num_counters;
  p.causal = c.causal;
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHeadDimQK));
  p.scale_log2 = scale * 1.4426950408889634f;
  p.kv = d_kv;
  l.dtype = tmla::ElementType::kBFloat16;
  l.kv_fp8 = c.fp8;
  l.num_ctas = c.num_ctas;
  CHECK_CUDA(tmla::LaunchMlaDecode(l, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<__nv_bfloat16> out16(out_elems);
  std::vector<float> lse(lse_elems);
  CHECK_CUDA(cudaMemcpy(out16.data(), d_out, out_elems * 2, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(lse.data(), d_lse, lse_elems * 4, cudaMemcpyDeviceToHost));

  double err2 = 0, ref2 = 0, lse_err = 0;
  bool pattern_ok = true;
  for (int b = 0; b < batch; ++b) {
    const int n = c.lens[b];
    for (int t = 0; t < c.s_q; ++t) {
      const int visible = c.causal ? n - c.s_q + t + 1 : n;
      for (int h = 0; h < c.h_q; ++h) {
        const float* qr = &q[((static_cast<size_t>(b) * c.s_q + t) * c.h_q + h) * kHeadDimQK];
        std::vector<double> s(std::max(visible, 0));
        double m = -INFINITY;
        for (int k = 0; k < visible; ++k) {
          const int page = table[b * max_pages + k / c.page_size];
          const float* kr = &kv[(static_cast<size_t>(page) * c.page_size + k % c.page_size) * kHeadDimQK];
          double dot = 0;
          for (int d = 0; d < kHeadDimQK; ++d) dot += double(qr[d]) * kr[d];
          s[k] = dot * scale;
          m = std::max(m, s[k]);
        }
        double sum = 0;
        std::vector<double> o(kHeadDimV, 0.0);
        for (int k = 0; k < visible; ++k) {
          const int page = table[b * max_pages + k / c.page_size];
          const float* kr = &kv[(static_cast<size_t>(page) * c.page_size + k % c.page_size) * kHeadDimQK];
          const double w = std::exp(s[k] - m);
          sum += w;
          for (int d = 0; d < kHeadDimV; ++d) o[d] += w * kr[d];
        }
        const size_t row = (static_cast<size_t>(b) * c.s_q + t) * c.h_q + h;
        for (int d = 0; d < kHeadDimV; ++d) {
          const double want = sum > 0 ? o[d] / sum : 0.0;
          const double got = __bfloat162float(out16[row * kHeadDimV + d]);
          if (std::isnan(got)) pattern_ok = false;
          err2 += (got - want) * (got - want);
          ref2 += want * want;
        }
        const double want_lse = sum > 0 ? m + std::log(sum) : INFINITY;
        const double got_lse = lse[(static_cast<size_t>(b) * c.h_q + h) * c.s_q + t];
        if (std::isinf(want_lse) != std::isinf(got_lse) || std::isnan(got_lse)) {
          pattern_ok = false;
        } else if (!std::isinf(want_lse)) {
          lse_err = std::max(lse_err, std::fabs(got_lse - want_lse));
        }
      }
    }
  }
  const double rel = std::sqrt(err2 / std::max(ref2, 1e-30));
  const bool ok = pattern_ok && rel <= 1e-2 && lse_err <= 1e-3;
  std::printf("case %-12s ctas %3d slots %3d: out rel err %.2e, lse err %.2e, %s\n",
              c.name, c.num_ctas, plan.num_slots, rel, lse_err,
              ok ? "ok" : "MISMATCH");
  for (void* ptr : {static_cast<void*>(d_q), static_cast<void*>(d_kv),
                    static_cast<void*>(d_table), static_cast<void*>(d_lens),
                    static_cast<void*>(d_ins), static_cast<void*>(d_out),
                    static_cast<void*>(d_lse), static_cast<void*>(d_ws)}) {
    CHECK_CUDA(cudaFree(ptr));
  }
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const char* prefix = argc > 1 ? argv[1] : "";
  std::mt19937 rng(1234);
  const Case cases[] = {
      {"ragged", {70, 0, 1, 300}, 2, 16, 16, true, 1 << 20, 8, 64},
      {"split", {2000, 65, 129}, 1, 16, 64, false, 256, 16, 64},
      {"rows128", {700, 5}, 4, 32, 256, true, 192, 12, 64},
      {"heads128", {900, 20}, 1, 128, 48, true, 320, 20, 64},
      {"spread1", {3000, 40}, 1, 16, 64, false, 128, 24, 1},
      {"spread3", {2500, 333}, 4, 16, 64, true, 192, 16, 3},
      {"spread5", {900, 20}, 1, 128, 48, true, 320, 20, 5},
      // REDUCEs of 2 rows x 3 inputs (fewer inputs than thread groups) and
      // of 141 inputs x 1 and 8 rows (more loads than one round holds).
      {"spread2", {300, 100}, 1, 16, 64, false, 128, 16, 2},
      {"wide1", {141 * 32, 70}, 1, 16, 32, false, 32, 24, 1},
      {"wide8", {141 * 32}, 1, 16, 32, true, 32, 24, 8},
      {"reduce_first", {3000, 40, 100, 20, 1500, 70}, 1, 16, 64, false, 128,
       8, 1, false, true},
      {"fp8_ragged", {70, 0, 1, 300}, 2, 16, 16, true, 1 << 20, 8, 64, true},
      {"fp8_split", {2000, 65, 129}, 1, 16, 64, false, 256, 16, 64, true},
      {"fp8_heads128", {900, 20}, 1, 128, 48, true, 320, 20, 5, true},
  };
  int failures = 0, run = 0;
  for (const Case& c : cases) {
    if (std::strncmp(c.name, prefix, std::strlen(prefix)) != 0) continue;
    ++run;
    failures += !RunCase(c, rng);
  }
  std::printf("%d passed, %d failed\n", run - failures, failures);
  return failures || run == 0 ? 1 : 0;
}
