//! A real Prometheus (Debian's `prometheus`) scrapes a daemon and an agent, each on its
//! `metrics_listen`, and every query of the Grafana dashboard in `dashboards/` returns
//! data.
//!
//! Runs when `prometheus` is installed; `UPDRAFT_PROMETHEUS_TEST=require` (CI) makes a
//! missing one a failure instead of a skip.
mod common;
use common::*;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

/// The address a service logged for its `metrics_listen`.
fn metrics_addr(p: &Proc) -> String {
    wait_for("the metrics address in the log", WAIT, || {
        let log = p.log();
        let line = log.lines().find(|l| l.contains("serving /metrics"))?;
        let at = line.find("metrics_listen=")? + "metrics_listen=".len();
        Some(line[at..].split_whitespace().next()?.to_string())
    })
}

/// `GET path` on `addr`; the body of a 200.
fn get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_string())
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn prometheus_scrapes_both_sides_and_every_dashboard_query_has_data() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("UPDRAFT_PROMETHEUS_TEST").as_deref() != Ok("require"),
            "prometheus is not installed (apt-get install prometheus)"
        );
        eprintln!("skipped: prometheus is not installed");
        return;
    }
    let c = Cluster::start_with(
        "metrics_listen = \"127.0.0.1:0\"\n",
        "metrics_listen = \"127.0.0.1:0\"\n[link]\naccept_timeout = \"1s\"\n",
    );
    let daemon = metrics_addr(&c.daemon);
    let agent = metrics_addr(&c.agent);
    for side in ["cloud", "cloud", "local"] {
        let o = c.run(&["echo", "--where", side], Some(b"hi"));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    let dir = c.dir.path();
    let port = free_port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: updraftd\n    static_configs:\n      - targets: ['{daemon}']\n  - job_name: updraft-agent\n    static_configs:\n      - targets: ['{agent}']\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!(
        "--config.file={}",
        dir.join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        dir.join("tsdb").display()
    ))
    .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let prom = Proc::spawn("prometheus", cmd);
    let api = format!("127.0.0.1:{port}");

    // Both targets up.
    wait_for("prometheus to scrape both targets", WAIT, || {
        let body = get(&api, &format!("/api/v1/query?query={}", encode("up == 1")))?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["data"]["result"].as_array()?.len() == 2).then_some(())
    });

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/updraft-fleet.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let queries: Vec<(String, String)> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap().to_string();
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap().to_string()))
        })
        .collect();
    assert!(queries.len() >= 10, "{queries:?}");
    for (title, expr) in &queries {
        wait_for(
            &format!("data for panel \"{title}\" ({expr})"),
            WAIT,
            || {
                let body = get(&api, &format!("/api/v1/query?query={}", encode(expr)))?;
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                assert_eq!(v["status"], "success", "{title}: {expr}: {v}");
                (!v["data"]["result"].as_array()?.is_empty()).then_some(())
            },
        );
    }
    // The per-agent series name the agent, and count its cloud tasks.
    let body = get(
        &api,
        &format!(
            "/api/v1/query?query={}",
            encode("updraftd_agent_tasks_total{placement=\"cloud\"}")
        ),
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let r = &v["data"]["result"][0];
    assert_eq!(r["metric"]["agent"], "board-1", "{v}");
    assert!(
        r["value"][1].as_str().unwrap().parse::<f64>().unwrap() >= 2.0,
        "{v}"
    );
    drop(prom);
}
