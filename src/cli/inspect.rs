//! `diffctl inspect`: what a weight file or model folder is.

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

/// Runs `diffctl inspect`, printing one `field: value` line per fact.
pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let id = identify(&args.path)?;
    println!("path: {}", id.path.display());
    println!("format: {}", id.format);
    println!("kind: {}", id.kind);
    println!("family: {}", id.family.as_deref().unwrap_or("not determined"));
    let dtypes: Vec<String> = id.dtypes.iter().map(|(d, n)| format!("{d} ({n} tensors)")).collect();
    println!("dtypes: {}", dtypes.join(", "));
    println!("tensors: {}", id.tensors);
    println!("parameters: {} ({:.2} M)", id.parameters, id.parameters as f64 / 1e6);
    for note in &id.notes {
        println!("note: {note}");
    }
    Ok(())
}
