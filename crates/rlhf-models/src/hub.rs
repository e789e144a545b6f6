//! Model ids such as `Qwen/Qwen2.5-0.5B`, resolved to a directory of the Hugging Face Hub cache
//! (the layout `huggingface_hub` and transformers share), downloaded with `hf-hub` when missing.
//!
//! Resolution of `id_or_path` ([`resolve_in`]):
//! 1. An existing directory is used as it is (any `revision` is ignored, as transformers does).
//! 2. Else it must be a Hub id (`name` or `org/name`). The cache is `HF_HUB_CACHE` (or the legacy
//!    `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//!    `~/.cache/huggingface/hub` (huggingface_hub's `constants.py`); the repository is
//!    `models--org--name/`. The revision (default `main`) is a file `refs/<revision>` holding a
//!    commit hash, or a commit hash itself; the files are `snapshots/<hash>/`.
//! 3. A snapshot counts as complete when it has the required file (`config.json` for a model,
//!    `adapter_config.json` for an adapter), no file of it is a dangling link, every shard of a
//!    `model.safetensors.index.json` is present, and no blob of the repository is still being
//!    written (`*.incomplete` from huggingface_hub, `*.part` from hf-hub).
//! 4. Otherwise, unless `HF_HUB_OFFLINE` is set (`1`, `on`, `yes`, `true`), the files are
//!    downloaded through `hf-hub` (the cache directory, endpoint and token passed explicitly:
//!    hf-hub itself reads none of `HF_HUB_CACHE`/`HF_HUB_OFFLINE`), then step 3 is checked again.
//!    Offline, or when the download fails, the error names the cache path and how to fill it.
//!
//! Only the files rlhf reads are downloaded: top-level `*.json`, `*.safetensors` (but not
//! Mistral's duplicate `consolidated*.safetensors`), `*.jinja`, `*.txt`, and
//! `additional_chat_templates/*.jinja`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use crate::error::Result;

/// The environment that decides where the cache is and whether the network may be used.
///
/// Read once with [`HubEnv::from_process`], or built by hand (tests) so that no test has to
/// change the process environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HubEnv {
    /// `HF_HUB_CACHE` (or `HUGGINGFACE_HUB_CACHE`).
    pub hub_cache: Option<PathBuf>,
    /// `HF_HOME`.
    pub hf_home: Option<PathBuf>,
    /// `XDG_CACHE_HOME`.
    pub xdg_cache_home: Option<PathBuf>,
    /// The home directory (`HOME`, `USERPROFILE` on Windows).
    pub home: Option<PathBuf>,
    /// `HF_HUB_OFFLINE` is set to a true value: never use the network.
    pub offline: bool,
    /// `HF_ENDPOINT` (default `https://huggingface.co`).
    pub endpoint: Option<String>,
    /// `HF_TOKEN`, used for downloads (else the `token` file of `HF_HOME`).
    pub token: Option<String>,
}

impl HubEnv {
    /// The environment of this process.
    pub fn from_process() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The environment read through `var` (empty values count as unset).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| var(k).filter(|v| !v.is_empty());
        let home = get("HOME").or_else(|| get("USERPROFILE")).map(PathBuf::from);
        let path = |k: &str| get(k).map(|v| expand_home(&v, home.as_deref()));
        Self {
            hub_cache: path("HF_HUB_CACHE").or_else(|| path("HUGGINGFACE_HUB_CACHE")),
            hf_home: path("HF_HOME"),
            xdg_cache_home: path("XDG_CACHE_HOME"),
            offline: get("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v)),
            endpoint: get("HF_ENDPOINT"),
            token: get("HF_TOKEN"),
            home,
        }
    }

    /// `HF_HOME`, or its default `$XDG_CACHE_HOME/huggingface`, `~/.cache/huggingface`.
    pub fn hf_home(&self) -> Option<PathBuf> {
        self.hf_home.clone().or_else(|| {
            let cache = self
                .xdg_cache_home
                .clone()
                .or_else(|| self.home.as_ref().map(|h| h.join(".cache")))?;
            Some(cache.join("huggingface"))
        })
    }

    /// The Hub cache directory (see the module docs for the order).
    pub fn cache_dir(&self) -> Option<PathBuf> {
        self.hub_cache.clone().or_else(|| self.hf_home().map(|h| h.join("hub")))
    }

    /// The token for downloads: `HF_TOKEN`, else the `token` file that `hf auth login` writes.
    fn download_token(&self) -> Option<String> {
        self.token.clone().or_else(|| {
            let file = self.hf_home()?.join("token");
            let t = std::fs::read_to_string(file).ok()?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        })
    }
}

/// Python's truthy environment values (`huggingface_hub.utils._runtime`: `1`, `ON`, `YES`, `TRUE`).
fn is_true(v: &str) -> bool {
    matches!(v.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
}

fn expand_home(v: &str, home: Option<&Path>) -> PathBuf {
    match (v.strip_prefix("~/"), home) {
        (Some(rest), Some(h)) => h.join(rest),
        _ if v == "~" => home.map_or_else(|| PathBuf::from(v), Path::to_path_buf),
        _ => PathBuf::from(v),
    }
}

/// What a resolved directory must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    /// A model: `config.json`.
    Model,
    /// A PEFT adapter: `adapter_config.json`.
    Adapter,
}

impl RepoKind {
    fn required_file(self) -> &'static str {
        match self {
            Self::Model => "config.json",
            Self::Adapter => "adapter_config.json",
        }
    }
}

/// Why a model id could not be turned into a directory.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Neither a directory nor a valid Hub id.
    #[error("{given}: no such directory, and not a Hugging Face model id ({why})\nhint: give a model directory or an id such as `Qwen/Qwen2.5-0.5B`")]
    NotFound {
        /// What was given.
        given: String,
        /// Why it is not a Hub id.
        why: String,
    },
    /// A path that exists but is not a directory.
    #[error("{}: is a file; expected a model directory (with config.json) or a Hub id", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// No cache directory can be named (no `HF_HUB_CACHE`, `HF_HOME` or home directory).
    #[error("{id}: cannot locate the Hugging Face cache (HF_HUB_CACHE, HF_HOME and HOME are unset)\nhint: set HF_HUB_CACHE to the cache directory")]
    NoCacheDir {
        /// The model id.
        id: String,
    },
    /// The id is not in the cache and the network may not (or could not) be used.
    #[error("{id}: revision `{revision}` is not in the Hugging Face cache {} ({reason}) and there is no local directory of that name\nhint: {}", cache.display(), fill_hint(id, revision, cache))]
    NotCached {
        /// The model id.
        id: String,
        /// The revision asked for.
        revision: String,
        /// The cache directory searched.
        cache: PathBuf,
        /// Why the cache was not filled (offline, or the download error).
        reason: String,
    },
    /// `refs/<revision>` names a commit whose snapshot directory is missing.
    #[error("{id}: refs/{revision} points at commit {commit}, but {} does not exist (a deleted or partial download)\nhint: {}", snapshot.display(), fill_hint(id, revision, cache))]
    MissingSnapshot {
        /// The model id.
        id: String,
        /// The revision asked for (its `refs/` file names the commit).
        revision: String,
        /// The commit it names.
        commit: String,
        /// The snapshot directory expected.
        snapshot: PathBuf,
        /// The cache directory.
        cache: PathBuf,
    },
    /// The snapshot exists but lacks files or some are still downloading.
    #[error("{id}: the cached snapshot {} is incomplete: {problem}\nhint: {}", snapshot.display(), fill_hint(id, revision, cache))]
    Incomplete {
        /// The model id.
        id: String,
        /// The revision asked for.
        revision: String,
        /// The snapshot directory.
        snapshot: PathBuf,
        /// What is missing or unfinished.
        problem: String,
        /// The cache directory.
        cache: PathBuf,
    },
}

fn fill_hint(id: &str, revision: &str, cache: &Path) -> String {
    let rev = if revision == "main" {
        String::new()
    } else {
        format!(" --revision {revision}")
    };
    format!(
        "fill the cache where network is available with `HF_HUB_CACHE={} hf download {id}{rev}` \
         (or `huggingface-cli download {id}{rev}`) and copy it here, point HF_HUB_CACHE at a cache that has it, \
         or unset HF_HUB_OFFLINE to download it",
        cache.display()
    )
}

/// A model directory for `id_or_path` (a directory, or a Hub id at `revision`), reading the
/// process environment; see the [module docs](self).
pub fn resolve_model(id_or_path: &str, revision: Option<&str>) -> Result<PathBuf> {
    Ok(resolve_in(
        id_or_path,
        revision,
        RepoKind::Model,
        &HubEnv::from_process(),
    )?)
}

/// An adapter directory for `id_or_path`, as [`resolve_model`] (needs `adapter_config.json`).
pub fn resolve_adapter(id_or_path: &str, revision: Option<&str>) -> Result<PathBuf> {
    Ok(resolve_in(
        id_or_path,
        revision,
        RepoKind::Adapter,
        &HubEnv::from_process(),
    )?)
}

/// Resolution with an explicit environment (see the [module docs](self)).
pub fn resolve_in(
    id_or_path: &str,
    revision: Option<&str>,
    kind: RepoKind,
    env: &HubEnv,
) -> std::result::Result<PathBuf, HubError> {
    let local = expand_home(id_or_path, env.home.as_deref());
    if local.is_dir() {
        return Ok(local);
    }
    if local.exists() {
        return Err(HubError::NotADirectory { path: local });
    }
    if let Err(why) = check_repo_id(id_or_path) {
        return Err(HubError::NotFound {
            given: id_or_path.into(),
            why,
        });
    }
    let id = id_or_path;
    let revision = revision.unwrap_or("main");
    let cache = env.cache_dir().ok_or_else(|| HubError::NoCacheDir { id: id.into() })?;
    let repo = CachedRepo {
        id,
        revision,
        cache: &cache,
        dir: cache.join(repo_folder(id)),
    };
    let cached = repo.lookup(kind);
    match cached {
        Ok(Some(dir)) => return Ok(dir),
        Err(e) if env.offline => return Err(e),
        Ok(None) if env.offline => {
            return Err(repo.not_cached("HF_HUB_OFFLINE is set, so nothing is downloaded".into()));
        }
        Ok(None) | Err(_) => {}
    }
    download(&repo, env).map_err(|msg| repo.not_cached(format!("download failed: {msg}")))?;
    match repo.lookup(kind)? {
        Some(dir) => Ok(dir),
        None => Err(repo.not_cached("the download left no snapshot for this revision".into())),
    }
}

/// `models--org--name` (huggingface_hub's `repo_folder_name`).
pub fn repo_folder(id: &str) -> String {
    format!("models--{}", id.replace('/', "--"))
}

/// huggingface_hub's `validate_repo_id`, for ASCII names.
fn check_repo_id(id: &str) -> std::result::Result<(), String> {
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() > 2 {
        return Err("an id has at most one `/`".into());
    }
    if id.len() > 96 {
        return Err("an id has at most 96 characters".into());
    }
    if id.contains("--") || id.contains("..") {
        return Err("an id cannot contain `--` or `..`".into());
    }
    for p in parts {
        let ok_chars = p
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        let bad_ends = p.starts_with(['-', '.']) || p.ends_with(['-', '.']);
        if p.is_empty() || !ok_chars || bad_ends {
            return Err(format!("`{p}` is not a valid name: letters, digits, `-`, `_`, `.`"));
        }
    }
    Ok(())
}

/// Whether `s` is a full commit hash.
fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

struct CachedRepo<'a> {
    id: &'a str,
    revision: &'a str,
    cache: &'a Path,
    dir: PathBuf,
}

impl CachedRepo<'_> {
    fn not_cached(&self, reason: String) -> HubError {
        HubError::NotCached {
            id: self.id.into(),
            revision: self.revision.into(),
            cache: self.cache.to_path_buf(),
            reason,
        }
    }

    fn incomplete(&self, snapshot: &Path, problem: String) -> HubError {
        HubError::Incomplete {
            id: self.id.into(),
            revision: self.revision.into(),
            snapshot: snapshot.to_path_buf(),
            problem,
            cache: self.cache.to_path_buf(),
        }
    }

    /// The complete snapshot of the revision, `None` if the revision is not cached at all.
    fn lookup(&self, kind: RepoKind) -> std::result::Result<Option<PathBuf>, HubError> {
        if !self.dir.is_dir() {
            return Ok(None);
        }
        let ref_file = self.dir.join("refs").join(self.revision);
        let commit = match std::fs::read_to_string(&ref_file) {
            Ok(s) => s.trim().to_string(),
            Err(_) if is_commit(self.revision) => self.revision.to_string(),
            Err(_) => return Ok(None),
        };
        let snapshot = self.dir.join("snapshots").join(&commit);
        if !snapshot.is_dir() {
            if !ref_file.is_file() {
                return Ok(None);
            }
            return Err(HubError::MissingSnapshot {
                id: self.id.into(),
                revision: self.revision.into(),
                commit,
                snapshot,
                cache: self.cache.to_path_buf(),
            });
        }
        let unfinished = self.unfinished_blobs();
        if !unfinished.is_empty() {
            return Err(self.incomplete(
                &snapshot,
                format!("downloads still in progress or interrupted: {}", unfinished.join(", ")),
            ));
        }
        let dangling = dangling_links(&snapshot);
        if !dangling.is_empty() {
            return Err(self.incomplete(
                &snapshot,
                format!("files whose blob is missing: {}", dangling.join(", ")),
            ));
        }
        let required = kind.required_file();
        if !snapshot.join(required).is_file() {
            return Err(self.incomplete(&snapshot, format!("`{required}` is missing")));
        }
        let shards = missing_shards(&snapshot);
        if !shards.is_empty() {
            return Err(self.incomplete(
                &snapshot,
                format!(
                    "shards listed in model.safetensors.index.json are missing: {}",
                    shards.join(", ")
                ),
            ));
        }
        Ok(Some(snapshot))
    }

    /// Blobs still being written: `*.incomplete` (huggingface_hub), `*.part` (hf-hub).
    fn unfinished_blobs(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("blobs")) else {
            return Vec::new();
        };
        let mut out: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".incomplete") || n.ends_with(".part"))
            .collect();
        out.sort();
        out
    }
}

/// Files of a snapshot (recursively) whose symlink points at nothing.
fn dangling_links(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.exists() {
                let rel = p.strip_prefix(dir).unwrap_or(&p);
                out.push(rel.display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Shards named by `model.safetensors.index.json` that are not in the snapshot.
fn missing_shards(snapshot: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(snapshot.join("model.safetensors.index.json")) else {
        return Vec::new();
    };
    let Ok(index) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    let mut files: Vec<String> = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| m.values().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    files.sort();
    files.dedup();
    files.retain(|f| !snapshot.join(f).is_file());
    files
}

/// Whether a file of the repository is one rlhf reads (see the module docs).
fn wanted(file: &str) -> bool {
    let (dir, name) = match file.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, file),
    };
    match dir {
        Some("additional_chat_templates") => name.ends_with(".jinja"),
        Some(_) => false,
        None => {
            (name.ends_with(".safetensors") && !name.starts_with("consolidated"))
                || [".json", ".jinja", ".txt"].iter().any(|ext| name.ends_with(ext))
        }
    }
}

/// Downloads the wanted files of the revision into the cache (hf-hub, synchronous).
fn download(repo: &CachedRepo<'_>, env: &HubEnv) -> std::result::Result<(), String> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};
    let mut builder = ApiBuilder::new()
        .with_cache_dir(repo.cache.to_path_buf())
        .with_token(env.download_token())
        .with_progress(std::io::stderr().is_terminal());
    if let Some(endpoint) = &env.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder.build().map_err(|e| e.to_string())?;
    let api_repo = api.repo(Repo::with_revision(
        repo.id.to_string(),
        RepoType::Model,
        repo.revision.to_string(),
    ));
    let info = api_repo.info().map_err(|e| e.to_string())?;
    let files: Vec<&str> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.as_str())
        .filter(|f| wanted(f))
        .collect();
    if files.is_empty() {
        return Err("the repository has no config, tokenizer or safetensors files".into());
    }
    for f in files {
        api_repo.download(f).map_err(|e| format!("{f}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_follows_hf_hub_cache_then_hf_home_then_xdg_then_home() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            HubEnv::from_vars(move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
        };
        let all = vars(&[
            ("HF_HUB_CACHE", "/a"),
            ("HF_HOME", "/b"),
            ("XDG_CACHE_HOME", "/c"),
            ("HOME", "/h"),
        ]);
        assert_eq!(all.cache_dir(), Some(PathBuf::from("/a")));
        let legacy = vars(&[("HUGGINGFACE_HUB_CACHE", "/l"), ("HF_HOME", "/b")]);
        assert_eq!(legacy.cache_dir(), Some(PathBuf::from("/l")));
        let home = vars(&[("HF_HOME", "~/hf"), ("XDG_CACHE_HOME", "/c"), ("HOME", "/h")]);
        assert_eq!(home.cache_dir(), Some(PathBuf::from("/h/hf/hub")));
        let xdg = vars(&[("XDG_CACHE_HOME", "/c"), ("HOME", "/h")]);
        assert_eq!(xdg.cache_dir(), Some(PathBuf::from("/c/huggingface/hub")));
        let plain = vars(&[("HOME", "/h"), ("HF_HUB_CACHE", "")]);
        assert_eq!(plain.cache_dir(), Some(PathBuf::from("/h/.cache/huggingface/hub")));
        assert_eq!(vars(&[]).cache_dir(), None);
    }

    #[test]
    fn offline_takes_pythons_true_values() {
        for (v, want) in [
            ("1", true),
            ("ON", true),
            ("yes", true),
            ("True", true),
            ("0", false),
            ("no", false),
        ] {
            let env = HubEnv::from_vars(|k| (k == "HF_HUB_OFFLINE").then(|| v.to_string()));
            assert_eq!(env.offline, want, "{v}");
        }
    }

    #[test]
    fn repo_ids_are_checked_as_huggingface_hub_does() {
        for ok in [
            "gpt2",
            "Qwen/Qwen2.5-0.5B",
            "meta-llama/Llama-3.2-1B-Instruct",
            "a_b/c.d",
        ] {
            assert!(check_repo_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b/c", "a--b", "a/..b", "-a", "a.", "/abs/path", "./rel", "a b"] {
            assert!(check_repo_id(bad).is_err(), "{bad}");
        }
        assert_eq!(repo_folder("Qwen/Qwen2.5-0.5B"), "models--Qwen--Qwen2.5-0.5B");
    }

    #[test]
    fn only_the_files_rlhf_reads_are_downloaded() {
        for f in [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "chat_template.jinja",
            "merges.txt",
            "additional_chat_templates/tool_use.jinja",
        ] {
            assert!(wanted(f), "{f}");
        }
        for f in [
            "pytorch_model.bin",
            "consolidated.safetensors",
            "original/params.json",
            "onnx/model.onnx",
            "README.md",
            ".gitattributes",
        ] {
            assert!(!wanted(f), "{f}");
        }
    }
}
