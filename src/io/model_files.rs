//! The files of a Stable Diffusion model, wherever they come from: a diffusers folder or a single
//! checkpoint file, resolved to component configs (parsed and as JSON), a tokenizer, a scheduler
//! config and one weight store per component under diffusers names.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::diffusers_folder::DiffusersFolder;
use super::single_file;
use super::weights::TensorStore;
use crate::error::ResultExt;
use crate::models::clip_text::ClipTextConfig;
use crate::models::unet::UNetConfig;
use crate::models::vae::VaeConfig;
use crate::schedulers::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// What a single checkpoint file cannot say about itself, and overrides.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// Tokenizer folder, replacing a diffusers folder's own; for a single checkpoint the default is the
    /// `model_config` folder's `tokenizer/`, else the bundled CLIP tokenizer.
    pub tokenizer: Option<PathBuf>,
    /// For a single checkpoint: a diffusers model folder (or one holding its `unet/`, `vae/`,
    /// `text_encoder/`, `scheduler/` config files) giving what tensor shapes cannot: head counts,
    /// norm groups, scheduler.
    pub model_config: Option<PathBuf>,
    /// Overrides the scheduler config's `prediction_type` (`epsilon`, `v_prediction`).
    pub prediction_type: Option<String>,
    /// A VAE replacing the model's: a diffusers VAE folder or one weight file (see
    /// [`super::vae_file`]).
    pub vae: Option<PathBuf>,
}

/// One network of the model: its config and its weights under diffusers names.
pub struct Component<C> {
    /// The parsed config.
    pub config: C,
    /// The config as diffusers / transformers write it (`config.json`).
    pub json: Value,
    /// The file errors about the config name: its `config.json`, or the checkpoint it was read from.
    pub config_path: PathBuf,
    /// The weights.
    pub weights: Arc<TensorStore>,
}

/// Where the tokenizer's files are.
#[derive(Debug, Clone)]
pub enum TokenizerFiles {
    /// A tokenizer folder on disk.
    Dir(PathBuf),
    /// The CLIP tokenizer bundled in the binary, padded with this token.
    Bundled(&'static str),
}

/// The CLIP BPE files bundled in the binary (assets/clip-tokenizer: the 49408-token vocabulary of
/// SD1.x and SD2.x).
const BUNDLED_VOCAB: &str = include_str!("../../assets/clip-tokenizer/vocab.json");
const BUNDLED_MERGES: &str = include_str!("../../assets/clip-tokenizer/merges.txt");

impl TokenizerFiles {
    /// Loads the tokenizer.
    pub fn load(&self) -> Result<ClipTokenizer> {
        match self {
            TokenizerFiles::Dir(dir) => ClipTokenizer::from_dir(dir),
            TokenizerFiles::Bundled(_) => {
                // A private folder created exclusively (random name, 0700), removed when dropped.
                let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
                self.write_to(dir.path()).and_then(|()| ClipTokenizer::from_dir(dir.path()))
            }
        }
    }

    /// Writes the tokenizer's files into the folder `dir` (created): a copy of the tokenizer folder,
    /// or the bundled vocab.json + merges.txt with SD-style special-token configs.
    pub fn write_to(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let write =
            |name: &str, text: &str| std::fs::write(dir.join(name), text).map_err(|e| Error::io(dir.join(name), e));
        match self {
            TokenizerFiles::Dir(src) => {
                for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
                    let path = entry.map_err(|e| Error::io(src, e))?.path();
                    if path.is_file() {
                        let to = dir.join(path.file_name().unwrap_or_default());
                        std::fs::copy(&path, &to).map_err(|e| Error::io(&to, e))?;
                    }
                }
                Ok(())
            }
            TokenizerFiles::Bundled(pad) => {
                write("vocab.json", BUNDLED_VOCAB)?;
                write("merges.txt", BUNDLED_MERGES)?;
                let special = serde_json::json!({
                    "bos_token": "<|startoftext|>",
                    "eos_token": "<|endoftext|>",
                    "pad_token": pad,
                    "unk_token": "<|endoftext|>"
                });
                let mut config = special.clone();
                config["model_max_length"] = 77.into();
                config["do_lower_case"] = true.into();
                config["tokenizer_class"] = "CLIPTokenizer".into();
                write("special_tokens_map.json", &format!("{special:#}\n"))?;
                write("tokenizer_config.json", &format!("{config:#}\n"))
            }
        }
    }
}

/// Which Stable Diffusion family a model belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD1.x: OpenAI CLIP ViT-L text encoder.
    Sd1,
    /// SD2.x: OpenCLIP ViT-H text encoder.
    Sd2,
    /// SDXL: CLIP ViT-L and OpenCLIP ViT-bigG text encoders, added conditioning.
    Sdxl,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Sd1 => "SD1.x",
            Family::Sd2 => "SD2.x",
            Family::Sdxl => "SDXL",
        })
    }
}

/// SDXL's second tokenizer and text encoder.
pub struct SecondText {
    /// The tokenizer (`tokenizer_2`).
    pub tokenizer: ClipTokenizer,
    /// Where the tokenizer came from.
    pub tokenizer_files: TokenizerFiles,
    /// The text encoder (`text_encoder_2`).
    pub encoder: Component<ClipTextConfig>,
}

/// A model's components, configs and tokenizer, ready to build the networks from.
pub struct ModelFiles {
    /// The prompt tokenizer.
    pub tokenizer: ClipTokenizer,
    /// Where the tokenizer came from (copied by `convert`).
    pub tokenizer_files: TokenizerFiles,
    /// The text encoder.
    pub text_encoder: Component<ClipTextConfig>,
    /// SDXL's second tokenizer and text encoder (OpenCLIP bigG with its projection).
    pub text_2: Option<SecondText>,
    /// Whether a missing negative prompt means zero negative embeddings (SDXL's
    /// `force_zeros_for_empty_prompt` in `model_index.json`).
    pub force_zeros_for_empty_prompt: bool,
    /// Whether the time ids end in an aesthetic score instead of the target size (the SDXL
    /// refiner's `requires_aesthetics_score`).
    pub requires_aesthetics_score: bool,
    /// The denoising UNet.
    pub unet: Component<UNetConfig>,
    /// The autoencoder.
    pub vae: Component<VaeConfig>,
    /// The scheduler config (after any `prediction_type` override).
    pub scheduler_config: SchedulerConfig,
    /// The scheduler config as JSON (`scheduler_config.json`).
    pub scheduler_json: Value,
    /// The scheduler class the model names (`model_index.json`).
    pub scheduler_class: Option<String>,
}

impl ModelFiles {
    /// Opens a model: a diffusers folder (with `model_index.json`) or a single-file checkpoint
    /// (`.safetensors`, `.ckpt`).
    pub fn open(path: &Path, options: &SourceOptions) -> Result<Self> {
        let mut files = if path.is_file() {
            single_file::open(path, options)?
        } else {
            let mut files = Self::open_folder(path)?;
            if let Some(dir) = &options.model_config {
                return Err(Error::invalid(format!(
                    "--model-config {} is for single-file checkpoints; the diffusers folder {} has its own configs",
                    dir.display(),
                    path.display()
                )));
            }
            if let Some(dir) = &options.tokenizer {
                files.tokenizer_files = TokenizerFiles::Dir(dir.clone());
                files.tokenizer = files.tokenizer_files.load()?;
            }
            files
        };
        if let Some(vae) = &options.vae {
            files.vae =
                super::vae_file::open(vae, &files.vae).context(|| format!("loading the VAE {}", vae.display()))?;
        }
        if let Some(prediction) = &options.prediction_type {
            if !["epsilon", "v_prediction"].contains(&prediction.as_str()) {
                return Err(Error::invalid(format!(
                    "unknown prediction type `{prediction}` (expected epsilon or v_prediction)"
                )));
            }
            files.scheduler_config.prediction_type = Some(prediction.clone());
            files.scheduler_json["prediction_type"] = Value::String(prediction.clone());
        }
        Ok(files)
    }

    fn open_folder(root: &Path) -> Result<Self> {
        let folder = DiffusersFolder::open(root)?;
        let scheduler_path = folder.component_file("scheduler", "scheduler_config.json")?;
        // The SDXL refiner has only the second (bigG) encoder: it is then the model's one encoder.
        let refiner = folder.class_name("text_encoder").is_none() && folder.class_name("text_encoder_2").is_some();
        let (tokenizer_name, encoder_name) =
            if refiner { ("tokenizer_2", "text_encoder_2") } else { ("tokenizer", "text_encoder") };
        let tokenizer_dir = folder.component_dir(tokenizer_name)?;
        let text_2 = if !refiner && folder.class_name("text_encoder_2").is_some() {
            let tokenizer_files = TokenizerFiles::Dir(folder.component_dir("tokenizer_2")?);
            Some(SecondText {
                tokenizer: tokenizer_files.load()?,
                tokenizer_files,
                encoder: folder_component(&folder, "text_encoder_2", ClipTextConfig::load)?,
            })
        } else {
            None
        };
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(&tokenizer_dir)?,
            tokenizer_files: TokenizerFiles::Dir(tokenizer_dir),
            text_encoder: folder_component(&folder, encoder_name, ClipTextConfig::load)?,
            text_2,
            force_zeros_for_empty_prompt: folder.flag("force_zeros_for_empty_prompt"),
            requires_aesthetics_score: folder.flag("requires_aesthetics_score"),
            unet: folder_component(&folder, "unet", UNetConfig::load)?,
            vae: if folder.lists_as_absent("vae") {
                pixel_space(&folder)
            } else {
                folder_component(&folder, "vae", VaeConfig::load)?
            },
            scheduler_config: SchedulerConfig::load(&scheduler_path)?,
            scheduler_json: super::read_json(&scheduler_path)?,
            scheduler_class: folder.class_name("scheduler").map(str::to_string),
        })
    }

    /// Whether this is an SDXL refiner: added conditioning and one (bigG) text encoder.
    pub fn is_refiner(&self) -> bool {
        self.unet.config.add_embedding.is_some() && self.text_2.is_none()
    }

    /// The model's family, from its text encoders (a second one, or a UNet with added
    /// conditioning, marks SDXL; OpenCLIP's GELU SD2.x).
    pub fn family(&self) -> Family {
        if self.text_2.is_some() || self.unet.config.add_embedding.is_some() {
            return Family::Sdxl;
        }
        match self.text_encoder.config.hidden_act {
            crate::models::clip_text::Activation::QuickGelu => Family::Sd1,
            _ => Family::Sd2,
        }
    }
}

/// The VAE of a pixel-space model (a folder whose `model_index.json` lists none): the identity,
/// without weights.
fn pixel_space(folder: &DiffusersFolder) -> Component<VaeConfig> {
    Component {
        config: VaeConfig::pixels(),
        json: Value::Null,
        config_path: folder.root().join("model_index.json"),
        weights: Arc::new(TensorStore::empty(folder.root())),
    }
}

/// Component `name` of a diffusers folder: its `config.json` and weights.
fn folder_component<C>(folder: &DiffusersFolder, name: &str, load: fn(&Path) -> Result<C>) -> Result<Component<C>> {
    let path = folder.component_file(name, "config.json")?;
    Ok(Component {
        config: load(&path)?,
        json: super::read_json(&path)?,
        config_path: path,
        weights: folder.open_weights(name)?,
    })
}
