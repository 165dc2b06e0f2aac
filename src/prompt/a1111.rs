//! The AUTOMATIC1111 web UI's prompt syntax.
//!
//! Emphasis: `(text)` multiplies the weight of its tokens by 1.1, `[text]` divides it by 1.1,
//! `(text:1.3)` multiplies it by 1.3; brackets nest, unclosed ones apply to the end of the prompt,
//! a closing bracket without an opening one is literal text, and `\(`, `\)`, `\[`, `\]`, `\\` are
//! the literal characters. `BREAK` (a whole word, in capitals) ends the current chunk.
//!
//! Length: the tokens are laid out in chunks of 75 (the text encoder's 77 less start and end);
//! when a chunk fills up and one of its last 20 tokens is a comma, the text after that comma moves
//! to the next chunk, and a placeholder token's vectors are never split between chunks. Each chunk
//! is encoded on its own as `<start> tokens <end> <pad>…` and the encodings are joined along the
//! sequence. Weights scale each token's encoding, after which the chunk's encoding is rescaled to
//! its original mean.

use candle_core::{DType, Device, Tensor};

use crate::Result;
use crate::models::clip_text::ClipTextEncoder;
use crate::tokenizer::ClipTokenizer;

/// Weight factor of one pair of round brackets.
const ROUND: f64 = 1.1;
/// How many tokens before the end of a full chunk a comma may be to move the text after it.
const COMMA_BACKTRACK: usize = 20;

/// A run of prompt text with its weight, or a chunk break.
#[derive(Debug, Clone, PartialEq)]
pub enum Fragment {
    /// Text and the weight of its tokens.
    Text(String, f64),
    /// `BREAK`: the next text starts a new chunk.
    Break,
}

/// Splits `text` into runs of equal weight, brackets and escapes resolved.
pub fn parse(text: &str) -> Vec<Fragment> {
    let chars: Vec<char> = text.chars().collect();
    let mut out: Vec<Fragment> = Vec::new();
    let (mut round, mut square): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' => {
                // An escaped bracket or backslash is that character; a lone backslash is dropped.
                let escaped = chars.get(i + 1).filter(|n| "()[]\\".contains(**n));
                out.push(Fragment::Text(escaped.map(|n| n.to_string()).unwrap_or_default(), 1.0));
                i += 1 + usize::from(escaped.is_some());
            }
            '(' => {
                round.push(out.len());
                i += 1;
            }
            '[' => {
                square.push(out.len());
                i += 1;
            }
            ':' => match explicit_weight(&chars[i..]) {
                Some((weight, len)) if !round.is_empty() => {
                    let start = round.pop().unwrap_or_default();
                    multiply(&mut out, start, weight);
                    i += len;
                }
                Some((_, len)) => {
                    push_literal(&mut out, &chars[i..i + len].iter().collect::<String>());
                    i += len;
                }
                None => {
                    out.push(Fragment::Text(":".into(), 1.0));
                    i += 1;
                }
            },
            ')' | ']' => {
                let (stack, factor) = if c == ')' { (&mut round, ROUND) } else { (&mut square, 1.0 / ROUND) };
                match stack.pop() {
                    Some(start) => multiply(&mut out, start, factor),
                    None => out.push(Fragment::Text(c.to_string(), 1.0)),
                }
                i += 1;
            }
            _ => {
                let end = (i..chars.len()).find(|&j| "\\()[]:".contains(chars[j])).unwrap_or(chars.len());
                push_literal(&mut out, &chars[i..end].iter().collect::<String>());
                i = end;
            }
        }
    }
    for start in round {
        multiply(&mut out, start, ROUND);
    }
    for start in square {
        multiply(&mut out, start, 1.0 / ROUND);
    }
    if out.is_empty() {
        out.push(Fragment::Text(String::new(), 1.0));
    }
    merge_equal_weights(out)
}

/// `:1.3)` (spaces allowed around the number) at the start of `chars`: the weight and the length
/// of the match. A number that does not parse is no weight.
fn explicit_weight(chars: &[char]) -> Option<(f64, usize)> {
    let mut i = 1;
    while chars.get(i).is_some_and(|c| c.is_whitespace()) {
        i += 1;
    }
    let start = i;
    if chars.get(i).is_some_and(|c| *c == '+' || *c == '-') {
        i += 1;
    }
    let digits = i;
    while chars.get(i).is_some_and(|c| *c == '.' || c.is_ascii_digit()) {
        i += 1;
    }
    if i == digits {
        return None;
    }
    let number: String = chars[start..i].iter().collect();
    while chars.get(i).is_some_and(|c| c.is_whitespace()) {
        i += 1;
    }
    (chars.get(i) == Some(&')')).then_some(())?;
    Some((number.parse().ok()?, i + 1))
}

/// Multiplies the weight of every text fragment from `start` on.
fn multiply(out: &mut [Fragment], start: usize, factor: f64) {
    for fragment in &mut out[start..] {
        if let Fragment::Text(_, weight) = fragment {
            *weight *= factor;
        }
    }
}

/// Appends literal text, split at each `BREAK` (with the whitespace around it).
fn push_literal(out: &mut Vec<Fragment>, text: &str) {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut rest = text;
    loop {
        let found = rest.match_indices("BREAK").find(|(at, _)| {
            !rest[..*at].chars().next_back().is_some_and(is_word) && !rest[at + 5..].chars().next().is_some_and(is_word)
        });
        let Some((at, _)) = found else { break };
        out.push(Fragment::Text(rest[..at].trim_end().to_string(), 1.0));
        out.push(Fragment::Break);
        rest = rest[at + 5..].trim_start();
    }
    out.push(Fragment::Text(rest.to_string(), 1.0));
}

fn merge_equal_weights(fragments: Vec<Fragment>) -> Vec<Fragment> {
    let mut out: Vec<Fragment> = Vec::with_capacity(fragments.len());
    for fragment in fragments {
        match (out.last_mut(), fragment) {
            (Some(Fragment::Text(text, weight)), Fragment::Text(next, next_weight)) if *weight == next_weight => {
                text.push_str(&next);
            }
            (_, fragment) => out.push(fragment),
        }
    }
    out
}

/// One chunk of a prompt: `<start>` 75 tokens `<end>`, with a weight per token.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// Token ids (the tokenizer's max length, 77 for CLIP).
    pub ids: Vec<u32>,
    /// Weight of each token (1 for start, end and padding).
    pub weights: Vec<f32>,
}

/// Lays `text` out in chunks (at least one).
pub fn chunks(tokenizer: &ClipTokenizer, text: &str) -> Result<Vec<Chunk>> {
    let mut builder = ChunkBuilder::new(tokenizer);
    for fragment in parse(text) {
        match fragment {
            Fragment::Break => builder.close(),
            Fragment::Text(text, weight) => {
                for piece in tokenizer.encode_pieces(&text)? {
                    builder.push(piece, weight as f32);
                }
            }
        }
    }
    if !builder.ids.is_empty() || builder.chunks.is_empty() {
        builder.close();
    }
    Ok(builder.chunks)
}

struct ChunkBuilder {
    chunks: Vec<Chunk>,
    ids: Vec<u32>,
    weights: Vec<f32>,
    last_comma: Option<usize>,
    comma: Option<u32>,
    len: usize,
    special: (u32, u32, u32),
}

impl ChunkBuilder {
    fn new(tokenizer: &ClipTokenizer) -> Self {
        Self {
            chunks: Vec::new(),
            ids: Vec::new(),
            weights: Vec::new(),
            last_comma: None,
            comma: tokenizer.token_id(",</w>"),
            len: tokenizer.max_length() - 2,
            special: tokenizer.special_ids(),
        }
    }

    /// Adds one token, or a placeholder's ids as one piece.
    fn push(&mut self, piece: Vec<u32>, weight: f32) {
        if piece.len() == 1 && Some(piece[0]) == self.comma {
            self.last_comma = Some(self.ids.len());
        } else if let Some(comma) = self.last_comma
            && self.ids.len() == self.len
            && self.ids.len() - comma <= COMMA_BACKTRACK
        {
            let moved_ids = self.ids.split_off(comma + 1);
            let moved_weights = self.weights.split_off(comma + 1);
            self.close();
            self.ids = moved_ids;
            self.weights = moved_weights;
        }
        if self.ids.len() == self.len || (piece.len() > 1 && self.ids.len() + piece.len() > self.len) {
            self.close();
        }
        self.weights.extend(std::iter::repeat_n(weight, piece.len()));
        self.ids.extend(piece);
    }

    /// Ends the current chunk: `<start> ids <end>`, padded (after the first `<end>`) to full length.
    fn close(&mut self) {
        let (bos, eos, pad) = self.special;
        let mut ids = Vec::with_capacity(self.len + 2);
        ids.push(bos);
        ids.append(&mut self.ids);
        ids.push(eos);
        ids.resize(self.len + 2, pad);
        let mut weights = vec![1.0];
        weights.append(&mut self.weights);
        weights.resize(self.len + 2, 1.0);
        self.chunks.push(Chunk { ids, weights });
        self.last_comma = None;
    }
}

/// Scales each token's encoding `z` [1, L, D] by its weight, then rescales `z` to its original mean.
pub fn apply_weights(z: &Tensor, weights: &[f32]) -> Result<Tensor> {
    if weights.iter().all(|w| *w == 1.0) {
        return Ok(z.clone());
    }
    let zf = z.to_dtype(DType::F32)?;
    let original = zf.mean_all()?.to_scalar::<f32>()?;
    let w = Tensor::from_slice(weights, (1, weights.len(), 1), z.device())?;
    let weighted = zf.broadcast_mul(&w)?;
    let new = weighted.mean_all()?.to_scalar::<f32>()?;
    Ok((weighted * f64::from(original / new))?.to_dtype(z.dtype())?)
}

/// Encodes `text` [1, 77·chunks, D]: each chunk through the text encoder (placeholder ids taking
/// rows of `added`, see [`ClipTextEncoder::token_embeddings_with`]), weighted, then joined.
pub fn encode(
    tokenizer: &ClipTokenizer,
    encoder: &ClipTextEncoder,
    added: Option<&Tensor>,
    text: &str,
    clip_skip: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut encoded = Vec::new();
    for chunk in chunks(tokenizer, text)? {
        let ids = Tensor::from_vec(chunk.ids, (1, tokenizer.max_length()), device)?;
        let z = encoder.encode_embeddings(&encoder.token_embeddings_with(&ids, added)?, clip_skip)?;
        encoded.push(apply_weights(&z, &chunk.weights)?);
    }
    Ok(Tensor::cat(&encoded, 1)?)
}

/// SDXL's reading of `text` by one of its encoders, as A1111 conditions SDXL: each chunk's hidden
/// state `depth` layers before the last (without the final norm; see
/// [`ClipTextEncoder::encode_hidden_and_pooled`]), weighted, joined [1, 77·chunks, D]; and the
/// pooled output of the first chunk [1, P].
pub fn encode_hidden_and_pooled(
    tokenizer: &ClipTokenizer,
    encoder: &ClipTextEncoder,
    added: Option<&Tensor>,
    text: &str,
    depth: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut encoded = Vec::new();
    let mut pooled = None;
    for chunk in chunks(tokenizer, text)? {
        let ids = Tensor::from_vec(chunk.ids, (1, tokenizer.max_length()), device)?;
        let out = encoder.encode_hidden_and_pooled(&encoder.token_embeddings_with(&ids, added)?, &ids, depth)?;
        encoded.push(apply_weights(&out.hidden, &chunk.weights)?);
        pooled.get_or_insert(out.pooled);
    }
    Ok((Tensor::cat(&encoded, 1)?, pooled.expect("chunks() gives at least one chunk")))
}

#[cfg(test)]
mod tests {
    use super::{Fragment, parse};

    fn text(s: &str, w: f64) -> Fragment {
        Fragment::Text(s.into(), w)
    }

    #[test]
    fn emphasis_escapes_and_breaks() {
        assert_eq!(parse("a (b) c"), vec![text("a ", 1.0), text("b", 1.1), text(" c", 1.0)]);
        assert_eq!(parse("[b]"), vec![text("b", 1.0 / 1.1)]);
        assert_eq!(parse("(b:1.5) ((c))"), vec![text("b", 1.5), text(" ", 1.0), text("c", 1.1 * 1.1)]);
        assert_eq!(parse("\\(x\\) y)"), vec![text("(x) y)", 1.0)]);
        assert_eq!(parse("(open"), vec![text("open", 1.1)]);
        assert_eq!(parse("a:1.2) b"), vec![text("a:1.2) b", 1.0)]);
        assert_eq!(parse("a BREAK b"), vec![text("a", 1.0), Fragment::Break, text("b", 1.0)]);
        assert_eq!(parse("BREAKFAST"), vec![text("BREAKFAST", 1.0)]);
        assert_eq!(parse(""), vec![text("", 1.0)]);
    }
}
