//! The modules of `src/` import each other without a circle, and the cluster core stays on a
//! low floor: a change that makes `relay` reach a driver, a socket or the node fails here.
//!
//! A module's imports are the `crate::<module>` paths in its code (comments, and so doc links,
//! do not count); `relay_tests.rs` and `engine_tests.rs` count as part of their module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module -> the modules its code names.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files: Vec<(String, String)> = std::fs::read_dir(&src)
        .expect("src")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_stem()?.to_str()?.to_string();
            (path.extension()? == "rs").then(|| (name, std::fs::read_to_string(&path).ok()))
        })
        .filter_map(|(name, text)| Some((name, text?)))
        .collect();
    let modules: BTreeSet<String> = files.iter().map(|(n, _)| n.clone()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, text) in &files {
        if name == "lib" || name == "main" {
            continue;
        }
        let owner = name.strip_suffix("_tests").unwrap_or(name).to_string();
        let code: String = text
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let deps = graph.entry(owner.clone()).or_default();
        let mut rest = code.as_str();
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                group[..end]
                    .split(',')
                    .map(|p| p.trim().split("::").next().unwrap_or(""))
                    .collect()
            } else {
                vec![
                    rest.split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next()
                        .unwrap_or(""),
                ]
            };
            for n in names {
                if modules.contains(n) && n != owner {
                    deps.insert(n.to_string());
                }
            }
        }
    }
    graph
}

/// The modules `from` reaches by imports, itself excluded unless a circle leads back.
fn reach(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<&str> = graph[from].iter().map(String::as_str).collect();
    while let Some(m) = todo.pop() {
        if seen.insert(m.to_string())
            && let Some(next) = graph.get(m)
        {
            todo.extend(next.iter().map(String::as_str));
        }
    }
    seen
}

#[test]
fn no_module_imports_itself_through_others() {
    let graph = imports();
    assert!(graph.len() > 20, "found the modules: {:?}", graph.keys());
    let circles: Vec<String> = graph
        .keys()
        .filter(|m| reach(&graph, m).contains(*m))
        .map(|m| format!("{m} -> {:?}", graph[m]))
        .collect();
    assert!(
        circles.is_empty(),
        "modules in a circle:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_cluster_core_depends_on_no_driver_socket_or_node() {
    let graph = imports();
    let below = reach(&graph, "relay");
    for forbidden in [
        "driver",
        "node",
        "peer",
        "session",
        "http",
        "serve",
        "state",
        "membership",
        "gossip",
        "transport",
        "outbox",
    ] {
        assert!(
            !below.contains(forbidden),
            "relay reaches {forbidden} (it reaches {below:?})"
        );
    }
    for floor in ["uid", "clock"] {
        assert!(
            graph[floor].is_empty(),
            "{floor} imports {:?}",
            graph[floor]
        );
    }
}
