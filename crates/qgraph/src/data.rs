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

/// Runs `model` (and `reference`, when given) over the data set in batches,
/// calling `progress(done)` after each batch.
pub fn measure(
    model: &Model,
    reference: Option<&Model>,
    data: &Dataset,
    norm: Norm,
    batch: usize,
    limit: Option<usize>,
    mut progress: impl FnMut(usize),
) -> Result<Measurement, String> {
    data.check_norm(norm)?;
    let ev = Evaluator::new(model).map_err(|e| e.to_string())?;
    let rev = reference
        .map(Evaluator::new)
        .transpose()
        .map_err(|e| format!("reference model: {e}"))?;
    let total = limit.unwrap_or(usize::MAX).min(data.len());
    let mut m = Measurement {
        samples: total,
        correct: data.labels.as_ref().map(|_| 0),
        agree: rev.as_ref().map(|_| 0),
        ..Measurement::default()
    };
    let (mut signal, mut noise) = (0f64, 0f64);
    let mut start = 0;
    while start < total {
        let end = (start + batch.max(1)).min(total);
        let x = data.batch(start, end, norm)?;
        let out = ev.run(vec![x.clone()]).map_err(|e| e.to_string())?;
        let (n, logits) = out
            .first()
            .and_then(first_output_rows)
            .ok_or("the model's first output is not f32")?;
        let pred = argmax_rows(n, &logits);
        if let (Some(c), Some(labels)) = (m.correct.as_mut(), &data.labels) {
            *c += pred
                .iter()
                .zip(&labels[start..end])
                .filter(|(p, l)| **p as i64 == **l)
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
        start = end;
        progress(start);
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

/// Runs `model` on inputs read from an `.npz` file (one float32 array per
/// graph input, named as the input) and writes every output, named as the
/// output, to an `.npz` file (atomically).
pub fn infer_npz(model: &Model, inputs: &Path, output: &Path) -> Result<(), Error> {
    let ev = Evaluator::new(model).map_err(|e| Error::new(inputs, e))?;
    let file = File::open(inputs).map_err(|e| Error::new(inputs, e))?;
    let mut npz = NpzReader::new(file)
        .map_err(|e| Error::new(inputs, format!("not a readable .npz file: {e}")))?;
    let names = entry_names(&mut npz, inputs)?;
    let g = &model.graph;
    let mut args = Vec::new();
    for v in ev.required_inputs() {
        let name = g.value(v).name();
        if !names.iter().any(|n| n == name) {
            return Err(Error::new(
                inputs,
                format!("no array for the model's input '{name}'; it holds {names:?}"),
            ));
        }
        let a = npz
            .by_name::<ndarray::OwnedRepr<f32>, IxDyn>(name)
            .map_err(|e| Error::new(inputs, format!("array '{name}' is not float32: {e}")))?;
        args.push(Tensor::F32(a));
    }
    let outs = ev.run(args).map_err(|e| Error::new(inputs, e))?;
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|e| Error::new(output, e))?;
    {
        let mut w = ndarray_npy::NpzWriter::new(tmp.as_file_mut());
        for (&v, t) in g.outputs().iter().zip(&outs) {
            let name = g.value(v).name();
            let r = match t {
                Tensor::F32(a) => w.add_array(name, a),
                Tensor::F64(a) => w.add_array(name, a),
                Tensor::I64(a) => w.add_array(name, a),
                Tensor::I32(a) => w.add_array(name, a),
                Tensor::I8(a) => w.add_array(name, a),
                Tensor::U8(a) => w.add_array(name, a),
                Tensor::Bool(a) => w.add_array(name, a),
                t => {
                    return Err(Error::new(
                        output,
                        format!(
                            "output '{name}' is {}, which .npz output does not support",
                            t.dtype()
                        ),
                    ))
                }
            };
            r.map_err(|e| Error::new(output, e))?;
        }
        w.finish().map_err(|e| Error::new(output, e))?;
    }
    tmp.persist(output)
        .map_err(|e| Error::new(output, e.error))?;
    Ok(())
}
