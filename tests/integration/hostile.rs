//! A hostile or broken Hub: the test Hub told to lie in each way a
//! misbehaving mirror can (names that are paths, error pages, lying sizes,
//! redirects to another host, silence, floods). In every scenario, a tree of
//! sentinel files around the cache is compared before and after: nothing
//! outside the cache is ever created, changed or deleted.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::hub_server::{Fault, HubServer, Plain};
use crate::hub::{assert_refused, fixture, merge_and_push, ok, text, Env, BIN, TOKEN};

const WEIGHTS: &str = "adapter_model.safetensors";
const CONFIG: &str = "adapter_config.json";

/// What lies outside the cache under the test's root: each path with its
/// kind and content (a link's target, a file's bytes).
fn outside_cache(env: &Env) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![env.root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p == env.cache() {
                continue;
            }
            let rel = p.strip_prefix(&env.root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                stack.push(p);
                "dir".into()
            } else {
                format!("file {:?}", std::fs::read(&p).unwrap())
            };
            out.insert(rel, what);
        }
    }
    out
}

/// Files a hostile server would aim at: a shell profile, a lock file beside
/// it, and a folder with the names of a snapshot's files.
fn plant_sentinels(env: &Env) {
    let home = env.path("home");
    std::fs::write(home.join(".bash_profile"), "export PATH=/usr/bin\n").unwrap();
    std::fs::write(home.join(".bash_profile.lock"), "keep me\n").unwrap();
    let victim = env.path("victim");
    std::fs::create_dir_all(&victim).unwrap();
    for f in ["README.md", CONFIG, "config.json", WEIGHTS] {
        std::fs::write(victim.join(f), format!("the user's own {f}\n")).unwrap();
    }
}

/// A server with `repo` pushed to it (the alpha fixture, merged), an
/// environment with sentinels planted, and the pushed commit.
fn scene(repo: &str) -> (HubServer, Env, String) {
    let server = HubServer::start(TOKEN);
    let env = Env::new(&server);
    let commit = merge_and_push(&env, &server, &[&fixture("alpha")], "a", repo);
    plant_sentinels(&env);
    (server, env, commit)
}

/// Fetch `repo` (an adapter) with an empty cache, through `inspect`.
fn fetch_fresh(env: &Env, repo: &str, token: Option<&str>) -> Output {
    let _ = std::fs::remove_dir_all(env.cache());
    env.run(&["inspect", repo], token, false)
}

fn assert_status(o: &Output, code: i32, needles: &[&str]) {
    let t = text(o);
    assert_eq!(o.status.code(), Some(code), "{t}");
    for n in needles {
        assert!(t.contains(n), "{n:?} is not in:\n{t}");
    }
}

fn snapshot_entry(env: &Env, repo: &str, commit: &str, file: &str) -> std::path::PathBuf {
    env.cache()
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("snapshots")
        .join(commit)
        .join(file)
}

/// Issue classes 1 and 2: names from the server used as paths.
#[test]
fn a_hostile_server_cannot_write_or_delete_outside_the_cache() {
    let (server, env, commit) = scene("eve/a");
    let before = outside_cache(&env);
    let profile = env.path("home/.bash_profile");
    let planted = env.path("home/planted");

    let scenarios = [
        // An ETag that climbs out of blobs/ to a shell profile (LFS file).
        Fault::Etag {
            file: WEIGHTS.into(),
            value: "\"../../../home/.bash_profile\"".into(),
        },
        // An absolute path as the ETag of a regular file.
        Fault::Etag {
            file: CONFIG.into(),
            value: format!("\"{}\"", planted.display()),
        },
        // A commit header that climbs out of snapshots/ to a folder with
        // README.md and adapter_config.json, on a 200 and on a 404.
        Fault::Commit {
            file: "README.md".into(),
            value: format!("{commit}/../../../../victim"),
            status: 200,
        },
        Fault::Commit {
            file: CONFIG.into(),
            value: format!("{commit}/../../../../victim"),
            status: 404,
        },
        // Another commit than the one asked for.
        Fault::Commit {
            file: WEIGHTS.into(),
            value: "f".repeat(40),
            status: 200,
        },
    ];
    for fault in scenarios {
        server.set_fault(fault.clone());
        let o = fetch_fresh(&env, "eve/a", Some(TOKEN));
        assert!(!o.status.success(), "{fault:?} was accepted:\n{}", text(&o));
        let t = text(&o);
        assert!(t.contains("eve/a@main"), "{fault:?}: {t}");
        match &fault {
            Fault::Etag { .. } => assert!(t.contains("not a 40- or 64-digit hex hash"), "{t}"),
            Fault::Commit { status: 200, .. } => assert!(t.contains("not the"), "{t}"),
            _ => {}
        }
        assert_eq!(
            outside_cache(&env),
            before,
            "{fault:?} touched files outside the cache"
        );
        assert!(!planted.exists());
    }
    assert_eq!(
        std::fs::read_to_string(&profile).unwrap(),
        "export PATH=/usr/bin\n"
    );

    // A snapshot entry planted to point outside the cache (as a hostile
    // server could make the old client write) is replaced, never followed,
    // and its target is left alone: offline it is refused, online re-fetched.
    server.set_fault(Fault::None);
    ok(&fetch_fresh(&env, "eve/a", None), "a healthy fetch");
    let entry = snapshot_entry(&env, "eve/a", &commit, CONFIG);
    std::fs::remove_file(&entry).unwrap();
    std::os::unix::fs::symlink(env.path("victim").join(CONFIG), &entry).unwrap();
    let o = env.run(&["inspect", "eve/a"], None, true);
    assert_refused(&o, &["unusable", "not to a blob", CONFIG]);
    std::fs::remove_file(&entry).ok();
    std::os::unix::fs::symlink(env.path("victim").join(CONFIG), &entry).unwrap();
    let o = env.run(&["inspect", "eve/a"], None, false);
    ok(&o, "online, a planted link is replaced");
    assert!(text(&o).contains("fetching it again"), "{}", text(&o));
    assert!(std::fs::canonicalize(&entry)
        .unwrap()
        .starts_with(std::fs::canonicalize(env.cache()).unwrap()));
    assert_eq!(outside_cache(&env), before);
}

/// Issue class 3: error pages, cut-short or over-long bodies and tampered
/// regular files never become cache content; a bad cached entry is found
/// and fetched again.
#[test]
fn only_whole_verified_bytes_enter_the_cache() {
    let (server, env, commit) = scene("eve/b");
    let before = outside_cache(&env);
    let weights_entry = snapshot_entry(&env, "eve/b", &commit, WEIGHTS);

    // A 500 page where the weights should be: reported, nothing linked;
    // the next run against a healthy server works with the same cache.
    server.set_fault(Fault::Status {
        file: WEIGHTS.into(),
        status: 500,
        body: "<html><body>Internal Server Error</body></html>".into(),
    });
    let o = fetch_fresh(&env, "eve/b", None);
    assert_status(&o, 2, &["eve/b@main: adapter_model.safetensors", "500"]);
    assert!(std::fs::symlink_metadata(&weights_entry).is_err());
    server.set_fault(Fault::None);
    ok(
        &env.run(&["inspect", "eve/b"], None, false),
        "after the 500",
    );

    // More bytes than announced: reading stops one byte past the size.
    server.set_fault(Fault::LyingSize(WEIGHTS.into()));
    let o = fetch_fresh(&env, "eve/b", None);
    assert_status(&o, 2, &["more than the", "nothing was kept"]);
    assert!(std::fs::symlink_metadata(&weights_entry).is_err());

    // A regular (non-LFS) file changed in transit: its git blob id says so.
    server.set_fault(Fault::Corrupt(CONFIG.into()));
    let o = fetch_fresh(&env, "eve/b", None);
    assert_refused(
        &o,
        &["adapter_config.json", "does not match its git blob id"],
    );
    assert!(std::fs::symlink_metadata(snapshot_entry(&env, "eve/b", &commit, CONFIG)).is_err());

    // A cached blob damaged after the fact (disk, another tool): online it
    // is fetched again; offline it is refused and removed.
    server.set_fault(Fault::None);
    ok(&fetch_fresh(&env, "eve/b", None), "healthy");
    let blob = std::fs::canonicalize(&weights_entry).unwrap();
    let good = std::fs::read(&blob).unwrap();
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 1;
    std::fs::write(&blob, &bad).unwrap();
    let o = env.run(&["inspect", "eve/b"], None, false);
    ok(&o, "a damaged blob is fetched again");
    assert!(text(&o).contains("fetching it again"), "{}", text(&o));
    assert_eq!(std::fs::read(&blob).unwrap(), good);
    std::fs::write(&blob, &bad).unwrap();
    let o = env.run(&["inspect", "eve/b"], None, true);
    assert_refused(&o, &["unusable", "does not match its sha256"]);
    assert!(!blob.exists() && std::fs::symlink_metadata(&weights_entry).is_err());
    assert_eq!(outside_cache(&env), before);
}

/// Issue classes 4 and 6: the token only on the endpoint's origin, server
/// text cleaned, push's link on the endpoint, no second commit POST.
#[test]
fn the_token_stays_on_the_endpoint_and_server_text_is_cleaned() {
    let (server, env, _) = scene("eve/c");
    let before = outside_cache(&env);
    let weights = std::fs::read(env.path("a").join(WEIGHTS)).unwrap();

    // A redirect that a lax client takes as relative (`/\host`) but that
    // leads to another host: followed, without the token.
    let other = Plain::start(weights);
    let host = other.url.trim_start_matches("http://");
    for location in [format!("/\\{host}/blob"), format!("//{host}/blob2")] {
        server.set_fault(Fault::Redirect {
            file: WEIGHTS.into(),
            location: location.clone(),
        });
        let o = fetch_fresh(&env, "eve/c", Some(TOKEN));
        ok(&o, &format!("a redirect to {location:?}"));
    }
    let seen = other.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for s in &seen {
        assert!(!s.to_ascii_lowercase().contains("authorization"), "{s}");
        assert!(!s.contains(TOKEN), "{s}");
    }

    // An error page that echoes the token and carries terminal escapes.
    server.set_fault(Fault::Status {
        file: WEIGHTS.into(),
        status: 503,
        body: format!(
            "{{\"error\": \"token {TOKEN} rejected \\u001b[2J\\u001b]0;pwned\\u0007\\r\\nFAKE\"}}"
        ),
    });
    let o = fetch_fresh(&env, "eve/c", Some(TOKEN));
    let t = text(&o);
    assert_status(&o, 2, &["503", "[token]"]);
    assert!(!t.contains(TOKEN), "{t}");
    assert!(!t.contains('\u{1b}') && !t.contains('\u{7}'), "{t:?}");

    // push prints only a link on the endpoint's origin.
    server.set_fault(Fault::CommitUrl("https://evil.example/phish".into()));
    let o = env.run(
        &["push", &env.s("a"), "--repo", "eve/c2", "--json"],
        Some(TOKEN),
        false,
    );
    ok(&o, "push");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let url = v["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("{}/eve/c2/commit/", server.url)),
        "{url}"
    );

    // A failed commit POST is reported, not sent again.
    server.set_fault(Fault::CommitFails);
    let o = env.run(
        &["push", &env.s("a"), "--repo", "eve/c3"],
        Some(TOKEN),
        false,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let posts = server
        .log()
        .iter()
        .filter(|l| l.starts_with("POST /api/models/eve/c3/commit/"))
        .count();
    assert_eq!(posts, 1, "{:?}", server.log());
    assert_eq!(outside_cache(&env), before);
}

/// Issue class 5: a silent server, a flood of JSON; and two runs filling
/// one cache at once (no lock to wait on).
#[test]
fn a_silent_or_flooding_server_is_bounded() {
    let (server, env, _) = scene("eve/d");
    let before = outside_cache(&env);

    server.set_fault(Fault::Silent);
    let _ = std::fs::remove_dir_all(env.cache());
    let t0 = Instant::now();
    let o = env
        .cmd(Path::new(BIN), None, false)
        .env("HF_HUB_DOWNLOAD_TIMEOUT", "1")
        .env("HF_HUB_ETAG_TIMEOUT", "1")
        .args(["inspect", "eve/d"])
        .output()
        .unwrap();
    assert_status(&o, 2, &["no answer", "HF_HUB_DOWNLOAD_TIMEOUT"]);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());

    server.set_fault(Fault::HugeInfo(40 << 20));
    let o = fetch_fresh(&env, "eve/d", None);
    assert_status(&o, 2, &["limit"]);

    server.set_fault(Fault::None);
    let _ = std::fs::remove_dir_all(env.cache());
    let runs: Vec<_> = (0..3)
        .map(|_| {
            env.cmd(Path::new(BIN), None, false)
                .args(["inspect", "eve/d"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for r in runs {
        let o = r.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
    assert_eq!(outside_cache(&env), before);
}
