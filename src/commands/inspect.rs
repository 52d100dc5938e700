//! `inspect`: what each adapter is, and for several, whether they fit.

use serde_json::json;

use crate::adapter::AdapterSet;
use crate::cli::InspectArgs;
use crate::Result;

pub fn run(args: &InspectArgs) -> Result<()> {
    let refs = crate::settings::adapter_refs(&args.adapters, args.adapters_file.as_deref())?;
    let mut set = AdapterSet::load_as(&refs, crate::settings::input_format(&args.input_format))?;
    set.hash_inputs();
    let summaries: Vec<_> = set.adapters.iter().map(|a| a.summary()).collect();
    // inspect describes; it never refuses a set for not fitting together.
    let report = (set.adapters.len() > 1).then(|| set.report());
    if args.json {
        return crate::ui::print_json(&json!({"adapters": summaries, "compatibility": report}));
    }
    for s in &summaries {
        crate::outln!("{}", s.given);
        crate::outln!("  layout      {}", s.format.name());
        for f in &s.files {
            crate::outln!(
                "  file        {} ({}, sha256 {})",
                f.path.display(),
                crate::ui::human_bytes(f.size),
                f.sha256
            );
        }
        crate::outln!(
            "  base model  {}{}",
            s.base_model.as_deref().unwrap_or("(not set)"),
            s.revision
                .as_deref()
                .map(|r| format!(" @ {r}"))
                .unwrap_or_default()
        );
        crate::outln!(
            "  task type   {}",
            s.task_type.as_deref().unwrap_or("(not set)")
        );
        crate::outln!(
            "  rank        {}{}",
            s.rank,
            if s.module_ranks.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} modules differ via rank_pattern)",
                    s.module_ranks.len()
                )
            }
        );
        crate::outln!(
            "  alpha       {}{}{}",
            s.alpha,
            if s.module_alphas.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} modules differ via alpha_pattern)",
                    s.module_alphas.len()
                )
            },
            if s.use_rslora {
                ", rsLoRA (scale alpha/sqrt(r))"
            } else {
                ""
            }
        );
        crate::outln!(
            "  targets     {}",
            s.target_modules
                .as_ref()
                .map(|t| serde_json::to_string(t).unwrap_or_default())
                .unwrap_or_else(|| "(not set)".into())
        );
        let dtypes: Vec<&str> = s.dtypes.iter().map(|d| d.name()).collect();
        crate::outln!(
            "  modules     {} ({} parameters, {})",
            s.module_count,
            s.parameter_count,
            dtypes.join(", ")
        );
    }
    if let Some(r) = &report {
        crate::outln!("compatibility of {} adapters:", set.adapters.len());
        crate::outln!(
            "  modules     {} in all, {} in only some",
            r.modules.len(),
            r.partial_modules.len()
        );
        for (m, missing) in r.partial_modules.iter().take(10) {
            let names: Vec<&str> = missing.iter().map(|i| r.adapters[*i].as_str()).collect();
            crate::outln!("    {m}: missing from {}", names.join(", "));
        }
        if r.partial_modules.len() > 10 {
            crate::outln!(
                "    ... and {} more (--json lists all)",
                r.partial_modules.len() - 10
            );
        }
        for c in &r.shape_conflicts {
            crate::outln!(
                "  CONFLICT    {}: {} has {}, {} has {}",
                c.module,
                r.adapters[c.adapter_i],
                c.shape_i,
                r.adapters[c.adapter_j],
                c.shape_j
            );
        }
        if r.base_mismatch() {
            crate::outln!("  BASE MODELS DIFFER:");
            for b in &r.base_models {
                crate::outln!(
                    "    {} (adapters {:?})",
                    b.name.as_deref().unwrap_or("(not set)"),
                    b.adapters
                );
            }
        }
        if r.fan_in_fan_out_disagree {
            crate::outln!("  fan_in_fan_out differs between adapters");
        }
        let mergeable = r.shape_conflicts.is_empty() && !r.fan_in_fan_out_disagree;
        crate::outln!(
            "  verdict     {}",
            if mergeable {
                "can be merged"
            } else {
                "cannot be merged as is"
            }
        );
    }
    Ok(())
}
