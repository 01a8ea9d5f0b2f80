//! The policy file (`/etc/updraft/policy.toml`): its validated model ([`Policy`]) and
//! [`parse`], which refuses a broken file with one `path:line:column: reason` line.
//!
//! Parsing happens in two steps. `toml` turns the text into a small tree whose keys carry
//! their byte spans (values inside tables take their position from the key in front of
//! them, because tables made by dotted keys have no span of their own and `Spanned` would
//! refuse them). The tree is then checked by hand, so every semantic mistake (an unknown
//! signal, a bad place, `above` and `below` together, a duplicate rule name, a bad
//! duration) points at the line and column where the operator has to look.
//!
//! Everything the evaluator needs per decision is settled here: signal names resolved to
//! [`Signal`], places to [`Place`], durations to [`Duration`], hysteresis bands computed.
//! No IO, no clock.

use super::{Place, Signal, TaskInfo};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// Default hysteresis band as a fraction of the threshold's magnitude: 5 % is wider than
/// the sample-to-sample jitter of the smoothed signals the agent measures, and narrow
/// enough that a rule still lets go soon after the condition has clearly ended.
pub const DEFAULT_HYSTERESIS_FRACTION: f64 = 0.05;

/// A validated policy: what [`parse`] returns and the [`Evaluator`](super::eval::Evaluator)
/// runs. Only [`parse`] and [`Policy::default_policy`] build one.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    default: Place,
    rules: Vec<Rule>,
    auto: AutoParams,
}

impl Policy {
    /// The policy of an agent without a policy file: no rules, `default = "auto"`,
    /// default [`AutoParams`].
    pub fn default_policy() -> Policy {
        Policy {
            default: Place::Auto,
            rules: Vec::new(),
            auto: AutoParams::default(),
        }
    }

    /// Where a task goes when no rule matches (`default`, `auto` when absent).
    pub fn default_place(&self) -> Place {
        self.default
    }

    /// The rules, in file order (the order they are evaluated in).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The cost model's coefficients (`[auto]`).
    pub fn auto(&self) -> &AutoParams {
        &self.auto
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::default_policy()
    }
}

/// One `[[rule]]`: it decides when its `match` (if any) and every `when` test (if any)
/// hold. A rule with neither always matches.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// `name`: unique in the file, one line; shared with every verdict it decides.
    pub name: Arc<str>,
    /// `match`: which tasks the rule applies to; `None` = every task.
    pub task_match: Option<TaskMatch>,
    /// `when`: tests on signals, all of which must hold, in file order.
    pub when: Vec<Test>,
    /// `place`: where a matching task goes.
    pub place: Place,
}

impl Rule {
    /// Whether `task` passes this rule's `match` (true when the rule has none).
    pub fn applies_to(&self, task: TaskInfo<'_>) -> bool {
        match &self.task_match {
            None => true,
            Some(m) => m.matches(task),
        }
    }
}

/// `match = { names = [..], tags = [..] }`. A task matches when its name is one of
/// `names` **or** it carries any of `tags`; giving both widens the rule (either suffices),
/// because a rule that needs both a name and a tag would be a rule about one task.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskMatch {
    /// Catalog task names.
    pub names: Vec<String>,
    /// Catalog tags.
    pub tags: Vec<String>,
}

impl TaskMatch {
    /// Whether `task` matches.
    pub fn matches(&self, task: TaskInfo<'_>) -> bool {
        self.matched_by(task).is_some()
    }

    /// What made `task` match: its name, or the first of its tags that is listed.
    pub fn matched_by<'t>(&self, task: TaskInfo<'t>) -> Option<MatchedBy<'t>> {
        if self.names.iter().any(|n| n == task.name) {
            return Some(MatchedBy::Name(task.name));
        }
        task.tags
            .iter()
            .find(|t| self.tags.iter().any(|m| m == *t))
            .map(|t| MatchedBy::Tag(t))
    }
}

/// Why a [`TaskMatch`] matched, for explanations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchedBy<'t> {
    /// The task's name is listed in `names`.
    Name(&'t str),
    /// The task carries this tag, listed in `tags`.
    Tag(&'t str),
}

/// One entry of a rule's `when` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Test {
    /// The signal tested.
    pub signal: Signal,
    /// What it is tested for.
    pub condition: Condition,
}

impl Test {
    /// True when the evaluator must keep state for this test between observations (a
    /// hysteresis latch or a `for` timer). Boolean tests and `input_bytes` are stateless.
    pub fn is_stateful(&self) -> bool {
        matches!(self.condition, Condition::Threshold(_)) && self.signal != Signal::InputBytes
    }
}

/// A test on a signal.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// `charging = false`: a boolean signal equals this.
    Is(bool),
    /// `cpu_percent = { above = 85, for = "10s", hysteresis = 3 }`.
    Threshold(Threshold),
}

/// A numeric test with its hysteresis band and optional sustain time.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// `above` or `below`.
    pub compare: Compare,
    /// The threshold, in the signal's unit.
    pub value: f64,
    /// Absolute band, ≥ 0: once true, the test stays true until the signal crosses back
    /// past `value ∓ hysteresis` (inclusive). Explicit `hysteresis`, or
    /// [`default_hysteresis`]; always 0 for `input_bytes`.
    pub hysteresis: f64,
    /// `for`: the condition must have held continuously this long; `None` = at once.
    pub sustain: Option<Duration>,
}

impl Threshold {
    /// The condition itself, strictly: `v > value` or `v < value`.
    pub fn holds(&self, v: f64) -> bool {
        match self.compare {
            Compare::Above => v > self.value,
            Compare::Below => v < self.value,
        }
    }

    /// Whether a test that is already true stays true at `v`: until `v` reaches the
    /// release point.
    pub fn still_holds(&self, v: f64) -> bool {
        match self.compare {
            Compare::Above => v > self.release_point(),
            Compare::Below => v < self.release_point(),
        }
    }

    /// `value - hysteresis` for `above`, `value + hysteresis` for `below`.
    pub fn release_point(&self) -> f64 {
        match self.compare {
            Compare::Above => self.value - self.hysteresis,
            Compare::Below => self.value + self.hysteresis,
        }
    }
}

/// The direction of a numeric test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// `above = N`: true when the signal is greater than N.
    Above,
    /// `below = N`: true when the signal is less than N.
    Below,
}

impl Compare {
    /// `>` or `<`.
    pub fn symbol(self) -> &'static str {
        match self {
            Compare::Above => ">",
            Compare::Below => "<",
        }
    }
}

/// The band a numeric test gets when the file sets no `hysteresis`:
/// [`DEFAULT_HYSTERESIS_FRACTION`] of |threshold|, at least the signal's resolution floor
/// (see [`hysteresis_floor`]), but never more than half the room between the threshold and
/// the edge of the signal's range that the release point moves towards, so that the test
/// can always let go (`local_queue = { above = 0 }` gets no band; `battery_percent =
/// { below = 99 }` gets 0.5). `input_bytes` is per task and gets none.
pub fn default_hysteresis(signal: Signal, compare: Compare, threshold: f64) -> f64 {
    if signal == Signal::InputBytes {
        return 0.0;
    }
    let band = (threshold.abs() * DEFAULT_HYSTERESIS_FRACTION).max(hysteresis_floor(signal));
    let (lo, hi) = signal_range(signal);
    let room = match compare {
        Compare::Above => threshold - lo,
        Compare::Below => hi - threshold,
    };
    band.min(room.max(0.0) / 2.0)
}

/// The smallest default band per signal: about the jitter of one sample of that signal,
/// so a threshold near zero still gets some protection against flapping. Queues count
/// whole tasks and do not jitter, so they get no floor.
pub fn hysteresis_floor(signal: Signal) -> f64 {
    match signal {
        Signal::CpuPercent => 1.0,
        Signal::LoadAvg => 0.05,
        Signal::MemoryAvailableMb => 8.0,
        Signal::TemperatureC => 1.0,
        Signal::BatteryPercent => 1.0,
        Signal::RttMs => 2.0,
        Signal::BandwidthMbps => 0.1,
        Signal::CloudQueue | Signal::LocalQueue | Signal::InputBytes => 0.0,
        Signal::Charging | Signal::OnBattery | Signal::CloudConnected => 0.0,
    }
}

/// The values a numeric signal can take, to keep default bands reachable.
fn signal_range(signal: Signal) -> (f64, f64) {
    match signal {
        Signal::CpuPercent | Signal::BatteryPercent => (0.0, 100.0),
        Signal::TemperatureC => (f64::NEG_INFINITY, f64::INFINITY),
        _ => (0.0, f64::INFINITY),
    }
}

/// `[auto]`: coefficients of the cost model that places tasks when the policy says
/// `auto`. Every field is optional in the file; the defaults below apply.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoParams {
    /// `explore_rate`, 0..=0.5, default 0.05: fraction of decisions that re-sample the
    /// side whose estimate is stale, so both estimates stay fresh.
    pub explore_rate: f64,
    /// `stale_after`, > 0, default `"60s"`: an estimate older than this is stale.
    pub stale_after: Duration,
    /// `smoothing`, 0 < x ≤ 1, default 0.3: EWMA weight of a new sample.
    pub smoothing: f64,
    /// `cpu_watts`, ≥ 0, default 2.0: board power while a task burns one core, watts.
    pub cpu_watts: f64,
    /// `radio_joules_per_mb`, ≥ 0, default 0.5: energy to move one megabyte over the
    /// radio, joules.
    pub radio_joules_per_mb: f64,
    /// `energy_weight`, ≥ 0, default 1.0: seconds of finish time one joule is worth when
    /// the board is on battery.
    pub energy_weight: f64,
}

impl AutoParams {
    /// Upper bound of `explore_rate`: beyond half the decisions, exploring would cost
    /// more than the estimates it keeps fresh are worth.
    pub const MAX_EXPLORE_RATE: f64 = 0.5;
}

impl Default for AutoParams {
    fn default() -> Self {
        AutoParams {
            explore_rate: 0.05,
            stale_after: Duration::from_secs(60),
            smoothing: 0.3,
            cpu_watts: 2.0,
            radio_joules_per_mb: 0.5,
            energy_weight: 1.0,
        }
    }
}

/// Why a policy file was refused. Displays as one line, `path:line:column: message`,
/// where line and column (1-based, column in characters) point at what must change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {message}", path.display())]
pub struct PolicyError {
    /// The policy file.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong and what was expected.
    pub message: String,
}

/// Parses and validates a policy file. `path` is only used in errors.
pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
    let cx = Cx { text, path };
    let root: Node = toml::from_str(text).map_err(|e| cx.toml_error(&e))?;
    let Node::Table(entries) = root else {
        return Err(cx.error(0, "expected a table of settings".to_string()));
    };
    let mut policy = Policy::default_policy();
    for entry in &entries {
        match entry.key.as_str() {
            "default" => policy.default = cx.place(entry, "default")?,
            "rule" => policy.rules = cx.rules(entry)?,
            "auto" => policy.auto = cx.auto(entry)?,
            other => {
                return Err(cx.error(
                    entry.key_span.start,
                    format!("unknown key `{other}`; expected default, rule or auto"),
                ))
            }
        }
    }
    Ok(policy)
}

/// The parts of a TOML document a policy file can contain, with the positions needed
/// for errors. Values carry no span of their own: see [`Cx::value_pos`].
#[derive(Debug)]
enum Node {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Array(Vec<Spanned<Node>>),
    Table(Vec<Entry>),
}

#[derive(Debug)]
struct Entry {
    key: String,
    key_span: Range<usize>,
    value: Node,
}

impl Node {
    /// "a string", "a table", ... for error messages.
    fn kind(&self) -> &'static str {
        match self {
            Node::Bool(_) => "a boolean",
            Node::Int(_) | Node::Float(_) => "a number",
            Node::Str(_) => "a string",
            Node::Array(_) => "a list",
            Node::Table(_) => "a table",
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, number, boolean, list or table")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Node, E> {
        i64::try_from(v)
            .map(Node::Int)
            .map_err(|_| E::custom("number too large"))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Node>>()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            let key_span = key.span();
            let value = map.next_value::<Node>()?;
            entries.push(Entry {
                key: key.into_inner(),
                key_span,
                value,
            });
        }
        Ok(Node::Table(entries))
    }
}

/// The marker `toml` uses for date-times; they reach [`NodeVisitor`] as a map with this
/// key and fail there, so the error is reworded.
const TOML_DATETIME_MARKER: &str = "$__toml_private_datetime";

const RULE_KEYS: &str = "name, match, when or place";
const MATCH_KEYS: &str = "names or tags";
const TEST_KEYS: &str = "above, below, for or hysteresis";
const AUTO_KEYS: &str =
    "explore_rate, stale_after, smoothing, cpu_watts, radio_joules_per_mb or energy_weight";

/// The text being parsed and its path, for positions in errors.
struct Cx<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Cx<'_> {
    fn error(&self, pos: usize, message: String) -> PolicyError {
        let (line, column) = line_column(self.text, pos);
        PolicyError {
            path: self.path.to_path_buf(),
            line,
            column,
            message,
        }
    }

    fn toml_error(&self, e: &toml::de::Error) -> PolicyError {
        let message = if e.message().contains(TOML_DATETIME_MARKER) {
            "a date-time is not valid here".to_string()
        } else {
            // toml's messages may span lines ("unclosed array table\nexpected ..."); the
            // refusal must stay on one line.
            let message = e.message().trim().lines().collect::<Vec<_>>().join("; ");
            // toml says "duplicate key" without the key; the span holds it.
            match e.span().and_then(|s| self.text.get(s)) {
                Some(key) if message == "duplicate key" => {
                    format!("duplicate key `{}`", key.trim())
                }
                _ => message,
            }
        };
        self.error(e.span().map_or(0, |s| s.start), message)
    }

    /// Where an entry's value starts: after `key =` when the value follows the key
    /// (`place = "cloud"`), else the key itself (a `[rule.when]` header, or `when` in the
    /// dotted key `when.cpu_percent`).
    fn value_pos(&self, entry: &Entry) -> usize {
        let start = entry.key_span.start;
        let Some(rest) = self.text.get(entry.key_span.end..) else {
            return start;
        };
        let after_ws = rest.trim_start_matches([' ', '\t']);
        let Some(value) = after_ws.strip_prefix('=') else {
            return start;
        };
        let value = value.trim_start_matches([' ', '\t']);
        self.text.len() - value.len()
    }

    fn wrong_type(&self, entry: &Entry, what: &str, expected: &str) -> PolicyError {
        self.error(
            self.value_pos(entry),
            format!("{what} must be {expected}, not {}", entry.value.kind()),
        )
    }

    fn place(&self, entry: &Entry, what: &str) -> Result<Place, PolicyError> {
        let Node::Str(s) = &entry.value else {
            return Err(self.wrong_type(entry, what, "\"local\", \"cloud\" or \"auto\""));
        };
        match s.as_str() {
            "local" => Ok(Place::Local),
            "cloud" => Ok(Place::Cloud),
            "auto" => Ok(Place::Auto),
            other => Err(self.error(
                self.value_pos(entry),
                format!("{what} must be local, cloud or auto, not `{other}`"),
            )),
        }
    }

    fn rules(&self, entry: &Entry) -> Result<Vec<Rule>, PolicyError> {
        let Node::Array(items) = &entry.value else {
            return Err(self.error(
                entry.key_span.start,
                "rule must be a list of tables: start each rule with [[rule]]".to_string(),
            ));
        };
        let mut rules: Vec<Rule> = Vec::with_capacity(items.len());
        for item in items {
            let Node::Table(fields) = item.get_ref() else {
                return Err(self.error(
                    item.span().start,
                    format!("a rule must be a table, not {}", item.get_ref().kind()),
                ));
            };
            let (rule, name_pos) = self.rule(item.span().start, fields)?;
            if rules.iter().any(|r| r.name == rule.name) {
                return Err(self.error(
                    name_pos,
                    format!(
                        "duplicate rule name \"{}\"; rule names must be unique",
                        rule.name
                    ),
                ));
            }
            rules.push(rule);
        }
        Ok(rules)
    }

    /// One rule, and where its name is (for the duplicate check).
    fn rule(&self, start: usize, fields: &[Entry]) -> Result<(Rule, usize), PolicyError> {
        let mut name = None;
        let mut task_match = None;
        let mut when = Vec::new();
        let mut place = None;
        for field in fields {
            match field.key.as_str() {
                "name" => {
                    let Node::Str(s) = &field.value else {
                        return Err(self.wrong_type(field, "name", "a string"));
                    };
                    if s.trim().is_empty() {
                        return Err(self.error(
                            self.value_pos(field),
                            "rule name must not be empty".to_string(),
                        ));
                    }
                    if s.chars().any(char::is_control) {
                        return Err(self.error(
                            self.value_pos(field),
                            "rule name must be one line without control characters".to_string(),
                        ));
                    }
                    name = Some((Arc::<str>::from(s.as_str()), self.value_pos(field)));
                }
                "match" => task_match = Some(self.task_match(field)?),
                "when" => when = self.when(field)?,
                "place" => place = Some(self.place(field, "place")?),
                other => {
                    return Err(self.error(
                        field.key_span.start,
                        format!("unknown key `{other}` in rule; expected {RULE_KEYS}"),
                    ))
                }
            }
        }
        let Some((name, name_pos)) = name else {
            return Err(self.error(start, "rule has no name; add name = \"...\"".to_string()));
        };
        let Some(place) = place else {
            return Err(self.error(
                start,
                format!(
                    "rule \"{name}\" has no place; add place = \"local\", \"cloud\" or \"auto\""
                ),
            ));
        };
        let rule = Rule {
            name,
            task_match,
            when,
            place,
        };
        Ok((rule, name_pos))
    }

    fn task_match(&self, entry: &Entry) -> Result<TaskMatch, PolicyError> {
        let Node::Table(fields) = &entry.value else {
            return Err(self.wrong_type(
                entry,
                "match",
                "a table such as { tags = [\"private\"] }",
            ));
        };
        let mut m = TaskMatch::default();
        for field in fields {
            let list = match field.key.as_str() {
                "names" => &mut m.names,
                "tags" => &mut m.tags,
                other => {
                    return Err(self.error(
                        field.key_span.start,
                        format!("unknown key `{other}` in match; expected {MATCH_KEYS}"),
                    ))
                }
            };
            let Node::Array(items) = &field.value else {
                return Err(self.wrong_type(field, &field.key, "a list of strings"));
            };
            for item in items {
                let Node::Str(s) = item.get_ref() else {
                    return Err(self.error(
                        item.span().start,
                        format!("{} must be a list of strings", field.key),
                    ));
                };
                list.push(s.clone());
            }
        }
        if m.names.is_empty() && m.tags.is_empty() {
            return Err(self.error(
                self.value_pos(entry),
                "match lists no names and no tags, so it would match nothing".to_string(),
            ));
        }
        Ok(m)
    }

    fn when(&self, entry: &Entry) -> Result<Vec<Test>, PolicyError> {
        let Node::Table(fields) = &entry.value else {
            return Err(self.wrong_type(
                entry,
                "when",
                "a table such as { cpu_percent = { above = 85 } }",
            ));
        };
        fields.iter().map(|f| self.test(f)).collect()
    }

    fn test(&self, entry: &Entry) -> Result<Test, PolicyError> {
        let Some(signal) = Signal::from_name(&entry.key) else {
            let names: Vec<&str> = Signal::ALL.iter().map(|s| s.name()).collect();
            return Err(self.error(
                entry.key_span.start,
                format!(
                    "unknown signal `{}`; expected one of {}",
                    entry.key,
                    names.join(", ")
                ),
            ));
        };
        let name = signal.name();
        if signal.is_bool() {
            return match &entry.value {
                Node::Bool(b) => Ok(Test {
                    signal,
                    condition: Condition::Is(*b),
                }),
                other => Err(self.error(
                    self.value_pos(entry),
                    format!(
                        "{name} is a yes/no signal: write {name} = true or {name} = false, not {}",
                        other.kind()
                    ),
                )),
            };
        }
        let Node::Table(fields) = &entry.value else {
            return Err(self.error(
                self.value_pos(entry),
                format!(
                    "{name} is a number: write {name} = {{ above = N }} or {{ below = N }}, not {}",
                    entry.value.kind()
                ),
            ));
        };
        let mut compare: Option<(Compare, f64)> = None;
        let mut hysteresis = None;
        let mut sustain = None;
        for field in fields {
            match field.key.as_str() {
                key @ ("above" | "below") => {
                    if compare.is_some() {
                        return Err(self.error(
                            field.key_span.start,
                            format!(
                                "{name} has both `above` and `below`; a test takes one of them"
                            ),
                        ));
                    }
                    let c = if key == "above" {
                        Compare::Above
                    } else {
                        Compare::Below
                    };
                    compare = Some((c, self.number(field, &format!("{name}.{key}"))?));
                }
                "hysteresis" | "for" if signal == Signal::InputBytes => {
                    return Err(self.error(
                        field.key_span.start,
                        format!(
                            "input_bytes is a property of each task, not a reading over time: \
                             `{}` does not apply to it",
                            field.key
                        ),
                    ));
                }
                "hysteresis" => {
                    let h = self.number(field, &format!("{name}.hysteresis"))?;
                    if h < 0.0 {
                        return Err(self.error(
                            self.value_pos(field),
                            format!("{name}.hysteresis must be 0 or more"),
                        ));
                    }
                    hysteresis = Some(h);
                }
                "for" => sustain = Some(self.duration(field, &format!("{name}.for"))?),
                other => {
                    return Err(self.error(
                        field.key_span.start,
                        format!("unknown key `{other}` in test of {name}; expected {TEST_KEYS}"),
                    ))
                }
            }
        }
        let Some((compare, value)) = compare else {
            return Err(self.error(
                entry.key_span.start,
                format!("{name} needs `above = N` or `below = N`"),
            ));
        };
        let hysteresis = hysteresis.unwrap_or_else(|| default_hysteresis(signal, compare, value));
        Ok(Test {
            signal,
            condition: Condition::Threshold(Threshold {
                compare,
                value,
                hysteresis,
                sustain: sustain.filter(|d| !d.is_zero()),
            }),
        })
    }

    /// A finite number (integer or float).
    fn number(&self, entry: &Entry, what: &str) -> Result<f64, PolicyError> {
        let v = match &entry.value {
            Node::Int(i) => *i as f64,
            Node::Float(f) => *f,
            _ => return Err(self.wrong_type(entry, what, "a number")),
        };
        if !v.is_finite() {
            return Err(self.error(
                self.value_pos(entry),
                format!("{what} must be a finite number"),
            ));
        }
        Ok(v)
    }

    fn duration(&self, entry: &Entry, what: &str) -> Result<Duration, PolicyError> {
        let Node::Str(s) = &entry.value else {
            return Err(self.wrong_type(entry, what, "a duration string such as \"10s\""));
        };
        humantime::parse_duration(s).map_err(|e| {
            self.error(
                self.value_pos(entry),
                format!(
                    "{what}: `{s}` is not a duration ({e}); write e.g. \"500ms\", \"10s\", \"5m\""
                ),
            )
        })
    }

    fn auto(&self, entry: &Entry) -> Result<AutoParams, PolicyError> {
        let Node::Table(fields) = &entry.value else {
            return Err(self.wrong_type(entry, "auto", "a table ([auto])"));
        };
        let mut p = AutoParams::default();
        for field in fields {
            let key = field.key.as_str();
            let what = format!("auto.{key}");
            let (slot, ok, expected): (&mut f64, fn(f64) -> bool, &str) = match key {
                "stale_after" => {
                    p.stale_after = self.duration(field, &what)?;
                    if p.stale_after.is_zero() {
                        return Err(self.error(
                            self.value_pos(field),
                            format!("{what} must be longer than 0s"),
                        ));
                    }
                    continue;
                }
                "explore_rate" => (
                    &mut p.explore_rate,
                    |v| (0.0..=AutoParams::MAX_EXPLORE_RATE).contains(&v),
                    "between 0 and 0.5",
                ),
                "smoothing" => (
                    &mut p.smoothing,
                    |v| v > 0.0 && v <= 1.0,
                    "above 0 and at most 1",
                ),
                "cpu_watts" => (&mut p.cpu_watts, |v| v >= 0.0, "0 or more"),
                "radio_joules_per_mb" => (&mut p.radio_joules_per_mb, |v| v >= 0.0, "0 or more"),
                "energy_weight" => (&mut p.energy_weight, |v| v >= 0.0, "0 or more"),
                other => {
                    return Err(self.error(
                        field.key_span.start,
                        format!("unknown key `{other}` in [auto]; expected {AUTO_KEYS}"),
                    ))
                }
            };
            let v = self.number(field, &what)?;
            if !ok(v) {
                return Err(self.error(
                    self.value_pos(field),
                    format!("{what} must be {expected}, not {v}"),
                ));
            }
            *slot = v;
        }
        Ok(p)
    }
}

/// 1-based line and column (in characters) of byte offset `pos`.
fn line_column(text: &str, pos: usize) -> (usize, usize) {
    let mut pos = pos.min(text.len());
    while !text.is_char_boundary(pos) {
        pos -= 1;
    }
    let before = &text[..pos];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Policy {
        parse(text, Path::new("policy.toml")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn threshold(p: &Policy, rule: usize, test: usize) -> &Threshold {
        match &p.rules()[rule].when[test].condition {
            Condition::Threshold(t) => t,
            other => panic!("not a threshold: {other:?}"),
        }
    }

    /// The SPEC's example, verbatim.
    pub(crate) const SPEC_EXAMPLE: &str = r#"default = "auto"                     # auto | local | cloud

[[rule]]
name  = "keep private data on the board"
match = { tags = ["private"] }
place = "local"

[[rule]]
name  = "save battery"
when  = { battery_percent = { below = 30 }, charging = false }
place = "cloud"

[[rule]]
name  = "busy or hot"
when  = { cpu_percent = { above = 85, for = "10s" } }
place = "cloud"

[[rule]]
name  = "slow link"
when  = { rtt_ms = { above = 250 } }
place = "local"
"#;

    #[test]
    fn spec_example_parses() {
        let p = parse_ok(SPEC_EXAMPLE);
        assert_eq!(p.default_place(), Place::Auto);
        let names: Vec<&str> = p.rules().iter().map(|r| &*r.name).collect();
        assert_eq!(
            names,
            [
                "keep private data on the board",
                "save battery",
                "busy or hot",
                "slow link"
            ]
        );
        let places: Vec<Place> = p.rules().iter().map(|r| r.place).collect();
        assert_eq!(
            places,
            [Place::Local, Place::Cloud, Place::Cloud, Place::Local]
        );
        assert_eq!(
            p.rules()[0].task_match,
            Some(TaskMatch {
                names: vec![],
                tags: vec!["private".into()]
            })
        );
        assert_eq!(p.rules()[1].when.len(), 2);
        assert_eq!(p.rules()[1].when[0].signal, Signal::BatteryPercent);
        assert_eq!(
            p.rules()[1].when[1],
            Test {
                signal: Signal::Charging,
                condition: Condition::Is(false)
            }
        );
        let cpu = threshold(&p, 2, 0);
        assert_eq!(cpu.compare, Compare::Above);
        assert_eq!(cpu.value, 85.0);
        assert_eq!(cpu.sustain, Some(Duration::from_secs(10)));
        assert_eq!(*p.auto(), AutoParams::default());
    }

    #[test]
    fn empty_file_is_the_default_policy() {
        assert_eq!(parse_ok(""), Policy::default_policy());
        assert_eq!(parse_ok("# nothing\n"), Policy::default_policy());
    }

    #[test]
    fn default_place_values() {
        for (text, want) in [
            ("default = \"local\"", Place::Local),
            ("default = \"cloud\"", Place::Cloud),
            ("default = \"auto\"", Place::Auto),
        ] {
            assert_eq!(parse_ok(text).default_place(), want, "{text}");
        }
    }

    #[test]
    fn other_table_forms_parse_the_same() {
        // [rule.when] headers, dotted keys and inline rule arrays are all plain TOML.
        let header = parse_ok(
            "[[rule]]\nname = \"r\"\nplace = \"cloud\"\n[rule.when]\ncpu_percent = { above = 85 }\n",
        );
        let dotted =
            parse_ok("[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen.cpu_percent.above = 85\n");
        let inline =
            parse_ok("rule = [{ name = \"r\", place = \"cloud\", when = { cpu_percent = { above = 85 } } }]\n");
        assert_eq!(header, dotted);
        assert_eq!(header, inline);
        assert_eq!(threshold(&header, 0, 0).value, 85.0);
    }

    #[test]
    fn match_names_and_tags() {
        let p = parse_ok(
            "[[rule]]\nname = \"m\"\nmatch = { names = [\"thumb\"], tags = [\"media\", \"x\"] }\nplace = \"local\"\n",
        );
        let m = p.rules()[0].task_match.as_ref().unwrap();
        let media = ["media".to_string()];
        let other = ["other".to_string()];
        let cases: [(&str, &[String], Option<MatchedBy>); 4] = [
            ("thumb", &other, Some(MatchedBy::Name("thumb"))),
            ("echo", &media, Some(MatchedBy::Tag("media"))),
            ("echo", &other, None),
            ("echo", &[], None),
        ];
        for (name, tags, want) in cases {
            assert_eq!(
                m.matched_by(TaskInfo { name, tags }),
                want,
                "{name} {tags:?}"
            );
        }
    }

    #[test]
    fn hysteresis_explicit_and_default() {
        let p = parse_ok(
            r#"[[rule]]
name = "r"
place = "cloud"
when = { cpu_percent = { above = 80, hysteresis = 3 }, battery_percent = { below = 30 }, local_queue = { above = 0 }, rtt_ms = { above = 10 }, input_bytes = { above = 1000 } }
"#,
        );
        assert_eq!(threshold(&p, 0, 0).hysteresis, 3.0);
        assert_eq!(threshold(&p, 0, 0).release_point(), 77.0);
        assert_eq!(threshold(&p, 0, 1).hysteresis, 1.5); // 5 % of 30
        assert_eq!(threshold(&p, 0, 1).release_point(), 31.5);
        assert_eq!(threshold(&p, 0, 2).hysteresis, 0.0); // no room below 0
        assert_eq!(threshold(&p, 0, 3).hysteresis, 2.0); // floor for rtt_ms
        assert_eq!(threshold(&p, 0, 4).hysteresis, 0.0); // per task
    }

    #[test]
    fn default_hysteresis_table() {
        use Compare::*;
        use Signal::*;
        for (signal, cmp, t, want) in [
            (CpuPercent, Above, 85.0, 4.25),
            (CpuPercent, Below, 10.0, 1.0),
            (CpuPercent, Above, 1.0, 0.5),
            (BatteryPercent, Below, 99.0, 0.5),
            (BatteryPercent, Below, 100.0, 0.0),
            (TemperatureC, Above, 0.0, 1.0),
            (LoadAvg, Above, 4.0, 0.2),
            (LocalQueue, Above, 0.0, 0.0),
            (CloudQueue, Above, 10.0, 0.5),
            (MemoryAvailableMb, Below, 64.0, 8.0),
            (InputBytes, Above, 1e6, 0.0),
        ] {
            let got = default_hysteresis(signal, cmp, t);
            assert!(
                (got - want).abs() < 1e-9,
                "{signal:?} {cmp:?} {t}: {got} != {want}"
            );
        }
    }

    #[test]
    fn auto_table() {
        let p = parse_ok(
            "[auto]\nexplore_rate = 0.1\nstale_after = \"2m\"\nsmoothing = 1\ncpu_watts = 3.5\nradio_joules_per_mb = 0\nenergy_weight = 2\n",
        );
        assert_eq!(
            *p.auto(),
            AutoParams {
                explore_rate: 0.1,
                stale_after: Duration::from_secs(120),
                smoothing: 1.0,
                cpu_watts: 3.5,
                radio_joules_per_mb: 0.0,
                energy_weight: 2.0,
            }
        );
        // Keys left out keep their defaults.
        let p = parse_ok("[auto]\nsmoothing = 0.5\n");
        assert_eq!(p.auto().explore_rate, AutoParams::default().explore_rate);
        assert_eq!(p.auto().smoothing, 0.5);
    }

    /// Each broken file, where the error must point, and a piece of the message.
    #[test]
    fn errors_point_at_the_mistake() {
        let cases: &[(&str, &str, usize, usize, &str)] = &[
            (
                "unknown signal",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen = { cpu_precent = { above = 85 } }\n",
                4,
                10,
                "unknown signal `cpu_precent`; expected one of cpu_percent, load_avg,",
            ),
            (
                "bad place",
                "[[rule]]\nname = \"r\"\nplace = \"lcoal\"\n",
                3,
                9,
                "place must be local, cloud or auto, not `lcoal`",
            ),
            (
                "place not a string",
                "[[rule]]\nname = \"r\"\nplace   =   1\n",
                3,
                13,
                "place must be \"local\", \"cloud\" or \"auto\", not a number",
            ),
            ("bad default", "\n  default = \"sky\"\n", 2, 13, "default must be local, cloud or auto"),
            (
                "both above and below",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen = { rtt_ms = { above = 250, below = 10 } }\n",
                4,
                34,
                "rtt_ms has both `above` and `below`",
            ),
            (
                "neither above nor below",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen = { rtt_ms = { for = \"1s\" } }\n",
                4,
                10,
                "rtt_ms needs `above = N` or `below = N`",
            ),
            (
                "unknown key in rule",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwehn = { charging = false }\n",
                4,
                1,
                "unknown key `wehn` in rule; expected name, match, when or place",
            ),
            (
                "unknown key in test",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen = { rtt_ms = { abvoe = 250 } }\n",
                4,
                21,
                "unknown key `abvoe` in test of rtt_ms",
            ),
            (
                "unknown key in match",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nmatch = { tag = [\"x\"] }\n",
                4,
                11,
                "unknown key `tag` in match; expected names or tags",
            ),
            (
                "unknown top-level key",
                "default = \"auto\"\n[[rules]]\nname = \"r\"\n",
                2,
                3,
                "unknown key `rules`; expected default, rule or auto",
            ),
            (
                "duplicate rule name",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\n\n[[rule]]\nname  = \"r\"\nplace = \"local\"\n",
                6,
                9,
                "duplicate rule name \"r\"",
            ),
            (
                "bad for duration",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen = { cpu_percent = { above = 85, for = \"10 parsecs\" } }\n",
                4,
                44,
                "cpu_percent.for: `10 parsecs` is not a duration",
            ),
            (
                "for as a bare number",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen = { cpu_percent = { above = 85, for = 10 } }\n",
                4,
                44,
                "cpu_percent.for must be a duration string such as \"10s\", not a number",
            ),
            (
                "boolean test on a numeric signal",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen = { cpu_percent = true }\n",
                4,
                24,
                "cpu_percent is a number: write cpu_percent = { above = N } or { below = N }, not a boolean",
            ),
            (
                "numeric test on a boolean signal",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen = { charging = { above = 1 } }\n",
                4,
                21,
                "charging is a yes/no signal",
            ),
            (
                "threshold not a number",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen = { rtt_ms = { above = \"250\" } }\n",
                4,
                29,
                "rtt_ms.above must be a number, not a string",
            ),
            (
                "threshold not finite",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen = { rtt_ms = { above = nan } }\n",
                4,
                29,
                "rtt_ms.above must be a finite number",
            ),
            (
                "negative hysteresis",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen = { rtt_ms = { above = 250, hysteresis = -1 } }\n",
                4,
                47,
                "rtt_ms.hysteresis must be 0 or more",
            ),
            (
                "for on input_bytes",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen = { input_bytes = { above = 1000, for = \"1s\" } }\n",
                4,
                40,
                "input_bytes is a property of each task",
            ),
            (
                "hysteresis on input_bytes",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen = { input_bytes = { below = 1000, hysteresis = 5 } }\n",
                4,
                40,
                "`hysteresis` does not apply",
            ),
            ("rule without name", "\n[[rule]]\nplace = \"cloud\"\n", 2, 1, "rule has no name"),
            ("rule without place", "[[rule]]\nname = \"r\"\n", 1, 1, "rule \"r\" has no place"),
            ("empty rule name", "[[rule]]\nname = \" \"\nplace = \"cloud\"\n", 2, 8, "must not be empty"),
            (
                "rule name with a newline",
                "[[rule]]\nname = \"a\\nb\"\nplace = \"cloud\"\n",
                2,
                8,
                "one line",
            ),
            ("rule as a plain table", "[rule]\nname = \"r\"\n", 1, 2, "start each rule with [[rule]]"),
            (
                "empty match",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nmatch = { tags = [] }\n",
                4,
                9,
                "match lists no names and no tags",
            ),
            (
                "tags not strings",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nmatch = { tags = [\"a\", 7] }\n",
                4,
                24,
                "tags must be a list of strings",
            ),
            (
                "when not a table",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen = \"busy\"\n",
                4,
                8,
                "when must be a table",
            ),
            (
                "explore_rate out of range",
                "[auto]\nexplore_rate = 0.9\n",
                2,
                16,
                "auto.explore_rate must be between 0 and 0.5, not 0.9",
            ),
            ("smoothing zero", "[auto]\nsmoothing = 0\n", 2, 13, "auto.smoothing must be above 0"),
            (
                "stale_after bad",
                "[auto]\nstale_after = \"soon\"\n",
                2,
                15,
                "auto.stale_after: `soon` is not a duration",
            ),
            (
                "unknown key in auto",
                "[auto]\nexplore = 0.1\n",
                2,
                1,
                "unknown key `explore` in [auto]",
            ),
            (
                "TOML syntax error",
                "default = \"auto\"\n[[rule]\nname = \"r\"\n",
                2,
                8,
                "unclosed array table",
            ),
            ("TOML unterminated string", "default = \"auto\n", 1, 16, "invalid basic string"),
            (
                "TOML duplicate key",
                "[[rule]]\nname = \"r\"\nname = \"s\"\n",
                3,
                1,
                "duplicate key `name`",
            ),
            ("date-time", "default = 1979-05-27\n", 1, 11, "a date-time is not valid here"),
            (
                "column counts characters",
                "[[rule]]\nname = \"r\"\nplace = \"cloud\"\nwhen = { \"tempé\" = { above = 1 } }\n",
                4,
                10,
                "unknown signal `tempé`",
            ),
        ];
        for &(what, text, line, column, message) in cases {
            let e = match parse(text, Path::new("/etc/updraft/policy.toml")) {
                Ok(p) => panic!("{what}: parsed: {p:?}"),
                Err(e) => e,
            };
            let shown = e.to_string();
            assert_eq!((e.line, e.column), (line, column), "{what}: {shown}");
            assert!(e.message.contains(message), "{what}: {shown}");
            assert!(
                shown.starts_with(&format!("/etc/updraft/policy.toml:{line}:{column}: ")),
                "{what}: {shown}"
            );
            assert!(
                !shown.contains('\n'),
                "{what}: more than one line: {shown:?}"
            );
        }
    }

    #[test]
    fn line_column_counts_from_one() {
        let text = "ab\ncé\nx";
        for (pos, want) in [
            (0, (1, 1)),
            (1, (1, 2)),
            (3, (2, 1)),
            (6, (2, 3)),
            (7, (3, 1)),
            (99, (3, 2)),
        ] {
            assert_eq!(line_column(text, pos), want, "{pos}");
        }
        // "é" is two bytes: offset 5 (inside it) counts as its start.
        assert_eq!(line_column(text, 5), (2, 2));
    }
}
