// Thin wrappers over the sm_90 PTX the kernel needs: mbarriers, TMA,
// wgmma fences and descriptors, named barriers, register reallocation.
#pragma once

#include <cstdint>

#include <cuda.h>

#include "config.h"

namespace tmla::ptx {

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarriers -----------------------------------------------------------

__device__ __forceinline__ void MbarInit(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(SmemAddr(bar)),
               "r"(count));
}

__device__ __forceinline__ void FenceMbarInit() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void MbarArrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(SmemAddr(bar))
               : "memory");
}

__device__ __forceinline__ void MbarArriveExpectTx(uint64_t* bar,
                                                   uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(
                   SmemAddr(bar)),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(SmemAddr(bar)),
      "r"(parity)
      : "memory");
}

// Whether the phase of parity `parity` has completed, without waiting.
__device__ __forceinline__ bool MbarTest(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(SmemAddr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// MbarWait for all lanes of a warp; leaves the warp converged for the
// .sync.aligned instructions (wgmma) that follow.
__device__ __forceinline__ void MbarWaitWarp(uint64_t* bar, uint32_t parity) {
  MbarWait(bar, parity);
  __syncwarp();
}

// ---- TMA -----------------------------------------------------------------

// 3-D tiled bulk copy global -> shared, completing on `bar`, with an L2
// eviction policy (PolicyEvictFirst / PolicyEvictNormal below).
__device__ __forceinline__ void TmaLoad3d(void* dst, const CUtensorMap* map,
                                          int32_t c0, int32_t c1, int32_t c2,
                                          uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_"
      "tx::bytes.L2::cache_hint [%0], [%1, {%2, %3, %4}], [%5], %6;" ::"r"(
          SmemAddr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2),
      "r"(SmemAddr(bar)), "l"(policy)
      : "memory");
}

// L2 eviction policies for TmaLoad3d.
__device__ __forceinline__ uint64_t PolicyEvictFirst() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;"
               : "=l"(policy));
  return policy;
}
__device__ __forceinline__ uint64_t PolicyEvictNormal() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;"
               : "=l"(policy));
  return policy;
}

__device__ __forceinline__ void PrefetchTensorMap(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(
                   reinterpret_cast<uint64_t>(map))
               : "memory");
}

// ---- cp.async (16-byte global -> shared, zero-filled when !valid) ----

__device__ __forceinline__ void CpAsync16(void* dst, const void* src,
                                          bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(
                   SmemAddr(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}

// 1-D bulk copy of `bytes` (a multiple of 16, both addresses 16-byte
// aligned) global -> shared, completing on `bar`.
__device__ __forceinline__ void BulkLoad(void* dst, const void* src,
                                         uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes "
      "[%0], [%1], %2, [%3];" ::"r"(SmemAddr(dst)),
      "l"(src), "r"(bytes), "r"(SmemAddr(bar))
      : "memory");
}

__device__ __forceinline__ void CpAsyncWaitAll() {
  asm volatile("cp.async.wait_all;" ::: "memory");
}

// ---- fences and named barriers -------------------------------------------

// Orders this thread's generic-proxy shared-memory writes before later
// async-proxy accesses (wgmma operand reads, TMA writes).
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// The same for every state space: also orders what this thread observed of
// global memory (an acquired counter's data) before its bulk copies' reads.
__device__ __forceinline__ void FenceProxyAsyncAll() {
  asm volatile("fence.proxy.async;" ::: "memory");
}

// Named barrier over `threads` threads (a multiple of 32). The non-aligned
// form: lanes of a warp may arrive from diverged paths (after a one-lane
// spin or a row-dependent branch).
__device__ __forceinline__ void BarSync(int id, int threads) {
  asm volatile("barrier.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// BarSync that also returns whether any of the threads passed true.
__device__ __forceinline__ bool BarSyncOr(int id, int threads, bool value) {
  uint32_t any;
  asm volatile(
      "{\n"
      ".reg .pred in, out;\n"
      "setp.ne.u32 in, %1, 0;\n"
      "barrier.red.or.pred out, %2, %3, in;\n"
      "selp.u32 %0, 1, 0, out;\n"
      "}"
      : "=r"(any)
      : "r"(static_cast<uint32_t>(value)), "r"(id), "r"(threads)
      : "memory");
  return any != 0;
}

// ---- cross-CTA counters --------------------------------------------------

__device__ __forceinline__ int32_t LoadAcquireGpu(const int32_t* p) {
  int32_t v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];"
               : "=r"(v)
               : "l"(p)
               : "memory");
  return v;
}

// Adds 1 to *p with release semantics at GPU scope: everything this thread
// (and, through an earlier CTA barrier, its CTA) wrote before is visible to
// a thread that observes the new value with LoadAcquireGpu.
__device__ __forceinline__ void ReleaseIncrementGpu(int32_t* p) {
  asm volatile(
      "fence.acq_rel.gpu;\n"
      "red.relaxed.gpu.global.add.s32 [%0], 1;" ::"l"(p)
      : "memory");
}

// ---- wgmma ---------------------------------------------------------------

__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}

__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}

__device__ __forceinline__ void WgmmaWaitAll() {
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
}

// Waits until at most the most recent wgmma group is pending.
__device__ __forceinline__ void WgmmaWaitAllButLast() {
  asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle (layout type 1).
// K-major operands: rows of 128 bytes, 8-row groups 1024 bytes apart (SBO);
// the leading offset is unused. MN-major operands: 64-element atoms along
// MN `mn_atom_stride` bytes apart (LBO), 8-row groups along K 1024 apart.
__device__ __forceinline__ uint64_t DescSw128(uint32_t smem_addr,
                                              uint32_t lbo_bytes) {
  constexpr uint64_t kSwizzle128 = 1;
  const uint64_t sbo = config::kSwizzleAtomBytes >> 4;
  return (static_cast<uint64_t>(smem_addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (sbo << 32) | (kSwizzle128 << 62);
}

__device__ __forceinline__ uint64_t DescKMajor(uint32_t smem_addr) {
  return DescSw128(smem_addr, 16);
}

__device__ __forceinline__ uint64_t DescMnMajor(uint32_t smem_addr,
                                                uint32_t mn_atom_stride) {
  return DescSw128(smem_addr, mn_atom_stride);
}

// ---- registers -----------------------------------------------------------

template <int kRegs>
__device__ __forceinline__ void SetMaxRegistersInc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
}

template <int kRegs>
__device__ __forceinline__ void SetMaxRegistersDec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
}

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a 128-byte
// swizzled block whose base is 1024-byte aligned (the TMA/wgmma pattern).
__device__ __forceinline__ uint32_t Swizzle128(int row, int chunk) {
  return row * config::kSwizzleBytes + ((chunk ^ (row & 7)) << 4);
}

}  // namespace tmla::ptx
