//! The network half of the Hub support: downloads and uploads through the
//! `hf-hub` client. Built only with the `hub` feature (on by default);
//! without it, lora-merge still reads the Hub cache (see `fetch`).

use std::io::IsTerminal;

use hf_hub::progress::{DownloadEvent, ProgressEvent, ProgressHandler, UploadEvent};
use hf_hub::repository::CommitOperation;
use hf_hub::{HFClientSync, HFError, HFRepositorySync, RepoTypeModel};
use indicatif::{ProgressBar, ProgressStyle};

use super::*;

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

pub(super) fn fetch_online(r: &HubRef, want: Want) -> Result<Snapshot> {
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
            add_shards(&mut files, &path, Some(&listing), &at, &prefix)?;
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

pub(super) fn push(req: &PushRequest, token: String) -> Result<Pushed> {
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
    let got = crate::hash::sha256_file(&target)?;
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

/// Write a ref file whole or not at all: a temp file beside it, renamed.
fn write_ref(path: &Path, commit: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    std::io::Write::write_all(&mut tmp, commit.as_bytes()).map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}
