// The emulator runtime's host-side interface, for the binding glue (csrc/emu/module.cpp): a scope per
// emulated op call, the device buffers it may touch, and the findings it collected.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "fl_emu_api.h"

namespace fl_emu {

// One op call: registers its device buffers, runs launches, reports. Not reentrant (callers serialise).
void begin_scope(uint64_t seed);
// A device buffer: [p, p + bytes) may be read and written by kernels and device-side host calls.
void register_buffer(const void* p, size_t bytes, const char* name);
struct Report {
  std::vector<std::string> findings;  // one line each (at most kMaxFindings)
  size_t total = 0;                    // findings including those not listed
  cudaError_t error = cudaSuccess;     // sticky launch error (a fatal finding ends the launch)
};
// Ends the scope; the report of every launch in it.
Report end_scope();
// The report so far (for messages raised while the scope is open).
Report peek_report();
// Planted-bug controls: select one by name ("" for none); the dispatcher of a controlled launcher asks
// for the active control of its name (null: run the real kernels).
using ControlLaunch = cudaError_t (*)(const void* params, cudaStream_t stream);
bool set_control(const std::string& name);
ControlLaunch active_control(const char* launch);
std::vector<std::string> control_names();
// Number of launches and blocks run since the process started (for the tests' coverage checks).
struct Counters {
  uint64_t launches, blocks, threads;
};
Counters counters();
// 16-bit WMMA fragment loads from shared memory since the process started, modelled as ldmatrix: each
// phase reads 8 lines of 16 bytes; it takes as many shared-memory wavefronts as the most distinct 16-byte
// addresses that fall in one 16-byte bank group (bits 4-6 of the offset in shared memory). Conflict-free:
// wavefronts == phases.
struct MatrixLoadCounters {
  uint64_t loads, phases, wavefronts;
};
MatrixLoadCounters matrix_load_counters();
// One such load of `lines` lines of line_elems 2-byte elements, ldm elements apart, from `offset` bytes past
// a 128-byte boundary of shared memory (loads = 1).
MatrixLoadCounters matrix_load_cost(uint64_t offset, unsigned int ldm, int lines, int line_elems);
// Launches per kernel (demangled name) since the process started.
std::map<std::string, uint64_t> launched_kernels();
// Static __shared__ variables found in the module's symbol table (0: stripped, no shared checks).
size_t shared_variable_count();
// Findings text for a message: "N emulator finding(s):\n  <line>\n ...".
std::string format(const Report& report);

}  // namespace fl_emu
