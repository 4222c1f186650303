//! A bounded reader of Python pickles as `torch.save` writes them: the opcodes of protocols 2–4
//! that plain data needs (the set PyTorch's own weights-only unpickler accepts), run as a
//! small stack machine over the bytes. Nothing is imported, called or constructed: a `GLOBAL`
//! is a name, a `REDUCE` a record of which name was applied to which arguments.
//!
//! Untrusted input cannot make it allocate more than a fixed multiple of its own length:
//! values live in one flat arena addressed by index (the memo and `BINGET` copy an index, never a
//! value, so a "billion laughs" pickle stays small), strings are slices of the input, every
//! length is checked against the bytes left before it is used, and the counts of values, stack
//! entries, memo entries and open marks are capped. No recursion anywhere.

use std::collections::HashMap;

/// A value's index in the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Id(u32);

/// One value of the pickle.
#[derive(Debug)]
pub(crate) enum Value<'a> {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too wide for `i64` (kept opaque: a checkpoint's tensors never need one).
    BigInt,
    Float,
    /// A `str`, as its UTF-8 bytes (checked only where a name is read).
    Str(&'a [u8]),
    Bytes,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Set(Vec<Id>),
    /// A `dict` (or an `OrderedDict`/`defaultdict`, which pickle as a call): its items, and
    /// the state a `BUILD` gave it (a state dict's `_metadata`), kept apart from the items.
    Dict { items: Vec<(Id, Id)>, state: Option<Id> },
    /// `module.name`, never resolved.
    Global { module: &'a [u8], name: &'a [u8] },
    /// `func(*args)` (`REDUCE`, `NEWOBJ`), never called; `state` from a later `BUILD`, `items`
    /// from `APPEND`s, `SETITEMS` (keys and values in turn) or `ADDITEMS` onto it.
    Call { func: Id, args: Id, state: Option<Id>, items: Vec<Id> },
    /// A persistent id (`BINPERSID`): in `torch.save` files, a tensor storage's record.
    Persistent(Id),
}

/// Caps on what a pickle may make (the real checkpoints' `data.pkl` are a few MB with a few
/// hundred thousand values; these leave two orders of magnitude of room).
pub(crate) struct Limits {
    /// Values in the arena, and entries on the stack.
    pub values: usize,
    /// Memo entries.
    pub memo: usize,
    /// Open `MARK`s at once.
    pub marks: usize,
}

pub(crate) const LIMITS: Limits = Limits { values: 8 << 20, memo: 8 << 20, marks: 1024 };

/// What went wrong, with the byte offset of the opcode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PickleError {
    pub at: usize,
    pub what: String,
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pickle byte {}: {}", self.at, self.what)
    }
}

/// A parsed pickle: the arena and its root value.
#[derive(Debug)]
pub(crate) struct Pickle<'a> {
    values: Vec<Value<'a>>,
    pub root: Id,
}

impl<'a> Pickle<'a> {
    pub fn get(&self, id: Id) -> &Value<'a> {
        // Ids are only made by `Machine::add`, so they are in range.
        &self.values[id.0 as usize]
    }

    /// The items of a tuple at `id`, if it is one.
    pub fn tuple(&self, id: Id) -> Option<&[Id]> {
        match self.get(id) {
            Value::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// The text of a `str` at `id`, if it is valid UTF-8.
    pub fn str(&self, id: Id) -> Option<&'a str> {
        match self.get(id) {
            Value::Str(bytes) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    }

    pub fn int(&self, id: Id) -> Option<i64> {
        match self.get(id) {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// `(module, name)` of a global at `id`.
    pub fn global(&self, id: Id) -> Option<(&'a [u8], &'a [u8])> {
        match self.get(id) {
            Value::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// What kind of value `id` is, for error messages.
    pub fn kind(&self, id: Id) -> &'static str {
        match self.get(id) {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) | Value::BigInt => "an int",
            Value::Float => "a float",
            Value::Str(_) => "a str",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Set(_) => "a set",
            Value::Dict { .. } => "a dict",
            Value::Global { .. } => "a global",
            Value::Call { .. } => "an object",
            Value::Persistent(_) => "a persistent id",
        }
    }
}

/// Parses `data` (one whole pickle, nothing after its `STOP`).
pub(crate) fn parse(data: &[u8]) -> Result<Pickle<'_>, PickleError> {
    parse_with(data, &LIMITS)
}

pub(crate) fn parse_with<'a>(data: &'a [u8], limits: &Limits) -> Result<Pickle<'a>, PickleError> {
    let mut m = Machine { data, pos: 0, at: 0, values: Vec::new(), stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), limits };
    let root = m.run()?;
    if m.pos != data.len() {
        return Err(m.err(format!("{} bytes after the end of the pickle", data.len() - m.pos)));
    }
    Ok(Pickle { values: m.values, root })
}

struct Machine<'a, 'l> {
    data: &'a [u8],
    /// The next byte to read.
    pos: usize,
    /// Where the current opcode started.
    at: usize,
    values: Vec<Value<'a>>,
    stack: Vec<Id>,
    /// Stack lengths at each open `MARK`.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    limits: &'l Limits,
}

impl<'a> Machine<'a, '_> {
    fn err(&self, what: impl Into<String>) -> PickleError {
        PickleError { at: self.at, what: what.into() }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(self.err(format!("needs {n} bytes, {left} left (truncated, or a length that lies)")));
        }
        let data = self.data;
        self.pos += n;
        Ok(&data[self.pos - n..self.pos])
    }

    fn byte(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PickleError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, PickleError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A length field, as a `usize` no larger than the bytes left (checked again by `take`).
    fn length(&mut self, n: u64) -> Result<usize, PickleError> {
        usize::try_from(n).ok().filter(|&n| n <= self.data.len() - self.pos).ok_or_else(|| {
            self.err(format!("a length of {n} bytes, more than the {} left", self.data.len() - self.pos))
        })
    }

    /// A `GLOBAL` argument: printable ASCII up to a newline, at most 256 bytes.
    fn line(&mut self) -> Result<&'a [u8], PickleError> {
        let data = self.data;
        let rest = &data[self.pos..];
        let end = rest.iter().take(257).position(|&b| b == b'\n').ok_or_else(|| self.err("a global's name is not a line of at most 256 bytes"))?;
        let line = &rest[..end];
        if !line.iter().all(|b| b.is_ascii_graphic()) {
            return Err(self.err("a global's name is not printable ASCII"));
        }
        self.pos += end + 1;
        Ok(line)
    }

    fn add(&mut self, v: Value<'a>) -> Result<Id, PickleError> {
        if self.values.len() >= self.limits.values {
            return Err(self.err(format!("more than {} values", self.limits.values)));
        }
        self.values.push(v);
        Ok(Id(self.values.len() as u32 - 1))
    }

    fn push(&mut self, id: Id) -> Result<(), PickleError> {
        if self.stack.len() >= self.limits.values {
            return Err(self.err(format!("more than {} stack entries", self.limits.values)));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push_new(&mut self, v: Value<'a>) -> Result<(), PickleError> {
        let id = self.add(v)?;
        self.push(id)
    }

    /// The stack's bottom for the current opcode: nothing below the innermost mark is its.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Id, PickleError> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("pops an empty stack"));
        }
        self.stack.pop().ok_or_else(|| self.err("pops an empty stack"))
    }

    fn top(&self) -> Result<Id, PickleError> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("reads an empty stack"));
        }
        self.stack.last().copied().ok_or_else(|| self.err("reads an empty stack"))
    }

    /// Everything above the innermost mark, which is closed.
    fn pop_mark(&mut self) -> Result<Vec<Id>, PickleError> {
        let mark = self.marks.pop().ok_or_else(|| self.err("no MARK to pop to"))?;
        Ok(self.stack.split_off(mark))
    }

    fn memo_get(&mut self, key: u32) -> Result<(), PickleError> {
        let id = *self.memo.get(&key).ok_or_else(|| self.err(format!("memo entry {key} was never set")))?;
        self.push(id)
    }

    fn memo_put(&mut self, key: u32) -> Result<(), PickleError> {
        let id = self.top()?;
        if self.memo.len() >= self.limits.memo && !self.memo.contains_key(&key) {
            return Err(self.err(format!("more than {} memo entries", self.limits.memo)));
        }
        self.memo.insert(key, id);
        Ok(())
    }

    fn value_mut(&mut self, id: Id) -> &mut Value<'a> {
        &mut self.values[id.0 as usize]
    }

    /// Appends `items` to the list (or object) at the top of the stack.
    fn append(&mut self, items: Vec<Id>) -> Result<(), PickleError> {
        let target = self.top()?;
        match self.value_mut(target) {
            Value::List(list) | Value::Call { items: list, .. } => {
                list.extend(items);
                Ok(())
            }
            _ => Err(self.err("APPEND onto something that is not a list")),
        }
    }

    fn set_items(&mut self, pairs: Vec<Id>) -> Result<(), PickleError> {
        if !pairs.len().is_multiple_of(2) {
            return Err(self.err("SETITEMS with an odd number of values"));
        }
        let target = self.top()?;
        match self.value_mut(target) {
            Value::Dict { items, .. } => {
                items.extend(pairs.chunks_exact(2).map(|kv| (kv[0], kv[1])));
                Ok(())
            }
            // An object of a dict subclass (NEWOBJ, then its items): kept as values only.
            Value::Call { items, .. } => {
                items.extend(pairs);
                Ok(())
            }
            _ => Err(self.err("SETITEM into something that is neither a dict nor an object")),
        }
    }

    fn run(&mut self) -> Result<Id, PickleError> {
        loop {
            self.at = self.pos;
            let op = self.byte()?;
            match op {
                // PROTO
                0x80 => {
                    let version = self.byte()?;
                    if !(2..=4).contains(&version) {
                        return Err(self.err(format!("pickle protocol {version} (expected 2 to 4)")));
                    }
                }
                // FRAME: a length hint only.
                0x95 => {
                    let n = self.u64()?;
                    self.length(n)?;
                }
                b'.' => {
                    let root = self.pop()?;
                    if !self.stack.is_empty() || !self.marks.is_empty() {
                        return Err(self.err("STOP with values or marks left over"));
                    }
                    return Ok(root);
                }
                b'(' => {
                    if self.marks.len() >= self.limits.marks {
                        return Err(self.err(format!("more than {} nested MARKs", self.limits.marks)));
                    }
                    self.marks.push(self.stack.len());
                }
                b')' => self.push_new(Value::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_new(Value::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < self.floor() + n {
                        return Err(self.err(format!("TUPLE{n} with fewer than {n} values")));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push_new(Value::Tuple(items))?;
                }
                b']' => self.push_new(Value::List(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_new(Value::List(items))?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'}' => self.push_new(Value::Dict { items: Vec::new(), state: None })?,
                b'd' => {
                    let pairs = self.pop_mark()?;
                    self.push_new(Value::Dict { items: Vec::new(), state: None })?;
                    self.set_items(pairs)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let pairs = self.pop_mark()?;
                    self.set_items(pairs)?;
                }
                0x8f => self.push_new(Value::Set(Vec::new()))?,
                // ADDITEMS
                0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    match self.value_mut(target) {
                        Value::Set(set) | Value::Call { items: set, .. } => set.extend(items),
                        _ => return Err(self.err("ADDITEMS into something that is neither a set nor an object")),
                    }
                }
                // FROZENSET
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push_new(Value::Set(items))?;
                }
                b'N' => self.push_new(Value::None)?,
                0x88 => self.push_new(Value::Bool(true))?,
                0x89 => self.push_new(Value::Bool(false))?,
                b'K' => {
                    let v = self.byte()? as i64;
                    self.push_new(Value::Int(v))?;
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.push_new(Value::Int(v))?;
                }
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push_new(Value::Int(v))?;
                }
                // LONG1, LONG4: little-endian two's complement.
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.byte()? as u64 } else { self.u32()? as u64 };
                    let n = self.length(n)?;
                    let bytes = self.take(n)?;
                    let v = match bytes.len() {
                        0 => Value::Int(0),
                        1..=8 => {
                            let mut a = [if bytes[bytes.len() - 1] & 0x80 != 0 { 0xff } else { 0 }; 8];
                            a[..bytes.len()].copy_from_slice(bytes);
                            Value::Int(i64::from_le_bytes(a))
                        }
                        _ => Value::BigInt,
                    };
                    self.push_new(v)?;
                }
                // BINFLOAT: eight bytes (a float's value is never needed).
                b'G' => {
                    self.take(8)?;
                    self.push_new(Value::Float)?;
                }
                // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
                0x8c | b'X' | 0x8d => {
                    let n = match op {
                        0x8c => self.byte()? as u64,
                        b'X' => self.u32()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.length(n)?;
                    let s = self.take(n)?;
                    self.push_new(Value::Str(s))?;
                }
                // SHORT_BINBYTES, BINBYTES, BINBYTES8, SHORT_BINSTRING, BINSTRING
                b'C' | b'B' | 0x8e | b'U' | b'T' => {
                    let n = match op {
                        b'C' | b'U' => self.byte()? as u64,
                        b'B' | b'T' => self.u32()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.length(n)?;
                    self.take(n)?;
                    self.push_new(Value::Bytes)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push_new(Value::Global { module, name })?;
                }
                // STACK_GLOBAL
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&self.values[module.0 as usize], &self.values[name.0 as usize]) else {
                        return Err(self.err("STACK_GLOBAL of values that are not strings"));
                    };
                    let (module, name) = (*module, *name);
                    self.push_new(Value::Global { module, name })?;
                }
                // REDUCE, NEWOBJ
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    if !matches!(self.values[args.0 as usize], Value::Tuple(_)) {
                        return Err(self.err("a call's arguments are not a tuple"));
                    }
                    let is_dict = matches!(self.values[func.0 as usize], Value::Global { module: b"collections", name: b"OrderedDict" | b"defaultdict" });
                    let v = if is_dict { Value::Dict { items: Vec::new(), state: None } } else { Value::Call { func, args, state: None, items: Vec::new() } };
                    self.push_new(v)?;
                }
                // NEWOBJ_EX
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let func = self.pop()?;
                    self.push_new(Value::Call { func, args, state: None, items: Vec::new() })?;
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    match self.value_mut(target) {
                        Value::Dict { state: s, .. } | Value::Call { state: s, .. } => *s = Some(state),
                        _ => return Err(self.err("BUILD on something that is neither a dict nor an object")),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.push_new(Value::Persistent(pid))?;
                }
                b'h' => {
                    let key = self.byte()? as u32;
                    self.memo_get(key)?;
                }
                b'j' => {
                    let key = self.u32()?;
                    self.memo_get(key)?;
                }
                b'q' => {
                    let key = self.byte()? as u32;
                    self.memo_put(key)?;
                }
                b'r' => {
                    let key = self.u32()?;
                    self.memo_put(key)?;
                }
                // MEMOIZE
                0x94 => {
                    let key = u32::try_from(self.memo.len()).map_err(|_| self.err("memo full"))?;
                    self.memo_put(key)?;
                }
                b'0' => {
                    // Python's POP also closes a mark with nothing above it.
                    if self.stack.len() == self.floor() && !self.marks.is_empty() {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.push(top)?;
                }
                other => return Err(self.err(format!("unsupported pickle opcode 0x{other:02x}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_state_dict_shaped_pickle() {
        // {'a': (1, -2, 3.5, 'x', True, None)} with a memo round trip, protocol 2.
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'a'];
        p.extend([b'(', b'K', 1, b'J']);
        p.extend((-2i32).to_le_bytes());
        p.push(b'G');
        p.extend(3.5f64.to_be_bytes());
        // A memo read and a POP before STOP leave the dict as the root.
        p.extend([b'X', 1, 0, 0, 0, b'x', 0x88, b'N', b't', b'u', b'h', 0, b'0', b'.']);
        let pk = parse(&p).unwrap();
        let Value::Dict { items, .. } = pk.get(pk.root) else { panic!("root is {}", pk.kind(pk.root)) };
        assert_eq!(items.len(), 1);
        assert_eq!(pk.str(items[0].0), Some("a"));
        let t = pk.tuple(items[0].1).unwrap();
        assert_eq!((pk.int(t[0]), pk.int(t[1])), (Some(1), Some(-2)));
        assert!(matches!(pk.get(t[2]), Value::Float));
        assert_eq!(pk.str(t[3]), Some("x"));
    }

    #[test]
    fn long1_is_sign_extended() {
        for (bytes, want) in [(vec![0xff], -1i64), (vec![0x00, 0x80], -32768), (vec![0x01, 0x02], 0x0201), (vec![], 0)] {
            let mut p = vec![0x80, 2, 0x8a, bytes.len() as u8];
            p.extend(&bytes);
            p.push(b'.');
            let pk = parse(&p).unwrap();
            assert_eq!(pk.int(pk.root), Some(want), "{bytes:?}");
        }
    }

    /// The memo holds indices: 40 rounds of "a tuple of the previous value twice" stay 40
    /// values, where copying values would need 2^40.
    #[test]
    fn a_billion_laughs_stays_small() {
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..40 {
            p.extend([b'0', b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        let pk = parse(&p).unwrap();
        assert!(pk.values.len() < 100, "{} values", pk.values.len());
    }

    #[test]
    fn hostile_pickles_are_errors_not_panics() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("no STOP", vec![0x80, 2, b'N']),
            ("4 GiB string", vec![0x80, 2, b'X', 0xff, 0xff, 0xff, 0xff, b'a', b'.']),
            ("BINUNICODE8 past the end", vec![0x80, 4, 0x8d, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, b'.']),
            ("LONG4 negative length", vec![0x80, 2, 0x8b, 0xff, 0xff, 0xff, 0xff, b'.']),
            ("pop empty", vec![0x80, 2, b'0', b'.']),
            ("TUPLE3 of one", vec![0x80, 2, b'N', 0x87, b'.']),
            ("TUPLE2 across a mark", vec![0x80, 2, b'N', b'(', b'N', 0x86, b't', b'.']),
            ("unset memo", vec![0x80, 2, b'h', 7, b'.']),
            ("huge memo key", vec![0x80, 2, b'j', 0xff, 0xff, 0xff, 0xff, b'.']),
            ("REDUCE without a tuple", vec![0x80, 2, b'N', b'N', b'R', b'.']),
            ("SETITEM into a list", vec![0x80, 2, b']', b'N', b'N', b's', b'.']),
            ("odd SETITEMS", vec![0x80, 2, b'}', b'(', b'N', b'u', b'.']),
            ("APPEND into a dict", vec![0x80, 2, b'}', b'N', b'a', b'.']),
            ("BUILD on an int", vec![0x80, 2, b'K', 1, b'N', b'b', b'.']),
            ("GLOBAL without newline", [vec![0x80, 2, b'c'], vec![b'a'; 300]].concat()),
            ("GLOBAL with a control byte", vec![0x80, 2, b'c', b'a', 0x01, b'\n', b'b', b'\n', b'.']),
            ("INST (code execution in protocol 0)", vec![0x80, 2, b'(', b'i', b'o', b's', b'\n', b's', b'y', b's', b't', b'e', b'm', b'\n', b'.']),
            ("protocol 5", vec![0x80, 5, b'N', b'.']),
            ("trailing bytes", vec![0x80, 2, b'N', b'.', b'N']),
            ("STOP with leftovers", vec![0x80, 2, b'N', b'N', b'.']),
            ("unclosed mark", vec![0x80, 2, b'(', b'N', b'.']),
        ];
        for (name, bytes) in cases {
            assert!(parse(&bytes).is_err(), "{name}: parsed");
        }
        // Marks nest at most LIMITS.marks deep.
        let deep = [vec![0x80, 2], vec![b'('; 2000], vec![b'.']].concat();
        assert!(parse(&deep).unwrap_err().what.contains("nested MARKs"));
        // A small cap on values is honoured.
        let many = [vec![0x80, 2, b'('], vec![b'N'; 100], vec![b't', b'.']].concat();
        let small = Limits { values: 50, memo: 50, marks: 8 };
        assert!(parse_with(&many, &small).unwrap_err().what.contains("more than 50 values"));
    }

    /// Every prefix and every single-byte change of a valid pickle parses or fails cleanly.
    #[test]
    fn truncations_and_byte_flips_never_panic() {
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'k', b'c'];
        p.extend(b"torch._utils\n_rebuild_tensor_v2\n");
        p.extend([b'(', b'X', 7, 0, 0, 0]);
        p.extend(b"storage");
        p.extend([b'K', 0, 0x86, b'Q', b'K', 0, b'K', 4, 0x85, b'K', 1, 0x85, 0x89, b'}', b't', b'R', b'u', b'.']);
        parse(&p).unwrap();
        for n in 0..p.len() {
            let _ = parse(&p[..n]);
        }
        for i in 0..p.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff, b'(', b'.', b't'] {
                let mut q = p.clone();
                q[i] = v;
                let _ = parse(&q);
            }
        }
    }
}
