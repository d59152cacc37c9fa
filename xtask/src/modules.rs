//! `cargo xtask check-modules`: no dependency cycles between sibling modules.
//!
//! Every library and binary crate's non-test source is read; each `use` tree and each
//! `crate::`/`super::`/`self::` path names a module. An edge from module A to module B
//! counts at the level where the two part: between the children of their closest common
//! ancestor that hold them (a child using its parent, or a parent its child, is no edge).
//! A strongly connected set of two or more modules is a cycle, and the check fails naming it.
//! Test modules (`#[cfg(test)]` and what follows it in a file) are not read.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context};

use crate::sh;

/// The crates checked, with their roots (relative to the workspace).
const CRATES: &[(&str, &str)] = &[
    ("agent", "agent/src/lib.rs"),
    ("agent(bin)", "agent/src/main.rs"),
    ("blockhash", "blockhash/src/lib.rs"),
    ("lockstep-lru", "lockstep-lru/src/lib.rs"),
    ("nas-client", "nas-client/src/lib.rs"),
    ("nas-proto", "nas-proto/src/lib.rs"),
    ("nas-server", "nas-server/src/lib.rs"),
    ("nas-server(bin)", "nas-server/src/main.rs"),
    ("testkit", "testkit/src/lib.rs"),
    ("xtask", "xtask/src/main.rs"),
];

/// A module path inside a crate: `[]` is the root.
type ModPath = Vec<String>;

pub fn run() -> anyhow::Result<()> {
    let root = sh::workspace_root();
    let mut failures = Vec::new();
    for (name, lib) in CRATES {
        let modules = read_crate(&root.join(lib))?;
        for cycle in cycles(&modules) {
            failures.push(format!("{name}: {}", cycle.join(" <-> ")));
        }
        eprintln!(
            "check-modules: {name}: {} modules, no cycles",
            modules.len()
        );
    }
    if !failures.is_empty() {
        bail!("module dependency cycles:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// Every module of the crate rooted at `root_file`, with the modules its code names.
fn read_crate(root_file: &Path) -> anyhow::Result<BTreeMap<ModPath, BTreeSet<ModPath>>> {
    let mut files: Vec<(ModPath, PathBuf)> = vec![(Vec::new(), root_file.to_path_buf())];
    let mut sources = BTreeMap::new();
    while let Some((path, file)) = files.pop() {
        let text =
            fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let code = without_tests(&text);
        let dir = module_dir(&file, path.is_empty());
        for child in declared_modules(&code) {
            let mut child_path = path.clone();
            child_path.push(child.clone());
            let flat = dir.join(format!("{child}.rs"));
            let nested = dir.join(&child).join("mod.rs");
            match (flat.is_file(), nested.is_file()) {
                (true, _) => files.push((child_path, flat)),
                (_, true) => files.push((child_path, nested)),
                // An inline module: part of this file's text.
                _ => {}
            }
        }
        sources.insert(path, code);
    }
    let known: BTreeSet<ModPath> = sources.keys().cloned().collect();
    Ok(sources
        .iter()
        .map(|(path, code)| {
            let named = named_paths(code)
                .into_iter()
                .filter_map(|p| resolve(path, &p, &known))
                .filter(|target| target != path)
                .collect();
            (path.clone(), named)
        })
        .collect())
}

/// A file's text before its test module.
fn without_tests(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("#[cfg(test)]") {
            break;
        }
        // Comments name paths in prose only.
        let code = line.split("//").next().unwrap_or("");
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Where the files of a module's children live.
fn module_dir(file: &Path, is_root: bool) -> PathBuf {
    let parent = file.parent().expect("a source file has a directory");
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if is_root || stem == "mod" {
        parent.to_path_buf()
    } else {
        parent.join(stem)
    }
}

/// `mod x;` and `pub mod x;` declarations (any visibility).
fn declared_modules(code: &str) -> Vec<String> {
    code.lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line.strip_prefix("mod ").or_else(|| {
                line.strip_prefix("pub")
                    .and_then(|r| r.split_once("mod ").map(|(_, m)| m))
            })?;
            let name = rest.strip_suffix(';')?;
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
                .then(|| name.to_string())
        })
        .collect()
}

/// Every path the code names that starts with `crate`, `super` or `self`: the leaves of `use`
/// trees, and qualified paths in expressions and types.
fn named_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        let tail = &rest[at + 4..];
        let Some(end) = tail.find(';') else { break };
        if before.is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_') {
            use_tree(&tail[..end], &mut Vec::new(), &mut paths);
        }
        rest = &tail[end..];
    }
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if at > 0
                && (bytes[at - 1].is_ascii_alphanumeric()
                    || bytes[at - 1] == b'_'
                    || bytes[at - 1] == b':')
            {
                continue;
            }
            let path: String = code[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            paths.push(
                path.split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
            );
        }
    }
    paths
}

/// Expands one `use` tree (`a::{b, c::{d}}`) into its full paths.
fn use_tree(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim_end_matches(':').trim();
        let depth = prefix.len();
        prefix.extend(
            head.split("::")
                .filter(|s| !s.is_empty())
                .map(|s| s.trim().to_string()),
        );
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        for part in split_top_level(inner) {
            use_tree(part, prefix, out);
        }
        prefix.truncate(depth);
    } else if !tree.is_empty() {
        let name = tree.split(" as ").next().unwrap_or(tree).trim();
        let mut path = prefix.clone();
        path.extend(name.split("::").map(|s| s.trim().to_string()));
        out.push(path);
    }
}

/// Splits at the commas that are not inside braces.
fn split_top_level(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// The module a path written in module `from` names: the longest known module prefix.
fn resolve(from: &ModPath, path: &[String], known: &BTreeSet<ModPath>) -> Option<ModPath> {
    let mut segments = path.iter();
    let mut base = match segments.next()?.as_str() {
        "crate" => Vec::new(),
        "self" => from.clone(),
        "super" => {
            let mut b = from.clone();
            b.pop()?;
            b
        }
        _ => return None,
    };
    let mut rest: Vec<&String> = segments.collect();
    while rest.first().is_some_and(|s| s.as_str() == "super") {
        base.pop()?;
        rest.remove(0);
    }
    let mut best = base.clone();
    for seg in rest {
        base.push(seg.clone());
        if known.contains(&base) {
            best = base.clone();
        } else {
            break;
        }
    }
    Some(best)
}

/// The cycles among sibling modules, each as its members' paths.
fn cycles(modules: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<Vec<String>> {
    let mut edges: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for (from, targets) in modules {
        for to in targets {
            let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue;
            }
            edges
                .entry(from[..=common].to_vec())
                .or_default()
                .insert(to[..=common].to_vec());
        }
    }
    strongly_connected(&edges)
        .into_iter()
        .filter(|scc| scc.len() > 1)
        .map(|scc| {
            scc.iter()
                .map(|p| format!("crate::{}", p.join("::")))
                .collect()
        })
        .collect()
}

/// Tarjan's algorithm, iteratively small enough to recurse: module graphs have tens of nodes.
fn strongly_connected(edges: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<Vec<ModPath>> {
    struct State<'a> {
        edges: &'a BTreeMap<ModPath, BTreeSet<ModPath>>,
        index: BTreeMap<&'a ModPath, (usize, usize)>,
        stack: Vec<&'a ModPath>,
        on_stack: BTreeSet<&'a ModPath>,
        next: usize,
        out: Vec<Vec<ModPath>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a ModPath) {
        s.index.insert(v, (s.next, s.next));
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(targets) = s.edges.get(v) {
            for w in targets {
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let low_w = s.index[w].1;
                    let e = s.index.get_mut(v).expect("visited");
                    e.1 = e.1.min(low_w);
                } else if s.on_stack.contains(w) {
                    let idx_w = s.index[w].0;
                    let e = s.index.get_mut(v).expect("visited");
                    e.1 = e.1.min(idx_w);
                }
            }
        }
        let (idx, low) = s.index[v];
        if idx == low {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                scc.push(w.clone());
                if w == v {
                    break;
                }
            }
            s.out.push(scc);
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    let nodes: BTreeSet<&ModPath> = edges.keys().chain(edges.values().flatten()).collect();
    for v in nodes {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ModPath {
        s.split("::")
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn use_trees_expand_to_full_paths() {
        let code = "use crate::{a::{b, c::D}, e as f};\npub(crate) use super::g::H;\nlet x = crate::z::w();";
        let paths: BTreeSet<String> = named_paths(code).iter().map(|p| p.join("::")).collect();
        for want in [
            "crate::a::b",
            "crate::a::c::D",
            "crate::e",
            "super::g::H",
            "crate::z::w",
        ] {
            assert!(paths.contains(want), "{want} in {paths:?}");
        }
    }

    #[test]
    fn finds_a_cycle_between_siblings_but_not_parent_and_child() {
        let known: BTreeSet<ModPath> = ["", "a", "a::x", "b", "c"].iter().map(|s| p(s)).collect();
        let uses = |modules: &mut BTreeMap<ModPath, BTreeSet<ModPath>>, from: &str, path: &str| {
            let path: Vec<String> = path.split("::").map(str::to_string).collect();
            let to = resolve(&p(from), &path, &known).unwrap();
            modules.entry(p(from)).or_default().insert(to);
        };
        let mut modules = BTreeMap::new();
        uses(&mut modules, "a::x", "super::Thing"); // child -> parent: no edge
        uses(&mut modules, "a", "self::x::Y"); // parent -> child: no edge
        uses(&mut modules, "a::x", "crate::b::f"); // a -> b
        uses(&mut modules, "c", "crate::a::x::g"); // c -> a
        assert!(cycles(&modules).is_empty());
        uses(&mut modules, "b", "crate::a::Z"); // b -> a: a cycle
        let found = cycles(&modules);
        assert_eq!(
            found,
            vec![vec!["crate::b".to_string(), "crate::a".to_string()]]
        );
    }
}
