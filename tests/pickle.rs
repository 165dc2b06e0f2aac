//! The PyTorch checkpoint reader under attack: every hostile pickle and archive is crafted here as
//! bytes (a pickle writer and a byte-exact copy of torch.save's zip writer below), and must be
//! refused with one clear error — never run, never a panic, a stack overflow, an out-of-bounds read or
//! a runaway allocation — while real `torch.save` files keep loading.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use diffctl::io::pickle::{PickleTensors, fuzz_parse};

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

const SEEDS: &str = "tests/fixtures/fuzz/pickle";

// ----- a pickle writer (protocol 2, as Python's pickler writes it) ----------------------------------

#[derive(Clone)]
struct Pkl(Vec<u8>);

impl Pkl {
    fn new() -> Self {
        Pkl(vec![0x80, 2])
    }

    fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }

    fn op(&mut self, op: u8) -> &mut Self {
        self.0.push(op);
        self
    }

    fn str(&mut self, s: &str) -> &mut Self {
        self.op(b'X').raw(&(s.len() as u32).to_le_bytes()).raw(s.as_bytes())
    }

    fn int(&mut self, v: i64) -> &mut Self {
        match v {
            0..=0xff => self.op(b'K').op(v as u8),
            0x100..=0xffff => self.op(b'M').raw(&(v as u16).to_le_bytes()),
            _ if i32::try_from(v).is_ok() => self.op(b'J').raw(&(v as i32).to_le_bytes()),
            _ => self.op(0x8a).op(8).raw(&v.to_le_bytes()),
        }
    }

    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(b'c').raw(format!("{module}\n{name}\n").as_bytes())
    }

    fn ints(&mut self, values: &[i64]) -> &mut Self {
        match values.len() {
            0 => self.op(b')'),
            n @ 1..=3 => {
                for &v in values {
                    self.int(v);
                }
                self.op(0x84 + n as u8)
            }
            _ => {
                self.op(b'(');
                for &v in values {
                    self.int(v);
                }
                self.op(b't')
            }
        }
    }

    fn put(&mut self, key: u8) -> &mut Self {
        self.op(b'q').op(key)
    }

    fn get(&mut self, key: u8) -> &mut Self {
        self.op(b'h').op(key)
    }

    /// A tensor as torch.save writes it: `_rebuild_tensor_v2(storage, offset, size, stride, False,
    /// OrderedDict())` with the storage `('storage', torch.<storage_type>, key, 'cpu', numel)`.
    fn tensor(&mut self, t: &T) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b'(');
        self.op(b'(').str("storage").global("torch", t.storage_type).str(t.key).str("cpu").int(t.numel).op(b't');
        self.op(b'Q').int(t.offset).ints(&t.shape).ints(&t.stride).op(0x89);
        self.global("collections", "OrderedDict").op(b')').op(b'R');
        self.op(b't').op(b'R')
    }

    /// `{key: value, ...}` from (key, writer) pairs.
    fn dict(&mut self, entries: &[Entry<'_>]) -> &mut Self {
        self.op(b'}').op(b'(');
        for (key, value) in entries {
            self.str(key);
            value(self);
        }
        self.op(b'u')
    }

    fn stop(&mut self) -> Vec<u8> {
        self.op(b'.');
        self.0.clone()
    }
}

/// A dict entry for [`Pkl::dict`]: the key and what writes its value.
type Entry<'a> = (&'a str, &'a dyn Fn(&mut Pkl));

/// A tensor's storage reference and layout in a crafted pickle.
#[derive(Clone)]
struct T {
    storage_type: &'static str,
    key: &'static str,
    numel: i64,
    offset: i64,
    shape: Vec<i64>,
    stride: Vec<i64>,
}

/// The 2x3 f32 tensor 0..6 in storage "0".
fn t23() -> T {
    T { storage_type: "FloatStorage", key: "0", numel: 6, offset: 0, shape: vec![2, 3], stride: vec![3, 1] }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Storage "0": the f32 values 0..6.
fn storage0() -> Vec<u8> {
    f32_bytes(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
}

// ----- torch.save's zip writer, byte for byte ------------------------------------------------------

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// The archive `torch.save` (PyTorchStreamWriter over miniz) writes for `folder`: every record
/// stored, its local header padded with an `FB` extra field so the data starts on a 64-byte
/// boundary, sizes in a data descriptor, and ZIP64 end records before the end of central directory.
fn torch_zip(folder: &str, pkl: &[u8], storages: &[(&str, &[u8])], serialization_id: &[u8]) -> Vec<u8> {
    let mut records: Vec<(String, &[u8])> = vec![
        (format!("{folder}/data.pkl"), pkl),
        (format!("{folder}/.format_version"), b"1"),
        (format!("{folder}/.storage_alignment"), b"64"),
        (format!("{folder}/byteorder"), b"little"),
    ];
    records.extend(storages.iter().map(|(key, data)| (format!("{folder}/data/{key}"), *data)));
    records.push((format!("{folder}/version"), b"3\n"));
    records.push((format!("{folder}/.data/serialization_id"), serialization_id));

    let (mut out, mut central) = (Vec::new(), Vec::new());
    let u16le = |v: usize| (v as u16).to_le_bytes();
    let u32le = |v: usize| (v as u32).to_le_bytes();
    let u64le = |v: usize| (v as u64).to_le_bytes();
    for (name, data) in &records {
        let offset = out.len();
        let crc = crc32(data).to_le_bytes();
        let start = offset + 30 + name.len() + 4;
        let padding = (64 - start % 64) % 64;
        let mut extra = b"FB".to_vec();
        extra.extend(u16le(padding));
        extra.extend(std::iter::repeat_n(b'Z', padding));
        out.extend(b"PK\x03\x04");
        out.extend(u16le(0)); // version needed
        out.extend(u16le(0x0808)); // data descriptor, UTF-8 names
        out.extend([0; 2 + 2 + 2 + 4 + 4 + 4]); // method, time, date, crc and sizes (in the descriptor)
        out.extend(u16le(name.len()));
        out.extend(u16le(extra.len()));
        out.extend(name.as_bytes());
        out.extend(&extra);
        out.extend(*data);
        out.extend(b"PK\x07\x08");
        out.extend(crc);
        out.extend(u32le(data.len()));
        out.extend(u32le(data.len()));

        central.extend(b"PK\x01\x02");
        central.extend(u16le(0)); // made by
        central.extend(u16le(0)); // version needed
        central.extend(u16le(0x0808));
        central.extend([0; 6]); // method, time, date
        central.extend(crc);
        central.extend(u32le(data.len()));
        central.extend(u32le(data.len()));
        central.extend(u16le(name.len()));
        central.extend([0; 2 + 2 + 2 + 2 + 4]); // extra, comment, disk, internal and external attributes
        central.extend(u32le(offset));
        central.extend(name.as_bytes());
    }
    let (cd_offset, cd_size, n) = (out.len(), central.len(), records.len());
    out.extend(&central);
    let zip64_end = out.len();
    out.extend(b"PK\x06\x06");
    out.extend(u64le(44));
    out.extend(u16le(0x031e));
    out.extend(u16le(0x2d));
    out.extend([0; 8]);
    out.extend(u64le(n));
    out.extend(u64le(n));
    out.extend(u64le(cd_size));
    out.extend(u64le(cd_offset));
    out.extend(b"PK\x06\x07");
    out.extend(u32le(0));
    out.extend(u64le(zip64_end));
    out.extend(u32le(1));
    out.extend(b"PK\x05\x06");
    out.extend([0; 4]);
    out.extend(u16le(n));
    out.extend(u16le(n));
    out.extend(u32le(cd_size));
    out.extend(u32le(cd_offset));
    out.extend(u16le(0));
    out
}

const SERIALIZATION_ID: &[u8] = b"1572819951185464302607773786142017902903";

/// An archive `archive/` with `pkl` and storage "0" = `storage0()`.
fn archive(pkl: &[u8]) -> Vec<u8> {
    torch_zip("archive", pkl, &[("0", &storage0())], SERIALIZATION_ID)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Opens `bytes` as a checkpoint file; the error as text.
fn open_bytes(bytes: &[u8]) -> Result<PickleTensors, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "model.ckpt", bytes);
    PickleTensors::open(&path).map_err(|e| e.to_string())
}

/// The error opening `pkl` in an archive, which must mention every one of `needles`.
fn refused(what: &str, pkl: &[u8], needles: &[&str]) -> String {
    let err = match open_bytes(&archive(pkl)) {
        Ok(t) => {
            panic!("{what}: accepted, with tensors {:?}", t.tensors().map(|t| t.0.to_string()).collect::<Vec<_>>())
        }
        Err(e) => e,
    };
    eprintln!("{what}: {err}");
    assert!(!err.contains('\n'), "{what}: the error is one line: {err}");
    assert!(err.contains("model.ckpt"), "{what}: the error names the file: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{what}: the error `{err}` does not mention `{needle}`");
    }
    err
}

fn names(t: &PickleTensors) -> Vec<String> {
    let mut names: Vec<String> = t.tensors().map(|(n, _, _)| n.to_string()).collect();
    names.sort();
    names
}

fn values(t: &PickleTensors, name: &str) -> Vec<f32> {
    t.load(name, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Runs `f` on a thread with a small stack, as a proof that nothing recurses with the input.
fn small_stack<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    std::thread::Builder::new().stack_size(512 << 10).spawn(f).unwrap().join().expect("thread panicked")
}

// ----- real torch.save files --------------------------------------------------------------------------

fn check_tiny_checkpoint(path: &Path) {
    let t = PickleTensors::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        names(&t),
        ["a.bias", "a.weight", "attr", "b", "h", "l", "lin.bias", "lin.weight", "nested.deeper.y", "nested.x", "tied"]
    );
    let dtypes: HashMap<&str, (Vec<usize>, DType)> = t.tensors().map(|(n, s, d)| (n, (s.to_vec(), d))).collect();
    assert_eq!(dtypes["a.weight"], (vec![2, 3], DType::F32));
    assert_eq!(dtypes["b"], (vec![3, 2], DType::F32));
    assert_eq!(dtypes["h"], (vec![4], DType::F16));
    assert_eq!(dtypes["l"], (vec![3], DType::I64));
    assert_eq!(dtypes["nested.deeper.y"], (vec![1, 1], DType::BF16));
    assert_eq!(values(&t, "a.weight"), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(values(&t, "tied"), values(&t, "a.weight"));
    // _rebuild_parameter, a column-major transpose, an offset view, _rebuild_from_type_v2.
    assert_eq!(values(&t, "a.bias"), [0.5, -1.5]);
    assert_eq!(values(&t, "b"), [0.0, 30.0, 10.0, 40.0, 20.0, 50.0]);
    assert_eq!(values(&t, "h"), [0.0, 1.0, 2.0, 3.0]);
    assert_eq!(values(&t, "nested.x"), [1.0, 2.0]);
    assert_eq!(values(&t, "nested.deeper.y"), [1.0]);
    assert_eq!(values(&t, "attr"), [7.0, 8.0]);
    assert_eq!(values(&t, "lin.weight"), [0.25, -0.75]);
    assert_eq!(values(&t, "lin.bias"), [2.0]);
    let l: Vec<i64> = t.load("l", &Device::Cpu).unwrap().to_vec1().unwrap();
    assert_eq!(l, [1, 2, 3]);
    assert!(t.load("epoch", &Device::Cpu).is_err(), "training metadata is not a tensor");
}

#[test]
fn real_torch_checkpoints_load_every_tensor() {
    // A Lightning-style wrapper around an OrderedDict (with a module state dict and its BUILD
    // metadata), metadata beside it, a Parameter, views, f16/bf16/i64 and a tensor with attributes.
    check_tiny_checkpoint(&repo_path(&format!("{SEEDS}/tiny-checkpoint.ckpt")));
    // The same saved with pickle protocol 4 (FRAME, STACK_GLOBAL, MEMOIZE, SHORT_BINUNICODE).
    check_tiny_checkpoint(&repo_path(&format!("{SEEDS}/tiny-checkpoint-p4.ckpt")));
    // The fixtures the other suites use still open.
    for rel in [
        "tests/fixtures/checkpoints/sd1-tiny.ckpt",
        "tests/fixtures/lora/tiny-style.pt",
        "tests/fixtures/lora/lokr.pt",
        "tests/fixtures/ip_adapter/ip-adapter_tiny.bin",
        "tests/fixtures/uni_controlnet/uni-tiny-global.ckpt",
        "tests/fixtures/checkpoints/sd1-tiny-vae-bin/diffusion_pytorch_model.bin",
    ] {
        let t = PickleTensors::open(&repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert!(t.tensors().count() > 0, "{rel}: no tensors");
        for (name, shape, _) in t.tensors() {
            assert_eq!(t.load(name, &Device::Cpu).unwrap().dims(), shape, "{rel}: {name}");
        }
    }
}

#[test]
fn crafted_state_dicts_load() {
    // {'w': t, 'tied': t (memo), 'n': {'x': 1-element view}} beside a state_dict-less root.
    let mut p = Pkl::new();
    p.op(b'}').op(b'(').str("w").tensor(&t23()).put(1).str("tied").get(1);
    p.str("n").dict(&[("x", &|p| {
        p.tensor(&T { offset: 5, shape: vec![1], stride: vec![1], ..t23() });
    })]);
    p.str("skipped: a list").raw(b"]");
    p.int(7).tensor(&T { shape: vec![3], stride: vec![1], ..t23() }); // an integer key
    let pkl = p.op(b'u').stop();
    let t = open_bytes(&archive(&pkl)).unwrap();
    assert_eq!(names(&t), ["7", "n.x", "tied", "w"]);
    assert_eq!(values(&t, "tied"), values(&t, "w"));
    assert_eq!(values(&t, "n.x"), [5.0]);
    assert_eq!(values(&t, "7"), [0.0, 1.0, 2.0]);

    // Nested 900 dicts deep (under the limit): one long dotted name.
    let mut p = Pkl::new();
    for _ in 0..900 {
        p.op(b'}').str("a");
    }
    p.tensor(&t23());
    for _ in 0..900 {
        p.op(b's');
    }
    let pkl = p.stop();
    let t = small_stack(move || open_bytes(&archive(&pkl)).map(|t| names(&t)));
    assert_eq!(t.unwrap(), [vec!["a"; 900].join(".")]);
}

#[test]
fn the_fuzz_target_reads_the_seeds_and_survives_mutations() {
    let seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(repo_path(SEEDS))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "md"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    assert!(seeds.len() >= 4);
    let pkl = &seeds.iter().find(|(n, _)| n == "tiny-state-dict.pkl").unwrap().1;
    let (as_pickle, _) = fuzz_parse(pkl);
    assert_eq!(as_pickle.unwrap(), 11, "the state dict pickle lists its tensors");
    let ckpt = &seeds.iter().find(|(n, _)| n == "tiny-checkpoint.ckpt").unwrap().1;
    let (_, as_archive) = fuzz_parse(ckpt);
    assert_eq!(as_archive.unwrap(), 11, "the archive loads every tensor");

    // Every prefix and many deterministic byte mutations of every seed: errors, never panics.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut runs = 0;
    for (_, seed) in &seeds {
        for cut in (0..seed.len()).step_by(7) {
            let _ = fuzz_parse(&seed[..cut]);
            runs += 1;
        }
        for _ in 0..1500 {
            let mut bytes = seed.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % bytes.len() as u64) as usize;
                bytes[i] = match next() % 4 {
                    0 => 0,
                    1 => 0xff,
                    2 => bytes[i].wrapping_add(1),
                    _ => next() as u8,
                };
            }
            let _ = fuzz_parse(&bytes);
            runs += 1;
        }
    }
    eprintln!("{runs} fuzz inputs survived");
}

// ----- attack 1: globals that would run code, anywhere ------------------------------------------------

#[test]
fn a_code_global_beside_the_state_dict_is_refused() {
    // {'state_dict': {'w': t}, 'hook': posix.system('echo pwned')}: the weights are fine, the
    // metadata beside them would run a shell under torch.load.
    let mut p = Pkl::new();
    p.dict(&[
        ("state_dict", &|p| {
            p.dict(&[("w", &|p| {
                p.tensor(&t23());
            })]);
        }),
        ("hook", &|p| {
            p.global("posix", "system").str("echo pwned").op(0x85).op(b'R');
        }),
    ]);
    refused("posix.system beside state_dict", &p.stop(), &["posix.system", "refusing"]);
}

#[test]
fn a_code_global_left_below_the_root_is_refused() {
    // posix.system('echo pwned') built and left on the stack under the real root.
    let mut p = Pkl::new();
    p.global("posix", "system").str("echo pwned").op(0x85).op(b'R');
    p.dict(&[("w", &|p| {
        p.tensor(&t23());
    })]);
    refused("posix.system below the root", &p.stop(), &["posix.system"]);
    // Named only, never called, and popped again: still refused.
    let mut p = Pkl::new();
    p.global("subprocess", "Popen").op(b'0');
    p.dict(&[("w", &|p| {
        p.tensor(&t23());
    })]);
    refused("subprocess.Popen popped", &p.stop(), &["subprocess.Popen"]);
}

#[test]
fn every_way_to_name_a_code_global_is_refused() {
    for (module, name) in [
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("__builtin__", "eval"),
        ("subprocess", "Popen"),
        ("os", "system"),
        ("nt", "system"),
        ("torch", "load"),
        ("collections", "defaultdict"),
        ("torch._utils", "_rebuild_tensor_v2x"),
    ] {
        // GLOBAL, inside the state dict.
        let mut p = Pkl::new();
        p.dict(&[("w", &|p| {
            p.global(module, name).str("x").op(0x85).op(b'R');
        })]);
        let expected = format!("`{module}.{name}`");
        refused(&format!("GLOBAL {expected}"), &p.stop(), &[&expected, "GLOBAL"]);
        // STACK_GLOBAL (protocol 4), beside a tensor.
        let mut p = Pkl::new();
        p.dict(&[
            ("w", &|p| {
                p.tensor(&t23());
            }),
            ("x", &|p| {
                p.str(module).str(name).op(0x93);
            }),
        ]);
        refused(&format!("STACK_GLOBAL {expected}"), &p.stop(), &[&expected, "STACK_GLOBAL"]);
    }
    // A name smuggling a newline (GLOBAL would split it; STACK_GLOBAL keeps it): shown escaped.
    let pkl = Pkl::new().str("torch._utils\n_rebuild_tensor_v2").str("x").op(0x93).stop();
    refused("STACK_GLOBAL with a newline", &pkl, &["`torch._utils\\n_rebuild_tensor_v2.x`"]);
    // STACK_GLOBAL needs strings.
    let pkl = Pkl::new().int(1).int(2).op(0x93).stop();
    refused("STACK_GLOBAL of ints", &pkl, &["not strings"]);
}

#[test]
fn reduce_build_and_newobj_apply_to_allowed_globals_only() {
    // REDUCE on a string, NEWOBJ on a dict, BUILD on a plain dict / list / tensor storage tuple.
    let pkl = Pkl::new().str("posix.system").str("x").op(0x85).op(b'R').stop();
    refused("REDUCE on a string", &pkl, &["REDUCE", "a string"]);
    let pkl = Pkl::new().op(b'}').op(b')').op(0x81).stop();
    refused("NEWOBJ on a dict", &pkl, &["NEWOBJ", "a dict"]);
    let pkl = Pkl::new().op(b'}').op(b'}').op(b'b').stop();
    refused("BUILD on a dict", &pkl, &["BUILD", "a dict"]);
    let pkl = Pkl::new().op(b']').op(b'N').op(b'b').stop();
    refused("BUILD on a list", &pkl, &["BUILD", "a list"]);
    // REDUCE whose arguments are not a tuple.
    let pkl = Pkl::new().global("collections", "OrderedDict").op(b'N').op(b'R').stop();
    refused("REDUCE with None", &pkl, &["REDUCE", "not a tuple"]);
    // An allowed global's BUILD is accepted (a state dict's `_metadata`), and ignored.
    let mut p = Pkl::new();
    p.global("collections", "OrderedDict").op(b')').op(b'R').op(b'(').str("w").tensor(&t23()).op(b'u');
    p.op(b'}').str("_metadata").op(b'}').op(b's').op(b'b');
    let t = open_bytes(&archive(&p.stop())).unwrap();
    assert_eq!(names(&t), ["w"]);
}

#[test]
fn opcodes_beyond_torch_save_are_refused_by_name() {
    for (op, name, tail) in [
        (b'i', "INST", &b"posix\nsystem\n"[..]),
        (b'o', "OBJ", b""),
        (b'P', "PERSID", b"0\n"),
        (0x82, "EXT1", b"\x01"),
        (0x83, "EXT2", b"\x01\x00"),
        (0x84, "EXT4", b"\x01\x00\x00\x00"),
        (0x92, "NEWOBJ_EX", b""),
        (b'S', "STRING", b"'x'\n"),
        (b'V', "UNICODE", b"x\n"),
        (b'F', "FLOAT", b"1.0\n"),
        (b'g', "GET", b"0\n"),
        (0x97, "NEXT_BUFFER", b""),
        (0xff, "unknown", b""),
    ] {
        let pkl = Pkl::new().op(b'(').op(op).raw(tail).stop();
        refused(name, &pkl, &[name, &format!("0x{op:02x}")]);
    }
}

// ----- attack 2: billion laughs -----------------------------------------------------------------------

#[test]
fn billion_laughs_are_shared_not_copied() {
    // l0 = ['lol'] * 10; l(i+1) = [l(i)] * 10, 9 levels: 10^10 strings if memo entries were copied.
    let mut laughs = Pkl::new();
    laughs.op(b']').put(0).op(b'(');
    for _ in 0..10 {
        laughs.str("lol");
    }
    laughs.op(b'e');
    for level in 1..10u8 {
        laughs.op(b']').put(level).op(b'(');
        for _ in 0..10 {
            laughs.get(level - 1);
        }
        laughs.op(b'e');
    }
    // Beside the state dict and inside it (a list value: never walked).
    let mut p = laughs.clone();
    p.op(b'0').dict(&[
        ("state_dict", &|p| {
            p.dict(&[
                ("w", &|p| {
                    p.tensor(&t23());
                }),
                ("laughs", &|p| {
                    p.get(9);
                }),
            ]);
        }),
        ("laughs", &|p| {
            p.get(9);
        }),
    ]);
    let pkl = p.stop();
    assert!(pkl.len() < 1000, "{} bytes", pkl.len());
    let start = std::time::Instant::now();
    let t = open_bytes(&archive(&pkl)).unwrap();
    assert_eq!(names(&t), ["w"]);
    assert!(start.elapsed().as_secs() < 5, "took {:?}", start.elapsed());

    // The same with dicts: d0 = {'w': t}; d(i+1) = {'a': d(i), ..., 'j': d(i)}: 10^9 tensor names.
    let mut p = Pkl::new();
    p.dict(&[("w", &|p| {
        p.tensor(&t23());
    })])
    .put(0);
    for level in 1..10u8 {
        p.op(b'}').op(b'(');
        for key in "abcdefghij".chars() {
            p.str(&key.to_string()).get(level - 1);
        }
        p.op(b'u').put(level);
    }
    let pkl = p.stop();
    assert!(pkl.len() < 1000, "{} bytes", pkl.len());
    refused("dict laughs", &pkl, &["billion laughs", "shared references"]);
}

#[test]
fn copying_a_big_dict_again_and_again_is_bounded() {
    // d = {1: 1, ...}: 200 000 entries in a few bytes each, then OrderedDict(d) built 50 times.
    let mut p = Pkl::new();
    p.op(b'}').put(0).op(b'(').int(1);
    for _ in 0..200_000 {
        p.op(b'2').op(b'2'); // DUP DUP
    }
    p.op(b'0').op(b'u'); // an even count
    p.global("collections", "OrderedDict").put(1).get(0).op(0x85).put(2).op(b'0');
    for _ in 0..50 {
        p.get(1).get(2).op(b'R').op(b'0');
    }
    let pkl = p.op(b'}').stop();
    // 50 copies of 200 000 entries is 10^7 objects: over the limit, refused.
    refused("repeated OrderedDict copies", &pkl, &["objects"]);
}

// ----- attack 3: deep nesting -------------------------------------------------------------------------

#[test]
fn a_million_levels_deep_is_refused_at_the_limit_without_recursion() {
    const N: usize = 1_000_000;
    // [[[[...]]]]: N empty lists, then N - 1 APPENDs.
    let mut lists = Pkl::new();
    lists.raw(&vec![b']'; N]).raw(&vec![b'a'; N - 1]);
    // ((((...)))): N nested MARKs.
    let mut marks = Pkl::new();
    marks.raw(&vec![b'('; N]).raw(&vec![b't'; N]);
    // (((None,),),): N TUPLE1s, each a level.
    let mut tuples = Pkl::new();
    tuples.op(b'N').raw(&vec![0x85; N]);
    // {'a': {'a': ...}}: N nested dicts by SETITEM.
    let mut dicts = Pkl::new();
    for _ in 0..N {
        dicts.op(b'}').str("a");
    }
    dicts.op(b'N').raw(&vec![b's'; N]);
    for (what, p, needle) in [
        ("lists", lists, "1000 levels"),
        ("marks", marks, "MARK"),
        ("tuples", tuples, "1000 levels"),
        ("dicts", dicts, "1000 levels"),
    ] {
        let pkl = p.clone().stop();
        let err = small_stack(move || open_bytes(&archive(&pkl)).err());
        let err = err.unwrap_or_else(|| panic!("{what}: accepted"));
        eprintln!("{what}: {err}");
        assert!(err.contains(needle) && err.contains("1000"), "{what}: {err}");
    }
}

#[test]
fn cycles_and_self_references_end() {
    // A list appended to itself, a dict set as its own value (walked: a cycle in the dict tree).
    let pkl = Pkl::new().op(b']').op(b'2').op(b'a').op(b'2').op(b'a').stop();
    let t = small_stack(move || open_bytes(&archive(&pkl)).map(|t| names(&t)));
    assert_eq!(t.unwrap(), Vec::<String>::new());
    let mut p = Pkl::new();
    p.op(b'}').put(0).str("w").tensor(&t23()).op(b's').str("self").get(0).op(b's');
    let pkl = p.stop();
    let err = small_stack(move || open_bytes(&archive(&pkl)).err()).expect("a dict cycle is refused");
    assert!(err.contains("`self` contains itself (a reference cycle)"), "{err}");
    // Two dicts holding each other.
    let mut p = Pkl::new();
    p.op(b'}').put(0).op(b'}').put(1).str("a").get(0).op(b's').op(b'0').str("b").get(1).op(b's');
    let err = open_bytes(&archive(&p.stop())).err().expect("a two-dict cycle is refused");
    assert!(err.contains("`b.a` contains itself"), "{err}");
}

// ----- attack 4: offsets, sizes and lengths from the file ---------------------------------------------

#[test]
fn storage_offsets_shapes_and_strides_are_checked_against_the_bytes() {
    let one = |t: T| {
        Pkl::new()
            .dict(&[("w", &move |p: &mut Pkl| {
                p.tensor(&t);
            })])
            .stop()
    };
    // The 2**62 storage offset that wrapped to 0.
    refused("offset 2**62", &one(T { offset: 1 << 62, ..t23() }), &["`w`", "offset 4611686018427387904", "storage"]);
    refused("offset past the end", &one(T { offset: 1, ..t23() }), &["`w`", "offset 1", "6 elements"]);
    // Storage element counts whose byte size overflows, or that the record does not hold.
    refused("numel 2**62", &one(T { numel: 1 << 62, ..t23() }), &["`w`", "4611686018427387904 elements", "overflows"]);
    refused("numel 7", &one(T { numel: 7, ..t23() }), &["`w`", "7 elements", "holds 24 bytes"]);
    // Shapes whose size overflows; strides past the storage.
    let huge = T { shape: vec![1 << 32, 1 << 32, 1 << 32], stride: vec![0, 0, 0], ..t23() };
    refused("shape overflow", &one(huge), &["`w`", "overflows"]);
    refused("stride 2**62", &one(T { stride: vec![1 << 62, 1], ..t23() }), &["`w`", "4611686018427387904", "storage"]);
    refused("stride overflow", &one(T { shape: vec![3, 3], stride: vec![i64::MAX, i64::MAX], ..t23() }), &["`w`"]);
    // Negative and non-integer values.
    refused("negative offset", &one(T { offset: -1, ..t23() }), &["`w`", "negative"]);
    refused("negative dimension", &one(T { shape: vec![-2, 3], ..t23() }), &["`w`", "negative"]);
    refused("rank mismatch", &one(T { stride: vec![1], ..t23() }), &["`w`", "rank"]);
    let big = T { shape: vec![1; 100], stride: vec![1; 100], ..t23() };
    refused("rank 100", &one(big), &["`w`", "100 dimensions"]);
    // A storage the archive lacks, and an unsupported storage type.
    refused("missing storage", &one(T { key: "9", ..t23() }), &["`w`", "archive/data/9", "missing"]);
    refused("bool storage", &one(T { storage_type: "BoolStorage", ..t23() }), &["`w`", "torch.BoolStorage"]);
    // An empty tensor needs no bytes, wherever its offset.
    let t = open_bytes(&archive(&one(T { shape: vec![0, 3], offset: 1 << 40, ..t23() }))).unwrap();
    assert_eq!(t.load("w", &Device::Cpu).unwrap().dims(), [0, 3]);
    // Column-major strides load transposed.
    let t = open_bytes(&archive(&one(T { shape: vec![3, 2], stride: vec![1, 3], ..t23() }))).unwrap();
    assert_eq!(values(&t, "w"), [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
}

#[test]
fn every_length_in_the_stream_is_bounded_by_the_bytes_left() {
    for (what, bytes) in [
        ("BINUNICODE 4 GiB", &b"X\xff\xff\xff\xff"[..]),
        ("BINUNICODE8 2**63", b"\x8d\x00\x00\x00\x00\x00\x00\x00\x80"),
        ("BINBYTES8", b"\x8e\xff\xff\xff\xff\xff\xff\xff\xff"),
        ("BINSTRING negative", b"T\xff\xff\xff\xff"),
        ("LONG4 2 GiB", b"\x8b\xff\xff\xff\x7f"),
        ("FRAME 2**64-1", b"\x95\xff\xff\xff\xff\xff\xff\xff\xff"),
        ("BININT cut", b"J\x01"),
        ("SHORT_BINUNICODE cut", b"\x8c\x05ab"),
        ("GLOBAL without newline", b"cposix"),
        ("no STOP", b"N"),
        ("BINGET unset", b"h\x07"),
        ("pop from empty", b"0"),
        ("APPEND to None", b"NNa"),
        ("SETITEMS odd", b"}(Nu"),
        ("TUPLE without MARK", b"t"),
        ("STOP empty", b"."),
        ("protocol 9", b"\x80\x09"),
    ] {
        let mut pkl = vec![0x80, 2];
        pkl.extend_from_slice(bytes);
        let err = open_bytes(&archive(&pkl)).err().unwrap_or_else(|| panic!("{what}: accepted"));
        eprintln!("{what}: {err}");
        assert!(err.contains("archive/data.pkl"), "{what}: {err}");
        let (as_pickle, _) = fuzz_parse(&pkl);
        assert!(as_pickle.is_err(), "{what}");
    }
    // A MARK frame cannot be popped through.
    let pkl = Pkl::new().op(b'N').op(b'(').op(0x85).stop();
    refused("TUPLE1 across a MARK", &pkl, &["underflow"]);
}

#[test]
fn archive_level_damage_is_refused() {
    let good = archive(
        &Pkl::new()
            .dict(&[("w", &|p| {
                p.tensor(&t23());
            })])
            .stop(),
    );
    assert_eq!(names(&open_bytes(&good).unwrap()), ["w"]);
    // Cut anywhere: an error, never a panic or a read past the end.
    for cut in 0..good.len() {
        assert!(fuzz_parse(&good[..cut]).1.is_err(), "cut at {cut} accepted");
    }
    // A big-endian archive, and one without a data.pkl.
    let mut big = torch_zip("archive", &Pkl::new().op(b'}').stop(), &[], SERIALIZATION_ID);
    let at = big.windows(6).position(|w| w == b"little").unwrap();
    big[at..at + 6].copy_from_slice(b"big\0\0\0");
    let err = open_bytes(&big).err().unwrap();
    assert!(err.contains("byte order"), "{err}");
    let mut no_pkl = good.clone();
    let at = no_pkl.windows(8).position(|w| w == b"data.pkl").unwrap();
    no_pkl[at] = b'D';
    let at = no_pkl.windows(8).rposition(|w| w == b"data.pkl").unwrap();
    no_pkl[at] = b'D';
    let err = open_bytes(&no_pkl).err().unwrap();
    assert!(err.contains("without a data.pkl"), "{err}");
}

// ----- attack 5 (a valid file): archive folder names of every length ----------------------------------

/// (data.pkl, storage "0") of an ordinary little state dict.
fn small_state_dict() -> Vec<u8> {
    Pkl::new()
        .global("collections", "OrderedDict")
        .op(b')')
        .op(b'R')
        .op(b'(')
        .str("w")
        .tensor(&t23())
        .str("b")
        .tensor(&T { offset: 4, shape: vec![2], stride: vec![1], ..t23() })
        .op(b'u')
        .stop()
}

#[test]
fn our_zip_writer_is_torch_save_byte_for_byte() {
    // A torch.save archive saved as `my_embedding_v2_final.pt` (folder name: 21 characters).
    let torch_file = std::fs::read(repo_path(&format!("{SEEDS}/my_embedding_v2_final.pt"))).unwrap();
    let config = zip::read::Config { archive_offset: zip::read::ArchiveOffset::Known(0) };
    let mut zip = zip::ZipArchive::with_config(config, std::io::Cursor::new(&torch_file)).unwrap();
    let mut record = |name: &str| {
        let mut out = Vec::new();
        zip.by_name(&format!("my_embedding_v2_final/{name}")).unwrap().read_to_end(&mut out).unwrap();
        out
    };
    let (pkl, data0, id) = (record("data.pkl"), record("data/0"), record(".data/serialization_id"));
    let ours = torch_zip("my_embedding_v2_final", &pkl, &[("0", &data0)], &id);
    assert!(ours == torch_file, "the test's torch.save writer differs from torch's output");
    // It loads (it failed with "Invalid Central Directory header").
    let t = PickleTensors::open(&repo_path(&format!("{SEEDS}/my_embedding_v2_final.pt"))).unwrap();
    assert_eq!(values(&t, "w"), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
}

#[test]
fn torch_archives_load_whatever_their_folder_name_length() {
    let pkl = small_state_dict();
    let alphabet: Vec<char> = "my_embedding-v2.final0123456789".chars().collect();
    let dir = tempfile::tempdir().unwrap();
    let mut expected: Option<HashMap<String, Vec<f32>>> = None;
    for n in 1..=80 {
        let folder: String = (0..n).map(|i| alphabet[i % alphabet.len()]).collect();
        let bytes = torch_zip(&folder, &pkl, &[("0", &storage0())], SERIALIZATION_ID);
        let path = write(dir.path(), &format!("{folder}.pt"), &bytes);
        let t = PickleTensors::open(&path).unwrap_or_else(|e| panic!("folder name of {n} characters: {e}"));
        let got: HashMap<String, Vec<f32>> = names(&t).into_iter().map(|k| (k.clone(), values(&t, &k))).collect();
        match &expected {
            None => expected = Some(got),
            Some(e) => assert_eq!(&got, e, "folder name of {n} characters"),
        }
    }
    let expected = expected.unwrap();
    assert_eq!(expected["w"], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(expected["b"], [4.0, 5.0]);
}

#[test]
fn loaded_tensors_match_candle_for_the_sd_fixture() {
    // Shapes and dtypes read from the fp16 SD fixture agree with its safetensors twin's.
    let ckpt = PickleTensors::open(&repo_path("tests/fixtures/checkpoints/sd1-tiny.ckpt")).unwrap();
    let st = candle_core::safetensors::load(repo_path("tests/fixtures/checkpoints/sd1-tiny.safetensors"), &Device::Cpu)
        .unwrap();
    let mut compared = 0;
    for (name, shape, _) in ckpt.tensors() {
        if let Some(t) = st.get(name) {
            assert_eq!(t.dims(), shape, "{name}");
            let a: Tensor = ckpt.load(name, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
            let b = t.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
            let diff =
                (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{name}");
            compared += 1;
        }
    }
    assert!(compared > 100, "{compared} tensors compared");
}
