//! `cargo run --release --example serve -- --weights W.pth --port 8000`: the server without the CLI,
//! for tools/loadtest.sh until (and besides) `retinaface serve`.

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: retinaface::serve::ServeArgs,
}

fn main() -> std::process::ExitCode {
    match retinaface::serve::run(Cli::parse().args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
