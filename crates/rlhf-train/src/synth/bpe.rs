//! A small byte-level BPE tokenizer trained on the synthetic corpus.
//!
//! GPT-2's recipe at toy scale: ByteLevel pre-tokenizer (GPT-2 split regex, no added prefix
//! space), all 256 byte symbols in the initial alphabet (so any text encodes and
//! `decode(encode(x)) == x`), `<|endoftext|>` as special token id 0, ByteLevel decoder.
//! Training is deterministic: the merge queue orders ties by pair ids and the serialised
//! vocabulary is ordered by id, so the same corpus gives byte-identical JSON.

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, DecoderWrapper, TokenizerBuilder};

use crate::error::{Result, TrainError};

/// The end-of-text token (id 0).
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// The quickstart's vocabulary: every prompt + response + EOS of the generated data fits in
/// 64 tokens (median 37, longest 58 at seed 0); 512 would give a median of 53 and up to 100.
pub const DEFAULT_VOCAB_SIZE: usize = 1024;

/// The byte symbols every vocabulary holds besides its special tokens.
const BYTE_SYMBOLS: usize = 256;

/// Trains a byte-level BPE tokenizer of `vocab_size` tokens (special token included) on
/// `texts` and returns its `tokenizer.json`. The vocabulary may come out smaller when the
/// corpus runs out of pairs seen at least twice.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<String> {
    train_tokenizer_with(texts, vocab_size, &[EOS_TOKEN])
}

/// [`train_tokenizer`] with the special tokens `specials`, ids 0, 1, ... in order.
pub fn train_tokenizer_with(texts: &[String], vocab_size: usize, specials: &[&str]) -> Result<String> {
    let min = BYTE_SYMBOLS + specials.len();
    if !(min..=65_536).contains(&vocab_size) {
        return Err(TrainError::Config(format!(
            "synth tokenizer: vocab_size {vocab_size} is out of range; hint: use {min}..=65536 (e.g. 1024)"
        )));
    }
    if texts.is_empty() {
        return Err(data_err("the corpus is empty; hint: generate some rows first".into()));
    }
    let byte_level = ByteLevel::new(false, true, true);
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.iter().map(|t| AddedToken::from(*t, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer =
        TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
            .with_model(BPE::default())
            .with_pre_tokenizer(Some(byte_level.into()))
            .with_post_processor(Some(byte_level.into()))
            .with_decoder(Some(byte_level.into()))
            .build()
            .map_err(|e| data_err(e.to_string()))?;
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| data_err(e.to_string()))?;
    tokenizer.to_string(true).map_err(|e| data_err(e.to_string()))
}

fn data_err(msg: String) -> TrainError {
    TrainError::Data {
        path: "<synth tokenizer corpus>".into(),
        msg,
    }
}
