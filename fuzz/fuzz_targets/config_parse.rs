//! Arbitrary text through the `[tasks.*]` parser and catalog validation: a broken
//! config must be an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use updraft_shared::catalog::{Catalog, TaskFile};

fuzz_target!(|text: &str| {
    if let Ok(files) = toml::from_str::<BTreeMap<String, TaskFile>>(text) {
        let _ = Catalog::from_files(files);
    }
});
