//! The `diffctl` command line: a thin layer over the library.

mod convert;
mod embedding;
mod generate;
mod ic_light;
mod inspect;
mod ip_adapter;
mod lora;
mod preprocess;
mod reference;
mod resident;
mod residual;
mod sdxl;
mod serve;
mod source;
mod train;
mod uni_controlnet;
mod worker;

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
    /// Make a control image from a photo: canny, sobel, grayscale, invert, scribble, keypoints, resize, crop.
    Preprocess(preprocess::PreprocessArgs),
    /// Convert a single-file checkpoint to a diffusers folder, or a diffusers folder to a single file.
    Convert(convert::ConvertArgs),
    /// Tell what a weight file or model folder is: format, family, dtypes, size, mechanism.
    Inspect(inspect::InspectArgs),
    /// Serve the AUTOMATIC1111 (/sdapi/v1) and OpenAI (/v1/images) APIs and a web UI over HTTP.
    Serve(Box<serve::ServeArgs>),
    /// Run jobs that `diffctl serve --queue redis://...` puts on Redis Streams.
    Worker(Box<worker::WorkerArgs>),
    /// Fine-tune on a folder of captioned images: LoRA adapters, or a new token (textual inversion).
    Train(train::TrainArgs),
}

/// Parses the command line and runs it.
pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate(args) => generate::run(&args),
        Command::Preprocess(args) => preprocess::run(&args),
        Command::Convert(args) => convert::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Worker(args) => worker::run(&args),
        Command::Train(args) => train::run(&args),
    }
}
