//! The man pages in man/ are generated from the clap definitions. This test
//! fails when they are stale; `UPDATE_MAN=1 cargo test --test integration man::` rewrites them.

use std::path::PathBuf;

use clap::CommandFactory;

fn render(cmd: clap::Command) -> Vec<u8> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd)
        .render(&mut out)
        .expect("render man page");
    out
}

#[test]
fn man_pages_are_current() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("man");
    let mut cmd = lora_merge::cli::Cli::command();
    cmd.build();
    let mut pages = vec![("lora-merge.1".to_string(), render(cmd.clone()))];
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("lora-merge-{}", sub.get_name());
        pages.push((format!("{name}.1"), render(sub.clone().name(name))));
    }
    let update = std::env::var_os("UPDATE_MAN").is_some();
    let mut stale = Vec::new();
    for (file, bytes) in &pages {
        let path = dir.join(file);
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, bytes).unwrap();
        } else if std::fs::read(&path).ok().as_deref() != Some(bytes.as_slice()) {
            stale.push(file.clone());
        }
    }
    assert!(
        stale.is_empty(),
        "stale man pages {stale:?}: run `UPDATE_MAN=1 cargo test --test integration man::` and commit man/"
    );
    assert!(
        pages.len() >= 5,
        "expected a page per subcommand, got {}",
        pages.len()
    );
}
