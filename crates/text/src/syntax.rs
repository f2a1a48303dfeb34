//! Lexical rules shared by the printer and the parser, and the lexer.

use qgraph_ir::quote::quote;
use qgraph_ir::Tensor;
use std::borrow::Cow;

/// Statement keywords: a node label spelled like one is quoted.
pub const KEYWORDS: &[&str] = &[
    "ir_version",
    "opset",
    "producer",
    "domain",
    "model_version",
    "doc",
    "meta",
    "graph",
    "function",
    "input",
    "output",
    "outer",
    "init",
    "value",
    "quant",
    "overload",
    "attribute",
];

fn word_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == '/'
}

fn word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

/// Whether `s` lexes as one bare word (labels, op types, graph names).
pub fn is_word(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if word_start(c)) && chars.all(word_char)
}

/// A value reference: `%name`, or `%"name"` when it has other characters.
pub fn value_ref(name: &str) -> String {
    if !name.is_empty() && name.chars().all(name_char) {
        format!("%{name}")
    } else {
        format!("%{}", quote(name))
    }
}

/// Content digest of a tensor: the first 16 hex digits of the BLAKE3 hash of
/// its type, shape and little-endian data. Stable across platforms.
pub fn digest(t: &Tensor) -> String {
    if let Tensor::Elided(e) = t {
        return e.digest.clone();
    }
    let mut h = blake3::Hasher::new();
    h.update(t.dtype().name().as_bytes());
    h.update(&[0]);
    h.update(&(t.shape().len() as u64).to_le_bytes());
    for &d in t.shape() {
        h.update(&(d as u64).to_le_bytes());
    }
    match t {
        Tensor::String(a) => {
            for s in a.iter() {
                h.update(&(s.len() as u64).to_le_bytes());
                h.update(s);
            }
        }
        t => {
            // Fixed-width types always have a byte layout.
            if let Ok(bytes) = t.to_le_bytes() {
                h.update(&bytes);
            }
        }
    }
    h.finalize().to_hex()[..16].to_string()
}

/// Deepest nesting of subgraphs, attribute values, types and lists the
/// parser accepts: it protects the stack. Protobuf decoding allows 100
/// nested messages, 32 levels of subgraphs in an ONNX file, which take 2
/// levels each here (the attribute and its graph): every model read from
/// ONNX prints as a text that parses back.
pub(crate) const MAX_DEPTH: usize = 100;

/// Deepest nesting of brackets the lexer accepts: it bounds what a text of
/// nothing but brackets costs before it is refused. A construct at the
/// parser's limit takes more than one bracket a level (a subgraph in an
/// attribute takes two), so this is the parser's limit four times over: a
/// model the parser accepts is never refused here.
pub(crate) const MAX_BRACKETS: usize = 4 * MAX_DEPTH;

/// The message of the parser's nesting check.
pub(crate) fn too_deep() -> String {
    format!("nesting deeper than {MAX_DEPTH} levels")
}

/// The message of the lexer's bracket check.
pub(crate) fn brackets_too_deep() -> String {
    format!("brackets nested deeper than {MAX_BRACKETS} levels")
}

/// A token: a slice of the text, decoded where it is used.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tok<'a> {
    Word(&'a str),
    /// `%name` or `%"name"`: the name as written after '%' ([`value_name`]).
    Value(&'a str),
    /// A quoted string as written, quotes included ([`string_bytes`]).
    Str(&'a str),
    /// A number as written; `float` when it has a '.', an exponent, or is
    /// inf/nan.
    Num {
        text: &'a str,
        float: bool,
    },
    /// `<blake3:HEX>`
    Digest(&'a str),
    Punct(char),
}

impl Tok<'_> {
    pub fn describe(&self) -> String {
        match self {
            Tok::Word(w) => format!("'{w}'"),
            Tok::Value(v) => format!("'{}'", value_ref(&value_name(v))),
            Tok::Str(s) => format!("string {}", qgraph_ir::quote::quote_bytes(&string_bytes(s))),
            Tok::Num { text, .. } => format!("number {text}"),
            Tok::Digest(d) => format!("<blake3:{d}>"),
            Tok::Punct(c) => format!("'{c}'"),
        }
    }
}

/// The bytes of a string token ([`Tok::Str`]).
pub fn string_bytes(written: &str) -> Cow<'_, [u8]> {
    // The lexer checked it.
    lex_string(written).map(|(b, _)| b).unwrap_or_default()
}

/// The name of a value token ([`Tok::Value`]).
pub fn value_name(written: &str) -> Cow<'_, str> {
    if !written.starts_with('"') {
        return Cow::Borrowed(written);
    }
    // The lexer checked that it is UTF-8.
    match string_bytes(written) {
        Cow::Borrowed(b) => String::from_utf8_lossy(b),
        Cow::Owned(b) => Cow::Owned(String::from_utf8_lossy(&b).into_owned()),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {}, column {}: {message}", pos.line, pos.col)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// A token and where it starts. A text is held as a list of these, so
/// their size is what the list costs per token (32 bytes on 64-bit
/// targets; lines and columns past 2^32 saturate).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Token<'a> {
    pub tok: Tok<'a>,
    line: u32,
    col: u32,
}

impl Token<'_> {
    pub fn pos(&self) -> Pos {
        Pos {
            line: self.line as usize,
            col: self.col as usize,
        }
    }
}

/// What the lexer read: the tokens before its first error, and that error.
pub struct Lexed<'a> {
    pub toks: Vec<Token<'a>>,
    pub error: Option<LexError>,
}

pub struct LexError {
    pub error: SyntaxError,
    /// Brackets nested deeper than [`MAX_BRACKETS`].
    pub too_deep: bool,
}

/// Lexes the whole text; the first error ends it.
#[cfg(test)]
pub fn lex(src: &str) -> Result<Vec<Token<'_>>, SyntaxError> {
    let lexed = lex_until_error(src);
    match lexed.error {
        Some(e) => Err(e.error),
        None => Ok(lexed.toks),
    }
}

/// Lexes up to the first error, keeping the tokens before it. The text is
/// read in place (characters are decoded only where one is not ASCII), and
/// brackets nested deeper than [`MAX_BRACKETS`] are an error as they are
/// read, so a text of nothing but brackets is refused after 400 tokens.
pub fn lex_until_error(src: &str) -> Lexed<'_> {
    let mut lexer = Lexer {
        src,
        at: 0,
        line: 1,
        col: 1,
        depth: 0,
    };
    let mut toks = Vec::new();
    loop {
        match lexer.token() {
            Ok(Some(t)) => toks.push(t),
            Ok(None) => return Lexed { toks, error: None },
            Err(e) => {
                return Lexed {
                    toks,
                    error: Some(e),
                }
            }
        }
    }
}

struct Lexer<'a> {
    src: &'a str,
    /// Byte offset of the next character.
    at: usize,
    line: u32,
    col: u32,
    /// Brackets open.
    depth: usize,
}

impl<'a> Lexer<'a> {
    /// Moves past `n` bytes, counting lines and characters.
    fn bump(&mut self, n: usize) {
        for &b in &self.src.as_bytes()[self.at..self.at + n] {
            if b == b'\n' {
                self.line = self.line.saturating_add(1);
                self.col = 1;
            } else if b & 0xC0 != 0x80 {
                // Not a UTF-8 continuation byte: a character starts here.
                self.col = self.col.saturating_add(1);
            }
        }
        self.at += n;
    }

    /// The next token, `None` at the end of the text.
    fn token(&mut self) -> Result<Option<Token<'a>>, LexError> {
        loop {
            let src: &'a str = self.src;
            let rest = &src[self.at..];
            let bytes = rest.as_bytes();
            let Some(&b) = bytes.first() else {
                return Ok(None);
            };
            let (line, col) = (self.line, self.col);
            let fail = |message: String| LexError {
                error: SyntaxError {
                    pos: Pos {
                        line: line as usize,
                        col: col as usize,
                    },
                    message,
                },
                too_deep: false,
            };
            let (tok, used) = match b {
                b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c' => {
                    self.bump(1);
                    continue;
                }
                b'#' => {
                    let n = bytes
                        .iter()
                        .position(|&b| b == b'\n')
                        .unwrap_or(bytes.len());
                    self.bump(n);
                    continue;
                }
                b'"' => {
                    let (_, used) = lex_string(rest).map_err(fail)?;
                    (Tok::Str(&rest[..used]), used)
                }
                b'%' if bytes.get(1) == Some(&b'"') => {
                    let (name, used) = lex_string(&rest[1..]).map_err(fail)?;
                    if std::str::from_utf8(&name).is_err() {
                        return Err(fail("a value name must be valid UTF-8".into()));
                    }
                    (Tok::Value(&rest[1..=used]), used + 1)
                }
                b'%' => {
                    let n = bytes[1..]
                        .iter()
                        .take_while(|&&b| name_char(b as char))
                        .count();
                    if n == 0 {
                        return Err(fail("expected a value name after '%'".into()));
                    }
                    (Tok::Value(&rest[1..=n]), n + 1)
                }
                b'<' => {
                    let n = bytes
                        .iter()
                        .position(|&b| b == b'>' || b == b'\n')
                        .unwrap_or(bytes.len());
                    let Some(hex) = rest[1..n].strip_prefix("blake3:") else {
                        return Err(fail("expected <blake3:DIGEST>".into()));
                    };
                    if bytes.get(n) != Some(&b'>') {
                        return Err(fail("unclosed '<'".into()));
                    }
                    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(fail(format!("'{hex}' is not a hexadecimal digest")));
                    }
                    (Tok::Digest(hex), n + 1)
                }
                b'(' | b'[' | b'{' => {
                    self.depth += 1;
                    if self.depth > MAX_BRACKETS {
                        return Err(LexError {
                            too_deep: true,
                            ..fail(brackets_too_deep())
                        });
                    }
                    (Tok::Punct(b as char), 1)
                }
                b')' | b']' | b'}' => {
                    self.depth = self.depth.saturating_sub(1);
                    (Tok::Punct(b as char), 1)
                }
                b',' | b':' | b'=' | b'?' => (Tok::Punct(b as char), 1),
                _ => match number(bytes) {
                    Some(Ok((n, float))) => (
                        Tok::Num {
                            text: &rest[..n],
                            float,
                        },
                        n,
                    ),
                    Some(Err(m)) => return Err(fail(m.into())),
                    None if word_start(b as char) => {
                        let n = bytes.iter().take_while(|&&b| word_char(b as char)).count();
                        let w = &rest[..n];
                        let tok = match w {
                            "inf" | "nan" => Tok::Num {
                                text: w,
                                float: true,
                            },
                            _ => Tok::Word(w),
                        };
                        (tok, n)
                    }
                    None => {
                        let c = rest.chars().next().expect("not at the end");
                        if c.is_whitespace() {
                            self.bump(c.len_utf8());
                            continue;
                        }
                        return Err(fail(format!("unexpected character {c:?}")));
                    }
                },
            };
            self.bump(used);
            return Ok(Some(Token { tok, line, col }));
        }
    }
}

/// The length of the number `bytes` starts with and whether it is a float;
/// `None` when they do not start one.
fn number(bytes: &[u8]) -> Option<Result<(usize, bool), &'static str>> {
    let at = |k: usize| bytes.get(k).copied();
    let negative = bytes.first() == Some(&b'-');
    let after_sign = usize::from(negative);
    let inf = negative && bytes[after_sign..].starts_with(b"inf");
    if !(at(after_sign).is_some_and(|b| b.is_ascii_digit()) || inf) {
        return None;
    }
    if inf && !at(after_sign + 3).is_some_and(|b| word_char(b as char)) {
        return Some(Ok((4, true)));
    }
    let digits = |mut j: usize| {
        while at(j).is_some_and(|b| b.is_ascii_digit()) {
            j += 1;
        }
        j
    };
    let mut j = digits(after_sign);
    let mut float = false;
    if at(j) == Some(b'.') {
        float = true;
        j = digits(j + 1);
    }
    if matches!(at(j), Some(b'e' | b'E')) {
        let mut k = j + 1;
        if matches!(at(k), Some(b'-' | b'+')) {
            k += 1;
        }
        if at(k).is_some_and(|b| b.is_ascii_digit()) {
            float = true;
            j = digits(k);
        }
    }
    if at(j).is_some_and(|b| word_char(b as char) && b != b'-') {
        return Some(Err("a number runs into letters"));
    }
    Some(Ok((j, float)))
}

/// Lexes a quoted string at the start of `s` (`s` starts with '"'); returns
/// its bytes (borrowed from `s` when it has no escapes) and the number of
/// bytes of `s` it spans.
fn lex_string(s: &str) -> Result<(Cow<'_, [u8]>, usize), String> {
    let bytes = s.as_bytes();
    // The common case: no escapes, the bytes as written.
    let end = bytes[1..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\')
        .map(|k| k + 1);
    match end {
        None => return Err("unterminated string".into()),
        Some(k) if bytes[k] == b'"' => return Ok((Cow::Borrowed(&bytes[1..k]), k + 1)),
        Some(_) => {}
    }
    let mut out = Vec::new();
    let mut i = 1;
    loop {
        let Some(&b) = bytes.get(i) else {
            return Err("unterminated string".into());
        };
        match b {
            b'"' => return Ok((Cow::Owned(out), i + 1)),
            b'\\' => {
                let Some(&e) = bytes.get(i + 1) else {
                    return Err("unterminated string".into());
                };
                match e {
                    b'n' => out.push(b'\n'),
                    b'r' => out.push(b'\r'),
                    b't' => out.push(b'\t'),
                    b'"' => out.push(b'"'),
                    b'\\' => out.push(b'\\'),
                    b'x' => {
                        // The next two characters, whatever they are.
                        let two: String = s[i + 2..].chars().take(2).collect();
                        let hex = if two.chars().count() == 2 {
                            two
                        } else {
                            String::new()
                        };
                        if hex.len() != 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                            return Err(format!(
                                "bad escape \\x{hex}: expected two hexadecimal digits"
                            ));
                        }
                        out.push(u8::from_str_radix(&hex, 16).unwrap_or(0));
                        i += 2;
                    }
                    _ => {
                        let other = s[i + 1..].chars().next().unwrap_or('\\');
                        return Err(format!("unknown escape \\{other}"));
                    }
                }
                i += 2;
            }
            _ => {
                // Up to the next quote or backslash, as written.
                let n = bytes[i..]
                    .iter()
                    .position(|&b| b == b'"' || b == b'\\')
                    .unwrap_or(bytes.len() - i);
                out.extend_from_slice(&bytes[i..i + n]);
                i += n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexes_the_token_kinds() {
        let toks: Vec<Tok> = lex(
            r#"%/a/b_0 %"x::y" "s\x01" -1 2.5 1e-5 -inf nan <blake3:00ff> Conv com.ms.Op ( ) # c"#,
        )
        .unwrap()
        .into_iter()
        .map(|t| t.tok)
        .collect();
        assert_eq!(toks[0], Tok::Value("/a/b_0"));
        assert_eq!(toks[1], Tok::Value("\"x::y\""));
        assert_eq!(value_name("\"x::y\""), "x::y");
        assert_eq!(toks[2], Tok::Str("\"s\\x01\""));
        assert_eq!(string_bytes("\"s\\x01\""), &b"s\x01"[..]);
        assert_eq!(
            toks[3],
            Tok::Num {
                text: "-1",
                float: false
            }
        );
        assert_eq!(
            toks[4],
            Tok::Num {
                text: "2.5",
                float: true
            }
        );
        assert_eq!(
            toks[5],
            Tok::Num {
                text: "1e-5",
                float: true
            }
        );
        assert_eq!(
            toks[6],
            Tok::Num {
                text: "-inf",
                float: true
            }
        );
        assert_eq!(
            toks[7],
            Tok::Num {
                text: "nan",
                float: true
            }
        );
        assert_eq!(toks[8], Tok::Digest("00ff"));
        assert_eq!(toks[9], Tok::Word("Conv"));
        assert_eq!(toks[10], Tok::Word("com.ms.Op"));
        assert_eq!(toks.len(), 13);
    }

    #[test]
    fn lexer_errors_carry_positions() {
        let e = lex("ir_version 7\n  \"open").unwrap_err();
        assert_eq!(e.to_string(), "line 2, column 3: unterminated string");
        assert!(lex("12abc").is_err());
        assert!(lex("<sha1:00>").is_err());
        assert!(lex("\"\\x4\"").is_err());
    }

    #[test]
    fn tokens_are_small() {
        assert!(
            std::mem::size_of::<Token>() <= 32,
            "{}",
            std::mem::size_of::<Token>()
        );
    }
}
