//! `uniform`: merge with fixed weights: load -> check -> merge -> write.
//! `fit` takes the same path once it has learned its weights.

use std::time::Instant;

use serde_json::json;

use crate::adapter::{AdapterSet, Format};
use crate::cli::{OutputFormatArg, UniformArgs};
use crate::compose::merge::{self, Method, Weights};
use crate::compose::weights_file::WeightRules;
use crate::output::describe::{self, Merge};
use crate::output::writer;
use crate::settings::{self, MergeSettings, OutputSettings};
use crate::{Error, Result};

/// The layout to write: the one asked for, else the inputs' common one.
fn output_format(asked: Option<OutputFormatArg>, set: &AdapterSet) -> Result<Format> {
    Ok(match asked {
        Some(OutputFormatArg::Peft) => Format::Peft,
        Some(OutputFormatArg::Kohya) => Format::Kohya,
        Some(OutputFormatArg::Diffusers) => Format::Diffusers,
        None => match set.formats().as_slice() {
            [one] => *one,
            many => {
                let names: Vec<String> = set
                    .adapters
                    .iter()
                    .map(|a| format!("{} ({})", a.given, a.format.name()))
                    .collect();
                return Err(Error::Usage(format!(
                    "the adapters are in different layouts ({}): {}; pass --output-format \
                     peft, kohya or diffusers to choose the layout of the merge",
                    many.iter().map(|f| f.name()).collect::<Vec<_>>().join(", "),
                    names.join(", ")
                )));
            }
        },
    })
}

pub fn run(args: &UniformArgs) -> Result<()> {
    let t0 = Instant::now();
    let out = OutputSettings::from_args(&args.out);
    let merge_settings = MergeSettings::from_args(&args.merge, args.seed)?;
    let file = args.inputs.adapters_file.as_deref();
    // A bad output is refused before anything large is read.
    out.check(&settings::given_inputs(&args.inputs.adapters, file))?;
    let refs = settings::adapter_refs(&args.inputs.adapters, file)?;
    let mut given = settings::given_inputs(&refs, file);
    if let Some(w) = &args.weights_file {
        given.push(crate::output::guard::Input::at("--weights-file", w));
    }
    out.check(&given)?;
    let mut weights = Weights::for_method(refs.len(), &args.weights, &merge_settings.method)?;
    let rules = match &args.weights_file {
        Some(path) => Some(WeightRules::read(path, refs.len())?),
        None => None,
    };

    let mut set = AdapterSet::load_as(&refs, settings::input_format(&args.input_format))?;
    let format = output_format(args.output_format, &set)?;
    if set.has_sd_layout() || format != Format::Peft {
        set.align_sd_names()?;
    }
    out.check(&settings::adapter_inputs(&set))?;
    let report = set.check(merge_settings.strict, merge_settings.allow_base_mismatch)?;
    if let Some(rules) = &rules {
        weights.per_module = rules.apply(set.module_names().into_iter().map(|name| {
            let dotted = crate::adapter::sdnames::is_key(name)
                .then(|| crate::adapter::sdnames::dotted_from_key(name))
                .flatten();
            (name, dotted)
        }))?;
    }
    let load_s = t0.elapsed().as_secs_f64();
    let dtype = merge_settings.dtype_for(&set);
    let method = merge_settings.method;
    let (memory, disk) = merge::estimate(&set, method, dtype);
    crate::resources::check(
        crate::resources::Need { memory, disk },
        &out.dir,
        "this merge",
        if method.task().is_some() {
            "A smaller --rank, or fewer threads (RAYON_NUM_THREADS: each merges one dense module \
             at a time), needs less."
        } else {
            "An svd merge to a smaller --rank, or --dtype f16/bf16, needs less."
        },
    )?;
    set.hash_inputs();

    let bar = crate::ui::progress(report.modules.len() as u64, "merging");
    let t1 = Instant::now();
    let spill = crate::resources::spill_for(&out.dir)?;
    let modules = merge::merge(&set, &weights, method, Some(&spill), &|| bar.inc(1))?;
    bar.finish_and_clear();
    let merge_s = t1.elapsed().as_secs_f64();

    let mut contents = describe::merge_contents(&Merge {
        set: &set,
        report: &report,
        weights: &weights,
        method,
        modules: &modules,
        format,
        dtype,
    })?;
    contents.manifest.timings = [("load_s", load_s), ("merge_s", merge_s)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let t2 = Instant::now();
    let written = writer::write(&out.dir, contents)?;
    let write_s = t2.elapsed().as_secs_f64();
    let total_s = t0.elapsed().as_secs_f64();

    let partial = modules
        .iter()
        .filter(|m| m.sources.len() < set.adapters.len())
        .count();
    let max_err = modules
        .iter()
        .map(|m| m.factored.rel_error)
        .fold(0.0f64, f64::max);
    let ranks = modules.iter().map(|m| m.factored.rank);
    let (rmin, rmax) = (ranks.clone().min().unwrap_or(0), ranks.max().unwrap_or(0));
    if args.json {
        crate::ui::print_json(&json!({
            "output": written.dir,
            "method": method,
            "output_format": format,
            "dtype": dtype,
            "adapters": set.adapters.len(),
            "weights": weights.global,
            "modules": modules.len(),
            "partial_modules": partial,
            "rank_min": rmin,
            "rank_max": rmax,
            "max_rel_error": max_err,
            "files": written.files,
            "timings": {"load_s": load_s, "merge_s": merge_s, "write_s": write_s, "total_s": total_s},
        }))?;
    } else {
        crate::ui::note(&format!(
            "loaded {} adapters in {:.2} s; merged {} modules ({}, output rank {}{}, max relative error {:.2e}) in {:.2} s",
            set.adapters.len(),
            load_s,
            modules.len(),
            method.name(),
            rmin,
            if rmax != rmin { format!("..{rmax}") } else { String::new() },
            max_err,
            merge_s
        ));
        if partial > 0 {
            crate::ui::note(&format!(
                "note: {partial} modules are adapted by only some adapters and were merged from those (see merge_manifest.json; --strict refuses this)"
            ));
        }
        if method.task().is_some() {
            crate::ui::note(&format!(
                "note: --method {} merges pruned deltas; the relative error is that of --rank against this merge, not against the weighted sum",
                method.name()
            ));
        }
        if method == Method::Linear {
            crate::ui::note("note: --method linear is PEFT-compatible averaging, not the weighted sum of deltas; its error is recorded per module");
        }
        crate::ui::note(&format!(
            "wrote {} ({} files, {})",
            written.dir.display(),
            written.files.len() + 1,
            crate::ui::human_bytes(written.total_size())
        ));
    }
    Ok(())
}
