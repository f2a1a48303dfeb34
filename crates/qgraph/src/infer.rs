//! `qgraph infer`: a model's outputs on given inputs, read from and written
//! to either an `.npz` file (one array per input or output, by name) or an
//! ONNX test data set directory (`input_0.pb`, ... in, `output_0.pb`, ...
//! out: serialized `TensorProto`s, which hold every ONNX type, bfloat16 and
//! float8 included; sequences and optionals as `SequenceProto` and
//! `OptionalProto`, as ONNX's own test data sets hold them).

use crate::Error;
use ndarray_npy::{NpzReader, NpzWriter, ReadNpzError};
use qgraph_eval::Evaluator;
use qgraph_ir::ndarray::{ArrayD, IxDyn, OwnedRepr};
use qgraph_ir::{Data, DataType, Dim, Model, Tensor, ValueId, ValueType};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Runs `model` on the inputs in `inputs` and writes its outputs to
/// `output`; a path ending in `.npz` is an archive, anything else a
/// directory of `.pb` files.
pub fn infer(model: &Model, inputs: &Path, output: &Path) -> Result<(), Error> {
    // The model's own faults name no file: the caller names the model.
    let ev = Evaluator::new(model).map_err(Error::msg)?;
    let required = ev.required_inputs();
    let g = &model.graph;
    let containers = |v: &ValueId| {
        matches!(
            g.value(*v).effective_type(),
            Some(ValueType::Sequence(_) | ValueType::Optional(_))
        )
    };
    for &v in required.iter().chain(g.outputs()) {
        let side = if g.value(v).is_graph_input() {
            "input"
        } else {
            "output"
        };
        let kind = match g.value(v).effective_type() {
            Some(ValueType::Map(..)) => "a map",
            Some(ValueType::SparseTensor(_)) => "a sparse tensor",
            Some(ValueType::Sequence(_) | ValueType::Optional(_))
                if is_npz(inputs) || is_npz(output) =>
            {
                return Err(Error::msg(format!(
                    "the model's {side} '{}' is a sequence or an optional, which .npz files \
                     do not hold: give test data set directories (input_<n>.pb, \
                     SequenceProto / OptionalProto) instead",
                    g.value(v).name()
                )))
            }
            _ => continue,
        };
        return Err(Error::msg(format!(
            "the model's {side} '{}' is {kind}: infer reads and writes tensors, sequences \
             and optionals only",
            g.value(v).name()
        )));
    }
    let args: Vec<Data> = if inputs.is_dir() {
        read_pb_inputs(model, &required, inputs)?
    } else {
        read_npz_inputs(model, &required, inputs)?
            .into_iter()
            .map(Data::Tensor)
            .collect()
    };
    for (&v, d) in required.iter().zip(&args) {
        let checked = match d {
            Data::Tensor(t) => check_declared(model, v, t),
            d if !containers(&v) && g.value(v).effective_type().is_some() => Err(format!(
                "input '{}' is {}, the model declares a tensor",
                g.value(v).name(),
                d.kind()
            )),
            _ => Ok(()),
        };
        checked.map_err(|m| Error::new(inputs, m))?;
    }
    let outs = ev.run_data(args).map_err(|e| Error::new(inputs, e))?;
    let names: Vec<&str> = g.outputs().iter().map(|&v| g.value(v).name()).collect();
    if is_npz(output) {
        let mut named = Vec::with_capacity(outs.len());
        for (&name, d) in names.iter().zip(&outs) {
            match d {
                Data::Tensor(t) => named.push((name, t)),
                d => {
                    return Err(Error::new(
                        output,
                        format!(
                            "output '{name}' is {}, which .npz output does not hold; give a \
                             directory instead to get output_<n>.pb files",
                            d.kind()
                        ),
                    ))
                }
            }
        }
        write_npz(output, &named)
    } else {
        let named: Vec<(&str, &Data)> = names.into_iter().zip(&outs).collect();
        write_pb_dir(output, &named)
    }
}

fn is_npz(p: &Path) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("npz"))
}

/// The `input_<n>.pb` files of a test data set directory, by number: by the
/// tensors' names where they all name the model's inputs, else by position.
fn read_pb_inputs(model: &Model, required: &[ValueId], dir: &Path) -> Result<Vec<Data>, Error> {
    let g = &model.graph;
    let mut files: Vec<(usize, PathBuf)> = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::new(dir, e))?;
    for e in entries {
        let path = e.map_err(|e| Error::new(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(n) = name
            .strip_prefix("input_")
            .and_then(|r| r.strip_suffix(".pb"))
            .and_then(|n| n.parse().ok())
        {
            files.push((n, path));
        }
    }
    files.sort();
    let mut tensors = Vec::with_capacity(files.len());
    for (k, (_, path)) in files.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(|e| Error::new(path, e))?;
        // The file alone does not say which message it holds: the input
        // of its position declares it (ONNX's own runner does the same).
        let declared = required.get(k).and_then(|&v| g.value(v).effective_type());
        let t = qgraph_onnx::decode_data(&bytes, declared.as_ref())
            .map_err(|e| Error::new(path, format!("not a readable value: {e}")))?;
        tensors.push(t);
    }
    let input_names: Vec<&str> = required.iter().map(|&v| g.value(v).name()).collect();
    let by_name = !tensors.is_empty()
        && tensors
            .iter()
            .all(|(n, _)| input_names.contains(&n.as_str()));
    if by_name {
        let mut args = Vec::with_capacity(required.len());
        for name in &input_names {
            match tensors.iter().position(|(n, _)| n == name) {
                Some(i) => args.push(tensors[i].1.clone()),
                None => {
                    return Err(Error::new(
                        dir,
                        format!("no input_<n>.pb holds the model's input '{name}'"),
                    ))
                }
            }
        }
        return Ok(args);
    }
    if tensors.len() != required.len() {
        return Err(Error::new(
            dir,
            format!(
                "holds {} input_<n>.pb files, the model takes {} inputs ({})",
                tensors.len(),
                required.len(),
                input_names.join(", ")
            ),
        ));
    }
    Ok(tensors.into_iter().map(|(_, t)| t).collect())
}

/// One array per required input, by name, read as the input's declared
/// type (or as the first numpy type that fits, when none is declared).
fn read_npz_inputs(model: &Model, required: &[ValueId], path: &Path) -> Result<Vec<Tensor>, Error> {
    let g = &model.graph;
    let file = File::open(path).map_err(|e| Error::new(path, e))?;
    let mut npz = NpzReader::new(file)
        .map_err(|e| Error::new(path, format!("not a readable .npz file: {e}")))?;
    let names: Vec<String> = npz
        .names()
        .map_err(|e| Error::new(path, e))?
        .into_iter()
        .map(|n| n.strip_suffix(".npy").unwrap_or(&n).to_string())
        .collect();
    let mut args = Vec::with_capacity(required.len());
    for &v in required {
        let name = g.value(v).name();
        if !names.iter().any(|n| n == name) {
            return Err(Error::new(
                path,
                format!("no array for the model's input '{name}'; it holds {names:?}"),
            ));
        }
        let declared = declared_dtype(model, v);
        let t = read_npz_array(&mut npz, name, declared).map_err(|m| Error::new(path, m))?;
        args.push(t);
    }
    Ok(args)
}

fn declared_dtype(model: &Model, v: ValueId) -> Option<DataType> {
    match model.graph.value(v).effective_type() {
        Some(ValueType::Tensor(t)) => t.dtype,
        _ => None,
    }
}

/// Reads array `name` as `dtype` (the model input's declared type), or,
/// with none declared, as the first type that fits.
fn read_npz_array(
    npz: &mut NpzReader<File>,
    name: &str,
    dtype: Option<DataType>,
) -> Result<Tensor, String> {
    macro_rules! try_read {
        ($t:ty, $variant:ident) => {
            match npz.by_name::<OwnedRepr<$t>, IxDyn>(name) {
                Ok(a) => return Ok(Tensor::$variant(a)),
                Err(ReadNpzError::Npy(e)) if dtype.is_none() => {
                    let _ = e;
                }
                Err(e) => {
                    return Err(format!(
                        "array '{name}' cannot be read as {}: {e}",
                        DataType::$variant
                    ))
                }
            }
        };
    }
    match dtype {
        Some(DataType::F32) => try_read!(f32, F32),
        Some(DataType::F64) => try_read!(f64, F64),
        Some(DataType::I8) => try_read!(i8, I8),
        Some(DataType::I16) => try_read!(i16, I16),
        Some(DataType::I32) => try_read!(i32, I32),
        Some(DataType::I64) => try_read!(i64, I64),
        Some(DataType::U8) => try_read!(u8, U8),
        Some(DataType::U16) => try_read!(u16, U16),
        Some(DataType::U32) => try_read!(u32, U32),
        Some(DataType::U64) => try_read!(u64, U64),
        Some(DataType::Bool) => try_read!(bool, Bool),
        Some(d) => {
            return Err(format!(
                "the model's input '{name}' is {d}, which .npz files cannot hold here; \
                 pass a directory of input_<n>.pb TensorProto files instead"
            ))
        }
        None => {
            try_read!(f32, F32);
            try_read!(f64, F64);
            try_read!(i64, I64);
            try_read!(i32, I32);
            try_read!(i16, I16);
            try_read!(i8, I8);
            try_read!(u8, U8);
            try_read!(u16, U16);
            try_read!(u32, U32);
            try_read!(u64, U64);
            try_read!(bool, Bool);
        }
    }
    Err(format!(
        "array '{name}' has a type .npz input does not support"
    ))
}

/// A tensor against the input's declared element type and shape.
fn check_declared(model: &Model, v: ValueId, t: &Tensor) -> Result<(), String> {
    let value = model.graph.value(v);
    let name = value.name();
    let Some(ValueType::Tensor(ty)) = value.effective_type() else {
        return Ok(());
    };
    if let Some(d) = ty.dtype {
        if d != t.dtype() {
            return Err(format!(
                "the array for input '{name}' is {}, the model declares {d}",
                t.dtype()
            ));
        }
    }
    if let Some(dims) = &ty.shape {
        let shape = t.shape();
        let fits = dims.len() == shape.len()
            && dims.iter().zip(shape).all(|(d, &s)| match d {
                Dim::Known(k) => *k < 0 || *k as usize == s,
                _ => true,
            });
        if !fits {
            return Err(format!(
                "the array for input '{name}' has shape {shape:?}, the model declares {}",
                ty
            ));
        }
    }
    Ok(())
}

fn write_npz(output: &Path, named: &[(&str, &Tensor)]) -> Result<(), Error> {
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|e| Error::new(output, e))?;
    {
        let mut w = NpzWriter::new(tmp.as_file_mut());
        for &(name, t) in named {
            let r = match t {
                Tensor::F32(a) => w.add_array(name, a),
                Tensor::F64(a) => w.add_array(name, a),
                Tensor::I8(a) => w.add_array(name, a),
                Tensor::I16(a) => w.add_array(name, a),
                Tensor::I32(a) => w.add_array(name, a),
                Tensor::I64(a) => w.add_array(name, a),
                Tensor::U8(a) => w.add_array(name, a),
                Tensor::U16(a) => w.add_array(name, a),
                Tensor::U32(a) => w.add_array(name, a),
                Tensor::U64(a) => w.add_array(name, a),
                Tensor::Bool(a) => w.add_array(name, a),
                Tensor::F16(a) => {
                    // numpy's float16 has no ndarray-npy reader or writer:
                    // written as float32, which holds every float16 exactly.
                    let wide: ArrayD<f32> = a.mapv(f32::from);
                    w.add_array(name, &wide)
                }
                t => {
                    return Err(Error::new(
                        output,
                        format!(
                            "output '{name}' is {}, which .npz output does not hold; \
                             give a directory instead to get output_<n>.pb files",
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

/// `output_<n>.pb` per output, named as the output, into `dir` (created if
/// missing); each file written atomically.
fn write_pb_dir(dir: &Path, named: &[(&str, &Data)]) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::new(dir, e))?;
    for (i, &(name, d)) in named.iter().enumerate() {
        let path = dir.join(format!("output_{i}.pb"));
        let bytes = qgraph_onnx::encode_data(name, d)
            .map_err(|e| Error::new(&path, format!("output '{name}': {e}")))?;
        qgraph_onnx::write_atomic(&path, &bytes).map_err(|e| Error::new(&path, e))?;
    }
    Ok(())
}
