// XLA FFI handler symbols of the CPU neighbourhood attention kernels.
#pragma once

#include <cstdint>

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JnatNaFwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JnatNaBwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JnatNaBwdDlse);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JnatNaQK);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JnatNaQKBwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JnatNaAV);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JnatNaAVBwd);

namespace jnat::cpu {

// Threads of XLA's intra-op pool as the last kernel call saw them (0 before the first call).
int64_t LastPoolThreads();

}  // namespace jnat::cpu
