//! Command-line overrides of scenario fields (`--set image.chunk_size="1 MiB"`, `--set
//! hosts.0.count=10`), applied to the parsed TOML before it is checked. This module decides only
//! how a dotted key finds its place in the TOML tree and how the value is read.

use super::ScenarioError;

/// Applies one `key=value` override to a TOML table. The value is read as a TOML value (`16`,
/// `0.5`, `"1 MiB"`, `true`); if it is not one, it is taken as a string. Numeric path segments
/// index arrays (`hosts.0.count`). Missing tables on the way are created.
pub fn apply_override(table: &mut toml::Table, spec: &str) -> Result<(), ScenarioError> {
    let bad = || ScenarioError::Override(spec.to_owned());
    let (key, value) = spec.split_once('=').ok_or_else(bad)?;
    let key = key.trim();
    let value = value.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if key.is_empty() || parts.iter().any(|p| p.is_empty()) {
        return Err(bad());
    }
    let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t.remove("v").ok_or_else(bad)?,
        Err(_) => toml::Value::String(value.to_owned()),
    };
    let (last, path) = parts.split_last().ok_or_else(bad)?;
    // Work on the root as a value, then put it back whatever happened.
    let mut root = toml::Value::Table(std::mem::take(table));
    let result = set(&mut root, path, last, parsed);
    if let toml::Value::Table(t) = root {
        *table = t;
    }
    result.ok_or_else(bad)
}

fn set(root: &mut toml::Value, path: &[&str], last: &str, value: toml::Value) -> Option<()> {
    let mut node = root;
    for part in path {
        node = step(node, part)?;
    }
    match node {
        toml::Value::Table(t) => {
            t.insert(last.to_owned(), value);
        }
        toml::Value::Array(a) => {
            *a.get_mut(last.parse::<usize>().ok()?)? = value;
        }
        _ => return None,
    }
    Some(())
}

fn step<'a>(node: &'a mut toml::Value, part: &str) -> Option<&'a mut toml::Value> {
    match node {
        toml::Value::Table(t) => Some(
            t.entry(part.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new())),
        ),
        toml::Value::Array(a) => a.get_mut(part.parse::<usize>().ok()?),
        _ => None,
    }
}
