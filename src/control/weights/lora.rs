//! LoRA-family weight files resolved against a model's layers: kohya (`lora_unet_…`, `lora_te_…`
//! with `.lora_down.weight`, `.lora_up.weight`, `.alpha`), diffusers/PEFT (`unet.<path>.lora_A.weight`,
//! `.lora_B.weight`, alphas from `.alpha` keys or the `lora_adapter_metadata` header), and LyCORIS
//! LoHa (`hada_*`) and LoKr (`lokr_*`) under either naming. Safetensors and PyTorch zip files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::lycoris;
use crate::io::weights::TensorStore;
use crate::models::nn::{LayerKind, LayerRegistry, WeightDelta};
use crate::{Error, Result};

/// Key suffixes of the parts a module's entry can have, each mapped to the part it holds.
const PARTS: [(&str, &str); 20] = [
    ("lora_down.weight", "down"),
    ("lora_up.weight", "up"),
    ("lora_A.weight", "down"),
    ("lora_B.weight", "up"),
    ("lora.down.weight", "down"),
    ("lora.up.weight", "up"),
    ("alpha", "alpha"),
    ("hada_w1_a", "hada_w1_a"),
    ("hada_w1_b", "hada_w1_b"),
    ("hada_w2_a", "hada_w2_a"),
    ("hada_w2_b", "hada_w2_b"),
    ("hada_t1", "hada_t1"),
    ("hada_t2", "hada_t2"),
    ("lokr_w1", "lokr_w1"),
    ("lokr_w1_a", "lokr_w1_a"),
    ("lokr_w1_b", "lokr_w1_b"),
    ("lokr_w2", "lokr_w2"),
    ("lokr_w2_a", "lokr_w2_a"),
    ("lokr_w2_b", "lokr_w2_b"),
    ("lokr_t2", "lokr_t2"),
];

/// Key suffixes of variants this build recognises but does not apply, with what they are.
const UNSUPPORTED: [(&str, &str); 3] = [
    ("dora_scale", "DoRA (`dora_scale`)"),
    ("lora_magnitude_vector", "DoRA (`lora_magnitude_vector`)"),
    ("lora_mid.weight", "LoCon with a Tucker core (`lora_mid`)"),
];

/// kohya's module-name prefix for each model component (`lora_te1_` is SDXL's name for the first
/// text encoder).
const KOHYA_PREFIXES: [(&str, &str); 4] = [
    ("unet", "lora_unet_"),
    ("text_encoder", "lora_te_"),
    ("text_encoder", "lora_te1_"),
    ("text_encoder_2", "lora_te2_"),
];

/// A LoRA-family file resolved against a model: one weight delta per target layer.
#[derive(Debug, Clone)]
pub struct Lora {
    /// The file it was read from.
    pub path: PathBuf,
    /// Each target layer's module path (as in [`LayerRegistry`]) with its ΔW at multiplier 1,
    /// alpha / rank included.
    pub deltas: Vec<(String, WeightDelta)>,
    /// Keys of the file that match no layer of the model.
    pub unmatched: Vec<String>,
}

impl Lora {
    /// Reads `path` and resolves its entries against `layers`, loading the factors onto `device`.
    /// Fails on entries that do not fit their layer (another base model), a rank mismatch
    /// between the factors, and on files made for SDXL.
    pub fn load(path: &Path, layers: &LayerRegistry, device: &Device) -> Result<Self> {
        let store = TensorStore::open(path)?;
        let metadata = safetensors_metadata(path)?;
        let err = |message: String| Error::Format { path: path.into(), message };

        let mut modules: BTreeMap<String, BTreeMap<&str, String>> = BTreeMap::new();
        let mut unmatched = Vec::new();
        for key in store.keys() {
            if let Some((_, what)) = UNSUPPORTED.iter().find(|(suffix, _)| key.ends_with(&format!(".{suffix}"))) {
                return Err(err(format!("{what} is not supported (key `{key}`)")));
            }
            match PARTS.iter().find_map(|(suffix, part)| Some((key.strip_suffix(&format!(".{suffix}"))?, *part))) {
                Some((module, part)) => {
                    modules.entry(module.to_string()).or_default().insert(part, key.to_string());
                }
                None => unmatched.push(key.to_string()),
            }
        }
        check_architecture(&modules, &metadata, layers).map_err(err)?;

        let names = LayerNames::new(layers);
        let peft = PeftAlphas::from_metadata(&metadata).map_err(err)?;
        let mut deltas = Vec::new();
        let mut targets = HashSet::new();
        for (module, parts) in &modules {
            let resolved = names.resolve(module).filter(|_| parts.keys().any(|p| *p != "alpha"));
            let Some((layer_path, kind)) = resolved else {
                unmatched.extend(parts.values().cloned());
                continue;
            };
            if !targets.insert(layer_path.clone()) {
                return Err(err(format!("two entries of the file target the layer `{layer_path}` (`{module}`)")));
            }
            let entry = Entry { store: &store, parts, device };
            let delta = entry.delta(&kind, peft.alpha(&layer_path)).map_err(|e| match e {
                Error::InvalidArgument(message) => err(format!("`{module}`: {message}")),
                Error::Candle(e) => err(format!("`{module}`: {e}")),
                other => other,
            })?;
            deltas.push((layer_path, delta));
        }
        unmatched.sort();
        Ok(Self { path: path.to_path_buf(), deltas, unmatched })
    }
}

/// Refuses files made for SDXL (two text encoders) on a model that has one, and kohya files made
/// for one text encoder (`lora_te_`) on SDXL.
fn check_architecture(
    modules: &BTreeMap<String, BTreeMap<&str, String>>,
    metadata: &HashMap<String, String>,
    layers: &LayerRegistry,
) -> std::result::Result<(), String> {
    if layers.paths().iter().any(|p| p.starts_with("text_encoder_2.")) {
        return match modules.keys().find(|m| m.starts_with("lora_te_")) {
            Some(module) => Err(format!(
                "this LoRA is for SD1.x/2.x (its entry `{module}` names a single text encoder); the \
                 loaded model is SDXL with two"
            )),
            None => Ok(()),
        };
    }
    let sdxl_module = modules
        .keys()
        .find(|m| m.starts_with("lora_te1_") || m.starts_with("lora_te2_") || m.starts_with("text_encoder_2."));
    let evidence = match (sdxl_module, metadata.get("ss_base_model_version")) {
        (Some(module), _) => format!("it has the entry `{module}` for SDXL's second text encoder naming"),
        (None, Some(version)) if version.starts_with("sdxl") => {
            format!("its metadata says ss_base_model_version={version}")
        }
        _ => return Ok(()),
    };
    Err(format!("this LoRA is for SDXL ({evidence}); the loaded model is SD1.x/2.x with a single text encoder"))
}

/// Maps a file's module names to the model's layer paths: kohya names are built from the model's
/// own paths (dots replaced by underscores), PEFT names are the paths themselves.
struct LayerNames<'a> {
    layers: &'a LayerRegistry,
    kohya: HashMap<String, String>,
}

impl<'a> LayerNames<'a> {
    fn new(layers: &'a LayerRegistry) -> Self {
        let mut kohya = HashMap::new();
        let mut add = |name: &str, path: &str| {
            let Some((component, rest)) = name.split_once('.') else { return };
            for (_, prefix) in KOHYA_PREFIXES.iter().filter(|(c, _)| *c == component) {
                kohya.entry(format!("{prefix}{}", rest.replace('.', "_"))).or_insert_with(|| path.to_string());
            }
        };
        for path in layers.paths() {
            add(&path, &path);
        }
        // kohya names SDXL's UNet modules by the original layout (`lora_unet_input_blocks_4_1_…`).
        for (original, path) in layers.original_names() {
            add(&original, &path);
        }
        Self { layers, kohya }
    }

    /// The layer path and kind a module name of the file targets.
    fn resolve(&self, module: &str) -> Option<(String, LayerKind)> {
        let path = if module.starts_with("lora_") {
            self.kohya.get(module).cloned()
        } else if let Some(rest) = module.strip_prefix("text_encoder.")
            && self.layers.get(module).is_none()
        {
            // transformers 5 saves the text encoder without its `text_model.` level.
            Some(format!("text_encoder.text_model.{rest}"))
        } else {
            Some(module.to_string())
        }?;
        let kind = self.layers.get(&path)?.kind();
        Some((path, kind))
    }
}

/// Alphas of diffusers/PEFT files from the `lora_adapter_metadata` header diffusers writes: per
/// component `lora_alpha`, `use_rslora` and an `alpha_pattern` of module names.
#[derive(Default)]
struct PeftAlphas {
    components: HashMap<String, PeftConfig>,
}

struct PeftConfig {
    lora_alpha: Option<f64>,
    use_rslora: bool,
    alpha_pattern: Vec<(String, f64)>,
}

impl PeftAlphas {
    fn from_metadata(metadata: &HashMap<String, String>) -> std::result::Result<Self, String> {
        let Some(raw) = metadata.get("lora_adapter_metadata") else { return Ok(Self::default()) };
        let parsed: Value = serde_json::from_str(raw).map_err(|e| format!("unreadable lora_adapter_metadata: {e}"))?;
        let Value::Object(fields) = parsed else { return Err("lora_adapter_metadata is not a JSON object".into()) };
        let mut components = HashMap::new();
        for component in ["unet", "text_encoder", "text_encoder_2"] {
            let get = |name: &str| fields.get(&format!("{component}.{name}"));
            if get("r").is_none() && get("lora_alpha").is_none() {
                continue;
            }
            let alpha_pattern = get("alpha_pattern")
                .and_then(Value::as_object)
                .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
                .unwrap_or_default();
            components.insert(
                component.to_string(),
                PeftConfig {
                    lora_alpha: get("lora_alpha").and_then(Value::as_f64),
                    use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
                    alpha_pattern,
                },
            );
        }
        Ok(Self { components })
    }

    /// The alpha rule the header gives the layer at `path`, if any.
    fn alpha(&self, path: &str) -> Option<AlphaRule> {
        let (component, module) = path.split_once('.')?;
        let config = self.components.get(component)?;
        let module = module.strip_prefix("text_model.").unwrap_or(module);
        let alpha = config
            .alpha_pattern
            .iter()
            .find(|(pattern, _)| module == pattern || module.ends_with(&format!(".{pattern}")))
            .map(|(_, alpha)| *alpha)
            .or(config.lora_alpha)?;
        Some(AlphaRule { alpha, rslora: config.use_rslora })
    }
}

/// A LoRA's scale rule when its file has no `.alpha` key: alpha / rank, or alpha / √rank (rsLoRA).
#[derive(Debug, Clone, Copy)]
struct AlphaRule {
    alpha: f64,
    rslora: bool,
}

/// One module's entry in the file.
struct Entry<'a> {
    store: &'a TensorStore,
    parts: &'a BTreeMap<&'a str, String>,
    device: &'a Device,
}

impl Entry<'_> {
    /// Part `part` as f32, refusing NaN or infinite values (they would turn the image black).
    fn tensor(&self, part: &str) -> Result<Option<Tensor>> {
        let Some(key) = self.parts.get(part) else { return Ok(None) };
        let t = self.store.load(key, DType::F32, self.device)?;
        if !crate::models::nn::all_finite(&t)? {
            return Err(Error::invalid(format!("`{key}` holds NaN or infinite values")));
        }
        Ok(Some(t))
    }

    fn required(&self, part: &str) -> Result<Tensor> {
        self.tensor(part)?.ok_or_else(|| {
            let present: Vec<&str> = self.parts.keys().copied().collect();
            Error::invalid(format!("has {present:?} but no `{part}`"))
        })
    }

    /// The `.alpha` scalar, if the entry has one.
    fn alpha(&self) -> Result<Option<f64>> {
        let Some(t) = self.tensor("alpha")? else { return Ok(None) };
        match t.flatten_all()?.to_vec1::<f32>()?.as_slice() {
            [alpha] => Ok(Some(*alpha as f64)),
            _ => Err(Error::invalid(format!("alpha has shape {:?}, expected a scalar", t.dims()))),
        }
    }

    fn delta(&self, kind: &LayerKind, peft_alpha: Option<AlphaRule>) -> Result<WeightDelta> {
        let has = |prefix: &str| self.parts.keys().any(|p| p.starts_with(prefix));
        match (has("down") || has("up"), has("hada_"), has("lokr_")) {
            (true, false, false) => self.lora(kind, peft_alpha),
            (false, true, false) => self.loha(kind),
            (false, false, true) => self.lokr(kind),
            _ => Err(Error::invalid(format!("mixes LoRA, LoHa and LoKr parts: {:?}", self.parts.values()))),
        }
    }

    /// ΔW = (alpha / rank) · up @ down.
    fn lora(&self, kind: &LayerKind, peft_alpha: Option<AlphaRule>) -> Result<WeightDelta> {
        let (down, up) = (self.required("down")?, self.required("up")?);
        let (down_key, up_key) = (&self.parts["down"], &self.parts["up"]);
        let rank = down.dim(0)?;
        if up.rank() < 2 || up.dim(1)? != rank {
            return Err(Error::invalid(format!(
                "rank mismatch: `{down_key}` has shape {:?} (rank {rank}) but `{up_key}` has shape {:?}",
                down.dims(),
                up.dims()
            )));
        }
        let scale = match (self.alpha()?, peft_alpha) {
            (Some(alpha), _) => alpha / rank as f64,
            (None, Some(rule)) if rule.rslora => rule.alpha / (rank as f64).sqrt(),
            (None, Some(rule)) => rule.alpha / rank as f64,
            (None, None) => 1.0,
        };
        let delta = WeightDelta::LowRank { down: fit_rank(&down, kind)?, up: fit_rank(&up, kind)?, scale };
        delta.check(kind).map_err(|_| {
            Error::invalid(format!(
                "`{down_key}` {:?} and `{up_key}` {:?} do not fit the layer, a {kind}: the LoRA was made for a \
                 different base model",
                down.dims(),
                up.dims()
            ))
        })?;
        Ok(delta)
    }

    /// ΔW = (alpha / rank) · (w1a @ w1b) ⊙ (w2a @ w2b), with optional Tucker cores.
    fn loha(&self, kind: &LayerKind) -> Result<WeightDelta> {
        let shape = kind.weight_shape();
        let (w1a, w1b) = (self.required("hada_w1_a")?, self.required("hada_w1_b")?);
        let (w2a, w2b) = (self.required("hada_w2_a")?, self.required("hada_w2_b")?);
        let w1 = lycoris::loha_factor(&w1a, &w1b, self.tensor("hada_t1")?.as_ref(), &shape)?;
        let w2 = lycoris::loha_factor(&w2a, &w2b, self.tensor("hada_t2")?.as_ref(), &shape)?;
        let scale = self.alpha()?.map_or(1.0, |alpha| alpha / w1b.dim(0).unwrap_or(1) as f64);
        Ok(WeightDelta::Dense((lycoris::loha(&w1, &w2)? * scale)?))
    }

    /// ΔW = kron(w1, w2), times alpha / rank when a factor is itself low-rank.
    fn lokr(&self, kind: &LayerKind) -> Result<WeightDelta> {
        let shape = kind.weight_shape();
        let mut rank = None;
        let w1 = match self.tensor("lokr_w1")? {
            Some(w1) => w1,
            None => {
                let (a, b) = (self.required("lokr_w1_a")?, self.required("lokr_w1_b")?);
                rank = Some(b.dim(0)?);
                a.matmul(&b)?
            }
        };
        let w2 = match self.tensor("lokr_w2")? {
            Some(w2) => w2,
            None => {
                let (a, b) = (self.required("lokr_w2_a")?, self.required("lokr_w2_b")?);
                rank = Some(b.dim(0)?);
                match self.tensor("lokr_t2")? {
                    Some(t) => lycoris::tucker(&t, &a, &b)?,
                    None => a.matmul(&b.reshape((b.dim(0)?, ()))?)?,
                }
            }
        };
        let scale = match (self.alpha()?, rank) {
            (Some(alpha), Some(rank)) => alpha / rank as f64,
            _ => 1.0,
        };
        Ok(WeightDelta::Dense((lycoris::lokr(&w1, &w2, &shape)? * scale)?))
    }
}

/// A LoRA factor in the layout its layer applies: 1x1-convolution factors [a, b, 1, 1] on a Linear
/// become [a, b]; matrix factors [a, b] on a convolution become [a, b, 1, 1].
fn fit_rank(factor: &Tensor, kind: &LayerKind) -> Result<Tensor> {
    Ok(match (kind, factor.dims()) {
        (LayerKind::Linear { .. }, &[a, b, 1, 1]) => factor.reshape((a, b))?,
        (LayerKind::Conv2d { .. }, &[a, b]) => factor.reshape((a, b, 1, 1))?,
        _ => factor.clone(),
    })
}

/// The `__metadata__` strings of a safetensors file (empty for other formats).
fn safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let (mut file, size) = crate::io::input::open_regular(path)?;
    let mut len = [0u8; 8];
    if file.read_exact(&mut len).is_err() || len.starts_with(b"PK") {
        return Ok(HashMap::new());
    }
    let declared = u64::from_le_bytes(len);
    if declared > size.saturating_sub(8) {
        return Err(Error::Format {
            path: path.into(),
            message: format!("the safetensors header claims {declared} bytes, the file has {size}"),
        });
    }
    let mut header = vec![0u8; declared as usize];
    file.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let parsed: Value = serde_json::from_slice(&header)
        .map_err(|e| Error::Format { path: path.into(), message: format!("unreadable safetensors header: {e}") })?;
    Ok(parsed
        .get("__metadata__")
        .and_then(Value::as_object)
        .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default())
}
