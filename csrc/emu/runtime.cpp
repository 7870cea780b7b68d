// The emulator runtime: fibers, the block scheduler, warp collectives, WMMA, cp.async, the CUDA
// runtime calls, and the memory checker behind gcc's -fsanitize=thread hooks. Compiled WITHOUT
// instrumentation; the emulated kernels are compiled with it. See docs/cuda-emulation.md.
#include "runtime.h"

#include <cxxabi.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#define FL_EMULATION 1
#include "fl_emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace fl_emu {

uint3 g_thread_idx, g_block_idx;
dim3 g_block_dim, g_grid_dim;
int g_lane;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxFindings = 30;
constexpr size_t kDefaultSharedLimit = 48 * 1024;
constexpr size_t kOptinSharedLimit = 227 * 1024;
constexpr uintptr_t kSharedSlack = 256;

// ------------------------------------------------------------------ context switch

#if defined(__x86_64__)
// switch_context(&save_sp, next_sp): saves callee-saved registers, MXCSR and the x87 control word on
// the current stack, stores the stack pointer, and resumes the context saved at next_sp.
extern "C" void fl_emu_switch_context(void** save_sp, void* next_sp);
asm(R"(
  .text
  .p2align 4
  .globl fl_emu_switch_context
  .hidden fl_emu_switch_context
  .type fl_emu_switch_context,@function
fl_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fl_emu_switch_context, .-fl_emu_switch_context
)");
#endif

enum class State { kRunnable, kBarrier, kCollective, kDone, kAborted };

struct Copy {
  char* dst;
  int bytes;
  unsigned char data[16];
};

struct Thread {
  char* stack_lo = nullptr;
  char* stack_hi = nullptr;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
  uint3 idx{};
  int linear = 0, lane = 0, warp = 0;
  State state = State::kRunnable;
  // the collective this thread waits in
  Collective kind{};
  bool is_mma = false;
  unsigned int mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  int mma_type = 0, mma_m = 0, mma_n = 0, mma_k = 0;
  const void *mma_a = nullptr, *mma_b = nullptr, *mma_c = nullptr;
  void* mma_d = nullptr;
  // collective counter of the last warp collective shared with each lane (intra-warp ordering)
  uint32_t pair_sync[32] = {};
  std::vector<Copy> open_group;
  std::vector<std::vector<Copy>> committed;
};

// Shadow of one byte of shared memory: who wrote and read it in the current barrier interval.
struct Shadow {
  uint32_t init_block;       // block serial of the last write (initialised in this block iff equal)
  uint32_t w_interval, w_coll;
  uint32_t r_interval[2], r_coll[2];
  uint16_t w_tid, r_tid[2];
  uint8_t pending;           // destination of a cp.async not yet landed
};

struct SharedVar {
  uintptr_t begin, end;
  std::string name;
  size_t shadow;  // offset of its first byte in g_static_shadow
};

struct FunctionSymbol {
  uintptr_t begin, end;
  std::string name;
};

struct Buffer {
  uintptr_t begin, end;
  std::string name;
};

// ------------------------------------------------------------------ global state

bool g_in_kernel = false;      // a fiber is running
int g_device_side = 0;         // host code touching device memory on purpose (DeviceSide)
bool g_scope_active = false;
Thread* g_current = nullptr;
std::vector<Thread> g_threads;
char* g_stacks = nullptr;
#if defined(__x86_64__)
void* g_scheduler_sp = nullptr;
#else
ucontext_t g_scheduler_context;
#endif

uintptr_t g_module_ranges[16][2];
int g_module_range_count = 0;
std::vector<SharedVar> g_shared_vars;       // static __shared__ variables, sorted
std::vector<FunctionSymbol> g_functions;     // for kernel names in reports, sorted
std::vector<Shadow> g_static_shadow;
std::vector<Shadow> g_dynamic_shadow;
std::vector<unsigned char> g_dynamic_storage;
uintptr_t g_dynamic_begin = 0, g_dynamic_end = 0;
uintptr_t g_static_begin = 0, g_static_end = 0;
uintptr_t g_params_begin = 0, g_params_end = 0;
std::vector<Buffer> g_buffers;

uint32_t g_block_serial = 0, g_interval = 0, g_coll = 0;
const void* g_kernel = nullptr;
void (*g_invoke)(void*) = nullptr;
void* g_invoke_context = nullptr;
bool g_abort = false;
cudaError_t g_abort_error = cudaSuccess;
cudaError_t g_last_error = cudaSuccess;
cudaError_t g_sticky_error = cudaSuccess;
std::mt19937_64 g_rng;
uint64_t g_seed = 0;
uint64_t g_launch_serial = 0;
std::map<const void*, int> g_max_dynamic_shared;
Counters g_counters{0, 0, 0};
std::map<const void*, uint64_t> g_launch_counts;
int g_sms = 2;

std::vector<std::string> g_findings;
size_t g_finding_total = 0;
std::map<std::string, int> g_finding_keys;  // dedupe: one line per (kind, kernel, site)

std::string symbol_name(uintptr_t address);
std::string demangle(const std::string& name);
std::string demangle_raw(const std::string& name);

// The last shared variable starting at or before `a`, or null.
const SharedVar* shared_var_before(uintptr_t a) {
  auto it = std::upper_bound(g_shared_vars.begin(), g_shared_vars.end(), a,
                             [](uintptr_t x, const SharedVar& v) { return x < v.begin; });
  return it == g_shared_vars.begin() ? nullptr : &*(it - 1);
}

// "small_d_kernel<__half, 8>::codes" from the mangled name of a function-local static.
std::string shared_name(const SharedVar& v) {
  std::string name = demangle_raw(v.name);
  const size_t anon = name.find("(anonymous namespace)::");
  if (anon != std::string::npos) name.erase(anon, std::strlen("(anonymous namespace)::"));
  const size_t params = name.find('(');
  const size_t close = name.rfind(")::");
  if (params != std::string::npos && close != std::string::npos && close > params)
    name = name.substr(0, params) + name.substr(close + 1);
  return name;
}

// Shadow of static shared bytes [a, a + size) if they lie in one variable, else null.
Shadow* static_shadow(uintptr_t a, size_t size) {
  const SharedVar* v = shared_var_before(a);
  if (!v || a + size > v->end) return nullptr;
  return &g_static_shadow[v->shadow + (a - v->begin)];
}


// ------------------------------------------------------------------ module map and symbols

int find_module(dl_phdr_info* info, size_t, void* data) {
  const uintptr_t probe = reinterpret_cast<uintptr_t>(data);
  bool mine = false;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t begin = info->dlpi_addr + ph.p_vaddr;
    if (probe >= begin && probe < begin + ph.p_memsz) mine = true;
  }
  if (!mine) return 0;
  for (int i = 0; i < info->dlpi_phnum && g_module_range_count < 16; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t begin = info->dlpi_addr + ph.p_vaddr;
    g_module_ranges[g_module_range_count][0] = begin;
    g_module_ranges[g_module_range_count][1] = begin + ph.p_memsz;
    ++g_module_range_count;
  }
  // The symbol table (if not stripped) gives each static shared variable's extent and kernel names.
  const int fd = open(info->dlpi_name, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 1;
  const off_t size = lseek(fd, 0, SEEK_END);
  void* map = size > 0 ? mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
  close(fd);
  if (map == MAP_FAILED) return 1;
  const char* base = static_cast<const char*>(map);
  const auto* eh = reinterpret_cast<const ElfW(Ehdr)*>(base);
  const auto* sh = reinterpret_cast<const ElfW(Shdr)*>(base + eh->e_shoff);
  const char* shstr = base + sh[eh->e_shstrndx].sh_offset;
  (void)shstr;
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    const auto* syms = reinterpret_cast<const ElfW(Sym)*>(base + sh[i].sh_offset);
    const char* strtab = base + sh[sh[i].sh_link].sh_offset;
    const size_t count = sh[i].sh_size / sizeof(ElfW(Sym));
    for (size_t s = 0; s < count; ++s) {
      const ElfW(Sym)& sym = syms[s];
      if (sym.st_size == 0) continue;
      const uintptr_t begin = info->dlpi_addr + sym.st_value;
      const char* name = strtab + sym.st_name;
      // Function-local statics ("_ZZ...") in writable sections: the __shared__ variables (device code
      // has no other mutable statics; the runtime's own are skipped).
      const bool writable = sym.st_shndx < eh->e_shnum && (sh[sym.st_shndx].sh_flags & SHF_WRITE);
      if (ELF64_ST_TYPE(sym.st_info) == STT_OBJECT && writable &&
          (std::strncmp(name, "_ZZN10fastlatent", 16) == 0 || std::strstr(name, "fl_control_") != nullptr))
        g_shared_vars.push_back({begin, begin + sym.st_size, name, 0});
      else if (ELF64_ST_TYPE(sym.st_info) == STT_FUNC)
        g_functions.push_back({begin, begin + sym.st_size, strtab + sym.st_name});
    }
  }
  munmap(map, static_cast<size_t>(size));
  auto by_begin = [](const auto& a, const auto& b) { return a.begin < b.begin; };
  std::sort(g_shared_vars.begin(), g_shared_vars.end(), by_begin);
  std::sort(g_functions.begin(), g_functions.end(), by_begin);
  return 1;
}

void init_once() {
  static bool done = false;
  if (done) return;
  done = true;
  dl_iterate_phdr(find_module, reinterpret_cast<void*>(&g_thread_idx));
  size_t shadow_bytes = 0;
  for (SharedVar& v : g_shared_vars) {
    v.shadow = shadow_bytes;
    shadow_bytes += v.end - v.begin;
  }
  g_static_shadow.assign(shadow_bytes, Shadow{});
  if (!g_shared_vars.empty()) {  // a slack around them: accesses just past a variable are out of bounds
    g_static_begin = g_shared_vars.front().begin - kSharedSlack;
    for (const SharedVar& v : g_shared_vars) g_static_end = std::max(g_static_end, v.end + kSharedSlack);
  }
  const size_t total = kStackBytes * kMaxThreads;
  void* stacks = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (stacks == MAP_FAILED) {
    std::fprintf(stderr, "fastlatent emulator: cannot reserve fiber stacks\n");
    std::abort();
  }
  g_stacks = static_cast<char*>(stacks);
  for (int i = 0; i < kMaxThreads; ++i) mprotect(g_stacks + i * kStackBytes, 4096, PROT_NONE);  // guard pages
  g_threads.resize(kMaxThreads);
  if (const char* sms = std::getenv("FL_EMU_SMS")) g_sms = std::max(1, std::atoi(sms));
}

std::string demangle_raw(const std::string& name) {
  int status = 0;
  char* out = abi::__cxa_demangle(name.c_str(), nullptr, nullptr, &status);
  std::string result = status == 0 && out ? out : name;
  std::free(out);
  return result;
}

std::string demangle(const std::string& name) {
  std::string result = demangle_raw(name);
  // drop the parameter list and the anonymous namespace: "fastlatent::small_d_kernel<__half, 8>"
  const size_t anon = result.find("(anonymous namespace)::");
  if (anon != std::string::npos) result.erase(anon, std::strlen("(anonymous namespace)::"));
  int depth = 0;
  for (size_t i = 0; i < result.size(); ++i) {
    if (result[i] == '<') ++depth;
    if (result[i] == '>') --depth;
    if (result[i] == '(' && depth == 0) return result.substr(0, i);
  }
  return result;
}

std::string symbol_name(uintptr_t address) {
  auto it = std::upper_bound(g_functions.begin(), g_functions.end(), address,
                             [](uintptr_t a, const FunctionSymbol& f) { return a < f.begin; });
  if (it == g_functions.begin()) return "?";
  --it;
  if (address >= it->end) return "?";
  return demangle(it->name);
}

// ------------------------------------------------------------------ findings

std::string hex(uintptr_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%zx", static_cast<size_t>(v));
  return buf;
}

std::string where_is(uintptr_t a) {
  for (const Buffer& b : g_buffers) {
    if (a >= b.begin && a < b.end) return b.name + "+" + std::to_string(a - b.begin);
    if (a >= b.end && a < b.end + 4096) return std::to_string(a - b.end) + " bytes past the end of " + b.name;
    if (a < b.begin && a + 4096 >= b.begin) return std::to_string(b.begin - a) + " bytes before " + b.name;
  }
  if (a >= g_static_begin && a < g_static_end) {
    const SharedVar* v = shared_var_before(a);
    if (v) {
      const std::string name = shared_name(*v);
      if (a < v->end) return "shared " + name + "+" + std::to_string(a - v->begin);
      return "shared memory " + std::to_string(a - v->end) + " bytes past " + name;
    }
    return "static shared memory";
  }
  if (a >= g_dynamic_begin && a < g_dynamic_end + 4096)
    return "dynamic shared memory+" + std::to_string(a - g_dynamic_begin) + " (size " +
           std::to_string(g_dynamic_end - g_dynamic_begin) + ")";
  return "unregistered memory";
}

void add_finding(const std::string& kind, uintptr_t address, const std::string& detail, uintptr_t site) {
  ++g_finding_total;
  std::string kernel = g_kernel ? symbol_name(reinterpret_cast<uintptr_t>(g_kernel)) : "host code";
  std::string key = kind + "|" + kernel + "|" + (site ? symbol_name(site) : detail);
  if (g_finding_keys[key]++ > 0 || g_findings.size() >= kMaxFindings) return;
  std::string line = kind + ": kernel " + kernel;
  if (g_in_kernel && g_current) {
    line += " block (" + std::to_string(g_block_idx.x) + "," + std::to_string(g_block_idx.y) + "," +
            std::to_string(g_block_idx.z) + ") thread (" + std::to_string(g_current->idx.x) + "," +
            std::to_string(g_current->idx.y) + "," + std::to_string(g_current->idx.z) + ")";
  }
  if (address) line += " address " + hex(address) + " (" + where_is(address) + ")";
  if (site) {
    const std::string fn = symbol_name(site);
    if (fn != kernel && fn != "?") line += " in " + fn;
  }
  if (!detail.empty()) line += ": " + detail;
  g_findings.push_back(line);
}

void switch_to_scheduler();

// A fatal finding ends the launch, as a fault ends a CUDA kernel (the access is not performed).
[[noreturn]] void fatal(const std::string& kind, uintptr_t address, const std::string& detail, uintptr_t site,
                        cudaError_t error) {
  add_finding(kind, address, detail, site);
  g_abort = true;
  g_abort_error = error;
  g_current->state = State::kAborted;
  switch_to_scheduler();
  __builtin_unreachable();
}

// ------------------------------------------------------------------ memory checks

bool ordered(uint16_t other, uint32_t other_coll, const Thread& me) {
  if (other == me.linear) return true;
  const Thread& o = g_threads[other];
  return o.warp == me.warp && me.pair_sync[o.lane] > other_coll;
}

void shared_access(Shadow* shadow, uintptr_t a, size_t size, bool write, bool atomic, uintptr_t site) {
  Thread& me = *g_current;
  for (size_t i = 0; i < size; ++i) {
    Shadow& s = shadow[i];
    if (s.pending) {
      add_finding(write ? "cp.async destination written before its wait" : "cp.async destination read before its wait",
                  a + i, "cp.async.wait_group has not landed this copy yet", site);
      return;
    }
    if (atomic) {
      s.init_block = g_block_serial;
      continue;
    }
    if (!write && s.init_block != g_block_serial) {
      add_finding("uninitialised shared read", a + i, "no thread of this block wrote this byte", site);
      return;
    }
    if (s.w_interval == g_interval && !ordered(s.w_tid, s.w_coll, me)) {
      add_finding("shared-memory race", a + i,
                  std::string(write ? "write" : "read") + " after a write by thread " +
                      std::to_string(s.w_tid) + " with no barrier between", site);
      return;
    }
    if (write) {
      for (int r = 0; r < 2; ++r) {
        if (s.r_interval[r] == g_interval && !ordered(s.r_tid[r], s.r_coll[r], me)) {
          add_finding("shared-memory race", a + i,
                      "write after a read by thread " + std::to_string(s.r_tid[r]) + " with no barrier between",
                      site);
          return;
        }
      }
      s.init_block = g_block_serial;
      s.w_interval = g_interval;
      s.w_coll = g_coll;
      s.w_tid = static_cast<uint16_t>(me.linear);
    } else {
      // keep the two most recent distinct readers of this interval
      int slot = -1;
      for (int r = 0; r < 2; ++r)
        if (s.r_interval[r] == g_interval && s.r_tid[r] == me.linear) slot = r;
      if (slot < 0) slot = (s.r_interval[0] != g_interval) ? 0 : (s.r_interval[1] != g_interval ? 1 : 1);
      if (slot == 1 && s.r_interval[0] == g_interval && s.r_interval[1] == g_interval && s.r_tid[1] != me.linear) {
        s.r_tid[0] = s.r_tid[1];
        s.r_coll[0] = s.r_coll[1];
      }
      s.r_interval[slot] = g_interval;
      s.r_coll[slot] = g_coll;
      s.r_tid[slot] = static_cast<uint16_t>(me.linear);
    }
  }
}

bool in_buffers(uintptr_t a, size_t size) {
  for (const Buffer& b : g_buffers)
    if (a >= b.begin && a + size <= b.end) return true;
  return false;
}

bool in_module(uintptr_t a, size_t size) {
  for (int i = 0; i < g_module_range_count; ++i)
    if (a >= g_module_ranges[i][0] && a + size <= g_module_ranges[i][1]) return true;
  return false;
}

void access(uintptr_t a, size_t size, bool write, size_t alignment, bool atomic, uintptr_t site) {
  if (!g_in_kernel) {
    if (g_scope_active && !g_device_side && in_buffers(a, 1))
      add_finding("host access to device memory", a, "host code of a launcher dereferenced a device buffer", site);
    return;
  }
  if (alignment > 1 && (a & (alignment - 1)) != 0)
    fatal("misaligned access", a, std::to_string(size) + "-byte " + (write ? "write" : "read") + " needs " +
          std::to_string(alignment) + "-byte alignment", site, cudaErrorMisalignedAddress);
  if (a >= reinterpret_cast<uintptr_t>(g_current->stack_lo) && a + size <= reinterpret_cast<uintptr_t>(g_current->stack_hi))
    return;
  if (a >= g_static_begin && a < g_static_end) {
    if (Shadow* shadow = static_shadow(a, size)) {
      shared_access(shadow, a, size, write, atomic, site);
      return;
    }
    const SharedVar* v = shared_var_before(a);
    if (v && a < v->end)  // starts inside a variable, ends past it
      fatal("out-of-bounds shared access", a, std::to_string(size) + "-byte " + (write ? "write" : "read"), site,
            cudaErrorIllegalAddress);
  }
  if (a >= g_dynamic_begin && a < g_dynamic_end) {
    if (a + size > g_dynamic_end)
      fatal("out-of-bounds shared access", a, std::to_string(size) + "-byte " + (write ? "write" : "read") +
            " past the dynamic shared memory", site, cudaErrorIllegalAddress);
    shared_access(&g_dynamic_shadow[a - g_dynamic_begin], a, size, write, atomic, site);
    return;
  }
  if (in_buffers(a, size)) return;
  if (a >= g_dynamic_end && a < g_dynamic_end + kSharedSlack)
    fatal("out-of-bounds shared access", a, std::to_string(size) + "-byte " + (write ? "write" : "read") +
          " past the dynamic shared memory", site, cudaErrorIllegalAddress);
  if (a >= g_params_begin && a + size <= g_params_end) {
    if (write) fatal("write to kernel parameters", a, "", site, cudaErrorIllegalAddress);
    return;
  }
  if (!atomic && in_module(a, size)) return;
  fatal("out-of-bounds global access", a, std::to_string(size) + "-byte " + (write ? "write" : "read"), site,
        cudaErrorIllegalAddress);
}

// ------------------------------------------------------------------ fibers and the scheduler

void switch_to_scheduler() {
  Thread* t = g_current;
  g_in_kernel = false;
#if defined(__x86_64__)
  fl_emu_switch_context(&t->sp, g_scheduler_sp);
#else
  swapcontext(&t->context, &g_scheduler_context);
#endif
  // resumed by the scheduler, which set g_current and the coordinates
}

void land(Copy& c, Thread& t);

void fiber_main() {
  g_invoke(g_invoke_context);
  Thread& t = *g_current;
  for (auto& group : t.committed)
    for (Copy& c : group) land(c, t);
  for (Copy& c : t.open_group) land(c, t);
  t.committed.clear();
  t.open_group.clear();
  t.state = State::kDone;
  switch_to_scheduler();
  __builtin_unreachable();
}

void start_fiber(Thread& t) {
#if defined(__x86_64__)
  uintptr_t top = reinterpret_cast<uintptr_t>(t.stack_hi) & ~uintptr_t{15};
  auto* slots = reinterpret_cast<uint64_t*>(top);
  slots[-1] = 0;                                             // alignment: rsp = 8 mod 16 at entry
  slots[-2] = reinterpret_cast<uint64_t>(&fiber_main);       // return address of the first switch
  for (int i = 3; i <= 8; ++i) slots[-i] = 0;                // rbp rbx r12 r13 r14 r15
  uint32_t csr[2] = {0x1f80u, 0x037fu};
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(*reinterpret_cast<uint16_t*>(&csr[1])));
  std::memcpy(&slots[-9], csr, 8);
  t.sp = &slots[-9];
#else
  getcontext(&t.context);
  t.context.uc_stack.ss_sp = t.stack_lo;
  t.context.uc_stack.ss_size = static_cast<size_t>(t.stack_hi - t.stack_lo);
  t.context.uc_link = nullptr;
  makecontext(&t.context, fiber_main, 0);
#endif
}

void resume(Thread& t) {
  g_current = &t;
  g_thread_idx = t.idx;
  g_lane = t.lane;
  g_in_kernel = true;
#if defined(__x86_64__)
  fl_emu_switch_context(&g_scheduler_sp, t.sp);
#else
  swapcontext(&g_scheduler_context, &t.context);
#endif
  g_in_kernel = false;
  g_current = nullptr;
}

unsigned int lanes_of_warp(int warp, int nthreads) {
  const int first = warp * 32;
  const int count = std::min(32, nthreads - first);
  return count >= 32 ? 0xffffffffu : ((1u << count) - 1u);
}

void mma_compute(Thread** lanes);

// Completes the warp collective that lane `t` waits in if every lane of its mask has arrived.
bool try_complete(Thread& t, int nthreads, std::vector<int>& runnable) {
  const int first = t.warp * 32;
  const unsigned int existing = lanes_of_warp(t.warp, nthreads);
  const unsigned int need = (t.is_mma ? 0xffffffffu : (t.mask | 1u << t.lane)) & existing;
  Thread* lanes[32] = {};
  for (int l = 0; l < 32; ++l) {
    if (!(need >> l & 1u)) continue;
    Thread& o = g_threads[first + l];
    if (o.state != State::kCollective) return false;
    lanes[l] = &o;
  }
  for (int l = 0; l < 32; ++l) {
    if (!lanes[l]) continue;
    if (lanes[l]->is_mma != t.is_mma || lanes[l]->kind != t.kind || lanes[l]->mask != t.mask) {
      add_finding("mismatched warp collective", 0,
                  "lanes of one warp met in different collectives or with different masks", 0);
      break;
    }
  }
  if (t.is_mma) {
    mma_compute(lanes);
  } else {
    ++g_coll;
    for (int l = 0; l < 32; ++l) {
      if (!lanes[l]) continue;
      Thread& me = *lanes[l];
      const int w = std::max(1, std::min(32, me.width));
      const int base = l & ~(w - 1);
      int src = l;
      switch (me.kind) {
        case Collective::kShflIdx: src = base + (me.arg & (w - 1)); break;
        case Collective::kShflUp: src = l - me.arg >= base ? l - me.arg : l; break;
        case Collective::kShflDown: src = l + me.arg < base + w ? l + me.arg : l; break;
        case Collective::kShflXor: src = (l ^ me.arg) < base + w ? (l ^ me.arg) : l; break;
        default: break;
      }
      switch (me.kind) {
        case Collective::kSyncWarp: me.result = 0; break;
        case Collective::kBallot:
        case Collective::kAll:
        case Collective::kAny: {
          unsigned int ballot = 0;
          for (int o = 0; o < 32; ++o)
            if (lanes[o] && lanes[o]->value) ballot |= 1u << o;
          me.result = me.kind == Collective::kBallot ? ballot
                      : me.kind == Collective::kAll  ? ballot == need
                                                     : ballot != 0;
          break;
        }
        default:
          if (src < 0 || src >= 32 || !lanes[src]) {
            add_finding("shuffle from a lane outside the mask", 0,
                        "lane " + std::to_string(l) + " reads lane " + std::to_string(src), 0);
            me.result = me.value;
          } else {
            me.result = lanes[src]->value;
          }
      }
      for (int o = 0; o < 32; ++o)
        if (lanes[o]) me.pair_sync[o] = g_coll;
    }
  }
  for (int l = 0; l < 32; ++l) {
    if (!lanes[l]) continue;
    lanes[l]->state = State::kRunnable;
    runnable.push_back(lanes[l]->linear);
  }
  return true;
}

void run_block(const uint3& block, int nthreads) {
  g_block_idx = block;
  ++g_block_serial;
  ++g_interval;
  ++g_counters.blocks;
  g_counters.threads += static_cast<uint64_t>(nthreads);
  std::vector<int> runnable(static_cast<size_t>(nthreads));
  for (int i = 0; i < nthreads; ++i) {
    Thread& t = g_threads[i];
    t.stack_lo = g_stacks + static_cast<size_t>(i) * kStackBytes + 4096;
    t.stack_hi = g_stacks + static_cast<size_t>(i + 1) * kStackBytes;
    t.linear = i;
    t.idx = {static_cast<unsigned int>(i) % g_block_dim.x,
             static_cast<unsigned int>(i) / g_block_dim.x % g_block_dim.y,
             static_cast<unsigned int>(i) / (g_block_dim.x * g_block_dim.y)};
    t.lane = i % 32;
    t.warp = i / 32;
    t.state = State::kRunnable;
    std::memset(t.pair_sync, 0, sizeof(t.pair_sync));
    t.open_group.clear();
    t.committed.clear();
    start_fiber(t);
    runnable[static_cast<size_t>(i)] = i;
  }
  while (!g_abort) {
    if (runnable.empty()) {
      int done = 0, barrier = 0;
      for (int i = 0; i < nthreads; ++i) {
        done += g_threads[i].state == State::kDone;
        barrier += g_threads[i].state == State::kBarrier;
      }
      if (done == nthreads) break;
      if (barrier + done == nthreads) {  // exited threads count as arrived (sm_70+)
        ++g_interval;
        // __syncthreads_count/and/or: every waiting thread gets the count of true predicates, taken
        // here, when the barrier opens, before any thread can vote again.
        uint64_t votes = 0;
        for (int i = 0; i < nthreads; ++i)
          if (g_threads[i].state == State::kBarrier) votes += g_threads[i].value != 0;
        for (int i = 0; i < nthreads; ++i)
          if (g_threads[i].state == State::kBarrier) {
            g_threads[i].result = votes;
            g_threads[i].state = State::kRunnable;
            runnable.push_back(i);
          }
        continue;
      }
      std::string stuck;
      for (int i = 0; i < nthreads && stuck.size() < 200; ++i)
        if (g_threads[i].state == State::kCollective) stuck += " " + std::to_string(i);
      add_finding("deadlock", 0,
                  std::to_string(barrier) + " threads wait in __syncthreads while threads" + stuck +
                      " wait in warp collectives whose lanes never arrive (exited, or at the barrier)", 0);
      g_abort = true;
      g_abort_error = cudaErrorLaunchFailure;
      break;
    }
    const size_t pick = static_cast<size_t>(g_rng() % runnable.size());
    const int tid = runnable[pick];
    runnable[pick] = runnable.back();
    runnable.pop_back();
    resume(g_threads[tid]);
    Thread& t = g_threads[tid];
    if (t.state == State::kCollective) try_complete(t, nthreads, runnable);
  }
}

// ------------------------------------------------------------------ WMMA maps and math

struct FragmentMap {
  int use, rows, cols;
  uint16_t slots[256];
};
FragmentMap g_maps[8];
int g_map_count = 0;

void land(Copy& c, Thread& t) {
  (void)t;
  const uintptr_t a = reinterpret_cast<uintptr_t>(c.dst);
  Shadow* shadow = a >= g_dynamic_begin && a < g_dynamic_end ? &g_dynamic_shadow[a - g_dynamic_begin]
                                                              : static_shadow(a, static_cast<size_t>(c.bytes));
  if (shadow) {
    for (int i = 0; i < c.bytes; ++i) shadow[i].pending = 0;
    shared_access(shadow, a, static_cast<size_t>(c.bytes), true, false, 0);
  }
  std::memcpy(c.dst, c.data, static_cast<size_t>(c.bytes));
}

float element_to_float(int type, const void* base, int index) {
  switch (type) {
    case 0: return fastlatent::to_float(fastlatent::Half{static_cast<const uint16_t*>(base)[index]});
    case 1: return fastlatent::to_float(fastlatent::BFloat16{static_cast<const uint16_t*>(base)[index]});
    default: {
      // tf32 tensor cores read 19 bits of each fp32 operand: the low 13 mantissa bits are ignored
      const uint32_t bits = __builtin_bit_cast(uint32_t, static_cast<const float*>(base)[index]);
      return __builtin_bit_cast(float, bits & 0xffffe000u);
    }
  }
}

void mma_compute(Thread** lanes) {
  const Thread& t0 = *lanes[0];
  const int m = t0.mma_m, n = t0.mma_n, k = t0.mma_k, type = t0.mma_type;
  const uint16_t* map_a = fragment_map(0, m, k);
  const uint16_t* map_b = fragment_map(1, k, n);
  const uint16_t* map_c = fragment_map(2, m, n);
  const int per_a = m * k / 32, per_b = k * n / 32, per_c = m * n / 32;
  float a[256], b[256], c[256];
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < per_a; ++i) a[map_a[l * per_a + i]] = element_to_float(type, lanes[l]->mma_a, i);
    for (int i = 0; i < per_b; ++i) b[map_b[l * per_b + i]] = element_to_float(type, lanes[l]->mma_b, i);
    for (int i = 0; i < per_c; ++i) c[map_c[l * per_c + i]] = static_cast<const float*>(lanes[l]->mma_c)[i];
  }
  float d[256];
  for (int r = 0; r < m; ++r)
    for (int col = 0; col < n; ++col) {
      float acc = c[r * n + col];
      for (int q = 0; q < k; ++q) acc += a[r * k + q] * b[q * n + col];
      d[r * n + col] = acc;
    }
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < per_c; ++i) static_cast<float*>(lanes[l]->mma_d)[i] = d[map_c[l * per_c + i]];
}

}  // namespace

// ------------------------------------------------------------------ device-side API (fl_emu.h)

void syncthreads() { syncthreads_count(0); }

int syncthreads_count(int predicate) {
  g_current->value = predicate != 0;
  g_current->state = State::kBarrier;
  switch_to_scheduler();
  return static_cast<int>(g_current->result);
}

void threadfence() {}

void trap(const char* what) {
  if (!g_in_kernel) std::abort();
  fatal("trap", 0, what, reinterpret_cast<uintptr_t>(__builtin_return_address(0)), cudaErrorIllegalInstruction);
}

uint64_t warp_collective(Collective kind, unsigned int mask, uint64_t value, int arg, int width) {
  Thread& t = *g_current;
  t.kind = kind;
  t.is_mma = false;
  t.mask = mask;
  t.value = value;
  t.arg = arg;
  t.width = width;
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fatal("invalid shuffle width", 0, "width " + std::to_string(width), 0, cudaErrorIllegalInstruction);
  if (!(mask >> t.lane & 1u))
    add_finding("warp collective without the calling lane", 0,
                "lane " + std::to_string(t.lane) + " is not in mask " + hex(mask), 0);
  t.state = State::kCollective;
  switch_to_scheduler();
  return t.result;
}

void mma(int type, int m, int n, int k, const void* a, const void* b, const void* c, void* d) {
  Thread& t = *g_current;
  const int nthreads = static_cast<int>(g_block_dim.x * g_block_dim.y * g_block_dim.z);
  if (lanes_of_warp(t.warp, nthreads) != 0xffffffffu)
    fatal("wmma::mma_sync in a partial warp", 0, "the block size is not a multiple of 32",
          reinterpret_cast<uintptr_t>(__builtin_return_address(0)), cudaErrorIllegalInstruction);
  t.is_mma = true;
  t.kind = Collective::kSyncWarp;
  t.mask = 0xffffffffu;
  t.mma_type = type;
  t.mma_m = m;
  t.mma_n = n;
  t.mma_k = k;
  t.mma_a = a;
  t.mma_b = b;
  t.mma_c = c;
  t.mma_d = d;
  t.state = State::kCollective;
  switch_to_scheduler();
}

const uint16_t* fragment_map(int use, int rows, int cols) {
  for (int i = 0; i < g_map_count; ++i)
    if (g_maps[i].use == use && g_maps[i].rows == rows && g_maps[i].cols == cols) return g_maps[i].slots;
  if (g_map_count == 8 || rows * cols > 256 || rows * cols % 32 != 0) std::abort();
  FragmentMap& map = g_maps[g_map_count++];
  map.use = use;
  map.rows = rows;
  map.cols = cols;
  const int count = rows * cols;
  for (int i = 0; i < count; ++i) map.slots[i] = static_cast<uint16_t>(i);
  // A fixed scramble (not the identity, not row- or column-major) per use and shape.
  std::mt19937 rng(static_cast<uint32_t>(0x5eed + use * 1000 + rows * 37 + cols));
  for (int i = count - 1; i > 0; --i) std::swap(map.slots[i], map.slots[rng() % static_cast<uint32_t>(i + 1)]);
  return map.slots;
}

void check_wmma_pointer(const void* p, unsigned int ldm, size_t element_bytes, bool write, const char* what) {
  (void)write;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (!g_in_kernel) return;
  if (a % 32 != 0)
    fatal("misaligned access", a, std::string(what) + " needs a 256-bit (32-byte) aligned pointer",
          reinterpret_cast<uintptr_t>(__builtin_return_address(0)), cudaErrorMisalignedAddress);
  if ((ldm * element_bytes) % 16 != 0)
    fatal("misaligned access", a, std::string(what) + ": ldm " + std::to_string(ldm) +
          " is not a multiple of 16 bytes", reinterpret_cast<uintptr_t>(__builtin_return_address(0)),
          cudaErrorMisalignedAddress);
}

void atomic_access(const void* address, size_t bytes) {
  access(reinterpret_cast<uintptr_t>(address), bytes, true, bytes, true,
         reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}

void check_access(const void* address, size_t bytes, bool write, size_t alignment, const char* what) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  if (g_in_kernel) {
    access(a, bytes, write, alignment, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
    return;
  }
  if (!g_scope_active) return;
  if (bytes > 0 && !in_buffers(a, bytes))
    add_finding("out-of-bounds device access", a,
                std::string(what) + " " + (write ? "writes " : "reads ") + std::to_string(bytes) +
                    " bytes outside every device buffer", 0);
  else if (alignment > 1 && a % alignment != 0)
    add_finding("misaligned access", a, std::string(what) + " needs " + std::to_string(alignment) + "-byte alignment",
                0);
}

void cp_async(void* shared_dst, const void* global_src, int bytes) {
  Thread& t = *g_current;
  const uintptr_t site = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  const uintptr_t d = reinterpret_cast<uintptr_t>(shared_dst), s = reinterpret_cast<uintptr_t>(global_src);
  const bool dynamic = d >= g_dynamic_begin && d + static_cast<uintptr_t>(bytes) <= g_dynamic_end;
  Shadow* shadow = dynamic ? &g_dynamic_shadow[d - g_dynamic_begin] : static_shadow(d, static_cast<size_t>(bytes));
  if (!shadow) fatal("cp.async destination not in shared memory", d, "", site, cudaErrorIllegalAddress);
  if (d % static_cast<uintptr_t>(bytes) || s % static_cast<uintptr_t>(bytes))
    fatal("misaligned access", d % static_cast<uintptr_t>(bytes) ? d : s,
          "cp.async of " + std::to_string(bytes) + " bytes needs both addresses " + std::to_string(bytes) +
              "-byte aligned", site, cudaErrorMisalignedAddress);
  if (!in_buffers(s, static_cast<size_t>(bytes)))
    fatal("out-of-bounds global access", s, "cp.async source", site, cudaErrorIllegalAddress);
  for (int i = 0; i < bytes; ++i) {
    if (shadow[i].pending) add_finding("cp.async destination written before its wait", d + i,
                                       "two copies in flight to one address", site);
    shadow[i].pending = 1;
  }
  Copy c;
  c.dst = static_cast<char*>(shared_dst);
  c.bytes = bytes;
  std::memcpy(c.data, global_src, static_cast<size_t>(bytes));  // the source is read at issue
  t.open_group.push_back(c);
}

void cp_async_commit() {
  Thread& t = *g_current;
  t.committed.push_back(std::move(t.open_group));
  t.open_group.clear();
}

void cp_async_wait(int pending) {
  Thread& t = *g_current;
  while (static_cast<int>(t.committed.size()) > pending) {
    for (Copy& c : t.committed.front()) land(c, t);
    t.committed.erase(t.committed.begin());
  }
}

DeviceSide::DeviceSide() { ++g_device_side; }
DeviceSide::~DeviceSide() { --g_device_side; }

void* dynamic_shared_memory() { return reinterpret_cast<void*>(g_dynamic_begin); }

void launch(const void* kernel, const LaunchConfig& config, void (*invoke)(void*), void* context,
            const void* params, size_t params_bytes) {
  init_once();
  if (g_sticky_error != cudaSuccess) {  // a faulted context refuses further work, as CUDA's does
    g_last_error = g_sticky_error;
    return;
  }
  const dim3& b = config.block;
  const dim3& g = config.grid;
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  if (threads == 0 || threads > kMaxThreads || b.z > 64 || g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 ||
      g.z > 65535 || g.x > 0x7fffffffu) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  auto limit_it = g_max_dynamic_shared.find(kernel);
  const size_t limit = limit_it == g_max_dynamic_shared.end() ? kDefaultSharedLimit
                                                                 : static_cast<size_t>(limit_it->second);
  if (config.shared_bytes > limit) {
    g_last_error = cudaErrorInvalidValue;  // as CUDA: more than 48 KiB needs cudaFuncSetAttribute
    return;
  }
  ++g_counters.launches;
  ++g_launch_counts[kernel];
  g_kernel = kernel;
  g_invoke = invoke;
  g_invoke_context = context;
  g_params_begin = reinterpret_cast<uintptr_t>(params);
  g_params_end = g_params_begin + params_bytes;
  g_block_dim = b;
  g_grid_dim = g;
  // dynamic shared memory: fresh, filled with a pattern (reads before writes are reported anyway)
  g_dynamic_storage.assign(config.shared_bytes + 256, 0xcd);
  g_dynamic_begin = (reinterpret_cast<uintptr_t>(g_dynamic_storage.data()) + 127) & ~uintptr_t{127};
  g_dynamic_end = g_dynamic_begin + config.shared_bytes;
  g_dynamic_shadow.assign(config.shared_bytes, Shadow{});
  g_rng.seed(g_seed * 0x9e3779b97f4a7c15ull + (++g_launch_serial));
  std::vector<uint3> order;
  order.reserve(static_cast<size_t>(uint64_t{g.x} * g.y * g.z));
  for (unsigned int z = 0; z < g.z; ++z)
    for (unsigned int y = 0; y < g.y; ++y)
      for (unsigned int x = 0; x < g.x; ++x) order.push_back({x, y, z});
  std::shuffle(order.begin(), order.end(), g_rng);
  g_abort = false;
  for (const uint3& block : order) {
    run_block(block, static_cast<int>(threads));
    if (g_abort) break;
  }
  if (g_abort) {
    g_sticky_error = g_abort_error;
    g_last_error = g_abort_error;
  }
  g_kernel = nullptr;
  g_params_begin = g_params_end = 0;
  g_dynamic_begin = g_dynamic_end = 0;
}

cudaError_t set_function_attribute(const void* function, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > kOptinSharedLimit) return cudaErrorInvalidValue;
    g_max_dynamic_shared[function] = value;
  }
  return cudaSuccess;
}

// ------------------------------------------------------------------ scope (runtime.h)

void begin_scope(uint64_t seed) {
  init_once();
  g_scope_active = true;
  g_seed = seed;
  g_launch_serial = 0;
  g_buffers.clear();
  g_findings.clear();
  g_finding_keys.clear();
  g_finding_total = 0;
  g_last_error = g_sticky_error = cudaSuccess;
}

void register_buffer(const void* p, size_t bytes, const char* name) {
  if (p == nullptr || bytes == 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  g_buffers.push_back({a, a + bytes, name});
}

Report peek_report() {
  Report r;
  r.findings = g_findings;
  r.total = g_finding_total;
  r.error = g_sticky_error;
  return r;
}

Report end_scope() {
  Report r = peek_report();
  g_scope_active = false;
  g_buffers.clear();
  g_sticky_error = g_last_error = cudaSuccess;
  return r;
}

Counters counters() { return g_counters; }

namespace {
MatrixLoadCounters g_matrix_loads{0, 0, 0};
}  // namespace

// ldmatrix reads 8 lines of 16 bytes per phase (one 8 x 8 matrix of 16-bit elements); shared memory serves
// 128 bytes (32 banks x 4 bytes) per wavefront, so lines whose 16-byte pieces share bits 4-6 of their offset
// but differ in address are serialised (equal addresses are one broadcast).
MatrixLoadCounters matrix_load_cost(uint64_t offset, unsigned int ldm, int lines, int line_elems) {
  MatrixLoadCounters cost{1, 0, 0};
  for (int piece = 0; piece < line_elems / 8; ++piece) {
    for (int first = 0; first + 8 <= lines; first += 8) {
      uint64_t distinct[8];
      int count = 0, per_group[8] = {};
      for (int i = 0; i < 8; ++i) {
        const uint64_t a = offset + (static_cast<uint64_t>(first + i) * ldm + piece * 8) * 2;
        if (std::find(distinct, distinct + count, a) != distinct + count) continue;
        distinct[count++] = a;
        ++per_group[(a >> 4) & 7];
      }
      ++cost.phases;
      cost.wavefronts += static_cast<uint64_t>(*std::max_element(per_group, per_group + 8));
    }
  }
  return cost;
}

// Offsets count from the start of dynamic shared memory (128-byte aligned on the device, as here) or of the
// static __shared__ variable; fragments in global memory have no banks.
void count_matrix_load(const void* p, unsigned int ldm, int lines, int line_elems) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (!g_in_kernel || lines % 8 != 0 || line_elems % 8 != 0) return;
  uintptr_t base = 0;
  if (a >= g_dynamic_begin && a < g_dynamic_end) {
    base = g_dynamic_begin;
  } else if (a >= g_static_begin && a < g_static_end) {
    const SharedVar* v = shared_var_before(a);
    if (v == nullptr) return;
    base = v->begin;
  } else {
    return;
  }
  const MatrixLoadCounters cost = matrix_load_cost(a - base, ldm, lines, line_elems);
  ++g_matrix_loads.loads;
  g_matrix_loads.phases += cost.phases;
  g_matrix_loads.wavefronts += cost.wavefronts;
}

MatrixLoadCounters matrix_load_counters() { return g_matrix_loads; }

namespace {
struct Control {
  std::string launch;
  ControlLaunch fn;
};
std::map<std::string, Control>& controls() {
  static std::map<std::string, Control> registry;  // filled by static initialisers of the control TUs
  return registry;
}
const Control* g_active_control = nullptr;
}  // namespace

int register_control(const char* name, const char* launch, ControlLaunch fn) {
  controls()[name] = {launch, fn};
  return 0;
}

bool set_control(const std::string& name) {
  if (name.empty()) {
    g_active_control = nullptr;
    return true;
  }
  auto it = controls().find(name);
  if (it == controls().end()) return false;
  g_active_control = &it->second;
  return true;
}

ControlLaunch active_control(const char* launch) {
  return g_active_control && g_active_control->launch == launch ? g_active_control->fn : nullptr;
}

std::vector<std::string> control_names() {
  std::vector<std::string> names;
  for (const auto& [name, control] : controls()) names.push_back(name);
  return names;
}

std::map<std::string, uint64_t> launched_kernels() {
  init_once();
  std::map<std::string, uint64_t> out;
  for (const auto& [kernel, count] : g_launch_counts) out[symbol_name(reinterpret_cast<uintptr_t>(kernel))] += count;
  return out;
}

size_t shared_variable_count() {
  init_once();
  return g_shared_vars.size();
}

std::string format(const Report& report) {
  std::string s = std::to_string(report.total) + " CUDA emulator finding(s)";
  if (report.error != cudaSuccess) s += std::string(" (launch failed: ") + cudaGetErrorName(report.error) + ")";
  s += ":";
  for (const std::string& f : report.findings) s += "\n  " + f;
  if (report.total > report.findings.size())
    s += "\n  ... and " + std::to_string(report.total - report.findings.size()) + " more of the same kinds";
  return s;
}

}  // namespace fl_emu

// ------------------------------------------------------------------ CUDA runtime API (fl_emu_api.h)

cudaError_t cudaGetLastError() {
  const cudaError_t e = fl_emu::g_last_error;
  fl_emu::g_last_error = fl_emu::g_sticky_error;
  return e;
}
cudaError_t cudaPeekAtLastError() { return fl_emu::g_last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorIllegalInstruction: return "cudaErrorIllegalInstruction";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t error) { return cudaGetErrorName(error); }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  (void)device;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = fl_emu::g_sms; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 8; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  if (fl_emu::g_sticky_error != cudaSuccess) return fl_emu::g_sticky_error;
  fl_emu::check_access(ptr, bytes, true, 1, "cudaMemsetAsync");
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, int, cudaStream_t) {
  if (fl_emu::g_sticky_error != cudaSuccess) return fl_emu::g_sticky_error;
  fl_emu::check_access(src, bytes, false, 1, "cudaMemcpyAsync");
  fl_emu::check_access(dst, bytes, true, 1, "cudaMemcpyAsync");
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return fl_emu::g_sticky_error; }
cudaError_t cudaDeviceSynchronize() { return fl_emu::g_sticky_error; }

// ------------------------------------------------------------------ -fsanitize=thread hooks

#define FL_SITE reinterpret_cast<uintptr_t>(__builtin_return_address(0))
#define FL_HOOKS(N)                                                                                              \
  extern "C" void __tsan_read##N(void* a) { fl_emu::access(reinterpret_cast<uintptr_t>(a), N, false, N, false, FL_SITE); } \
  extern "C" void __tsan_write##N(void* a) { fl_emu::access(reinterpret_cast<uintptr_t>(a), N, true, N, false, FL_SITE); } \
  extern "C" void __tsan_unaligned_read##N(void* a) {                                                            \
    fl_emu::access(reinterpret_cast<uintptr_t>(a), N, false, 1, false, FL_SITE);                                 \
  }                                                                                                              \
  extern "C" void __tsan_unaligned_write##N(void* a) {                                                           \
    fl_emu::access(reinterpret_cast<uintptr_t>(a), N, true, 1, false, FL_SITE);                                  \
  }                                                                                                              \
  extern "C" void __tsan_volatile_read##N(void* a) {                                                             \
    fl_emu::access(reinterpret_cast<uintptr_t>(a), N, false, N, false, FL_SITE);                                 \
  }                                                                                                              \
  extern "C" void __tsan_volatile_write##N(void* a) {                                                            \
    fl_emu::access(reinterpret_cast<uintptr_t>(a), N, true, N, false, FL_SITE);                                  \
  }

FL_HOOKS(1)
FL_HOOKS(2)
FL_HOOKS(4)
FL_HOOKS(8)
FL_HOOKS(16)

extern "C" {
void __tsan_read_range(void* a, unsigned long size) {
  fl_emu::access(reinterpret_cast<uintptr_t>(a), size, false, 1, false, FL_SITE);
}
void __tsan_write_range(void* a, unsigned long size) {
  fl_emu::access(reinterpret_cast<uintptr_t>(a), size, true, 1, false, FL_SITE);
}
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void* __tsan_memcpy(void* dst, const void* src, unsigned long n) {
  fl_emu::access(reinterpret_cast<uintptr_t>(src), n, false, 1, false, FL_SITE);
  fl_emu::access(reinterpret_cast<uintptr_t>(dst), n, true, 1, false, FL_SITE);
  return std::memcpy(dst, src, n);
}
void* __tsan_memmove(void* dst, const void* src, unsigned long n) {
  fl_emu::access(reinterpret_cast<uintptr_t>(src), n, false, 1, false, FL_SITE);
  fl_emu::access(reinterpret_cast<uintptr_t>(dst), n, true, 1, false, FL_SITE);
  return std::memmove(dst, src, n);
}
void* __tsan_memset(void* dst, int v, unsigned long n) {
  fl_emu::access(reinterpret_cast<uintptr_t>(dst), n, true, 1, false, FL_SITE);
  return std::memset(dst, v, n);
}
}

// std::atomic in host code of the instrumented files (static-local guards, the launchers' cached
// kernel_image_arch): no device memory, so the hooks only perform the operation.
#define FL_ATOMIC_HOOKS(N, T)                                                                                     \
  extern "C" T __tsan_atomic##N##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  extern "C" void __tsan_atomic##N##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##N##_exchange(volatile T* a, T v, int) {                                            \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                           \
  }                                                                                                               \
  extern "C" T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) {                                           \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                            \
  }                                                                                                               \
  extern "C" T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) {                                           \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                            \
  }                                                                                                               \
  extern "C" int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                       \
  }                                                                                                               \
  extern "C" int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                  \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                        \
  }                                                                                                               \
  extern "C" T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                      \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                             \
    return c;                                                                                                     \
  }

FL_ATOMIC_HOOKS(8, uint8_t)
FL_ATOMIC_HOOKS(16, uint16_t)
FL_ATOMIC_HOOKS(32, uint32_t)
FL_ATOMIC_HOOKS(64, uint64_t)

extern "C" void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
extern "C" void __tsan_atomic_signal_fence(int) {}
