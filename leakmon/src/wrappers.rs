//! Allocation wrappers: functions that only pass an allocation on (`xmalloc`,
//! `zmalloc`, `g_malloc`, `PyMem_Malloc`, an allocator's own prefixed entry points).
//! The frame that tells a user where memory goes is the first one outside them: the
//! allocation site. Full stacks are kept; reports and metrics name the site.
//!
//! In: symbolized frames, innermost first. Out: the index of the site.

use std::collections::HashSet;

/// Known wrappers: exact names, and prefixes ending in `*`.
pub const BUILTIN: &[&str] = &[
    // GNU programs (bash, coreutils, gcc, git) and their x-family.
    "xmalloc",
    "xcalloc",
    "xzalloc",
    "xrealloc",
    "xstrdup",
    "xmemdup",
    "xnmalloc",
    "xcharalloc",
    "sh_xmalloc",
    "sh_xrealloc",
    // Redis, KeyDB, Valkey.
    "zmalloc*",
    "zcalloc*",
    "zrealloc*",
    "ztrymalloc*",
    "ztrycalloc*",
    "ztryrealloc*",
    "zstrdup",
    "zmalloc_usable",
    // Redis's string library: its constructors are strdup's kin.
    "sdsnewlen",
    "_sdsnewlen",
    "sdstrynewlen",
    "sdsnew",
    "sdsempty",
    "sdsdup",
    "sdsMakeRoomFor*",
    "_sdsMakeRoomFor",
    // GLib.
    "g_malloc*",
    "g_malloc0*",
    "g_realloc*",
    "g_try_malloc*",
    "g_try_realloc*",
    "g_slice_alloc*",
    "g_strdup*",
    "g_memdup*",
    // CPython's allocator layers.
    "_PyObject_Malloc",
    "_PyObject_Calloc",
    "_PyObject_Realloc",
    "PyObject_Malloc",
    "PyObject_Calloc",
    "PyObject_Realloc",
    "_PyMem_*",
    "PyMem_*",
    "_PyObject_GC_*",
    "gc_alloc",
    "_PyType_AllocNoTrack",
    "PyType_GenericAlloc",
    // C++: operator new and friends, as demangled.
    "operator new*",
    "__gnu_cxx::new_allocator*",
    "std::__new_allocator*",
    "std::allocator*",
    "std::allocator_traits*",
    // Rust: the global allocator's shims (legacy and v0 names) and the growth paths of
    // the standard collections (Vec, String, VecDeque, HashMap's table).
    "__rust_alloc",
    "__rust_alloc_zeroed",
    "__rust_realloc",
    "__rdl_*",
    "__rustc::__rust_*",
    "__rustc::__rdl_*",
    "alloc::alloc::*",
    "<alloc::alloc::Global as core::alloc::Allocator>::*",
    "alloc::raw_vec::*",
    "hashbrown::raw::*",
    // The same as v0 symbols demangle them (rustc 1.9x): `<alloc::raw_vec::RawVecInner>::
    // finish_grow`, `<alloc::raw_vec::RawVec<u64>>::grow_one`.
    "<alloc::raw_vec::*",
    "<hashbrown::raw::*",
    "<alloc::alloc::*",
    // Allocators' own entry points and internals.
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "memalign",
    "aligned_alloc",
    "posix_memalign",
    "valloc",
    "pvalloc",
    "strdup",
    "strndup",
    "__libc_malloc",
    "__libc_calloc",
    "__libc_realloc",
    "__libc_memalign",
    "__strdup",
    "__strndup",
    "je_*",
    "_rjem_*",
    "mallocx",
    "rallocx",
    "tc_*",
    "mi_*",
];

/// A list of function names: exact names, and prefixes ending in `*`. The wrapper list
/// and the suppression list (`crate::suppressions`) are both one.
#[derive(Clone, Debug)]
pub struct Patterns {
    exact: HashSet<String>,
    prefixes: Vec<String>,
}

impl Patterns {
    /// `builtin` plus `extra`, both in the same syntax.
    pub fn new<S: AsRef<str>>(builtin: &[&str], extra: impl IntoIterator<Item = S>) -> Self {
        let mut patterns = Self { exact: HashSet::new(), prefixes: Vec::new() };
        for name in
            builtin.iter().copied().map(str::to_owned).chain(extra.into_iter().map(|s| s.as_ref().to_owned()))
        {
            match name.strip_suffix('*') {
                Some(prefix) => patterns.prefixes.push(prefix.to_owned()),
                None => {
                    patterns.exact.insert(name);
                }
            }
        }
        patterns
    }

    /// Whether `function` (a demangled name) is on the list.
    pub fn matches(&self, function: &str) -> bool {
        // Demangled C++ names carry their parameters: match on the name before them.
        let name = function.split_once('(').map_or(function, |(n, _)| n);
        self.exact.contains(name) || self.prefixes.iter().any(|p| function.starts_with(p.as_str()))
    }
}

/// The wrapper list in effect: the built-in one plus the configured names.
#[derive(Clone, Debug)]
pub struct Wrappers(Patterns);

impl Default for Wrappers {
    fn default() -> Self {
        Self::new(std::iter::empty::<&str>())
    }
}

impl Wrappers {
    /// The built-in list plus `extra` (same syntax: a name, or a prefix ending in `*`).
    pub fn new<S: AsRef<str>>(extra: impl IntoIterator<Item = S>) -> Self {
        Self(Patterns::new(BUILTIN, extra))
    }

    /// Whether `function` (a demangled name) only passes allocations on.
    pub fn is_wrapper(&self, function: &str) -> bool {
        self.0.matches(function)
    }

    /// Index of the allocation site among `functions` (innermost first): the first one
    /// that is not a wrapper, or the outermost when all are.
    pub fn site<'a>(&self, functions: impl IntoIterator<Item = Option<&'a str>>) -> usize {
        let mut last = 0;
        for (i, function) in functions.into_iter().enumerate() {
            match function {
                Some(f) if self.is_wrapper(f) => last = i,
                // An unnamed frame is not known to be a wrapper.
                _ => return i,
            }
        }
        last
    }
}

/// Checks one configured wrapper name.
pub fn validate(name: &str) -> Result<(), String> {
    let bare = name.strip_suffix('*').unwrap_or(name);
    if bare.is_empty()
        || bare.contains('*')
        || bare.chars().any(char::is_whitespace) && !bare.starts_with("operator")
    {
        return Err(format!(
            "wrapper {name:?} must be a function name, or a prefix ending in one `*` (like \"pool_alloc*\")"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_site_is_the_first_frame_outside_the_wrappers() {
        let w = Wrappers::default();
        assert_eq!(w.site([Some("xmalloc"), Some("read_config"), Some("main")]), 1);
        assert_eq!(w.site([Some("ztrymalloc_usable_internal"), Some("zmalloc"), Some("createObject")]), 2);
        assert_eq!(w.site([Some("operator new(unsigned long)"), Some("Cache::put(int)")]), 1);
        assert_eq!(w.site([Some("leak_small"), Some("main")]), 0);
        let grown = [
            Some("alloc::raw_vec::RawVecInner<A>::finish_grow"),
            Some("alloc::raw_vec::RawVec<T,A>::grow_one"),
            Some("app::Cache::insert"),
        ];
        assert_eq!(w.site(grown), 2, "a Vec's growth is named by the code that pushed");
        // The same frames as rustc's v0 symbols demangle (regression: rustc 1.99).
        let grown_v0 = [
            Some("<alloc::raw_vec::RawVecInner>::finish_grow"),
            Some("<alloc::raw_vec::RawVecInner>::grow_amortized"),
            Some("<alloc::raw_vec::RawVec<u64>>::grow_one"),
            Some("rust_leaks::leak_grown"),
        ];
        assert_eq!(w.site(grown_v0), 3);
        assert_eq!(w.site([None, Some("main")]), 0, "an unnamed frame is the site");
        assert_eq!(w.site([Some("xmalloc"), Some("zmalloc")]), 1, "all wrappers: the outermost");
        assert_eq!(w.site(std::iter::empty()), 0);
    }

    #[test]
    fn configured_names_and_prefixes_add_to_the_builtin_list() {
        let w = Wrappers::new(["my_alloc", "pool_*"]);
        assert!(w.is_wrapper("my_alloc") && w.is_wrapper("pool_get") && w.is_wrapper("xmalloc"));
        assert!(!w.is_wrapper("my_alloc_user") && !w.is_wrapper("main"));
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(validate("pool_*").is_ok() && validate("xmalloc").is_ok());
        for bad in ["", "*", "a*b*", "two words"] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
    }
}
