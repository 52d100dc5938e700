//! The command line, as clap definitions only. Every flag's doc comment is
//! its `--help` text and its entry in the generated man page.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Merge and compose LoRA adapters.
///
/// lora-merge combines many LoRA adapters into one PEFT adapter: an exact
/// weighted sum (lossless), its best low-rank approximation, PEFT's
/// `linear` averaging, or PEFT's TIES, DARE and magnitude-pruning merges. Inputs are memory-mapped and validated strictly;
/// outputs are written atomically with a provenance manifest.
///
/// Adapters and base models are local paths or Hugging Face Hub references:
/// OWNER/NAME[@REVISION] (when no local path of that name exists) or
/// hf://OWNER/NAME[@REVISION][/PATH], where REVISION is a branch, a tag or a
/// full commit sha (default: main). Only the files needed are downloaded
/// (never pickled weights), into the cache Python's huggingface_hub uses
/// (HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub); the
/// manifest records each input's commit. HF_HUB_OFFLINE=1 reads the cache
/// only. HF_ENDPOINT, HF_TOKEN and HF_TOKEN_PATH are honoured.
///
/// Results go to stdout (reports, `--json`); progress, notes and errors to
/// stderr.
///
/// Exit status, the same for every command: 0 success; 1 the request is at
/// fault and the user can fix it (an unknown or bad flag, an invalid or
/// incompatible input, a refused output directory, a training run that
/// diverged, `verify` found a difference, the Hub refused); 2 the
/// environment failed (I/O, network, out of memory, or an internal error).
#[derive(Debug, Parser)]
#[command(name = "lora-merge", version, propagate_version = true)]
#[command(
    after_help = "Examples:\n  lora-merge inspect ./adapter-a ./adapter-b\n  \
lora-merge uniform --adapters ./a ./b ./c -o merged\n  \
lora-merge uniform --adapters ./a ./b --weights 0.7 0.3 --method svd --rank 16 -o merged\n  \
lora-merge uniform --adapters ./a ./b ./c --method ties --density 0.2 --rank 16 -o merged\n  \
lora-merge uniform --adapters owner/adapter-a@v1 hf://owner/collection/style-b -o merged\n  \
lora-merge verify merged\n  \
lora-merge push merged --repo me/merged-adapter"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Report the tool, libtorch and CUDA versions, the Hub cache and token status.
    Doctor(DoctorArgs),
    /// Describe adapters and, for several, whether they fit together.
    Inspect(InspectArgs),
    /// Merge adapters with fixed weights (equal by default); no base model needed.
    ///
    /// The merged delta of every module is sum_i w_i * s_i * B_i A_i, where s_i
    /// is adapter i's own scale (alpha/r, or alpha/sqrt(r) with rsLoRA);
    /// ties, dare-linear, dare-ties and magnitude-prune prune each delta
    /// s_i * B_i A_i first (see --method). A module that only some adapters
    /// adapt is merged from those (the others contribute nothing) and listed
    /// in the report; --strict refuses instead.
    Uniform(UniformArgs),
    /// Re-hash a merged adapter directory against its merge_manifest.json.
    ///
    /// Fails when a listed file differs or is missing, when the directory
    /// holds a file the manifest does not list, or when the manifest itself
    /// was changed: merge_manifest.sha256, written beside it in sha256sum's
    /// format, binds it. Only regular files are read.
    Verify(VerifyArgs),
    /// Upload a merged adapter directory to the Hugging Face Hub in one commit.
    ///
    /// Runs `verify` on OUT first and sends only the files its manifest lists,
    /// with the manifest and its digest: the adapter, its config, the model
    /// card (Hub front matter and provenance), merge_manifest.json and
    /// merge_manifest.sha256. Creates the repository
    /// when it does not exist (and the branch, for a --revision other than
    /// main), then prints the commit's URL.
    ///
    /// Needs a token with write access: HF_TOKEN, or the file HF_TOKEN_PATH
    /// names, or $HF_HOME/token (written by `hf auth login`). Without one,
    /// nothing is sent. The token is never printed or written anywhere.
    #[command(after_help = "Examples:\n  \
lora-merge push merged --repo me/merged-adapter\n  \
lora-merge push merged --repo me/merged-adapter --private --message 'Merge a, b and c'\n  \
lora-merge push merged --repo org/shared-adapter --create-pr --json")]
    Push(PushArgs),
    /// Measure a base model, alone or with adapters composed in, on labelled
    /// data (needs libtorch).
    ///
    /// causal-lm: the loss is the negative log-likelihood of the completion
    /// tokens (prompt tokenized with the tokenizer's special tokens, the
    /// completion without), summed over all lines and divided by the number
    /// of completion tokens; perplexity is exp(loss).
    ///
    /// classify (encoders): texts become mean-pooled, L2-normalised
    /// embeddings; each label's prototype is the mean of its --support
    /// embeddings; a --data example is right when its nearest prototype by
    /// cosine has its label.
    ///
    /// Adapters are composed into the model's linear layers, never merged into
    /// dense weights: y = W x + sum_i w_i s_i B_i A_i x.
    #[command(after_help = "Examples:\n  \
lora-merge eval --base ./Llama-3.2-1B --data heldout.jsonl\n  \
lora-merge eval --base ./Llama-3.2-1B --adapters ./a ./b --weights 0.7 0.3 --data heldout.jsonl --json\n  \
lora-merge eval --base ./all-MiniLM-L6-v2 --adapter ./topics --task classify --support shots.jsonl --data test.jsonl")]
    Eval(EvalArgs),
    /// Learn the composition weights on a few labelled examples, then merge
    /// (needs libtorch).
    ///
    /// Each adapted module gets dW = sum_i softmax(v)_i * s_i * B_i A_i, with
    /// one logit per adapter per group (module, layer or global); the factors
    /// stay frozen. The logits start equal, so step 0 is the uniform merge.
    /// Adam minimises the training loss (causal-lm: completion-token NLL as in
    /// `eval`; classify: cross-entropy over cosine similarities to class
    /// prototypes, or a linear head) while part of the shots is held out to
    /// choose the best step. With the prototype head and no class holding two
    /// training shots the loss has no positive pair, so the uniform merge is
    /// kept untrained (and the manifest says why). The learned weights are
    /// then merged exactly as `uniform` does, into OUT with the manifest
    /// (losses, weights, seed, shots hash), the model card and a heatmap of
    /// the weights, and OUT/weights.json for `uniform --weights-file`.
    ///
    /// `--optimizer gradient-free` is LoraHub's recipe instead: one free
    /// weight per adapter in [-1.5, 1.5], found by a CMA-ES search of
    /// `--budget` forward passes that minimises the training loss plus
    /// 0.05 x mean |w|; no gradients, no softmax.
    #[command(after_help = "Examples:\n  \
lora-merge fit --base ./Llama-3.2-1B --adapters ./a ./b ./c --shots shots.jsonl -o learned\n  \
lora-merge fit --base ./all-MiniLM-L6-v2 --adapters-file upstream.txt --shots k5.jsonl --task classify -o learned --granularity layer\n  \
lora-merge fit --base ./all-MiniLM-L6-v2 --adapters-file upstream.txt --shots k5.jsonl --task classify -o lorahub --optimizer gradient-free --budget 40\n  \
lora-merge fit --base ./Llama-3.2-1B --adapters ./a ./b --shots shots.jsonl -o learned --dry-run")]
    Fit(FitArgs),
    /// Train an ordinary LoRA on labelled examples (needs libtorch).
    ///
    /// The baseline that composition is measured against, and how upstream
    /// adapters are made. A new LoRA (A uniform in +-1/sqrt(in), B zero, scale
    /// alpha/r) on every --target-modules layer of the frozen base model,
    /// trained with Adam on the same losses as `fit` (causal-lm: completion
    /// tokens; classify: prototypes or a linear head). OUT is a PEFT adapter
    /// with the manifest (data hash, hyper-parameters, seed, loss curve) and a
    /// model card.
    #[command(after_help = "Examples:\n  \
lora-merge train --base ./Llama-3.2-1B --data train.jsonl -o my-lora --rank 8 --steps 200\n  \
lora-merge train --base ./all-MiniLM-L6-v2 --data topics.jsonl -o topics --target-modules query value")]
    Train(TrainArgs),
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Where adapters come from; shared by every command that reads several.
#[derive(Debug, Args)]
pub struct AdapterInputs {
    /// Adapters: a PEFT directory (adapter_config.json +
    /// adapter_model.safetensors), a diffusers directory
    /// (pytorch_lora_weights.safetensors), a directory holding one
    /// .safetensors file, or a .safetensors file: PEFT (with its
    /// adapter_config.json beside it), kohya/sd-scripts (LoRA, or LyCORIS
    /// LoHa/LoKr) or diffusers. Or the
    /// same on the Hub: OWNER/NAME[@REVISION] (when no such local path
    /// exists) or hf://OWNER/NAME[@REVISION][/PATH], PATH being a folder or a
    /// .safetensors file in the repository.
    #[arg(long = "adapters", alias = "adapter", value_name = "ADAPTER", num_args = 1..)]
    pub adapters: Vec<String>,

    /// Read more adapter references from FILE, one per line (blank lines and
    /// lines starting with # are skipped).
    #[arg(long, value_name = "FILE")]
    pub adapters_file: Option<PathBuf>,
}

/// How input files are read; shared by every command that reads adapters.
#[derive(Debug, Args)]
pub struct InputFormat {
    /// Layout of the input files. Stable Diffusion modules line up across
    /// layouts by their kohya name (lora_unet_down_blocks_0_..., with
    /// lora_te_ and lora_te1_ both meaning text_encoder); kohya UNet names
    /// after the original SGM UNet, as sd-scripts writes them for SDXL
    /// (lora_unet_input_blocks_4_1_..., middle_block_, output_blocks_), line
    /// up with diffusers' names for the same layers. A PEFT adapter merged
    /// with or written as kohya/diffusers is taken to be on the UNet, or on
    /// the first text encoder when its paths start with text_model.
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    pub format: FormatArg,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Adapters to describe (see `uniform --adapters` for the forms accepted).
    #[arg(value_name = "ADAPTER")]
    pub adapters: Vec<String>,

    /// Read more adapter references from FILE, one per line.
    #[arg(long, value_name = "FILE")]
    pub adapters_file: Option<PathBuf>,

    #[command(flatten)]
    pub input_format: InputFormat,

    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// Stack the factors: rank = sum of ranks, lossless.
    Exact,
    /// Best rank-N approximation (needs --rank) of the exact sum, computed
    /// from the factors (QR + small SVD; with many adapters a seeded subspace
    /// iteration, error within 0.1% of the best); the manifest records each
    /// module's relative error and retained energy.
    Svd,
    /// Average A and B separately, as PEFT's add_weighted_adapter "linear"
    /// does. Equal ranks only. APPROXIMATE: the cross terms B_i A_j make it
    /// differ from the weighted sum of deltas; the manifest records by how much.
    Linear,
    /// TIES (PEFT's ties_svd): keep each delta's largest --density entries,
    /// elect each entry's sign, average the agreeing ones; rank --rank by
    /// SVD. For adapters whose deltas conflict.
    Ties,
    /// DARE (PEFT's dare_linear_svd): keep each entry with probability
    /// --density (--seed), rescale by 1/density, weighted sum; rank --rank
    /// by SVD. To thin out redundant deltas.
    DareLinear,
    /// DARE's random pruning, then TIES' sign election and mean (PEFT's
    /// dare_ties_svd); rank --rank by SVD. Many adapters that conflict.
    DareTies,
    /// Keep each delta's largest --density entries, weighted sum (PEFT's
    /// magnitude_prune_svd); rank --rank by SVD. TIES without the election.
    MagnitudePrune,
}

impl MethodArg {
    /// ties, dare-linear, dare-ties, magnitude-prune: prune dense deltas.
    pub fn prunes(self) -> bool {
        matches!(
            self,
            MethodArg::Ties
                | MethodArg::DareLinear
                | MethodArg::DareTies
                | MethodArg::MagnitudePrune
        )
    }

    /// dare-linear and dare-ties: drop entries at random.
    pub fn is_random(self) -> bool {
        matches!(self, MethodArg::DareLinear | MethodArg::DareTies)
    }

    /// ties and dare-ties: elect a sign per entry.
    pub fn elects_sign(self) -> bool {
        matches!(self, MethodArg::Ties | MethodArg::DareTies)
    }

    pub fn name(self) -> &'static str {
        match self {
            MethodArg::Exact => "exact",
            MethodArg::Svd => "svd",
            MethodArg::Linear => "linear",
            MethodArg::Ties => "ties",
            MethodArg::DareLinear => "dare-linear",
            MethodArg::DareTies => "dare-ties",
            MethodArg::MagnitudePrune => "magnitude-prune",
        }
    }
}

/// How TIES elects each entry's sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MajoritySignArg {
    /// The sign of the sum of the pruned deltas.
    Total,
    /// The sign most pruned deltas have.
    Frequency,
}

/// Adapter file layouts, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Detect each file's layout from its keys and metadata.
    Auto,
    /// PEFT: adapter_config.json + base_model.model.<path>.lora_A.weight.
    Peft,
    /// kohya/sd-scripts: lora_unet_*/lora_te*_* keys with .lora_down.weight,
    /// .lora_up.weight and .alpha (missing or 0 means alpha = rank); also
    /// LyCORIS LoHa (.hada_w1_a/_b, .hada_w2_a/_b) and LoKr (.lokr_w1[_a/_b],
    /// .lokr_w2[_a/_b]) modules, read as exact LoRA factors. Tucker cores,
    /// dora_scale, OFT and full diffs are refused.
    Kohya,
    /// diffusers: unet.*/text_encoder.*/text_encoder_2.* keys with
    /// .lora_A.weight/.lora_B.weight, optional lora_adapter_metadata.
    Diffusers,
}

/// Adapter file layouts, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormatArg {
    /// adapter_model.safetensors + adapter_config.json.
    Peft,
    /// lora.safetensors with .alpha = rank per module and the inputs'
    /// ss_*/modelspec.* metadata that still holds. UNet modules get SGM names
    /// (lora_unet_input_blocks_...) when any kohya input used them, else
    /// diffusers' names (lora_unet_down_blocks_...).
    Kohya,
    /// pytorch_lora_weights.safetensors with lora_adapter_metadata.
    Diffusers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

/// Where a command writes its adapter directory; shared by every command
/// that writes one.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Output directory: the adapter, merge_manifest.json and a model card
    /// (README.md). It appears whole or not at all. It may not be, hold, or
    /// lie inside any input (adapters, --adapters-file, --base, --shots,
    /// --data), --force or not.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: PathBuf,

    /// Replace an existing non-empty output directory.
    #[arg(long)]
    pub force: bool,
}

/// How a weighted sum of adapters becomes one adapter; the same options,
/// with the same meaning, for `uniform` and `fit`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// How the weighted sum becomes one adapter.
    #[arg(long, value_enum, default_value_t = MethodArg::Exact)]
    pub method: MethodArg,

    /// Output rank per module for --method svd, ties, dare-linear, dare-ties
    /// and magnitude-prune: N, or `auto` for each module's own rank, the
    /// smallest that meets --energy or --tolerance (at most --max-rank);
    /// per-module ranks go to the config's rank_pattern.
    #[arg(long, value_name = "N|auto", value_parser = parse_rank)]
    pub rank: Option<RankArg>,

    /// With --rank auto: the smallest rank keeping at least this fraction,
    /// in (0, 1], of each module's squared Frobenius norm (its energy).
    #[arg(long, value_name = "F")]
    pub energy: Option<f64>,

    /// With --rank auto: the smallest rank whose relative Frobenius error
    /// is at most this, in [0, 1).
    #[arg(long, value_name = "F")]
    pub tolerance: Option<f64>,

    /// With --rank auto: no module's rank above N (serving stacks cap it).
    #[arg(long, value_name = "N")]
    pub max_rank: Option<usize>,

    /// Output rank of convolutions with a spatial kernel (3x3) for the
    /// methods that take --rank (default: --rank); 1x1 convolutions get
    /// --rank.
    #[arg(long, value_name = "N")]
    pub conv_rank: Option<usize>,

    /// Fraction of each adapter's delta entries kept, in (0, 1], for --method
    /// ties, dare-linear, dare-ties and magnitude-prune (required: PEFT has
    /// no default either; the TIES paper uses 0.2). 1 prunes nothing.
    #[arg(long, value_name = "F")]
    pub density: Option<f64>,

    /// How --method ties and dare-ties elect each entry's sign (default:
    /// total, as PEFT).
    #[arg(long, value_enum, value_name = "HOW")]
    pub majority_sign: Option<MajoritySignArg>,

    /// Element type of the written tensors (default: the inputs' type when
    /// they all agree, else f32). Math is always done in f32 or f64.
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,

    /// Refuse modules that only some adapters adapt.
    #[arg(long)]
    pub strict: bool,

    /// Merge adapters that name different base models.
    #[arg(long)]
    pub allow_base_mismatch: bool,
}

/// `--rank`: a number, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankArg {
    Fixed(usize),
    Auto,
}

fn parse_rank(s: &str) -> std::result::Result<RankArg, String> {
    if s == "auto" {
        return Ok(RankArg::Auto);
    }
    s.parse::<usize>()
        .map(RankArg::Fixed)
        .map_err(|_| format!("expected a whole number or `auto`, got {s:?}"))
}

#[derive(Debug, Args)]
pub struct UniformArgs {
    #[command(flatten)]
    pub inputs: AdapterInputs,

    #[command(flatten)]
    pub out: OutputArgs,

    #[command(flatten)]
    pub input_format: InputFormat,

    /// Layout of the merged adapter (default: the inputs' layout; inputs in
    /// different layouts need it given).
    #[arg(long, value_enum)]
    pub output_format: Option<OutputFormatArg>,

    /// One weight per adapter, in order (default: 1/N each; 1 each for ties
    /// and dare-ties, whose merge already averages the agreeing adapters).
    /// Weights are used as given: they are not normalised, and may be
    /// negative.
    #[arg(long, value_name = "W", num_args = 1.., allow_negative_numbers = true)]
    pub weights: Vec<f64>,

    /// Per-module weights: a JSON object mapping module-name regexes to one
    /// weight per adapter, e.g. {"down_blocks\\.0\\.": [1, 0], "layers\\.(2[4-9]|3[01])\\.":
    /// [0.3, 0.7]}. The first rule in the file that matches a module (its
    /// name, or a Stable Diffusion module's diffusers path) gives its weights;
    /// other modules get --weights (or the default). A rule that matches no
    /// module is refused. `fit` writes its learned weights in this format
    /// (weights.json), to merge again with another method or rank.
    #[arg(long, value_name = "FILE")]
    pub weights_file: Option<PathBuf>,

    #[command(flatten)]
    pub merge: MergeArgs,

    /// Seed of --method dare-linear and dare-ties (default: 0). Each module
    /// and adapter draws from its own stream, derived from the seed, the
    /// module's name and the adapter's position, so one seed always gives
    /// the same bytes.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Print the merge report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// A directory written by lora-merge (checked with `verify` first).
    #[arg(value_name = "OUT")]
    pub dir: PathBuf,

    /// The model repository to push to, OWNER/NAME; created when missing.
    #[arg(long, value_name = "OWNER/NAME")]
    pub repo: String,

    /// The branch to commit to; created from main when missing.
    #[arg(long, value_name = "BRANCH", default_value = "main")]
    pub revision: String,

    /// Create the repository as private (an existing repository keeps its
    /// visibility).
    #[arg(long)]
    pub private: bool,

    /// Open a pull request with the commit instead of committing to the
    /// branch.
    #[arg(long)]
    pub create_pr: bool,

    /// The commit message.
    #[arg(
        long,
        value_name = "TEXT",
        default_value = "Upload merged LoRA adapter (lora-merge)"
    )]
    pub message: String,

    /// Print {"repo", "revision", "commit", "url"} as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A directory written by lora-merge.
    #[arg(value_name = "OUT")]
    pub dir: PathBuf,

    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Which task the examples are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskArg {
    /// JSON Lines of {"prompt", "completion"} (or {"input", "output"}).
    CausalLm,
    /// JSON Lines of {"text", "label"}.
    Classify,
}

/// Where tensors live: `auto` (CUDA when available, else CPU), `cpu`,
/// `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceArg::Auto),
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceArg::Cuda)
                .ok_or_else(|| format!("{s:?} is not a device (auto, cpu, cuda or cuda:N)")),
        }
    }
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The base model: a directory with config.json, tokenizer.json and
    /// model.safetensors (or shards with model.safetensors.index.json), or a
    /// Hub repository holding them (OWNER/NAME[@REVISION] or
    /// hf://OWNER/NAME[@REVISION][/PATH]; only those files are downloaded).
    /// Llama, Mistral and Qwen2 causal LMs; BERT encoders.
    #[arg(long, value_name = "MODEL")]
    pub base: String,

    /// Adapters to compose into the model (none: the base model alone).
    /// `--adapter A` is the same as `--adapters A`.
    #[arg(long = "adapters", alias = "adapter", value_name = "ADAPTER", num_args = 1..)]
    pub adapters: Vec<String>,

    /// Read more adapter references from FILE, one per line.
    #[arg(long, value_name = "FILE")]
    pub adapters_file: Option<PathBuf>,

    /// One weight per adapter, in order (default: 1/N each), used as given.
    #[arg(long, value_name = "W", num_args = 1.., allow_negative_numbers = true)]
    pub weights: Vec<f64>,

    /// The examples to measure on (JSON Lines).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,

    /// The task (default: causal-lm for decoders, classify for encoders).
    #[arg(long, value_enum)]
    pub task: Option<TaskArg>,

    /// classify: labelled examples whose embeddings make the class
    /// prototypes (JSON Lines of {"text", "label"}).
    #[arg(long, value_name = "FILE")]
    pub support: Option<PathBuf>,

    /// Examples per forward pass.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub batch_size: usize,

    /// Longest input in tokens (default: the model's max_position_embeddings).
    /// classify: longer texts are truncated; causal-lm: a longer example is
    /// an error naming its line, since cutting it would change the loss.
    #[arg(long, value_name = "N")]
    pub max_length: Option<usize>,

    /// auto (CUDA when available, else CPU), cpu, cuda or cuda:N.
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: DeviceArg,

    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// How composition weights are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GranularityArg {
    /// One weight vector per adapted module (as the paper's authors do).
    Module,
    /// One per transformer layer.
    Layer,
    /// One for the whole model.
    Global,
}

/// How `fit` learns its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    /// Adam on the softmax logits of every weight group.
    Adam,
    /// CMA-ES over one weight per adapter, no gradients (LoraHub).
    GradientFree,
}

/// The classifier used by `fit --task classify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HeadArg {
    /// No new parameters: cosine similarity to class prototypes (mean
    /// embedding of each class's shots), episodic leave-one-out loss.
    Prototype,
    /// A linear layer over the embeddings, initialised to 10x the
    /// prototypes and trained with the weights; saved in OUT (head.safetensors,
    /// labels.json).
    Linear,
}

#[derive(Debug, Args)]
pub struct FitArgs {
    /// The base model directory (config.json, tokenizer.json, safetensors),
    /// or a Hub repository holding them (as for `eval --base`).
    #[arg(long, value_name = "MODEL")]
    pub base: String,

    #[command(flatten)]
    pub inputs: AdapterInputs,

    /// The labelled examples (JSON Lines; see --task). A repeated example
    /// (the same text and label as an earlier line) is used once, with a
    /// warning, so that it is never both trained on and held out; a text
    /// given two labels, or a label written both as a number and as a
    /// string, is refused.
    #[arg(long, value_name = "FILE")]
    pub shots: PathBuf,

    #[command(flatten)]
    pub out: OutputArgs,

    /// The task (default: causal-lm for decoders, classify for encoders).
    #[arg(long, value_enum)]
    pub task: Option<TaskArg>,

    /// Which modules share a weight vector (default: module; the
    /// gradient-free optimizer learns one for the whole model).
    #[arg(long, value_enum)]
    pub granularity: Option<GranularityArg>,

    /// How the weights are learned. adam (default): gradient steps on
    /// softmax weights, from the uniform merge. gradient-free: LoraHub's
    /// recipe, a CMA-ES search of one weight per adapter in [-1.5, 1.5]
    /// with an L1 penalty, forward passes only (see --budget).
    #[arg(long, value_enum, default_value_t = OptimizerArg::Adam)]
    pub optimizer: OptimizerArg,

    /// --optimizer gradient-free: evaluations of the loss on the training
    /// shots (one forward pass each), the uniform merge first [default: 40,
    /// LoraHub's].
    #[arg(long, value_name = "N")]
    pub budget: Option<usize>,

    /// Optimisation steps (--optimizer adam).
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub steps: usize,

    /// Learning rate of the composition logits (--optimizer adam).
    #[arg(long, value_name = "F", default_value_t = 0.05)]
    pub lr: f64,

    /// Learning rate of the linear head (--head linear).
    #[arg(long, value_name = "F", default_value_t = 0.01)]
    pub head_lr: f64,

    /// Training examples per step (all of them when there are fewer).
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub batch_size: usize,

    /// Share of the shots held out to choose the best step. classify: per
    /// class, always leaving one training shot per class; causal-lm: none
    /// when there are fewer than 4 shots. Without held-out shots the last
    /// step is kept.
    #[arg(long, value_name = "F", default_value_t = 0.25)]
    pub val_fraction: f64,

    /// Seed of the split, the batches and libtorch, and of --method
    /// dare-linear and dare-ties as for `uniform --seed`. CPU runs with the
    /// same seed and thread count give identical results.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,

    /// auto (CUDA when available, else CPU), cpu, cuda or cuda:N.
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: DeviceArg,

    // How the learned weighted sum becomes one adapter, as for `uniform`.
    #[command(flatten)]
    pub merge: MergeArgs,

    /// classify: prototype (no new parameters) or linear head.
    #[arg(long, value_enum, default_value_t = HeadArg::Prototype)]
    pub head: HeadArg,

    /// Longest input in tokens (default: the model's limit); classify texts
    /// are truncated, longer causal-lm examples are an error.
    #[arg(long, value_name = "N")]
    pub max_length: Option<usize>,

    /// Print the plan (adapters, modules, groups, trainable parameters,
    /// memory estimate) and exit.
    #[arg(long)]
    pub dry_run: bool,

    /// Print the final report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The base model directory (config.json, tokenizer.json, safetensors).
    #[arg(long, value_name = "MODEL")]
    pub base: String,

    /// The labelled examples (JSON Lines; see --task). A repeated example
    /// (the same text and label as an earlier line) is used once, with a
    /// warning; a text given two labels, or a label written both as a number
    /// and as a string, is refused.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,

    #[command(flatten)]
    pub out: OutputArgs,

    /// The task (default: causal-lm for decoders, classify for encoders).
    #[arg(long, value_enum)]
    pub task: Option<TaskArg>,

    /// LoRA rank.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub rank: usize,

    /// LoRA alpha (scale = alpha / rank).
    #[arg(long, value_name = "F", default_value_t = 16.0)]
    pub alpha: f64,

    /// Layers to adapt, PEFT-style: a layer matches NAME when its path is
    /// NAME or ends in .NAME (default: q_proj v_proj for decoders, query
    /// value for BERT).
    #[arg(long, value_name = "NAME", num_args = 1..)]
    pub target_modules: Vec<String>,

    /// Start from this PEFT adapter's factors instead of a new LoRA, and keep
    /// training them: its modules, ranks and scales replace --target-modules,
    /// --rank and --alpha (which cannot be given with it). E.g. the exact
    /// merge `fit` wrote, to tune the composition further on the same shots.
    #[arg(long, value_name = "ADAPTER", conflicts_with_all = ["rank", "alpha", "target_modules"])]
    pub init: Option<String>,

    /// Optimisation steps (Adam).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub steps: usize,

    /// Learning rate of the LoRA factors.
    #[arg(long, value_name = "F", default_value_t = 1e-3)]
    pub lr: f64,

    /// Learning rate of the linear head (--head linear).
    #[arg(long, value_name = "F", default_value_t = 0.01)]
    pub head_lr: f64,

    /// Training examples per step (all of them when there are fewer).
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub batch_size: usize,

    /// Share of the examples held out to choose the step kept: every step
    /// is scored on them and the one with the lowest held-out loss is
    /// written (step 0 included, so with --init a tuning that does not help
    /// keeps the adapter given). Split as `fit` splits with the same --seed
    /// (classify: per class, always leaving one training example per class).
    /// Default 0: every example trains and the last step is kept.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub val_fraction: f64,

    /// Seed of the initialisation, the split, the batches and libtorch.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,

    /// classify: prototype (no new parameters) or linear head.
    #[arg(long, value_enum, default_value_t = HeadArg::Prototype)]
    pub head: HeadArg,

    /// Longest input in tokens (default: the model's limit).
    #[arg(long, value_name = "N")]
    pub max_length: Option<usize>,

    /// auto (CUDA when available, else CPU), cpu, cuda or cuda:N.
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: DeviceArg,

    /// Print the final report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}
