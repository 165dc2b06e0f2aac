//! Helpers shared by the parity tests: fixture paths and tensor comparison.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// A path inside the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// All tensors of a fixture file.
pub fn load_fixture(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(repo_path(rel), &Device::Cpu).unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
}

/// max |a - b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Standard deviation of all elements.
pub fn std_all(t: &Tensor) -> f32 {
    let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let mean = t.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let var = (t - mean as f64).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    var.sqrt()
}

/// Asserts max |actual - expected| <= rel · max(1, std(expected)) and returns the error.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, rel: f32) -> f32 {
    let err = max_abs_diff(actual, expected);
    let bound = rel * std_all(expected).max(1.0);
    eprintln!("{what}: max|diff| = {err:.3e} (bound {bound:.1e})");
    assert!(err <= bound, "{what}: max|diff| = {err} exceeds {bound}");
    err
}
