//! Every committed fuzz input replayed through its target's entry point on stable, so CI covers
//! what fuzzing found without the nightly toolchain: the seed corpus (`fuzz/corpus/<target>/`)
//! and every input that once crashed a target (`fuzz/regressions/<target>/`).

use dynamicrafter::fuzzing::TARGETS;
use std::path::Path;

#[test]
fn every_committed_fuzz_input_replays_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failures = Vec::new();
    for (name, target) in TARGETS {
        let mut replayed = 0;
        for kind in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(kind).join(name)) else { continue };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                if std::panic::catch_unwind(|| target(&data)).is_err() {
                    failures.push(path.display().to_string());
                }
                replayed += 1;
            }
        }
        assert!(replayed > 0, "no committed inputs for the {name} target");
    }
    assert!(failures.is_empty(), "inputs that panic: {failures:#?}");
}
