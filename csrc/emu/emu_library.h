// The registration side of fastlatent._emu: EmuLibrary wraps each CUDA binding registered through
// binding_shim.h so that one call of an emulated op is one emulator scope (OpScope, module.cpp):
// argument tensors and every CPU allocation made during the call are the device buffers kernels may
// touch (exact byte extents), and the findings of its launches raise a RuntimeError.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace fl_emu {

class OpScope {
 public:
  explicit OpScope(const char* op);
  ~OpScope();
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;

  void add(const at::Tensor& t);
  void add(const std::optional<at::Tensor>& t);
  void add(at::TensorList ts);
  template <typename T>
  void add(const T&) {
    ++arg_index_;
  }
  // Ends the scope; raises the findings of the call's launches, if any.
  void finish();

 private:
  void add_tensor(const at::Tensor& t, const std::string& name);
  const char* op_;
  int arg_index_ = 0;
  bool outermost_ = false;
  bool finished_ = false;
};

class EmuLibrary {
 public:
  explicit EmuLibrary(torch::Library& lib) : lib_(lib) {}

  template <typename R, typename... A>
  void impl(const char* name, R (*fn)(A...)) {
    lib_.impl(name, [fn, name](A... args) -> R {
      OpScope scope(name);
      (scope.add(args), ...);
      if constexpr (std::is_void_v<R>) {
        fn(std::forward<A>(args)...);
        scope.finish();
      } else {
        R result = fn(std::forward<A>(args)...);
        scope.finish();
        return result;
      }
    });
  }

 private:
  torch::Library& lib_;
};

}  // namespace fl_emu
