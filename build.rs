//! Stamps the git commit into `updraft --version` (as the agent's and the daemon's
//! build scripts do for theirs).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    updraft_build_support::commit_env();
}
