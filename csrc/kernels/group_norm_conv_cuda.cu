// CUDA group_norm_conv3x3: GroupNorm + activation folded into the A-operand load of an
// implicit-GEMM 3x3 convolution on tensor cores (see group_norm_conv.h for the math and layout).
//
// Block: 256 threads = 8 warps as 2 (pixel rows) x 4 (output channels). Block tile: 8 x 16
// output pixels of one image x 128 output channels; warp tile: 4 rows of 16 pixels x 32
// channels = 4 x 2 WMMA accumulators. For cout <= 32 a narrow block (8 x 1 warps, 32 output
// channels, one row of 16 pixels x 32 channels per warp) does a quarter of the MMA work.
//
// Shared memory: the activated input halo of one 32-channel chunk, twice: [10 * 18 pixels][40] (32
// channels, padded to 40 elements = 80 bytes per pixel), the second copy 16 bytes off a 32-byte
// boundary; two weight tiles [32][136] or [32][40] (cp.async double buffer); the chunk's per-channel
// mean, scale and shift, applied as (x - mean) * scale + shift: x * scale + (shift - mean * scale)
// would cancel when |mean| >> std (as group_norm_cuda.cu).
//
// For tap (r, s), the 16 A rows of output row ty are halo pixels (ty + r, s .. s + 15): a constant
// stride of one halo pixel, so each A fragment is one load_matrix_sync from the halo. That load is
// an ldmatrix whose phases read 8 consecutive pixels' 16-byte pieces: an 80-byte pitch (5 x 16 B, odd)
// puts them in 8 distinct bank groups, where a 96-byte pitch (6 x 16 B) hit only 4 (a 2-way conflict on
// every A load). WMMA wants 32-byte aligned fragment pointers, which an 80-byte pitch gives at even
// pixels only: taps s = 0 and 2 start at even pixels of the first copy, tap s = 1 at odd pixels of the
// second, which are 32-byte aligned there. Both copies together take 28,816 B instead of 17,280 B
// (a compact second copy of columns 1-16 only would save 1,600 B, but its tap-dependent row pitch
// cost the narrow variants up to 10 registers: 4 -> 3 blocks per SM). The coefficients, staged per
// chunk (384 B) instead of for all of cin (12 B per channel), keep the block's shared memory
// independent of cin and under 48 KB.
#include <mma.h>

#include <cstdint>

#include "cuda_utils.cuh"
#include "kernel_arch.cuh"
#include "group_norm_conv.h"

namespace fastlatent {
namespace {

using cuda::from_float;
using cuda::to_float;
using cuda::cp_async16;
using cuda::cp_async_commit;
using cuda::cp_async_wait;

constexpr int kThreads = 256;
constexpr int kTileH = 8, kTileW = 16;                      // output pixels per block
constexpr int kHaloH = kTileH + 2, kHaloW = kTileW + 2;
constexpr int kHaloPixels = kHaloH * kHaloW;                 // 180
constexpr int kChunk = static_cast<int>(kGnConvChannelChunk);  // 32 input channels per K chunk
constexpr int kHaloLd = 40;                                  // halo pixel pitch (elements)
constexpr int kWideN = static_cast<int>(kGnConvCoutTile);    // 128 output channels per block
constexpr int kNarrowN = 32;                                 // the narrow variant, for cout <= 32
constexpr int kWarpCols = 32;                                // output channels per warp

constexpr size_t kHaloBytes = size_t(kHaloPixels) * kHaloLd * 2;                // one copy
constexpr int kShiftedOffset = kHaloPixels * kHaloLd + 8;  // the second copy (elements; 16 B past 32 B)
constexpr size_t kHaloRegionBytes = (kShiftedOffset * 2 + kHaloBytes + 127) / 128 * 128;
constexpr size_t kCoefBytes = 3 * size_t(kChunk) * sizeof(float);               // center, scale, shift

// Block shape by output channels per block kN: 8 warps as (8 / (kN / 32)) pixel-row groups x
// (kN / 32) channel groups of 32, so the narrow variant (kN = 32) gives each warp one row of 16
// pixels. Weight tiles [32][kN + 8] (the pad keeps WMMA's B pointers 32-byte aligned).
template <int kN>
struct Tile {
  static constexpr int kWarpsN = kN / kWarpCols;
  static constexpr int kWarpsM = (kThreads / 32) / kWarpsN;
  static constexpr int kWarpRows = kTileH / kWarpsM;  // output rows per warp
  static constexpr int kBLd = kN + 8;                 // weight tile row pitch (elements)
  static constexpr size_t kBStageElems = size_t(kChunk) * kBLd;
  static constexpr size_t kBBytes = 2 * kBStageElems * 2;
  static constexpr size_t kSmemBytes = kHaloRegionBytes + kBBytes + kCoefBytes;
  static constexpr int kPieces = kChunk * kN / 8;     // 16-byte pieces per weight tile
  static_assert(kWarpsM * kWarpRows == kTileH && kBBytes % 128 == 0, "tile shape");
};

static_assert((kHaloLd * 2) % 32 == 16, "an odd number of 16-byte units per pixel: conflict-free ldmatrix");
static_assert((kHaloW * kHaloLd * 2) % 32 == 0 && (kShiftedOffset * 2) % 32 == 16,
              "WMMA's 32-byte aligned fragment pointers: even pixels of the first copy, odd of the second");
static_assert(kHaloRegionBytes >= size_t(kThreads / 32) * 256 * sizeof(float),
              "epilogue scratch fits in the halo");

__device__ __forceinline__ uint32_t bits_of(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// The 8 elements of a 16-byte vector as floats; bf16 -> fp32 is exact bit placement (one
// instruction per element).
__device__ __forceinline__ void unpack8(const uint4& v, float* f, __half) {
  const __half* h = reinterpret_cast<const __half*>(&v);
#pragma unroll
  for (int j = 0; j < 8; ++j) f[j] = __half2float(h[j]);
}
__device__ __forceinline__ void unpack8(const uint4& v, float* f, __nv_bfloat16) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    f[2 * j] = __uint_as_float(words[j] << 16);
    f[2 * j + 1] = __uint_as_float(words[j] & 0xffff0000u);
  }
}

// Blocks per SM: 2 for the wide tile (128 registers: its 64 accumulator floats per thread), 4 for the
// narrow one (<= 64 registers, no spills; 34,432 B of shared memory each fits 4 even on sm_80).
template <typename T, Activation A, int kN>
__global__ void __launch_bounds__(kThreads, kN == kNarrowN ? 4 : 2)
    group_norm_conv3x3_kernel(GroupNormConvParams p, int tiles_w, int cin_pad, int cout_pad,
                              bool vector_channels) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem[];
  T* halo = reinterpret_cast<T*>(smem);
  T* b_tiles = reinterpret_cast<T*>(smem + kHaloRegionBytes);
  using Shape = Tile<kN>;
  constexpr int kWarpRows = Shape::kWarpRows, kBLd = Shape::kBLd;
  constexpr size_t kBStageElems = Shape::kBStageElems;
  float* scale = reinterpret_cast<float*>(smem + kHaloRegionBytes + Shape::kBBytes);
  float* shift = scale + kChunk;
  float* center = shift + kChunk;

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  constexpr int kWarpsNShift = Shape::kWarpsN == 4 ? 2 : 0;
  static_assert((1 << kWarpsNShift) == Shape::kWarpsN, "channel warps");
  const int warp_m = warp >> kWarpsNShift, warp_n = warp & (Shape::kWarpsN - 1);
  const int64_t img = blockIdx.z;
  const int n0 = blockIdx.y * kN;
  const int oy0 = (blockIdx.x / tiles_w) * kTileH;
  const int ox0 = (blockIdx.x % tiles_w) * kTileW;
  const int64_t H = p.h, W = p.w;

  // Per-channel affine of this image for the input channels of one chunk: y = act((x - center) *
  // scale + shift), zero on the padded channels. Lane c of warp 0 writes channel chunk * 32 + c.
  auto load_coefficients = [&](int chunk) {
    if (tid >= kChunk) return;
    const int64_t c = int64_t(chunk) * kChunk + tid;
    float sc = 0.0f, sh = 0.0f, mu = 0.0f;
    if (c < p.cin) {
      const int64_t channels_per_group = p.cin / p.groups;
      const float count = static_cast<float>(channels_per_group * H * W);
      const int64_t g = img * p.groups + c / channels_per_group;
      const float var = fmaxf(p.m2[g] / count, 0.0f);
      const float rstd = rsqrtf(var + p.eps);
      sc = rstd * (p.gn_weight ? p.gn_weight[c] : 1.0f);
      sh = p.gn_bias ? p.gn_bias[c] : 0.0f;
      mu = p.mean[g];
    }
    scale[tid] = sc;
    shift[tid] = sh;
    center[tid] = mu;
  };

  const T* x_img = static_cast<const T*>(p.x) + img * p.x_stride[0];
  const T* packed = static_cast<const T*>(p.packed_weight);

  // Weight tile t = chunk * 9 + tap: rows [t * 32, t * 32 + 32) of the packed matrix, columns
  // [n0, n0 + kN) (inside cout_pad: cout rounded up to 128); 16-byte pieces, two per thread (wide)
  // or one per thread of the first 128 (narrow).
  auto load_b = [&](int t, int stage) {
    T* dst = b_tiles + stage * kBStageElems;
    constexpr int kRowShift = kN == 128 ? 4 : 2;  // log2 of the kN / 8 pieces per row
    static_assert((1 << kRowShift) == kN / 8, "pieces per weight-tile row");
#pragma unroll
    for (int k = 0; k < (Shape::kPieces + kThreads - 1) / kThreads; ++k) {
      const int piece = tid + k * kThreads;
      if constexpr (Shape::kPieces < kThreads) {
        if (piece >= Shape::kPieces) break;
      }
      const int row = piece >> kRowShift, col = (piece & ((1 << kRowShift) - 1)) * 8;
      cp_async16(dst + row * kBLd + col, packed + (int64_t(t) * kChunk + row) * cout_pad + n0 + col);
    }
    cp_async_commit();
  };

  // The activated halo of input channels [chunk * 32, chunk * 32 + 32): one thread writes 8
  // channels of one halo pixel into both copies (two 16-byte stores; 8 consecutive pixels' stores are
  // conflict-free at the 80-byte pitch); lanes walk along pixels so that global loads of one channel
  // are contiguous in NCHW. With vector_channels (channels-last, cin % 8 == 0, the
  // tensor 16-byte aligned with strides that keep it so) the 8 channels are one 16-byte load;
  // otherwise 8 scalar loads. The octet's mean, scale and shift are shared-memory broadcasts (a
  // warp's lanes share the octet); padded channels have all three zero, so they activate to
  // act(0) = 0, and pixels outside the image are zero.
  auto load_halo = [&](int chunk) {
    for (int item = tid; item < kHaloPixels * (kChunk / 8); item += kThreads) {
      const int pix = item % kHaloPixels, octet = item / kHaloPixels;
      const int64_t iy = oy0 + pix / kHaloW - 1, ix = ox0 + pix % kHaloW - 1;
      const int c0 = chunk * kChunk + octet * 8;
      float v[8];
      if (iy >= 0 && iy < H && ix >= 0 && ix < W && c0 < p.cin) {
        const T* src = x_img + iy * p.x_stride[2] + ix * p.x_stride[3] + c0 * p.x_stride[1];
        if (vector_channels) {
          unpack8(__ldg(reinterpret_cast<const uint4*>(src)), v, T());
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j, src += p.x_stride[1]) v[j] = c0 + j < p.cin ? to_float(*src) : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < 8; j += 4) {  // four channels' coefficients at a time (register cap)
          const float4 mu = *reinterpret_cast<const float4*>(center + octet * 8 + j);
          const float4 sc = *reinterpret_cast<const float4*>(scale + octet * 8 + j);
          const float4 sh = *reinterpret_cast<const float4*>(shift + octet * 8 + j);
          v[j] = activate<A>(fmaf(v[j] - mu.x, sc.x, sh.x));
          v[j + 1] = activate<A>(fmaf(v[j + 1] - mu.y, sc.y, sh.y));
          v[j + 2] = activate<A>(fmaf(v[j + 2] - mu.z, sc.z, sh.z));
          v[j + 3] = activate<A>(fmaf(v[j + 3] - mu.w, sc.w, sh.w));
        }
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = 0.0f;
      }
      uint32_t packed_pairs[4];
#pragma unroll
      for (int j = 0; j < 8; j += 2) {
        packed_pairs[j / 2] = bits_of(from_float<T>(v[j])) | (bits_of(from_float<T>(v[j + 1])) << 16);
      }
      const uint4 value = make_uint4(packed_pairs[0], packed_pairs[1], packed_pairs[2], packed_pairs[3]);
      *reinterpret_cast<uint4*>(halo + pix * kHaloLd + octet * 8) = value;
      *reinterpret_cast<uint4*>(halo + kShiftedOffset + pix * kHaloLd + octet * 8) = value;
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kWarpRows][2];
#pragma unroll
  for (int i = 0; i < kWarpRows; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  // Loop bounds straight from the kernel parameter cin_pad (constant bank), not kept in registers:
  // a register count of chunks was the one value the bf16 SiLU instantiation spilled on sm_90.
  // t counts weight tiles, 9 per chunk, <= 1,152 (cin <= 4,096).
  load_b(0, 0);
  int t = 0;
  for (int chunk = 0; chunk * kChunk < cin_pad; ++chunk) {
    load_coefficients(chunk);  // the previous chunk's readers finished at the last barrier
    __syncthreads();           // this chunk's coefficients written
    load_halo(chunk);
    for (int tap = 0; tap < 9; ++tap, ++t) {
      if ((t + 1) * kChunk < cin_pad * 9) {
        load_b(t + 1, static_cast<int>((t + 1) & 1));
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();  // weight tile t and the halo visible to every warp
      const int r = tap / 3, s = tap % 3;
      // A rows of output row ty from halo pixel (ty + r, s): in the first copy for even s, in the
      // second for s = 1 (32-byte aligned starts either way).
      const T* a_base = halo + (s == 1 ? kShiftedOffset : 0) + (r * kHaloW + s) * kHaloLd;
      const T* b_stage = b_tiles + (t & 1) * kBStageElems + warp_n * kWarpCols;
#pragma unroll
      for (int kk = 0; kk < kChunk; kk += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
        wmma::load_matrix_sync(fb[0], b_stage + kk * kBLd, kBLd);
        wmma::load_matrix_sync(fb[1], b_stage + kk * kBLd + 16, kBLd);
#pragma unroll
        for (int i = 0; i < kWarpRows; ++i) {
          const int ty = warp_m * kWarpRows + i;
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::load_matrix_sync(fa, a_base + ty * kHaloW * kHaloLd + kk, kHaloLd);
          wmma::mma_sync(acc[i][0], fa, fb[0], acc[i][0]);
          wmma::mma_sync(acc[i][1], fa, fb[1], acc[i][1]);
        }
      }
      __syncthreads();  // done reading weight stage t & 1 (refilled next iteration) and the halo
    }
  }

  // Epilogue: each warp stages one 16 x 16 accumulator at a time in its slice of the (now idle)
  // halo, column-major, so that lanes 0-15 and 16-31 each write 16 consecutive pixels of a channel.
  float* scratch = reinterpret_cast<float*>(smem) + warp * 256;
  const T* residual = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  const int m = lane & 15, n_half = lane >> 4;
  const int64_t ox = ox0 + m;
  // This lane's pixel column of the image, as base pointers (fewer live 64-bit values than the full
  // index per store: the bf16 instantiations otherwise spilled on sm_90).
  T* out_col = out + img * p.out_stride[0] + ox * p.out_stride[3];
  const T* res_col = residual ? residual + img * p.residual_stride[0] + ox * p.residual_stride[3] : nullptr;
  const int co0 = n0 + warp_n * kWarpCols;
#pragma unroll
  for (int i = 0; i < kWarpRows; ++i) {
    const int64_t oy = oy0 + warp_m * kWarpRows + i;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_col_major);
      __syncwarp();
      if (oy < H && ox < W) {
        T* out_px = out_col + oy * p.out_stride[2];
        const T* res_px = res_col ? res_col + oy * p.residual_stride[2] : nullptr;
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const int nn = n_half + 2 * q;
          const int co = co0 + j * 16 + nn;
          if (co >= p.cout) continue;
          float v = scratch[nn * 16 + m];
          if (p.conv_bias) v += p.conv_bias[co];
          if (res_px) v += to_float(res_px[co * p.residual_stride[1]]);
          out_px[co * p.out_stride[1]] = from_float<T>(v);
        }
      }
      __syncwarp();
    }
  }
#else
  __trap();  // built for an architecture without bf16 WMMA / cp.async: the launcher refuses such images
#endif
}

template <typename T, Activation A, int kN>
cudaError_t launch_shaped(const GroupNormConvParams& p, cudaStream_t stream) {
  const int tiles_w = static_cast<int>((p.w + kTileW - 1) / kTileW);
  const int64_t tiles = ((p.h + kTileH - 1) / kTileH) * tiles_w;
  const int64_t cin_pad = gn_conv_round_up(p.cin, kChunk);
  const int64_t cout_pad = gn_conv_round_up(p.cout, kWideN);  // the packed weights' row length
  const int64_t col_tiles = (p.cout + kN - 1) / kN;
  if (tiles > 0x7fffffff || col_tiles > 65535 || p.n > 65535) return cudaErrorInvalidValue;
  constexpr size_t smem = Tile<kN>::kSmemBytes;
  static_assert(smem <= 48 * 1024, "within the default dynamic shared memory: no opt-in attribute needed");
  auto kernel = group_norm_conv3x3_kernel<T, A, kN>;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(col_tiles), static_cast<unsigned>(p.n));
  // 16-byte channel loads: channels contiguous, cin % 8 == 0 and every octet 16-byte aligned.
  const bool vector_channels = p.x_stride[1] == 1 && p.cin % 8 == 0 && cuda::aligned16(p.x) &&
                               p.x_stride[0] % 8 == 0 && p.x_stride[2] % 8 == 0 && p.x_stride[3] % 8 == 0;
  kernel<<<grid, kThreads, smem, stream>>>(p, tiles_w, static_cast<int>(cin_pad), static_cast<int>(cout_pad),
                                           vector_channels);
  return cudaGetLastError();
}

// cout <= 32 (a decoder's final conv to 3 channels) takes the narrow block: 32 output channels, 4x
// less tensor-core work than the 128-wide tile.
template <typename T, Activation A>
cudaError_t launch_typed(const GroupNormConvParams& p, cudaStream_t stream) {
  if (p.cout <= kNarrowN) return launch_shaped<T, A, kNarrowN>(p, stream);
  return launch_shaped<T, A, kWideN>(p, stream);
}

// Weight packing (see group_norm_conv.h): packed[chunk][tap][k][co] = W[co, chunk * 32 + k, r, s], zero
// where ci >= cin or co >= cout. Viewing W as the matrix [co][q] with q = ci * 9 + tap, this is a
// transpose with the rows renumbered (q -> (ci / 32 * 9 + tap) * 32 + ci % 32): a 32 x 32 tile goes
// through shared memory so that both the reads (32 consecutive q of one co for a contiguous W) and the
// writes (32 consecutive co of one packed row) are coalesced. The grid covers the packed matrix
// exactly (cin_pad * 9 and cout_pad are multiples of 32), so every element, padding included, is
// written once: the caller allocates the workspace uninitialised. 16-bit elements move as raw bits.
constexpr int kPackTile = 32, kPackRows = 8;

__global__ void __launch_bounds__(kPackTile * kPackRows) pack_weight_kernel(const uint16_t* __restrict__ w,
                                                                            GnConvWeightPackParams p,
                                                                            uint16_t* __restrict__ packed,
                                                                            int cout_pad) {
  __shared__ uint32_t tile[kPackTile][kPackTile + 1];  // 32-bit slots, padded: no bank conflict either way
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int co0 = blockIdx.x * kPackTile;
  const int64_t q0 = int64_t(blockIdx.y) * kPackTile;
  {
    const int64_t q = q0 + tx;
    const int64_t ci = q / 9;
    const int tap = static_cast<int>(q - ci * 9);
    const int64_t col = ci * p.w_stride[1] + (tap / 3) * p.w_stride[2] + (tap % 3) * p.w_stride[3];
#pragma unroll
    for (int j = 0; j < kPackTile; j += kPackRows) {
      const int co = co0 + ty + j;
      tile[ty + j][tx] = co < p.cout && ci < p.cin ? w[co * p.w_stride[0] + col] : 0u;
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kPackTile; j += kPackRows) {
    const int64_t q = q0 + ty + j;
    const int64_t ci = q / 9;
    const int64_t tap = q - ci * 9;
    const int64_t row = ((ci / kChunk) * 9 + tap) * kChunk + ci % kChunk;
    packed[row * cout_pad + co0 + tx] = static_cast<uint16_t>(tile[tx][ty + j]);
  }
}

}  // namespace

cudaError_t launch_group_norm_conv3x3_pack_weight_cuda(const GnConvWeightPackParams& p, cudaStream_t stream) {
  if (p.w == nullptr || p.packed == nullptr || p.cout < 1 || p.cin < 1 || p.cin > kGnConvMaxInChannels ||
      p.dtype_bytes != 2) {
    return cudaErrorInvalidValue;
  }
  const int64_t cin_pad = gn_conv_round_up(p.cin, kGnConvChannelChunk);
  const int64_t cout_pad = gn_conv_round_up(p.cout, kGnConvCoutTile);
  if (cout_pad / kPackTile > 0x7fffffff || cout_pad > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(cout_pad / kPackTile),
                  static_cast<unsigned>(cin_pad * 9 / kPackTile));
  pack_weight_kernel<<<grid, dim3(kPackTile, kPackRows), 0, stream>>>(
      static_cast<const uint16_t*>(p.w), p, static_cast<uint16_t*>(p.packed), static_cast<int>(cout_pad));
  return cudaGetLastError();
}

cudaError_t group_norm_conv3x3_cuda_arch(int* arch) {
  // Every instantiation comes from one source under one guard: one stands for all.
  return cuda::kernel_image_arch<group_norm_conv3x3_kernel<__half, Activation::kNone, kWideN>>(arch);
}

cudaError_t launch_group_norm_conv3x3_cuda(const GroupNormConvParams& p, cudaStream_t stream) {
  if (p.n < 0 || p.cin < 1 || p.cout < 1 || p.h < 0 || p.w < 0 || p.groups < 1 || p.cin % p.groups != 0 ||
      p.cin > kGnConvMaxInChannels || p.x == nullptr || p.out == nullptr || p.packed_weight == nullptr ||
      p.mean == nullptr || p.m2 == nullptr || !cuda::aligned16(p.packed_weight)) {
    return cudaErrorInvalidValue;
  }
  int arch = 0;
  const cudaError_t err = group_norm_conv3x3_cuda_arch(&arch);
  if (err != cudaSuccess) return err;
  if (arch < 80) return cudaErrorNotSupported;
  if (p.n == 0 || p.h == 0 || p.w == 0) return cudaSuccess;
  auto by_activation = [&](auto type_tag) {
    using T = decltype(type_tag);
    return FL_ACTIVATION_SWITCH(p.activation, kAct, [&] { return launch_typed<T, kAct>(p, stream); });
  };
  switch (p.dtype) {
    case DType::kFloat16: return by_activation(__half());
    case DType::kBFloat16: return by_activation(__nv_bfloat16());
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastlatent
