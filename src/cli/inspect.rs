//! `diffctl inspect`: what a weight file or model folder is.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::io::identify::identify;

/// Arguments of `diffctl inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A weight file (.safetensors, .ckpt, .bin, .pt) or a diffusers folder.
    #[arg(value_name = "PATH")]
    path: PathBuf,
}

/// Runs `diffctl inspect`, printing one `field: value` line per fact. A closed standard output
/// (`diffctl inspect X | head -3`) ends it quietly; any other write error (`>/dev/full`) is an error.
pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let id = identify(&args.path)?;
    let mut text = String::new();
    let _ = writeln!(text, "path: {}", id.path.display());
    let _ = writeln!(text, "format: {}", id.format);
    let _ = writeln!(text, "kind: {}", id.kind);
    let _ = writeln!(text, "family: {}", id.family.as_deref().unwrap_or("not determined"));
    let dtypes: Vec<String> = id.dtypes.iter().map(|(d, n)| format!("{d} ({n} tensors)")).collect();
    let _ = writeln!(text, "dtypes: {}", dtypes.join(", "));
    let _ = writeln!(text, "tensors: {}", id.tensors);
    let _ = writeln!(text, "parameters: {} ({:.2} M)", id.parameters, id.parameters as f64 / 1e6);
    for note in &id.notes {
        let _ = writeln!(text, "note: {note}");
    }
    write_stdout(text.as_bytes())
}

/// Writes `bytes` to standard output and flushes it: a closed pipe is success (the reader has what
/// it wanted), other errors are reported.
pub(crate) fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(anyhow::anyhow!("writing to standard output: {e}")),
    }
}
