//! Data sets from `.npz` files, and measuring a model on them: accuracy
//! against labels, top-1 agreement and output SQNR against a reference model.

use crate::Error;
use ndarray_npy::NpzReader;
use qgraph_eval::Evaluator;
use qgraph_ir::ndarray::{ArrayD, Axis, IxDyn};
use qgraph_ir::{Model, Tensor};
use std::fs::File;
use std::path::Path;

/// Input normalisation applied after uint8 data is scaled to [0, 1].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// Per-channel ImageNet mean and standard deviation (RGB).
    Imagenet,
    /// TensorFlow style: `(x_u8 - 127) / 128`.
    Tf,
    /// Nothing more: uint8 data is scaled to [0, 1], float data is used as is.
    None,
}

/// The metadata key under which the input normalisation a model expects is
/// recorded (by `qgraph insert` and `qgraph train`).
pub const NORM_KEY: &str = "qgraph.norm";

impl Norm {
    /// The name the command line and the metadata use.
    pub fn name(self) -> &'static str {
        match self {
            Norm::Imagenet => "imagenet",
            Norm::Tf => "tf",
            Norm::None => "none",
        }
    }

    pub fn parse(name: &str) -> Option<Norm> {
        [Norm::Imagenet, Norm::Tf, Norm::None]
            .into_iter()
            .find(|n| n.name() == name)
    }
}

/// The normalisation recorded in `model`'s metadata, if any; an unknown
/// name is an error naming it.
pub fn recorded_norm(model: &Model) -> Result<Option<Norm>, crate::Error> {
    match crate::meta_value(model, NORM_KEY) {
        None => Ok(None),
        Some(v) => Norm::parse(v).map(Some).ok_or_else(|| {
            crate::Error::msg(format!(
                "metadata {NORM_KEY} = '{v}' is not a normalisation (imagenet, tf, none)"
            ))
        }),
    }
}

/// Records in `model`'s metadata that its inputs are normalised by `norm`.
pub fn record_norm(model: &mut Model, norm: Norm) {
    crate::set_meta_value(model, NORM_KEY, norm.name().to_string());
}

enum Samples {
    U8(ArrayD<u8>),
    F32(ArrayD<f32>),
    /// Image files, decoded a batch at a time.
    Images {
        files: Vec<std::path::PathBuf>,
        preprocess: Preprocess,
    },
}

/// How image files become samples: the shorter side resized to `resize`
/// (bilinear), then a centred `crop` x `crop` square, RGB (or luma with
/// `gray`) scaled to [0, 1], channels first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Preprocess {
    pub resize: Option<u32>,
    pub crop: Option<u32>,
    pub gray: bool,
}

impl Preprocess {
    /// Parses `resize=256,crop=224,norm=imagenet,gray`; the normalisation,
    /// when given, is returned beside.
    pub fn parse(spec: &str) -> Result<(Preprocess, Option<Norm>), String> {
        let mut p = Preprocess::default();
        let mut norm = None;
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            let size = || {
                value
                    .parse::<u32>()
                    .ok()
                    .filter(|&v| v > 0)
                    .ok_or_else(|| format!("'{key}' needs a positive size, not '{value}'"))
            };
            match key {
                "resize" => p.resize = Some(size()?),
                "crop" => p.crop = Some(size()?),
                "gray" if value.is_empty() => p.gray = true,
                "norm" => {
                    norm = Some(match value {
                        "imagenet" => Norm::Imagenet,
                        "tf" => Norm::Tf,
                        "none" => Norm::None,
                        other => return Err(format!("unknown norm '{other}' (imagenet, tf, none)")),
                    })
                }
                other => {
                    return Err(format!(
                        "unknown preprocessing step '{other}' (resize=N, crop=N, norm=imagenet|tf|none, gray)"
                    ))
                }
            }
        }
        Ok((p, norm))
    }

    /// One image file as a [C, H, W] array in [0, 1].
    fn load(&self, path: &Path) -> Result<ArrayD<f32>, String> {
        use image::imageops::FilterType;
        let img = image::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let img = match self.resize {
            Some(r) => {
                let (w, h) = (img.width().max(1), img.height().max(1));
                let (nw, nh) = if w <= h {
                    (r, ((h as u64 * r as u64) / w as u64).max(1) as u32)
                } else {
                    (((w as u64 * r as u64) / h as u64).max(1) as u32, r)
                };
                img.resize_exact(nw, nh, FilterType::Triangle)
            }
            None => img,
        };
        let img = match self.crop {
            Some(c) => {
                if img.width() < c || img.height() < c {
                    return Err(format!(
                        "{}: {}x{} is smaller than the crop {c}",
                        path.display(),
                        img.width(),
                        img.height()
                    ));
                }
                img.crop_imm((img.width() - c) / 2, (img.height() - c) / 2, c, c)
            }
            None => img,
        };
        let (w, h) = (img.width() as usize, img.height() as usize);
        if self.gray {
            let luma = img.to_luma8();
            Ok(ArrayD::from_shape_fn(vec![1, h, w], |i| {
                luma.get_pixel(i[2] as u32, i[1] as u32).0[0] as f32 / 255.0
            }))
        } else {
            let rgb = img.to_rgb8();
            Ok(ArrayD::from_shape_fn(vec![3, h, w], |i| {
                rgb.get_pixel(i[2] as u32, i[1] as u32).0[i[0]] as f32 / 255.0
            }))
        }
    }
}

/// Samples (N first) and optional integer labels.
pub struct Dataset {
    samples: Samples,
    pub labels: Option<Vec<i64>>,
    /// The key the samples were read from.
    pub key: String,
}

fn entry_names(npz: &mut NpzReader<File>, path: &Path) -> Result<Vec<String>, Error> {
    npz.names()
        .map(|ns| {
            ns.into_iter()
                .map(|n| n.trim_end_matches(".npy").to_string())
                .collect()
        })
        .map_err(|e| Error::new(path, format!("not a readable .npz file: {e}")))
}

impl Dataset {
    /// Reads `key` (default: `x`, else `x_u8`) and `labels` (default: `y`
    /// when present; `Some("")` for none) from an `.npz` file.
    pub fn load_npz(
        path: &Path,
        key: Option<&str>,
        labels: Option<&str>,
    ) -> Result<Dataset, Error> {
        let file = File::open(path).map_err(|e| Error::new(path, e))?;
        let mut npz = NpzReader::new(file)
            .map_err(|e| Error::new(path, format!("not a readable .npz file: {e}")))?;
        let names = entry_names(&mut npz, path)?;
        let key = match key {
            Some(k) => k.to_string(),
            None => ["x", "x_u8"]
                .iter()
                .find(|k| names.iter().any(|n| n == *k))
                .map(|k| k.to_string())
                .ok_or_else(|| {
                    Error::new(
                        path,
                        format!(
                            "no 'x' or 'x_u8' array; it holds {names:?} (choose one with --key)"
                        ),
                    )
                })?,
        };
        if !names.contains(&key) {
            return Err(Error::new(
                path,
                format!("no array named '{key}'; it holds {names:?}"),
            ));
        }
        let samples = match npz.by_name::<ndarray::OwnedRepr<u8>, IxDyn>(&key) {
            Ok(a) => Samples::U8(a),
            Err(_) => match npz.by_name::<ndarray::OwnedRepr<f32>, IxDyn>(&key) {
                Ok(a) => Samples::F32(a),
                Err(e) => {
                    return Err(Error::new(
                        path,
                        format!("array '{key}' is neither uint8 nor float32: {e}"),
                    ))
                }
            },
        };
        let label_key = match labels {
            Some("") => None,
            Some(l) => Some(l.to_string()),
            None => names.iter().any(|n| n == "y").then(|| "y".to_string()),
        };
        let labels = match label_key {
            None => None,
            Some(l) => {
                if !names.contains(&l) {
                    return Err(Error::new(
                        path,
                        format!("no label array named '{l}'; it holds {names:?}"),
                    ));
                }
                let v: Vec<i64> = match npz.by_name::<ndarray::OwnedRepr<i64>, IxDyn>(&l) {
                    Ok(a) => a.iter().copied().collect(),
                    Err(_) => match npz.by_name::<ndarray::OwnedRepr<i32>, IxDyn>(&l) {
                        Ok(a) => a.iter().map(|&v| v as i64).collect(),
                        Err(e) => {
                            return Err(Error::new(
                                path,
                                format!("labels '{l}' are not int64 or int32: {e}"),
                            ))
                        }
                    },
                };
                Some(v)
            }
        };
        let ds = Dataset {
            samples,
            labels,
            key,
        };
        if ds.is_empty() {
            return Err(Error::new(
                path,
                format!("array '{}' has no samples", ds.key),
            ));
        }
        if ds.labels.as_ref().is_some_and(|l| l.len() != ds.len()) {
            return Err(Error::new(path, "labels and samples differ in number"));
        }
        Ok(ds)
    }

    /// The JPEG and PNG files of a folder, in name order, decoded batch by
    /// batch with `preprocess` (samples of one size: give `crop`, or
    /// `resize` with images of one aspect).
    pub fn load_images(dir: &Path, preprocess: Preprocess) -> Result<Dataset, Error> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::new(dir, e))?;
        let mut files: Vec<std::path::PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png")
                })
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::new(dir, "holds no .jpg, .jpeg or .png file"));
        }
        Ok(Dataset {
            samples: Samples::Images { files, preprocess },
            labels: None,
            key: "images".into(),
        })
    }

    pub fn len(&self) -> usize {
        match &self.samples {
            Samples::U8(a) => a.shape().first().copied().unwrap_or(0),
            Samples::F32(a) => a.shape().first().copied().unwrap_or(0),
            Samples::Images { files, .. } => files.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that the samples suit a normalisation (ImageNet needs 3 channels).
    pub fn check_norm(&self, norm: Norm) -> Result<(), String> {
        let channels = match &self.samples {
            Samples::Images { preprocess, .. } => [0, if preprocess.gray { 1 } else { 3 }],
            _ => [0, 0],
        };
        let shape = match &self.samples {
            Samples::U8(a) => a.shape(),
            Samples::F32(a) => a.shape(),
            Samples::Images { .. } => &channels[..],
        };
        if norm == Norm::Imagenet && (shape.len() < 2 || shape[1] != 3) {
            return Err(format!("ImageNet normalisation needs NCHW samples with 3 channels; '{}' has shape {shape:?}", self.key));
        }
        Ok(())
    }

    /// The shape of one sample, when known before decoding (an image folder
    /// without a crop has none).
    pub fn sample_shape(&self) -> Option<Vec<usize>> {
        match &self.samples {
            Samples::U8(a) => Some(a.shape()[1..].to_vec()),
            Samples::F32(a) => Some(a.shape()[1..].to_vec()),
            Samples::Images { preprocess, .. } => preprocess
                .crop
                .map(|c| vec![if preprocess.gray { 1 } else { 3 }, c as usize, c as usize]),
        }
    }

    /// Checks that the samples fit `model`'s input as it declares it: one
    /// input, of a float type, of the samples' rank with one more axis for
    /// the batch, and of the samples' size on every axis the model fixes
    /// (but the batch axis). Found before any work, the message names the
    /// array and the model's input; the caller adds the files.
    pub fn check_fits(&self, model: &Model) -> Result<(), String> {
        let g = &model.graph;
        let inputs: Vec<_> = g
            .inputs()
            .iter()
            .copied()
            .filter(|&v| g.value(v).initializer().is_none())
            .collect();
        let names: Vec<&str> = inputs.iter().map(|&v| g.value(v).name()).collect();
        let &[input] = inputs.as_slice() else {
            return Err(format!(
                "the model has {} inputs ({}); this command feeds it one array, '{}' (give every \
                 input its array with `qgraph infer`)",
                inputs.len(),
                names.join(", "),
                self.key
            ));
        };
        let value = g.value(input);
        let Some(qgraph_ir::ValueType::Tensor(ty)) = &value.ty else {
            return Ok(());
        };
        let declared = format!("'{}' {}", value.name(), ty);
        if let Some(dtype) = ty.dtype {
            if dtype != qgraph_ir::DataType::F32 {
                return Err(format!(
                    "the model's input {declared} is not float32, which is what '{}' gives \
                     (after scaling and normalisation)",
                    self.key
                ));
            }
        }
        let (Some(dims), Some(sample)) = (&ty.shape, self.sample_shape()) else {
            return Ok(());
        };
        let described = format!(
            "'{}' holds samples of shape {}",
            self.key,
            qgraph_ir::ShapeFmt(&sample)
        );
        if dims.len() != sample.len() + 1 {
            return Err(format!(
                "{described} (rank {}), but the model's input {declared} takes rank {} with \
                 the batch axis first",
                sample.len(),
                dims.len()
            ));
        }
        for (axis, (dim, &size)) in dims[1..].iter().zip(&sample).enumerate() {
            if let qgraph_ir::Dim::Known(want) = dim {
                if *want >= 0 && *want as usize != size {
                    return Err(format!(
                        "{described}, but the model's input {declared} wants {want} on axis {} \
                         where the samples have {size}",
                        axis + 1
                    ));
                }
            }
        }
        Ok(())
    }

    /// Samples `start..end` as an f32 batch, normalised.
    pub fn batch(&self, start: usize, end: usize, norm: Norm) -> Result<Tensor, String> {
        self.select(&(start..end).collect::<Vec<_>>(), norm)
    }

    /// The samples at `indices` (each below `len()`) as an f32 batch,
    /// normalised. Image files are decoded here; one that cannot be, or
    /// whose size differs from the others', is an error naming it.
    pub fn select(&self, indices: &[usize], norm: Norm) -> Result<Tensor, String> {
        let x: ArrayD<f32> = match &self.samples {
            Samples::U8(a) => a.select(Axis(0), indices).mapv(|v| v as f32 / 255.0),
            Samples::F32(a) => a.select(Axis(0), indices),
            Samples::Images { files, preprocess } => {
                let images: Vec<ArrayD<f32>> = indices
                    .iter()
                    .map(|&i| preprocess.load(&files[i]))
                    .collect::<Result<_, _>>()?;
                if let Some((k, _)) = images
                    .iter()
                    .enumerate()
                    .find(|(_, a)| a.shape() != images[0].shape())
                {
                    return Err(format!(
                        "{}: {:?} differs from {}'s {:?} (give --preprocess crop=N)",
                        files[indices[k]].display(),
                        images[k].shape(),
                        files[indices[0]].display(),
                        images[0].shape()
                    ));
                }
                let views: Vec<_> = images.iter().map(|a| a.view()).collect();
                ndarray::stack(Axis(0), &views).map_err(|e| e.to_string())?
            }
        };
        Ok(normalise(x, norm))
    }
}

/// Applies a normalisation to samples already scaled to [0, 1].
fn normalise(mut x: ArrayD<f32>, norm: Norm) -> Tensor {
    match norm {
        Norm::None => {}
        Norm::Tf => x.mapv_inplace(|v| (v * 255.0 - 127.0) / 128.0),
        Norm::Imagenet => {
            const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
            const STD: [f32; 3] = [0.229, 0.224, 0.225];
            if x.ndim() >= 2 && x.shape()[1] == 3 {
                for c in 0..3 {
                    x.index_axis_mut(Axis(1), c)
                        .mapv_inplace(|v| (v - MEAN[c]) / STD[c]);
                }
            }
        }
    }
    Tensor::F32(x)
}

/// What a measurement found.
#[derive(Clone, Debug, Default)]
pub struct Measurement {
    pub samples: usize,
    /// Correct top-1 predictions, when there are labels.
    pub correct: Option<usize>,
    /// Samples whose top-1 class equals the reference model's.
    pub agree: Option<usize>,
    /// Output SQNR against the reference model, in dB.
    pub sqnr_db: Option<f64>,
    /// What the model's first output held.
    pub output: OutputStats,
}

/// Statistics of a model's first output over a data set: what `eval` can
/// say without labels or a reference.
#[derive(Clone, Debug, Default)]
pub struct OutputStats {
    pub elements: u64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub std: f64,
    /// How many samples chose each top-1 class (index: class).
    pub top1_counts: Vec<usize>,
}

impl OutputStats {
    fn observe(&mut self, values: &[f32], top1: &[usize], sums: &mut (f64, f64)) {
        if self.elements == 0 {
            (self.min, self.max) = (f64::INFINITY, f64::NEG_INFINITY);
        }
        for &v in values {
            let v = v as f64;
            self.min = self.min.min(v);
            self.max = self.max.max(v);
            sums.0 += v;
            sums.1 += v * v;
        }
        self.elements += values.len() as u64;
        for &c in top1 {
            if self.top1_counts.len() <= c {
                self.top1_counts.resize(c + 1, 0);
            }
            self.top1_counts[c] += 1;
        }
        let n = self.elements.max(1) as f64;
        self.mean = sums.0 / n;
        self.std = (sums.1 / n - self.mean * self.mean).max(0.0).sqrt();
    }
}

pub(crate) fn first_output_rows(t: &Tensor) -> Option<(usize, Vec<f32>)> {
    let Tensor::F32(a) = t else { return None };
    let n = a.shape().first().copied()?;
    Some((n, a.iter().copied().collect()))
}

/// The index of the largest value of each of the `n` rows of `data`.
pub(crate) fn argmax_rows(n: usize, data: &[f32]) -> Vec<usize> {
    let width = data.len() / n.max(1);
    (0..n)
        .map(|r| {
            let row = &data[r * width..(r + 1) * width];
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                })
                .0
        })
        .collect()
}

/// `count` sample indices spread evenly over `len` (all when `count >=
/// len`): deterministic, and covering the whole file rather than its start
/// (data sets are often sorted by class). Every command's `--limit`.
pub fn spread_samples(len: usize, count: usize) -> Vec<usize> {
    if count >= len {
        return (0..len).collect();
    }
    (0..count).map(|i| i * len / count).collect()
}

/// Runs `model` (and `reference`, when given) over the data set's samples
/// at `indices` in batches, calling `progress(done)` after each batch.
pub fn measure(
    model: &Model,
    reference: Option<&Model>,
    data: &Dataset,
    norm: Norm,
    batch: usize,
    indices: &[usize],
    mut progress: impl FnMut(usize),
) -> Result<Measurement, crate::Error> {
    data.check_norm(norm)?;
    let ev = Evaluator::new(model).map_err(|e| e.to_string())?;
    let rev = reference
        .map(Evaluator::new)
        .transpose()
        .map_err(|e| format!("reference model: {e}"))?;
    let mut m = Measurement {
        samples: indices.len(),
        correct: data.labels.as_ref().map(|_| 0),
        agree: rev.as_ref().map(|_| 0),
        ..Measurement::default()
    };
    let (mut signal, mut noise) = (0f64, 0f64);
    let mut sums = (0f64, 0f64);
    let mut done = 0;
    for chunk in indices.chunks(batch.max(1)) {
        let x = data.select(chunk, norm)?;
        let out = ev.run(vec![x.clone()]).map_err(|e| e.to_string())?;
        let (n, logits) = out
            .first()
            .and_then(first_output_rows)
            .ok_or("the model's first output is not f32")?;
        let pred = argmax_rows(n, &logits);
        m.output.observe(&logits, &pred, &mut sums);
        if let (Some(c), Some(labels)) = (m.correct.as_mut(), &data.labels) {
            *c += pred
                .iter()
                .zip(chunk)
                .filter(|(p, &i)| **p as i64 == labels[i])
                .count();
        }
        if let Some(rev) = &rev {
            let rout = rev
                .run(vec![x])
                .map_err(|e| format!("reference model: {e}"))?;
            let (_, rlogits) = rout
                .first()
                .and_then(first_output_rows)
                .ok_or("the reference's first output is not f32")?;
            if rlogits.len() != logits.len() {
                return Err("the model and the reference give outputs of different sizes".into());
            }
            let rpred = argmax_rows(n, &rlogits);
            if let Some(a) = m.agree.as_mut() {
                *a += pred.iter().zip(&rpred).filter(|(p, r)| p == r).count();
            }
            for (o, r) in logits.iter().zip(&rlogits) {
                signal += (*r as f64).powi(2);
                noise += (*o as f64 - *r as f64).powi(2);
            }
        }
        done += chunk.len();
        progress(done);
    }
    if rev.is_some() {
        m.sqnr_db = Some(if noise == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (signal / noise).log10()
        });
    }
    Ok(m)
}
