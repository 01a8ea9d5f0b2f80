//! `updraft demo`: a daemon and an agent in one process over real QUIC on loopback.

/// Runs the demo.
pub async fn run() -> anyhow::Result<()> {
    anyhow::bail!("the demo is being written")
}
