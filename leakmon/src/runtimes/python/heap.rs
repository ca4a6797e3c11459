//! Where CPython (3.11 to 3.13) keeps what a walk of its objects from outside reads:
//! the interpreter's modules, the containers' items, a type's name and flags, a frame's
//! local variables; and the addresses of the built-in types the walk tells apart.
//!
//! Most offsets are alike in the three versions (measured with `offsetof` on each one's
//! headers; `heap_offsets_match_the_installed_headers` measures them again); the few
//! that differ are in [`HeapLayout`]. A walk trusts none of them blindly: an object's
//! type is one of [`Types`] or is checked to be a type before anything is read by it.

use object::ObjectSymbol as _;

/// `ob_type`, in every object.
pub const OB_TYPE: u64 = 8;
/// `ob_size`, in every variable-size object (list, tuple).
pub const OB_SIZE: u64 = 16;

pub const TYPE_NAME: u64 = 24;
pub const TYPE_BASICSIZE: u64 = 32;
pub const TYPE_FLAGS: u64 = 168;
pub const TYPE_DICT: u64 = 264;
pub const TYPE_DICTOFFSET: u64 = 288;

pub const DICT_KEYS: u64 = 32;
pub const DICT_VALUES: u64 = 40;
pub const KEYS_LOG2_SIZE: u64 = 8;
pub const KEYS_LOG2_INDEX_BYTES: u64 = 9;
pub const KEYS_KIND: u64 = 10;
pub const KEYS_NENTRIES: u64 = 24;
pub const KEYS_INDICES: u64 = 32;
/// `dk_kind` of a table whose entries keep their hash (any keys); the others
/// (`str` keys only, split or not) keep a key and a value.
pub const KEYS_GENERAL: u8 = 0;

pub const LIST_ITEMS: u64 = 24;
pub const TUPLE_ITEMS: u64 = 24;
pub const SET_MASK: u64 = 32;
pub const SET_TABLE: u64 = 40;
/// `smalltable`: a set of few items keeps them inside itself.
pub const SET_SMALLTABLE: u64 = 64;
pub const MODULE_DICT: u64 = 16;
pub const FUNC_DEFAULTS: u64 = 56;
pub const FUNC_KWDEFAULTS: u64 = 64;
pub const FUNC_CLOSURE: u64 = 72;
pub const FUNC_DICT: u64 = 88;
pub const FUNC_CODE: u64 = 48;
pub const CELL_REF: u64 = 16;
pub const METHOD_FUNC: u64 = 16;
pub const METHOD_SELF: u64 = 24;
pub const FRAME_STACKTOP: u64 = 64;
pub const FRAME_LOCALSPLUS: u64 = 72;
pub const CODE_LOCALSPLUSNAMES: u64 = 96;

/// `sizeof(PyGC_Head)`: what a collected object's block holds before the object.
pub const GC_HEAD: u64 = 16;

/// `tp_flags` bits (alike in 3.11 to 3.13).
pub mod flags {
    pub const INLINE_VALUES: u64 = 1 << 2;
    pub const MANAGED_DICT: u64 = 1 << 4;
    pub const HEAPTYPE: u64 = 1 << 9;
    pub const HAVE_GC: u64 = 1 << 14;
    pub const LIST_SUBCLASS: u64 = 1 << 25;
    pub const TUPLE_SUBCLASS: u64 = 1 << 26;
    pub const DICT_SUBCLASS: u64 = 1 << 29;
    pub const TYPE_SUBCLASS: u64 = 1 << 31;
}

/// Where an instance of a class keeps its attributes, when its type has
/// `MANAGED_DICT`: each version its own way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Managed {
    /// 3.11: a dict pointer three words before the object, the values of a dict not
    /// made yet (keys shared in the class) four words before.
    Pointers,
    /// 3.12: one word three before the object, a dict, or values one byte on from
    /// it, told by bit 0.
    Tagged,
    /// 3.13: a dict pointer three words before, the values after the object's fixed
    /// part (`INLINE_VALUES`), valid while no dict was made.
    Inline,
}

/// The offsets that differ between versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapLayout {
    /// `PyInterpreterState`'s `sys.modules` dict.
    pub interp_modules: u64,
    /// `PyHeapTypeObject.ht_cached_keys`: the keys its instances share.
    pub type_cached_keys: u64,
    pub code_nlocalsplus: u64,
    /// Where a values array's pointers start in it.
    pub values_values: u64,
    pub managed: Managed,
}

impl HeapLayout {
    pub fn v3_11() -> Self {
        Self {
            interp_modules: 888,
            type_cached_keys: 872,
            code_nlocalsplus: 76,
            values_values: 0,
            managed: Managed::Pointers,
        }
    }

    pub fn v3_12() -> Self {
        Self {
            interp_modules: 944,
            type_cached_keys: 880,
            code_nlocalsplus: 72,
            values_values: 0,
            managed: Managed::Tagged,
        }
    }

    /// 3.13, `sys.modules` as its `_Py_DebugOffsets` gives it.
    pub fn v3_13(interp_modules: u64) -> Self {
        Self {
            interp_modules,
            type_cached_keys: 880,
            code_nlocalsplus: 72,
            values_values: 8,
            managed: Managed::Inline,
        }
    }
}

/// Runtime addresses of the built-in types a walk tells apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Types {
    pub type_: u64,
    pub dict: u64,
    pub list: u64,
    pub tuple: u64,
    pub set: u64,
    pub frozenset: u64,
    pub module: u64,
    pub function: u64,
    pub cell: u64,
    pub method: u64,
    pub str_: u64,
    pub int: u64,
}

impl Types {
    /// From the interpreter's file (exported symbols: a stripped file keeps them),
    /// `bias` added; `None` if one is missing.
    pub fn of_file(file: &object::File<'_>, bias: u64) -> Option<Self> {
        let names = [
            "PyType_Type",
            "PyDict_Type",
            "PyList_Type",
            "PyTuple_Type",
            "PySet_Type",
            "PyFrozenSet_Type",
            "PyModule_Type",
            "PyFunction_Type",
            "PyCell_Type",
            "PyMethod_Type",
            "PyUnicode_Type",
            "PyLong_Type",
        ];
        let mut found = [0u64; 12];
        for s in object::Object::dynamic_symbols(file).chain(object::Object::symbols(file)) {
            let Ok(name) = s.name() else { continue };
            if let Some(i) = names.iter().position(|n| *n == name) {
                if s.is_definition() && found[i] == 0 {
                    found[i] = s.address().wrapping_add(bias);
                }
            }
        }
        if found.contains(&0) {
            return None;
        }
        let [type_, dict, list, tuple, set, frozenset, module, function, cell, method, str_, int] = found;
        Some(Self { type_, dict, list, tuple, set, frozenset, module, function, cell, method, str_, int })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every offset above, and each version's own, against `offsetof` on the headers
    /// of pyenv's 3.11, 3.12 and 3.13 (3.13's `sys.modules` as its debug offsets say).
    #[test]
    fn heap_offsets_match_the_installed_headers() {
        let common = [
            ("type_name", TYPE_NAME),
            ("type_basicsize", TYPE_BASICSIZE),
            ("type_flags", TYPE_FLAGS),
            ("type_dict", TYPE_DICT),
            ("type_dictoffset", TYPE_DICTOFFSET),
            ("dict_keys", DICT_KEYS),
            ("dict_values", DICT_VALUES),
            ("keys_log2_size", KEYS_LOG2_SIZE),
            ("keys_log2_index_bytes", KEYS_LOG2_INDEX_BYTES),
            ("keys_kind", KEYS_KIND),
            ("keys_nentries", KEYS_NENTRIES),
            ("keys_indices", KEYS_INDICES),
            ("keys_general", u64::from(KEYS_GENERAL)),
            ("list_items", LIST_ITEMS),
            ("tuple_items", TUPLE_ITEMS),
            ("set_mask", SET_MASK),
            ("set_table", SET_TABLE),
            ("set_smalltable", SET_SMALLTABLE),
            ("module_dict", MODULE_DICT),
            ("func_defaults", FUNC_DEFAULTS),
            ("func_kwdefaults", FUNC_KWDEFAULTS),
            ("func_closure", FUNC_CLOSURE),
            ("func_dict", FUNC_DICT),
            ("func_code", FUNC_CODE),
            ("cell_ref", CELL_REF),
            ("method_func", METHOD_FUNC),
            ("method_self", METHOD_SELF),
            ("frame_stacktop", FRAME_STACKTOP),
            ("frame_localsplus", FRAME_LOCALSPLUS),
            ("code_localsplusnames", CODE_LOCALSPLUSNAMES),
            ("gc_head", GC_HEAD),
            ("managed_dict", flags::MANAGED_DICT),
            ("heaptype", flags::HEAPTYPE),
            ("have_gc", flags::HAVE_GC),
            ("list_subclass", flags::LIST_SUBCLASS),
            ("tuple_subclass", flags::TUPLE_SUBCLASS),
            ("dict_subclass", flags::DICT_SUBCLASS),
            ("type_subclass", flags::TYPE_SUBCLASS),
        ];
        let versions = [
            ("3.11", HeapLayout::v3_11()),
            ("3.12", HeapLayout::v3_12()),
            ("3.13", {
                let prefix = super::super::tests::pyenv("3.13");
                let data =
                    std::fs::read(prefix.join("lib/libpython3.13.so.1.0")).expect("read libpython3.13");
                let file = object::File::parse(&*data).expect("parse libpython3.13");
                let runtime = super::super::symbol(&file, "_PyRuntime").expect("_PyRuntime");
                let raw = super::super::bytes_at(&file, runtime, super::super::DEBUG_OFFSETS_SIZE)
                    .expect("offsets");
                HeapLayout::v3_13(super::super::modules_in_debug_offsets(raw).expect("3.13's modules"))
            }),
        ];
        for (minor, layout) in versions {
            let h = super::super::tests::header_offsets(&super::super::tests::pyenv(minor), minor);
            for (name, ours) in common {
                assert_eq!(h.get(name).copied(), Some(ours), "{minor}: {name}");
            }
            assert_eq!(h["interp_modules"], layout.interp_modules, "{minor}");
            assert_eq!(h["type_cached_keys"], layout.type_cached_keys, "{minor}");
            assert_eq!(h["code_nlocalsplus"], layout.code_nlocalsplus, "{minor}");
            assert_eq!(h["values_values"], layout.values_values, "{minor}");
            assert_eq!(
                h.get("inline_values").copied(),
                (layout.managed == Managed::Inline).then_some(flags::INLINE_VALUES)
            );
        }
    }

    /// The types are found in Debian's stripped python3 and in pyenv's shared 3.13.
    #[test]
    fn types_are_found_in_stripped_and_shared_interpreters() {
        for path in
            ["/usr/bin/python3".into(), super::super::tests::pyenv("3.13").join("lib/libpython3.13.so.1.0")]
        {
            let data = std::fs::read(&path).expect("read the interpreter");
            let file = object::File::parse(&*data).expect("parse");
            let types = Types::of_file(&file, 0).unwrap_or_else(|| panic!("{}: the types", path.display()));
            assert_ne!(types.dict, types.list);
        }
    }
}
