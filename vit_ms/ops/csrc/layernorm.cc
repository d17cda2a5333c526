// LayerNorm over the last axis, forward, input gradient and (gamma, beta) gradient. MindSpore's CPU
// LayerNormGrad is a scalar loop that took 23 % of a ViT-S training step.
#include "common.h"

static void row_stats(const float *__restrict x, int64_t d, float eps, float *mean, float *rstd) {
  float s = 0.0f;
  VECTOR_SUM(s)
  for (int64_t j = 0; j < d; ++j) s += x[j];
  const float m = s / d;
  float v = 0.0f;
  VECTOR_SUM(v)
  for (int64_t j = 0; j < d; ++j) v += (x[j] - m) * (x[j] - m);
  *mean = m;
  *rstd = 1.0f / std::sqrt(v / d + eps);
}

static void layer_norm_rows(const float *__restrict x, const float *__restrict g,
                                          const float *__restrict b, float *__restrict y, int64_t rows,
                                          int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float m, rs;
    row_stats(x + r * d, d, eps, &m, &rs);
    for (int64_t j = 0; j < d; ++j) y[r * d + j] = (x[r * d + j] - m) * rs * g[j] + b[j];
  }
}

// dx = rstd * (g dy - mean(g dy) - xhat * mean(g dy xhat)), row by row
static void layer_norm_grad_rows(const float *__restrict x, const float *__restrict g,
                                               const float *__restrict dy, float *__restrict dx, int64_t rows,
                                               int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * d, *dyr = dy + r * d;
    float m, rs;
    row_stats(xr, d, eps, &m, &rs);
    float s1 = 0.0f, s2 = 0.0f;
    VECTOR_SUM(s1, s2)
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
static void param_grad_rows(const float *__restrict x, const float *__restrict dy,
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

void layer_norm_in_team(const float *x, const float *g, const float *b, float *y, int64_t rows, int64_t d,
                        float eps) {
  TEAM_ROWS(rows, if (nr > 0) layer_norm_rows(x + r0 * d, g, b, y + r0 * d, nr, d, eps))
}

void layer_norm(const float *x, const float *g, const float *b, float *y, int64_t rows, int64_t d, float eps) {
#pragma omp parallel
  layer_norm_in_team(x, g, b, y, rows, d, eps);
}

SAME_SHAPE_INFER(LayerNorm)
SAME_SHAPE_INFER(LayerNormGrad)

// (x, gamma, beta, eps[1]) -> y
extern "C" int LayerNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  if (nparam != 5 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]), *g = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  const int64_t d = last_dim(ndims[0], shapes[0]), rows = numel(ndims[0], shapes[0]) / d;
  layer_norm(x, g, b, y, rows, d, eps);
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
void column_sums(const float *x, const float *dy, float *out, int64_t rows, int64_t d, float eps, int64_t width) {
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
