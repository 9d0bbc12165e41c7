// Host-side bookkeeping of a step, in C (fusedlars._C.bucket_scan / bucket_publish / grad_sums_scan).
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
#include <ATen/record_function.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <string>
#include <vector>

#include "cpu/entries.h"

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
// BackwardNorms' records, or None) and `sums` (float64 [S]): grad_sums_scan on the way, the grads
// being at hand; sums_code is its answer (-1 without records).
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
  int sums_code = 1;  // grad_sums_scan's answer, taken on the way (records given)
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

// grad_sums_scan(params, active_idx, records, out) -> 1 | 0 | -1
//
// BackwardNorms.grad_sums for a bucket whose records are plain (fusedlars/backward_norms.py: records
// map id(p) to (weakref(grad), version, None, -1, ssq)): for each i in active_idx, when p.grad is
// still the recorded grad at the recorded version, out[i] = ssq (a CPU float64 0-dim tensor's value).
// 1: every active segment had one (out filled); 0: one had none or a stale one (the step takes its
// own norms); -1: a record this scan does not read (a DTensor grad's, a sum on another device):
// Python's walk decides.
PyObject* grad_sums_scan(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4 || !PyList_Check(args[0]) || !PyTuple_Check(args[1]) || !PyDict_Check(args[2])) {
    PyErr_SetString(PyExc_TypeError, "grad_sums_scan(params: list, active_idx: tuple, records: dict, out: Tensor)");
    return nullptr;
  }
  PyObject *params = args[0], *idx = args[1], *records = args[2];
  double* o = sums_table(args[3], PyList_GET_SIZE(params));
  if (!o) {
    PyErr_SetString(PyExc_ValueError, "grad_sums_scan: out must be a contiguous CPU float64 tensor, one per param");
    return nullptr;
  }
  try {
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(idx); ++k) {
      const Py_ssize_t i = PyLong_AsSsize_t(PyTuple_GET_ITEM(idx, k));
      if (i < 0 || i >= PyList_GET_SIZE(params)) {
        PyErr_Clear();
        return PyLong_FromLong(-1);
      }
      PyObject* p = PyList_GET_ITEM(params, i);
      PyObject* g = PyObject_GetAttr(p, g_grad_str);
      if (!g) return nullptr;
      const int r = g == Py_None ? 0 : recorded_sum(p, g, records, &o[i]);
      Py_DECREF(g);
      if (r == -2) return nullptr;
      if (r != 1) return PyLong_FromLong(r);
    }
  } catch (...) {
    PyErr_Clear();
    return PyLong_FromLong(-1);
  }
  return PyLong_FromLong(1);
}

// ------------------------------------------------------------------------------------------------
// NOTE: [Direct calls]
// torch.ops.fusedlars.<op>(...) boxes every argument into an IValue (each tensor of each list through
// pybind11), runs the dispatcher and its autograd fallback, and unboxes them again: ~0.06 us per
// tensor plus ~3 us per call, measured on the op with 161 tiny params (ResNet-50's layout): 3 lists
// are ~30 us of a step, and the backward hook's one-grad sum is a 3 us call per param. The eager CPU
// steps call the same implementations here (fusedlars.backends.cpu), unpacking exact tensors with
// THPVariable_Unpack, with the GIL released while they run (as the op binding releases it) and a
// profiler record under the op's name. Anything that is not an exact tensor (a subclass, a
// FakeTensor) returns NotImplemented and the caller takes torch.ops; a compiled step always does
// (the ops and their fake kernels are what dynamo traces), and so does a call under a Python
// TorchDispatchMode, which must see the op whole (as the dispatcher presents it), not the aten ops
// the implementation runs inside (lr.item() on the CPU). Errors are the ops' own messages.

bool arg_tensor(PyObject* o, at::Tensor& out) {
  if (!THPVariable_CheckExact(o)) return false;
  out = THPVariable_Unpack(o);
  return true;
}

bool arg_optional(PyObject* o, std::optional<at::Tensor>& out) {
  if (o == Py_None) {
    out = std::nullopt;
    return true;
  }
  at::Tensor t;
  if (!arg_tensor(o, t)) return false;
  out = std::move(t);
  return true;
}

bool arg_list(PyObject* o, std::vector<at::Tensor>& out) {
  if (!PyList_Check(o) && !PyTuple_Check(o)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
  PyObject** items = PySequence_Fast_ITEMS(o);
  out.clear();
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_CheckExact(items[i])) return false;
    out.push_back(THPVariable_Unpack(items[i]));
  }
  return true;
}

bool arg_doubles(PyObject* o, std::vector<double>& out) {
  if (!PyList_Check(o) && !PyTuple_Check(o)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
  PyObject** items = PySequence_Fast_ITEMS(o);
  out.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!PyFloat_Check(items[i]) && !PyLong_Check(items[i])) return false;
    out[i] = PyFloat_AsDouble(items[i]);
    if (out[i] == -1.0 && PyErr_Occurred()) return false;
  }
  return true;
}

bool arg_ints(PyObject* o, std::vector<int64_t>& out) {
  if (!PyList_Check(o) && !PyTuple_Check(o)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
  PyObject** items = PySequence_Fast_ITEMS(o);
  out.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!PyLong_Check(items[i])) return false;
    out[i] = PyLong_AsLongLong(items[i]);
    if (out[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

bool arg_int(PyObject* o, int64_t& out) {
  if (!PyLong_Check(o)) return false;
  out = PyLong_AsLongLong(o);
  return !(out == -1 && PyErr_Occurred());
}

// NotImplemented: the caller takes torch.ops (an argument this path does not unpack, or a mode).
PyObject* not_here() {
  PyErr_Clear();
  Py_RETURN_NOTIMPLEMENTED;
}

// Run `fn` with the GIL released; a C++ exception becomes the Python exception torch would raise.
template <class F>
bool run_released(F&& fn) {
  std::string msg;
  PyObject* type = nullptr;
  Py_BEGIN_ALLOW_THREADS;
  try {
    fn();
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
  if (type) PyErr_SetString(type, msg.c_str());
  return type == nullptr;
}

// call_lars_step_cpu(<the 21 arguments of fusedlars::lars_step_cpu>) -> None | NotImplemented
PyObject* call_lars_step_cpu(PyObject*, PyObject* const* a, Py_ssize_t n) {
  if (n != 21 || c10::impl::dispatch_mode_enabled()) return not_here();
  std::vector<at::Tensor> params, grads, masters, momentum;
  at::Tensor seg_ids, wd_mask, adapt_mask, has_state, step, w_norm, g_norm, u_norm, trust_ratio, lr;
  std::optional<at::Tensor> inv_scale, found_inf, w_sumsq, sums;
  int64_t phase = 0;
  std::vector<double> hyper;
  std::vector<int64_t> modes;
  if (!(arg_list(a[0], params) && arg_list(a[1], grads) && arg_list(a[2], masters) && arg_list(a[3], momentum) &&
        arg_tensor(a[4], seg_ids) && arg_tensor(a[5], wd_mask) && arg_tensor(a[6], adapt_mask) &&
        arg_tensor(a[7], has_state) && arg_tensor(a[8], step) && arg_tensor(a[9], w_norm) &&
        arg_tensor(a[10], g_norm) && arg_tensor(a[11], u_norm) && arg_tensor(a[12], trust_ratio) &&
        arg_tensor(a[13], lr) && arg_optional(a[14], inv_scale) && arg_optional(a[15], found_inf) &&
        arg_optional(a[16], w_sumsq) && arg_optional(a[17], sums) && arg_int(a[18], phase) &&
        arg_doubles(a[19], hyper) && arg_ints(a[20], modes)))
    return not_here();
  const bool ok = run_released([&] {
    RECORD_FUNCTION("fusedlars::lars_step_cpu", std::vector<c10::IValue>());
    fusedlars::cpu::lars_step_cpu(params, grads, masters, momentum, seg_ids, wd_mask, adapt_mask, has_state, step,
                                    w_norm, g_norm, u_norm, trust_ratio, lr, inv_scale, found_inf, w_sumsq, sums,
                                    phase, hyper, modes);
  });
  if (!ok) return nullptr;
  Py_RETURN_NONE;
}

// call_lamb_step_cpu(<the 22 arguments of fusedlars::lamb_step_cpu>) -> None | NotImplemented
PyObject* call_lamb_step_cpu(PyObject*, PyObject* const* a, Py_ssize_t n) {
  if (n != 22 || c10::impl::dispatch_mode_enabled()) return not_here();
  std::vector<at::Tensor> params, grads, masters, exp_avg, exp_avg_sq;
  at::Tensor seg_ids, wd_mask, adapt_mask, has_state, step, w_norm, g_norm, u_norm, trust_ratio, lr;
  std::optional<at::Tensor> inv_scale, found_inf, clip_coef, sums;
  int64_t phase = 0;
  std::vector<double> hyper;
  std::vector<int64_t> modes;
  if (!(arg_list(a[0], params) && arg_list(a[1], grads) && arg_list(a[2], masters) && arg_list(a[3], exp_avg) &&
        arg_list(a[4], exp_avg_sq) && arg_tensor(a[5], seg_ids) && arg_tensor(a[6], wd_mask) &&
        arg_tensor(a[7], adapt_mask) && arg_tensor(a[8], has_state) && arg_tensor(a[9], step) &&
        arg_tensor(a[10], w_norm) && arg_tensor(a[11], g_norm) && arg_tensor(a[12], u_norm) &&
        arg_tensor(a[13], trust_ratio) && arg_tensor(a[14], lr) && arg_optional(a[15], inv_scale) &&
        arg_optional(a[16], found_inf) && arg_optional(a[17], clip_coef) && arg_optional(a[18], sums) &&
        arg_int(a[19], phase) && arg_doubles(a[20], hyper) && arg_ints(a[21], modes)))
    return not_here();
  const bool ok = run_released([&] {
    RECORD_FUNCTION("fusedlars::lamb_step_cpu", std::vector<c10::IValue>());
    fusedlars::cpu::lamb_step_cpu(params, grads, masters, exp_avg, exp_avg_sq, seg_ids, wd_mask, adapt_mask,
                                    has_state, step, w_norm, g_norm, u_norm, trust_ratio, lr, inv_scale, found_inf,
                                    clip_coef, sums, phase, hyper, modes);
  });
  if (!ok) return nullptr;
  Py_RETURN_NONE;
}

// call_grad_sumsq_cpu(grads, inv_scale) -> Tensor | NotImplemented (fusedlars::grad_sumsq_cpu)
PyObject* call_grad_sumsq_cpu(PyObject*, PyObject* const* a, Py_ssize_t n) {
  if (n != 2 || c10::impl::dispatch_mode_enabled()) return not_here();
  std::vector<at::Tensor> grads;
  std::optional<at::Tensor> inv_scale;
  if (!(arg_list(a[0], grads) && arg_optional(a[1], inv_scale))) return not_here();
  at::Tensor out;
  const bool ok = run_released([&] {
    RECORD_FUNCTION("fusedlars::grad_sumsq_cpu", std::vector<c10::IValue>());
    out = fusedlars::cpu::grad_sumsq_cpu(grads, inv_scale);
  });
  if (!ok) return nullptr;
  return THPVariable_Wrap(std::move(out));
}

PyMethodDef g_methods[] = {
    {"call_lars_step_cpu", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call_lars_step_cpu)),
     METH_FASTCALL, "fusedlars::lars_step_cpu without the dispatcher (NOTE [Direct calls], csrc/host.cpp)."},
    {"call_lamb_step_cpu", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call_lamb_step_cpu)),
     METH_FASTCALL, "fusedlars::lamb_step_cpu without the dispatcher (NOTE [Direct calls], csrc/host.cpp)."},
    {"call_grad_sumsq_cpu", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call_grad_sumsq_cpu)),
     METH_FASTCALL, "fusedlars::grad_sumsq_cpu without the dispatcher (NOTE [Direct calls], csrc/host.cpp)."},
    {"bucket_scan", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(bucket_scan)), METH_FASTCALL,
     "Bucket.check + Bucket.refresh's walk of a plain bucket, or None (csrc/host.cpp)."},
    {"bucket_publish", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(bucket_publish)), METH_FASTCALL,
     "Bucket.publish (csrc/host.cpp)."},
    {"grad_sums_scan", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(grad_sums_scan)), METH_FASTCALL,
     "BackwardNorms.grad_sums of plain records into a float64 table (csrc/host.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// The module's host functions (ops.cpp creates the module with them).
PyMethodDef* fusedlars_host_methods() {
  if (!g_grad_str) g_grad_str = PyUnicode_InternFromString("grad");
  return g_methods;
}
