"""Fused CPU kernels for the steps of a ViT that MindSpore's CPU backend runs slowly or holds memory for.

- Dense layers and the attention products on oneDNN's JIT sgemm, which ships inside the MindSpore
  wheel (`mindspore/lib/libdnnl.so.3`) but which MindSpore's own CPU MatMul does not use. The attention
  kernels read each head's q, k and v in place in the qkv projection's output, so no head split or
  Transpose is needed: MindSpore's CPU Transpose keeps a 2x-the-tensor offset table for the graph's life.
- Softmax, GELU (exact erf and tanh) and LayerNorm in one vectorised OpenMP pass each, forward and
  backward. MindSpore 2.10 computes GELU with a scalar `erf`/`tanh` per element (~20x PyTorch's time), and
  expands the softmax and LayerNorm backward into whole-tensor passes. Eigen's float32 rational erf and
  Cephes' exp are each accurate to a few ulp, the same class of error as PyTorch's own float32 GELU.
- The patch embedding's permutation, again without Transpose's table.

They are `ops.Custom(func_type="aot")` ops: the C++ source below is compiled once with the system's
C++ compiler into a cache directory (`$VIT_MS_KERNEL_CACHE`, default `~/.cache/vit_ms/kernels`) and
loaded by MindSpore. Where no compiler is found, or the device is not the CPU, every `*_kernel` factory
returns None, and so do the sgemm ones where the wheel has no oneDNN. The model then uses MindSpore's
built-in op for that step: the kernels are a speed-up, never a requirement.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import mindspore as ms
from mindspore import ops
from mindspore.ops import CustomRegOp, DataType

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

// Eigen's generic_fast_erf_float: a rational approximation on [-4, 4], a few ulp in float32.
static inline float erf_f(float x) {
  x = x < -4.f ? -4.f : (x > 4.f ? 4.f : x);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

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

static const float kSqrtHalf = 0.70710678118654752f;    // 1 / sqrt(2)
static const float kInvSqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi)
static const float kSqrt2OverPi = 0.79788456080286536f; // sqrt(2 / pi)
static const float kCubic = 0.044715f;

static int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

static bool all_float32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  return true;
}

// Each loop body is compiled for AVX-512, AVX2 and baseline x86-64; the loader picks the best the CPU has.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

VECTOR_CLONES static void gelu_erf(const float *__restrict x, float *__restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = 0.5f * x[i] * (1.0f + erf_f(x[i] * kSqrtHalf));
}

// dx = dy * (Phi(x) + x phi(x))
VECTOR_CLONES static void gelu_erf_grad(const float *__restrict x, const float *__restrict dy, float *__restrict dx,
                                        int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    dx[i] = dy[i] * (0.5f * (1.0f + erf_f(v * kSqrtHalf)) + v * kInvSqrt2Pi * exp_neg_f(-0.5f * v * v));
  }
}

// y = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
VECTOR_CLONES static void gelu_tanh(const float *__restrict x, float *__restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float u = kSqrt2OverPi * (v + kCubic * v * v * v);
    // 1 + tanh(u) from e = exp(-2|u|), exact where tanh(u) is close to -1 (1 + t would cancel there).
    const float e = exp_neg_f(-2.0f * (u < 0.0f ? -u : u));
    y[i] = 0.5f * v * ((u < 0.0f ? 2.0f * e : 2.0f) / (1.0f + e));
  }
}

// dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2 / pi) (1 + 3 * 0.044715 x^2)), t = tanh(u)
VECTOR_CLONES static void gelu_tanh_grad(const float *__restrict x, const float *__restrict dy, float *__restrict dx,
                                         int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float u = kSqrt2OverPi * (v + kCubic * v * v * v);
    // 1 + t and 1 - t^2 from e = exp(-2|u|): both would cancel where |t| is close to 1.
    const float e = exp_neg_f(-2.0f * (u < 0.0f ? -u : u));
    const float one_plus_t = (u < 0.0f ? 2.0f * e : 2.0f) / (1.0f + e);
    const float sech2 = 4.0f * e / ((1.0f + e) * (1.0f + e));
    dx[i] = dy[i] * (0.5f * one_plus_t + 0.5f * v * sech2 * kSqrt2OverPi * (1.0f + 3.0f * kCubic * v * v));
  }
}

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
SAME_SHAPE_INFER(GeluErf)
SAME_SHAPE_INFER(GeluErfGrad)
SAME_SHAPE_INFER(GeluTanh)
SAME_SHAPE_INFER(GeluTanhGrad)

#define UNARY_KERNEL(name, fn)                                                                      \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, \
                      void *stream, void *extra) {                                                  \
    if (nparam != 2 || !all_float32(nparam, dtypes)) return 1;                                      \
    const float *x = static_cast<const float *>(params[0]);                                         \
    float *y = static_cast<float *>(params[1]);                                                     \
    const int64_t n = numel(ndims[0], shapes[0]);                                                   \
    PARALLEL_CHUNKS(n, fn(x + begin, y + begin, len))                                               \
    return 0;                                                                                       \
  }

#define GRAD_KERNEL(name, fn)                                                                       \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, \
                      void *stream, void *extra) {                                                  \
    if (nparam != 3 || !all_float32(nparam, dtypes)) return 1;                                      \
    const float *x = static_cast<const float *>(params[0]);                                         \
    const float *dy = static_cast<const float *>(params[1]);                                        \
    float *dx = static_cast<float *>(params[2]);                                                    \
    const int64_t n = numel(ndims[0], shapes[0]);                                                   \
    PARALLEL_CHUNKS(n, fn(x + begin, dy + begin, dx + begin, len))                                  \
    return 0;                                                                                       \
  }

UNARY_KERNEL(GeluErf, gelu_erf)
GRAD_KERNEL(GeluErfGrad, gelu_erf_grad)
UNARY_KERNEL(GeluTanh, gelu_tanh)
GRAD_KERNEL(GeluTanhGrad, gelu_tanh_grad)

// ---- LayerNorm over the last axis and the bias of a Dense: MindSpore's CPU LayerNormGrad and
// BiasAddGrad are single-pass-per-element scalar loops that take longer than the matrix products.

static int64_t last_dim(int ndim, const int64_t *shape) { return ndim > 0 ? shape[ndim - 1] : 1; }

VECTOR_CLONES static void row_stats(const float *__restrict x, int64_t d, float eps, float *mean, float *rstd) {
  float s = 0.0f;
  for (int64_t j = 0; j < d; ++j) s += x[j];
  const float m = s / d;
  float v = 0.0f;
  for (int64_t j = 0; j < d; ++j) v += (x[j] - m) * (x[j] - m);
  *mean = m;
  *rstd = 1.0f / std::sqrt(v / d + eps);
}

VECTOR_CLONES static void layer_norm_rows(const float *__restrict x, const float *__restrict g,
                                          const float *__restrict b, float *__restrict y, int64_t rows,
                                          int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float m, rs;
    row_stats(x + r * d, d, eps, &m, &rs);
    for (int64_t j = 0; j < d; ++j) y[r * d + j] = (x[r * d + j] - m) * rs * g[j] + b[j];
  }
}

// dx = rstd * (g dy - mean(g dy) - xhat * mean(g dy xhat)), row by row
VECTOR_CLONES static void layer_norm_grad_rows(const float *__restrict x, const float *__restrict g,
                                               const float *__restrict dy, float *__restrict dx, int64_t rows,
                                               int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * d, *dyr = dy + r * d;
    float m, rs;
    row_stats(xr, d, eps, &m, &rs);
    float s1 = 0.0f, s2 = 0.0f;
    for (int64_t j = 0; j < d; ++j) {
      const float gdy = g[j] * dyr[j];
      s1 += gdy;
      s2 += gdy * (xr[j] - m) * rs;
    }
    s1 /= d;
    s2 /= d;
    for (int64_t j = 0; j < d; ++j) dx[r * d + j] = rs * (g[j] * dyr[j] - s1 - (xr[j] - m) * rs * s2);
  }
}

// acc[0:d] += sum_r dy * xhat (d gamma), acc[d:2d] += sum_r dy (d beta); x may be null (bias only)
VECTOR_CLONES static void param_grad_rows(const float *__restrict x, const float *__restrict dy,
                                          float *__restrict acc, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *dyr = dy + r * d;
    if (x != nullptr) {
      float m, rs;
      row_stats(x + r * d, d, eps, &m, &rs);
      for (int64_t j = 0; j < d; ++j) acc[j] += dyr[j] * (x[r * d + j] - m) * rs;
    }
    float *bias = acc + (x != nullptr ? d : 0);
    for (int64_t j = 0; j < d; ++j) bias[j] += dyr[j];
  }
}

VECTOR_CLONES static void add_bias_rows(const float *__restrict x, const float *__restrict b, float *__restrict y,
                                        int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < d; ++j) y[r * d + j] = x[r * d + j] + b[j];
}

// Rows split into one contiguous block per OpenMP thread.
#define PARALLEL_ROWS(rows, body)                                             \
  _Pragma("omp parallel") {                                                   \
    const int64_t threads = omp_get_num_threads();                            \
    const int64_t chunk = ((rows) + threads - 1) / threads;                   \
    const int64_t r0 = omp_get_thread_num() * chunk;                          \
    const int64_t nr = r0 >= (rows) ? 0 : ((rows) - r0 < chunk ? (rows) - r0 : chunk); \
    body;                                                                     \
  }

SAME_SHAPE_INFER(LayerNorm)
SAME_SHAPE_INFER(LayerNormGrad)
SAME_SHAPE_INFER(AddBias)

// (x, gamma, beta, eps[1]) -> y
extern "C" int LayerNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  if (nparam != 5 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]), *g = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  const int64_t d = last_dim(ndims[0], shapes[0]), rows = numel(ndims[0], shapes[0]) / d;
  PARALLEL_ROWS(rows, if (nr > 0) layer_norm_rows(x + r0 * d, g, b, y + r0 * d, nr, d, eps))
  return 0;
}

// (x, gamma, dy, eps[1]) -> dx
extern "C" int LayerNormGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 5 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]), *g = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *dx = static_cast<float *>(params[4]);
  const int64_t d = last_dim(ndims[0], shapes[0]), rows = numel(ndims[0], shapes[0]) / d;
  PARALLEL_ROWS(rows, if (nr > 0) layer_norm_grad_rows(x + r0 * d, g, dy + r0 * d, dx + r0 * d, nr, d, eps))
  return 0;
}

// Per-thread partial sums over rows, added up in thread order (deterministic for a fixed thread count).
static void column_sums(const float *x, const float *dy, float *out, int64_t rows, int64_t d, float eps, int64_t width) {
  std::vector<std::vector<float>> partial(omp_get_max_threads());
  PARALLEL_ROWS(rows, {
    partial[omp_get_thread_num()].assign(width, 0.0f);
    if (nr > 0) param_grad_rows(x == nullptr ? nullptr : x + r0 * d, dy + r0 * d, partial[omp_get_thread_num()].data(), nr, d, eps);
  })
  for (int64_t j = 0; j < width; ++j) out[j] = 0.0f;
  for (const auto &p : partial)
    for (int64_t j = 0; j < static_cast<int64_t>(p.size()); ++j) out[j] += p[j];
}

// (x, dy, eps[1]) -> (2, D): d gamma, d beta
extern "C" std::vector<int64_t> LayerNormParamGradInferShape(int *ndims, int64_t **shapes, void *extra) {
  return std::vector<int64_t>{2, last_dim(ndims[0], shapes[0])};
}
extern "C" int LayerNormParamGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *stream, void *extra) {
  if (nparam != 4 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]), *dy = static_cast<const float *>(params[1]);
  const float eps = *static_cast<const float *>(params[2]);
  const int64_t d = last_dim(ndims[0], shapes[0]), rows = numel(ndims[0], shapes[0]) / d;
  column_sums(x, dy, static_cast<float *>(params[3]), rows, d, eps, 2 * d);
  return 0;
}

// (x, b) -> x + b over the last axis
extern "C" int AddBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                       void *stream, void *extra) {
  if (nparam != 3 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]), *b = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t d = last_dim(ndims[0], shapes[0]), rows = numel(ndims[0], shapes[0]) / d;
  PARALLEL_ROWS(rows, if (nr > 0) add_bias_rows(x + r0 * d, b, y + r0 * d, nr, d))
  return 0;
}

// dy -> sum over all but the last axis (the bias gradient)
extern "C" std::vector<int64_t> BiasGradInferShape(int *ndims, int64_t **shapes, void *extra) {
  return std::vector<int64_t>{last_dim(ndims[0], shapes[0])};
}
extern "C" int BiasGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                        void *stream, void *extra) {
  if (nparam != 2 || !all_float32(nparam, dtypes)) return 1;
  const int64_t d = last_dim(ndims[0], shapes[0]), rows = numel(ndims[0], shapes[0]) / d;
  column_sums(nullptr, static_cast<const float *>(params[0]), static_cast<float *>(params[1]), rows, d, 0.0f, d);
  return 0;
}

// ---- Dense layers on oneDNN's sgemm. MindSpore's CPU wheel ships oneDNN (lib/libdnnl.so.3) but runs
// MatMul on its own nnacl kernels; oneDNN's JIT sgemm is the MKL-class GEMM PyTorch gets. The library
// is built (threadpool runtime) to run one sgemm on one thread, so each kernel splits its output rows
// into one block per OpenMP thread.
#ifdef VIT_MS_DNNL_PATH
#include <dlfcn.h>

typedef int (*sgemm_fn)(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                        int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

static sgemm_fn dnnl_sgemm_fn() {
  static sgemm_fn fn = [] {
    void *lib = dlopen(VIT_MS_DNNL_PATH, RTLD_NOW | RTLD_LOCAL);
    return lib == nullptr ? nullptr : reinterpret_cast<sgemm_fn>(dlsym(lib, "dnnl_sgemm"));
  }();
  return fn;
}

// Row-major C[m, n] = alpha op(A) op(B) + beta C, output rows split over the OpenMP threads. `a_row`
// is the distance in A between consecutive rows of op(A) (lda without a transpose, 1 with one).
static int parallel_sgemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda,
                          int64_t a_row, const float *b, int64_t ldb, float beta, float *c) {
  const sgemm_fn sgemm = dnnl_sgemm_fn();
  if (sgemm == nullptr) return 1;
  int status = 0;
  PARALLEL_ROWS(m, if (nr > 0 && sgemm(ta, tb, nr, n, k, 1.0f, a + r0 * a_row, lda, b, ldb, beta, c + r0 * n, n) != 0) status = 1)
  return status;
}

// (x (rows, K), w (N, K), b (N)) -> x w^T + b, like nn.Dense on 2-D input
extern "C" std::vector<int64_t> LinearInferShape(int *ndims, int64_t **shapes, void *extra) {
  return std::vector<int64_t>{shapes[0][0], shapes[1][0]};
}
extern "C" int Linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  if (nparam != 4 || ndims[0] != 2 || ndims[1] != 2 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]), *w = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t rows = shapes[0][0], k = shapes[0][1], n = shapes[1][0];
  PARALLEL_ROWS(rows, for (int64_t r = r0; r < r0 + nr; ++r) std::memcpy(y + r * n, b, n * sizeof(float)))
  return parallel_sgemm('N', 'T', rows, n, k, x, k, k, w, k, 1.0f, y);
}

// (dy (rows, N), w (N, K)) -> dx = dy w
extern "C" std::vector<int64_t> LinearGradInputInferShape(int *ndims, int64_t **shapes, void *extra) {
  return std::vector<int64_t>{shapes[0][0], shapes[1][1]};
}
extern "C" int LinearGradInput(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || !all_float32(nparam, dtypes)) return 1;
  const float *dy = static_cast<const float *>(params[0]), *w = static_cast<const float *>(params[1]);
  const int64_t rows = shapes[0][0], n = shapes[0][1], k = shapes[1][1];
  return parallel_sgemm('N', 'N', rows, k, n, dy, n, n, w, k, 0.0f, static_cast<float *>(params[2]));
}

// (dy (rows, N), x (rows, K)) -> dw = dy^T x, (N, K)
extern "C" std::vector<int64_t> LinearGradWeightInferShape(int *ndims, int64_t **shapes, void *extra) {
  return std::vector<int64_t>{shapes[0][1], shapes[1][1]};
}
extern "C" int LinearGradWeight(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || !all_float32(nparam, dtypes)) return 1;
  const float *dy = static_cast<const float *>(params[0]), *x = static_cast<const float *>(params[1]);
  const int64_t rows = shapes[0][0], n = shapes[0][1], k = shapes[1][1];
  return parallel_sgemm('T', 'N', n, k, rows, dy, n, 1, x, k, 0.0f, static_cast<float *>(params[2]));
}

// ---- Attention products straight from the qkv projection's output, (B, N, 3, heads, head_dim): head h
// of q, k or v in sample b is an (N, head_dim) matrix whose rows lie 3 D floats apart, which sgemm reads
// in place (lda = 3 D). No head split, no transpose, no q/k/v copies, forward or backward. One sgemm per
// (sample, head), those split over the OpenMP threads.
struct Heads {
  int64_t batch, n, heads, dim;                  // B, N, heads, head_dim
  int64_t row() const { return 3 * heads * dim; }  // floats between token rows of qkv
  int64_t count() const { return batch * heads; }
  // the (N, head_dim) matrix of q (part 0), k (1) or v (2) for pair i = b * heads + h
  int64_t at(int64_t i, int part) const { return (i / heads) * n * row() + part * heads * dim + (i % heads) * dim; }
  int64_t square(int64_t i) const { return i * n * n; }                                  // in (B, heads, N, N)
  int64_t out(int64_t i) const { return (i / heads) * n * heads * dim + (i % heads) * dim; }  // in (B, N, heads, head_dim)
};

static bool qkv_heads(int ndim, const int64_t *shape, Heads *h) {
  if (ndim != 5 || shape[2] != 3) return false;
  *h = Heads{shape[0], shape[1], shape[3], shape[4]};
  return true;
}

// Every (sample, head) pair through `body(i)`, which returns sgemm's status.
template <typename F>
static int for_each_head(const Heads &h, F body) {
  int status = dnnl_sgemm_fn() == nullptr ? 1 : 0;
  if (status != 0) return status;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < h.count(); ++i)
    if (body(i) != 0) status = 1;
  return status;
}

// (qkv, scale[1]) -> scores (B, heads, N, N) = scale q k^T
extern "C" std::vector<int64_t> AttentionScoresInferShape(int *ndims, int64_t **shapes, void *extra) {
  const int64_t *s = shapes[0];
  return std::vector<int64_t>{s[0], s[3], s[1], s[1]};
}
extern "C" int AttentionScores(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  Heads h;
  if (nparam != 3 || !all_float32(nparam, dtypes) || !qkv_heads(ndims[0], shapes[0], &h)) return 1;
  const float *qkv = static_cast<const float *>(params[0]);
  const float scale = *static_cast<const float *>(params[1]);
  float *scores = static_cast<float *>(params[2]);
  return for_each_head(h, [&](int64_t i) {
    return dnnl_sgemm_fn()('N', 'T', h.n, h.n, h.dim, scale, qkv + h.at(i, 0), h.row(), qkv + h.at(i, 1), h.row(),
                           0.0f, scores + h.square(i), h.n);
  });
}

// (scores' gradient dS, qkv, scale[1]) -> d qkv: dq = scale dS k, dk = scale dS^T q, dv = 0
extern "C" std::vector<int64_t> AttentionScoresGradInferShape(int *ndims, int64_t **shapes, void *extra) {
  return std::vector<int64_t>(shapes[1], shapes[1] + ndims[1]);
}
extern "C" int AttentionScoresGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *stream, void *extra) {
  Heads h;
  if (nparam != 4 || !all_float32(nparam, dtypes) || !qkv_heads(ndims[1], shapes[1], &h)) return 1;
  const float *ds = static_cast<const float *>(params[0]), *qkv = static_cast<const float *>(params[1]);
  const float scale = *static_cast<const float *>(params[2]);
  float *dqkv = static_cast<float *>(params[3]);
  return for_each_head(h, [&](int64_t i) {
    for (int64_t t = 0; t < h.n; ++t) std::memset(dqkv + h.at(i, 2) + t * h.row(), 0, h.dim * sizeof(float));
    return dnnl_sgemm_fn()('N', 'N', h.n, h.dim, h.n, scale, ds + h.square(i), h.n, qkv + h.at(i, 1), h.row(), 0.0f,
                           dqkv + h.at(i, 0), h.row()) |
           dnnl_sgemm_fn()('T', 'N', h.n, h.dim, h.n, scale, ds + h.square(i), h.n, qkv + h.at(i, 0), h.row(), 0.0f,
                           dqkv + h.at(i, 1), h.row());
  });
}

// (probs (B, heads, N, N), qkv) -> probs v, as (B, N, heads, head_dim): the heads already merged
extern "C" std::vector<int64_t> AttentionValuesInferShape(int *ndims, int64_t **shapes, void *extra) {
  const int64_t *s = shapes[1];
  return std::vector<int64_t>{s[0], s[1], s[3], s[4]};
}
extern "C" int AttentionValues(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  Heads h;
  if (nparam != 3 || !all_float32(nparam, dtypes) || !qkv_heads(ndims[1], shapes[1], &h)) return 1;
  const float *probs = static_cast<const float *>(params[0]), *qkv = static_cast<const float *>(params[1]);
  float *out = static_cast<float *>(params[2]);
  return for_each_head(h, [&](int64_t i) {
    return dnnl_sgemm_fn()('N', 'N', h.n, h.dim, h.n, 1.0f, probs + h.square(i), h.n, qkv + h.at(i, 2), h.row(),
                           0.0f, out + h.out(i), h.heads * h.dim);
  });
}

// (dO (B, N, heads, head_dim), qkv) -> d probs = dO v^T, (B, heads, N, N)
extern "C" std::vector<int64_t> AttentionValuesGradProbsInferShape(int *ndims, int64_t **shapes, void *extra) {
  const int64_t *s = shapes[1];
  return std::vector<int64_t>{s[0], s[3], s[1], s[1]};
}
extern "C" int AttentionValuesGradProbs(int nparam, void **params, int *ndims, int64_t **shapes,
                                        const char **dtypes, void *stream, void *extra) {
  Heads h;
  if (nparam != 3 || !all_float32(nparam, dtypes) || !qkv_heads(ndims[1], shapes[1], &h)) return 1;
  const float *dout = static_cast<const float *>(params[0]), *qkv = static_cast<const float *>(params[1]);
  float *dprobs = static_cast<float *>(params[2]);
  return for_each_head(h, [&](int64_t i) {
    return dnnl_sgemm_fn()('N', 'T', h.n, h.n, h.dim, 1.0f, dout + h.out(i), h.heads * h.dim, qkv + h.at(i, 2),
                           h.row(), 0.0f, dprobs + h.square(i), h.n);
  });
}

// (probs, dO (B, N, heads, head_dim)) -> d qkv: dv = probs^T dO, dq = dk = 0
extern "C" std::vector<int64_t> AttentionValuesGradQKVInferShape(int *ndims, int64_t **shapes, void *extra) {
  const int64_t *s = shapes[1];
  return std::vector<int64_t>{s[0], s[1], 3, s[2], s[3]};
}
extern "C" int AttentionValuesGradQKV(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *stream, void *extra) {
  if (nparam != 3 || ndims[1] != 4 || !all_float32(nparam, dtypes)) return 1;
  const Heads h{shapes[1][0], shapes[1][1], shapes[1][2], shapes[1][3]};
  const float *probs = static_cast<const float *>(params[0]), *dout = static_cast<const float *>(params[1]);
  float *dqkv = static_cast<float *>(params[2]);
  return for_each_head(h, [&](int64_t i) {
    for (int64_t t = 0; t < h.n; ++t)
      for (int part = 0; part < 2; ++part) std::memset(dqkv + h.at(i, part) + t * h.row(), 0, h.dim * sizeof(float));
    return dnnl_sgemm_fn()('T', 'N', h.n, h.dim, h.n, 1.0f, probs + h.square(i), h.n, dout + h.out(i),
                           h.heads * h.dim, 0.0f, dqkv + h.at(i, 2), h.row());
  });
}
#endif

// ---- Softmax over the last axis. MindSpore expands its backward into Mul, ReduceSum, Sub, Mul over the
// whole (B, heads, N, N) tensor: ~50 ms per ViT-S/16 block at batch 16, 13 % of a training step.

VECTOR_CLONES static void softmax_rows(const float *__restrict x, float *__restrict y, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * d;
    float *yr = y + r * d;
    float m = xr[0];
    for (int64_t j = 1; j < d; ++j) m = xr[j] > m ? xr[j] : m;
    float s = 0.0f;
    for (int64_t j = 0; j < d; ++j) {
      yr[j] = exp_neg_f(xr[j] - m);
      s += yr[j];
    }
    const float inv = 1.0f / s;
    for (int64_t j = 0; j < d; ++j) yr[j] *= inv;
  }
}

// dx = y * (dy - sum(dy * y)), row by row
VECTOR_CLONES static void softmax_grad_rows(const float *__restrict y, const float *__restrict dy,
                                            float *__restrict dx, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *yr = y + r * d, *dyr = dy + r * d;
    float s = 0.0f;
    for (int64_t j = 0; j < d; ++j) s += dyr[j] * yr[j];
    for (int64_t j = 0; j < d; ++j) dx[r * d + j] = yr[j] * (dyr[j] - s);
  }
}

SAME_SHAPE_INFER(Softmax)
SAME_SHAPE_INFER(SoftmaxGrad)

extern "C" int Softmax(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                       void *stream, void *extra) {
  if (nparam != 2 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t d = last_dim(ndims[0], shapes[0]), rows = numel(ndims[0], shapes[0]) / d;
  PARALLEL_ROWS(rows, if (nr > 0) softmax_rows(x + r0 * d, y + r0 * d, nr, d))
  return 0;
}

// (y, dy) -> dx, from the forward's output
extern "C" int SoftmaxGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  if (nparam != 3 || !all_float32(nparam, dtypes)) return 1;
  const float *y = static_cast<const float *>(params[0]), *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t d = last_dim(ndims[0], shapes[0]), rows = numel(ndims[0], shapes[0]) / d;
  PARALLEL_ROWS(rows, if (nr > 0) softmax_grad_rows(y + r0 * d, dy + r0 * d, dx + r0 * d, nr, d))
  return 0;
}

// ---- Axis permutations that keep the last axis in place: rows of the last axis are copied whole.
// MindSpore's CPU Transpose builds an int64 offset table for every element when the graph compiles
// and keeps it for the life of the graph: 2x the tensor's bytes per Transpose. Heads split by Transposes
// (eight per block, forward and backward) held ~1.7 GB of a ViT-S/16 training graph at batch 16; the
// attention kernels need no split, and the patch embedding's permutation is this kernel.

// out[o] = in[perm(o)] for a tensor of `ndim` axes whose last axis stays last; perm[i] is the input
// axis that output axis i takes.
static void permute_rows(const float *in, float *out, int ndim, const int64_t *in_shape, const int *perm) {
  int64_t in_stride[8], out_shape[8];
  in_stride[ndim - 1] = 1;
  for (int i = ndim - 2; i >= 0; --i) in_stride[i] = in_stride[i + 1] * in_shape[i + 1];
  for (int i = 0; i < ndim; ++i) out_shape[i] = in_shape[perm[i]];
  const int64_t row = in_shape[ndim - 1], rows = numel(ndim, in_shape) / row;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    int64_t rest = r, offset = 0;
    for (int i = ndim - 2; i >= 0; --i) {
      offset += (rest % out_shape[i]) * in_stride[perm[i]];
      rest /= out_shape[i];
    }
    std::memcpy(out + r * row, in + offset, row * sizeof(float));
  }
}

#define PERMUTE_KERNEL(name, rank, ...)                                                              \
  static const int name##Perm[rank] = {__VA_ARGS__};                                                 \
  extern "C" std::vector<int64_t> name##InferShape(int *ndims, int64_t **shapes, void *extra) {      \
    std::vector<int64_t> out(rank);                                                                  \
    for (int i = 0; i < rank; ++i) out[i] = shapes[0][name##Perm[i]];                                \
    return out;                                                                                      \
  }                                                                                                  \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, \
                      void *stream, void *extra) {                                                   \
    if (nparam != 2 || ndims[0] != rank || !all_float32(nparam, dtypes)) return 1;                   \
    permute_rows(static_cast<const float *>(params[0]), static_cast<float *>(params[1]), rank,       \
                 shapes[0], name##Perm);                                                             \
    return 0;                                                                                        \
  }

// (B, C, H/p, p, W/p, p) -> (B, H/p, W/p, C, p, p): the patches of an image, each in the conv weight's order.
PERMUTE_KERNEL(Patchify, 6, 0, 2, 4, 1, 3, 5)
// (B, H/p, W/p, C, p, p) -> (B, C, H/p, p, W/p, p): the inverse (Patchify's backward).
PERMUTE_KERNEL(Unpatchify, 6, 0, 3, 1, 4, 2, 5)
"""

# MindSpore's own libraries use the pre-C++11 string/vector ABI; the shape functions return a vector.
# The extra math flags only let the loops vectorise (select instead of branch for the clamps); none
# reorders arithmetic or swaps in approximate instructions, so results are the same as without them.
_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-D_GLIBCXX_USE_CXX11_ABI=0",
          "-fno-trapping-math", "-ffinite-math-only", "-fno-signed-zeros", "-fno-math-errno"]
_library: Optional[str] = None
_failed = False


@functools.lru_cache(maxsize=None)
def dnnl_library() -> Optional[Path]:
    """The oneDNN library inside the MindSpore wheel (`mindspore/lib/libdnnl.so.3`), or None."""
    path = Path(ms.__file__).parent / "lib" / "libdnnl.so.3"
    if not path.is_file():
        logger.warning("%s not found: vit_ms runs Dense layers and attention on MindSpore's slower MatMul", path)
        return None
    return path


def _defines_and_libs() -> tuple:
    """Extra compiler flags: the sgemm kernels (Dense, attention) where the wheel has oneDNN, loaded with
    dlopen (hence -ldl)."""
    dnnl = dnnl_library()
    return ([f'-DVIT_MS_DNNL_PATH="{dnnl}"'], ["-ldl"]) if dnnl is not None else ([], [])


def cache_dir() -> Path:
    """Where compiled kernels live: `$VIT_MS_KERNEL_CACHE`, else `~/.cache/vit_ms/kernels`."""
    return Path(os.environ.get("VIT_MS_KERNEL_CACHE") or Path.home() / ".cache" / "vit_ms" / "kernels")


def build_library() -> Optional[str]:
    """Compile the kernels (once per source version) and return the shared library's path, or None.

    The library is named by a hash of the source and flags, and written to a temporary name then
    renamed, so concurrent processes never load a half-written file.
    """
    global _library, _failed
    if _library is not None and Path(_library).exists():
        return _library
    if _failed:
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        logger.warning("no C++ compiler (g++) found: vit_ms uses MindSpore's slower built-in ops on CPU")
        _failed = True
        return None
    defines, libs = _defines_and_libs()
    digest = hashlib.sha256((_SOURCE + " ".join(_FLAGS + defines + libs)).encode()).hexdigest()[:16]
    target = cache_dir() / f"vit_ms_kernels_{digest}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src = Path(tmp) / "kernels.cc"
                src.write_text(_SOURCE)
                out = Path(tmp) / target.name
                subprocess.run([compiler, *_FLAGS, *defines, "-o", str(out), str(src), *libs], check=True,
                               capture_output=True, text=True, timeout=300)
                os.replace(out, target)
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", "") or err
            logger.warning("could not build the vit_ms CPU kernels in %s (%s): using MindSpore's built-in "
                           "ops", target.parent, detail)
            _failed = True
            return None
    _library = str(target)
    return _library


def _same(x, *_):
    return x


def _custom(library: str, name: str, num_inputs: int, bprop=None):
    # out_shape=None: the shape comes from the library's C++ `<name>InferShape`, which (unlike a Python
    # function) also runs for a dynamic batch; MindSpore needs the registration to call it.
    reg = CustomRegOp(f"vit_ms_{name}_cpu")
    for i in range(num_inputs):
        reg = reg.input(i, f"x{i}")
    reg = reg.output(0, "y").dtype_format(*[DataType.None_None] * (num_inputs + 1)).target("CPU")
    return ops.Custom(f"{library}:{name}", out_shape=None, out_dtype=_same, func_type="aot", bprop=bprop,
                      reg_info=reg.get_op_info())


def _cpu_library() -> Optional[str]:
    if ms.get_context("device_target") != "CPU":
        return None
    return build_library()


def gelu_kernel(approximate: bool):
    """The fused GELU op for the CPU (an `ops.Custom` with its own backward), or None if unavailable.

    Args:
        approximate: True for the tanh form, False for the exact erf form.
    """
    library = _cpu_library()
    if library is None:
        return None
    name = "GeluTanh" if approximate else "GeluErf"
    grad = _custom(library, name + "Grad", 2)

    def bprop(x, out, dout):
        return (grad(x, dout),)

    return _custom(library, name, 1, bprop)


def layer_norm_kernel():
    """LayerNorm over the last axis, `op(x, gamma, beta, eps) -> y` with `eps` a float32 tensor of shape
    (1,), and a fused backward; None if unavailable."""
    library = _cpu_library()
    if library is None:
        return None
    grad_x = _custom(library, "LayerNormGrad", 4)
    grad_params = _custom(library, "LayerNormParamGrad", 3)

    def bprop(x, gamma, beta, eps, out, dout):
        params = grad_params(x, dout, eps)  # (2, D): d gamma, d beta
        return grad_x(x, gamma, dout, eps), params[0], params[1], ops.zeros_like(eps)

    return _custom(library, "LayerNorm", 4, bprop)


def add_bias_kernel():
    """`op(x, b) -> x + b` over the last axis with a fused bias gradient (column sum); None if unavailable."""
    library = _cpu_library()
    if library is None:
        return None
    grad_b = _custom(library, "BiasGrad", 1)

    def bprop(x, b, out, dout):
        return dout, grad_b(dout)

    return _custom(library, "AddBias", 2, bprop)



def linear_kernel():
    """`op(x, w, b) -> x w^T + b` for 2-D x (rows, in) and w (out, in), like `nn.Dense`, on oneDNN's sgemm,
    with its backward on the same sgemm; None where the MindSpore wheel has no oneDNN or no compiler."""
    library = _cpu_library()
    if library is None or dnnl_library() is None:
        return None
    grad_x = _custom(library, "LinearGradInput", 2)
    grad_w = _custom(library, "LinearGradWeight", 2)
    grad_b = _custom(library, "BiasGrad", 1)

    def bprop(x, w, b, out, dout):
        return grad_x(dout, w), grad_w(dout, x), grad_b(dout)

    return _custom(library, "Linear", 3, bprop)


def attention_kernels():
    """`(scores, values)` on the qkv projection's output viewed as (B, N, 3, heads, head_dim), in place:
    `scores(qkv, scale) -> scale q k^T` (B, heads, N, N), with `scale` a float32 tensor of shape (1,), and
    `values(probs, qkv) -> probs v` as (B, N, heads, head_dim), the heads already merged. oneDNN's sgemm,
    with their backward; None where the MindSpore wheel has no oneDNN or no compiler."""
    library = _cpu_library()
    if library is None or dnnl_library() is None:
        return None
    scores_grad = _custom(library, "AttentionScoresGrad", 3)
    values_grad_probs = _custom(library, "AttentionValuesGradProbs", 2)
    values_grad_qkv = _custom(library, "AttentionValuesGradQKV", 2)

    def scores_bprop(qkv, scale, out, dout):
        return scores_grad(dout, qkv, scale), ops.zeros_like(scale)

    def values_bprop(probs, qkv, out, dout):
        return values_grad_probs(dout, qkv), values_grad_qkv(probs, dout)

    return (_custom(library, "AttentionScores", 2, scores_bprop),
            _custom(library, "AttentionValues", 2, values_bprop))


def softmax_kernel():
    """Softmax over the last axis, `op(x) -> y`, with a one-pass backward from y; None if unavailable."""
    library = _cpu_library()
    if library is None:
        return None
    grad = _custom(library, "SoftmaxGrad", 2)

    def bprop(x, out, dout):
        return (grad(out, dout),)

    return _custom(library, "Softmax", 1, bprop)


def patchify_kernel():
    """`op(x) -> x.transpose(0, 2, 4, 1, 3, 5)` for a (B, C, H/p, p, W/p, p) float32 image view: each
    patch's pixels in the conv weight's (C, p, p) order. None if unavailable."""
    library = _cpu_library()
    if library is None:
        return None
    grad = _custom(library, "Unpatchify", 1)

    def bprop(x, out, dout):
        return (grad(dout),)

    return _custom(library, "Patchify", 1, bprop)


__all__ = ["gelu_kernel", "layer_norm_kernel", "add_bias_kernel", "linear_kernel", "attention_kernels",
           "softmax_kernel", "patchify_kernel", "build_library", "cache_dir"]
