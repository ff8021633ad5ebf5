//! The environment a configuration is read in: `${VAR}` interpolation and the Databricks Apps
//! overlay.
//!
//! The process environment is captured once into an [`Env`] value and passed down, so that tests
//! can build any environment they like without touching (and racing on) the real one.

use std::collections::BTreeMap;

/// A snapshot of environment variables.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// The current process environment (variables that are not valid UTF-8 are skipped).
    pub fn from_process() -> Self {
        Self {
            vars: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        }
    }

    /// An environment holding exactly these variables.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The value of `name`, treating an empty value as unset (the platform sometimes injects
    /// empty variables, and an empty host or port is never meaningful).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// A `${VAR}` reference that could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// The environment variable.
    pub var: String,
    /// The configuration key whose value referenced it.
    pub key: String,
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string of `value`; `$$` stands for `$`.
/// Returns every unresolved reference (not just the first) so that an operator can fix them all
/// at once.
pub fn interpolate(value: &mut toml::Value, env: &Env) -> Result<(), Vec<Missing>> {
    let mut missing = Vec::new();
    walk(value, String::new(), env, &mut missing);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing)
    }
}

fn walk(value: &mut toml::Value, key: String, env: &Env, missing: &mut Vec<Missing>) {
    match value {
        toml::Value::String(s) if s.contains('$') => {
            *s = expand(s, &key, env, missing);
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                walk(item, format!("{key}[{i}]"), env, missing);
            }
        }
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                let path = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}.{k}")
                };
                walk(v, path, env, missing);
            }
        }
        _ => {}
    }
}

fn expand(input: &str, key: &str, env: &Env, missing: &mut Vec<Missing>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(end) = body.find('}') else {
                // An unterminated reference is kept literally; validation of the key will
                // complain about the value if it matters.
                out.push_str(&rest[pos..]);
                return out;
            };
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            match (env.get(name), default) {
                (Some(v), _) => out.push_str(v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => missing.push(Missing {
                    var: name.to_owned(),
                    key: key.to_owned(),
                }),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &str, env: &Env) -> Result<String, Vec<Missing>> {
        let mut v = toml::Value::String(input.to_owned());
        let mut missing = Vec::new();
        walk(&mut v, "k".into(), env, &mut missing);
        if missing.is_empty() {
            Ok(v.as_str().unwrap_or_default().to_owned())
        } else {
            Err(missing)
        }
    }

    #[test]
    fn expands_references_defaults_and_escapes() {
        let env = Env::from_pairs([("A", "one"), ("EMPTY", "")]);
        assert_eq!(run("x${A}y", &env).unwrap(), "xoney");
        assert_eq!(run("${B:-two}", &env).unwrap(), "two");
        assert_eq!(run("${EMPTY:-dflt}", &env).unwrap(), "dflt");
        assert_eq!(run("$$HOME $x", &env).unwrap(), "$HOME $x");
        assert_eq!(run("${A", &env).unwrap(), "${A");
    }

    #[test]
    fn reports_every_missing_variable_with_its_key() {
        let mut v: toml::Value =
            toml::from_str("[agent]\nurl = \"${AGENT_URL}\"\n[mlflow]\nexperiment_id = \"${EXP}\"")
                .unwrap();
        let missing = interpolate(&mut v, &Env::default()).unwrap_err();
        let names: Vec<_> = missing
            .iter()
            .map(|m| format!("{}@{}", m.var, m.key))
            .collect();
        assert_eq!(names, ["AGENT_URL@agent.url", "EXP@mlflow.experiment_id"]);
    }
}
