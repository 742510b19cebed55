// NOTE: [launch check]
// fusedopt's kernels write through raw addresses (docs/DESIGN.md, "Memory safety"),
// so the last thing before every launch, in the same C++ call and with the GIL held
// until the kernel starts, is this check. Python has validated every tensor and named
// any problem before; this check is what makes that validation still true when the
// kernel runs, whatever Python code ran in between (a hyperparameter's `__float__`, a
// hook, a torch function mode, another thread between two bytecodes):
//   * every param and state tensor is the object planned, at its planned address,
//     with its planned device, dtype, shape and strides, dense, aligned, not lazily
//     negated or conjugated, and inside its storage, which the check holds, so the
//     memory stays alive even if another thread replaces `p.data` mid-kernel;
//   * every grad is plain memory laid out like its param, inside its storage; the
//     grads and their storages are held until the kernels return;
//   * the call's pointer lists and element counts are exactly these tensors'.
// Facts are read through torch's C-level descriptors (TensorReads), the caller
// disables `__torch_function__` around the call, and the cyclic garbage collector is
// paused while it runs (GcPause): a collection triggered by one of its allocations
// would run finalizers, and with them Python code and other threads, between two
// reads. So no Python runs inside it, and no other thread.
// What is not defended: `resize_()` or `set_()` on a tensor's storage by another
// thread while its kernel runs, which frees memory under any kernel (torch's too).
//
// The same check serves the cached plans of the steady path (SteadyPlan in
// fusedopt/_optimizer.py): once a group's state exists, its params and state
// tensors do not change from step to step, only the grads do, so a check built once
// answers each step whether the kept call arguments still hold; on no, the full
// Python planning runs and names the problem. With thousands of tensors these reads
// are most of a step's host time. Where torch offers the DLPack C exchange API
// (dlpack_exchange.h), one C call describes a tensor; older torch takes one attribute
// read per fact, about 1.8 times the host time (benchmarks/NOTES.md, v2.1).
//
// The pass is bound by the memory system, not by its own instructions: torch puts
// each tensor's TensorImpl and StorageImpl next to its buffer on the heap, so with
// state made one tensor at a time 2,000 params spread over about 8,000 distinct 4 KiB
// pages, more than the TLB holds. fusedopt makes a group's state tensors all empty
// before giving any its memory (fusedopt/_optimizer.py, tensors_like), which brings
// those pages down to about 4,500. Software prefetching measured no gain and is not
// done; the check's own expectations sit in flat arrays (benchmarks/NOTES.md, v2.3
// and v2.4).
#include "launch_check.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <variant>

#include "cpu/driver.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/step_args.h"
#include "fusedopt/step_count.h"
#if defined(FUSEDOPT_WITH_CUDA)
#include "cuda/driver.h"
#endif

namespace fusedopt {
namespace {

// Pauses the cyclic garbage collector for a scope (see NOTE: [launch check]).
class GcPause {
 public:
  GcPause() {
#if PY_VERSION_HEX >= 0x030A0000
    was_enabled_ = PyGC_Disable() == 1;
#else
    const py::module_ gc = py::module_::import("gc");
    was_enabled_ = gc.attr("isenabled")().cast<bool>();
    gc.attr("disable")();
#endif
  }
  ~GcPause() {
    if (!was_enabled_) return;
#if PY_VERSION_HEX >= 0x030A0000
    PyGC_Enable();
#else
    py::module_::import("gc").attr("enable")();
#endif
  }
  GcPause(const GcPause&) = delete;
  GcPause& operator=(const GcPause&) = delete;

 private:
  bool was_enabled_ = false;
};

// A new reference that is released at the end of the scope.
struct Owned {
  PyObject* object;
  explicit Owned(PyObject* o) : object(o) {}
  ~Owned() { Py_XDECREF(object); }
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
};

constexpr int32_t kDLCpu = 1;
constexpr int32_t kDLCuda = 2;
constexpr int32_t kOtherDevice = -1;  // attribute reads of a device that is neither
constexpr uint8_t kDLInt = 0;
constexpr uint8_t kDLFloat = 2;
constexpr uint8_t kDLBfloat = 4;
constexpr uint8_t kDLComplex = 5;

// The capsule's describe function if it is a DLPack 1.x exchange table (1.3 is the
// first that comes as a capsule) that has one; null otherwise.
dlpack::DescribeFunction describe_function(PyObject* capsule) {
  if (!PyCapsule_IsValid(capsule, dlpack::kExchangeCapsuleName)) return nullptr;
  const auto* api = static_cast<const dlpack::ExchangeApi*>(
      PyCapsule_GetPointer(capsule, dlpack::kExchangeCapsuleName));
  if (api == nullptr || api->header.version.major != dlpack::kMajorVersion ||
      api->header.version.minor < dlpack::kFirstMinorWithCapsule) {
    return nullptr;
  }
  return api->dltensor_from_py_object_no_sync;
}

// A Python int as an integer; false with no error left where it is none.
bool as_int64(PyObject* object, int64_t* value) {
  if (object == nullptr || !PyLong_Check(object)) {
    PyErr_Clear();
    return false;
  }
  *value = PyLong_AsLongLong(object);
  if (PyErr_Occurred() != nullptr) {
    PyErr_Clear();
    return false;
  }
  return true;
}

bool as_address(PyObject* object, uintptr_t* value) {
  int64_t signed_value = 0;
  if (!as_int64(object, &signed_value)) return false;
  *value = static_cast<uintptr_t>(signed_value);
  return true;
}

// Fills numel, extent and density from dims (ndim sizes, then ndim strides).
void measure(const int64_t* dims, size_t ndim, Layout* layout) {
  int64_t numel = 1;
  int64_t last = 0;
  for (size_t d = 0; d < ndim; ++d) {
    numel *= dims[d];
    if (dims[d] > 1) last += (dims[d] - 1) * dims[ndim + d];
  }
  layout->numel = numel;
  if (numel == 0) {
    layout->extent = 0;
    layout->dense = true;
    return;
  }
  layout->extent = last + 1;
  // Dense: the dims of size > 1, ordered by stride, are a row-major tensor's.
  std::pair<int64_t, int64_t> by_stride[64];
  size_t count = 0;
  for (size_t d = 0; d < ndim; ++d) {
    if (dims[d] == 1) continue;
    if (count == 64 || dims[ndim + d] <= 0) {
      layout->dense = false;
      return;
    }
    by_stride[count++] = {dims[ndim + d], dims[d]};
  }
  std::sort(by_stride, by_stride + count);
  int64_t expected = 1;
  for (size_t c = 0; c < count; ++c) {
    if (by_stride[c].first != expected) {
      layout->dense = false;
      return;
    }
    expected *= by_stride[c].second;
  }
  layout->dense = true;
}

// Whether the float32 step counter at host `address` is a whole number >= 0: one set
// in place to anything else (say -1, a bias correction of zero) sends the step to the
// full planning, which refuses it and names the param. Counters in device memory are
// checked by the kernels that read them (NOTE: [device step counters]).
bool holds_step_count(uintptr_t address) {
  float step;
  std::memcpy(&step, reinterpret_cast<const void*>(address), sizeof(step));
  return is_step_count(step);
}

// Adam's and SGDW's counters live on their params' device (the CUDA kernels read and
// advance them there); Adagrad's and RMSprop's in host memory, for every device.
template <typename Args>
constexpr bool counts_on_params_device() {
  return std::is_same_v<Args, AdamStepArgs> || std::is_same_v<Args, SgdwStepArgs>;
}

// The state pointer lists of a call, in the order of its state keys, with the
// ScalarType code each list's tensors must have (-1: the step counters, checked apart).
struct StateLists {
  std::vector<uintptr_t>* lists[5];
  int dtypes[5];
  size_t count = 0;

  void add(std::vector<uintptr_t>* list, int dtype) {
    lists[count] = list;
    dtypes[count++] = dtype;
  }
};

// The master list's storage (NOTE: [master weights] in dtypes.h).
int master_dtype(MasterWeights master) {
  return static_cast<int>(master == MasterWeights::kRemainder ? ScalarType::kInt16
                                                              : ScalarType::kFloat32);
}

// Whether a kernel serves the call's storage types (NOTE: [precision]). Planning never
// asks for another, but a group changed while it was planned (a hyperparameter's
// `__float__`, another thread) could: that call is refused here, before anything is
// launched, not when its kernel is chosen after other calls have run.
template <typename Args>
bool has_kernel(const Args& args) {
  MasterWeights master = MasterWeights::kNone;
  bool stochastic_rounding = false;
  if constexpr (std::is_same_v<Args, AdamStepArgs> || std::is_same_v<Args, SgdwStepArgs>) {
    master = args.master;
    stochastic_rounding = args.stochastic_rounding;
  }
  try {
    with_precision(args.dtype, args.grad_dtype, args.state_dtype, master, stochastic_rounding,
                   [](auto...) { return 0; });
    return true;
  } catch (const std::invalid_argument&) {
    return false;
  }
}

StateLists state_lists_of(AdamStepArgs& args) {
  StateLists out;
  const int state = static_cast<int>(args.state_dtype);
  out.add(&args.exp_avgs, state);
  out.add(&args.exp_avg_sqs, state);
  if (args.amsgrad) out.add(&args.max_exp_avg_sqs, state);
  if (args.master != MasterWeights::kNone) out.add(&args.masters, master_dtype(args.master));
  out.add(&args.steps, -1);
  return out;
}

StateLists state_lists_of(SgdwStepArgs& args) {
  StateLists out;
  if (args.momentum_mode != Momentum::kNone) {
    out.add(&args.momentum_buffers, static_cast<int>(args.state_dtype));
  }
  if (args.master != MasterWeights::kNone) out.add(&args.masters, master_dtype(args.master));
  if (args.stochastic_rounding) out.add(&args.steps, -1);
  return out;
}

StateLists state_lists_of(AdagradStepArgs& args) {
  StateLists out;
  out.add(&args.sums, static_cast<int>(args.state_dtype));
  out.add(&args.steps, -1);
  return out;
}

StateLists state_lists_of(RmspropStepArgs& args) {
  StateLists out;
  const int state = static_cast<int>(args.state_dtype);
  out.add(&args.square_avgs, state);
  if (args.has_momentum_buffer()) out.add(&args.momentum_buffers, state);
  if (args.centered) out.add(&args.grad_avgs, state);
  out.add(&args.steps, -1);
  return out;
}

}  // namespace

// -- TensorReads ---------------------------------------------------------------

TensorReads::TensorReads(py::dict descriptors, py::object exchange_capsule, py::dict kernel_dtypes)
    : exchange_capsule_(exchange_capsule) {
  py::list ordered;
  for (int a = 0; a < kNumAttributes; ++a) {
    const py::object descriptor = descriptors[names()[a]];
    const bool getter = a == kGrad || a == kDtype || a == kShape || a == kDevice;
    const bool usable = getter ? Py_TYPE(descriptor.ptr())->tp_descr_get != nullptr
                               : PyVectorcall_Function(descriptor.ptr()) != nullptr;
    if (!usable) throw std::invalid_argument(std::string("TensorReads: unusable ") + names()[a]);
    ordered.append(descriptor);
  }
  descriptors_ = py::tuple(ordered);
  describe_ = describe_function(exchange_capsule.ptr());
  for (const auto& item : kernel_dtypes) {
    kernel_dtypes_.emplace_back(item.first.ptr(), item.second.cast<int>());
  }
  float32_ = py::module_::import("torch").attr("float32").ptr();
}

int TensorReads::kernel_dtype(const Layout& layout) const {
  if (exchanges()) {
    const dlpack::DataType& t = layout.dtype;
    if (t.lanes != 1) return -1;
    if ((t.code == kDLFloat && t.bits == 32) || (t.code == kDLComplex && t.bits == 64)) {
      return static_cast<int>(ScalarType::kFloat32);
    }
    if (t.code == kDLBfloat && t.bits == 16) return static_cast<int>(ScalarType::kBFloat16);
    if (t.code == kDLFloat && t.bits == 16) return static_cast<int>(ScalarType::kFloat16);
    if (t.code == kDLInt && t.bits == 16) return static_cast<int>(ScalarType::kInt16);
    return -1;
  }
  for (const auto& [dtype, code] : kernel_dtypes_) {
    if (dtype == layout.dtype_object) return code;
  }
  return -1;
}

bool TensorReads::is_float32(const Layout& layout) const {
  if (exchanges()) {
    return layout.dtype.code == kDLFloat && layout.dtype.bits == 32 && layout.dtype.lanes == 1;
  }
  return layout.dtype_object == float32_;
}

const char* const* TensorReads::names() {
  static const char* const names[kNumAttributes] = {
      "grad", "dtype", "shape", "device", "data_ptr", "stride", "is_neg", "is_conj",
      "untyped_storage", "storage_data_ptr", "storage_nbytes"};
  return names;
}

bool TensorReads::describe(PyObject* tensor, dlpack::Tensor* out) const {
  if (describe_ == nullptr) return false;
  if (describe_(tensor, out) != 0) {
    PyErr_Clear();
    return false;
  }
  return true;
}

PyObject* TensorReads::get(PyObject* object, Attribute attribute) const {
  PyObject* const descriptor = PyTuple_GET_ITEM(descriptors_.ptr(), attribute);
  return Py_TYPE(descriptor)->tp_descr_get(descriptor, object,
                                           reinterpret_cast<PyObject*>(Py_TYPE(object)));
}

PyObject* TensorReads::call(PyObject* object, Attribute method) const {
  PyObject* const arguments[1] = {object};
  return PyObject_Vectorcall(PyTuple_GET_ITEM(descriptors_.ptr(), method), arguments, 1, nullptr);
}

// -- LaunchCheck ------------------------------------------------------------------

LaunchCheck::LaunchCheck(py::object reads, py::list params, py::list state_dicts,
                         py::tuple state_keys, py::list state_tensors)
    : reads_owner_(reads), reads_(reads.cast<const TensorReads*>()), state_keys_(state_keys) {
  const GcPause pause;
  num_params_ = params.size();
  const size_t num_keys = state_keys_.size();
  if (state_dicts.size() != num_params_ || state_tensors.size() != num_params_) {
    throw std::invalid_argument("LaunchCheck: params, state_dicts and state_tensors differ in length");
  }
  for (size_t k = 0; k < num_keys; ++k) {
    if (state_keys_[k].cast<std::string>() == "step") step_key_ = static_cast<Py_ssize_t>(k);
  }
  planned_.reserve(num_params_ * (1 + num_keys));
  owned_.reserve(num_params_ * (2 + 2 * num_keys));
  for (size_t i = 0; i < num_params_; ++i) {
    const py::handle param = params[i];
    owned_.push_back(py::reinterpret_borrow<py::object>(param));
    owned_.push_back(py::reinterpret_borrow<py::object>(state_dicts[i]));
    state_dicts_.push_back(state_dicts[i].ptr());
    planned_.push_back(record(param.ptr(), TensorName{i, TensorName::kParam}));
    const py::tuple tensors = state_tensors[i].cast<py::tuple>();
    if (tensors.size() != num_keys) {
      throw std::invalid_argument("LaunchCheck: one state tensor per state key expected");
    }
    for (size_t k = 0; k < num_keys; ++k) {
      const TensorName name{i, static_cast<Py_ssize_t>(k)};
      owned_.push_back(py::reinterpret_borrow<py::object>(tensors[k]));
      Planned state = record(tensors[k].ptr(), name);
      const Planned& of_param = planned_[i * (1 + num_keys)];
      // record() left the state tensor's dims in scratch_.
      const bool laid_out_like_param =
          static_cast<Py_ssize_t>(k) == step_key_
              ? state.layout.numel == 1 && reads_->is_float32(state.layout) &&
                    (state.layout.device.device_type == kDLCpu ||
                     same_device(state.layout, of_param.layout))
              : same_layout_as(of_param, state.layout, /*any_kernel_dtype=*/true);
      if (!laid_out_like_param) {
        throw py::value_error(describe(name) + (static_cast<Py_ssize_t>(k) == step_key_
                                                    ? " is not a one-element float32 tensor on "
                                                      "the host or its param's device"
                                                    : " is not laid out like its param"));
      }
      planned_.push_back(state);
    }
  }
}

std::string LaunchCheck::describe(const TensorName& name) const {
  const std::string param = "param " + std::to_string(name.index) + " of this call";
  if (name.key == TensorName::kParam) return param;
  if (name.key == TensorName::kGrad) return "the grad of " + param;
  return "state '" + py::str(PyTuple_GET_ITEM(state_keys_.ptr(), name.key)).cast<std::string>() +
         "' of " + param;
}

bool LaunchCheck::fail(const TensorName& name, const char* why) { return fail(describe(name) + why); }

PyObject* LaunchCheck::state_entry(PyObject* dict, Py_ssize_t k) const {
  if (!PyDict_Check(dict)) return nullptr;
  PyObject* const wanted = PyTuple_GET_ITEM(state_keys_.ptr(), k);
  Py_ssize_t position = 0;
  PyObject* key = nullptr;
  PyObject* value = nullptr;
  while (PyDict_Next(dict, &position, &key, &value)) {
    // Exact str keys compare in C; any other key is not a state key.
    if (key == wanted || (PyUnicode_CheckExact(key) && PyUnicode_Compare(key, wanted) == 0)) {
      return value;
    }
  }
  return nullptr;
}

bool LaunchCheck::fail(const std::string& why) {
  failure_ = why;
  return false;
}

bool LaunchCheck::read_layout(PyObject* tensor, Layout* layout, const TensorName& name) {
  using R = TensorReads;
  scratch_.clear();
  if (reads_->exchanges()) {
    dlpack::Tensor described{};
    if (!reads_->describe(tensor, &described)) return fail(name, " has no strided description");
    layout->address = reinterpret_cast<uintptr_t>(described.data) + described.byte_offset;
    layout->device = described.device;
    layout->dtype = described.dtype;
    layout->is_complex = described.dtype.code == kDLComplex;
    layout->element_bytes = (static_cast<int64_t>(described.dtype.bits) * described.dtype.lanes) / 8;
    const int32_t ndim = described.ndim;
    scratch_.assign(described.shape, described.shape + ndim);
    if (described.strides != nullptr) {
      scratch_.insert(scratch_.end(), described.strides, described.strides + ndim);
    } else {  // DLPack's compact row-major
      scratch_.resize(2 * static_cast<size_t>(ndim));
      int64_t stride = 1;
      for (int32_t d = ndim - 1; d >= 0; --d) {
        scratch_[static_cast<size_t>(ndim + d)] = stride;
        stride *= described.shape[d];
      }
    }
  } else {
    const Owned device(reads_->get(tensor, R::kDevice));
    const Owned device_type(device.object ? PyObject_GetAttrString(device.object, "type") : nullptr);
    const Owned device_index(device.object ? PyObject_GetAttrString(device.object, "index") : nullptr);
    int64_t index = 0;
    if (device_type.object == nullptr || !PyUnicode_Check(device_type.object) ||
        device_index.object == nullptr ||
        (device_index.object != Py_None && !as_int64(device_index.object, &index))) {
      PyErr_Clear();
      return fail(name, " has no device");
    }
    layout->device.device_type = PyUnicode_CompareWithASCIIString(device_type.object, "cpu") == 0
                                     ? kDLCpu
                                     : PyUnicode_CompareWithASCIIString(device_type.object, "cuda") == 0
                                           ? kDLCuda
                                           : kOtherDevice;
    layout->device.device_id = static_cast<int32_t>(index);
    const Owned address(reads_->call(tensor, R::kDataPtr));
    const Owned dtype(reads_->get(tensor, R::kDtype));
    const Owned shape(reads_->get(tensor, R::kShape));
    const Owned strides(reads_->call(tensor, R::kStride));
    if (!as_address(address.object, &layout->address) || dtype.object == nullptr ||
        shape.object == nullptr || !PyTuple_Check(shape.object) || strides.object == nullptr ||
        !PyTuple_Check(strides.object) ||
        PyTuple_GET_SIZE(shape.object) != PyTuple_GET_SIZE(strides.object)) {
      PyErr_Clear();
      return fail(name, " has no strided description");
    }
    layout->dtype_object = dtype.object;  // torch's dtype objects live as long as torch
    const Py_ssize_t ndim = PyTuple_GET_SIZE(shape.object);
    scratch_.resize(2 * static_cast<size_t>(ndim));
    for (Py_ssize_t d = 0; d < ndim; ++d) {
      if (!as_int64(PyTuple_GET_ITEM(shape.object, d), &scratch_[static_cast<size_t>(d)]) ||
          !as_int64(PyTuple_GET_ITEM(strides.object, d), &scratch_[static_cast<size_t>(ndim + d)])) {
        return fail(name, " has no strided description");
      }
    }
    const Owned itemsize(PyObject_GetAttrString(dtype.object, "itemsize"));
    const Owned is_complex(PyObject_GetAttrString(dtype.object, "is_complex"));
    if (!as_int64(itemsize.object, &layout->element_bytes) || is_complex.object == nullptr) {
      PyErr_Clear();
      return fail(name, " has a dtype without itemsize");
    }
    layout->is_complex = is_complex.object == Py_True;
  }
  measure(scratch_.data(), scratch_.size() / 2, layout);
  return true;
}

const char* LaunchCheck::memory_problem(PyObject* tensor, const Layout& layout) {
  using R = TensorReads;
  if (!layout.dense) return " overlaps itself or has gaps in memory";
  if (layout.numel > 0) {
    if (layout.address == 0) return " has no memory (a null data pointer)";
    const int64_t alignment = layout.is_complex ? layout.element_bytes / 2 : layout.element_bytes;
    if (alignment <= 0 || layout.address % static_cast<uintptr_t>(alignment) != 0) {
      return " is not aligned for its dtype";
    }
  }
  const Owned negative(reads_->call(tensor, R::kIsNeg));
  if (negative.object != Py_False) {
    PyErr_Clear();
    return " is a lazily negated view";
  }
  if (layout.is_complex) {
    const Owned conjugate(reads_->call(tensor, R::kIsConj));
    if (conjugate.object != Py_False) {
      PyErr_Clear();
      return " is a lazily conjugated view";
    }
  }
  return nullptr;
}

bool LaunchCheck::storage_covers(PyObject* storage, const Layout& layout, uintptr_t* base,
                                 uint64_t* needed) {
  using R = TensorReads;
  const Owned storage_address(reads_->call(storage, R::kStorageDataPtr));
  const Owned storage_bytes(reads_->call(storage, R::kStorageNbytes));
  int64_t nbytes = 0;
  if (!as_address(storage_address.object, base) || !as_int64(storage_bytes.object, &nbytes)) {
    return false;
  }
  if (layout.numel == 0) {
    *needed = 0;
    return true;
  }
  if (layout.address < *base) return false;
  *needed = static_cast<uint64_t>(layout.address - *base) +
            static_cast<uint64_t>(layout.extent) * static_cast<uint64_t>(layout.element_bytes);
  return nbytes >= 0 && static_cast<uint64_t>(nbytes) >= *needed;
}

LaunchCheck::Planned LaunchCheck::record(PyObject* tensor, const TensorName& name) {
  Planned planned;
  planned.object = tensor;
  if (!read_layout(tensor, &planned.layout, name)) throw py::value_error(failure_);
  if (const char* problem = memory_problem(tensor, planned.layout)) {
    throw py::value_error(describe(name) + problem);
  }
  planned.dims_at = dims_.size();
  planned.num_dims = scratch_.size();
  dims_.insert(dims_.end(), scratch_.begin(), scratch_.end());
  PyObject* storage = reads_->call(tensor, TensorReads::kUntypedStorage);
  if (storage == nullptr) {
    PyErr_Clear();
    throw py::value_error(describe(name) + " has no storage");
  }
  owned_.push_back(py::reinterpret_steal<py::object>(storage));
  planned.storage = storage;
  if (!storage_covers(storage, planned.layout, &planned.storage_base,
                      &planned.storage_bytes_needed)) {
    throw py::value_error(describe(name) + " reaches beyond the end of its storage");
  }
  planned.kernel_numel = planned.layout.numel * (planned.layout.is_complex ? 2 : 1);
  planned.kernel_dtype = reads_->kernel_dtype(planned.layout);
  return planned;
}

bool LaunchCheck::same_layout_as(const Planned& planned, const Layout& layout,
                                 bool any_kernel_dtype) const {
  const Layout& expected = planned.layout;
  if (layout.device.device_type != expected.device.device_type ||
      layout.device.device_id != expected.device.device_id) {
    return false;
  }
  if (any_kernel_dtype) {
    if (layout.is_complex != expected.is_complex || reads_->kernel_dtype(layout) < 0) return false;
  } else if (reads_->exchanges()) {
    if (layout.dtype.code != expected.dtype.code || layout.dtype.bits != expected.dtype.bits ||
        layout.dtype.lanes != expected.dtype.lanes) {
      return false;
    }
  } else if (layout.dtype_object != expected.dtype_object) {
    return false;
  }
  // Shapes equal, and, for tensors with elements, strides equal wherever a dim has
  // more than one element (an empty tensor's strides say nothing about memory).
  if (scratch_.size() != planned.num_dims) return false;
  const size_t ndim = planned.num_dims / 2;
  const int64_t* dims = dims_.data() + planned.dims_at;
  for (size_t d = 0; d < ndim; ++d) {
    if (scratch_[d] != dims[d]) return false;
  }
  if (expected.numel == 0) return true;
  for (size_t d = 0; d < ndim; ++d) {
    if (scratch_[d] > 1 && scratch_[ndim + d] != dims[ndim + d]) return false;
  }
  return true;
}

bool LaunchCheck::matches(const Planned& planned, PyObject* tensor, const TensorName& name) {
  Layout now;
  if (!read_layout(tensor, &now, name)) return false;
  if (now.address != planned.layout.address || !same_layout_as(planned, now, false)) {
    return fail(name, " is no longer at its planned address with its planned layout");
  }
  if (const char* problem = memory_problem(tensor, now)) return fail(name, problem);
  uintptr_t base = 0;
  uint64_t needed = 0;
  if (!storage_covers(planned.storage, now, &base, &needed) || base != planned.storage_base) {
    return fail(name, "'s storage was resized or moved");
  }
  return true;
}

bool LaunchCheck::same_device(const Layout& a, const Layout& b) {
  return a.device.device_type == b.device.device_type && a.device.device_id == b.device.device_id;
}

bool LaunchCheck::verify_scalar(PyObject* tensor, const char* name, uintptr_t* address,
                                std::vector<py::object>* alive) {
  const std::string what = std::string("GradScaler's ") + name;
  Layout layout;
  if (!read_layout(tensor, &layout, TensorName{0, TensorName::kParam})) {
    return fail(what + " has no strided description");
  }
  if (layout.numel != 1 || !reads_->is_float32(layout)) return fail(what + " is not a one-element float32 tensor");
  if (planned_.empty() || !same_device(layout, planned_.front().layout)) {
    return fail(what + " is not on the params' device");
  }
  if (const char* problem = memory_problem(tensor, layout)) return fail(what + problem);
  PyObject* storage = reads_->call(tensor, TensorReads::kUntypedStorage);
  if (storage == nullptr) {
    PyErr_Clear();
    return fail(what + " has no storage");
  }
  alive->push_back(py::reinterpret_borrow<py::object>(tensor));
  alive->push_back(py::reinterpret_steal<py::object>(storage));
  uintptr_t base = 0;
  uint64_t needed = 0;
  if (!storage_covers(storage, layout, &base, &needed)) return fail(what + " reaches beyond the end of its storage");
  for (const Planned& planned : planned_) {
    const Layout& other = planned.layout;
    const uintptr_t end = other.address + static_cast<uintptr_t>(other.extent * other.element_bytes);
    if (other.numel > 0 && layout.address < end && other.address < layout.address + sizeof(float)) {
      return fail(what + " shares memory with a tensor the step writes");
    }
  }
  *address = layout.address;
  return true;
}

template <typename Args>
bool LaunchCheck::verify_scaler(Args& args, PyObject* scaler, std::vector<py::object>* alive) {
  scaler_refused_ = scaler != Py_None;  // until verified
  if constexpr (counts_on_params_device<Args>()) {
    args.found_inf = 0;
    args.scale = 0;
    if (scaler == Py_None) return true;
    if (!PyTuple_Check(scaler) || PyTuple_GET_SIZE(scaler) != 2) {
      return fail("GradScaler's tensors are a (found_inf, scale) pair");
    }
    PyObject* const found_inf = PyTuple_GET_ITEM(scaler, 0);
    PyObject* const scale = PyTuple_GET_ITEM(scaler, 1);
    scaler_refused_ =
        !((found_inf == Py_None || verify_scalar(found_inf, "found_inf", &args.found_inf, alive)) &&
          (scale == Py_None || verify_scalar(scale, "scale", &args.scale, alive)));
    return !scaler_refused_;
  } else {
    return scaler == Py_None || fail("only Adam and SGDW take GradScaler's tensors");
  }
}

bool LaunchCheck::verify_grad(const Planned& param, PyObject* grad, size_t index, int grad_dtype,
                              uintptr_t* address, std::vector<py::object>* alive) {
  const TensorName name{index, TensorName::kGrad};
  Layout layout;
  if (!read_layout(grad, &layout, name)) return false;
  if (!same_layout_as(param, layout, /*any_kernel_dtype=*/true)) {
    return fail(name, " is not laid out like its param");
  }
  if (reads_->kernel_dtype(layout) != grad_dtype) return fail(name, " is not of the call's grad dtype");
  if (const char* problem = memory_problem(grad, layout)) return fail(name, problem);
  PyObject* storage = reads_->call(grad, TensorReads::kUntypedStorage);
  if (storage == nullptr) {
    PyErr_Clear();
    return fail(name, " has no storage");
  }
  alive->push_back(py::reinterpret_steal<py::object>(storage));
  uintptr_t base = 0;
  uint64_t needed = 0;
  if (!storage_covers(storage, layout, &base, &needed)) {
    return fail(name, " reaches beyond the end of its storage");
  }
  *address = layout.address;
  return true;
}

template <typename Args>
bool LaunchCheck::verify(Args& args, PyObject* params, PyObject* grads, bool check_state_dicts,
                         std::vector<py::object>* alive) {
  failure_.clear();
  scaler_refused_ = false;
  const size_t n = num_params_;
  const size_t num_keys = static_cast<size_t>(PyTuple_GET_SIZE(state_keys_.ptr()));
  if (!PyList_Check(params) || static_cast<size_t>(PyList_GET_SIZE(params)) != n) {
    return fail("the param list changed length");
  }
  if (grads != Py_None && (!PyList_Check(grads) || static_cast<size_t>(PyList_GET_SIZE(grads)) != n)) {
    return fail("one grad per param expected");
  }
  const StateLists lists = state_lists_of(args);
  if (args.params.size() != n || args.numels.size() != n || lists.count != num_keys) {
    return fail("the call's lists do not match its tensors");
  }
  for (size_t k = 0; k < num_keys; ++k) {
    if (lists.lists[k]->size() != n) return fail("the call's lists do not match its tensors");
  }
  if (!has_kernel(args)) return fail("no kernel serves the call's storage types");
  args.grads.resize(n);
  alive->reserve(alive->size() + 2 * n);
  for (size_t i = 0; i < n; ++i) {
    const Planned* const of_param = planned_.data() + i * (1 + num_keys);
    PyObject* const param = PyList_GET_ITEM(params, static_cast<Py_ssize_t>(i));
    const TensorName param_name{i, TensorName::kParam};
    if (param != of_param->object) return fail(param_name, " is not the planned param");
    // Cheap comparisons first: most steps find everything as planned.
    if (args.params[i] != of_param->layout.address || args.numels[i] != of_param->kernel_numel ||
        static_cast<int>(args.dtype) != of_param->kernel_dtype) {
      return fail("the call's arguments for " + describe(param_name) + " do not describe it");
    }
    for (size_t k = 0; k < num_keys; ++k) {
      const Planned& state = of_param[1 + k];
      const TensorName state_name{i, static_cast<Py_ssize_t>(k)};
      if ((*lists.lists[k])[i] != state.layout.address ||
          (lists.dtypes[k] >= 0 && state.kernel_dtype != lists.dtypes[k])) {
        return fail("the call's arguments for " + describe(state_name) + " changed");
      }
      if (check_state_dicts &&
          state_entry(state_dicts_[i], static_cast<Py_ssize_t>(k)) != state.object) {
        return fail(state_name, " was replaced");
      }
      if (!matches(state, state.object, state_name)) return false;
      if (static_cast<Py_ssize_t>(k) == step_key_) {
        const bool on_host = state.layout.device.device_type == kDLCpu;
        if (counts_on_params_device<Args>() ? !same_device(state.layout, of_param->layout) : !on_host) {
          return fail(state_name, counts_on_params_device<Args>() ? " is not on its param's device"
                                                                  : " is not in host memory");
        }
        if (on_host && state.layout.numel == 1 && !holds_step_count(state.layout.address)) {
          return fail(state_name, " is not a whole number >= 0");
        }
      }
    }
    if (!matches(*of_param, param, param_name)) return false;
    PyObject* grad = nullptr;
    if (grads == Py_None) {
      grad = reads_->get(param, TensorReads::kGrad);
      if (grad == nullptr) PyErr_Clear();
    } else {
      grad = PyList_GET_ITEM(grads, static_cast<Py_ssize_t>(i));
      Py_INCREF(grad);
    }
    if (grad == nullptr || grad == Py_None) {
      Py_XDECREF(grad);
      return fail(param_name, " has no grad");
    }
    alive->push_back(py::reinterpret_steal<py::object>(grad));
    if (!verify_grad(*of_param, grad, i, static_cast<int>(args.grad_dtype), &args.grads[i], alive)) {
      return false;
    }
  }
  return true;
}

int LaunchCheck::traverse(visitproc visit, void* arg) const {
  for (const py::object& object : owned_) Py_VISIT(object.ptr());
  Py_VISIT(state_keys_.ptr());
  Py_VISIT(reads_owner_.ptr());
  return 0;
}

void LaunchCheck::clear() {
  planned_.clear();
  state_dicts_.clear();
  dims_.clear();
  num_params_ = 0;
  owned_.clear();
}

// -- run_checked ------------------------------------------------------------------

namespace {

struct Target {
  bool cuda = false;
  int num_threads = 1;
  int device = 0;
  uintptr_t stream = 0;
  py::object hook;  // tests only: a Python launcher of host tensors (the emulated CUDA)
};

Target parse_target(py::handle target) {
  const py::tuple spec = target.cast<py::tuple>();
  const std::string kind = spec[0].cast<std::string>();
  Target out;
  if (kind == "cpu" && spec.size() == 2) {
    out.num_threads = spec[1].cast<int>();
    return out;
  }
  if (kind == "hook" && spec.size() == 2) {
    out.hook = py::reinterpret_borrow<py::object>(spec[1]);
    return out;
  }
  if (kind == "cuda" && spec.size() == 3) {
    out.cuda = true;
    out.device = spec[1].cast<int>();
    out.stream = spec[2].cast<uintptr_t>();
    return out;
  }
  throw std::invalid_argument("target must be ('cpu', num_threads) or ('cuda', device, stream)");
}

// Each optimizer's kernels: the name a test hook gets, the CPU and CUDA entry points.
template <typename Args>
struct Kernels;
#if defined(FUSEDOPT_WITH_CUDA)
#define FUSEDOPT_CUDA_ENTRY(name) static constexpr auto cuda_step = &cuda::name;
#else
#define FUSEDOPT_CUDA_ENTRY(name)
#endif
#define FUSEDOPT_KERNELS(Args, name)                   \
  template <>                                          \
  struct Kernels<Args> {                               \
    static constexpr const char* kName = #name;        \
    static constexpr auto cpu_step = &cpu::name;       \
    FUSEDOPT_CUDA_ENTRY(name)                          \
  };
FUSEDOPT_KERNELS(AdamStepArgs, adam_step)
FUSEDOPT_KERNELS(SgdwStepArgs, sgdw_step)
FUSEDOPT_KERNELS(AdagradStepArgs, adagrad_step)
FUSEDOPT_KERNELS(RmspropStepArgs, rmsprop_step)
#undef FUSEDOPT_KERNELS
#undef FUSEDOPT_CUDA_ENTRY

using StepArgs = std::variant<AdamStepArgs*, SgdwStepArgs*, AdagradStepArgs*, RmspropStepArgs*>;

StepArgs step_args_of(py::handle args) {
  if (py::isinstance<AdamStepArgs>(args)) return &args.cast<AdamStepArgs&>();
  if (py::isinstance<SgdwStepArgs>(args)) return &args.cast<SgdwStepArgs&>();
  if (py::isinstance<AdagradStepArgs>(args)) return &args.cast<AdagradStepArgs&>();
  if (py::isinstance<RmspropStepArgs>(args)) return &args.cast<RmspropStepArgs&>();
  throw std::invalid_argument("run_checked: an item's arguments are no step arguments");
}

template <typename Args>
void launch(const Args& args, const Target& target) {
  if (target.cuda) {
#if defined(FUSEDOPT_WITH_CUDA)
    Kernels<Args>::cuda_step(args, target.device, target.stream);
    return;
#else
    throw std::invalid_argument("this build has no CUDA kernels");
#endif
  }
  Kernels<Args>::cpu_step(args, target.num_threads);
}

}  // namespace

int run_checked(py::list items, py::list launched) {
  struct Ready {
    StepArgs args;
    Target target;
  };
  std::vector<Ready> ready;
  ready.reserve(items.size());
  std::vector<py::object> alive;  // grads and their storages, until the kernels return
  std::optional<GcPause> pause(std::in_place);
  for (size_t i = 0; i < items.size(); ++i) {
    const py::tuple item = items[i].cast<py::tuple>();
    if (item.size() != 7) throw std::invalid_argument("run_checked: items have seven fields");
    auto& check = item[0].cast<LaunchCheck&>();
    const bool check_state_dicts = item[4].cast<bool>();
    Ready entry{step_args_of(item[1]), parse_target(item[5])};
    const bool sound = std::visit(
        [&](auto* args) {
          return check.verify(*args, item[2].ptr(), item[3].ptr(), check_state_dicts, &alive) &&
                 check.verify_scaler(*args, item[6].ptr(), &alive);
        },
        entry.args);
    if (!sound) return static_cast<int>(i);
    // The target comes from Python's view of the device, which a subclass can bend.
    const dlpack::Device device = check.params_device();
    const bool on_target =
        device.device_type == LaunchCheck::kNoDevice ||
        (entry.target.cuda ? device.device_type == kDLCuda && device.device_id == entry.target.device
                           : device.device_type == kDLCpu);  // CPU kernels, or a hook's host launch
    if (!on_target) {
      throw std::invalid_argument("run_checked: a call's target is not its tensors' device");
    }
    if (!entry.target.cuda && !entry.target.hook && !item[6].is_none()) {
      throw std::invalid_argument("run_checked: GradScaler's tensors go to CUDA kernels only");
    }
    ready.push_back(entry);
  }
  launched.append(true);
  pause.reset();  // the kernels run without the GIL: no collection can interleave them
  // `items` (held by the caller) owns the checks and arguments; `alive` the grads.
  const bool hooked = std::any_of(ready.begin(), ready.end(),
                                  [](const Ready& entry) { return bool(entry.target.hook); });
  if (hooked) {
    // Tests route launches through Python (tests/emulated_cuda.py): the hook runs with
    // the GIL, right after the check, with nothing but the hook in between.
    for (const Ready& entry : ready) {
      if (!entry.target.hook) throw std::invalid_argument("run_checked: hook targets go alone");
      std::visit(
          [&](auto* args) {
            using Args = std::remove_pointer_t<decltype(args)>;
            entry.target.hook(Kernels<Args>::kName,
                              py::cast(args, py::return_value_policy::reference));
          },
          entry.args);
    }
    return -1;
  }
  py::gil_scoped_release release;
  for (const Ready& entry : ready) {
    std::visit([&](auto* args) { launch(*args, entry.target); }, entry.args);
  }
  return -1;
}

}  // namespace fusedopt
