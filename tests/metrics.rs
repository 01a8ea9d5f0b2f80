//! `/metrics` of both services, read by a Prometheus text-format parser: the named
//! series are there and count what happened.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{http, wait_for, Cluster};
use prometheus_parse::{Sample, Scrape, Value};

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("metrics parse")
}

/// The value of the sample `name` whose labels include all of `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| matches(x, name, labels))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(h) => h.iter().map(|c| c.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        })
}

fn matches(x: &Sample, name: &str, labels: &[(&str, &str)]) -> bool {
    x.metric == name
        && labels
            .iter()
            .all(|(k, v)| x.labels.get(k).is_some_and(|got| got == *v))
}

/// GET /metrics over plain TCP.
fn scrape_tcp(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("metrics_listen accepts");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

#[test]
fn both_services_expose_the_named_series_and_count_tasks() {
    let c = Cluster::start_with(
        "metrics_listen = \"127.0.0.1:0\"\n",
        "[link]\naccept_timeout = \"1s\"\n",
    );
    for side in ["cloud", "cloud", "local"] {
        let o = c.run(&["echo", "--where", side], Some(b"hi"));
        assert!(
            o.status.success(),
            "{side}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = c.run(&["fail", "--where", "cloud"], None);
    assert_eq!(o.status.code(), Some(7));

    // The agent, on its socket.
    let m = http(&c.socket, "GET", "/metrics", b"").unwrap();
    assert_eq!(m.status, 200);
    let agent = parse(&String::from_utf8(m.body).unwrap());
    let tasks = "updraft_agent_tasks_total";
    assert_eq!(
        value(
            &agent,
            tasks,
            &[("placement", "cloud"), ("task", "echo"), ("outcome", "ok")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &agent,
            tasks,
            &[("placement", "local"), ("task", "echo"), ("outcome", "ok")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &agent,
            tasks,
            &[
                ("placement", "cloud"),
                ("task", "fail"),
                ("outcome", "exit_nonzero")
            ]
        ),
        Some(1.0)
    );
    // The histogram's +Inf bucket holds every finished echo in the cloud.
    assert_eq!(
        value(
            &agent,
            "updraft_agent_task_duration_seconds",
            &[("placement", "cloud"), ("task", "echo")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &agent,
            "updraft_agent_decisions_total",
            &[("placement", "cloud"), ("reason", "requested")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &agent,
            "updraft_agent_cloud_connected",
            &[("daemon", &c.daemon_addr)]
        ),
        Some(1.0)
    );
    for gauge in [
        "updraft_agent_local_running",
        "updraft_agent_local_queued",
        "updraft_agent_cpu_percent",
        "updraft_agent_memory_available_mb",
        "updraft_agent_journal_bytes",
    ] {
        assert!(
            value(&agent, gauge, &[]).is_some(),
            "agent metrics lack {gauge}"
        );
    }

    // The daemon, on metrics_listen.
    let addr = wait_for(
        "the daemon to serve /metrics",
        Duration::from_secs(10),
        || {
            let log = c.daemon.log();
            let line = log.lines().find(|l| l.contains("serving /metrics"))?;
            let at = line.find("metrics_listen=")? + "metrics_listen=".len();
            Some(line[at..].split_whitespace().next()?.to_string())
        },
    );
    let daemon = parse(&scrape_tcp(&addr));
    let tasks = "updraftd_tasks_total";
    assert_eq!(
        value(&daemon, tasks, &[("task", "echo"), ("outcome", "ok")]),
        Some(2.0)
    );
    assert_eq!(
        value(
            &daemon,
            tasks,
            &[("task", "fail"), ("outcome", "exit_nonzero")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &daemon,
            "updraftd_task_duration_seconds",
            &[("task", "echo")]
        ),
        Some(2.0)
    );
    assert_eq!(value(&daemon, "updraftd_runs_total", &[]), Some(3.0));
    assert_eq!(value(&daemon, "updraftd_connections", &[]), Some(1.0));
    assert_eq!(value(&daemon, "updraftd_running", &[]), Some(0.0));
    for gauge in [
        "updraftd_queued",
        "updraftd_capacity",
        "updraftd_draining",
        "updraftd_dedup_hits_total",
        "updraftd_dedup_entries",
    ] {
        assert!(
            value(&daemon, gauge, &[]).is_some(),
            "daemon metrics lack {gauge}"
        );
    }
}
