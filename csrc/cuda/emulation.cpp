// The runtime stand-in of the emulated CUDA build (emulation.h): CUDA's per-thread last
// error and current device, a device count, and the failures tests plant. The emulated
// module is driven from one Python thread at a time; only the last error and the
// current device are per thread, as in CUDA.
#include "emulation.h"

#include <utility>

namespace fusedopt::cuda::emulation {
namespace {

struct Steering {
  int device_count = 1;
  cudaError_t driver_error = cudaSuccess;
  int64_t failing_launch = -1;  // attempt number that fails, -1 for none
  cudaError_t launch_error = cudaSuccess;
  cudaStreamCaptureStatus capture_status = cudaStreamCaptureStatusNone;
};

Steering steering;
RuntimeCounters totals{0, 0};
int64_t launch_attempts = 0;
std::vector<AccessRecord> records;

thread_local cudaError_t last_error = cudaSuccess;
thread_local int device_of_thread = -1;  // -1: no current context

// Runtime calls that fail leave their error behind for cudaGetLastError, as CUDA's do.
cudaError_t fail(cudaError_t error) {
  last_error = error;
  return error;
}

}  // namespace

bool begin_launch(unsigned blocks, unsigned threads, cudaStream_t) {
  const int64_t attempt = launch_attempts++;
  if (steering.driver_error != cudaSuccess) return fail(steering.driver_error), false;
  if (attempt == steering.failing_launch) return fail(steering.launch_error), false;
  if (blocks == 0 || threads == 0 || threads > 1024) {
    return fail(cudaErrorInvalidConfiguration), false;
  }
  if (device_of_thread < 0) device_of_thread = 0;  // a launch creates device 0's context
  ++totals.launches;
  return true;
}

void append_record(const void* address, size_t bytes, bool write) {
  records.push_back(AccessRecord{reinterpret_cast<uint64_t>(address),
                                 static_cast<uint32_t>(bytes), write ? 1u : 0u,
                                 static_cast<uint32_t>(totals.launches - 1), blockIdx.x,
                                 threadIdx.x, 0});
}

void start_recording() {
  records.clear();
  recording = true;
}

std::vector<AccessRecord> stop_recording() {
  recording = false;
  return std::exchange(records, {});
}

void reset() {
  steering = Steering{};
  totals = RuntimeCounters{0, 0};
  launch_attempts = 0;
  last_error = cudaSuccess;
  device_of_thread = -1;
  recording = false;
  records.clear();
}

void set_device_count(int count) { steering.device_count = count; }
void set_driver_error(int error) { steering.driver_error = static_cast<cudaError_t>(error); }

void fail_launch(int launches_from_now, int error) {
  steering.failing_launch = launch_attempts + launches_from_now;
  steering.launch_error = static_cast<cudaError_t>(error);
}

void set_capture_status(int status) {
  steering.capture_status = static_cast<cudaStreamCaptureStatus>(status);
}
void set_last_error(int error) { last_error = static_cast<cudaError_t>(error); }
int current_device() { return device_of_thread; }
RuntimeCounters counters() { return totals; }

}  // namespace fusedopt::cuda::emulation

using fusedopt::cuda::emulation::device_of_thread;
using fusedopt::cuda::emulation::fail;
using fusedopt::cuda::emulation::last_error;
using fusedopt::cuda::emulation::steering;
using fusedopt::cuda::emulation::totals;

cudaError_t cudaGetDeviceCount(int* count) {
  if (steering.driver_error != cudaSuccess) return fail(steering.driver_error);
  *count = steering.device_count;
  return steering.device_count > 0 ? cudaSuccess : fail(cudaErrorNoDevice);
}

cudaError_t cudaGetDevice(int* device) {
  if (steering.driver_error != cudaSuccess) return fail(steering.driver_error);
  *device = device_of_thread < 0 ? 0 : device_of_thread;  // no context yet: device 0
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  ++totals.set_device_calls;
  if (steering.driver_error != cudaSuccess) return fail(steering.driver_error);
  if (device < 0 || device >= steering.device_count) return fail(cudaErrorInvalidDevice);
  device_of_thread = device;  // creates the device's primary context if it had none
  return cudaSuccess;
}

cudaError_t cudaGetLastError() { return std::exchange(last_error, cudaSuccess); }
cudaError_t cudaPeekAtLastError() { return last_error; }

cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  if (steering.driver_error != cudaSuccess) return fail(steering.driver_error);
  *status = steering.capture_status;
  return cudaSuccess;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInsufficientDriver:
      return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice:
      return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorNoKernelImageForDevice:
      return "no kernel image is available for execution on the device";
    case cudaErrorLaunchOutOfResources:
      return "too many resources requested for launch";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
    case cudaErrorStreamCaptureUnsupported:
      return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureImplicit:
      return "operation would make the legacy stream depend on a capturing blocking stream";
  }
  return "unrecognized error code";
}
