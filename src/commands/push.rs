//! `push`: upload a merged adapter directory to the Hub in one commit.

use crate::cli::PushArgs;
use crate::hub::{self, PushRequest};
use crate::output::manifest::{DIGEST_FILE, FILE_NAME};
use crate::Result;

pub fn run(args: &PushArgs) -> Result<()> {
    // Refuse a bad repository id or a missing token before reading anything.
    hub::check_repo_id(&args.repo)?;
    // Only what the manifest vouches for is sent (with the manifest and its
    // digest), and only if it still holds.
    let outputs = crate::output::verify::check(&args.dir)?;
    let mut files: Vec<String> = outputs.keys().cloned().collect();
    files.push(FILE_NAME.to_string());
    files.push(DIGEST_FILE.to_string());
    let pushed = hub::push(&PushRequest {
        dir: &args.dir,
        files: &files,
        repo: &args.repo,
        revision: &args.revision,
        private: args.private,
        create_pr: args.create_pr,
        message: &args.message,
    })?;
    if args.json {
        crate::ui::print_json(&pushed)?;
    } else {
        crate::ui::note(&format!(
            "pushed {} files to {}@{} (commit {})",
            files.len(),
            pushed.repo,
            pushed.revision,
            pushed.commit
        ));
        crate::outln!("{}", pushed.url);
    }
    Ok(())
}
