//! `diffctl convert`: a single-file checkpoint as a diffusers folder, or a diffusers folder as a
//! single-file checkpoint.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::io::convert::{write_checkpoint, write_diffusers_folder};
use crate::io::model_files::ModelFiles;

/// Arguments of `diffctl convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The model: a single-file checkpoint (.safetensors, .ckpt) or a diffusers folder.
    #[arg(value_name = "IN")]
    input: PathBuf,
    /// Where to write: a path ending in .safetensors gets a single-file (LDM layout) checkpoint, any
    /// other a new diffusers folder (safetensors weights). Must not exist yet.
    #[arg(value_name = "OUT")]
    output: PathBuf,
    #[command(flatten)]
    source: super::source::SourceArgs,
}

/// Runs `diffctl convert`.
pub fn run(args: &ConvertArgs) -> anyhow::Result<()> {
    let model = ModelFiles::open(&args.input, &args.source.options())
        .with_context(|| format!("reading model {}", args.input.display()))?;
    let extension = args.output.extension().and_then(|e| e.to_str()).unwrap_or_default();
    if ["ckpt", "pt", "pth", "bin"].contains(&extension) {
        anyhow::bail!("{}: single-file output is written as .safetensors only", args.output.display());
    }
    if extension == "safetensors" {
        // Anything at the path, a dangling symlink included, is refused (never written through).
        if std::fs::symlink_metadata(&args.output).is_ok() {
            anyhow::bail!("{}: already exists; choose a new output file", args.output.display());
        }
        write_checkpoint(&model, &args.output)?;
    } else {
        write_diffusers_folder(&model, &args.output)?;
    }
    eprintln!("wrote {}", args.output.display());
    Ok(())
}
