//! What holds the objects a window left alive, from a heap snapshot: each object's
//! shortest retaining path (breadth first, weak edges left out), from the global
//! objects first and only then from V8's own roots, as DevTools' distances are: a
//! string a cache holds as a key is in V8's string table too, and is the cache's.
//! On that path, the variable that keeps it: the nearest edge
//! to the object that names one (a context slot: a closure's or a module's variable,
//! `cache`; else a property of the global object). Objects are grouped by that
//! variable and their type.

use std::collections::{HashMap, VecDeque};

use super::snapshot::Snapshot;
pub use crate::runtimes::held_by::{Holder, Root, Step};

pub use crate::runtimes::held_by::MAX_HOLDERS;
/// Steps kept of a path.
const MAX_STEPS: usize = 12;

/// The holders of the objects whose id is above `baseline` (allocated since the
/// window began, and alive at its end), largest first; and their bytes and number.
pub fn held(s: &Snapshot, baseline: u64) -> (Vec<Holder>, u64, u64) {
    let m = &s.meta;
    let count = s.nodes.len() / m.node_fields.max(1);
    let field = |node: usize, f: usize| s.nodes[node * m.node_fields + f];
    // Each node's first edge.
    let mut first = Vec::with_capacity(count + 1);
    let mut at = 0usize;
    for n in 0..count {
        first.push(at);
        at += field(n, m.node_edge_count) as usize;
    }
    first.push(at);
    let edges = s.edges.len() / m.edge_fields.max(1);
    let edge = |e: usize, f: usize| s.edges[e * m.edge_fields + f];
    let edge_type = |e: usize| m.edge_types.get(edge(e, m.edge_type) as usize).map_or("", String::as_str);
    let node_type = |n: usize| m.node_types.get(field(n, m.node_type) as usize).map_or("", String::as_str);
    // Breadth first: each node's parent edge. From the root's children that are the
    // program's (its global objects) first, then from the root for the rest.
    let mut parent: Vec<Option<(u32, u32)>> = vec![None; count];
    let mut seen = vec![false; count];
    let mut bfs = |starts: Vec<(usize, Option<(u32, u32)>)>, seen: &mut Vec<bool>| {
        let mut queue = VecDeque::new();
        for (n, from) in starts {
            if n < count && !seen[n] {
                seen[n] = true;
                parent[n] = from;
                queue.push_back(n);
            }
        }
        while let Some(n) = queue.pop_front() {
            for e in first[n]..first[n + 1].min(edges) {
                if edge_type(e) == "weak" {
                    continue;
                }
                let to = edge(e, m.edge_to) as usize / m.node_fields.max(1);
                if to < count && !seen[to] {
                    seen[to] = true;
                    parent[to] = Some((n as u32, e as u32));
                    queue.push_back(to);
                }
            }
        }
    };
    if count > 0 {
        seen[0] = true;
        let user: Vec<(usize, Option<(u32, u32)>)> = (first[0]..first[1].min(edges))
            .filter(|&e| edge_type(e) != "weak")
            .map(|e| (edge(e, m.edge_to) as usize / m.node_fields.max(1), Some((0, e as u32))))
            .filter(|&(n, _)| n < count && node_type(n) != "synthetic")
            .collect();
        bfs(user, &mut seen);
        seen[0] = false;
        bfs(vec![(0, None)], &mut seen);
    }
    let string = |i: u32| s.strings.get(i as usize).map_or("", String::as_str);
    let edge_name = |e: usize| -> String {
        match edge_type(e) {
            "element" | "hidden" => format!("[{}]", edge(e, m.edge_name)),
            _ => string(edge(e, m.edge_name)).to_owned(),
        }
    };
    let global = |n: usize| {
        node_type(n) == "object" && {
            let name = string(field(n, m.node_name));
            name == "global" || name.starts_with("global /") || name.starts_with("Window")
        }
    };
    let mut groups: HashMap<(Root, u32, String), Holder> = HashMap::new();
    let (mut total, mut objects) = (0u64, 0u64);
    let reached: Vec<usize> = (1..count).filter(|&n| seen[n]).collect();
    for n in reached {
        if u64::from(field(n, m.node_id)) <= baseline || matches!(node_type(n), "hidden" | "synthetic") {
            continue;
        }
        let size = u64::from(field(n, m.node_self_size));
        total += size;
        objects += 1;
        // Up the path, nearest edge first.
        let mut path: Vec<usize> = Vec::new();
        let mut root = None;
        // The node the variable belongs to: variables of one name in two scopes are two.
        let mut scope = 0u32;
        let mut outermost_property = None;
        let mut at = n;
        while let Some((from, e)) = parent[at] {
            let e = e as usize;
            match edge_type(e) {
                "context" => {
                    root = Some(Root { kind: "closure", name: edge_name(e), scope: None });
                    scope = from;
                    break;
                }
                "property" if global(from as usize) => {
                    root = Some(Root { kind: "global", name: edge_name(e), scope: None });
                    scope = from;
                    break;
                }
                "property" => outermost_property = Some((e, path.len())),
                _ => {}
            }
            path.push(e);
            at = from as usize;
        }
        let root = root
            .or_else(|| {
                outermost_property.map(|(e, _)| Root { kind: "property", name: edge_name(e), scope: None })
            })
            .unwrap_or(Root { kind: "gc-root", name: String::new(), scope: None });
        let kind = match node_type(n) {
            "object" | "native" => string(field(n, m.node_name)).to_owned(),
            other => format!("({other})"),
        };
        let group = groups.entry((root.clone(), scope, kind.clone())).or_insert_with(|| Holder {
            bytes: 0,
            objects: 0,
            kind,
            root,
            path: path.iter().rev().take(MAX_STEPS).map(|&e| Step { name: edge_name(e) }).collect(),
        });
        group.bytes += size;
        group.objects += 1;
    }
    let mut out: Vec<Holder> = groups.into_values().collect();
    out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.root.name.cmp(&b.root.name)));
    out.truncate(MAX_HOLDERS);
    (out, total, objects)
}

#[cfg(test)]
mod tests {
    use super::super::snapshot::{tests::SMALL, Parser};
    use super::*;

    /// The cache object and its entry were made in the window (ids above 100): both
    /// are held by the context variable `cache`; the entry's path goes through it.
    #[test]
    fn objects_of_the_window_are_held_by_the_variable_nearest_them() {
        let mut parser = Parser::default();
        parser.feed(SMALL).expect("feeds");
        let snapshot = parser.finish().expect("parses");
        let (holders, bytes, objects) = held(&snapshot, 100);
        assert_eq!((bytes, objects), (56 + 24, 2));
        let cache = Root { kind: "closure", name: "cache".into(), scope: None };
        assert_eq!(holders.len(), 2);
        assert_eq!(holders[0].root, cache);
        assert_eq!((holders[0].kind.as_str(), holders[0].bytes), ("Object", 56));
        assert_eq!(holders[1].root, cache);
        assert_eq!((holders[1].kind.as_str(), holders[1].bytes), ("(string)", 24));
        assert_eq!(holders[1].path, [Step { name: "key-1".into() }]);
        // Older objects are not the window's.
        assert_eq!(held(&snapshot, 103).1, 0);
    }
}
