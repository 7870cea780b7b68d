// Force-included into csrc/torch/*.cpp for the emulated build (fastlatent._emu): the bindings compile
// unchanged, with their CUDA registrations (checks, allocation, params, launch_<op>_cuda) going to the
// CPU key of the `fastlatent_emu` library, wrapped so that each call registers its device buffers and
// raises the emulator's findings (csrc/emu/module.cpp). Their schemas land in fastlatent_emu; their CPU
// registrations are left uninstantiated (the emulated module has no CPU kernels).
#pragma once

#include <torch/library.h>

// Tells the bindings they are compiled for fastlatent._emu: what only the real module has (the sampler steps'
// direct lanes, which run the CPU kernels) is left out.
#define FL_EMU_BINDINGS 1

#include "emu_library.h"

#define FL_EMU_CAT2(a, b) a##b
#define FL_EMU_CAT(a, b) FL_EMU_CAT2(a, b)

#undef TORCH_LIBRARY_FRAGMENT
#define TORCH_LIBRARY_FRAGMENT(ns, m) _TORCH_LIBRARY_FRAGMENT(fastlatent_emu, m, C10_UID)

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) FL_EMU_IMPL_##k(m)
#define FL_EMU_IMPL_CPU(m) \
  template <typename = void> [[maybe_unused]] void FL_EMU_CAT(fl_emu_unused_cpu_impl_, __LINE__)(torch::Library & m)
// The version-counter bump of mutating ops (ADInplaceOrView) belongs to the real library only.
#define FL_EMU_IMPL_ADInplaceOrView(m)                                                                 \
  template <typename = void> [[maybe_unused]] void FL_EMU_CAT(fl_emu_unused_inplace_impl_, __LINE__)( \
      torch::Library & m)
#define FL_EMU_IMPL_CUDA(m)                                                              \
  static void FL_EMU_CAT(fl_emu_impl_, __LINE__)(::fl_emu::EmuLibrary&);               \
  _TORCH_LIBRARY_IMPL(fastlatent_emu, CPU, FL_EMU_CAT(fl_emu_lib_, __LINE__), C10_UID) { \
    ::fl_emu::EmuLibrary emu(FL_EMU_CAT(fl_emu_lib_, __LINE__));                        \
    FL_EMU_CAT(fl_emu_impl_, __LINE__)(emu);                                            \
  }                                                                                     \
  static void FL_EMU_CAT(fl_emu_impl_, __LINE__)(::fl_emu::EmuLibrary & m)
