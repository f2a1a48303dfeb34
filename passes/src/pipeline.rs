//! The static registry of passes and the pipeline parser.
//!
//! A pipeline is a comma-separated list of pass names, each with optional
//! parameters in parentheses: `fold-constants(max-elements=4096),fold-bn,cleanup`.
//! An alias names a fixed sequence (`cleanup` is `remove-noops,dce`).

use crate::Pass;
use std::collections::BTreeMap;

/// The parameters given to one pass, consumed by its constructor; any left
/// over are an error naming them.
#[derive(Debug, Default)]
pub struct Params {
    pass: String,
    values: BTreeMap<String, String>,
}

impl Params {
    pub fn new(pass: &str) -> Params {
        Params {
            pass: pass.to_string(),
            values: BTreeMap::new(),
        }
    }

    pub fn take(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    pub fn take_usize(&mut self, key: &str, default: usize) -> Result<usize, String> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| {
                format!(
                    "{}: parameter '{key}' must be a whole number, found '{v}'",
                    self.pass
                )
            }),
        }
    }

    /// Fails on parameters the constructor did not take.
    pub fn finish(self, accepted: &[&str]) -> Result<(), String> {
        match self.values.keys().next() {
            None => Ok(()),
            Some(k) if accepted.is_empty() => {
                Err(format!("{}: takes no parameters, found '{k}'", self.pass))
            }
            Some(k) => Err(format!(
                "{}: unknown parameter '{k}'; it accepts {}",
                self.pass,
                accepted.join(", ")
            )),
        }
    }
}

/// A pass the pipeline parser knows.
pub struct PassInfo {
    pub name: &'static str,
    pub summary: &'static str,
    pub build: fn(Params) -> Result<Box<dyn Pass>, String>,
}

/// Every pass, by name.
pub fn registry() -> &'static [PassInfo] {
    &crate::REGISTRY
}

/// Names that stand for a sequence of passes.
pub const ALIASES: &[(&str, &[&str])] = &[("cleanup", &["remove-noops", "dce"])];

/// The valid names, for messages and `--help`.
pub fn known_names() -> Vec<&'static str> {
    let mut names: Vec<&str> = registry().iter().map(|p| p.name).collect();
    names.extend(ALIASES.iter().map(|(a, _)| *a));
    names.sort();
    names
}

/// Builds the passes of a pipeline string.
pub fn parse_pipeline(text: &str) -> Result<Vec<Box<dyn Pass>>, String> {
    let mut passes = Vec::new();
    for (name, params) in split(text)? {
        if let Some((_, seq)) = ALIASES.iter().find(|(a, _)| *a == name) {
            if !params.is_empty() {
                return Err(format!("{name}: takes no parameters"));
            }
            for &p in *seq {
                passes.push(build(p, Vec::new())?);
            }
            continue;
        }
        passes.push(build(&name, params)?);
    }
    if passes.is_empty() {
        return Err("the pipeline names no pass".into());
    }
    Ok(passes)
}

fn build(name: &str, params: Vec<(String, String)>) -> Result<Box<dyn Pass>, String> {
    let Some(info) = registry().iter().find(|p| p.name == name) else {
        return Err(format!(
            "unknown pass '{name}'; valid passes: {}",
            known_names().join(", ")
        ));
    };
    let mut p = Params::new(name);
    for (k, v) in params {
        if p.values.insert(k.clone(), v).is_some() {
            return Err(format!("{name}: parameter '{k}' is given twice"));
        }
    }
    (info.build)(p)
}

type Entry = (String, Vec<(String, String)>);

/// `a, b(k=v, k2=v2), c` into names and parameter lists.
fn split(text: &str) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let end = rest.find([',', '(']).unwrap_or(rest.len());
        let name = rest[..end].trim();
        if name.is_empty() {
            return Err(format!("a pass name is missing before '{}'", &rest[end..]));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!("'{name}' is not a pass name (character '{bad}')"));
        }
        rest = &rest[end..];
        let mut params = Vec::new();
        if let Some(inner) = rest.strip_prefix('(') {
            let Some(close) = inner.find(')') else {
                return Err(format!("{name}: '(' is not closed"));
            };
            for item in inner[..close].split(',').map(str::trim) {
                if item.is_empty() {
                    continue;
                }
                let Some((k, v)) = item.split_once('=') else {
                    return Err(format!(
                        "{name}: parameter '{item}' needs the form key=value"
                    ));
                };
                params.push((k.trim().to_string(), v.trim().to_string()));
            }
            rest = inner[close + 1..].trim_start();
        }
        out.push((name.to_string(), params));
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
            if rest.is_empty() {
                return Err("the pipeline ends with ','".into());
            }
        } else if !rest.is_empty() {
            return Err(format!("expected ',' before '{rest}'"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(text: &str) -> Result<Vec<&'static str>, String> {
        Ok(parse_pipeline(text)?.iter().map(|p| p.name()).collect())
    }

    #[test]
    fn pipelines_parse_with_parameters_and_aliases() {
        assert_eq!(
            names(" fold-constants(max-elements = 10) ,fold-bn,cleanup ").unwrap(),
            ["fold-constants", "fold-bn", "remove-noops", "dce"]
        );
    }

    #[test]
    fn bad_pipelines_say_what_is_wrong() {
        let unknown = names("fold-constants,fold-everything").unwrap_err();
        assert!(
            unknown.contains("unknown pass 'fold-everything'"),
            "{unknown}"
        );
        assert!(unknown.contains("dce, fold-bn"), "{unknown}");
        for (text, want) in [
            ("", "names no pass"),
            ("dce,", "ends with ','"),
            ("dce(", "not closed"),
            ("dce(x=1)", "takes no parameters"),
            ("fold-constants(max-elements=lots)", "whole number"),
            ("fold-constants(size=1)", "unknown parameter 'size'"),
            ("fold-constants(max-elements)", "key=value"),
            ("dce dce", "is not a pass name"),
            ("dce(max=1) dce", "expected ','"),
            ("cleanup(x=1)", "takes no parameters"),
        ] {
            let err = names(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
