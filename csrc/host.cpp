// Host-side bookkeeping of a step, in C (fusedlars._C.bucket_scan / bucket_publish / call_op).
//
// Every step walks every param on the host before any kernel runs (fusedlars/buckets.py:
// Bucket.check, Bucket.refresh, Bucket.publish; fusedlars/backward_norms.py: grad_sums). In Python
// that walk costs a few microseconds per param: ~0.6 ms per step for ResNet-50's 161 params, as much
// as 6% of a 10 ms CPU step and the whole gap between fused LARS and torch's fused SGD (issue #25).
// These functions do the COMMON case of those walks with the Python C API, the same tests in the
// same order, and give up on anything else: they return None (or -1) and the Python code, which is
// the specification and names every problem in its errors, does the walk instead. So they can change
// speed, never a result: tests/test_host_scan.py runs every step of its cases both ways.
//
// NOTE: [What the host scan accepts]
// A bucket of plain (unsharded) params, each an exact torch.Tensor or nn.Parameter (no subclass:
// a subclass may redefine what its attributes mean) with the bucket's shape, dtype and device and
// dense in memory (contiguous, or any non-overlapping dense order: channels_last), whose grad is
// None or an exact Tensor, strided, of the param's shape, dtype and device and walked in the param's
// element order (NOTE [Dense segments] in buckets.py). Anything else (a sparse, mismatched or
// reordered grad, a param that needs a scratch copy, a DTensor, an error raised by any attribute)
// returns None before anything is written. `p.grad` is read through the attribute, as Python reads
// it (so a TorchFunctionMode sees it); the sizes, strides, dtype and device from the C++ tensor.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/record_function.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <string>
#include <unordered_map>
#include <vector>

namespace {

PyObject* g_grad_str = nullptr;  // interned "grad"

// A Python list's item i (borrowed), or nullptr if `lst` is no list or too short.
PyObject* item(PyObject* lst, Py_ssize_t i) {
  return PyList_Check(lst) && i < PyList_GET_SIZE(lst) ? PyList_GET_ITEM(lst, i) : nullptr;
}

// Do `t`'s sizes equal the tuple `shape` of Python ints?
bool same_sizes(const at::Tensor& t, PyObject* shape) {
  if (!PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) != t.dim()) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const long long v = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, d));
    if (v == -1 && PyErr_Occurred()) return false;
    if (v != t.size(d)) return false;
  }
  return true;
}

// buckets.py same_order: dense, and equal strides on every dim of size > 1.
bool same_order(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() <= 1) return true;
  if (!(a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense())) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// Is `v` the tuple (data_ptr, version) of `t` (Bucket: NOTE [Versions])? -1 on a malformed record.
int same_version(PyObject* v, const at::Tensor& t) {
  if (!PyTuple_Check(v) || PyTuple_GET_SIZE(v) != 2) return -1;
  const unsigned long long ptr = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(v, 0));
  if (PyErr_Occurred()) return -1;
  const long long ver = PyLong_AsLongLong(PyTuple_GET_ITEM(v, 1));
  if (ver == -1 && PyErr_Occurred()) return -1;
  return ptr == reinterpret_cast<uintptr_t>(t.data_ptr()) && ver == static_cast<long long>(t._version());
}

// Are the state dict `st`'s values at `keys` the objects whose ids are the tuple `seen`
// (Bucket.refresh: ``tuple(map(id, map(st.get, keys))) == seen_state[i]``)? -1 on an error.
int same_state(PyObject* st, PyObject* keys, PyObject* seen) {
  if (seen == Py_None) return 0;
  if (!PyDict_Check(st) || !PyTuple_Check(seen) || PyTuple_GET_SIZE(seen) != PyTuple_GET_SIZE(keys)) return -1;
  for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(keys); ++k) {
    PyObject* v = PyDict_GetItemWithError(st, PyTuple_GET_ITEM(keys, k));
    if (!v && PyErr_Occurred()) return -1;
    void* id = PyLong_AsVoidPtr(PyTuple_GET_ITEM(seen, k));
    if (!id && PyErr_Occurred()) return -1;
    if (id != static_cast<void*>(v ? v : Py_None)) return 0;
  }
  return 1;
}

// The recorded sum of squares of param p's grad g (not None) into *out (BackwardNorms: records map
// id(p) to (weakref(grad), version, None, -1, ssq)): 1 when g is still the recorded grad at the
// recorded version, 0 when it is not (or there is no record), -1 for a record this scan does not
// read (a DTensor grad's, a sum on another device), -2 with a Python error set.
int recorded_sum(PyObject* p, PyObject* g, PyObject* records, double* out) {
  PyObject* key = PyLong_FromVoidPtr(p);  // id(p)
  if (!key) return -2;
  PyObject* rec = PyDict_GetItemWithError(records, key);
  Py_DECREF(key);
  if (!rec) return PyErr_Occurred() ? -2 : 0;
  if (!PyTuple_Check(rec) || PyTuple_GET_SIZE(rec) != 5 || PyTuple_GET_ITEM(rec, 2) != Py_None) return -1;
  PyObject* ref = PyTuple_GET_ITEM(rec, 0);
  if (!PyWeakref_Check(ref) || !THPVariable_Check(g)) return -1;
#if PY_VERSION_HEX >= 0x030D0000
  PyObject* was = nullptr;  // (a new reference, or nullptr once dead)
  if (PyWeakref_GetRef(ref, &was) < 0) return -2;
  Py_XDECREF(was);  // only its identity is compared; the caller holds g alive if it is g
#else
  PyObject* was = PyWeakref_GetObject(ref);  // (borrowed; Py_None once dead)
#endif
  if (was != g) return 0;
  const long long ver = PyLong_AsLongLong(PyTuple_GET_ITEM(rec, 1));
  if (ver == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return -1;
  }
  if (ver != static_cast<long long>(THPVariable_Unpack(g)._version())) return 0;
  PyObject* ssq = PyTuple_GET_ITEM(rec, 4);
  if (!THPVariable_CheckExact(ssq)) return -1;
  const at::Tensor& s = THPVariable_Unpack(ssq);
  if (!s.device().is_cpu() || s.scalar_type() != at::kDouble || s.numel() != 1) return -1;
  *out = *s.const_data_ptr<double>();
  return 1;
}

// A contiguous CPU float64 tensor of n elements (the sums' output), or nullptr.
double* sums_table(PyObject* o, Py_ssize_t n) {
  if (!THPVariable_Check(o)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(o);
  if (!t.device().is_cpu() || t.scalar_type() != at::kDouble || !t.is_contiguous() || t.numel() != n) return nullptr;
  return t.data_ptr<double>();
}

struct Refs {  // new references, released at scope exit
  std::vector<PyObject*> v;
  ~Refs() {
    for (PyObject* o : v) Py_XDECREF(o);
  }
};

// bucket_scan(params, shapes, dtype, device, local_tensors, param_tensors, grad_tensors, versions,
//             state, keys, seen_state, records, sums) -> (active, changed, adopt, sums_code) | None
//
// Bucket.check + the walk of Bucket.refresh for a plain bucket (NOTE [What the host scan accepts]):
// on success, local_tensors[i] = param_tensors[i] = params[i] and grad_tensors[i] = params[i].grad
// for every i, and it returns the active segments (a tuple: those with a grad), the segments whose
// (data_ptr, version) differs from their record in `versions` (written outside our steps), and the
// segments whose state must be adopted (Bucket._adopt: state[p] missing, or its tensors at `keys` not
// the ones whose ids are seen_state[i]). It writes nothing else; the caller clears the versions of
// `changed` and adopts. None: the Python walk decides (nothing was written). `records` (a
// BackwardNorms' records, or None) and `sums` (float64 [S]): BackwardNorms.grad_sums' walk on the
// way, the grads being at hand; sums_code is recorded_sum's first answer other than 1, else 1 (-1
// without records).
// (check() runs at the start of every step, and nothing between it and the kernels writes a grad.)
PyObject* bucket_scan(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 13) {
    PyErr_SetString(PyExc_TypeError, "bucket_scan takes 13 arguments");
    return nullptr;
  }
  PyObject *params = args[0], *shapes = args[1], *dtype = args[2], *device = args[3], *locals = args[4],
           *ptensors = args[5], *gtensors = args[6], *versions = args[7], *state = args[8], *keys = args[9],
           *seen = args[10], *records = args[11];
  if (!PyList_Check(params) || !THPDtype_Check(dtype) || !THPDevice_Check(device) || !PyDict_Check(state) ||
      !PyTuple_Check(keys) || (records != Py_None && !PyDict_Check(records)))
    Py_RETURN_NONE;
  const Py_ssize_t S = PyList_GET_SIZE(params);
  for (PyObject* l : {shapes, locals, ptensors, gtensors, versions, seen})
    if (!PyList_Check(l) || PyList_GET_SIZE(l) != S) Py_RETURN_NONE;
  double* sums = records == Py_None ? nullptr : sums_table(args[12], S);
  if (records != Py_None && !sums) Py_RETURN_NONE;
  int sums_code = 1;  // BackwardNorms.grad_sums' answer, taken on the way (records given)
  const at::ScalarType dt = reinterpret_cast<THPDtype*>(dtype)->scalar_type;
  const at::Device dev = reinterpret_cast<THPDevice*>(device)->device;
  Refs grads;  // p.grad of each param (new references; Py_None included)
  grads.v.reserve(S);
  std::vector<int> changed_of(S, 0), adopt_of(S, 0);
  bool fail = true;  // until the walk reaches its end
  try {
    Py_ssize_t i = 0;
    for (; i < S; ++i) {
      PyObject* p = PyList_GET_ITEM(params, i);
      if (!THPVariable_CheckExact(p)) break;
      const at::Tensor& t = THPVariable_Unpack(p);
      if (!same_sizes(t, item(shapes, i)) || t.scalar_type() != dt || t.device() != dev) break;
      const bool kc = t.is_contiguous();
      if (!(kc || t.numel() <= 1 || t.is_non_overlapping_and_dense())) break;  // a scratch copy: Python
      PyObject* g = PyObject_GetAttr(p, g_grad_str);
      if (!g) break;
      grads.v.push_back(g);
      if (g != Py_None) {
        if (!THPVariable_CheckExact(g)) break;
        const at::Tensor& gt = THPVariable_Unpack(g);
        if (gt.layout() != c10::kStrided || gt.sizes() != t.sizes() || gt.scalar_type() != dt || gt.device() != dev)
          break;
        if (!((gt.is_contiguous() && kc) || same_order(gt, t))) break;  // a reordered grad: Python's scratch
        if (sums && sums_code == 1) {
          sums_code = recorded_sum(p, g, records, &sums[i]);
          if (sums_code == -2) {  // an error in the record test: the Python walk decides
            PyErr_Clear();
            sums_code = -1;
          }
        }
      }
      PyObject* v = item(versions, i);
      if (v != Py_None) {
        const int same = same_version(v, t);
        if (same < 0) break;
        changed_of[i] = !same;
      }
      PyObject* st = PyDict_GetItemWithError(state, p);
      if (!st && PyErr_Occurred()) break;
      int same = 0;
      if (st) {
        same = same_state(st, keys, item(seen, i));
        if (same < 0) break;
      }
      adopt_of[i] = !same;
    }
    fail = i < S;
  } catch (...) {  // a c10::Error from an attribute (an inference tensor's version): Python's walk says
    fail = true;
  }
  if (fail || PyErr_Occurred()) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  PyObject* active = PyList_New(0);
  PyObject* changed = PyList_New(0);
  PyObject* adopt = PyList_New(0);
  bool ok = active && changed && adopt;
  for (Py_ssize_t i = 0; ok && i < S; ++i) {
    PyObject* p = PyList_GET_ITEM(params, i);
    PyObject* g = grads.v[i];
    Py_INCREF(p);
    PyList_SetItem(locals, i, p);  // (steals; releases the old item)
    Py_INCREF(p);
    PyList_SetItem(ptensors, i, p);
    Py_INCREF(g);
    PyList_SetItem(gtensors, i, g);
    PyObject* idx = PyLong_FromSsize_t(i);
    ok = idx && (g == Py_None || PyList_Append(active, idx) == 0) && (!changed_of[i] || PyList_Append(changed, idx) == 0) &&
         (!adopt_of[i] || PyList_Append(adopt, idx) == 0);
    Py_XDECREF(idx);
  }
  PyObject* out = nullptr;
  if (ok) {
    PyObject* active_t = PyList_AsTuple(active);
    PyObject* code = PyLong_FromLong(sums ? sums_code : -1);
    out = active_t && code ? PyTuple_Pack(4, active_t, changed, adopt, code) : nullptr;
    Py_XDECREF(active_t);
    Py_XDECREF(code);
  }
  Py_XDECREF(active);
  Py_XDECREF(changed);
  Py_XDECREF(adopt);
  return out;  // (nullptr with the error set: out of memory)
}

// bucket_publish(param_tensors, local_tensors, active_idx, versions, wrote_raw) -> None
//
// Bucket.publish: when `wrote_raw`, bump the version counter of param_tensors[i] for every i in
// active_idx (torch.autograd.graph.increment_version: not an inference tensor's), then record
// versions[i] = (local_tensors[i].data_ptr(), local_tensors[i]._version). Raises TypeError on
// arguments of other types (the caller passes the bucket's lists).
PyObject* bucket_publish(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 5 || !PyList_Check(args[0]) || !PyList_Check(args[1]) || !PyTuple_Check(args[2]) ||
      !PyList_Check(args[3])) {
    PyErr_SetString(PyExc_TypeError, "bucket_publish(param_tensors: list, local_tensors: list, active_idx: tuple, "
                                     "versions: list, wrote_raw: bool)");
    return nullptr;
  }
  PyObject *ptensors = args[0], *locals = args[1], *idx = args[2], *versions = args[3];
  const int raw = PyObject_IsTrue(args[4]);
  if (raw < 0) return nullptr;
  const Py_ssize_t A = PyTuple_GET_SIZE(idx);
  std::vector<Py_ssize_t> ids(A);
  for (Py_ssize_t k = 0; k < A; ++k) {
    ids[k] = PyLong_AsSsize_t(PyTuple_GET_ITEM(idx, k));
    if (ids[k] == -1 && PyErr_Occurred()) return nullptr;
    for (PyObject* l : {ptensors, locals, versions})
      if (ids[k] < 0 || ids[k] >= PyList_GET_SIZE(l)) {
        PyErr_SetString(PyExc_IndexError, "bucket_publish: active index out of range");
        return nullptr;
      }
    for (PyObject* l : {ptensors, locals})
      if (!THPVariable_Check(PyList_GET_ITEM(l, ids[k]))) {
        PyErr_SetString(PyExc_TypeError, "bucket_publish: a tensor list holds something else");
        return nullptr;
      }
  }
  try {
    if (raw)
      for (Py_ssize_t i : ids) {
        const at::Tensor& t = THPVariable_Unpack(PyList_GET_ITEM(ptensors, i));
        if (!t.is_inference()) torch::autograd::impl::bump_version(t);
      }
    for (Py_ssize_t i : ids) {
      const at::Tensor& t = THPVariable_Unpack(PyList_GET_ITEM(locals, i));
      PyObject* rec = Py_BuildValue("(KL)", static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(t.data_ptr())),
                                    static_cast<long long>(t._version()));
      if (!rec) return nullptr;
      PyList_SetItem(versions, i, rec);  // (steals)
    }
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// ------------------------------------------------------------------------------------------------
// NOTE: [Direct calls]
// torch.ops.fusedlars.<op>(...) converts every argument to an IValue through pybind11 (each tensor
// of each list on its own), then runs the dispatcher and its autograd fallback: ~0.06 us per tensor
// plus ~3 us per call, measured on the op with 161 tiny params (ResNet-50's layout): 3 lists are
// ~30 us of a step, and the backward hook's one-grad sum is a 3 us call per param. call_op builds the
// same stack here, reading the op's registered schema (csrc/ops.cpp, the one declaration of its
// arguments) and unpacking exact tensors with THPVariable_Unpack, and hands it to the op's CPU kernel
// (redispatchBoxed to the CPU key: the autograd fallback has nothing to do in a step under no_grad),
// with the GIL released while it runs (as the op binding releases it) and a profiler record under the
// op's name. An argument it does not unpack (a subclass, a FakeTensor, a type no CPU op's schema has)
// returns NotImplemented and the caller takes torch.ops; a compiled step always does (the ops and their
// fake kernels are what dynamo traces), and so does a call under a Python TorchDispatchMode, which
// must see the op whole (as the dispatcher presents it), not the aten ops its kernel runs inside
// (lr.item() on the CPU). Errors are the ops' own messages.

// The exact tensor `o`, or false.
bool arg_tensor(PyObject* o, at::Tensor& out) {
  if (!THPVariable_CheckExact(o)) return false;
  out = THPVariable_Unpack(o);
  return true;
}

// Python argument `o` as the IValue of schema type `t` (Tensor, Tensor?, Tensor[], int, float[], int[]),
// or false.
bool arg_ivalue(PyObject* o, const c10::TypePtr& t, c10::IValue& out) {
  using K = c10::TypeKind;
  at::Tensor x;
  switch (t->kind()) {
    case K::TensorType:
      if (!arg_tensor(o, x)) return false;
      out = std::move(x);
      return true;
    case K::OptionalType:
      if (o == Py_None) {
        out = c10::IValue();
        return true;
      }
      if (t->castRaw<c10::OptionalType>()->getElementType()->kind() != K::TensorType || !arg_tensor(o, x)) return false;
      out = std::move(x);
      return true;
    case K::IntType:
      if (!PyLong_Check(o)) return false;
      out = static_cast<int64_t>(PyLong_AsLongLong(o));
      return !PyErr_Occurred();
    case K::ListType: {
      if (!PyList_Check(o) && !PyTuple_Check(o)) return false;
      const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
      PyObject** items = PySequence_Fast_ITEMS(o);
      switch (t->castRaw<c10::ListType>()->getElementType()->kind()) {
        case K::TensorType: {
          c10::List<at::Tensor> l;
          l.reserve(n);
          for (Py_ssize_t i = 0; i < n; ++i) {
            if (!arg_tensor(items[i], x)) return false;
            l.push_back(std::move(x));
          }
          out = std::move(l);
          return true;
        }
        case K::FloatType: {
          c10::List<double> l;
          l.reserve(n);
          for (Py_ssize_t i = 0; i < n; ++i) {
            if (!PyFloat_Check(items[i]) && !PyLong_Check(items[i])) return false;
            l.push_back(PyFloat_AsDouble(items[i]));
          }
          out = std::move(l);
          return !PyErr_Occurred();
        }
        case K::IntType: {
          c10::List<int64_t> l;
          l.reserve(n);
          for (Py_ssize_t i = 0; i < n; ++i) {
            if (!PyLong_Check(items[i])) return false;
            l.push_back(PyLong_AsLongLong(items[i]));
          }
          out = std::move(l);
          return !PyErr_Occurred();
        }
        default:
          return false;
      }
    }
    default:
      return false;
  }
}

// NotImplemented: the caller takes torch.ops (an argument this path does not unpack, or a mode).
PyObject* not_here() {
  PyErr_Clear();
  Py_RETURN_NOTIMPLEMENTED;
}

// call_op(name, *args) -> the op's result | NotImplemented: fusedlars::<name>'s CPU kernel on the
// arguments of its schema, in order, all of them given (NOTE [Direct calls]).
PyObject* call_op(PyObject*, PyObject* const* a, Py_ssize_t n) {
  if (n < 1 || !PyUnicode_Check(a[0]) || c10::impl::dispatch_mode_enabled()) return not_here();
  const char* name = PyUnicode_AsUTF8(a[0]);
  if (!name) return nullptr;
  // the handles of the ops called so far (an op's handle never changes once registered; the GIL
  // guards this map)
  static std::unordered_map<std::string, c10::OperatorHandle> handles;
  auto it = handles.find(name);
  if (it == handles.end()) {
    std::optional<c10::OperatorHandle> h;
    try {
      h = c10::Dispatcher::singleton().findOp({std::string("fusedlars::") + name, ""});
    } catch (...) {
      return not_here();
    }
    if (!h) return not_here();
    it = handles.emplace(name, *h).first;
  }
  const c10::OperatorHandle* op = &it->second;
  const c10::FunctionSchema& schema = op->schema();
  const auto& args = schema.arguments();
  if (static_cast<size_t>(n - 1) != args.size() || schema.returns().size() > 1) return not_here();
  torch::jit::Stack stack;
  stack.reserve(args.size());
  for (size_t i = 0; i < args.size(); ++i) {
    c10::IValue v;
    if (!arg_ivalue(a[i + 1], args[i].type(), v)) return not_here();
    stack.push_back(std::move(v));
  }
  std::string msg;
  PyObject* type = nullptr;
  Py_BEGIN_ALLOW_THREADS;
  try {
    RECORD_FUNCTION(schema.name(), std::vector<c10::IValue>());
    op->redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), &stack);
  } catch (const c10::ValueError& e) {
    type = PyExc_ValueError;
    msg = e.what_without_backtrace();
  } catch (const c10::TypeError& e) {
    type = PyExc_TypeError;
    msg = e.what_without_backtrace();
  } catch (const c10::IndexError& e) {
    type = PyExc_IndexError;
    msg = e.what_without_backtrace();
  } catch (const c10::Error& e) {
    type = PyExc_RuntimeError;
    msg = e.what_without_backtrace();
  } catch (const std::exception& e) {
    type = PyExc_RuntimeError;
    msg = e.what();
  }
  Py_END_ALLOW_THREADS;
  if (type) {
    PyErr_SetString(type, msg.c_str());
    return nullptr;
  }
  if (schema.returns().empty()) Py_RETURN_NONE;
  if (stack.size() != 1 || !stack[0].isTensor()) {
    PyErr_SetString(PyExc_RuntimeError, "call_op: only ops returning nothing or one tensor are called directly");
    return nullptr;
  }
  return THPVariable_Wrap(std::move(stack[0]).toTensor());
}

PyMethodDef g_methods[] = {
    {"call_op", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call_op)), METH_FASTCALL,
     "call_op(name, *args): fusedlars::<name>'s CPU kernel without the Python op binding (csrc/host.cpp)."},
    {"bucket_scan", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(bucket_scan)), METH_FASTCALL,
     "Bucket.check + Bucket.refresh's walk of a plain bucket, or None (csrc/host.cpp)."},
    {"bucket_publish", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(bucket_publish)), METH_FASTCALL,
     "Bucket.publish (csrc/host.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// The module's host functions (ops.cpp creates the module with them).
PyMethodDef* fusedlars_host_methods() {
  if (!g_grad_str) g_grad_str = PyUnicode_InternFromString("grad");
  return g_methods;
}
