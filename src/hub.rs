//! Everything that talks to the Hugging Face Hub lives here: references
//! (`owner/name@rev`, `hf://owner/name@rev/sub`), downloads into the cache
//! shared with Python's `huggingface_hub`, offline mode, and `push`.
//!
//! The transfers go through `hf-hub` (pinned to 1.0.0, its blocking client):
//! it speaks the Hub's protocol (revision info, `resolve` with `X-Repo-Commit`
//! and `ETag`/`X-Linked-Etag`, preupload, LFS batch, ndjson commits) and
//! writes the cache in Python's layout (`models--owner--name/{blobs,
//! snapshots/<sha>,refs/<rev>}`, `.incomplete` blobs renamed only when the
//! body arrived whole). What it leaves to callers, and this module does:
//! choosing which files to fetch (never pickled weights), `HF_HUB_OFFLINE`
//! (it does not read that variable), checking that each LFS blob hashes to
//! its ETag before it is used, and errors that name the repository, the
//! revision and the file.
//!
//! The token is passed to the client and to nothing else: it is never
//! returned, printed, logged or stored.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::progress::{DownloadEvent, ProgressEvent, ProgressHandler, UploadEvent};
use hf_hub::repository::CommitOperation;
use hf_hub::{HFClientSync, HFError, HFRepositorySync, RepoTypeModel};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Where the Hub is when HF_ENDPOINT does not say.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn hf_home() -> PathBuf {
    env_nonempty("HF_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let base = env_nonempty("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| env_nonempty("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            base.join("huggingface")
        })
}

/// The cache directory, resolved as huggingface_hub does:
/// HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
pub fn cache_dir() -> PathBuf {
    env_nonempty("HF_HUB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home().join("hub"))
}

/// HF_ENDPOINT without a trailing slash, or the public Hub.
pub fn endpoint() -> String {
    env_nonempty("HF_ENDPOINT")
        .map(|e| e.trim().trim_end_matches('/').to_string())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
}

/// Where a token would come from, without its value.
#[derive(Debug, Serialize)]
pub struct TokenStatus {
    pub configured: bool,
    /// "HF_TOKEN", or the file it was found in.
    pub source: Option<String>,
}

/// The token and where it came from: HF_TOKEN, else the file HF_TOKEN_PATH
/// names, else $HF_HOME/token (huggingface_hub's order).
fn find_token() -> Option<(String, String)> {
    if let Some(t) = env_nonempty("HF_TOKEN") {
        return Some((t.trim().to_string(), "HF_TOKEN".into()));
    }
    let path = env_nonempty("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home().join("token"));
    let t = std::fs::read_to_string(&path).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| (t.to_string(), path.display().to_string()))
}

pub fn token_status() -> TokenStatus {
    let found = find_token();
    TokenStatus {
        configured: found.is_some(),
        source: found.map(|(_, source)| source),
    }
}

pub fn offline() -> bool {
    matches!(
        env_nonempty("HF_HUB_OFFLINE").as_deref(),
        Some("1" | "true" | "TRUE" | "True" | "yes" | "YES" | "ON" | "on")
    )
}

// ---------------------------------------------------------------------------
// References
// ---------------------------------------------------------------------------

/// A Hub reference: a model repository, an optional revision (branch, tag or
/// full commit sha) and an optional path inside it (a folder, or for an
/// adapter a `.safetensors` file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HubRef {
    pub repo: String,
    pub revision: Option<String>,
    pub path: Option<String>,
}

fn name_part_ok(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 96
        && !p.starts_with('.')
        && !p.ends_with('.')
        && !p.contains("..")
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A revision must be usable as a ref file name in the cache, as
/// huggingface_hub uses it: no empty parts, no `..`, no control characters.
fn revision_ok(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 256
        && !r.starts_with('/')
        && !r.ends_with('/')
        && r.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
        && !r
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '\\')
}

fn repo_ok(repo: &str) -> bool {
    matches!(repo.split_once('/'), Some((o, n)) if name_part_ok(o) && name_part_ok(n))
}

/// Is `s` a full commit sha (40 lowercase or uppercase hex digits)?
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

impl HubRef {
    /// `owner/name` or `owner/name@revision`, the form accepted where no
    /// local path of that name exists. None when `s` is not of that shape.
    pub fn parse_id(s: &str) -> Option<HubRef> {
        let (repo, revision) = match s.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev)),
            None => (s, None),
        };
        if !repo_ok(repo) || revision.is_some_and(|r| !revision_ok(r)) {
            return None;
        }
        Some(HubRef {
            repo: repo.to_string(),
            revision: revision.map(str::to_string),
            path: None,
        })
    }

    /// `hf://owner/name[@revision][/path]`. None when `s` does not start
    /// with `hf://`; an error when it does but is malformed. The revision
    /// ends at the next `/` (write one containing `/`, such as
    /// `refs/pr/1`, as `refs%2Fpr%2F1`, as huggingface_hub's HfFileSystem does).
    pub fn parse_url(s: &str) -> Option<Result<HubRef>> {
        let rest = s.strip_prefix("hf://")?;
        let bad = |why: &str| {
            Error::Usage(format!(
                "{s:?} is not a Hub reference ({why}); the form is \
                 hf://OWNER/NAME[@REVISION][/PATH]"
            ))
        };
        let rest = rest.strip_prefix("models/").unwrap_or(rest);
        if rest.starts_with("datasets/") || rest.starts_with("spaces/") {
            return Some(Err(bad("only model repositories are read")));
        }
        let mut parts = rest.splitn(3, '/');
        let owner = parts.next().unwrap_or("");
        let Some(name_rev) = parts.next() else {
            return Some(Err(bad("no repository name")));
        };
        let path = parts
            .next()
            .map(|p| p.trim_end_matches('/'))
            .filter(|p| !p.is_empty());
        let (name, revision) = match name_rev.split_once('@') {
            Some((n, r)) => (n, Some(r.replace("%2F", "/").replace("%2f", "/"))),
            None => (name_rev, None),
        };
        let repo = format!("{owner}/{name}");
        if !repo_ok(&repo) {
            return Some(Err(bad(
                "OWNER and NAME are letters, digits, '-', '_' and '.'",
            )));
        }
        if let Some(r) = &revision {
            if !revision_ok(r) {
                return Some(Err(bad("bad revision")));
            }
        }
        if let Some(p) = path {
            if p.split('/')
                .any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\\'))
            {
                return Some(Err(bad("bad path inside the repository")));
            }
        }
        Some(Ok(HubRef {
            repo,
            revision,
            path: path.map(str::to_string),
        }))
    }

    /// The revision asked for, `main` when none was.
    pub fn revision_or_main(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// This reference pinned to `commit`, in the `hf://` form, which no
    /// local path can shadow.
    pub fn pinned(&self, commit: &str) -> String {
        match &self.path {
            None => format!("hf://{}@{commit}", self.repo),
            Some(p) => format!("hf://{}@{commit}/{p}", self.repo),
        }
    }
}

// ---------------------------------------------------------------------------
// Choosing files
// ---------------------------------------------------------------------------

/// What a reference is expected to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// An adapter: its config (when there is one) and its safetensors weights.
    Adapter,
    /// A base model: config, tokenizer and safetensors weights (one file, or
    /// an index and its shards).
    Model,
}

const ADAPTER_WEIGHTS: [&str; 2] = [
    "adapter_model.safetensors",
    "pytorch_lora_weights.safetensors",
];
const ADAPTER_CONFIG: &str = "adapter_config.json";
const MODEL_INDEX: &str = "model.safetensors.index.json";
const MODEL_WEIGHTS: &str = "model.safetensors";
const MODEL_REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const MODEL_OPTIONAL: [&str; 3] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

fn is_pickle(name: &str) -> bool {
    [".bin", ".pt", ".pth", ".pkl", ".ckpt"]
        .iter()
        .any(|e| name.ends_with(e))
}

/// Why the files of a reference cannot be chosen.
enum Choice {
    /// The files to fetch, relative to the reference's folder; `weights` is
    /// the adapter's weights file (None for a model).
    Files {
        files: Vec<String>,
        weights: Option<String>,
    },
    /// A needed file is not in the listing.
    Missing(String),
    /// The listing holds something we refuse to use.
    Refused(String),
}

/// Choose what to fetch from `listing` (paths relative to the reference's
/// folder). `file` is set when the reference names one weights file.
fn choose(want: Want, listing: &[String], file: Option<&str>) -> Choice {
    let has = |n: &str| listing.iter().any(|f| f == n);
    match want {
        Want::Adapter => {
            let weights = if let Some(f) = file {
                if is_pickle(f) {
                    return Choice::Refused(format!(
                        "{f} is pickled weights; they are never downloaded or loaded"
                    ));
                }
                f.to_string()
            } else if let Some(w) = ADAPTER_WEIGHTS.iter().find(|w| has(w)) {
                w.to_string()
            } else {
                let top: Vec<&String> = listing
                    .iter()
                    .filter(|f| !f.contains('/') && f.ends_with(".safetensors"))
                    .collect();
                match top.as_slice() {
                    [one] => one.to_string(),
                    [] => {
                        if let Some(p) = listing.iter().find(|f| !f.contains('/') && is_pickle(f)) {
                            return Choice::Refused(format!(
                                "it holds pickled weights ({p}) and no .safetensors file; pickled \
                                 weights are never downloaded or loaded"
                            ));
                        }
                        return Choice::Missing(ADAPTER_WEIGHTS[0].into());
                    }
                    many => {
                        return Choice::Refused(format!(
                            "{} .safetensors files at this level ({}); name one: \
                             hf://OWNER/NAME[@REVISION]/FILE",
                            many.len(),
                            many.iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    }
                }
            };
            if !has(&weights) {
                return Choice::Missing(weights);
            }
            let dir = weights.rsplit_once('/').map(|(d, _)| format!("{d}/"));
            let config = format!("{}{ADAPTER_CONFIG}", dir.as_deref().unwrap_or(""));
            let mut files = Vec::new();
            // The adapter's model card: small, and where its license is.
            let card = format!("{}README.md", dir.as_deref().unwrap_or(""));
            if has(&card) {
                files.push(card);
            }
            if has(&config) {
                files.push(config);
            } else if weights.ends_with(ADAPTER_WEIGHTS[0]) {
                // A PEFT adapter is unusable without its config.
                return Choice::Missing(config);
            }
            files.push(weights.clone());
            Choice::Files {
                files,
                weights: Some(weights),
            }
        }
        Want::Model => {
            let mut files = Vec::new();
            for f in MODEL_REQUIRED {
                if !has(f) {
                    return Choice::Missing(f.into());
                }
                files.push(f.to_string());
            }
            files.extend(
                MODEL_OPTIONAL
                    .iter()
                    .filter(|f| has(f))
                    .map(|f| f.to_string()),
            );
            if has(MODEL_WEIGHTS) {
                files.push(MODEL_WEIGHTS.into());
            } else if has(MODEL_INDEX) {
                files.push(MODEL_INDEX.into());
            } else if let Some(p) = listing.iter().find(|f| !f.contains('/') && is_pickle(f)) {
                return Choice::Refused(format!(
                    "it holds pickled weights ({p}) and no model.safetensors or \
                     {MODEL_INDEX}; pickled weights are never downloaded or loaded"
                ));
            } else {
                return Choice::Missing(MODEL_WEIGHTS.into());
            }
            Choice::Files {
                files,
                weights: None,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Fetching
// ---------------------------------------------------------------------------

/// A reference fetched into the cache.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub repo: String,
    /// The revision as asked (`main` when none was).
    pub revision: String,
    /// The full commit sha it resolved to.
    pub commit: String,
    /// The folder of the reference inside the snapshot
    /// (`.../snapshots/<commit>[/path]`).
    pub dir: PathBuf,
    /// The adapter's weights file (adapters only).
    pub weights: Option<PathBuf>,
    /// Every file fetched (or found in the cache), absolute.
    pub files: Vec<PathBuf>,
}

fn repo_folder(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

fn client(token: Option<String>) -> Result<HFClientSync> {
    let mut b = hf_hub::HFClientBuilder::new()
        .endpoint(endpoint())
        .cache_dir(cache_dir())
        .user_agent(format!(
            "{}/{}; hf-hub/1.0.0",
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION")
        ))
        // Failures are reported, not retried for minutes.
        .retry_max_attempts(2)
        .retry_base_delay(std::time::Duration::from_millis(200));
    if let Some(t) = token {
        b = b.token(t);
    }
    b.build_sync()
        .map_err(|e| Error::Internal(format!("cannot set up the Hub client: {e}")))
}

fn repo_handle(client: &HFClientSync, repo: &str) -> HFRepositorySync<RepoTypeModel> {
    let (owner, name) = repo.split_once('/').unwrap_or(("", repo));
    client.model(owner, name)
}

/// Turn a client error into ours, naming the repository, the revision and
/// the file, and saying what to do. Never includes the token (the client's
/// errors carry the URL, status and the server's message only).
fn hub_error(e: HFError, repo: &str, revision: &str, file: Option<&str>) -> Error {
    let at = match file {
        Some(f) => format!("{repo}@{revision}: {f}"),
        None => format!("{repo}@{revision}"),
    };
    match &e {
        HFError::AuthRequired { .. } => Error::Hub(format!(
            "{at}: the Hub refused the request (401 unauthorized): the repository may be private \
             or gated, or the token is invalid; set HF_TOKEN (or run `hf auth login`) with a \
             token that can read it (to push: write to it)"
        )),
        HFError::Forbidden { .. } => Error::Hub(format!(
            "{at}: the Hub refused the request (403 forbidden): the token may lack write access \
             or the repository is gated; check the token's permissions"
        )),
        HFError::RepoNotFound { .. } => Error::Hub(format!(
            "{at}: no such repository on {} (check the name; a private repository needs a token)",
            endpoint()
        )),
        HFError::RevisionNotFound { context, .. } => {
            let code = context.as_ref().and_then(|c| c.error_code.clone());
            if code.as_deref() == Some("RepoNotFound") {
                Error::Hub(format!(
                    "{at}: no such repository on {} (check the name; a private repository needs \
                     a token)",
                    endpoint()
                ))
            } else {
                Error::Hub(format!(
                    "{at}: no revision {revision:?} in {repo} (a revision is a branch, a tag or \
                     a full commit sha)"
                ))
            }
        }
        HFError::EntryNotFound { context, .. } => {
            let code = context.as_ref().and_then(|c| c.error_code.clone());
            match code.as_deref().unwrap_or("") {
                "RevisionNotFound" => Error::Hub(format!(
                    "{at}: no revision {revision:?} in {repo} (a revision is a branch, a tag or \
                     a full commit sha)"
                )),
                "RepoNotFound" => Error::Hub(format!("{at}: no such repository on {}", endpoint())),
                _ => Error::Hub(format!(
                    "{at}: no such file in the repository at this revision"
                )),
            }
        }
        _ => Error::Network(format!("{at}: {e}")),
    }
}

fn offline_miss(repo: &str, revision: &str, file: Option<&str>, why: &str) -> Error {
    let what = match file {
        Some(f) => format!("{f} of {repo}@{revision}"),
        None => format!("{repo}@{revision}"),
    };
    Error::Hub(format!(
        "HF_HUB_OFFLINE is set and {what} is not in the Hub cache {} ({why}); fetch it once \
         online (unset HF_HUB_OFFLINE) or pass a local directory",
        cache_dir().display()
    ))
}

/// Per-file progress on stderr when it is a terminal.
struct Bars {
    bar: ProgressBar,
}

impl Bars {
    fn new(what: String) -> Bars {
        let bar = if std::io::stderr().is_terminal() {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(what);
            b
        } else {
            ProgressBar::hidden()
        };
        Bars { bar }
    }
}

impl ProgressHandler for Bars {
    fn on_progress(&self, event: &ProgressEvent) {
        match event {
            ProgressEvent::Download(DownloadEvent::Start { total_bytes, .. })
            | ProgressEvent::Upload(UploadEvent::Start { total_bytes, .. }) => {
                self.bar.set_length(*total_bytes)
            }
            ProgressEvent::Download(DownloadEvent::Progress { files }) => {
                if let Some(f) = files.first() {
                    self.bar.set_position(f.bytes_completed);
                }
            }
            ProgressEvent::Download(DownloadEvent::AggregateProgress {
                bytes_completed, ..
            })
            | ProgressEvent::Upload(UploadEvent::Progress {
                bytes_completed, ..
            }) => self.bar.set_position(*bytes_completed),
            ProgressEvent::Upload(UploadEvent::Committing) => self.bar.set_message("committing"),
            ProgressEvent::Download(DownloadEvent::Complete)
            | ProgressEvent::Upload(UploadEvent::Complete) => self.bar.finish_and_clear(),
        }
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// An LFS blob is named by the sha256 of its content. One that does not hash
/// to its name (a cut-short transfer that a server did not report, a
/// tampered cache) is removed along with its snapshot link, never used.
fn check_blob(link: &Path, repo: &str, revision: &str, file: &str) -> Result<()> {
    let target = std::fs::canonicalize(link).map_err(|e| Error::io(link, e))?;
    let Some(name) = target.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    if name.len() != 64 || !name.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(()); // a git blob sha1: not a content hash we can check cheaply
    }
    let got = sha256_file(&target)?;
    if got != name.to_ascii_lowercase() {
        let _ = std::fs::remove_file(link);
        let _ = std::fs::remove_file(&target);
        return Err(Error::Hub(format!(
            "{repo}@{revision}: {file}: the downloaded file does not match its sha256 \
             ({got}, expected {name}); it was removed from the cache, run again to fetch it afresh"
        )));
    }
    Ok(())
}

/// Fetch what a reference needs into the cache (or, offline, find it there).
pub fn fetch(r: &HubRef, want: Want) -> Result<Snapshot> {
    if offline() {
        fetch_offline(r, want)
    } else {
        fetch_online(r, want)
    }
}

/// Split the reference's path into the folder listed and, for an adapter, a
/// named weights file.
fn split_path(r: &HubRef, want: Want, is_file: impl Fn(&str) -> bool) -> (String, Option<String>) {
    match &r.path {
        Some(p) if want == Want::Adapter && is_file(p) => match p.rsplit_once('/') {
            Some((dir, f)) => (format!("{dir}/"), Some(f.to_string())),
            None => (String::new(), Some(p.clone())),
        },
        Some(p) => (format!("{p}/"), None),
        None => (String::new(), None),
    }
}

fn fetch_online(r: &HubRef, want: Want) -> Result<Snapshot> {
    let revision = r.revision_or_main().to_string();
    let client = client(find_token().map(|(t, _)| t))?;
    let repo = repo_handle(&client, &r.repo);
    let info = repo
        .info()
        .revision(revision.clone())
        .send()
        .map_err(|e| hub_error(e, &r.repo, &revision, None))?;
    let commit = info
        .sha
        .filter(|s| is_commit(s))
        .ok_or_else(|| {
            Error::Network(format!(
                "{}@{revision}: the Hub did not say which commit this revision is",
                r.repo
            ))
        })?
        .to_ascii_lowercase();
    if is_commit(&revision) && !revision.eq_ignore_ascii_case(&commit) {
        return Err(Error::Network(format!(
            "{}@{revision}: the Hub answered with commit {commit}",
            r.repo
        )));
    }
    let all: Vec<String> = info
        .siblings
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.rfilename)
        .collect();
    let (prefix, file) = split_path(r, want, |p| all.iter().any(|f| f == p));
    let listing: Vec<String> = all
        .iter()
        .filter_map(|f| f.strip_prefix(prefix.as_str()).map(str::to_string))
        .collect();
    let at = format!("{}@{revision}", r.repo);
    let (mut files, weights) = match choose(want, &listing, file.as_deref()) {
        Choice::Files { files, weights } => (files, weights),
        Choice::Missing(f) => {
            return Err(Error::Hub(format!(
                "{at}: {prefix}{f}: no such file at commit {commit}{}",
                match want {
                    Want::Adapter =>
                        " (an adapter needs adapter_config.json with \
                                      adapter_model.safetensors, or a single .safetensors file)",
                    Want::Model =>
                        " (a base model needs config.json, tokenizer.json and \
                                    model.safetensors or model.safetensors.index.json)",
                }
            )))
        }
        Choice::Refused(why) => return Err(Error::Hub(format!("{at}{}: {why}", slash(&prefix)))),
    };

    let snapshot_root = cache_dir()
        .join(repo_folder(&r.repo))
        .join("snapshots")
        .join(&commit);
    let dir = snapshot_root.join(prefix.trim_end_matches('/'));
    let mut fetched = Vec::new();
    let mut i = 0;
    while i < files.len() {
        let f = files[i].clone();
        let in_repo = format!("{prefix}{f}");
        let cached = snapshot_root.join(&in_repo).is_file();
        let bar = Bars::new(format!("{}/{in_repo}", r.repo));
        // Fetched by commit, so every file comes from the same one even if
        // the branch moves meanwhile.
        let path = repo
            .download_file()
            .filename(in_repo.clone())
            .revision(commit.clone())
            .progress(hf_hub::progress::Progress::new(bar))
            .send()
            .map_err(|e| hub_error(e, &r.repo, &revision, Some(&in_repo)))?;
        if !path.starts_with(&snapshot_root) {
            return Err(Error::Network(format!(
                "{at}: {in_repo}: the Hub served it from another commit than {commit}"
            )));
        }
        if !cached {
            // Once, when it arrives: base model shards run to gigabytes.
            check_blob(&path, &r.repo, &revision, &in_repo)?;
        }
        if f == MODEL_INDEX {
            for shard in crate::model::index_shard_names(&path)? {
                if !listing.contains(&shard) {
                    return Err(Error::Hub(format!(
                        "{at}: {prefix}{shard}: named by {MODEL_INDEX} but not in the repository"
                    )));
                }
                if !files.contains(&shard) {
                    files.push(shard);
                }
            }
        }
        fetched.push(path);
        i += 1;
    }
    // As huggingface_hub does: remember which commit a branch or tag named,
    // so that offline runs (ours and Python's) find it.
    if !is_commit(&revision) {
        let refs = cache_dir().join(repo_folder(&r.repo)).join("refs");
        let ref_file = refs.join(&revision);
        if let Some(parent) = ref_file.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        write_ref(&ref_file, &commit)?;
    }
    Ok(Snapshot {
        repo: r.repo.clone(),
        revision,
        commit,
        weights: weights.map(|w| dir.join(w)),
        dir,
        files: fetched,
    })
}

/// Write a ref file whole or not at all: a temp file beside it, renamed.
fn write_ref(path: &Path, commit: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    std::io::Write::write_all(&mut tmp, commit.as_bytes()).map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

fn slash(prefix: &str) -> String {
    if prefix.is_empty() {
        String::new()
    } else {
        format!(" ({})", prefix.trim_end_matches('/'))
    }
}

/// Every file under `dir`, as paths relative to it with `/` separators.
fn list_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            // Snapshot entries are symlinks to blobs: follow them.
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                if let Ok(rel) = p.strip_prefix(dir) {
                    let parts: Vec<String> = rel
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect();
                    out.push(parts.join("/"));
                }
            }
        }
    }
    out.sort();
    out
}

fn fetch_offline(r: &HubRef, want: Want) -> Result<Snapshot> {
    let revision = r.revision_or_main().to_string();
    let folder = cache_dir().join(repo_folder(&r.repo));
    let commit = if is_commit(&revision) {
        revision.to_ascii_lowercase()
    } else {
        let ref_file = folder.join("refs").join(&revision);
        match std::fs::read_to_string(&ref_file) {
            Ok(s) if is_commit(s.trim()) => s.trim().to_ascii_lowercase(),
            _ => {
                return Err(offline_miss(
                    &r.repo,
                    &revision,
                    None,
                    "no record of which commit that revision is",
                ))
            }
        }
    };
    let snapshot_root = folder.join("snapshots").join(&commit);
    if !snapshot_root.is_dir() {
        return Err(offline_miss(
            &r.repo,
            &revision,
            None,
            &format!("no snapshot of commit {commit}"),
        ));
    }
    let (prefix, file) = split_path(r, want, |p| snapshot_root.join(p).is_file());
    let dir = snapshot_root.join(prefix.trim_end_matches('/'));
    let listing = list_files(&dir);
    let (mut files, weights) = match choose(want, &listing, file.as_deref()) {
        Choice::Files { files, weights } => (files, weights),
        Choice::Missing(f) => {
            return Err(offline_miss(
                &r.repo,
                &revision,
                Some(&format!("{prefix}{f}")),
                &format!("not in the snapshot of commit {commit}"),
            ))
        }
        Choice::Refused(why) => {
            return Err(Error::Hub(format!(
                "{}@{revision}{}: {why}",
                r.repo,
                slash(&prefix)
            )))
        }
    };
    if files.iter().any(|f| f == MODEL_INDEX) {
        for shard in crate::model::index_shard_names(&dir.join(MODEL_INDEX))? {
            if !files.contains(&shard) {
                files.push(shard);
            }
        }
    }
    let mut found = Vec::new();
    for f in &files {
        let p = dir.join(f);
        if !p.is_file() {
            return Err(offline_miss(
                &r.repo,
                &revision,
                Some(&format!("{prefix}{f}")),
                &format!("not in the snapshot of commit {commit}"),
            ));
        }
        found.push(p);
    }
    Ok(Snapshot {
        repo: r.repo.clone(),
        revision,
        commit,
        weights: weights.map(|w| dir.join(w)),
        dir,
        files: found,
    })
}

// ---------------------------------------------------------------------------
// Push
// ---------------------------------------------------------------------------

/// What `push` sends.
pub struct PushRequest<'a> {
    /// The directory the files are in.
    pub dir: &'a Path,
    /// File names in `dir`, uploaded under the same names.
    pub files: &'a [String],
    pub repo: &'a str,
    pub revision: &'a str,
    pub private: bool,
    pub create_pr: bool,
    pub message: &'a str,
}

/// What `push` made.
#[derive(Debug, Serialize)]
pub struct Pushed {
    pub repo: String,
    pub revision: String,
    pub commit: String,
    pub url: String,
}

/// Check a repository id given to `push`.
pub fn check_repo_id(repo: &str) -> Result<()> {
    if repo_ok(repo) {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "--repo {repo:?} is not a repository id: OWNER/NAME, each made of letters, digits, \
             '-', '_' and '.'"
        )))
    }
}

/// Upload `files` to `repo` in one commit, creating the repository (and the
/// branch) when needed. Refuses before sending anything when no token is
/// configured or HF_HUB_OFFLINE is set.
pub fn push(req: &PushRequest) -> Result<Pushed> {
    check_repo_id(req.repo)?;
    if !revision_ok(req.revision) || is_commit(req.revision) {
        return Err(Error::Usage(format!(
            "--revision {:?} is not a branch name",
            req.revision
        )));
    }
    if offline() {
        return Err(Error::Usage(
            "HF_HUB_OFFLINE is set: push needs the network; unset it to push".into(),
        ));
    }
    let Some((token, _)) = find_token() else {
        return Err(Error::Usage(
            "push needs a Hub token with write access and none is configured (nothing was \
             sent): set HF_TOKEN, or HF_TOKEN_PATH to a file holding it, or run `hf auth login`"
                .into(),
        ));
    };
    let client = client(Some(token))?;
    let at = |e: HFError| hub_error(e, req.repo, req.revision, None);
    client
        .create_repository()
        .repo_id(req.repo)
        .repo_type(RepoTypeModel)
        .maybe_private(req.private.then_some(true))
        .exist_ok(true)
        .send()
        .map_err(at)?;
    let repo = repo_handle(&client, req.repo);
    if req.revision != "main"
        && !repo
            .revision_exists()
            .revision(req.revision)
            .send()
            .map_err(at)?
    {
        repo.create_branch()
            .branch(req.revision)
            .send()
            .map_err(at)?;
    }
    let ops: Vec<CommitOperation> = req
        .files
        .iter()
        .map(|f| CommitOperation::add_file(f.clone(), req.dir.join(f)))
        .collect();
    let bar = Bars::new(format!("pushing {}", req.repo));
    let info = repo
        .create_commit()
        .operations(ops)
        .commit_message(req.message)
        .revision(req.revision)
        .create_pr(req.create_pr)
        .progress(hf_hub::progress::Progress::new(bar))
        .send()
        .map_err(at)?;
    let commit = info
        .commit_oid
        .clone()
        .filter(|c| is_commit(c))
        .ok_or_else(|| {
            Error::Network(format!(
                "{}@{}: the Hub accepted the commit but did not say its id",
                req.repo, req.revision
            ))
        })?;
    let url = info
        .commit_url
        .clone()
        .unwrap_or_else(|| format!("{}/{}/commit/{commit}", endpoint(), req.repo));
    Ok(Pushed {
        repo: req.repo.to_string(),
        revision: req.revision.to_string(),
        commit,
        url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_ids_and_urls() {
        assert_eq!(
            HubRef::parse_id("owner/name@v1.0"),
            Some(HubRef {
                repo: "owner/name".into(),
                revision: Some("v1.0".into()),
                path: None
            })
        );
        assert_eq!(
            HubRef::parse_id("owner/name").unwrap().revision_or_main(),
            "main"
        );
        for bad in [
            "a/b/c", "name", "./a/b", "a/b@", "a/b@x y", "a/..", "a/b@../x", "/a/b",
        ] {
            assert_eq!(HubRef::parse_id(bad), None, "{bad}");
        }
        let r = HubRef::parse_url("hf://o/n@refs%2Fpr%2F1/sub/dir/")
            .unwrap()
            .unwrap();
        assert_eq!(r.repo, "o/n");
        assert_eq!(r.revision.as_deref(), Some("refs/pr/1"));
        assert_eq!(r.path.as_deref(), Some("sub/dir"));
        assert_eq!(
            r.pinned(&"a".repeat(40)),
            format!("hf://o/n@{}/sub/dir", "a".repeat(40))
        );
        let r = HubRef::parse_url("hf://models/o/n").unwrap().unwrap();
        assert_eq!(
            (r.repo.as_str(), r.revision.as_deref(), r.path.as_deref()),
            ("o/n", None, None)
        );
        assert!(HubRef::parse_url("./o/n").is_none());
        for bad in [
            "hf://o",
            "hf://datasets/o/n",
            "hf://o/n/../x",
            "hf://o/n@/x",
            "hf://o/n@a b",
        ] {
            assert!(HubRef::parse_url(bad).unwrap().is_err(), "{bad}");
        }
        assert!(is_commit(&"0123456789abcdef".repeat(3)[..40]));
        assert!(!is_commit("main"));
    }

    #[test]
    fn chooses_only_needed_files_and_never_pickles() {
        let files = |c: Choice| match c {
            Choice::Files { files, .. } => files,
            Choice::Missing(f) => panic!("missing {f}"),
            Choice::Refused(w) => panic!("refused {w}"),
        };
        let peft = l(&[
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
            "adapter_model.bin",
            "training_args.bin",
        ]);
        assert_eq!(
            files(choose(Want::Adapter, &peft, None)),
            l(&[
                "README.md",
                "adapter_config.json",
                "adapter_model.safetensors"
            ])
        );
        let kohya = l(&["style.safetensors", "preview.png"]);
        assert_eq!(
            files(choose(Want::Adapter, &kohya, None)),
            l(&["style.safetensors"])
        );
        let two = l(&["a.safetensors", "b.safetensors"]);
        assert!(
            matches!(choose(Want::Adapter, &two, None), Choice::Refused(w) if w.contains("name one"))
        );
        assert_eq!(
            files(choose(Want::Adapter, &two, Some("b.safetensors"))),
            l(&["b.safetensors"])
        );
        let pickled = l(&["adapter_config.json", "adapter_model.bin"]);
        assert!(
            matches!(choose(Want::Adapter, &pickled, None), Choice::Refused(w) if w.contains("pickled"))
        );
        let nocfg = l(&["adapter_model.safetensors"]);
        assert!(
            matches!(choose(Want::Adapter, &nocfg, None), Choice::Missing(f) if f == "adapter_config.json")
        );

        let model = l(&[
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors",
            "pytorch_model.bin",
            "onnx/model.onnx",
        ]);
        assert_eq!(
            files(choose(Want::Model, &model, None)),
            l(&[
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "model.safetensors"
            ])
        );
        let sharded = l(&[
            "config.json",
            "tokenizer.json",
            MODEL_INDEX,
            "model-00001-of-00002.safetensors",
        ]);
        assert_eq!(
            files(choose(Want::Model, &sharded, None)),
            l(&["config.json", "tokenizer.json", MODEL_INDEX])
        );
        let pickled = l(&["config.json", "tokenizer.json", "pytorch_model.bin"]);
        assert!(
            matches!(choose(Want::Model, &pickled, None), Choice::Refused(w) if w.contains("pytorch_model.bin"))
        );
        assert!(
            matches!(choose(Want::Model, &l(&["config.json"]), None), Choice::Missing(f) if f == "tokenizer.json")
        );
    }

    #[test]
    fn index_shards_are_plain_names() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join(MODEL_INDEX);
        std::fs::write(&p, r#"{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-1.safetensors"}}"#).unwrap();
        assert_eq!(
            crate::model::index_shard_names(&p).unwrap(),
            l(&["m-1.safetensors", "m-2.safetensors"])
        );
        std::fs::write(&p, r#"{"weight_map": {"a": "../evil.safetensors"}}"#).unwrap();
        assert!(crate::model::index_shard_names(&p).is_err());
        std::fs::write(&p, r#"{"weight_map": {"a": "pytorch_model.bin"}}"#).unwrap();
        assert!(crate::model::index_shard_names(&p).is_err());
    }
}
