// The command line as the binary reads it: a small parser driven by the grammar
// build.rs writes from the clap definition in args.rs (each command's options,
// positionals, subcommands, usage and help), so the binary links none of clap's parser
// and still reads what the man page describes. A unit test parses a corpus both ways
// and compares.

use super::{parse_where, Cli, ClientArgs, Command, ConfigArg, PolicyCommand, VERSION};
use std::ffi::OsString;
use std::path::PathBuf;

/// One command of the grammar, as build.rs writes it.
#[derive(Debug)]
struct Grammar {
    /// `run`, `policy explain`; empty for the top.
    path: &'static str,
    options: &'static [Opt],
    positionals: &'static [Positional],
    /// The argument that takes everything after `--`.
    last: Option<&'static str>,
    subcommands: &'static [&'static str],
    usage: &'static str,
    /// What `-h` prints.
    help: &'static str,
    /// What `--help` and `help COMMAND` print.
    long_help: &'static str,
}

/// An option: `--long VALUE`, `--long=VALUE`, or a flag.
#[derive(Debug)]
struct Opt {
    /// The field it fills.
    id: &'static str,
    long: &'static str,
    /// As the usage shows it: `--where <WHERE>`.
    shown: &'static str,
    /// Takes a value (else a flag).
    value: bool,
    required: bool,
}

/// A positional argument, in order.
#[derive(Debug)]
struct Positional {
    id: &'static str,
    required: bool,
}

/// Every command, the top first (written by build.rs).
const GRAMMAR: &[Grammar] = include!(concat!(env!("OUT_DIR"), "/cli_grammar.rs"));

/// What the command line asks for.
#[derive(Debug)]
pub enum Parsed {
    /// A command to run.
    Run(Cli),
    /// Help or the version: print it on stdout and exit 0.
    Print(String),
    /// A command line that is wrong: print it on stderr and exit 2.
    Usage(String),
}

/// Parses `args` (the program's name first, as `std::env::args_os` gives them).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Parsed {
    let mut args = args.into_iter().skip(1);
    let mut grammar = top();
    let mut top_matches = None;
    let mut m = Matches::default();
    let mut after_dashes = false;
    while let Some(arg) = args.next() {
        let text = arg.to_str();
        if !after_dashes {
            match text {
                Some("--") => {
                    after_dashes = true;
                    continue;
                }
                Some("-h") => return Parsed::Print(grammar.help.to_string()),
                Some("--help") => return Parsed::Print(grammar.long_help.to_string()),
                Some("-V" | "--version") if grammar.path.is_empty() => {
                    return Parsed::Print(format!("updraft-agent {VERSION}\n"))
                }
                Some(t) if t.starts_with("--") => {
                    if let Err(e) = m.option(grammar, t, &mut args) {
                        return usage(grammar, &e);
                    }
                    continue;
                }
                Some(t) if t.starts_with('-') && t.len() > 1 => {
                    return usage(grammar, &format!("unexpected argument '{t}'"));
                }
                _ => {}
            }
        }
        if !grammar.subcommands.is_empty() {
            let Some(name) = text.filter(|_| !after_dashes) else {
                return usage(
                    grammar,
                    &format!("unexpected argument '{}'", arg.to_string_lossy()),
                );
            };
            if name == "help" {
                return help_for(grammar, args);
            }
            let Some(sub) = find(&join(grammar.path, name)) else {
                return usage(grammar, &format!("unrecognized subcommand '{name}'"));
            };
            if let Err(e) = m.complete(grammar) {
                return usage(grammar, &e);
            }
            top_matches.get_or_insert(std::mem::take(&mut m));
            grammar = sub;
            continue;
        }
        if after_dashes {
            if grammar.last.is_some() {
                m.last.push(arg);
                continue;
            }
        } else if grammar.last.is_some() && m.positionals.len() == grammar.positionals.len() {
            return usage(
                grammar,
                &format!(
                    "unexpected argument '{}': the task's own arguments follow `--`",
                    arg.to_string_lossy()
                ),
            );
        }
        let Some(p) = grammar.positionals.get(m.positionals.len()) else {
            return usage(
                grammar,
                &format!("unexpected argument '{}'", arg.to_string_lossy()),
            );
        };
        m.positionals.push((p.id, arg));
    }
    if !grammar.subcommands.is_empty() {
        // Nothing to do: the help, as a usage error.
        return Parsed::Usage(grammar.help.to_string());
    }
    if let Err(e) = m.complete(grammar) {
        return usage(grammar, &e);
    }
    match build(grammar, top_matches.unwrap_or_default(), m) {
        Ok(cli) => Parsed::Run(cli),
        Err(e) => usage(grammar, &e),
    }
}

/// `help [COMMAND...]`: the long help of the command named.
fn help_for(from: &'static Grammar, names: impl Iterator<Item = OsString>) -> Parsed {
    let mut named = from;
    for name in names {
        let path = join(named.path, &name.to_string_lossy());
        match find(&path) {
            Some(g) => named = g,
            None => return usage(from, &format!("unrecognized subcommand '{path}'")),
        }
    }
    Parsed::Print(named.long_help.to_string())
}

fn usage(grammar: &Grammar, what: &str) -> Parsed {
    let cmd = join("updraft-agent", grammar.path);
    Parsed::Usage(format!(
        "updraft-agent: {what}\n\n{}\n\nFor more information, try '{cmd} --help'.\n",
        grammar.usage.trim_end()
    ))
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path} {name}")
    }
}

fn top() -> &'static Grammar {
    &GRAMMAR[0]
}

fn find(path: &str) -> Option<&'static Grammar> {
    GRAMMAR.iter().find(|g| g.path == path)
}

/// What one command's arguments matched.
#[derive(Debug, Default)]
struct Matches {
    /// Options by id; a flag's value is empty.
    options: Vec<(&'static str, OsString)>,
    positionals: Vec<(&'static str, OsString)>,
    /// After `--`.
    last: Vec<OsString>,
}

impl Matches {
    /// Takes `--long`, `--long=VALUE` or `--long VALUE` (the value from `rest`).
    fn option(
        &mut self,
        grammar: &Grammar,
        arg: &str,
        rest: &mut impl Iterator<Item = OsString>,
    ) -> Result<(), String> {
        let (long, inline) = match arg[2..].split_once('=') {
            Some((l, v)) => (l, Some(OsString::from(v))),
            None => (&arg[2..], None),
        };
        let opt = grammar
            .options
            .iter()
            .find(|o| o.long == long)
            .ok_or_else(|| format!("unexpected argument '--{long}'"))?;
        if self.options.iter().any(|(id, _)| *id == opt.id) {
            return Err(format!(
                "the argument '{}' cannot be used multiple times",
                opt.shown
            ));
        }
        let value = match (opt.value, inline) {
            (false, None) => OsString::new(),
            (false, Some(_)) => return Err(format!("'--{long}' takes no value")),
            (true, Some(v)) => v,
            (true, None) => match rest.next() {
                Some(v) if !v.to_string_lossy().starts_with('-') || v == "-" => v,
                _ => {
                    return Err(format!(
                        "a value is required for '{}' but none was supplied",
                        opt.shown
                    ))
                }
            },
        };
        self.options.push((opt.id, value));
        Ok(())
    }

    /// Checks that every required argument of `grammar` is there.
    fn complete(&self, grammar: &Grammar) -> Result<(), String> {
        let missing: Vec<&str> = grammar
            .options
            .iter()
            .filter(|o| o.required && !self.options.iter().any(|(id, _)| *id == o.id))
            .map(|o| o.shown)
            .chain(
                grammar
                    .positionals
                    .iter()
                    .filter(|p| p.required && !self.positionals.iter().any(|(id, _)| *id == p.id))
                    .map(|p| p.id),
            )
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the following required arguments were not provided: {}",
                missing.join(", ")
            ))
        }
    }

    fn take(&mut self, id: &str) -> Option<OsString> {
        let at = self.options.iter().position(|(i, _)| *i == id)?;
        Some(self.options.swap_remove(at).1)
    }

    fn path(&mut self, id: &str) -> Option<PathBuf> {
        self.take(id).map(PathBuf::from)
    }

    fn flag(&mut self, id: &str) -> bool {
        self.take(id).is_some()
    }

    fn string(&mut self, id: &str) -> Result<Option<String>, String> {
        self.take(id).map(utf8).transpose()
    }

    /// The value of option `id` of `grammar`, through `parse`.
    fn parsed<T, E: std::fmt::Display>(
        &mut self,
        grammar: &Grammar,
        id: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<Option<T>, String> {
        let Some(text) = self.string(id)? else {
            return Ok(None);
        };
        let shown = grammar
            .options
            .iter()
            .find(|o| o.id == id)
            .map_or(id, |o| o.shown);
        parse(&text)
            .map(Some)
            .map_err(|e| format!("invalid value '{text}' for '{shown}': {e}"))
    }

    fn positional(&mut self, id: &str) -> Result<OsString, String> {
        let at = self
            .positionals
            .iter()
            .position(|(i, _)| *i == id)
            .ok_or_else(|| format!("missing {id}"))?;
        Ok(self.positionals.swap_remove(at).1)
    }

    fn config(&mut self) -> ConfigArg {
        ConfigArg {
            config: self.path("config"),
        }
    }

    fn client(&mut self) -> ClientArgs {
        ClientArgs {
            socket: self.path("socket"),
            config: self.path("config"),
        }
    }
}

fn utf8(s: OsString) -> Result<String, String> {
    s.into_string()
        .map_err(|s| format!("'{}' is not valid UTF-8", s.to_string_lossy()))
}

/// The command `grammar` names, from what it and the top matched.
fn build(grammar: &Grammar, mut top: Matches, mut m: Matches) -> Result<Cli, String> {
    let required = |v: Option<String>| v.ok_or_else(|| "missing a required option".to_string());
    let command = match grammar.path {
        "serve" => Command::Serve { config: m.config() },
        "check-config" => Command::CheckConfig { config: m.config() },
        "doctor" => Command::Doctor { config: m.config() },
        "enroll" => Command::Enroll {
            server: required(m.string("server")?)?,
            server_name: m.string("server_name")?,
            token: required(m.string("token")?)?,
            ca_sha256: required(m.string("ca_sha256")?)?,
            agent_id: m.string("agent_id")?,
            force: m.flag("force"),
            config: m.config(),
        },
        "run" => Command::Run {
            task: utf8(m.positional("task")?)?,
            input: m.path("input"),
            output: m.path("output"),
            where_: m.parsed(grammar, "where_", parse_where)?,
            detach: m.flag("detach"),
            explain: m.flag("explain"),
            at: m.client(),
            args: std::mem::take(&mut m.last)
                .into_iter()
                .map(utf8)
                .collect::<Result<_, _>>()?,
        },
        "result" => Command::Result {
            id: utf8(m.positional("id")?)?,
            wait: m.flag("wait"),
            delete: m.flag("delete"),
            at: m.client(),
        },
        "status" => Command::Status {
            json: m.flag("json"),
            at: m.client(),
        },
        "policy check" => Command::Policy {
            command: PolicyCommand::Check {
                file: m.positional("file")?.into(),
            },
        },
        "policy explain" => Command::Policy {
            command: PolicyCommand::Explain {
                task: utf8(m.positional("task")?)?,
                input_bytes: m.parsed(grammar, "input_bytes", str::parse::<u64>)?,
                json: m.flag("json"),
                at: m.client(),
            },
        },
        other => return Err(format!("no command `{other}`")),
    };
    Ok(Cli {
        socket: top.path("socket"),
        config: top.path("config"),
        command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::{CommandFactory, Parser};

    /// Command lines right and wrong, each parsed by clap from args.rs and by `parse`.
    #[rustfmt::skip]
    const CORPUS: &[&[&str]] = &[
        &[],
        &["-h"],
        &["--help"],
        &["-V"],
        &["--version"],
        &["help"],
        &["help", "run"],
        &["help", "policy", "explain"],
        &["help", "nope"],
        &["nope"],
        &["-x"],
        &["--nope", "serve"],
        &["serve"],
        &["serve", "--config", "/etc/a.toml"],
        &["serve", "--config=/etc/a.toml"],
        &["--config", "/etc/a.toml", "serve"],
        &["serve", "--socket", "/s"],
        &["serve", "extra"],
        &["serve", "--config"],
        &["serve", "--config", "a", "--config", "b"],
        &["serve", "-h"],
        &["check-config", "--help"],
        &["check-config"],
        &["doctor", "--config", "x.toml"],
        &["enroll", "--server", "h:1", "--token", "t", "--ca-sha256", "ab"],
        &["enroll", "--server", "h:1", "--token", "t", "--ca-sha256", "ab", "--server-name", "n", "--agent-id", "a", "--force", "--config", "c.toml"],
        &["enroll", "--server", "h:1"],
        &["enroll", "--server", "h:1", "--token", "t", "--ca-sha256", "ab", "--force", "--force"],
        &["enroll", "--server", "h:1", "--token", "-t", "--ca-sha256", "ab"],
        &["run", "sha"],
        &["run", "sha", "--where", "cloud", "--detach", "--explain", "--input", "-", "--output", "o", "--socket", "s"],
        &["run", "sha", "--", "a", "-b", "--c", "--"],
        &["run", "--where=local", "sha", "--", "x"],
        &["run", "sha", "--where", "moon"],
        &["run", "sha", "--where"],
        &["run"],
        &["run", "--", "sha"],
        &["run", "sha", "extra"],
        &["run", "sha", "--input"],
        &["run", "sha", "--input", "--detach"],
        &["run", "sha", "--detach=yes"],
        &["run", "sha", "-h"],
        &["run", "sha", "--help"],
        &["run", "sha", "--socket", "s", "--config", "c"],
        &["result", "id1", "--wait", "--delete"],
        &["result"],
        &["result", "--", "id1"],
        &["result", "id1", "id2"],
        &["status", "--json"],
        &["--socket", "s", "status"],
        &["--socket", "s", "--socket", "t", "status"],
        &["status", "--json", "--json"],
        &["policy"],
        &["policy", "--help"],
        &["policy", "check", "p.toml"],
        &["policy", "check", "-"],
        &["policy", "check"],
        &["policy", "explain", "sha", "--input-bytes", "100", "--json"],
        &["policy", "explain", "sha", "--input-bytes", "x"],
        &["policy", "explain", "sha", "--input-bytes", "-1"],
        &["policy", "help", "check"],
        &["policy", "nope"],
        &["policy", "explain", "--help"],
        &["policy", "explain", "-h"],
    ];

    /// clap's command as build.rs gives it to the grammar (the man page's `--where`).
    fn documented() -> clap::Command {
        Cli::command()
            .mut_subcommand("run", |run| {
                run.mut_arg("where_", |a| a.value_parser(["auto", "local", "cloud"]))
            })
            .version(env!("CARGO_PKG_VERSION"))
    }

    #[test]
    fn reads_every_command_line_as_clap_reads_it() {
        for args in CORPUS {
            let argv = std::iter::once("updraft-agent").chain(args.iter().copied());
            let ours = parse(argv.clone().map(OsString::from));
            let clap = documented()
                .try_get_matches_from(argv.clone())
                .and_then(|_| Cli::try_parse_from(argv.clone()));
            match (clap, ours) {
                (Ok(theirs), Parsed::Run(ours)) => {
                    assert_eq!(format!("{theirs:?}"), format!("{ours:?}"), "{args:?}")
                }
                (Err(e), Parsed::Print(text)) if e.kind() == ErrorKind::DisplayVersion => {
                    assert_eq!(text, format!("updraft-agent {VERSION}\n"), "{args:?}")
                }
                (Err(e), Parsed::Print(text)) if e.kind() == ErrorKind::DisplayHelp => {
                    assert_eq!(text, e.to_string(), "{args:?}")
                }
                (Err(e), Parsed::Usage(text))
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
                {
                    assert_eq!(text, e.to_string(), "{args:?}")
                }
                // clap refuses both `--socket` and `--config` itself; normalize does here.
                (Err(e), Parsed::Run(mut ours)) if e.kind() == ErrorKind::ArgumentConflict => {
                    assert!(ours.normalize().is_err(), "{args:?}")
                }
                (Err(e), Parsed::Usage(text)) => {
                    assert!(text.starts_with("updraft-agent: "), "{args:?}: {text}");
                    assert!(text.contains("Usage: updraft-agent"), "{args:?}: {text}");
                    assert!(!matches!(
                        e.kind(),
                        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
                    ));
                }
                (theirs, ours) => panic!("{args:?}: clap {theirs:?}, here {ours:?}"),
            }
        }
    }

    #[test]
    fn the_grammar_has_every_command() {
        let mut paths = vec![String::new()];
        let cmd = documented();
        for sub in cmd.get_subcommands() {
            paths.push(sub.get_name().to_string());
            for leaf in sub.get_subcommands() {
                paths.push(format!("{} {}", sub.get_name(), leaf.get_name()));
            }
        }
        let ours: Vec<&str> = GRAMMAR.iter().map(|g| g.path).collect();
        assert_eq!(ours, paths);
    }

    #[test]
    fn an_error_names_the_argument_and_the_command() {
        let Parsed::Usage(text) =
            parse(["updraft-agent", "run", "sha", "--nope"].map(OsString::from))
        else {
            panic!("parsed")
        };
        assert!(text.contains("'--nope'"), "{text}");
        assert!(text.contains("updraft-agent run --help"), "{text}");
    }
}
