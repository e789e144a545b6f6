//! Chat templates render byte for byte as transformers 5.23 `apply_chat_template` and encode to
//! the same ids, on every conversation of `fixtures/families/chat_templates.json` (made by
//! `family_fixtures.py` with the TRL 1.16 template files, copied in
//! `fixtures/families/templates/`). Also: template lookup in model directories, special tokens,
//! `{% generation %}` masks and the errors of bad templates and conversations.

use std::path::{Path, PathBuf};

use rlhf_models::chat::{ChatError, Clock, Message, RenderOptions};
use rlhf_models::tokenizer::SpecialTokens;
use rlhf_models::{ChatTemplate, ModelError, Tokenizer};
use serde_json::{Map, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/families"))
}

fn read_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tokenizer(dir: &str) -> Tokenizer {
    Tokenizer::from_dir(&fixtures().join(dir), &[], None).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn messages(v: &Value) -> Vec<Message> {
    rlhf_models::chat::messages_from_json(v).unwrap()
}

/// The fixture's `kwargs` as render options (what `apply_chat_template(**kwargs)` got).
fn options(kwargs: &Value) -> RenderOptions {
    let mut opts = RenderOptions::default();
    let mut extra = Map::new();
    for (k, v) in kwargs.as_object().unwrap() {
        match k.as_str() {
            "add_generation_prompt" => opts.add_generation_prompt = v.as_bool().unwrap(),
            "continue_final_message" => opts.continue_final_message = v.as_bool().unwrap(),
            "tools" => opts.tools = Some(v.as_array().unwrap().clone()),
            _ => {
                extra.insert(k.clone(), v.clone());
            }
        }
    }
    opts.kwargs = extra;
    opts
}

fn template_file(name: &str) -> PathBuf {
    fixtures().join("templates").join(format!("{name}.jinja"))
}

#[test]
fn every_fixture_conversation_renders_and_encodes_as_transformers() {
    let fx = read_json("chat_templates.json");
    let mut checked = 0;
    for (name, t) in fx["templates"].as_object().unwrap() {
        let dir = t["tokenizer_dir"]
            .as_str()
            .unwrap()
            .trim_start_matches("fixtures/families/");
        let tok = tokenizer(dir);
        let tmpl = ChatTemplate::from_file(&template_file(name), tok.config.special.clone()).unwrap();
        for row in t["conversations"].as_array().unwrap() {
            let case = format!("{name}/{}", row["name"].as_str().unwrap());
            let msgs = messages(&row["messages"]);
            let opts = options(&row["kwargs"]);
            let enc = tmpl
                .encode(&tok, &msgs, &opts)
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(enc.text, row["rendered"].as_str().unwrap(), "{case}: text");
            assert_eq!(enc.ids, ids(&row["ids"]), "{case}: ids");
            assert_eq!(
                tok.encode_special(&enc.text, true).unwrap(),
                ids(&row["ids_of_rendered_default"]),
                "{case}: tokenizer(rendered) with special tokens"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 31, "every conversation of the four templates");
}

#[test]
fn model_directories_give_their_own_template_and_special_tokens() {
    // tiny-qwen2 keeps its template in chat_template.jinja, tiny-qwen3 and tiny-llama in
    // tokenizer_config.json; each is the TRL file the fixture names.
    let fx = read_json("chat_templates.json");
    for (dir, name) in [
        ("tiny-qwen2", "qwen2_5"),
        ("tiny-qwen3", "qwen3"),
        ("tiny-llama", "llama3_2"),
    ] {
        let tmpl = ChatTemplate::from_dir(&fixtures().join(dir)).unwrap();
        let want = std::fs::read_to_string(template_file(name)).unwrap();
        assert_eq!(tmpl.source(&RenderOptions::default()).unwrap(), want, "{dir}");
        let tok = tokenizer(dir);
        for row in fx["templates"][name]["conversations"].as_array().unwrap() {
            let enc = tmpl
                .encode(&tok, &messages(&row["messages"]), &options(&row["kwargs"]))
                .unwrap();
            assert_eq!(enc.ids, ids(&row["ids"]), "{dir} {}", row["name"]);
        }
    }
    assert!(ChatTemplate::load(&fixtures().join("tiny-mistral")).unwrap().is_none());
}

#[test]
fn a_model_without_template_asked_for_messages_names_the_directory() {
    let dir = fixtures().join("tiny-mistral");
    let err = ChatTemplate::from_dir(&dir).unwrap_err();
    assert!(matches!(err, ModelError::Chat(ChatError::NoTemplate { .. })), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("tiny-mistral") && msg.contains("no chat template") && msg.contains("hint:"),
        "{msg}"
    );
}

#[test]
fn tokenizer_special_tokens_and_ids_follow_tokenizer_config() {
    let fx = read_json("tokenizers.json");
    for (fam, dir) in [
        ("llama", "tiny-llama"),
        ("qwen2", "tiny-qwen2"),
        ("qwen3", "tiny-qwen3"),
        ("mistral", "tiny-mistral"),
    ] {
        let t = &fx["tokenizers"][fam];
        let tok = tokenizer(dir);
        assert_eq!(tok.vocab_size() as u64, t["len"].as_u64().unwrap(), "{fam}");
        assert_eq!(tok.bos_token(), t["bos_token"].as_str(), "{fam} bos");
        assert_eq!(
            tok.bos_token_id.map(u64::from),
            t["bos_token_id"].as_u64(),
            "{fam} bos id"
        );
        assert_eq!(tok.eos_token().as_deref(), t["eos_token"].as_str(), "{fam} eos");
        assert_eq!(
            u64::from(tok.eos_token_id),
            t["eos_token_id"].as_u64().unwrap(),
            "{fam} eos id"
        );
        assert_eq!(
            tok.config.special.pad_token.as_deref(),
            t["pad_token"].as_str(),
            "{fam} pad"
        );
        assert_eq!(
            tok.config.special.unk_token.as_deref(),
            t["unk_token"].as_str(),
            "{fam} unk"
        );
        // No pad token: TRL pads with EOS.
        let want_pad = t["pad_token_id"].as_u64().or(t["eos_token_id"].as_u64()).unwrap();
        assert_eq!(u64::from(tok.pad_token_id), want_pad, "{fam} pad id");
        for (i, case) in fx["encodings"][fam].as_array().unwrap().iter().enumerate() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                tok.encode_special(text, true).unwrap(),
                ids(&case["ids"]),
                "{fam} text {i}"
            );
            assert_eq!(
                tok.encode(text).unwrap(),
                ids(&case["ids_add_special_tokens_false"]),
                "{fam} text {i} without special tokens"
            );
        }
    }
}

#[test]
fn generation_config_ids_are_the_stop_ids_and_config_pad_is_the_fallback() {
    let dir = fixtures().join("tiny-llama");
    let tok = Tokenizer::from_dir(&dir, &[2009, 2001], Some(2004)).unwrap();
    assert_eq!(tok.eos_token_id, 2009);
    assert_eq!(tok.eos_token_ids, vec![2009, 2001]);
    assert_eq!(
        tok.pad_token_id, 2004,
        "config.json pad_token_id when the tokenizer has no pad token"
    );
    let qwen = Tokenizer::from_dir(&fixtures().join("tiny-qwen2"), &[2002, 2000], Some(7)).unwrap();
    assert_eq!(qwen.pad_token_id, 2000, "the tokenizer's pad token wins");
}

fn qwen() -> (Tokenizer, ChatTemplate) {
    let tok = tokenizer("tiny-qwen2");
    let tmpl = ChatTemplate::from_dir(&fixtures().join("tiny-qwen2")).unwrap();
    (tok, tmpl)
}

#[test]
fn a_template_that_does_not_parse_names_its_file_and_line() {
    let path = Path::new("/models/x/chat_template.jinja");
    let err = ChatTemplate::from_source(
        "{% for m in messages %}\n{{ m.content }",
        path,
        SpecialTokens::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::Chat(ChatError::Syntax { .. })), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("/models/x/chat_template.jinja") && msg.contains("line 2"),
        "{msg}"
    );
}

#[test]
fn raise_exception_is_a_typed_error_with_the_templates_message() {
    let tmpl = ChatTemplate::from_file(&template_file("llama3_1"), tokenizer("tiny-llama").config.special).unwrap();
    let tool = serde_json::json!({"function": {"name": "f"}});
    let two_calls = Message::new("assistant", "").with("tool_calls", Value::Array(vec![tool.clone(), tool]));
    let err = tmpl
        .render(&[Message::new("user", "hi"), two_calls], &RenderOptions::default())
        .unwrap_err();
    match &err {
        ModelError::Chat(ChatError::Raised { msg, .. }) => {
            assert_eq!(msg, "This model only supports single tool-calls at once!")
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("llama3_1.jinja"), "{err}");
}

#[test]
fn strftime_now_reads_the_clock_and_a_fixed_clock_is_reproducible() {
    let special = tokenizer("tiny-llama").config.special;
    let tmpl = ChatTemplate::from_file(&template_file("llama3_2"), special)
        .unwrap()
        .with_clock(Clock::fixed("2024-07-26").unwrap());
    let fx = read_json("chat_templates.json");
    let row = &fx["templates"]["llama3_2"]["conversations"][0];
    let mut opts = options(&row["kwargs"]);
    opts.kwargs.remove("date_string");
    let text = tmpl.render(&messages(&row["messages"]), &opts).unwrap();
    assert_eq!(
        text,
        row["rendered"].as_str().unwrap(),
        "strftime_now(\"%d %b %Y\") of the fixed day"
    );
    let other_day = tmpl.clone().with_clock(Clock::fixed("2025-01-02").unwrap());
    assert!(other_day
        .render(&messages(&row["messages"]), &opts)
        .unwrap()
        .contains("Today Date: 02 Jan 2025"));
}

#[test]
fn continue_final_message_ends_inside_the_last_message() {
    let (tok, tmpl) = qwen();
    let msgs = [Message::new("user", "Hi"), Message::new("assistant", "The answer is  ")];
    let opts = RenderOptions {
        continue_final_message: true,
        ..RenderOptions::default()
    };
    let text = tmpl.encode(&tok, &msgs, &opts).unwrap().text;
    assert!(text.ends_with("<|im_start|>assistant\nThe answer is  "), "{text:?}");
    let both = RenderOptions {
        add_generation_prompt: true,
        ..opts
    };
    assert!(tmpl
        .render(&msgs, &both)
        .unwrap_err()
        .to_string()
        .contains("not compatible"));
}

#[test]
fn generation_blocks_give_assistant_masks_and_render_the_same_text() {
    let tok = tokenizer("tiny-qwen2");
    let training = ChatTemplate::from_file(&template_file("qwen2_5_training"), tok.config.special.clone()).unwrap();
    let plain = ChatTemplate::from_file(&template_file("qwen2_5"), tok.config.special.clone()).unwrap();
    let msgs = [
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello!"),
        Message::new("user", "Bye"),
        Message::new("assistant", "See you."),
    ];
    let opts = RenderOptions::default();
    let enc = training.encode_with_assistant_mask(&tok, &msgs, &opts).unwrap();
    assert_eq!(
        enc.text,
        plain.render(&msgs, &opts).unwrap(),
        "{{% generation %}} writes nothing itself"
    );
    assert_eq!(enc.ids.len(), enc.assistant_mask.len());
    // Masked tokens decode to "\n<reply><|im_end|>\n" of each assistant turn.
    let mut spans = Vec::new();
    let mut i = 0;
    while i < enc.ids.len() {
        if enc.assistant_mask[i] == 1 {
            let start = i;
            while i < enc.ids.len() && enc.assistant_mask[i] == 1 {
                i += 1;
            }
            spans.push(tok.decode(&enc.ids[start..i], false).unwrap());
        }
        i += 1;
    }
    assert_eq!(spans, ["\nHello!<|im_end|>\n", "\nSee you.<|im_end|>\n"]);
    let err = plain.encode_with_assistant_mask(&tok, &msgs, &opts).unwrap_err();
    assert!(err.to_string().contains("{% generation %}"), "{err}");
}

#[test]
fn named_templates_in_tokenizer_config_pick_default_or_tool_use() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = serde_json::json!({
        "eos_token": "</s>",
        "chat_template": [
            {"name": "default", "template": "D{{ eos_token }}"},
            {"name": "tool_use", "template": "T{{ tools | length }}"}
        ]
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tmpl = ChatTemplate::from_dir(dir.path()).unwrap();
    let msgs = [Message::new("user", "x")];
    assert_eq!(tmpl.render(&msgs, &RenderOptions::default()).unwrap(), "D</s>");
    let tools = RenderOptions {
        tools: Some(vec![serde_json::json!({"type": "function"})]),
        ..RenderOptions::default()
    };
    assert_eq!(tmpl.render(&msgs, &tools).unwrap(), "T1");
    let fixed = tmpl.clone().select("default").unwrap();
    assert_eq!(fixed.render(&msgs, &tools).unwrap(), "D</s>");
    let err = tmpl.select("chatml").unwrap_err().to_string();
    assert!(err.contains("`chatml`") && err.contains("default, tool_use"), "{err}");

    // A chat_template.jinja file wins over the config's templates.
    std::fs::write(dir.path().join("chat_template.jinja"), "F{{ messages[0].content }}\n").unwrap();
    let tmpl = ChatTemplate::from_dir(dir.path()).unwrap();
    assert_eq!(tmpl.names(), ["default"]);
    assert_eq!(
        tmpl.render(&msgs, &tools).unwrap(),
        "Fx",
        "one trailing newline is dropped, as in Jinja2"
    );
}

#[test]
fn edge_cases_render_encode_and_mask_as_transformers() {
    // fixtures/families/chat_edge_cases.json (made by chat_edge_cases.py beside it): tool calls
    // with null content and unsorted argument keys, floats and non-ASCII text through tojson,
    // reasoning_content, continue_final_message with trailing spaces, raise_exception, and the
    // assistant masks of TRL's training templates on multi-byte multi-turn chats.
    let fx = read_json("chat_edge_cases.json");
    let cases = fx["cases"].as_array().unwrap();
    for case in cases {
        let label = format!(
            "{}/{}",
            case["template"].as_str().unwrap(),
            case["name"].as_str().unwrap()
        );
        let tok = tokenizer(case["tokenizer_dir"].as_str().unwrap());
        let tmpl = ChatTemplate::from_file(
            &template_file(case["template"].as_str().unwrap()),
            tok.config.special.clone(),
        )
        .unwrap();
        let msgs = messages(&case["messages"]);
        let opts = options(&case["kwargs"]);
        if let Some(want) = case.get("error") {
            match tmpl.render(&msgs, &opts) {
                Err(ModelError::Chat(ChatError::Raised { msg, .. })) => {
                    assert_eq!(msg, want.as_str().unwrap(), "{label}")
                }
                other => panic!("{label}: {other:?}"),
            }
            continue;
        }
        let enc = match case.get("assistant_masks") {
            Some(_) => tmpl.encode_with_assistant_mask(&tok, &msgs, &opts),
            None => tmpl.encode(&tok, &msgs, &opts),
        }
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(enc.text, case["rendered"].as_str().unwrap(), "{label}: text");
        assert_eq!(enc.ids, ids(&case["ids"]), "{label}: ids");
        if let Some(want) = case.get("assistant_masks") {
            let want: Vec<u8> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u8)
                .collect();
            assert_eq!(enc.assistant_mask, want, "{label}: assistant mask");
        }
    }
    assert_eq!(cases.len(), 13);
}
