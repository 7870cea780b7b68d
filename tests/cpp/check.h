// A minimal test harness for the torch-free kernels: CHECK records failures, main() returns
// their count so ctest sees a non-zero exit.
#pragma once

#include <cstdio>

namespace fl_test {
inline int& failures() {
  static int count = 0;
  return count;
}
}  // namespace fl_test

#define CHECK(cond, ...)                                               \
  do {                                                                 \
    if (!(cond)) {                                                     \
      ++fl_test::failures();                                           \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                               \
      std::fprintf(stderr, "\n");                                      \
    }                                                                  \
  } while (0)
