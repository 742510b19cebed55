// The pybind11 module fusedopt._C: converts arguments and releases the GIL.
//
// It receives raw addresses and element counts that fusedopt/_backend.py has
// validated; every launch from the optimizers goes through run_checked, the last
// check of those addresses (NOTE: [launch check] in launch_check.cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "cpu/driver.h"
#include "cpu/parallel.h"
#include "launch_check.h"
#if defined(FUSEDOPT_WITH_CUDA)
#include "cuda/driver.h"
#endif
#include "fusedopt/chunk_plan.h"
#include "fusedopt/launch_plan.h"
#include "fusedopt/step_args.h"
#include "fusedopt/stochastic_rounding.h"

namespace py = pybind11;
using fusedopt::AdamStepArgs;
using fusedopt::SgdwStepArgs;
using fusedopt::AdagradStepArgs;
using fusedopt::RmspropStepArgs;

using Numels = std::vector<int64_t>;

namespace {

// Makes a bound class that owns Python references visible to the garbage collector:
// T provides traverse(visit, arg) and clear(). An instance is only looked at once its
// C++ object exists: a collection can run while the constructor allocates.
template <typename T>
T* constructed(PyObject* self) {
  auto* instance = reinterpret_cast<py::detail::instance*>(self);
  py::detail::value_and_holder v_h = instance->get_value_and_holder();
  return v_h.holder_constructed() ? v_h.value_ptr<T>() : nullptr;
}

template <typename T>
py::custom_type_setup with_gc() {
  return py::custom_type_setup([](PyHeapTypeObject* heap_type) {
    PyTypeObject* type = &heap_type->ht_type;
    type->tp_flags |= Py_TPFLAGS_HAVE_GC;
    type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) -> int {
      Py_VISIT(Py_TYPE(self));  // instances of heap types own a reference to their type
      const T* value = constructed<T>(self);
      return value == nullptr ? 0 : value->traverse(visit, arg);
    };
    type->tp_clear = [](PyObject* self) -> int {
      if (T* value = constructed<T>(self)) value->clear();
      return 0;
    };
  });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedopt compiled core: multi-tensor optimizer kernels on raw pointers";

  py::enum_<fusedopt::ScalarType>(m, "ScalarType")
      .value("float32", fusedopt::ScalarType::kFloat32)
      .value("bfloat16", fusedopt::ScalarType::kBFloat16)
      .value("float16", fusedopt::ScalarType::kFloat16)
      .value("int16", fusedopt::ScalarType::kInt16);
  py::enum_<fusedopt::MasterWeights>(m, "MasterWeights")
      .value("none", fusedopt::MasterWeights::kNone)
      .value("remainder", fusedopt::MasterWeights::kRemainder)
      .value("fp32", fusedopt::MasterWeights::kFp32);
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

  m.def(
      "rounding_bits",
      [](uint64_t seed, uint64_t tensor, uint64_t step, int64_t element) {
        return fusedopt::rounding_bits(fusedopt::rounding_stream(seed, tensor, step), element);
      },
      py::arg("seed"), py::arg("tensor"), py::arg("step"), py::arg("element"),
      "The 16 random bits that round element `element` of a tensor stochastically "
      "(NOTE: [stochastic rounding]).");

  py::class_<AdamStepArgs>(m, "AdamStepArgs", "Pointers and hyperparameters of one Adam call")
      .def(py::init<>())
      .def_readwrite("params", &AdamStepArgs::params)
      .def_readwrite("grads", &AdamStepArgs::grads)
      .def_readwrite("exp_avgs", &AdamStepArgs::exp_avgs)
      .def_readwrite("exp_avg_sqs", &AdamStepArgs::exp_avg_sqs)
      .def_readwrite("max_exp_avg_sqs", &AdamStepArgs::max_exp_avg_sqs)
      .def_readwrite("steps", &AdamStepArgs::steps)
      .def_readwrite("masters", &AdamStepArgs::masters)
      .def_readwrite("master", &AdamStepArgs::master)
      .def_readwrite("rounding_ids", &AdamStepArgs::rounding_ids)
      .def_readwrite("rounding_offsets", &AdamStepArgs::rounding_offsets)
      .def_readwrite("rounding_seed", &AdamStepArgs::rounding_seed)
      .def_readwrite("stochastic_rounding", &AdamStepArgs::stochastic_rounding)
      .def_readwrite("numels", &AdamStepArgs::numels)
      .def_readwrite("dtype", &AdamStepArgs::dtype)
      .def_readwrite("grad_dtype", &AdamStepArgs::grad_dtype)
      .def_readwrite("state_dtype", &AdamStepArgs::state_dtype)
      .def_readwrite("lr", &AdamStepArgs::lr)
      .def_readwrite("beta1", &AdamStepArgs::beta1)
      .def_readwrite("beta2", &AdamStepArgs::beta2)
      .def_readwrite("eps", &AdamStepArgs::eps)
      .def_readwrite("weight_decay", &AdamStepArgs::weight_decay)
      .def_readwrite("lr_max", &AdamStepArgs::lr_max)
      .def_readwrite("grad_scale", &AdamStepArgs::grad_scale)
      .def_readwrite("found_inf", &AdamStepArgs::found_inf)
      .def_readwrite("scale", &AdamStepArgs::scale)
      .def_readwrite("decay", &AdamStepArgs::decay)
      .def_readwrite("amsgrad", &AdamStepArgs::amsgrad)
      .def_readwrite("maximize", &AdamStepArgs::maximize);
  py::class_<SgdwStepArgs>(m, "SgdwStepArgs", "Pointers and hyperparameters of one SGDW call")
      .def(py::init<>())
      .def_readwrite("params", &SgdwStepArgs::params)
      .def_readwrite("grads", &SgdwStepArgs::grads)
      .def_readwrite("momentum_buffers", &SgdwStepArgs::momentum_buffers)
      .def_readwrite("masters", &SgdwStepArgs::masters)
      .def_readwrite("master", &SgdwStepArgs::master)
      .def_readwrite("rounding_ids", &SgdwStepArgs::rounding_ids)
      .def_readwrite("rounding_offsets", &SgdwStepArgs::rounding_offsets)
      .def_readwrite("rounding_seed", &SgdwStepArgs::rounding_seed)
      .def_readwrite("stochastic_rounding", &SgdwStepArgs::stochastic_rounding)
      .def_readwrite("steps", &SgdwStepArgs::steps)
      .def_readwrite("numels", &SgdwStepArgs::numels)
      .def_readwrite("dtype", &SgdwStepArgs::dtype)
      .def_readwrite("grad_dtype", &SgdwStepArgs::grad_dtype)
      .def_readwrite("state_dtype", &SgdwStepArgs::state_dtype)
      .def_readwrite("lr", &SgdwStepArgs::lr)
      .def_readwrite("momentum", &SgdwStepArgs::momentum)
      .def_readwrite("dampening", &SgdwStepArgs::dampening)
      .def_readwrite("weight_decay", &SgdwStepArgs::weight_decay)
      .def_readwrite("lr_max", &SgdwStepArgs::lr_max)
      .def_readwrite("grad_scale", &SgdwStepArgs::grad_scale)
      .def_readwrite("found_inf", &SgdwStepArgs::found_inf)
      .def_readwrite("scale", &SgdwStepArgs::scale)
      .def_readwrite("momentum_mode", &SgdwStepArgs::momentum_mode)
      .def_readwrite("nesterov", &SgdwStepArgs::nesterov)
      .def_readwrite("maximize", &SgdwStepArgs::maximize);

  py::class_<AdagradStepArgs>(m, "AdagradStepArgs", "Pointers and hyperparameters of one Adagrad call")
      .def(py::init<>())
      .def_readwrite("params", &AdagradStepArgs::params)
      .def_readwrite("grads", &AdagradStepArgs::grads)
      .def_readwrite("sums", &AdagradStepArgs::sums)
      .def_readwrite("steps", &AdagradStepArgs::steps)
      .def_readwrite("numels", &AdagradStepArgs::numels)
      .def_readwrite("dtype", &AdagradStepArgs::dtype)
      .def_readwrite("grad_dtype", &AdagradStepArgs::grad_dtype)
      .def_readwrite("state_dtype", &AdagradStepArgs::state_dtype)
      .def_readwrite("lr", &AdagradStepArgs::lr)
      .def_readwrite("lr_decay", &AdagradStepArgs::lr_decay)
      .def_readwrite("eps", &AdagradStepArgs::eps)
      .def_readwrite("weight_decay", &AdagradStepArgs::weight_decay)
      .def_readwrite("maximize", &AdagradStepArgs::maximize);
  py::class_<RmspropStepArgs>(m, "RmspropStepArgs", "Pointers and hyperparameters of one RMSprop call")
      .def(py::init<>())
      .def_readwrite("params", &RmspropStepArgs::params)
      .def_readwrite("grads", &RmspropStepArgs::grads)
      .def_readwrite("square_avgs", &RmspropStepArgs::square_avgs)
      .def_readwrite("momentum_buffers", &RmspropStepArgs::momentum_buffers)
      .def_readwrite("grad_avgs", &RmspropStepArgs::grad_avgs)
      .def_readwrite("steps", &RmspropStepArgs::steps)
      .def_readwrite("numels", &RmspropStepArgs::numels)
      .def_readwrite("dtype", &RmspropStepArgs::dtype)
      .def_readwrite("grad_dtype", &RmspropStepArgs::grad_dtype)
      .def_readwrite("state_dtype", &RmspropStepArgs::state_dtype)
      .def_readwrite("lr", &RmspropStepArgs::lr)
      .def_readwrite("alpha", &RmspropStepArgs::alpha)
      .def_readwrite("eps", &RmspropStepArgs::eps)
      .def_readwrite("weight_decay", &RmspropStepArgs::weight_decay)
      .def_readwrite("momentum", &RmspropStepArgs::momentum)
      .def_readwrite("centered", &RmspropStepArgs::centered)
      .def_readwrite("maximize", &RmspropStepArgs::maximize);

  py::class_<fusedopt::TensorReads>(m, "TensorReads",
                                    "C-level reads of tensor facts (NOTE: [launch check])")
      .def(py::init<py::dict, py::object, py::dict>(), py::arg("descriptors"),
           py::arg("exchange_capsule"), py::arg("kernel_dtypes"))
      .def_property_readonly_static(
          "names", [](py::object) {
            std::vector<std::string> names(fusedopt::TensorReads::names(),
                                           fusedopt::TensorReads::names() +
                                               fusedopt::TensorReads::kNumAttributes);
            return names;
          },
          "The descriptor names the constructor takes.")
      .def_property_readonly("exchanges", &fusedopt::TensorReads::exchanges,
                             "Whether tensors are described through the DLPack C exchange API.");
  py::class_<fusedopt::LaunchCheck>(m, "LaunchCheck", with_gc<fusedopt::LaunchCheck>(),
                                    "The tensors of one kernel call, checked before each launch "
                                    "(NOTE: [launch check])")
      .def(py::init<py::object, py::list, py::list, py::tuple, py::list>(), py::arg("reads"),
           py::arg("params"), py::arg("state_dicts"), py::arg("state_keys"),
           py::arg("state_tensors"))
      .def_property_readonly("reads_exchange", &fusedopt::LaunchCheck::reads_exchange,
                             "Whether it reads tensors through the DLPack C exchange API.")
      .def_property_readonly("failure", &fusedopt::LaunchCheck::failure,
                             "Why the last verification answered no.")
      .def_property_readonly("scaler_refused", &fusedopt::LaunchCheck::scaler_refused,
                             "Whether the last verification refused GradScaler's tensors.");
  m.def("run_checked", &fusedopt::run_checked, py::arg("items"), py::arg("launched"),
        "Verifies every (check, args, params, grads, check_state_dicts, target, scaler) item, then "
        "appends True to `launched` and launches all with the GIL released; -1, or the index "
        "of the first item that failed (nothing launched). NOTE: [launch check].");

  py::module_ cpu = m.def_submodule("cpu", "C++ CPU kernels");
  cpu.def("adam_step", &fusedopt::cpu::adam_step, py::arg("args"), py::arg("num_threads"),
          py::call_guard<py::gil_scoped_release>(),
          "One Adam/AdamW step over host tensors given by address: increments each fp32 step "
          "counter in `args.steps`, then updates params and states in place. Unchecked beyond "
          "null and misaligned addresses: the optimizers launch through run_checked.");
  cpu.def("sgdw_step", &fusedopt::cpu::sgdw_step, py::arg("args"), py::arg("num_threads"),
          py::call_guard<py::gil_scoped_release>(),
          "One SGDW step over host tensors given by address, in place. Unchecked beyond null "
          "and misaligned addresses: the optimizers launch through run_checked.");
  cpu.def("adagrad_step", &fusedopt::cpu::adagrad_step, py::arg("args"), py::arg("num_threads"),
          py::call_guard<py::gil_scoped_release>(),
          "One Adagrad step over host tensors given by address: increments each fp32 step "
          "counter in `args.steps`, then updates params and sums in place. Unchecked beyond "
          "null and misaligned addresses: the optimizers launch through run_checked.");
  cpu.def("rmsprop_step", &fusedopt::cpu::rmsprop_step, py::arg("args"), py::arg("num_threads"),
          py::call_guard<py::gil_scoped_release>(),
          "One RMSprop step over host tensors given by address: increments each fp32 step "
          "counter in `args.steps`, then updates params and states in place. Unchecked beyond "
          "null and misaligned addresses: the optimizers launch through run_checked.");
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
  cuda.def("adagrad_step", &fusedopt::cuda::adagrad_step, py::arg("args"), py::arg("device"),
           py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
           "One Adagrad step over device tensors given by address, launched on `stream`; step "
           "counters stay on the host.");
  cuda.def("rmsprop_step", &fusedopt::cuda::rmsprop_step, py::arg("args"), py::arg("device"),
           py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
           "One RMSprop step over device tensors given by address, launched on `stream`; step "
           "counters stay on the host.");
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
