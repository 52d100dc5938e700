//! `verify`: re-hash a merged directory against its manifest.

use serde_json::json;

use crate::cli::VerifyArgs;
use crate::output::manifest::FILE_NAME;
use crate::Result;

pub fn run(args: &VerifyArgs) -> Result<()> {
    let outputs = crate::output::verify::check(&args.dir)?;
    if args.json {
        crate::ui::print_json(&json!({"ok": true, "dir": args.dir, "files": outputs.len()}))?;
    } else {
        crate::outln!(
            "{}: {} files match {FILE_NAME}",
            args.dir.display(),
            outputs.len()
        );
    }
    Ok(())
}
