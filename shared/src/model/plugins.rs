//! The `plugins` attribute of routes, services and global rules.
//!
//! Every plugin must be declared in config.yaml `wasm.plugins`; its attributes must carry `conf`,
//! a non-empty string or a non-empty object, which the plugin receives in `proxy_on_configure`.

use serde_json::Value;
use std::collections::{BTreeMap, HashSet};

/// `plugins`: plugin name → attributes (`{"conf": …}` plus tolerated extra keys).
pub type Plugins = BTreeMap<String, Value>;

/// The plugins declared in config.yaml, against which objects are checked.
#[derive(Debug, Clone, Default)]
pub struct PluginCatalog {
    names: HashSet<String>,
}

impl PluginCatalog {
    pub fn new(names: impl IntoIterator<Item = String>) -> PluginCatalog {
        PluginCatalog {
            names: names.into_iter().collect(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}

/// A plugin's configuration as handed to `proxy_on_configure`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConf {
    pub name: String,
    /// The `conf` string itself, or an object's JSON text.
    pub conf: String,
}

impl PluginConf {
    /// Extracts the configuration of an already validated plugin entry.
    pub fn from_attrs(name: &str, attrs: &Value) -> PluginConf {
        let conf = match attrs.get("conf") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        PluginConf {
            name: name.to_string(),
            conf,
        }
    }
}

/// Checks a `plugins` map; the error is the complete APISIX-style `error_msg`.
pub fn check_plugins(plugins: &Plugins, catalog: &PluginCatalog) -> Result<(), String> {
    for (name, attrs) in plugins {
        if !catalog.contains(name) {
            return Err(format!("unknown plugin [{name}]"));
        }
        let fail = |why: &str| {
            Err(format!(
                "failed to check the configuration of plugin {name} err: {why}"
            ))
        };
        let Some(attrs) = attrs.as_object() else {
            return fail("the plugin attributes must be a JSON object");
        };
        match attrs.get("conf") {
            None => return fail("property \"conf\" is required"),
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(Value::Object(o)) if !o.is_empty() => {}
            Some(_) => {
                return fail(
                    "property \"conf\" validation failed: value should match only one schema, but matches none",
                )
            }
        }
        if let Some(meta) = attrs.get("_meta") {
            check_meta(meta)
                .or_else(|why| fail(&format!("property \"_meta\" validation failed: {why}")))?;
        }
    }
    Ok(())
}

/// A plugin entry's `_meta`: an object whose `disable` is a boolean, as APISIX's schema has
/// it (`"disable": "true"` would otherwise leave the plugin running while its operator
/// believes it off). APISIX's other `_meta` fields (`priority`, `filter`, `error_response`,
/// `pre_function`) are refused by name rather than ignored: the plugin would run in another
/// order, or where its filter says it must not.
fn check_meta(meta: &Value) -> Result<(), String> {
    let Some(meta) = meta.as_object() else {
        return Err(format!(
            "wrong type: expected object, got {}",
            type_name(meta)
        ));
    };
    for (key, value) in meta {
        match key.as_str() {
            "disable" if value.is_boolean() => {}
            "disable" => {
                return Err(format!(
                    "property \"disable\" validation failed: wrong type: expected boolean, got {}",
                    type_name(value)
                ))
            }
            "priority" | "filter" | "error_response" | "pre_function" => {
                return Err(format!(
                    "property \"{key}\" is not supported by wasmgate (only \"disable\" is)"
                ))
            }
            _ => return Err(format!("additional properties forbidden, found {key}")),
        }
    }
    Ok(())
}

/// A JSON value's type, as APISIX's schema errors name it.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(attrs: Value) -> Result<(), String> {
        let plugins = Plugins::from([("p".to_string(), attrs)]);
        check_plugins(&plugins, &PluginCatalog::new(["p".to_string()]))
    }

    #[test]
    fn meta_disable_is_a_boolean_and_nothing_else_is_taken() {
        assert_eq!(
            check(json!({"conf": "x", "_meta": {"disable": true}})),
            Ok(())
        );
        assert_eq!(check(json!({"conf": "x", "_meta": {}})), Ok(()));
        for (meta, why) in [
            (json!({"disable": "true"}), "expected boolean, got string"),
            (json!({"disable": 1}), "expected boolean, got number"),
            (json!("off"), "expected object, got string"),
            (json!({"priority": 5}), "\"priority\" is not supported"),
            (json!({"filter": []}), "\"filter\" is not supported"),
            (
                json!({"disabled": true}),
                "additional properties forbidden, found disabled",
            ),
        ] {
            let e = check(json!({"conf": "x", "_meta": meta})).unwrap_err();
            assert!(e.contains("property \"_meta\" validation failed"), "{e}");
            assert!(e.contains(why), "{meta}: {e}");
        }
    }
}
