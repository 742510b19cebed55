// The part of the DLPack C exchange API (DLPack 1.3) that the steady check uses.
//
// A tensor library that implements it puts a capsule named "dlpack_exchange_api" on
// its tensor type as `__dlpack_c_exchange_api__` (torch.Tensor does since torch
// 2.11). The capsule holds a table of C functions; `dltensor_from_py_object_no_sync`
// describes a tensor (address, device, dtype, shape, strides) into a caller-owned
// DLTensor without allocating, in one C call instead of one Python call per
// attribute. These are the ABI declarations of the DLPack standard (dmlc/dlpack),
// written out here because the build must not need torch or its headers.
#pragma once

#include <cstdint>

namespace fusedopt::dlpack {

extern "C" {

struct Device {
  int32_t device_type;  // DLDeviceType: 1 CPU, 2 CUDA, ...
  int32_t device_id;
};

struct DataType {
  uint8_t code;  // DLDataTypeCode: 0 int, 1 uint, 2 float, 4 bfloat, 5 complex, ...
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;    // ndim sizes, owned by the producer
  int64_t* strides;  // ndim strides in elements; null means compact row-major
  uint64_t byte_offset;
};

struct Version {
  uint32_t major;
  uint32_t minor;
};

struct ExchangeApiHeader {
  Version version;
  ExchangeApiHeader* prev_api;
};

// 0 on success; -1 with a Python exception set. The caller holds the GIL, and the
// description stays valid while the tensor is alive and unchanged.
using DescribeFunction = int (*)(void* py_object, Tensor* out);

struct ExchangeApi {
  ExchangeApiHeader header;
  void* managed_tensor_allocator;               // not used here
  void* managed_tensor_from_py_object_no_sync;  // not used here
  void* managed_tensor_to_py_object_no_sync;    // not used here
  DescribeFunction dltensor_from_py_object_no_sync;  // may be null
  void* current_work_stream;                    // not used here
};

}  // extern "C"

constexpr const char* kExchangeCapsuleName = "dlpack_exchange_api";
constexpr uint32_t kMajorVersion = 1;
constexpr uint32_t kFirstMinorWithCapsule = 3;

}  // namespace fusedopt::dlpack
