//! The Hub end to end, against the test Hub in tests/integration/common/hub_server.rs
//! (127.0.0.1, HF_ENDPOINT pointed at it): push, then merge from Hub
//! references; offline runs from the cache; the cache shared with Python's
//! huggingface_hub in both directions; the server checked against the real
//! Python client; and every failure the issue lists.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::hub_server::{Fault, HubServer};
use serde_json::Value;
use sha2::Digest;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_lora-merge");
pub(crate) const TOKEN: &str = "hf_testtoken_Zq8vX2kLm9Rw4Tn7";

/// A clean Hub environment: its own HF_HOME and cache, the server as
/// HF_ENDPOINT, and nothing inherited from the person running the tests.
pub(crate) struct Env {
    _tmp: tempfile::TempDir,
    pub(crate) root: PathBuf,
    endpoint: String,
}

impl Env {
    pub(crate) fn new(server: &HubServer) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        std::fs::create_dir_all(root.join("home")).unwrap();
        Env {
            _tmp: tmp,
            root,
            endpoint: server.url.clone(),
        }
    }
    pub(crate) fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }
    pub(crate) fn cmd(&self, program: &Path, token: Option<&str>, offline: bool) -> Command {
        let mut c = common::command(program);
        c.env("HF_ENDPOINT", &self.endpoint)
            .env("HF_HOME", self.root.join("home"))
            .env("HF_HUB_CACHE", self.cache())
            .env("NO_COLOR", "1")
            .env("HF_HUB_DISABLE_TELEMETRY", "1")
            // The test Hub serves Git LFS's basic transfer, which Python's
            // client uses when told not to use Xet storage.
            .env("HF_HUB_DISABLE_XET", "1")
            .env_remove("HF_TOKEN_PATH")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN")
            .env_remove("XDG_CACHE_HOME")
            .env_remove("HUGGINGFACE_HUB_CACHE");
        if let Some(t) = token {
            c.env("HF_TOKEN", t);
        }
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        }
        c
    }
    pub(crate) fn run(&self, args: &[&str], token: Option<&str>, offline: bool) -> Output {
        self.cmd(Path::new(BIN), token, offline)
            .args(args)
            .output()
            .expect("run lora-merge")
    }
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    pub(crate) fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

pub(crate) fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub(crate) fn ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed:\n{}", text(o));
}

/// Exit status 1, and the output says every one of `needles`.
pub(crate) fn assert_refused(o: &Output, needles: &[&str]) {
    let t = text(o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    for n in needles {
        assert!(t.contains(n), "{n:?} is not in:\n{t}");
    }
}

pub(crate) fn fixture(name: &str) -> String {
    common::repo()
        .join("fixtures/adapters")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_str().unwrap().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// Merge `inputs` locally into `out` and push it to `repo`; returns the
/// commit `push --json` reported.
pub(crate) fn merge_and_push(
    env: &Env,
    server: &HubServer,
    inputs: &[&str],
    out: &str,
    repo: &str,
) -> String {
    let mut args = vec!["uniform", "--adapters"];
    args.extend_from_slice(inputs);
    let out_s = env.s(out);
    args.extend_from_slice(&["-o", &out_s]);
    ok(&env.run(&args, None, false), "uniform");
    let o = env.run(
        &["push", &out_s, "--repo", repo, "--json"],
        Some(TOKEN),
        false,
    );
    ok(&o, "push");
    let v: Value = serde_json::from_slice(&o.stdout).expect("push --json prints JSON");
    let commit = v["commit"].as_str().unwrap().to_string();
    assert_eq!(v["repo"], repo);
    assert_eq!(v["revision"], "main");
    assert_eq!(commit.len(), 40);
    assert_eq!(server.head(repo, "main").as_deref(), Some(commit.as_str()));
    assert!(v["url"].as_str().unwrap().contains(&commit), "{v}");
    commit
}

#[test]
fn push_then_merge_by_repo_id_is_byte_identical_and_works_offline() {
    let server = HubServer::start(TOKEN);
    let env = Env::new(&server);
    let mut everything = String::new();

    let ca = merge_and_push(&env, &server, &[&fixture("alpha")], "a", "alice/a");
    let cb = merge_and_push(&env, &server, &[&fixture("beta")], "b", "alice/b");

    // The weights went through Git LFS's basic transfer (batch, PUT of the
    // exact bytes, verify), never inline: the test Hub, as the real one,
    // refuses binary content in a commit's inline entries.
    let log = server.log();
    let sha_a = sha2::Sha256::digest(
        std::fs::read(env.path("a").join("adapter_model.safetensors")).unwrap(),
    )
    .iter()
    .map(|b| format!("{b:02x}"))
    .collect::<String>();
    for want in [
        "POST /alice/a.git/info/lfs/objects/batch".to_string(),
        format!("PUT /_lfs/{sha_a}"),
        "POST /_lfs_verify".to_string(),
    ] {
        assert!(log.contains(&want), "{want} is not in {log:?}");
    }

    // What the Hub holds is what was written, every file listed plus the
    // manifest and its digest, in one commit on top of the repository's first one.
    let local_a = files_of(&env.path("a"));
    let remote_a = server.files("alice/a", &ca).unwrap();
    for (name, bytes) in &local_a {
        assert_eq!(remote_a.get(name), Some(bytes), "{name} differs on the Hub");
    }
    assert!(remote_a.contains_key("merge_manifest.json"));
    assert!(remote_a.contains_key("merge_manifest.sha256"));
    assert!(remote_a.contains_key(".gitattributes"));
    assert_eq!(remote_a.len(), local_a.len() + 1);
    let card = String::from_utf8(local_a["README.md"].clone()).unwrap();
    assert!(card.starts_with("---\nlibrary_name: peft\n"), "{card}");
    assert!(
        card.contains("- lora\n") && card.contains("## Provenance"),
        "{card}"
    );

    // Merge from the Hub: one input pinned to a commit, one by branch in the
    // hf:// form. Same bytes as the local merge of the same inputs.
    let local = env.run(
        &[
            "uniform",
            "--adapters",
            &env.s("a"),
            &env.s("b"),
            "-o",
            &env.s("local"),
        ],
        None,
        false,
    );
    ok(&local, "local uniform");
    let a_ref = format!("alice/a@{ca}");
    let hub = env.run(
        &[
            "uniform",
            "--adapters",
            &a_ref,
            "hf://alice/b",
            "-o",
            &env.s("hub"),
        ],
        None,
        false,
    );
    everything += &text(&hub);
    ok(&hub, "uniform from the Hub");
    let (l, h) = (files_of(&env.path("local")), files_of(&env.path("hub")));
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(
            l[f], h[f],
            "{f} differs between the local and the Hub merge"
        );
    }

    // The manifest records both commits; the card pins them.
    let m: Value = serde_json::from_slice(&h["merge_manifest.json"]).unwrap();
    let inputs = m["inputs"].as_array().unwrap();
    assert_eq!(inputs[0]["resolved"]["kind"], "hub");
    assert_eq!(inputs[0]["resolved"]["repo"], "alice/a");
    assert_eq!(inputs[0]["resolved"]["revision"], ca.as_str());
    assert_eq!(inputs[0]["resolved"]["commit"], ca.as_str());
    assert_eq!(inputs[1]["resolved"]["revision"], "main");
    assert_eq!(inputs[1]["resolved"]["commit"], cb.as_str());
    let card = String::from_utf8(h["README.md"].clone()).unwrap();
    assert!(
        card.contains(&format!("`{ca}`")) && card.contains(&format!("`{cb}`")),
        "{card}"
    );
    assert!(
        card.contains(&format!(
            "uniform --adapters hf://alice/a@{ca} hf://alice/b@{cb} -o"
        )),
        "reproduce command not pinned:\n{card}"
    );

    // Only what is needed was downloaded: no manifest, no .gitattributes.
    let snap_b = env.cache().join("models--alice--b/snapshots").join(&cb);
    let mut got: Vec<String> = std::fs::read_dir(&snap_b)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(env.cache().join("models--alice--b/refs/main")).unwrap(),
        cb
    );

    // Offline: from the cache alone, not one request, same bytes.
    let before = server.log().len();
    let off = env.run(
        &[
            "uniform",
            "--adapters",
            &a_ref,
            "hf://alice/b",
            "-o",
            &env.s("offline"),
        ],
        None,
        true,
    );
    everything += &text(&off);
    ok(&off, "offline uniform");
    assert_eq!(
        server.log().len(),
        before,
        "an offline run talked to the Hub"
    );
    let o = files_of(&env.path("offline"));
    assert_eq!(
        o["adapter_model.safetensors"],
        h["adapter_model.safetensors"]
    );

    // The token went to the Hub, and nowhere else.
    for dir in ["a", "b", "hub", "offline"] {
        for (name, bytes) in files_of(&env.path(dir)) {
            assert!(
                !String::from_utf8_lossy(&bytes).contains(TOKEN),
                "the token is in {dir}/{name}"
            );
        }
    }
    assert!(!everything.contains(TOKEN));
}

#[test]
fn push_refusals_and_the_token_never_shown() {
    let server = HubServer::start(TOKEN);
    let env = Env::new(&server);
    let out = env.s("m");
    ok(
        &env.run(
            &["uniform", "--adapters", &fixture("alpha"), "-o", &out],
            None,
            false,
        ),
        "uniform",
    );

    // No token: refused before anything is sent.
    let o = env.run(&["push", &out, "--repo", "alice/m"], None, false);
    assert_refused(&o, &["token", "nothing was sent"]);
    assert!(
        server.log().is_empty(),
        "requests were sent: {:?}",
        server.log()
    );

    // A token file written by `hf auth login` is found (HF_HOME/token), and a
    // wrong token is a 401 that names the repository, not the token.
    let wrong = "hf_wrongtoken_Pp3Jd8Kq2Lx5";
    std::fs::write(env.root.join("home/token"), wrong).unwrap();
    let o = env.run(&["push", &out, "--repo", "alice/m"], None, false);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("401") && t.contains("alice/m"), "{t}");
    assert!(!t.contains(wrong), "the token is in the error: {t}");
    assert!(!server.log().is_empty());
    std::fs::remove_file(env.root.join("home/token")).unwrap();

    // A file changed after the merge: verify refuses, nothing is sent.
    let n = server.log().len();
    let cfg = Path::new(&out).join("adapter_config.json");
    let orig = std::fs::read(&cfg).unwrap();
    std::fs::write(&cfg, b"{}").unwrap();
    let o = env.run(&["push", &out, "--repo", "alice/m"], Some(TOKEN), false);
    assert_refused(&o, &["differs from merge_manifest.json"]);
    assert_eq!(server.log().len(), n);
    std::fs::write(&cfg, orig).unwrap();

    // Private, to a new branch, then a pull request; human output is the URL.
    let o = env.run(
        &[
            "push",
            &out,
            "--repo",
            "alice/m",
            "--private",
            "--revision",
            "dev",
            "--message",
            "first",
        ],
        Some(TOKEN),
        false,
    );
    ok(&o, "push --private --revision dev");
    assert_eq!(server.is_private("alice/m"), Some(true));
    let dev = server.head("alice/m", "dev").unwrap();
    assert_ne!(server.head("alice/m", "main").unwrap(), dev);
    let url = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(url, format!("{}/alice/m/commit/{dev}", server.url));
    // HF_TOKEN_PATH names a token file.
    let token_file = env.path("token-file");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let o = env
        .cmd(Path::new(BIN), None, false)
        .env("HF_TOKEN_PATH", &token_file)
        .args(["push", &out, "--repo", "alice/m", "--create-pr", "--json"])
        .output()
        .unwrap();
    ok(&o, "push --create-pr");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        server.head("alice/m", "refs/pr/1").as_deref(),
        v["commit"].as_str()
    );
    assert_ne!(
        server.head("alice/m", "main").as_deref(),
        v["commit"].as_str()
    );
    assert!(!text(&o).contains(TOKEN));

    // A private repository cannot be read without the token.
    let o = env.run(&["inspect", &format!("alice/m@{dev}")], None, false);
    assert_refused(&o, &["401", "alice/m"]);
    let o = env.run(&["inspect", &format!("alice/m@{dev}")], Some(TOKEN), false);
    ok(&o, "inspect a private repository with the token");
}

#[test]
fn unknown_repo_revision_and_offline_misses_are_named() {
    let server = HubServer::start(TOKEN);
    let env = Env::new(&server);
    let c = merge_and_push(&env, &server, &[&fixture("gamma")], "g", "bob/g");
    let out = env.s("out");

    let o = env.run(
        &["uniform", "--adapters", "bob/nope", "-o", &out],
        None,
        false,
    );
    assert_refused(&o, &["bob/nope@main: no such repository"]);

    let o = env.run(
        &["uniform", "--adapters", "bob/g@no-such-branch", "-o", &out],
        None,
        false,
    );
    assert_refused(&o, &["no revision \"no-such-branch\" in bob/g"]);

    let o = env.run(
        &["uniform", "--adapters", "hf://bob/g/sub", "-o", &out],
        None,
        false,
    );
    assert_refused(&o, &["bob/g@main: sub/adapter_model.safetensors"]);

    // Offline with an empty cache, then with the config cached but not the weights.
    let o = env.run(&["uniform", "--adapters", "bob/g", "-o", &out], None, true);
    assert_refused(
        &o,
        &["HF_HUB_OFFLINE", "bob/g@main", "not in the Hub cache"],
    );
    ok(
        &env.run(&["inspect", "bob/g"], None, false),
        "inspect online",
    );
    let snap = env.cache().join("models--bob--g/snapshots").join(&c);
    std::fs::remove_file(snap.join("adapter_model.safetensors")).unwrap();
    let o = env.run(
        &["uniform", "--adapters", &format!("bob/g@{c}"), "-o", &out],
        None,
        true,
    );
    assert_refused(
        &o,
        &[&format!(
            "adapter_model.safetensors of bob/g@{c} is not in the Hub cache"
        )],
    );
    assert!(!Path::new(&out).exists());
}

#[test]
fn a_download_cut_short_is_never_used_or_left_as_complete() {
    let server = HubServer::start(TOKEN);
    let env = Env::new(&server);
    let c = merge_and_push(&env, &server, &[&fixture("alpha")], "a", "carol/a");
    let weights = std::fs::read(env.path("a").join("adapter_model.safetensors")).unwrap();
    let sha: String = {
        use sha2::{Digest, Sha256};
        Sha256::digest(&weights)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };

    server.set_fault(Fault::CutShort("adapter_model.safetensors".into()));
    let out = env.s("out");
    let o = env.run(
        &["uniform", "--adapters", "carol/a", "-o", &out],
        None,
        false,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("carol/a@main: adapter_model.safetensors"),
        "{}",
        text(&o)
    );
    assert!(!Path::new(&out).exists());
    let repo = env.cache().join("models--carol--a");
    assert!(
        !repo.join("blobs").join(&sha).exists(),
        "a partial blob was kept as complete"
    );
    assert!(!repo
        .join("snapshots")
        .join(&c)
        .join("adapter_model.safetensors")
        .exists());
    // Offline, the partial file is not taken for the weights either.
    let o = env.run(
        &["uniform", "--adapters", "carol/a", "-o", &out],
        None,
        true,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));

    // Whole but wrong bytes: caught by the sha256 the Hub named, removed.
    server.set_fault(Fault::Corrupt("adapter_model.safetensors".into()));
    let o = env.run(
        &["uniform", "--adapters", "carol/a", "-o", &out],
        None,
        false,
    );
    assert_refused(&o, &["does not match its sha256"]);
    assert!(
        !repo.join("blobs").join(&sha).exists(),
        "a corrupt blob was kept"
    );
    assert!(!repo
        .join("snapshots")
        .join(&c)
        .join("adapter_model.safetensors")
        .exists());
    assert!(!Path::new(&out).exists());

    server.set_fault(Fault::None);
    let o = env.run(
        &["uniform", "--adapters", "carol/a", "-o", &out],
        None,
        false,
    );
    ok(&o, "uniform after the fault is gone");
    assert_eq!(
        std::fs::read(repo.join("blobs").join(&sha)).unwrap(),
        weights
    );
}

/// The test server and our cache against the real Python client: Python
/// uploads (LFS basic transfer) and downloads through the server; Python
/// reads, offline, a cache our downloads filled; we read, offline, a cache
/// Python filled.
#[test]
fn python_huggingface_hub_agrees_with_the_server_and_shares_the_cache() {
    let server = HubServer::start(TOKEN);
    let env = Env::new(&server);
    let c = merge_and_push(&env, &server, &[&fixture("beta")], "b", "dave/b");
    // Our download, for Python to find offline.
    ok(
        &env.run(&["inspect", "dave/b"], None, false),
        "inspect from the Hub",
    );

    let script = common::repo().join("tests/python/hub_client.py");
    let py_cache = env.path("py-cache");
    let o = env
        .cmd(&common::python(), None, false)
        .arg(&script)
        .args(["--token", TOKEN, "--upload-dir", &fixture("gamma")])
        .args(["--our-cache", env.cache().to_str().unwrap()])
        .args([
            "--our-dir",
            &env.s("b"),
            "--our-repo",
            "dave/b",
            "--our-commit",
            &c,
        ])
        .args(["--py-cache", py_cache.to_str().unwrap()])
        .env("PYTHONUNBUFFERED", "1")
        .output()
        .expect("run python");
    common::assert_oracle_passed(&o, "hub_client.py", 30);
    assert!(
        server.log().iter().any(|l| l.starts_with("PUT /_lfs/")),
        "Python did not use the LFS upload: {:?}",
        server.log()
    );

    // Python uploaded gamma to py/gamma and downloaded it into py-cache:
    // merge it offline from that cache.
    let py_commit = server.head("py/gamma", "main").unwrap();
    let o = env
        .cmd(Path::new(BIN), None, true)
        .env("HF_HUB_CACHE", &py_cache)
        .args(["uniform", "--adapters", "py/gamma", "-o", &env.s("from-py")])
        .output()
        .unwrap();
    ok(&o, "uniform offline from the cache Python filled");
    let m: Value =
        serde_json::from_slice(&std::fs::read(env.path("from-py/merge_manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["inputs"][0]["resolved"]["commit"], py_commit.as_str());
    let direct = env.run(
        &[
            "uniform",
            "--adapters",
            &fixture("gamma"),
            "-o",
            &env.s("direct"),
        ],
        None,
        false,
    );
    ok(&direct, "uniform of the local fixture");
    assert_eq!(
        std::fs::read(env.path("from-py/adapter_model.safetensors")).unwrap(),
        std::fs::read(env.path("direct/adapter_model.safetensors")).unwrap()
    );
}

/// Base models by repo id: config, tokenizer and the safetensors shards an
/// index names, never pickled weights, recorded with their commit.
#[test]
fn base_models_download_only_what_is_needed() {
    let server = HubServer::start(TOKEN);
    let env = Env::new(&server);
    let model = env.path("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("config.json"), br#"{"model_type": "llama"}"#).unwrap();
    std::fs::write(model.join("tokenizer.json"), b"{}").unwrap();
    std::fs::write(
        model.join("model.safetensors.index.json"),
        br#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    std::fs::write(model.join("model-00001-of-00002.safetensors"), b"shard one").unwrap();
    std::fs::write(model.join("model-00002-of-00002.safetensors"), b"shard two").unwrap();
    std::fs::write(model.join("pytorch_model.bin"), b"pickle").unwrap();
    std::fs::write(model.join("training_args.bin"), b"pickle").unwrap();
    let o = env
        .cmd(&common::python(), Some(TOKEN), false)
        .arg(common::repo().join("tests/python/hub_client.py"))
        .args([
            "--upload-only",
            model.to_str().unwrap(),
            "--repo",
            "erin/tiny",
        ])
        .output()
        .unwrap();
    common::assert_oracle_passed(&o, "upload a model", 1);
    let commit = server.head("erin/tiny", "main").unwrap();

    // In this process, so the environment is set here (every command the
    // other tests run sets or removes each of these variables itself).
    std::env::set_var("HF_ENDPOINT", &server.url);
    std::env::set_var("HF_HOME", env.root.join("home"));
    std::env::set_var("HF_HUB_CACHE", env.cache());
    std::env::remove_var("HF_TOKEN");
    std::env::remove_var("HF_HUB_OFFLINE");
    let src = lora_merge::source::resolve_model_source("erin/tiny").unwrap();
    let hub = src.hub.as_ref().unwrap();
    assert_eq!(hub.commit, commit);
    assert_eq!(hub.pinned, format!("hf://erin/tiny@{commit}"));
    let dir = src.dir.clone();
    assert!(
        dir.ends_with(format!("models--erin--tiny/snapshots/{commit}")),
        "{dir:?}"
    );
    let mut got: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json"
        ]
    );
    assert_eq!(
        std::fs::read(dir.join("model-00002-of-00002.safetensors")).unwrap(),
        b"shard two"
    );
    // And offline, from the cache, by commit and by branch.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let again = lora_merge::source::resolve_model_source(&format!("hf://erin/tiny@{commit}"));
    let by_branch = lora_merge::source::resolve_model_source("erin/tiny");
    std::env::remove_var("HF_HUB_OFFLINE");
    assert_eq!(again.unwrap().dir, dir);
    assert_eq!(by_branch.unwrap().hub.unwrap().commit, commit);
}
