use std::path::PathBuf;

/// Why a file could not be read or written. Messages name the node, value
/// or attribute at fault; the caller adds the file name.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a valid ONNX file: {0}")]
    Decode(String),
    #[error("{0}")]
    Invalid(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl OnnxError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> OnnxError {
        OnnxError::Io {
            path: path.into(),
            source,
        }
    }

    /// Prefixes the message with where it happened (`node 'x'`, ...).
    pub(crate) fn context(self, what: impl std::fmt::Display) -> OnnxError {
        match self {
            OnnxError::Invalid(m) => OnnxError::Invalid(format!("{what}: {m}")),
            OnnxError::Unsupported(m) => OnnxError::Unsupported(format!("{what}: {m}")),
            other => other,
        }
    }
}

pub(crate) fn invalid<T>(message: impl Into<String>) -> Result<T, OnnxError> {
    Err(OnnxError::Invalid(message.into()))
}

pub(crate) fn unsupported<T>(message: impl Into<String>) -> Result<T, OnnxError> {
    Err(OnnxError::Unsupported(message.into()))
}
