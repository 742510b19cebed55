// The pybind11 module fusedopt._C: the only file that knows Python.
//
// It receives raw addresses and element counts that fusedopt/_backend.py has
// validated, converts them once, and releases the GIL while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/driver.h"
#include "cpu/parallel.h"
#include "dlpack_exchange.h"
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

// Attribute reads on tensors through the descriptors that torch.Tensor resolves them
// to, taken once from Python: for objects whose type is one of `exact_types`
// (torch.Tensor, nn.Parameter) this calls the same C getter or method that
// `getattr` would reach, without looking the name up through the type's MRO on every
// call. Objects of any other type (subclasses that may override) take the generic
// lookup.
class TensorAttributes {
 public:
  enum Attribute {
    kGrad, kDtype, kShape, kNdim, kNbytes, kDataPtr, kIsContiguous, kIsNeg, kIsConj,
    kNumAttributes
  };

  // `descriptors` maps each attribute name to what torch.Tensor resolves it to;
  // `exchange_capsule` is torch.Tensor's `__dlpack_c_exchange_api__`, or None.
  TensorAttributes(py::tuple exact_types, py::dict descriptors, py::object exchange_capsule)
      : exact_types_(exact_types), exchange_capsule_(exchange_capsule) {
    py::list ordered;
    for (int a = 0; a < kNumAttributes; ++a) {
      const py::object descriptor = descriptors[names()[a]];
      const bool method = a >= kDataPtr;
      const bool usable = method ? PyVectorcall_Function(descriptor.ptr()) != nullptr
                                 : Py_TYPE(descriptor.ptr())->tp_descr_get != nullptr;
      if (!usable) exact_types_ = py::tuple();  // unexpected descriptors: generic lookups only
      ordered.append(descriptor);
    }
    descriptors_ = py::tuple(ordered);
    describe_ = describe_function(exchange_capsule.ptr());
  }

  py::tuple exact_types() const { return exact_types_; }

  // Whether tensors of the exact types can be described in one C call (describe).
  bool exchanges() const { return describe_ != nullptr && PyTuple_GET_SIZE(exact_types_.ptr()) > 0; }

  int traverse(visitproc visit, void* arg) const {
    Py_VISIT(exact_types_.ptr());
    Py_VISIT(descriptors_.ptr());
    Py_VISIT(exchange_capsule_.ptr());
    return 0;
  }

  // Fills `out` with the tensor's address, device, dtype, shape and strides through
  // the DLPack exchange API. False, with no Python error left, for objects of other
  // types, without the API, or where the tensor has no such description (sparse).
  bool describe(PyObject* tensor, fusedopt::dlpack::Tensor* out) const {
    if (describe_ == nullptr || !is_exact(tensor)) return false;
    if (describe_(tensor, out) != 0) {
      PyErr_Clear();
      return false;
    }
    return true;
  }

  // A new reference, or null with a Python error set.
  PyObject* get(PyObject* tensor, Attribute attribute) const {
    if (!is_exact(tensor)) return PyObject_GetAttr(tensor, names()[attribute]);
    PyObject* const descriptor = PyTuple_GET_ITEM(descriptors_.ptr(), attribute);
    return Py_TYPE(descriptor)->tp_descr_get(descriptor, tensor,
                                             reinterpret_cast<PyObject*>(Py_TYPE(tensor)));
  }

  // The method's result for a call without arguments: a new reference, or null.
  PyObject* call(PyObject* tensor, Attribute method) const {
    if (!is_exact(tensor)) return PyObject_CallMethodNoArgs(tensor, names()[method]);
    PyObject* const arguments[1] = {tensor};
    return PyObject_Vectorcall(PyTuple_GET_ITEM(descriptors_.ptr(), method), arguments, 1, nullptr);
  }

 private:
  static PyObject* const* names() {
    static PyObject* const interned[kNumAttributes] = {
        PyUnicode_InternFromString("grad"), PyUnicode_InternFromString("dtype"),
        PyUnicode_InternFromString("shape"), PyUnicode_InternFromString("ndim"),
        PyUnicode_InternFromString("nbytes"), PyUnicode_InternFromString("data_ptr"),
        PyUnicode_InternFromString("is_contiguous"), PyUnicode_InternFromString("is_neg"),
        PyUnicode_InternFromString("is_conj")};
    return interned;
  }

  // The capsule's describe function if it is a DLPack 1.x exchange table (1.3 is
  // the first that comes as a capsule) that has one; null otherwise.
  static fusedopt::dlpack::DescribeFunction describe_function(PyObject* capsule) {
    namespace dl = fusedopt::dlpack;
    if (!PyCapsule_IsValid(capsule, dl::kExchangeCapsuleName)) return nullptr;
    const auto* api =
        static_cast<const dl::ExchangeApi*>(PyCapsule_GetPointer(capsule, dl::kExchangeCapsuleName));
    if (api == nullptr || api->header.version.major != dl::kMajorVersion ||
        api->header.version.minor < dl::kFirstMinorWithCapsule) {
      return nullptr;
    }
    return api->dltensor_from_py_object_no_sync;
  }

  bool is_exact(PyObject* tensor) const {
    const Py_ssize_t n = PyTuple_GET_SIZE(exact_types_.ptr());
    for (Py_ssize_t t = 0; t < n; ++t) {
      if (reinterpret_cast<PyObject*>(Py_TYPE(tensor)) == PyTuple_GET_ITEM(exact_types_.ptr(), t)) {
        return true;
      }
    }
    return false;
  }

  py::tuple exact_types_;
  py::tuple descriptors_;  // in Attribute order
  py::object exchange_capsule_;  // keeps describe_'s table alive
  fusedopt::dlpack::DescribeFunction describe_ = nullptr;
};

// NOTE: [steady check]
// The steady path of fusedopt/_optimizer.py (SteadyPlan) asks, every step, whether
// the cached call arguments still describe the group: the same param objects, still
// contiguous tensors of the planned dtype and shape at the planned addresses; the
// same state tensors in their state dicts, still contiguous tensors of their planned
// dtype and shape at their addresses, with step counters that are whole numbers >= 0;
// and behind each param a contiguous grad of the
// planned dtype, shape and device, without lazy negation or conjugation. With
// thousands of tensors these reads are most of a step's host time, so this class does
// them in one pass and writes the grads' addresses straight into the argument object.
// It only answers yes or no: on no, the full Python planning runs, validates
// everything and names any problem.
//
// Where torch offers the DLPack C exchange API (dlpack_exchange.h), one C call
// describes a tensor (address, device, dtype, shape, strides): 5 per param with
// Adam's three state tensors, plus two Python calls, the grad and its negative bit,
// which DLPack does not report. Older torch, or params and state of other types
// than torch.Tensor and nn.Parameter, take one attribute read per fact
// (check_by_attributes): 2,000 params with cold caches took 4.7-5.8 ms that way
// against 2.6-3.3 ms described, interleaved in one process.
//
// The pass is bound by the memory system, not by its own instructions: torch puts
// each tensor's TensorImpl and StorageImpl next to its buffer on the heap, so with
// state made one tensor at a time 2,000 params spread over about 8,000 distinct
// 4 KiB pages, more than the TLB holds, and its reads stall on misses even when the
// check runs twice in a row. fusedopt therefore makes a group's state tensors all
// empty before giving any its memory (fusedopt/_optimizer.py, tensors_like), which
// brings those pages down to about 4,500; the params' and grads' objects stay where
// torch put them.
// Software prefetching (of every object, up to 16 params ahead) measured no gain and
// is not done; the check's own expectations are kept in flat arrays so they add no
// misses of their own (benchmarks/NOTES.md, v2.3 and v2.4).
class SteadyCheck {
 public:
  SteadyCheck(const TensorAttributes& attributes, py::list params, py::handle dtype,
              bool is_complex, py::list state_dicts, py::tuple state_keys, py::list state_tensors)
      : attributes_(attributes),
        dtype_(py::reinterpret_borrow<py::object>(dtype)),
        is_complex_(is_complex),
        state_keys_(py::reinterpret_borrow<py::tuple>(state_keys)) {
    const size_t n = params.size();
    if (state_dicts.size() != n || state_tensors.size() != n) {
      throw std::invalid_argument("SteadyCheck: params, state_dicts and state_tensors differ in length");
    }
    entries_.reserve(n);
    expected_.reserve(n * (1 + state_keys_.size()));
    for (size_t k = 0; k < state_keys_.size(); ++k) {
      if (state_keys_[k].cast<std::string>() == "step") step_key_ = static_cast<Py_ssize_t>(k);
    }
    described_ = attributes_.exchanges();
    for (size_t i = 0; i < n; ++i) {
      const py::handle param = params[i];
      const py::tuple tensors = state_tensors[i].cast<py::tuple>();
      if (tensors.size() != state_keys_.size()) {
        throw std::invalid_argument("SteadyCheck: one state tensor per state key expected");
      }
      Entry entry;
      entry.param = py::reinterpret_borrow<py::object>(param);
      entry.shape = param.attr("shape");
      entry.ndim = param.attr("ndim").cast<int64_t>();
      entry.nbytes = param.attr("nbytes").cast<int64_t>();
      entry.state = py::reinterpret_borrow<py::object>(state_dicts[i]);
      entry.state_tensors = tensors;
      expect(param);
      for (const py::handle tensor : tensors) {
        entry.state_dtypes.push_back(tensor.attr("dtype"));
        entry.state_shapes.push_back(tensor.attr("shape"));
        expect(tensor);
      }
      entries_.push_back(std::move(entry));
    }
  }

  // Whether refresh describes tensors through the DLPack exchange API.
  bool described() const { return described_; }

  // The check owns references to params, state dicts and state tensors, which can
  // lead back to the optimizer (a param's hook that steps it, as in the
  // optimizer-in-backward pattern): the garbage collector must see them to free such
  // cycles (see with_gc below).
  int traverse(visitproc visit, void* arg) const {
    for (const Entry& entry : entries_) {
      Py_VISIT(entry.param.ptr());
      Py_VISIT(entry.shape.ptr());
      Py_VISIT(entry.state.ptr());
      Py_VISIT(entry.state_tensors.ptr());
      for (const py::object& shape : entry.state_shapes) Py_VISIT(shape.ptr());
    }
    Py_VISIT(dtype_.ptr());
    Py_VISIT(state_keys_.ptr());
    return attributes_.traverse(visit, arg);
  }

  // Drops every reference; a cleared check answers no, so the plan is rebuilt.
  void clear() {
    entries_.clear();
    expected_.clear();  // borrowed from the entries
    shapes_.clear();
  }

  template <typename Args>
  bool refresh(Args& args, py::list params) {
    const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
    if (static_cast<size_t>(n) != entries_.size() || static_cast<size_t>(n) != args.params.size()) {
      return false;
    }
    args.grads.resize(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      Entry& entry = entries_[static_cast<size_t>(i)];
      const Expected* const expected = expected_of(static_cast<size_t>(i));
      PyObject* const param = PyList_GET_ITEM(params.ptr(), i);
      uintptr_t grad_address = 0;
      const bool sound =
          param == entry.param.ptr() &&
          (described_ ? check_described(entry, expected, param, args.params[i], &grad_address)
                      : check_by_attributes(entry, expected, param, args.params[i], &grad_address));
      if (!sound) {
        PyErr_Clear();
        return false;
      }
      args.grads[static_cast<size_t>(i)] = grad_address;
    }
    return true;
  }

 private:
  // One param's references, and what the attribute reads compare with.
  struct Entry {
    py::object param;
    py::object shape;  // torch.Size
    int64_t ndim = 0;
    int64_t nbytes = 0;
    py::object state;  // the param's state dict
    py::tuple state_tensors;  // the tensors expected under state_keys_, in order
    std::vector<py::object> state_dtypes;  // and their dtypes and shapes (torch.Size)
    std::vector<py::object> state_shapes;
  };

  // What the plan expects of one tensor. These sit in one flat array, a param
  // followed by its state tensors in state_keys_ order, with all shapes in another,
  // so the check reads its own expectations in order: scattered small allocations
  // (a vector per shape) cost cache misses of their own on top of those on torch's
  // objects. Device, dtype, ndim and shape are filled when described_.
  struct Expected {
    PyObject* object = nullptr;  // borrowed: its Entry owns it
    uintptr_t address = 0;       // data pointer (a param's is checked against the kernel's argument)
    fusedopt::dlpack::Device device{};
    fusedopt::dlpack::DataType dtype{};
    int32_t ndim = 0;
    size_t shape_at = 0;  // where its shape starts in shapes_
  };

  // Appends what `tensor` is now; a tensor the exchange API cannot describe as
  // contiguous turns described_ off for the whole check.
  void expect(py::handle tensor) {
    Expected expected;
    expected.object = tensor.ptr();
    expected.address = tensor.attr("data_ptr")().cast<uintptr_t>();
    expected.shape_at = shapes_.size();
    if (described_) described_ = record_layout(tensor.ptr(), &expected);
    expected_.push_back(expected);
  }

  // Param i's expectations: [0] the param, [1 + k] its state tensor under key k.
  const Expected* expected_of(size_t i) const {
    return expected_.data() + i * (1 + static_cast<size_t>(PyTuple_GET_SIZE(state_keys_.ptr())));
  }

  // One param through the exchange API: its state tensors, the param, its grad.
  bool check_described(Entry& entry, const Expected* expected, PyObject* param,
                       uintptr_t param_address, uintptr_t* grad_address) {
    using A = TensorAttributes;
    fusedopt::dlpack::Tensor described{};
    const Py_ssize_t num_keys = PyTuple_GET_SIZE(state_keys_.ptr());
    for (Py_ssize_t k = 0; k < num_keys; ++k) {
      const Expected& state = expected[1 + k];
      if (!holds(entry, k, state.object) || !attributes_.describe(state.object, &described) ||
          !has_layout(described, state) || address_of(described) != state.address ||
          (k == step_key_ && !is_step_count(state.address))) {
        return false;
      }
    }
    if (!attributes_.describe(param, &described) || !has_layout(described, expected[0]) ||
        address_of(described) != param_address || (is_complex_ && !is_false(param, A::kIsConj))) {
      return false;
    }
    const Owned grad(attributes_.get(param, A::kGrad));
    if (grad.object == nullptr || grad.object == Py_None) return false;
    // Sparse and other non-strided grads have no description and fail here.
    if (!attributes_.describe(grad.object, &described) ||
        !has_layout(described, expected[0]) || !is_false(grad.object, A::kIsNeg) ||
        (is_complex_ && !is_false(grad.object, A::kIsConj))) {
      return false;
    }
    *grad_address = address_of(described);
    return true;
  }

  // The same questions, one attribute read per fact.
  bool check_by_attributes(Entry& entry, const Expected* expected, PyObject* param,
                           uintptr_t param_address, uintptr_t* grad_address) {
    using A = TensorAttributes;
    const Py_ssize_t num_keys = PyTuple_GET_SIZE(state_keys_.ptr());
    for (Py_ssize_t k = 0; k < num_keys; ++k) {
      const size_t at = static_cast<size_t>(k);
      const Expected& state = expected[1 + k];
      if (!holds(entry, k, state.object) || !has_address(state.object, state.address) ||
          !is_contiguous_as(state.object, entry.state_dtypes[at], entry.state_shapes[at]) ||
          (k == step_key_ && !is_step_count(state.address))) {
        return false;
      }
    }
    // The param: `p.data = ...` can keep its address and change everything else
    // (a transposed or reshaped view, another dtype over the same bytes).
    if (!has_address(param, param_address) || !is_plain_dense(param, entry, /*check_negative=*/false)) {
      return false;
    }
    const Owned grad(attributes_.get(param, A::kGrad));
    if (grad.object == nullptr || grad.object == Py_None) return false;
    // Non-strided grads (sparse, mkldnn) fail here: they have no data pointer.
    if (!is_plain_dense(grad.object, entry, /*check_negative=*/true)) return false;
    const Owned address(attributes_.call(grad.object, A::kDataPtr));
    if (address.object == nullptr) return false;
    *grad_address = PyLong_AsUnsignedLongLong(address.object);
    return PyErr_Occurred() == nullptr;
  }

  // Whether the float32 step counter at `address` (checked to be the planned
  // tensor's) is a whole number >= 0: one set in place to anything else (say -1, a
  // bias correction of zero on the next step) sends the step to the full planning,
  // which refuses it and names the param.
  static bool is_step_count(uintptr_t address) {
    float step;
    std::memcpy(&step, reinterpret_cast<const void*>(address), sizeof(step));
    return step >= 0.0f && std::isfinite(step) && std::floor(step) == step;
  }

  // Whether the param's state dict still holds `planned` under key k.
  bool holds(const Entry& entry, Py_ssize_t k, PyObject* planned) const {
    return PyDict_GetItemWithError(entry.state.ptr(), PyTuple_GET_ITEM(state_keys_.ptr(), k)) ==
           planned;
  }

  // Records the described layout of a plain contiguous tensor; false where it
  // cannot be described or is not contiguous.
  bool record_layout(PyObject* tensor, Expected* expected) {
    fusedopt::dlpack::Tensor described{};
    if (!attributes_.describe(tensor, &described) || !is_row_major(described)) return false;
    expected->device = described.device;
    expected->dtype = described.dtype;
    expected->ndim = described.ndim;
    shapes_.insert(shapes_.end(), described.shape, described.shape + described.ndim);
    return true;
  }

  static uintptr_t address_of(const fusedopt::dlpack::Tensor& described) {
    return reinterpret_cast<uintptr_t>(described.data) + described.byte_offset;
  }

  // Whether a described tensor is contiguous with the planned device, dtype and shape.
  bool has_layout(const fusedopt::dlpack::Tensor& described, const Expected& expected) const {
    if (described.device.device_type != expected.device.device_type ||
        described.device.device_id != expected.device.device_id ||
        described.dtype.code != expected.dtype.code || described.dtype.bits != expected.dtype.bits ||
        described.dtype.lanes != expected.dtype.lanes || described.ndim != expected.ndim) {
      return false;
    }
    const int64_t* const shape = shapes_.data() + expected.shape_at;
    for (int32_t d = 0; d < described.ndim; ++d) {
      if (described.shape[d] != shape[d]) return false;
    }
    return is_row_major(described);
  }

  // torch's contiguity: an empty tensor is contiguous; otherwise every dimension of
  // size other than 1 has the stride of a dense row-major tensor.
  static bool is_row_major(const fusedopt::dlpack::Tensor& described) {
    if (described.strides == nullptr) return true;  // DLPack's compact row-major
    for (int32_t d = 0; d < described.ndim; ++d) {
      if (described.shape[d] == 0) return true;
    }
    int64_t expected = 1;
    for (int32_t d = described.ndim - 1; d >= 0; --d) {
      if (described.shape[d] != 1 && described.strides[d] != expected) return false;
      expected *= described.shape[d];
    }
    return true;
  }

  // Whether a no-argument predicate method (is_neg, is_conj) answers False.
  bool is_false(PyObject* tensor, TensorAttributes::Attribute method) const {
    const Owned answer(attributes_.call(tensor, method));
    return answer.object == Py_False;
  }

  // Whether `tensor` (the param or its grad) is what the kernel can read as plain
  // memory: the planned dtype and shape, contiguous, no lazy negation or conjugation.
  // A param that kept its address, dtype, shape and contiguity cannot have gained a
  // negative bit through public torch API, so `check_negative` is for grads only.
  bool is_plain_dense(PyObject* tensor, const Entry& entry, bool check_negative) const {
    using A = TensorAttributes;
    const Owned dtype(attributes_.get(tensor, A::kDtype));
    if (dtype.object != dtype_.ptr() || !has_planned_shape(tensor, entry)) return false;
    const Owned contiguous(attributes_.call(tensor, A::kIsContiguous));
    if (contiguous.object != Py_True) return false;
    if (check_negative && !is_false(tensor, A::kIsNeg)) return false;
    return !is_complex_ || is_false(tensor, A::kIsConj);
  }

  // Whether `tensor` is contiguous with this dtype and shape (a state tensor).
  bool is_contiguous_as(PyObject* tensor, const py::object& dtype, const py::object& shape) const {
    using A = TensorAttributes;
    const Owned actual_dtype(attributes_.get(tensor, A::kDtype));
    if (actual_dtype.object != dtype.ptr()) return false;
    const Owned actual_shape(attributes_.get(tensor, A::kShape));
    if (actual_shape.object == nullptr ||
        PyObject_RichCompareBool(actual_shape.object, shape.ptr(), Py_EQ) != 1) {
      return false;
    }
    const Owned contiguous(attributes_.call(tensor, A::kIsContiguous));
    return contiguous.object == Py_True;
  }

  bool has_address(PyObject* tensor, uintptr_t expected) const {
    const Owned address(attributes_.call(tensor, TensorAttributes::kDataPtr));
    if (address.object == nullptr) return false;
    const unsigned long long value = PyLong_AsUnsignedLongLong(address.object);
    return PyErr_Occurred() == nullptr && value == expected;
  }

  // Whether a tensor of the planned dtype has the param's shape. With at most one
  // dimension, the dimension count and byte size settle it without building a
  // torch.Size (a tuple allocation, the most expensive read of the check).
  bool has_planned_shape(PyObject* grad, const Entry& entry) const {
    using A = TensorAttributes;
    if (entry.ndim >= 2) {
      const Owned shape(attributes_.get(grad, A::kShape));
      return shape.object != nullptr &&
             PyObject_RichCompareBool(shape.object, entry.shape.ptr(), Py_EQ) == 1;
    }
    const Owned ndim(attributes_.get(grad, A::kNdim));
    if (ndim.object == nullptr || PyLong_AsLongLong(ndim.object) != entry.ndim) return false;
    const Owned nbytes(attributes_.get(grad, A::kNbytes));
    return nbytes.object != nullptr && PyLong_AsLongLong(nbytes.object) == entry.nbytes;
  }

  TensorAttributes attributes_;
  py::object dtype_;
  bool is_complex_;  // complex params and grads must not be lazily conjugated either
  py::tuple state_keys_;
  std::vector<Entry> entries_;
  std::vector<Expected> expected_;  // 1 + state keys per param, see expected_of
  std::vector<int64_t> shapes_;      // Expected::shape_at points here
  bool described_ = false;  // refresh uses check_described, else check_by_attributes
  Py_ssize_t step_key_ = -1;  // where "step" is in state_keys_, or -1
};

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

  py::class_<TensorAttributes>(m, "TensorAttributes",
                               "Direct reads of torch.Tensor attributes for the steady check")
      .def(py::init<py::tuple, py::dict, py::object>(), py::arg("exact_types"),
           py::arg("descriptors"), py::arg("exchange_capsule"))
      .def_property_readonly("exact_types", &TensorAttributes::exact_types,
                             "The types read through the descriptors; others by lookup.")
      .def_property_readonly("exchanges", &TensorAttributes::exchanges,
                             "Whether tensors of the exact types are described through the "
                             "DLPack C exchange API (NOTE: [steady check]).");
  py::class_<SteadyCheck>(m, "SteadyCheck", with_gc<SteadyCheck>(),
                          "Per-step check of a cached plan (NOTE: [steady check])")
      .def(py::init<const TensorAttributes&, py::list, py::handle, bool, py::list, py::tuple,
                    py::list>(),
           py::arg("attributes"), py::arg("params"), py::arg("dtype"), py::arg("is_complex"),
           py::arg("state_dicts"), py::arg("state_keys"), py::arg("state_tensors"))
      .def_property_readonly("described", &SteadyCheck::described,
                             "Whether refresh describes tensors through the DLPack exchange API.")
      .def("refresh", &SteadyCheck::refresh<AdamStepArgs>, py::arg("args"), py::arg("params"),
           "True, with args.grads set, when the cached arguments still describe `params` "
           "and each has a sound grad (NOTE: [steady check]).")
      .def("refresh", &SteadyCheck::refresh<SgdwStepArgs>, py::arg("args"), py::arg("params"));

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
