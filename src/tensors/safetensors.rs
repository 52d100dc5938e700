//! A strict safetensors reader over a memory map.
//!
//! The `safetensors` crate's loader keeps the last of two duplicate keys,
//! accepts unknown fields and misaligned offsets; an adapter file that relies
//! on any of those is either broken or crafted, so this reader refuses them.
//! Every number in the header is untrusted: sizes use checked arithmetic and
//! no byte range is used before it has been checked against the file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::{DType, FileRecord, TensorRef};
use crate::error::{Error, Result};

/// Largest header we read. The reference implementation uses the same cap;
/// real adapter headers are a few hundred kilobytes at most.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Bytes of the little-endian header length that opens every file.
const LEN_PREFIX: usize = 8;

/// Dtype names the safetensors format defines that we do not decode. They get
/// a clearer message than a name the format has never heard of.
const KNOWN_UNSUPPORTED_DTYPES: &[&str] = &[
    "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "F4", "F6_E2M3", "F6_E3M2", "C64",
];

/// Why a file is not a safetensors file we accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SafetensorsError {
    /// The file cannot even hold the 8-byte header length.
    #[error("file is {0} bytes long, too short for a safetensors header (at least 8 bytes)")]
    TooShort(u64),

    /// The declared header length is above [`MAX_HEADER_LEN`].
    #[error("header length {0} is above the limit of {MAX_HEADER_LEN} bytes")]
    HeaderTooLarge(u64),

    /// The header runs past the end of the file.
    #[error("header of {header_len} bytes does not fit in a file of {file_len} bytes")]
    HeaderPastEnd { header_len: u64, file_len: u64 },

    /// The header bytes are not UTF-8.
    #[error("header is not valid UTF-8 (at byte {valid_up_to})")]
    HeaderNotUtf8 { valid_up_to: usize },

    /// The header is not a JSON object (the message carries serde's line and
    /// column).
    #[error("header is not a valid JSON object: {0}")]
    HeaderJson(String),

    /// A key appears twice in the same JSON object.
    #[error("duplicate key {key:?} in {within}")]
    DuplicateKey { key: String, within: String },

    /// `__metadata__` is not an object of strings.
    #[error("__metadata__ must map strings to strings: {0}")]
    InvalidMetadata(String),

    /// A tensor entry is not exactly `{dtype, shape, data_offsets}` with the
    /// right JSON types.
    #[error("tensor {tensor:?}: {msg}")]
    InvalidEntry { tensor: String, msg: String },

    /// A dtype the format defines but that we do not read.
    #[error("unsupported dtype {dtype} in tensor {tensor:?} (supported: F64, F32, F16, BF16)")]
    UnsupportedDtype { tensor: String, dtype: String },

    /// A dtype name the format does not define.
    #[error("unknown dtype {dtype:?} in tensor {tensor:?}")]
    UnknownDtype { tensor: String, dtype: String },

    /// `data_offsets` has begin > end.
    #[error("tensor {tensor:?}: data_offsets [{begin}, {end}] end before they begin")]
    InvalidOffsets {
        tensor: String,
        begin: u64,
        end: u64,
    },

    /// numel x dtype size does not fit in memory arithmetic.
    #[error("tensor {tensor:?}: shape {shape:?} is too large to address")]
    SizeOverflow { tensor: String, shape: Vec<u64> },

    /// The byte range does not match numel x dtype size.
    #[error(
        "tensor {tensor:?}: {dtype} with shape {shape:?} needs {expected} bytes, \
         data_offsets give {actual}"
    )]
    SizeMismatch {
        tensor: String,
        dtype: &'static str,
        shape: Vec<usize>,
        expected: u64,
        actual: u64,
    },

    /// A tensor starts at an offset that is not a multiple of its element
    /// size (safetensors writers never produce this).
    #[error("tensor {tensor:?}: offset {begin} is not aligned to its {size}-byte elements")]
    Misaligned {
        tensor: String,
        begin: u64,
        size: usize,
    },

    /// Sorted by offset, a tensor does not start where the previous one ended.
    #[error(
        "tensor {tensor:?} starts at byte {begin} of the data but the previous tensor ends at \
         {expected} ({})",
        if begin > expected { "a hole" } else { "an overlap" }
    )]
    NotContiguous {
        tensor: String,
        begin: u64,
        expected: u64,
    },

    /// The tensors do not cover the data section exactly.
    #[error("tensors end at byte {end} of the data but the data section is {data_len} bytes")]
    DataLengthMismatch { end: u64, data_len: u64 },
}

/// One validated safetensors file, mapped.
#[derive(Debug, Clone)]
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub map: Arc<Mmap>,
    pub metadata: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, TensorRef>,
    /// Tensors of a dtype we do not decode (integer buffers such as BERT's
    /// `position_ids`), by name, with their dtype. Always empty for
    /// [`SafetensorsFile::open`], which refuses them.
    pub other: BTreeMap<String, String>,
    /// Which file was mapped (device, inode, size, change time).
    identity: Option<crate::hash::FileIdentity>,
}

impl SafetensorsFile {
    /// Map and validate `path`. Errors name the file.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        Self::open_with(path.as_ref(), false)
    }

    /// As [`SafetensorsFile::open`], but tensors of a byte-sized dtype we do
    /// not decode (integers, bool, fp8) are validated like the rest and
    /// listed in `other` instead of refused. For model checkpoints, which
    /// carry integer buffers.
    pub fn open_lenient(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        Self::open_with(path.as_ref(), true)
    }

    fn open_with(path: &Path, lenient: bool) -> Result<SafetensorsFile> {
        // A regular file only: a FIFO would block the open or the map, a
        // device could map endless bytes.
        let (file, len) = crate::layout::open_regular(path)?;
        // Checked before mapping: a zero-length file cannot be mapped, and a
        // short one gets the same clear message either way.
        if len < LEN_PREFIX as u64 {
            return Err(to_error(path, SafetensorsError::TooShort(len)));
        }
        // SAFETY: the map is read-only. Another process truncating or
        // rewriting the file while we hold the map is outside what any
        // reader can defend against (the Python library maps files the same
        // way); the hash we record is of the bytes we parsed.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        // Only the header is read now. Without this advice the first page
        // fault reads ahead (8 MiB on many disks) into tensor data that a
        // refused set never needs: with hundreds of inputs on a cold cache
        // that is most of the I/O of a refusal. Best effort.
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Random);
        let map = Arc::new(map);
        let identity = crate::hash::FileIdentity::of(&file);
        let parsed = parse(&map, lenient);
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Normal);
        let (metadata, parsed) = parsed.map_err(|e| to_error(path, e))?;
        let mut tensors = BTreeMap::new();
        let mut other = BTreeMap::new();
        for t in parsed {
            match t.dtype {
                Elem::Float(dtype) => {
                    let tensor = TensorRef::mapped(
                        t.name.clone(),
                        dtype,
                        t.shape,
                        Arc::clone(&map),
                        t.range,
                    );
                    tensors.insert(t.name, tensor);
                }
                Elem::Other(name, _) => {
                    other.insert(t.name, name.to_string());
                }
            }
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map,
            identity,
            metadata,
            tensors,
            other,
        })
    }

    /// sha256 and size of the mapped bytes, i.e. of exactly what was parsed.
    pub fn file_record(&self) -> FileRecord {
        let (mut record, pending) = self.record_later();
        record.sha256 = pending.finish();
        record
    }

    /// The file's record with its hash left empty, and what computes the
    /// hash later: a merge checks that its inputs fit together (cheap, from
    /// the headers) before it reads every byte of them.
    pub fn record_later(&self) -> (FileRecord, PendingHash) {
        (
            FileRecord {
                path: self.path.clone(),
                sha256: String::new(),
                size: self.map.len() as u64,
            },
            PendingHash {
                map: Arc::clone(&self.map),
                identity: self.identity,
            },
        )
    }
}

/// The hash of a parsed file, still to be computed.
#[derive(Debug)]
pub struct PendingHash {
    map: Arc<Mmap>,
    identity: Option<crate::hash::FileIdentity>,
}

impl PendingHash {
    /// sha256 of the mapped bytes. A file whose bytes this process already
    /// hashed unchanged (a Hub blob verified against its name) is not read
    /// again.
    pub fn finish(self) -> String {
        if let Some(known) = self.identity.and_then(crate::hash::known) {
            return known;
        }
        #[cfg(unix)]
        let _ = self.map.advise(memmap2::Advice::Sequential);
        let sha256 = crate::hash::sha256_hex(&self.map);
        #[cfg(unix)]
        let _ = self.map.advise(memmap2::Advice::Normal);
        // Hashing touched every page; with hundreds of adapters that would
        // keep all inputs resident until the merge. Drop them now: each
        // tensor is faulted back in when its module is merged.
        #[cfg(unix)]
        // SAFETY: read-only mapping of a file we never write; MADV_DONTNEED
        // only drops cached pages, later reads see the same bytes.
        unsafe {
            let _ = self
                .map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed);
        }
        sha256
    }
}

fn to_error(path: &Path, e: SafetensorsError) -> Error {
    Error::invalid(path, format!("not a valid safetensors file: {e}"))
}

/// An element type: one we decode, or (lenient parsing only) another
/// byte-sized one, with its name and size.
#[derive(Debug, Clone, Copy)]
enum Elem {
    Float(DType),
    Other(&'static str, usize),
}

impl Elem {
    fn size(self) -> usize {
        match self {
            Elem::Float(d) => d.size(),
            Elem::Other(_, s) => s,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Elem::Float(d) => d.safetensors_name(),
            Elem::Other(n, _) => n,
        }
    }
}

/// Byte-sized dtypes that lenient parsing validates and sets aside.
const OTHER_DTYPES: &[(&str, usize)] = &[
    ("BOOL", 1),
    ("U8", 1),
    ("I8", 1),
    ("F8_E5M2", 1),
    ("F8_E4M3", 1),
    ("F8_E8M0", 1),
    ("I16", 2),
    ("U16", 2),
    ("I32", 4),
    ("U32", 4),
    ("I64", 8),
    ("U64", 8),
    ("C64", 8),
];

/// A tensor as validated, before it is tied to the map.
#[derive(Debug)]
struct Parsed {
    name: String,
    dtype: Elem,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

type ParsedFile = (BTreeMap<String, String>, Vec<Parsed>);

/// Validate a whole file held in memory. Pure so that tests can feed it bytes.
fn parse(bytes: &[u8], lenient: bool) -> Result<ParsedFile, SafetensorsError> {
    let file_len = bytes.len() as u64;
    let prefix: [u8; LEN_PREFIX] = bytes
        .get(..LEN_PREFIX)
        .and_then(|b| b.try_into().ok())
        .ok_or(SafetensorsError::TooShort(file_len))?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_LEN {
        return Err(SafetensorsError::HeaderTooLarge(header_len));
    }
    let past_end = SafetensorsError::HeaderPastEnd {
        header_len,
        file_len,
    };
    // header_len <= MAX_HEADER_LEN, so this neither overflows nor truncates.
    let data_start = LEN_PREFIX + header_len as usize;
    let header = bytes.get(LEN_PREFIX..data_start).ok_or(past_end)?;
    let header = std::str::from_utf8(header).map_err(|e| SafetensorsError::HeaderNotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    let top: TopLevel =
        serde_json::from_str(header).map_err(|e| SafetensorsError::HeaderJson(e.to_string()))?;

    let mut seen = BTreeSet::new();
    let mut metadata = BTreeMap::new();
    let mut entries = Vec::new();
    for (key, node) in top.0 {
        if !seen.insert(key.clone()) {
            return Err(SafetensorsError::DuplicateKey {
                key,
                within: "the header".into(),
            });
        }
        if key == "__metadata__" {
            metadata = parse_metadata(node)?;
        } else {
            entries.push(parse_entry(key, node, lenient)?);
        }
    }

    let data_len = file_len - data_start as u64;
    // Sorting by (begin, end) puts empty tensors before a tensor that starts
    // at the same byte, so they do not read as overlaps.
    entries.sort_by_key(|e| (e.begin, e.end));
    let mut expected = 0u64;
    let mut tensors = Vec::with_capacity(entries.len());
    for e in entries {
        if e.begin != expected {
            return Err(SafetensorsError::NotContiguous {
                tensor: e.name,
                begin: e.begin,
                expected,
            });
        }
        expected = e.end;
        if e.end > data_len {
            // Reported as a length mismatch below, before any range is built.
            break;
        }
        // Both fit below data_len <= file length, which fits in usize.
        let start = data_start + e.begin as usize;
        let stop = data_start + e.end as usize;
        tensors.push(Parsed {
            name: e.name,
            dtype: e.dtype,
            shape: e.shape,
            range: start..stop,
        });
    }
    if expected != data_len {
        return Err(SafetensorsError::DataLengthMismatch {
            end: expected,
            data_len,
        });
    }
    Ok((metadata, tensors))
}

fn parse_metadata(node: Node) -> Result<BTreeMap<String, String>, SafetensorsError> {
    let pairs = match node {
        Node::Object(pairs) => pairs,
        Node::NotObject(kind) => {
            return Err(SafetensorsError::InvalidMetadata(format!(
                "found {kind} instead of an object"
            )))
        }
    };
    let mut out = BTreeMap::new();
    for (k, v) in pairs {
        let Value::String(s) = v else {
            return Err(SafetensorsError::InvalidMetadata(format!(
                "value of {k:?} is {}, not a string",
                json_kind(&v)
            )));
        };
        if out.contains_key(&k) {
            return Err(SafetensorsError::DuplicateKey {
                key: k,
                within: "__metadata__".into(),
            });
        }
        out.insert(k, s);
    }
    Ok(out)
}

/// A tensor entry whose fields have been checked one by one.
struct Entry {
    name: String,
    dtype: Elem,
    shape: Vec<usize>,
    begin: u64,
    end: u64,
}

fn parse_entry(name: String, node: Node, lenient: bool) -> Result<Entry, SafetensorsError> {
    let invalid = |msg: String| SafetensorsError::InvalidEntry {
        tensor: name.clone(),
        msg,
    };
    let pairs = match node {
        Node::Object(pairs) => pairs,
        Node::NotObject(kind) => {
            return Err(invalid(format!("expected an object, found {kind}")));
        }
    };
    let (mut dtype, mut shape, mut offsets) = (None, None, None);
    for (k, v) in pairs {
        let slot = match k.as_str() {
            "dtype" => &mut dtype,
            "shape" => &mut shape,
            "data_offsets" => &mut offsets,
            _ => {
                return Err(invalid(format!(
                    "unknown field {k:?} (expected only dtype, shape, data_offsets)"
                )))
            }
        };
        if slot.replace(v).is_some() {
            return Err(SafetensorsError::DuplicateKey {
                key: k,
                within: format!("tensor {name:?}"),
            });
        }
    }
    let missing = |f: &str| invalid(format!("missing field {f}"));
    let dtype = dtype.ok_or_else(|| missing("dtype"))?;
    let shape = shape.ok_or_else(|| missing("shape"))?;
    let offsets = offsets.ok_or_else(|| missing("data_offsets"))?;

    let Value::String(dtype_name) = dtype else {
        return Err(invalid(format!(
            "dtype is {}, not a string",
            json_kind(&dtype)
        )));
    };
    let other_dtype = OTHER_DTYPES
        .iter()
        .find(|(n, _)| *n == dtype_name)
        .filter(|_| lenient);
    let dtype = match (dtype_name.as_str(), other_dtype) {
        ("F64", _) => Elem::Float(DType::F64),
        ("F32", _) => Elem::Float(DType::F32),
        ("F16", _) => Elem::Float(DType::F16),
        ("BF16", _) => Elem::Float(DType::BF16),
        (_, Some(&(n, size))) => Elem::Other(n, size),
        (other, None) if KNOWN_UNSUPPORTED_DTYPES.contains(&other) => {
            return Err(SafetensorsError::UnsupportedDtype {
                tensor: name,
                dtype: dtype_name,
            })
        }
        _ => {
            return Err(SafetensorsError::UnknownDtype {
                tensor: name,
                dtype: dtype_name,
            })
        }
    };

    let shape = u64_array(&shape)
        .ok_or_else(|| invalid("shape must be an array of non-negative integers".to_string()))?;
    let offsets = u64_array(&offsets).ok_or_else(|| {
        invalid("data_offsets must be an array of two non-negative integers".to_string())
    })?;
    let [begin, end] = offsets[..] else {
        return Err(invalid(format!(
            "data_offsets must hold exactly two numbers, found {}",
            offsets.len()
        )));
    };
    if begin > end {
        return Err(SafetensorsError::InvalidOffsets {
            tensor: name,
            begin,
            end,
        });
    }

    let overflow = || SafetensorsError::SizeOverflow {
        tensor: name.clone(),
        shape: shape.clone(),
    };
    let dims: Vec<usize> = shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| overflow()))
        .collect::<Result<_, _>>()?;
    let nbytes = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.size()))
        .ok_or_else(overflow)?;
    let actual = end - begin;
    if nbytes as u64 != actual {
        return Err(SafetensorsError::SizeMismatch {
            tensor: name,
            dtype: dtype.name(),
            shape: dims,
            expected: nbytes as u64,
            actual,
        });
    }
    if begin % dtype.size() as u64 != 0 {
        return Err(SafetensorsError::Misaligned {
            tensor: name,
            begin,
            size: dtype.size(),
        });
    }
    Ok(Entry {
        name,
        dtype,
        shape: dims,
        begin,
        end,
    })
}

fn u64_array(v: &Value) -> Option<Vec<u64>> {
    v.as_array()?.iter().map(Value::as_u64).collect()
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The header's top-level object with every key kept, in file order, so that
/// duplicates can be found (serde_json's own map keeps only the last).
struct TopLevel(Vec<(String, Node)>);

/// A top-level value: an object (again with every key kept) or something else
/// that is only described in an error.
enum Node {
    Object(Vec<(String, Value)>),
    NotObject(&'static str),
}

impl<'de> Deserialize<'de> for TopLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevel, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    out.push((k, map.next_value::<Node>()?));
                }
                Ok(TopLevel(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    out.push((k, map.next_value::<Value>()?));
                }
                Ok(Node::Object(out))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Node::NotObject("an array"))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
                Ok(Node::NotObject("a boolean"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
                Ok(Node::NotObject("a number"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
                Ok(Node::NotObject("a number"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
                Ok(Node::NotObject("a number"))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
                Ok(Node::NotObject("a string"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::NotObject("null"))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Header JSON + data bytes, laid out as a file.
    fn file_bytes(header: &str, data: &[u8]) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        b
    }

    fn err(header: &str, data: &[u8]) -> SafetensorsError {
        parse(&file_bytes(header, data), false).unwrap_err()
    }

    fn write_temp(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    const ONE_F32: &str = r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;

    #[test]
    fn valid_file_values() {
        let header = r#"{"__metadata__":{"format":"pt"},
            "b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},
            "a":{"dtype":"F32","shape":[2,1],"data_offsets":[0,8]},
            "e":{"dtype":"BF16","shape":[0,3],"data_offsets":[12,12]}}"#;
        let mut data = Vec::new();
        data.extend_from_slice(&1.5f32.to_le_bytes());
        data.extend_from_slice(&(-2.0f32).to_le_bytes());
        data.extend_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
        data.extend_from_slice(&half::f16::from_f32(3.0).to_le_bytes());
        let f = write_temp(&file_bytes(header, &data));
        let st = SafetensorsFile::open(f.path()).unwrap();
        assert_eq!(st.metadata.get("format").map(String::as_str), Some("pt"));
        assert_eq!(st.tensors.len(), 3);
        let a = &st.tensors["a"];
        assert_eq!(a.dtype, DType::F32);
        assert_eq!(a.shape, vec![2, 1]);
        assert_eq!(a.to_f32(), vec![1.5, -2.0]);
        let b = &st.tensors["b"];
        assert_eq!(b.to_f32(), vec![0.25, 3.0]);
        assert_eq!(st.tensors["e"].numel(), 0);
        let rec = st.file_record();
        let bytes = std::fs::read(f.path()).unwrap();
        assert_eq!(rec.size, bytes.len() as u64);
        assert_eq!(rec.sha256, crate::hash::sha256_hex(&bytes));
    }

    #[test]
    fn too_short() {
        assert_eq!(
            parse(&[1, 2, 3], false).unwrap_err(),
            SafetensorsError::TooShort(3)
        );
        // Empty files cannot be mapped; `open` must still answer clearly.
        let f = write_temp(b"");
        let e = SafetensorsFile::open(f.path()).unwrap_err().to_string();
        assert!(e.contains("0 bytes long"), "{e}");
        assert!(e.contains(&f.path().display().to_string()), "{e}");
    }

    #[test]
    fn header_too_large() {
        let mut b = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert_eq!(
            parse(&b, false).unwrap_err(),
            SafetensorsError::HeaderTooLarge(MAX_HEADER_LEN + 1)
        );
    }

    #[test]
    fn header_past_end() {
        let mut b = 100u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert_eq!(
            parse(&b, false).unwrap_err(),
            SafetensorsError::HeaderPastEnd {
                header_len: 100,
                file_len: 10
            }
        );
    }

    #[test]
    fn header_not_utf8() {
        let mut b = 3u64.to_le_bytes().to_vec();
        b.extend_from_slice(&[b'{', 0xff, b'}']);
        assert_eq!(
            parse(&b, false).unwrap_err(),
            SafetensorsError::HeaderNotUtf8 { valid_up_to: 1 }
        );
    }

    #[test]
    fn header_json() {
        let SafetensorsError::HeaderJson(msg) = err("{\"t\": ", &[]) else {
            panic!()
        };
        assert!(msg.contains("line 1"), "{msg}");
        assert!(matches!(
            err("[1, 2]", &[]),
            SafetensorsError::HeaderJson(_)
        ));
    }

    #[test]
    fn duplicate_key() {
        let header = r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},
                         "t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert_eq!(
            err(header, &[0; 8]),
            SafetensorsError::DuplicateKey {
                key: "t".into(),
                within: "the header".into()
            }
        );
        let header = r#"{"t":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(matches!(
            err(header, &[0; 4]),
            SafetensorsError::DuplicateKey { key, .. } if key == "dtype"
        ));
        let header = r#"{"__metadata__":{"a":"1","a":"2"}}"#;
        assert!(matches!(
            err(header, &[]),
            SafetensorsError::DuplicateKey { key, within } if key == "a" && within == "__metadata__"
        ));
    }

    #[test]
    fn invalid_metadata() {
        assert!(matches!(
            err(r#"{"__metadata__":{"a":1}}"#, &[]),
            SafetensorsError::InvalidMetadata(m) if m.contains("\"a\"")
        ));
        assert!(matches!(
            err(r#"{"__metadata__":[]}"#, &[]),
            SafetensorsError::InvalidMetadata(_)
        ));
    }

    #[test]
    fn invalid_entry() {
        let unknown = r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}"#;
        assert!(matches!(
            err(unknown, &[0; 4]),
            SafetensorsError::InvalidEntry { tensor, msg } if tensor == "t" && msg.contains("\"x\"")
        ));
        let missing = r#"{"t":{"dtype":"F32","shape":[1]}}"#;
        assert!(matches!(
            err(missing, &[]),
            SafetensorsError::InvalidEntry { msg, .. } if msg.contains("data_offsets")
        ));
        let negative = r#"{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#;
        assert!(matches!(
            err(negative, &[0; 4]),
            SafetensorsError::InvalidEntry { .. }
        ));
        let three = r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}"#;
        assert!(matches!(
            err(three, &[0; 4]),
            SafetensorsError::InvalidEntry { .. }
        ));
        assert!(matches!(
            err(r#"{"t":5}"#, &[]),
            SafetensorsError::InvalidEntry { msg, .. } if msg.contains("a number")
        ));
    }

    #[test]
    fn unsupported_dtype() {
        let header = r#"{"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#;
        let e = err(header, &[0; 8]);
        assert_eq!(
            e,
            SafetensorsError::UnsupportedDtype {
                tensor: "ids".into(),
                dtype: "I64".into()
            }
        );
        assert!(e.to_string().starts_with("unsupported dtype I64 in tensor"));
    }

    #[test]
    fn lenient_sets_integer_tensors_aside_but_still_checks_them() {
        let header = r#"{"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},"w":{"dtype":"F32","shape":[1],"data_offsets":[16,20]}}"#;
        let (_, parsed) = parse(&file_bytes(header, &[0; 20]), true).unwrap();
        let kinds: Vec<_> = parsed
            .iter()
            .map(|p| (p.name.as_str(), p.dtype.name()))
            .collect();
        assert_eq!(kinds, [("ids", "I64"), ("w", "F32")]);
        // The byte count of a set-aside tensor is still validated.
        let short = r#"{"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(matches!(
            parse(&file_bytes(short, &[0; 8]), true).unwrap_err(),
            SafetensorsError::SizeMismatch { expected: 16, .. }
        ));
        // Sub-byte types have no byte size to check: still refused.
        let f4 = r#"{"x":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#;
        assert!(matches!(
            parse(&file_bytes(f4, &[0; 1]), true).unwrap_err(),
            SafetensorsError::UnsupportedDtype { .. }
        ));
    }

    #[test]
    fn unknown_dtype() {
        let header = r#"{"t":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(matches!(
            err(header, &[0; 4]),
            SafetensorsError::UnknownDtype { dtype, .. } if dtype == "F33"
        ));
    }

    #[test]
    fn invalid_offsets() {
        let header = r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#;
        assert_eq!(
            err(header, &[0; 4]),
            SafetensorsError::InvalidOffsets {
                tensor: "t".into(),
                begin: 4,
                end: 0
            }
        );
    }

    #[test]
    fn size_overflow() {
        let header =
            r#"{"t":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,4]}}"#;
        assert!(matches!(
            err(header, &[0; 4]),
            SafetensorsError::SizeOverflow { .. }
        ));
    }

    #[test]
    fn size_mismatch() {
        let header = r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
        assert_eq!(
            err(header, &[0; 4]),
            SafetensorsError::SizeMismatch {
                tensor: "t".into(),
                dtype: "F32",
                shape: vec![2],
                expected: 8,
                actual: 4
            }
        );
    }

    #[test]
    fn misaligned() {
        let header = r#"{"h":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},
                         "f":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}"#;
        assert_eq!(
            err(header, &[0; 6]),
            SafetensorsError::Misaligned {
                tensor: "f".into(),
                begin: 2,
                size: 4
            }
        );
    }

    #[test]
    fn not_contiguous() {
        let hole = r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        let e = err(hole, &[0; 8]);
        assert_eq!(
            e,
            SafetensorsError::NotContiguous {
                tensor: "t".into(),
                begin: 4,
                expected: 0
            }
        );
        assert!(e.to_string().contains("a hole"));
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                          "b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(err(overlap, &[0; 8]).to_string().contains("an overlap"));
    }

    #[test]
    fn data_length_mismatch() {
        assert_eq!(
            err(ONE_F32, &[0; 6]),
            SafetensorsError::DataLengthMismatch {
                end: 4,
                data_len: 6
            }
        );
        // A tensor past the end of the file must not be sliced.
        assert_eq!(
            err(ONE_F32, &[0; 2]),
            SafetensorsError::DataLengthMismatch {
                end: 4,
                data_len: 2
            }
        );
    }

    #[test]
    fn open_error_names_file() {
        let f = write_temp(&file_bytes(ONE_F32, &[0; 6]));
        let e = SafetensorsFile::open(f.path()).unwrap_err();
        assert!(matches!(e, Error::Invalid { ref file, .. } if file == f.path()));
        assert!(e.to_string().contains("data section is 6 bytes"));
    }
}
