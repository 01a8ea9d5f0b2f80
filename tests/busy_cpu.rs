//! A sustained busy CPU trips a `for`-rule only once sustained. In a test binary of its
//! own: it burns every core for a few seconds, which would disturb other tests.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SUSTAIN: Duration = Duration::from_secs(2);

#[test]
fn a_busy_cpu_trips_the_rule_only_once_sustained() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.toml"),
        "default = \"local\"\n[[rule]]\nname = \"busy board\"\nwhen = { cpu_percent = { above = 70, for = \"2s\" } }\nplace = \"cloud\"\n",
    )
    .unwrap();
    let c = Cluster::start_in(dir, "", "[signals]\nsample_interval = \"100ms\"\n");
    // Start from a calm board, so the rule's clock cannot have started already.
    wait_for("a calm CPU", Duration::from_secs(60), || {
        let s = c.status().ok()?;
        (s["signals"]["cpu_percent"].as_f64()? < 40.0 && c.explain("echo")["placement"] == "local")
            .then_some(())
    });

    let stop = Arc::new(AtomicBool::new(false));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let spinners: Vec<_> = (0..cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let started = Instant::now();
    let tripped = wait_for(
        "the busy-board rule to trip",
        Duration::from_secs(30),
        || {
            let e = c.explain("echo");
            (e["placement"] == "cloud").then(|| {
                (
                    started.elapsed(),
                    e["reason"].as_str().unwrap_or("").to_string(),
                )
            })
        },
    );
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    // Not before the CPU had been busy for the whole `for` (less one sampling period,
    // since busy CPU is first seen at the sample after it starts).
    assert!(
        tripped.0 >= SUSTAIN - Duration::from_millis(100),
        "tripped after {:?}",
        tripped.0
    );
    assert!(
        tripped.1.starts_with("rule \"busy board\": cpu "),
        "{}",
        tripped.1
    );
    assert!(tripped.1.contains("for 2s"), "{}", tripped.1);
    // Calm again: the rule lets go.
    wait_for("the rule to let go", Duration::from_secs(30), || {
        (c.explain("echo")["placement"] == "local").then_some(())
    });
}
