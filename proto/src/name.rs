//! Task names: the one rule for what may name a task, shared by the catalog, the wire
//! header and the cost model's saved estimates.

/// Longest task name: names appear in URLs, metrics labels and log lines.
pub const MAX_TASK_NAME_LEN: usize = 64;

/// True for names usable in URLs, metrics labels and logs: 1 to [`MAX_TASK_NAME_LEN`]
/// characters of `a-z`, `0-9`, `-`, `_`, `.`.
pub fn valid_task_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TASK_NAME_LEN
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_lowercase_words() {
        assert!(valid_task_name("sha256"));
        assert!(valid_task_name("resize.v2_small-x"));
        assert!(valid_task_name(&"a".repeat(MAX_TASK_NAME_LEN)));
        assert!(!valid_task_name(&"a".repeat(MAX_TASK_NAME_LEN + 1)));
        assert!(!valid_task_name(""));
        assert!(!valid_task_name("Sha256"));
        assert!(!valid_task_name("a/b"));
        assert!(!valid_task_name("a b"));
    }
}
