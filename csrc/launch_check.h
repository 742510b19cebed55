// The last check before every kernel launch, and the launch itself (NOTE: [launch
// check] in launch_check.cpp). The only code besides bindings.cpp that knows Python:
// it reads tensors' C-level facts, holds them alive, and releases the GIL to launch.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "dlpack_exchange.h"

namespace fusedopt {

namespace py = pybind11;

// Reads of tensor and storage facts through the C-level descriptors of
// torch._C.TensorBase and torch._C.StorageBase, taken from Python once. Going
// through them, not through `getattr`, means no lookup through a subclass's MRO and
// no Python override between the check and the memory it describes. Where torch
// offers the DLPack C exchange API (torch >= 2.11), one C call describes a tensor's
// address, device, dtype, shape and strides.
class TensorReads {
 public:
  enum Attribute {
    kGrad, kDtype, kShape, kDevice, kDataPtr, kStride, kIsNeg, kIsConj, kUntypedStorage,
    kStorageDataPtr, kStorageNbytes, kNumAttributes
  };

  // `descriptors` maps each name of names() to its descriptor; `exchange_capsule` is
  // torch.Tensor's `__dlpack_c_exchange_api__`, or None to read attribute by attribute;
  // `kernel_dtypes` maps the torch dtypes the kernels step to their ScalarType codes.
  TensorReads(py::dict descriptors, py::object exchange_capsule, py::dict kernel_dtypes);

  static const char* const* names();

  // Whether tensors are described through the DLPack exchange API.
  bool exchanges() const { return describe_ != nullptr; }

  // Fills `out` through the exchange API; false, with no Python error left, where the
  // object is no tensor or has no such description (sparse, no storage).
  bool describe(PyObject* tensor, dlpack::Tensor* out) const;

  // A getter's value (kGrad, kDtype, kShape) or a no-argument method's result: a new
  // reference, or null with a Python error set.
  PyObject* get(PyObject* object, Attribute attribute) const;
  PyObject* call(PyObject* object, Attribute method) const;

  // The ScalarType code the kernels step a layout's dtype as, or -1.
  int kernel_dtype(const struct Layout& layout) const;

  // Whether a layout is float32 (a step counter's dtype).
  bool is_float32(const struct Layout& layout) const;

 private:
  py::tuple descriptors_;  // in Attribute order
  std::vector<std::pair<PyObject*, int>> kernel_dtypes_;  // borrowed dtypes: torch keeps them
  PyObject* float32_ = nullptr;
  py::object exchange_capsule_;  // keeps describe_'s table alive
  dlpack::DescribeFunction describe_ = nullptr;
};

// Which tensor of a call a check is about: param `index`, its grad, or its state
// tensor under state key `key`.
struct TensorName {
  static constexpr Py_ssize_t kParam = -1;
  static constexpr Py_ssize_t kGrad = -2;
  size_t index;
  Py_ssize_t key;
};

// Where a tensor's elements are, and how they are laid out: what the check compares.
struct Layout {
  uintptr_t address = 0;     // of the first element
  dlpack::Device device{};   // exchange reads only
  dlpack::DataType dtype{};  // exchange reads only
  PyObject* dtype_object = nullptr;  // attribute reads only (borrowed: torch keeps its dtypes)
  int64_t element_bytes = 0;  // of one element (8 for complex64, whose reals need 4-byte alignment)
  bool is_complex = false;
  int64_t numel = 0;
  int64_t extent = 0;   // elements from the first to one past the last, 0 when empty
  bool dense = false;   // covers its extent without gaps or overlap, in some dim order
};

// The tensors of one kernel call, as planned: the params and, per param, its state
// tensors in the order of the call's state lists, each kept alive together with its
// storage. verify() answers whether they are still exactly as planned, reads and
// checks the grads, and points the call's arguments at them.
class LaunchCheck {
 public:
  // `reads` is a TensorReads. Raises ValueError naming the first tensor that is not
  // sound plain memory, or a state tensor not laid out like its param.
  LaunchCheck(py::object reads, py::list params, py::list state_dicts, py::tuple state_keys,
              py::list state_tensors);

  // The device of the planned params (all share it), as DLPack names devices.
  dlpack::Device params_device() const {
    return planned_.empty() ? dlpack::Device{kNoDevice, 0} : planned_.front().layout.device;
  }
  static constexpr int32_t kNoDevice = 0;

  // Whether the check reads tensors through the DLPack exchange API.
  bool reads_exchange() const { return reads_->exchanges(); }

  // Why the last verify() answered no ("" when it answered yes).
  const std::string& failure() const { return failure_; }
  // Whether the last verify_scaler() answered no: the step can still run, with
  // GradScaler's tensors read on the host.
  bool scaler_refused() const { return scaler_refused_; }

  // True when `params` holds the planned params, every planned tensor is as planned
  // and, when `check_state_dicts`, still held by its param's state dict under its key;
  // and every grad (`grads`, or each param's `.grad` where `grads` is None) is sound
  // plain memory laid out like its param. Then the call's grad list points at the
  // grads and `alive` owns them and their storages. False otherwise, with failure().
  template <typename Args>
  bool verify(Args& args, PyObject* params, PyObject* grads, bool check_state_dicts,
              std::vector<py::object>* alive);

  // Reads GradScaler's tensors for a CUDA launch (NOTE: [device step counters]):
  // `scaler` is None or a (found_inf, scale) pair, each a one-element float32 tensor
  // of plain memory on the params' device, sharing no byte with a planned tensor (the
  // kernels write those while every block reads found_inf), or None; points the
  // call's arguments at them, `alive` owns them. False, with failure() and
  // scaler_refused(), otherwise.
  template <typename Args>
  bool verify_scaler(Args& args, PyObject* scaler, std::vector<py::object>* alive);

  int traverse(visitproc visit, void* arg) const;
  void clear();

 private:
  struct Planned {
    PyObject* object = nullptr;   // borrowed: owned_ holds it
    PyObject* storage = nullptr;  // borrowed: owned_ holds it
    Layout layout;
    size_t dims_at = 0;  // its shape then its strides, in dims_
    size_t num_dims = 0;  // twice its ndim
    uintptr_t storage_base = 0;
    uint64_t storage_bytes_needed = 0;  // from the storage's base to the end of the extent
    int64_t kernel_numel = 0;
    int kernel_dtype = -1;  // ScalarType code, or -1 for dtypes no kernel steps
  };

  static bool same_device(const Layout& a, const Layout& b);
  bool verify_scalar(PyObject* tensor, const char* name, uintptr_t* address,
                     std::vector<py::object>* alive);
  // Reads the tensor's layout, its dims (shape, then strides) into scratch_; false
  // with failure_ set where it cannot be read.
  bool read_layout(PyObject* tensor, Layout* layout, const struct TensorName& name);
  // Why a read layout is no plain memory a kernel may walk, or null.
  const char* memory_problem(PyObject* tensor, const Layout& layout);
  // Whether `storage` (a new or owned reference) covers the layout's extent; sets
  // the storage's base and the bytes needed from it.
  bool storage_covers(PyObject* storage, const Layout& layout, uintptr_t* base, uint64_t* needed);
  Planned record(PyObject* tensor, const TensorName& name);
  // Same device, shape and element strides as `planned`, and same dtype unless
  // `any_kernel_dtype` (a state or grad in another storage type, NOTE: [precision]):
  // then as many kernel elements of a kernel dtype, so complex stays complex.
  bool same_layout_as(const Planned& planned, const Layout& layout, bool any_kernel_dtype) const;
  bool matches(const Planned& planned, PyObject* tensor, const TensorName& name);
  bool verify_grad(const Planned& param, PyObject* grad, size_t index, int grad_dtype,
                   uintptr_t* address, std::vector<py::object>* alive);
  bool fail(const std::string& why);
  // The state dict's value under state key k, found without calling any Python
  // (a user key's `__eq__` could run anything); null if there is none.
  PyObject* state_entry(PyObject* dict, Py_ssize_t k) const;
  // What a message calls a tensor: built only when a check fails.
  std::string describe(const TensorName& name) const;
  bool fail(const TensorName& name, const char* why);

  py::object reads_owner_;  // keeps reads_ alive
  const TensorReads* reads_;
  py::tuple state_keys_;
  std::vector<py::object> owned_;  // params, state dicts, state tensors, their storages
  std::vector<PyObject*> state_dicts_;  // borrowed, one per param (may be None)
  std::vector<Planned> planned_;  // per param: the param, then its state tensors
  std::vector<int64_t> dims_;
  std::vector<int64_t> scratch_;  // dims of the tensor being read
  Py_ssize_t step_key_ = -1;  // where "step" is in state_keys_, or -1
  size_t num_params_ = 0;
  std::string failure_;
  bool scaler_refused_ = false;
};

// Verifies every item, then launches all with the GIL released: -1 when all were
// launched, else the index of the first item that failed verification (nothing was
// launched). Each item is (check, args, params, grads or None, check_state_dicts,
// target, scaler), target ("cpu", num_threads), ("cuda", device, stream), or, in tests,
// ("hook", launcher): launcher(kernel_name, args) launches host tensors; scaler None
// or GradScaler's (found_inf, scale) for the CUDA kernels to read (verify_scaler). `launched` gets
// True appended right before the first launch, so that a caller interrupted by a
// signal as the call returns still knows that the kernels ran.
int run_checked(py::list items, py::list launched);

}  // namespace fusedopt
