// Attention products q k^T and probs v read in place from the qkv projection's output, on oneDNN's sgemm.
#include "common.h"

#ifdef VIT_MS_DNNL_PATH
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
// ---- softmax(scale q k^T) v in one kernel, (qkv, scale[1]) -> (B, N, heads, head_dim), as AttentionScores,
// Softmax and AttentionValues would give, with no (B, heads, N, N) tensor written. The work is split into
// (sample, head, block of query rows) items: each row's softmax needs only its own scores, so a block's
// scores live in two per-thread buffers that stay in cache, and ViT-Ti's 3 heads at batch 1 become 12
// items, where one item per head left one of 2 threads idle a third of the time.
extern "C" std::vector<int64_t> AttentionInferShape(int *ndims, int64_t **shapes, void *extra) {
  const int64_t *s = shapes[0];
  return std::vector<int64_t>{s[0], s[1], s[3], s[4]};
}
int attention_in_team(const float *qkv, int64_t batch, int64_t n, int64_t heads, int64_t dim, float scale,
                      float *out) {
  const Heads h{batch, n, heads, dim};
  const sgemm_fn sgemm = dnnl_sgemm_fn();
  if (sgemm == nullptr) return 1;
  if (h.count() == 0 || h.n == 0) return 0;  // nothing to compute (and no block size to derive)
  // Blocks of at most 64 query rows, equal in size (197 tokens: 4 blocks of 50, not 64, 64, 64, 5).
  const int64_t blocks = (h.n + 63) / 64, block = (h.n + blocks - 1) / blocks;
  const int64_t items = h.count() * blocks, out_row = h.heads * h.dim;
  int status = 0;  // this thread's
  {
    std::vector<float> scores(block * h.n), probs(block * h.n);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t i = item / blocks, r0 = (item % blocks) * block;
      const int64_t rows = h.n - r0 < block ? h.n - r0 : block;
      if (rows <= 0) continue;
      const float *q = qkv + h.at(i, 0) + r0 * h.row();
      if (sgemm('N', 'T', rows, h.n, h.dim, scale, q, h.row(), qkv + h.at(i, 1), h.row(), 0.0f, scores.data(),
                h.n) != 0)
        status = 1;
      softmax_rows(scores.data(), probs.data(), rows, h.n);
      if (sgemm('N', 'N', rows, h.dim, h.n, 1.0f, probs.data(), h.n, qkv + h.at(i, 2), h.row(), 0.0f,
                out + h.out(i) + r0 * out_row, out_row) != 0)
        status = 1;
    }
  }
  return status;
}

int attention(const float *qkv, int64_t batch, int64_t n, int64_t heads, int64_t dim, float scale, float *out) {
  int status = 0;
#pragma omp parallel reduction(| : status)
  status |= attention_in_team(qkv, batch, n, heads, dim, scale, out);
  return status;
}

extern "C" int Attention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  Heads h;
  if (nparam != 3 || !all_float32(nparam, dtypes) || !qkv_heads(ndims[0], shapes[0], &h)) return 1;
  return attention(static_cast<const float *>(params[0]), h.batch, h.n, h.heads, h.dim,
                   *static_cast<const float *>(params[1]), static_cast<float *>(params[2]));
}

// AttentionGrad's work where there are fewer (sample, head) pairs than make whole rounds for the threads
// (ViT-Ti's 3 heads at batch 1 on 2 threads: one thread did two heads while the other did one, a quarter of
// the kernel idle): each pair split into one block per thread, in two passes over P and dS shared by the
// threads (count x N x N floats each, 0.9 MB in all for ViT-Ti at batch 1). Pass 1, per block of query rows:
// P and dS rows, and dq = scale dS k for those rows (each row of dS needs only its own row of P and dP).
// Pass 2, per block of key rows: dk = scale dS^T q and dv = P^T dO for those keys (sums over every query
// row, hence after the barrier between the passes).
static int attention_grad_split(const Heads &h, sgemm_fn sgemm, const float *dout, const float *qkv, float scale,
                                float *dqkv, int64_t threads) {
  const int64_t n = h.n, d = h.dim, row = h.row(), out_row = h.heads * h.dim;
  const int64_t block = (n + threads - 1) / threads, items = h.count() * threads;
  std::vector<float> p(h.count() * n * n), ds(h.count() * n * n);
  // Work item -> (pair, first row of its block, rows in it); the same blocks serve as query rows in pass 1
  // and as key rows in pass 2.
  auto span = [&](int64_t item, int64_t *i, int64_t *r0) {
    *i = item / threads;
    *r0 = (item % threads) * block;
    return n - *r0 < block ? n - *r0 : block;
  };
  int status = 0;
#pragma omp parallel
  {
    std::vector<float> scores(block * n);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      int64_t i, r0;
      const int64_t rows = span(item, &i, &r0);
      if (rows <= 0) continue;
      const float *q = qkv + h.at(i, 0) + r0 * row, *k = qkv + h.at(i, 1), *v = qkv + h.at(i, 2);
      float *p_rows = p.data() + h.square(i) + r0 * n, *ds_rows = ds.data() + h.square(i) + r0 * n;
      int s = sgemm('N', 'T', rows, n, d, scale, q, row, k, row, 0.0f, scores.data(), n);
      softmax_rows(scores.data(), p_rows, rows, n);
      s |= sgemm('N', 'T', rows, n, d, 1.0f, dout + h.out(i) + r0 * out_row, out_row, v, row, 0.0f, ds_rows, n);
      softmax_grad_rows(p_rows, ds_rows, ds_rows, rows, n);
      s |= sgemm('N', 'N', rows, d, n, scale, ds_rows, n, k, row, 0.0f, dqkv + h.at(i, 0) + r0 * row, row);
      if (s != 0) status = 1;
    }
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      int64_t i, c0;
      const int64_t cols = span(item, &i, &c0);
      if (cols <= 0) continue;
      const float *p_cols = p.data() + h.square(i) + c0, *ds_cols = ds.data() + h.square(i) + c0;
      int s = sgemm('T', 'N', cols, d, n, scale, ds_cols, n, qkv + h.at(i, 0), row, 0.0f,
                    dqkv + h.at(i, 1) + c0 * row, row);
      s |= sgemm('T', 'N', cols, d, n, 1.0f, p_cols, n, dout + h.out(i), out_row, 0.0f, dqkv + h.at(i, 2) + c0 * row,
                 row);
      if (s != 0) status = 1;
    }
  }
  return status;
}

// (dO (B, N, heads, head_dim), qkv, scale[1]) -> d qkv, Attention's backward: per (sample, head), in two
// per-thread N x N buffers (few, uneven pairs: `attention_grad_split` above),
//   P = softmax(scale q k^T)               recomputed, as flash attention's backward does, not kept
//   dS = P (dP - rowsum(P dP)), dP = dO v^T
//   dq = scale dS k, dk = scale dS^T q, dv = P^T dO   each written once, straight into its part of d qkv.
// The three-kernel path instead keeps P (B, heads, N, N) from the forward for the backward and writes
// scores, dP and dS as whole tensors (each 2-8x a core's L2 at batch 16), zero-fills two thirds of two
// d qkv tensors and adds them; recomputing costs one more q k^T product (a sixth of the attention flops).
extern "C" std::vector<int64_t> AttentionGradInferShape(int *ndims, int64_t **shapes, void *extra) {
  return std::vector<int64_t>(shapes[1], shapes[1] + ndims[1]);
}
extern "C" int AttentionGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  Heads h;
  if (nparam != 4 || !all_float32(nparam, dtypes) || !qkv_heads(ndims[1], shapes[1], &h)) return 1;
  const sgemm_fn sgemm = dnnl_sgemm_fn();
  if (sgemm == nullptr) return 1;
  const float *dout = static_cast<const float *>(params[0]), *qkv = static_cast<const float *>(params[1]);
  const float scale = *static_cast<const float *>(params[2]);
  float *dqkv = static_cast<float *>(params[3]);
  const int64_t n = h.n, d = h.dim, row = h.row(), out_row = h.heads * h.dim;
  // Pairs per thread uneven and few (an idle share of 1/8 or more): split each pair instead.
  const int64_t threads = omp_get_max_threads();
  if (h.count() % threads != 0 && h.count() < 4 * threads)
    return attention_grad_split(h, sgemm, dout, qkv, scale, dqkv, threads);
  int status = 0;
#pragma omp parallel
  {
    std::vector<float> p(n * n), ds(n * n);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < h.count(); ++i) {
      const float *q = qkv + h.at(i, 0), *k = qkv + h.at(i, 1), *v = qkv + h.at(i, 2), *dO = dout + h.out(i);
      int s = sgemm('N', 'T', n, n, d, scale, q, row, k, row, 0.0f, ds.data(), n);
      softmax_rows(ds.data(), p.data(), n, n);
      s |= sgemm('N', 'T', n, n, d, 1.0f, dO, out_row, v, row, 0.0f, ds.data(), n);
      softmax_grad_rows(p.data(), ds.data(), ds.data(), n, n);
      s |= sgemm('N', 'N', n, d, n, scale, ds.data(), n, k, row, 0.0f, dqkv + h.at(i, 0), row);
      s |= sgemm('T', 'N', n, d, n, scale, ds.data(), n, q, row, 0.0f, dqkv + h.at(i, 1), row);
      s |= sgemm('T', 'N', n, d, n, 1.0f, p.data(), n, dO, out_row, 0.0f, dqkv + h.at(i, 2), row);
      if (s != 0) status = 1;
    }
  }
  return status;
}
#endif
