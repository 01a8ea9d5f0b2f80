//! The guest of tests/system.rs: a Debian rootfs made once with debootstrap and
//! cached, booted with `systemd-nspawn` (systemd as PID 1), commands run in it with
//! `nsenter`, and everything undone when it is dropped.
#![allow(unreachable_pub)] // `pub` is how tests/system.rs sees it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Packages the rootfs gets beyond `--variant=minbase`: systemd as init, D-Bus for
/// systemctl, `passwd` for useradd/usermod, `procps` for pgrep.
const ROOTFS_PACKAGES: [&str; 5] = ["systemd", "systemd-sysv", "dbus", "passwd", "procps"];
const SUITE: &str = "bookworm";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where the test's files appear in the guest (read-only).
pub const SHARE: &str = "/mnt/updraft";

/// The host's cgroup v2 mount: `/sys/fs/cgroup` (unified) or `/sys/fs/cgroup/unified`
/// (hybrid).
pub fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists())
}

/// The cached pristine rootfs, made with debootstrap on first use.
pub fn rootfs() -> PathBuf {
    use sha2::Digest;
    let mirror = std::env::var("UPDRAFT_SYSTEM_TEST_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    let cache = PathBuf::from(
        std::env::var("UPDRAFT_SYSTEM_TEST_CACHE")
            .unwrap_or_else(|_| "/var/cache/updraft-test".into()),
    );
    let include = ROOTFS_PACKAGES.join(",");
    let key = format!("{SUITE} minbase {include} {mirror}");
    let hash = hex::encode(&sha2::Sha256::digest(key.as_bytes())[..6]);
    let dir = cache.join(format!("{SUITE}-{hash}"));
    if dir.join("usr/lib/systemd/systemd").exists() {
        return dir;
    }
    std::fs::create_dir_all(&cache)
        .unwrap_or_else(|e| panic!("creating the rootfs cache {}: {e}", cache.display()));
    remove_abandoned(&cache);
    let partial = cache.join(format!("{SUITE}-{hash}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let started = Instant::now();
    eprintln!(
        "system test: debootstrap {SUITE} into {} ...",
        dir.display()
    );
    let out = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={include}"), SUITE])
        .arg(&partial)
        .arg(&mirror)
        .output()
        .expect("running debootstrap");
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&partial);
        panic!(
            "debootstrap {SUITE} from {mirror} failed ({}):\n{}\n{}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stdout), 30),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if std::fs::rename(&partial, &dir).is_err() {
        // Another run made it meanwhile.
        let _ = std::fs::remove_dir_all(&partial);
    }
    eprintln!("system test: rootfs made in {:.0?}", started.elapsed());
    dir
}

/// Removes half-made rootfs trees (`*.partial-PID`) of runs that were killed.
fn remove_abandoned(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((_, pid)) = name.rsplit_once(".partial-") else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What a command in the guest did.
#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A booted container; powered off and cleaned up when dropped, on every exit path.
pub struct Guest {
    nspawn: Child,
    /// The guest's PID 1 (systemd), as the host sees it.
    init: i32,
    /// The cgroup made for the container on a host without systemd.
    cgroup: Option<PathBuf>,
    console: PathBuf,
}

impl Guest {
    pub fn boot(rootfs: &Path, share: &Path) -> Guest {
        let name = format!("updraft-test-{}", std::process::id());
        let console = share.join("console.log");
        let log = std::fs::File::create(&console).expect("console log");
        // On a host booted with systemd, nspawn makes its own scope. Without one (a
        // container, a CI runner) it would stay in the caller's cgroup, and the guest's
        // systemd would take that over: give it a cgroup of its own.
        let host_systemd = Path::new("/run/systemd/system").exists();
        let cgroup = (!host_systemd).then(|| {
            let root = cgroup2_root().expect("a cgroup v2 hierarchy");
            let dir = root.join(&name);
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
            dir
        });
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"[ -z "$CG" ] || echo $$ > "$CG/cgroup.procs" || exit 1; exec "$@""#)
            .arg("sh")
            .arg("systemd-nspawn")
            .args(["--boot", "--register=no", "--private-network"])
            .arg("--volatile=overlay")
            .arg(format!("--machine={name}"))
            .arg(format!("--bind-ro={}:{SHARE}", share.display()))
            .arg("-D")
            .arg(rootfs)
            // The guest runs cgroup v2 only, as a booted bookworm does, whatever the host.
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .env("CG", cgroup.as_deref().unwrap_or(Path::new("")))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if !host_systemd {
            cmd.arg("--keep-unit");
        }
        let nspawn = cmd.spawn().expect("starting systemd-nspawn");
        let mut guest = Guest {
            init: 0,
            nspawn,
            cgroup,
            console,
        };
        guest.init = guest.find_init();
        guest.wait_booted();
        guest
    }

    /// The container's init: nspawn's child once it runs systemd.
    fn find_init(&mut self) -> i32 {
        let nspawn = self.nspawn.id();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!(
                    "systemd-nspawn exited ({status}) while booting:\n{}",
                    self.console()
                );
            }
            let children =
                std::fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children"))
                    .unwrap_or_default();
            for pid in children.split_whitespace() {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    return pid.parse().unwrap();
                }
            }
            assert!(
                Instant::now() < deadline,
                "the container's systemd did not start within 60 s:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_booted(&self) {
        // systemctl fails to connect until the guest's systemd has set up its socket.
        let deadline = Instant::now() + Duration::from_secs(120);
        let out = loop {
            let out = self.sh("timeout 120 systemctl is-system-running --wait");
            // "offline" (or nothing) until the guest's manager answers on its bus.
            let state = out.stdout.trim();
            if !(state.is_empty() || state == "offline") || Instant::now() > deadline {
                break out;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let state = out.stdout.trim();
        if state != "running" {
            let failed = self.sh("systemctl --failed --no-legend --plain");
            assert_eq!(
                state,
                "degraded",
                "the guest did not boot: {out}\n{}",
                self.console()
            );
            eprintln!("system test: guest booted degraded: {}", failed.stdout);
        }
    }

    fn console(&self) -> String {
        tail(
            &std::fs::read_to_string(&self.console).unwrap_or_default(),
            40,
        )
    }

    /// Runs `script` with `sh -c` in the guest, as root in /root (or as `user` in its
    /// home), with a clean environment. At most 3 minutes.
    pub fn run(&self, user: Option<&str>, script: &str) -> Out {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.init.to_string(), "-a", "--", "env", "-i"])
            .arg(format!("PATH={PATH}"))
            .arg("LANG=C.UTF-8")
            .arg(format!("EDITOR={SHARE}/edit"));
        match user {
            None => {
                cmd.args(["HOME=/root", "USER=root"]);
            }
            Some(u) => {
                cmd.arg(format!("HOME=/home/{u}")).arg(format!("USER={u}"));
            }
        }
        cmd.args(["timeout", "-k", "5", "180"]);
        if let Some(u) = user {
            cmd.args(["runuser", "-u", u, "--"]);
        }
        let dir = user.map_or("/root".to_string(), |u| format!("/home/{u}"));
        cmd.args(["sh", "-c", &format!("cd {dir} && {script}")]);
        let o = cmd.output().expect("running nsenter");
        Out {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    pub fn sh(&self, script: &str) -> Out {
        self.run(None, script)
    }

    /// Runs `script` as root; it must exit 0. Returns its stdout.
    pub fn ok(&self, what: &str, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.ok(),
            "{what}: `{script}` failed: {out}\n{}",
            self.journals()
        );
        out.stdout
    }

    /// The end of both services' journals, for failure messages.
    pub fn journals(&self) -> String {
        let out =
            self.sh("journalctl -u updraftd -u updraft-agent -n 40 --no-pager -o short-monotonic");
        format!(
            "--- guest journal (updraftd, updraft-agent):\n{}",
            out.stdout
        )
    }

    /// `systemctl show -p PROP --value UNIT`.
    pub fn show(&self, unit: &str, prop: &str) -> String {
        self.ok(
            "systemctl show",
            &format!("systemctl show -p {prop} --value {unit}"),
        )
        .trim()
        .to_string()
    }

    /// The unit's messages (`journalctl -o cat`).
    pub fn journal(&self, unit: &str) -> String {
        self.ok(
            "journalctl",
            &format!("journalctl -u {unit} -o cat --no-pager"),
        )
    }

    /// Polls `script` (as root) until it exits 0; returns its stdout.
    pub fn wait_until(&self, what: &str, timeout: Duration, script: &str) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.sh(script);
            if out.ok() {
                return out.stdout;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what} (`{script}`: {out})\n{}",
                self.journals()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- guest console:\n{}", self.console());
        }
        let pid = nix::unistd::Pid::from_raw(self.nspawn.id() as i32);
        // SIGTERM: nspawn asks the guest's systemd to power off.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.nspawn.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        if let Some(cg) = &self.cgroup {
            remove_cgroup(cg);
        }
    }
}

/// Removes a cgroup and everything below it (killing what still runs there).
fn remove_cgroup(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::remove_dir(dir).is_err() && dir.exists() {
        if Instant::now() > deadline {
            eprintln!("could not remove the test's cgroup {}", dir.display());
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
