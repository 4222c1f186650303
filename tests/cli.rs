//! End-to-end checks of the `dynamicrafter` binary on the repository's tiny fixture model.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dynamicrafter"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dynamicrafter-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn generate_writes_one_png_per_frame() {
    let out = tmp("frames");
    let status = bin()
        .args(["generate", "--model"])
        .arg(repo().join("fixtures/tiny-v"))
        .arg("--image")
        .arg(repo().join("examples/images/test_card.png"))
        .args(["--prompt", "a red fox", "--steps", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let mut frames: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).collect();
    frames.sort();
    assert_eq!(frames.len(), 8, "tiny-v makes 8 frames");
    let img = image::open(&frames[0]).unwrap();
    assert_eq!((img.width(), img.height()), (128, 64));
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let out = tmp("bad");
    let cases: [(&[&str], &str); 3] = [
        (&["--image", "does/not/exist.png"], "does/not/exist.png"),
        (&["--image", "Cargo.toml"], "not a readable image"),
        (&["--image", "examples/images/test_card.png", "--steps", "0"], "steps"),
    ];
    for (args, needle) in cases {
        let o = bin()
            .current_dir(repo())
            .args(["generate", "--model", "fixtures/tiny-v", "--out"])
            .arg(&out)
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        let last = err.trim_end().lines().last().unwrap_or("");
        assert!(last.starts_with("dynamicrafter: ") && last.contains(needle), "{args:?}: {err}");
        assert!(!Path::new(&out).exists(), "nothing may be written on error");
    }
}
