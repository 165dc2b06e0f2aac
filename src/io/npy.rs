//! NumPy `.npy` files (format versions 1, 2 and 3), read with every size checked: the header's shape
//! is multiplied out with checked arithmetic and the data must be exactly as long as the shape and
//! dtype say (candle's `Tensor::read_npy` multiplies the shape with wrapping arithmetic, so a
//! header declaring a huge shape over a few bytes passes it and is read out of bounds later).
//!
//! Supported dtypes: `f2`, `f4`, `f8`, `i4`, `i8` (either byte order) and `u1`; C order, and Fortran
//! order (transposed into C order).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Element types of `.npy` data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    F16,
    F32,
    F64,
    I32,
    I64,
    U8,
}

impl Kind {
    fn size(self) -> usize {
        match self {
            Kind::U8 => 1,
            Kind::F16 => 2,
            Kind::F32 | Kind::I32 => 4,
            Kind::F64 | Kind::I64 => 8,
        }
    }
}

/// What a `.npy` header declares.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    kind: Kind,
    big_endian: bool,
    fortran_order: bool,
    shape: Vec<usize>,
    /// Where the data starts in the file.
    data_start: usize,
}

/// Reads the `.npy` file `path` (at most `max_bytes`, a regular file) as a tensor on `device`.
pub fn read_npy(path: &Path, max_bytes: u64, device: &Device) -> Result<Tensor> {
    let bytes = super::input::read_limited(path, max_bytes)?;
    parse_npy(&bytes, device)
        .map_err(|message| Error::Format { path: path.into(), message: format!("not a readable .npy file: {message}") })
}

/// Parses the bytes of a `.npy` file into a tensor on `device`; errors say what is wrong.
pub fn parse_npy(bytes: &[u8], device: &Device) -> std::result::Result<Tensor, String> {
    let header = parse_header(bytes)?;
    let count = header
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("shape {:?} has more elements than can be addressed", header.shape))?;
    let size = header.kind.size();
    let expected = count
        .checked_mul(size)
        .ok_or_else(|| format!("shape {:?} needs more bytes than can be addressed", header.shape))?;
    let data = &bytes[header.data_start..];
    if data.len() != expected {
        return Err(format!(
            "shape {:?} of {}-byte elements needs {expected} data bytes, the file has {}",
            header.shape,
            size,
            data.len()
        ));
    }
    // The element order: for Fortran order the data is the C-order array of the reversed shape.
    let stored_shape: Vec<usize> =
        if header.fortran_order { header.shape.iter().rev().copied().collect() } else { header.shape.clone() };
    let data: std::borrow::Cow<'_, [u8]> = if header.big_endian && size > 1 {
        data.chunks_exact(size).flat_map(|c| c.iter().rev().copied()).collect::<Vec<u8>>().into()
    } else {
        data.into()
    };
    let shape = stored_shape.as_slice();
    macro_rules! decode {
        ($t:ty) => {{
            let values: Vec<$t> = data
                .chunks_exact(size)
                .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunks have the element size")))
                .collect();
            Tensor::from_vec(values, shape, device)
        }};
    }
    let tensor = match header.kind {
        Kind::U8 => Tensor::from_vec(data.into_owned(), shape, device),
        Kind::F16 => decode!(half::f16),
        Kind::F32 => decode!(f32),
        Kind::F64 => decode!(f64),
        Kind::I32 => decode!(i32),
        Kind::I64 => decode!(i64),
    }
    .map_err(|e| e.to_string())?;
    if header.fortran_order && header.shape.len() > 1 {
        let axes: Vec<usize> = (0..header.shape.len()).rev().collect();
        return tensor.permute(axes).and_then(|t| t.contiguous()).map_err(|e| e.to_string());
    }
    Ok(tensor)
}

/// Reads the magic, version, header length and the header dict.
fn parse_header(bytes: &[u8]) -> std::result::Result<Header, String> {
    if !bytes.starts_with(MAGIC) {
        return Err("it does not start with the .npy magic \\x93NUMPY".into());
    }
    let (major, minor) = match bytes.get(6..8) {
        Some(v) => (v[0], v[1]),
        None => return Err("the file ends inside the format version".into()),
    };
    let len_bytes = match major {
        1 => 2,
        2 | 3 => 4,
        _ => return Err(format!("unsupported .npy format version {major}.{minor}")),
    };
    let header_start = 8 + len_bytes;
    let len_field = bytes.get(8..header_start).ok_or("the file ends inside the header length")?;
    let header_len = if len_bytes == 2 {
        u16::from_le_bytes([len_field[0], len_field[1]]) as usize
    } else {
        u32::from_le_bytes([len_field[0], len_field[1], len_field[2], len_field[3]]) as usize
    };
    let data_start = header_start.checked_add(header_len).ok_or("the header length overflows")?;
    let text = bytes.get(header_start..data_start).ok_or_else(|| {
        format!(
            "the header claims {header_len} bytes, the file has {} after the length field",
            bytes.len() - header_start
        )
    })?;
    // Versions 1 and 2 store the header in latin-1, 3 in UTF-8; the dict itself is ASCII.
    let text = std::str::from_utf8(text).map_err(|_| "the header is not text".to_string())?;
    let dict = parse_dict(text)?;
    let descr = match dict.get("descr") {
        Some(Literal::Str(s)) => s.as_str(),
        Some(Literal::List) => return Err("structured dtypes (a list `descr`) are not supported".into()),
        Some(_) => return Err("`descr` is not a string".into()),
        None => return Err("the header has no `descr`".into()),
    };
    let fortran_order = match dict.get("fortran_order") {
        Some(Literal::Bool(b)) => *b,
        Some(_) => return Err("`fortran_order` is not True or False".into()),
        None => return Err("the header has no `fortran_order`".into()),
    };
    let shape = match dict.get("shape") {
        Some(Literal::Tuple(dims)) => dims
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| format!("shape dimension {d} is too large")))
            .collect::<std::result::Result<Vec<_>, _>>()?,
        Some(_) => return Err("`shape` is not a tuple of integers".into()),
        None => return Err("the header has no `shape`".into()),
    };
    if let Some(key) = dict.keys().find(|k| !["descr", "fortran_order", "shape"].contains(&k.as_str())) {
        return Err(format!("the header has an unexpected key `{key}`"));
    }
    let (kind, big_endian) = parse_descr(descr)?;
    Ok(Header { kind, big_endian, fortran_order, shape, data_start })
}

/// A dtype string such as `<f4`: the element kind and whether it is big-endian.
fn parse_descr(descr: &str) -> std::result::Result<(Kind, bool), String> {
    let unsupported = || {
        format!(
            "unsupported dtype `{descr}` (supported: float16/32/64, int32/64 and uint8: <f2, <f4, <f8, <i4, <i8, |u1)"
        )
    };
    let mut chars = descr.chars();
    let order = chars.next().ok_or_else(unsupported)?;
    let kind = match chars.as_str() {
        "f2" => Kind::F16,
        "f4" => Kind::F32,
        "f8" => Kind::F64,
        "i4" => Kind::I32,
        "i8" => Kind::I64,
        "u1" => Kind::U8,
        _ => return Err(unsupported()),
    };
    let big_endian = match order {
        '<' => false,
        '>' => true,
        '=' => cfg!(target_endian = "big"),
        '|' if kind.size() == 1 => false,
        _ => return Err(unsupported()),
    };
    Ok((kind, big_endian))
}

/// A Python literal of a `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Literal {
    Str(String),
    Bool(bool),
    Tuple(Vec<u64>),
    /// A list (structured dtypes), not parsed further.
    List,
}

/// Parses the header's Python dict literal `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
fn parse_dict(text: &str) -> std::result::Result<HashMap<String, Literal>, String> {
    let mut p = Parser { s: text.as_bytes(), pos: 0 };
    p.expect(b'{')?;
    let mut dict = HashMap::new();
    loop {
        p.skip_ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.skip_ws();
        p.expect(b':')?;
        p.skip_ws();
        let value = p.value()?;
        if dict.insert(key.clone(), value).is_some() {
            return Err(format!("the header repeats the key `{key}`"));
        }
        p.skip_ws();
        if p.eat(b'}') {
            break;
        }
        p.expect(b',')?;
    }
    p.skip_ws();
    if p.pos != p.s.len() {
        return Err("the header has text after its dict".into());
    }
    Ok(dict)
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        let found = self.peek() == Some(c);
        if found {
            self.pos += 1;
        }
        found
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("malformed header: expected `{}` at byte {}", c as char, self.pos))
        }
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("malformed header: expected a string at byte {}", self.pos)),
        };
        self.pos += 1;
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c == quote {
                let s = std::str::from_utf8(&self.s[start..self.pos]).map_err(|_| "the header is not text")?;
                self.pos += 1;
                return Ok(s.to_string());
            }
            if c == b'\\' {
                return Err("malformed header: escapes in strings are not supported".into());
            }
            self.pos += 1;
        }
        Err("malformed header: unterminated string".into())
    }

    fn value(&mut self) -> std::result::Result<Literal, String> {
        match self.peek() {
            Some(b'\'' | b'"') => Ok(Literal::Str(self.string()?)),
            Some(b'(') => {
                self.pos += 1;
                let mut dims = Vec::new();
                loop {
                    self.skip_ws();
                    if self.eat(b')') {
                        break;
                    }
                    dims.push(self.integer()?);
                    self.skip_ws();
                    if self.eat(b')') {
                        break;
                    }
                    self.expect(b',')?;
                }
                Ok(Literal::Tuple(dims))
            }
            Some(b'[') => {
                // Skip to the matching `]` (nested lists and tuples, strings without escapes).
                let mut depth = 0usize;
                loop {
                    match self.peek() {
                        Some(b'[' | b'(') => depth += 1,
                        Some(b']' | b')') => {
                            depth -= 1;
                            if depth == 0 {
                                self.pos += 1;
                                return Ok(Literal::List);
                            }
                        }
                        Some(b'\'' | b'"') => {
                            self.string()?;
                            continue;
                        }
                        Some(_) => {}
                        None => return Err("malformed header: unterminated list".into()),
                    }
                    self.pos += 1;
                }
            }
            _ if self.s[self.pos..].starts_with(b"True") => {
                self.pos += 4;
                Ok(Literal::Bool(true))
            }
            _ if self.s[self.pos..].starts_with(b"False") => {
                self.pos += 5;
                Ok(Literal::Bool(false))
            }
            _ => Err(format!("malformed header: unexpected value at byte {}", self.pos)),
        }
    }

    fn integer(&mut self) -> std::result::Result<u64, String> {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        let digits = std::str::from_utf8(&self.s[start..self.pos]).expect("ASCII digits");
        if digits.is_empty() {
            return Err(format!("malformed header: expected a non-negative integer at byte {start}"));
        }
        // Python 2 wrote long integers with an `L` suffix.
        self.eat(b'L');
        digits.parse::<u64>().map_err(|_| format!("shape dimension {digits} is too large"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A .npy file (version 1) with `header` (the dict) over `data`.
    fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut header = dict.to_string();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut out = MAGIC.to_vec();
        out.extend([1, 0]);
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    fn floats(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn reads_c_and_fortran_order_and_other_dtypes() {
        let data = floats(&[1., 2., 3., 4., 5., 6.]);
        let t = parse_npy(&npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", &data), &Device::Cpu)
            .unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap(), [[1., 2., 3.], [4., 5., 6.]]);
        let t =
            parse_npy(&npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", &data), &Device::Cpu).unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap(), [[1., 3., 5.], [2., 4., 6.]]);
        let be: Vec<u8> = [1.5f64, -2.0].iter().flat_map(|x| x.to_be_bytes()).collect();
        let t =
            parse_npy(&npy("{'descr': '>f8', 'fortran_order': False, 'shape': (2,), }", &be), &Device::Cpu).unwrap();
        assert_eq!(t.to_vec1::<f64>().unwrap(), [1.5, -2.0]);
        let t = parse_npy(&npy("{'shape': (), 'fortran_order': False, 'descr': '|u1'}", &[9]), &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[] as &[usize]);
        let i: Vec<u8> = [3i64, -4].iter().flat_map(|x| x.to_le_bytes()).collect();
        let t =
            parse_npy(&npy("{'descr': '<i8', 'fortran_order': False, 'shape': (1L, 2L), }", &i), &Device::Cpu).unwrap();
        assert_eq!(t.to_vec2::<i64>().unwrap(), [[3, -4]]);
        let h: Vec<u8> = [half::f16::from_f32(0.5)].iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = parse_npy(&npy("{'descr': '<f2', 'fortran_order': False, 'shape': (1,), }", &h), &Device::Cpu).unwrap();
        assert_eq!(t.to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap(), [0.5]);
    }

    #[test]
    fn refuses_shapes_that_overflow_or_do_not_match_the_data() {
        let data = floats(&[0.; 16]);
        let err = |dict: &str, data: &[u8]| parse_npy(&npy(dict, data), &Device::Cpu).unwrap_err();
        // (2**60 + 1) * 16 * 4 wraps to 64 bytes in wrapping arithmetic.
        let e = err("{'descr': '<f4', 'fortran_order': False, 'shape': (1152921504606846977, 16), }", &data);
        assert!(e.contains("than can be addressed"), "{e}");
        let e = err("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387905, 4), }", &data);
        assert!(e.contains("than can be addressed"), "{e}");
        let e = err("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", &data);
        assert!(e.contains("too large"), "{e}");
        let e = err("{'descr': '<f4', 'fortran_order': False, 'shape': (17,), }", &data);
        assert!(e.contains("needs 68 data bytes, the file has 64"), "{e}");
        let e = err("{'descr': '<f4', 'fortran_order': False, 'shape': (15,), }", &data);
        assert!(e.contains("needs 60 data bytes"), "{e}");
        let e = err("{'descr': '<c8', 'fortran_order': False, 'shape': (8,), }", &data);
        assert!(e.contains("unsupported dtype `<c8`"), "{e}");
        let e = err("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (16,), }", &data);
        assert!(e.contains("structured"), "{e}");
        let e = err("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (16,), }", &data);
        assert!(e.contains("repeats the key"), "{e}");
        let e = err("{'descr': '<f4', 'shape': (16,), }", &data);
        assert!(e.contains("no `fortran_order`"), "{e}");
        let e = err("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }", &data);
        assert!(e.contains("non-negative integer"), "{e}");
        // Truncated files and header lengths past the end.
        let good = npy("{'descr': '<f4', 'fortran_order': False, 'shape': (16,), }", &data);
        for cut in [0, 5, 7, 9, 30] {
            assert!(parse_npy(&good[..cut], &Device::Cpu).is_err(), "cut at {cut}");
        }
        let mut long = good.clone();
        long[8..10].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(parse_npy(&long, &Device::Cpu).unwrap_err().contains("the header claims 65535 bytes"));
        let mut v3 = good.clone();
        v3[6] = 9;
        assert!(parse_npy(&v3, &Device::Cpu).unwrap_err().contains("version 9.0"));
    }

    #[test]
    fn reads_the_fixture_face_embedding_like_candle() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ip_adapter/face_embedding.npy");
        let ours = read_npy(&path, 1 << 20, &Device::Cpu).unwrap();
        let theirs = Tensor::read_npy(&path).unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        assert_eq!(ours.to_vec1::<f32>().unwrap(), theirs.to_vec1::<f32>().unwrap());
    }
}
