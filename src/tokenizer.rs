//! The CLIP BPE tokenizer, from `tokenizer.json` or from the `vocab.json` + `merges.txt` pair the
//! public SD repositories ship, padded and truncated as diffusers' pipelines do.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Value, json};
use tokenizers::Tokenizer;

use crate::prompt::PromptWord;
use crate::{Error, Result};

/// The pre-tokenisation pattern of CLIP (lower-cased input).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP tokenizer with its special tokens and sequence length.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
    /// Placeholder tokens added after loading: each one's id → the ids a mention of it stands for.
    placeholders: HashMap<u32, Vec<u32>>,
}

/// A special-token entry: either a plain string or `{"content": ...}`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Loads the tokenizer in `dir`: `tokenizer.json` when present, else `vocab.json` +
    /// `merges.txt`; special tokens and `model_max_length` come from `tokenizer_config.json` and
    /// `special_tokens_map.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer_json = dir.join("tokenizer.json");
        let tokenizer = if tokenizer_json.is_file() {
            Tokenizer::from_file(&tokenizer_json)
                .map_err(|e| Error::config(&tokenizer_json, format!("unreadable tokenizer: {e}")))?
        } else {
            let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
            for f in [&vocab, &merges] {
                if !f.is_file() {
                    return Err(Error::invalid(format!(
                        "{}: tokenizer folder has neither tokenizer.json nor vocab.json + merges.txt ({} is missing)",
                        dir.display(),
                        f.display()
                    )));
                }
            }
            build_clip_bpe(&vocab, &merges)?
        };
        let mut settings = serde_json::Map::new();
        for file in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(file);
            if path.is_file() {
                let v: Value = crate::io::read_json(&path)?;
                if let Value::Object(o) = v {
                    settings.extend(o);
                }
            }
        }
        let special = |name: &str, default: &str| -> Result<u32> {
            let token = settings.get(name).and_then(token_content).unwrap_or_else(|| default.to_string());
            tokenizer
                .token_to_id(&token)
                .ok_or_else(|| Error::config(dir, format!("{name} `{token}` is not in the tokenizer's vocabulary")))
        };
        let bos = special("bos_token", "<|startoftext|>")?;
        let eos = special("eos_token", "<|endoftext|>")?;
        let pad = special("pad_token", "<|endoftext|>")?;
        // transformers writes a huge sentinel when no length is set; CLIP's context is 77 tokens.
        let max_length = settings
            .get("model_max_length")
            .and_then(Value::as_f64)
            .filter(|&n| (2.0..=4096.0).contains(&n))
            .map_or(77, |n| n as usize);
        Ok(Self { tokenizer, bos, eos, pad, max_length, placeholders: HashMap::new() })
    }

    /// The padded sequence length (77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The start, end and padding token ids.
    pub fn special_ids(&self) -> (u32, u32, u32) {
        (self.bos, self.eos, self.pad)
    }

    /// Number of token ids: the vocabulary and the added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Adds the placeholder `token` standing for `vectors` new tokens, named `token`, `token_1`, …
    /// as diffusers' `load_textual_inversion` names them, with the next free ids (after the
    /// vocabulary); returns those ids. A mention of `token` in a prompt then stands for all of them
    /// (each name can also be written on its own). Names are matched in the lower-cased prompt, like
    /// all CLIP text, so they must not already be a token or a word of the vocabulary.
    pub fn add_placeholder(&mut self, token: &str, vectors: usize) -> Result<Vec<u32>> {
        if token.trim().is_empty() || vectors == 0 {
            return Err(Error::invalid(format!(
                "placeholder token {token:?} must be a non-empty name with at least one vector"
            )));
        }
        let names: Vec<String> =
            std::iter::once(token.to_string()).chain((1..vectors).map(|i| format!("{token}_{i}"))).collect();
        for name in &names {
            let lower = name.to_lowercase();
            if let Some(existing) = [name.clone(), lower.clone(), format!("{lower}</w>")]
                .into_iter()
                .find(|t| self.tokenizer.token_to_id(t).is_some())
            {
                return Err(Error::invalid(format!(
                    "token `{name}` collides with `{existing}`, already in the tokenizer's vocabulary: \
                     choose another name (e.g. `<{token}>`)"
                )));
            }
        }
        let first = self.vocab_size() as u32;
        let added = self.tokenizer.add_tokens(names.iter().map(|n| tokenizers::AddedToken::from(n.as_str(), false)));
        let ids: Vec<u32> = names.iter().filter_map(|n| self.tokenizer.token_to_id(n)).collect();
        let expected: Vec<u32> = (first..first + names.len() as u32).collect();
        if !matches!(added, Ok(n) if n == names.len()) || ids != expected {
            return Err(Error::invalid(format!("could not add the tokens {names:?} to the tokenizer")));
        }
        self.placeholders.insert(ids[0], ids.clone());
        Ok(ids)
    }

    /// The ids of `text` without special tokens, padding or truncation, split into pieces: one per
    /// token, except that a placeholder's ids stay together as one piece.
    pub fn encode_pieces(&self, text: &str) -> Result<Vec<Vec<u32>>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::invalid(format!("could not tokenize {text:?}: {e}")))?;
        Ok(enc.get_ids().iter().map(|id| self.placeholders.get(id).cloned().unwrap_or_else(|| vec![*id])).collect())
    }

    /// The ids of `text` without special tokens, padding or truncation.
    pub fn encode_words(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_pieces(text)?.concat())
    }

    /// `<bos> ids <eos>` for `text`, untruncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = vec![self.bos];
        ids.extend(self.encode_words(text)?);
        ids.push(self.eos);
        Ok(ids)
    }

    /// [`Self::encode_padded`] with the words of `text` whose tokens survived truncation, each with
    /// the rows (positions in the ids) of its tokens. A word is what the pre-tokenizer splits off (a
    /// run of letters, of digits, or a punctuation mark); a placeholder counts as one word.
    pub fn encode_padded_words(&self, text: &str) -> Result<(Vec<u32>, Vec<PromptWord>)> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::invalid(format!("could not tokenize {text:?}: {e}")))?;
        let last_row = self.max_length - 1;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        let mut words: Vec<PromptWord> = Vec::new();
        let mut previous: Option<(u32, usize)> = None;
        for (i, id) in enc.get_ids().iter().enumerate() {
            let first = ids.len();
            match self.placeholders.get(id) {
                Some(all) => ids.extend(all.iter().take(last_row.saturating_sub(first))),
                None if first < last_row => ids.push(*id),
                None => {}
            }
            if ids.len() == first {
                break;
            }
            let (start, end) = enc.get_offsets()[i];
            // Tokens of one pre-tokenized word share a word id; without one, a token is a word.
            let word = enc.get_word_ids()[i].map(|w| (w, start));
            match (word, previous, words.last_mut()) {
                (Some((w, _)), Some((p, word_start)), Some(last)) if w == p => {
                    last.rows.end = ids.len();
                    last.text = text.get(word_start..end).unwrap_or_default().to_string();
                }
                _ => words.push(PromptWord {
                    text: text.get(start..end).unwrap_or_default().to_string(),
                    rows: first..ids.len(),
                }),
            }
            previous = word.map(|(w, s)| match previous {
                Some((p, ps)) if p == w => (w, ps),
                _ => (w, s),
            });
        }
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        Ok((ids, words))
    }

    /// `<bos> ids <eos> <pad>…` of exactly [`Self::max_length`] tokens, the text truncated to fit
    /// (diffusers' `padding="max_length", truncation=True`).
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>> {
        let mut words = self.encode_words(text)?;
        words.truncate(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend(words);
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        Ok(ids)
    }
}

/// Builds the CLIP BPE pipeline (as transformers' `CLIPTokenizerFast` saves it) from the two files.
fn build_clip_bpe(vocab_path: &Path, merges_path: &Path) -> Result<Tokenizer> {
    let vocab: HashMap<String, u32> = crate::io::read_json(vocab_path)?;
    let merges_text = crate::io::read_text(merges_path)?;
    let merges: Vec<&str> =
        merges_text.lines().filter(|l| !l.starts_with("#version") && !l.trim().is_empty()).collect();
    if let Some(bad) = merges.iter().find(|l| l.split(' ').count() != 2) {
        return Err(Error::config(merges_path, format!("malformed merge line {bad:?} (expected two tokens)")));
    }
    let added: Vec<Value> = ["<|startoftext|>", "<|endoftext|>"]
        .iter()
        .filter_map(|t| vocab.get(*t).map(|id| json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true})))
        .collect();
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_PATTERN}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
            "vocab": vocab, "merges": merges
        }
    });
    spec.to_string().parse::<Tokenizer>().map_err(|e| {
        Error::config(vocab_path, format!("could not build the CLIP tokenizer from vocab.json + merges.txt: {e}"))
    })
}
