use dynamicrafter_video::{decode_mp4, encode_mp4, psnr, write, Format, Frames, VideoWriter};

/// Smooth moving colour gradients with luminance texture: like natural video, unlike noise
/// (whose colour detail yuv420p cannot hold, by design).
fn test_frames(count: usize, w: usize, h: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(count * w * h * 3);
    for t in 0..count {
        for y in 0..h {
            for x in 0..w {
                let fx = (x + 3 * t) as f32 / (w + 3 * count) as f32;
                let fy = y as f32 / h as f32;
                let texture = (((x / 4 + y / 4 + t) % 2) * 30) as f32;
                v.push((200.0 * fx + texture) as u8);
                v.push((180.0 * (0.5 + 0.5 * (3.0 * fy + t as f32 * 0.3).sin()) + texture) as u8);
                v.push((60.0 + 100.0 * fy + texture) as u8);
            }
        }
    }
    v
}

#[test]
fn mp4_plays_back_at_high_quality() {
    let (n, w, h) = (8, 128, 64);
    let data = test_frames(n, w, h);
    let bytes = encode_mp4(Frames::new(&data, n, w, h).unwrap(), 8.0).unwrap();
    let video = decode_mp4(&bytes).unwrap();
    assert!(video.moov_first, "moov must precede mdat");
    assert_eq!((video.count, video.width, video.height), (n, w, h));
    assert!((video.fps - 8.0).abs() < 1e-6, "fps {}", video.fps);
    let db = psnr(&video.frames, &data);
    assert!(db >= 35.0, "PSNR {db:.1} dB");
}

#[test]
fn gif_and_png_hold_every_frame_and_nothing_partial_is_left() {
    let (n, w, h) = (4, 32, 16);
    let data = test_frames(n, w, h);
    let frames = Frames::new(&data, n, w, h).unwrap();
    let dir = std::env::temp_dir().join(format!("dc-video-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gif = dir.join("a.gif");
    write(frames, Format::Gif, 8.0, &gif).unwrap();
    let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(std::fs::File::open(&gif).unwrap())).unwrap();
    use image::AnimationDecoder;
    assert_eq!(decoder.into_frames().count(), n);
    let png = dir.join("frames");
    write(frames, Format::Png, 8.0, &png).unwrap();
    let first = image::open(png.join("frame_000.png")).unwrap().to_rgb8();
    assert_eq!(first.as_raw().as_slice(), frames.frame(0));
    assert_eq!(std::fs::read_dir(&png).unwrap().count(), n);
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains("partial")).collect();
    assert!(leftovers.is_empty());
    assert!(write(frames, Format::Mp4, 0.0, &dir.join("bad.mp4")).is_err());
    assert!(!dir.join("bad.mp4").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Hardening (#22): the temporary file is created exclusively under an unpredictable name, so a
/// link planted at the old predictable one (`.NAME.partial`) is never followed; a png folder is
/// written only into a new or empty folder, and a non-empty one is refused with its files kept.
#[test]
fn writes_follow_no_planted_link_and_delete_no_folder() {
    let (n, w, h) = (2, 32, 16);
    let data = test_frames(n, w, h);
    let frames = Frames::new(&data, n, w, h).unwrap();
    let dir = std::env::temp_dir().join(format!("dc-video-links-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    #[cfg(unix)]
    for name in ["out.mp4", "out.gif"] {
        std::os::unix::fs::symlink(&victim, dir.join(format!(".{name}.partial"))).unwrap();
        let format = if name.ends_with("gif") { Format::Gif } else { Format::Mp4 };
        write(frames, format, 8.0, &dir.join(name)).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "{name}");
        assert!(std::fs::metadata(dir.join(name)).unwrap().len() > 100);
    }
    let full = dir.join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("keep.txt"), b"mine").unwrap();
    let err = write(frames, Format::Png, 8.0, &full).unwrap_err().to_string();
    assert!(err.contains("not an empty folder"), "{err}");
    assert_eq!(std::fs::read(full.join("keep.txt")).unwrap(), b"mine");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    write(frames, Format::Png, 8.0, &empty).unwrap();
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), n);
    // A failure after the temporary file exists (odd sizes cannot be yuv420p) leaves nothing.
    let odd = Frames::new(&data[..3 * 3 * 5], 1, 3, 5).unwrap();
    assert!(write(odd, Format::Mp4, 8.0, &dir.join("odd.mp4")).is_err());
    let partial: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial") && n != ".out.mp4.partial" && n != ".out.gif.partial")
        .collect();
    assert!(partial.is_empty(), "{partial:?}");
    assert!(!dir.join("odd.mp4").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Frames given one at a time (as the pipeline decodes them) make the same video as all at
/// once; until `finish` only a temporary entry exists, and a writer dropped unfinished (a
/// failed or cancelled run), given a wrong-sized frame, or finished with no frames leaves
/// nothing behind.
#[test]
fn a_streamed_video_appears_only_when_finished() {
    let (n, w, h) = (5, 64, 32);
    let data = test_frames(n, w, h);
    let frames = Frames::new(&data, n, w, h).unwrap();
    let dir = std::env::temp_dir().join(format!("dc-video-stream-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for format in [Format::Mp4, Format::Gif, Format::Png] {
        let path = dir.join(format!("v.{}", format.extension()));
        let mut writer = VideoWriter::create(format, 8.0, &path, w, h).unwrap();
        for i in 0..n {
            writer.push(frames.frame(i)).unwrap();
            assert!(!path.exists(), "{format:?}: nothing at the destination before finish");
            assert_eq!(entries(&dir).iter().filter(|e| e.ends_with(".partial")).count(), 1, "{format:?}");
        }
        let err = writer.push(&data[..w * h * 3 - 3]).unwrap_err().to_string();
        assert!(err.contains("not an RGB frame of 64×32"), "{err}");
        writer.finish().unwrap();
        assert!(entries(&dir).iter().all(|e| !e.ends_with(".partial")), "{format:?}");
        match format {
            Format::Mp4 => assert_eq!(std::fs::read(&path).unwrap(), encode_mp4(frames, 8.0).unwrap()),
            Format::Png => assert_eq!(std::fs::read_dir(&path).unwrap().count(), n),
            Format::Gif => {
                let all = dir.join("all.gif");
                write(frames, Format::Gif, 8.0, &all).unwrap();
                assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&all).unwrap());
                std::fs::remove_file(all).unwrap();
            }
        }

        let abandoned = dir.join(format!("abandoned.{}", format.extension()));
        let mut writer = VideoWriter::create(format, 8.0, &abandoned, w, h).unwrap();
        writer.push(frames.frame(0)).unwrap();
        drop(writer);
        let empty = dir.join(format!("empty.{}", format.extension()));
        let err = VideoWriter::create(format, 8.0, &empty, w, h).unwrap().finish().unwrap_err().to_string();
        assert!(err.contains("at least one frame"), "{err}");
        let left = entries(&dir);
        assert!(left.iter().all(|e| e.starts_with("v.")), "{format:?}: {left:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
