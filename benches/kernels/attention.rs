//! (in progress)

/// Runs this benchmark.
pub fn run() -> anyhow::Result<()> {
    Ok(())
}
