//! PyTorch's default initialisation of new layers, for networks training creates from nothing (a
//! T2I-Adapter, a ControlNet's condition embedding): `nn.Conv2d` and `nn.Linear` draw weight and
//! bias uniformly in ±1/sqrt(fan-in) (kaiming-uniform with a = sqrt(5)), normalisation layers start
//! at weight 1 and bias 0.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::{Error, Result};

/// Initial tensors for the parameters `shapes` (full name, shape; as [`TensorStore::recorder`]
/// lists a model's), drawn from `seed`: a weight of rank ≥ 2 and the bias beside it uniform in
/// ±1/sqrt(fan-in), a weight of rank 1 (a norm's) ones and its bias zeros.
///
/// [`TensorStore::recorder`]: crate::io::weights::TensorStore::recorder
pub fn pytorch_default(shapes: &[(String, Vec<usize>)], seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let weights: HashMap<&str, &[usize]> =
        shapes.iter().filter_map(|(n, s)| Some((n.strip_suffix(".weight")?, s.as_slice()))).collect();
    let mut tensors = HashMap::with_capacity(shapes.len());
    for (name, shape) in shapes {
        let layer = name.strip_suffix(".weight").or_else(|| name.strip_suffix(".bias"));
        let weight = layer.and_then(|l| weights.get(l)).copied();
        let tensor = match weight {
            Some(w) if w.len() >= 2 => {
                let fan_in: usize = w[1..].iter().product();
                let bound = 1.0 / (fan_in as f32).sqrt();
                let n = shape.iter().product();
                let values = (0..n).map(|_| rng.random_range(-bound..bound)).collect::<Vec<f32>>();
                Tensor::from_vec(values, shape.as_slice(), device)?
            }
            Some(_) if name.ends_with(".weight") => Tensor::ones(shape.as_slice(), DType::F32, device)?,
            Some(_) => Tensor::zeros(shape.as_slice(), DType::F32, device)?,
            None => return Err(Error::invalid(format!("no default initialisation for the parameter `{name}`"))),
        };
        tensors.insert(name.clone(), tensor);
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A conv weight and its bias within ±1/sqrt(fan-in) and not all equal, a norm at ones and
    /// zeros, the same draws from the same seed, and a name without a weight an error.
    #[test]
    fn initialises_as_pytorch_layers() {
        let shapes = vec![
            ("conv.weight".to_string(), vec![4, 3, 3, 3]),
            ("conv.bias".to_string(), vec![4]),
            ("norm.weight".to_string(), vec![4]),
            ("norm.bias".to_string(), vec![4]),
        ];
        let tensors = pytorch_default(&shapes, 1, &Device::Cpu).unwrap();
        let bound = 1.0 / 27f32.sqrt();
        for name in ["conv.weight", "conv.bias"] {
            let values = tensors[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(values.iter().all(|v| v.abs() <= bound), "{name} outside ±{bound}");
            assert!(values.iter().any(|v| *v != values[0]), "{name} constant");
        }
        assert_eq!(tensors["norm.weight"].to_vec1::<f32>().unwrap(), [1.0; 4]);
        assert_eq!(tensors["norm.bias"].to_vec1::<f32>().unwrap(), [0.0; 4]);
        let again = pytorch_default(&shapes, 1, &Device::Cpu).unwrap();
        let same = (&tensors["conv.weight"] - &again["conv.weight"]).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0);
        assert!(pytorch_default(&[("orphan".to_string(), vec![2])], 1, &Device::Cpu).is_err());
    }
}
