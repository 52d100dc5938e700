"""The real huggingface_hub client against the test Hub (HF_ENDPOINT), and
against the cache lora-merge filled.

Run by tests/integration/hub.rs with HF_ENDPOINT, HF_HOME and HF_HUB_CACHE set:

  hub_client.py --token T --upload-dir DIR --our-cache C --our-dir D
                --our-repo R --our-commit SHA --py-cache P
      1. HfApi.create_repo / upload_folder (LFS basic transfer for the
         .safetensors file) of DIR to py/gamma, then model_info,
         hf_hub_download, snapshot_download and list_repo_tree read it
         back; errors for an unknown repo, revision and file; create_pr.
      2. In a child process with HF_HUB_OFFLINE=1: hf_hub_download finds, in
         cache C (filled by lora-merge), the files of R at SHA with the bytes
         of D, by commit and by branch; scan_cache_dir sees a sound cache.
      3. Leaves py/gamma downloaded into cache P, for lora-merge to read.
  hub_client.py --upload-only DIR --repo R      (token from HF_TOKEN)

Ends with "N passed, M failed".
"""

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import traceback

passed = 0
failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


def attempt(name, fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 - report every failure, keep going
        global failed
        failed += 1
        print(f"FAIL {name}: exception\n{traceback.format_exc()}")


def files_in(d):
    return sorted(
        f for f in os.listdir(d) if os.path.isfile(os.path.join(d, f))
    )


def read(p):
    with open(p, "rb") as f:
        return f.read()


def online(args):
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi(token=args.token)
    repo = "py/gamma"
    local = files_in(args.upload_dir)
    state = {}

    def create():
        url = api.create_repo(repo)
        check("create_repo returns the repo URL", url.repo_id == repo, str(url))
        again = api.create_repo(repo, exist_ok=True)
        check("create_repo(exist_ok=True) on an existing repo", again.repo_id == repo)

    def upload():
        info = api.upload_folder(folder_path=args.upload_dir, repo_id=repo, commit_message="gamma")
        state["oid"] = info.oid
        check("upload_folder gives a commit id", re.fullmatch(r"[0-9a-f]{40}", info.oid or "") is not None, str(info))
        check("commit URL names the commit", info.oid in info.commit_url, info.commit_url)

    def read_back():
        oid = state["oid"]
        mi = api.model_info(repo)
        check("model_info sha is the commit", mi.sha == oid, f"{mi.sha} != {oid}")
        names = sorted(s.rfilename for s in mi.siblings)
        check("siblings are the uploaded files", names == sorted(local + [".gitattributes"]), str(names))
        mi2 = api.model_info(repo, revision=oid)
        check("model_info by commit", mi2.sha == oid)
        tree = {f.path: f for f in api.list_repo_tree(repo, recursive=True)}
        st = tree["adapter_model.safetensors"]
        want = hashlib.sha256(read(os.path.join(args.upload_dir, "adapter_model.safetensors"))).hexdigest()
        check("the safetensors file is an LFS file with its sha256", st.lfs is not None and st.lfs.sha256 == want)
        for f in local:
            p = hf_hub_download(repo, f, cache_dir=args.py_cache)
            check(f"hf_hub_download {f} gives the uploaded bytes", read(p) == read(os.path.join(args.upload_dir, f)))
        blob = os.path.realpath(os.path.join(args.py_cache, "models--py--gamma", "snapshots", oid, "adapter_model.safetensors"))
        check("the LFS blob is named by its sha256", os.path.basename(blob) == want, blob)
        ref = read(os.path.join(args.py_cache, "models--py--gamma", "refs", "main")).decode()
        check("refs/main holds the commit", ref == oid, ref)
        # What lora-merge pushed, read back by Python over the network: the
        # weights went through LFS (not inline) and arrive byte-identical.
        ours = files_in(args.our_dir)
        otree = {f.path: f for f in api.list_repo_tree(args.our_repo, revision=args.our_commit, recursive=True)}
        for f in ours:
            with tempfile.TemporaryDirectory() as d:
                p = hf_hub_download(args.our_repo, f, revision=args.our_commit, cache_dir=d)
                check(f"hf_hub_download of our pushed {f} gives its bytes", read(p) == read(os.path.join(args.our_dir, f)))
        ow = read(os.path.join(args.our_dir, "adapter_model.safetensors"))
        lfs = otree["adapter_model.safetensors"].lfs
        check("our pushed weights are an LFS file", lfs is not None and lfs.sha256 == hashlib.sha256(ow).hexdigest())
        with tempfile.TemporaryDirectory() as d:
            snap = snapshot_download(repo, cache_dir=d)
            same = all(read(os.path.join(snap, f)) == read(os.path.join(args.upload_dir, f)) for f in local)
            check("snapshot_download gives every file", same and os.path.basename(snap) == oid)

    def errors():
        for name, call, exc in [
            ("unknown repo", lambda: hf_hub_download("py/nope", "x.json", cache_dir=args.py_cache), RepositoryNotFoundError),
            ("unknown revision", lambda: hf_hub_download(repo, "adapter_config.json", revision="nope", cache_dir=args.py_cache), RevisionNotFoundError),
            ("unknown file", lambda: hf_hub_download(repo, "nope.json", cache_dir=args.py_cache), RemoteEntryNotFoundError),
        ]:
            try:
                call()
                check(f"{name} raises {exc.__name__}", False, "no error")
            except exc:
                check(f"{name} raises {exc.__name__}", True)
            except Exception as e:  # noqa: BLE001
                check(f"{name} raises {exc.__name__}", False, repr(e))

    def pull_request():
        head = api.model_info(repo).sha
        info = api.upload_file(path_or_fileobj=b"note\n", path_in_repo="NOTE.txt", repo_id=repo, create_pr=True)
        check("create_pr opens a pull request", info.pr_url is not None and info.pr_num == 1, str(info))
        check("create_pr leaves main alone", api.model_info(repo).sha == head)

    attempt("create", create)
    attempt("upload", upload)
    if "oid" in state:
        attempt("read back", read_back)
    attempt("errors", errors)
    attempt("pull request", pull_request)

    # Offline, in a fresh process: HF_HUB_OFFLINE is read at import.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    child = subprocess.run(
        [sys.executable, __file__, "--offline-read", "--our-cache", args.our_cache,
         "--our-dir", args.our_dir, "--our-repo", args.our_repo, "--our-commit", args.our_commit],
        env=env, capture_output=True, text=True,
    )
    print(child.stdout, end="")
    m = re.search(r"(\d+) passed, (\d+) failed", child.stdout)
    global passed, failed
    if m:
        passed += int(m.group(1))
        failed += int(m.group(2))
    if child.returncode != 0 or not m:
        failed += 1
        print(f"FAIL offline child: {child.stderr}")


def offline_read(args):
    from huggingface_hub import constants, hf_hub_download, scan_cache_dir

    check("HF_HUB_OFFLINE is on in this process", constants.HF_HUB_OFFLINE)
    names = ["adapter_config.json", "adapter_model.safetensors"]
    for rev in [args.our_commit, "main", None]:
        for f in names:
            def one(rev=rev, f=f):
                p = hf_hub_download(args.our_repo, f, revision=rev, cache_dir=args.our_cache)
                check(f"offline hf_hub_download {f}@{rev} finds our download", read(p) == read(os.path.join(args.our_dir, f)))
            attempt(f"offline {f}@{rev}", one)

    def scan():
        info = scan_cache_dir(args.our_cache)
        check("scan_cache_dir has no warnings", not info.warnings, str(info.warnings))
        repos = {r.repo_id: r for r in info.repos}
        r = repos.get(args.our_repo)
        check("scan_cache_dir lists our repo", r is not None, str(list(repos)))
        if r is not None:
            revs = {rv.commit_hash: rv for rv in r.revisions}
            check("at our commit, with ref main", args.our_commit in revs and "main" in revs[args.our_commit].refs)

    attempt("scan", scan)


def upload_only(args):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(args.repo, exist_ok=True)
    info = api.upload_folder(folder_path=args.upload_only, repo_id=args.repo)
    check("upload_folder", info.oid is not None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--token")
    p.add_argument("--upload-dir")
    p.add_argument("--our-cache")
    p.add_argument("--our-dir")
    p.add_argument("--our-repo")
    p.add_argument("--our-commit")
    p.add_argument("--py-cache")
    p.add_argument("--offline-read", action="store_true")
    p.add_argument("--upload-only")
    p.add_argument("--repo")
    args = p.parse_args()
    if args.offline_read:
        offline_read(args)
    elif args.upload_only:
        attempt("upload only", lambda: upload_only(args))
    else:
        online(args)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
