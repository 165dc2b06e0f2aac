//! `diffctl serve`: the HTTP server (see [`crate::server`]).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Args;

use crate::server::{EngineSettings, ServeOptions};

/// Arguments of `diffctl serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    resident: super::resident::ResidentArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", value_name = "IP")]
    host: IpAddr,
    /// Port to listen on (0: any free port, printed).
    #[arg(long, default_value_t = 7860, value_name = "N")]
    port: u16,
    /// Require these credentials on every route: HTTP Basic, or on /v1/* also `Bearer USER:PASS`.
    #[arg(long, value_name = "USER:PASS")]
    api_auth: Option<String>,
    /// Where jobs, their images and the job database are kept (created if missing).
    #[arg(long, default_value = "diffctl-state", value_name = "DIR")]
    state_dir: PathBuf,
    /// Jobs waiting or running at most; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_queue: usize,
    /// Refuse requests for more denoising steps than this.
    #[arg(long, default_value_t = 150, value_name = "N")]
    max_steps: usize,
    /// Put jobs on Redis Streams (redis://HOST:PORT) for `diffctl worker`s instead of running them
    /// here; the model is then not loaded by the server.
    #[arg(long, value_name = "URL")]
    queue: Option<String>,
    /// Refuse request bodies larger than this many MB.
    #[arg(long, default_value_t = 64, value_name = "MB")]
    max_body_mb: usize,
}

/// Runs the server until Ctrl-C or SIGTERM.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let api_auth = match &args.api_auth {
        Some(text) => {
            let (user, pass) = text
                .split_once(':')
                .filter(|(u, p)| !u.is_empty() && !p.is_empty())
                .ok_or_else(|| anyhow::anyhow!("--api-auth {text}: expected USER:PASS"))?;
            Some((user.to_string(), pass.to_string()))
        }
        None => None,
    };
    if args.max_queue == 0 {
        anyhow::bail!("--max-queue must be at least 1");
    }
    let runner = args.resident.runner()?;
    let model = runner.model.clone();
    let options = ServeOptions {
        engine: EngineSettings {
            runner,
            state_dir: args.state_dir.clone(),
            max_queue: args.max_queue,
            queue: args.queue.clone(),
        },
        address: SocketAddr::new(args.host, args.port),
        api_auth,
        max_body: args.max_body_mb.saturating_mul(1 << 20),
        max_steps: args.max_steps,
    };
    eprintln!("loading {} ...", model.display());
    let server = crate::server::start(options.clone(), true)?;
    let shown = ServeOptions { address: server.address, ..options };
    eprintln!("diffctl serve: listening on {}", crate::server::describe(&shown));
    server.wait();
    Ok(())
}
