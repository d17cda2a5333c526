// GELU, exact (erf) and tanh forms, forward and backward, one vectorised OpenMP pass each. MindSpore 2.10
// computes GELU with a scalar erf/tanh per element (~20x PyTorch's time).
#include "common.h"

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


static const float kSqrtHalf = 0.70710678118654752f;    // 1 / sqrt(2)
static const float kInvSqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi)
static const float kSqrt2OverPi = 0.79788456080286536f; // sqrt(2 / pi)
static const float kCubic = 0.044715f;

void gelu_erf(const float *x, float *y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = 0.5f * x[i] * (1.0f + erf_f(x[i] * kSqrtHalf));
}

// dx = dy * (Phi(x) + x phi(x))
static void gelu_erf_grad(const float *__restrict x, const float *__restrict dy, float *__restrict dx,
                                        int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    dx[i] = dy[i] * (0.5f * (1.0f + erf_f(v * kSqrtHalf)) + v * kInvSqrt2Pi * exp_neg_f(-0.5f * v * v));
  }
}

// y = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
void gelu_tanh(const float *x, float *y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float u = kSqrt2OverPi * (v + kCubic * v * v * v);
    // 1 + tanh(u) from e = exp(-2|u|), exact where tanh(u) is close to -1 (1 + t would cancel there).
    const float e = exp_neg_f(-2.0f * (u < 0.0f ? -u : u));
    y[i] = 0.5f * v * ((u < 0.0f ? 2.0f * e : 2.0f) / (1.0f + e));
  }
}

// dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2 / pi) (1 + 3 * 0.044715 x^2)), t = tanh(u)
static void gelu_tanh_grad(const float *__restrict x, const float *__restrict dy, float *__restrict dx,
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
