//! A Hugging Face Hub on 127.0.0.1 for the tests: the endpoints the Python
//! client (`huggingface_hub`) and ours use, with their headers and error
//! codes, storage in memory. Checked against the real Python client in
//! tests/integration/hub.rs, so it is faithful to the protocol, not only to our client.
//!
//! Endpoints: `POST /api/repos/create`; `POST /api/validate-yaml`; `GET /api/models/{repo}[/revision/{rev}]`
//! (sha, siblings); `GET /api/models/{repo}/tree/{rev}`; `HEAD`/`GET
//! /{repo}/resolve/{rev}/{path}` (X-Repo-Commit, ETag, X-Linked-Etag and
//! X-Linked-Size for LFS files, Range); `POST /api/models/{repo}/preupload/{rev}`;
//! `POST /{repo}.git/info/lfs/objects/batch` (basic transfer) and the `PUT`
//! it points to (its sha256 checked); `POST /api/models/{repo}/commit/{rev}` (ndjson header,
//! file, lfsFile, deletedFile; `?create_pr=1`); `POST
//! /api/models/{repo}/branch/{name}`. Errors carry `X-Error-Code` and
//! `X-Error-Message` as the Hub's do. As strict as the Hub where it has a
//! rule: binary content in a commit's inline `file` entry is refused (it
//! must go through LFS), and preupload sends binary samples to LFS.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Clone)]
struct Blob {
    data: Arc<Vec<u8>>,
    lfs: bool,
}

impl Blob {
    /// git's blob id: sha1("blob <len>\0" + data). The Hub's ETag for
    /// regular files.
    fn git_oid(&self) -> String {
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {}\0", self.data.len()).as_bytes());
        h.update(self.data.as_slice());
        hex(&h.finalize())
    }
    fn sha256(&self) -> String {
        hex(&Sha256::digest(self.data.as_slice()))
    }
    /// What the Hub puts in ETag / X-Linked-Etag.
    fn etag(&self) -> String {
        if self.lfs {
            self.sha256()
        } else {
            self.git_oid()
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Default)]
struct Repo {
    private: bool,
    /// Branches, tags and refs/pr/N, each naming a commit.
    refs: BTreeMap<String, String>,
    commits: HashMap<String, BTreeMap<String, Blob>>,
    prs: usize,
}

/// Ways to misbehave, for the failure tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// GET of a file whose path ends with this: announce the full
    /// Content-Length, send half the bytes, close.
    CutShort(String),
    /// GET of a file whose path ends with this: all the bytes, one of them
    /// wrong (what a broken proxy or disk would do).
    Corrupt(String),
    // A hostile server (issue: a mirror must not touch anything outside
    // the cache). `file` is a path suffix, as above.
    /// ETag and X-Linked-Etag set to `value` (a path, say).
    Etag {
        file: String,
        value: String,
    },
    /// X-Repo-Commit set to `value`; with `status` 404 the answer is the
    /// Hub's EntryNotFound carrying that header.
    Commit {
        file: String,
        value: String,
        status: u16,
    },
    /// An error page with this status and body instead of the file.
    Status {
        file: String,
        status: u16,
        body: String,
    },
    /// X-Linked-Size says half the real size; the body is sent whole with
    /// no Content-Length (ends when the connection closes).
    LyingSize(String),
    /// 302 to `location`, with the Hub's headers for the file (as the Hub
    /// redirects LFS files to its CDN).
    Redirect {
        file: String,
        location: String,
    },
    /// Every request is read and never answered (for 30 s).
    Silent,
    /// The revision info answer padded to about this many bytes.
    HugeInfo(usize),
    /// The commit answer names this commitUrl.
    CommitUrl(String),
    /// The commit POST fails with a 500.
    CommitFails,
}

#[derive(Default)]
struct State {
    repos: BTreeMap<String, Repo>,
    lfs: HashMap<String, Arc<Vec<u8>>>,
    log: Vec<String>,
    fault: Option<Fault>,
    counter: u64,
}

pub struct HubServer {
    pub url: String,
    pub token: String,
    state: Arc<Mutex<State>>,
}

struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes, then close (a cut-short transfer).
    truncate: Option<usize>,
    /// No Content-Length: the body ends when the connection closes.
    no_length: bool,
}

impl Response {
    fn json(status: u16, v: Value) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: serde_json::to_vec(&v).unwrap(),
            truncate: None,
            no_length: false,
        }
    }
    fn error(status: u16, code: Option<&str>, msg: &str) -> Response {
        let mut r = Response::json(status, json!({ "error": msg }));
        if let Some(c) = code {
            r.headers.push(("X-Error-Code".into(), c.into()));
        }
        r.headers.push(("X-Error-Message".into(), msg.into()));
        r
    }
    fn header(mut self, k: &str, v: impl Into<String>) -> Response {
        self.headers.push((k.into(), v.into()));
        self
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_text(s: u16) -> &'static str {
    match s {
        200 => "OK",
        206 => "Partial Content",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        422 => "Unprocessable Entity",
        _ => "Error",
    }
}

impl HubServer {
    /// Start a server accepting `token` for writes and private reads.
    pub fn start(token: &str) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let server = HubServer {
            url: url.clone(),
            token: token.to_string(),
            state: state.clone(),
        };
        let token = token.to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let state = state.clone();
                let url = url.clone();
                let token = token.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &state, &url, &token);
                });
            }
        });
        server
    }

    pub fn set_fault(&self, f: Fault) {
        self.state.lock().unwrap().fault = Some(f);
    }

    /// Every request so far, as "METHOD /path".
    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    /// The files of `repo` at `rev` (a ref or a commit), or None.
    pub fn files(&self, repo: &str, rev: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        let st = self.state.lock().unwrap();
        let r = st.repos.get(repo)?;
        let sha = r.refs.get(rev).cloned().unwrap_or_else(|| rev.to_string());
        let tree = r.commits.get(&sha)?;
        Some(
            tree.iter()
                .map(|(k, b)| (k.clone(), b.data.as_ref().clone()))
                .collect(),
        )
    }

    pub fn head(&self, repo: &str, rev: &str) -> Option<String> {
        let st = self.state.lock().unwrap();
        st.repos.get(repo)?.refs.get(rev).cloned()
    }

    pub fn is_private(&self, repo: &str) -> Option<bool> {
        self.state
            .lock()
            .unwrap()
            .repos
            .get(repo)
            .map(|r| r.private)
    }
}

fn read_request(stream: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    stream.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        stream.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            stream.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            if n == 0 {
                let mut end = String::new();
                stream.read_line(&mut end).ok()?;
                break;
            }
            let mut chunk = vec![0u8; n + 2];
            stream.read_exact(&mut chunk).ok()?;
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = headers
        .get("content-length")
        .and_then(|n| n.parse::<usize>().ok())
    {
        body = vec![0u8; n];
        stream.read_exact(&mut body).ok()?;
    }
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        headers,
        body,
    })
}

fn serve(stream: TcpStream, state: &Mutex<State>, base: &str, token: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let Some(req) = read_request(&mut reader) else {
        return Ok(());
    };
    let resp = {
        let mut st = state.lock().unwrap();
        st.log.push(format!("{} {}", req.method, req.path));
        if st.fault == Some(Fault::Silent) {
            drop(st);
            std::thread::sleep(std::time::Duration::from_secs(30));
            return Ok(());
        }
        route(&req, &mut st, base, token)
    };
    let mut out = stream;
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, status_text(resp.status));
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !resp.no_length
        && !resp
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        head.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    out.write_all(head.as_bytes())?;
    if req.method != "HEAD" {
        let n = resp
            .truncate
            .unwrap_or(resp.body.len())
            .min(resp.body.len());
        out.write_all(&resp.body[..n])?;
    }
    out.flush()?;
    let _ = out.shutdown(std::net::Shutdown::Both);
    Ok(())
}

fn authorized(req: &Request, token: &str) -> bool {
    req.headers
        .get("authorization")
        .is_some_and(|a| a == &format!("Bearer {token}"))
}

fn unauthorized() -> Response {
    Response::error(401, None, "Invalid credentials in Authorization header")
}

fn repo_not_found() -> Response {
    Response::error(404, Some("RepoNotFound"), "Repository not found")
}

fn new_sha(st: &mut State, seed: &str) -> String {
    st.counter += 1;
    let h = Sha256::digest(format!("{seed}/{}", st.counter).as_bytes());
    hex(&h)[..40].to_string()
}

/// Resolve a revision of `repo` to a commit: a ref name or a full sha.
fn resolve_rev(repo: &Repo, rev: &str) -> Option<String> {
    if let Some(sha) = repo.refs.get(rev) {
        return Some(sha.clone());
    }
    repo.commits.contains_key(rev).then(|| rev.to_string())
}

/// The commit a revision names, or the Hub's 404 for an unknown revision.
fn resolve_rev_or_404(repo: &Repo, rev: &str) -> Result<String, Response> {
    resolve_rev(repo, rev).ok_or_else(|| {
        Response::error(
            404,
            Some("RevisionNotFound"),
            &format!("Invalid rev id: {rev}"),
        )
    })
}

/// Split `/api/models/o/n/...` (or `/o/n/...`) into the repo id and the rest.
fn split_repo(rest: &str) -> Option<(String, String)> {
    let mut it = rest.splitn(3, '/');
    let o = it.next()?;
    let n = it.next()?;
    if o.is_empty() || n.is_empty() {
        return None;
    }
    Some((format!("{o}/{n}"), it.next().unwrap_or("").to_string()))
}

fn route(req: &Request, st: &mut State, base: &str, token: &str) -> Response {
    let p = req.path.as_str();
    if p == "/api/repos/create" && req.method == "POST" {
        return create_repo(req, st, base, token);
    }
    if p == "/api/validate-yaml" && req.method == "POST" {
        // The client checks a README's front matter before uploading it.
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let ok = body["content"].as_str().is_some();
        return Response::json(
            if ok { 200 } else { 400 },
            json!({"errors": [], "warnings": []}),
        );
    }
    if p == "/_lfs_verify" && req.method == "POST" {
        // Git LFS's verify action: the object is stored, with that size.
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let oid = body["oid"].as_str().unwrap_or("");
        let size = body["size"].as_u64();
        return match st.lfs.get(oid) {
            Some(d) if Some(d.len() as u64) == size => Response::json(200, json!({})),
            _ => Response::error(422, None, "object not stored with that size"),
        };
    }
    if let Some(oid) = p.strip_prefix("/_lfs/") {
        if req.method == "PUT" {
            let got = hex(&Sha256::digest(&req.body));
            if got != oid {
                return Response::error(
                    400,
                    None,
                    "sha256 of the body does not match the object id",
                );
            }
            st.lfs.insert(oid.to_string(), Arc::new(req.body.clone()));
            return Response::json(200, json!({}));
        }
    }
    if let Some(rest) = p.strip_prefix("/api/models/") {
        let Some((id, tail)) = split_repo(rest) else {
            return repo_not_found();
        };
        let Some(repo) = st.repos.get(&id) else {
            return repo_not_found();
        };
        if repo.private && !authorized(req, token) {
            // As the Hub: a private repository is not revealed.
            return Response::error(401, Some("RepoNotFound"), "Repository not found");
        }
        let (verb, arg) = tail.split_once('/').unwrap_or((tail.as_str(), ""));
        return match (req.method.as_str(), verb) {
            ("GET", "") => info(st, &id, "main", base),
            ("GET", "revision") => info(st, &id, &percent_decode(arg), base),
            ("GET", "tree") => tree(st, &id, arg),
            ("POST", "preupload") => {
                if !authorized(req, token) {
                    return unauthorized();
                }
                preupload(req, st, &id, &percent_decode(arg))
            }
            ("POST", "commit") => {
                if !authorized(req, token) {
                    return unauthorized();
                }
                commit(req, st, &id, &percent_decode(arg), base)
            }
            ("POST", "branch") => {
                if !authorized(req, token) {
                    return unauthorized();
                }
                create_branch(st, &id, &percent_decode(arg))
            }
            _ => Response::error(404, None, "no such endpoint"),
        };
    }
    if let Some(rest) = p.strip_prefix('/') {
        if let Some((id, tail)) = split_repo(rest) {
            if let Some(id) = id.strip_suffix(".git") {
                if tail == "info/lfs/objects/batch" && req.method == "POST" {
                    if !authorized(req, token) {
                        return unauthorized();
                    }
                    return lfs_batch(req, st, id, base);
                }
            }
            if let Some(rr) = tail.strip_prefix("resolve/") {
                if let Some(repo) = st.repos.get(&id) {
                    if repo.private && !authorized(req, token) {
                        return Response::error(401, Some("RepoNotFound"), "Repository not found");
                    }
                }
                let (rev, file) = rr.split_once('/').unwrap_or((rr, ""));
                return resolve(req, st, &id, &percent_decode(rev), &percent_decode(file));
            }
        }
    }
    Response::error(404, None, "no such endpoint")
}

fn create_repo(req: &Request, st: &mut State, base: &str, token: &str) -> Response {
    if !authorized(req, token) {
        return unauthorized();
    }
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let name = body["name"].as_str().unwrap_or("");
    let org = body["organization"].as_str().unwrap_or("");
    if name.is_empty() || org.is_empty() {
        return Response::error(400, None, "name and organization are required");
    }
    if body
        .get("type")
        .and_then(|t| t.as_str())
        .is_some_and(|t| t != "model")
    {
        return Response::error(400, None, "only model repositories here");
    }
    let id = format!("{org}/{name}");
    let url = format!("{base}/{id}");
    if st.repos.contains_key(&id) {
        // As the Hub: the 409 still names the repository's URL.
        let mut r = Response::error(409, None, "You already created this model repo");
        r.body = serde_json::to_vec(
            &json!({"error": "You already created this model repo", "url": url}),
        )
        .unwrap();
        return r;
    }
    let private = body["private"].as_bool().unwrap_or(false)
        || body["visibility"].as_str() == Some("private");
    // The Hub starts every repository with a commit holding .gitattributes.
    let sha = new_sha(st, &id);
    let mut tree = BTreeMap::new();
    tree.insert(
        ".gitattributes".to_string(),
        Blob {
            data: Arc::new(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n".to_vec()),
            lfs: false,
        },
    );
    let mut repo = Repo {
        private,
        ..Repo::default()
    };
    repo.commits.insert(sha.clone(), tree);
    repo.refs.insert("main".into(), sha);
    st.repos.insert(id.clone(), repo);
    Response::json(200, json!({ "url": url, "name": id, "id": id }))
}

fn info(st: &State, id: &str, rev: &str, base: &str) -> Response {
    let repo = &st.repos[id];
    let sha = match resolve_rev_or_404(repo, rev) {
        Ok(sha) => sha,
        Err(not_found) => return not_found,
    };
    let tree = &repo.commits[&sha];
    let mut siblings: Vec<Value> = tree.keys().map(|k| json!({ "rfilename": k })).collect();
    if let Some(Fault::HugeInfo(n)) = &st.fault {
        for i in 0..n / 40 {
            siblings.push(json!({ "rfilename": format!("padding/{i:020}.txt") }));
        }
    }
    Response::json(
        200,
        json!({
            "_id": id, "id": id, "modelId": id, "author": id.split('/').next(),
            "sha": sha, "private": repo.private, "disabled": false, "gated": false,
            "lastModified": "2026-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
            "siblings": siblings, "url": format!("{base}/{id}"),
        }),
    )
}

fn tree(st: &State, id: &str, arg: &str) -> Response {
    let repo = &st.repos[id];
    let (rev, prefix) = arg.split_once('/').unwrap_or((arg, ""));
    let rev = percent_decode(rev);
    let sha = match resolve_rev_or_404(repo, &rev) {
        Ok(sha) => sha,
        Err(not_found) => return not_found,
    };
    let entries: Vec<Value> = repo.commits[&sha]
        .iter()
        .filter(|(k, _)| prefix.is_empty() || k.starts_with(&format!("{prefix}/")))
        .map(|(k, b)| {
            let mut e =
                json!({"type": "file", "oid": b.git_oid(), "size": b.data.len(), "path": k});
            if b.lfs {
                e["lfs"] = json!({"oid": b.sha256(), "size": b.data.len(), "pointerSize": 134});
            }
            e
        })
        .collect();
    Response::json(200, Value::Array(entries))
}

fn resolve(req: &Request, st: &State, id: &str, rev: &str, file: &str) -> Response {
    let Some(repo) = st.repos.get(id) else {
        return repo_not_found();
    };
    let sha = match resolve_rev_or_404(repo, rev) {
        Ok(sha) => sha,
        Err(not_found) => return not_found,
    };
    let Some(blob) = repo.commits[&sha].get(file) else {
        return Response::error(
            404,
            Some("EntryNotFound"),
            &format!("{file} does not exist on \"{rev}\""),
        )
        .header("X-Repo-Commit", sha);
    };
    let etag = blob.etag();
    let total = blob.data.len();
    let mut start = 0usize;
    let mut status = 200;
    if let Some(range) = req
        .headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
    {
        if let Some((a, _)) = range.split_once('-') {
            if let Ok(a) = a.parse::<usize>() {
                if a < total {
                    start = a;
                    status = 206;
                }
            }
        }
    }
    let body = blob.data[start..].to_vec();
    let mut r = Response {
        status,
        headers: vec![
            ("Content-Type".into(), "application/octet-stream".into()),
            ("X-Repo-Commit".into(), sha.clone()),
            ("ETag".into(), format!("\"{etag}\"")),
            ("Accept-Ranges".into(), "bytes".into()),
        ],
        body,
        truncate: None,
        no_length: false,
    };
    if blob.lfs {
        r.headers
            .push(("X-Linked-Etag".into(), format!("\"{etag}\"")));
        r.headers.push(("X-Linked-Size".into(), total.to_string()));
    }
    if status == 206 {
        r.headers.push((
            "Content-Range".into(),
            format!("bytes {start}-{}/{total}", total.saturating_sub(1)),
        ));
    }
    match &st.fault {
        Some(Fault::Etag { file: f, value }) if file.ends_with(f.as_str()) => {
            r.headers
                .retain(|(k, _)| k != "ETag" && k != "X-Linked-Etag");
            r.headers.push(("ETag".into(), value.clone()));
            if blob.lfs {
                r.headers.push(("X-Linked-Etag".into(), value.clone()));
            }
        }
        Some(Fault::Commit {
            file: f,
            value,
            status,
        }) if file.ends_with(f.as_str()) => {
            if *status == 404 {
                return Response::error(
                    404,
                    Some("EntryNotFound"),
                    &format!("{file} does not exist"),
                )
                .header("X-Repo-Commit", value.clone());
            }
            r.headers.retain(|(k, _)| k != "X-Repo-Commit");
            r.headers.push(("X-Repo-Commit".into(), value.clone()));
        }
        Some(Fault::Status {
            file: f,
            status,
            body,
        }) if file.ends_with(f.as_str()) => {
            let mut e = Response::error(*status, None, "error");
            e.headers.retain(|(k, _)| k != "X-Error-Message");
            e.headers.retain(|(k, _)| k != "Content-Type");
            e.headers.push(("Content-Type".into(), "text/html".into()));
            e.headers.push(("X-Repo-Commit".into(), sha.clone()));
            e.body = body.as_bytes().to_vec();
            return e;
        }
        Some(Fault::LyingSize(f)) if file.ends_with(f.as_str()) => {
            r.headers.retain(|(k, _)| k != "X-Linked-Size");
            r.headers
                .push(("X-Linked-Size".into(), (total / 2).to_string()));
            r.no_length = true;
        }
        Some(Fault::Redirect { file: f, location }) if file.ends_with(f.as_str()) => {
            r.status = 302;
            r.body.clear();
            r.headers.retain(|(k, _)| k != "Content-Type");
            r.headers.push(("Location".into(), location.clone()));
            if !blob.lfs {
                r.headers.push(("X-Linked-Size".into(), total.to_string()));
            }
        }
        _ => {}
    }
    if req.method == "GET" {
        match &st.fault {
            Some(Fault::CutShort(suffix)) if file.ends_with(suffix.as_str()) => {
                r.truncate = Some(r.body.len() / 2);
            }
            Some(Fault::Corrupt(suffix)) if file.ends_with(suffix.as_str()) => {
                if let Some(b) = r.body.last_mut() {
                    *b ^= 0xff;
                }
            }
            _ => {}
        }
    }
    r
}

fn is_lfs_path(path: &str, size: u64) -> bool {
    path.ends_with(".safetensors") || path.ends_with(".bin") || size >= 10 * 1024 * 1024
}

/// Binary as git and the Hub see it: a NUL byte in the first 8000 bytes,
/// or bytes that are not UTF-8.
fn is_binary(data: &[u8]) -> bool {
    data[..data.len().min(8000)].contains(&0) || std::str::from_utf8(data).is_err()
}

fn preupload(req: &Request, st: &State, id: &str, rev: &str) -> Response {
    let repo = &st.repos[id];
    let sha = match resolve_rev_or_404(repo, rev) {
        Ok(sha) => sha,
        Err(not_found) => return not_found,
    };
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let Some(files) = body["files"].as_array() else {
        return Response::error(400, None, "files is required");
    };
    let tree = &repo.commits[&sha];
    let out: Vec<Value> = files
        .iter()
        .map(|f| {
            let path = f["path"].as_str().unwrap_or("");
            let size = f["size"].as_u64().unwrap_or(0);
            // As the Hub: the path rules, the size, and the sample's content.
            let sample = base64::engine::general_purpose::STANDARD
                .decode(f["sample"].as_str().unwrap_or(""))
                .unwrap_or_default();
            let lfs = is_lfs_path(path, size) || sample.contains(&0);
            json!({
                "path": path,
                "uploadMode": if lfs { "lfs" } else { "regular" },
                "shouldIgnore": false,
                // As the Hub: the sha256 for an LFS file, the git blob id otherwise.
                "oid": tree.get(path).map(|b| if b.lfs { b.sha256() } else { b.git_oid() }),
            })
        })
        .collect();
    Response::json(200, json!({ "files": out, "commitOid": sha }))
}

fn lfs_batch(req: &Request, st: &State, id: &str, base: &str) -> Response {
    if !st.repos.contains_key(id) {
        return repo_not_found();
    }
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let transfers: Vec<&str> = body["transfers"]
        .as_array()
        .map(|t| t.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    if !transfers.is_empty() && !transfers.contains(&"basic") {
        return Response::error(422, None, "only the basic transfer is offered");
    }
    let objects: Vec<Value> = body["objects"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|o| {
            let oid = o["oid"].as_str().unwrap_or("").to_string();
            let size = o["size"].as_u64().unwrap_or(0);
            if st.lfs.contains_key(&oid) {
                json!({"oid": oid, "size": size})
            } else {
                json!({"oid": oid, "size": size, "authenticated": true,
                       "actions": {"upload": {"href": format!("{base}/_lfs/{oid}"), "expires_in": 3600},
                                   "verify": {"href": format!("{base}/_lfs_verify"), "expires_in": 3600}}})
            }
        })
        .collect();
    let mut r = Response::json(
        200,
        json!({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}),
    );
    r.headers = vec![("Content-Type".into(), "application/vnd.git-lfs+json".into())];
    r
}

fn commit(req: &Request, st: &mut State, id: &str, rev: &str, base: &str) -> Response {
    if st.fault == Some(Fault::CommitFails) {
        return Response::error(500, None, "Internal Error");
    }
    let create_pr = req
        .query
        .get("create_pr")
        .is_some_and(|v| v == "1" || v == "true");
    let parent = {
        let repo = &st.repos[id];
        match repo.refs.get(rev) {
            Some(s) => s.clone(),
            None => {
                return Response::error(
                    404,
                    Some("RevisionNotFound"),
                    &format!("Invalid rev id: {rev}"),
                )
            }
        }
    };
    let mut tree = st.repos[id].commits[&parent].clone();
    let mut summary = String::new();
    for line in req.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            return Response::error(400, None, "a line is not JSON");
        };
        let val = &v["value"];
        match v["key"].as_str() {
            Some("header") => {
                summary = val["summary"].as_str().unwrap_or("").to_string();
                if let Some(pc) = val["parentCommit"].as_str() {
                    if pc != parent {
                        return Response::error(
                            412,
                            None,
                            "parentCommit is not the head of the branch",
                        );
                    }
                }
            }
            Some("file") => {
                let path = val["path"].as_str().unwrap_or("").to_string();
                let data = if val["encoding"].as_str() == Some("base64") {
                    match base64::engine::general_purpose::STANDARD
                        .decode(val["content"].as_str().unwrap_or(""))
                    {
                        Ok(d) => d,
                        Err(_) => return Response::error(400, None, "bad base64"),
                    }
                } else {
                    val["content"].as_str().unwrap_or("").as_bytes().to_vec()
                };
                // As the Hub: binary content is refused inline, whatever
                // the client meant; it must go through LFS.
                if is_binary(&data) {
                    return Response::error(
                        400,
                        None,
                        "Your push was rejected because it contains binary files. Please use \
                         https://huggingface.co/docs/hub/xet to store binary files.",
                    );
                }
                let lfs = is_lfs_path(&path, data.len() as u64);
                tree.insert(
                    path,
                    Blob {
                        data: Arc::new(data),
                        lfs,
                    },
                );
            }
            Some("lfsFile") => {
                let path = val["path"].as_str().unwrap_or("").to_string();
                let oid = val["oid"].as_str().unwrap_or("");
                let Some(data) = st.lfs.get(oid) else {
                    return Response::error(
                        422,
                        None,
                        &format!("LFS object {oid} was not uploaded"),
                    );
                };
                tree.insert(
                    path,
                    Blob {
                        data: data.clone(),
                        lfs: true,
                    },
                );
            }
            Some("deletedFile") => {
                tree.remove(val["path"].as_str().unwrap_or(""));
            }
            _ => return Response::error(400, None, "unknown line key"),
        }
    }
    if summary.is_empty() {
        return Response::error(400, None, "the commit needs a summary");
    }
    let sha = new_sha(st, &format!("{id}/{parent}/{summary}"));
    st.repos
        .get_mut(id)
        .unwrap()
        .commits
        .insert(sha.clone(), tree);
    let commit_url = match &st.fault {
        Some(Fault::CommitUrl(u)) => u.clone(),
        _ => format!("{base}/{id}/commit/{sha}"),
    };
    let repo = st.repos.get_mut(id).unwrap();
    let mut out = json!({
        "success": true, "commitOid": sha, "commitUrl": commit_url,
        "hookOutput": "",
    });
    if create_pr {
        repo.prs += 1;
        let n = repo.prs;
        repo.refs.insert(format!("refs/pr/{n}"), sha.clone());
        out["pullRequestUrl"] = json!(format!("{base}/{id}/discussions/{n}"));
    } else {
        repo.refs.insert(rev.to_string(), sha.clone());
    }
    Response::json(200, out)
}

fn create_branch(st: &mut State, id: &str, name: &str) -> Response {
    let repo = st.repos.get_mut(id).unwrap();
    if repo.refs.contains_key(name) {
        return Response::error(409, None, "Reference already exists");
    }
    let head = repo.refs["main"].clone();
    repo.refs.insert(name.to_string(), head);
    Response::json(200, json!({}))
}

/// A plain server on another port (another origin): answers every GET with
/// `body` and records each request's headers, to see what a client sends
/// to a host the Hub redirects it to.
pub struct Plain {
    pub url: String,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Plain {
    pub fn start(body: Vec<u8>) -> Plain {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let Some(req) = read_request(&mut reader) else {
                    continue;
                };
                let mut headers: Vec<String> = req
                    .headers
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect();
                headers.sort();
                log.lock().unwrap().push(format!(
                    "{} {}\n{}",
                    req.method,
                    req.path,
                    headers.join("\n")
                ));
                let mut out = stream;
                let _ = out.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                );
                let _ = out.write_all(&body);
                let _ = out.shutdown(std::net::Shutdown::Both);
            }
        });
        Plain { url, seen }
    }

    /// Every request so far: its line and its headers.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}
