// Dense layers on weights packed once, for networks packed for inference (vit_ms/packing.py): y = r + x w^T + b
// with w already in the layout below. oneDNN's sgemm packs its operands again at every call; onnxruntime's
// MLAS packs a model's constant weights once, and its products took 9-14 % less time than vit_ms's at
// ViT-B/16 batch 1 in one process (README, round 29). The micro-kernel is MLAS's shape: 6 rows of x
// (broadcast) by 16 output columns (two AVX registers of the packed weight), FMA, up to 256 deep; in the
// AVX-512 library 6 rows by 32 columns (two panels, two ZMM registers: the same instructions do twice the
// work). The order of work is GotoBLAS's: a block of x's rows packed into L2, each 16-column panel of the
// weight (16 KB) in L1 for all of them. MLAS's order (a 128-column block of the weight in L2, every row
// streamed past it) was as fast at batch 1 but made a ViT-S/16 batch-16 step 0.81-0.86x as fast as on
// oneDNN's sgemm, re-reading x and y from L3.
//
// The packed layout of a weight w (n, k), n a multiple of 16: for each block of kPackK values of k (the
// last one shorter, kc deep), for each panel of 16 output columns, the block's kc rows of 16 floats: w[16 p
// + j, k0 + i] is at k0 n + 16 p kc + 16 i + j. vit_ms/packing.py writes it (`pack_dense_weight`).
//
// Each output element is its bias (and residual) plus the sums of its k blocks in ascending order, each
// block's products added up in k order with FMA: the same order at every batch size and thread count, and
// with every micro-kernel (each variant of the library returns the same floats on a CPU with FMA).
#include "common.h"

#include <immintrin.h>

#include <new>

static const int64_t kPackK = 256;   // k per block: a weight panel is 16 KB, in L1
static const int64_t kPackRows = 192;  // x rows per block (multiple of 6): 192 KB of packed x, in L2

// The FMA micro-kernels, one template over the vector width: c[i, 0:2W] += sum_k xp[k, i] [a[k, 0:W],
// b[k, 0:W]] for i < MR, k < kc, where xp holds kc rows of 6 floats (x's rows packed), a and b are two
// W-wide column strips of the packed weight, 16 floats from one k to the next, and c's rows are ldc apart.
// Each lane adds its products in k order with FMA, whatever W is.
#define VIT_MS_FMA __attribute__((target("avx2,fma"), always_inline)) static inline
struct Ymm {  // AVX2: 8 floats
  typedef __m256 reg;
  static const int width = 8;
  VIT_MS_FMA reg zero() { return _mm256_setzero_ps(); }
  VIT_MS_FMA reg load(const float *p) { return _mm256_loadu_ps(p); }
  VIT_MS_FMA reg broadcast(const float *p) { return _mm256_broadcast_ss(p); }
  VIT_MS_FMA reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  VIT_MS_FMA void add_to(float *p, reg a) { _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), a)); }
};

template <class V, int MR>
__attribute__((target("avx2,fma"))) static inline void panel_simd(int64_t kc, const float *xp, const float *a,
                                                                  const float *b, float *c, int64_t ldc) {
  typename V::reg acc[MR][2];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = acc[i][1] = V::zero();
    // c's rows are read at the end: fetched now, they arrive while the products run
    _mm_prefetch(reinterpret_cast<const char *>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char *>(c + i * ldc + 2 * V::width - 1), _MM_HINT_T0);
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const typename V::reg a_k = V::load(a + 16 * k), b_k = V::load(b + 16 * k);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const typename V::reg xi = V::broadcast(xp + 6 * k + i);
      acc[i][0] = V::fma(xi, a_k, acc[i][0]);
      acc[i][1] = V::fma(xi, b_k, acc[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    V::add_to(c + i * ldc, acc[i][0]);
    V::add_to(c + i * ldc + V::width, acc[i][1]);
  }
}

// One 16-column panel p, its two halves in YMM registers.
template <int MR>
__attribute__((target("avx2,fma"))) static void panel_fma(int64_t kc, const float *xp, const float *p, float *c,
                                                           int64_t ldc) {
  panel_simd<Ymm, MR>(kc, xp, p, p + 8, c, ldc);
}

// The same sums for CPUs without AVX2 and FMA (each product rounded before it is added: another float32
// rounding, inside the same bound).
template <int MR>
static void panel_plain(int64_t kc, const float *xp, const float *p, float *c, int64_t ldc) {
  float acc[MR][16] = {};
  for (int64_t k = 0; k < kc; ++k)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 16; ++j) acc[i][j] += xp[6 * k + i] * p[16 * k + j];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 16; ++j) c[i * ldc + j] += acc[i][j];
}

typedef void (*panel_fn)(int64_t, const float *, const float *, float *, int64_t);
static const panel_fn kPanelFma[6] = {panel_fma<1>, panel_fma<2>, panel_fma<3>,
                                      panel_fma<4>, panel_fma<5>, panel_fma<6>};
static const panel_fn kPanelPlain[6] = {panel_plain<1>, panel_plain<2>, panel_plain<3>,
                                        panel_plain<4>, panel_plain<5>, panel_plain<6>};

#if defined(__AVX512F__)
// The AVX-512 library's micro-kernel: two panels side by side (32 output columns), one ZMM register each, so
// each broadcast of x feeds two 16-wide FMAs where panel_fma's feed two 8-wide ones: twice the work per
// instruction, and in every lane the same FMAs in the same k order, so the same floats. The next panel of a k
// block starts 16 kc floats on.
struct Zmm {  // AVX-512F: 16 floats (this library is compiled for it)
  typedef __m512 reg;
  static const int width = 16;
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg load(const float *p) { return _mm512_loadu_ps(p); }
  static inline reg broadcast(const float *p) { return _mm512_set1_ps(*p); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline void add_to(float *p, reg a) { _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), a)); }
};

template <int MR>
__attribute__((target("avx2,fma"))) static void panel_pair_avx512(int64_t kc, const float *xp, const float *p,
                                                                   float *c, int64_t ldc) {
  panel_simd<Zmm, MR>(kc, xp, p, p + 16 * kc, c, ldc);
}
static const panel_fn kPanelPairAvx512[6] = {panel_pair_avx512<1>, panel_pair_avx512<2>, panel_pair_avx512<3>,
                                             panel_pair_avx512<4>, panel_pair_avx512<5>, panel_pair_avx512<6>};
#endif

// The micro-kernels this CPU runs: `one` for a panel of 16 columns (every variant of the library may load on
// a CPU with AVX2 and FMA), `pair` for two panels at once where this library has such a kernel (else null).
struct Panels {
  const panel_fn *one, *pair;
};
static Panels panels() {
  static const panel_fn *one =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? kPanelFma : kPanelPlain;
#if defined(__AVX512F__)
  return {one, kPanelPairAvx512};  // this library loads only on a CPU with AVX-512F (builder.py)
#else
  return {one, nullptr};
#endif
}

// c (rows, n) += x (rows, k) w^T for w packed, on the calling thread; false if its buffer cannot be had.
static bool packed_product(const float *x, const float *wp, float *c, int64_t rows, int64_t k, int64_t n) {
  thread_local std::vector<float> buffer;  // this thread's block of x, packed: kPackRows x kPackK floats
  if (buffer.size() < static_cast<size_t>(kPackRows * kPackK)) {
    try {
      buffer.resize(kPackRows * kPackK);
    } catch (const std::bad_alloc &) {
      return false;
    }
  }
  float *xp = buffer.data();
  const Panels panel = panels();
  for (int64_t k0 = 0; k0 < k; k0 += kPackK) {
    const int64_t kc = k - k0 < kPackK ? k - k0 : kPackK;
    const float *block = wp + k0 * n;  // the weight's k block: n / 16 panels of kc x 16
    for (int64_t r0 = 0; r0 < rows; r0 += kPackRows) {
      const int64_t mb = rows - r0 < kPackRows ? rows - r0 : kPackRows;
      // x[r0 : r0 + mb, k0 : k0 + kc] as groups of 6 rows, k-major within a group (a short last group
      // repeats its first row; the micro-kernel reads only the rows it has)
      for (int64_t g = 0; g < mb; g += 6) {
        const int64_t mr = mb - g < 6 ? mb - g : 6;
        float *dst = xp + g * kc;
        for (int64_t i = 0; i < 6; ++i) {
          const float *src = x + (r0 + g + (i < mr ? i : 0)) * k + k0;
          for (int64_t j = 0; j < kc; ++j) dst[6 * j + i] = src[j];
        }
      }
      for (int64_t col = 0; col < n;) {
        const bool two = panel.pair != nullptr && col + 32 <= n;
        const panel_fn *fn = two ? panel.pair : panel.one;
        for (int64_t g = 0; g < mb; g += 6) {
          const int64_t mr = mb - g < 6 ? mb - g : 6;
          fn[mr - 1](kc, xp + g * kc, block + col * kc, c + (r0 + g) * n + col, n);
        }
        col += two ? 32 : 16;
      }
    }
  }
  return true;
}

int dense_packed(const float *x, const float *wp, const float *b, const float *r, float *y, int64_t rows,
                 int64_t k, int64_t n, void (*gelu)(const float *, float *, int64_t)) {
  if (n % 16 != 0) return 1;
  int status = 0;
  TEAM_ROWS(rows, {
    if (nr > 0) {
      bias_block(r, b, y, r0, nr, 0, n, n);
      if (!packed_product(x + r0 * k, wp, y + r0 * n, nr, k, n)) status = 1;
      if (gelu != nullptr) gelu(y + r0 * n, y + r0 * n, nr * n);
    }
  })
  return status;
}
