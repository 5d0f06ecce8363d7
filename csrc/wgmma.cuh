// The warpgroup MMA shapes of the MLA decode kernel (sm_90a wgmma).
// One asm statement per shape and operand source, written once for both
// element types; the m64n256 shapes share their accumulator list (the
// macros below).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The 128 accumulator registers of an m64n256 wgmma: their place in the
// instruction text (operands 0-127) and their constraints.
#define TMLA_WGMMA_D128_REGISTERS                                         \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,"   \
  "%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,"      \
  "%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,"      \
  "%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,"      \
  "%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,"      \
  "%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,"      \
  "%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,"      \
  "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,"     \
  "%125,%126,%127}"
#define TMLA_WGMMA_D128_OPERANDS(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), \
  "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), \
  "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), \
  "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
  "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), \
  "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), \
  "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), \
  "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), \
  "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), \
  "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), \
  "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), \
  "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), \
  "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), \
  "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), \
  "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), \
  "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), \
  "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), \
  "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), \
  "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), \
  "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), \
  "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), \
  "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), \
  "+f"(d[127])

// One wgmma of each shape for an element type TYPE ("bf16" or "f16"),
// over the arguments of the function it stands in (d, desc_a / a, desc_b,
// accumulate).
#define TMLA_WGMMA_M64N64K16_SS(TYPE)                                      \
  asm volatile(                                                           \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                        \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "     \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,"   \
      "%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "        \
      "%32, %33, p, 1, 1, 0, 0;\n}\n"                                     \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]),       \
        "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]),       \
        "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),  \
        "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),  \
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),  \
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),  \
        "+f"(d[30]), "+f"(d[31])                                          \
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)))
#define TMLA_WGMMA_M64N256K16_SS_TRANS_B(TYPE)                             \
  asm volatile(                                                           \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                       \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " "    \
      TMLA_WGMMA_D128_REGISTERS ", "                                      \
      "%128, %129, p, 1, 1, 0, 1;\n}\n"                                   \
      : TMLA_WGMMA_D128_OPERANDS(d)                                       \
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)))
#define TMLA_WGMMA_M64N256K16_RS_TRANS_B(TYPE)                             \
  asm volatile(                                                           \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"                       \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " "    \
      TMLA_WGMMA_D128_REGISTERS ", "                                      \
      "{%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"                  \
      : TMLA_WGMMA_D128_OPERANDS(d)                                       \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b),          \
        "r"(static_cast<int>(accumulate)))

namespace tmla::wgmma {

// The element types of the MMAs.
template <typename T>
constexpr bool kIsBf16 = std::is_same_v<T, __nv_bfloat16>;
template <typename T>
constexpr bool kIsHalfOrBf16 = kIsBf16<T> || std::is_same_v<T, __half>;

// D[64 x 64] (+)= A[64 x 16] * B[16 x 64]; A and B from shared memory
// (descriptors), D: 32 fp32 registers per thread. B is K-major.
template <typename T>
__device__ __forceinline__ void MmaM64N64K16(float (&d)[32], uint64_t desc_a,
                                             uint64_t desc_b,
                                             bool accumulate) {
  static_assert(kIsHalfOrBf16<T>, "bf16 or fp16 only");
  if constexpr (kIsBf16<T>) {
    TMLA_WGMMA_M64N64K16_SS("bf16");
  } else {
    TMLA_WGMMA_M64N64K16_SS("f16");
  }
}

// D[64 x 256] (+)= A[64 x 16] * B[16 x 256]; A and B from shared memory
// (descriptors), D: 128 fp32 registers per thread. B is MN-major (transposed).
template <typename T>
__device__ __forceinline__ void MmaM64N256K16TransB(float (&d)[128],
                                                    uint64_t desc_a,
                                                    uint64_t desc_b,
                                                    bool accumulate) {
  static_assert(kIsHalfOrBf16<T>, "bf16 or fp16 only");
  if constexpr (kIsBf16<T>) {
    TMLA_WGMMA_M64N256K16_SS_TRANS_B("bf16");
  } else {
    TMLA_WGMMA_M64N256K16_SS_TRANS_B("f16");
  }
}

// D[64 x 256] (+)= A[64 x 16] * B[16 x 256]; A from registers (4 per thread,
// two 16-bit elements each, in the wgmma A-fragment layout), B from shared
// memory (descriptor), MN-major (transposed). D: 128 fp32 registers.
template <typename T>
__device__ __forceinline__ void MmaM64N256K16RegATransB(
    float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b,
    bool accumulate) {
  static_assert(kIsHalfOrBf16<T>, "bf16 or fp16 only");
  if constexpr (kIsBf16<T>) {
    TMLA_WGMMA_M64N256K16_RS_TRANS_B("bf16");
  } else {
    TMLA_WGMMA_M64N256K16_RS_TRANS_B("f16");
  }
}

}  // namespace tmla::wgmma

#undef TMLA_WGMMA_M64N64K16_SS
#undef TMLA_WGMMA_M64N256K16_SS_TRANS_B
#undef TMLA_WGMMA_M64N256K16_RS_TRANS_B
#undef TMLA_WGMMA_D128_OPERANDS
#undef TMLA_WGMMA_D128_REGISTERS
