//! Arbitrary text through the policy parser, and every policy that parses through the
//! evaluator: a broken policy must be an error with a position inside the file, never
//! a panic, and any valid policy must decide.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use updraft_proto::policy::eval::Evaluator;
use updraft_proto::policy::{rules, Signals, TaskInfo};

fuzz_target!(|text: &str| {
    match rules::parse(text, Path::new("policy.toml")) {
        Ok(policy) => {
            let mut ev = Evaluator::new(Arc::new(policy));
            let now = Instant::now();
            let tags = vec!["private".to_string()];
            let task = TaskInfo { name: "t", tags: &tags };
            let busy = Signals { cpu_percent: Some(95.0), battery_percent: Some(20.0), charging: Some(false), ..Default::default() };
            ev.observe(&busy, now);
            let _ = ev.decide(task, &busy, now + Duration::from_secs(30));
            let _ = ev.decide(task, &Signals::default(), now + Duration::from_secs(60));
        }
        Err(e) => {
            let lines = text.lines().count().max(1);
            assert!(e.line >= 1 && e.line <= lines + 1, "line {} outside a {lines}-line file", e.line);
            assert!(e.column >= 1);
            assert!(!e.to_string().contains('\n'), "error is not one line: {e}");
        }
    }
});
