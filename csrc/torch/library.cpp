// The one TORCH_LIBRARY of the fastlatent namespace. Each op's schema lives beside its
// implementation in csrc/torch/<op>.cpp as a TORCH_LIBRARY_FRAGMENT.
#include <torch/library.h>

TORCH_LIBRARY(fastlatent, m) {}
