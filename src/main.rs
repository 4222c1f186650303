//! `dynamicrafter`: the command line; each command's work is in the library (`lib.rs`).

use clap::{Parser, Subcommand};
use dynamicrafter::{cli, serve};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "dynamicrafter", version, about = "DynamiCrafter image-to-video generation", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Animate an image guided by a text prompt (or interpolate between two, or loop one).
    Generate(cli::generate::GenerateArgs),
    /// Run a folder of images and a prompt file, like upstream's run.sh.
    Batch(cli::batch::BatchArgs),
    /// Convert a model.ckpt to safetensors (memory-mapped loads, optional bf16/f16).
    Convert(cli::convert::ConvertArgs),
    /// Serve the web page and the HTTP API (model loaded once, bounded job queue).
    Serve(serve::ServeArgs),
    /// Run jobs from a shared Redis queue (`serve --queue`), on this machine's CPU or GPU.
    Worker(serve::WorkerArgs),
}

fn main() -> ExitCode {
    dynamicrafter_engine::compute::keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line naming the flag, like every other bad input (clap's own text says
            // "error: invalid value … [possible values: …]" over several lines).
            eprintln!("dynamicrafter: {}", one_line(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Generate(args) => cli::generate::run(args).map(|()| true),
        Command::Batch(args) => cli::batch::run(args),
        Command::Convert(args) => cli::convert::run(args).map(|()| true),
        Command::Serve(args) => serve::run(args).map(|()| true),
        Command::Worker(args) => serve::run_worker(args).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        // Some batch items failed; each was reported.
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("dynamicrafter: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A clap message on one line: its lines joined, without the `error: ` lead, the usage and tip
/// lines and the closing "For more information, try '--help'." (kept as a short pointer).
fn one_line(message: &str) -> String {
    let text: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:") && !l.starts_with("tip:"))
        .collect();
    let joined = text.join(" ");
    format!("{} (see --help)", joined.strip_prefix("error: ").unwrap_or(&joined))
}
