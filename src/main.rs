//! The `diffctl` binary.

fn main() -> std::process::ExitCode {
    match diffctl::cli::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
