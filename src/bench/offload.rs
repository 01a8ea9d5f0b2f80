//! `updraft bench offload`.

/// Runs the offload benchmark.
pub async fn run(_json: bool) -> anyhow::Result<()> {
    anyhow::bail!("the offload benchmark is being written")
}
