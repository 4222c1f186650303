//! `dynamicrafter`: the command-line front end. Glue only: arguments become a `Request`, the
//! engine's `Pipeline` does the work, and the result becomes a file and a report.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod batch;
mod bench;
mod convert;
mod generate;
mod model;
mod run;
mod serve;

#[derive(Parser)]
#[command(name = "dynamicrafter", version, about = "DynamiCrafter image-to-video generation", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Animate an image guided by a text prompt (or interpolate between two, or loop one).
    Generate(generate::GenerateArgs),
    /// Run a folder of images and a prompt file, like upstream's run.sh.
    Batch(batch::BatchArgs),
    /// Convert a model.ckpt to safetensors (memory-mapped loads, optional bf16/f16).
    Convert(convert::ConvertArgs),
    /// Serve the web page and the HTTP API (model loaded once, bounded job queue).
    Serve(serve::ServeArgs),
    /// Time the networks with random weights (no checkpoint needed).
    Bench(bench::BenchArgs),
}

/// glibc returns every block over 128 KB–32 MB to the OS when freed, and takes fresh zeroed pages
/// for the next: a UNet forward allocates and frees gigabytes of same-sized activations, so the
/// kernel spent ~10 % of a CPU run clearing pages. Serve blocks up to 32 MB (the most glibc
/// allows) from the heap and keep freed memory there: `unet-256` 30.8–33.5 s instead of
/// 35.0–36.8 s in two back-to-back pairs (docs/PERFORMANCE.md), peak RSS +3 %.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args).map(|()| true),
        Command::Batch(args) => batch::run(args),
        Command::Convert(args) => convert::run(args).map(|()| true),
        Command::Bench(args) => bench::run(args).map(|()| true),
        Command::Serve(args) => serve::run(args).map(|()| true),
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
