//! README's library example, run for real on the bundled LeNet-5 and
//! digits: a pipeline from a string, insert with calibration, freeze to
//! integers, save; the frozen model agrees with the float one.

use qgraph::{data::Dataset, freeze, insert, passes, quant::Scheme};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_readme_library_example_quantizes_and_freezes_lenet() -> Result<(), qgraph::Error> {
    let float = qgraph::load(&root().join("testdata/models/lenet5_mnist_clntrained.onnx"))?.model;
    let mut model = float.clone();
    qgraph::run_passes(&mut model, "fold-constants,fold-bn,cleanup")?;
    let data = Dataset::load_npz(&root().join("testdata/data/mnist64.npz"), None, Some(""))?;
    let calibration = insert::Calibration::new(&data);
    let options = passes::InsertOptions {
        placement: passes::Placement::Ort,
        ..passes::InsertOptions::new(Scheme::parse("int8")?)
    };
    insert::insert(
        &mut model,
        &options,
        insert::Prepare::Deploy,
        true,
        Some(&calibration),
        |_| {},
    )?;
    freeze::freeze(&mut model, freeze::Target::Integer, freeze::Int4::Auto)?;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.int.onnx");
    qgraph::save(&model, &path, &qgraph::SaveOptions::default())?;
    let frozen = qgraph::load(&path)?.model;
    let ops: Vec<String> = frozen
        .graph
        .node_ids()
        .into_iter()
        .map(|n| frozen.graph.node(n).op_type.clone())
        .collect();
    assert!(ops.iter().any(|o| o == "QLinearConv"), "{ops:?}");
    let all: Vec<usize> = (0..data.len()).collect();
    let m = qgraph::data::measure(
        &frozen,
        Some(&float),
        &data,
        qgraph::data::Norm::None,
        32,
        &all,
        |_| {},
    )?;
    assert!(m.agree.unwrap() as f64 >= 0.95 * data.len() as f64, "{m:?}");
    Ok(())
}
