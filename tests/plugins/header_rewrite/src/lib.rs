//! Rewrites headers both ways. Configuration (JSON):
//! `{"set": {"name": "value"}, "add": {…}, "remove": ["name"], "path": "/new/path",
//!   "response_set": {…}, "response_remove": ["name"]}`.
//! Every request also gets `x-wasm-plugin: <plugin_name property>`.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::collections::BTreeMap;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Rules {
    set: BTreeMap<String, String>,
    add: BTreeMap<String, String>,
    remove: Vec<String>,
    path: Option<String>,
    response_set: BTreeMap<String, String>,
    response_remove: Vec<String>,
}

#[derive(Default)]
struct Root {
    /// Shared with every request's context, not copied for each.
    rules: Rc<Rules>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(conf) = self.get_plugin_configuration() else { return false };
        match parse(&String::from_utf8_lossy(&conf)) {
            Some(r) => {
                self.rules = Rc::new(r);
                true
            }
            None => {
                log::error!("header_rewrite: configuration is not the expected JSON");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Rewrite { rules: Rc::clone(&self.rules) }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Rewrite {
    rules: Rc<Rules>,
}

impl Context for Rewrite {}

impl HttpContext for Rewrite {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        for (k, v) in &self.rules.set {
            self.set_http_request_header(k, Some(v));
        }
        for (k, v) in &self.rules.add {
            self.add_http_request_header(k, v);
        }
        for k in &self.rules.remove {
            self.set_http_request_header(k, None);
        }
        if let Some(p) = &self.rules.path {
            self.set_http_request_header(":path", Some(p));
        }
        let name = self
            .get_property(vec!["plugin_name"])
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        self.add_http_request_header("x-wasm-plugin", &name);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        for (k, v) in &self.rules.response_set {
            self.set_http_response_header(k, Some(v));
        }
        for k in &self.rules.response_remove {
            self.set_http_response_header(k, None);
        }
        Action::Continue
    }
}

/// A tiny JSON reader for `{"key": {"k": "v"}, "key2": ["a"], "path": "x"}` — enough for the
/// fixture, and it keeps the plugin free of serde.
fn parse(text: &str) -> Option<Rules> {
    let mut rules = Rules::default();
    let mut p = Parser { s: text.as_bytes(), i: 0 };
    p.expect(b'{')?;
    loop {
        p.ws();
        if p.eat(b'}') {
            return Some(rules);
        }
        let key = p.string()?;
        p.expect(b':')?;
        match key.as_str() {
            "set" => rules.set = p.object()?,
            "add" => rules.add = p.object()?,
            "response_set" => rules.response_set = p.object()?,
            "remove" => rules.remove = p.array()?,
            "response_remove" => rules.response_remove = p.array()?,
            "path" => rules.path = Some(p.string()?),
            _ => return None,
        }
        p.ws();
        p.eat(b',');
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> Option<()> {
        self.eat(c).then_some(())
    }
    fn string(&mut self) -> Option<String> {
        self.expect(b'"')?;
        let start = self.i;
        while *self.s.get(self.i)? != b'"' {
            self.i += 1;
        }
        let out = String::from_utf8(self.s[start..self.i].to_vec()).ok()?;
        self.i += 1;
        Some(out)
    }
    fn object(&mut self) -> Option<BTreeMap<String, String>> {
        self.expect(b'{')?;
        let mut m = BTreeMap::new();
        while !self.eat(b'}') {
            let k = self.string()?;
            self.expect(b':')?;
            m.insert(k, self.string()?);
            self.eat(b',');
        }
        Some(m)
    }
    fn array(&mut self) -> Option<Vec<String>> {
        self.expect(b'[')?;
        let mut v = Vec::new();
        while !self.eat(b']') {
            v.push(self.string()?);
            self.eat(b',');
        }
        Some(v)
    }
}
