//! Everything that talks to the Hugging Face Hub lives here: references
//! (`owner/name@rev`, `hf://owner/name@rev/sub`), downloads into the cache
//! shared with Python's `huggingface_hub`, offline mode, and `push`.
//!
//! Downloads are ours (`http.rs` and `cache.rs`): the revision info and
//! `resolve` requests, and every write into the cache shared with Python
//! (`models--owner--name/{blobs,snapshots/<sha>,refs/<rev>}`). A server,
//! even a hostile one, cannot make us write outside that cache: its names
//! (ETag, X-Repo-Commit) are checked before they become paths, folders are
//! made without following links and checked after resolution, and a blob
//! enters the cache only whole and verified against its name (sha256 for
//! LFS files, git's blob sha1 for the others). `push` sends its commit and
//! its Git LFS uploads itself (`net.rs`); `hf-hub` (pinned to 1.0.0)
//! creates the repository and the branch.
//! This module also decides which files to fetch (never pickled weights),
//! honours `HF_HUB_OFFLINE`, and names the repository, the revision and
//! the file in every error.
//!
//! The token goes only to the endpoint's own origin (scheme, host, port),
//! on every redirect; it is never returned, printed, logged or stored, and
//! server text is shown only with it (and control characters) removed.

use std::path::{Path, PathBuf};

use serde::Serialize;

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

/// Owner names the Hub keeps for repository types (`datasets/…`,
/// `spaces/…`, `models/…`): no model repository is owned by them, and an
/// `hf://` reference starting with one means a type, so a pinned reference
/// could not name such a repository.
const RESERVED_OWNERS: [&str; 3] = ["datasets", "spaces", "models"];

fn repo_ok(repo: &str) -> bool {
    matches!(repo.split_once('/'), Some((o, n))
        if name_part_ok(o) && name_part_ok(n) && !RESERVED_OWNERS.contains(&o))
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

use crate::layout::{
    is_pickle, ADAPTER_CONFIG, ADAPTER_WEIGHTS_NAMES as ADAPTER_WEIGHTS, MODEL_INDEX,
    MODEL_OPTIONAL, MODEL_REQUIRED, MODEL_WEIGHTS,
};

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

fn offline_miss(repo: &str, revision: &str, file: Option<&str>, why: &str) -> Error {
    let what = match file {
        Some(f) => format!("{f} of {repo}@{revision}"),
        None => format!("{repo}@{revision}"),
    };
    let (reason, remedy) = if cfg!(feature = "hub") {
        (
            "HF_HUB_OFFLINE is set",
            "fetch it once online (unset HF_HUB_OFFLINE)",
        )
    } else {
        (
            "this lora-merge was built without the `hub` feature (no downloads)",
            "build lora-merge with default features, fetch it with Python's huggingface_hub,",
        )
    };
    Error::Hub(format!(
        "{reason} and {what} is not in the Hub cache {} ({why}); {remedy} or pass a local \
         directory",
        cache_dir().display()
    ))
}

mod cache;
#[cfg(feature = "hub")]
mod http;
#[cfg(feature = "hub")]
mod net;

#[cfg(feature = "hub")]
fn online(r: &HubRef, want: Want) -> Result<Snapshot> {
    net::fetch_online(r, want)
}

/// Built without the `hub` feature: no downloads, but what is already in the
/// Hub cache (put there by Python or another lora-merge) is used.
#[cfg(not(feature = "hub"))]
fn online(r: &HubRef, want: Want) -> Result<Snapshot> {
    fetch_offline(r, want)
}

#[cfg(not(feature = "hub"))]
mod net {
    use super::*;

    pub(super) fn push(req: &PushRequest, _token: String) -> Result<Pushed> {
        Err(Error::Usage(format!(
            "cannot push to {}: this lora-merge was built without the `hub` feature; build it \
             with default features",
            req.repo
        )))
    }
}

/// Fetch what a reference needs into the cache (or, offline, find it there).
pub fn fetch(r: &HubRef, want: Want) -> Result<Snapshot> {
    if offline() {
        fetch_offline(r, want)
    } else {
        online(r, want)
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

/// Add the shards a model index names to the files to fetch, each once.
/// Online, `listing` is the repository's: a shard missing from it is the
/// repository's error, named with `at` and the folder `prefix`.
fn add_shards(
    files: &mut Vec<String>,
    index: &Path,
    listing: Option<&[String]>,
    at: &str,
    prefix: &str,
) -> Result<()> {
    for shard in crate::layout::index_shard_names(index)? {
        if listing.is_some_and(|l| !l.contains(&shard)) {
            return Err(Error::Hub(format!(
                "{at}: {prefix}{shard}: named by {MODEL_INDEX} but not in the repository"
            )));
        }
        if !files.contains(&shard) {
            files.push(shard);
        }
    }
    Ok(())
}

fn fetch_offline(r: &HubRef, want: Want) -> Result<Snapshot> {
    let revision = r.revision_or_main().to_string();
    let Some(cache) = cache::RepoCache::open(&r.repo, false)? else {
        return Err(offline_miss(
            &r.repo,
            &revision,
            None,
            "the repository was never fetched",
        ));
    };
    let commit = if is_commit(&revision) {
        revision.to_ascii_lowercase()
    } else {
        match cache.read_ref(&revision) {
            Some(c) => c,
            None => {
                return Err(offline_miss(
                    &r.repo,
                    &revision,
                    None,
                    "no record of which commit that revision is",
                ))
            }
        }
    };
    let snapshot_root = cache.folder().join("snapshots").join(&commit);
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
    let mut found = Vec::new();
    let mut i = 0;
    while i < files.len() {
        let f = files[i].clone();
        let in_repo = format!("{prefix}{f}");
        let p = cache.entry(&commit, &in_repo)?;
        match cache.check_entry(&p)? {
            cache::Cached::Good => {}
            cache::Cached::Missing => {
                return Err(offline_miss(
                    &r.repo,
                    &revision,
                    Some(&in_repo),
                    &format!("not in the snapshot of commit {commit}"),
                ))
            }
            cache::Cached::Bad(why) => {
                return Err(offline_miss(
                    &r.repo,
                    &revision,
                    Some(&in_repo),
                    &format!("the cached copy was unusable ({why}) and was removed"),
                ))
            }
        }
        if f == MODEL_INDEX {
            add_shards(&mut files, &p, None, "", "")?;
        }
        found.push(p);
        i += 1;
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
    net::push(req, token)
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
            "a/b/c",
            "name",
            "./a/b",
            "a/b@",
            "a/b@x y",
            "a/..",
            "a/b@../x",
            "/a/b",
            // Found by fuzzing: its pinned form hf://datasets/repo@SHA names a
            // dataset.
            "datasets/repo@main/sub/dai",
            "spaces/x",
            "models/x",
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
            crate::layout::index_shard_names(&p).unwrap(),
            l(&["m-1.safetensors", "m-2.safetensors"])
        );
        std::fs::write(&p, r#"{"weight_map": {"a": "../evil.safetensors"}}"#).unwrap();
        assert!(crate::layout::index_shard_names(&p).is_err());
        std::fs::write(&p, r#"{"weight_map": {"a": "pytorch_model.bin"}}"#).unwrap();
        assert!(crate::layout::index_shard_names(&p).is_err());
    }
}
