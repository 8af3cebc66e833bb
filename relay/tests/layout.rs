//! The relay's module layout, checked from its source: the store at the bottom imports nothing else of the
//! relay, and no import circle runs between the top-level modules. (Inside `core/`, the files are one type's
//! concerns and call each other freely.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its files name as `crate::X`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let module = first.trim_end_matches(".rs").to_string();
            if module == "lib" || module == "main" {
                continue;
            }
            // Code only: comments may name other modules in words.
            let text: String = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            let deps = graph.entry(module.clone()).or_default();
            for (at, _) in text.match_indices("crate::") {
                let name: String = text[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // Only the relay's own modules: `crate::` also opens paths to items of lib.rs.
                let known = src.join(format!("{name}.rs")).exists() || src.join(&name).is_dir();
                if !name.is_empty() && name != module && known {
                    deps.insert(name);
                }
            }
        }
    }
    graph
}

#[test]
fn the_store_imports_nothing_else_of_the_relay() {
    let graph = imports();
    assert_eq!(
        graph.get("store").cloned().unwrap_or_default(),
        BTreeSet::new(),
        "the storage layer must know records, not the code that uses them"
    );
}

#[test]
fn no_import_circle_between_the_relays_modules() {
    let graph = imports();
    // Depth-first search for a back edge; the path to it is the circle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(node) {
            return;
        }
        if let Some(at) = path.iter().position(|n| n == node) {
            panic!("import circle: {} -> {node}", path[at..].join(" -> "));
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(node.to_string());
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done);
    }
    // The layering the relay is built on, bottom up.
    assert!(graph["core"].contains("store"));
    assert!(!graph["core"].contains("endpoint") && !graph["core"].contains("admin"));
    assert!(!graph["durable"].contains("core"));
}
