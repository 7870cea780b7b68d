// CUDA sampler step (see sampler_step.h). Up to four launches, all on the caller's stream:
//   1. stats_kernel + rescale_kernel   guidance rescale only: [B, chunks] double partial sums of
//                                      c, c^2, m, m^2, then one factor per sample (chunk order)
//   2. abs_x0_kernel + select_kernel   dynamic thresholding only: |x0| in fp32 to the workspace,
//                                      then per sample an exact radix select of the two order
//                                      statistics around the quantile (one 1024-thread block,
//                                      4 histogram passes shared by both ranks while they agree)
//   3. step_kernel                     the fused update: one read of model output, sample (and
//                                      prev_x0/noise when used), one write of out (and x0)
// step_kernel moves 16 bytes per load/store (4 fp32 or 8 fp16/bf16 lanes) when N is a multiple of
// the lane count and every pointer is 16-byte aligned; Philox draws four normals per call, so a
// vector of 4 or 8 lanes starting at a multiple of 4 needs exactly one or two calls.
#include <cstdint>

#include "cuda_utils.cuh"
#include "philox.h"
#include "sampler_step.h"

namespace fastlatent {
namespace {

using cuda::to_float;

constexpr int kThreads = 256;
constexpr int kSelectThreads = 1024;
constexpr int64_t kMaxBlocks = 8192;


template <typename T, int kLanes>
__device__ __forceinline__ void load_lanes(const T* __restrict__ src, float (&dst)[kLanes]) {
  if constexpr (kLanes * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
    const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kLanes; ++j) dst[j] = to_float(values[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kLanes; ++j) dst[j] = to_float(src[j]);
  }
}

template <typename T, int kLanes>
__device__ __forceinline__ void store_lanes(T* __restrict__ dst, const float (&src)[kLanes]) {
  if constexpr (kLanes * sizeof(T) == 16) {
    uint4 raw;
    T* values = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < kLanes; ++j) values[j] = cuda::from_float<T>(src[j]);
    *reinterpret_cast<uint4*>(dst) = raw;
  } else {
#pragma unroll
    for (int j = 0; j < kLanes; ++j) dst[j] = cuda::from_float<T>(src[j]);
  }
}

struct Workspace {
  double* partial;   // [B, chunks, 4]
  float* factor;     // [B]
  float* thresh;     // [B]
  float* abs_x0;     // [B, N] (thresholding)
};

Workspace carve(const SamplerStepParams& p) {
  char* base = static_cast<char*>(p.workspace);
  const size_t batch = static_cast<size_t>(p.batch);
  Workspace w;
  w.partial = reinterpret_cast<double*>(base);
  base += sampler_align16(batch * sampler_stats_chunks(p.n) * 4 * sizeof(double));
  w.factor = reinterpret_cast<float*>(base);
  base += sampler_align16(batch * sizeof(float));
  w.thresh = reinterpret_cast<float*>(base);
  base += sampler_align16(batch * sizeof(float));
  w.abs_x0 = p.x0_mode == X0Mode::kThreshold ? reinterpret_cast<float*>(base) : nullptr;
  return w;
}

// The kernels' arguments: the params minus host-only fields, passed by value.
struct Args {
  const void* model_output;
  const void* sample;
  const void* prev[kMaxHistory];
  const void* noise;
  void* out;
  void* x0_out;
  int64_t batch, n;
  bool guided, rescale, draw, noise_in;
  float guidance_scale, guidance_rescale;
  X0Mode x0_mode;
  float clip;
  StepCoefficients c;
  uint64_t seed, offset;
  const int64_t* seed_offset;
  Workspace w;
};

template <typename T, int kLanes>
__device__ __forceinline__ void load_model(const Args& a, int64_t e, int64_t b, float (&m)[kLanes]) {
  const T* model = static_cast<const T*>(a.model_output);
  load_lanes<T, kLanes>(model + e, m);
  if (a.guided) {
    float c[kLanes];
    load_lanes<T, kLanes>(model + a.batch * a.n + e, c);
#pragma unroll
    for (int j = 0; j < kLanes; ++j) m[j] = m[j] + a.guidance_scale * (c[j] - m[j]);
  }
  if (a.rescale) {
    const float factor = a.w.factor[b];
#pragma unroll
    for (int j = 0; j < kLanes; ++j) m[j] = m[j] * factor;
  }
}

// Grid (chunks, B): block sums of one chunk of one sample, each thread a fixed strided subset,
// then a fixed shuffle tree: deterministic.
template <typename T>
__global__ void __launch_bounds__(kThreads) stats_kernel(Args a, int64_t per_chunk) {
  const int64_t b = blockIdx.y, chunk = blockIdx.x;
  const int64_t begin = chunk * per_chunk, end = begin + per_chunk < a.n ? begin + per_chunk : a.n;
  const T* model = static_cast<const T*>(a.model_output);
  double s[4] = {0, 0, 0, 0};
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float u = to_float(model[b * a.n + i]), c = to_float(model[(a.batch + b) * a.n + i]);
    const float m = u + a.guidance_scale * (c - u);
    s[0] += c;
    s[1] += static_cast<double>(c) * c;
    s[2] += m;
    s[3] += static_cast<double>(m) * m;
  }
  __shared__ double warp_sums[kThreads / 32][4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    for (int offset = 16; offset > 0; offset >>= 1) s[q] += __shfl_xor_sync(0xffffffffu, s[q], offset);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5][q] = s[q];
  }
  __syncthreads();
  if (threadIdx.x < 4) {
    double total = 0;
    for (int warp = 0; warp < kThreads / 32; ++warp) total += warp_sums[warp][threadIdx.x];
    a.w.partial[(b * gridDim.x + chunk) * 4 + threadIdx.x] = total;
  }
}

__global__ void rescale_kernel(Args a, int64_t chunks) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= a.batch) return;
  double s[4] = {0, 0, 0, 0};
  for (int64_t j = 0; j < chunks; ++j)
    for (int q = 0; q < 4; ++q) s[q] += a.w.partial[(b * chunks + j) * 4 + q];
  a.w.factor[b] = rescale_factor(s[0], s[1], s[2], s[3], a.n, a.guidance_rescale);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) abs_x0_kernel(Args a) {
  const int64_t total = a.batch * a.n;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    float m[1], x[1];
    load_model<T, 1>(a, e, e / a.n, m);
    load_lanes<T, 1>(static_cast<const T*>(a.sample) + e, x);
    a.w.abs_x0[e] = fabsf(a.c.x0_x * x[0] + a.c.x0_m * m[0]);
  }
}

// The lo-th and hi-th smallest (0-based) of a sample's |x0|: non-negative floats order as their bit
// patterns, so four passes of an 8-bit histogram over the matching prefix pin each down exactly. The two
// ranks share a pass's histogram while their prefixes agree (hi = lo + 1 for a quantile between two
// neighbours: usually all four passes), so a sample takes 4 passes, not 8; a second histogram is filled
// only after they part. Counters are Count (uint32 when a sample has fewer than 2^32 elements: native
// 32-bit shared atomics) and each rank's digit is found by its own thread in digit order: exact and
// deterministic.
template <typename Count>
__device__ void block_select_pair(const uint32_t* __restrict__ bits, int64_t n, int64_t k_lo, int64_t k_hi,
                                  Count* hist, uint32_t* shared_prefix, int64_t* shared_k, float* lo_out,
                                  float* hi_out) {
  uint32_t prefix_lo = 0, prefix_hi = 0, mask = 0;  // scalars, not arrays: no local memory
  for (int shift = 24; shift >= 0; shift -= 8) {
    const bool split = prefix_lo != prefix_hi;  // the same in every thread
    for (int d = threadIdx.x; d < (split ? 512 : 256); d += blockDim.x) hist[d] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const uint32_t v = bits[i];
      const uint32_t digit = (v >> shift) & 255u;
      if ((v & mask) == prefix_lo) atomicAdd(&hist[digit], Count{1});
      if (split && (v & mask) == prefix_hi) atomicAdd(&hist[256 + digit], Count{1});
    }
    __syncthreads();
    if (threadIdx.x < 2) {
      const int r = threadIdx.x;
      const Count* h = hist + (split ? 256 * r : 0);
      const int64_t k = r == 0 ? k_lo : k_hi;
      int64_t below = 0;
      int digit = 0;
      for (; digit < 255; ++digit) {
        if (below + static_cast<int64_t>(h[digit]) > k) break;
        below += static_cast<int64_t>(h[digit]);
      }
      shared_prefix[r] = (r == 0 ? prefix_lo : prefix_hi) | (static_cast<uint32_t>(digit) << shift);
      shared_k[r] = k - below;
    }
    __syncthreads();
    prefix_lo = shared_prefix[0];
    prefix_hi = shared_prefix[1];
    k_lo = shared_k[0];
    k_hi = shared_k[1];
    mask |= 255u << shift;
    __syncthreads();
  }
  memcpy(lo_out, &prefix_lo, sizeof(float));
  memcpy(hi_out, &prefix_hi, sizeof(float));
}

template <typename Count>
__global__ void __launch_bounds__(kSelectThreads)
select_kernel(Args a, int64_t lo, int64_t hi, float weight, float threshold_max) {
  __shared__ Count hist[512];
  __shared__ uint32_t prefix[2];
  __shared__ int64_t k[2];
  const int64_t b = blockIdx.x;
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(a.w.abs_x0 + b * a.n);
  // torch.quantile: a NaN anywhere in the sample makes the quantile NaN (|NaN| sorts above +inf)
  int has_nan = 0;
  for (int64_t i = threadIdx.x; i < a.n; i += blockDim.x) has_nan |= bits[i] > 0x7f800000u;
  if (__syncthreads_or(has_nan)) {
    if (threadIdx.x == 0) a.w.thresh[b] = __int_as_float(0x7fc00000);
    return;
  }
  float below, above;
  block_select_pair<Count>(bits, a.n, lo, hi, hist, prefix, k, &below, &above);
  if (threadIdx.x == 0) {
    const float q = quantile_lerp(below, above, weight);
    a.w.thresh[b] = fminf(fmaxf(q, 1.0f), threshold_max);
  }
}

template <typename T, int kLanes>
__global__ void __launch_bounds__(kThreads) step_kernel(Args a) {
  const int64_t vectors = a.batch * a.n / kLanes;
  uint64_t seed = a.seed, offset = a.offset;
  if (a.draw && a.seed_offset != nullptr) {
    seed = static_cast<uint64_t>(a.seed_offset[0]);
    offset = static_cast<uint64_t>(a.seed_offset[1]);
  }
  const bool x0_term = has_x0_term(a.c, a.x0_mode);  // uniform: the same branch for every thread
  for (int64_t v = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; v < vectors;
       v += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t e = v * kLanes, b = e / a.n;
    float x[kLanes], m[kLanes], hist[kLanes], z[kLanes];
    load_lanes<T, kLanes>(static_cast<const T*>(a.sample) + e, x);
    load_model<T, kLanes>(a, e, b, m);
#pragma unroll
    for (int j = 0; j < kLanes; ++j) hist[j] = 0.0f;
#pragma unroll
    for (int h = 0; h < kMaxHistory; ++h) {
      if (a.prev[h] != nullptr) {  // sum_j out_prev[j] h_j in j order, as the CPU kernel
        float prev[kLanes];
        load_lanes<T, kLanes>(static_cast<const T*>(a.prev[h]) + e, prev);
#pragma unroll
        for (int j = 0; j < kLanes; ++j) hist[j] += a.c.out_prev[h] * prev[j];
      }
    }
    if (a.noise_in) {
      load_lanes<T, kLanes>(static_cast<const T*>(a.noise) + e, z);
    } else if (a.draw) {
      if constexpr (kLanes % 4 == 0) {
#pragma unroll
        for (int g = 0; g < kLanes; g += 4) {
          const philox::Normals normals = philox::normals(seed, offset, static_cast<uint64_t>(e + g) >> 2);
#pragma unroll
          for (int j = 0; j < 4; ++j) z[g + j] = normals.z[j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < kLanes; ++j) z[j] = philox::normal_at(seed, offset, static_cast<uint64_t>(e + j));
      }
    } else {
#pragma unroll
      for (int j = 0; j < kLanes; ++j) z[j] = 0.0f;
    }
    const float thresh = a.x0_mode == X0Mode::kThreshold ? a.w.thresh[b] : 1.0f;
    float out[kLanes], x0[kLanes];
#pragma unroll
    for (int j = 0; j < kLanes; ++j) {
      const StepElement r = x0_term ? step_element(a.c, a.x0_mode, a.clip, thresh, x[j], m[j], hist[j], z[j])
                                    : step_element_without_x0_term(a.c, x[j], m[j], hist[j], z[j]);
      out[j] = r.out;
      x0[j] = r.x0;
    }
    store_lanes<T, kLanes>(static_cast<T*>(a.out) + e, out);
    if (a.x0_out != nullptr) store_lanes<T, kLanes>(static_cast<T*>(a.x0_out) + e, x0);
  }
}

unsigned int grid_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
cudaError_t launch_typed(const SamplerStepParams& p, cudaStream_t stream) {
  Args a;
  a.model_output = p.model_output;
  a.sample = p.sample;
  for (int h = 0; h < kMaxHistory; ++h) a.prev[h] = p.prev[h];
  a.noise = p.noise;
  a.out = p.out;
  a.x0_out = p.x0_out;
  a.batch = p.batch;
  a.n = p.n;
  a.guided = p.guided;
  a.rescale = p.guided && p.guidance_rescale > 0.0f;
  a.draw = p.c.out_noise != 0.0f && p.noise == nullptr;
  a.noise_in = p.c.out_noise != 0.0f && p.noise != nullptr;
  a.guidance_scale = p.guidance_scale;
  a.guidance_rescale = p.guidance_rescale;
  a.x0_mode = p.x0_mode;
  a.clip = p.clip;
  a.c = p.c;
  a.seed = p.seed;
  a.offset = p.offset;
  a.seed_offset = p.seed_offset;
  a.w = carve(p);
  if (a.rescale) {
    const int64_t chunks = sampler_stats_chunks(p.n), per_chunk = (p.n + chunks - 1) / chunks;
    stats_kernel<T><<<dim3(static_cast<unsigned int>(chunks), static_cast<unsigned int>(p.batch)), kThreads, 0,
                      stream>>>(a, per_chunk);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    rescale_kernel<<<cuda::ceil_div(p.batch, 128), 128, 0, stream>>>(a, chunks);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.x0_mode == X0Mode::kThreshold) {
    abs_x0_kernel<T><<<grid_for(p.batch * p.n), kThreads, 0, stream>>>(a);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const double position = p.threshold_quantile * static_cast<double>(p.n - 1);
    const int64_t lo = static_cast<int64_t>(position);
    const int64_t hi = lo + 1 < p.n ? lo + 1 : lo;
    const float weight = static_cast<float>(position - static_cast<double>(lo));
    if (p.n <= int64_t{0xffffffff}) {
      select_kernel<uint32_t><<<static_cast<unsigned int>(p.batch), kSelectThreads, 0, stream>>>(
          a, lo, hi, weight, p.threshold_max);
    } else {
      select_kernel<unsigned long long><<<static_cast<unsigned int>(p.batch), kSelectThreads, 0, stream>>>(
          a, lo, hi, weight, p.threshold_max);
    }
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  constexpr int kVector = 16 / sizeof(T);
  const bool vectorised = p.n % kVector == 0 && aligned16(p.model_output) && aligned16(p.sample) &&
                          aligned16(p.prev[0]) && aligned16(p.prev[1]) && aligned16(p.prev[2]) &&
                          aligned16(p.noise) && aligned16(p.out) && aligned16(p.x0_out);
  if (vectorised) {
    step_kernel<T, kVector><<<grid_for(p.batch * p.n / kVector), kThreads, 0, stream>>>(a);
  } else {
    step_kernel<T, 1><<<grid_for(p.batch * p.n), kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sampler_step_cuda(const SamplerStepParams& params, cudaStream_t stream) {
  if (params.batch < 0 || params.n < 0) return cudaErrorInvalidValue;
  if (params.batch == 0 || params.n == 0) return cudaSuccess;
  if (params.workspace == nullptr) return cudaErrorInvalidValue;
  if (params.guidance_rescale > 0.0f && (!params.guided || params.n < 2)) return cudaErrorInvalidValue;
  if (params.model_output_copy != nullptr) return cudaErrorInvalidValue;  // a CPU kernel option
  return FL_CUDA_DTYPE_SWITCH(params.dtype, scalar_t, cudaErrorInvalidValue,
                              [&] { return launch_typed<scalar_t>(params, stream); });
}

}  // namespace fastlatent
