//! The policy evaluator: signals + `now` → [`Verdict`], sans IO.
//!
//! An [`Evaluator`] holds a [`Policy`] and, for every numeric test, a little state: a
//! hysteresis latch and the instant the latched condition last became true (for `for`).
//! The sampler feeds it with [`Evaluator::observe`] (each second); [`Evaluator::decide`]
//! observes once more with the decision's snapshot and returns the first matching rule.
//!
//! A numeric test goes through three stages at each observation:
//! 1. *latch*: off → on when the value passes the threshold strictly (`> above`,
//!    `< below`); on → off when it comes back to the release point
//!    (`above - hysteresis` or `below + hysteresis`, inclusive) or the signal is absent;
//! 2. *sustain*: the instant the latch last went on is remembered; with `for = D`, the test
//!    is true only once the latch has stayed on for at least D (as seen at observations:
//!    between two samples that both found it on, it is assumed to have stayed on);
//! 3. the test is then true or false for every decision until the next observation.
//!
//! `input_bytes` belongs to the task being placed, not to the board: its tests have no
//! state and are checked against each decision's snapshot alone. Boolean tests are plain
//! comparisons. A test on an absent signal is false.
//!
//! A decision allocates only its reason string (the rule name in the verdict is shared).

use super::rules::{Compare, Condition, MatchedBy, Policy, Rule, Test, Threshold};
use super::{Place, Signal, Signals, TaskInfo, Value};
use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::Instant;

/// The outcome of [`Evaluator::decide`].
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Where the policy sends the task. [`Place::Auto`] hands it to the cost model.
    pub place: Place,
    /// The rule that decided; `None` when no rule matched and the default applied.
    pub rule: Option<Arc<str>>,
    /// Operator-readable why, naming the rule and the values that matched, e.g.
    /// `rule "save battery": battery 22% < 30%, discharging` or
    /// `no rule matched; default auto`. One line.
    pub reason: String,
}

impl fmt::Display for Verdict {
    /// `cloud (rule "save battery": battery 22% < 30%, discharging)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.place.as_str(), self.reason)
    }
}

/// Runs a [`Policy`] over a stream of observations. Not shared between threads by
/// itself: the agent keeps one behind its placement lock.
#[derive(Debug)]
pub struct Evaluator {
    policy: Arc<Policy>,
    /// One slot per test of every rule, flattened in rule order then `when` order.
    /// Slots of stateless tests stay at their default.
    states: Vec<TestState>,
}

/// What a numeric test remembers between observations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TestState {
    /// The condition holds, hysteresis considered.
    latched: bool,
    /// When `latched` last went from off to on.
    since: Option<Instant>,
}

impl Evaluator {
    /// An evaluator with no history: every test starts off.
    pub fn new(policy: Arc<Policy>) -> Evaluator {
        let states = vec![TestState::default(); test_count(&policy)];
        Evaluator { policy, states }
    }

    /// The policy being evaluated.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The policy being evaluated, shared.
    pub fn policy_arc(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Swaps in a reloaded policy. A rule that is unchanged (same name, same `match`,
    /// `when` and `place`) keeps its tests' latches and `for` timers, so editing one rule
    /// does not restart the others' sustain periods; every other rule starts afresh.
    pub fn replace_policy(&mut self, policy: Arc<Policy>) {
        let mut states = vec![TestState::default(); test_count(&policy)];
        let mut at = 0;
        for rule in policy.rules() {
            let n = rule.when.len();
            if let Some(old) = self.rule_states(rule) {
                states[at..at + n].copy_from_slice(old);
            }
            at += n;
        }
        self.policy = policy;
        self.states = states;
    }

    /// The state slots of the current policy's rule identical to `rule`, if any.
    fn rule_states(&self, rule: &Rule) -> Option<&[TestState]> {
        let mut at = 0;
        for old in self.policy.rules() {
            let n = old.when.len();
            if old == rule {
                return Some(&self.states[at..at + n]);
            }
            at += n;
        }
        None
    }

    /// Updates every stateful test from a periodic sample of the board's signals.
    /// `signals.input_bytes` is ignored here (it is per task). Call it at a steady pace
    /// (the sampler's interval): a `for` period is measured between observations.
    pub fn observe(&mut self, signals: &Signals, now: Instant) {
        let tests = self.policy.rules().iter().flat_map(|r| r.when.iter());
        for (test, state) in tests.zip(self.states.iter_mut()) {
            if let (Condition::Threshold(t), true) = (&test.condition, test.is_stateful()) {
                state.update(t, number(signals, test.signal), now);
            }
        }
    }

    /// Places one task: observes `signals` at `now`, then returns the verdict of the first
    /// rule, top to bottom, whose `match` and `when` hold for `task`; or the default.
    /// `signals.input_bytes` should be this task's input size (or `None` when unknown).
    pub fn decide(&mut self, task: TaskInfo<'_>, signals: &Signals, now: Instant) -> Verdict {
        self.observe(signals, now);
        let mut at = 0;
        for rule in self.policy.rules() {
            let states = &self.states[at..at + rule.when.len()];
            at += rule.when.len();
            if !rule.applies_to(task) {
                continue;
            }
            let holds = rule
                .when
                .iter()
                .zip(states)
                .all(|(test, state)| test_holds(test, state, signals, now));
            if holds {
                return Verdict {
                    place: rule.place,
                    rule: Some(Arc::clone(&rule.name)),
                    reason: reason(rule, task, signals),
                };
            }
        }
        Verdict {
            place: self.policy.default_place(),
            rule: None,
            reason: format!(
                "no rule matched; default {}",
                self.policy.default_place().as_str()
            ),
        }
    }
}

fn test_count(policy: &Policy) -> usize {
    policy.rules().iter().map(|r| r.when.len()).sum()
}

impl TestState {
    fn update(&mut self, t: &Threshold, value: Option<f64>, now: Instant) {
        let on = match value {
            None => false,
            Some(v) if self.latched => t.still_holds(v),
            Some(v) => t.holds(v),
        };
        if on && !self.latched {
            self.since = Some(now);
        } else if !on {
            self.since = None;
        }
        self.latched = on;
    }

    /// Latched, and for long enough.
    fn is_true(&self, t: &Threshold, now: Instant) -> bool {
        match (self.latched, t.sustain, self.since) {
            (false, _, _) => false,
            (true, None, _) => true,
            (true, Some(d), Some(since)) => now.saturating_duration_since(since) >= d,
            (true, Some(_), None) => false,
        }
    }
}

fn test_holds(test: &Test, state: &TestState, signals: &Signals, now: Instant) -> bool {
    match &test.condition {
        Condition::Is(want) => signals.get(test.signal) == Some(Value::Bool(*want)),
        Condition::Threshold(t) if !test.is_stateful() => {
            number(signals, test.signal).is_some_and(|v| t.holds(v))
        }
        Condition::Threshold(t) => state.is_true(t, now),
    }
}

/// A numeric signal's value; NaN counts as absent.
fn number(signals: &Signals, signal: Signal) -> Option<f64> {
    match signals.get(signal) {
        Some(Value::Number(v)) if !v.is_nan() => Some(v),
        _ => None,
    }
}

/// `rule "NAME": what matched, ...`.
fn reason(rule: &Rule, task: TaskInfo<'_>, signals: &Signals) -> String {
    let mut out = String::with_capacity(64 + rule.name.len());
    // Writing into a String cannot fail.
    let _ = write!(out, "rule \"{}\":", rule.name);
    let mut sep = " ";
    match rule.task_match.as_ref().and_then(|m| m.matched_by(task)) {
        Some(MatchedBy::Name(n)) => {
            let _ = write!(out, "{sep}task {n}");
            sep = ", ";
        }
        Some(MatchedBy::Tag(t)) => {
            let _ = write!(out, "{sep}tag {t}");
            sep = ", ";
        }
        None => {}
    }
    for test in &rule.when {
        out.push_str(sep);
        sep = ", ";
        describe(&mut out, test, signals);
    }
    if rule.task_match.is_none() && rule.when.is_empty() {
        out.push_str(" always");
    }
    out
}

/// `battery 22% < 30%`, `cpu 91% > 85% for 10s`,
/// `cpu 83% (held > 85% until <= 80.75%)`, `discharging`.
fn describe(out: &mut String, test: &Test, signals: &Signals) {
    match (&test.condition, signals.get(test.signal)) {
        (Condition::Threshold(t), Some(Value::Number(v))) => {
            let (label, unit) = label(test.signal);
            let (sym, t_value) = (t.compare.symbol(), Num(t.value));
            let _ = if t.holds(v) {
                write!(out, "{label} {}{unit} {sym} {t_value}{unit}", Num(v))
            } else {
                let back = match t.compare {
                    Compare::Above => "<=",
                    Compare::Below => ">=",
                };
                let release = Num(t.release_point());
                write!(
                    out,
                    "{label} {}{unit} (held {sym} {t_value}{unit} until {back} {release}{unit})",
                    Num(v)
                )
            };
            if let Some(d) = t.sustain {
                let _ = write!(out, " for {}", humantime::format_duration(d));
            }
        }
        (Condition::Is(b), _) => out.push_str(bool_label(test.signal, *b)),
        // Unreachable for a test that held; say something true anyway.
        (Condition::Threshold(_), _) => {
            let _ = write!(out, "{} absent", test.signal.name());
        }
    }
}

/// How a numeric signal reads in a reason: label and unit suffix. ASCII only, so reasons
/// fit in HTTP headers.
fn label(signal: Signal) -> (&'static str, &'static str) {
    match signal {
        Signal::CpuPercent => ("cpu", "%"),
        Signal::LoadAvg => ("load", ""),
        Signal::MemoryAvailableMb => ("memory available", " MiB"),
        Signal::TemperatureC => ("temperature", " C"),
        Signal::BatteryPercent => ("battery", "%"),
        Signal::RttMs => ("rtt", " ms"),
        Signal::BandwidthMbps => ("bandwidth", " Mbit/s"),
        Signal::CloudQueue => ("cloud queue", ""),
        Signal::LocalQueue => ("local queue", ""),
        Signal::InputBytes => ("input", " bytes"),
        Signal::Charging | Signal::OnBattery | Signal::CloudConnected => (signal.name(), ""),
    }
}

fn bool_label(signal: Signal, value: bool) -> &'static str {
    match (signal, value) {
        (Signal::Charging, true) => "charging",
        (Signal::Charging, false) => "discharging",
        (Signal::OnBattery, true) => "on battery",
        (Signal::OnBattery, false) => "on external power",
        (Signal::CloudConnected, true) => "cloud connected",
        (Signal::CloudConnected, false) => "cloud not connected",
        (s, true) => s.name(),
        (_, false) => "false",
    }
}

/// A number as people write it: `22`, `0.75`, `91.04`, `1.5`.
struct Num(f64);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        // Decide the decimals on the rounded value, so 312.4 (312.39999...) reads "312.4".
        let hundredths = (v * 100.0).round();
        if v.abs() >= 1e13 || hundredths % 100.0 == 0.0 {
            write!(f, "{v:.0}")
        } else if hundredths % 10.0 == 0.0 {
            write!(f, "{v:.1}")
        } else {
            write!(f, "{v:.2}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::rules::parse;
    use std::path::Path;
    use std::time::Duration;

    fn policy(text: &str) -> Arc<Policy> {
        Arc::new(parse(text, Path::new("policy.toml")).unwrap_or_else(|e| panic!("{e}")))
    }

    fn evaluator(text: &str) -> Evaluator {
        Evaluator::new(policy(text))
    }

    /// A one-rule policy: `when` as given, place cloud, default local.
    fn one_rule(when: &str) -> Evaluator {
        evaluator(&format!(
            "default = \"local\"\n[[rule]]\nname = \"r\"\nwhen = {{ {when} }}\nplace = \"cloud\"\n"
        ))
    }

    const TASK: TaskInfo<'static> = TaskInfo {
        name: "echo",
        tags: &[],
    };

    fn set(signals: &mut Signals, signal: Signal, v: Value) {
        let (n, b) = match v {
            Value::Number(n) => (Some(n), None),
            Value::Bool(b) => (None, Some(b)),
        };
        match signal {
            Signal::CpuPercent => signals.cpu_percent = n,
            Signal::LoadAvg => signals.load_avg = n,
            Signal::MemoryAvailableMb => signals.memory_available_mb = n,
            Signal::TemperatureC => signals.temperature_c = n,
            Signal::BatteryPercent => signals.battery_percent = n,
            Signal::Charging => signals.charging = b,
            Signal::OnBattery => signals.on_battery = b,
            Signal::RttMs => signals.rtt_ms = n,
            Signal::BandwidthMbps => signals.bandwidth_mbps = n,
            Signal::CloudConnected => signals.cloud_connected = b,
            Signal::CloudQueue => signals.cloud_queue = n,
            Signal::LocalQueue => signals.local_queue = n,
            Signal::InputBytes => signals.input_bytes = n,
        }
    }

    fn with(signal: Signal, v: Value) -> Signals {
        let mut s = Signals::default();
        set(&mut s, signal, v);
        s
    }

    #[test]
    fn every_signal_is_tested_by_its_own_value() {
        use Value::{Bool as B, Number as N};
        // (when, signal, a value that matches, a value that does not)
        let cases = [
            (
                "cpu_percent = { above = 85 }",
                Signal::CpuPercent,
                N(90.0),
                N(85.0),
            ),
            (
                "cpu_percent = { below = 10 }",
                Signal::CpuPercent,
                N(5.0),
                N(10.0),
            ),
            (
                "load_avg = { above = 2.5 }",
                Signal::LoadAvg,
                N(2.6),
                N(2.5),
            ),
            (
                "memory_available_mb = { below = 64 }",
                Signal::MemoryAvailableMb,
                N(63.0),
                N(64.0),
            ),
            (
                "temperature_c = { above = 70 }",
                Signal::TemperatureC,
                N(71.0),
                N(69.0),
            ),
            (
                "battery_percent = { below = 30 }",
                Signal::BatteryPercent,
                N(29.0),
                N(30.0),
            ),
            ("charging = true", Signal::Charging, B(true), B(false)),
            ("charging = false", Signal::Charging, B(false), B(true)),
            ("on_battery = true", Signal::OnBattery, B(true), B(false)),
            (
                "rtt_ms = { above = 250 }",
                Signal::RttMs,
                N(251.0),
                N(250.0),
            ),
            (
                "bandwidth_mbps = { below = 1 }",
                Signal::BandwidthMbps,
                N(0.5),
                N(1.0),
            ),
            (
                "cloud_connected = false",
                Signal::CloudConnected,
                B(false),
                B(true),
            ),
            (
                "cloud_queue = { above = 8 }",
                Signal::CloudQueue,
                N(9.0),
                N(8.0),
            ),
            (
                "local_queue = { above = 0 }",
                Signal::LocalQueue,
                N(1.0),
                N(0.0),
            ),
            (
                "input_bytes = { above = 1000000 }",
                Signal::InputBytes,
                N(2e6),
                N(1e6),
            ),
        ];
        let now = Instant::now();
        for (when, signal, yes, no) in cases {
            let mut ev = one_rule(when);
            let v = ev.decide(TASK, &with(signal, no), now);
            assert_eq!(v.place, Place::Local, "{when} at {no:?}: {}", v.reason);
            let v = ev.decide(TASK, &with(signal, yes), now);
            assert_eq!(v.place, Place::Cloud, "{when} at {yes:?}: {}", v.reason);
            assert_eq!(v.rule.as_deref(), Some("r"));
            // Absent: never matches, even straight after matching.
            let v = ev.decide(TASK, &Signals::default(), now);
            assert_eq!(v.place, Place::Local, "{when} absent: {}", v.reason);
            assert_eq!(v.rule, None);
        }
    }

    #[test]
    fn nan_counts_as_absent() {
        let mut ev = one_rule("cpu_percent = { below = 50 }");
        let v = ev.decide(
            TASK,
            &with(Signal::CpuPercent, Value::Number(f64::NAN)),
            Instant::now(),
        );
        assert_eq!(v.place, Place::Local);
    }

    /// Runs a series of (seconds, cpu, want cloud?) through observe/decide.
    fn run_cpu(ev: &mut Evaluator, steps: &[(u64, Option<f64>, bool)]) {
        let t0 = Instant::now();
        for &(secs, cpu, want) in steps {
            let signals = Signals {
                cpu_percent: cpu,
                ..Signals::default()
            };
            let v = ev.decide(TASK, &signals, t0 + Duration::from_secs(secs));
            assert_eq!(
                v.place == Place::Cloud,
                want,
                "t={secs}s cpu={cpu:?}: {}",
                v.reason
            );
        }
    }

    #[test]
    fn for_needs_the_condition_sustained() {
        let mut ev = one_rule("cpu_percent = { above = 85, for = \"10s\", hysteresis = 0 }");
        run_cpu(
            &mut ev,
            &[
                (0, Some(90.0), false),
                (5, Some(95.0), false),
                (9, Some(90.0), false),
                (10, Some(90.0), true),
                (30, Some(99.0), true),
                // The condition breaks: the timer restarts from the next rise.
                (31, Some(80.0), false),
                (32, Some(90.0), false),
                (41, Some(90.0), false),
                (42, Some(90.0), true),
                // The signal disappears: same.
                (43, None, false),
                (44, Some(90.0), false),
                (53, Some(90.0), false),
                (54, Some(90.0), true),
            ],
        );
    }

    #[test]
    fn observe_alone_builds_up_for() {
        // The sampler observes every second; a decision after 10 s sees it sustained.
        let mut ev = one_rule("cpu_percent = { above = 85, for = \"10s\" }");
        let t0 = Instant::now();
        let busy = with(Signal::CpuPercent, Value::Number(95.0));
        for s in 0..10 {
            ev.observe(&busy, t0 + Duration::from_secs(s));
        }
        assert_eq!(
            ev.decide(TASK, &busy, t0 + Duration::from_secs(9)).place,
            Place::Local
        );
        assert_eq!(
            ev.decide(TASK, &busy, t0 + Duration::from_secs(10)).place,
            Place::Cloud
        );
    }

    #[test]
    fn hysteresis_stops_flapping() {
        // Default band for above 85: 4.25, so it lets go at <= 80.75.
        let mut ev = one_rule("cpu_percent = { above = 85 }");
        run_cpu(
            &mut ev,
            &[
                (0, Some(84.0), false),
                (1, Some(86.0), true),
                (2, Some(84.0), true),
                (3, Some(86.0), true),
                (4, Some(84.0), true),
                (5, Some(81.0), true),
                (6, Some(80.75), false),
                (7, Some(84.0), false),
                (8, Some(86.0), true),
            ],
        );
    }

    #[test]
    fn hysteresis_below_and_explicit_band() {
        let mut ev = one_rule("battery_percent = { below = 30, hysteresis = 5 }");
        let t0 = Instant::now();
        for (battery, want) in [
            (31.0, false),
            (29.0, true),
            (31.0, true),
            (29.0, true),
            (34.0, true),
            (35.0, false),
            (31.0, false),
        ] {
            let v = ev.decide(
                TASK,
                &with(Signal::BatteryPercent, Value::Number(battery)),
                t0,
            );
            assert_eq!(
                v.place == Place::Cloud,
                want,
                "battery {battery}: {}",
                v.reason
            );
        }
    }

    #[test]
    fn hysteresis_zero_flaps_with_the_value() {
        let mut ev = one_rule("cpu_percent = { above = 85, hysteresis = 0 }");
        run_cpu(
            &mut ev,
            &[
                (0, Some(86.0), true),
                (1, Some(84.0), false),
                (2, Some(86.0), true),
            ],
        );
    }

    #[test]
    fn jitter_within_the_band_does_not_restart_for() {
        let mut ev = one_rule("cpu_percent = { above = 85, for = \"10s\" }");
        run_cpu(
            &mut ev,
            &[
                (0, Some(86.0), false),
                (4, Some(84.0), false),
                (8, Some(86.0), false),
                (10, Some(84.0), true),
            ],
        );
    }

    #[test]
    fn first_matching_rule_wins() {
        let mut ev = evaluator(
            r#"
[[rule]]
name = "hot"
when = { temperature_c = { above = 80 } }
place = "cloud"
[[rule]]
name = "busy"
when = { cpu_percent = { above = 50 } }
place = "local"
[[rule]]
name = "catch-all"
place = "cloud"
"#,
        );
        let now = Instant::now();
        let s = |t: f64, c: f64| Signals {
            temperature_c: Some(t),
            cpu_percent: Some(c),
            ..Signals::default()
        };
        for (signals, rule, place) in [
            (s(90.0, 90.0), "hot", Place::Cloud),
            (s(20.0, 90.0), "busy", Place::Local),
            (s(20.0, 10.0), "catch-all", Place::Cloud),
        ] {
            let v = ev.decide(TASK, &signals, now);
            assert_eq!(
                (v.rule.as_deref(), v.place),
                (Some(rule), place),
                "{}",
                v.reason
            );
        }
        assert_eq!(
            ev.decide(TASK, &s(20.0, 10.0), now).reason,
            "rule \"catch-all\": always"
        );
    }

    #[test]
    fn stateful_tests_are_observed_even_behind_a_matching_rule() {
        // Rule 1 wins at first; rule 2's `for` timer must run meanwhile.
        let mut ev = evaluator(
            r#"
[[rule]]
name = "first"
when = { cloud_connected = false }
place = "local"
[[rule]]
name = "busy"
when = { cpu_percent = { above = 50, for = "5s" } }
place = "cloud"
"#,
        );
        let t0 = Instant::now();
        let s = |c: bool| Signals {
            cloud_connected: Some(c),
            cpu_percent: Some(90.0),
            ..Signals::default()
        };
        assert_eq!(
            ev.decide(TASK, &s(false), t0).rule.as_deref(),
            Some("first")
        );
        let v = ev.decide(TASK, &s(true), t0 + Duration::from_secs(5));
        assert_eq!(v.rule.as_deref(), Some("busy"), "{}", v.reason);
    }

    #[test]
    fn match_by_name_and_tag() {
        let mut ev = evaluator(
            r#"
[[rule]]
name = "private"
match = { tags = ["private"] }
place = "local"
[[rule]]
name = "named"
match = { names = ["thumbnail", "resize"] }
place = "cloud"
[[rule]]
name = "either"
match = { names = ["echo"], tags = ["media"] }
when = { cpu_percent = { above = 50 } }
place = "cloud"
"#,
        );
        let now = Instant::now();
        let busy = with(Signal::CpuPercent, Value::Number(90.0));
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (private, media, none) = (tags(&["x", "private"]), tags(&["media"]), tags(&[]));
        for (name, tags, signals, want, reason) in [
            (
                "thumbnail",
                &private,
                &busy,
                Some("private"),
                "rule \"private\": tag private",
            ),
            (
                "thumbnail",
                &none,
                &busy,
                Some("named"),
                "rule \"named\": task thumbnail",
            ),
            (
                "resize",
                &media,
                &busy,
                Some("named"),
                "rule \"named\": task resize",
            ),
            (
                "echo",
                &none,
                &busy,
                Some("either"),
                "rule \"either\": task echo, cpu 90% > 50%",
            ),
            (
                "other",
                &media,
                &busy,
                Some("either"),
                "rule \"either\": tag media, cpu 90% > 50%",
            ),
            (
                "echo",
                &none,
                &Signals::default(),
                None,
                "no rule matched; default auto",
            ),
            ("other", &none, &busy, None, "no rule matched; default auto"),
        ] {
            let v = ev.decide(TaskInfo { name, tags }, signals, now);
            assert_eq!(v.rule.as_deref(), want, "{name} {tags:?}");
            assert_eq!(v.reason, reason);
        }
    }

    #[test]
    fn default_applies_when_nothing_matches() {
        for (text, place, reason) in [
            ("", Place::Auto, "no rule matched; default auto"),
            ("default = \"local\"", Place::Local, "no rule matched; default local"),
            (
                "default = \"cloud\"\n[[rule]]\nname = \"r\"\nwhen = { rtt_ms = { above = 9 } }\nplace = \"local\"",
                Place::Cloud,
                "no rule matched; default cloud",
            ),
        ] {
            let v = evaluator(text).decide(TASK, &Signals::default(), Instant::now());
            assert_eq!(v, Verdict { place, rule: None, reason: reason.into() }, "{text}");
        }
        let mut ev = Evaluator::new(Arc::new(Policy::default_policy()));
        assert_eq!(
            ev.decide(TASK, &Signals::default(), Instant::now()).place,
            Place::Auto
        );
    }

    #[test]
    fn input_bytes_is_per_task() {
        let mut ev = one_rule("input_bytes = { above = 1000000 }");
        let now = Instant::now();
        let size = |n: Option<f64>| Signals {
            input_bytes: n,
            ..Signals::default()
        };
        // Interleaved tasks: each is judged on its own size, with no latch between them.
        for (bytes, want) in [
            (Some(2e6), Place::Cloud),
            (Some(999_999.0), Place::Local),
            (Some(5e6), Place::Cloud),
            (None, Place::Local),
            (Some(1e6 + 1.0), Place::Cloud),
            (Some(10.0), Place::Local),
        ] {
            assert_eq!(ev.decide(TASK, &size(bytes), now).place, want, "{bytes:?}");
        }
        // The sampler's observations (no input size) do not disturb it either.
        ev.observe(&Signals::default(), now);
        assert_eq!(ev.decide(TASK, &size(Some(2e6)), now).place, Place::Cloud);
        assert_eq!(
            ev.decide(TASK, &size(Some(2e6)), now).reason,
            "rule \"r\": input 2000000 bytes > 1000000 bytes"
        );
    }

    #[test]
    fn reasons_name_rule_and_values() {
        let t0 = Instant::now();
        let cases: [(&str, Signals, &str); 5] = [
            (
                "cpu_percent = { above = 85, for = \"10s\" }",
                with(Signal::CpuPercent, Value::Number(91.0)),
                "rule \"r\": cpu 91% > 85% for 10s",
            ),
            (
                "load_avg = { above = 1.5 }, on_battery = true",
                Signals {
                    load_avg: Some(1.75),
                    on_battery: Some(true),
                    ..Signals::default()
                },
                "rule \"r\": load 1.75 > 1.5, on battery",
            ),
            (
                "rtt_ms = { above = 250 }, cloud_connected = true",
                Signals {
                    rtt_ms: Some(312.4),
                    cloud_connected: Some(true),
                    ..Signals::default()
                },
                "rule \"r\": rtt 312.4 ms > 250 ms, cloud connected",
            ),
            (
                "temperature_c = { above = 70 }",
                with(Signal::TemperatureC, Value::Number(71.25)),
                "rule \"r\": temperature 71.25 C > 70 C",
            ),
            (
                "memory_available_mb = { below = 64 }",
                with(Signal::MemoryAvailableMb, Value::Number(12.0)),
                "rule \"r\": memory available 12 MiB < 64 MiB",
            ),
        ];
        for (when, signals, reason) in cases {
            let mut ev = one_rule(when);
            // Observe first so `for` has been satisfied by the time of the decision.
            ev.observe(&signals, t0);
            let v = ev.decide(TASK, &signals, t0 + Duration::from_secs(10));
            assert_eq!(v.reason, reason, "{when}");
        }
        // A test held by hysteresis says so rather than claiming 84 > 85.
        let mut ev = one_rule("cpu_percent = { above = 85 }");
        ev.observe(&with(Signal::CpuPercent, Value::Number(90.0)), t0);
        let v = ev.decide(TASK, &with(Signal::CpuPercent, Value::Number(84.0)), t0);
        assert_eq!(v.reason, "rule \"r\": cpu 84% (held > 85% until <= 80.75%)");
    }

    #[test]
    fn spec_example_behaves_as_described() {
        let mut ev = Evaluator::new(policy(crate::policy::rules::tests::SPEC_EXAMPLE));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let private = ["private".to_string()];
        let photo = TaskInfo {
            name: "thumbnail",
            tags: &private,
        };
        let calm = Signals {
            cpu_percent: Some(20.0),
            battery_percent: Some(80.0),
            charging: Some(false),
            on_battery: Some(true),
            rtt_ms: Some(40.0),
            cloud_connected: Some(true),
            ..Signals::default()
        };

        // Nothing special: the cost model decides.
        let v = ev.decide(TASK, &calm, at(0));
        assert_eq!((v.place, v.rule), (Place::Auto, None));

        // Low battery, not charging: offload, with the reason the SPEC shows.
        let low = Signals {
            battery_percent: Some(22.0),
            ..calm.clone()
        };
        let v = ev.decide(TASK, &low, at(1));
        assert_eq!(
            v.to_string(),
            "cloud (rule \"save battery\": battery 22% < 30%, discharging)"
        );
        // ...but private data stays on the board whatever the battery says.
        let v = ev.decide(photo, &low, at(1));
        assert_eq!(v.place, Place::Local);
        assert_eq!(
            v.reason,
            "rule \"keep private data on the board\": tag private"
        );
        // Charging: the battery rule does not apply.
        let charging = Signals {
            charging: Some(true),
            ..low.clone()
        };
        assert_eq!(ev.decide(TASK, &charging, at(2)).place, Place::Auto);
        // No battery at all (mains-powered board): battery rules never match.
        let mains = Signals {
            battery_percent: None,
            charging: None,
            on_battery: Some(false),
            ..calm.clone()
        };
        assert_eq!(ev.decide(TASK, &mains, at(3)).rule, None);
        let slow_mains = Signals {
            rtt_ms: Some(400.0),
            ..mains.clone()
        };
        let v = ev.decide(TASK, &slow_mains, at(3));
        assert_eq!(v.rule.as_deref(), Some("slow link"), "{}", v.reason);
        assert_eq!(v.place, Place::Local);

        // Busy: cloud only after 10 s of it.
        let busy = Signals {
            cpu_percent: Some(91.0),
            ..mains.clone()
        };
        for s in 10..20 {
            ev.observe(&busy, at(s));
            assert_eq!(ev.decide(TASK, &busy, at(s)).rule, None, "t={s}");
        }
        let v = ev.decide(TASK, &busy, at(20));
        assert_eq!(
            v.to_string(),
            "cloud (rule \"busy or hot\": cpu 91% > 85% for 10s)"
        );
        // Busy beats a slow link (it comes first)...
        let busy_slow = Signals {
            rtt_ms: Some(400.0),
            ..busy.clone()
        };
        assert_eq!(
            ev.decide(TASK, &busy_slow, at(21)).rule.as_deref(),
            Some("busy or hot")
        );
        // ...and once the load is gone, the slow link keeps work local.
        let idle_slow = Signals {
            cpu_percent: Some(10.0),
            ..busy_slow
        };
        assert_eq!(
            ev.decide(TASK, &idle_slow, at(22)).rule.as_deref(),
            Some("slow link")
        );
    }

    #[test]
    fn reload_keeps_state_of_unchanged_rules_only() {
        let text = |busy_for: &str| {
            format!(
                r#"
[[rule]]
name = "hot"
when = {{ temperature_c = {{ above = 70, for = "10s" }} }}
place = "cloud"
[[rule]]
name = "busy"
when = {{ cpu_percent = {{ above = 85, for = "{busy_for}" }} }}
place = "cloud"
"#
            )
        };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let both = Signals {
            temperature_c: Some(80.0),
            cpu_percent: Some(95.0),
            ..Signals::default()
        };
        let mut ev = evaluator(&text("10s"));
        ev.observe(&both, at(0));
        // "busy" changes, "hot" stays as it was.
        ev.replace_policy(policy(&text("5s")));
        assert_eq!(ev.policy().rules()[1].when.len(), 1);
        // "busy" restarted: had it kept its timer from t=0, it would match at t=5.
        let v = ev.decide(TASK, &both, at(5));
        assert_eq!(v.rule, None, "{}", v.reason);
        // "hot" kept its timer from t=0: had it restarted, "busy" would match at t=10.
        let v = ev.decide(TASK, &both, at(10));
        assert_eq!(v.rule.as_deref(), Some("hot"), "{}", v.reason);
    }

    #[test]
    fn time_going_backwards_does_not_panic() {
        let mut ev = one_rule("cpu_percent = { above = 85, for = \"1s\" }");
        let t0 = Instant::now() + Duration::from_secs(60);
        let busy = with(Signal::CpuPercent, Value::Number(95.0));
        ev.observe(&busy, t0);
        assert_eq!(
            ev.decide(TASK, &busy, t0 - Duration::from_secs(30)).place,
            Place::Local
        );
        assert_eq!(
            ev.decide(TASK, &busy, t0 + Duration::from_secs(1)).place,
            Place::Cloud
        );
    }

    #[test]
    fn numbers_read_naturally() {
        for (v, s) in [
            (22.0, "22"),
            (0.75, "0.75"),
            (91.04, "91.04"),
            (1.5, "1.5"),
            (-3.0, "-3"),
            (1e6, "1000000"),
        ] {
            assert_eq!(Num(v).to_string(), s);
        }
    }
}
