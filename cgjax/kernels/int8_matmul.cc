// int8 x int8 -> int32 matmul for XLA:CPU on AVX512-VNNI, as an XLA FFI custom call.
//
// out[m, n] = sum_k x[m, k] * w[k, n]  (exact int32), with
//   x    s8[M, K]                 the row-quantized activations,
//   wp   s8[N / 16, K / 4, 16, 4] the weight packed once: wp[nb, kb, j, i] = w[4 kb + i, 16 nb + j],
//   comp s32[N]                   128 * sum_k w[k, n].
// VNNI multiplies unsigned by signed bytes (vpdpbusd), so each activation byte is offset by 128
// (x ^ 0x80) and 128 * colsum(w) is subtracted from the sums. Tiles of 64 output columns are
// shared between the calling thread and one task on XLA's intra-op thread pool.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRowsPerTile = 6;    // rows of one register tile
constexpr int kBlocksPerTile = 4;  // 16-column blocks of one register tile (64 columns)

struct Problem {
  const int8_t* x;
  const int8_t* wp;
  const int32_t* comp;
  int32_t* out;
  int64_t M, K, N;
};

// acc += a (unsigned bytes) . w (signed bytes), in place: with the intrinsic GCC copies each
// accumulator around the instruction and spills it to the stack in every iteration.
inline void Dot(__m512i& acc, __m512i a, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(w));
}

// One register tile: rows [m0, m0 + R) x blocks [nb0, nb0 + B) over all of K. The accumulators are
// named variables, not an array: GCC keeps an array of 24 vectors on the stack.
#define CGJAX_ROW_VARS(r) __m512i c##r##0 = zero, c##r##1 = zero, c##r##2 = zero, c##r##3 = zero;
#define CGJAX_DOT(r, b) \
  if constexpr (B > b) Dot(c##r##b, a, w##b);
#define CGJAX_ROW(r)                                                   \
  if constexpr (R > r) {                                               \
    int32_t four;                                                      \
    __builtin_memcpy(&four, x + (r) * K + 4 * kb, 4);                  \
    const __m512i a = _mm512_xor_si512(_mm512_set1_epi32(four), offset); \
    CGJAX_DOT(r, 0) CGJAX_DOT(r, 1) CGJAX_DOT(r, 2) CGJAX_DOT(r, 3)    \
  }
#define CGJAX_STORE(r, b)                                                                 \
  if constexpr (R > r && B > b)                                                           \
    _mm512_storeu_si512(out + (r) * N + (b) * 16,                                         \
                        _mm512_sub_epi32(c##r##b, _mm512_loadu_si512(comp + (b) * 16)));
#define CGJAX_STORE_ROW(r) CGJAX_STORE(r, 0) CGJAX_STORE(r, 1) CGJAX_STORE(r, 2) CGJAX_STORE(r, 3)

template <int R, int B>
inline void Tile(const Problem& p, int64_t m0, int64_t nb0) {
  static_assert(R >= 1 && R <= kRowsPerTile && B >= 1 && B <= kBlocksPerTile);
  const int64_t K = p.K, N = p.N, KB = K / 4;
  const __m512i zero = _mm512_setzero_si512();
  const __m512i offset = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  CGJAX_ROW_VARS(0) CGJAX_ROW_VARS(1) CGJAX_ROW_VARS(2) CGJAX_ROW_VARS(3) CGJAX_ROW_VARS(4) CGJAX_ROW_VARS(5)
  const int8_t* x = p.x + m0 * K;
  const int8_t* w = p.wp + nb0 * KB * 64;
  for (int64_t kb = 0; kb < KB; ++kb) {
    const __m512i w0 = _mm512_loadu_si512(w + kb * 64);
    const __m512i w1 = B > 1 ? _mm512_loadu_si512(w + (KB + kb) * 64) : zero;
    const __m512i w2 = B > 2 ? _mm512_loadu_si512(w + (2 * KB + kb) * 64) : zero;
    const __m512i w3 = B > 3 ? _mm512_loadu_si512(w + (3 * KB + kb) * 64) : zero;
    CGJAX_ROW(0) CGJAX_ROW(1) CGJAX_ROW(2) CGJAX_ROW(3) CGJAX_ROW(4) CGJAX_ROW(5)
  }
  int32_t* out = p.out + m0 * N + nb0 * 16;
  const int32_t* comp = p.comp + nb0 * 16;
  CGJAX_STORE_ROW(0) CGJAX_STORE_ROW(1) CGJAX_STORE_ROW(2) CGJAX_STORE_ROW(3) CGJAX_STORE_ROW(4) CGJAX_STORE_ROW(5)
}

template <int B>
void ColumnTile(const Problem& p, int64_t nb0) {
  int64_t m = 0;
  for (; m + kRowsPerTile <= p.M; m += kRowsPerTile) Tile<kRowsPerTile, B>(p, m, nb0);
  switch (p.M - m) {
    case 5: Tile<5, B>(p, m, nb0); break;
    case 4: Tile<4, B>(p, m, nb0); break;
    case 3: Tile<3, B>(p, m, nb0); break;
    case 2: Tile<2, B>(p, m, nb0); break;
    case 1: Tile<1, B>(p, m, nb0); break;
    default: break;
  }
}

// Every row of the 64-column tile t (fewer columns in the last tile when N / 16 is not a multiple of 4).
void RunColumnTile(const Problem& p, int64_t t) {
  const int64_t nb0 = t * kBlocksPerTile;
  switch (std::min<int64_t>(kBlocksPerTile, p.N / 16 - nb0)) {
    case 4: ColumnTile<4>(p, nb0); break;
    case 3: ColumnTile<3>(p, nb0); break;
    case 2: ColumnTile<2>(p, nb0); break;
    case 1: ColumnTile<1>(p, nb0); break;
    default: break;
  }
}

// Work shared by the caller and one pool task: column tiles claimed one at a time. The task only
// touches the buffers if it starts before the caller has finished (phase 0 -> 1); otherwise the
// caller closes the work (0 -> 2) and returns without waiting for it.
struct Shared {
  Problem p;
  int64_t n_tiles;
  std::atomic<int64_t> next{0};
  std::atomic<int> phase{0};
  std::atomic<bool> helper_done{false};
  void Work() {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n_tiles;) RunColumnTile(p, t);
  }
};

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> wp,
                          ffi::Buffer<ffi::S32> comp, ffi::ResultBuffer<ffi::S32> out) {
  const auto xd = x.dimensions(), wd = wp.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || od.size() != 2 || wd[2] != 16 || wd[3] != 4)
    return ffi::Error::InvalidArgument("int8_matmul: expected x [M, K], wp [N/16, K/4, 16, 4], out [M, N]");
  const int64_t M = xd[0], K = xd[1], N = od[1];
  if (K != wd[1] * 4 || N != wd[0] * 16 || od[0] != M || static_cast<int64_t>(comp.element_count()) != N)
    return ffi::Error::InvalidArgument("int8_matmul: x, wp, comp and out disagree on M, K or N");
  auto shared = std::make_shared<Shared>();
  shared->p = Problem{x.typed_data(), wp.typed_data(), comp.typed_data(), out->typed_data(), M, K, N};
  shared->n_tiles = (N / 16 + kBlocksPerTile - 1) / kBlocksPerTile;
  if (shared->n_tiles > 1 && M * K * N >= (int64_t{1} << 20)) {
    pool.Schedule([shared] {
      int idle = 0;
      if (!shared->phase.compare_exchange_strong(idle, 1)) return;  // the caller finished alone
      shared->Work();
      shared->helper_done.store(true, std::memory_order_release);
    });
  }
  shared->Work();
  int idle = 0;
  if (!shared->phase.compare_exchange_strong(idle, 2)) {  // the task started: wait for its tiles
    while (!shared->helper_done.load(std::memory_order_acquire)) _mm_pause();
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CgjaxInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
