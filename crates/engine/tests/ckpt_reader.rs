//! The `model.ckpt` reader on checkpoints this test writes byte by byte: what `torch.save`
//! writes loads (parameters, subclass wrappers, a state dict's `_metadata`, permuted layouts,
//! integer storages), and every hostile or broken record (short tuples, lying sizes, shapes
//! larger than their storage, memo bombs, compressed entries, random byte flips) is one clear
//! checkpoint error: never a panic, never an allocation the file does not back.

use candle_core::{DType, Device, Tensor};
use dynamicrafter_engine::weights::Checkpoint;
use dynamicrafter_engine::Error;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A protocol-2 pickle, written op by op.
#[derive(Default, Clone)]
struct P(Vec<u8>);

impl P {
    fn new() -> Self {
        P(vec![0x80, 2])
    }
    fn op(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn str(self, s: &str) -> Self {
        let mut p = self.op(b"X");
        p.0.extend((s.len() as u32).to_le_bytes());
        p.0.extend(s.as_bytes());
        p
    }
    fn int(self, i: i64) -> Self {
        let mut p = self.op(&[0x8a, 8]);
        p.0.extend(i.to_le_bytes());
        p
    }
    fn global(self, module: &str, name: &str) -> Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn ints(self, v: &[i64]) -> Self {
        let mut p = self.op(b"(");
        for &i in v {
            p = p.int(i);
        }
        p.op(b"t")
    }
    /// `('storage', torch.<class>, key, 'cpu', numel)` as a persistent id.
    fn storage(self, class: &str, key: &str, numel: i64) -> Self {
        self.op(b"(").str("storage").global("torch", class).str(key).str("cpu").int(numel).op(b"tQ")
    }
    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.
    fn tensor(self, class: &str, key: &str, numel: i64, offset: i64, size: &[i64], stride: &[i64]) -> Self {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .op(b"(")
            .storage(class, key, numel)
            .int(offset)
            .ints(size)
            .ints(stride)
            .op(&[0x89])
            .global("collections", "OrderedDict")
            .op(b")R")
            .op(b"tR")
    }
    fn done(self) -> Vec<u8> {
        self.op(b".").0
    }
}

/// `{'state_dict': {name: value, …}}` around `items` (each pushes a key and a value).
fn state_dict(items: &[P]) -> Vec<u8> {
    root(items, false, &[])
}

/// The root dict: `state_dict` (with a `BUILD` of `{'_metadata': {}}` on it if `metadata`,
/// as a real state dict has), then the `extra` entries beside it.
fn root(items: &[P], metadata: bool, extra: &[P]) -> Vec<u8> {
    let mut p = P::new().op(b"}(").str("state_dict").op(b"}(");
    for item in items {
        p.0.extend_from_slice(&item.0);
    }
    p = p.op(b"u");
    if metadata {
        p = p.op(b"}(").str("_metadata").op(b"}u").op(b"b");
    }
    for item in extra {
        p.0.extend_from_slice(&item.0);
    }
    p.op(b"u").done()
}

fn item(key: &str, value: P) -> P {
    let mut p = P::default().str(key);
    p.0.extend(value.0);
    p
}

/// Writes a checkpoint zip: `data.pkl` and storages `(key, bytes)`, stored (the storages
/// marked as deflated if `deflated`: torch never compresses, so the reader must refuse them);
/// returns its path.
fn ckpt(name: &str, pickle: &[u8], storages: &[(&str, Vec<u8>)], deflated: bool) -> PathBuf {
    // Tests run in parallel threads: every file its own name.
    static WRITTEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = WRITTEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("dynamicrafter-ckr-{}-{n}-{name}.ckpt", std::process::id()));
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(pickle).unwrap();
    for (key, bytes) in storages {
        zip.start_file(format!("archive/data/{key}"), stored).unwrap();
        zip.write_all(bytes).unwrap();
    }
    let mut bytes = zip.finish().unwrap().into_inner();
    if deflated {
        // The method field of each storage's local header (offset 8) and central directory
        // record (offset 10), found from the name that follows them (at 30 and 46).
        let name = b"archive/data/";
        for i in 46..bytes.len() - name.len() {
            if &bytes[i..i + name.len()] == name {
                if &bytes[i - 30..i - 26] == b"PK\x03\x04" {
                    bytes[i - 22] = 8;
                }
                if &bytes[i - 46..i - 42] == b"PK\x01\x02" {
                    bytes[i - 36] = 8;
                }
            }
        }
    }
    std::fs::write(&path, bytes).unwrap();
    path
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Opens and reads every tensor; the error text if anything fails.
fn read_all(path: &Path) -> Result<Vec<(String, Tensor)>, String> {
    let ck = Checkpoint::open(path).map_err(|e| match e {
        e @ Error::Checkpoint { .. } => e.to_string(),
        e => panic!("not a checkpoint error: {e}"),
    })?;
    let keys: Vec<String> = ck.shapes().keys().map(|k| k.to_string()).collect();
    keys.into_iter().map(|k| ck.load(&k, &Device::Cpu).map(|t| (k, t)).map_err(|e| e.to_string())).collect()
}

#[test]
fn what_torch_save_writes_loads() {
    let data: Vec<f32> = (0..24).map(|i| i as f32).collect();
    let ints: Vec<u8> = [7i32, -3].iter().flat_map(|x| x.to_le_bytes()).collect();
    let items = [
        // A row-major view at an offset.
        item("plain", P::default().tensor("FloatStorage", "0", 24, 4, &[2, 3], &[3, 1])),
        // A Parameter around a tensor.
        item("param", P::default().global("torch._utils", "_rebuild_parameter").op(b"(").tensor("FloatStorage", "0", 24, 0, &[4], &[1]).op(&[0x88]).global("collections", "OrderedDict").op(b")Rt").op(b"R")),
        // A subclass wrapper, as torch 2 writes for some tensors.
        item(
            "wrapped",
            P::default()
                .global("torch._tensor", "_rebuild_from_type_v2")
                .op(b"(")
                .global("torch._utils", "_rebuild_tensor_v2")
                .global("torch", "Tensor")
                .op(b"(")
                .storage("FloatStorage", "0", 24)
                .int(0)
                .ints(&[2])
                .ints(&[1])
                .op(&[0x89])
                .global("collections", "OrderedDict")
                .op(b")R")
                .op(b"t")
                .op(b"}")
                .op(b"tR"),
        ),
        // Column-major (Fortran order): 2×3 with strides (1, 2).
        item("fortran", P::default().tensor("FloatStorage", "0", 24, 0, &[2, 3], &[1, 2])),
        item("ints", P::default().tensor("IntStorage", "1", 2, 0, &[2], &[1])),
        // Not tensors: skipped.
        item("epoch", P::default().int(3)),
        item("note", P::default().str("hello")),
    ];
    // Beside the state dict: numbers, a list, and an object of a dict subclass (Lightning's
    // hyper-parameters: NEWOBJ, its items, BUILD).
    let hparams = P::default().global("lightning.fabric.utilities.data", "AttributeDict").op(b")").op(&[0x81]).op(b"(").str("lr").int(1).op(b"u}b");
    let pickle = root(&items, true, &[item("epoch", P::default().int(9)), item("optimizer_states", P::default().op(b"](").int(1).op(&[0x8a, 0]).op(b"e")), item("hyper_parameters", hparams)]);
    let path = ckpt("good", &pickle, &[("0", f32_bytes(&data)), ("1", ints)], false);
    let got = read_all(&path);
    std::fs::remove_file(&path).unwrap();
    let got = got.unwrap_or_else(|e| panic!("{e}"));
    let get = |k: &str| got.iter().find(|(n, _)| n == k).unwrap_or_else(|| panic!("{k} missing from {:?}", got.iter().map(|g| &g.0).collect::<Vec<_>>())).1.clone();
    assert_eq!(got.len(), 5);
    assert_eq!(get("plain").to_vec2::<f32>().unwrap(), [[4., 5., 6.], [7., 8., 9.]]);
    assert_eq!(get("param").to_vec1::<f32>().unwrap(), [0., 1., 2., 3.]);
    assert_eq!(get("wrapped").to_vec1::<f32>().unwrap(), [0., 1.]);
    assert_eq!(get("fortran").to_vec2::<f32>().unwrap(), [[0., 2., 4.], [1., 3., 5.]]);
    assert_eq!(get("ints").dtype(), DType::I32);
    assert_eq!(get("ints").to_vec1::<i32>().unwrap(), [7, -3]);
}

/// Every case: a state dict whose one record is broken or hostile.
#[test]
fn hostile_records_are_clear_errors() {
    let four = f32_bytes(&[1.0; 4]);
    let tensor_args = |n: usize| -> P {
        // _rebuild_tensor_v2 with only the first n of its arguments.
        let full = [
            P::default().storage("FloatStorage", "0", 4),
            P::default().int(0),
            P::default().ints(&[4]),
            P::default().ints(&[1]),
            P::default().op(&[0x89]),
            P::default().op(b"}"),
        ];
        let mut p = P::default().global("torch._utils", "_rebuild_tensor_v2").op(b"(");
        for a in full.iter().take(n) {
            p.0.extend(&a.0);
        }
        p.op(b"tR")
    };
    let mut cases: Vec<(String, P, &str)> = Vec::new();
    for n in 0..6 {
        cases.push((format!("rebuild_tensor_v2 with {n} arguments"), tensor_args(n), "arguments"));
    }
    for n in 0..4 {
        let mut p = P::default().global("torch._tensor", "_rebuild_from_type_v2").op(b"(");
        for _ in 0..n {
            p = p.op(b"N");
        }
        cases.push((format!("rebuild_from_type_v2 with {n} arguments"), p.op(b"tR"), "argument"));
    }
    cases.push(("rebuild_parameter of nothing".into(), P::default().global("torch._utils", "_rebuild_parameter").op(b")R"), "arguments"));
    for n in [0usize, 1, 2, 3, 4, 6] {
        let mut pid = P::default().op(b"(");
        let parts = [P::default().str("storage"), P::default().global("torch", "FloatStorage"), P::default().str("0"), P::default().str("cpu"), P::default().int(4), P::default().int(4)];
        for part in parts.iter().take(n) {
            pid.0.extend(&part.0);
        }
        let p = P::default().global("torch._utils", "_rebuild_tensor_v2").op(b"(").op(&pid.op(b"tQ").0).int(0).ints(&[4]).ints(&[1]).op(&[0x89]).op(b"}tR");
        cases.push((format!("storage record of {n} fields"), p, "storage record"));
    }
    let t = |class: &str, key: &str, numel: i64, offset: i64, size: &[i64], stride: &[i64]| P::default().tensor(class, key, numel, offset, size, stride);
    cases.push(("an 8.8 TB shape on 16 bytes".into(), t("FloatStorage", "0", 4, 0, &[1 << 20, 1 << 20, 1 << 10], &[1 << 30, 1 << 10, 1]), "too large"));
    cases.push(("a shape whose size overflows 128 bits".into(), t("FloatStorage", "0", 4, 0, &[1 << 62, 1 << 62, 1 << 62], &[1, 1, 1]), "too large"));
    cases.push(("a shape past its storage".into(), t("FloatStorage", "0", 4, 0, &[5], &[1]), "needs more than"));
    cases.push(("an offset past its storage".into(), t("FloatStorage", "0", 4, 3, &[2], &[1]), "needs more than"));
    cases.push(("a negative offset".into(), t("FloatStorage", "0", 4, -1, &[2], &[1]), "offset"));
    cases.push(("a storage size that lies".into(), t("FloatStorage", "0", 1 << 40, 0, &[4], &[1]), "holds 16"));
    cases.push(("a stride of zero".into(), t("FloatStorage", "0", 4, 0, &[4], &[0]), "not a dense layout"));
    cases.push(("overlapping strides".into(), t("FloatStorage", "0", 4, 0, &[2, 2], &[1, 1]), "not a dense layout"));
    cases.push(("a gap between rows".into(), t("FloatStorage", "0", 4, 0, &[2, 1], &[3, 1]), "not a dense layout"));
    cases.push(("negative sizes".into(), t("FloatStorage", "0", 4, 0, &[-4], &[1]), "count"));
    cases.push(("a hundred dimensions".into(), t("FloatStorage", "0", 4, 0, &[1; 100], &[1; 100]), "dimensions"));
    cases.push(("sizes and strides of different lengths".into(), t("FloatStorage", "0", 4, 0, &[4], &[1, 1]), "strides"));
    cases.push(("a missing storage".into(), t("FloatStorage", "9", 4, 0, &[4], &[1]), "not in the archive"));
    cases.push(("a storage key with a path".into(), t("FloatStorage", "../0", 4, 0, &[4], &[1]), "plain name"));
    cases.push(("an unknown storage type".into(), t("QInt8Storage", "0", 16, 0, &[4], &[1]), "unsupported storage type"));
    cases.push(("a quantized tensor".into(), P::default().global("torch._utils", "_rebuild_qtensor").op(b")R"), "unsupported kind"));
    for (name, record, expect) in cases {
        refused(&name, &state_dict(&[item("w", record)]), &four, false, expect);
    }
}

/// A checkpoint of `pickle` and storage "0" (`storage`) is refused with an error naming `expect`.
fn refused(name: &str, pickle: &[u8], storage: &[u8], deflated: bool, expect: &str) {
    let path = ckpt("refused", pickle, &[("0", storage.to_vec())], deflated);
    let got = read_all(&path);
    std::fs::remove_file(&path).unwrap();
    match got {
        Ok(t) => panic!("{name}: loaded {t:?}"),
        Err(e) => assert!(e.contains(expect), "{name}: {e}"),
    }
}

#[test]
fn broken_archives_are_clear_errors() {
    let good = state_dict(&[item("w", P::default().tensor("FloatStorage", "0", 4, 0, &[4], &[1]))]);
    let four = f32_bytes(&[1.0; 4]);
    // A memo bomb: 40 doublings of a list, as the value of a key (copied values would be 2^40).
    let mut bomb = P::default().op(b"]q\x00");
    for _ in 0..40 {
        bomb = bomb.op(b"0h\x00h\x00\x86q\x00");
    }
    let bomb = state_dict(&[item("bomb", bomb), item("w", P::default().tensor("FloatStorage", "0", 4, 0, &[4], &[1]))]);
    let path = ckpt("bomb", &bomb, &[("0", four.clone())], false);
    let got = read_all(&path);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(got.unwrap().len(), 1, "the bomb is inert data beside the tensor");

    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        ("a 4 GiB string length", P::new().op(b"X\xff\xff\xff\xff").done(), false, "left"),
        ("a root that is not a dict", P::new().op(b"N").done(), false, "no tensors"),
        ("an empty state dict", P::new().op(b"}").done(), false, "no tensors"),
        ("a compressed storage", good.clone(), true, "compressed"),
    ];
    for (name, pickle, deflated, expect) in cases {
        refused(name, &pickle, &four, deflated, expect);
    }
}

/// The fixture checkpoint with bytes changed at random (a fixed seed): each mutant loads or is
/// a checkpoint error; none panics.
#[test]
fn random_byte_flips_never_panic() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-eps/model.ckpt");
    let original = std::fs::read(&path).unwrap();
    // The pickle is the first entry; most flips go there, the rest anywhere.
    let pkl_end = 200_000.min(original.len());
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let out = std::env::temp_dir().join(format!("dynamicrafter-ckr-{}-flip.ckpt", std::process::id()));
    let (mut loaded, mut refused) = (0, 0);
    for round in 0..300 {
        let mut bytes = original.clone();
        for _ in 0..1 + next() % 4 {
            let at = if round % 4 == 3 { next() as usize % bytes.len() } else { next() as usize % pkl_end };
            bytes[at] = next() as u8;
        }
        std::fs::write(&out, &bytes).unwrap();
        match read_all(&out) {
            Ok(_) => loaded += 1,
            Err(_) => refused += 1,
        }
    }
    std::fs::remove_file(&out).unwrap();
    eprintln!("{loaded} mutants loaded, {refused} refused");
    assert!(refused > 0 && loaded > 0);
}

/// `convert` of a checkpoint whose tensors are views of one storage (tied weights; or a hostile
/// file making each of many tensors a window onto the same bytes): every view is written with
/// its own values, in the dtype asked; the output, read back, equals the input read directly.
/// (The writer takes one tensor at a time: memory is that of the largest, not of them all.)
#[test]
fn views_of_one_storage_convert_each_to_its_own_values() {
    let values: Vec<f32> = (0..64).map(|i| i as f32 * 0.5 - 3.0).collect();
    let views: Vec<P> = (0..20)
        .map(|i| item(&format!("w{i}"), P::default().tensor("FloatStorage", "0", 64, i, &[4, 8], &[8, 1])))
        .chain([item("t", P::default().tensor("FloatStorage", "0", 64, 3, &[8, 4], &[1, 8]))])
        .collect();
    let input = ckpt("views", &state_dict(&views), &[("0", f32_bytes(&values))], false);
    let output = input.with_extension("safetensors");
    let converted = dynamicrafter_engine::weights::convert::convert(&input, &output, DType::BF16, None).unwrap();
    assert_eq!((converted.tensors, converted.quantized), (21, 0));
    let direct = read_all(&input).unwrap();
    let written: std::collections::HashMap<String, Tensor> = read_all(&output).unwrap().into_iter().collect();
    for (key, t) in direct {
        let w = &written[&key];
        assert_eq!(w.dtype(), DType::BF16, "{key}");
        let expected = t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = w.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!((w.dims(), got), (t.dims(), expected), "{key}");
    }
    // The output has the mode any new file gets (the umask's), not a temporary file's 0600.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let probe = input.with_extension("probe");
        std::fs::write(&probe, b"").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&output), mode(&probe));
        let _ = std::fs::remove_file(&probe);
    }
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&output);
}
