//! Route `vars` expressions, matching APISIX / lua-resty-expr semantics.
//!
//! A `vars` value is a JSON array of clauses, each `[var, op, value]` or `[var, "!", op, value]`;
//! the list is the AND of its clauses. A list may instead start with a logical operator
//! (`"AND"`, `"OR"`, `"!AND"`, `"!OR"`) followed by sub-expressions, which may nest. Expressions
//! are compiled once when a route is validated or loaded, then evaluated per request against a
//! variable lookup, so no JSON is walked and no regex is built on the request path.

use std::borrow::Cow;
use std::net::IpAddr;

use regex::{Regex, RegexBuilder};
use serde_json::Value;

/// Most clauses one expression may hold, counted across all nesting levels.
pub const MAX_CLAUSES: usize = 64;
/// Deepest nesting of clause lists and logical groups; the top-level list is level 1.
pub const MAX_DEPTH: usize = 8;
/// Compiled-size cap for each regex, so a hostile pattern cannot exhaust memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The variables the gateway gives `vars` and `chash` keys besides the families `arg_<name>`,
/// `http_<header>` and `cookie_<name>` (the worker's `proxy::nginx_var`), and besides
/// [`CONNECTION_VARIABLES`].
pub const VARIABLES: [&str; 15] = [
    "uri",
    "request_uri",
    "real_request_uri",
    "args",
    "query_string",
    "is_args",
    "host",
    "request_method",
    "remote_addr",
    "remote_port",
    "server_addr",
    "server_port",
    "server_protocol",
    "content_type",
    "content_length",
];

/// The variables of the connection rather than the request — `$scheme`, the `$ssl_*` ones,
/// `$pid` — which the worker's `proxy::connection_var` answers for route `vars`, the access
/// log and plugins alike (and [`VARIABLES`] and the access log's list leave out).
pub const CONNECTION_VARIABLES: [&str; 11] = [
    "scheme",
    "ssl_server_name",
    "ssl_protocol",
    "ssl_cipher",
    "ssl_session_reused",
    "ssl_client_verify",
    "ssl_client_s_dn",
    "ssl_client_i_dn",
    "ssl_client_serial",
    "ssl_client_fingerprint",
    "pid",
];

/// Whether the gateway gives `name` a value (else it reads as absent).
pub fn known_variable(name: &str) -> bool {
    ["arg_", "http_", "cookie_"]
        .iter()
        .any(|p| name.strip_prefix(p).is_some_and(|rest| !rest.is_empty()))
        || VARIABLES.contains(&name)
        || CONNECTION_VARIABLES.contains(&name)
}

/// Splits a `vars_combinations` key (`"$remote_addr:$uri"`) into the text before its first
/// variable and, for each `$name`, the name and the text up to the next one. A name is the
/// letters, digits and `_` after `$`, as nginx reads `$name` in text.
pub fn split_template(template: &str) -> (&str, impl Iterator<Item = (&str, &str)>) {
    let mut pieces = template.split('$');
    let head = pieces.next().unwrap_or("");
    let vars = pieces.map(|piece| {
        let end = piece
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(piece.len());
        piece.split_at(end)
    });
    (head, vars)
}

/// A compiled `vars` expression.
#[derive(Debug, Clone)]
pub struct VarsExpr {
    root: Node,
}

/// One node of the expression tree.
#[derive(Debug, Clone)]
enum Node {
    /// A logical group; `negate` implements `!AND` / `!OR`.
    Group {
        logic: Logic,
        negate: bool,
        items: Vec<Node>,
    },
    Clause(Clause),
}

#[derive(Debug, Clone, Copy)]
enum Logic {
    And,
    Or,
}

/// `[var, op, value]`, possibly negated with `"!"`.
#[derive(Debug, Clone)]
struct Clause {
    var: String,
    negate: bool,
    op: Op,
}

/// An operator with its right-hand side already converted to the form it is tested with.
#[derive(Debug, Clone)]
enum Op {
    Eq(String),
    Ne(String),
    /// `==` / `~=` with a number on the right: the request's text read as a number, as
    /// lua-resty-expr's `tonumber` reads it (`01` and `1.0` equal `1`; text that is no number
    /// equals no number).
    EqNum(f64),
    NeNum(f64),
    /// Numeric comparison; `None` when the configured value is not a number, which makes the
    /// clause false (lua-resty-expr's `tonumber` yields nil there; it is not a config error).
    Cmp(CmpOp, Option<f64>),
    /// `~~` and `~*` (the latter compiled case-insensitive); unanchored search.
    Regex(Regex),
    In(Vec<String>),
    Has(String),
    IpMatch(Vec<Cidr>),
}

#[derive(Debug, Clone, Copy)]
enum CmpOp {
    Gt,
    Lt,
    Ge,
    Le,
}

/// An IPv4 or IPv6 network: an address and a prefix length (a bare address is a full-length
/// prefix). Host bits after the prefix are allowed and ignored, like lua-resty-ipmatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d`, `a.b.c.d/nn`, an IPv6 address, or `v6/nn`.
    pub fn parse(text: &str) -> Option<Cidr> {
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = ip.parse().ok()?;
        let bits = addr_bits(addr).1;
        let prefix = match prefix {
            None => bits,
            // Digits only: `u8::from_str` would also accept "+8".
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
            Some(_) => return None,
        };
        (prefix <= bits).then_some(Cidr { addr, prefix })
    }

    /// The address as written and the prefix length.
    pub fn parts(&self) -> (IpAddr, u8) {
        (self.addr, self.prefix)
    }

    /// Whether `ip` lies in this network; addresses of the other family never do.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, bits) = addr_bits(self.addr);
        let (host, host_bits) = addr_bits(ip);
        if bits != host_bits {
            return false;
        }
        // Compare only the leading `prefix` bits; a shift of 128 (prefix 0) keeps nothing.
        let shift = u32::from(bits - self.prefix);
        net.checked_shr(shift).unwrap_or(0) == host.checked_shr(shift).unwrap_or(0)
    }
}

/// A list of networks, as config.yaml's address lists (`real_ip_from`,
/// `apisix.trusted_addresses`) give them.
#[derive(Debug, Clone, Default)]
pub struct CidrList(Vec<Cidr>);

impl CidrList {
    /// The entries that parse; the others (`unix:`, or text the configuration's check
    /// refused already) are left out.
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a String>) -> CidrList {
        CidrList(entries.into_iter().filter_map(|a| Cidr::parse(a)).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether any network holds `ip`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }
}

/// The address as an integer and its width in bits.
fn addr_bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// Parses an IP or CIDR; returns the address as written and the prefix length.
pub fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    Cidr::parse(text).map(|c| c.parts())
}

impl VarsExpr {
    /// Compiles the JSON value; the error message names the problem and the clause index, e.g.
    /// `vars[1]: invalid regex "(": <regex error>` or `vars[0]: unknown operator "=~"` or
    /// `vars: must be an array`. Nested positions read `vars[1][2]`, indexing the JSON arrays
    /// as written (a leading `"OR"` is index 0). An empty array matches every request.
    pub fn compile(value: &Value) -> Result<VarsExpr, String> {
        let items = value.as_array().ok_or("vars: must be an array")?;
        let always = Node::Group {
            logic: Logic::And,
            negate: false,
            items: Vec::new(),
        };
        let Some(first) = items.first() else {
            return Ok(VarsExpr { root: always });
        };
        // A bare clause at the top level is the classic mistake; APISIX rejects it too.
        if !first.is_array() && logic_of(first).is_none() {
            return Err(
                "vars: clauses must be wrapped inside brackets, e.g. [[\"arg_name\", \"==\", \"v\"]]"
                    .into(),
            );
        }
        let mut budget = MAX_CLAUSES;
        let root = compile_node(value, "vars", 0, &mut budget)?;
        Ok(VarsExpr { root })
    }

    /// Evaluates with a variable lookup (e.g. "arg_name", "http_x_user", "uri", "host",
    /// "remote_addr", "cookie_x"). `None` means the variable is absent.
    /// The variables the expression reads.
    pub fn variables(&self) -> Vec<&str> {
        let mut out = Vec::new();
        let mut stack = vec![&self.root];
        while let Some(node) = stack.pop() {
            match node {
                Node::Group { items, .. } => stack.extend(items),
                Node::Clause(c) => out.push(c.var.as_str()),
            }
        }
        out
    }

    pub fn eval<'a>(&self, lookup: &dyn Fn(&str) -> Option<Cow<'a, str>>) -> bool {
        self.root.eval(lookup)
    }
}

/// Prefixes a message with the position it concerns.
fn at(path: &str, msg: impl std::fmt::Display) -> String {
    format!("{path}: {msg}")
}

/// The logical operator a list starts with, if any (case-insensitive, like lua-resty-expr).
fn logic_of(first: &Value) -> Option<(Logic, bool)> {
    match first.as_str()?.to_ascii_uppercase().as_str() {
        "AND" => Some((Logic::And, false)),
        "OR" => Some((Logic::Or, false)),
        "!AND" => Some((Logic::And, true)),
        "!OR" => Some((Logic::Or, true)),
        _ => None,
    }
}

/// Compiles a clause, a list of expressions, or a logical group found at `path`, where `depth`
/// is the number of enclosing lists.
fn compile_node(
    value: &Value,
    path: &str,
    depth: usize,
    budget: &mut usize,
) -> Result<Node, String> {
    let items = value
        .as_array()
        .ok_or_else(|| at(path, "must be an array"))?;
    let first = items.first().ok_or_else(|| at(path, "must not be empty"))?;
    if first.is_array() {
        return compile_group(items, 0, (Logic::And, false), path, depth + 1, budget);
    }
    if let Some(logic) = logic_of(first) {
        // lua-resty-expr rejects a logical operator with fewer than two operands.
        if items.len() < 3 {
            return Err(at(
                path,
                "a logical operator needs at least two expressions",
            ));
        }
        return compile_group(items, 1, logic, path, depth + 1, budget);
    }
    if *budget == 0 {
        return Err(at(
            path,
            format!("too many clauses (at most {MAX_CLAUSES})"),
        ));
    }
    *budget -= 1;
    compile_clause(items, path).map(Node::Clause)
}

/// Compiles `items[skip..]` as the operands of one group.
fn compile_group(
    items: &[Value],
    skip: usize,
    (logic, negate): (Logic, bool),
    path: &str,
    depth: usize,
    budget: &mut usize,
) -> Result<Node, String> {
    if depth > MAX_DEPTH {
        return Err(at(path, format!("nested deeper than {MAX_DEPTH} levels")));
    }
    let items = items
        .iter()
        .enumerate()
        .skip(skip)
        .map(|(i, v)| compile_node(v, &format!("{path}[{i}]"), depth, budget))
        .collect::<Result<_, _>>()?;
    Ok(Node::Group {
        logic,
        negate,
        items,
    })
}

/// Compiles `[var, op, value]`, `[var, "!", op, value]`, or the legacy `[var, value]` (which
/// lua-resty-expr still reads as `==`).
fn compile_clause(items: &[Value], path: &str) -> Result<Clause, String> {
    let legacy_eq = Value::from("==");
    let (var, negate, op, value) = match items {
        [var, bang, op, value] if bang.as_str() == Some("!") => (var, true, op, value),
        [_, _, _, _] => return Err(at(path, "a 4-element clause must have \"!\" second")),
        [_, bang, _] if bang.as_str() == Some("!") => {
            return Err(at(
                path,
                "a negated clause is [var, \"!\", operator, value]",
            ))
        }
        [var, op, value] => (var, false, op, value),
        [var, value] if !is_operator(value) => (var, false, &legacy_eq, value),
        [_, _] => return Err(at(path, "the clause has no value")),
        _ => {
            return Err(at(
                path,
                "a clause is [var, operator, value] or [var, \"!\", operator, value]",
            ))
        }
    };
    let var = match var.as_str() {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => return Err(at(path, "the variable name must be a non-empty string")),
    };
    let op = compile_op(op, value).map_err(|e| at(path, e))?;
    Ok(Clause { var, negate, op })
}

/// The operator names [`compile_op`] accepts (compared lowercased).
const OPERATORS: [&str; 11] = [
    "==", "~=", ">", "<", ">=", "<=", "~~", "~*", "in", "has", "ipmatch",
];

/// Whether `value` names an operator, to tell `[var, op]` (missing value) from `[var, value]`.
fn is_operator(value: &Value) -> bool {
    value
        .as_str()
        .is_some_and(|s| OPERATORS.contains(&s.to_ascii_lowercase().as_str()))
}

/// Builds the operator with its right-hand side.
fn compile_op(op: &Value, value: &Value) -> Result<Op, String> {
    let name = op.as_str().ok_or("the operator must be a string")?;
    let cmp = |c| scalar(value).map(|v| Op::Cmp(c, parse_number(&v)));
    match name.to_ascii_lowercase().as_str() {
        "==" | "~=" if value.is_number() => {
            let n = value.as_f64().ok_or("the number is out of range")?;
            Ok(if name == "==" {
                Op::EqNum(n)
            } else {
                Op::NeNum(n)
            })
        }
        "==" => Ok(Op::Eq(scalar(value)?)),
        "~=" => Ok(Op::Ne(scalar(value)?)),
        ">" => cmp(CmpOp::Gt),
        "<" => cmp(CmpOp::Lt),
        ">=" => cmp(CmpOp::Ge),
        "<=" => cmp(CmpOp::Le),
        "~~" => compile_regex(value, false).map(Op::Regex),
        "~*" => compile_regex(value, true).map(Op::Regex),
        "in" => compile_in(value).map(Op::In),
        "has" => Ok(Op::Has(scalar(value)?)),
        "ipmatch" => compile_ipmatch(value).map(Op::IpMatch),
        _ => Err(format!("unknown operator {name:?}")),
    }
}

/// The string form of a string, number or boolean (null, arrays and objects are errors);
/// numbers read as serde_json prints them, so `1` is `"1"`.
fn scalar(value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err("the value must be a string, number or boolean".into()),
    }
}

/// Parses a decimal number the way Lua's `tonumber` reads request text: surrounding spaces
/// allowed, no `inf`/`nan` words (which Rust's parser would otherwise accept).
fn parse_number(text: &str) -> Option<f64> {
    let t = text.trim();
    let numeric = t
        .bytes()
        .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
    if numeric && t.bytes().any(|b| b.is_ascii_digit()) {
        t.parse().ok()
    } else {
        None
    }
}

fn compile_regex(value: &Value, ignore_case: bool) -> Result<Regex, String> {
    let pattern = scalar(value)?;
    RegexBuilder::new(&pattern)
        .case_insensitive(ignore_case)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("invalid regex {pattern:?}: {}", regex_error(&e)))
}

/// `patterns` as one set (each under the size cap), or the first one that is not a regex.
pub(crate) fn regex_set(patterns: &[String]) -> Result<regex::RegexSet, String> {
    for p in patterns {
        RegexBuilder::new(p)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| format!("invalid regex {p:?}: {}", regex_error(&e)))?;
    }
    // The whole set under a few times one pattern's cap: it is compiled in every worker.
    regex::RegexSetBuilder::new(patterns)
        .size_limit(REGEX_SIZE_LIMIT * 4)
        .build()
        .map_err(|e| regex_error(&e))
}

/// One line of regex error text; syntax errors otherwise span several lines with a caret
/// diagram, which would garble a JSON error message.
fn regex_error(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text.lines().rev().find(|l| !l.trim().is_empty());
    let line = last.unwrap_or(&text).trim();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

fn compile_in(value: &Value) -> Result<Vec<String>, String> {
    let list = value
        .as_array()
        .ok_or("the value of \"in\" must be an array")?;
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            scalar(v)
                .map_err(|_| format!("element {i} of \"in\" must be a string, number or boolean"))
        })
        .collect()
}

/// Accepts one IP/CIDR string or a non-empty array of them, as lua-resty-expr does.
fn compile_ipmatch(value: &Value) -> Result<Vec<Cidr>, String> {
    let list = match value {
        Value::Array(list) if !list.is_empty() => list.as_slice(),
        Value::String(_) => std::slice::from_ref(value),
        _ => {
            return Err("the value of \"ipmatch\" must be a non-empty array of IPs or CIDRs".into())
        }
    };
    list.iter().map(compile_cidr).collect()
}

fn compile_cidr(value: &Value) -> Result<Cidr, String> {
    match value.as_str().and_then(Cidr::parse) {
        Some(cidr) => Ok(cidr),
        None => Err(format!("invalid IP or CIDR {value}")),
    }
}

impl Node {
    fn eval<'a>(&self, lookup: &dyn Fn(&str) -> Option<Cow<'a, str>>) -> bool {
        match self {
            Node::Group {
                logic: Logic::And,
                negate,
                items,
            } => items.iter().all(|n| n.eval(lookup)) != *negate,
            Node::Group {
                logic: Logic::Or,
                negate,
                items,
            } => items.iter().any(|n| n.eval(lookup)) != *negate,
            Node::Clause(c) => c.eval(lookup),
        }
    }
}

impl Clause {
    fn eval<'a>(&self, lookup: &dyn Fn(&str) -> Option<Cow<'a, str>>) -> bool {
        let hit = match lookup(&self.var) {
            Some(actual) => self.op.test(&actual),
            // An absent variable differs from every value and equals none.
            None => matches!(self.op, Op::Ne(_) | Op::NeNum(_)),
        };
        hit != self.negate
    }
}

impl Op {
    fn test(&self, actual: &str) -> bool {
        match self {
            Op::Eq(v) => actual == v,
            Op::Ne(v) => actual != v,
            Op::EqNum(v) => parse_number(actual) == Some(*v),
            Op::NeNum(v) => parse_number(actual) != Some(*v),
            Op::Cmp(op, v) => compare(*op, actual, *v),
            Op::Regex(re) => re.is_match(actual),
            Op::In(list) => list.iter().any(|v| v == actual),
            Op::Has(v) => actual.contains(v.as_str()),
            Op::IpMatch(nets) => ip_in(actual, nets),
        }
    }
}

fn compare(op: CmpOp, actual: &str, expected: Option<f64>) -> bool {
    let (Some(a), Some(b)) = (parse_number(actual), expected) else {
        return false;
    };
    match op {
        CmpOp::Gt => a > b,
        CmpOp::Lt => a < b,
        CmpOp::Ge => a >= b,
        CmpOp::Le => a <= b,
    }
}

/// Whether `actual` is an IP inside any of `nets`. IPv4-mapped IPv6 addresses (what a
/// dual-stack socket reports for IPv4 peers) are matched as IPv4.
fn ip_in(actual: &str, nets: &[Cidr]) -> bool {
    match actual.trim().parse::<IpAddr>() {
        Ok(ip) => {
            let ip = ip.to_canonical();
            nets.iter().any(|n| n.contains(ip))
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    #[test]
    fn templates_split_into_text_and_variables() {
        let (head, vars) = split_template("k:$remote_addr-$uri/$$arg_a");
        let vars: Vec<_> = vars.collect();
        assert_eq!(head, "k:");
        assert_eq!(
            vars,
            [("remote_addr", "-"), ("uri", "/"), ("", ""), ("arg_a", "")]
        );
        let (head, vars) = split_template("plain");
        assert_eq!((head, vars.count()), ("plain", 0));
    }

    #[test]
    fn cidr_lists_skip_what_does_not_parse() {
        let list = CidrList::parse(&["unix:".to_string(), "10.0.0.0/8".to_string()]);
        assert!(!list.is_empty());
        assert!(list.contains("10.1.2.3".parse().unwrap()));
        assert!(!list.contains("11.0.0.1".parse().unwrap()));
        assert!(CidrList::parse(&["unix:".to_string()]).is_empty());
    }

    /// Compiles `vars` and evaluates it against `pairs`.
    fn check(vars: Value, pairs: &[(&str, &str)]) -> bool {
        let expr = VarsExpr::compile(&vars).unwrap_or_else(|e| panic!("{vars}: {e}"));
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        expr.eval(&|name| map.get(name).map(|v| Cow::Owned(v.clone())))
    }

    fn error(vars: Value) -> String {
        VarsExpr::compile(&vars).expect_err("should not compile")
    }

    #[test]
    fn equality() {
        assert!(check(json!([["arg_a", "==", "x"]]), &[("arg_a", "x")]));
        assert!(!check(json!([["arg_a", "==", "x"]]), &[("arg_a", "y")]));
        assert!(check(json!([["arg_a", "~=", "x"]]), &[("arg_a", "y")]));
        assert!(!check(json!([["arg_a", "~=", "x"]]), &[("arg_a", "x")]));
    }

    #[test]
    fn scalar_values_compare_as_text() {
        assert!(check(json!([["arg_n", "==", 1]]), &[("arg_n", "1")]));
        assert!(check(json!([["arg_n", "==", 1.5]]), &[("arg_n", "1.5")]));
        // A number on the right compares numbers, as lua-resty-expr's `tonumber`.
        assert!(check(json!([["arg_n", "==", 1]]), &[("arg_n", "01")]));
        assert!(check(json!([["arg_n", "==", 1]]), &[("arg_n", "1.0")]));
        assert!(!check(json!([["arg_n", "==", 1]]), &[("arg_n", "one")]));
        assert!(check(json!([["arg_n", "~=", 1]]), &[("arg_n", "one")]));
        assert!(!check(json!([["arg_n", "~=", 1]]), &[("arg_n", "1.00")]));
        assert!(check(json!([["arg_n", "~=", 1]]), &[]));
        // A string on the right compares text.
        assert!(!check(json!([["arg_n", "==", "1"]]), &[("arg_n", "01")]));
        assert!(check(json!([["arg_b", "==", true]]), &[("arg_b", "true")]));
        assert!(!check(
            json!([["arg_b", "==", false]]),
            &[("arg_b", "true")]
        ));
        assert!(check(
            json!([["arg_n", "in", [1, "two", false]]]),
            &[("arg_n", "1")]
        ));
    }

    #[test]
    fn numeric_comparisons() {
        let v = &[("arg_n", "10")];
        assert!(check(json!([["arg_n", ">", 9]]), v));
        assert!(!check(json!([["arg_n", ">", 10]]), v));
        assert!(check(json!([["arg_n", ">=", "10"]]), v));
        assert!(!check(json!([["arg_n", ">=", 10.5]]), v));
        assert!(check(json!([["arg_n", "<", "1e2"]]), v));
        assert!(!check(json!([["arg_n", "<", 10]]), v));
        assert!(check(json!([["arg_n", "<=", 10]]), v));
        assert!(!check(json!([["arg_n", "<=", -3]]), v));
        assert!(check(json!([["arg_n", ">", 2]]), &[("arg_n", " 2.5 ")]));
    }

    #[test]
    fn numeric_comparisons_with_non_numbers_are_false() {
        for op in [">", "<", ">=", "<="] {
            assert!(
                !check(json!([["arg_n", op, "abc"]]), &[("arg_n", "1")]),
                "{op}"
            );
            assert!(
                !check(json!([["arg_n", op, 1]]), &[("arg_n", "abc")]),
                "{op}"
            );
            assert!(
                !check(json!([["arg_n", op, true]]), &[("arg_n", "1")]),
                "{op}"
            );
            assert!(
                !check(json!([["arg_n", op, 1]]), &[("arg_n", "nan")]),
                "{op}"
            );
            assert!(!check(json!([["arg_n", op, 1]]), &[("arg_n", "")]), "{op}");
            // Negation inverts the false result.
            assert!(
                check(json!([["arg_n", "!", op, 1]]), &[("arg_n", "inf")]),
                "{op}"
            );
        }
    }

    #[test]
    fn regex_operators() {
        let v = &[("uri", "/API/v1/users")];
        assert!(check(json!([["uri", "~~", "^/API/v[0-9]+/"]]), v));
        assert!(!check(json!([["uri", "~~", "^/api/"]]), v));
        assert!(
            check(json!([["uri", "~~", "users"]]), v),
            "search is unanchored"
        );
        assert!(check(json!([["uri", "~*", "^/api/"]]), v));
        assert!(!check(json!([["uri", "~*", "^/admin/"]]), v));
    }

    #[test]
    fn in_and_has() {
        let v = &[("http_x_user", "alice,bob")];
        assert!(check(json!([["http_x_user", "in", ["x", "alice,bob"]]]), v));
        assert!(!check(json!([["http_x_user", "in", ["alice", "bob"]]]), v));
        assert!(!check(json!([["http_x_user", "in", []]]), v));
        assert!(check(json!([["http_x_user", "has", "bob"]]), v));
        assert!(!check(json!([["http_x_user", "has", "carol"]]), v));
    }

    #[test]
    fn ipmatch_v4() {
        let vars = json!([["remote_addr", "ipmatch", ["10.0.0.0/8", "192.168.1.7"]]]);
        assert!(check(vars.clone(), &[("remote_addr", "10.200.3.4")]));
        assert!(check(vars.clone(), &[("remote_addr", "192.168.1.7")]));
        assert!(!check(vars.clone(), &[("remote_addr", "192.168.1.8")]));
        assert!(!check(vars.clone(), &[("remote_addr", "11.0.0.1")]));
        assert!(!check(vars.clone(), &[("remote_addr", "not-an-ip")]));
        assert!(check(vars, &[("remote_addr", "::ffff:10.1.2.3")]), "mapped");
        let any = json!([["remote_addr", "ipmatch", "0.0.0.0/0"]]);
        assert!(check(any.clone(), &[("remote_addr", "8.8.8.8")]));
        assert!(!check(any, &[("remote_addr", "::1")]), "families differ");
    }

    #[test]
    fn ipmatch_v6() {
        let vars = json!([["remote_addr", "ipmatch", ["2001:db8::/32", "::1"]]]);
        assert!(check(vars.clone(), &[("remote_addr", "2001:db8:ffff::1")]));
        assert!(check(vars.clone(), &[("remote_addr", "::1")]));
        assert!(!check(vars.clone(), &[("remote_addr", "2001:db9::1")]));
        assert!(!check(vars, &[("remote_addr", "127.0.0.1")]));
        let all = json!([["remote_addr", "ipmatch", ["::/0"]]]);
        assert!(check(all, &[("remote_addr", "fe80::1")]));
        let host = json!([["remote_addr", "ipmatch", ["fe80::1/128"]]]);
        assert!(!check(host, &[("remote_addr", "fe80::2")]));
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            parse_cidr("10.0.0.1"),
            Some(("10.0.0.1".parse().unwrap(), 32))
        );
        assert_eq!(parse_cidr("::1"), Some(("::1".parse().unwrap(), 128)));
        assert_eq!(parse_cidr("10.0.0.0/8").map(|c| c.1), Some(8));
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "1.2.3",
            "x/8",
            "",
        ] {
            assert_eq!(parse_cidr(bad), None, "{bad}");
        }
    }

    #[test]
    fn negation() {
        let v = &[("arg_a", "x")];
        assert!(!check(json!([["arg_a", "!", "==", "x"]]), v));
        assert!(check(json!([["arg_a", "!", "==", "y"]]), v));
        assert!(check(json!([["arg_a", "!", "~~", "^z"]]), v));
        assert!(!check(json!([["arg_a", "!", "in", ["x"]]]), v));
    }

    #[test]
    fn missing_variable() {
        for (op, value) in [
            ("==", json!("x")),
            (">", json!(1)),
            ("<=", json!(1)),
            ("~~", json!(".*")),
            ("~*", json!("")),
            ("in", json!(["x"])),
            ("has", json!("")),
            ("ipmatch", json!(["0.0.0.0/0"])),
        ] {
            assert!(!check(json!([["arg_q", op, value.clone()]]), &[]), "{op}");
            assert!(check(json!([["arg_q", "!", op, value]]), &[]), "! {op}");
        }
        assert!(check(json!([["arg_q", "~=", "x"]]), &[]));
        assert!(!check(json!([["arg_q", "!", "~=", "x"]]), &[]));
    }

    #[test]
    fn top_level_list_is_and() {
        let vars = json!([["arg_a", "==", "1"], ["arg_b", "==", "2"]]);
        assert!(check(vars.clone(), &[("arg_a", "1"), ("arg_b", "2")]));
        assert!(!check(vars, &[("arg_a", "1"), ("arg_b", "3")]));
        assert!(check(json!([]), &[]), "empty vars match everything");
    }

    #[test]
    fn logical_groups() {
        let vars = json!([
            "OR",
            ["arg_a", "==", "1"],
            ["AND", ["arg_b", "==", "2"], ["arg_c", "==", "3"]]
        ]);
        assert!(check(vars.clone(), &[("arg_a", "1")]));
        assert!(check(vars.clone(), &[("arg_b", "2"), ("arg_c", "3")]));
        assert!(!check(vars.clone(), &[("arg_b", "2")]));
        assert!(!check(vars, &[]));
        let negated = json!(["!or", ["arg_a", "==", "1"], ["arg_b", "==", "2"]]);
        assert!(check(negated.clone(), &[("arg_a", "0")]));
        assert!(!check(negated, &[("arg_b", "2")]));
        let not_and = json!(["!AND", ["arg_a", "==", "1"], ["arg_b", "==", "2"]]);
        assert!(check(not_and.clone(), &[("arg_a", "1")]));
        assert!(!check(not_and, &[("arg_a", "1"), ("arg_b", "2")]));
        // A group inside the default AND list, and a nested plain list.
        let mixed = json!([
            ["arg_a", "==", "1"],
            [
                "OR",
                ["arg_b", "==", "2"],
                [["arg_c", "==", "3"], ["arg_d", "==", "4"]]
            ]
        ]);
        assert!(check(
            mixed.clone(),
            &[("arg_a", "1"), ("arg_c", "3"), ("arg_d", "4")]
        ));
        assert!(!check(mixed, &[("arg_a", "1"), ("arg_c", "3")]));
    }

    #[test]
    fn legacy_two_element_clause_means_equal() {
        assert!(check(json!([["arg_a", "x"]]), &[("arg_a", "x")]));
        assert!(!check(json!([["arg_a", "x"]]), &[("arg_a", "y")]));
        assert_eq!(
            error(json!([["arg_a", "=="]])),
            "vars[0]: the clause has no value"
        );
    }

    #[test]
    fn operators_are_case_insensitive() {
        assert!(check(json!([["arg_a", "IN", ["x"]]]), &[("arg_a", "x")]));
        assert!(check(json!([["ip", "IPMatch", "::1"]]), &[("ip", "::1")]));
    }

    #[test]
    fn compile_errors_name_the_clause() {
        let unknown = error(json!([["a", "==", "1"], ["a", "=~", "1"]]));
        assert_eq!(unknown, "vars[1]: unknown operator \"=~\"");
        let regex = error(json!([["a", "==", "1"], ["uri", "~~", "("]]));
        assert!(
            regex.starts_with("vars[1]: invalid regex \"(\": "),
            "{regex}"
        );
        assert!(!regex.contains('\n'), "{regex}");
        assert_eq!(error(json!({"a": 1})), "vars: must be an array");
        assert_eq!(
            error(json!(["OR", ["a", "==", "1"], ["b", "!", ">"]])),
            "vars[2]: a negated clause is [var, \"!\", operator, value]"
        );
        assert_eq!(
            error(json!([
                ["a", "==", "1"],
                ["a", "==", "1"],
                ["b", "!", ">", 1, 2]
            ])),
            "vars[2]: a clause is [var, operator, value] or [var, \"!\", operator, value]"
        );
        let cidr = error(json!([
            ["a", "==", "1"],
            ["AND", ["x", "==", 1], ["ip", "ipmatch", ["1.2.3.4/40"]]]
        ]));
        assert_eq!(cidr, "vars[1][2]: invalid IP or CIDR \"1.2.3.4/40\"");
        assert_eq!(
            error(json!([["a", "not", "==", "1"]])),
            "vars[0]: a 4-element clause must have \"!\" second"
        );
        assert_eq!(
            error(json!([["a", "==", "1"], "b"])),
            "vars[1]: must be an array"
        );
        assert!(error(json!(["a", "==", "1"])).contains("wrapped inside brackets"));
    }

    #[test]
    fn value_shape_errors() {
        let cases = [
            (
                json!([[1, "==", "1"]]),
                "vars[0]: the variable name must be a non-empty string",
            ),
            (
                json!([["", "==", "1"]]),
                "vars[0]: the variable name must be a non-empty string",
            ),
            (
                json!([["a", 5, "1"]]),
                "vars[0]: the operator must be a string",
            ),
            (
                json!([["a", "==", null]]),
                "vars[0]: the value must be a string, number or boolean",
            ),
            (
                json!([["a", "==", ["x"]]]),
                "vars[0]: the value must be a string, number or boolean",
            ),
            (
                json!([["a", "in", "x"]]),
                "vars[0]: the value of \"in\" must be an array",
            ),
            (
                json!([["a", "in", [{}]]]),
                "vars[0]: element 0 of \"in\" must be a string, number or boolean",
            ),
            (
                json!([["a", "ipmatch", []]]),
                "vars[0]: the value of \"ipmatch\" must be a non-empty array of IPs or CIDRs",
            ),
            (
                json!([["a", "ipmatch", [1]]]),
                "vars[0]: invalid IP or CIDR 1",
            ),
            (
                json!([["OR", ["a", "==", "1"]]]),
                "vars[0]: a logical operator needs at least two expressions",
            ),
            (json!([[]]), "vars[0]: must not be empty"),
        ];
        for (vars, want) in cases {
            assert_eq!(error(vars.clone()), want, "{vars}");
        }
    }

    /// `levels` nested AND groups around two clauses.
    fn nested(levels: usize) -> Value {
        let mut v = json!(["AND", ["a", "==", "1"], ["b", "==", "2"]]);
        for _ in 1..levels {
            v = json!(["AND", v, ["c", "==", "3"]]);
        }
        v
    }

    #[test]
    fn depth_limit() {
        assert!(check(
            nested(MAX_DEPTH),
            &[("a", "1"), ("b", "2"), ("c", "3")]
        ));
        let e = error(nested(MAX_DEPTH + 1));
        assert_eq!(
            e,
            "vars[1][1][1][1][1][1][1][1]: nested deeper than 8 levels"
        );
    }

    #[test]
    fn clause_limit() {
        let clause = json!(["a", "==", "1"]);
        let ok = Value::Array(vec![clause.clone(); MAX_CLAUSES]);
        assert!(check(ok, &[("a", "1")]));
        let too_many = Value::Array(vec![clause.clone(); MAX_CLAUSES + 1]);
        assert_eq!(error(too_many), "vars[64]: too many clauses (at most 64)");
        // Clauses inside nested groups count too.
        let half = Value::Array(vec![clause; MAX_CLAUSES / 2 + 1]);
        assert!(error(json!(["OR", half.clone(), half])).contains("too many clauses"));
    }

    #[test]
    fn regex_size_limit() {
        let e = error(json!([["uri", "~~", "\\w{1000}{1000}"]]));
        assert!(e.starts_with("vars[0]: invalid regex"), "{e}");
    }

    #[test]
    fn weird_inputs_never_panic() {
        let mut deep = json!([]);
        for _ in 0..200 {
            deep = json!([deep]);
        }
        let inputs = [
            json!(null),
            json!(1),
            json!("vars"),
            json!([[[]]]),
            json!([[[[]]]]),
            json!([["AND"]]),
            json!(["OR"]),
            json!(["AND", 1, 2]),
            json!([[null, null, null]]),
            json!([[1, 2, 3, 4]]),
            json!([["a", "!", 1, 2]]),
            json!([["a", "ipmatch", "/"]]),
            json!([["a", "ipmatch", "::/"]]),
            json!([["a", ">", {}]]),
            json!([["a", "~~", 12]]),
            json!([[{"x": 1}, "==", 1]]),
            json!([["a", "==", "1", "2", "3"]]),
            json!([["a", "==", u64::MAX]]),
            json!([["a", "<", -1e300]]),
            deep,
        ];
        for v in inputs {
            if let Ok(expr) = VarsExpr::compile(&v) {
                let _ = expr.eval(&|_| Some(Cow::Borrowed("1")));
                let _ = expr.eval(&|_| None);
            }
        }
    }
}
