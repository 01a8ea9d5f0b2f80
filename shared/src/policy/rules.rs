//! Placeholder: filled in by the policy work.
