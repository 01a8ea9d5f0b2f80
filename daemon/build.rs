//! Stamps the git commit into `--version`, and writes the man page and the bash, zsh
//! and fish completions from the clap definition (src/cli/args.rs) into the target
//! profile's directory, where the `.deb`'s assets find them (see
//! updraft-build-support).

#[allow(dead_code, unreachable_pub)]
mod cli {
    use std::time::Duration;
    // What src/cli/args.rs takes from its parent module. Value parsers play no part in
    // the page or the completions; the build script parses no arguments.
    fn parse_ttl(_: &str) -> Result<Duration, String> {
        Err("not parsed in the build script".into())
    }
    fn parse_lifetime(_: &str) -> Result<Duration, String> {
        Err("not parsed in the build script".into())
    }
    fn parse_window(_: &str) -> Result<Duration, String> {
        Err("not parsed in the build script".into())
    }
    const VERSION: &str = env!("CARGO_PKG_VERSION");
    pub mod args {
        include!("src/cli/args.rs");
    }
}

fn main() {
    updraft_build_support::stamp_and_document(<cli::args::Cli as clap::CommandFactory>::command());
}
