//! README's shell examples as steps a test can run: the commands of a ```sh block
//! (`\` continues a line) with the output they promise (`#   stdout: PATTERN`,
//! `#   stderr: PATTERN`, where `...` stands for any text).

/// One step of the walk.
#[derive(Debug)]
pub enum Step {
    /// Write this text to this (README) path.
    File { path: String, text: String },
    /// Run this command; its output lines must match the patterns.
    Run {
        line: String,
        stdout: Vec<String>,
        stderr: Vec<String>,
    },
}

/// The commands of one sh block, with their expected-output comments.
pub fn commands(body: &[&str]) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::new();
    let mut pending = String::new();
    for raw in body {
        let line = raw.trim();
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim();
            let expect = comment
                .strip_prefix("stdout:")
                .map(|p| (true, p))
                .or_else(|| comment.strip_prefix("stderr:").map(|p| (false, p)));
            if let (Some((is_stdout, pattern)), Some(Step::Run { stdout, stderr, .. })) =
                (expect, out.last_mut())
            {
                let list = if is_stdout { stdout } else { stderr };
                list.push(pattern.trim().to_string());
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        out.push(Step::Run {
            line: std::mem::take(&mut pending),
            stdout: Vec::new(),
            stderr: Vec::new(),
        });
    }
    out
}

/// Whether `text` matches `pattern`, where `...` stands for any text.
pub fn matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split("...").collect();
    let (first, rest) = parts.split_first().expect("split yields one part");
    let Some(mut tail) = text.strip_prefix(first) else {
        return false;
    };
    for (i, part) in rest.iter().enumerate() {
        if i + 1 == rest.len() {
            return tail.ends_with(part);
        }
        match tail.find(part) {
            Some(at) => tail = &tail[at + part.len()..],
            None => return false,
        }
    }
    tail.is_empty()
}

/// The text of README's section `heading` (a `## ` line), up to the next `## `.
pub fn section<'a>(readme: &'a str, heading: &str) -> &'a str {
    let start = readme
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("README has no `## {heading}` section"));
    let section = &readme[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |e| e + 3);
    &section[..end]
}

/// The bodies of the ```LANG blocks in `text`, in order.
pub fn blocks<'a>(text: &'a str, lang: &str) -> Vec<Vec<&'a str>> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim_start().strip_prefix("```") == Some(lang) {
            out.push(
                lines
                    .by_ref()
                    .take_while(|l| !l.trim_start().starts_with("```"))
                    .collect(),
            );
        }
    }
    out
}
