//! Reading and writing `model.safetensors` (single file or sharded with
//! `model.safetensors.index.json`) under Hugging Face tensor names.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{io_err, ModelError, Result};

/// Tensors of a checkpoint keyed by name (as stored; [`Weights::strip_prefix`] removes a
/// backbone prefix such as `transformer.` or `model.`).
pub struct Weights {
    tensors: HashMap<String, (Tensor, PathBuf)>,
    /// Non-float tensors that were not loaded: name → (dtype, file).
    skipped: HashMap<String, (String, PathBuf)>,
    /// What the weights were read from (a file, or the shard index), for messages.
    pub source: PathBuf,
}

impl Weights {
    /// Reads `model.safetensors` or, failing that, the shards listed by
    /// `model.safetensors.index.json` in `dir`, converting float tensors to `dtype`.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            let mut w = Self {
                tensors: HashMap::new(),
                skipped: HashMap::new(),
                source: single.clone(),
            };
            w.read_file(&single, dtype, device)?;
            return Ok(w);
        }
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: index.clone(),
                source,
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Config {
                    path: index.clone(),
                    field: "weight_map".into(),
                    msg: "expected an object mapping tensor names to shard files".into(),
                })?;
            let mut shards: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            shards.sort_unstable();
            shards.dedup();
            let mut w = Self {
                tensors: HashMap::new(),
                skipped: HashMap::new(),
                source: index.clone(),
            };
            for shard in shards {
                w.read_file(&dir.join(shard), dtype, device)?;
            }
            return Ok(w);
        }
        Err(ModelError::Io {
            path: single,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors (or model.safetensors.index.json) in this directory; \
                 hint: PyTorch .bin checkpoints are not read — re-save with safe_serialization=True",
            ),
        })
    }

    /// Reads one safetensors file (e.g. a PEFT `adapter_model.safetensors`), converting float
    /// tensors to `dtype`.
    pub fn from_file(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let mut w = Self {
            tensors: HashMap::new(),
            skipped: HashMap::new(),
            source: path.to_path_buf(),
        };
        w.read_file(path, dtype, device)?;
        Ok(w)
    }

    /// Removes `prefix` (e.g. `transformer.`) from every name that starts with it, so that a
    /// causal-LM checkpoint and one saved from the bare backbone class read alike.
    pub fn strip_prefix(&mut self, prefix: &str) {
        fn rename<V>(m: &mut HashMap<String, V>, prefix: &str) {
            let keys: Vec<String> = m.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
            for k in keys {
                if let Some(v) = m.remove(&k) {
                    m.insert(k[prefix.len()..].to_string(), v);
                }
            }
        }
        rename(&mut self.tensors, prefix);
        rename(&mut self.skipped, prefix);
    }

    /// Drops the tensors whose name `drop` selects (buffers such as `rotary_emb.inv_freq`
    /// that old converters wrote and no loader reads).
    pub fn drop_matching(&mut self, drop: impl Fn(&str) -> bool) {
        self.tensors.retain(|k, _| !drop(k));
    }

    /// Takes a tensor of any shape, if present.
    pub fn take_any(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name).map(|(t, _)| t)
    }

    /// Names of non-float tensors that were skipped (sorted).
    pub fn skipped(&self) -> Vec<String> {
        let mut v: Vec<String> = self.skipped.keys().cloned().collect();
        v.sort();
        v
    }

    /// Reads one safetensors file into this set.
    pub fn read_file(&mut self, path: &Path, dtype: DType, device: &Device) -> Result<()> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        for (name, view) in st.tensors() {
            let src = match view.dtype() {
                StDtype::F32 => DType::F32,
                StDtype::F16 => DType::F16,
                StDtype::BF16 => DType::BF16,
                StDtype::F64 => DType::F64,
                // Non-float buffers (e.g. the causal-mask `attn.bias` of old checkpoints) are
                // not weights; they are skipped, and asking for one reports its dtype.
                other => {
                    self.skipped
                        .insert(name.clone(), (format!("{other:?}"), path.to_path_buf()));
                    continue;
                }
            };
            let t = Tensor::from_raw_buffer(view.data(), src, view.shape(), device)?.to_dtype(dtype)?;
            self.tensors.insert(name, (t, path.to_path_buf()));
        }
        Ok(())
    }

    /// Takes a tensor, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Some((t, path)) = self.tensors.remove(name) else {
            return Err(match self.skipped.get(name) {
                Some((dtype, path)) => ModelError::Dtype {
                    path: path.clone(),
                    name: name.into(),
                    got: dtype.clone(),
                },
                None => ModelError::MissingTensor {
                    path: self.source.clone(),
                    name: name.to_string(),
                },
            });
        };
        if t.dims() != shape {
            return Err(ModelError::Shape {
                path,
                name: name.into(),
                got: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(t)
    }

    /// Takes a tensor if present, checking its shape.
    pub fn take_opt(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.tensors.contains_key(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Whether a tensor is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Names not taken yet (sorted).
    pub fn remaining(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }
}

/// Writes tensors to one safetensors file with `{"format": "pt"}` metadata (which
/// transformers requires), via a temporary file renamed into place.
pub fn save_safetensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let mut owned: Vec<(String, DType, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.contiguous()?;
        let (dtype, bytes) = match t.dtype() {
            DType::F32 => (DType::F32, bytes_of(&t.flatten_all()?.to_vec1::<f32>()?)),
            DType::BF16 => {
                let v = t.flatten_all()?.to_vec1::<half::bf16>()?;
                (DType::BF16, v.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            DType::F16 => {
                let v = t.flatten_all()?.to_vec1::<half::f16>()?;
                (DType::F16, v.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            _ => {
                let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                (DType::F32, bytes_of(&v))
            }
        };
        owned.push((name.clone(), dtype, t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            let dt = match d {
                DType::BF16 => StDtype::BF16,
                DType::F16 => StDtype::F16,
                _ => StDtype::F32,
            };
            safetensors::tensor::TensorView::new(dt, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| ModelError::Safetensors {
                    path: path.to_path_buf(),
                    msg: e.to_string(),
                })
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let data = safetensors::serialize(views, Some(meta)).map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    write_atomic(path, &data)
}

fn bytes_of(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes a file via `<path>.tmp` and a rename, so readers never see a partial file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(data).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))
}
