//! The `.deb` packages: built by `cargo deb`, unpacked into a scratch root, checked
//! that everything lands where the units expect, that the man page renders and the
//! shell completions are where the shells look, and passed through lintian.
//!
//! Needs `cargo-deb`, `dpkg-deb`, `systemd-sysusers`, `lintian`, `man` and `bash`.
//! Without cargo-deb the test says so and passes, unless `UPDRAFT_PACKAGE_TEST=require`
//! (as `.ci/run` sets).

mod common;

use std::path::Path;
use std::process::Command;

use common::deb::{build_deb, have_cargo_deb};

struct Package {
    /// The Cargo package.
    crate_name: &'static str,
    /// The Debian package and its unit.
    deb_name: &'static str,
    binary: &'static str,
    config: &'static str,
}

const PACKAGES: [Package; 2] = [
    Package {
        crate_name: "updraft-agent",
        deb_name: "updraft-agent",
        binary: "updraft-agent",
        config: "etc/updraft/agent.toml",
    },
    Package {
        crate_name: "updraft-daemon",
        deb_name: "updraftd",
        binary: "updraftd",
        config: "etc/updraft/daemon.toml",
    },
];

fn run(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `Key=value` lines of a unit.
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn debs_install_into_a_scratch_root_where_the_units_expect_and_lintian_finds_no_error() {
    if !have_cargo_deb("UPDRAFT_PACKAGE_TEST") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for p in &PACKAGES {
        let deb = build_deb(p.crate_name, p.binary, dir.path());
        let root = dir.path().join(format!("root-{}", p.deb_name));
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
        let control = dir.path().join(format!("control-{}", p.deb_name));
        run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));

        // The unit, where systemd looks for units a package ships.
        let unit_path = ["lib/systemd/system", "usr/lib/systemd/system"]
            .iter()
            .map(|d| root.join(d).join(format!("{}.service", p.deb_name)))
            .find(|f| f.exists())
            .unwrap_or_else(|| panic!("{}: no unit in the package", p.deb_name));
        let unit = std::fs::read_to_string(&unit_path).unwrap();
        assert_eq!(
            unit,
            std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("systemd")
                    .join(format!("{}.service", p.deb_name))
            )
            .unwrap(),
            "the packaged unit is the one in systemd/"
        );

        // ExecStart's binary and --config file are in the package.
        let exec = unit_values(&unit, "ExecStart");
        let argv: Vec<&str> = exec[0].split_whitespace().collect();
        let binary = root.join(argv[0].trim_start_matches('/'));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&binary)
                .unwrap_or_else(|e| panic!("{}: {}: {e}", p.deb_name, binary.display()))
                .permissions(),
        );
        assert_eq!(mode & 0o755, 0o755, "{} is executable", binary.display());
        let config = argv
            .iter()
            .position(|a| *a == "--config")
            .map(|i| argv[i + 1].trim_start_matches('/'))
            .expect("ExecStart names its --config");
        assert_eq!(config, p.config);
        assert!(root.join(config).is_file(), "{config} is packaged");
        // ...and lies in the unit's ConfigurationDirectory.
        let conf_dir = unit_values(&unit, "ConfigurationDirectory");
        assert!(
            config.starts_with(&format!("etc/{}/", conf_dir[0])),
            "{config} in /etc/{}",
            conf_dir[0]
        );
        let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
        assert!(
            conffiles.lines().any(|l| l == format!("/{config}")),
            "{config} is a conffile: {conffiles}"
        );

        // postinst creates the unit's user from the packaged sysusers file: run that
        // same line against the scratch root.
        let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
        let sysusers = postinst
            .lines()
            .find_map(|l| l.trim().strip_prefix("systemd-sysusers "))
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or_else(|| panic!("postinst creates no user: {postinst}"));
        assert!(
            root.join("usr/lib/sysusers.d").join(sysusers).is_file(),
            "{sysusers} is packaged"
        );
        run(Command::new("systemd-sysusers")
            .arg(format!("--root={}", root.display()))
            .arg(sysusers));
        let user = unit_values(&unit, "User")[0];
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert!(
            passwd.lines().any(|l| l.starts_with(&format!("{user}:"))),
            "sysusers created {user}: {passwd}"
        );

        // The state directory the config names is the unit's StateDirectory.
        let config_text = std::fs::read_to_string(root.join(config)).unwrap();
        let state = unit_values(&unit, "StateDirectory")[0];
        assert!(
            config_text.contains(&format!("state_dir = \"/var/lib/{state}\"")),
            "{config} keeps state in /var/lib/{state}"
        );

        // Enabled on install, never started: the service needs configuring first.
        assert!(
            postinst.contains("enable") && postinst.contains(&format!("{}.service", p.deb_name)),
            "postinst enables the unit: {postinst}"
        );
        assert!(
            !postinst.contains("deb-systemd-invoke start")
                && !postinst.contains("deb-systemd-invoke $_dh_action"),
            "postinst must not start the unit: {postinst}"
        );

        // The packaged binary runs and reads the packaged files.
        if p.deb_name == "updraft-agent" {
            let example = root.join("usr/share/doc/updraft-agent/examples/policy.toml");
            let out = run(Command::new(&binary)
                .args(["policy", "check"])
                .arg(&example));
            assert!(out.contains("ok") || out.contains("rule"), "{out}");
        }

        check_man_page_and_completions(p, &root, &binary);

        // lintian: no errors.
        let o = Command::new("lintian")
            .arg("--no-tag-display-limit")
            .arg(&deb)
            .output()
            .expect("lintian runs (package lintian)");
        let report = String::from_utf8_lossy(&o.stdout);
        let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
        assert!(
            errors.is_empty(),
            "{}: lintian errors:\n{report}",
            p.deb_name
        );
        // Nor any word about the man page: missing (no-manual-page), badly compressed,
        // or groff's complaints.
        let man: Vec<&str> = report
            .lines()
            .filter(|l| {
                l.contains("manual-page") || l.contains("groff") || l.contains("usr/share/man/")
            })
            .collect();
        assert!(
            man.is_empty(),
            "{}: lintian on the man page:\n{report}",
            p.deb_name
        );
    }
}

/// The subcommands `BINARY --help` lists (without `help`).
fn subcommands(binary: &Path) -> Vec<String> {
    let help = run(Command::new(binary).arg("--help"));
    let list: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect();
    assert!(!list.is_empty(), "no commands in --help: {help}");
    list
}

/// The man page renders (no groff warnings) and covers every subcommand; the bash, zsh
/// and fish completions are where each shell looks for a package's completions.
fn check_man_page_and_completions(p: &Package, root: &Path, binary: &Path) {
    let bin = p.binary;
    let page = root.join(format!("usr/share/man/man1/{bin}.1.gz"));
    assert!(page.is_file(), "{bin}: no {}", page.display());
    // man-db renders it as plain text when stdout is no terminal.
    let o = Command::new("man")
        .args(["--warnings", "-E", "UTF-8", "-l"])
        .arg(&page)
        .env("MANWIDTH", "100")
        .output()
        .expect("man runs (package man-db)");
    assert!(o.status.success(), "man -l {}: {o:?}", page.display());
    assert!(
        o.stderr.is_empty(),
        "{bin}: man page warnings: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let plain = String::from_utf8_lossy(&o.stdout);
    assert!(plain.contains("NAME") && plain.contains(bin), "{plain}");
    assert!(
        plain.contains(&format!("{bin} {}", env!("CARGO_PKG_VERSION"))),
        "{plain}"
    );
    for sub in subcommands(binary) {
        assert!(
            plain.contains(&format!("{bin} {sub}")),
            "{bin}: the man page has no `{bin} {sub}`:\n{plain}"
        );
    }

    let bash = root.join(format!("usr/share/bash-completion/completions/{bin}"));
    let zsh = root.join(format!("usr/share/zsh/vendor-completions/_{bin}"));
    let fish = root.join(format!("usr/share/fish/vendor_completions.d/{bin}.fish"));
    for f in [&bash, &zsh, &fish] {
        let text =
            std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{bin}: {}: {e}", f.display()));
        for sub in subcommands(binary) {
            assert!(text.contains(&sub), "{}: no `{sub}`", f.display());
        }
    }
    run(Command::new("bash").arg("-n").arg(&bash));
    assert!(
        std::fs::read_to_string(&zsh)
            .unwrap()
            .starts_with(&format!("#compdef {bin}")),
        "{} is a zsh completion function",
        zsh.display()
    );
    // Bash finds the completion when the command is completed.
    let probe = format!(
        "source {}; COMP_WORDS=({bin} ''); COMP_CWORD=1; COMP_LINE='{bin} '; COMP_POINT=${{#COMP_LINE}}; \
         $(complete -p {bin} | sed -E 's/.*-F ([^ ]+).*/\\1/') {bin} '' {bin}; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        bash.display()
    );
    let words = run(Command::new("bash").arg("-c").arg(&probe));
    for sub in subcommands(binary) {
        assert!(
            words.lines().any(|w| w == sub),
            "bash completes `{bin} ` without `{sub}`: {words}"
        );
    }
}
