//! Tidy tests: checks on the source tree itself, in the spirit of
//! rust-analyzer's `tidy.rs`. They read files, not the compiled crate.
//!
//! - The I/O-free invariant: the directories DESIGN.md's "Invariants"
//!   declares I/O-free (and `src/core/` always) use no tokio, no sockets, no
//!   `std::fs`, no threads spawned or put to sleep, no system clock.
//! - The code map: every module of `src/` and `core/src/` is named in
//!   DESIGN.md's "Code map", so the map cannot silently fall behind the code.
//! - Layers: no import cycle between the top-level modules of a crate, and
//!   no source file over [`MAX_FILE_LINES`] lines.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// What the I/O-free code must not name, and why. Matched on code with its
/// comments and string literals blanked out.
const FORBIDDEN: &[(&str, &str)] = &[
    ("tokio", "no async runtime"),
    ("TcpStream", "no sockets"),
    ("TcpListener", "no sockets"),
    ("UdpSocket", "no sockets"),
    ("std::fs", "no file system"),
    ("File::open", "no file system"),
    ("File::create", "no file system"),
    ("thread::sleep", "no sleeping"),
    ("thread::spawn", "no threads"),
    ("SystemTime::now", "no system clock: take `now: Nanos`"),
    ("Instant::now", "no system clock: take `now: Nanos`"),
    ("quinn", "no network crate"),
    ("hyper", "no network crate"),
    ("axum", "no network crate"),
    ("tonic", "no network crate"),
];

/// One breach of the invariant: where, and what.
#[derive(Debug, PartialEq, Eq)]
struct Breach {
    line: usize,
    found: &'static str,
    why: &'static str,
}

/// The breaches in one file's text. Comments, string literals and items
/// under `#[cfg(test)]` are skipped: unit tests may use threads to test
/// concurrency, and a comment may say what the code does not do.
fn breaches(text: &str) -> Vec<Breach> {
    let code = blank_comments_and_strings(text);
    let mut out = Vec::new();
    let mut skip_depth: Option<i64> = None;
    let mut depth: i64 = 0;
    let mut pending_test_item = false;
    for (i, line) in code.lines().enumerate() {
        let trimmed = line.trim();
        if skip_depth.is_none() && trimmed.starts_with("#[cfg(test)]") {
            pending_test_item = true;
        }
        let in_test = skip_depth.is_some() || pending_test_item;
        if !in_test {
            for &(found, why) in FORBIDDEN {
                if contains_word(line, found) {
                    out.push(Breach {
                        line: i + 1,
                        found,
                        why,
                    });
                }
            }
        }
        for c in line.chars() {
            match c {
                '{' => {
                    if pending_test_item {
                        pending_test_item = false;
                        skip_depth = Some(depth);
                    }
                    depth += 1;
                }
                '}' => {
                    depth -= 1;
                    if skip_depth == Some(depth) {
                        skip_depth = None;
                    }
                }
                ';' if pending_test_item && depth == skip_depth.unwrap_or(depth) => {
                    // `#[cfg(test)] use ...;` or `#[cfg(test)] mod tests;`
                    pending_test_item = false;
                }
                _ => {}
            }
        }
    }
    out
}

/// Whether `needle` occurs in `line` with no identifier character on
/// either side (`tokio` matches `tokio::spawn`, not `mytokio`).
fn contains_word(line: &str, needle: &str) -> bool {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    line.match_indices(needle).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + needle.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

/// `text` with comments and the contents of string and char literals
/// replaced by spaces; line breaks stay, so line numbers do too.
fn blank_comments_and_strings(text: &str) -> String {
    #[derive(PartialEq)]
    enum S {
        Code,
        Line,
        Block(usize),
        Str,
        Raw(usize),
    }
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut state = S::Code;
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match state {
            S::Code => {
                if c == '/' && next == Some('/') {
                    state = S::Line;
                    out.push_str("  ");
                    i += 2;
                    continue;
                }
                if c == '/' && next == Some('*') {
                    state = S::Block(1);
                    out.push_str("  ");
                    i += 2;
                    continue;
                }
                if c == 'r' && (next == Some('"') || next == Some('#')) {
                    let hashes = chars[i + 1..].iter().take_while(|&&h| h == '#').count();
                    if chars.get(i + 1 + hashes) == Some(&'"') {
                        state = S::Raw(hashes);
                        for _ in 0..hashes + 2 {
                            out.push(' ');
                        }
                        i += hashes + 2;
                        continue;
                    }
                }
                if c == '"' {
                    state = S::Str;
                    out.push(' ');
                    i += 1;
                    continue;
                }
                if c == '\'' {
                    // A char literal ('x', '\n', '\'') or a lifetime ('a).
                    let close = match next {
                        Some('\\') => chars[i + 2..]
                            .iter()
                            .position(|&q| q == '\'')
                            .map(|p| i + 2 + p),
                        Some(_) if chars.get(i + 2) == Some(&'\'') => Some(i + 2),
                        _ => None,
                    };
                    if let Some(end) = close {
                        for _ in i..=end {
                            out.push(' ');
                        }
                        i = end + 1;
                        continue;
                    }
                }
                out.push(c);
            }
            S::Line => {
                if c == '\n' {
                    state = S::Code;
                }
                out.push(blank(c));
            }
            S::Block(n) => {
                if c == '*' && next == Some('/') {
                    state = if n == 1 { S::Code } else { S::Block(n - 1) };
                    out.push_str("  ");
                    i += 2;
                    continue;
                }
                if c == '/' && next == Some('*') {
                    state = S::Block(n + 1);
                    out.push_str("  ");
                    i += 2;
                    continue;
                }
                out.push(blank(c));
            }
            S::Str => {
                if c == '\\' {
                    out.push(' ');
                    if let Some(n) = next {
                        out.push(blank(n));
                    }
                    i += 2;
                    continue;
                }
                if c == '"' {
                    state = S::Code;
                }
                out.push(blank(c));
            }
            S::Raw(hashes) => {
                if c == '"' && chars[i + 1..].iter().take(hashes).all(|&h| h == '#') {
                    let end = i + 1 + hashes;
                    if chars[i + 1..end.min(chars.len())].len() == hashes {
                        state = S::Code;
                        for _ in i..end {
                            out.push(' ');
                        }
                        i = end;
                        continue;
                    }
                }
                out.push(blank(c));
            }
        }
        i += 1;
    }
    out
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn design() -> String {
    fs::read_to_string(root().join("DESIGN.md")).expect("DESIGN.md is readable")
}

/// The text of DESIGN.md's section `## {title}`, up to the next `## `.
fn section<'a>(doc: &'a str, title: &str) -> &'a str {
    let head = format!("## {title}\n");
    let start = doc
        .find(&head)
        .unwrap_or_else(|| panic!("DESIGN.md has no section {head:?}"));
    let body = &doc[start + head.len()..];
    let end = body.find("\n## ").unwrap_or(body.len());
    &body[..end]
}

/// The directories the I/O-free invariant names: the backquoted `src/...`
/// and `core/...` paths of the "Invariants" bullet that begins "Nothing
/// under". The core crate's sources (`core/src`) are always among them.
fn declared_io_free(doc: &str) -> Vec<String> {
    let invariants = section(doc, "Invariants");
    let bullet = invariants
        .split("\n- ")
        .find(|b| b.trim_start_matches("- ").starts_with("Nothing under"))
        .expect("DESIGN.md's Invariants declare which directories are I/O-free (\"- Nothing under `src/...`\")");
    let mut dirs: Vec<String> = bullet
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|p| p.starts_with("src/") || p.starts_with("core/"))
        .map(|p| p.trim_end_matches('/').to_owned())
        .collect();
    if !dirs.iter().any(|d| d == "core/src") {
        dirs.push("core/src".to_owned());
    }
    dirs
}

/// The one file of the I/O-free crate allowed to read real time: the
/// clock that drivers pass in.
const CLOCK_READER: &str = "core/src/clock.rs";

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn io_free_modules_do_no_io() {
    let root = root();
    let dirs = declared_io_free(&design());
    let mut report = Vec::new();
    let mut checked = 0;
    for dir in &dirs {
        let mut files = Vec::new();
        rust_files(&root.join(dir), &mut files);
        for file in files {
            // A module's unit tests (`#[cfg(test)] mod tests;`) may use
            // threads to test concurrency.
            if file.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            checked += 1;
            let text = fs::read_to_string(&file).expect("source is UTF-8");
            let rel = file.strip_prefix(&root).unwrap_or(&file);
            let clock_reader = rel == Path::new(CLOCK_READER);
            for b in breaches(&text) {
                if clock_reader && b.found == "SystemTime::now" {
                    continue;
                }
                report.push(format!(
                    "{}:{}: `{}` in I/O-free code ({}); see DESIGN.md, Invariants",
                    rel.display(),
                    b.line,
                    b.found,
                    b.why
                ));
            }
        }
    }
    assert!(checked > 10, "found only {checked} files under {dirs:?}");
    assert!(
        report.is_empty(),
        "the I/O-free invariant is broken:\n{}",
        report.join("\n")
    );
}

#[test]
fn the_code_map_names_every_module() {
    let doc = design();
    let map = section(&doc, "Code map");
    // Every backquoted span, cut at `/`, without `.rs`: `src/core/`,
    // `share.rs` and `table/evicted.rs` name `core`, `share`, `table` and
    // `evicted`.
    let named: BTreeSet<&str> = map
        .split('`')
        .skip(1)
        .step_by(2)
        .flat_map(|span| span.split('/'))
        .map(|part| part.trim_end_matches(".rs"))
        .collect();
    let mut missing = Vec::new();
    // The top level of each crate's sources and one level below: files and
    // folders are modules; `mod.rs` is its folder's.
    let mut modules = Vec::new();
    for src in ["src", "core/src"].map(|s| root().join(s)) {
        for top in fs::read_dir(&src).expect("the sources are readable") {
            let top = top.expect("a directory entry").path();
            modules.push(top.clone());
            if top.is_dir() {
                for inner in fs::read_dir(&top).expect("a module folder is readable") {
                    modules.push(inner.expect("a directory entry").path());
                }
            }
        }
    }
    for path in modules {
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let is_module = path.is_dir() || path.extension().is_some_and(|e| e == "rs");
        if !is_module || stem == "mod" || stem == "lib" || stem == "main" {
            continue;
        }
        if !named.contains(stem) {
            missing.push(
                path.strip_prefix(root())
                    .unwrap_or(&path)
                    .display()
                    .to_string(),
            );
        }
    }
    missing.sort();
    assert!(
        missing.is_empty(),
        "DESIGN.md's \"Code map\" does not name these modules (add a line that says what each holds, \
         with its name in backquotes):\n{}",
        missing.join("\n")
    );
}

/// Longest a source file may be: past it, a file holds two ideas.
const MAX_FILE_LINES: usize = 700;

#[test]
fn no_source_file_is_too_long() {
    let mut long = Vec::new();
    for src in ["src", "core/src"] {
        let mut files = Vec::new();
        rust_files(&root().join(src), &mut files);
        for file in files {
            let lines = fs::read_to_string(&file)
                .expect("source is UTF-8")
                .lines()
                .count();
            if lines > MAX_FILE_LINES {
                let rel = file
                    .strip_prefix(root())
                    .unwrap_or(&file)
                    .display()
                    .to_string();
                long.push(format!("{rel}: {lines} lines"));
            }
        }
    }
    assert!(
        long.is_empty(),
        "split these files along their seams (at most {MAX_FILE_LINES} lines each):\n{}",
        long.join("\n")
    );
}

/// The top-level modules of the crate whose sources are at `src`, each
/// with the other top-level modules its code names as `crate::<module>`.
fn module_graph(src: &Path) -> std::collections::BTreeMap<String, BTreeSet<String>> {
    let mut graph = std::collections::BTreeMap::new();
    for entry in fs::read_dir(src).expect("the sources are readable") {
        let path = entry.expect("a directory entry").path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
            continue;
        };
        let mut files = Vec::new();
        if path.is_dir() {
            rust_files(&path, &mut files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path.clone());
        }
        if files.is_empty() || stem == "lib" || stem == "main" {
            continue;
        }
        let deps: &mut BTreeSet<String> = graph.entry(stem.clone()).or_default();
        for file in files {
            let code = blank_comments_and_strings(&fs::read_to_string(&file).expect("UTF-8"));
            for (at, _) in code.match_indices("crate::") {
                let name: String = code[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if !name.is_empty() && name != stem {
                    deps.insert(name);
                }
            }
        }
    }
    graph
}

/// The modules of `graph` that can reach themselves, each with the path
/// back.
fn cycles(graph: &std::collections::BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut found = Vec::new();
    for start in graph.keys() {
        // Depth-first from `start`, remembering how each module was reached.
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((at, path)) = stack.pop() {
            for next in graph.get(&at).into_iter().flatten() {
                if next == start {
                    found.push(format!("{} -> {start}", path.join(" -> ")));
                } else if graph.contains_key(next) && seen.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn the_modules_of_each_crate_form_layers() {
    for src in ["src", "core/src"] {
        let graph = module_graph(&root().join(src));
        assert!(graph.len() > 5, "{src}: found only {graph:?}");
        let cycles = cycles(&graph);
        assert!(
            cycles.is_empty(),
            "{src}: modules that import each other (directly or around a loop):\n{}",
            cycles.join("\n")
        );
    }
}

#[cfg(test)]
mod checker {
    use super::*;

    #[test]
    fn finds_io_with_its_line() {
        let sample = "use crate::core::time::Nanos;\n\
                      fn now() -> u64 {\n\
                      \x20   let t = std::time::Instant::now();\n\
                      \x20   std::thread::sleep(d);\n\
                      \x20   tokio::spawn(async {});\n\
                      \x20   let s = std::net::UdpSocket::bind(a);\n\
                      \x20   std::fs::read(p)\n\
                      }\n";
        let found: Vec<(usize, &str)> =
            breaches(sample).iter().map(|b| (b.line, b.found)).collect();
        assert_eq!(
            found,
            vec![
                (3, "Instant::now"),
                (4, "thread::sleep"),
                (5, "tokio"),
                (6, "UdpSocket"),
                (7, "std::fs"),
            ]
        );
    }

    #[test]
    fn skips_comments_strings_and_unit_tests() {
        let sample = r##"//! Never reads `Instant::now`; no tokio here.
/* std::fs in a block comment */
const S: &str = "tokio in a string";
const R: &str = r#"a "raw" TcpStream"#;
fn lifetime<'a>(x: &'a str) -> char { let _ = '"'; 'x' }
struct Mytokio;
#[cfg(test)]
mod tests {
    #[test]
    fn t() { std::thread::spawn(|| {}); }
}
fn after() { let _ = std::time::SystemTime::now(); }
"##;
        let found: Vec<(usize, &str)> =
            breaches(sample).iter().map(|b| (b.line, b.found)).collect();
        assert_eq!(found, vec![(12, "SystemTime::now")]);
    }

    #[test]
    fn finds_a_loop_of_imports() {
        let graph = [
            ("a", &["b"][..]),
            ("b", &["c"]),
            ("c", &["a", "d"]),
            ("d", &[]),
        ]
        .into_iter()
        .map(|(m, deps)| (m.to_owned(), deps.iter().map(|d| (*d).to_owned()).collect()))
        .collect();
        let found = cycles(&graph);
        assert!(found.contains(&"a -> b -> c -> a".to_owned()), "{found:?}");
        assert!(found.iter().all(|c| !c.starts_with('d')), "{found:?}");
    }

    #[test]
    fn reads_the_declared_directories() {
        let doc = "## Invariants\n\n- A node never writes another's slot.\n\
                   - Nothing under `src/limiter/` or\n  `src/cluster/` does I/O.\n\n## Next\n";
        assert_eq!(
            declared_io_free(doc),
            vec!["src/limiter", "src/cluster", "core/src"]
        );
    }
}
