//! The `.deb` packages, built from the tree by `cargo deb` out of the test build's
//! binaries (`--no-build`: the debug binaries the tests run, not a release build).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether `cargo deb` can be run. When it cannot, says so and returns false, or fails
/// the test when the environment variable `require_var` is `require`.
pub fn have_cargo_deb(require_var: &str) -> bool {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let found = Command::new(cargo)
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert_ne!(
            std::env::var(require_var).as_deref(),
            Ok("require"),
            "cargo-deb is required here ({require_var}=require): cargo install cargo-deb"
        );
        eprintln!("cargo-deb is not installed (cargo install cargo-deb); .deb check skipped");
    }
    found
}

/// Builds the package of `crate_name` into `out` from the test build's `binary`
/// (built first by [`super::bin`]) and returns the `.deb`'s path.
pub fn build_deb(crate_name: &str, binary: &str, out: &Path) -> PathBuf {
    super::bin(binary);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        // --fast: lighter compression; the test build's binaries are large.
        .args([
            "deb",
            "-p",
            crate_name,
            "--no-build",
            "--profile",
            "dev",
            "--fast",
        ])
        .arg("--output")
        .arg(out);
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{cmd:?} failed: {stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let deb = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .unwrap_or_else(|| panic!("cargo deb printed no .deb path: {stdout}"));
    PathBuf::from(deb)
}
