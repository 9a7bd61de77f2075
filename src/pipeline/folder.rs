//! A diffusers pipeline folder: `model_index.json`, `transformer/`,
//! `scheduler/scheduler_config.json`, and an optional `vae/`.
//!
//! `model_index.json` lists the components (`"vae": ["diffusers", "AutoencoderKL"]`); a
//! component listed there must exist as a folder. Without a `vae` entry the pipeline works in
//! pixel space and the final latents are the image. Text encoders and tokenizers may be
//! listed too; they are not read (prompts come in as embeddings).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::PipelineError;

/// The parts of a pipeline folder, checked for presence.
#[derive(Debug)]
pub struct Folder {
    /// `_class_name` of `model_index.json` (e.g. `DiTPipeline`).
    pub pipeline_class: String,
    /// `id2label` of `model_index.json` (DiTPipeline's class names), if any.
    pub labels: BTreeMap<usize, String>,
    pub transformer: PathBuf,
    pub scheduler_config: PathBuf,
    pub vae: Option<PathBuf>,
}

fn err(path: &Path, reason: impl Into<String>) -> PipelineError {
    PipelineError::Folder {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a file as text, naming it in the error.
pub fn read_text(path: &Path) -> Result<String, PipelineError> {
    std::fs::read_to_string(path).map_err(|e| err(path, format!("cannot read: {e}")))
}

impl Folder {
    pub fn open(dir: &Path) -> Result<Folder, PipelineError> {
        if !dir.is_dir() {
            return Err(err(dir, "no such directory"));
        }
        let index_path = dir.join("model_index.json");
        if !index_path.is_file() {
            let hint = if dir.join("config.json").is_file() {
                " (this looks like a single model folder; a pipeline folder holds \
                 model_index.json, transformer/, scheduler/ and optionally vae/)"
            } else {
                ""
            };
            return Err(err(
                dir,
                format!("model_index.json is missing: not a diffusers pipeline folder{hint}"),
            ));
        }
        let index = parse_index(&read_text(&index_path)?, &index_path)?;
        let pipeline_class = index.class_name;
        let labels = index.labels;

        let component = |name: &str, required: bool| -> Result<Option<PathBuf>, PipelineError> {
            let listed = index.components.get(name).copied().unwrap_or(false);
            if !listed {
                if required {
                    return Err(err(
                        &index_path,
                        format!("lists no `{name}` component (a generation pipeline needs one)"),
                    ));
                }
                return Ok(None);
            }
            let sub = dir.join(name);
            if !sub.is_dir() {
                return Err(err(
                    &sub,
                    format!("missing: model_index.json lists a `{name}` component but the folder does not exist"),
                ));
            }
            Ok(Some(sub))
        };
        let transformer = component("transformer", true)?.unwrap_or_default();
        if !transformer.join("config.json").is_file() {
            return Err(err(
                &transformer.join("config.json"),
                "missing: the transformer folder needs its config.json",
            ));
        }
        let scheduler = component("scheduler", true)?.unwrap_or_default();
        let scheduler_config = scheduler.join("scheduler_config.json");
        if !scheduler_config.is_file() {
            return Err(err(&scheduler_config, "missing"));
        }
        let vae = component("vae", false)?;
        if let Some(v) = &vae {
            if !v.join("config.json").is_file() {
                return Err(err(
                    &v.join("config.json"),
                    "missing: the vae folder needs its config.json",
                ));
            }
        }
        Ok(Folder {
            pipeline_class,
            labels,
            transformer,
            scheduler_config,
            vae,
        })
    }
}

/// What `model_index.json` says.
pub struct ModelIndex {
    pub class_name: String,
    /// Component name -> listed with a (library, class) pair (`null` entries are absent).
    pub components: BTreeMap<String, bool>,
    pub labels: BTreeMap<usize, String>,
}

pub fn parse_index(text: &str, path: &Path) -> Result<ModelIndex, PipelineError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| err(path, format!("invalid JSON: {e}")))?;
    let map = value
        .as_object()
        .ok_or_else(|| err(path, "must be a JSON object"))?;
    let class_name = map
        .get("_class_name")
        .and_then(|v| v.as_str())
        .ok_or_else(|| err(path, "missing `_class_name`"))?
        .to_string();
    let components = map
        .iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .filter_map(|(k, v)| {
            // diffusers writes components as [library, class]; [null, null] means absent.
            let arr = v.as_array()?;
            let listed = arr.len() == 2 && arr.iter().all(|x| x.is_string());
            Some((k.clone(), listed))
        })
        .collect();
    let mut labels = BTreeMap::new();
    if let Some(obj) = map.get("id2label").and_then(|v| v.as_object()) {
        for (k, v) in obj {
            if let (Ok(i), Some(name)) = (k.parse::<usize>(), v.as_str()) {
                labels.insert(i, name.to_string());
            }
        }
    }
    Ok(ModelIndex {
        class_name,
        components,
        labels,
    })
}
