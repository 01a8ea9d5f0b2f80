//! What the packages' build scripts share: the git commit `--version` prints, and the
//! man page and shell completions written from a binary's clap definition. Only build
//! scripts use this crate, so none of it is linked into the binaries.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Sets `UPDRAFT_COMMIT` for the package being built to the short hash of the checkout's
/// `HEAD`, with `-dirty` when tracked files differ from it; `unknown` outside a git
/// checkout (a source tarball), unless `UPDRAFT_COMMIT` is set in the build's
/// environment. Asks cargo to run the build script again when `HEAD`, the branch or the
/// index moves. Returns the version line: `0.1.0 (commit abc1234)`.
pub fn commit_env() -> String {
    println!("cargo:rerun-if-env-changed=UPDRAFT_COMMIT");
    let commit = std::env::var("UPDRAFT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git_commit(&PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?)))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=UPDRAFT_COMMIT={commit}");
    format!(
        "{} (commit {commit})",
        std::env::var("CARGO_PKG_VERSION").unwrap_or_default()
    )
}

/// `git` in `dir`; its trimmed stdout when it succeeds.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        // A status must not rewrite the index: that would count as a change next build.
        .env("GIT_OPTIONAL_LOCKS", "0")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The short hash of `HEAD` of the checkout `dir` is in, `-dirty` when tracked files
/// differ from it; `None` outside a checkout or without git.
fn git_commit(dir: &Path) -> Option<String> {
    let hash = git(dir, &["rev-parse", "--short", "HEAD"]).filter(|h| !h.is_empty())?;
    // In a worktree `.git` is a file: ask git where HEAD, the index and the refs are.
    let mut watch = vec![
        "HEAD".to_string(),
        "logs/HEAD".into(),
        "index".into(),
        "packed-refs".into(),
    ];
    watch.extend(git(dir, &["symbolic-ref", "-q", "HEAD"]));
    for name in watch {
        if let Some(path) = git(dir, &["rev-parse", "--git-path", &name]).map(|p| dir.join(p)) {
            // A missing file would make cargo run the build script every time.
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    let dirty =
        git(dir, &["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{hash}-dirty") } else { hash })
}

/// Where the files for the `.deb` go: the profile's directory of the target dir
/// (`target/[TRIPLE/]PROFILE`, what cargo-deb reads `target/release/` in its assets as,
/// for any `--target` and `--profile`), found from `OUT_DIR`
/// (`target/[TRIPLE/]PROFILE/build/PACKAGE-HASH/out`).
fn profile_dir(out: &Path) -> std::io::Result<PathBuf> {
    out.ancestors()
        .find(|d| d.file_name().is_some_and(|n| n == "build"))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "OUT_DIR {} is not under a profile's build/ directory",
                out.display()
            ))
        })
}

/// A service's build script: stamps the git commit into `--version` ([`commit_env`]),
/// and writes the man page and completions from `cmd`, its clap definition included
/// from `src/cli/args.rs`, with that version ([`write_docs`]). A failure to write them
/// is a build warning, not an error: the binary does not need them.
pub fn stamp_and_document(cmd: clap::Command) {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cli/args.rs");
    // clap takes `&'static str` here; the build script ends right after.
    let version: &'static str = commit_env().leak();
    if let Err(e) = write_docs(cmd.version(version)) {
        println!("cargo:warning=man page and completions not written: {e}");
    }
}

/// Writes `$OUT_DIR/cli_grammar.rs` from `cmd`: one `Grammar { .. }` per command (the
/// top first, then every subcommand, depth first, `help` left out), each with its
/// options, positionals, subcommands, and the usage and help texts clap would print.
/// The file is a Rust array expression for the binary's own small parser to
/// `include!`, so the binary links no clap and still reads exactly the command line
/// the clap definition (and so the man page) describes. The binary defines `Grammar`,
/// `Opt` and `Positional` with the fields written here.
pub fn write_grammar(cmd: clap::Command) -> std::io::Result<()> {
    let mut cmd = cmd;
    cmd.build();
    let mut out = String::from("&[\n");
    grammar_of(&mut cmd, "", &mut out);
    out.push_str("]\n");
    let dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    write_file(&dir.join("cli_grammar.rs"), out.as_bytes())
}

/// Appends the grammar of `cmd` (named `path` from the top) and of its subcommands.
fn grammar_of(cmd: &mut clap::Command, path: &str, out: &mut String) {
    use clap::ArgAction;
    use std::fmt::Write as _;
    let mut options = String::new();
    let mut positionals = String::new();
    let mut last = String::from("None");
    for arg in cmd.get_arguments() {
        if matches!(
            arg.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        ) {
            continue;
        }
        let id = arg.get_id().as_str();
        let required = arg.is_required_set();
        if let Some(long) = arg.get_long() {
            let value = arg.get_action().takes_values();
            let shown = match arg.get_value_names() {
                Some(names) if value => format!("--{long} <{}>", names[0]),
                _ if value => format!("--{long} <{}>", id.to_uppercase()),
                _ => format!("--{long}"),
            };
            let _ = write!(
                options,
                "Opt {{ id: {id:?}, long: {long:?}, shown: {shown:?}, value: {value}, required: {required} }}, "
            );
        } else if arg.is_last_set() {
            last = format!("Some({id:?})");
        } else {
            let _ = write!(
                positionals,
                "Positional {{ id: {id:?}, required: {required} }}, "
            );
        }
    }
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .filter(|n| n != "help")
        .collect();
    let usage = cmd.render_usage().to_string();
    let help = cmd.render_help().to_string();
    // What clap's `--help` prints: the long form only where some text has one.
    let has_long = cmd.get_long_about().is_some()
        || cmd.get_before_long_help().is_some()
        || cmd.get_after_long_help().is_some()
        || cmd
            .get_arguments()
            .any(|a| !a.is_hide_set() && a.get_long_help().is_some());
    let long_help = if has_long {
        cmd.render_long_help().to_string()
    } else {
        help.clone()
    };
    let _ = writeln!(
        out,
        "Grammar {{ path: {path:?}, options: &[{options}], positionals: &[{positionals}], last: {last}, subcommands: &{subs:?}, usage: {usage:?}, help: {help:?}, long_help: {long_help:?} }},"
    );
    for sub in cmd.get_subcommands_mut() {
        if sub.get_name() == "help" {
            continue;
        }
        let name = if path.is_empty() {
            sub.get_name().to_string()
        } else {
            format!("{path} {}", sub.get_name())
        };
        grammar_of(sub, &name, out);
    }
}

/// Writes `bin`'s man page and its bash, zsh and fish completions, made from `cmd`, to
/// `PROFILE/man/BIN` (gzipped) and `PROFILE/completions/{bash,zsh,fish}/BIN` (see
/// [`profile_dir`]). Each file is named after the binary because cargo-deb counts an
/// asset in the target dir as this package's own build product only when its file name
/// is one of the package's binaries; any other name makes it build the whole workspace
/// (`--workspace`), features unified across all packages, into the agent. The page is
/// one page: the command's options, then every subcommand's synopsis, description and
/// options. Gzipped here at the maximum level, as Debian wants man pages, because
/// cargo-deb leaves files from the target dir as they are.
pub fn write_docs(cmd: clap::Command) -> std::io::Result<()> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let bin = cmd.get_name().to_string();
    let dir = profile_dir(Path::new(&std::env::var_os("OUT_DIR").unwrap_or_default()))?;
    let page = man_page(&cmd)?;
    let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::best());
    gz.write_all(&page)?;
    write_file(&dir.join("man").join(&bin), &gz.finish()?)?;
    for (shell, name) in [
        (clap_complete::Shell::Bash, "bash"),
        (clap_complete::Shell::Zsh, "zsh"),
        (clap_complete::Shell::Fish, "fish"),
    ] {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), &bin, &mut text);
        write_file(&dir.join("completions").join(name).join(&bin), &text)?;
    }
    Ok(())
}

/// The roff of the whole page.
fn man_page(cmd: &clap::Command) -> std::io::Result<Vec<u8>> {
    type Render = fn(&clap_mangen::Man, &mut dyn Write) -> std::io::Result<()>;
    let man = clap_mangen::Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    let top: [Render; 4] = [
        clap_mangen::Man::render_name_section,
        clap_mangen::Man::render_synopsis_section,
        clap_mangen::Man::render_description_section,
        clap_mangen::Man::render_options_section,
    ];
    for render in top {
        page.extend(section(&man, render, true)?);
    }
    writeln!(page, ".SH COMMANDS")?;
    for sub in leaves(cmd) {
        let name = sub.get_bin_name().unwrap_or(sub.get_name()).to_string();
        writeln!(page, ".SS \"{}\"", name.replace('-', "\\-"))?;
        let man = clap_mangen::Man::new(sub);
        let parts: [Render; 3] = [
            clap_mangen::Man::render_synopsis_section,
            clap_mangen::Man::render_description_section,
            clap_mangen::Man::render_options_section,
        ];
        for (i, render) in parts.into_iter().enumerate() {
            if i < 2 {
                writeln!(page, ".PP")?;
            }
            // Within the subcommand's subsection, without the section's own heading.
            page.extend(section(&man, render, false)?);
        }
    }
    page.extend(section(
        &man,
        clap_mangen::Man::render_version_section,
        true,
    )?);
    Ok(page)
}

/// One section as clap_mangen renders it, without the string definitions it repeats
/// before each (the title's copy stays), and without its `.SH` line unless `heading`.
fn section(
    man: &clap_mangen::Man,
    render: fn(&clap_mangen::Man, &mut dyn Write) -> std::io::Result<()>,
    heading: bool,
) -> std::io::Result<Vec<u8>> {
    let mut text = Vec::new();
    render(man, &mut text)?;
    Ok(text
        .split_inclusive(|b| *b == b'\n')
        .filter(|l| !l.starts_with(b".ie \\n(.g .ds Aq") && !l.starts_with(b".el .ds Aq"))
        .filter(|l| heading || !l.starts_with(b".SH "))
        .flatten()
        .copied()
        .collect())
}

/// The subcommands that do something (`policy check`, not `policy`), in order.
fn leaves(cmd: &clap::Command) -> Vec<clap::Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set())
        .flat_map(|s| {
            if s.has_subcommands() {
                leaves(s)
            } else {
                vec![s.clone()]
            }
        })
        .collect()
}

/// Writes through a temporary file and a rename, so a build running at the same time
/// (check and build) never leaves half a file.
fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    if std::fs::read(path).is_ok_and(|old| old == data) {
        return Ok(());
    }
    let tmp = dir.join(format!(
        ".{}.{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_is_heads_in_a_checkout_and_none_outside() {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        if let Some(head) = git(here, &["rev-parse", "--short", "HEAD"]) {
            let commit = git_commit(here).unwrap();
            assert_eq!(commit.strip_suffix("-dirty").unwrap_or(&commit), head);
        }
        let outside = std::env::temp_dir().join(format!("updraft-no-git-{}", std::process::id()));
        std::fs::create_dir_all(&outside).unwrap();
        let found = git_commit(&outside);
        std::fs::remove_dir_all(&outside).unwrap();
        assert_eq!(found, None);
    }

    #[test]
    fn the_docs_go_to_the_profile_directory_for_any_target_and_profile() {
        for (out, profile) in [
            ("/t/debug/build/updraft-agent-1234/out", "/t/debug"),
            (
                "/t/aarch64-unknown-linux-gnu/board/build/updraftd-99/out",
                "/t/aarch64-unknown-linux-gnu/board",
            ),
        ] {
            assert_eq!(profile_dir(Path::new(out)).unwrap(), Path::new(profile));
        }
        assert!(profile_dir(Path::new("/somewhere/out")).is_err());
    }

    #[test]
    fn the_page_has_every_subcommand_and_its_options() {
        let cmd = clap::Command::new("tool")
            .version("1.0 (commit abc)")
            .about("A tool")
            .subcommand(
                clap::Command::new("go").about("Go somewhere").arg(
                    clap::Arg::new("far")
                        .long("far")
                        .help("How far")
                        .action(clap::ArgAction::SetTrue),
                ),
            )
            .subcommand(
                clap::Command::new("policy")
                    .subcommand(clap::Command::new("check").about("Check a policy")),
            );
        let mut cmd = cmd.disable_help_subcommand(true);
        cmd.build();
        let page = String::from_utf8(man_page(&cmd).unwrap()).unwrap();
        for line in [
            ".SH NAME",
            ".SH COMMANDS",
            ".SS \"tool go\"",
            "Go somewhere",
            "\\fB\\-\\-far\\fR",
            ".SS \"tool policy check\"",
            "Check a policy",
        ] {
            assert!(page.contains(line), "{line} missing in\n{page}");
        }
        // One copy of clap_mangen's string definitions, before the title.
        assert_eq!(page.matches(".ds Aq").count(), 2, "{page}");
        assert_eq!(page.matches(".SH SYNOPSIS").count(), 1, "{page}");
    }
}
