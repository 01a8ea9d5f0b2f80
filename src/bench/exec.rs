//! `updraft bench exec`: what the executor adds to running a program, against a bare
//! `tokio::process` spawn of the same program in the same run.
//!
//! The executor's side is what the daemon and the agent do for a command task: a
//! private working directory, a clean environment, the program's own process group,
//! containment ([`updraft_shared::contain`], chosen as the services choose it at
//! start), input fed to stdin, stdout streamed out, a stderr tail kept. The bare side
//! spawns the program with the three pipes, feeds the same input, reads stdout to its
//! end and waits. Two programs: `/bin/true` (the spawn alone) and `sha256sum` of 1 MiB.
//! The bare side runs first: once containment is chosen this process is a child
//! subreaper whose reaper collects every child, which would take a bare child's exit
//! from `tokio::process`. Run it on a quiet machine.

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use updraft_proto::spec::TaskFile;
use updraft_shared::catalog::{AdmittedTask, Caller, Catalog};
use updraft_shared::exec::Executor;

use super::offload::{bounded, new_histogram, round3};

/// Runs of each side before anything is measured.
const WARMUP: usize = 20;
/// Measured runs per side and program.
const SAMPLES: usize = 400;
/// Input of the `sha256sum` case.
const SHA_INPUT: usize = 1 << 20;
/// The goal: the executor's p50 at most this much over the bare spawn's (printed only).
const GOAL_OVERHEAD: f64 = 0.10;

/// One program measured both ways.
struct Case {
    name: &'static str,
    argv: &'static [&'static str],
    input: Bytes,
    exec: Histogram<u64>,
    bare: Histogram<u64>,
}

/// Runs the exec benchmark and prints a table, or one JSON line with `json`.
pub async fn run(json: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("temporary directory for the benchmark")?;
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work)?;
    let executor = Executor::new(4, 16, work);
    let input: Vec<u8> = (0..SHA_INPUT).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut cases = [
        Case {
            name: "/bin/true",
            argv: &["/bin/true"],
            input: Bytes::new(),
            exec: new_histogram()?,
            bare: new_histogram()?,
        },
        Case {
            name: "sha256sum, 1 MiB in",
            argv: &["/usr/bin/sha256sum"],
            input: Bytes::from(input),
            exec: new_histogram()?,
            bare: new_histogram()?,
        },
    ];
    for case in &mut cases {
        let what = format!("bare spawn of {}", case.name);
        let (argv, input) = (case.argv, &case.input);
        timed(&what, &mut case.bare, || bare(argv, input)).await?;
    }
    // As the services do at start.
    let containment = updraft_shared::contain::init();
    for case in &mut cases {
        let task = admitted(case.argv)?;
        let what = format!("{} through the executor", case.name);
        let input = &case.input;
        timed(&what, &mut case.exec, || {
            through_executor(&executor, &task, input.clone())
        })
        .await?;
    }
    print(&cases, &containment.to_string(), json);
    Ok(())
}

/// [`WARMUP`] runs of `once`, then [`SAMPLES`] timed into `hist`; the phase `what` fails
/// with the first failed run.
async fn timed<F, Fut>(what: &str, hist: &mut Histogram<u64>, mut once: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    bounded(what, async {
        for i in 0..WARMUP + SAMPLES {
            let start = Instant::now();
            once().await?;
            if i >= WARMUP {
                hist.saturating_record(start.elapsed().as_micros() as u64);
            }
        }
        Ok(())
    })
    .await
}

/// The catalog's admission of a command task running `argv`.
fn admitted(argv: &[&str]) -> anyhow::Result<AdmittedTask> {
    let file = TaskFile {
        command: Some(argv.iter().map(|s| s.to_string()).collect()),
        max_input: Some(updraft_proto::units::ByteSize(2 * SHA_INPUT as u64)),
        ..Default::default()
    };
    let catalog = Catalog::from_files(BTreeMap::from([("bench".to_string(), file)]))?;
    Ok(catalog.admit("bench", vec![], None, Caller::Local)?)
}

async fn through_executor(
    executor: &Executor,
    task: &AdmittedTask,
    input: Bytes,
) -> anyhow::Result<()> {
    let mut out = Vec::new();
    let outcome = executor.run(task, Some(input), &mut out).await?;
    anyhow::ensure!(
        outcome.exit_code == 0,
        "the task exited {}: {}",
        outcome.exit_code,
        String::from_utf8_lossy(&outcome.stderr_tail)
    );
    Ok(())
}

/// The program with its three pipes: input fed, stdout and stderr read to their end,
/// the exit awaited.
async fn bare(argv: &[&str], input: &[u8]) -> anyhow::Result<()> {
    let mut child = tokio::process::Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {}", argv[0]))?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let feed = async {
        // A program that does not read its input closes the pipe early: not an error.
        let _ = stdin.write_all(input).await;
        drop(stdin);
        anyhow::Ok(())
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (fed, read, _) = tokio::join!(
        feed,
        stdout.read_to_end(&mut out),
        stderr.read_to_end(&mut err)
    );
    fed?;
    read?;
    let status = child.wait().await?;
    anyhow::ensure!(status.success(), "{} exited {status}", argv[0]);
    Ok(())
}

fn print(cases: &[Case], containment: &str, json: bool) {
    let p50 = |h: &Histogram<u64>| h.value_at_quantile(0.5);
    let overhead = |c: &Case| {
        let bare = p50(&c.bare) as f64;
        if bare > 0.0 {
            p50(&c.exec) as f64 / bare - 1.0
        } else {
            0.0
        }
    };
    if json {
        let mut line = serde_json::Map::new();
        line.insert("containment".into(), containment.into());
        for (c, key) in cases.iter().zip(["true", "sha256sum_1mib"]) {
            line.insert(format!("{key}_exec_p50_us"), p50(&c.exec).into());
            line.insert(format!("{key}_bare_p50_us"), p50(&c.bare).into());
            line.insert(format!("{key}_overhead"), round3(overhead(c)).into());
        }
        line.insert("samples".into(), SAMPLES.into());
        println!("{}", serde_json::Value::Object(line));
        return;
    }
    println!("updraft bench exec: a command task through the executor against a bare tokio::process spawn");
    println!("containment: {containment}");
    println!();
    println!(
        "{:<24} {:>12} {:>12} {:>10}",
        "program", "executor", "bare spawn", "overhead"
    );
    for c in cases {
        println!(
            "{:<24} {:>12} {:>12} {:>9.1}%",
            c.name,
            format!("{} us", p50(&c.exec)),
            format!("{} us", p50(&c.bare)),
            overhead(c) * 100.0
        );
    }
    println!();
    println!(
        "p50 of {SAMPLES} runs per side after {WARMUP} unmeasured, bare side first; goal: overhead <= {:.0}%.",
        GOAL_OVERHEAD * 100.0
    );
}
