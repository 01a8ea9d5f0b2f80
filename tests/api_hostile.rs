//! The local API against hostile clients: more idle connections than the cap, stalled
//! and malformed bodies, oversized heads, bad query parameters, arguments no program
//! can take, and `where=` against the task's `offload`. Every refusal is a JSON error
//! with `Updraft-Error-Code`, and a normal task still runs.

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Small limits so the test reaches them quickly, and tasks for the refusals.
const API_LIMITS: &str =
    "[api]\nmax_connections = 16\nheader_timeout = \"1s\"\nbody_stall_timeout = \"1s\"\n\
[link]\naccept_timeout = \"1s\"\n\
[tasks.private]\nbuiltin = \"echo\"\noffload = \"never\"\n\
[tasks.heavy]\nbuiltin = \"echo\"\noffload = \"always\"\n\
[tasks.withargs]\ncommand = [\"echo\"]\nallow_args = true\n";

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Sends `raw` as it is and returns the whole reply (the agent closes after errors).
fn raw_request(socket: &Path, raw: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Asserts a raw reply is the JSON error `code` with HTTP `status`, and returns its
/// message.
fn assert_error(reply: &str, status: u16, code: &str) -> String {
    assert!(
        reply.starts_with(&format!("HTTP/1.1 {status} ")),
        "want {status}: {reply}"
    );
    let lower = reply.to_ascii_lowercase();
    assert!(
        lower.contains(&format!("updraft-error-code: {code}")),
        "want code {code}: {reply}"
    );
    let body = &reply[reply.find("\r\n\r\n").expect("end of head") + 4..];
    let v: serde_json::Value = serde_json::from_str(body).expect("a JSON error body");
    assert_eq!(v["code"], code, "{reply}");
    v["error"].as_str().expect("an error message").to_string()
}

fn post(c: &Cluster, path: &str, body: &[u8]) -> HttpReply {
    http(&c.socket, "POST", path, body).expect("request")
}

fn error_of(r: &HttpReply) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON error");
    assert_eq!(
        r.header("updraft-error-code"),
        v["code"].as_str(),
        "header and body agree"
    );
    (
        v["code"].as_str().unwrap().to_string(),
        v["error"].as_str().unwrap().to_string(),
    )
}

#[test]
fn idle_connections_over_the_cap_are_refused_and_a_task_still_runs() {
    let c = Cluster::start_with("", API_LIMITS);
    let pid = c.agent.pid();
    let baseline = fd_count(pid);
    // Ten times the cap, each sending nothing.
    let mut idle: Vec<UnixStream> = (0..160)
        .map(|_| UnixStream::connect(&c.socket).expect("connect"))
        .collect();
    for s in &idle {
        s.set_nonblocking(true).unwrap();
    }
    // Those over the cap are answered 503 busy at once and closed.
    let mut replies: Vec<Vec<u8>> = vec![Vec::new(); idle.len()];
    let refused = wait_for(
        "connections over the cap to be refused",
        Duration::from_secs(20),
        || {
            for (s, r) in idle.iter_mut().zip(replies.iter_mut()) {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    r.extend_from_slice(&buf[..n]);
                }
            }
            let n = replies
                .iter()
                .filter(|r| r.starts_with(b"HTTP/1.1 503"))
                .count();
            (n >= 160 - 16).then_some(n)
        },
    );
    assert!(refused < 160, "some connections are served");
    let busy = String::from_utf8_lossy(
        replies
            .iter()
            .find(|r| r.starts_with(b"HTTP/1.1 503"))
            .unwrap(),
    )
    .into_owned();
    let msg = assert_error(&busy, 503, "busy");
    assert!(msg.contains("max_connections"), "{msg}");
    // The agent holds at most the cap's worth of them, and the 32 refused ones it
    // reads from for a second so that their clients can read the refusal.
    let held = fd_count(pid);
    assert!(
        held <= baseline + 16 + 32 + 4,
        "agent fds: {held} with 160 idle connections open (baseline {baseline}, cap 16)"
    );
    // The idle ones that were served are closed after header_timeout, and a normal
    // task runs (a 503 while they still hold every slot is the clear refusal).
    // (A refused client may also see its connection closed under it.)
    let reply = wait_for("a task to run", Duration::from_secs(20), || {
        let r = http(
            &c.socket,
            "POST",
            "/v1/tasks/echo?where=local",
            b"still here",
        )
        .ok()?;
        (r.status != 503).then_some(r)
    });
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, b"still here");
    // Every held connection has been closed by the agent by now or soon.
    wait_for(
        "the agent to close idle connections",
        Duration::from_secs(20),
        || {
            idle.iter_mut()
                .all(|s| {
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) => return true,
                            Ok(_) => continue,
                            Err(_) => return false,
                        }
                    }
                })
                .then_some(())
        },
    );
    assert!(
        c.agent.log().contains("connection limit reached"),
        "{}",
        c.agent.log()
    );
}

#[test]
fn stalled_and_malformed_bodies_are_bad_requests() {
    let c = Cluster::start_with("", API_LIMITS);
    // A body that stops arriving.
    let mut s = UnixStream::connect(&c.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST /v1/tasks/sha?where=local HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789"
    )
    .unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let msg = assert_error(&String::from_utf8_lossy(&reply), 400, "bad_request");
    assert!(msg.contains("stalled"), "{msg}");
    // Malformed chunked encoding, run locally, in the cloud, and detached.
    for query in ["where=local", "where=cloud", "detach=true"] {
        let raw = format!(
            "POST /v1/tasks/sha?{query} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nnot a chunk\r\n0\r\n\r\n"
        );
        let reply = raw_request(&c.socket, raw.as_bytes());
        let msg = assert_error(&reply, 400, "bad_request");
        assert!(msg.contains("malformed"), "{query}: {msg}");
    }
}

#[test]
fn hyper_refusals_carry_the_json_error() {
    let c = Cluster::start_with("", API_LIMITS);
    let big = "x".repeat(40 << 10);
    let reply = raw_request(
        &c.socket,
        format!("GET /v1/status HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    );
    let msg = assert_error(&reply, 431, "bad_request");
    assert!(msg.contains("too large"), "{msg}");
    for (len, status) in [(10_000, 414), (70_000, 431)] {
        let long = "a".repeat(len);
        let reply = raw_request(
            &c.socket,
            format!("GET /v1/status?{long} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(),
        );
        assert_error(&reply, status, "bad_request");
    }
    let reply = raw_request(&c.socket, b"NOT HTTP AT ALL\r\n\r\n");
    assert_error(&reply, 400, "bad_request");
    // The agent still serves.
    assert_eq!(post(&c, "/v1/tasks/echo?where=local", b"ok").status, 200);
}

#[test]
fn bad_query_parameters_and_nul_arguments_are_refused() {
    let c = Cluster::start_with("", API_LIMITS);
    for (path, names) in [
        ("/v1/tasks/echo?detach=yes", "detach"),
        ("/v1/tasks/echo?detach=maybe", "detach"),
        ("/v1/tasks/echo?where=local&where=cloud", "where"),
        ("/v1/tasks/echo?detach=true&detach=false", "detach"),
        ("/v1/tasks/echo?wehre=local", "wehre"),
        ("/v1/tasks/echo?where=moon", "where"),
        ("/v1/tasks/withargs?arg=a%00b", "NUL"),
    ] {
        let r = post(&c, path, b"");
        assert_eq!(r.status, 400, "{path}");
        let (code, msg) = error_of(&r);
        assert_eq!(code, "bad_request", "{path}");
        assert!(msg.contains(names), "{path}: {msg}");
    }
    for path in [
        "/v1/tasks/0123?wait=maybe",
        "/v1/tasks/0123?wait=true&wait=true",
        "/v1/status?verbose=1",
        "/v1/explain/echo?where=local&where=local",
    ] {
        let r = http(&c.socket, "GET", path, b"").unwrap();
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(error_of(&r).0, "bad_request", "{path}");
    }
    // The documented spellings still work.
    let r = post(&c, "/v1/tasks/withargs?where=local&arg=a&arg=b", b"");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"a b\n"[..]));
    assert_eq!(post(&c, "/v1/tasks/echo?detach=1", b"x").status, 202);
    assert_eq!(post(&c, "/v1/tasks/echo?detach=false", b"x").status, 200);
}

#[test]
fn offload_wins_over_where() {
    let c = Cluster::start_with("", API_LIMITS);
    for (path, word) in [
        ("/v1/tasks/private?where=cloud", "never"),
        ("/v1/tasks/private?where=cloud&detach=true", "never"),
        ("/v1/tasks/heavy?where=local", "always"),
    ] {
        let r = post(&c, path, b"data");
        assert_eq!(r.status, 403, "{path}");
        let (code, msg) = error_of(&r);
        assert_eq!(code, "not_allowed", "{path}");
        assert!(
            msg.contains(word) && msg.contains("offload"),
            "{path}: {msg}"
        );
    }
    let r = http(&c.socket, "GET", "/v1/explain/private?where=cloud", b"").unwrap();
    assert_eq!(r.status, 403);
    // What offload allows still runs, where offload says.
    let r = post(&c, "/v1/tasks/private?where=local", b"data");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("updraft-placement"), Some("local"));
    let r = post(&c, "/v1/tasks/private", b"data");
    assert_eq!(r.header("updraft-placement"), Some("local"));
}

#[test]
fn daemon_metrics_listen_caps_idle_connections() {
    let c = Cluster::start_with("metrics_listen = \"127.0.0.1:0\"\n", API_LIMITS);
    let addr = wait_for(
        "the daemon to serve /metrics",
        Duration::from_secs(20),
        || {
            let log = c.daemon.log();
            let line = log.lines().find(|l| l.contains("serving /metrics"))?;
            let at = line.find("metrics_listen=")? + "metrics_listen=".len();
            Some(line[at..].split_whitespace().next()?.to_string())
        },
    );
    let pid = c.daemon.pid();
    let baseline = fd_count(pid);
    // Three times the cap of 64, each sending nothing.
    let idle: Vec<std::net::TcpStream> = (0..192)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    // Over the cap, a connection gets a 503 (or is closed) at once.
    let mut answered = vec![false; idle.len()];
    let refused = wait_for(
        "the daemon to refuse connections over its cap",
        Duration::from_secs(20),
        || {
            for (mut s, done) in idle.iter().zip(answered.iter_mut()) {
                if *done {
                    continue;
                }
                s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
                let mut buf = [0u8; 256];
                *done = match s.read(&mut buf) {
                    Ok(0) => true,
                    Ok(_) => buf.starts_with(b"HTTP/1.1 503"),
                    Err(_) => false,
                };
            }
            let n = answered.iter().filter(|d| **d).count();
            (n >= 192 - 64).then_some(n)
        },
    );
    assert!(refused >= 192 - 64);
    let held = fd_count(pid);
    assert!(
        held <= baseline + 64 + 4,
        "daemon fds: {held} with 192 idle connections to /metrics (baseline {baseline}, cap 64)"
    );
    // The idle ones are closed after the header timeout, and a scrape works again.
    wait_for("a scrape to succeed", Duration::from_secs(30), || {
        let mut s = std::net::TcpStream::connect(&addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).ok()?;
        reply.starts_with("HTTP/1.1 200").then_some(())
    });
    drop(idle);
}
