//! `--model`: a preset name, a local checkpoint file or folder, or a Hugging Face repo id.

use anyhow::{bail, Context, Result};
use dynamicrafter_engine::config::presets::Preset;
use dynamicrafter_engine::ModelConfig;
use std::path::{Path, PathBuf};

/// A model ready to load: its config and weight file.
pub struct ModelSource {
    pub name: String,
    pub config: ModelConfig,
    pub weights: PathBuf,
}

/// A model named and configured, its weights not fetched yet (an API node never needs them).
pub struct ModelSpec {
    pub name: String,
    pub config: ModelConfig,
    location: Location,
}

enum Location {
    File(PathBuf),
    Hub(String),
}

impl ModelSpec {
    /// The weight file, downloaded first if it is a repo's and not in the cache.
    pub fn fetch(self) -> Result<ModelSource> {
        let weights = match self.location {
            Location::File(path) => path,
            Location::Hub(repo) => download(&repo, "model.ckpt")?,
        };
        Ok(ModelSource { name: self.name, config: self.config, weights })
    }

    /// What a shared queue is keyed by: a repo id (presets are theirs), a checkpoint file or
    /// folder by its name, so nodes that keep it at different paths still meet.
    pub fn queue_name(&self) -> String {
        match &self.location {
            Location::Hub(repo) => repo.clone(),
            Location::File(_) => {
                let given = Path::new(&self.name);
                let name = if given.is_dir() { given.file_name() } else { given.file_stem() };
                name.map_or_else(|| self.name.clone(), |n| n.to_string_lossy().into_owned())
            }
        }
    }
}

fn config_from(arg: &str) -> Result<ModelConfig> {
    if arg.ends_with(".json") {
        Ok(ModelConfig::from_json_file(Path::new(arg))?)
    } else {
        Ok(ModelConfig::preset(arg)?)
    }
}

const WEIGHT_FILES: [&str; 2] = ["model.safetensors", "model.ckpt"];

pub fn describe(model: &str, config: Option<&str>) -> Result<ModelSpec> {
    let path = Path::new(model);
    if path.is_dir() {
        let weights = WEIGHT_FILES
            .iter()
            .map(|f| path.join(f))
            .find(|p| p.is_file())
            .with_context(|| format!("model folder {}: no model.safetensors or model.ckpt inside", path.display()))?;
        let config = match config {
            Some(c) => config_from(c)?,
            None if path.join("config.json").is_file() => ModelConfig::from_json_file(&path.join("config.json"))?,
            None => bail!(
                "model folder {} has no config.json: pass --config with a preset ({}) or a config.json",
                path.display(),
                Preset::names()
            ),
        };
        return Ok(ModelSpec { name: model.to_string(), config, location: Location::File(weights) });
    }
    if path.is_file() {
        let Some(c) = config else {
            bail!("model file {}: pass --config with a preset ({}) or a config.json", path.display(), Preset::names())
        };
        return Ok(ModelSpec { name: model.to_string(), config: config_from(c)?, location: Location::File(path.to_path_buf()) });
    }
    let (repo, preset) = match (Preset::from_name(model), Preset::from_repo(model)) {
        (Some(p), _) => (p.repo().to_string(), Some(p)),
        (None, preset) if model.contains('/') && !model.starts_with(['.', '/']) && model.split('/').count() == 2 => {
            (model.to_string(), preset)
        }
        _ => bail!(
            "unknown model '{model}': not a file or folder, a preset ({}), or a Hugging Face repo id (owner/name)",
            Preset::names()
        ),
    };
    let config = match (config, preset) {
        (Some(c), _) => config_from(c)?,
        (None, Some(p)) => p.config(),
        (None, None) => bail!("repo {repo}: pass --config with a preset ({}) or a config.json", Preset::names()),
    };
    Ok(ModelSpec { name: repo.clone(), config, location: Location::Hub(repo) })
}

/// The file from the standard Hugging Face cache (`HF_HOME` respected), downloading it with a
/// progress bar if it is not there yet.
fn download(repo: &str, file: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    if let Some(p) = cache.model(repo.to_string()).get(file) {
        return Ok(p);
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let where_to = cache.path().join(format!("models--{}", repo.replace('/', "--")));
    let hint = format!(
        "{file} of {repo} is not in the Hugging Face cache ({}); download it (e.g. `huggingface-cli download {repo} {file}`) \
         or pass --model /path/to/{file} --config <preset>",
        where_to.display()
    );
    if offline {
        bail!("{hint} (HF_HUB_OFFLINE is set)");
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env().with_progress(true).build().context("Hugging Face client")?;
    api.model(repo.to_string()).get(file).map_err(|e| anyhow::anyhow!("{hint}: download failed: {e}"))
}
