//! Lexical rules shared by the printer and the parser, and the lexer.

use qgraph_ir::quote::quote;
use qgraph_ir::Tensor;

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

#[derive(Clone, Debug, PartialEq)]
pub enum Tok {
    Word(String),
    /// `%name` or `%"name"`.
    Value(String),
    /// A quoted string, as bytes.
    Str(Vec<u8>),
    /// A number as written; `float` when it has a '.', an exponent, or is
    /// inf/nan.
    Num {
        text: String,
        float: bool,
    },
    /// `<blake3:HEX>`
    Digest(String),
    Punct(char),
}

impl Tok {
    pub fn describe(&self) -> String {
        match self {
            Tok::Word(w) => format!("'{w}'"),
            Tok::Value(v) => format!("'{}'", value_ref(v)),
            Tok::Str(s) => format!("string {}", qgraph_ir::quote::quote_bytes(s)),
            Tok::Num { text, .. } => format!("number {text}"),
            Tok::Digest(d) => format!("<blake3:{d}>"),
            Tok::Punct(c) => format!("'{c}'"),
        }
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

pub fn lex(src: &str) -> Result<Vec<(Tok, Pos)>, SyntaxError> {
    let chars: Vec<char> = src.chars().collect();
    let mut toks = Vec::new();
    let (mut i, mut line, mut col) = (0usize, 1usize, 1usize);
    let err = |pos: Pos, message: String| Err(SyntaxError { pos, message });
    while i < chars.len() {
        let c = chars[i];
        let pos = Pos { line, col };
        let advance = |i: &mut usize, line: &mut usize, col: &mut usize, n: usize| {
            for _ in 0..n {
                if chars[*i] == '\n' {
                    *line += 1;
                    *col = 1;
                } else {
                    *col += 1;
                }
                *i += 1;
            }
        };
        if c.is_whitespace() {
            advance(&mut i, &mut line, &mut col, 1);
            continue;
        }
        if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                advance(&mut i, &mut line, &mut col, 1);
            }
            continue;
        }
        if c == '"' {
            let (bytes, used) = match lex_string(&chars[i..]) {
                Ok(r) => r,
                Err(m) => return err(pos, m),
            };
            advance(&mut i, &mut line, &mut col, used);
            toks.push((Tok::Str(bytes), pos));
            continue;
        }
        if c == '%' {
            let rest = &chars[i + 1..];
            if rest.first() == Some(&'"') {
                let (bytes, used) = match lex_string(rest) {
                    Ok(r) => r,
                    Err(m) => return err(pos, m),
                };
                let Ok(name) = String::from_utf8(bytes) else {
                    return err(pos, "a value name must be valid UTF-8".into());
                };
                advance(&mut i, &mut line, &mut col, used + 1);
                toks.push((Tok::Value(name), pos));
            } else {
                let n = rest.iter().take_while(|&&c| name_char(c)).count();
                if n == 0 {
                    return err(pos, "expected a value name after '%'".into());
                }
                let name: String = rest[..n].iter().collect();
                advance(&mut i, &mut line, &mut col, n + 1);
                toks.push((Tok::Value(name), pos));
            }
            continue;
        }
        if c == '<' {
            let n = chars[i..]
                .iter()
                .take_while(|&&c| c != '>' && c != '\n')
                .count();
            let body: String = chars[i + 1..i + n].iter().collect();
            let Some(hex) = body.strip_prefix("blake3:") else {
                return err(pos, "expected <blake3:DIGEST>".into());
            };
            if i + n >= chars.len() || chars[i + n] != '>' {
                return err(pos, "unclosed '<'".into());
            }
            if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return err(pos, format!("'{hex}' is not a hexadecimal digest"));
            }
            toks.push((Tok::Digest(hex.to_string()), pos));
            advance(&mut i, &mut line, &mut col, n + 1);
            continue;
        }
        let negative = c == '-';
        let after_sign = if negative { i + 1 } else { i };
        if after_sign < chars.len()
            && (chars[after_sign].is_ascii_digit()
                || (negative && starts_with(&chars[after_sign..], "inf")))
        {
            if negative
                && starts_with(&chars[after_sign..], "inf")
                && !chars.get(after_sign + 3).is_some_and(|&c| word_char(c))
            {
                toks.push((
                    Tok::Num {
                        text: "-inf".into(),
                        float: true,
                    },
                    pos,
                ));
                advance(&mut i, &mut line, &mut col, 4);
                continue;
            }
            let mut j = after_sign;
            let mut float = false;
            while j < chars.len() && chars[j].is_ascii_digit() {
                j += 1;
            }
            if j < chars.len() && chars[j] == '.' {
                float = true;
                j += 1;
                while j < chars.len() && chars[j].is_ascii_digit() {
                    j += 1;
                }
            }
            if j < chars.len() && (chars[j] == 'e' || chars[j] == 'E') {
                let mut k = j + 1;
                if k < chars.len() && (chars[k] == '-' || chars[k] == '+') {
                    k += 1;
                }
                if k < chars.len() && chars[k].is_ascii_digit() {
                    float = true;
                    j = k;
                    while j < chars.len() && chars[j].is_ascii_digit() {
                        j += 1;
                    }
                }
            }
            if j < chars.len() && word_char(chars[j]) && chars[j] != '-' {
                return err(pos, "a number runs into letters".into());
            }
            let text: String = chars[i..j].iter().collect();
            let n = j - i;
            toks.push((Tok::Num { text, float }, pos));
            advance(&mut i, &mut line, &mut col, n);
            continue;
        }
        if word_start(c) {
            let n = chars[i..].iter().take_while(|&&c| word_char(c)).count();
            let w: String = chars[i..i + n].iter().collect();
            let tok = match w.as_str() {
                "inf" | "nan" => Tok::Num {
                    text: w,
                    float: true,
                },
                _ => Tok::Word(w),
            };
            toks.push((tok, pos));
            advance(&mut i, &mut line, &mut col, n);
            continue;
        }
        if "()[]{},:=?".contains(c) {
            toks.push((Tok::Punct(c), pos));
            advance(&mut i, &mut line, &mut col, 1);
            continue;
        }
        return err(pos, format!("unexpected character {c:?}"));
    }
    Ok(toks)
}

fn starts_with(chars: &[char], s: &str) -> bool {
    s.chars().enumerate().all(|(k, c)| chars.get(k) == Some(&c))
}

/// Lexes a quoted string starting at `chars[0] == '"'`; returns its bytes
/// and the number of chars used.
fn lex_string(chars: &[char]) -> Result<(Vec<u8>, usize), String> {
    let mut out = Vec::new();
    let mut i = 1;
    loop {
        let Some(&c) = chars.get(i) else {
            return Err("unterminated string".into());
        };
        match c {
            '"' => return Ok((out, i + 1)),
            '\\' => {
                let Some(&e) = chars.get(i + 1) else {
                    return Err("unterminated string".into());
                };
                match e {
                    'n' => out.push(b'\n'),
                    'r' => out.push(b'\r'),
                    't' => out.push(b'\t'),
                    '"' => out.push(b'"'),
                    '\\' => out.push(b'\\'),
                    'x' => {
                        let hex: String = chars
                            .get(i + 2..i + 4)
                            .map(|s| s.iter().collect())
                            .unwrap_or_default();
                        let Ok(b) = u8::from_str_radix(&hex, 16) else {
                            return Err(format!(
                                "bad escape \\x{hex}: expected two hexadecimal digits"
                            ));
                        };
                        if hex.len() != 2 {
                            return Err("bad \\x escape: expected two hexadecimal digits".into());
                        }
                        out.push(b);
                        i += 2;
                    }
                    other => return Err(format!("unknown escape \\{other}")),
                }
                i += 2;
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                i += 1;
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
        .map(|(t, _)| t)
        .collect();
        assert_eq!(toks[0], Tok::Value("/a/b_0".into()));
        assert_eq!(toks[1], Tok::Value("x::y".into()));
        assert_eq!(toks[2], Tok::Str(b"s\x01".to_vec()));
        assert_eq!(
            toks[3],
            Tok::Num {
                text: "-1".into(),
                float: false
            }
        );
        assert_eq!(
            toks[4],
            Tok::Num {
                text: "2.5".into(),
                float: true
            }
        );
        assert_eq!(
            toks[5],
            Tok::Num {
                text: "1e-5".into(),
                float: true
            }
        );
        assert_eq!(
            toks[6],
            Tok::Num {
                text: "-inf".into(),
                float: true
            }
        );
        assert_eq!(
            toks[7],
            Tok::Num {
                text: "nan".into(),
                float: true
            }
        );
        assert_eq!(toks[8], Tok::Digest("00ff".into()));
        assert_eq!(toks[9], Tok::Word("Conv".into()));
        assert_eq!(toks[10], Tok::Word("com.ms.Op".into()));
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
}
