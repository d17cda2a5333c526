// A whole pre-norm encoder block for eval in one kernel (Eq. 2 and 3 with drop-path the identity):
//     z' = z + proj(Attention(qkv(LN1(z))))      z_out = z' + fc2(GELU(fc1(LN2(z'))))
// the same kernels, in the same order, as the block's separate ops (LayerNorm, Linear, Attention,
// LinearResidual, LayerNorm, LinearGelu, LinearResidual), so the same float32 results wherever those split
// their products by rows too (weights inside L2, or batch 16). Where a Linear op alone splits a large
// weight by columns, oneDNN's sgemm sums in another order: ViT-S/16 and ViT-B/16 logits at batch 1 differ
// by up to 2.3e-6 and 4.5e-6 (of ~4) between the two, float32 rounding. One graph op per
// block instead of nine (those seven and two reshapes): a dynamic-batch graph (eval.py's, infer.py's)
// infers every op's shapes again at each call, which cost ViT-Ti/16 ~3.5 ms of a ~25 ms batch-1 step; and
// the intermediates live in one buffer that is reused from block to block instead of MindSpore's tensors.
#include "common.h"

#ifdef VIT_MS_DNNL_PATH
#include <mutex>
#include <new>

// The block's intermediates, rows x (D + max(3 D, H)) floats (H: the MLP's width, 4 D in every ViT preset):
// a region of D per row that holds LN1's output, then attention's, then LN2's, and one that holds qkv (3 D),
// then the MLP's hidden activations (H). Kept between calls (the next block of the step needs the same size;
// ViT-B/16 at batch 16: 48 MB, about what the separate ops' tensors took in MindSpore's memory pool) and
// grown when a larger input comes. A second concurrent caller (two graphs run from two threads) gets a
// buffer of its own.
static std::mutex scratch_mutex;
static std::vector<float> scratch;

static int encoder_block(void **params, int64_t batch, int64_t n, int64_t d, int64_t hidden,
                         void (*gelu)(const float *, float *, int64_t), bool packed, float *work) {
  const float *x = static_cast<const float *>(params[0]);
  const float *ln1_g = static_cast<const float *>(params[1]), *ln1_b = static_cast<const float *>(params[2]);
  const float *qkv_w = static_cast<const float *>(params[3]), *qkv_b = static_cast<const float *>(params[4]);
  const float *proj_w = static_cast<const float *>(params[5]), *proj_b = static_cast<const float *>(params[6]);
  const float *ln2_g = static_cast<const float *>(params[7]), *ln2_b = static_cast<const float *>(params[8]);
  const float *fc1_w = static_cast<const float *>(params[9]), *fc1_b = static_cast<const float *>(params[10]);
  const float *fc2_w = static_cast<const float *>(params[11]), *fc2_b = static_cast<const float *>(params[12]);
  const float *settings = static_cast<const float *>(params[13]);  // heads, LayerNorm eps, attention scale[, packed]
  float *y = static_cast<float *>(params[14]);
  const int64_t heads = static_cast<int64_t>(settings[0]), rows = batch * n;
  const float eps = settings[1], scale = settings[2];
  float *ln = work, *wide = work + rows * d;  // ln: LN1, attention, LN2 (D); wide: qkv (3 D), fc1's output (H)
  float *qkv = wide, *att = ln;
  // Every product split by rows, even where a weight outgrows L2 and a Linear op alone splits columns: the
  // inputs of qkv, fc1 and fc2 were just written by the same threads split by rows (the LayerNorms, and fc1
  // itself), so each thread reads the rows it wrote, where a column split has every thread read all of
  // them, half from the other core's cache. Measured in the model, the two splits flipped at every step
  // of one process (AMD EPYC, AVX2, 2 threads): ViT-S/16 batch 1 1.01-1.06x (9 processes of 200 steps),
  // batch 2 1.02-1.03x and batch 4 0.96-1.00x (2 each), ViT-B/16 batch 1 0.98-1.02x (4), batch 4 1.03x
  // and ViT-L/16 batch 1 1.09x (1 each).
  // And so one parallel region runs the whole block, each thread on its own rows from LN1 to fc2 but for
  // attention (split by heads; its `omp for` ends when every head is done): the barrier after qkv (attention
  // reads every row's k and v) is the only other wait. att shares LN1's rows (dead once qkv is done) and
  // each thread's LN2 overwrites only the attention rows its own projection has read; fc1 overwrites qkv
  // only after attention. The same per-row work as the block's separate kernels, so the same numbers.
  // With `packed` (a network packed for inference, vit_ms/packing.py) the four weights are in packed.cc's
  // layout and every product is `dense_packed`, split by rows the same way.
  const Split split = Split::kRowsInTeam;
  auto product = [=](const float *in, const float *w, const float *b, const float *r, float *out, int64_t k,
                     int64_t n, void (*act)(const float *, float *, int64_t)) {
    if (packed) return dense_packed(in, w, b, r, out, rows, k, n, act);
    return r != nullptr ? dense_residual(in, w, b, r, out, rows, k, n, split)
                        : dense(in, w, b, out, rows, k, n, act, split);
  };
  int status = 0;
#pragma omp parallel reduction(| : status)
  {
    layer_norm_in_team(x, ln1_g, ln1_b, ln, rows, d, eps);
    status |= product(ln, qkv_w, qkv_b, nullptr, qkv, d, 3 * d, nullptr);
#pragma omp barrier
    status |= attention_in_team(qkv, batch, n, heads, d / heads, scale, att);
    status |= product(att, proj_w, proj_b, x, y, d, d, nullptr);  // y = z'
    layer_norm_in_team(y, ln2_g, ln2_b, ln, rows, d, eps);
    status |= product(ln, fc1_w, fc1_b, nullptr, wide, d, hidden, gelu);
    status |= product(wide, fc2_w, fc2_b, y, y, hidden, d, nullptr);
  }
  return status;
}

// (z (B, N, D), ln1 gamma, beta, qkv w, b, proj w, b, ln2 gamma, beta, fc1 w, b, fc2 w, b, settings (3,) or (4,))
// -> (B, N, D); settings[3] nonzero: the four weights are packed (packed.cc).
static int encoder_block_kernel(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void (*gelu)(const float *, float *, int64_t)) {
  if (nparam != 15 || ndims[0] != 3 || !all_float32(nparam, dtypes)) return 1;
  const int64_t batch = shapes[0][0], n = shapes[0][1], d = shapes[0][2], hidden = shapes[9][0];
  const int64_t heads = static_cast<int64_t>(static_cast<const float *>(params[13])[0]);
  if (heads < 1 || d % heads != 0 || shapes[3][0] != 3 * d || shapes[11][1] != hidden) return 1;
  const size_t size = static_cast<size_t>(batch * n * (d + (hidden > 3 * d ? hidden : 3 * d)));
  std::unique_lock<std::mutex> lock(scratch_mutex, std::try_to_lock);
  std::vector<float> own;
  std::vector<float> &work = lock.owns_lock() ? scratch : own;
  if (work.size() < size) {
    try {
      work.resize(size);
    } catch (const std::bad_alloc &) {
      return 1;
    }
  }
  const bool packed = shapes[13][0] > 3 && static_cast<const float *>(params[13])[3] != 0.0f;
  if (packed && (d % 16 != 0 || hidden % 16 != 0)) return 1;
  return encoder_block(params, batch, n, d, hidden, gelu, packed, work.data());
}

SAME_SHAPE_INFER(EncoderBlockErf)
extern "C" int EncoderBlockErf(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  return encoder_block_kernel(nparam, params, ndims, shapes, dtypes, gelu_erf);
}
SAME_SHAPE_INFER(EncoderBlockTanh)
extern "C" int EncoderBlockTanh(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  return encoder_block_kernel(nparam, params, ndims, shapes, dtypes, gelu_tanh);
}
#endif
