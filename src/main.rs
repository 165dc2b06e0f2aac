//! The `diffctl` binary.

#[global_allocator]
static ALLOCATOR: diffctl::allocator::TensorAllocator = diffctl::allocator::TensorAllocator;

fn main() -> std::process::ExitCode {
    diffctl::allocator::configure();
    match diffctl::cli::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
