//! LyCORIS weight reconstructions: LoHa (Hadamard product of two low-rank products) and LoKr
//! (Kronecker product), optionally with Tucker cores for convolutions, as A1111, ComfyUI and the
//! LyCORIS library rebuild them.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// The Tucker rebuild `Σ_ij t[i, j, k, l] · a[i, o] · b[j, c]` of a core `t` [r, r, kh, kw] with
/// factors `a` [r, out] and `b` [r, in]: [out, in, kh, kw].
pub fn tucker(t: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (r1, r2, kh, kw) = t.dims4()?;
    let (inner, out) = a.dims2()?;
    let (inner2, inp) = b.dims2()?;
    if inner != r1 || inner2 != r2 {
        return Err(Error::invalid(format!(
            "Tucker core {:?} does not match its factors {:?} and {:?}",
            t.dims(),
            a.dims(),
            b.dims()
        )));
    }
    // [r1, kh, kw, r2] @ b [r2, in] → [r1, kh, kw, in] → [r1, in·kh·kw]
    let tb = t.permute((0, 2, 3, 1))?.reshape((r1 * kh * kw, r2))?.matmul(b)?;
    let tb = tb.reshape((r1, kh, kw, inp))?.permute((0, 3, 1, 2))?.reshape((r1, inp * kh * kw))?;
    Ok(a.t()?.matmul(&tb)?.reshape((out, inp, kh, kw))?)
}

/// `a` [out, r] @ `b` [r, …] flattened and reshaped to the layer's weight `shape`.
fn low_rank_product(a: &Tensor, b: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let rank = b.dim(0)?;
    let product = a.reshape(((), rank))?.matmul(&b.reshape((rank, ()))?)?;
    if product.elem_count() != shape.iter().product::<usize>() {
        return Err(Error::invalid(format!(
            "factors {:?} @ {:?} give {:?}, which is not the layer's weight {shape:?}",
            a.dims(),
            b.dims(),
            product.dims()
        )));
    }
    Ok(product.reshape(shape)?)
}

/// One LoHa factor: `a @ b` (a [out, r], b [r, in(, kh, kw)]), or the Tucker rebuild with core `t`
/// (a [r, out], b [r, in]).
pub fn loha_factor(a: &Tensor, b: &Tensor, t: Option<&Tensor>, shape: &[usize]) -> Result<Tensor> {
    let factor = match t {
        Some(t) => tucker(t, a, b)?,
        None => low_rank_product(a, b, shape)?,
    };
    if factor.dims() != shape {
        return Err(Error::invalid(format!(
            "a LoHa factor has shape {:?}, the layer's weight {shape:?}",
            factor.dims()
        )));
    }
    Ok(factor)
}

/// LoHa ΔW = w1 ⊙ w2 (each from [`loha_factor`]), in f32.
pub fn loha(w1: &Tensor, w2: &Tensor) -> Result<Tensor> {
    Ok((w1.to_dtype(DType::F32)? * w2.to_dtype(DType::F32)?)?)
}

/// LoKr ΔW = kron(w1, w2) reshaped to the layer's weight `shape` [out, in(, kh, kw)]: `w1` [a, b]
/// and `w2` holding (out/a)·(in/b)·kh·kw elements ([c, d], [c, d, kh, kw] or [c, d·kh·kw]).
pub fn lokr(w1: &Tensor, w2: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let (a, b) = w1.dims2()?;
    let (out, inp) = (shape[0], shape[1]);
    let kernel: usize = shape[2..].iter().product();
    let mismatch = || {
        Error::invalid(format!(
            "LoKr factors {:?} and {:?} do not make the layer's weight {shape:?}",
            w1.dims(),
            w2.dims()
        ))
    };
    if a == 0 || b == 0 || out % a != 0 || inp % b != 0 {
        return Err(mismatch());
    }
    let (c, d) = (out / a, inp / b);
    if w2.elem_count() != c * d * kernel || w2.dim(0)? != c {
        return Err(mismatch());
    }
    let w1 = w1.to_dtype(DType::F32)?.reshape((a, 1, b, 1, 1))?;
    let w2 = w2.to_dtype(DType::F32)?.reshape((1, c, 1, d, kernel))?;
    Ok(w1.broadcast_mul(&w2)?.reshape(shape)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn kron_matches_the_definition() {
        let dev = Device::Cpu;
        let w1 = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let w2 = Tensor::new(&[[0f32, 5.], [6., 7.]], &dev).unwrap();
        let k = super::lokr(&w1, &w2, &[4, 4]).unwrap().to_vec2::<f32>().unwrap();
        for (i, row) in k.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                let expected = [[1f32, 2.], [3., 4.]][i / 2][j / 2] * [[0f32, 5.], [6., 7.]][i % 2][j % 2];
                assert_eq!(*v, expected, "kron[{i}][{j}]");
            }
        }
    }

    #[test]
    fn tucker_is_the_two_mode_product() {
        let dev = Device::Cpu;
        let t = Tensor::arange(0f32, 2. * 3. * 2. * 2., &dev).unwrap().reshape((2, 3, 2, 2)).unwrap();
        let a = Tensor::arange(0f32, 2. * 4., &dev).unwrap().reshape((2, 4)).unwrap();
        let b = Tensor::arange(0f32, 3. * 5., &dev).unwrap().reshape((3, 5)).unwrap();
        let got = super::tucker(&t, &a, &b).unwrap();
        let (av, bv) = (a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        let t4: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        for o in 0..4 {
            for c in 0..5 {
                for k in 0..2 {
                    for l in 0..2 {
                        let mut s = 0f32;
                        for i in 0..2 {
                            for j in 0..3 {
                                s += t4[((i * 3 + j) * 2 + k) * 2 + l] * av[i][o] * bv[j][c];
                            }
                        }
                        assert_eq!(g[((o * 5 + c) * 2 + k) * 2 + l], s);
                    }
                }
            }
        }
    }
}
