//! `torch.save` checkpoints (`model.ckpt`): a zip of stored (uncompressed) entries, one
//! `data.pkl` describing the objects, one entry per tensor storage. The pickle is read as data
//! by our bounded reader ([`super::pickle`]); the state dict's tensors are found by the records
//! `torch.save` writes for them, and every tensor's shape, strides and dtype are checked against
//! the bytes its storage holds before anything is allocated. The file is memory-mapped and each
//! tensor read straight from its range, so a hostile file can make us allocate no more than it
//! holds.

use super::pickle::{self, Id, Pickle, Value};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

/// The most a `data.pkl` may hold (a real checkpoint's is a few MB, optimizer states included).
const MAX_PICKLE_BYTES: usize = 128 << 20;
/// Dimensions of one tensor.
const MAX_RANK: usize = 16;
/// Values of one tensor (2^48: no product of its dimensions or strides can overflow).
const MAX_ELEMENTS: u128 = 1 << 48;

/// Where a tensor's bytes are and what they are.
#[derive(Debug, Clone)]
struct Entry {
    dtype: DType,
    /// The tensor's shape.
    shape: Vec<usize>,
    /// Its dimensions in the order of decreasing stride, when that is not `0, 1, 2, …`
    /// (a permuted dense layout, e.g. Fortran order): the bytes hold the permuted shape.
    order: Option<Vec<usize>>,
    /// Its bytes in the file.
    bytes: Range<usize>,
}

/// An opened `torch.save` file.
pub(crate) struct TorchFile {
    mmap: memmap2::Mmap,
    tensors: BTreeMap<String, Entry>,
}

impl TorchFile {
    /// Maps `file` and reads its state dict: the root dict's `state_dict` if it has one (a
    /// Lightning checkpoint), else the root dict itself. Errors are one line, naming the
    /// problem (the caller names the file).
    pub fn open(file: &std::fs::File) -> Result<Self, String> {
        // SAFETY: the file is mapped read-only; like every mmap user we rely on nobody
        // truncating it while we run.
        let mmap = unsafe { memmap2::Mmap::map(file) }.map_err(|e| format!("cannot map the file: {e}"))?;
        let tensors = read_tensors(&mmap)?;
        Ok(Self { mmap, tensors })
    }

    /// Names and shapes of every tensor.
    pub fn shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.tensors.iter().map(|(k, e)| (k.as_str(), e.shape.as_slice()))
    }

    /// The stored dtype of tensor `key`.
    pub fn dtype(&self, key: &str) -> Option<DType> {
        self.tensors.get(key).map(|e| e.dtype)
    }

    /// Reads tensor `key` in its stored dtype.
    pub fn load(&self, key: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let e = self.tensors.get(key).ok_or_else(|| candle_core::Error::Msg(format!("missing {key}")))?;
        let bytes = &self.mmap[e.bytes.clone()];
        match &e.order {
            None => Tensor::from_raw_buffer(bytes, e.dtype, &e.shape, dev),
            Some(order) => {
                let stored: Vec<usize> = order.iter().map(|&d| e.shape[d]).collect();
                let mut inverse = vec![0; order.len()];
                for (i, &d) in order.iter().enumerate() {
                    inverse[d] = i;
                }
                Tensor::from_raw_buffer(bytes, e.dtype, &stored, dev)?.permute(inverse)?.contiguous()
            }
        }
    }
}

/// A zip entry's data, if stored whole.
enum Stored {
    Bytes(Range<usize>),
    /// Present, but compressed or encrypted (torch never writes either): why it is unusable.
    Unusable(&'static str),
}

/// The zip's entries by name, with their data ranges checked against the file.
fn zip_entries(data: &[u8]) -> Result<HashMap<String, Stored>, String> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(data)).map_err(|e| format!("not a readable zip archive: {e}"))?;
    let mut entries = HashMap::with_capacity(zip.len());
    for i in 0..zip.len() {
        let f = zip.by_index_raw(i).map_err(|e| format!("zip entry {i}: {e}"))?;
        let name = f.name().map_err(|e| format!("zip entry {i}: {e}"))?.into_owned();
        let stored = if f.encrypted() {
            Stored::Unusable("encrypted")
        } else if f.compression() != zip::CompressionMethod::Stored || f.size() != f.compressed_size() {
            Stored::Unusable("compressed")
        } else {
            let start = f.data_start().ok_or_else(|| format!("zip entry {name}: no data offset"))?;
            let end = start.checked_add(f.size()).filter(|&end| end <= data.len() as u64).ok_or_else(|| format!("zip entry {name}: its data runs past the end of the file (truncated?)"))?;
            Stored::Bytes(start as usize..end as usize)
        };
        if entries.insert(name.clone(), stored).is_some() {
            return Err(format!("zip entry {name} appears twice"));
        }
    }
    Ok(entries)
}

fn read_tensors(data: &[u8]) -> Result<BTreeMap<String, Entry>, String> {
    let entries = zip_entries(data)?;
    let mut pickles = entries.keys().filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1);
    let (Some(pkl_name), None) = (pickles.next(), pickles.next()) else {
        return Err("not a torch.save checkpoint: it needs exactly one <name>/data.pkl".into());
    };
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    if entries.contains_key(&format!("{prefix}constants.pkl")) {
        return Err("a TorchScript archive, not a torch.save checkpoint".into());
    }
    if let Some(Stored::Bytes(r)) = entries.get(&format!("{prefix}byteorder")) {
        if &data[r.clone()] != b"little" {
            return Err("big-endian tensors are not supported".into());
        }
    }
    let pkl = match &entries[pkl_name] {
        Stored::Bytes(r) if r.len() <= MAX_PICKLE_BYTES => &data[r.clone()],
        Stored::Bytes(r) => return Err(format!("data.pkl holds {} bytes, more than the {MAX_PICKLE_BYTES} allowed", r.len())),
        Stored::Unusable(why) => return Err(format!("data.pkl is {why}")),
    };
    let pickle = pickle::parse(pkl).map_err(|e| format!("data.pkl: {e}"))?;
    let Value::Dict { items: root, .. } = pickle.get(pickle.root) else {
        return Err(format!("no tensors found in the pickle: its root is {}, not a dict (is this a model.ckpt?)", pickle.kind(pickle.root)));
    };
    let state = root.iter().find(|(k, v)| pickle.str(*k) == Some("state_dict") && matches!(pickle.get(*v), Value::Dict { .. }));
    let items = match state.map(|(_, v)| pickle.get(*v)) {
        Some(Value::Dict { items, .. }) => items,
        _ => root,
    };
    let reader = Tensors { pickle: &pickle, entries: &entries, prefix: &prefix, storages: HashMap::new() };
    reader.read(items)
}

/// Reads the tensor records of one state dict.
struct Tensors<'p, 'a> {
    pickle: &'p Pickle<'a>,
    entries: &'p HashMap<String, Stored>,
    prefix: &'p str,
    /// Storage key → (dtype, elements), for storages several tensors share.
    storages: HashMap<&'a str, (DType, usize)>,
}

impl<'a> Tensors<'_, 'a> {
    fn read(mut self, items: &[(Id, Id)]) -> Result<BTreeMap<String, Entry>, String> {
        let mut tensors = BTreeMap::new();
        for &(k, v) in items {
            let Some(key) = self.pickle.str(k) else { continue };
            let Some(entry) = self.tensor(v, 0).map_err(|e| format!("tensor {key}: {e}"))? else { continue };
            if tensors.insert(key.to_string(), entry).is_some() {
                return Err(format!("tensor {key} appears twice"));
            }
        }
        if tensors.is_empty() {
            return Err("no tensors found in the pickle (is this a model.ckpt?)".into());
        }
        Ok(tensors)
    }

    /// The tensor `id` describes; `None` if it is not a tensor record at all.
    fn tensor(&mut self, id: Id, depth: usize) -> Result<Option<Entry>, String> {
        let p = self.pickle;
        let Value::Call { func, args, .. } = p.get(id) else { return Ok(None) };
        let Some((module, name)) = p.global(*func) else { return Ok(None) };
        let Some(args) = p.tuple(*args) else { return Ok(None) };
        self.apply(module, name, args, depth)
    }

    /// `module.name(*args)`, if that makes a tensor.
    fn apply(&mut self, module: &[u8], name: &[u8], args: &[Id], depth: usize) -> Result<Option<Entry>, String> {
        if depth > 4 {
            return Err("tensor records nested too deep".into());
        }
        let p = self.pickle;
        match (module, name) {
            (b"torch._utils", b"_rebuild_tensor_v2") => match args {
                [storage, offset, size, stride, _, _] | [storage, offset, size, stride, _, _, _] => self.rebuild(*storage, *offset, *size, *stride).map(Some),
                _ => Err(format!("_rebuild_tensor_v2 takes 6 or 7 arguments, got {}", args.len())),
            },
            (b"torch._utils", b"_rebuild_tensor") => match args {
                [storage, offset, size, stride] => self.rebuild(*storage, *offset, *size, *stride).map(Some),
                _ => Err(format!("_rebuild_tensor takes 4 arguments, got {}", args.len())),
            },
            (b"torch._utils", b"_rebuild_parameter" | b"_rebuild_parameter_with_state") => match args {
                [data, _, _] | [data, _, _, _] => match self.tensor(*data, depth + 1)? {
                    Some(entry) => Ok(Some(entry)),
                    None => Err("a parameter whose data is not a tensor".into()),
                },
                _ => Err(format!("_rebuild_parameter takes 3 or 4 arguments, got {}", args.len())),
            },
            // (func, new_type, args, state): the tensor is func(*args), then given a subclass.
            (b"torch._tensor" | b"torch.tensor", b"_rebuild_from_type_v2") => match args {
                [func, _, inner, _] => {
                    let (module, name) = p.global(*func).ok_or("_rebuild_from_type_v2 of something that is not a function")?;
                    let inner = p.tuple(*inner).ok_or("_rebuild_from_type_v2's arguments are not a tuple")?;
                    match self.apply(module, name, inner, depth + 1)? {
                        Some(entry) => Ok(Some(entry)),
                        None => Err("_rebuild_from_type_v2 of something that is not a tensor".into()),
                    }
                }
                _ => Err(format!("_rebuild_from_type_v2 takes 4 arguments, got {}", args.len())),
            },
            (m, n) if m.starts_with(b"torch") && n.starts_with(b"_rebuild") => {
                Err(format!("unsupported kind of tensor ({}.{})", String::from_utf8_lossy(m), String::from_utf8_lossy(n)))
            }
            _ => Ok(None),
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, …)`: the view of `storage` (a
    /// persistent id `('storage', torch.XStorage, key, location, elements)`) at element
    /// `offset` with `size` and `stride`, checked against the storage's entry.
    fn rebuild(&mut self, storage: Id, offset: Id, size: Id, stride: Id) -> Result<Entry, String> {
        let p = self.pickle;
        let Value::Persistent(pid) = p.get(storage) else { return Err(format!("its storage is {}, not a storage record", p.kind(storage))) };
        let [kind, class, key, _location, numel] = p.tuple(*pid).ok_or("its storage record is not a tuple")? else {
            return Err("its storage record is not ('storage', type, key, location, size)".into());
        };
        if p.str(*kind) != Some("storage") {
            return Err("its storage record is not ('storage', …)".into());
        }
        let (dtype, bytes_per) = match p.global(*class) {
            Some((b"torch", class)) => storage_dtype(class).ok_or_else(|| format!("unsupported storage type torch.{}", String::from_utf8_lossy(class)))?,
            _ => return Err("its storage type is not a torch storage class".into()),
        };
        let key = p.str(*key).filter(|k| !k.is_empty() && k.len() <= 64 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))).ok_or("its storage key is not a plain name")?;
        let numel = p.int(*numel).and_then(|n| usize::try_from(n).ok()).ok_or("its storage size is not a count")?;
        let entry_name = format!("{}data/{key}", self.prefix);
        let range = match self.entries.get(&entry_name) {
            Some(Stored::Bytes(r)) => r.clone(),
            Some(Stored::Unusable(why)) => return Err(format!("its storage {entry_name} is {why}")),
            None => return Err(format!("its storage {entry_name} is not in the archive")),
        };
        if numel.checked_mul(bytes_per) != Some(range.len()) {
            return Err(format!("its storage is declared as {numel} × {bytes_per} bytes but {entry_name} holds {}", range.len()));
        }
        match self.storages.insert(key, (dtype, numel)) {
            Some(seen) if seen != (dtype, numel) => return Err(format!("storage {key} is declared twice, differently")),
            _ => {}
        }

        let dims = |id: Id, what: &str| -> Result<Vec<usize>, String> {
            let items = p.tuple(id).ok_or_else(|| format!("its {what} is not a tuple"))?;
            if items.len() > MAX_RANK {
                return Err(format!("{} dimensions (at most {MAX_RANK})", items.len()));
            }
            items.iter().map(|&d| p.int(d).and_then(|d| usize::try_from(d).ok()).ok_or_else(|| format!("its {what} holds something that is not a count"))).collect()
        };
        let (shape, strides) = (dims(size, "size")?, dims(stride, "stride")?);
        if shape.len() != strides.len() {
            return Err(format!("{} sizes but {} strides", shape.len(), strides.len()));
        }
        let offset = p.int(offset).and_then(|o| usize::try_from(o).ok()).ok_or("its offset is not a count")?;
        let nonzero = shape.iter().filter(|&&d| d > 0).try_fold(1u128, |n, &d| n.checked_mul(d as u128));
        if nonzero.is_none_or(|n| n > MAX_ELEMENTS) {
            return Err(format!("shape {shape:?} is too large"));
        }
        let elements: usize = shape.iter().product();
        if offset.checked_add(elements).is_none_or(|end| end > numel) {
            return Err(format!("shape {shape:?} at offset {offset} needs more than the {numel} values of its storage"));
        }
        let order = dense_order(&shape, &strides).ok_or_else(|| format!("shape {shape:?} with strides {strides:?} is not a dense layout"))?;
        let start = range.start + offset * bytes_per;
        Ok(Entry { dtype, shape, order, bytes: start..start + elements * bytes_per })
    }
}

/// candle's dtype and the element size of a `torch.<class>`.
fn storage_dtype(class: &[u8]) -> Option<(DType, usize)> {
    Some(match class {
        b"FloatStorage" => (DType::F32, 4),
        b"DoubleStorage" => (DType::F64, 8),
        b"HalfStorage" => (DType::F16, 2),
        b"BFloat16Storage" => (DType::BF16, 2),
        b"LongStorage" => (DType::I64, 8),
        b"IntStorage" => (DType::I32, 4),
        b"ShortStorage" => (DType::I16, 2),
        b"ByteStorage" | b"BoolStorage" => (DType::U8, 1),
        _ => return None,
    })
}

/// The order of a dense layout (every element once, no gaps): `Some(None)` for row-major,
/// `Some(Some(order))` for a permuted one (the dimensions by decreasing stride; dimensions of
/// size one, whose stride does not matter, first), `None` when it is not dense.
fn dense_order(shape: &[usize], strides: &[usize]) -> Option<Option<Vec<usize>>> {
    if shape.contains(&0) {
        return Some(None);
    }
    let (ones, mut rest): (Vec<usize>, Vec<usize>) = (0..shape.len()).partition(|&d| shape[d] == 1);
    rest.sort_by_key(|&d| std::cmp::Reverse(strides[d]));
    let mut expected = 1usize;
    for &d in rest.iter().rev() {
        if strides[d] != expected {
            return None;
        }
        expected = expected.checked_mul(shape[d])?;
    }
    if rest.windows(2).all(|w| w[0] < w[1]) {
        return Some(None);
    }
    Some(Some(ones.into_iter().chain(rest).collect()))
}
