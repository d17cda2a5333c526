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
// is built (threadpool runtime) to run one sgemm on one thread, so each kernel splits its output into
// one block of rows (or of columns, see split_columns) per OpenMP thread.
#ifdef VIT_MS_DNNL_PATH
#include <dlfcn.h>
#include <unistd.h>

#include <new>

sgemm_fn dnnl_sgemm_fn() {
  static sgemm_fn fn = [] {
    void *lib = dlopen(VIT_MS_DNNL_PATH, RTLD_NOW | RTLD_LOCAL);
    return lib == nullptr ? nullptr : reinterpret_cast<sgemm_fn>(dlsym(lib, "dnnl_sgemm"));
  }();
  return fn;
}

// Column blocks of the output are whole multiples of this many floats (one AVX-512 register).
static const int64_t kColumnAlign = 16;

// One core's L2 cache in bytes (glibc reads it from cpuid; 2 MiB assumed where it cannot tell).
static int64_t l2_bytes() {
  static const int64_t bytes = [] {
    const long b = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return b > 0 ? static_cast<int64_t>(b) : int64_t{2} << 20;
  }();
  return bytes;
}

// Whether an (m, n) product with a (k, n) op(B) is split over the threads by columns rather than rows
// (Split::kWiderSide): where C is wider than tall and op(B) outgrows a core's L2, splitting rows would
// have every thread stream and pack all of op(B). That is a Dense layer's weight at batch 1 (m = 197
// tokens; ViT-B's 768 x 2304 qkv weight is 7 MB): columns measured 5-18 % faster per layer there, alone;
// for ViT-Ti's weights, which fit in L2, between 17 % slower and 10 % faster, so those keep the row split.
// Inside a model the balance can tip the other way (Split::kRowsInTeam, the encoder block kernel: block.cc).
static bool split_columns(int64_t m, int64_t n, int64_t k, Split split) {
  return split == Split::kWiderSide && n > m && k * n * static_cast<int64_t>(sizeof(float)) > l2_bytes();
}

// This thread's block of an (m, n) output: rows [r0, r0 + nr) x columns [c0, c0 + nc), possibly empty.
// Column blocks are whole multiples of kColumnAlign floats.
struct OutBlock {
  int64_t r0, nr, c0, nc;
};
static OutBlock thread_block(int64_t m, int64_t n, bool by_columns) {
  if (by_columns) {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t chunk = ((n + threads - 1) / threads + kColumnAlign - 1) / kColumnAlign * kColumnAlign;
    const int64_t c0 = t * chunk;
    return {0, m, c0, c0 >= n ? 0 : (n - c0 < chunk ? n - c0 : chunk)};
  }
  TEAM_ROWS(m, return (OutBlock{r0, nr, 0, n}))  // the rows LayerNorm gives this thread too (block.cc relies on it)
}

// Row-major C[m, n] = op(A) op(B) + beta C over the OpenMP threads, one block each (`thread_block`).
// `a_row` is the distance in A between consecutive rows of op(A) (lda without a transpose, 1 with one);
// `b_col` the distance in B between consecutive columns of op(B) (1 without a transpose, ldb with one).
// `prologue(r0, nr, c0, nc)` runs on each thread's block first (the bias rows of a Dense layer),
// `epilogue(...)` on it after the product (an activation, while the block is still in cache).
template <typename Prologue, typename Epilogue>
static int parallel_sgemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda,
                          int64_t a_row, const float *b, int64_t ldb, int64_t b_col, float beta, float *c,
                          Prologue prologue, Epilogue epilogue, Split split = Split::kWiderSide) {
  const sgemm_fn sgemm = dnnl_sgemm_fn();
  if (sgemm == nullptr) return 1;
  const bool by_columns = split_columns(m, n, k, split);
  // This thread's block: its status (0 or 1).
  auto block = [&]() {
    const OutBlock o = thread_block(m, n, by_columns);
    if (o.nr <= 0 || o.nc <= 0) return 0;
    prologue(o.r0, o.nr, o.c0, o.nc);
    if (sgemm(ta, tb, o.nr, o.nc, k, 1.0f, a + o.r0 * a_row, lda, b + o.c0 * b_col, ldb, beta,
              c + o.r0 * n + o.c0, n) != 0)
      return 1;
    epilogue(o.r0, o.nr, o.c0, o.nc);
    return 0;
  };
  if (split == Split::kRowsInTeam) return block();  // the caller's parallel region
  int status = 0;
#pragma omp parallel reduction(| : status)
  status |= block();
  return status;
}

static int parallel_sgemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda,
                          int64_t a_row, const float *b, int64_t ldb, int64_t b_col, float beta, float *c) {
  const auto nothing = [](int64_t, int64_t, int64_t, int64_t) {};
  return parallel_sgemm(ta, tb, m, n, k, a, lda, a_row, b, ldb, b_col, beta, c, nothing, nothing);
}

// y = x w^T + b, then `gelu` on it if given. Each thread writes the bias into its block of y, adds x w^T onto
// it (beta = 1) and applies `gelu` to the block while it is in cache: one parallel region, one fork/join per
// layer (it counts at batch 1).
int dense(const float *x, const float *w, const float *b, float *y, int64_t rows, int64_t k, int64_t n,
          void (*gelu)(const float *, float *, int64_t), Split split) {
  auto bias = [=](int64_t r0, int64_t nr, int64_t c0, int64_t nc) { bias_block(nullptr, b, y, r0, nr, c0, nc, n); };
  auto activation = [=](int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
    if (gelu != nullptr)
      for (int64_t r = r0; r < r0 + nr; ++r) gelu(y + r * n + c0, y + r * n + c0, nc);
  };
  return parallel_sgemm('N', 'T', rows, n, k, x, k, k, w, k, k, 1.0f, y, bias, activation, split);
}

// y = r + x w^T + b: each thread writes r + b into its block of y and adds x w^T onto it. r may be y (each
// element reads its own r before it is written).
int dense_residual(const float *x, const float *w, const float *b, const float *r, float *y, int64_t rows, int64_t k,
                   int64_t n, Split split) {
  auto residual_and_bias = [=](int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
    bias_block(r, b, y, r0, nr, c0, nc, n);
  };
  const auto nothing = [](int64_t, int64_t, int64_t, int64_t) {};
  return parallel_sgemm('N', 'T', rows, n, k, x, k, k, w, k, k, 1.0f, y, residual_and_bias, nothing, split);
}

// The Linear kernels' arguments, (x (..., K), w (N, K), b (N)[, r (..., N)]) -> y (..., N); false if malformed.
struct DenseArgs {
  const float *x, *w, *b;
  float *y;
  int64_t rows, k, n;
};
static bool dense_args(int nparam, int inputs, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                       DenseArgs *a) {
  if (nparam != inputs + 1 || ndims[0] < 1 || ndims[1] != 2 || !all_float32(nparam, dtypes)) return false;
  a->x = static_cast<const float *>(params[0]);
  a->w = static_cast<const float *>(params[1]);
  a->b = static_cast<const float *>(params[2]);
  a->y = static_cast<float *>(params[inputs]);
  a->k = last_dim(ndims[0], shapes[0]);
  a->rows = numel(ndims[0], shapes[0]) / a->k;
  a->n = shapes[1][0];
  return true;
}

// Shape helper for x (..., K): the leading axes are rows, kept as they are in the output, as nn.Dense
// does; taking them here rather than reshaping around the op saves two graph nodes per Dense layer.
static std::vector<int64_t> with_last(int ndim, const int64_t *shape, int64_t last) {
  std::vector<int64_t> out(shape, shape + ndim);
  out.back() = last;
  return out;
}

// A Linear kernel's shape function: x (..., K) and w (N, K) give (..., N).
#define LINEAR_INFER(name)                                                                      \
  extern "C" std::vector<int64_t> name##InferShape(int *ndims, int64_t **shapes, void *extra) { \
    return with_last(ndims[0], shapes[0], shapes[1][0]);                                        \
  }

// (x, w, b) -> `dense` with `gelu` (or none), for the three-input Linear kernels below.
static int linear_kernel(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void (*gelu)(const float *, float *, int64_t)) {
  DenseArgs a;
  if (!dense_args(nparam, 3, params, ndims, shapes, dtypes, &a)) return 1;
  return dense(a.x, a.w, a.b, a.y, a.rows, a.k, a.n, gelu);
}

// (x (..., K), w packed (N, K), b (N)) -> x w^T + b (..., N): `dense_packed` (packed.cc) in a parallel region
// of its own, the tests' and bench_kernels.py's handle on it (networks run it inside the encoder block kernel).
LINEAR_INFER(LinearPacked)
extern "C" int LinearPacked(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  DenseArgs a;
  if (!dense_args(nparam, 3, params, ndims, shapes, dtypes, &a) || shapes[1][1] != a.k) return 1;
  int status = 0;
#pragma omp parallel reduction(| : status)
  status |= dense_packed(a.x, a.w, a.b, nullptr, a.y, a.rows, a.k, a.n);
  return status;
}

// (x (..., K), w (N, K), b (N)) -> x w^T + b (..., N), like nn.Dense
LINEAR_INFER(Linear)
extern "C" int Linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  return linear_kernel(nparam, params, ndims, shapes, dtypes, nullptr);
}

// (x, w, b) -> GELU(x w^T + b), for eval: GELU applied to each thread's block right after its product, so
// the MLP's hidden activations exist once, not as the product and again as GELU's output (ViT-B/16 at
// batch 16: 39 MB each, what set eval's peak memory). Its backward (`ops.linear_gelu`) recomputes the product;
// training runs the two apart, keeping the product for GELU's backward.
LINEAR_INFER(LinearGeluErf)
extern "C" int LinearGeluErf(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  return linear_kernel(nparam, params, ndims, shapes, dtypes, gelu_erf);
}
LINEAR_INFER(LinearGeluTanh)
extern "C" int LinearGeluTanh(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  return linear_kernel(nparam, params, ndims, shapes, dtypes, gelu_tanh);
}

// (x (..., K), w (N, K), b (N), r (..., N)) -> r + x w^T + b: a residual sum formed in the projection that
// ends its branch (attention's proj, the MLP's fc2), as the encoder block kernel (block.cc) does and its
// backward recomputes. The residual costs one more read in the bias pass instead of an Add op of its own,
// which on MindSpore's own thread pool took 30-40 us per call at batch 1. The same terms as
// (x w^T + b) + r, summed in another order: within the same float32 bound.
LINEAR_INFER(LinearResidual)
extern "C" int LinearResidual(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  DenseArgs a;
  if (!dense_args(nparam, 4, params, ndims, shapes, dtypes, &a)) return 1;
  if (numel(ndims[3], shapes[3]) != a.rows * a.n || last_dim(ndims[3], shapes[3]) != a.n) return 1;
  return dense_residual(a.x, a.w, a.b, static_cast<const float *>(params[3]), a.y, a.rows, a.k, a.n);
}

// (dy (..., N), w (N, K)) -> dx = dy w (..., K)
extern "C" std::vector<int64_t> LinearGradInputInferShape(int *ndims, int64_t **shapes, void *extra) {
  return with_last(ndims[0], shapes[0], shapes[1][1]);
}
extern "C" int LinearGradInput(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (nparam != 3 || ndims[0] < 1 || ndims[1] != 2 || !all_float32(nparam, dtypes)) return 1;
  const float *dy = static_cast<const float *>(params[0]), *w = static_cast<const float *>(params[1]);
  const int64_t n = last_dim(ndims[0], shapes[0]), rows = numel(ndims[0], shapes[0]) / n, k = shapes[1][1];
  return parallel_sgemm('N', 'N', rows, k, n, dy, n, n, w, k, 1, 0.0f, static_cast<float *>(params[2]));
}

// The weight gradient dW = dy^T x is a sum over every row of the batch (B x N tokens: 3152 at ViT/16 batch
// 16). Split by dW's rows, each thread runs one sgemm with that whole sum as its k; with many rows, split by
// the sum instead: each slice of kSliceRows or more batch rows gives a whole partial dW, added up after in
// slice order (deterministic for a fixed thread count, like every other split here). Measured on an AMD
// EPYC (AVX2, 2 threads, oneDNN's sgemm, 15 interleaved rounds twice): ViT-S/16's qkv, fc1 and fc2 and
// ViT-B/16's proj weight gradients at batch 16 from 100-151 to 142-177 GFLOP/s, the other ViT shapes within
// 2-8 % either way; ViT-S/16 training at batch 16 1.15x. At batch 1 (197 rows) nothing changes.
static const int64_t kSliceRows = 1024;
// The partial sums take (slices - 1) x N x K floats beyond dW: at most this many bytes.
static const int64_t kMaxPartialBytes = int64_t{64} << 20;

static int64_t row_slices(int64_t rows, int64_t n, int64_t k, int64_t threads) {
  const int64_t by_memory = 1 + kMaxPartialBytes / (n * k * static_cast<int64_t>(sizeof(float)));
  int64_t slices = rows / kSliceRows;
  slices = slices < threads ? slices : threads;
  slices = slices < by_memory ? slices : by_memory;
  return slices < 1 ? 1 : slices;
}

// dw (n, k) = dy^T x over `rows` rows in slices of rows (row_slices for the team; `most` >= 2 is that for
// omp_get_max_threads(), which sizes the partials): threads / slices threads per slice, each taking a block
// of dW's rows of its slice's partial (slice 0's is dw itself).
static int weight_grad_by_row_slices(const float *dy, const float *x, float *dw, int64_t rows, int64_t n,
                                     int64_t k, int64_t most) {
  const sgemm_fn sgemm = dnnl_sgemm_fn();
  float *partial = new (std::nothrow) float[(most - 1) * n * k];
  if (sgemm == nullptr || partial == nullptr) {
    delete[] partial;
    return 1;
  }
  int status = 0;
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t slices = row_slices(rows, n, k, threads);  // <= most: the team is at most max threads
    const int64_t per_slice = threads / slices, s = t / per_slice, j = t % per_slice;
    if (s < slices) {
      const int64_t chunk = (rows + slices - 1) / slices, r0 = s * chunk;
      const int64_t nr = rows - r0 < chunk ? rows - r0 : chunk;  // >= kSliceRows - slices: never empty
      const int64_t out_chunk = (n + per_slice - 1) / per_slice, o0 = j * out_chunk;
      const int64_t no = o0 >= n ? 0 : (n - o0 < out_chunk ? n - o0 : out_chunk);
      float *out = s == 0 ? dw : partial + (s - 1) * n * k;
      if (no > 0 && sgemm('T', 'N', no, k, nr, 1.0f, dy + r0 * n + o0, n, x + r0 * k, k, 0.0f, out + o0 * k, k) != 0)
        status = 1;
    }
#pragma omp barrier
#pragma omp for simd schedule(static)
    for (int64_t i = 0; i < n * k; ++i) {
      float sum = dw[i];
      for (int64_t p = 1; p < slices; ++p) sum += partial[(p - 1) * n * k + i];
      dw[i] = sum;
    }
  }
  delete[] partial;
  return status;
}

// (dy (..., N), x (..., K)) -> dw = dy^T x, (N, K), summed over all leading axes
extern "C" std::vector<int64_t> LinearGradWeightInferShape(int *ndims, int64_t **shapes, void *extra) {
  return std::vector<int64_t>{last_dim(ndims[0], shapes[0]), last_dim(ndims[1], shapes[1])};
}
extern "C" int LinearGradWeight(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (nparam != 3 || ndims[0] < 1 || ndims[1] < 1 || !all_float32(nparam, dtypes)) return 1;
  const float *dy = static_cast<const float *>(params[0]), *x = static_cast<const float *>(params[1]);
  float *dw = static_cast<float *>(params[2]);
  const int64_t n = last_dim(ndims[0], shapes[0]), k = last_dim(ndims[1], shapes[1]);
  if (n == 0 || k == 0) return 0;  // an empty dW
  const int64_t rows = numel(ndims[0], shapes[0]) / n;
  const int64_t slices = row_slices(rows, n, k, omp_get_max_threads());
  if (slices >= 2) return weight_grad_by_row_slices(dy, x, dw, rows, n, k, slices);
  return parallel_sgemm('T', 'N', n, k, rows, dy, n, 1, x, k, 1, 0.0f, dw);
}
#endif
