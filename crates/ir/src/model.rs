//! A whole model: the main graph, its header and model-local functions.

use crate::{Attribute, Graph, Metadata};

/// An operator set a model or function imports.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OpsetImport {
    /// "" (or its alias "ai.onnx") is the default ONNX domain.
    pub domain: String,
    pub version: i64,
}

/// A model-local function (ONNX `FunctionProto`). Its body is a [`Graph`]
/// whose inputs and outputs are the function's formal parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    pub name: String,
    pub domain: String,
    pub overload: String,
    /// Attribute parameters without a default.
    pub attributes: Vec<String>,
    /// Attribute parameters with a default value.
    pub attribute_defaults: Vec<Attribute>,
    pub opset_imports: Vec<OpsetImport>,
    pub doc: String,
    pub meta: Metadata,
    pub body: Graph,
}

/// A model: what an `.onnx` file holds.
///
/// Empty strings and zero stand for absent optional fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub ir_version: i64,
    pub opset_imports: Vec<OpsetImport>,
    pub producer_name: String,
    pub producer_version: String,
    pub domain: String,
    pub model_version: i64,
    pub doc: String,
    pub meta: Metadata,
    pub graph: Graph,
    pub functions: Vec<Function>,
}

impl Model {
    /// A model around `graph` importing the default domain at `opset`.
    pub fn new(graph: Graph, opset: i64) -> Model {
        Model {
            ir_version: 10,
            opset_imports: vec![OpsetImport {
                domain: String::new(),
                version: opset,
            }],
            producer_name: String::new(),
            producer_version: String::new(),
            domain: String::new(),
            model_version: 0,
            doc: String::new(),
            meta: Metadata::new(),
            graph,
            functions: Vec::new(),
        }
    }

    /// The imported version of `domain` ("" and "ai.onnx" are one domain).
    pub fn opset_version(&self, domain: &str) -> Option<i64> {
        let canon = canonical_domain(domain);
        self.opset_imports
            .iter()
            .find(|o| canonical_domain(&o.domain) == canon)
            .map(|o| o.version)
    }

    /// Imports `domain` at `version`, replacing its import if there is one.
    pub fn set_opset_version(&mut self, domain: &str, version: i64) {
        let canon = canonical_domain(domain);
        match self
            .opset_imports
            .iter_mut()
            .find(|o| canonical_domain(&o.domain) == canon)
        {
            Some(o) => o.version = version,
            None => self.opset_imports.push(OpsetImport {
                domain: domain.to_string(),
                version,
            }),
        }
    }

    pub fn function(&self, domain: &str, name: &str, overload: &str) -> Option<&Function> {
        self.functions
            .iter()
            .find(|f| f.domain == domain && f.name == name && f.overload == overload)
    }
}

/// "ai.onnx" is another spelling of the default domain "".
pub fn canonical_domain(domain: &str) -> &str {
    if domain == "ai.onnx" {
        ""
    } else {
        domain
    }
}
