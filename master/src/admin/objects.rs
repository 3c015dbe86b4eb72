//! Admin API object operations (GET/PUT/POST/PATCH/DELETE) over the store, independent of HTTP.
//!
//! A write is validated, checked against what it references, sized against the shared-memory
//! capacity, persisted, applied in memory and published to workers — in that order, so a
//! failure at any step leaves memory, disk and workers agreeing on the previous state.

use crate::state::Master;
use crate::store::{Store, Stored};
use serde_json::{json, Map, Value};
use std::time::{SystemTime, UNIX_EPOCH};
use wasmgate_shared::model::{self, valid_id, Kind, PluginCatalog};

/// An HTTP-ready outcome: status code and JSON body.
pub type Reply = (u16, Value);

/// What a write comes to: answered here (local store: persisted and published, or refused),
/// or a change to commit to etcd first (cluster mode, `crate::etcd::commit`).
pub enum Outcome {
    Done(Reply),
    Commit(Change),
}

impl From<Reply> for Outcome {
    fn from(r: Reply) -> Outcome {
        Outcome::Done(r)
    }
}

/// A validated change for etcd.
pub enum Change {
    Put {
        kind: Kind,
        id: String,
        stored: Stored,
        /// Only if the key's mod revision is this (0: only if it does not exist): PATCH and
        /// POST must not overwrite a change another node made meanwhile.
        expect: Option<u64>,
        /// 201 (created) or 200 (replaced).
        status: u16,
    },
    Delete {
        kind: Kind,
        id: String,
    },
}

fn error(status: u16, msg: impl Into<String>) -> Reply {
    (status, json!({ "error_msg": msg.into() }))
}

fn not_found() -> Reply {
    (404, json!({ "message": "Key not found" }))
}

fn key(kind: Kind, id: &str) -> String {
    format!("/apisix/{}/{id}", kind.as_str())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn entry(kind: Kind, id: &str, s: &Stored) -> Value {
    json!({
        "key": key(kind, id),
        "value": s.value,
        "createdIndex": s.created_index,
        "modifiedIndex": s.modified_index,
    })
}

/// GET one.
pub fn get(m: &Master, kind: Kind, id: &str) -> Reply {
    let store = m.store();
    match store.get(kind, id) {
        Some(s) => (200, entry(kind, id, s)),
        None => not_found(),
    }
}

/// What a GET of a collection asks for (APISIX's `v3_adapter`): `name` and `uri` (regular
/// expressions found in the object's `name`, its `uri` or one of its `uris`), `label` (a key
/// of its `labels`), and a page, when both `page` and `page_size` are given.
#[derive(Default)]
pub struct ListQuery<'a> {
    pub name: Option<&'a str>,
    pub uri: Option<&'a str>,
    pub label: Option<&'a str>,
    pub page: Option<&'a str>,
    pub page_size: Option<&'a str>,
}

/// GET list: the objects the query's filters keep, `total` counting them, one page of them
/// when asked (in creation order, as APISIX pages).
pub fn list(m: &Master, kind: Kind, q: &ListQuery<'_>) -> Reply {
    let pattern = |what: &str, p: Option<&str>| {
        p.map(|p| {
            regex::RegexBuilder::new(p)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| error(400, format!("invalid {what} filter {p:?}: {e}")))
        })
        .transpose()
    };
    let (name, uri) = match (pattern("name", q.name), pattern("uri", q.uri)) {
        (Ok(n), Ok(u)) => (n, u),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    let kept = |s: &Stored| {
        let v = &s.value;
        name.as_ref()
            .is_none_or(|re| text(v, "name").is_some_and(|n| re.is_match(&n)))
            && q.label.is_none_or(|l| {
                v.get("labels")
                    .and_then(Value::as_object)
                    .is_some_and(|m| m.contains_key(l))
            })
            && uri.as_ref().is_none_or(|re| {
                let uris = v.get("uris").and_then(Value::as_array);
                text(v, "uri").is_some_and(|u| re.is_match(&u))
                    || uris
                        .is_some_and(|l| l.iter().filter_map(Value::as_str).any(|u| re.is_match(u)))
            })
    };
    let store = m.store();
    let mut all: Vec<_> = store
        .list(kind)
        .into_iter()
        .filter(|(_, s)| kept(s))
        .collect();
    let total = all.len();
    let page = match (q.page, q.page_size) {
        (Some(p), Some(ps)) => match (p.parse::<i64>(), ps.parse::<i64>()) {
            (_, Ok(ps)) if !(10..=500).contains(&ps) => {
                return error(400, "page_size must be between 10 and 500")
            }
            (p, Ok(ps)) => Some((p.unwrap_or(1).max(1) as usize, ps as usize)),
            (_, Err(_)) => None,
        },
        _ => None,
    };
    if let Some((p, ps)) = page {
        all.sort_by_key(|(_, s)| s.created_index);
        all = all
            .into_iter()
            .skip((p - 1).saturating_mul(ps))
            .take(ps)
            .collect();
    }
    let items: Vec<Value> = all.iter().map(|(id, s)| entry(kind, id, s)).collect();
    (200, json!({ "total": total, "list": items }))
}

/// Says in the error log when an object reads a variable the gateway does not give (APISIX
/// has many more): a `vars` clause on it never matches, its `~=` always does, a `chash` key
/// of it spreads requests as round robin would, and in a `vars_combinations` key it reads
/// as empty text. Accepted all the same — objects APISIX wrote
/// into a shared etcd must not stop the gateway — but not silently.
fn warn_unknown_variables(kind: Kind, id: &str, object: &model::Object) {
    use model::vars::{known_variable, split_template, VarsExpr};
    use model::HashOn;
    use model::Object;
    let (vars, upstream) = match object {
        Object::Route(r) => (r.vars.as_ref(), r.upstream.as_ref()),
        Object::Service(s) => (None, s.upstream.as_ref()),
        Object::Upstream(u) => (None, Some(u)),
        Object::GlobalRule(_) | Object::Ssl(_) | Object::PluginConfig(_) => (None, None),
    };
    let mut unknown: Vec<String> = Vec::new();
    if let Some(expr) = vars.and_then(|v| VarsExpr::compile(v).ok()) {
        unknown.extend(
            expr.variables()
                .into_iter()
                .filter(|n| !known_variable(n))
                .map(str::to_owned),
        );
    }
    if let Some((up, key)) = upstream.and_then(|u| Some(u).zip(u.key.as_deref())) {
        match up.hash_on.unwrap_or_default() {
            HashOn::Vars if !known_variable(key) => unknown.push(key.to_string()),
            HashOn::VarsCombinations => unknown.extend(
                split_template(key)
                    .1
                    .map(|(name, _)| name)
                    .filter(|n| !known_variable(n))
                    .map(str::to_owned),
            ),
            _ => {}
        }
    }
    unknown.sort();
    unknown.dedup();
    if !unknown.is_empty() {
        tracing::warn!(
            "{} {id}: reads {}, which wasmgate does not provide: a vars clause on it never \
             matches (its ~= always does), a chash key of it balances as round robin would",
            kind.noun(),
            unknown
                .iter()
                .map(|n| format!("${n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

/// PUT with an id (from the path, or from the body when PUT to the collection).
pub fn put(m: &Master, kind: Kind, path_id: Option<&str>, body: Value) -> Outcome {
    let body_id = match body.get("id") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return error(400, "invalid configuration: property \"id\" validation failed: an id is a string or an integer").into(),
    };
    let id = match (path_id, body_id) {
        (Some(p), Some(b)) if p != b => {
            return error(400, format!("wrong {} id", kind.noun())).into()
        }
        (Some(p), _) => p.to_string(),
        (None, Some(b)) => b,
        (None, None) => return error(400, format!("missing {} id", kind.noun())).into(),
    };
    let mut store = m.store();
    write(m, &mut store, kind, &id, body, None)
}

/// POST: create with a generated id.
pub fn post(m: &Master, kind: Kind, body: Value) -> Outcome {
    if body.get("id").is_some() {
        return error(400, format!("wrong {} id, do not need it", kind.noun())).into();
    }
    let mut store = m.store();
    let id = store.generate_id(kind);
    write(m, &mut store, kind, &id, body, Some(0))
}

/// PATCH: a JSON merge patch on the whole object, or a replacement of one field when the
/// path names it (`/routes/1/methods`).
pub fn patch(m: &Master, kind: Kind, id: &str, sub_path: Option<&str>, body: Value) -> Outcome {
    let mut store = m.store();
    let (current, revision) = match store.get(kind, id) {
        Some(s) => (s.value.clone(), s.modified_index),
        None => return not_found().into(),
    };
    let mut merged = current;
    // APISIX's rule: a PATCH sets `update_time` to now unless it gives one itself.
    let keeps_update_time = sub_path.is_none() && body.get("update_time").is_some();
    match sub_path {
        Some(path) => {
            if let Err(e) = set_path(&mut merged, path, body) {
                return error(400, e).into();
            }
        }
        None => {
            if !body.is_object() {
                return error(400, "invalid configuration: the body must be a JSON object").into();
            }
            merge_patch(&mut merged, body);
        }
    }
    if !keeps_update_time {
        if let Some(obj) = merged.as_object_mut() {
            obj.remove("update_time");
        }
    }
    write(m, &mut store, kind, id, merged, Some(revision))
}

/// DELETE, refused while another object still refers to this one, unless `force` (APISIX's
/// `?force=true`).
pub fn delete(m: &Master, kind: Kind, id: &str, force: bool) -> Outcome {
    let mut store = m.store();
    // A key the local copy left out (refused when read: not JSON, an unknown plugin) is still
    // in etcd, and deleting it is how an operator cleans it up, as with APISIX: etcd says
    // whether it existed. Objects that name it still count as its users.
    if store.get(kind, id).is_none() && m.etcd.is_none() {
        return not_found().into();
    }
    match still_used(&store, kind, id) {
        Some(msg) if !force => return error(400, msg).into(),
        Some(msg) => tracing::warn!(
            "admin: {} {id} deleted with force=true while in use: its users' requests get \
             503 ({msg})",
            kind.noun()
        ),
        None => {}
    }
    if m.etcd.is_some() {
        let id = id.to_string();
        return Outcome::Commit(Change::Delete { kind, id });
    }
    if let Err(e) = store.delete(kind, id) {
        tracing::error!("admin: delete {} {id} failed: {e}", kind.noun());
        return error(503, format!("failed to persist the change: {e}")).into();
    }
    m.publish(&store, &[(kind, id)]);
    (200, json!({ "deleted": id, "key": key(kind, id) })).into()
}

fn still_used(store: &Store, kind: Kind, id: &str) -> Option<String> {
    let (users, field): (&[Kind], &str) = match kind {
        Kind::Upstreams => (&[Kind::Routes, Kind::Services], "upstream_id"),
        Kind::Services => (&[Kind::Routes], "service_id"),
        Kind::PluginConfigs => (&[Kind::Routes], "plugin_config_id"),
        Kind::Routes | Kind::GlobalRules | Kind::Ssls => return None,
    };
    for user in users {
        for (uid, s) in store.list(*user) {
            if id_field(&s.value, field).as_deref() == Some(id) {
                return Some(format!(
                    "can not delete this {}, {} [{uid}] is still using it now",
                    kind.noun(),
                    user.noun()
                ));
            }
        }
    }
    None
}

fn id_field(v: &Value, field: &str) -> Option<String> {
    match v.get(field)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// APISIX's schema requires an upstream's `nodes` (an empty set is allowed: its requests get
/// 503), or service discovery, which is not provided: an upstream written without them would
/// otherwise be stored, and every request on it answered 503, with no word at the write.
/// Checked on writes only: objects stored earlier load, and can be changed, as before.
fn missing_nodes(kind: Kind, body: &Value) -> Option<String> {
    let (up, field) = match kind {
        Kind::Upstreams => (body, "nodes"),
        Kind::Routes | Kind::Services => (body.get("upstream")?, "upstream.nodes"),
        Kind::GlobalRules | Kind::Ssls | Kind::PluginConfigs => return None,
    };
    (up.is_object() && up.get("nodes").is_none()).then(|| {
        format!("invalid configuration: property \"{field}\" is required: the upstream's nodes (may be empty); service discovery (service_name, discovery_type) is not supported")
    })
}

/// Validates, persists and publishes one object.
fn write(
    m: &Master,
    store: &mut Store,
    kind: Kind,
    id: &str,
    mut body: Value,
    expect: Option<u64>,
) -> Outcome {
    // Ids name files in the store (`data/routes/<id>.json`), where `..` is a directory and
    // `.tmp-*` the store's own files, removed at start as a crash's leftovers: a new object's
    // id may not start with a dot. (Objects stored before this rule, and etcd's, still load.)
    if !valid_id(id) || id.starts_with('.') {
        return error(400, format!("invalid configuration: property \"id\" validation failed: invalid id {:?}: 1 to 64 characters from a-z A-Z 0-9 - _ ., not starting with .", wasmgate_shared::model::shown_id(id))).into();
    }
    // An object stored without nodes by an earlier version stays editable: a PATCH (the only
    // write that expects a revision above 0) carries the stored upstream along. A PUT is a
    // new body, and must say its nodes.
    let legacy = expect.is_some_and(|r| r > 0)
        && store
            .get(kind, id)
            .is_some_and(|s| missing_nodes(kind, &s.value).is_some());
    if let Some(e) = missing_nodes(kind, &body).filter(|_| !legacy) {
        return error(400, e).into();
    }
    if kind == Kind::Ssls {
        // Replaced from the certificate below: whatever the body said is not checked.
        fill_validity(&mut body);
    }
    let catalog = m.catalog();
    let object = match model::validate(kind, &body, &catalog) {
        Ok(o) => o,
        Err(e) => return error(400, e).into(),
    };
    warn_unknown_variables(kind, id, &object);
    for (rkind, rid) in object.references() {
        if store.get(rkind, &rid).is_none() {
            return error(
                400,
                format!(
                    "failed to fetch {} info by {} id [{rid}], response code: 404",
                    rkind.noun(),
                    rkind.noun()
                ),
            )
            .into();
        }
    }
    let existing = store.get(kind, id).cloned();
    let t = now();
    let obj = body.as_object_mut().expect("validated as an object");
    obj.insert("id".into(), Value::String(id.to_string()));
    seal_keys(kind, obj);
    // Timestamps the body gives are kept, as APISIX keeps them (an export restored keeps its
    // dates); else a create_time stays what it was, and update_time is now.
    let given =
        |obj: &serde_json::Map<String, Value>, k: &str| obj.get(k).filter(|v| v.is_u64()).cloned();
    let create_time = given(obj, "create_time")
        .or_else(|| {
            existing
                .as_ref()
                .and_then(|e| e.value.get("create_time").cloned())
        })
        .unwrap_or(json!(t));
    let update_time = given(obj, "update_time").unwrap_or(json!(t));
    obj.insert("create_time".into(), create_time);
    obj.insert("update_time".into(), update_time);
    let revision = store.next_revision();
    let stored = Stored {
        value: body,
        created_index: existing
            .as_ref()
            .map(|e| e.created_index)
            .unwrap_or(revision),
        modified_index: revision,
    };
    if let Err(reply) = m.check_fits(kind, id, Some(&stored.value.to_string())) {
        return reply.into();
    }
    let status = if existing.is_some() { 200 } else { 201 };
    if m.etcd.is_some() {
        let id = id.to_string();
        return Outcome::Commit(Change::Put {
            kind,
            id,
            stored,
            expect,
            status,
        });
    }
    if let Err(e) = store.put(kind, id, stored.clone()) {
        tracing::error!("admin: write {} {id} failed: {e}", kind.noun());
        return error(503, format!("failed to persist the change: {e}")).into();
    }
    m.publish(store, &[(kind, id)]);
    (
        status,
        json!({ "key": key(kind, id), "value": stored.value }),
    )
        .into()
}

/// Private keys are stored encrypted with the keyring's first key, as APISIX stores them
/// (`wasmgate_shared::keyring`): GET answers and etcd hold none in clear. An SSL object's
/// `key` and `keys`, an upstream's `tls.client_key` (inline in routes and services too); a
/// key encrypted already (a GET's answer written back) stays as it is.
fn seal_keys(kind: Kind, obj: &mut serde_json::Map<String, Value>) {
    let keyring = wasmgate_shared::keyring::current();
    let seal = |v: Option<&mut Value>| {
        if let Some(Value::String(s)) = v {
            if let Some(sealed) = keyring.seal(s) {
                *s = sealed;
            }
        }
    };
    // An upstream's `tls.client_key`: the object's own, or its inline upstream's.
    let upstream = match kind {
        Kind::Upstreams => Some(&mut *obj),
        Kind::Routes | Kind::Services => obj.get_mut("upstream").and_then(Value::as_object_mut),
        Kind::Ssls | Kind::GlobalRules | Kind::PluginConfigs => None,
    };
    let tls = upstream.and_then(|u| u.get_mut("tls"));
    seal(tls.and_then(|t| t.get_mut("client_key")));
    if kind == Kind::Ssls {
        seal(obj.get_mut("key"));
        if let Some(Value::Array(keys)) = obj.get_mut("keys") {
            keys.iter_mut().for_each(|k| seal(Some(k)));
        }
    }
}

/// An SSL object's `validity_start` and `validity_end` (Unix seconds) from its certificate,
/// as APISIX's dashboard fills them: what a client of the object is shown decides, not what
/// the body said (a certificate X.509 cannot read leaves them out).
fn fill_validity(body: &mut Value) {
    let Some(obj) = body.as_object_mut() else {
        return;
    };
    obj.remove("validity_start");
    obj.remove("validity_end");
    let Some(Value::String(cert)) = obj.get("cert") else {
        return;
    };
    if let Ok((start, end)) = wasmgate_shared::tls::validity(cert) {
        obj.insert("validity_start".into(), json!(start.max(0)));
        obj.insert("validity_end".into(), json!(end.max(0)));
    }
}

/// RFC 7396 JSON merge patch (APISIX's PATCH semantics: objects merge, `null` deletes,
/// everything else replaces).
pub fn merge_patch(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("just made an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge_patch(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other,
    }
}

fn set_path(target: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let mut cur = target;
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    // Refused before a level is built: an object that deep is refused anyway, and a value
    // tens of thousands of levels deep is dropped recursively, on the master's stack.
    if parts.len() > model::MAX_NESTING {
        return Err(format!(
            "invalid sub path: deeper than {} levels",
            model::MAX_NESTING
        ));
    }
    let Some((last, parents)) = parts.split_last() else {
        return Err("invalid sub path".into());
    };
    for p in parents {
        cur = cur
            .as_object_mut()
            .ok_or_else(|| format!("invalid sub path: {path}"))?
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    let obj = cur
        .as_object_mut()
        .ok_or_else(|| format!("invalid sub path: {path}"))?;
    if value.is_null() {
        obj.remove(*last);
    } else {
        obj.insert(last.to_string(), value);
    }
    Ok(())
}

/// Re-validates every stored object against a new plugin catalog (config reload): the first
/// object that would break is reported and the reload refused.
pub fn check_all(store: &Store, catalog: &PluginCatalog) -> Result<(), String> {
    for (kind, id, s) in store.iter() {
        model::validate(kind, &s.value, catalog)
            .map_err(|e| format!("{} {id} would become invalid: {e}", kind.noun()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_semantics() {
        let mut v = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]});
        merge_patch(&mut v, json!({"a": null, "b": {"c": 9}, "e": [3]}));
        assert_eq!(v, json!({"b": {"c": 9, "d": 3}, "e": [3]}));
    }

    #[test]
    fn sub_path_patch() {
        let mut v = json!({"uri": "/", "upstream": {"nodes": {"a:1": 1}}});
        set_path(&mut v, "upstream/nodes", json!({"b:2": 1})).unwrap();
        assert_eq!(v["upstream"]["nodes"], json!({"b:2": 1}));
        assert!(set_path(&mut v, "uri/x", json!(1)).is_err());
        let deep = vec!["a"; model::MAX_NESTING + 1].join("/");
        let e = set_path(&mut v, &deep, json!(1)).unwrap_err();
        assert_eq!(e, "invalid sub path: deeper than 100 levels");
        assert!(v.get("a").is_none(), "nothing built");
    }
}
