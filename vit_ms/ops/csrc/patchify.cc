#include "common.h"

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

