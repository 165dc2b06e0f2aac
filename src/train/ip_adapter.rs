//! IP-Adapter training (tencent-ailab/IP-Adapter's `tutorial_train.py`): the image projection and
//! every cross-attention layer's `to_k_ip`/`to_v_ip` train on captioned images, each example's own
//! image its image prompt (read by a frozen CLIP image encoder), the UNet and text encoder frozen.
//! A new adapter is the tutorial's: `ImageProjModel` with PyTorch's default initialisation, and
//! `to_k_ip`/`to_v_ip` copied from each layer's `to_k`/`to_v`. The result is an h94-layout
//! `.safetensors` file, which `--ip-adapter` and diffusers' `load_ip_adapter` load.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use rand::RngExt;
use rand::rngs::StdRng;

use super::dataset::Dataset;
use super::init::pytorch_default;
use super::run::{
    StepBatch, StepReport, Trainee, TrainingOptions, check, detached, run_metadata, run_steps, write_tensors,
};
use crate::control::cross_attention::image_projection::ProjectionInput;
use crate::control::cross_attention::ip_adapter::IpAdapterWeights;
use crate::io::weights::{TensorStore, TrainableParameters};
use crate::models::unet::UNetControls;
use crate::pipeline::{LoadOptions, StableDiffusion};
use crate::request::ImageEncoder;
use crate::{Error, Result};

/// What an IP-Adapter run trains and reads images with.
#[derive(Debug, Clone)]
pub struct IpAdapterOptions {
    /// The CLIP image-encoder folder (`config.json` + weights [+ `preprocessor_config.json`]).
    pub image_encoder: PathBuf,
    /// An h94 IP-Adapter file (base, Plus or Full-face) to train further instead of a new adapter.
    pub start: Option<PathBuf>,
    /// Image tokens of a new adapter (the tutorial's 4).
    pub tokens: usize,
    /// The chance that an example's image embedding is zeroed (the tutorial drops it for 5 % of
    /// examples, so that the adapter also learns the unconditional prediction).
    pub image_dropout: f64,
}

/// Trains an IP-Adapter for `model` (frozen) on `data` and writes it to `output` (h94 layout);
/// `on_step` hears of every step.
pub fn train_ip_adapter(
    model: &StableDiffusion,
    data: &Dataset,
    options: &TrainingOptions,
    ip: &IpAdapterOptions,
    output: &Path,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<()> {
    check(model, options)?;
    crate::io::output::check_output_path(output)?;
    if !(0.0..=1.0).contains(&ip.image_dropout) {
        return Err(Error::invalid(format!("the image dropout {} must be in [0, 1]", ip.image_dropout)));
    }
    let load = LoadOptions { dtype: DType::F32, device: model.device().clone(), ..Default::default() };
    let encoder = ImageEncoder::load(&ip.image_encoder, &load)?;
    let (label, store) = match &ip.start {
        Some(path) => (path.clone(), TensorStore::open(path)?),
        None => {
            let width = encoder.model.config().projection_dim.unwrap_or_default();
            (PathBuf::from("<new IP-Adapter>"), new_adapter(model, width, ip.tokens, options.seed)?)
        }
    };
    let trainable = TrainableParameters::new();
    let adapter = IpAdapterWeights::load_trainable(&label, store, model.unet.config(), model.device(), &trainable)?;
    let input = adapter.projection().input();
    let width = match input {
        ProjectionInput::ImageEmbeds => encoder.model.config().projection_dim.unwrap_or_default(),
        ProjectionInput::HiddenStates => encoder.model.config().hidden_size,
        ProjectionInput::FaceEmbedding => {
            return Err(Error::invalid(format!(
                "{}: FaceID adapters read face embeddings, which diffctl does not train on; train a base, Plus or \
                 Full-face adapter",
                label.display()
            )));
        }
    };
    if width != adapter.projection().input_dim() {
        return Err(Error::invalid(format!(
            "{}: the adapter's projection reads {} features, the image encoder {} gives {width}",
            label.display(),
            adapter.projection().input_dim(),
            ip.image_encoder.display()
        )));
    }
    let trainee = IpAdapterTrainee {
        adapter,
        params: trainable.parameters(),
        encoder,
        input,
        embeddings: RefCell::new(HashMap::new()),
        options: ip.clone(),
    };
    run_steps(model, data, None, options, output, &trainee, on_step)
}

/// A new adapter's h94 tensors: `image_proj.proj` (image embedding → `tokens` tokens of the UNet's
/// context width) and `image_proj.norm` with PyTorch's default initialisation seeded by `seed`;
/// `ip_adapter.{2i+1}.to_k_ip`/`to_v_ip` copies of cross-attention layer i's `to_k`/`to_v`.
fn new_adapter(model: &StableDiffusion, embedding_width: usize, tokens: usize, seed: u64) -> Result<TensorStore> {
    if tokens == 0 || embedding_width == 0 {
        return Err(Error::invalid("a new IP-Adapter needs at least one token and an image encoder with a projection"));
    }
    let layers = model.unet.config().cross_attention_layers();
    let context = layers
        .first()
        .map(|l| l.context_dim)
        .ok_or_else(|| Error::invalid("the model's UNet has no cross-attention layers for an IP-Adapter to join"))?;
    let shapes = [
        ("image_proj.proj.weight".to_string(), vec![tokens * context, embedding_width]),
        ("image_proj.proj.bias".to_string(), vec![tokens * context]),
        ("image_proj.norm.weight".to_string(), vec![context]),
        ("image_proj.norm.bias".to_string(), vec![context]),
    ];
    let mut tensors = pytorch_default(&shapes, seed, model.device())?;
    let (_, unet) = model.unet_files();
    for (i, layer) in layers.iter().enumerate() {
        for (ours, theirs) in [("to_k_ip", "to_k"), ("to_v_ip", "to_v")] {
            let weight = unet.load(&format!("{}.{theirs}.weight", layer.id), DType::F32, model.device())?;
            tensors.insert(format!("ip_adapter.{}.{ours}.weight", 2 * i + 1), weight);
        }
    }
    Ok(TensorStore::from_tensors("<new IP-Adapter>", tensors))
}

/// An IP-Adapter's projection and key/value layers.
struct IpAdapterTrainee {
    adapter: IpAdapterWeights,
    params: Vec<(String, Var)>,
    encoder: ImageEncoder,
    input: ProjectionInput,
    /// Each example's image features (the encoder is frozen: computed once), by example index.
    embeddings: RefCell<HashMap<usize, Tensor>>,
    options: IpAdapterOptions,
}

impl IpAdapterTrainee {
    /// Example `index`'s image features [1, ..] as the projection reads them.
    fn embedding(&self, data: &Dataset, index: usize) -> Result<Tensor> {
        if let Some(e) = self.embeddings.borrow().get(&index) {
            return Ok(e.clone());
        }
        let size = self.encoder.model.config().image_size;
        let pixels = self.encoder.processor.preprocess(&data.original(index, size)?, self.encoder.model.device())?;
        let output = self.encoder.model.forward(&pixels)?;
        let features = match self.input {
            ProjectionInput::HiddenStates => output.penultimate,
            _ => output.image_embeds,
        };
        self.embeddings.borrow_mut().insert(index, features.clone());
        Ok(features)
    }
}

impl Trainee for IpAdapterTrainee {
    fn parameters(&self) -> Vec<(String, Var)> {
        self.params.clone()
    }

    fn controls(&self, batch: &StepBatch<'_>, rng: &mut StdRng) -> Result<UNetControls> {
        let features = batch
            .indices
            .iter()
            .map(|&i| {
                let features = self.embedding(batch.data, i)?;
                let dropped = self.options.image_dropout > 0.0 && rng.random_bool(self.options.image_dropout);
                Ok(if dropped { features.zeros_like()? } else { features })
            })
            .collect::<Result<Vec<_>>>()?;
        let tokens = self.adapter.projection().forward(&Tensor::cat(&features, 0)?)?;
        let streams = self.adapter.sample_streams(&tokens, 1.0)?;
        Ok(UNetControls { extra_attention: vec![Arc::new(streams)], ..Default::default() })
    }

    fn identity(&self) -> Vec<(&'static str, String)> {
        let start = self.options.start.as_ref().map_or_else(|| "new".to_string(), |p| p.display().to_string());
        vec![
            ("ip_adapter_start", start),
            ("tokens", self.options.tokens.to_string()),
            ("image_dropout", self.options.image_dropout.to_string()),
        ]
    }

    fn export(&self, options: &TrainingOptions, step: usize, output: &Path) -> Result<()> {
        write_tensors(output, detached(&self.params), run_metadata(options, step))
    }
}
