//! Full stacks for code built without frame pointers, walked in the kernel through the
//! binaries' own unwind tables, and allocation sites named past wrappers.

mod common;

use common::{build_fixture, by_function, expected, processes, report_json, LEAKS};
use serde_json::Value;

/// `-fomit-frame-pointer` after the fixtures' default `-fno-omit-frame-pointer`.
const NO_FP: &[&str] = &["-fomit-frame-pointer"];

fn functions(stack: &Value) -> Vec<&str> {
    stack["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .map(|f| f["function"].as_str().expect("name"))
        .collect()
}

fn stack_of<'a>(process: &'a Value, site: &str) -> Vec<&'a Value> {
    process["stacks"].as_array().expect("stacks").iter().filter(|s| s["site"]["function"] == site).collect()
}

#[test]
fn without_frame_pointers_the_same_leaks_come_out_exactly_with_full_stacks() {
    let with_fp = build_fixture("leaks.c", &[]);
    let without_fp = build_fixture("leaks.c", NO_FP);
    for binary in [&with_fp, &without_fp] {
        let report = report_json(&[binary.as_os_str()]);
        let process = &processes(&report)[0];
        assert_eq!(by_function(process, "leaks.c"), expected(LEAKS), "{}", binary.display());
        // One call site, one stack, reaching through main to the C runtime.
        let small = stack_of(process, "leak_small");
        assert_eq!(small.len(), 1, "leak_small is one stack: {small:#?}");
        let frames = functions(small[0]);
        assert!(frames.len() >= 4, "{}: {frames:?}", binary.display());
        assert_eq!(&frames[..2], &["leak_small", "main"], "{}", binary.display());
        // Threads' stacks end at their start routine's caller, not in garbage.
        let thread = stack_of(process, "leak_in_thread");
        assert_eq!(thread.len(), 1, "{thread:#?}");
        assert_eq!(functions(thread[0])[..2], ["leak_in_thread", "start_thread"]);
    }
}

/// A stack more than 8 KiB deep from the allocation up (frames on several pages, each
/// read from the process): the walk still reaches main.
#[test]
fn a_stack_deeper_than_two_pages_is_walked_to_main() {
    let binary = build_fixture("deep_stack.c", NO_FP);
    let report = report_json(&[binary.as_os_str()]);
    let process = &processes(&report)[0];
    assert_eq!(by_function(process, "deep_stack.c"), expected(&[("leak_deep", 640, 10)]), "{report:#}");
    let stacks = stack_of(process, "leak_deep");
    assert_eq!(stacks.len(), 1, "{stacks:#?}");
    let mut want = vec!["leak_deep"];
    want.extend(["descend"; 12]);
    want.push("main");
    let frames = functions(stacks[0]);
    assert!(frames.len() > want.len(), "{frames:?}");
    assert_eq!(&frames[..want.len()], &want[..], "{frames:?}");
}

#[test]
fn leaks_through_a_wrapper_are_split_by_their_callers() {
    let binary = build_fixture("wrapped.c", NO_FP);
    let report = report_json(&[binary.as_os_str()]);
    let process = &processes(&report)[0];
    let sites = by_function(process, "wrapped.c");
    // pool_get is not a known wrapper: its 6400 bytes are its own.
    assert_eq!(
        sites,
        expected(&[
            ("parse_header", 3200, 100),
            ("cache_entry", 12_800, 200),
            ("session_new", 4800, 300),
            ("pool_get", 6400, 50)
        ]),
        "{report:#}"
    );
    for site in ["parse_header", "cache_entry", "session_new"] {
        let stacks = stack_of(process, site);
        assert_eq!(stacks.len(), 1, "{site}: {stacks:#?}");
        // The full stack keeps the wrapper, below the site, and reaches main.
        assert_eq!(&functions(stacks[0])[..5], &["xmalloc", site, "serve", "run", "main"]);
    }
}

#[test]
fn a_configured_wrapper_moves_the_site_to_its_callers() {
    let binary = build_fixture("wrapped.c", NO_FP);
    let out = common::leakmon()
        .args(["report", "--format", "json", "--wrapper", "pool_*", "--"])
        .arg(&binary)
        .output()
        .expect("run leakmon");
    let report = common::parse_report(&out);
    let sites = by_function(&processes(&report)[0], "wrapped.c");
    assert_eq!(sites.get("pooled_buffer"), Some(&(6400, 50)), "{sites:?}");
    assert!(!sites.contains_key("pool_get"), "{sites:?}");
}

#[test]
fn a_bad_wrapper_name_is_refused_in_one_line() {
    let out =
        common::leakmon().args(["report", "--wrapper", "a*b*", "--", "true"]).output().expect("run leakmon");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("prefix ending in one `*`"), "{stderr}");
}

#[test]
fn cpp_without_frame_pointers_is_named_past_operator_new() {
    let binary = build_fixture("new_leaks.cpp", NO_FP);
    let report = report_json(&[binary.as_os_str()]);
    let process = &processes(&report)[0];
    let got = by_function(process, "new_leaks.cpp");
    assert_eq!(got, expected(&[("leak_new()", 4000, 100), ("leak_new_array()", 5000, 50)]));
    for stack in stack_of(process, "leak_new()") {
        assert!(functions(stack).contains(&"main"), "reaches main: {stack:#}");
    }
}

/// What the interpreter itself says the kept strings take (`sys.getsizeof` of each).
fn python_string_bytes() -> u64 {
    let out = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import sys; print(sum(sys.getsizeof('x' * 6400 + str(i)) for i in range(1000)))"])
        .output()
        .expect("run python3");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("a number")
}

/// The strings are attributed to the Python line that made them; the allocator's
/// native frames stay above it (past CPython's allocator layers, PyUnicode_Concat) and
/// the interpreter's main below, with the evaluation loop's frame replaced by the
/// Python frames it ran.
#[test]
fn python_strings_are_attributed_to_the_python_line_that_made_them() {
    let script = common::fixtures_dir().join("py_leak.py");
    let report = report_json(&["/usr/bin/python3".as_ref(), script.as_os_str()]);
    let process = &processes(&report)[0];
    // The interpreter specializes the loop's `+` after a few rounds: two instructions
    // of the same line, two stacks. (The line also grows the list that keeps them.)
    let stacks: Vec<&Value> = stack_of(process, "remember")
        .into_iter()
        .filter(|s| functions(s).contains(&"PyUnicode_Concat"))
        .collect();
    let bytes: u64 = stacks.iter().map(|s| s["bytes"].as_u64().expect("bytes")).sum();
    let allocations: u64 = stacks.iter().map(|s| s["allocations"].as_u64().expect("allocations")).sum();
    assert_eq!((bytes, allocations), (python_string_bytes(), 1000), "{stacks:#?}");
    for stack in stacks {
        assert_eq!(stack["site"]["line"], 10, "{stack:#}");
        assert_eq!(stack["site"]["runtime"], "python", "{stack:#}");
        let frames = functions(stack);
        let site = frames.iter().position(|f| *f == "remember").expect("the site");
        assert!(frames[..site].contains(&"PyUnicode_Concat"), "the allocator's path above: {frames:?}");
        assert_eq!(frames[site + 1], "<module>", "{frames:?}");
        assert!(frames[site..].contains(&"Py_BytesMain"), "reaches the interpreter's main: {frames:?}");
        assert!(!frames.contains(&"_PyEval_EvalFrameDefault"), "{frames:?}");
    }
}

#[test]
fn a_site_keeps_its_stack_id_and_address_across_runs_while_its_code_moves() {
    let binary = build_fixture("wrapped.c", NO_FP);
    let run = || {
        let report = report_json(&[binary.as_os_str()]);
        let process = processes(&report)[0].clone();
        ["parse_header", "cache_entry", "session_new"].map(|site| {
            let stack = stack_of(&process, site)[0].clone();
            (stack["id"].as_str().expect("id").to_owned(), stack["frames"][1]["address"].clone())
        })
    };
    let (first, second) = (run(), run());
    for ((id1, addr1), (id2, addr2)) in first.iter().zip(&second) {
        assert_eq!(id1, id2, "same site, same id");
        // An offset in the file, never where address randomization put the code: the
        // same in both runs (a runtime address would tell any reader of a report or a
        // profile where the process's code is).
        assert_eq!(addr1, addr2, "the frame's address is its offset in the file");
    }
    let ids: std::collections::HashSet<_> = first.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 3, "three sites, three ids: {first:?}");
}

#[test]
fn full_unwind_tables_are_rebuilt_for_the_live_processes() {
    let binary = build_fixture("wrapped.c", NO_FP);
    // A private copy of libc is another file: with the system's, two libcs (28,000 rows
    // each) do not fit in 40,000 rows. The first run's process is gone when the second
    // needs room, so the tables start over with what live processes map.
    let private = tempfile::tempdir().expect("temp dir");
    std::fs::copy(common::system_libc(), private.path().join("libc.so.6")).expect("copy libc");
    let script = format!("{0}; LD_LIBRARY_PATH={1} {0}", binary.display(), private.path().display());
    let out = common::leakmon()
        .args(["report", "--format", "json", "--unwind-rows", "40000", "--", "sh", "-c", &script])
        .output()
        .expect("run leakmon");
    let report = common::parse_report(&out);
    let name = binary.file_name().expect("name").to_string_lossy();
    let comm = &name[..name.len().min(15)];
    let runs: Vec<&Value> = processes(&report).iter().filter(|p| p["comm"] == comm).collect();
    assert_eq!(runs.len(), 2, "{report:#}");
    for run in runs {
        // The second run's libc, found through LD_LIBRARY_PATH, is probed at its entry.
        assert_eq!(by_function(run, "wrapped.c")["parse_header"], (3200, 100), "{run:#}");
        let stack = stack_of(run, "parse_header")[0];
        let frames = functions(stack);
        assert_eq!(frames.last(), Some(&"_start"), "a full stack in each run: {frames:?}");
    }
}

#[test]
fn a_stripped_binary_is_named_through_its_debug_link() {
    let built = build_fixture("wrapped.c", NO_FP);
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = dir.path().join("wrapped");
    let debug = dir.path().join("wrapped.debug");
    std::fs::copy(&built, &binary).expect("copy");
    let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
        let status = std::process::Command::new(cmd).args(args).status().expect(cmd);
        assert!(status.success(), "{cmd} failed");
    };
    run("objcopy", &["--only-keep-debug".as_ref(), binary.as_os_str(), debug.as_os_str()]);
    run("strip", &["--strip-all".as_ref(), binary.as_os_str()]);
    let link = format!("--add-gnu-debuglink={}", debug.display());
    run("objcopy", &[link.as_ref(), binary.as_os_str()]);
    let report = report_json(&[binary.as_os_str()]);
    let process = &processes(&report)[0];
    assert_eq!(by_function(process, "wrapped.c")["cache_entry"], (12_800, 200), "{report:#}");
    let site = &stack_of(process, "cache_entry")[0]["site"];
    assert!(site["line"].as_u64().is_some(), "file and line from the debug file: {site:#}");
}

/// Removes a file when the test ends, passed or failed.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_stripped_binary_is_named_through_its_build_id_under_usr_lib_debug() {
    // A build id of this test's own, so the debug file it installs serves no other.
    const BUILD_ID: &str = "1eacb0d1d00dfeed5eed0000000000000000b001";
    let built =
        build_fixture("wrapped.c", &["-fomit-frame-pointer", &format!("-Wl,--build-id=0x{BUILD_ID}")]);
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = dir.path().join("wrapped_bid");
    std::fs::copy(&built, &binary).expect("copy");
    let debug_dir = std::path::Path::new("/usr/lib/debug/.build-id").join(&BUILD_ID[..2]);
    std::fs::create_dir_all(&debug_dir).expect("create the build-id directory");
    let debug = RemoveOnDrop(debug_dir.join(format!("{}.debug", &BUILD_ID[2..])));
    let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
        let status = std::process::Command::new(cmd).args(args).status().expect(cmd);
        assert!(status.success(), "{cmd} failed");
    };
    run("objcopy", &["--only-keep-debug".as_ref(), binary.as_os_str(), debug.0.as_os_str()]);
    // No debug link: the build id is the only way to the debug file.
    run("strip", &["--strip-all".as_ref(), binary.as_os_str()]);
    let report = report_json(&[binary.as_os_str()]);
    let process = &processes(&report)[0];
    assert_eq!(by_function(process, "wrapped.c")["cache_entry"], (12_800, 200), "{report:#}");
    let stack = stack_of(process, "cache_entry")[0];
    assert!(stack["site"]["line"].as_u64().is_some(), "file and line from the debug file: {stack:#}");
    assert_eq!(&functions(stack)[..3], &["xmalloc", "cache_entry", "serve"]);
}

#[test]
fn rust_names_are_demangled_and_sites_named_past_the_global_allocator() {
    let binary = common::build_rust_fixture("rust_leaks.rs");
    let report = report_json(&[binary.as_os_str()]);
    let process = &processes(&report)[0];
    assert_eq!(
        by_function(process, "rust_leaks.rs"),
        expected(&[
            ("rust_leaks::leak_boxes", 19_200, 400),
            ("rust_leaks::leak_vecs", 12_800, 100),
            // 1024 u64 pushed: the last of its reallocations holds 8 KiB.
            ("rust_leaks::leak_grown", 8192, 1),
        ]),
        "{report:#}"
    );
    for site in ["rust_leaks::leak_boxes", "rust_leaks::leak_vecs", "rust_leaks::leak_grown"] {
        let stacks = stack_of(process, site);
        assert_eq!(stacks.len(), 1, "{site}: {stacks:#?}");
        let frames = functions(stacks[0]);
        let at = frames.iter().position(|f| *f == site).expect("the site is a frame");
        assert_eq!(frames[at + 1], "rust_leaks::main", "{site}: {frames:?}");
    }
    // The vector's growth path stays in the full stack, below its site.
    let grown = functions(stack_of(process, "rust_leaks::leak_grown")[0]);
    assert!(grown[0].trim_start_matches('<').starts_with("alloc::raw_vec::"), "{grown:?}");
}
