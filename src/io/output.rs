//! Writing outputs only where asked, exclusively and all-or-nothing.
//!
//! An [`OutputFiles`] set stages each output in a temporary file created exclusively (`O_EXCL`, a
//! random name) in the target's directory, so no file or symlink planted there is followed; a
//! target must be absent or a regular file (a symlink, directory, FIFO, device or socket is refused,
//! never replaced). [`OutputFiles::commit`] checks every target again and renames the temporary
//! files into place; a set dropped before it commits removes its temporary files, so a failure
//! while writing any output leaves none of them behind.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::input::describe;
use crate::{Error, Result};

/// Outputs written to temporary files, waiting to be moved into place together.
#[derive(Default)]
pub struct OutputFiles {
    staged: Vec<Staged>,
}

struct Staged {
    /// Where the output goes, as given.
    target: PathBuf,
    /// The target's canonical directory and file name, to tell two stagings of one file apart.
    key: (PathBuf, OsString),
    /// The finished temporary file (removed when dropped).
    temp: tempfile::TempPath,
}

/// What is at an output path now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existing {
    Nothing,
    RegularFile,
}

/// The directory an output path is in ("." for a bare name) and its file name, checking that the
/// path names a file and the directory exists.
pub fn split_output_path(path: &Path) -> Result<(PathBuf, OsString)> {
    let names_dir = path.as_os_str().to_string_lossy().ends_with(std::path::MAIN_SEPARATOR);
    let name = match path.file_name() {
        Some(name) if !names_dir => name.to_os_string(),
        _ => return Err(Error::invalid(format!("{}: not a file path (it names a directory)", path.display()))),
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match std::fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => Ok((dir, name)),
        Ok(meta) => Err(Error::invalid(format!(
            "{}: {} is {}, not a directory",
            path.display(),
            dir.display(),
            describe(&meta.file_type())
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(Error::invalid(format!("{}: output directory {} does not exist", path.display(), dir.display())))
        }
        Err(e) => Err(Error::io(&dir, e)),
    }
}

/// Checks that `path` can be written as an output: its directory exists and it is absent or a
/// regular file (a symlink is refused even when it points to one). Lets a caller refuse a bad
/// output path before doing the work whose result it is.
pub fn check_output_path(path: &Path) -> Result<()> {
    split_output_path(path)?;
    existing(path).map(|_| ())
}

/// What is at `path`, refusing anything an output may not replace.
fn existing(path: &Path) -> Result<Existing> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_file() => Ok(Existing::RegularFile),
        Ok(meta) => {
            let file_type = meta.file_type();
            let why = if file_type.is_symlink() {
                "outputs are never written through or over a symbolic link"
            } else if file_type.is_dir() {
                "expected a file path"
            } else {
                "outputs are written only as new files or over regular files"
            };
            Err(Error::invalid(format!("{}: is {}; {why}", path.display(), describe(&file_type))))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Existing::Nothing),
        Err(e) => Err(Error::io(path, e)),
    }
}

impl OutputFiles {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The targets staged so far, in order.
    pub fn targets(&self) -> impl Iterator<Item = &Path> {
        self.staged.iter().map(|s| s.target.as_path())
    }

    /// Writes the output for `path` into a new temporary file beside it with `write` (given the
    /// open file; it need not flush). Refuses a target that is not absent or a regular file, a
    /// missing directory and a target staged already.
    pub fn stage(&mut self, path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
        let (dir, name) = split_output_path(path)?;
        existing(path)?;
        let canonical_dir = std::fs::canonicalize(&dir).map_err(|e| Error::io(&dir, e))?;
        let key = (canonical_dir, name.clone());
        if self.staged.iter().any(|s| s.key == key) {
            return Err(Error::invalid(format!("{}: named twice as an output", path.display())));
        }
        // Keep the temporary name within NAME_MAX however long the target's name is.
        let prefix = format!(".{}.", name.to_string_lossy().chars().take(80).collect::<String>());
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".tmp");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // As File::create would: 0666 less the umask (tempfile's default is 0600).
            builder.permissions(std::fs::Permissions::from_mode(0o666));
        }
        let mut temp = builder.tempfile_in(&dir).map_err(|e| {
            Error::invalid(format!("{}: cannot create a temporary file in {}: {e}", path.display(), dir.display()))
        })?;
        write(temp.as_file_mut())?;
        temp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
        self.staged.push(Staged { target: path.to_path_buf(), key, temp: temp.into_temp_path() });
        Ok(())
    }

    /// Moves every staged output into place, once each target is checked again (still absent or a
    /// regular file). A target that was absent is created only if it still is (no rename over
    /// something that appeared meanwhile). If a move fails, the outputs this commit created are
    /// removed again and the remaining temporary files deleted.
    pub fn commit(mut self) -> Result<()> {
        let staged = std::mem::take(&mut self.staged);
        let states = staged.iter().map(|s| existing(&s.target)).collect::<Result<Vec<_>>>()?;
        let mut created: Vec<PathBuf> = Vec::new();
        for (s, state) in staged.into_iter().zip(states) {
            let moved = match state {
                Existing::RegularFile => s.temp.persist(&s.target),
                Existing::Nothing => s.temp.persist_noclobber(&s.target),
            };
            if let Err(e) = moved {
                for path in &created {
                    let _ = std::fs::remove_file(path);
                }
                return Err(Error::invalid(format!(
                    "{}: could not move the output into place: {}",
                    s.target.display(),
                    e.error
                )));
            }
            if state == Existing::Nothing {
                created.push(s.target);
            }
        }
        Ok(())
    }
}

/// Writes the single output `path` with `write` through a one-file [`OutputFiles`] set.
pub fn write_file(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let mut outputs = OutputFiles::new();
    outputs.stage(path, write)?;
    outputs.commit()
}

/// Writes `bytes` as the file `path` through [`write_file`].
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file(path, |file| std::io::Write::write_all(file, bytes).map_err(|e| Error::io(path, e)))
}

/// Writes `tensors` as a safetensors file to `file` (streamed, one tensor at a time), with the
/// optional `__metadata__`. Errors are strings for the caller to attach the path to.
pub fn write_safetensors(
    file: &mut File,
    tensors: Vec<(String, Tensor)>,
    metadata: Option<HashMap<String, String>>,
) -> std::result::Result<(), String> {
    use safetensors::View;
    use safetensors::tensor::{Metadata, TensorInfo};

    let mut tensors = tensors
        .into_iter()
        .map(|(name, t)| Ok((name, t.contiguous()?)))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(|e| e.to_string())?;
    let mut names = std::collections::HashSet::new();
    if let Some((name, _)) = tensors.iter().find(|(name, _)| !names.insert(name.as_str())) {
        return Err(format!("tensor `{name}` is given twice"));
    }
    // As the safetensors crate writes them: by descending alignment, then by name.
    tensors.sort_by(|(a, x), (b, y)| View::dtype(y).cmp(&View::dtype(x)).then(a.cmp(b)));
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(tensors.len());
    for (name, t) in &tensors {
        let len = t
            .elem_count()
            .checked_mul(t.dtype().size_in_bytes())
            .and_then(|n| offset.checked_add(n).map(|end| (n, end)))
            .ok_or("the tensors are too large")?;
        infos.push((
            name.clone(),
            TensorInfo { dtype: View::dtype(t), shape: t.dims().to_vec(), data_offsets: (offset, len.1) },
        ));
        offset = len.1;
    }
    let metadata = Metadata::new(metadata, infos).map_err(|e| e.to_string())?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| e.to_string())?;
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e: std::io::Error| e.to_string();
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for (_, t) in &tensors {
        w.write_all(&View::data(t)).map_err(io)?;
    }
    w.flush().map_err(io)
}

/// The process's file-creation mask (from /proc/self/status; 022 where it cannot be read).
#[cfg(unix)]
pub(crate) fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Umask:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// Renames the directory `from` to `to` unless `to` exists (as anything, a symlink included).
pub(crate) fn rename_dir_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
        let (from_c, to_c) = (c(from)?, c(to)?);
        // SAFETY: both are valid NUL-terminated paths that outlive the call.
        let rc = unsafe {
            libc::renameat2(libc::AT_FDCWD, from_c.as_ptr(), libc::AT_FDCWD, to_c.as_ptr(), libc::RENAME_NOREPLACE)
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if !matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
            return Err(err);
        }
    }
    // Without RENAME_NOREPLACE: check, then rename (a directory is never renamed over a file or a
    // symlink, only over an empty directory).
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
    }
    std::fs::rename(from, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    fn text(s: &'static str) -> impl FnOnce(&mut File) -> Result<()> {
        move |f| f.write_all(s.as_bytes()).map_err(|e| Error::io("x", e))
    }

    #[test]
    fn commits_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.txt"), dir.path().join("b.txt"));
        let mut set = OutputFiles::new();
        set.stage(&a, text("A")).unwrap();
        set.stage(&b, text("B")).unwrap();
        assert_eq!(names(dir.path()).len(), 2, "two temporary files");
        assert!(names(dir.path()).iter().all(|n| n.starts_with(".a.txt.") || n.starts_with(".b.txt.")));
        set.commit().unwrap();
        assert_eq!(names(dir.path()), ["a.txt", "b.txt"]);
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "A");

        // A failing writer, or a set dropped before commit, leaves nothing.
        let c = dir.path().join("c.txt");
        let mut set = OutputFiles::new();
        set.stage(&c, text("C")).unwrap();
        let err = set.stage(&dir.path().join("d.txt"), |_| Err(Error::invalid("boom"))).unwrap_err();
        assert_eq!(err.to_string(), "boom");
        drop(set);
        assert_eq!(names(dir.path()), ["a.txt", "b.txt"]);

        // Overwriting a regular file is allowed; the same target twice is not.
        let mut set = OutputFiles::new();
        set.stage(&a, text("A2")).unwrap();
        let again = dir.path().join(".").join("a.txt");
        assert!(set.stage(&again, text("A3")).unwrap_err().to_string().contains("named twice"));
        set.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "A2");
    }

    #[cfg(unix)]
    #[test]
    fn refuses_targets_that_are_not_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let link = dir.path().join("link.png");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let err = write_file(&link, text("x")).unwrap_err().to_string();
        assert!(err.contains("link.png: is a symbolic link"), "{err}");
        let dangling = dir.path().join("dangling.png");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(write_file(&dangling, text("x")).unwrap_err().to_string().contains("symbolic link"));
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(write_file(&sub, text("x")).unwrap_err().to_string().contains("is a directory"));
        // A FIFO stands for every special file (a test never risks /dev/null when run as root).
        let fifo = dir.path().join("fifo.png");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let err = write_file(&fifo, text("x")).unwrap_err().to_string();
        assert!(err.contains("fifo.png: is a FIFO (named pipe)"), "{err}");
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&std::fs::symlink_metadata(&fifo).unwrap().file_type()));
        let err = write_file(&dir.path().join("missing/out.png"), text("x")).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        let err = write_file(&victim.join("out.png"), text("x")).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(!dir.path().join("nowhere").exists());
        let mut left = names(dir.path());
        left.retain(|n| n.starts_with('.'));
        assert!(left.is_empty(), "temporary files left: {left:?}");

        // A target that turns into a symlink between staging and commit is refused then.
        let out = dir.path().join("out.txt");
        let mut set = OutputFiles::new();
        set.stage(&out, text("x")).unwrap();
        std::os::unix::fs::symlink(&victim, &out).unwrap();
        assert!(set.commit().unwrap_err().to_string().contains("symbolic link"));
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    }

    #[test]
    fn safetensors_written_by_hand_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let dev = candle_core::Device::Cpu;
        let a = Tensor::arange(0f32, 6., &dev).unwrap().reshape((2, 3)).unwrap();
        let b = Tensor::new(&[1u8, 2, 3], &dev).unwrap();
        let c = Tensor::new(&[1.5f64], &dev).unwrap().to_dtype(candle_core::DType::F16).unwrap();
        let tensors = vec![("b".to_string(), b), ("a".to_string(), a.clone()), ("c".to_string(), c)];
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_file(&path, |f| write_safetensors(f, tensors, Some(meta)).map_err(Error::invalid)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 3);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let back = candle_core::safetensors::load_buffer(&bytes, &dev).unwrap();
        assert_eq!(back["a"].to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert_eq!(back["b"].to_vec1::<u8>().unwrap(), [1, 2, 3]);
        let twice = vec![("a".to_string(), a.clone()), ("a".to_string(), a)];
        let err = write_file(&dir.path().join("u.safetensors"), |f| {
            write_safetensors(f, twice, None).map_err(Error::invalid)
        });
        assert!(err.unwrap_err().to_string().contains("given twice"));
        assert_eq!(names(dir.path()), ["t.safetensors"]);
    }
}
