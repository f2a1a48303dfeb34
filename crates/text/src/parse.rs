//! The parser: text form -> IR, then the IR verifier.
//!
//! A graph block is read into a list of statements first and built second,
//! so values may be used before the statement that defines them.

use crate::syntax::{
    lex_until_error, string_bytes, too_deep, value_name, Pos, SyntaxError, Tok, Token, MAX_DEPTH,
};
use qgraph_ir::{
    AttrKind, AttrValue, Attribute, DataType, Dim, ElidedTensor, Function, Graph, Initializer,
    Metadata, Model, NewNode, OpsetImport, Tensor, TensorAnnotation, TensorType, ValueId,
    ValueType,
};
use std::collections::HashMap;

/// Why a text could not be parsed: a position when the text is malformed,
/// none when the model it describes breaks an IR invariant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("{0}")]
    Syntax(#[from] SyntaxError),
    #[error("{0}")]
    Invalid(String),
}

/// Parses a model and verifies it.
pub fn parse_model(src: &str) -> Result<Model, TextError> {
    let lexed = lex_until_error(src);
    let mut p = Parser {
        toks: lexed.toks,
        at: 0,
        depth: 0,
    };
    if let Some(e) = lexed.error {
        // A lexical error is reported before any the parser would find,
        // except that brackets nested too deep defer to the parser's own
        // nesting check when it fails first, at the construct (a subgraph,
        // type or list) that goes one level too deep.
        if e.too_deep {
            if let Err(pe) = p.model() {
                if pe.message == too_deep() {
                    return Err(pe.into());
                }
            }
        }
        return Err(e.error.into());
    }
    let model = p.model()?;
    qgraph_ir::verify_model(&model).map_err(|e| TextError::Invalid(e.message))?;
    Ok(model)
}

struct Parser<'a> {
    toks: Vec<Token<'a>>,
    at: usize,
    depth: usize,
}

type PResult<T> = Result<T, SyntaxError>;

struct InputAst {
    pos: Pos,
    name: String,
    ty: Option<ValueType>,
    default: Option<Initializer>,
}

struct InitAst {
    pos: Pos,
    name: String,
    ty: Option<ValueType>,
    init: Initializer,
}

struct OutAst {
    pos: Pos,
    name: String,
    ty: Option<ValueType>,
}

struct NodeAst {
    pos: Pos,
    name: String,
    domain: String,
    op_type: String,
    overload: String,
    outputs: Vec<Option<OutAst>>,
    inputs: Vec<Option<(Pos, String)>>,
    attrs: Vec<Attribute>,
    doc: String,
    meta: Metadata,
}

#[derive(Default)]
struct GraphAst {
    name: String,
    doc: String,
    meta: Metadata,
    inputs: Vec<InputAst>,
    outputs: Vec<OutAst>,
    outers: Vec<(Pos, String)>,
    inits: Vec<InitAst>,
    nodes: Vec<NodeAst>,
    values: Vec<(Pos, String, String, Metadata)>,
    quants: Vec<TensorAnnotation>,
    // Function-only items.
    overload: String,
    attributes: Vec<String>,
    attribute_defaults: Vec<Attribute>,
    opsets: Vec<OpsetImport>,
}

/// What trailing `doc` / `meta` clauses attach to.
enum Attach {
    Graph,
    Init(usize),
    InputDefault(usize),
    Node(usize),
    Nothing(&'static str),
}

fn err<T>(pos: Pos, message: impl Into<String>) -> PResult<T> {
    Err(SyntaxError {
        pos,
        message: message.into(),
    })
}

fn utf8(pos: Pos, bytes: Vec<u8>) -> PResult<String> {
    String::from_utf8(bytes).or_else(|_| err(pos, "expected valid UTF-8 here"))
}

impl<'a> Parser<'a> {
    fn pos(&self) -> Pos {
        self.toks
            .get(self.at)
            .or(self.toks.last())
            .map(Token::pos)
            .unwrap_or(Pos { line: 1, col: 1 })
    }

    fn peek(&self) -> Option<&Tok<'a>> {
        self.toks.get(self.at).map(|t| &t.tok)
    }

    fn peek2(&self) -> Option<&Tok<'a>> {
        self.toks.get(self.at + 1).map(|t| &t.tok)
    }

    fn next(&mut self) -> PResult<(Tok<'a>, Pos)> {
        match self.toks.get(self.at) {
            Some(t) => {
                self.at += 1;
                Ok((t.tok, t.pos()))
            }
            None => err(self.pos(), "unexpected end of text"),
        }
    }

    fn found(&self) -> String {
        match self.peek() {
            Some(t) => t.describe(),
            None => "the end of the text".into(),
        }
    }

    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }

    fn is_word(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(x)) if *x == w)
    }

    fn expect_punct(&mut self, c: char, what: &str) -> PResult<()> {
        if self.is_punct(c) {
            self.at += 1;
            Ok(())
        } else {
            err(
                self.pos(),
                format!("expected '{c}' {what}, found {}", self.found()),
            )
        }
    }

    fn eat_punct(&mut self, c: char) -> bool {
        if self.is_punct(c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect_word(&mut self, w: &str) -> PResult<()> {
        if self.is_word(w) {
            self.at += 1;
            Ok(())
        } else {
            err(
                self.pos(),
                format!("expected '{w}', found {}", self.found()),
            )
        }
    }

    fn string(&mut self, what: &str) -> PResult<Vec<u8>> {
        match self.next()? {
            (Tok::Str(s), _) => Ok(string_bytes(s).into_owned()),
            (t, pos) => err(
                pos,
                format!("expected a quoted string ({what}), found {}", t.describe()),
            ),
        }
    }

    fn text(&mut self, what: &str) -> PResult<String> {
        let pos = self.pos();
        let bytes = self.string(what)?;
        utf8(pos, bytes)
    }

    /// A bare word or a quoted string.
    fn name(&mut self, what: &str) -> PResult<String> {
        match self.next()? {
            (Tok::Word(w), _) => Ok(w.to_string()),
            (Tok::Str(s), pos) => utf8(pos, string_bytes(s).into_owned()),
            (t, pos) => err(pos, format!("expected {what}, found {}", t.describe())),
        }
    }

    fn int(&mut self, what: &str) -> PResult<i64> {
        match self.next()? {
            (Tok::Num { text, float: false }, pos) => text
                .parse::<i64>()
                .or_else(|_| err(pos, format!("{text} does not fit in 64 bits"))),
            (t, pos) => err(
                pos,
                format!("expected an integer ({what}), found {}", t.describe()),
            ),
        }
    }

    fn value_name(&mut self) -> PResult<(Pos, String)> {
        match self.next()? {
            (Tok::Value(v), pos) => Ok((pos, value_name(v).into_owned())),
            (t, pos) => err(
                pos,
                format!("expected a value such as %x, found {}", t.describe()),
            ),
        }
    }

    /// `%name` with an optional `: type`.
    fn typed_value(&mut self) -> PResult<(Pos, String, Option<ValueType>)> {
        let (pos, name) = self.value_name()?;
        let ty = if self.eat_punct(':') {
            Some(self.value_type()?)
        } else {
            None
        };
        Ok((pos, name, ty))
    }

    fn meta_entry(&mut self) -> PResult<(String, String)> {
        let k = self.text("metadata key")?;
        self.expect_punct('=', "between a metadata key and its value")?;
        let v = self.text("metadata value")?;
        Ok((k, v))
    }

    // ----- model -----

    fn model(&mut self) -> PResult<Model> {
        let mut ir_version = None;
        let mut opsets = Vec::new();
        let (mut producer_name, mut producer_version) = (String::new(), String::new());
        let mut domain = String::new();
        let mut model_version = 0;
        let mut doc = String::new();
        let mut meta = Metadata::new();
        loop {
            let pos = self.pos();
            match self.peek() {
                Some(Tok::Word(w)) => match *w {
                    "ir_version" => {
                        self.at += 1;
                        ir_version = Some(self.int("IR version")?);
                    }
                    "opset" => {
                        self.at += 1;
                        let d = self.text("opset domain")?;
                        let v = self.int("opset version")?;
                        opsets.push(OpsetImport {
                            domain: d,
                            version: v,
                        });
                    }
                    "producer" => {
                        self.at += 1;
                        producer_name = self.text("producer name")?;
                        producer_version = self.text("producer version")?;
                    }
                    "domain" => {
                        self.at += 1;
                        domain = self.text("model domain")?;
                    }
                    "model_version" => {
                        self.at += 1;
                        model_version = self.int("model version")?;
                    }
                    "doc" => {
                        self.at += 1;
                        doc = self.text("doc string")?;
                    }
                    "meta" => {
                        self.at += 1;
                        meta.push(self.meta_entry()?);
                    }
                    "graph" => break,
                    other => {
                        return err(
                            pos,
                            format!("expected a model header line or 'graph', found '{other}'"),
                        )
                    }
                },
                _ => {
                    return err(
                        pos,
                        format!(
                            "expected a model header line or 'graph', found {}",
                            self.found()
                        ),
                    )
                }
            }
        }
        let Some(ir_version) = ir_version else {
            return err(
                Pos { line: 1, col: 1 },
                "the text must start with 'ir_version N'",
            );
        };
        self.expect_word("graph")?;
        let graph = self.graph_block()?;
        let mut functions = Vec::new();
        while self.peek().is_some() {
            self.expect_word("function")?;
            functions.push(self.function()?);
        }
        Ok(Model {
            ir_version,
            opset_imports: opsets,
            producer_name,
            producer_version,
            domain,
            model_version,
            doc,
            meta,
            graph,
            functions,
        })
    }

    fn function(&mut self) -> PResult<Function> {
        let domain = self.text("function domain")?;
        let name = self.name("a function name")?;
        let pos = self.pos();
        self.expect_punct('{', "to open the function body")?;
        let mut ast = self.graph_items(true)?;
        ast.name = name.clone();
        let mut body = self.build(ast_take(&mut ast), pos)?;
        // A function's doc and metadata belong to the function, not its body.
        let doc = std::mem::take(&mut body.doc);
        let meta = std::mem::take(&mut body.meta);
        Ok(Function {
            name,
            domain,
            overload: ast.overload,
            attributes: ast.attributes,
            attribute_defaults: ast.attribute_defaults,
            opset_imports: ast.opsets,
            doc,
            meta,
            body,
        })
    }

    /// After the `graph` keyword: `NAME { items }`.
    fn graph_block(&mut self) -> PResult<Graph> {
        self.nested(|p| {
            let name = p.name("a graph name")?;
            let pos = p.pos();
            p.expect_punct('{', "to open the graph")?;
            let mut ast = p.graph_items(false)?;
            ast.name = name;
            p.build(ast, pos)
        })
    }

    /// Statements up to and including the closing '}'.
    fn graph_items(&mut self, function: bool) -> PResult<GraphAst> {
        let mut g = GraphAst::default();
        let mut attach = Attach::Graph;
        loop {
            let pos = self.pos();
            let Some(tok) = self.peek().cloned() else {
                return err(
                    pos,
                    "unexpected end of text: a graph is not closed with '}'",
                );
            };
            if tok == Tok::Punct('}') {
                self.at += 1;
                return Ok(g);
            }
            let keyword = match (&tok, self.peek2()) {
                (Tok::Word(w), Some(next))
                    if *next != Tok::Punct(':') && *next != Tok::Punct('(') =>
                {
                    Some(*w)
                }
                _ => None,
            };
            match keyword {
                Some("doc") | Some("meta") => {
                    self.at += 1;
                    let is_doc = keyword == Some("doc");
                    let (doc, entry) = if is_doc {
                        (Some(self.text("doc string")?), None)
                    } else {
                        (None, Some(self.meta_entry()?))
                    };
                    let (d, m): (&mut String, &mut Metadata) = match attach {
                        Attach::Graph => (&mut g.doc, &mut g.meta),
                        Attach::Init(i) => {
                            let init = &mut g.inits[i].init;
                            (&mut init.doc, &mut init.meta)
                        }
                        Attach::InputDefault(i) => {
                            let init = g.inputs[i]
                                .default
                                .as_mut()
                                .expect("attached to an input with a default");
                            (&mut init.doc, &mut init.meta)
                        }
                        Attach::Node(i) => {
                            let node = &mut g.nodes[i];
                            (&mut node.doc, &mut node.meta)
                        }
                        Attach::Nothing(what) => {
                            return err(
                                pos,
                                format!(
                                    "'{}' cannot follow {what}",
                                    if is_doc { "doc" } else { "meta" }
                                ),
                            )
                        }
                    };
                    if let Some(doc) = doc {
                        *d = doc;
                    }
                    if let Some(e) = entry {
                        m.push(e);
                    }
                    continue;
                }
                Some("overload") => {
                    self.at += 1;
                    let o = self.text("overload")?;
                    match attach {
                        Attach::Node(i) => g.nodes[i].overload = o,
                        Attach::Graph if function => g.overload = o,
                        _ => return err(pos, "'overload' must follow a node"),
                    }
                    continue;
                }
                Some("attribute") if function => {
                    self.at += 1;
                    let name = self.name("an attribute name")?;
                    if self.eat_punct('=') {
                        let value = self.attr_value()?;
                        let doc = if self.is_word("doc") {
                            self.at += 1;
                            self.text("doc string")?
                        } else {
                            String::new()
                        };
                        g.attribute_defaults.push(Attribute { name, value, doc });
                    } else {
                        g.attributes.push(name);
                    }
                    attach = Attach::Nothing("an attribute parameter");
                    continue;
                }
                Some("opset") if function => {
                    self.at += 1;
                    let d = self.text("opset domain")?;
                    let v = self.int("opset version")?;
                    g.opsets.push(OpsetImport {
                        domain: d,
                        version: v,
                    });
                    attach = Attach::Nothing("an opset");
                    continue;
                }
                Some("input") => {
                    self.at += 1;
                    let (vpos, name, ty) = self.typed_value()?;
                    let default = if self.eat_punct('=') {
                        Some(Initializer {
                            tensor: self.tensor_literal()?,
                            doc: String::new(),
                            meta: Metadata::new(),
                        })
                    } else {
                        None
                    };
                    attach = if default.is_some() {
                        Attach::InputDefault(g.inputs.len())
                    } else {
                        Attach::Nothing("an input without a default")
                    };
                    g.inputs.push(InputAst {
                        pos: vpos,
                        name,
                        ty,
                        default,
                    });
                    continue;
                }
                Some("output") => {
                    self.at += 1;
                    let (vpos, name, ty) = self.typed_value()?;
                    g.outputs.push(OutAst {
                        pos: vpos,
                        name,
                        ty,
                    });
                    attach = Attach::Nothing("an output");
                    continue;
                }
                Some("outer") => {
                    self.at += 1;
                    g.outers.push(self.value_name()?);
                    attach = Attach::Nothing("an outer value");
                    continue;
                }
                Some("init") => {
                    self.at += 1;
                    let (vpos, name, ty) = self.typed_value()?;
                    self.expect_punct('=', "before the initializer's data")?;
                    let tensor = self.tensor_literal()?;
                    attach = Attach::Init(g.inits.len());
                    g.inits.push(InitAst {
                        pos: vpos,
                        name,
                        ty,
                        init: Initializer {
                            tensor,
                            doc: String::new(),
                            meta: Metadata::new(),
                        },
                    });
                    continue;
                }
                Some("value") => {
                    self.at += 1;
                    let (vpos, name) = self.value_name()?;
                    let mut doc = String::new();
                    let mut meta = Metadata::new();
                    loop {
                        if self.is_word("doc") && matches!(self.peek2(), Some(Tok::Str(_))) {
                            self.at += 1;
                            doc = self.text("doc string")?;
                        } else if self.is_word("meta") && matches!(self.peek2(), Some(Tok::Str(_)))
                        {
                            self.at += 1;
                            meta.push(self.meta_entry()?);
                        } else {
                            break;
                        }
                    }
                    g.values.push((vpos, name, doc, meta));
                    attach = Attach::Nothing("a value statement");
                    continue;
                }
                Some("quant") => {
                    self.at += 1;
                    let tensor = self.text("tensor name")?;
                    self.expect_punct('{', "to open the annotation")?;
                    let mut entries = Metadata::new();
                    if !self.eat_punct('}') {
                        loop {
                            entries.push(self.meta_entry()?);
                            if self.eat_punct('}') {
                                break;
                            }
                            self.expect_punct(',', "between annotation entries")?;
                        }
                    }
                    g.quants.push(TensorAnnotation { tensor, entries });
                    attach = Attach::Nothing("a quant annotation");
                    continue;
                }
                _ => {}
            }
            let node = self.node()?;
            attach = Attach::Node(g.nodes.len());
            g.nodes.push(node);
        }
    }

    fn node(&mut self) -> PResult<NodeAst> {
        let pos = self.pos();
        let mut name = String::new();
        if matches!(self.peek(), Some(Tok::Word(_) | Tok::Str(_)))
            && self.peek2() == Some(&Tok::Punct(':'))
        {
            name = self.name("a node name")?;
            self.at += 1;
        }
        let mut outputs = Vec::new();
        if matches!(self.peek(), Some(Tok::Value(_))) || self.is_word("_") {
            loop {
                if self.is_word("_") {
                    self.at += 1;
                    outputs.push(None);
                } else {
                    let (vpos, v) = self.value_name()?;
                    let ty = if self.eat_punct(':') {
                        Some(self.value_type()?)
                    } else {
                        None
                    };
                    outputs.push(Some(OutAst {
                        pos: vpos,
                        name: v,
                        ty,
                    }));
                }
                if !self.eat_punct(',') {
                    break;
                }
            }
            self.expect_punct('=', "after a node's outputs")?;
        }
        let (domain, op_type) = self.op()?;
        self.expect_punct('(', "to open the node's inputs")?;
        let mut inputs = Vec::new();
        if !self.eat_punct(')') {
            loop {
                if self.is_word("_") {
                    self.at += 1;
                    inputs.push(None);
                } else {
                    inputs.push(Some(self.value_name()?));
                }
                if self.eat_punct(')') {
                    break;
                }
                self.expect_punct(',', "between node inputs")?;
            }
        }
        let mut attrs = Vec::new();
        if self.eat_punct('{') && !self.eat_punct('}') {
            loop {
                let aname = self.name("an attribute name")?;
                self.expect_punct('=', "after an attribute name")?;
                let value = self.attr_value()?;
                let doc = if self.is_word("doc") && matches!(self.peek2(), Some(Tok::Str(_))) {
                    self.at += 1;
                    self.text("doc string")?
                } else {
                    String::new()
                };
                attrs.push(Attribute {
                    name: aname,
                    value,
                    doc,
                });
                if self.eat_punct('}') {
                    break;
                }
                self.expect_punct(',', "between attributes")?;
            }
        }
        Ok(NodeAst {
            pos,
            name,
            domain,
            op_type,
            overload: String::new(),
            outputs,
            inputs,
            attrs,
            doc: String::new(),
            meta: Metadata::new(),
        })
    }

    fn op(&mut self) -> PResult<(String, String)> {
        match self.next()? {
            (Tok::Word("op"), _) if self.is_punct('(') => {
                self.at += 1;
                let d = self.text("operator domain")?;
                self.expect_punct(',', "between domain and operator")?;
                let o = self.text("operator type")?;
                self.expect_punct(')', "after the operator")?;
                Ok((d, o))
            }
            (Tok::Word(w), _) => Ok(match w.rsplit_once('.') {
                Some((d, o)) => (d.to_string(), o.to_string()),
                None => (String::new(), w.to_string()),
            }),
            (t, pos) => err(
                pos,
                format!("expected an operator such as Conv, found {}", t.describe()),
            ),
        }
    }

    // ----- types and tensors -----

    fn dtype(&mut self) -> PResult<DataType> {
        match self.next()? {
            (Tok::Word(w), pos) => DataType::from_name(w)
                .map_or_else(|| err(pos, format!("'{w}' is not a data type")), Ok),
            (t, pos) => err(
                pos,
                format!("expected a data type such as f32, found {}", t.describe()),
            ),
        }
    }

    /// Enters one level of nesting (subgraph, type, list), bounded so deep
    /// input cannot exhaust the stack.
    fn nested<T>(&mut self, f: impl FnOnce(&mut Parser<'a>) -> PResult<T>) -> PResult<T> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return err(self.pos(), too_deep());
        }
        let r = f(self);
        self.depth -= 1;
        r
    }

    fn value_type(&mut self) -> PResult<ValueType> {
        self.nested(Parser::value_type_inner)
    }

    fn value_type_inner(&mut self) -> PResult<ValueType> {
        let pos = self.pos();
        let word = match self.peek() {
            Some(Tok::Word(w)) => *w,
            _ => {
                return err(
                    pos,
                    format!("expected a type such as f32[N,3], found {}", self.found()),
                )
            }
        };
        let wrapped = |p: &mut Parser<'a>| -> PResult<ValueType> {
            p.at += 1;
            p.expect_punct('(', "after the type constructor")?;
            let t = p.value_type()?;
            p.expect_punct(')', "to close the type")?;
            Ok(t)
        };
        Ok(match word {
            "seq" => ValueType::Sequence(Box::new(wrapped(self)?)),
            "optional" => ValueType::Optional(Box::new(wrapped(self)?)),
            "sparse" => match wrapped(self)? {
                ValueType::Tensor(t) => ValueType::SparseTensor(t),
                _ => return err(pos, "sparse(...) takes a tensor type"),
            },
            "map" => {
                self.at += 1;
                self.expect_punct('(', "after map")?;
                let k = self.dtype()?;
                self.expect_punct(',', "between map key and value types")?;
                let v = self.value_type()?;
                self.expect_punct(')', "to close the map type")?;
                ValueType::Map(k, Box::new(v))
            }
            "opaque" => {
                self.at += 1;
                self.expect_punct('(', "after opaque")?;
                let domain = self.text("opaque domain")?;
                self.expect_punct(',', "between opaque domain and name")?;
                let name = self.text("opaque name")?;
                self.expect_punct(')', "to close the opaque type")?;
                ValueType::Opaque { domain, name }
            }
            _ => ValueType::Tensor(self.tensor_type()?),
        })
    }

    fn tensor_type(&mut self) -> PResult<TensorType> {
        let dtype = if self.is_word("undefined") {
            self.at += 1;
            None
        } else {
            Some(self.dtype()?)
        };
        if !self.eat_punct('[') {
            return Ok(TensorType { dtype, shape: None });
        }
        let mut dims = Vec::new();
        if !self.eat_punct(']') {
            loop {
                dims.push(match self.next()? {
                    (Tok::Num { text, float: false }, pos) => Dim::Known(
                        text.parse()
                            .or_else(|_| err(pos, format!("{text} does not fit in 64 bits")))?,
                    ),
                    (Tok::Word(w), _) => Dim::Symbol(w.to_string()),
                    (Tok::Str(s), pos) => Dim::Symbol(utf8(pos, string_bytes(s).into_owned())?),
                    (Tok::Punct('?'), _) => Dim::Unknown,
                    (t, pos) => {
                        return err(pos, format!("expected a dimension, found {}", t.describe()))
                    }
                });
                if self.eat_punct(']') {
                    break;
                }
                self.expect_punct(',', "between dimensions")?;
            }
        }
        Ok(TensorType {
            dtype,
            shape: Some(dims),
        })
    }

    /// `DTYPE[shape] DATA` where DATA is `[values]`, `<blake3:...>` or `raw "hex"`.
    fn tensor_literal(&mut self) -> PResult<Tensor> {
        let pos = self.pos();
        let dtype = self.dtype()?;
        self.expect_punct('[', "to open the tensor's shape")?;
        let mut shape = Vec::new();
        if !self.eat_punct(']') {
            loop {
                let d = self.int("dimension")?;
                shape.push(
                    usize::try_from(d)
                        .or_else(|_| err(pos, format!("dimension {d} is negative")))?,
                );
                if self.eat_punct(']') {
                    break;
                }
                self.expect_punct(',', "between dimensions")?;
            }
        }
        let count = qgraph_ir::element_count(&shape)
            .map_or_else(|| err(pos, "the shape has too many elements"), Ok)?;
        let tensor_err = |e: qgraph_ir::TensorError| SyntaxError {
            pos,
            message: e.to_string(),
        };
        match self.peek() {
            Some(Tok::Digest(_)) => {
                let Ok((Tok::Digest(d), _)) = self.next() else {
                    unreachable!("peeked")
                };
                return Ok(Tensor::Elided(ElidedTensor {
                    dtype,
                    shape,
                    digest: d.to_string(),
                }));
            }
            Some(Tok::Word("raw")) => {
                self.at += 1;
                let hpos = self.pos();
                let hex = self.text("hexadecimal bytes")?;
                if hex.len() % 2 != 0 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                    return err(
                        hpos,
                        "raw data must be an even number of hexadecimal digits",
                    );
                }
                let bytes: Vec<u8> = (0..hex.len() / 2)
                    .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0))
                    .collect();
                return Tensor::from_le_bytes(dtype, &shape, &bytes).map_err(tensor_err);
            }
            _ => {}
        }
        self.expect_punct('[', "to open the tensor's values")?;
        // The values are read where they lie, every other token from
        // `first` (the commas between them), not copied out.
        let first = self.at;
        let mut n = 0;
        if !self.eat_punct(']') {
            loop {
                self.next()?;
                n += 1;
                if self.eat_punct(']') {
                    break;
                }
                self.expect_punct(',', "between tensor values")?;
            }
        }
        if n != count {
            return err(
                pos,
                format!(
                    "{dtype}{} needs {count} values, found {n}",
                    qgraph_ir::ShapeFmt(&shape),
                ),
            );
        }
        let items = || {
            self.toks[first..]
                .iter()
                .step_by(2)
                .take(count)
                .map(|t| (&t.tok, t.pos()))
        };
        let float_of = |(t, p): (&Tok, Pos)| -> PResult<f64> {
            match t {
                Tok::Num { text, .. } => {
                    parse_f64(text).map_or_else(|| err(p, format!("'{text}' is not a number")), Ok)
                }
                t => err(p, format!("expected a number, found {}", t.describe())),
            }
        };
        match dtype {
            DataType::F32 => {
                let mut v = Vec::with_capacity(count);
                for (t, p) in items() {
                    v.push(match t {
                        Tok::Num { text, .. } => parse_f32(text)
                            .map_or_else(|| err(p, format!("'{text}' is not a number")), Ok)?,
                        t => return err(p, format!("expected a number, found {}", t.describe())),
                    });
                }
                Tensor::f32(&shape, v).map_err(tensor_err)
            }
            DataType::F64 | DataType::F16 | DataType::BF16 => {
                // f16/bf16 go through f32: the printed text is the shortest
                // f32 that round-trips, which converts back exactly.
                let v = items().map(float_of).collect::<PResult<Vec<f64>>>()?;
                let v = if dtype == DataType::F64 {
                    v
                } else {
                    let mut out = Vec::with_capacity(count);
                    for (t, p) in items() {
                        out.push(match t {
                            Tok::Num { text, .. } => parse_f32(text)
                                .map_or_else(|| err(p, format!("'{text}' is not a number")), Ok)?
                                as f64,
                            _ => 0.0,
                        });
                    }
                    out
                };
                Tensor::from_floats(dtype, &shape, &v).map_err(tensor_err)
            }
            DataType::String => {
                let mut v = Vec::with_capacity(count);
                for (t, p) in items() {
                    match t {
                        Tok::Str(s) => v.push(string_bytes(s).into_owned()),
                        t => {
                            return err(
                                p,
                                format!("expected a quoted string, found {}", t.describe()),
                            )
                        }
                    }
                }
                Tensor::from_strings(&shape, v).map_err(tensor_err)
            }
            DataType::Bool => {
                let mut v = Vec::with_capacity(count);
                for (t, p) in items() {
                    match t {
                        Tok::Word("true") => v.push(1),
                        Tok::Word("false") => v.push(0),
                        t => {
                            return err(
                                p,
                                format!("expected true or false, found {}", t.describe()),
                            )
                        }
                    }
                }
                Tensor::from_ints(dtype, &shape, &v).map_err(tensor_err)
            }
            d if d.int_range().is_some() => {
                let mut v = Vec::with_capacity(count);
                for (t, p) in items() {
                    match t {
                        Tok::Num { text, float: false } => v.push(
                            text.parse::<i128>()
                                .or_else(|_| err(p, format!("'{text}' is too large")))?,
                        ),
                        t => return err(p, format!("expected an integer, found {}", t.describe())),
                    }
                }
                Tensor::from_ints(dtype, &shape, &v).map_err(|e| SyntaxError {
                    pos,
                    message: e.to_string(),
                })
            }
            d => err(
                pos,
                format!("{d} values are written as raw \"HEX\", not as a list"),
            ),
        }
    }

    // ----- attributes -----

    fn attr_value(&mut self) -> PResult<AttrValue> {
        self.nested(Parser::attr_value_inner)
    }

    fn attr_value_inner(&mut self) -> PResult<AttrValue> {
        let pos = self.pos();
        match self.peek().cloned() {
            Some(Tok::Num { text, float }) => {
                self.at += 1;
                if float {
                    parse_f32(text).map_or_else(
                        || err(pos, format!("'{text}' is not a number")),
                        |f| Ok(AttrValue::Float(f)),
                    )
                } else {
                    text.parse::<i64>()
                        .map(AttrValue::Int)
                        .or_else(|_| err(pos, format!("{text} does not fit in 64 bits")))
                }
            }
            Some(Tok::Str(s)) => {
                self.at += 1;
                Ok(AttrValue::String(string_bytes(s).into_owned()))
            }
            Some(Tok::Punct('[')) => self.attr_list(),
            Some(Tok::Word(w)) => match w {
                "graph" => {
                    self.at += 1;
                    Ok(AttrValue::Graph(Box::new(self.graph_block()?)))
                }
                "type" => {
                    self.at += 1;
                    self.expect_punct('(', "after type")?;
                    let t = self.value_type()?;
                    self.expect_punct(')', "to close the type")?;
                    Ok(AttrValue::Type(t))
                }
                "ref" => {
                    self.at += 1;
                    self.expect_punct('(', "after ref")?;
                    let kpos = self.pos();
                    let kind = self.name("an attribute kind")?;
                    let kind = AttrKind::from_name(&kind).map_or_else(
                        || err(kpos, format!("'{kind}' is not an attribute kind")),
                        Ok,
                    )?;
                    self.expect_punct(',', "after the kind")?;
                    let name = self.name("the referenced attribute")?;
                    self.expect_punct(')', "to close ref")?;
                    Ok(AttrValue::Ref { name, kind })
                }
                "floats" | "ints" | "strings" | "tensors" | "graphs" | "types" => {
                    self.at += 1;
                    self.expect_punct('[', "for an empty list")?;
                    self.expect_punct(']', "an empty list is written []")?;
                    Ok(match w {
                        "floats" => AttrValue::Floats(vec![]),
                        "ints" => AttrValue::Ints(vec![]),
                        "strings" => AttrValue::Strings(vec![]),
                        "tensors" => AttrValue::Tensors(vec![]),
                        "graphs" => AttrValue::Graphs(vec![]),
                        _ => AttrValue::Types(vec![]),
                    })
                }
                _ if DataType::from_name(w).is_some() => {
                    Ok(AttrValue::Tensor(self.tensor_literal()?))
                }
                _ => err(pos, format!("expected an attribute value, found '{w}'")),
            },
            _ => err(
                pos,
                format!("expected an attribute value, found {}", self.found()),
            ),
        }
    }

    fn attr_list(&mut self) -> PResult<AttrValue> {
        let pos = self.pos();
        self.expect_punct('[', "to open a list")?;
        let mut items = Vec::new();
        if !self.eat_punct(']') {
            loop {
                items.push(self.attr_value()?);
                if self.eat_punct(']') {
                    break;
                }
                self.expect_punct(',', "between list items")?;
            }
        }
        let Some(first) = items.first() else {
            return err(
                pos,
                "an empty list needs its kind: ints [], floats [], strings [], ...",
            );
        };
        let kind = first.kind();
        if items.iter().any(|i| i.kind() != kind) {
            return err(
                pos,
                "list items must all be of one kind (write 1.0, not 1, in a list of floats)",
            );
        }
        macro_rules! collect {
            ($variant:ident, $out:ident) => {
                AttrValue::$out(
                    items
                        .into_iter()
                        .map(|i| match i {
                            AttrValue::$variant(x) => x,
                            _ => unreachable!("kind checked"),
                        })
                        .collect(),
                )
            };
        }
        Ok(match kind {
            AttrKind::Float => collect!(Float, Floats),
            AttrKind::Int => collect!(Int, Ints),
            AttrKind::String => collect!(String, Strings),
            AttrKind::Tensor => collect!(Tensor, Tensors),
            AttrKind::Type => collect!(Type, Types),
            AttrKind::Graph => AttrValue::Graphs(
                items
                    .into_iter()
                    .map(|i| match i {
                        AttrValue::Graph(g) => *g,
                        _ => unreachable!("kind checked"),
                    })
                    .collect(),
            ),
            _ => {
                return err(
                    pos,
                    "lists hold floats, ints, strings, tensors, graphs or types",
                )
            }
        })
    }

    // ----- building -----

    fn build(&mut self, ast: GraphAst, pos: Pos) -> PResult<Graph> {
        let mut g = Graph::new(ast.name);
        g.doc = ast.doc;
        g.meta = ast.meta;
        g.quantization_annotations = ast.quants;
        let dup = |p: Pos, name: &str| err::<ValueId>(p, format!("value %{name} is defined twice"));
        let mut types: HashMap<ValueId, ValueType> = HashMap::new();
        let mut set_type = |g: &Graph, v: ValueId, ty: Option<ValueType>, p: Pos| -> PResult<()> {
            if let Some(t) = ty {
                if let Some(old) = types.get(&v) {
                    if *old != t {
                        return err(
                            p,
                            format!(
                                "value {} is given two types: {old} and {t}",
                                g.value(v).name()
                            ),
                        );
                    }
                }
                types.insert(v, t);
            }
            Ok(())
        };
        let mut inputs = Vec::new();
        for i in ast.inputs {
            let v = match i.default {
                Some(init) => {
                    let v = g
                        .add_initializer(i.name.clone(), init.tensor)
                        .or_else(|_| dup(i.pos, &i.name))?;
                    if let Ok(Some(slot)) = g.initializer_mut(v) {
                        slot.doc = init.doc;
                        slot.meta = init.meta;
                    }
                    v
                }
                None => g
                    .add_value(i.name.clone(), None)
                    .or_else(|_| dup(i.pos, &i.name))?,
            };
            set_type(&g, v, i.ty, i.pos)?;
            inputs.push(v);
        }
        for (p, name) in &ast.outers {
            g.add_captured(name.clone()).or_else(|_| dup(*p, name))?;
        }
        for i in ast.inits {
            let v = g
                .add_initializer(i.name.clone(), i.init.tensor)
                .or_else(|_| dup(i.pos, &i.name))?;
            if let Ok(Some(slot)) = g.initializer_mut(v) {
                slot.doc = i.init.doc;
                slot.meta = i.init.meta;
            }
            set_type(&g, v, i.ty, i.pos)?;
        }
        // Node outputs first, so nodes may use values defined further down.
        let mut outs_of: Vec<Vec<Option<ValueId>>> = Vec::with_capacity(ast.nodes.len());
        for n in &ast.nodes {
            let mut outs = Vec::new();
            for o in &n.outputs {
                match o {
                    None => outs.push(None),
                    Some(o) => {
                        let v = g
                            .add_value(o.name.clone(), None)
                            .or_else(|_| dup(o.pos, &o.name))?;
                        set_type(&g, v, o.ty.clone(), o.pos)?;
                        outs.push(Some(v));
                    }
                }
            }
            outs_of.push(outs);
        }
        for (n, outputs) in ast.nodes.into_iter().zip(outs_of) {
            let mut inputs_ids = Vec::with_capacity(n.inputs.len());
            for i in &n.inputs {
                inputs_ids.push(match i {
                    None => None,
                    Some((p, name)) => match g.value_by_name(name) {
                        Some(v) => Some(v),
                        None => {
                            return err(
                                *p,
                                format!("value %{name} is not defined (declare values of an enclosing graph with 'outer %{name}')"),
                            )
                        }
                    },
                });
            }
            let label = n.name.clone();
            g.add_node(NewNode {
                name: n.name,
                op_type: n.op_type,
                domain: n.domain,
                overload: n.overload,
                inputs: inputs_ids,
                outputs,
                attrs: n.attrs,
                doc: n.doc,
                meta: n.meta,
            })
            .or_else(|e| {
                err(
                    n.pos,
                    if label.is_empty() {
                        e.to_string()
                    } else {
                        format!("node '{label}': {e}")
                    },
                )
            })?;
        }
        g.set_inputs(inputs).or_else(|e| err(pos, e.to_string()))?;
        let mut outputs = Vec::new();
        for o in ast.outputs {
            let Some(v) = g.value_by_name(&o.name) else {
                return err(o.pos, format!("output %{} is not defined", o.name));
            };
            set_type(&g, v, o.ty, o.pos)?;
            outputs.push(v);
        }
        g.set_outputs(outputs)
            .or_else(|e| err(pos, e.to_string()))?;
        for (p, name, doc, meta) in ast.values {
            let Some(v) = g.value_by_name(&name) else {
                return err(p, format!("value %{name} is not defined"));
            };
            let val = g.value_mut(v).or_else(|e| err(p, e.to_string()))?;
            val.doc = doc;
            val.meta = meta;
        }
        let mut typed: Vec<(ValueId, ValueType)> = types.into_iter().collect();
        typed.sort_by_key(|(v, _)| *v);
        for (v, t) in typed {
            g.declare_type(v, Some(t))
                .or_else(|e| err(pos, e.to_string()))?;
        }
        Ok(g)
    }
}

/// Moves the graph statements out, leaving the function-only items.
fn ast_take(ast: &mut GraphAst) -> GraphAst {
    GraphAst {
        name: std::mem::take(&mut ast.name),
        doc: std::mem::take(&mut ast.doc),
        meta: std::mem::take(&mut ast.meta),
        inputs: std::mem::take(&mut ast.inputs),
        outputs: std::mem::take(&mut ast.outputs),
        outers: std::mem::take(&mut ast.outers),
        inits: std::mem::take(&mut ast.inits),
        nodes: std::mem::take(&mut ast.nodes),
        values: std::mem::take(&mut ast.values),
        quants: std::mem::take(&mut ast.quants),
        ..GraphAst::default()
    }
}

fn parse_f32(text: &str) -> Option<f32> {
    match text {
        "inf" => Some(f32::INFINITY),
        "-inf" => Some(f32::NEG_INFINITY),
        "nan" => Some(f32::NAN),
        t => t.parse().ok(),
    }
}

fn parse_f64(text: &str) -> Option<f64> {
    match text {
        "inf" => Some(f64::INFINITY),
        "-inf" => Some(f64::NEG_INFINITY),
        "nan" => Some(f64::NAN),
        t => t.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "ir_version 8\nopset \"\" 13\n";

    fn error(src: &str) -> String {
        parse_model(src).unwrap_err().to_string()
    }

    #[test]
    fn brackets_nested_too_deep_are_refused_as_they_are_read() {
        for open in ["[", "(", "{"] {
            let src = format!("{HEADER}{}", open.repeat(1_000_000));
            let t = std::time::Instant::now();
            assert_eq!(
                error(&src),
                "line 3, column 401: brackets nested deeper than 400 levels",
                "{open}"
            );
            assert!(t.elapsed().as_secs_f64() < 1.0, "{open}: {:?}", t.elapsed());
        }
        // Closing brackets free their level: deep in total, shallow at once.
        let src = format!("{HEADER}{}", "[[]]".repeat(100));
        assert!(!error(&src).contains("nesting"));
        let src = format!("{HEADER}{}{}", "]".repeat(100), "[".repeat(64));
        assert!(!error(&src).contains("nesting"), "{}", error(&src));
    }

    #[test]
    fn the_parser_reports_its_own_nesting_error_where_it_comes_first() {
        // The parser counts types, not brackets: the 100th seq( is one level
        // too deep for it, the bracket after it for the lexer.
        let src = format!(
            "{HEADER}graph g {{\n  input %x: {}f32\n}}\n",
            "seq(".repeat(1000)
        );
        assert_eq!(
            error(&src),
            format!(
                "line 4, column {}: nesting deeper than 100 levels",
                13 + 4 * 99
            )
        );
        // A list in an attribute: the parser's list limit comes first.
        let src = format!(
            "{HEADER}graph g {{\n  input %x: f32[2]\n  output %y: f32[2]\n  %y = Relu(%x) {{a = {}",
            "[".repeat(1000)
        );
        assert_eq!(
            error(&src),
            "line 6, column 121: nesting deeper than 100 levels"
        );
        // Other errors before the brackets are still found after them.
        let src = format!("{HEADER}graph g {{ \"open {}", "[".repeat(100));
        assert_eq!(error(&src), "line 3, column 11: unterminated string");
    }

    /// `If` nested `levels` deep, a Constant at the bottom and in every
    /// else branch: two brackets a level, and three more for the tensor.
    fn nested_ifs(levels: usize) -> String {
        fn branch(level: usize, levels: usize) -> String {
            if level == levels {
                return format!(
                    "graph g{level} {{\n output %v{level}: f32[1]\n k{level}: %v{level} = Constant() {{value = f32[1] [1.0]}}\n}}"
                );
            }
            format!(
                "graph g{level} {{\n outer %c\n output %v{level}: f32[1]\n n{level}: %v{level} = If(%c) {{then_branch = {}, else_branch = graph e{level} {{\n output %w{level}: f32[1]\n c{level}: %w{level} = Constant() {{value = f32[1] [2.0]}}\n}}}}\n}}",
                branch(level + 1, levels)
            )
        }
        format!(
            "{HEADER}graph main {{\n input %c: bool[]\n output %y: f32[1]\n top: %y = Identity(%v0)\n n: %v0 = If(%c) {{then_branch = {}, else_branch = graph e {{\n output %w: f32[1]\n c: %w = Constant() {{value = f32[1] [3.0]}}\n}}}}\n}}\n",
            branch(1, levels)
        )
    }

    #[test]
    fn what_the_parser_accepts_is_never_refused_for_its_brackets() {
        // 32 levels of subgraphs (as deep as ONNX files can be read) take
        // more than 64 brackets: the lexer's limit must not be the parser's.
        let model = parse_model(&nested_ifs(32)).unwrap();
        let text = crate::print_model(&model, &Default::default());
        assert_eq!(
            crate::print_model(&parse_model(&text).unwrap(), &Default::default()),
            text
        );
    }

    #[test]
    fn nesting_within_the_limit_parses() {
        // 20 nested sequence types and a 3-deep list of graphs.
        let ty = format!("{}f32[N]{}", "seq(".repeat(20), ")".repeat(20));
        let src = format!(
            "{HEADER}graph g {{\n  input %x: {ty}\n  output %y: {ty}\n  %y = Identity(%x)\n}}\n"
        );
        let m = parse_model(&src).unwrap();
        let printed = crate::print_model(&m, &crate::PrintOptions::default());
        let again = parse_model(&printed).unwrap();
        assert_eq!(
            crate::print_model(&again, &crate::PrintOptions::default()),
            printed
        );
    }

    #[test]
    fn strings_and_names_decode_as_before() {
        let src = format!(
            "{HEADER}doc \"a\\\"b\\\\c\\x41\\né\"\ngraph g {{\n  input %\"x y\\x21\": f32[1]\n  output %\"x y\\x21\"\n}}\n"
        );
        let m = parse_model(&src).unwrap();
        assert_eq!(m.doc, "a\"b\\cA\né");
        assert_eq!(m.graph.value(m.graph.inputs()[0]).name(), "x y!");
        assert_eq!(
            error(&format!("{HEADER}doc \"\\q\"")),
            "line 3, column 5: unknown escape \\q"
        );
        assert_eq!(
            error(&format!("{HEADER}doc \"\\x4é\"")),
            "line 3, column 5: bad escape \\x4é: expected two hexadecimal digits"
        );
        assert_eq!(
            error(&format!("{HEADER}doc \"é\"\n  %\"\\xff\"")),
            "line 4, column 3: a value name must be valid UTF-8"
        );
        assert_eq!(
            error(&format!("{HEADER}  é")),
            "line 3, column 3: unexpected character 'é'"
        );
    }
}
