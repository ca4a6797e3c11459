//! A V8 heap snapshot, parsed as it streams in (the inspector sends it as chunks of one
//! JSON document): the graph's numbers go straight into compact arrays, never into a
//! JSON tree, so a snapshot of a large heap costs leakmon about what its numbers do.
//!
//! The document: `{"snapshot": {"meta": {...}, ...}, "nodes": [..], "edges": [..],
//! ..., "strings": [..]}`. `meta` names the fields of a node and of an edge and the
//! names of their types; nodes and edges are flat arrays of those fields.

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

/// A parsed snapshot.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub meta: Meta,
    /// `meta.node_fields.len()` numbers per node.
    pub nodes: Vec<u32>,
    /// `meta.edge_fields.len()` numbers per edge; an edge's `to_node` is the index of
    /// the node's first field in `nodes`.
    pub edges: Vec<u32>,
    pub strings: Vec<String>,
}

/// Where each field is, and what the type numbers mean.
#[derive(Debug, Default, Clone)]
pub struct Meta {
    pub node_fields: usize,
    pub edge_fields: usize,
    pub node_type: usize,
    pub node_name: usize,
    pub node_id: usize,
    pub node_self_size: usize,
    pub node_edge_count: usize,
    pub edge_type: usize,
    pub edge_name: usize,
    pub edge_to: usize,
    pub node_types: Vec<String>,
    pub edge_types: Vec<String>,
}

impl Meta {
    fn from_json(snapshot: &Value) -> Result<Self> {
        let meta = &snapshot["meta"];
        let names = |key: &str| -> Result<Vec<String>> {
            meta[key]
                .as_array()
                .with_context(|| format!("the snapshot's meta has no {key}"))?
                .iter()
                .map(|v| v.as_str().map(str::to_owned).with_context(|| format!("a field of {key}")))
                .collect()
        };
        // The first entry of each `*_types` is the list of the type field's names.
        let types = |key: &str| -> Vec<String> {
            meta[key][0]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        let (node_fields, edge_fields) = (names("node_fields")?, names("edge_fields")?);
        let at = |fields: &[String], name: &str| {
            fields
                .iter()
                .position(|f| f == name)
                .with_context(|| format!("the snapshot's meta has no field {name}"))
        };
        Ok(Self {
            node_fields: node_fields.len(),
            edge_fields: edge_fields.len(),
            node_type: at(&node_fields, "type")?,
            node_name: at(&node_fields, "name")?,
            node_id: at(&node_fields, "id")?,
            node_self_size: at(&node_fields, "self_size")?,
            node_edge_count: at(&node_fields, "edge_count")?,
            edge_type: at(&edge_fields, "type")?,
            edge_name: at(&edge_fields, "name_or_index")?,
            edge_to: at(&edge_fields, "to_node")?,
            node_types: types("node_types"),
            edge_types: types("edge_types"),
        })
    }
}

/// Where the parser is in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the document's `{`.
    Start,
    /// Before a key, a `,` or the closing `}`.
    Keys,
    /// Inside a key.
    Key,
    /// After a key, before its `:` and value.
    Colon,
    /// Inside a value kept whole (`snapshot`) or skipped (anything unknown).
    Raw,
    /// Inside an array of numbers (`nodes`, `edges`).
    Numbers,
    /// Inside the array of strings, between strings.
    Strings,
    /// Inside one string of it.
    InString,
    Done,
}

/// Which array the numbers go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Nodes,
    Edges,
}

/// Feeds chunks of a snapshot's text in order; [`Parser::finish`] gives the snapshot.
#[derive(Debug)]
pub struct Parser {
    state: State,
    key: Vec<u8>,
    /// A raw value's text (kept only for `snapshot`), its depth, and string state.
    raw: Vec<u8>,
    keep_raw: bool,
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// The number being read, and whether one is.
    number: u64,
    digits: bool,
    target: Target,
    /// The string being read, with its quotes.
    string: Vec<u8>,
    out: Snapshot,
    meta: Option<Value>,
    /// Bytes read, bounded by the caller.
    pub read: u64,
}

impl Default for Parser {
    fn default() -> Self {
        Self {
            state: State::Start,
            key: Vec::new(),
            raw: Vec::new(),
            keep_raw: false,
            depth: 0,
            in_string: false,
            escaped: false,
            number: 0,
            digits: false,
            target: Target::Nodes,
            string: Vec::new(),
            out: Snapshot::default(),
            meta: None,
            read: 0,
        }
    }
}

impl Parser {
    /// The next chunk of text.
    pub fn feed(&mut self, chunk: &str) -> Result<()> {
        self.read += chunk.len() as u64;
        for &b in chunk.as_bytes() {
            self.byte(b)?;
        }
        Ok(())
    }

    fn byte(&mut self, b: u8) -> Result<()> {
        match self.state {
            State::Start => match b {
                b'{' => self.state = State::Keys,
                b if b.is_ascii_whitespace() => {}
                _ => bail!("a heap snapshot starts with an object"),
            },
            State::Keys => match b {
                b'"' => {
                    self.key.clear();
                    self.state = State::Key;
                }
                b'}' => self.state = State::Done,
                _ => {}
            },
            State::Key => match b {
                b'"' => self.state = State::Colon,
                _ => self.key.push(b),
            },
            State::Colon => match b {
                b':' => {}
                b if b.is_ascii_whitespace() => {}
                b'[' if matches!(self.key.as_slice(), b"nodes" | b"edges") => {
                    self.target = if self.key == b"nodes" { Target::Nodes } else { Target::Edges };
                    self.state = State::Numbers;
                }
                b'[' if self.key == b"strings" => self.state = State::Strings,
                _ => {
                    self.keep_raw = self.key == b"snapshot";
                    self.raw.clear();
                    self.depth = 0;
                    self.in_string = false;
                    self.escaped = false;
                    self.state = State::Raw;
                    self.raw_byte(b)?;
                }
            },
            State::Raw => self.raw_byte(b)?,
            State::Numbers => match b {
                b'0'..=b'9' => {
                    self.number = self.number.saturating_mul(10).saturating_add(u64::from(b - b'0'));
                    self.digits = true;
                }
                b',' | b']' => {
                    if self.digits {
                        let n = u32::try_from(self.number).unwrap_or(u32::MAX);
                        match self.target {
                            Target::Nodes => self.out.nodes.push(n),
                            Target::Edges => self.out.edges.push(n),
                        }
                    }
                    self.number = 0;
                    self.digits = false;
                    if b == b']' {
                        self.state = State::Keys;
                    }
                }
                b if b.is_ascii_whitespace() => {}
                _ => bail!("a heap snapshot's {:?} holds something else than numbers", self.target),
            },
            State::Strings => match b {
                b'"' => {
                    self.string.clear();
                    self.string.push(b);
                    self.escaped = false;
                    self.state = State::InString;
                }
                b']' => self.state = State::Keys,
                _ => {}
            },
            State::InString => {
                self.string.push(b);
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    let text = std::str::from_utf8(&self.string).context("a snapshot string is not UTF-8")?;
                    self.out.strings.push(serde_json::from_str(text).context("a snapshot string")?);
                    self.state = State::Strings;
                }
            }
            State::Done => {}
        }
        Ok(())
    }

    /// A byte of a value kept whole or skipped: it ends at the end of its outermost
    /// object or array (or at a `,` or `}` after a scalar).
    fn raw_byte(&mut self, b: u8) -> Result<()> {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            }
        } else {
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' if self.depth > 0 => self.depth -= 1,
                b',' | b'}' if self.depth == 0 => {
                    // A scalar ended; the byte is the document's.
                    self.end_raw()?;
                    return self.byte(b);
                }
                _ => {}
            }
        }
        if self.keep_raw {
            self.raw.push(b);
        }
        if self.depth == 0 && !self.in_string && matches!(b, b'}' | b']') {
            self.end_raw()?;
        }
        Ok(())
    }

    fn end_raw(&mut self) -> Result<()> {
        if self.keep_raw {
            self.meta = Some(serde_json::from_slice(&self.raw).context("the snapshot's meta")?);
            self.raw = Vec::new();
        }
        self.state = State::Keys;
        Ok(())
    }

    /// The snapshot, once the whole document was fed.
    pub fn finish(self) -> Result<Snapshot> {
        if self.state != State::Done {
            bail!("the heap snapshot ended early");
        }
        let meta = self.meta.context("the heap snapshot has no meta")?;
        let mut out = self.out;
        out.meta = Meta::from_json(&meta)?;
        if !out.nodes.len().is_multiple_of(out.meta.node_fields.max(1))
            || !out.edges.len().is_multiple_of(out.meta.edge_fields.max(1))
        {
            bail!("the heap snapshot's nodes or edges are cut");
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A snapshot of four nodes: the root, a context holding `cache`, the cache object
    /// holding one entry, and a string.
    pub(crate) const SMALL: &str = r#"{"snapshot":{"meta":{"node_fields":["type","name","id","self_size","edge_count","trace_node_id","detachedness"],"node_types":[["hidden","array","string","object","code","closure","regexp","number","native","synthetic","concatenated string","sliced string","symbol","bigint","object shape"],"string","number","number","number","number","number"],"edge_fields":["type","name_or_index","to_node"],"edge_types":[["context","element","property","internal","hidden","shortcut","weak"],"string_or_number","node"],"trace_function_info_fields":[],"location_fields":[]},"node_count":4,"edge_count":3,"trace_function_count":0},
"nodes":[9,0,1,0,1,0,0
,0,1,3,40,1,0,0
,3,2,101,56,1,0,0
,2,4,103,24,0,0,0],
"edges":[3,3,7
,0,5,14
,2,6,21],
"trace_function_infos":[],"trace_tree":[],"samples":[],"locations":[],
"strings":["(GC roots)","system / Context","Object","closure \"x\\\"y\"","user-1","cache","key-1"]}"#;

    #[test]
    fn a_snapshot_parses_however_it_is_cut() {
        for cut in [1, 2, 3, 7, 64, 1000, SMALL.len()] {
            let mut parser = Parser::default();
            let mut rest = SMALL;
            while !rest.is_empty() {
                let mut at = cut.min(rest.len());
                while !rest.is_char_boundary(at) {
                    at += 1;
                }
                parser.feed(&rest[..at]).expect("feeds");
                rest = &rest[at..];
            }
            let s = parser.finish().expect("parses");
            assert_eq!(s.nodes.len(), 28, "cut {cut}");
            assert_eq!(s.edges, [3, 3, 7, 0, 5, 14, 2, 6, 21], "cut {cut}");
            assert_eq!(s.strings[3], "closure \"x\\\"y\"", "escapes decoded");
            assert_eq!(s.strings[5], "cache");
            assert_eq!(s.meta.node_fields, 7);
            assert_eq!(s.meta.node_id, 2);
            assert_eq!(s.meta.edge_to, 2);
            assert_eq!(s.meta.edge_types[0], "context");
            assert_eq!(s.meta.node_types[3], "object");
        }
    }

    #[test]
    fn a_cut_snapshot_is_an_error() {
        let mut parser = Parser::default();
        parser.feed(&SMALL[..SMALL.len() / 2]).expect("feeds");
        assert!(parser.finish().is_err());
    }
}
