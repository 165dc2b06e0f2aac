//! The `diffctl` command line: a thin layer over the library.

mod generate;
mod residual;

use clap::{Parser, Subcommand};

/// Controllable text-to-image diffusion: Stable Diffusion 1.x/2.x from the model folders you
/// already have, reproducing diffusers' results.
#[derive(Debug, Parser)]
#[command(name = "diffctl", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate images from a text prompt.
    Generate(Box<generate::GenerateArgs>),
}

/// Parses the command line and runs it.
pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate(args) => generate::run(&args),
    }
}
