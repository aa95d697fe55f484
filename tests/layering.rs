//! The layering of ARCHITECTURE.md, checked on the source. The allowed imports come from one place: the
//! layer table in ARCHITECTURE.md ("## Layers"), parsed here. For every file of `src/` this test collects
//! the modules it names (`crate::…`, `super::…`, `self::…`, a child module's `name::…`; `retinaface::…` in
//! `src/bin/`), resolves each to the file defining it, and asserts:
//! - every file belongs to a layer of the table, and each of its references lands in its own module, or in
//!   a layer its row lists (code under `#[cfg(test)]` is exempt, as `tests/` is);
//! - the top-level modules of `src/` import each other without a cycle;
//! - the files of `src/cpu` import each other without a cycle (the fast paths and the dispatch apart).
//!
//! Comments, doc comments and string literals are not code: a doc link to an upper layer is no import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const ARCHITECTURE: &str = include_str!("../ARCHITECTURE.md");

struct Layer {
    name: String,
    /// Files (`src/x.rs`) and directories (`src/x/`).
    paths: Vec<String>,
    may_import: BTreeSet<String>,
}

/// The table under "## Layers": `| layer | files | may import |`, top to bottom. "May import" lists layer
/// names; "every layer below" stands for all the rows under it.
fn layers(doc: &str) -> Vec<Layer> {
    let section = doc.split("\n## Layers").nth(1).expect("ARCHITECTURE.md has a \"## Layers\" section");
    let rows: Vec<Vec<String>> = section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|l| l.trim().trim_matches('|').split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    assert!(!rows.is_empty(), "no layer table under \"## Layers\"");
    let names: Vec<String> = rows.iter().map(|r| r[0].clone()).collect();
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            assert_eq!(r.len(), 3, "layer row {r:?}: expected | layer | files | may import |");
            let paths: Vec<String> = r[1].split('`').skip(1).step_by(2).map(str::to_string).collect();
            assert!(!paths.is_empty(), "layer {}: no `src/...` paths", r[0]);
            let mut may_import = BTreeSet::new();
            for item in r[2].split(',').map(str::trim) {
                if item == "every layer below" {
                    may_import.extend(names[i + 1..].iter().cloned());
                } else {
                    assert!(names.contains(&item.to_string()), "layer {}: `{item}` is not a layer of the table", r[0]);
                    may_import.insert(item.to_string());
                }
            }
            Layer { name: r[0].clone(), paths, may_import }
        })
        .collect()
}

/// The source with comments, string and char literals blanked (same length in lines, for messages).
fn code_only(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |out: &mut String, s: &[char]| out.extend(s.iter().map(|&ch| if ch == '\n' { '\n' } else { ' ' }));
    while i < c.len() {
        let rest = &c[i..];
        let starts = |p: &str| rest.iter().take(p.chars().count()).copied().eq(p.chars());
        let len = if starts("//") {
            rest.iter().position(|&ch| ch == '\n').unwrap_or(rest.len())
        } else if starts("/*") {
            let (mut depth, mut j) = (0usize, 0);
            loop {
                if j + 1 >= rest.len() {
                    break rest.len();
                } else if rest[j] == '/' && rest[j + 1] == '*' {
                    depth += 1;
                    j += 2;
                } else if rest[j] == '*' && rest[j + 1] == '/' {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break j;
                    }
                } else {
                    j += 1;
                }
            }
        } else if let Some(len) = raw_string(rest) {
            len
        } else if rest[0] == '"' || (rest[0] == 'b' && rest.get(1) == Some(&'"')) {
            let mut j = if rest[0] == 'b' { 2 } else { 1 };
            while j < rest.len() && rest[j] != '"' {
                j += if rest[j] == '\\' { 2 } else { 1 };
            }
            j + 1
        } else if rest[0] == '\'' && rest.get(1) == Some(&'\\') {
            rest.iter().skip(2).position(|&ch| ch == '\'').map_or(rest.len(), |p| p + 3)
        } else if rest[0] == '\'' && rest.get(2) == Some(&'\'') {
            3
        } else {
            out.push(rest[0]);
            i += 1;
            continue;
        };
        let len = len.min(rest.len());
        blank(&mut out, &rest[..len]);
        i += len;
    }
    out
}

/// The length of a raw string literal (`r"…"`, `r#"…"#`, `br"…"`) starting here, if one does.
fn raw_string(s: &[char]) -> Option<usize> {
    let mut j = usize::from(s.first() == Some(&'b'));
    if s.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = s[j..].iter().take_while(|&&ch| ch == '#').count();
    j += hashes;
    if s.get(j) != Some(&'"') {
        return None;
    }
    let close: Vec<char> = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
    (j + 1..s.len()).find(|&k| s[k..].starts_with(&close)).map(|k| k + close.len())
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Punct(&'static str),
    Other,
}

fn tokens(code: &str) -> Vec<Tok> {
    let c: Vec<char> = code.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch.is_alphanumeric() || ch == '_' || ch == '$' {
            let j = (i + 1..c.len()).find(|&j| !(c[j].is_alphanumeric() || c[j] == '_')).unwrap_or(c.len());
            let word: String = c[i..j].iter().collect();
            toks.push(Tok::Ident(word.trim_start_matches('$').to_string()));
            i = j;
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            toks.push(Tok::Punct("::"));
            i += 2;
        } else {
            toks.push(match ch {
                '{' => Tok::Punct("{"),
                '}' => Tok::Punct("}"),
                ',' => Tok::Punct(","),
                ';' => Tok::Punct(";"),
                '*' => Tok::Punct("*"),
                '#' => Tok::Punct("#"),
                '[' => Tok::Punct("["),
                ']' => Tok::Punct("]"),
                '(' => Tok::Punct("("),
                ')' => Tok::Punct(")"),
                _ => Tok::Other,
            });
            i += 1;
        }
    }
    toks
}

/// The tokens without the items under `#[cfg(test)]`, and the names of test modules kept in their own
/// files (`#[cfg(test)] mod tests;`).
fn without_test_items(toks: Vec<Tok>) -> (Vec<Tok>, Vec<String>) {
    let id = |s: &str| Tok::Ident(s.to_string());
    let p = Tok::Punct;
    let cfg_test = [p("#"), p("["), id("cfg"), p("("), id("test"), p(")"), p("]")];
    let (mut out, mut test_mods) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < toks.len() {
        if !toks[i..].starts_with(&cfg_test) {
            out.push(toks[i].clone());
            i += 1;
            continue;
        }
        // The item runs to its first `;` outside braces, or to the end of its first brace block.
        let mut j = i + cfg_test.len();
        let mut depth = 0usize;
        while j < toks.len() {
            match &toks[j] {
                Tok::Punct(";") if depth == 0 => break,
                Tok::Punct("{") => depth += 1,
                Tok::Punct("}") if depth == 0 => break,
                Tok::Punct("}") => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            j += 1;
        }
        let item = &toks[i + cfg_test.len()..j.min(toks.len())];
        if let [Tok::Ident(m), Tok::Ident(name)] | [Tok::Ident(_), Tok::Ident(m), Tok::Ident(name)] = item
            && m == "mod"
        {
            test_mods.push(name.clone());
        }
        i = j + 1;
    }
    (out, test_mods)
}

/// Every path a use tree or expression starting at `toks[i]` names, as segments.
fn parse_tree(toks: &[Tok], mut i: usize, mut path: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    loop {
        match toks.get(i) {
            Some(Tok::Ident(s)) => {
                path.push(s.clone());
                i += 1;
            }
            Some(Tok::Punct("*")) => {
                out.push(path);
                return i + 1;
            }
            Some(Tok::Punct("{")) => {
                i += 1;
                while i < toks.len() && toks[i] != Tok::Punct("}") {
                    i = parse_tree(toks, i, path.clone(), out);
                    // Skip `as name` and anything else up to the next item of the group.
                    while i < toks.len() && !matches!(toks[i], Tok::Punct(",") | Tok::Punct("}")) {
                        i += 1;
                    }
                    if toks.get(i) == Some(&Tok::Punct(",")) {
                        i += 1;
                    }
                }
                return i + 1;
            }
            _ => break,
        }
        if toks.get(i) == Some(&Tok::Punct("::")) {
            i += 1;
        } else {
            break;
        }
    }
    out.push(path);
    i
}

/// `src/a/b.rs` and `src/a/b/mod.rs` → ["a", "b"]; `src/lib.rs` → []; `src/bin/x.rs` → ["bin", "x"].
fn module_of(file: &str) -> Vec<String> {
    let rel = file.strip_prefix("src/").expect("a file under src/").strip_suffix(".rs").expect("a .rs file");
    let mut m: Vec<String> = rel.split('/').map(str::to_string).collect();
    if m.last().is_some_and(|l| l == "mod") || m == ["lib"] {
        m.pop();
    }
    m
}

struct Source {
    files: BTreeMap<String, String>,
}

impl Source {
    fn read() -> Source {
        fn walk(dir: &Path, files: &mut BTreeMap<String, String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, files);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let rel = p.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap().to_string_lossy().replace('\\', "/");
                    files.insert(rel, std::fs::read_to_string(&p).unwrap());
                }
            }
        }
        let mut files = BTreeMap::new();
        walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
        Source { files }
    }

    /// Each file's references, resolved to files: (from, to, what it named).
    fn edges(&self) -> Vec<(String, String, String)> {
        let modules: BTreeMap<Vec<String>, String> = self.files.keys().map(|f| (module_of(f), f.clone())).collect();
        // `pub use m::{A, B}` in lib.rs: the crate root's names and the modules defining them.
        let mut root_names: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let lib = tokens(&code_only(&self.files["src/lib.rs"]));
        for w in 0..lib.len() {
            if lib[w..].starts_with(&[Tok::Ident("pub".into()), Tok::Ident("use".into())]) {
                let mut paths = Vec::new();
                parse_tree(&lib, w + 2, Vec::new(), &mut paths);
                for p in paths {
                    if let Some(name) = p.last() {
                        root_names.insert(name.clone(), p[..1].to_vec());
                    }
                }
            }
        }
        let mut test_files = BTreeSet::new();
        let mut edges = Vec::new();
        for (file, text) in &self.files {
            let (toks, test_mods) = without_test_items(tokens(&code_only(text)));
            let here = module_of(file);
            for m in test_mods {
                let mut child = here.clone();
                child.push(m);
                if let Some(f) = modules.get(&child) {
                    test_files.insert(f.clone());
                }
            }
            let in_bin = file.starts_with("src/bin/");
            let is_child = |s: &str| {
                let mut c = here.clone();
                c.push(s.to_string());
                modules.contains_key(&c)
            };
            for i in 0..toks.len() {
                let Tok::Ident(first) = &toks[i] else { continue };
                let path_start = toks.get(i + 1) == Some(&Tok::Punct("::"))
                    && (i == 0 || toks[i - 1] != Tok::Punct("::"))
                    && (["crate", "super", "self"].contains(&first.as_str())
                        || (in_bin && first == "retinaface")
                        || (!in_bin && is_child(first)));
                if !path_start {
                    continue;
                }
                let mut paths = Vec::new();
                parse_tree(&toks, i, Vec::new(), &mut paths);
                for p in paths {
                    let named = p.join("::");
                    // The absolute module path the segments name.
                    let mut abs: Vec<String> = Vec::new();
                    for (k, seg) in p.iter().enumerate() {
                        match (k, seg.as_str()) {
                            (0, "crate") | (0, "retinaface") => {}
                            (0, "self") => abs = here.clone(),
                            (0, "super") => abs = here[..here.len().saturating_sub(1)].to_vec(),
                            (_, "super") if p[..k].iter().all(|s| s == "super") => {
                                abs.pop();
                            }
                            (0, _) => {
                                abs = here.clone();
                                abs.push(seg.clone());
                            }
                            (_, "self") => {}
                            _ => abs.push(seg.clone()),
                        }
                    }
                    let depth = (0..=abs.len()).rev().find(|&d| modules.contains_key(&abs[..d])).unwrap_or(0);
                    let mut target = modules.get(&abs[..depth]).cloned().unwrap_or_else(|| "src/lib.rs".into());
                    if target == "src/lib.rs" && depth < abs.len() {
                        let m = root_names.get(&abs[0]).unwrap_or_else(|| {
                            panic!("{file}: `{named}` names neither a module nor a name lib.rs re-exports")
                        });
                        target = modules[m].clone();
                    }
                    if &target != file {
                        edges.push((file.clone(), target, named));
                    }
                }
            }
        }
        edges.retain(|(from, _, _)| !test_files.contains(from));
        edges
    }
}

/// The layer of a file: the row with the longest path that is the file or a directory above it.
fn layer_of<'a>(layers: &'a [Layer], file: &str) -> Option<&'a Layer> {
    layers
        .iter()
        .flat_map(|l| l.paths.iter().map(move |p| (l, p)))
        .filter(|(_, p)| file == p.as_str() || (p.ends_with('/') && file.starts_with(p.as_str())))
        .max_by_key(|(_, p)| p.len())
        .map(|(l, _)| l)
}

fn top_module(file: &str) -> String {
    module_of(file).first().cloned().unwrap_or_else(|| "lib".into())
}

/// Every import that breaks the table, as messages.
fn layer_violations(layers: &[Layer], src: &Source) -> Vec<String> {
    let mut bad = Vec::new();
    for f in src.files.keys() {
        if layer_of(layers, f).is_none() {
            bad.push(format!("{f} is in no layer of ARCHITECTURE.md's table"));
        }
    }
    for (from, to, named) in src.edges() {
        let (Some(lf), Some(lt)) = (layer_of(layers, &from), layer_of(layers, &to)) else { continue };
        let same_module = lf.name == lt.name && top_module(&from) == top_module(&to);
        if !same_module && !lf.may_import.contains(&lt.name) {
            bad.push(format!("{from} ({}) imports {to} ({}) through `{named}`", lf.name, lt.name));
        }
    }
    bad
}

/// A cycle of the graph, if it has one, as the nodes along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()) {
                Some(1) => {
                    let at = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if !state.contains_key(n.as_str())
            && let Some(c) = visit(n, graph, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[test]
fn every_import_in_src_follows_the_layer_table() {
    let layers = layers(ARCHITECTURE);
    let src = Source::read();
    assert!(src.files.len() > 50 && src.files.contains_key("src/cpu/exec.rs"), "read {} files", src.files.len());
    let bad = layer_violations(&layers, &src);
    assert!(bad.is_empty(), "{} imports break ARCHITECTURE.md's layers:\n{}", bad.len(), bad.join("\n"));
}

#[test]
fn top_level_modules_import_each_other_without_a_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to, _) in Source::read().edges() {
        let (a, b) = (top_module(&from), top_module(&to));
        if a != b {
            graph.entry(a).or_default().insert(b);
        }
    }
    assert!(graph.len() > 10, "only {} modules import others", graph.len());
    assert_eq!(find_cycle(&graph), None);
}

#[test]
fn the_files_of_src_cpu_import_each_other_without_a_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to, _) in Source::read().edges() {
        if from.starts_with("src/cpu/") && to.starts_with("src/cpu/") {
            graph.entry(from).or_default().insert(to);
        }
    }
    // The dispatch reaches its paths and the executor reaches the dispatch: the graph is not empty.
    assert!(graph.get("src/cpu/conv/mod.rs").is_some_and(|s| s.contains("src/cpu/conv/igemm.rs")), "{graph:#?}");
    assert!(graph.get("src/cpu/exec.rs").is_some_and(|s| s.contains("src/cpu/conv/mod.rs")), "{graph:#?}");
    assert_eq!(find_cycle(&graph), None);
}

/// The checks above can fail: an executor importing the public API, a cycle, a file in no layer, an
/// import hidden in a brace group, each planted in a copy of the source, are all caught; the same
/// imports in comments, strings or `#[cfg(test)]` items are not imports.
#[test]
fn planted_violations_are_caught_and_non_code_is_not() {
    let layers = layers(ARCHITECTURE);
    let with = |file: &str, text: &str| {
        let mut src = Source::read();
        src.files.insert(file.into(), text.into());
        src
    };
    let upward = with("src/cuda/planted.rs", "use crate::engine::Engine;\n");
    let bad = layer_violations(&layers, &upward);
    assert!(bad.len() == 1 && bad[0].contains("src/cuda/planted.rs (executors) imports src/engine.rs"), "{bad:?}");
    let grouped = with("src/reference/planted.rs", "use crate::{error::Error, cpu::conv::conv2d as c};\n");
    let bad = layer_violations(&layers, &grouped);
    assert!(bad.len() == 1 && bad[0].contains("src/cpu/conv/mod.rs (executors)"), "{bad:?}");
    let beside = with("src/cpu/planted.rs", "fn f() { let _ = crate::cuda::sim::SimRunner::new(); }\n");
    assert_eq!(layer_violations(&layers, &beside).len(), 1);
    let nowhere = with("src/planted.rs", "");
    assert!(layer_violations(&layers, &nowhere)[0].contains("in no layer"));
    let harmless = with(
        "src/cuda/planted.rs",
        "//! crate::engine::Engine\n/// [`crate::engine`]\nconst S: &str = \"crate::engine::x\";\n\
         const R: &str = r#\"crate::serve\"#;\nconst C: char = '{';\n\
         #[cfg(test)]\nmod tests {\n    use crate::engine::Engine;\n}\n",
    );
    assert_eq!(layer_violations(&layers, &harmless), Vec::<String>::new());
    let cyclic = with("src/cpu/rows.rs", "use super::exec::CpuExecutor;\n");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to, _) in cyclic.edges() {
        if from.starts_with("src/cpu/") && to.starts_with("src/cpu/") {
            graph.entry(from).or_default().insert(to);
        }
    }
    let cycle = find_cycle(&graph).expect("a planted cycle through rows.rs");
    assert!(cycle.contains(&"src/cpu/rows.rs".to_string()), "{cycle:?}");
}
