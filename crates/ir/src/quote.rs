//! Quoting of names and strings, shared by messages and the text form.

/// Quotes bytes as a double-quoted string: `\"`, `\\`, `\n`, `\r`, `\t`,
/// and `\xNN` for other control characters and for bytes that are not UTF-8.
/// Printable Unicode is kept as is.
pub fn quote_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out.push('"');
    out
}

pub fn quote(s: &str) -> String {
    quote_bytes(s.as_bytes())
}

/// Whether `s` can be written without quotes where an identifier is
/// expected: a letter or `_` first, then letters, digits and `_`.
pub fn is_plain_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `s` as is when it is a plain identifier, quoted otherwise.
pub fn ident_or_quoted(s: &str) -> String {
    if is_plain_identifier(s) {
        s.to_string()
    } else {
        quote(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_what_it_must() {
        assert_eq!(quote("a\"b\\c\nd"), r#""a\"b\\c\nd""#);
        assert_eq!(quote_bytes(&[0x61, 0xff, 0x01]), r#""a\xff\x01""#);
        assert_eq!(quote("héllo"), "\"héllo\"");
        assert_eq!(ident_or_quoted("N"), "N");
        assert_eq!(ident_or_quoted("?"), "\"?\"");
        assert_eq!(ident_or_quoted("batch size"), "\"batch size\"");
    }
}
