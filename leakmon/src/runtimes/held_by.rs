//! What holds a runtime's objects, as each runtime's method finds it (Node.js's heap
//! snapshots, the JVM's JFR paths to GC roots): the variable or field, the path from it
//! and the objects' type, with their bytes.

use std::time::Duration;

use serde::Serialize;

/// Objects one variable keeps, of one type.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Holder {
    pub bytes: u64,
    pub objects: u64,
    /// The objects' type: a constructor's name (`Object`, `Array`, `Map`), or
    /// `(string)`, `(closure)`, ... for V8's other kinds.
    #[serde(rename = "type")]
    pub kind: String,
    pub root: Root,
    /// The edges from the variable to one of the objects (the first found), by name.
    pub path: Vec<Step>,
}

/// The variable.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Root {
    /// `closure` (a context slot: a closure's or module's variable), `global` (a
    /// property of the global object), `property` (the outermost named property on
    /// the path, where no variable is), `gc-root` (V8's own roots); `static` (a
    /// class's static field, `Class.FIELD`), `thread` (a thread's stack, where JFR's
    /// path starts at a local) or the JVM's other roots; in CPython `global` (a
    /// module's variable), `class` (`Class.attr`) or `local` (a frame's variable).
    pub kind: &'static str,
    pub name: String,
    /// Where the variable is: a Python global's module, a Python local's function.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    pub name: String,
}

/// Holders kept, the largest.
pub const MAX_HOLDERS: usize = 20;

/// What holds a window's objects in one process.
#[derive(Debug)]
pub struct Found {
    pub holders: Vec<Holder>,
    pub bytes: u64,
    pub objects: u64,
    /// The longest the process was held still for it.
    pub pause: Duration,
    /// The heap's size before the last look, where known.
    pub heap_used: u64,
    /// How the objects were found, for the report's note.
    pub how: String,
}
