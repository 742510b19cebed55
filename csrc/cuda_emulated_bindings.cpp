// The pybind11 module fusedopt._cuda_emulated: csrc/cuda/kernels.cu compiled for the
// host (NOTE: [emulated CUDA] in csrc/cuda/runtime.h), for the tests. Its steps take the
// step arguments that fusedopt._C registers (AdamStepArgs, SgdwStepArgs, AdagradStepArgs,
// RmspropStepArgs), with host addresses; the `runtime` submodule steers the CUDA runtime
// stand-in and records memory accesses.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cuda/driver.h"
#include "cuda/emulation.h"

namespace py = pybind11;
namespace emulation = fusedopt::cuda::emulation;

PYBIND11_MODULE(_cuda_emulated, m) {
  m.doc() = "fusedopt's CUDA kernels and launchers compiled for the host, run thread by thread";
  py::module_::import("fusedopt._C");  // registers the step arguments

  m.def("adam_step", &fusedopt::cuda::adam_step, py::arg("args"), py::arg("device"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "fusedopt._C.cuda.adam_step, run on the CPU over host addresses.");
  m.def("sgdw_step", &fusedopt::cuda::sgdw_step, py::arg("args"), py::arg("device"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "fusedopt._C.cuda.sgdw_step, run on the CPU over host addresses.");
  m.def("adagrad_step", &fusedopt::cuda::adagrad_step, py::arg("args"), py::arg("device"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "fusedopt._C.cuda.adagrad_step, run on the CPU over host addresses.");
  m.def("rmsprop_step", &fusedopt::cuda::rmsprop_step, py::arg("args"), py::arg("device"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "fusedopt._C.cuda.rmsprop_step, run on the CPU over host addresses.");
  m.def("device_count", &fusedopt::cuda::device_count,
        "Devices the runtime stand-in reports (0 when it plays a missing driver).");
  m.def(
      "launch_capacity",
      [](int num_lists) {
        const auto capacity = fusedopt::cuda::launch_capacity(num_lists);
        return std::make_pair(capacity.max_tensors, capacity.max_chunks);
      },
      py::arg("num_lists"), "(max tensors, max chunks) of one launch with `num_lists` lists.");
  m.attr("chunk_elements") = fusedopt::cuda::kChunkElements;
  m.def(
      "set_chunk_elements", [](int64_t n) { emulation::chunk_elements = n; }, py::arg("n"),
      "Elements per chunk from now on; 0 restores the real chunk_elements.");
  m.def(
      "active_chunk_elements",
      [] {
        return emulation::chunk_elements > 0 ? emulation::chunk_elements
                                             : fusedopt::cuda::kChunkElements;
      },
      "Elements per chunk of the launches from now on.");

  py::module_ runtime = m.def_submodule("runtime", "The CUDA runtime stand-in and its steering");
  py::dict errors;
  for (const auto& [name, code] : {std::pair{"invalid_device", cudaErrorInvalidDevice},
                                   {"insufficient_driver", cudaErrorInsufficientDriver},
                                   {"no_device", cudaErrorNoDevice},
                                   {"no_kernel_image", cudaErrorNoKernelImageForDevice},
                                   {"launch_failure", cudaErrorLaunchFailure}}) {
    errors[name] = static_cast<int>(code);
  }
  runtime.attr("errors") = errors;
  runtime.def("reset", &emulation::reset,
              "One healthy device, nothing planted, counters zero, no current device.");
  runtime.def("set_device_count", &emulation::set_device_count, py::arg("count"));
  runtime.def("set_driver_error", &emulation::set_driver_error, py::arg("error"),
              "Every runtime call fails with `error` (0: the driver works).");
  runtime.def("fail_launch", &emulation::fail_launch, py::arg("launches_from_now"),
              py::arg("error"), "Makes one coming launch fail (0: the next).");
  runtime.def("set_capture_status", &emulation::set_capture_status, py::arg("status"),
              "What cudaStreamIsCapturing reports: 0 none, 1 active, 2 invalidated.");
  runtime.def("set_last_error", &emulation::set_last_error, py::arg("error"),
              "Leaves `error` behind as this thread's last error, as a failed call would.");
  runtime.def("last_error", [] { return static_cast<int>(cudaPeekAtLastError()); },
              "This thread's last error, not cleared.");
  runtime.def("current_device", &emulation::current_device,
              "This thread's current device, -1 while it has no context.");
  runtime.def(
      "counters",
      [] {
        const emulation::RuntimeCounters c = emulation::counters();
        return py::dict(py::arg("launches") = c.launches,
                        py::arg("set_device_calls") = c.set_device_calls);
      },
      "Accepted launches and cudaSetDevice calls since reset().");
  runtime.def("start_recording", &emulation::start_recording,
              "Records every load and store of tensor memory from now on.");
  runtime.def(
      "stop_recording",
      [] {
        const std::vector<emulation::AccessRecord> records = emulation::stop_recording();
        return py::bytes(reinterpret_cast<const char*>(records.data()),
                         records.size() * sizeof(emulation::AccessRecord));
      },
      "The records since start_recording(), 32 bytes each: address u64, bytes u32, write u32, "
      "launch u32, block u32, thread u32, padding u32.");
}
