// CUDA FSQ: quantize, its backward and indices_to_codes. See fsq.h for the math and NaN rules.
//
// quantize / indices_to_codes: a block of 128 threads owns a tile of 128 rows (128 * d
// elements, at most 31 * 128 * 4 bytes in shared memory). The tile is loaded and stored with
// 16-byte vectors when the pointers allow (a full tile is a multiple of 256 bytes, so every
// tile stays aligned); each thread then processes elements tid, tid + 128, ... (consecutive
// threads, consecutive shared-memory words: no bank conflicts), and thread r forms the int64
// index of row r from the levels kept in shared memory. Elements near a rounding boundary are
// re-evaluated in fp64 (rare: about 2 * tol per element), exactly as the CPU kernel does.
// backward: flat elementwise over 16-byte vectors; the channel of the first element of a vector
// is one 64-bit modulo, the rest follow by increment.
#include <cmath>

#include "cuda_utils.cuh"
#include "fsq.h"

namespace fastlatent {
namespace {

constexpr int kTileRows = 128;

struct SharedChannels {
  float a[kFsqMaxDims], b[kFsqMaxDims], c[kFsqMaxDims], lo[kFsqMaxDims], hi[kFsqMaxDims];
  float den[kFsqMaxDims], bias[kFsqMaxDims], tol[kFsqMaxDims], grad[kFsqMaxDims];
  double shift[kFsqMaxDims], half_l[kFsqMaxDims], offset[kFsqMaxDims];
  long long levels[kFsqMaxDims], half_width[kFsqMaxDims], basis[kFsqMaxDims];
};

// Copies the constants with compile-time indices (a runtime index into a kernel parameter
// would make nvcc spill the whole parameter struct to local memory).
__device__ __forceinline__ void load_channels(const FsqParams& p, SharedChannels& s) {
  if (threadIdx.x == 0) {
    const bool sym = p.preserve_symmetry;
#pragma unroll
    for (int i = 0; i < kFsqMaxDims; ++i) {
      if (i < p.d) {
        const FsqChannel& ch = p.channel[i];
        s.a[i] = sym ? 0.0f : ch.shift_f;
        s.b[i] = ch.half_l_f;
        s.c[i] = sym ? 0.5f : -ch.offset_f;
        s.lo[i] = sym ? 0.0f : static_cast<float>(-ch.half_width);
        s.hi[i] = static_cast<float>(sym ? ch.levels - 1 : ch.levels - 1 - ch.half_width);
        s.den[i] = static_cast<float>(sym ? ch.levels - 1 : ch.half_width);
        s.bias[i] = sym ? static_cast<float>(-(ch.levels - 1)) : 0.0f;
        s.tol[i] = ch.tol_f;
        s.grad[i] = ch.grad_scale_f;
        s.shift[i] = ch.shift;
        s.half_l[i] = ch.half_l;
        s.offset[i] = ch.offset;
        s.levels[i] = ch.levels;
        s.half_width[i] = ch.half_width;
        s.basis[i] = ch.basis;
      }
    }
  }
  __syncthreads();
}

__device__ __forceinline__ float tanh_exp(float x) {
  const float e = expf(-2.0f * fabsf(x));
  return copysignf((1.0f - e) / (1.0f + e), x);
}

__device__ __forceinline__ float sech2(float x) {
  const float e = expf(-2.0f * fabsf(x));
  const float s = 1.0f + e;
  return 4.0f * e / (s * s);
}

__device__ __forceinline__ long long clamp_level(long long v, long long lo, long long hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Level k in [0, L) of one element, or -1 for NaN; *value receives the code value.
//
// The fp32 path holds levels as floats, exact while L < 2^24; it decides only where its y is
// more than tol from a rounding boundary, and tol reaches 0.5 (every element re-evaluated) once
// L passes about 2^16. The fp64 re-evaluation keeps the level an integer (a float would be off
// by one past 2^24), so L up to 2^31 is exact, as on the CPU.
template <bool Sym>
__device__ __forceinline__ int quantize_element(const SharedChannels& s, int c, float z, float* value) {
  if (isnan(z)) {
    *value = __int_as_float(0x7fc00000);
    return -1;
  }
  const long long levels = s.levels[c];
  if (Sym) {
    const float y = (tanh_exp(z) + 1.0f) * s.b[c] + 0.5f;
    const float f = floorf(y);
    const float frac = y - f;
    if (frac < s.tol[c] || frac > 1.0f - s.tol[c]) {
      const double y64 = static_cast<double>(levels - 1) * (tanh(static_cast<double>(z)) + 1.0) / 2.0 + 0.5;
      const long long k = clamp_level(static_cast<long long>(floor(y64)), 0, levels - 1);
      *value = static_cast<float>(2 * k - (levels - 1)) / s.den[c];
      return static_cast<int>(k);
    }
    const float k = fminf(fmaxf(f, s.lo[c]), s.hi[c]);
    *value = (2.0f * k + s.bias[c]) / s.den[c];
    return static_cast<int>(k);
  }
  const float y = tanh_exp(z + s.a[c]) * s.b[c] + s.c[c];
  const float r = rintf(y);
  if (fabsf(y - r) > 0.5f - s.tol[c]) {
    const double y64 = tanh(static_cast<double>(z) + s.shift[c]) * s.half_l[c] - s.offset[c];
    const long long hw = s.half_width[c];
    const long long q = clamp_level(llrint(y64), -hw, levels - 1 - hw);
    *value = static_cast<float>(q) / s.den[c];
    return static_cast<int>(q + hw);
  }
  const float q = fminf(fmaxf(r, s.lo[c]), s.hi[c]);
  *value = q / s.den[c];
  return static_cast<int>(q) + static_cast<int>(s.half_width[c]);
}

template <typename T, bool Vec>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int n, bool full) {
  if (Vec && full) {
    constexpr int kPer = 16 / sizeof(T);
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* t = reinterpret_cast<uint4*>(tile);
    for (int v = threadIdx.x; v < n / kPer; v += blockDim.x) t[v] = s[v];
  } else {
    for (int e = threadIdx.x; e < n; e += blockDim.x) tile[e] = src[e];
  }
}

template <typename T, bool Vec>
__device__ __forceinline__ void store_tile(T* dst, const T* tile, int n, bool full) {
  if (Vec && full) {
    constexpr int kPer = 16 / sizeof(T);
    uint4* d = reinterpret_cast<uint4*>(dst);
    const uint4* t = reinterpret_cast<const uint4*>(tile);
    for (int v = threadIdx.x; v < n / kPer; v += blockDim.x) d[v] = t[v];
  } else {
    for (int e = threadIdx.x; e < n; e += blockDim.x) dst[e] = tile[e];
  }
}

template <typename T, bool Sym, bool Vec>
__global__ void __launch_bounds__(kTileRows)
fsq_quantize_kernel(const FsqParams p, const T* __restrict__ z, T* __restrict__ z_hat,
                    int64_t* __restrict__ indices) {
  __shared__ SharedChannels s;
  __shared__ __align__(16) T tile[kTileRows * kFsqMaxDims];
  __shared__ int level[kTileRows * kFsqMaxDims];
  load_channels(p, s);
  const int d = p.d;
  const int tid = threadIdx.x;
  const int step = kTileRows % d;
  const int64_t num_tiles = (p.rows + kTileRows - 1) / kTileRows;
  for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    const int64_t row0 = t * kTileRows;
    const int rows = static_cast<int>(p.rows - row0 < kTileRows ? p.rows - row0 : kTileRows);
    const int n = rows * d;
    const bool full = rows == kTileRows;
    load_tile<T, Vec>(tile, z + row0 * d, n, full);
    __syncthreads();
    int c = tid % d;
    for (int e = tid; e < n; e += kTileRows) {
      float value;
      level[e] = quantize_element<Sym>(s, c, cuda::to_float(tile[e]), &value);
      tile[e] = cuda::from_float<T>(value);
      c += step;
      if (c >= d) c -= d;
    }
    __syncthreads();
    if (tid < rows) {
      long long index = 0;
      bool nan = false;
      for (int i = 0; i < d; ++i) {
        const int k = level[tid * d + i];
        nan |= k < 0;
        index += static_cast<long long>(k) * s.basis[i];
      }
      indices[row0 + tid] = nan ? -1 : index;
    }
    store_tile<T, Vec>(z_hat + row0 * d, tile, n, full);
    __syncthreads();  // the next tile overwrites `tile` and `level`
  }
}

template <typename T, bool Vec>
__global__ void __launch_bounds__(256)
fsq_backward_kernel(const FsqParams p, const T* __restrict__ grad, const T* __restrict__ z,
                    T* __restrict__ out) {
  __shared__ SharedChannels s;
  load_channels(p, s);
  const int d = p.d;
  const int64_t n = p.rows * d;
  constexpr int kPer = Vec ? 16 / sizeof(T) : 1;
  const int64_t num_vec = n / kPer;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < num_vec; v += stride) {
    const int64_t e0 = v * kPer;
    int c = static_cast<int>(e0 % d);
    union Pack {
      uint4 u;
      T x[kPer];
    };
    Pack gv, zv, ov;
    if constexpr (Vec) {
      gv.u = reinterpret_cast<const uint4*>(grad)[v];
      zv.u = reinterpret_cast<const uint4*>(z)[v];
    } else {
      gv.x[0] = grad[e0];
      zv.x[0] = z[e0];
    }
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const float gz = cuda::to_float(gv.x[k]) * sech2(cuda::to_float(zv.x[k]) + s.a[c]) * s.grad[c];
      ov.x[k] = cuda::from_float<T>(gz);
      if (++c == d) c = 0;
    }
    if constexpr (Vec) {
      reinterpret_cast<uint4*>(out)[v] = ov.u;
    } else {
      out[e0] = ov.x[0];
    }
  }
  // Tail of fewer than kPer elements after the last full vector.
  const int64_t tail0 = num_vec * kPer;
  const int64_t e = tail0 + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (Vec && e < n) {
    const int c = static_cast<int>(e % d);
    out[e] = cuda::from_float<T>(cuda::to_float(grad[e]) * sech2(cuda::to_float(z[e]) + s.a[c]) * s.grad[c]);
  }
}

template <typename T, bool Vec>
__global__ void __launch_bounds__(kTileRows)
fsq_codes_kernel(const FsqParams p, const int64_t* __restrict__ indices, T* __restrict__ codes) {
  __shared__ SharedChannels s;
  __shared__ __align__(16) T tile[kTileRows * kFsqMaxDims];
  __shared__ long long row_index[kTileRows];
  load_channels(p, s);
  const int d = p.d;
  const int tid = threadIdx.x;
  const int step = kTileRows % d;
  const bool sym = p.preserve_symmetry;
  const int64_t num_tiles = (p.rows + kTileRows - 1) / kTileRows;
  for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    const int64_t row0 = t * kTileRows;
    const int rows = static_cast<int>(p.rows - row0 < kTileRows ? p.rows - row0 : kTileRows);
    const int n = rows * d;
    if (tid < rows) row_index[tid] = indices[row0 + tid];
    __syncthreads();
    int c = tid % d;
    for (int e = tid; e < n; e += kTileRows) {
      const long long index = row_index[e / d];
      float value;
      if (index < 0 || index >= p.codebook_size) {
        value = __int_as_float(0x7fc00000);
      } else {
        const long long k = (index / s.basis[c]) % s.levels[c];
        value = sym ? static_cast<float>(2 * k - (s.levels[c] - 1)) / s.den[c]
                    : static_cast<float>(k - s.half_width[c]) / s.den[c];
      }
      tile[e] = cuda::from_float<T>(value);
      c += step;
      if (c >= d) c -= d;
    }
    __syncthreads();
    store_tile<T, Vec>(codes + row0 * d, tile, n, rows == kTileRows);
    __syncthreads();
  }
}

int64_t num_tiles(const FsqParams& p) { return (p.rows + kTileRows - 1) / kTileRows; }

}  // namespace

cudaError_t launch_fsq_quantize_cuda(const FsqParams& p, const FsqForwardArgs& args, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.d < 1 || p.d > kFsqMaxDims) return cudaErrorInvalidValue;
  const unsigned int blocks = cuda::grid_blocks(num_tiles(p));
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    const auto* z = static_cast<const scalar_t*>(args.z);
    auto* z_hat = static_cast<scalar_t*>(args.z_hat);
    const bool vec = cuda::aligned16(z, z_hat);
    FL_BOOL_SWITCH(p.preserve_symmetry, kSym, [&] {
      FL_BOOL_SWITCH(vec, kVec, [&] {
        fsq_quantize_kernel<scalar_t, kSym, kVec><<<blocks, kTileRows, 0, stream>>>(p, z, z_hat, args.indices);
      });
    });
    return cudaGetLastError();
  });
}

cudaError_t launch_fsq_quantize_backward_cuda(const FsqParams& p, const FsqBackwardArgs& args,
                                              cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.d < 1 || p.d > kFsqMaxDims) return cudaErrorInvalidValue;
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    const auto* g = static_cast<const scalar_t*>(args.grad_z_hat);
    const auto* z = static_cast<const scalar_t*>(args.z);
    auto* out = static_cast<scalar_t*>(args.grad_z);
    const bool vec = cuda::aligned16(g, z, out);
    constexpr int kThreads = 256;
    const int64_t per_thread = vec ? 16 / sizeof(scalar_t) : 1;
    const unsigned int blocks = cuda::grid_blocks(cuda::ceil_div(p.rows * p.d, kThreads * per_thread));
    FL_BOOL_SWITCH(vec, kVec, [&] {
      fsq_backward_kernel<scalar_t, kVec><<<blocks, kThreads, 0, stream>>>(p, g, z, out);
    });
    return cudaGetLastError();
  });
}

cudaError_t launch_fsq_indices_to_codes_cuda(const FsqParams& p, const FsqCodesArgs& args, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.d < 1 || p.d > kFsqMaxDims) return cudaErrorInvalidValue;
  const unsigned int blocks = cuda::grid_blocks(num_tiles(p));
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    auto* codes = static_cast<scalar_t*>(args.codes);
    FL_BOOL_SWITCH(cuda::aligned16(codes), kVec, [&] {
      fsq_codes_kernel<scalar_t, kVec><<<blocks, kTileRows, 0, stream>>>(p, args.indices, codes);
    });
    return cudaGetLastError();
  });
}

}  // namespace fastlatent
