// The pybind11 module fusedopt._C: the only file that knows Python.
//
// It receives raw addresses and element counts that fusedopt/_backend.py has
// validated, converts them once, and releases the GIL while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "cpu/driver.h"
#include "cpu/parallel.h"
#if defined(FUSEDOPT_WITH_CUDA)
#include "cuda/driver.h"
#endif
#include "fusedopt/chunk_plan.h"
#include "fusedopt/launch_plan.h"
#include "fusedopt/step_args.h"

namespace py = pybind11;
using fusedopt::AdamStepArgs;
using fusedopt::SgdwStepArgs;

using Numels = std::vector<int64_t>;

namespace {

// A new reference that is released at the end of the scope.
struct Owned {
  PyObject* object;
  explicit Owned(PyObject* o) : object(o) {}
  ~Owned() { Py_XDECREF(object); }
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
};

// NOTE: [steady grads]
// The steady path of fusedopt/_optimizer.py (SteadyPlan) asks, every step, whether
// the cached call arguments still describe the group: the same param objects at the
// same addresses, and a contiguous grad of the expected dtype and shape behind each
// one. With thousands of tensors these Python attribute reads are most of a step's
// host time, so this loop does them through the CPython API in one pass and writes
// the grads' addresses straight into the argument object. It only answers yes or no:
// on no, the full Python planning runs, validates everything and names any problem.
template <typename Args>
bool refresh_steady_grads(Args& args, py::list params, py::list planned_params,
                          py::handle dtype, py::list shapes) {
  static PyObject* const grad_name = PyUnicode_InternFromString("grad");
  static PyObject* const dtype_name = PyUnicode_InternFromString("dtype");
  static PyObject* const shape_name = PyUnicode_InternFromString("shape");
  static PyObject* const is_contiguous_name = PyUnicode_InternFromString("is_contiguous");
  static PyObject* const data_ptr_name = PyUnicode_InternFromString("data_ptr");
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  if (n != PyList_GET_SIZE(planned_params.ptr()) || n != PyList_GET_SIZE(shapes.ptr()) ||
      static_cast<size_t>(n) != args.params.size()) {
    return false;
  }
  args.grads.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* const param = PyList_GET_ITEM(params.ptr(), i);
    if (param != PyList_GET_ITEM(planned_params.ptr(), i)) return false;
    const Owned param_address(PyObject_CallMethodNoArgs(param, data_ptr_name));
    if (param_address.object == nullptr ||
        PyLong_AsUnsignedLongLong(param_address.object) != args.params[i]) {
      PyErr_Clear();
      return false;
    }
    const Owned grad(PyObject_GetAttr(param, grad_name));
    if (grad.object == nullptr || grad.object == Py_None) {
      PyErr_Clear();
      return false;
    }
    const Owned grad_dtype(PyObject_GetAttr(grad.object, dtype_name));
    if (grad_dtype.object != dtype.ptr()) {
      PyErr_Clear();
      return false;
    }
    const Owned grad_shape(PyObject_GetAttr(grad.object, shape_name));
    if (grad_shape.object == nullptr ||
        PyObject_RichCompareBool(grad_shape.object, PyList_GET_ITEM(shapes.ptr(), i), Py_EQ) != 1) {
      PyErr_Clear();
      return false;
    }
    // Non-strided grads (sparse, mkldnn) raise here: they have no data pointer.
    const Owned contiguous(PyObject_CallMethodNoArgs(grad.object, is_contiguous_name));
    const Owned grad_address(PyObject_CallMethodNoArgs(grad.object, data_ptr_name));
    if (contiguous.object != Py_True || grad_address.object == nullptr) {
      PyErr_Clear();
      return false;
    }
    args.grads[i] = PyLong_AsUnsignedLongLong(grad_address.object);
  }
  return true;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedopt compiled core: multi-tensor optimizer kernels on raw pointers";

  py::enum_<fusedopt::ScalarType>(m, "ScalarType")
      .value("float32", fusedopt::ScalarType::kFloat32)
      .value("bfloat16", fusedopt::ScalarType::kBFloat16)
      .value("float16", fusedopt::ScalarType::kFloat16);
  py::enum_<fusedopt::WeightDecay>(m, "WeightDecay")
      .value("none", fusedopt::WeightDecay::kNone)
      .value("l2", fusedopt::WeightDecay::kL2)
      .value("decoupled", fusedopt::WeightDecay::kDecoupled);
  py::enum_<fusedopt::Momentum>(m, "Momentum")
      .value("none", fusedopt::Momentum::kNone)
      .value("first_step", fusedopt::Momentum::kFirstStep)
      .value("running", fusedopt::Momentum::kRunning);

  m.def(
      "plan_chunks",
      [](const Numels& numels, int64_t chunk_elements) {
        std::vector<std::tuple<int64_t, int64_t, int64_t>> out;
        for (const auto& c : fusedopt::plan_chunks(numels, chunk_elements)) {
          out.emplace_back(c.tensor, c.begin, c.end);
        }
        return out;
      },
      py::arg("numels"), py::arg("chunk_elements"),
      "The (tensor, begin, end) chunks a step's work list is cut into (NOTE: [work list]).");
  m.def(
      "group_chunks_into_tasks",
      [](const Numels& numels, int64_t chunk_elements, int64_t min_task_elements) {
        return fusedopt::group_chunks_into_tasks(fusedopt::plan_chunks(numels, chunk_elements),
                                                 min_task_elements);
      },
      py::arg("numels"), py::arg("chunk_elements"), py::arg("min_task_elements"),
      "Task boundaries over the chunks of `numels`, as the CPU driver groups them.");

  m.def(
      "plan_launches",
      [](const Numels& numels, int64_t chunk_elements, int max_tensors, int max_chunks) {
        std::vector<std::tuple<std::vector<int64_t>, std::vector<int32_t>, std::vector<int32_t>>> out;
        for (const auto& launch : fusedopt::plan_launches(numels, chunk_elements,
                                                          {max_tensors, max_chunks})) {
          out.emplace_back(launch.tensors, launch.chunk_slots, launch.chunk_indices);
        }
        return out;
      },
      py::arg("numels"), py::arg("chunk_elements"), py::arg("max_tensors"), py::arg("max_chunks"),
      "CUDA launch packing (NOTE: [launch packing]): per launch, (tensors, chunk_slots, "
      "chunk_indices).");

  py::class_<AdamStepArgs>(m, "AdamStepArgs", "Pointers and hyperparameters of one Adam call")
      .def(py::init<>())
      .def_readwrite("params", &AdamStepArgs::params)
      .def_readwrite("grads", &AdamStepArgs::grads)
      .def_readwrite("exp_avgs", &AdamStepArgs::exp_avgs)
      .def_readwrite("exp_avg_sqs", &AdamStepArgs::exp_avg_sqs)
      .def_readwrite("max_exp_avg_sqs", &AdamStepArgs::max_exp_avg_sqs)
      .def_readwrite("steps", &AdamStepArgs::steps)
      .def_readwrite("numels", &AdamStepArgs::numels)
      .def_readwrite("dtype", &AdamStepArgs::dtype)
      .def_readwrite("lr", &AdamStepArgs::lr)
      .def_readwrite("beta1", &AdamStepArgs::beta1)
      .def_readwrite("beta2", &AdamStepArgs::beta2)
      .def_readwrite("eps", &AdamStepArgs::eps)
      .def_readwrite("weight_decay", &AdamStepArgs::weight_decay)
      .def_readwrite("decay", &AdamStepArgs::decay)
      .def_readwrite("amsgrad", &AdamStepArgs::amsgrad)
      .def_readwrite("maximize", &AdamStepArgs::maximize);
  py::class_<SgdwStepArgs>(m, "SgdwStepArgs", "Pointers and hyperparameters of one SGDW call")
      .def(py::init<>())
      .def_readwrite("params", &SgdwStepArgs::params)
      .def_readwrite("grads", &SgdwStepArgs::grads)
      .def_readwrite("momentum_buffers", &SgdwStepArgs::momentum_buffers)
      .def_readwrite("numels", &SgdwStepArgs::numels)
      .def_readwrite("dtype", &SgdwStepArgs::dtype)
      .def_readwrite("lr", &SgdwStepArgs::lr)
      .def_readwrite("momentum", &SgdwStepArgs::momentum)
      .def_readwrite("dampening", &SgdwStepArgs::dampening)
      .def_readwrite("weight_decay", &SgdwStepArgs::weight_decay)
      .def_readwrite("momentum_mode", &SgdwStepArgs::momentum_mode)
      .def_readwrite("nesterov", &SgdwStepArgs::nesterov)
      .def_readwrite("maximize", &SgdwStepArgs::maximize);

  m.def("refresh_steady_grads", &refresh_steady_grads<AdamStepArgs>, py::arg("args"),
        py::arg("params"), py::arg("planned_params"), py::arg("dtype"), py::arg("shapes"),
        "True, with args.grads set, when params are the planned ones at the planned addresses "
        "and each has a contiguous grad of `dtype` and its planned shape (NOTE: [steady grads]).");
  m.def("refresh_steady_grads", &refresh_steady_grads<SgdwStepArgs>, py::arg("args"),
        py::arg("params"), py::arg("planned_params"), py::arg("dtype"), py::arg("shapes"));

  py::module_ cpu = m.def_submodule("cpu", "C++ CPU kernels");
  cpu.def("adam_step", &fusedopt::cpu::adam_step, py::arg("args"), py::arg("num_threads"),
          py::call_guard<py::gil_scoped_release>(),
          "One Adam/AdamW step over host tensors given by address: increments each fp32 step "
          "counter in `args.steps`, then updates params and states in place.");
  cpu.def("sgdw_step", &fusedopt::cpu::sgdw_step, py::arg("args"), py::arg("num_threads"),
          py::call_guard<py::gil_scoped_release>(),
          "One SGDW step over host tensors given by address, in place.");
  cpu.def("active_isa", &fusedopt::cpu::active_isa,
          "The instruction set whose kernels run here (FUSEDOPT_CPU_ISA overrides).");
  cpu.def("compiled_isas", &fusedopt::cpu::compiled_isas,
          "The instruction sets this build has kernels for.");
  cpu.def("parallel_runtime", &fusedopt::cpu::parallel_runtime,
          "Where the CPU kernels' tasks run: \"openmp (<library>)\", the OpenMP team torch "
          "uses, or \"pool\", fusedopt's own threads (FUSEDOPT_CPU_PARALLEL overrides).");

#if defined(FUSEDOPT_WITH_CUDA)
  py::module_ cuda = m.def_submodule("cuda", "CUDA kernels");
  cuda.def("adam_step", &fusedopt::cuda::adam_step, py::arg("args"), py::arg("device"),
           py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
           "One Adam/AdamW step over device tensors given by address, launched on `stream` "
           "(a cudaStream_t as an integer) of `device`; step counters stay on the host.");
  cuda.def("sgdw_step", &fusedopt::cuda::sgdw_step, py::arg("args"), py::arg("device"),
           py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
           "One SGDW step over device tensors given by address, launched on `stream`.");
  cuda.def("device_count", &fusedopt::cuda::device_count,
           "CUDA devices the statically linked runtime sees (0 without a driver).");
  cuda.def(
      "launch_capacity",
      [](int num_lists) {
        const auto capacity = fusedopt::cuda::launch_capacity(num_lists);
        return std::make_pair(capacity.max_tensors, capacity.max_chunks);
      },
      py::arg("num_lists"), "(max tensors, max chunks) of one launch with `num_lists` lists.");
  cuda.attr("chunk_elements") = fusedopt::cuda::kChunkElements;
  m.attr("cuda_compiled") = true;
  m.attr("cuda_archs") = std::string(FUSEDOPT_CUDA_ARCH_LIST);
#else
  m.attr("cuda_compiled") = false;
  m.attr("cuda_archs") = std::string();
#endif
}
