//! The API against its own OpenAPI document (#22): `scripts/schemathesis.sh` runs schemathesis
//! with every check over every operation, stateful runs included, on a live server of this
//! build. A bounded example count keeps it to a minute or two; run the script with more.

use std::process::Command;

#[test]
fn the_api_keeps_the_contract_its_openapi_document_states() {
    let out = Command::new("bash")
        .args(["scripts/schemathesis.sh", "25"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DYNAMICRAFTER_BIN", env!("CARGO_BIN_EXE_dynamicrafter"))
        .output()
        .expect("running scripts/schemathesis.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tail: String = stdout.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    // Schemathesis exits non-zero on any failure or error (warnings, e.g. too few examples to
    // reach an operation, do not count).
    assert!(out.status.success(), "schemathesis found problems:\n{tail}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" passed"), "{tail}");
}
