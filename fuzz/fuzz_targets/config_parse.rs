//! Arbitrary text through the `[tasks.*]` parser and task spec validation: a broken
//! config must be an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use updraft_proto::spec::{TaskFile, TaskSpec};

fuzz_target!(|text: &str| {
    if let Ok(files) = toml::from_str::<BTreeMap<String, TaskFile>>(text) {
        for (name, file) in files {
            let _ = TaskSpec::from_file(&name, file);
        }
    }
});
