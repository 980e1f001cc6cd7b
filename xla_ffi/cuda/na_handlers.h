// XLA FFI handler symbols of the CUDA neighbourhood attention kernels (na_handlers.cu).
#pragma once

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JnatNaFwdCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JnatNaBwdCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JnatNaQKCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JnatNaQKBwdCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JnatNaAVCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JnatNaAVBwdCuda);
