/* Prints, from a CPython's own headers, the offsets leakmon's layouts hold: one
 * "name value" line each. Built by python::tests against each installed version. */
#define Py_BUILD_CORE 1
#include <Python.h>
#include <stddef.h>
#include <stdio.h>
#include "internal/pycore_code.h"
#include "internal/pycore_frame.h"
#include "internal/pycore_interp.h"
#include "internal/pycore_runtime.h"
#include "internal/pycore_dict.h"
#include "internal/pycore_moduleobject.h"
#include "internal/pycore_object.h"
#define P(name, expr) printf("%s %zu\n", name, (size_t)(expr))
int main(void) {
    P("interpreters_head", offsetof(_PyRuntimeState, interpreters.head));
    P("interp_threads_head", offsetof(PyInterpreterState, threads.head));
    P("tstate_next", offsetof(PyThreadState, next));
    P("tstate_native_thread_id", offsetof(PyThreadState, native_thread_id));
#if PY_VERSION_HEX < 0x030d0000
    P("tstate_frame", offsetof(PyThreadState, cframe));
    P("cframe_current_frame", offsetof(_PyCFrame, current_frame));
    P("frame_code", offsetof(_PyInterpreterFrame, f_code));
    P("frame_instr", offsetof(_PyInterpreterFrame, prev_instr));
#else
    P("tstate_frame", offsetof(PyThreadState, current_frame));
    P("frame_code", offsetof(_PyInterpreterFrame, f_executable));
    P("frame_instr", offsetof(_PyInterpreterFrame, instr_ptr));
#endif
    P("frame_previous", offsetof(_PyInterpreterFrame, previous));
    P("frame_owner", offsetof(_PyInterpreterFrame, owner));
#if PY_VERSION_HEX < 0x030c0000
    P("frame_is_entry", offsetof(_PyInterpreterFrame, is_entry));
#else
    P("owned_by_cstack", FRAME_OWNED_BY_CSTACK);
#endif
    P("code_instructions", offsetof(PyCodeObject, co_code_adaptive));
    P("code_qualname", offsetof(PyCodeObject, co_qualname));
    P("code_filename", offsetof(PyCodeObject, co_filename));
    P("code_firstlineno", offsetof(PyCodeObject, co_firstlineno));
    P("code_linetable", offsetof(PyCodeObject, co_linetable));
    P("ascii_size", sizeof(PyASCIIObject));
    P("compact_size", sizeof(PyCompactUnicodeObject));
    P("unicode_length", offsetof(PyASCIIObject, length));
    P("unicode_state", offsetof(PyASCIIObject, state));
    /* The heap's objects (heap.rs). */
#if PY_VERSION_HEX < 0x030c0000
    P("interp_modules", offsetof(PyInterpreterState, modules));
#else
    P("interp_modules", offsetof(PyInterpreterState, imports.modules));
#endif
    P("type_name", offsetof(PyTypeObject, tp_name));
    P("type_basicsize", offsetof(PyTypeObject, tp_basicsize));
    P("type_flags", offsetof(PyTypeObject, tp_flags));
    P("type_dict", offsetof(PyTypeObject, tp_dict));
    P("type_dictoffset", offsetof(PyTypeObject, tp_dictoffset));
    P("type_cached_keys", offsetof(PyHeapTypeObject, ht_cached_keys));
    P("dict_keys", offsetof(PyDictObject, ma_keys));
    P("dict_values", offsetof(PyDictObject, ma_values));
    P("keys_log2_size", offsetof(PyDictKeysObject, dk_log2_size));
    P("keys_log2_index_bytes", offsetof(PyDictKeysObject, dk_log2_index_bytes));
    P("keys_kind", offsetof(PyDictKeysObject, dk_kind));
    P("keys_nentries", offsetof(PyDictKeysObject, dk_nentries));
    P("keys_indices", offsetof(PyDictKeysObject, dk_indices));
    P("keys_general", DICT_KEYS_GENERAL);
    P("values_values", offsetof(PyDictValues, values));
    P("list_items", offsetof(PyListObject, ob_item));
    P("tuple_items", offsetof(PyTupleObject, ob_item));
    P("set_mask", offsetof(PySetObject, mask));
    P("set_table", offsetof(PySetObject, table));
    P("set_smalltable", offsetof(PySetObject, smalltable));
    P("module_dict", offsetof(PyModuleObject, md_dict));
    P("func_defaults", offsetof(PyFunctionObject, func_defaults));
    P("func_kwdefaults", offsetof(PyFunctionObject, func_kwdefaults));
    P("func_closure", offsetof(PyFunctionObject, func_closure));
    P("func_dict", offsetof(PyFunctionObject, func_dict));
    P("func_code", offsetof(PyFunctionObject, func_code));
    P("cell_ref", offsetof(PyCellObject, ob_ref));
    P("method_func", offsetof(PyMethodObject, im_func));
    P("method_self", offsetof(PyMethodObject, im_self));
    P("frame_stacktop", offsetof(_PyInterpreterFrame, stacktop));
    P("frame_localsplus", offsetof(_PyInterpreterFrame, localsplus));
    P("code_nlocalsplus", offsetof(PyCodeObject, co_nlocalsplus));
    P("code_localsplusnames", offsetof(PyCodeObject, co_localsplusnames));
    P("gc_head", sizeof(PyGC_Head));
    P("managed_dict", Py_TPFLAGS_MANAGED_DICT);
#ifdef Py_TPFLAGS_INLINE_VALUES
    P("inline_values", Py_TPFLAGS_INLINE_VALUES);
#endif
    P("heaptype", Py_TPFLAGS_HEAPTYPE);
    P("have_gc", Py_TPFLAGS_HAVE_GC);
    P("list_subclass", Py_TPFLAGS_LIST_SUBCLASS);
    P("tuple_subclass", Py_TPFLAGS_TUPLE_SUBCLASS);
    P("dict_subclass", Py_TPFLAGS_DICT_SUBCLASS);
    P("type_subclass", Py_TPFLAGS_TYPE_SUBCLASS);
    return 0;
}
