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
    }
    Ok(())
}
