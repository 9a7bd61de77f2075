//! Small tensor files (forward inputs/outputs, latents, test fixtures) as safetensors.
//!
//! Unlike [`crate::checkpoint::Checkpoint`] these are read fully into memory: they are small,
//! and not holding a map lets a caller overwrite the same file it just read.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::checkpoint::{convert_to_f32, parse_header, CheckpointError};

/// A dense row-major f32 tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "HostTensor::new: shape {shape:?} does not match {} elements",
            data.len()
        );
        Self { shape, data }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// `max |x|`; NaN if any element is NaN, so a broken output cannot look small.
    pub fn max_abs(&self) -> f32 {
        nan_max(self.data.iter().map(|x| x.abs()))
    }

    /// `max |a - b| / max |reference|`, the tolerance measure the fixtures are specified in.
    /// NaN if either side has a NaN; infinite if the shapes differ or the reference is all
    /// zeros while `self` is not; 0 for two all-zero tensors.
    pub fn max_rel_err(&self, reference: &HostTensor) -> f32 {
        if self.shape != reference.shape || self.data.len() != reference.data.len() {
            return f32::INFINITY;
        }
        let diff = nan_max(
            self.data
                .iter()
                .zip(&reference.data)
                .map(|(a, b)| (a - b).abs()),
        );
        let scale = reference.max_abs();
        if diff == 0.0 && scale == 0.0 {
            0.0
        } else {
            diff / scale
        }
    }
}

fn nan_max(values: impl Iterator<Item = f32>) -> f32 {
    let mut max = 0.0f32;
    for v in values {
        if v.is_nan() {
            return f32::NAN;
        }
        max = max.max(v);
    }
    max
}

/// Reads every tensor of a safetensors file as f32. Floats of any supported width convert to
/// the nearest f32, integers by value (exact up to 2^24), bools to 0/1.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, HostTensor>, CheckpointError> {
    let bytes = fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        op: "read",
        source,
    })?;
    let mut out = BTreeMap::new();
    for entry in parse_header(path, &bytes)? {
        let data = bytes
            .get(entry.range.clone())
            .and_then(|raw| convert_to_f32(entry.dtype, raw));
        let Some(data) = data else {
            return Err(CheckpointError::UnsupportedDtype {
                name: entry.name,
                path: path.to_path_buf(),
                dtype: entry.dtype,
            });
        };
        out.insert(entry.name, HostTensor::new(entry.shape, data));
    }
    Ok(out)
}

/// Writes tensors as an F32 safetensors file. The file is written under a temporary name in the
/// same folder and renamed into place, so readers never see a half-written file and a failed
/// write leaves any previous file intact.
pub fn write_tensors(path: &Path, tensors: &[(&str, &HostTensor)]) -> Result<(), CheckpointError> {
    let invalid = |name: &str, reason: String| CheckpointError::InvalidTensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        reason,
    };
    let mut seen = BTreeSet::new();
    for &(name, tensor) in tensors {
        if !seen.insert(name) {
            return Err(invalid(name, "name given twice".into()));
        }
        if tensor.data.len() != tensor.numel() {
            return Err(invalid(
                name,
                format!(
                    "shape {:?} needs {} elements but it has {}",
                    tensor.shape,
                    tensor.numel(),
                    tensor.data.len()
                ),
            ));
        }
    }
    let raw: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, t)| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (&(name, tensor), bytes) in tensors.iter().zip(&raw) {
        let view = TensorView::new(Dtype::F32, tensor.shape.clone(), bytes)
            .map_err(|e| invalid(name, e.to_string()))?;
        views.push((name, view));
    }
    let encoded = safetensors::serialize(views, None).map_err(|e| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("cannot encode: {e}"),
    })?;
    write_atomically(path, &encoded)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    // Unique per process and call, so concurrent writers (threads or processes) to the same
    // destination never share a temporary file.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let io_err = |op: &'static str, at: &Path| {
        let at = at.to_path_buf();
        move |source| CheckpointError::Io {
            path: at,
            op,
            source,
        }
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| CheckpointError::Io {
            path: path.to_path_buf(),
            op: "write",
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        })?
        .to_string_lossy();
    let tmp: PathBuf = path.with_file_name(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = File::create(&tmp).map_err(io_err("write", path))?;
        file.write_all(bytes).map_err(io_err("write", path))?;
        file.sync_all().map_err(io_err("write", path))?;
        fs::rename(&tmp, path).map_err(io_err("write (rename into place)", path))
    })();
    if result.is_err() {
        // Best effort: the original error is the one worth reporting.
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{err_text, fixture};
    use half::{bf16, f16};
    use std::collections::HashMap;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.safetensors");
        let a = HostTensor::new(
            vec![2, 3],
            vec![1.0, -2.5, 3.25, f32::MAX, f32::MIN_POSITIVE, -0.0],
        );
        let b = HostTensor::new(vec![], vec![42.0]);
        let c = HostTensor::new(vec![0, 4], vec![]);
        write_tensors(&path, &[("latents.0", &a), ("scalar", &b), ("empty", &c)]).expect("write");
        let read = read_tensors(&path).expect("read");
        assert_eq!(read.len(), 3);
        assert_eq!(read["latents.0"], a);
        assert_eq!(read["scalar"], b);
        assert_eq!(read["empty"], c);
        assert!(
            read["latents.0"].data[5].is_sign_negative(),
            "bit-exact round trip"
        );

        // Overwriting replaces the file and leaves no temporary files behind.
        write_tensors(&path, &[("only", &b)]).expect("overwrite");
        assert_eq!(
            read_tensors(&path)
                .expect("reread")
                .keys()
                .collect::<Vec<_>>(),
            ["only"]
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path()).expect("list").collect();
        assert_eq!(leftovers.len(), 1);

        // Empty file set is valid too.
        write_tensors(&path, &[]).expect("empty");
        assert!(read_tensors(&path).expect("read empty").is_empty());
    }

    #[test]
    fn written_files_open_as_checkpoints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.safetensors");
        let t = HostTensor::new(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        write_tensors(&path, &[("w", &t)]).expect("write");
        let ckpt = crate::checkpoint::Checkpoint::open(&path).expect("open");
        assert_eq!(ckpt.load_f32("w", &[2, 2]).expect("load"), t.data);
        assert_eq!(ckpt.load("w").expect("load"), t);
    }

    #[test]
    fn reads_every_dtype() {
        let f: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        let bf: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        let d: Vec<u8> = [0.1f64, -1e10]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let l: Vec<u8> = [16_777_216i64, -3]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let i: Vec<u8> = [7i32, i32::MIN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let s: Vec<u8> = [0.5f32, 8.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let u = vec![0u8, 255];
        let bools = vec![0u8, 1];
        let tensors = [
            ("f16", Dtype::F16, f),
            ("bf16", Dtype::BF16, bf),
            ("f64", Dtype::F64, d),
            ("i64", Dtype::I64, l),
            ("i32", Dtype::I32, i),
            ("f32", Dtype::F32, s),
            ("u8", Dtype::U8, u),
            ("bool", Dtype::BOOL, bools),
        ];
        let views: Vec<(&str, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, dt, b)| (*n, TensorView::new(*dt, vec![2], b).expect("view")))
            .collect();
        let bytes = safetensors::serialize(views, None::<HashMap<String, String>>).expect("ser");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("all.safetensors");
        fs::write(&path, bytes).expect("write");

        let read = read_tensors(&path).expect("read");
        let get = |n: &str| read[n].data.clone();
        assert_eq!(get("f16"), [1.5, -2.0]);
        assert_eq!(get("bf16"), [1.5, -2.0]);
        assert_eq!(get("f64"), [0.1f64 as f32, -1e10]);
        assert_eq!(get("i64"), [16_777_216.0, -3.0]);
        assert_eq!(get("i32"), [7.0, -2_147_483_648.0]);
        assert_eq!(get("f32"), [0.5, 8.0]);
        assert_eq!(get("u8"), [0.0, 255.0]);
        assert_eq!(get("bool"), [0.0, 1.0]);
        assert!(read.values().all(|t| t.shape == [2]));
    }

    #[test]
    fn reads_fixture_io_files() {
        let dit = read_tensors(&fixture("dit/io.safetensors")).expect("dit io");
        assert_eq!(
            dit["input.class_labels"].data,
            [3.0, 10.0],
            "I64 labels exact"
        );
        assert_eq!(dit["input.timestep"].data, [999.0, 250.0]);
        assert_eq!(dit["input.hidden_states"].shape, [2, 4, 16, 16]);
        assert_eq!(dit["output"].shape, [2, 8, 16, 16]);
        assert_eq!(dit["output"].max_rel_err(&dit["output"]), 0.0);

        let flux = read_tensors(&fixture("flux/io.safetensors")).expect("flux");
        assert_eq!(flux["block.transformer_blocks.0.out0"].shape, [1, 7, 64]);

        let loop_ = read_tensors(&fixture("dit-pipeline/loop.safetensors")).expect("loop");
        assert!(loop_.contains_key("latents.0") && loop_.contains_key("image"));
    }

    #[test]
    fn read_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.safetensors");
        let msg = err_text(read_tensors(&missing));
        assert!(
            msg.contains("cannot read") && msg.contains("missing.safetensors"),
            "{msg}"
        );

        let garbage = dir.path().join("garbage.safetensors");
        fs::write(&garbage, b"\x10\0\0\0\0\0\0\0not json at all!").expect("write");
        let msg = err_text(read_tensors(&garbage));
        assert!(
            msg.contains("garbage.safetensors") && msg.contains("not a valid"),
            "{msg}"
        );

        let full = fs::read(fixture("dit/io.safetensors")).expect("fixture");
        let cut = dir.path().join("cut.safetensors");
        fs::write(&cut, &full[..full.len() / 2]).expect("write");
        let msg = err_text(read_tensors(&cut));
        assert!(msg.contains("cut.safetensors"), "{msg}");

        let fp8 = dir.path().join("fp8.safetensors");
        let bytes = safetensors::serialize(
            [(
                "q",
                TensorView::new(Dtype::F8_E5M2, vec![1], &[0u8]).expect("view"),
            )],
            None::<HashMap<String, String>>,
        )
        .expect("ser");
        fs::write(&fp8, bytes).expect("write");
        let msg = err_text(read_tensors(&fp8));
        assert!(
            msg.contains("`q`") && msg.contains("fp8.safetensors"),
            "{msg}"
        );
    }

    #[test]
    fn write_errors_name_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = HostTensor {
            shape: vec![2, 2],
            data: vec![1.0; 3],
        };
        let path = dir.path().join("bad.safetensors");
        let msg = err_text(write_tensors(&path, &[("t", &t)]));
        assert!(
            msg.contains("bad.safetensors") && msg.contains("`t`"),
            "{msg}"
        );
        assert!(msg.contains("needs 4 elements but it has 3"), "{msg}");
        assert!(!path.exists());

        let ok = HostTensor::new(vec![1], vec![1.0]);
        let msg = err_text(write_tensors(&path, &[("x", &ok), ("x", &ok)]));
        assert!(msg.contains("`x`") && msg.contains("twice"), "{msg}");

        let nowhere = dir.path().join("no/such/dir/out.safetensors");
        let msg = err_text(write_tensors(&nowhere, &[("x", &ok)]));
        assert!(
            msg.contains("cannot write") && msg.contains("no/such/dir/out.safetensors"),
            "{msg}"
        );
    }

    #[test]
    fn error_metrics() {
        let r = HostTensor::new(vec![3], vec![1.0, -4.0, 2.0]);
        let a = HostTensor::new(vec![3], vec![1.0, -3.0, 2.5]);
        assert_eq!(r.numel(), 3);
        assert_eq!(r.max_abs(), 4.0);
        assert_eq!(a.max_rel_err(&r), 0.25);
        assert_eq!(r.max_rel_err(&r), 0.0);

        let nan = HostTensor::new(vec![3], vec![1.0, f32::NAN, 2.0]);
        assert!(nan.max_abs().is_nan());
        assert!(nan.max_rel_err(&r).is_nan());
        assert!(r.max_rel_err(&nan).is_nan());

        let zeros = HostTensor::new(vec![3], vec![0.0; 3]);
        assert_eq!(zeros.max_rel_err(&zeros), 0.0);
        assert_eq!(a.max_rel_err(&zeros), f32::INFINITY);

        let other_shape = HostTensor::new(vec![1, 3], vec![1.0, -4.0, 2.0]);
        assert_eq!(other_shape.max_rel_err(&r), f32::INFINITY);
        assert_eq!(HostTensor::new(vec![0], vec![]).max_abs(), 0.0);
    }
}
