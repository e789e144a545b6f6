//! The GPT-2 tokenizer gives the ids of `fixtures/tokenizer_check.json` (checked there
//! against tiktoken and the Python reference) and decodes them back to the text.

mod common;

use common::*;
use rlhf_models::Tokenizer;

#[test]
fn gpt2_tokenizer_matches_reference_ids_and_round_trips() {
    let tok = Tokenizer::from_file(&tiny_dir().join("tokenizer.json"), None, None).unwrap();
    assert_eq!(tok.eos_token_id, 50256);
    assert_eq!(tok.vocab_size(), 50257);
    let text = std::fs::read_to_string(fixtures().join("tokenizer_check.json")).unwrap();
    let check: serde_json::Value = serde_json::from_str(&text).unwrap();
    let texts = check["texts"].as_array().unwrap();
    assert_eq!(texts.len(), 20);
    for item in texts {
        let s = item["text"].as_str().unwrap();
        let want = u32s(&item["ids"]);
        let ids = tok.encode(s).unwrap();
        assert_eq!(ids, want, "ids of {s:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), s, "decode of {s:?}");
    }
}
