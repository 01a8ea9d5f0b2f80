//! Stamps the git commit into `--version`, and writes the man page and the bash, zsh
//! and fish completions from the clap definition (src/cli/args.rs) into the target
//! profile's directory, where the `.deb`'s assets find them (see
//! updraft-build-support); and writes the grammar the binary parses its command line
//! with, from the same definition.

#[allow(dead_code, unreachable_pub)]
mod cli {
    // What src/cli/args.rs takes from its parent module. What values parse into plays
    // no part in the page or the completions.
    type Where = String;
    fn parse_where(s: &str) -> Result<Where, String> {
        Ok(s.to_string())
    }
    const VERSION: &str = env!("CARGO_PKG_VERSION");
    pub mod args {
        include!("src/cli/args.rs");
    }
}

fn main() {
    let cmd = <cli::args::Cli as clap::CommandFactory>::command()
        // The binary parses `--where` with a plain function (smaller); the page and the
        // completions name its values (a unit test in src/cli.rs checks they parse).
        .mut_subcommand("run", |run| {
            run.mut_arg("where_", |a| a.value_parser(["auto", "local", "cloud"]))
        });
    updraft_build_support::stamp_and_document(cmd.clone());
    // The binary's own parser reads the command line from this (src/cli/parse.rs).
    updraft_build_support::write_grammar(cmd.version(env!("CARGO_PKG_VERSION")))
        .expect("writing the command-line grammar to OUT_DIR");
}
