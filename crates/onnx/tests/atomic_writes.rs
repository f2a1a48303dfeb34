//! Atomic writes: what a killed write leaves behind is cleaned up by the
//! next write to that directory, and nothing else is.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, SystemTime};

fn touch(path: &Path, age: Duration) {
    std::fs::write(path, b"partial").unwrap();
    let f = File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
}

const HOURS_2: Duration = Duration::from_secs(2 * 3600);

#[test]
fn a_write_removes_stale_temporaries_of_its_own_pattern_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let stale = d.join(".qgraph-AbCdEfGh12345678.tmp");
    touch(&stale, HOURS_2);
    // A write still in progress elsewhere.
    let fresh = d.join(".qgraph-ZyXwVuTs87654321.tmp");
    touch(&fresh, Duration::from_secs(60));
    // Old, but not ours: other lengths, characters, prefixes or suffixes.
    let others = [
        ".qgraph-notes.tmp",
        ".qgraph-AbCdEfGh1234567.tmp",
        ".qgraph-AbCdEfGh123456789.tmp",
        ".qgraph-AbCdEfGh-2345678.tmp",
        ".qgraph-AbCdEfGh12345678.tmp.bak",
        "qgraph-AbCdEfGh12345678.tmp",
        ".qgraph-AbCdEfGh12345678.txt",
        "model.onnx",
    ];
    for name in others {
        touch(&d.join(name), HOURS_2);
    }
    // A directory named as ours is not a file of ours.
    let subdir = d.join(".qgraph-DirDirDir1234567.tmp");
    std::fs::create_dir(&subdir).unwrap();
    File::open(&subdir)
        .unwrap()
        .set_modified(SystemTime::now() - HOURS_2)
        .unwrap();

    let out = d.join("out.onnx");
    qgraph_onnx::write_atomic(&out, b"model bytes").unwrap();

    assert_eq!(std::fs::read(&out).unwrap(), b"model bytes");
    assert!(!stale.exists(), "a stale temporary file is removed");
    assert!(fresh.exists(), "a recent temporary file is kept");
    for name in others {
        assert!(d.join(name).exists(), "{name} was removed");
    }
    assert!(subdir.is_dir());
    // Nothing else was left or created.
    let mut names: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), others.len() + 3, "{names:?}");
}

#[cfg(unix)]
#[test]
fn a_link_named_as_ours_is_not_followed_or_removed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let target = d.join("precious");
    touch(&target, HOURS_2);
    let link = d.join(".qgraph-LinkLinkLink1234.tmp");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    qgraph_onnx::write_atomic(&d.join("out.onnx"), b"x").unwrap();
    assert!(target.exists());
    assert!(link.symlink_metadata().is_ok());
}

#[test]
fn the_temporary_file_becomes_the_output_and_none_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    qgraph_onnx::write_atomic(&out, b"first").unwrap();
    qgraph_onnx::write_atomic(&out, b"second").unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"second");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("m.onnx")]);
}
