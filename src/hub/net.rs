//! The network half of the Hub support: downloads (http.rs, cache.rs) and
//! pushes (repository and branch creation through `hf-hub`, the commit
//! and its LFS uploads ours). Built only with the `hub` feature (on by default);
//! without it, lora-merge still reads the Hub cache (see `fetch`).

use std::io::IsTerminal;

use hf_hub::{HFClientSync, HFError, HFRepositorySync, RepoTypeModel};
use indicatif::{ProgressBar, ProgressStyle};

use super::cache::{self, Cached, RepoCache};
use super::http::{self, header, Http, Status};
use super::*;

use std::io::Read;

use base64::Engine;

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
    let http = Http::new(Some(token.clone()))?;
    let info = commit_files(&http, req)?;
    let commit = info
        .commit_oid
        .clone()
        .filter(|c| is_commit(c))
        .ok_or_else(|| {
            Error::Network(format!(
                "{}@{}: the Hub accepted the commit but did not say its id",
                req.repo, req.revision
            ))
        })?
        .to_ascii_lowercase();
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

// ---------------------------------------------------------------------------
// The commit: preupload, Git LFS basic transfer, one ndjson commit
// ---------------------------------------------------------------------------

/// How long an upload or a commit may take to be answered once sent.
const UPLOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(300);
/// A single PUT of Git LFS's basic transfer (to S3 on the real Hub) takes
/// at most this much.
const MAX_BASIC_PUT: u64 = 5 << 30;

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CommitAnswer {
    commit_oid: Option<String>,
    commit_url: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PreuploadFile {
    path: String,
    upload_mode: String,
}

#[derive(serde::Deserialize)]
struct Preupload {
    files: Vec<PreuploadFile>,
}

#[derive(serde::Deserialize)]
struct Batch {
    transfer: Option<String>,
    objects: Vec<BatchObject>,
}

#[derive(serde::Deserialize)]
struct BatchObject {
    oid: String,
    actions: Option<BatchActions>,
    error: Option<BatchError>,
}

#[derive(serde::Deserialize)]
struct BatchActions {
    upload: Option<BatchAction>,
    verify: Option<BatchAction>,
}

#[derive(serde::Deserialize)]
struct BatchAction {
    href: String,
    #[serde(default)]
    header: std::collections::BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct BatchError {
    code: Option<i64>,
    message: Option<String>,
}

struct Upload {
    path: String,
    file: PathBuf,
    size: u64,
    lfs: Option<String>,
}

/// Upload `req.files` in one commit, as huggingface_hub does without Xet:
/// ask the Hub which files go through LFS (`preupload`), send those by Git
/// LFS's basic transfer (batch, PUT to the returned href, verify when
/// asked), then one ndjson commit naming them as `lfsFile` entries and
/// holding the others inline. The Hub refuses binary content inline, so
/// weights are never sent that way. Nothing is retried: a commit that timed
/// out may have landed.
fn commit_files(http: &Http, req: &PushRequest) -> Result<CommitAnswer> {
    let at = format!("{}@{}", req.repo, req.revision);
    let (owner, name) = req.repo.split_once('/').unwrap_or(("", req.repo));
    let on_status = |s: &Status| status_error(s, req.repo, req.revision, None);
    let mut uploads = Vec::new();
    let mut described = Vec::new();
    for f in req.files {
        let file = req.dir.join(f);
        let bytes_head = {
            let mut h = Vec::new();
            std::fs::File::open(&file)
                .and_then(|fh| fh.take(512).read_to_end(&mut h))
                .map_err(|e| Error::io(&file, e))?;
            h
        };
        let size = std::fs::metadata(&file)
            .map_err(|e| Error::io(&file, e))?
            .len();
        described.push(serde_json::json!({
            "path": f,
            "size": size,
            "sample": base64::engine::general_purpose::STANDARD.encode(&bytes_head),
        }));
        uploads.push(Upload {
            path: f.clone(),
            file,
            size,
            lfs: None,
        });
    }
    let pre: Preupload = http.parse(
        http.send_once(
            http.request(
                reqwest::Method::POST,
                http.url(&["api", "models", owner, name, "preupload", req.revision]),
                true,
            )
            .json(&serde_json::json!({ "files": described })),
            UPLOAD_WAIT,
            &at,
        )?,
        &at,
        on_status,
    )?;
    for u in &mut uploads {
        let mode = pre
            .files
            .iter()
            .find(|p| p.path == u.path)
            .map(|p| p.upload_mode.as_str());
        if mode == Some("lfs") {
            u.lfs = Some(crate::hash::sha256_file(&u.file)?);
        }
    }
    let lfs: Vec<&Upload> = uploads.iter().filter(|u| u.lfs.is_some()).collect();
    if !lfs.is_empty() {
        upload_lfs(http, req, &lfs, &at)?;
    }

    let mut body = Vec::new();
    let mut line = |v: serde_json::Value| {
        body.extend_from_slice(v.to_string().as_bytes());
        body.push(b'\n');
    };
    line(serde_json::json!({"key": "header", "value": {
        "summary": req.message, "description": ""}}));
    for u in &uploads {
        match &u.lfs {
            Some(oid) => line(serde_json::json!({"key": "lfsFile", "value": {
                "path": u.path, "algo": "sha256", "oid": oid, "size": u.size}})),
            None => {
                let bytes = std::fs::read(&u.file).map_err(|e| Error::io(&u.file, e))?;
                line(serde_json::json!({"key": "file", "value": {
                    "path": u.path, "encoding": "base64",
                    "content": base64::engine::general_purpose::STANDARD.encode(&bytes)}}));
            }
        }
    }
    let mut url = http.url(&["api", "models", owner, name, "commit", req.revision]);
    if req.create_pr {
        url.query_pairs_mut().append_pair("create_pr", "1");
    }
    let bar = Bars::new(format!("committing to {}", req.repo));
    bar.bar.set_message(format!("committing to {at}"));
    let answer = http.parse(
        http.send_once(
            http.request(reqwest::Method::POST, url, true)
                .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
                .body(body),
            UPLOAD_WAIT,
            &at,
        )?,
        &at,
        on_status,
    );
    bar.bar.finish_and_clear();
    answer
}

/// Git LFS basic transfer of `files` (each with its sha256).
fn upload_lfs(http: &Http, req: &PushRequest, files: &[&Upload], at: &str) -> Result<()> {
    let (owner, name) = req.repo.split_once('/').unwrap_or(("", req.repo));
    let git = format!("{name}.git");
    let objects: Vec<serde_json::Value> = files
        .iter()
        .map(|u| serde_json::json!({"oid": u.lfs, "size": u.size}))
        .collect();
    const LFS_JSON: &str = "application/vnd.git-lfs+json";
    let batch: Batch = http.parse(
        http.send_once(
            http.request(
                reqwest::Method::POST,
                http.url(&[owner, &git, "info", "lfs", "objects", "batch"]),
                true,
            )
            .header(reqwest::header::ACCEPT, LFS_JSON)
            .header(reqwest::header::CONTENT_TYPE, LFS_JSON)
            .body(
                serde_json::json!({
                    "operation": "upload",
                    "transfers": ["basic"],
                    "objects": objects,
                    "hash_algo": "sha256",
                    "ref": {"name": format!("refs/heads/{}", req.revision)},
                })
                .to_string(),
            ),
            UPLOAD_WAIT,
            at,
        )?,
        at,
        |s| status_error(s, req.repo, req.revision, None),
    )?;
    if let Some(t) = batch.transfer.as_deref().filter(|t| *t != "basic") {
        return Err(Error::Network(format!(
            "{at}: the Hub chose the LFS transfer {:?}, but only \"basic\" was offered",
            http.clean(t)
        )));
    }
    for u in files {
        let oid = u.lfs.as_deref().unwrap_or("");
        let what = format!("{at}: {}", u.path);
        let Some(obj) = batch.objects.iter().find(|o| o.oid == oid) else {
            return Err(Error::Network(format!(
                "{what}: the Hub's LFS answer does not mention it"
            )));
        };
        if let Some(e) = &obj.error {
            return Err(Error::Network(format!(
                "{what}: the Hub refused the LFS upload ({}: {})",
                e.code.unwrap_or(0),
                http.clean(e.message.as_deref().unwrap_or(""))
            )));
        }
        let Some(actions) = &obj.actions else {
            continue; // the Hub has these bytes already
        };
        let href = |a: &BatchAction| {
            reqwest::Url::parse(&a.href)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| {
                    Error::Network(format!(
                        "{what}: the Hub gave an unusable upload address {:?}",
                        http.clean(&a.href)
                    ))
                })
        };
        if let Some(up) = &actions.upload {
            if u.size > MAX_BASIC_PUT {
                return Err(Error::Usage(format!(
                    "{what}: {} is over the 5 GiB a single LFS upload takes; split the \
                     weights into shards",
                    crate::ui::human_bytes(u.size)
                )));
            }
            let file = std::fs::File::open(&u.file).map_err(|e| Error::io(&u.file, e))?;
            // The href carries its own authorisation (a signed URL) or the
            // headers the Hub gave; our token is not sent along.
            let mut rb = http
                .request(reqwest::Method::PUT, href(up)?, false)
                .body(reqwest::blocking::Body::sized(file, u.size));
            for (k, v) in &up.header {
                rb = rb.header(k.as_str(), v.as_str());
            }
            let bar = Bars::new(format!("uploading {}", u.path));
            bar.bar.set_message(format!("uploading {}", u.path));
            let sent = http.send_once(rb, UPLOAD_WAIT, &what)?;
            bar.bar.finish_and_clear();
            if !sent.resp.status().is_success() {
                let s = http.status(sent);
                return Err(Error::Network(format!(
                    "{what}: the LFS upload was refused: {}",
                    s.describe()
                )));
            }
        }
        if let Some(verify) = &actions.verify {
            let mut rb = http
                .request(reqwest::Method::POST, href(verify)?, true)
                .header(reqwest::header::ACCEPT, LFS_JSON)
                .header(reqwest::header::CONTENT_TYPE, LFS_JSON)
                .body(serde_json::json!({"oid": oid, "size": u.size}).to_string());
            for (k, v) in &verify.header {
                rb = rb.header(k.as_str(), v.as_str());
            }
            let got = http.send_once(rb, UPLOAD_WAIT, &what)?;
            if !got.resp.status().is_success() {
                let s = http.status(got);
                return Err(Error::Network(format!(
                    "{what}: the Hub could not verify the upload: {}",
                    s.describe()
                )));
            }
        }
    }
    Ok(())
}
