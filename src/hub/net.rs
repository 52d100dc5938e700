//! The network half of the Hub support: downloads and uploads through the
//! `hf-hub` client. Built only with the `hub` feature (on by default);
//! without it, lora-merge still reads the Hub cache (see `fetch`).

use std::io::IsTerminal;

use hf_hub::progress::{DownloadEvent, ProgressEvent, ProgressHandler, UploadEvent};
use hf_hub::repository::CommitOperation;
use hf_hub::{HFClientSync, HFError, HFRepositorySync, RepoTypeModel};
use indicatif::{ProgressBar, ProgressStyle};

use super::cache::{self, Cached, RepoCache};
use super::http::{self, header, Http, Status};
use super::*;

fn same_origin(a: &str, b: &str) -> bool {
    match (reqwest::Url::parse(a), reqwest::Url::parse(b)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
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
        // Only pushes go through this client. No retries: a commit POST
        // that timed out may have landed, and sending it again would make a
        // second commit; a failure is reported for the user to decide.
        .retry_max_attempts(0);
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
fn hub_error(e: HFError, token: &str, repo: &str, revision: &str, file: Option<&str>) -> Error {
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
        // The server's own text: no token, no control characters.
        _ => Error::Network(format!(
            "{at}: {}",
            http::clean(&e.to_string(), Some(token))
        )),
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

#[derive(serde::Deserialize)]
struct RepoInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
}

/// The error for a failed answer about `repo` at `revision` (and `file`).
fn status_error(s: &Status, repo: &str, revision: &str, file: Option<&str>) -> Error {
    let at = match file {
        Some(f) => format!("{repo}@{revision}: {f}"),
        None => format!("{repo}@{revision}"),
    };
    let not_found = |code: &str| match code {
        "RevisionNotFound" => Some(Error::Hub(format!(
            "{at}: no revision {revision:?} in {repo} (a revision is a branch, a tag or a full \
             commit sha)"
        ))),
        "RepoNotFound" => Some(Error::Hub(format!(
            "{at}: no such repository on {} (check the name; a private repository needs a token)",
            endpoint()
        ))),
        "EntryNotFound" => Some(Error::Hub(format!(
            "{at}: no such file in the repository at this revision"
        ))),
        "GatedRepo" => Some(Error::Hub(format!(
            "{at}: the repository is gated: accept its conditions on its Hub page, then set \
             HF_TOKEN to a token of that account"
        ))),
        _ => None,
    };
    match s.code {
        // As the Hub answers for a private repository read without a token.
        401 if s.error_code.as_deref() == Some("RepoNotFound") => Error::Hub(format!(
            "{at}: the Hub refused the request (401 unauthorized): no such repository on {}, \
             or it is private or gated and needs a token; set HF_TOKEN (or run `hf auth \
             login`) with a token that can read it",
            endpoint()
        )),
        401 => not_found(s.error_code.as_deref().unwrap_or("")).unwrap_or_else(|| {
            Error::Hub(format!(
                "{at}: the Hub refused the request (401 unauthorized): the repository may be \
                 private or gated, or the token is invalid; set HF_TOKEN (or run `hf auth \
                 login`) with a token that can read it"
            ))
        }),
        403 => not_found(s.error_code.as_deref().unwrap_or("")).unwrap_or_else(|| {
            Error::Hub(format!(
                "{at}: the Hub refused the request (403 forbidden): the repository may be gated; \
                 check the token's permissions"
            ))
        }),
        404 => not_found(s.error_code.as_deref().unwrap_or(if file.is_some() {
            "EntryNotFound"
        } else {
            "RepoNotFound"
        }))
        .unwrap_or_else(|| Error::Hub(format!("{at}: not found ({})", s.describe()))),
        _ => Error::Network(format!(
            "{at}: the server answered {}; nothing was kept (run again later)",
            s.describe()
        )),
    }
}

pub(super) fn fetch_online(r: &HubRef, want: Want) -> Result<Snapshot> {
    let revision = r.revision_or_main().to_string();
    let http = Http::new(find_token().map(|(t, _)| t))?;
    let (owner, name) = r.repo.split_once('/').unwrap_or(("", &r.repo));
    let at = format!("{}@{revision}", r.repo);
    let info: RepoInfo = http.json(
        http.url(&["api", "models", owner, name, "revision", &revision]),
        &at,
        |s| status_error(s, &r.repo, &revision, None),
    )?;
    let commit = info
        .sha
        .filter(|s| is_commit(s))
        .ok_or_else(|| {
            Error::Network(format!(
                "{at}: the Hub did not say which commit this revision is"
            ))
        })?
        .to_ascii_lowercase();
    if is_commit(&revision) && !revision.eq_ignore_ascii_case(&commit) {
        return Err(Error::Network(format!(
            "{at}: the Hub answered with commit {commit}"
        )));
    }
    let all: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let (prefix, file) = split_path(r, want, |p| all.iter().any(|f| f == p));
    let listing: Vec<String> = all
        .iter()
        .filter_map(|f| f.strip_prefix(prefix.as_str()).map(str::to_string))
        .collect();
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

    let cache = RepoCache::open(&r.repo, true)?.expect("created");
    let mut fetched = Vec::new();
    let mut i = 0;
    while i < files.len() {
        let f = files[i].clone();
        let in_repo = format!("{prefix}{f}");
        let entry = cache.entry(&commit, &in_repo)?;
        // A commit's files never change: a verified entry needs no network.
        let path = match cache.check_entry(&entry)? {
            Cached::Good => entry,
            Cached::Missing => download(&http, &cache, r, &revision, &commit, &in_repo)?,
            Cached::Bad(why) => {
                crate::ui::warn(&format!(
                    "{at}: {in_repo}: the cached copy was unusable ({why}); fetching it again"
                ));
                download(&http, &cache, r, &revision, &commit, &in_repo)?
            }
        };
        if f == MODEL_INDEX {
            add_shards(&mut files, &path, Some(&listing), &at, &prefix)?;
        }
        fetched.push(path);
        i += 1;
    }
    // As huggingface_hub does: remember which commit a branch or tag named,
    // so that offline runs (ours and Python's) find it.
    if !is_commit(&revision) {
        cache.write_ref(&revision, &commit)?;
    }
    let dir = cache
        .folder()
        .join("snapshots")
        .join(&commit)
        .join(prefix.trim_end_matches('/'));
    Ok(Snapshot {
        repo: r.repo.clone(),
        revision,
        commit,
        weights: weights.map(|w| dir.join(w)),
        dir,
        files: fetched,
    })
}

/// Download `file` of `r` at `commit` into the cache and link it into the
/// snapshot. Every name the server supplies is checked before it is used,
/// and only whole, verified bytes are kept.
fn download(
    http: &Http,
    cache: &RepoCache,
    r: &HubRef,
    revision: &str,
    commit: &str,
    file: &str,
) -> Result<PathBuf> {
    let at = format!("{}@{revision}: {file}", r.repo);
    let (owner, name) = r.repo.split_once('/').unwrap_or(("", &r.repo));
    let mut segments = vec![owner, name, "resolve", commit];
    segments.extend(file.split('/'));
    let got = http.get(http.url(&segments), &at)?;
    if !got.resp.status().is_success() {
        return Err(status_error(
            &http.status(got),
            &r.repo,
            revision,
            Some(file),
        ));
    }
    if got.resp.status().as_u16() != 200 {
        return Err(Error::Network(format!(
            "{at}: the server answered {} where 200 was expected; nothing was kept",
            got.resp.status().as_u16()
        )));
    }
    match header(&got.hub, "x-repo-commit") {
        Some(c) if c.eq_ignore_ascii_case(commit) => {}
        Some(c) => {
            return Err(Error::Network(format!(
                "{at}: the server says it sent commit {:?}, not the {commit} asked for; refused",
                http.clean(c)
            )))
        }
        None => {
            return Err(Error::Network(format!(
                "{at}: the server did not say which commit it sent (no X-Repo-Commit); \
                 refused: is HF_ENDPOINT a Hub?"
            )))
        }
    }
    let etag = header(&got.hub, "x-linked-etag").or_else(|| header(&got.hub, "etag"));
    let Some(blob) = etag.and_then(cache::blob_name) else {
        return Err(Error::Network(format!(
            "{at}: the server named the file {:?}, which is not a 40- or 64-digit hex hash; \
             refused before anything was written",
            http.clean(etag.unwrap_or(""))
        )));
    };
    let size = match header(&got.hub, "x-linked-size") {
        Some(s) => s.parse::<u64>().ok(),
        None => got.resp.content_length(),
    };
    let Some(size) = size else {
        return Err(Error::Network(format!(
            "{at}: the server did not say the file's size; refused"
        )));
    };
    if let Some(n) = got.resp.content_length().filter(|n| *n != size) {
        return Err(Error::Network(format!(
            "{at}: the server announced {size} bytes and sends {n}; refused"
        )));
    }
    let bar = Bars::new(format!("{}/{file}", r.repo));
    bar.bar.set_length(size);
    let mut body = got.resp;
    cache.store_blob(&blob, size, &mut body, &|n| bar.bar.set_position(n), &at)?;
    bar.bar.finish_and_clear();
    cache.link(commit, file, &blob)
}

pub(super) fn push(req: &PushRequest, token: String) -> Result<Pushed> {
    let client = client(Some(token.clone()))?;
    let at = |e: HFError| hub_error(e, &token, req.repo, req.revision, None);
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
    // Only a link on the endpoint's own origin is shown: a server cannot
    // send the user elsewhere through our output.
    let ours = format!("{}/{}/commit/{commit}", endpoint(), req.repo);
    let url = info
        .commit_url
        .clone()
        .filter(|u| same_origin(u, &ours) && !u.chars().any(char::is_control))
        .unwrap_or(ours);
    Ok(Pushed {
        repo: req.repo.to_string(),
        revision: req.revision.to_string(),
        commit,
        url,
    })
}
