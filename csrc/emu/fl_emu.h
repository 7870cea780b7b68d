// fl_emu.h: the CUDA built-ins for the CPU emulation of fastlatent's CUDA kernels.
//
// The emulated build compiles every csrc/kernels/*.cu with the host compiler, this header standing in
// for cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, mma.h and cub (csrc/emu/include forwards those names
// here). Kernels keep one source: the build rewrites only the launch syntax `k<<<g, b, smem, s>>>(args)`
// into `k ^ fl_emu::config(g, b, smem, s) ^ fl_emu::args(args)` (tools: setup.py, _emu_sources).
//
// Semantics (docs/cuda-emulation.md has the full list): a launch runs its blocks one at a time in a
// seeded random order; a block's threads are fibers scheduled cooperatively, each running until it
// reaches a barrier or a warp collective, the next one picked at random. __syncthreads waits for every
// thread of the block that has not exited; warp collectives (__syncwarp, shuffles, votes, mma_sync)
// wait for the lanes of their mask. WMMA fragments hold their elements in a deliberately scrambled
// element <-> (lane, slot) order: code that relies on anything but the documented load/store/mma/fill
// semantics and element-wise access gives wrong results. cp.async copies land at the matching
// wait_group. Memory accesses of the kernel code are checked through gcc's -fsanitize=thread hooks,
// which the runtime (csrc/emu/runtime.cpp) defines; atomics and the runtime's own code are not
// instrumented and check their addresses explicitly.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common.h"
#include "fl_emu_api.h"

#ifndef FL_EMULATION
#error "fl_emu.h is for the emulated build (FL_EMULATION) only"
#endif

// ------------------------------------------------------------------ qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared variables are function-local statics (CUDA allows no other mutable statics in device
// code): the runtime finds each one, and its extent, in the module's symbol table. Blocks run one at a
// time, so one copy serves every block. `extern __shared__` arrays (dynamic shared memory) are
// rewritten by the build into a pointer to the launch's dynamic buffer.
#define __shared__ static
#define __constant__ static const
#define FL_EMU_UNINSTRUMENTED __attribute__((no_sanitize_thread, noinline))
#define warpSize 32

// ------------------------------------------------------------------ vector types

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

// ------------------------------------------------------------------ 16-bit floats

// Storage only (an aggregate, so that __shared__ arrays of them need no construction guard); the
// conversions of CUDA's API below are bit for bit those of common.h (round to nearest even).
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;

inline float __half2float(__half h) { return fastlatent::to_float(fastlatent::Half{h.__x}); }
inline __half __float2half_rn(float f) { return {fastlatent::to_half(f).bits}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short v) {
  __half h;
  h.__x = v;
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) { return fastlatent::to_float(fastlatent::BFloat16{b.__x}); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {fastlatent::to_bfloat16(f).bits}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) {
  __nv_bfloat16 b;
  b.__x = v;
  return b;
}

// ------------------------------------------------------------------ math and bit intrinsics

// CUDA's min/max overloads of the global namespace (integers of one type, floats).
#define FL_EMU_MINMAX(T)                           \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
FL_EMU_MINMAX(int)
FL_EMU_MINMAX(unsigned int)
FL_EMU_MINMAX(long)
FL_EMU_MINMAX(unsigned long)
FL_EMU_MINMAX(long long)
FL_EMU_MINMAX(unsigned long long)
#undef FL_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// Explicitly rounded operations (round to nearest even: the host's default mode).
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __int_as_float(int v) { return __builtin_bit_cast(float, v); }
inline int __float_as_int(float v) { return __builtin_bit_cast(int, v); }
inline float __uint_as_float(unsigned int v) { return __builtin_bit_cast(float, v); }
inline unsigned int __float_as_uint(float v) { return __builtin_bit_cast(unsigned int, v); }
inline double __longlong_as_double(long long v) { return __builtin_bit_cast(double, v); }
inline long long __double_as_longlong(double v) { return __builtin_bit_cast(long long, v); }
inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(v)); }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(v)); }
inline unsigned int __brev(unsigned int v) {
  unsigned int r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned long long __brevll(unsigned long long v) {
  unsigned long long r = 0;
  for (int i = 0; i < 64; ++i) r |= ((v >> i) & 1ull) << (63 - i);
  return r;
}
namespace fl_emu {
void check_access(const void* address, size_t bytes, bool write, size_t alignment, const char* what);
}
// The compiler may split a 16-byte struct load into scalar loads (whose hooks then check 4-byte
// alignment), so the vector load's own alignment is checked here.
template <typename T>
inline T __ldg(const T* p) {
  fl_emu::check_access(p, sizeof(T), false, alignof(T), "__ldg");
  return *p;
}

// ------------------------------------------------------------------ the runtime (csrc/emu/runtime.cpp)

namespace fl_emu {

// Thread coordinates of the fiber running now (written by the scheduler at each switch).
extern uint3 g_thread_idx, g_block_idx;
extern dim3 g_block_dim, g_grid_dim;
extern int g_lane;

void syncthreads();
int syncthreads_count(int predicate);  // the number of threads whose predicate is true
void trap(const char* what);
void threadfence();
// A warp collective over the lanes of `mask`; returns what each lane asked for (see runtime.cpp).
enum class Collective : int { kSyncWarp, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAll, kAny };
uint64_t warp_collective(Collective kind, unsigned int mask, uint64_t value, int arg, int width);
// Explicit checks for the accesses the instrumentation does not see (atomics, cp.async, wmma).
void atomic_access(const void* address, size_t bytes);
void check_access(const void* address, size_t bytes, bool write, size_t alignment, const char* what);
void cp_async(void* shared_dst, const void* global_src, int bytes);
void cp_async_commit();
void cp_async_wait(int pending);
// Host code of the emulated translation units reading or writing device memory on purpose (the cub
// stand-in) marks the span with a DeviceSide guard; any other host access to a device buffer is reported.
struct DeviceSide {
  DeviceSide();
  ~DeviceSide();
};
void* dynamic_shared_memory();
// A planted-bug control (tests/emu/controls.py): a copy of a launcher with one edit, registered at load.
using ControlLaunch = cudaError_t (*)(const void* params, cudaStream_t stream);
int register_control(const char* name, const char* launch, ControlLaunch fn);
// Appended by setup.py to a control's translation unit (compiled with -Dfastlatent=fl_control_<name>).
#define FL_EMU_CONTROL(NAME, LAUNCH, PARAMS)                                                     \
  namespace fastlatent {                                                                         \
  extern "C" cudaError_t fl_emu_control_##NAME(const void* params, cudaStream_t stream) {        \
    return LAUNCH(*static_cast<const PARAMS*>(params), stream);                                  \
  }                                                                                              \
  }                                                                                              \
  static const int fl_emu_control_registered =                                                   \
      ::fl_emu::register_control(#NAME, #LAUNCH, &fastlatent::fl_emu_control_##NAME);

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
};
inline LaunchConfig config(dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t stream = nullptr) {
  return {grid, block, shared_bytes, stream};
}
// Runs `invoke(context)` on every thread of every block. `params`/`params_bytes`: the host copy of
// the arguments, which the kernel reads while it copies them into its own frame.
void launch(const void* kernel, const LaunchConfig& config, void (*invoke)(void*), void* context,
            const void* params, size_t params_bytes);

template <typename... P>
struct KernelRef {
  void (*kernel)(P...);
  LaunchConfig config;
};
template <typename... A>
struct Args {
  std::tuple<A...> values;
};
template <typename... A>
Args<std::decay_t<A>...> args(A&&... a) {
  return {std::tuple<std::decay_t<A>...>(std::forward<A>(a)...)};
}

template <typename... P>
KernelRef<P...> operator^(void (*kernel)(P...), const LaunchConfig& config) {
  return {kernel, config};
}

template <typename... P, typename... A>
void operator^(const KernelRef<P...>& ref, Args<A...>&& a) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  struct Context {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> params;
  };
  // Converted to the parameter types once, on the host, as cudaLaunchKernel does.
  Context context{ref.kernel, std::apply([](auto&&... v) { return std::tuple<std::decay_t<P>...>(v...); },
                                         a.values)};
  launch(reinterpret_cast<const void*>(ref.kernel), ref.config,
         [](void* c) {
           auto* ctx = static_cast<Context*>(c);
           std::apply(ctx->kernel, ctx->params);
         },
         &context, &context, sizeof(context));
}

}  // namespace fl_emu

// ------------------------------------------------------------------ CUDA's device functions

#define threadIdx (static_cast<const uint3&>(::fl_emu::g_thread_idx))
#define blockIdx (static_cast<const uint3&>(::fl_emu::g_block_idx))
#define blockDim (static_cast<const dim3&>(::fl_emu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::fl_emu::g_grid_dim))

inline void __syncthreads() { fl_emu::syncthreads(); }
inline int __syncthreads_count(int predicate) { return fl_emu::syncthreads_count(predicate); }
inline int __syncthreads_and(int predicate) {
  const int votes = fl_emu::syncthreads_count(predicate);
  return votes == static_cast<int>(::fl_emu::g_block_dim.x * ::fl_emu::g_block_dim.y * ::fl_emu::g_block_dim.z) ? 1
                                                                                                                  : 0;
}
inline int __syncthreads_or(int predicate) { return fl_emu::syncthreads_count(predicate) != 0; }
inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  fl_emu::warp_collective(fl_emu::Collective::kSyncWarp, mask, 0, 0, 32);
}
inline void __threadfence() { fl_emu::threadfence(); }
inline void __threadfence_block() { fl_emu::threadfence(); }
[[noreturn]] inline void __trap() {
  fl_emu::trap("__trap()");
  __builtin_unreachable();
}

namespace fl_emu {
template <typename T>
inline T shuffle(Collective kind, unsigned int mask, T value, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_collective(kind, mask, bits, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace fl_emu

template <typename T>
inline T __shfl_sync(unsigned int mask, T value, int src_lane, int width = 32) {
  return fl_emu::shuffle(fl_emu::Collective::kShflIdx, mask, value, src_lane, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned int mask, T value, unsigned int delta, int width = 32) {
  return fl_emu::shuffle(fl_emu::Collective::kShflUp, mask, value, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_down_sync(unsigned int mask, T value, unsigned int delta, int width = 32) {
  return fl_emu::shuffle(fl_emu::Collective::kShflDown, mask, value, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = 32) {
  return fl_emu::shuffle(fl_emu::Collective::kShflXor, mask, value, lane_mask, width);
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  return static_cast<unsigned int>(
      fl_emu::warp_collective(fl_emu::Collective::kBallot, mask, predicate != 0, 0, 32));
}
inline int __all_sync(unsigned int mask, int predicate) {
  return static_cast<int>(fl_emu::warp_collective(fl_emu::Collective::kAll, mask, predicate != 0, 0, 32));
}
inline int __any_sync(unsigned int mask, int predicate) {
  return static_cast<int>(fl_emu::warp_collective(fl_emu::Collective::kAny, mask, predicate != 0, 0, 32));
}

// Atomics: one fiber runs at a time, so read-modify-write is atomic; the bodies are not instrumented
// (an atomic is no race with another atomic) and check their address explicitly.
template <typename T>
FL_EMU_UNINSTRUMENTED T atomicAdd(T* address, T value) {
  fl_emu::atomic_access(address, sizeof(T));
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
FL_EMU_UNINSTRUMENTED T atomicMax(T* address, T value) {
  fl_emu::atomic_access(address, sizeof(T));
  const T old = *address;
  *address = old < value ? value : old;
  return old;
}
template <typename T>
FL_EMU_UNINSTRUMENTED T atomicMin(T* address, T value) {
  fl_emu::atomic_access(address, sizeof(T));
  const T old = *address;
  *address = value < old ? value : old;
  return old;
}
template <typename T>
FL_EMU_UNINSTRUMENTED T atomicExch(T* address, T value) {
  fl_emu::atomic_access(address, sizeof(T));
  const T old = *address;
  *address = value;
  return old;
}
template <typename T>
FL_EMU_UNINSTRUMENTED T atomicCAS(T* address, T compare, T value) {
  fl_emu::atomic_access(address, sizeof(T));
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}

// ------------------------------------------------------------------ WMMA

namespace fl_emu {
// slot -> element (row * cols + col) of a rows x cols fragment, lane-major: slot lane * per_lane + i.
// The order is a fixed pseudo-random permutation per (use, shape): see runtime.cpp.
const uint16_t* fragment_map(int use, int rows, int cols);
void check_wmma_pointer(const void* p, unsigned int ldm, size_t element_bytes, bool write, const char* what);
// Bank-conflict accounting of a warp's 16-bit fragment load from shared memory, modelled as the ldmatrix
// it compiles to: `lines` memory lines (rows of a row-major fragment, columns of a column-major one) ldm
// elements apart, each line_elems 2-byte elements; see runtime.cpp. Called by lane 0 only.
void count_matrix_load(const void* p, unsigned int ldm, int lines, int line_elems);
// The warp's D = A * B + C for one lane's fragments; returns after every lane of the warp called it.
void mma(int type, int m, int n, int k, const void* a, const void* b, const void* c, void* d);
inline float round_tf32(float v) {
  uint32_t bits = __builtin_bit_cast(uint32_t, v);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;  // nearest, ties away
  return __builtin_bit_cast(float, bits);
}
}  // namespace fl_emu

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

inline float __float_to_tf32(float v) { return fl_emu::round_tf32(v); }

namespace detail {
template <typename T> struct Storage { using type = T; };
template <> struct Storage<precision::tf32> { using type = float; };
template <typename T> constexpr int kTypeCode = -1;
template <> constexpr int kTypeCode<__half> = 0;
template <> constexpr int kTypeCode<__nv_bfloat16> = 1;
template <> constexpr int kTypeCode<precision::tf32> = 2;
template <typename Use> constexpr int kUseCode = std::is_same_v<Use, matrix_a> ? 0 : std::is_same_v<Use, matrix_b> ? 1 : 2;
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename detail::Storage<T>::type;
  static constexpr int kUse = detail::kUseCode<Use>;
  static constexpr int kRows = kUse == 1 ? K : M;
  static constexpr int kCols = kUse == 0 ? K : N;
  static constexpr int num_elements = kRows * kCols / 32;
  element_type x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& value) {
  using E = typename fragment<Use, M, N, K, T, L>::element_type;
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<E>(static_cast<float>(value));
}

namespace detail {
template <typename F, typename P>
inline void load(F& f, const P* p, unsigned int ldm, bool row_major) {
  fl_emu::check_wmma_pointer(p, ldm, sizeof(P), false, "wmma::load_matrix_sync");
  if constexpr (sizeof(P) == 2) {
    if (fl_emu::g_lane == 0)
      fl_emu::count_matrix_load(p, ldm, row_major ? F::kRows : F::kCols, row_major ? F::kCols : F::kRows);
  }
  const uint16_t* map = fl_emu::fragment_map(F::kUse, F::kRows, F::kCols) + fl_emu::g_lane * F::num_elements;
  for (int i = 0; i < F::num_elements; ++i) {
    const int r = map[i] / F::kCols, c = map[i] % F::kCols;
    f.x[i] = p[row_major ? static_cast<size_t>(r) * ldm + c : static_cast<size_t>(c) * ldm + r];
  }
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned int ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout");
  detail::load(f, p, ldm, std::is_same_v<L, row_major>);
}
template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const float* p, unsigned int ldm, layout_t layout) {
  detail::load(f, p, ldm, layout == mem_row_major);
}
template <int M, int N, int K, typename T>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned int ldm,
                              layout_t layout) {
  using F = fragment<accumulator, M, N, K, T>;
  fl_emu::check_wmma_pointer(p, ldm, sizeof(float), true, "wmma::store_matrix_sync");
  const uint16_t* map = fl_emu::fragment_map(F::kUse, F::kRows, F::kCols) + fl_emu::g_lane * F::num_elements;
  for (int i = 0; i < F::num_elements; ++i) {
    const int r = map[i] / F::kCols, c = map[i] % F::kCols;
    p[layout == mem_row_major ? static_cast<size_t>(r) * ldm + c : static_cast<size_t>(c) * ldm + r] = f.x[i];
  }
}
template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  static_assert(std::is_same_v<TA, TB> && detail::kTypeCode<TA> >= 0, "wmma: unsupported operand types");
  fl_emu::mma(detail::kTypeCode<TA>, M, N, K, a.x, b.x, c.x, d.x);
}

}  // namespace wmma
}  // namespace nvcuda

// ------------------------------------------------------------------ cub

namespace cub {
// cub's two-call protocol: a null d_temp_storage asks for the size; the second call sorts with the
// caller's storage (which this stand-in uses as its ping-pong buffer). Stable LSD radix sort over bits
// [begin_bit, end_bit) of the keys (signed keys ordered as numbers, as cub does).
struct DeviceRadixSort {
  template <typename K, typename V>
  static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes, const K* d_keys_in, K* d_keys_out,
                               const V* d_values_in, V* d_values_out, int num_items, int begin_bit = 0,
                               int end_bit = sizeof(K) * 8, cudaStream_t stream = nullptr) {
    (void)stream;
    static_assert(std::is_integral_v<K>, "keys must be integers");
    const size_t n = num_items > 0 ? static_cast<size_t>(num_items) : 0;
    auto align = [](size_t b) { return (b + 255) / 256 * 256; };
    const size_t need = align(n * sizeof(K)) + align(n * sizeof(V)) + 256;
    if (d_temp_storage == nullptr) {
      temp_storage_bytes = need;
      return cudaSuccess;
    }
    if (temp_storage_bytes < need || begin_bit < 0 || end_bit > static_cast<int>(sizeof(K) * 8) ||
        begin_bit > end_bit)
      return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    const char* what = "cub::DeviceRadixSort::SortPairs";
    fl_emu::check_access(d_temp_storage, temp_storage_bytes, true, 1, what);
    fl_emu::check_access(d_keys_in, n * sizeof(K), false, alignof(K), what);
    fl_emu::check_access(d_keys_out, n * sizeof(K), true, alignof(K), what);
    fl_emu::check_access(d_values_in, n * sizeof(V), false, alignof(V), what);
    fl_emu::check_access(d_values_out, n * sizeof(V), true, alignof(V), what);
    fl_emu::DeviceSide device_side;
    using U = std::make_unsigned_t<K>;
    constexpr U kFlip = std::is_signed_v<K> ? (U{1} << (sizeof(K) * 8 - 1)) : U{0};
    K* temp_keys = static_cast<K*>(d_temp_storage);
    V* temp_values = reinterpret_cast<V*>(static_cast<char*>(d_temp_storage) + align(n * sizeof(K)));
    const int passes = (end_bit - begin_bit + 7) / 8;
    const K* src_k = d_keys_in;
    const V* src_v = d_values_in;
    if (passes == 0) {
      std::memmove(d_keys_out, d_keys_in, n * sizeof(K));
      std::memmove(d_values_out, d_values_in, n * sizeof(V));
      return cudaSuccess;
    }
    for (int pass = 0; pass < passes; ++pass) {
      // the last pass writes the output
      const bool to_out = (passes - pass) % 2 == 1;
      K* dst_k = to_out ? d_keys_out : temp_keys;
      V* dst_v = to_out ? d_values_out : temp_values;
      const int shift = begin_bit + 8 * pass;
      const int width = end_bit - shift < 8 ? end_bit - shift : 8;
      const U digit_mask = static_cast<U>((1u << width) - 1u);
      size_t count[257] = {};
      for (size_t i = 0; i < n; ++i) ++count[((static_cast<U>(src_k[i]) ^ kFlip) >> shift & digit_mask) + 1];
      for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
      for (size_t i = 0; i < n; ++i) {
        const size_t at = count[(static_cast<U>(src_k[i]) ^ kFlip) >> shift & digit_mask]++;
        dst_k[at] = src_k[i];
        dst_v[at] = src_v[i];
      }
      src_k = dst_k;
      src_v = dst_v;
    }
    return cudaSuccess;
  }
};
}  // namespace cub
