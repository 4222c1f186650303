//! `dynamicrafter`'s front ends: the CLI commands, the server and the queue worker. Glue only:
//! arguments and forms become a `Request`, the engine's `Pipeline` does the work, and the result
//! becomes a file, a job and a report. A library beside the binary (`main.rs` parses the
//! arguments) so the fuzz targets (`fuzz/`) reach the API's parsing.

pub mod cli;
pub mod generation;
pub mod model_source;
pub mod serve;

#[doc(hidden)]
pub mod fuzzing;
