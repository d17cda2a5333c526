// Dense layers: the bias add with a one-pass bias gradient (MindSpore's CPU BiasAddGrad took 12 % of a
// ViT-S step), and x w^T + b with its backward on oneDNN's sgemm where the MindSpore wheel ships oneDNN.
#include "common.h"

static void add_bias_rows(const float *__restrict x, const float *__restrict b, float *__restrict y,
                                        int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < d; ++j) y[r * d + j] = x[r * d + j] + b[j];
}

SAME_SHAPE_INFER(AddBias)

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

sgemm_fn dnnl_sgemm_fn() {
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

// y[rows, n] = x[rows, k] w^T + b on one thread
static int linear_rows(const float *x, const float *w, const float *b, float *y, int64_t rows, int64_t k, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(y + r * n, b, n * sizeof(float));
  return dnnl_sgemm_fn()('N', 'T', rows, n, k, 1.0f, x, k, w, k, 1.0f, y, n);
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
  if (dnnl_sgemm_fn() == nullptr) return 1;
  int status = 0;
  // Bias rows and product in one parallel region: one fork/join per layer, not two (it counts at batch 1).
  PARALLEL_ROWS(rows, if (nr > 0 && linear_rows(x + r0 * k, w, b, y + r0 * n, nr, k, n) != 0) status = 1)
  return status;
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
#endif
