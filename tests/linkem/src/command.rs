//! The control language the `linkem` binary reads on stdin, one command per line, so a
//! test script or a person can change the link while traffic flows.

use crate::params::{
    parse_bandwidth, parse_duration, parse_loss, parse_size, parse_switch, LinkParams, ParamsError,
};
use crate::relay::{RelayHandle, Which};
use std::time::Duration;

/// Help text for the stdin commands.
pub const COMMAND_HELP: &str = "\
commands (one per line; prefix a setting with `up` or `down` for one direction, default both):
  delay 200ms          one-way delay
  jitter 10ms          uniform +/- jitter on the delay
  loss 0.05 | loss 5%  random loss per datagram
  bandwidth 1mbit      cap per direction (kbit/mbit/gbit, or bit/s); `bandwidth off` removes it
  queue 256KiB         drop-tail queue in front of the cap
  reorder on|off       let jitter reorder datagrams
  blackhole on|off     drop everything, including datagrams in flight
  params               print the settings as JSON
  stats                print the counters as JSON
  help                 this text
  quit                 stop";

/// One change to a direction's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Change {
    /// Set [`LinkParams::delay`].
    Delay(Duration),
    /// Set [`LinkParams::jitter`].
    Jitter(Duration),
    /// Set [`LinkParams::loss`].
    Loss(f64),
    /// Set [`LinkParams::bandwidth_bps`].
    Bandwidth(Option<u64>),
    /// Set [`LinkParams::queue_limit_bytes`].
    Queue(usize),
    /// Set [`LinkParams::reorder`].
    Reorder(bool),
    /// Set [`LinkParams::blackhole`].
    Blackhole(bool),
}

impl Change {
    /// Applies the change to `params`.
    pub fn apply(&self, params: &mut LinkParams) {
        match *self {
            Change::Delay(d) => params.delay = d,
            Change::Jitter(d) => params.jitter = d,
            Change::Loss(l) => params.loss = l,
            Change::Bandwidth(b) => params.bandwidth_bps = b,
            Change::Queue(q) => params.queue_limit_bytes = q,
            Change::Reorder(r) => params.reorder = r,
            Change::Blackhole(b) => params.blackhole = b,
        }
    }
}

/// A parsed control line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Command {
    /// Change a setting in some directions.
    Set(Which, Change),
    /// Print the settings.
    Params,
    /// Print the counters.
    Stats,
    /// Print the command help.
    Help,
    /// Stop the relay and exit.
    Quit,
}

/// A control line that could not be understood.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CommandError {
    /// The first word is not a command.
    #[error("unknown command {0:?} (try `help`)")]
    Unknown(String),
    /// The command needs a value.
    #[error("`{0}` needs a value (try `help`)")]
    MissingValue(&'static str),
    /// Extra words after the command.
    #[error("unexpected {0:?} after the command")]
    Trailing(String),
    /// The value is not acceptable.
    #[error(transparent)]
    Value(#[from] ParamsError),
}

impl Command {
    /// Parses one line. Blank lines and `#` comments give `Ok(None)`.
    pub fn parse(line: &str) -> Result<Option<Command>, CommandError> {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let Some(mut first) = words.next() else {
            return Ok(None);
        };
        let which = match first.to_ascii_lowercase().as_str() {
            "up" => Some(Which::Up),
            "down" => Some(Which::Down),
            "both" => Some(Which::Both),
            _ => None,
        };
        if which.is_some() {
            first = words
                .next()
                .ok_or(CommandError::MissingValue("up/down/both"))?;
        }
        let name = first.to_ascii_lowercase();
        let command = match (name.as_str(), which) {
            ("params" | "show", None) => Command::Params,
            ("stats", None) => Command::Stats,
            ("help" | "?", None) => Command::Help,
            ("quit" | "exit", None) => Command::Quit,
            (setting, which) => {
                let key: &'static str = match setting {
                    "delay" => "delay",
                    "jitter" => "jitter",
                    "loss" => "loss",
                    "bandwidth" | "rate" => "bandwidth",
                    "queue" => "queue",
                    "reorder" => "reorder",
                    "blackhole" => "blackhole",
                    _ => return Err(CommandError::Unknown(first.to_string())),
                };
                let value = words.next().ok_or(CommandError::MissingValue(key))?;
                let change = match key {
                    "delay" => Change::Delay(parse_duration(value)?),
                    "jitter" => Change::Jitter(parse_duration(value)?),
                    "loss" => Change::Loss(parse_loss(value)?),
                    "bandwidth" => Change::Bandwidth(parse_bandwidth(value)?),
                    "queue" => Change::Queue(parse_size(value)?),
                    "reorder" => Change::Reorder(parse_switch(value)?),
                    _ => Change::Blackhole(parse_switch(value)?),
                };
                Command::Set(which.unwrap_or(Which::Both), change)
            }
        };
        match words.next() {
            Some(extra) => Err(CommandError::Trailing(extra.to_string())),
            None => Ok(Some(command)),
        }
    }
}

/// What running a command produced.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// Print this (one line, except for `help`).
    Print(String),
    /// Stop the relay.
    Quit,
}

impl Command {
    /// Runs the command against a relay. A setting that makes the link invalid is refused
    /// and changes nothing.
    pub fn execute(&self, relay: &RelayHandle) -> Result<Reply, ParamsError> {
        Ok(match self {
            Command::Set(which, change) => {
                relay.modify(*which, |p| change.apply(p))?;
                Reply::Print("ok".into())
            }
            Command::Params => {
                let (up, down) = relay.params();
                let json = serde_json::json!({ "up": up.to_json(), "down": down.to_json() });
                Reply::Print(json.to_string())
            }
            Command::Stats => Reply::Print(
                serde_json::to_string(&relay.stats()).unwrap_or_else(|e| format!("error: {e}")),
            ),
            Command::Help => Reply::Print(COMMAND_HELP.into()),
            Command::Quit => Reply::Quit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Command {
        Command::parse(s).unwrap().unwrap()
    }

    #[test]
    fn settings() {
        assert_eq!(
            parse("delay 200ms"),
            Command::Set(Which::Both, Change::Delay(Duration::from_millis(200)))
        );
        assert_eq!(
            parse("up loss 0.2"),
            Command::Set(Which::Up, Change::Loss(0.2))
        );
        assert_eq!(
            parse("down bandwidth 1mbit"),
            Command::Set(Which::Down, Change::Bandwidth(Some(1_000_000)))
        );
        assert_eq!(
            parse("bandwidth off"),
            Command::Set(Which::Both, Change::Bandwidth(None))
        );
        assert_eq!(
            parse("blackhole on"),
            Command::Set(Which::Both, Change::Blackhole(true))
        );
        assert_eq!(
            parse("  BLACKHOLE off  "),
            Command::Set(Which::Both, Change::Blackhole(false))
        );
        assert_eq!(
            parse("queue 64KiB"),
            Command::Set(Which::Both, Change::Queue(65536))
        );
    }

    #[test]
    fn others() {
        assert_eq!(parse("stats"), Command::Stats);
        assert_eq!(parse("params"), Command::Params);
        assert_eq!(parse("quit"), Command::Quit);
        assert_eq!(Command::parse("").unwrap(), None);
        assert_eq!(Command::parse("  # comment").unwrap(), None);
    }

    #[test]
    fn errors() {
        assert!(matches!(
            Command::parse("warp 9"),
            Err(CommandError::Unknown(_))
        ));
        assert!(matches!(
            Command::parse("delay"),
            Err(CommandError::MissingValue("delay"))
        ));
        assert!(matches!(
            Command::parse("loss 2"),
            Err(CommandError::Value(_))
        ));
        assert!(matches!(
            Command::parse("stats now"),
            Err(CommandError::Trailing(_))
        ));
        assert!(matches!(
            Command::parse("up stats"),
            Err(CommandError::Unknown(_))
        ));
        assert!(matches!(
            Command::parse("up"),
            Err(CommandError::MissingValue(_))
        ));
    }

    #[test]
    fn apply() {
        let mut p = LinkParams::default();
        Change::Loss(0.5).apply(&mut p);
        Change::Bandwidth(Some(10)).apply(&mut p);
        assert_eq!(p.loss, 0.5);
        assert_eq!(p.bandwidth_bps, Some(10));
    }
}
