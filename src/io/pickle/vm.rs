//! A pickle machine for `torch.save`'s `data.pkl` that builds values and never calls anything.
//!
//! Values live in one arena ([`Pickle::nodes`]) and refer to each other by index, as Python's own
//! unpickler shares objects: a memo lookup (`BINGET`) pushes the index again instead of copying the
//! value, so a "billion laughs" pickle stays as small as its bytes; nothing is recursive (parsing,
//! walking or dropping), so a value nested a million levels deep cannot overflow the stack.
//!
//! Every global a pickle names is checked when its `GLOBAL` / `STACK_GLOBAL` opcode is read, before
//! anything is built: a name outside [`ALLOWED_GLOBALS`] refuses the whole file, wherever it stands
//! (inside the state dict, beside it, or left on the stack below the root). `REDUCE`, `NEWOBJ` and
//! `BUILD` only apply to an allowed global (or to what one built) and are recorded, never run. The
//! opcodes are those `torch.save` (protocol 2) and common pickles use; any other is refused by name.
//! Every length is checked against the bytes left, nesting is limited to [`MAX_DEPTH`] levels and
//! the values built (plus memo entries) to [`MAX_OBJECTS`].

use std::borrow::Cow;
use std::collections::HashMap;

use candle_core::DType;

/// The deepest nesting of containers (and of open `MARK`s) a pickle may have.
pub const MAX_DEPTH: usize = 1000;

/// The most objects (values built plus memo entries) one pickle may create. Each opcode builds at
/// most one, so a pickle's objects are also bounded by its length; a state dict of 10 000 tensors
/// builds about 150 000.
pub const MAX_OBJECTS: usize = 1 << 23;

/// The highest tensor rank accepted (torch's own limit is 64 dimensions).
pub const MAX_RANK: usize = 64;

/// Longest `GLOBAL` module or name line.
const MAX_LINE: usize = 1024;

/// How many wrappers (`_rebuild_parameter`, `_rebuild_from_type_v2`) may stand around a tensor.
const MAX_WRAPPERS: usize = 8;

/// Index of a value in [`Pickle::nodes`].
pub(super) type Id = u32;

/// What an allowed global is, for reading tensors out of the values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    OrderedDict,
    /// `_rebuild_tensor_v2(storage, offset, size, stride, ...)` and the older `_rebuild_tensor`.
    RebuildTensor,
    /// `_rebuild_parameter(tensor, requires_grad, backward_hooks)`.
    RebuildParameter,
    /// `_rebuild_from_type_v2(func, new_type, args, state)`: `func(*args)`.
    RebuildFromType,
    /// A storage type, with the dtype of its elements (`None`: one candle has no dtype for).
    Storage(Option<DType>),
    /// A class named only as an argument (`torch.Tensor` as `_rebuild_from_type_v2`'s new type).
    Class,
}

/// The globals a tensor state dict may name: tensor rebuilders, storage types, the tensor classes and
/// OrderedDict. Any other refuses the file.
pub const ALLOWED_GLOBALS: [(&str, &str); 18] = [
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "FloatStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "ByteStorage"),
    ("torch", "CharStorage"),
    ("torch", "ShortStorage"),
    ("torch", "IntStorage"),
    ("torch", "LongStorage"),
    ("torch", "BoolStorage"),
    ("torch", "UntypedStorage"),
];

/// The [`Kind`] of `ALLOWED_GLOBALS[index]`.
fn kind_of(index: usize) -> Kind {
    match ALLOWED_GLOBALS.get(index).map(|&(_, name)| name) {
        Some("OrderedDict") => Kind::OrderedDict,
        Some("_rebuild_tensor_v2" | "_rebuild_tensor") => Kind::RebuildTensor,
        Some("_rebuild_parameter") => Kind::RebuildParameter,
        Some("_rebuild_from_type_v2") => Kind::RebuildFromType,
        Some("FloatStorage") => Kind::Storage(Some(DType::F32)),
        Some("DoubleStorage") => Kind::Storage(Some(DType::F64)),
        Some("HalfStorage") => Kind::Storage(Some(DType::F16)),
        Some("BFloat16Storage") => Kind::Storage(Some(DType::BF16)),
        // torch reads an untyped storage as bytes.
        Some("ByteStorage" | "UntypedStorage") => Kind::Storage(Some(DType::U8)),
        Some("ShortStorage") => Kind::Storage(Some(DType::I16)),
        Some("IntStorage") => Kind::Storage(Some(DType::I32)),
        Some("LongStorage") => Kind::Storage(Some(DType::I64)),
        Some("CharStorage" | "BoolStorage") => Kind::Storage(None),
        _ => Kind::Class,
    }
}

/// `module.name` of an allowed global.
fn global_name(index: u16) -> String {
    match ALLOWED_GLOBALS.get(usize::from(index)) {
        Some((module, name)) => format!("{module}.{name}"),
        None => "?".into(),
    }
}

/// One value the pickle built. Containers hold indices, never values, so dropping is flat.
#[derive(Debug)]
pub(super) enum Value {
    None,
    /// True or False: no tensor needs which.
    Bool,
    Int(i64),
    /// An integer that does not fit 64 bits (never a valid shape, offset or count).
    BigInt,
    /// A float: no tensor needs its value.
    Float,
    Str(Box<str>),
    /// A bytes object: no tensor needs its content.
    Bytes,
    Tuple(Box<[Id]>),
    List(Vec<Id>),
    /// Items in insertion order; `instance` when built by calling `OrderedDict` (so `BUILD` may set
    /// its attributes, as on any instance).
    Dict {
        items: Vec<(Id, Id)>,
        instance: bool,
    },
    /// An entry of [`ALLOWED_GLOBALS`].
    Global(u16),
    /// An allowed global applied to a tuple of arguments (`REDUCE`, `NEWOBJ`): recorded, never run.
    Call {
        global: u16,
        args: Id,
    },
    /// A `BINPERSID` reference (torch: a storage).
    Persistent(Id),
}

impl Value {
    fn describe(&self) -> Cow<'static, str> {
        match self {
            Value::None => "None".into(),
            Value::Bool => "a bool".into(),
            Value::Int(_) | Value::BigInt => "an int".into(),
            Value::Float => "a float".into(),
            Value::Str(_) => "a string".into(),
            Value::Bytes => "bytes".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict { .. } => "a dict".into(),
            Value::Global(g) => format!("the global `{}`", global_name(*g)).into(),
            Value::Call { global, .. } => format!("a `{}` call", global_name(*global)).into(),
            Value::Persistent(_) => "a persistent id".into(),
        }
    }
}

#[derive(Debug)]
struct Node {
    value: Value,
    /// Nesting depth when built (0 for scalars); kept under [`MAX_DEPTH`].
    depth: u32,
}

/// Why a pickle was not read.
#[derive(Debug)]
pub(super) enum PickleError {
    /// It names a global outside [`ALLOWED_GLOBALS`]: `module.name`, the opcode and its offset.
    Refused { global: String, opcode: &'static str, at: usize },
    /// Anything else: malformed, unsupported or over a limit.
    Invalid(String),
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PickleError::Refused { global, opcode, at } => write!(
                f,
                "refusing to read: the pickle calls `{global}` ({opcode} at byte {at}), which a weights file never \
                 needs (torch.load would run it); only tensors and dicts are accepted"
            ),
            PickleError::Invalid(message) => f.write_str(message),
        }
    }
}

type Res<T> = std::result::Result<T, PickleError>;

fn invalid<T>(message: impl Into<String>) -> Res<T> {
    Err(PickleError::Invalid(message.into()))
}

/// A parsed pickle: its values and the one `STOP` returned.
#[derive(Debug)]
pub(super) struct Pickle {
    nodes: Vec<Node>,
    root: Id,
}

/// Where one tensor's elements lie, as the pickle says (not yet checked against the archive).
#[derive(Debug, Clone)]
pub(super) struct TensorRef {
    /// `module.name` of the storage type.
    pub storage_type: String,
    /// `None` for a storage type candle has no dtype for (bool, int8).
    pub dtype: Option<DType>,
    /// The storage's record name under `data/` (a string or integer value: see
    /// [`Pickle::storage_key`]); kept as a value so that a long name shared by many tensors is not copied.
    pub key: Id,
    /// Elements the storage holds.
    pub storage_numel: u64,
    /// Element offset of the tensor in its storage.
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

/// Parses one pickle (`data.pkl`), checking every global when it is named.
pub(super) fn parse(input: &[u8]) -> Res<Pickle> {
    Machine::new(input).run()
}

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    /// Values built plus memo entries, against [`MAX_OBJECTS`].
    objects: usize,
}

/// The name of opcode `op`, for messages.
fn opcode_name(op: u8) -> &'static str {
    match op {
        0x80 => "PROTO",
        0x95 => "FRAME",
        b'.' => "STOP",
        b'(' => "MARK",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'}' => "EMPTY_DICT",
        b']' => "EMPTY_LIST",
        b')' => "EMPTY_TUPLE",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        b't' => "TUPLE",
        b'l' => "LIST",
        b'd' => "DICT",
        b'a' => "APPEND",
        b'e' => "APPENDS",
        b's' => "SETITEM",
        b'u' => "SETITEMS",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'M' => "BININT2",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'I' => "INT",
        b'L' => "LONG",
        b'G' => "BINFLOAT",
        b'N' => "NONE",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        b'X' => "BINUNICODE",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8e => "BINBYTES8",
        b'h' => "BINGET",
        b'j' => "LONG_BINGET",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        0x94 => "MEMOIZE",
        b'c' => "GLOBAL",
        0x93 => "STACK_GLOBAL",
        b'R' => "REDUCE",
        b'b' => "BUILD",
        0x81 => "NEWOBJ",
        b'Q' => "BINPERSID",
        // Refused below; named for the message.
        b'P' => "PERSID",
        b'i' => "INST",
        b'o' => "OBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x92 => "NEWOBJ_EX",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'g' => "GET",
        b'p' => "PUT",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

impl<'a> Machine<'a> {
    fn new(input: &'a [u8]) -> Self {
        Self {
            input,
            pos: 0,
            nodes: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            objects: 0,
        }
    }

    fn run(mut self) -> Res<Pickle> {
        loop {
            let at = self.pos;
            let Some(&op) = self.input.get(at) else {
                return invalid(format!("the pickle ends at byte {at} without a STOP opcode (truncated?)"));
            };
            self.pos = at + 1;
            match self.step(op, at) {
                Ok(Some(root)) => return Ok(Pickle { nodes: self.nodes, root }),
                Ok(None) => {}
                Err(PickleError::Invalid(message)) => {
                    let name = match opcode_name(op) {
                        "unknown" => format!("opcode 0x{op:02x}"),
                        name => name.to_string(),
                    };
                    return invalid(format!("{message} ({name} at byte {at})"));
                }
                Err(e) => return Err(e),
            }
        }
    }

    // ----- reading the stream -------------------------------------------------------------

    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        let left = self.input.len().saturating_sub(self.pos);
        match self.pos.checked_add(n).and_then(|end| self.input.get(self.pos..end)) {
            Some(bytes) => {
                self.pos += n;
                Ok(bytes)
            }
            None => invalid(format!("needs {n} more bytes but only {left} are left (truncated?)")),
        }
    }

    fn array<const N: usize>(&mut self) -> Res<[u8; N]> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self) -> Res<u8> {
        let [b] = self.array()?;
        Ok(b)
    }

    fn u16(&mut self) -> Res<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Res<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Res<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A length read from the stream, which must fit in the bytes left.
    fn length(&mut self, n: u64) -> Res<&'a [u8]> {
        let left = self.input.len().saturating_sub(self.pos);
        match usize::try_from(n) {
            Ok(n) if n <= left => self.take(n),
            _ => invalid(format!("declares a length of {n} bytes but only {left} are left")),
        }
    }

    /// One `\n`-terminated line (without the newline), at most [`MAX_LINE`] bytes.
    fn line(&mut self) -> Res<&'a [u8]> {
        let rest = self.input.get(self.pos..).unwrap_or_default();
        let window = rest.get(..rest.len().min(MAX_LINE + 1)).unwrap_or_default();
        match window.iter().position(|&b| b == b'\n') {
            Some(n) => {
                let line = self.take(n)?;
                self.pos += 1;
                Ok(line)
            }
            None => invalid(format!("expects a line of at most {MAX_LINE} bytes ending in a newline")),
        }
    }

    // ----- values and the stack -----------------------------------------------------------

    fn count_object(&mut self) -> Res<()> {
        self.objects += 1;
        if self.objects > MAX_OBJECTS {
            return invalid(format!(
                "the pickle builds more than {MAX_OBJECTS} objects, the limit for a weights file's pickle"
            ));
        }
        Ok(())
    }

    fn add(&mut self, value: Value, depth: usize) -> Res<Id> {
        if depth > MAX_DEPTH {
            return invalid(format!("values are nested more than {MAX_DEPTH} levels deep, the limit"));
        }
        self.count_object()?;
        let Ok(id) = Id::try_from(self.nodes.len()) else {
            return invalid("too many objects");
        };
        // depth <= MAX_DEPTH fits u32.
        self.nodes.push(Node { value, depth: depth as u32 });
        Ok(id)
    }

    fn push(&mut self, value: Value, depth: usize) -> Res<()> {
        let id = self.add(value, depth)?;
        self.stack.push(id);
        Ok(())
    }

    fn node(&self, id: Id) -> Res<&Node> {
        match self.nodes.get(id as usize) {
            Some(node) => Ok(node),
            None => invalid("internal error: dangling value"),
        }
    }

    fn depth(&self, id: Id) -> usize {
        self.nodes.get(id as usize).map_or(0, |n| n.depth as usize)
    }

    /// Depth of a container holding `ids`.
    fn depth_over(&self, ids: impl IntoIterator<Item = Id>) -> usize {
        1 + ids.into_iter().map(|id| self.depth(id)).max().unwrap_or(0)
    }

    /// Bottom of the current MARK frame.
    fn frame_base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Res<Id> {
        if self.stack.len() <= self.frame_base() {
            return invalid("pops from an empty stack (stack underflow)");
        }
        match self.stack.pop() {
            Some(id) => Ok(id),
            None => invalid("pops from an empty stack (stack underflow)"),
        }
    }

    fn top(&self) -> Res<Id> {
        match self.stack.last() {
            Some(&id) if self.stack.len() > self.frame_base() => Ok(id),
            _ => invalid("needs a value on the stack, which is empty (stack underflow)"),
        }
    }

    /// The values pushed since the last MARK, which is closed.
    fn pop_mark(&mut self) -> Res<Vec<Id>> {
        let Some(base) = self.marks.pop() else {
            return invalid("has no MARK to pop to");
        };
        if base > self.stack.len() {
            return invalid("internal error: MARK past the stack");
        }
        Ok(self.stack.split_off(base))
    }

    fn pairs(items: Vec<Id>) -> Res<Vec<(Id, Id)>> {
        if !items.len().is_multiple_of(2) {
            return invalid(format!("needs key/value pairs but has {} values", items.len()));
        }
        Ok(items
            .chunks_exact(2)
            .filter_map(|kv| match kv {
                &[k, v] => Some((k, v)),
                _ => None,
            })
            .collect())
    }

    /// Raises the depth of container `id` to hold a child of depth `child`.
    fn deepen(&mut self, id: Id, child: usize) -> Res<()> {
        let depth = self.depth(id).max(child + 1);
        if depth > MAX_DEPTH {
            return invalid(format!("values are nested more than {MAX_DEPTH} levels deep, the limit"));
        }
        if let Some(node) = self.nodes.get_mut(id as usize) {
            node.depth = depth as u32;
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Id>) -> Res<()> {
        let list = self.top()?;
        let child = items.iter().map(|&id| self.depth(id)).max().unwrap_or(0);
        match self.nodes.get_mut(list as usize).map(|n| &mut n.value) {
            Some(Value::List(existing)) => existing.extend(items),
            Some(other) => return invalid(format!("appends to {}, not a list", other.describe())),
            None => return invalid("internal error: dangling value"),
        }
        self.deepen(list, child)
    }

    fn set_items(&mut self, pairs: Vec<(Id, Id)>) -> Res<()> {
        let dict = self.top()?;
        let child = pairs.iter().map(|&(k, v)| self.depth(k).max(self.depth(v))).max().unwrap_or(0);
        match self.nodes.get_mut(dict as usize).map(|n| &mut n.value) {
            Some(Value::Dict { items, .. }) => items.extend(pairs),
            Some(other) => return invalid(format!("sets items on {}, not a dict", other.describe())),
            None => return invalid("internal error: dangling value"),
        }
        self.deepen(dict, child)
    }

    fn memo_put(&mut self, key: u32) -> Res<()> {
        let id = self.top()?;
        if self.memo.insert(key, id).is_none() {
            self.count_object()?;
        }
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Res<()> {
        match self.memo.get(&key) {
            Some(&id) => {
                self.stack.push(id);
                Ok(())
            }
            None => invalid(format!("reads memo entry {key}, which was never set")),
        }
    }

    /// Checks `module.name` against [`ALLOWED_GLOBALS`] and pushes it.
    fn global(&mut self, module: &[u8], name: &[u8], opcode: &'static str, at: usize) -> Res<()> {
        let index = ALLOWED_GLOBALS.iter().position(|(m, n)| m.as_bytes() == module && n.as_bytes() == name);
        match index {
            Some(index) => self.push(Value::Global(index as u16), 0),
            None => Err(PickleError::Refused {
                global: shown(&format!("{}.{}", String::from_utf8_lossy(module), String::from_utf8_lossy(name)))
                    .into_owned(),
                opcode,
                at,
            }),
        }
    }

    /// `REDUCE` / `NEWOBJ`: `callable(*args)`, where the callable must be an allowed global.
    fn call(&mut self, opcode: &str) -> Res<()> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let global = match &self.node(callable)?.value {
            Value::Global(g) => *g,
            other => {
                return invalid(format!("{opcode} calls {}; only the allowed globals may be called", other.describe()));
            }
        };
        let Value::Tuple(arg_items) = &self.node(args)?.value else {
            return invalid(format!("{opcode} arguments are {}, not a tuple", self.node(args)?.value.describe()));
        };
        let depth = 1 + self.depth(args);
        if kind_of(usize::from(global)) == Kind::OrderedDict {
            // OrderedDict(), or OrderedDict(pairs) / OrderedDict(dict) as Python would build it;
            // NEWOBJ (`__new__`) builds an empty one whatever its arguments.
            let items = if opcode == "NEWOBJ" { Vec::new() } else { self.ordered_dict_items(arg_items)? };
            // The copied items count as objects: copying one big dict again and again is a bomb.
            for _ in 0..items.len() {
                self.count_object()?;
            }
            return self.push(Value::Dict { items, instance: true }, depth);
        }
        self.push(Value::Call { global, args }, depth)
    }

    fn ordered_dict_items(&self, args: &[Id]) -> Res<Vec<(Id, Id)>> {
        // Checked before copying, so that no copy outgrows the object limit.
        let source_len = match args {
            [source] => match &self.node(*source)?.value {
                Value::Dict { items, .. } => items.len(),
                Value::List(items) => items.len(),
                Value::Tuple(items) => items.len(),
                _ => 0,
            },
            _ => 0,
        };
        if self.objects.saturating_add(source_len) > MAX_OBJECTS {
            return invalid(format!(
                "the pickle builds more than {MAX_OBJECTS} objects, the limit for a weights file's pickle"
            ));
        }
        match args {
            [] => Ok(Vec::new()),
            [source] => match &self.node(*source)?.value {
                Value::Dict { items, .. } => Ok(items.clone()),
                Value::List(pairs) => self.pairs_of(pairs),
                Value::Tuple(pairs) => self.pairs_of(pairs),
                other => invalid(format!("builds an OrderedDict from {}", other.describe())),
            },
            _ => invalid(format!("builds an OrderedDict from {} arguments", args.len())),
        }
    }

    fn pairs_of(&self, pairs: &[Id]) -> Res<Vec<(Id, Id)>> {
        pairs
            .iter()
            .map(|&p| match &self.node(p)?.value {
                Value::Tuple(kv) if kv.len() == 2 => match **kv {
                    [k, v] => Ok((k, v)),
                    _ => invalid("internal error: pair"),
                },
                other => invalid(format!("builds an OrderedDict from {}, not a key/value pair", other.describe())),
            })
            .collect()
    }

    /// Runs one opcode; `Some(root)` at STOP.
    fn step(&mut self, op: u8, at: usize) -> Res<Option<Id>> {
        match op {
            0x80 => {
                let version = self.u8()?;
                if version > 5 {
                    return invalid(format!("pickle protocol {version} is newer than any Python writes"));
                }
            }
            0x95 => {
                // FRAME: the length of the opcodes that follow; they are read as they come.
                let n = self.u64()?;
                let left = self.input.len().saturating_sub(self.pos);
                if usize::try_from(n).map_or(true, |n| n > left) {
                    return invalid(format!("declares a frame of {n} bytes but only {left} are left"));
                }
            }
            b'.' => return self.pop().map(Some),
            b'(' => {
                if self.marks.len() >= MAX_DEPTH {
                    return invalid(format!("opens more than {MAX_DEPTH} nested MARKs, the nesting limit"));
                }
                self.marks.push(self.stack.len());
            }
            b'0' => {
                // POP: as Python, an empty frame pops its MARK instead.
                if self.stack.len() > self.frame_base() || self.marks.is_empty() {
                    self.pop()?;
                } else {
                    self.pop_mark()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let id = self.top()?;
                self.stack.push(id);
            }
            b'}' => self.push(Value::Dict { items: Vec::new(), instance: false }, 1)?,
            b']' => self.push(Value::List(Vec::new()), 1)?,
            b')' => self.push(Value::Tuple(Box::new([])), 1)?,
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = vec![0; n];
                for slot in items.iter_mut().rev() {
                    *slot = self.pop()?;
                }
                let depth = self.depth_over(items.iter().copied());
                self.push(Value::Tuple(items.into_boxed_slice()), depth)?;
            }
            b't' => {
                let items = self.pop_mark()?;
                let depth = self.depth_over(items.iter().copied());
                self.push(Value::Tuple(items.into_boxed_slice()), depth)?;
            }
            b'l' => {
                let items = self.pop_mark()?;
                let depth = self.depth_over(items.iter().copied());
                self.push(Value::List(items), depth)?;
            }
            b'd' => {
                let items = Self::pairs(self.pop_mark()?)?;
                let depth = self.depth_over(items.iter().flat_map(|&(k, v)| [k, v]));
                self.push(Value::Dict { items, instance: false }, depth)?;
            }
            b'a' => {
                let value = self.pop()?;
                self.append(vec![value])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.set_items(vec![(key, value)])?;
            }
            b'u' => {
                let items = Self::pairs(self.pop_mark()?)?;
                self.set_items(items)?;
            }
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.push(Value::Int(i64::from(v)), 0)?;
            }
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(i64::from(v)), 0)?;
            }
            b'M' => {
                let v = self.u16()?;
                self.push(Value::Int(i64::from(v)), 0)?;
            }
            0x8a => {
                let n = self.u8()?;
                let bytes = self.take(usize::from(n))?;
                self.push(long_value(bytes), 0)?;
            }
            0x8b => {
                let n = i32::from_le_bytes(self.array()?);
                if n < 0 {
                    return invalid(format!("declares a negative length {n}"));
                }
                let bytes = self.length(n as u64)?;
                self.push(long_value(bytes), 0)?;
            }
            b'I' => {
                let line = self.line()?;
                let value = match line {
                    b"00" | b"01" => Value::Bool,
                    digits => decimal_value(digits)?,
                };
                self.push(value, 0)?;
            }
            b'L' => {
                let line = self.line()?;
                let digits = line.strip_suffix(b"L").unwrap_or(line);
                self.push(decimal_value(digits)?, 0)?;
            }
            b'G' => {
                self.take(8)?;
                self.push(Value::Float, 0)?;
            }
            b'N' => self.push(Value::None, 0)?,
            0x88 | 0x89 => self.push(Value::Bool, 0)?,
            b'X' | b'T' | 0x8c | b'U' | 0x8d => {
                let n = match op {
                    b'X' => u64::from(self.u32()?),
                    b'T' => {
                        let n = i32::from_le_bytes(self.array()?);
                        if n < 0 {
                            return invalid(format!("declares a negative length {n}"));
                        }
                        n as u64
                    }
                    0x8c | b'U' => u64::from(self.u8()?),
                    _ => self.u64()?,
                };
                let bytes = self.length(n)?;
                let text: Box<str> = String::from_utf8_lossy(bytes).into();
                self.push(Value::Str(text), 0)?;
            }
            b'B' | b'C' | 0x8e => {
                let n = match op {
                    b'B' => u64::from(self.u32()?),
                    b'C' => u64::from(self.u8()?),
                    _ => self.u64()?,
                };
                self.length(n)?;
                self.push(Value::Bytes, 0)?;
            }
            b'h' => {
                let key = self.u8()?;
                self.memo_get(u32::from(key))?;
            }
            b'j' => {
                let key = self.u32()?;
                self.memo_get(key)?;
            }
            b'q' => {
                let key = self.u8()?;
                self.memo_put(u32::from(key))?;
            }
            b'r' => {
                let key = self.u32()?;
                self.memo_put(key)?;
            }
            0x94 => {
                let Ok(key) = u32::try_from(self.memo.len()) else {
                    return invalid("too many memo entries");
                };
                self.memo_put(key)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.global(module, name, "GLOBAL", at)?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (&self.node(module)?.value, &self.node(name)?.value)
                else {
                    return invalid("names a global with values that are not strings");
                };
                let (module, name) = (module.clone(), name.clone());
                self.global(module.as_bytes(), name.as_bytes(), "STACK_GLOBAL", at)?;
            }
            b'R' => self.call("REDUCE")?,
            0x81 => self.call("NEWOBJ")?,
            b'b' => {
                // BUILD sets the state of an instance an allowed global built; the state (e.g. a
                // state dict's `_metadata`) is kept, never applied.
                let state = self.pop()?;
                let target = self.top()?;
                match &self.node(target)?.value {
                    Value::Call { .. } | Value::Dict { instance: true, .. } => {}
                    other => {
                        return invalid(format!(
                            "BUILD sets the state of {}; only objects an allowed global built have one",
                            other.describe()
                        ));
                    }
                }
                self.deepen(target, self.depth(state))?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let depth = 1 + self.depth(pid);
                self.push(Value::Persistent(pid), depth)?;
            }
            other => {
                let name = match opcode_name(other) {
                    "unknown" => "unknown pickle opcode".to_string(),
                    name => format!("unsupported pickle opcode {name}"),
                };
                return invalid(format!("{name} (0x{other:02x}); a torch.save weights file never uses it"));
            }
        }
        Ok(None)
    }
}

/// A LONG1/LONG4 payload: little-endian two's complement.
fn long_value(bytes: &[u8]) -> Value {
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let fill = if negative { 0xff } else { 0 };
    let mut low = [fill; 8];
    for (slot, &b) in low.iter_mut().zip(bytes) {
        *slot = b;
    }
    let value = i64::from_le_bytes(low);
    // Bytes past the eighth must only repeat the sign of the 64-bit value.
    let fits = bytes.iter().skip(8).all(|&b| b == fill) && (value < 0) == negative;
    if fits { Value::Int(value) } else { Value::BigInt }
}

/// The decimal payload of INT / LONG.
fn decimal_value(text: &[u8]) -> Res<Value> {
    let s = std::str::from_utf8(text).unwrap_or_default();
    if let Ok(v) = s.parse::<i64>() {
        return Ok(Value::Int(v));
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(Value::BigInt);
    }
    invalid(format!("expects a decimal integer, found {:?}", String::from_utf8_lossy(text)))
}

/// `text` from a file as it may appear in a one-line message: control characters escaped, at most
/// 200 characters.
pub(super) fn shown(text: &str) -> Cow<'_, str> {
    const MAX: usize = 200;
    if text.len() <= MAX && !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let escaped: Vec<char> = text.chars().flat_map(char::escape_debug).take(MAX + 1).collect();
    let mut out: String = escaped.iter().take(MAX).collect();
    if escaped.len() > MAX {
        out.push('…');
    }
    Cow::Owned(out)
}

/// Budgets for walking the values: entries visited and bytes of names built.
pub(super) struct WalkLimits {
    pub entries: usize,
    pub name_bytes: usize,
}

impl Pickle {
    fn value(&self, id: Id) -> &Value {
        self.nodes.get(id as usize).map_or(&Value::None, |n| &n.value)
    }

    /// How many values the pickle built.
    pub(super) fn len(&self) -> usize {
        self.nodes.len()
    }

    fn dict_items(&self, id: Id) -> Option<&[(Id, Id)]> {
        match self.value(id) {
            Value::Dict { items, .. } => Some(items),
            _ => None,
        }
    }

    /// The object holding the tensors: the `state_dict` entry of a training checkpoint, or the root.
    fn state_dict(&self) -> Id {
        let found = self.dict_items(self.root).and_then(|items| {
            items.iter().find(|&&(k, v)| {
                matches!(self.value(k), Value::Str(s) if &**s == "state_dict") && self.dict_items(v).is_some()
            })
        });
        found.map_or(self.root, |&(_, v)| v)
    }

    /// Every tensor of the state dict (a `state_dict` wrapper unwrapped), nested dicts flattened to
    /// dotted names, in pickle order. Entries whose key is not a string or integer, and values that
    /// are not tensors, are skipped. Shared dicts are walked once per reference, within `limits`.
    pub(super) fn tensors(&self, limits: &WalkLimits) -> Res<Vec<(String, TensorRef)>> {
        /// A dict being walked: the next item to visit and the dotted name of the dict.
        struct Frame {
            dict: Id,
            next: usize,
            prefix: String,
        }
        let mut out = Vec::new();
        let root = self.state_dict();
        if self.dict_items(root).is_none() {
            return Ok(out);
        }
        let (mut entries, mut name_bytes) = (0usize, 0usize);
        // Depth-first with an explicit stack (the dicts from the root to the current one), in
        // pickle order; a dict met again below itself is a cycle.
        let mut path = vec![Frame { dict: root, next: 0, prefix: String::new() }];
        let mut on_path = std::collections::HashSet::from([root]);
        while let Some(frame) = path.last_mut() {
            let Some(&(k, v)) = self.dict_items(frame.dict).and_then(|items| items.get(frame.next)) else {
                on_path.remove(&frame.dict);
                path.pop();
                continue;
            };
            frame.next += 1;
            entries += 1;
            if entries > limits.entries {
                return invalid(format!(
                    "the pickle's dicts expand to more than {} entries through shared references (a \
                     \"billion laughs\" pickle); a state dict never does",
                    limits.entries
                ));
            }
            let key: Cow<'_, str> = match self.value(k) {
                Value::Str(s) => Cow::Borrowed(s),
                Value::Int(i) => Cow::Owned(i.to_string()),
                _ => continue,
            };
            let name = if frame.prefix.is_empty() { key.into_owned() } else { format!("{}.{key}", frame.prefix) };
            name_bytes = name_bytes.saturating_add(name.len());
            if name_bytes > limits.name_bytes {
                return invalid(format!(
                    "the pickle's tensor names add up to more than {} bytes, the limit for its size",
                    limits.name_bytes
                ));
            }
            if self.dict_items(v).is_some() {
                if on_path.contains(&v) {
                    return invalid(format!(
                        "the dict at `{}` contains itself (a reference cycle); a state dict never does",
                        shown(&name)
                    ));
                }
                if path.len() >= MAX_DEPTH {
                    return invalid(format!("dicts are nested more than {MAX_DEPTH} levels deep, the limit"));
                }
                on_path.insert(v);
                path.push(Frame { dict: v, next: 0, prefix: name });
            } else if let Some(tensor) = self
                .tensor(v)
                .map_err(|e| PickleError::Invalid(format!("tensor `{}` cannot be read: {e}", shown(&name))))?
            {
                out.push((name, tensor));
            }
        }
        Ok(out)
    }

    /// The tensor `id` rebuilds, if it is one (through `_rebuild_parameter` and
    /// `_rebuild_from_type_v2` wrappers); `None` for any other value.
    fn tensor(&self, id: Id) -> std::result::Result<Option<TensorRef>, String> {
        let Value::Call { global, args } = self.value(id) else {
            return Ok(None);
        };
        let (mut global, mut args) = (*global, *args);
        for _ in 0..MAX_WRAPPERS {
            let items = self.tuple(args).ok_or("its rebuild arguments are not a tuple")?;
            match kind_of(usize::from(global)) {
                Kind::RebuildTensor => return self.rebuild_args(items).map(Some),
                Kind::RebuildParameter => {
                    let inner = items.first().ok_or("_rebuild_parameter without a tensor")?;
                    match self.value(*inner) {
                        Value::Call { global: g, args: a } => (global, args) = (*g, *a),
                        other => return Err(format!("_rebuild_parameter of {}, not a tensor", other.describe())),
                    }
                }
                Kind::RebuildFromType => {
                    // (func, new_type, args, state): func(*args).
                    let (Some(func), Some(inner_args)) = (items.first(), items.get(2)) else {
                        return Err("_rebuild_from_type_v2 with fewer than 3 arguments".into());
                    };
                    match self.value(*func) {
                        Value::Global(g) => (global, args) = (*g, *inner_args),
                        other => return Err(format!("_rebuild_from_type_v2 calls {}", other.describe())),
                    }
                }
                _ => return Ok(None),
            }
        }
        Err(format!("a tensor wrapped more than {MAX_WRAPPERS} times"))
    }

    /// The record name of a storage key ([`TensorRef::key`]).
    pub(super) fn storage_key(&self, id: Id) -> Cow<'_, str> {
        match self.value(id) {
            Value::Str(s) => Cow::Borrowed(s),
            Value::Int(i) => Cow::Owned(i.to_string()),
            _ => Cow::Borrowed(""),
        }
    }

    fn tuple(&self, id: Id) -> Option<&[Id]> {
        match self.value(id) {
            Value::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// A non-negative integer.
    fn count(&self, id: Id, what: &str) -> std::result::Result<u64, String> {
        match self.value(id) {
            Value::Int(v) if *v >= 0 => Ok(*v as u64),
            Value::Int(v) => Err(format!("its {what} is negative ({v})")),
            Value::BigInt => Err(format!("its {what} does not fit 64 bits")),
            other => Err(format!("its {what} is {}, not an integer", other.describe())),
        }
    }

    fn counts(&self, id: Id, what: &str) -> std::result::Result<Vec<u64>, String> {
        let items =
            self.tuple(id).ok_or_else(|| format!("its {what} is {}, not a tuple", self.value(id).describe()))?;
        if items.len() > MAX_RANK {
            return Err(format!("its {what} has {} dimensions, more than the {MAX_RANK} torch allows", items.len()));
        }
        items.iter().map(|&i| self.count(i, what)).collect()
    }

    /// `(storage, storage_offset, size, stride, ...)` of `_rebuild_tensor(_v2)`.
    fn rebuild_args(&self, args: &[Id]) -> std::result::Result<TensorRef, String> {
        let [storage, offset, size, stride, ..] = args else {
            return Err(format!("_rebuild_tensor_v2 with {} arguments, expected at least 4", args.len()));
        };
        let Value::Persistent(pid) = self.value(*storage) else {
            return Err(format!(
                "its storage is {}, not a persistent storage reference",
                self.value(*storage).describe()
            ));
        };
        // ('storage', storage_type, key, location, numel)
        let pid = self.tuple(*pid).ok_or("its storage reference is not a tuple")?;
        let [tag, storage_type, key, _location, numel, ..] = pid else {
            return Err(format!("its storage reference has {} fields, expected 5", pid.len()));
        };
        if !matches!(self.value(*tag), Value::Str(s) if &**s == "storage") {
            return Err("its persistent reference is not a storage".into());
        }
        let (storage_type, dtype) = match self.value(*storage_type) {
            Value::Global(g) => match kind_of(usize::from(*g)) {
                Kind::Storage(dtype) => (global_name(*g), dtype),
                _ => return Err(format!("its storage type is `{}`, not a storage", global_name(*g))),
            },
            other => return Err(format!("its storage type is {}", other.describe())),
        };
        if !matches!(self.value(*key), Value::Str(_) | Value::Int(_)) {
            return Err(format!("its storage key is {}", self.value(*key).describe()));
        }
        let shape = self.counts(*size, "shape")?;
        let stride = self.counts(*stride, "stride")?;
        if shape.len() != stride.len() {
            return Err(format!("its shape {shape:?} and stride {stride:?} differ in rank"));
        }
        Ok(TensorRef {
            storage_type,
            dtype,
            key: *key,
            storage_numel: self.count(*numel, "storage element count")?,
            offset: self.count(*offset, "storage offset")?,
            shape,
            stride,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(v: &Value) -> Option<i64> {
        match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    #[test]
    fn long_payloads_are_twos_complement() {
        assert_eq!(int(&long_value(&[])), Some(0));
        assert_eq!(int(&long_value(&[0xff])), Some(-1));
        assert_eq!(int(&long_value(&[0x80, 0x00])), Some(128));
        assert_eq!(int(&long_value(&[0, 0, 0, 0, 0, 0, 0, 0x40])), Some(1 << 62));
        assert_eq!(int(&long_value(&[0xff; 8])), Some(-1));
        // 2**63 needs a ninth byte; a redundant sign byte still fits.
        assert!(matches!(long_value(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0]), Value::BigInt));
        assert_eq!(int(&long_value(&[1, 0, 0, 0, 0, 0, 0, 0, 0])), Some(1));
        assert_eq!(int(&long_value(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])), Some(-2));
        assert!(matches!(long_value(&[0; 200].map(|_: u8| 0x7f)), Value::BigInt));
    }

    #[test]
    fn text_integers() {
        assert_eq!(int(&decimal_value(b"-12").unwrap()), Some(-12));
        assert!(matches!(decimal_value(b"123456789012345678901234567890").unwrap(), Value::BigInt));
        assert!(decimal_value(b"1.5").is_err());
        assert!(decimal_value(b"").is_err());
    }

    #[test]
    fn names_in_messages_are_one_short_line() {
        assert_eq!(shown("a.b"), "a.b");
        assert_eq!(shown("a\nb"), "a\\nb");
        let long = "x".repeat(1000);
        assert_eq!(shown(&long).chars().count(), 201);
    }

    #[test]
    fn every_allowed_global_has_its_kind() {
        let storages = ALLOWED_GLOBALS.iter().filter(|(_, n)| n.ends_with("Storage")).count();
        let kinds = (0..ALLOWED_GLOBALS.len()).filter(|&i| matches!(kind_of(i), Kind::Storage(_))).count();
        assert_eq!(storages, kinds);
        assert_eq!(kind_of(0), Kind::OrderedDict);
    }

    #[test]
    fn a_refused_global_stops_before_anything_is_built() {
        let err = parse(b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00ls\x85R.").unwrap_err();
        assert!(matches!(&err, PickleError::Refused { global, opcode: "GLOBAL", at: 2 } if global == "posix.system"));
    }
}
