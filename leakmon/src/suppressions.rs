//! Allocations a runtime makes for itself and keeps until the process ends, by design:
//! glibc's per-thread TLS vectors (`allocate_dtv` under `pthread_create`), the dynamic
//! linker's bookkeeping of loaded objects. valgrind does not report them because it
//! calls `__libc_freeres` at exit; leakmon cannot, so it names them and sets them
//! apart: a report shows their bytes on a line of their own, never in the leak table
//! and never silently gone.
//!
//! In: symbolized frames of a stack. Out: whether any of them is a suppressed function.

use crate::wrappers::Patterns;

/// Built-in suppressions: exact names, and prefixes ending in `*`.
pub const BUILTIN: &[&str] = &[
    // glibc's thread-local storage: the dtv of each thread, kept for reuse.
    "allocate_dtv",
    "_dl_allocate_tls",
    "_dl_allocate_tls_init",
    "_dl_resize_dtv",
    "_dl_update_slotinfo",
    "_dl_add_to_slotinfo",
    // The dynamic linker's record of each loaded object (freed only by __libc_freeres).
    "_dl_new_object",
    "_dl_map_object*",
    "_dl_check_map_versions",
    "_dl_important_hwcaps",
    "_dl_init_paths",
];

/// The suppressions in effect: the built-in ones plus the configured names.
#[derive(Clone, Debug)]
pub struct Suppressions(Patterns);

impl Default for Suppressions {
    fn default() -> Self {
        Self::new(std::iter::empty::<&str>())
    }
}

impl Suppressions {
    /// The built-in list plus `extra` (a name, or a prefix ending in `*`).
    pub fn new<S: AsRef<str>>(extra: impl IntoIterator<Item = S>) -> Self {
        Self(Patterns::new(BUILTIN, extra))
    }

    /// The first suppressed function among `functions`, if any.
    pub fn matching<'a>(&self, functions: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
        functions.into_iter().find(|f| self.0.matches(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_and_configured_names_and_prefixes_match_any_frame() {
        let s = Suppressions::new(["pool_*", "my_cache_init"]);
        assert_eq!(s.matching(["malloc", "allocate_dtv", "pthread_create"]), Some("allocate_dtv"));
        assert_eq!(
            s.matching(["malloc", "_dl_map_object_from_fd", "dlopen"]),
            Some("_dl_map_object_from_fd")
        );
        assert_eq!(s.matching(["pool_grow", "main"]), Some("pool_grow"));
        assert_eq!(s.matching(["my_cache_init(int)", "main"]), Some("my_cache_init(int)"));
        assert_eq!(s.matching(["leak_small", "main"]), None);
        assert_eq!(s.matching(["my_cache_init_more"]), None, "an exact name is not a prefix");
    }
}
