//! `rlhf generate` with chat templates (`--chat`, `--messages`) and models named by Hub id.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
}

fn rlhf(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Every generation-prompt conversation of `chat_templates.json` through
/// `rlhf generate --messages FILE --json`: `prompt_ids` equal transformers'
/// `apply_chat_template(..., add_generation_prompt=True)` ids exactly.
#[test]
fn generate_messages_prompt_ids_equal_transformers_apply_chat_template() {
    let fx: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("families/chat_templates.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (name, t) in fx["templates"].as_object().unwrap() {
        let model = fixtures().join(t["tokenizer_dir"].as_str().unwrap().trim_start_matches("fixtures/"));
        let template = fixtures().join(format!("families/templates/{name}.jinja"));
        // Conversations rendered with the generation prompt and no tools, grouped by kwargs.
        for c in t["conversations"].as_array().unwrap() {
            let kw = c["kwargs"].as_object().unwrap();
            if kw.get("add_generation_prompt") != Some(&Value::Bool(true)) || kw.contains_key("tools") {
                continue;
            }
            let extra: serde_json::Map<String, Value> = kw
                .iter()
                .filter(|(k, _)| k.as_str() != "add_generation_prompt")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let file = dir.path().join(format!("{name}-{}.jsonl", c["name"].as_str().unwrap()));
            std::fs::write(&file, format!("{}\n", serde_json::json!({"messages": c["messages"]}))).unwrap();
            let kwargs = Value::Object(extra).to_string();
            let args = [
                "generate",
                "--model",
                model.to_str().unwrap(),
                "--chat-template",
                template.to_str().unwrap(),
                "--chat-template-kwargs",
                &kwargs,
                "--messages",
                file.to_str().unwrap(),
                "--greedy",
                "--max-new-tokens",
                "2",
                "--json",
            ];
            let (ok, out, err) = rlhf(&args, &[]);
            assert!(ok, "{name}/{}: {err}", c["name"]);
            let lines = json_lines(&out);
            assert_eq!(lines.len(), 1);
            assert_eq!(lines[0]["prompt_ids"], c["ids"], "{name}/{}", c["name"]);
            assert_eq!(lines[0]["prompt"], c["rendered"], "{name}/{}", c["name"]);
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} conversations checked");
}

/// `--chat` wraps each prompt as a user message; the model's own template (tiny-qwen2 has
/// `chat_template.jinja`) gives the same ids as the `--messages` file of that message.
#[test]
fn generate_chat_uses_the_models_own_template_and_equals_messages() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("families/tiny-qwen2");
    let file = dir.path().join("m.jsonl");
    std::fs::write(
        &file,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi there\"}]}\n",
    )
    .unwrap();
    let common = [
        "--model",
        model.to_str().unwrap(),
        "--greedy",
        "--max-new-tokens",
        "3",
        "--json",
    ];
    let chat = rlhf(
        &[&["generate", "--chat", "--prompt", "Hi there"], &common[..]].concat(),
        &[],
    );
    let msgs = rlhf(
        &[&["generate", "--messages", file.to_str().unwrap()], &common[..]].concat(),
        &[],
    );
    assert!(chat.0 && msgs.0, "{} {}", chat.2, msgs.2);
    let (a, b) = (&json_lines(&chat.1)[0], &json_lines(&msgs.1)[0]);
    assert_eq!(a["prompt_ids"], b["prompt_ids"]);
    assert_eq!(a["completion_ids"], b["completion_ids"]);
    assert!(a["prompt"].as_str().unwrap().ends_with("<|im_start|>assistant\n"));
}

#[test]
fn messages_on_a_model_without_a_template_or_bad_rows_are_errors_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.jsonl");
    std::fs::write(&file, "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n").unwrap();
    let mistral = fixtures().join("families/tiny-mistral");
    let (ok, _, err) = rlhf(
        &[
            "generate",
            "--model",
            mistral.to_str().unwrap(),
            "--messages",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("no chat template") && err.contains("tiny-mistral"),
        "{err}"
    );
    std::fs::write(&file, "{\"messages\": [{\"role\": \"user\"}]}\n").unwrap();
    let qwen = fixtures().join("families/tiny-qwen2");
    let (ok, _, err) = rlhf(
        &[
            "generate",
            "--model",
            qwen.to_str().unwrap(),
            "--messages",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("m.jsonl:1"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A fake Hub cache holding `org/tiny` at `main` (refs → snapshot of symlinked blobs).
fn fake_cache(root: &Path, src: &Path) {
    let repo = root.join("models--org--tiny");
    let hash = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::write(repo.join("refs/main"), hash).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let blob = repo.join("blobs").join(e.file_name());
        std::fs::copy(e.path(), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snap.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_hub_id_from_the_cache_gives_what_the_directory_gives_and_a_missing_id_names_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let src = fixtures().join("families/tiny-qwen2");
    fake_cache(cache.path(), &src);
    let env = [
        ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let gen = |model: &str, extra: &[&str]| {
        let args = [
            &["generate", "--model", model, "--chat", "--prompt", "Hello", "--greedy"][..],
            &["--max-new-tokens", "4", "--json"][..],
            extra,
        ]
        .concat();
        rlhf(&args, &env)
    };
    let by_dir = gen(src.to_str().unwrap(), &[]);
    let by_id = gen("org/tiny", &[]);
    let by_rev = gen("org/tiny", &["--revision", "main"]);
    assert!(by_dir.0 && by_id.0 && by_rev.0, "{} {} {}", by_dir.2, by_id.2, by_rev.2);
    assert_eq!(by_dir.1, by_id.1);
    assert_eq!(by_dir.1, by_rev.1);

    let (ok, _, err) = gen("org/missing-model", &[]);
    assert!(!ok);
    assert!(err.contains(cache.path().to_str().unwrap()), "{err}");
    assert!(err.contains("org/missing-model") && err.contains("hint:"), "{err}");
    let (ok, _, err) = gen("org/tiny", &["--revision", "v9"]);
    assert!(!ok);
    assert!(err.contains("v9"), "{err}");
}
