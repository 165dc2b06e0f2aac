//! Files in and out that cannot be abused: outputs are written only where asked (never through a
//! symlink, over a FIFO or device, or left half-written), inputs are read only from regular files
//! within size limits, and crafted headers (a .npy shape that overflows, a PNG declaring 100000²
//! pixels, a safetensors header repeating a key) are refused with one clear error line. Every input
//! is crafted here.
#![cfg(unix)]

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use common::repo_path;

const SD1: &str = "tests/fixtures/models/sd1-tiny";
const SD1_FILE: &str = "tests/fixtures/checkpoints/sd1-tiny.safetensors";
const FACEID: &str = "tests/fixtures/ip_adapter/ip-adapter-faceid_tiny.safetensors";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `diffctl args` with `stdout` as its standard output, failing the test if it has not
/// finished within `secs` seconds (a blocked open or read).
fn run_with(args: &[&str], stdout: Stdio, secs: u64) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_diffctl"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("run diffctl");
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("diffctl {args:?} did not finish within {secs} s: it blocked");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn run(args: &[&str]) -> Output {
    run_with(args, Stdio::piped(), 300)
}

/// A failure: non-zero exit (not a signal), one `error:` line mentioning every needle, no panic.
fn assert_fails(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code().is_some_and(|c| c != 0), "expected an error exit, got {:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one error line, got {stderr:?}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "stderr {stderr:?} should mention {needle:?}");
    }
}

fn assert_succeeds(out: &Output) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", path.display());
}

fn is_fifo(path: &Path) -> bool {
    std::fs::symlink_metadata(path).unwrap().file_type().is_fifo()
}

/// `generate` with the tiny model, one step, writing `extra`'s outputs.
fn generate(extra: &[&str]) -> Output {
    let model = repo_path(SD1);
    let mut args = vec!["generate", "--model", s(&model), "--prompt", "x", "--steps", "1", "--seed", "1"];
    args.extend_from_slice(extra);
    run(&args)
}

/// A safetensors file from raw (name, dtype, shape, data) entries, keys repeated as given.
fn safetensors_bytes(entries: &[(&str, &str, &[usize], Vec<u8>)]) -> Vec<u8> {
    let mut offset = 0;
    let mut fields = Vec::new();
    for (name, dtype, shape, data) in entries {
        fields.push(format!(
            "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{offset},{}]}}",
            offset + data.len()
        ));
        offset += data.len();
    }
    let mut header = format!("{{{}}}", fields.join(",")).into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    for (_, _, _, data) in entries {
        out.extend(data);
    }
    out
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A version-1 .npy file: `dict` padded so the data starts at a multiple of 64, then `data`.
fn npy_bytes(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut header = dict.to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

// ---------------------------------------------------------------------------------------------
// Outputs.

#[test]
fn outputs_are_never_written_through_a_fifo_or_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A FIFO as --output: refused (not opened for writing, which would block, nor replaced).
    let fifo = d.join("out.png");
    mkfifo(&fifo);
    assert_fails(&generate(&["--output", s(&fifo)]), &[s(&fifo), "is a FIFO"]);
    assert!(is_fifo(&fifo), "the FIFO must stay a FIFO");
    assert_eq!(listing(d), ["out.png"]);
    // A symlink as --output (to a file, or dangling): refused, its target untouched.
    let victim = d.join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    let link = d.join("link.png");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    assert_fails(&generate(&["--output", s(&link)]), &[s(&link), "symbolic link"]);
    let dangling = d.join("dangling.png");
    std::os::unix::fs::symlink(d.join("created-through-link.png"), &dangling).unwrap();
    assert_fails(&generate(&["--output", s(&dangling)]), &[s(&dangling), "symbolic link"]);
    // Also as --output-latents, beside a fine --output.
    let png = d.join("fine.png");
    assert_fails(&generate(&["--output", s(&png), "--output-latents", s(&link)]), &[s(&link), "symbolic link"]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(listing(d), ["dangling.png", "link.png", "out.png", "victim.txt"]);
    // preprocess refuses the same targets before reading its input.
    let photo = repo_path("tests/fixtures/images/camera.png");
    assert_fails(&run(&["preprocess", "grayscale", s(&photo), s(&fifo)]), &[s(&fifo), "is a FIFO"]);
    assert_fails(&run(&["preprocess", "grayscale", s(&photo), s(&link)]), &[s(&link), "symbolic link"]);
    assert_eq!(listing(d), ["dangling.png", "link.png", "out.png", "victim.txt"]);
}

#[test]
fn symlinks_planted_at_temporary_names_are_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let victim = d.join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    // The old predictable temporary names (`.NAME.PID.tmp`), for every PID a child could get soon,
    // and other plausible ones: temporary files are now created exclusively under random names.
    let first = std::process::id();
    let mut planted: Vec<String> = (first..first + 200).map(|pid| format!(".out.png.{pid}.tmp")).collect();
    planted.extend([".out.png.tmp".to_string(), ".out.png".to_string(), "out.png.tmp".to_string()]);
    for name in &planted {
        std::os::unix::fs::symlink(&victim, d.join(name)).unwrap();
    }
    let png = d.join("out.png");
    assert_succeeds(&generate(&["--output", s(&png)]));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "a planted symlink was followed");
    assert!(image::open(&png).is_ok());
    assert!(std::fs::symlink_metadata(&png).unwrap().file_type().is_file());
    for name in &planted {
        assert_eq!(std::fs::read_link(d.join(name)).unwrap(), victim);
    }
    assert_eq!(listing(d).len(), planted.len() + 2, "no temporary file left: {:?}", listing(d));
}

#[test]
fn an_output_that_is_a_directory_leaves_no_latents_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out_dir = d.join("images");
    std::fs::create_dir(&out_dir).unwrap();
    let latents = d.join("out.safetensors");
    assert_fails(&generate(&["--output", s(&out_dir), "--output-latents", s(&latents)]), &[s(&out_dir), "directory"]);
    assert_eq!(listing(d), ["images"]);
    assert!(listing(&out_dir).is_empty());
    // With a trailing slash too, and for a batch.
    let slash = format!("{}/", out_dir.display());
    assert_fails(&generate(&["--output", &slash, "--output-latents", s(&latents), "--batch", "2"]), &["directory"]);
    assert_eq!(listing(d), ["images"]);
}

#[test]
fn a_failing_second_image_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The second image's path is taken by a directory: the first image and the latents (both
    // written fine) must not appear either.
    let blocker = d.join("out-1.png");
    std::fs::create_dir(&blocker).unwrap();
    let latents = d.join("out.safetensors");
    let png = d.join("out.png");
    let out = generate(&["--batch", "2", "--output", s(&png), "--output-latents", s(&latents)]);
    assert_fails(&out, &[s(&blocker), "is a directory"]);
    assert_eq!(listing(d), ["out-1.png"]);
    assert!(listing(&blocker).is_empty());
    // Once the path is free, the whole batch is written.
    std::fs::remove_dir(&blocker).unwrap();
    assert_succeeds(&generate(&["--batch", "2", "--output", s(&png), "--output-latents", s(&latents)]));
    assert_eq!(listing(d), ["out-0.png", "out-1.png", "out.safetensors"]);
    // A regular file is replaced (atomically) by a new run.
    std::fs::write(d.join("out-0.png"), "old").unwrap();
    assert_succeeds(&generate(&["--batch", "2", "--output", s(&png)]));
    assert!(image::open(d.join("out-0.png")).is_ok());
    assert_eq!(listing(d), ["out-0.png", "out-1.png", "out.safetensors"]);
}

#[test]
fn convert_never_writes_through_symlinks_and_leaves_no_temporary_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = repo_path(SD1);
    let input = repo_path(SD1_FILE);
    let elsewhere = d.join("elsewhere");
    let link = d.join("model-link");
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    let out = run(&["convert", s(&input), s(&link), "--model-config", s(&config)]);
    assert_fails(&out, &[s(&link), "symbolic link"]);
    let file_link = d.join("model.safetensors");
    std::os::unix::fs::symlink(d.join("elsewhere.safetensors"), &file_link).unwrap();
    let out = run(&["convert", s(&input), s(&file_link), "--model-config", s(&config)]);
    assert_fails(&out, &[s(&file_link), "already exists"]);
    assert_eq!(listing(d), ["model-link", "model.safetensors"]);
    // A good conversion: the folder appears whole, with the permissions a new folder gets, and no
    // temporary folder is left.
    let folder = d.join("converted");
    assert_succeeds(&run(&["convert", s(&input), s(&folder), "--model-config", s(&config)]));
    assert_eq!(listing(d), ["converted", "model-link", "model.safetensors"]);
    assert!(folder.join("unet/diffusion_pytorch_model.safetensors").is_file());
    assert!(folder.join("tokenizer/vocab.json").is_file());
    let probe = d.join("probe");
    std::fs::create_dir(&probe).unwrap();
    let mode = |p: &Path| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions());
    assert_eq!(mode(&folder) & 0o777, mode(&probe) & 0o777);
    let single = d.join("single.safetensors");
    assert_succeeds(&run(&["convert", s(&folder), s(&single)]));
    assert_eq!(listing(d), ["converted", "model-link", "model.safetensors", "probe", "single.safetensors"]);
    let file = std::fs::File::open(&single).unwrap();
    // SAFETY: a file this test wrote and does not change.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    assert!(safetensors::SafeTensors::deserialize(&map).unwrap().len() > 10);
}

// ---------------------------------------------------------------------------------------------
// Inputs.

#[test]
fn fifo_device_and_directory_inputs_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out_dir = d.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let png = out_dir.join("out.png");
    let fifo = d.join("input.fifo");
    mkfifo(&fifo);
    assert_fails(&generate(&["--init-latents", s(&fifo), "--output", s(&png)]), &[s(&fifo), "is a FIFO"]);
    assert_fails(&generate(&["--init-latents", "/dev/zero", "--output", s(&png)]), &["/dev/zero", "character device"]);
    assert_fails(&generate(&["--init-latents", s(d), "--output", s(&png)]), &[s(d), "is a directory"]);
    assert_fails(&run(&["preprocess", "grayscale", s(&fifo), s(&png)]), &[s(&fifo), "is a FIFO"]);
    assert_fails(&run(&["preprocess", "grayscale", "/dev/zero", s(&png)]), &["/dev/zero", "character device"]);
    let out = run(&["preprocess", "keypoints", s(&fifo), s(&png)]);
    assert_fails(&out, &[s(&fifo), "is a FIFO"]);
    let faceid = repo_path(FACEID);
    let out = generate(&["--ip-adapter", s(&faceid), "--ip-face-embedding", s(&fifo), "--output", s(&png)]);
    assert_fails(&out, &[s(&fifo), "is a FIFO"]);
    assert!(listing(&out_dir).is_empty());
    assert!(is_fifo(&fifo));

    // The library readers, each on a thread so that a blocked open fails the test instead of hanging it.
    let within = |what: &str, f: Box<dyn FnOnce() -> String + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()).unwrap());
        let err = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("{what} blocked"));
        assert!(err.contains("is a FIFO (named pipe), expected a regular file"), "{what}: {err}");
    };
    let p = fifo.clone();
    within("read_json", Box::new(move || diffctl::io::read_json::<serde_json::Value>(&p).unwrap_err().to_string()));
    let p = fifo.clone();
    within("load_rgb", Box::new(move || diffctl::io::image::load_rgb(&p).unwrap_err().to_string()));
    let p = fifo.clone();
    within(
        "load_latents",
        Box::new(move || diffctl::io::latents::load_latents(&p, &Device::Cpu).unwrap_err().to_string()),
    );
    let p = fifo.clone();
    within(
        "read_embedding_file",
        Box::new(move || {
            diffctl::control::cross_attention::ip_adapter::read_embedding_file(&p, &Device::Cpu)
                .unwrap_err()
                .to_string()
        }),
    );
}

#[test]
fn bad_init_latents_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out_dir = d.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let png = out_dir.join("out.png");
    let file = |name: &str, bytes: Vec<u8>| {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let zero_batch = file("zero.safetensors", safetensors_bytes(&[("latents", "F32", &[0, 4, 4, 4], vec![])]));
    assert_fails(&generate(&["--init-latents", s(&zero_batch), "--output", s(&png)]), &[s(&zero_batch), "at least 1"]);
    let mut values = vec![0.5f32; 64];
    values[17] = f32::NAN;
    let nan = file("nan.safetensors", safetensors_bytes(&[("latents", "F32", &[1, 4, 4, 4], f32_bytes(&values))]));
    assert_fails(&generate(&["--init-latents", s(&nan), "--output", s(&png)]), &[s(&nan), "non-finite"]);
    values[17] = f32::INFINITY;
    let inf = file("inf.safetensors", safetensors_bytes(&[("latents", "F32", &[1, 4, 4, 4], f32_bytes(&values))]));
    assert_fails(&generate(&["--init-latents", s(&inf), "--output", s(&png)]), &[s(&inf), "non-finite"]);
    // Two tensors named `latents`: the safetensors crate would keep one silently.
    values[17] = 0.0;
    let other: Vec<f32> = values.iter().map(|v| v + 1.0).collect();
    let dup = file(
        "dup.safetensors",
        safetensors_bytes(&[
            ("latents", "F32", &[1, 4, 4, 4], f32_bytes(&values)),
            ("latents", "F32", &[1, 4, 4, 4], f32_bytes(&other)),
        ]),
    );
    assert_fails(&generate(&["--init-latents", s(&dup), "--output", s(&png)]), &[s(&dup), "duplicate key `latents`"]);
    // A header length past the end of the file, and one that overflows when 8 is added.
    let mut long = safetensors_bytes(&[("latents", "F32", &[1, 4, 4, 4], f32_bytes(&values))]);
    long[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let long = file("long.safetensors", long);
    assert_fails(&generate(&["--init-latents", s(&long), "--output", s(&png)]), &[s(&long), "header claims"]);
    assert!(listing(&out_dir).is_empty());
}

#[test]
fn a_png_declaring_a_huge_size_is_refused_before_decoding() {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        let mut body = kind.to_vec();
        body.extend(data);
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
        out
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut ihdr = Vec::new();
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, deflate, adaptive filter, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &[0x78, 0x01, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x01]));
    png.extend(chunk(b"IEND", &[]));
    let huge = d.join("huge.png");
    std::fs::write(&huge, &png).unwrap();
    let out_dir = d.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("out.png");
    assert_fails(&run(&["preprocess", "grayscale", s(&huge), s(&out)]), &[s(&huge), "16384 pixels a side"]);
    let err = diffctl::io::image::load_rgb(&huge).unwrap_err().to_string();
    assert!(err.contains("16384 pixels a side"), "{err}");
    // As generate's reference image too.
    let out = generate(&["--reference-image", s(&huge), "--output", s(&out)]);
    assert_fails(&out, &[s(&huge), "16384 pixels a side"]);
    assert!(listing(&out_dir).is_empty());
}

#[test]
fn an_npy_shape_that_overflows_is_refused_not_read_out_of_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 192 bytes: a header declaring (2**60 + 1, 16) float32 over 64 data bytes. In wrapping
    // arithmetic (2**60 + 1) * 16 * 4 is 64, so a reader that does not check overflow accepts it.
    let bytes = npy_bytes(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1152921504606846977, 16), }",
        &f32_bytes(&[0.25; 16]),
    );
    assert_eq!(bytes.len(), 192);
    let evil = d.join("face.npy");
    std::fs::write(&evil, &bytes).unwrap();
    let out_dir = d.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let png = out_dir.join("out.png");
    let faceid = repo_path(FACEID);
    let out = generate(&["--ip-adapter", s(&faceid), "--ip-face-embedding", s(&evil), "--output", s(&png)]);
    assert_fails(&out, &[s(&evil), "not a readable .npy file", "more elements than can be addressed"]);
    let read = |p: &Path| {
        diffctl::control::cross_attention::ip_adapter::read_embedding_file(p, &Device::Cpu).unwrap_err().to_string()
    };
    assert!(read(&evil).contains("more elements than can be addressed"));
    // Shapes that do not match the data, and a non-finite embedding.
    let write = |name: &str, dict: &str, data: &[u8]| -> PathBuf {
        let p = d.join(name);
        std::fs::write(&p, npy_bytes(dict, data)).unwrap();
        p
    };
    let short =
        write("short.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 32), }", &f32_bytes(&[0.; 16]));
    assert!(read(&short).contains("needs 128 data bytes, the file has 64"), "{}", read(&short));
    let empty = write("empty.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 16), }", &[]);
    assert!(read(&empty).contains("with no values"), "{}", read(&empty));
    let mut values = [0.5f32; 16];
    values[3] = f32::NAN;
    let nan = write("nan.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (16,), }", &f32_bytes(&values));
    assert!(read(&nan).contains("non-finite"), "{}", read(&nan));
    let out = generate(&["--ip-adapter", s(&faceid), "--ip-face-embedding", s(&nan), "--output", s(&png)]);
    assert_fails(&out, &[s(&nan), "non-finite"]);
    // The good fixture still reads.
    let good = repo_path("tests/fixtures/ip_adapter/face_embedding.npy");
    let t = diffctl::control::cross_attention::ip_adapter::read_embedding_file(&good, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), [16]);
    assert!(listing(&out_dir).is_empty());
}

#[test]
fn duplicate_keys_in_a_safetensors_header_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dup = d.join("dup.safetensors");
    let entries: [(&str, &str, &[usize], Vec<u8>); 2] =
        [("w", "F32", &[2], f32_bytes(&[1.0, 2.0])), ("w", "F32", &[2], f32_bytes(&[3.0, 4.0]))];
    std::fs::write(&dup, safetensors_bytes(&entries)).unwrap();
    assert_fails(&run(&["inspect", s(&dup)]), &[s(&dup), "duplicate key `w`"]);
    let err = diffctl::io::weights::TensorStore::open(&dup).err().unwrap().to_string();
    assert!(err.contains("duplicate key `w`"), "{err}");
    // As an embedding file too.
    let err =
        diffctl::control::cross_attention::ip_adapter::read_embedding_file(&dup, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("duplicate key `w`"), "{err}");
    // Repeated keys inside a tensor's entry count as well.
    let nested = d.join("nested.safetensors");
    let mut header = br#"{"w":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.to_vec();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    bytes.extend(f32_bytes(&[1.0, 2.0]));
    std::fs::write(&nested, bytes).unwrap();
    assert_fails(&run(&["inspect", s(&nested)]), &[s(&nested), "duplicate key `dtype`"]);
    // The same file without the repetition is fine.
    let fine = d.join("fine.safetensors");
    std::fs::write(&fine, safetensors_bytes(&entries[..1])).unwrap();
    assert_succeeds(&run(&["inspect", s(&fine)]));
}

// ---------------------------------------------------------------------------------------------
// Standard output.

#[test]
fn inspect_survives_a_closed_or_full_stdout() {
    let file = repo_path(SD1_FILE);
    // A pipe whose reading end is closed before diffctl writes (`diffctl inspect X | head -0`).
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created and are owned here alone.
    let (read_end, write_end) = unsafe {
        use std::os::fd::FromRawFd;
        (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1]))
    };
    drop(read_end);
    let out = run_with(&["inspect", s(&file)], Stdio::from(write_end), 120);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a closed pipe ends inspect quietly: {:?} {stderr}", out.status);
    assert!(stderr.is_empty(), "{stderr}");
    // A full device: the write error is reported, not panicked.
    if Path::new("/dev/full").exists() {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let out = run_with(&["inspect", s(&file)], Stdio::from(full), 120);
        assert_fails(&out, &["writing to standard output"]);
    }
    // And normally it prints.
    let out = run(&["inspect", s(&file)]);
    assert_succeeds(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("format: safetensors"));
}
