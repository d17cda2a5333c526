// Shared by every vit_ms CPU kernel: the MindSpore AOT calling convention's helpers, OpenMP work
// splitting, and the float32 exp used by GELU and softmax.
//
// Each kernel is `extern "C" int Name(nparam, params, ndims, shapes, dtypes, stream, extra)` (MindSpore's
// `ops.Custom(func_type="aot")` convention, inputs then outputs in `params`), returning 0 on success,
// with a `NameInferShape` beside it. The same sources are compiled once per instruction set (baseline
// x86-64, AVX2, AVX-512: `vit_ms/ops/builder.py`), so no function here is ISA-specific.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

// exp for x <= 0 (all this file needs): Cephes' range reduction and polynomial, ~1 ulp, vectorisable.
static inline float exp_neg_f(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float e = 1.9875691500e-4f;
  e = e * r + 1.3981999507e-3f;
  e = e * r + 8.3334519073e-3f;
  e = e * r + 4.1665795894e-2f;
  e = e * r + 1.6666665459e-1f;
  e = e * r + 5.0000001201e-1f;
  e = e * r * r + r + 1.0f;
  union { int32_t i; float f; } scale;
  scale.i = (static_cast<int32_t>(n) + 127) << 23;
  return e * scale.f;
}

// A row's sum (or max) kept as one partial per vector lane, added up at the end. Without -ffast-math GCC
// keeps a float sum in source order, one dependent add per element (a LayerNorm row of 192 took ~10x its
// memory time); `omp simd reduction` permits exactly this reordering and nothing else. The error bound of
// a float32 sum, gamma_d * sum |x_i|, holds for any order, so the tests' bounds stand.
#define VIT_MS_PRAGMA(text) _Pragma(#text)
#define VECTOR_SUM(...) VIT_MS_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#define VECTOR_MAX(m) VIT_MS_PRAGMA(omp simd reduction(max : m))

static inline int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

static inline bool all_float32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  return true;
}


static inline int64_t last_dim(int ndim, const int64_t *shape) { return ndim > 0 ? shape[ndim - 1] : 1; }

// Split [0, n) into one contiguous chunk per OpenMP thread.
#define PARALLEL_CHUNKS(n, body)                                       \
  _Pragma("omp parallel") {                                            \
    const int64_t threads = omp_get_num_threads();                     \
    const int64_t chunk = ((n) + threads - 1) / threads;               \
    const int64_t begin = omp_get_thread_num() * chunk;                \
    const int64_t len = begin >= (n) ? 0 : ((n) - begin < chunk ? (n) - begin : chunk); \
    if (len > 0) body;                                                 \
  }

// Output shape = input shape; MindSpore calls this in graph mode with unknown (-1) dimensions, e.g. a
// dynamic batch, where a Python `out_shape` cannot run.
#define SAME_SHAPE_INFER(name)                                                                  \
  extern "C" std::vector<int64_t> name##InferShape(int *ndims, int64_t **shapes, void *extra) { \
    return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);                               \
  }

// This thread's contiguous block [r0, r0 + nr) of `rows`, inside a parallel region (TEAM_ROWS), or in one
// of its own (PARALLEL_ROWS). Every row split in this library is this one, so a thread that wrote rows in
// one step of a kernel reads the same rows in the next.
#define TEAM_ROWS(rows, body)                                                 \
  {                                                                           \
    const int64_t threads = omp_get_num_threads();                            \
    const int64_t chunk = ((rows) + threads - 1) / threads;                   \
    const int64_t r0 = omp_get_thread_num() * chunk;                          \
    const int64_t nr = r0 >= (rows) ? 0 : ((rows) - r0 < chunk ? (rows) - r0 : chunk); \
    body;                                                                     \
  }
#define PARALLEL_ROWS(rows, body) _Pragma("omp parallel") TEAM_ROWS(rows, body)

// Column sums over rows, per thread then in thread order (deterministic for a fixed thread count):
// acc[0:d] = sum_r dy * xhat (d gamma), acc[d:2d] = sum_r dy (d beta); with x null only the bias part.
// Defined in layernorm.cc, used by the Dense bias gradient too.
// Hidden: each ISA's library is loaded into the same process, and must call its own copy.
#define VIT_MS_INTERNAL __attribute__((visibility("hidden")))
VIT_MS_INTERNAL void column_sums(const float *x, const float *dy, float *out, int64_t rows, int64_t d, float eps, int64_t width);

// Softmax of each of `rows` rows of length d, x and y distinct. Defined in softmax.cc, used by the fused
// attention too.
VIT_MS_INTERNAL void softmax_rows(const float *__restrict x, float *__restrict y, int64_t rows, int64_t d);
// Its gradient from the output y: dx = y (dy - sum(dy y)) per row; dx may be dy. Used by the fused attention's
// backward too.
VIT_MS_INTERNAL void softmax_grad_rows(const float *__restrict y, const float *dy, float *dx, int64_t rows, int64_t d);

// LayerNorm of each of `rows` rows of length d over the OpenMP threads; y may not be x. layernorm.cc.
// The _in_team form is this thread's rows only (TEAM_ROWS), called inside a parallel region.
VIT_MS_INTERNAL void layer_norm(const float *x, const float *g, const float *b, float *y, int64_t rows, int64_t d,
                                float eps);
VIT_MS_INTERNAL void layer_norm_in_team(const float *x, const float *g, const float *b, float *y, int64_t rows,
                                        int64_t d, float eps);

// GELU of n floats, exact (erf) and tanh forms; y may be x. Defined in gelu.cc, used by the Dense kernel
// that applies GELU to its own output too.
VIT_MS_INTERNAL void gelu_erf(const float *x, float *y, int64_t n);
VIT_MS_INTERNAL void gelu_tanh(const float *x, float *y, int64_t n);

// A Dense layer's output block before its product is added: y[i, j] = r[i, j] + b[j] (r null: b alone; r may
// be y itself) for rows [r0, r0 + nr) and columns [c0, c0 + nc) of n.
static inline void bias_block(const float *r, const float *b, float *y, int64_t r0, int64_t nr, int64_t c0,
                              int64_t nc, int64_t n) {
  for (int64_t i = r0; i < r0 + nr; ++i) {
    if (r == nullptr)
      std::memcpy(y + i * n + c0, b + c0, nc * sizeof(float));
    else
      for (int64_t j = c0; j < c0 + nc; ++j) y[i * n + j] = r[i * n + j] + b[j];
  }
}

// Dense layers on a weight packed once (packed.cc has the layout), this thread's rows in the caller's
// parallel region: y = r + x w^T + b (r may be null, or y itself), then `gelu` on it if given; n a multiple
// of 16; 0 on success. Needs no oneDNN.
VIT_MS_INTERNAL int dense_packed(const float *x, const float *wp, const float *b, const float *r, float *y,
                                 int64_t rows, int64_t k, int64_t n,
                                 void (*gelu)(const float *, float *, int64_t) = nullptr);

#ifdef VIT_MS_DNNL_PATH
// oneDNN's sgemm from the MindSpore wheel's libdnnl.so.3 (dlopen'ed once; null if missing). dense.cc.
typedef int (*sgemm_fn)(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                        int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);
VIT_MS_INTERNAL sgemm_fn dnnl_sgemm_fn();

// How a product's output is split over the OpenMP threads: by its wider side where the weight outgrows L2
// (columns at batch 1, see split_columns in dense.cc), in a parallel region of its own; or by rows, this
// thread's share only, called inside the caller's parallel region (kRowsInTeam: the encoder block kernel).
enum class Split { kWiderSide, kRowsInTeam };

// Dense layers on `rows` rows, x (rows, k), w (n, k), b (n) -> y (rows, n); 0 on success. dense.cc.
// y = x w^T + b; with `gelu` (gelu_erf or gelu_tanh) applied to it; r + x w^T + b (r may be y itself).
VIT_MS_INTERNAL int dense(const float *x, const float *w, const float *b, float *y, int64_t rows, int64_t k, int64_t n,
                          void (*gelu)(const float *, float *, int64_t) = nullptr, Split split = Split::kWiderSide);
VIT_MS_INTERNAL int dense_residual(const float *x, const float *w, const float *b, const float *r, float *y,
                                   int64_t rows, int64_t k, int64_t n, Split split = Split::kWiderSide);

// softmax(scale q k^T) v for each (sample, head) of qkv (batch, n, 3, heads, dim) -> out (batch, n, heads, dim);
// 0 on success. attention.cc. The _in_team form runs inside a parallel region, its work items shared among
// the team (an `omp for`, so every thread returns after all of out is written).
VIT_MS_INTERNAL int attention(const float *qkv, int64_t batch, int64_t n, int64_t heads, int64_t dim, float scale,
                              float *out);
VIT_MS_INTERNAL int attention_in_team(const float *qkv, int64_t batch, int64_t n, int64_t heads, int64_t dim,
                                      float scale, float *out);
#endif
