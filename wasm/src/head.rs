//! Header lists as plugins see them, behind one interface ([`HeaderList`]) for the header-map
//! host functions:
//!
//! - [`Head`]: a request or response head — pseudo-headers (`:method`, `:path`, `:authority`,
//!   `:scheme` / `:status`) and the gateway's own `http::HeaderMap`. The map is lent as it is:
//!   no copy into a pair list on the way in and no re-parse on the way out, which profiles
//!   showed as the largest part of the host's per-request cost.
//! - [`Pairs`]: a plain list, for trailers and call-out answers.
//!
//! Names are matched case-insensitively and stored lower-case. A header the map cannot hold
//! (invalid name or value, past the 32,768 entries of a `HeaderMap`) is not an error for the
//! plugin — as in Envoy, the call succeeds — but the head records it, and the gateway fails the
//! request with a line that names it (see [`Head::error`]).

use bytes::{Bytes, BytesMut};
use foldhash::HashMap;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use smallvec::SmallVec;
use std::borrow::Cow;
use std::cell::RefCell;
use wasmgate_abi::map::{self, Pairs};

/// A header list the header-map host functions work on.
pub trait HeaderList {
    /// The first value of `name`.
    fn value(&self, name: &str) -> Option<Value>;
    /// [`HeaderList::value`] with the name already parsed.
    fn value_parsed(&self, name: &HeaderName) -> Option<Value> {
        self.value(name.as_str())
    }
    /// Number of pairs.
    fn count(&self) -> usize;
    /// The serialized map (see [`map`]).
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![0; self.encoded_len()];
        self.encode_into(&mut out);
        out
    }
    /// Serializes into `out` ([`HeaderList::encoded_len`] bytes); returns the bytes written.
    fn encode_into(&self, out: &mut [u8]) -> usize;
    /// Size of [`HeaderList::encode`]'s output.
    fn encoded_len(&self) -> usize;
    /// Envoy's `byteSize()`: the names' and values' bytes, without the encoding's lengths and
    /// terminators (4 bytes of count, then 8 + 2 per entry).
    fn byte_size(&self) -> usize {
        self.encoded_len().saturating_sub(4 + 10 * self.count())
    }
    /// Sets `name` to `value`, replacing every value it had.
    fn replace(&mut self, name: &str, value: &[u8]);
    /// Adds a value to `name`.
    fn add(&mut self, name: &str, value: &[u8]);
    /// [`HeaderList::replace`] or [`HeaderList::add`] with the name already parsed. A list
    /// that keeps parsed values ([`Head`]) looks `value` up in the instance's memo of values
    /// first (see [`Memo`]); a plain list stores text and has no use for it.
    fn store_parsed(
        &mut self,
        op: HeaderOp,
        name: HeaderName,
        value: &[u8],
        _values: &mut ValueMemo,
    ) {
        match op {
            HeaderOp::Replace => self.replace(name.as_str(), value),
            HeaderOp::Add => self.add(name.as_str(), value),
        }
    }
    fn remove(&mut self, name: &str);
    /// Replaces every pair; pseudo-headers not in `pairs` are kept (they describe the request).
    fn set_all(&mut self, pairs: Pairs);
}

/// How a header call stores its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderOp {
    /// Sets the name to the value, replacing every value it had.
    Replace,
    /// Adds a value to the name.
    Add,
}

/// A value handed out of a list: a header map's values are shared, not copied.
#[derive(Debug, Clone)]
pub enum Value {
    Header(HeaderValue),
    Bytes(Bytes),
    /// The request's own path and query (`:path` as received), shared with its URI.
    Path(PathAndQuery),
}

impl AsRef<[u8]> for Value {
    fn as_ref(&self) -> &[u8] {
        match self {
            Value::Header(v) => v.as_bytes(),
            Value::Bytes(b) => b,
            Value::Path(p) => p.as_str().as_bytes(),
        }
    }
}

/// Pseudo-header names known to the gateway, kept without an allocation.
const PSEUDO: [&str; 6] = [
    ":method",
    ":path",
    ":authority",
    ":scheme",
    ":status",
    ":protocol",
];

fn pseudo_name(name: &str) -> Cow<'static, str> {
    match PSEUDO.iter().find(|p| p.eq_ignore_ascii_case(name)) {
        Some(p) => Cow::Borrowed(p),
        None => Cow::Owned(name.to_ascii_lowercase()),
    }
}

/// `name`'s bit in [`Head`]'s record of changed pseudo-headers (one per name of [`PSEUDO`];
/// other pseudo-headers mean nothing to the gateway and share the last bit).
fn pseudo_bit(name: &str) -> u8 {
    let i = PSEUDO.iter().position(|p| p.eq_ignore_ascii_case(name));
    1 << i.unwrap_or(PSEUDO.len())
}

/// Pseudo-headers of a head: four for a request, one for a response, kept inline.
type PseudoList = SmallVec<[(Cow<'static, str>, Value); 4]>;

/// A request or response head lent to plugins.
#[derive(Debug, Clone, Default)]
pub struct Head {
    /// Lent from the request where they can be (`:path` shares the URI's bytes, `:authority`
    /// the `Host` value): most plugins never read them.
    pseudo: PseudoList,
    headers: HeaderMap,
    /// Set by any change, so an untouched head is not applied back.
    changed: bool,
    /// Which pseudo-headers a plugin set or removed ([`pseudo_bit`]): only those are applied
    /// back, so a plugin that sets a header costs no re-parse of the path or the authority.
    pseudo_changed: u8,
    /// The first header the map could not take (invalid name or value), and how many were.
    error: Option<String>,
    refused: usize,
    /// Headers refused because the map was full.
    overflow: usize,
    /// The headers are lent out ([`Head::take_headers`]).
    lent: bool,
    /// A plugin set, added or removed `Content-Length` or `Transfer-Encoding` (or replaced
    /// every header): the message's framing has to be worked out again.
    framing_changed: bool,
}

/// Most values a head holds: `HeaderMap`'s own bound on entries, applied to values too (a map
/// takes any number of values per name, and a plugin adding 40,000 of them must not reach the
/// upstream).
pub const MAX_HEADERS: usize = 1 << 15;

impl Head {
    /// A request head: `:method`, `:path`, `:authority`, `:scheme`, then the headers, moved
    /// out of `parts` (not copied): give them back with [`Head::headers`] once the plugins
    /// are done with the request headers.
    pub fn request(parts: &mut http::request::Parts, scheme: &'static str) -> Head {
        let authority = match parts.headers.get(http::header::HOST) {
            Some(host) => Value::Header(host.clone()),
            None => Value::Bytes(
                parts
                    .uri
                    .authority()
                    .map(|a| Bytes::copy_from_slice(a.as_str().as_bytes()))
                    .unwrap_or_default(),
            ),
        };
        let path = match parts.uri.path_and_query() {
            Some(p) => Value::Path(p.clone()),
            None => Value::Bytes(Bytes::from_static(b"/")),
        };
        let mut pseudo = PseudoList::new();
        pseudo.push((Cow::Borrowed(PSEUDO[0]), method_value(&parts.method)));
        pseudo.push((Cow::Borrowed(PSEUDO[1]), path));
        pseudo.push((Cow::Borrowed(PSEUDO[2]), authority));
        pseudo.push((
            Cow::Borrowed(PSEUDO[3]),
            Value::Bytes(Bytes::from_static(scheme.as_bytes())),
        ));
        Head::new(pseudo, std::mem::take(&mut parts.headers))
    }

    /// A response head: `:status`, then `headers`.
    pub fn response(status: http::StatusCode, headers: HeaderMap) -> Head {
        let mut pseudo = PseudoList::new();
        pseudo.push((Cow::Borrowed(PSEUDO[4]), Value::Bytes(status_bytes(status))));
        Head::new(pseudo, headers)
    }

    fn new(pseudo: PseudoList, headers: HeaderMap) -> Head {
        Head {
            pseudo,
            headers,
            changed: false,
            pseudo_changed: 0,
            error: None,
            refused: 0,
            overflow: 0,
            lent: false,
            framing_changed: false,
        }
    }

    /// Whether a plugin touched the fields that frame the body (`Content-Length`,
    /// `Transfer-Encoding`): when none did, the framing the headers came with still holds.
    pub fn framing_changed(&self) -> bool {
        self.framing_changed
    }

    /// Whether the headers are lent out ([`Head::take_headers`]).
    pub fn lent(&self) -> bool {
        self.lent
    }

    /// Whether a plugin changed anything.
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// Marks what plugins changed so far as applied: [`Head::changed`] then tells whether
    /// later callbacks (a request's body callbacks, before the upstream is contacted) changed
    /// more. The record of set pseudo-headers stays: applying them again is harmless, and a
    /// `:authority` set earlier must still become the `Host` of headers taken again.
    pub fn settle(&mut self) {
        self.changed = false;
    }

    /// Whether a plugin set or removed the pseudo-header `name` (`:path`, `:authority`…).
    pub fn pseudo_changed(&self, name: &str) -> bool {
        self.pseudo_changed != 0 && self.pseudo_changed & pseudo_bit(name) != 0
    }

    /// The pseudo-header's value when a plugin set it: what is to be applied back.
    pub fn pseudo_set(&self, name: &str) -> Option<&[u8]> {
        match self.pseudo_changed(name) {
            true => self.pseudo(name),
            false => None,
        }
    }

    /// The header map as plugins left it.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The headers to send on, as the plugins left them; the head keeps a copy for later
    /// callbacks. The map given out is the one the plugins worked on, with the room its parser
    /// gave it: the headers the proxy adds next (forwarding headers, the request id) then do
    /// not grow a copy made to its exact size (one reallocation per request).
    pub fn headers_out(&mut self) -> HeaderMap {
        let copy = self.headers.clone();
        std::mem::replace(&mut self.headers, copy)
    }

    /// The headers lent out, not copied, for a while when no callback reads them (the
    /// request's headers while they go upstream); [`Head::put_headers`] gives them back.
    pub fn take_headers(&mut self) -> HeaderMap {
        self.lent = true;
        std::mem::take(&mut self.headers)
    }

    /// Gives back headers [`Head::take_headers`] lent (as they were sent on).
    pub fn put_headers(&mut self, headers: HeaderMap) {
        self.lent = false;
        self.headers = headers;
    }

    /// A pseudo-header's value.
    pub fn pseudo(&self, name: &str) -> Option<&[u8]> {
        self.pseudo
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_ref())
    }

    /// The first value of a header (or pseudo-header), borrowed.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        if name.starts_with(':') {
            return self.pseudo(name);
        }
        self.headers.get(name).map(HeaderValue::as_bytes)
    }

    /// Every value of a header, in order.
    pub fn get_all<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers.get_all(name).into_iter().map(|v| v.as_bytes())
    }

    /// Every pair: pseudo-headers first, then headers in the map's order. A request's `Host`
    /// is its `:authority` (as Envoy's codec makes it), not a header of its own: a plugin that
    /// sends the pairs on (a call-out) must not send two. `get("host")` still answers, for
    /// plugins written against nginx.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let pseudo = self.pseudo.iter().map(|(k, v)| (k.as_ref(), v.as_ref()));
        let hide = self.hides_host();
        let headers = self
            .headers
            .iter()
            .filter(move |(k, _)| !(hide && *k == http::header::HOST))
            .map(|(k, v)| (k.as_str(), v.as_bytes()));
        pseudo.chain(headers)
    }

    /// Whether this is a request's head, whose `Host` the pairs show as `:authority` only.
    fn hides_host(&self) -> bool {
        self.pseudo.iter().any(|(k, _)| *k == PSEUDO[2])
    }

    /// Why the head cannot be sent as plugins left it: a header the map could not take.
    pub fn error(&self) -> Option<String> {
        if self.overflow > 0 {
            let total = self.headers.len() + self.overflow;
            return Some(format!("{total} headers, more than a header map can hold"));
        }
        let first = self.error.as_ref()?;
        Some(match self.refused {
            1 => first.clone(),
            n => format!("{first} (and {} more refused)", n - 1),
        })
    }

    fn refuse(&mut self, why: impl FnOnce() -> String) {
        if self.error.is_none() {
            self.error = Some(why());
        }
        self.refused += 1;
    }

    /// A checked value for `name`, or the refusal recorded: from `memo` when the plugin set
    /// the same bytes lately (shared, nothing allocated), else checked and made, and a short
    /// one remembered there.
    fn value_for(
        &mut self,
        name: &HeaderName,
        value: &[u8],
        memo: Option<&mut ValueMemo>,
    ) -> Option<HeaderValue> {
        if let Some(v) = memo.as_ref().and_then(|m| m.find(value)) {
            return Some(v.clone());
        }
        let v = header_value(value);
        match (&v, memo) {
            (None, _) => self.refuse(|| format!("invalid value for header {:?}", name.as_str())),
            (Some(v), Some(memo)) if value.len() <= INLINE_VALUE => memo.remember(v.clone()),
            _ => {}
        }
        v
    }

    /// Stores `value` under `name` (`op`), counting what the map could not take.
    fn store(
        &mut self,
        op: HeaderOp,
        name: HeaderName,
        value: &[u8],
        memo: Option<&mut ValueMemo>,
    ) {
        self.changed = true;
        self.framing_changed |= is_framing(&name);
        if op == HeaderOp::Add && self.headers.len() >= MAX_HEADERS {
            self.overflow += 1;
            return;
        }
        let Some(v) = self.value_for(&name, value, memo) else {
            return;
        };
        let full = match op {
            HeaderOp::Replace => self.headers.try_insert(name, v).is_err(),
            HeaderOp::Add => self.headers.try_append(name, v).is_err(),
        };
        if full {
            self.overflow += 1;
        }
    }

    /// `name` parsed, or the refusal recorded.
    fn name(&mut self, name: &str) -> Option<HeaderName> {
        let n = header_name(name);
        if n.is_none() {
            self.refuse(|| format!("invalid header name {name:?}"));
        }
        n
    }

    fn set_pseudo(&mut self, name: &str, value: &[u8], replace: bool) {
        self.pseudo_changed |= pseudo_bit(name);
        let value = Value::Bytes(carve(value));
        if replace {
            if let Some(slot) = self
                .pseudo
                .iter_mut()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
            {
                slot.1 = value;
                return;
            }
        }
        self.pseudo.push((pseudo_name(name), value));
    }
}

/// `Content-Length` or `Transfer-Encoding`.
fn is_framing(name: &HeaderName) -> bool {
    *name == http::header::CONTENT_LENGTH || *name == http::header::TRANSFER_ENCODING
}

/// The header names — or values — one plugin instance passed lately, parsed and checked. A
/// plugin passes the same few names on every request, and often the same values, so a host
/// call compares the bytes it was given with these (most differ in length at once) before it
/// parses them: a remembered name skips the UTF-8 check and the lookup in the worker's table
/// ([`header_name`]), which cost several times more; a remembered value skips its check, its
/// copy and its allocation (the map shares it).
#[derive(Debug)]
pub struct Memo<T> {
    items: Vec<T>,
    /// Where the next item goes once the memo is full.
    next: usize,
}

/// Header names a plugin instance passed lately.
pub type NameMemo = Memo<HeaderName>;
/// Short header values a plugin instance set lately.
pub type ValueMemo = Memo<HeaderValue>;

/// What a [`Memo`] compares: the exact bytes a plugin passes.
pub trait Recalled {
    fn bytes(&self) -> &[u8];
}

impl Recalled for HeaderName {
    fn bytes(&self) -> &[u8] {
        self.as_str().as_bytes()
    }
}

impl Recalled for HeaderValue {
    fn bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl<T> Default for Memo<T> {
    fn default() -> Self {
        Memo {
            items: Vec::new(),
            next: 0,
        }
    }
}

impl<T: Recalled> Memo<T> {
    /// Items kept: a plugin setting more on every request still finds the slower path behind.
    const SIZE: usize = 8;

    /// The item whose bytes are exactly `raw` (for names: lower-case, so a name given in
    /// capitals is parsed each time).
    pub fn find(&self, raw: &[u8]) -> Option<&T> {
        self.items.iter().find(|n| n.bytes() == raw)
    }

    pub fn remember(&mut self, item: T) {
        if self.items.len() < Self::SIZE {
            self.items.push(item);
        } else {
            self.items[self.next] = item;
            self.next = (self.next + 1) % Self::SIZE;
        }
    }
}

/// Most names [`header_name`] remembers per thread.
const NAMES_KEPT: usize = 1024;

std::thread_local! {
    /// Header names plugins used, parsed once: a plugin sets the same few names on every
    /// request, and a custom name parsed afresh is a copy, and another allocation the first
    /// time the map holding it is cloned; a remembered one is shared.
    static NAMES: RefCell<HashMap<Box<str>, HeaderName>> = RefCell::new(HashMap::default());
}

/// `name` as a header name (lower-cased), or `None` when it is not a valid one.
pub fn header_name(name: &str) -> Option<HeaderName> {
    NAMES.with(|names| {
        let mut names = names.borrow_mut();
        if let Some(n) = names.get(name) {
            return Some(n.clone());
        }
        let n = HeaderName::from_bytes(name.as_bytes()).ok()?;
        if names.len() < NAMES_KEPT {
            names.insert(name.into(), n.clone());
        }
        Some(n)
    })
}

/// A value a plugin set, checked, in shared bytes (see [`carve`]).
fn header_value(value: &[u8]) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(carve(value)).ok()
}

/// The longest value remembered in a [`ValueMemo`].
const INLINE_VALUE: usize = 62;

/// Values up to this length are carved out of the thread's [`VALUES`] buffer; a longer one
/// gets an allocation of its own, which weighs little against copying it.
const CARVED_VALUE: usize = 256;

/// The size of each [`VALUES`] buffer.
const VALUES_CHUNK: usize = 4096;

std::thread_local! {
    /// The bytes of the values plugins set, one after the other: each value is a slice of
    /// it shared by reference count, so setting a value that changes from request to request
    /// (a user id, a trace id) costs no allocation. When the buffer is full it is reused in
    /// place if no value in it is alive any more (the requests that held them are over),
    /// else a new one is taken and the old one is freed with its last value: one
    /// allocation per 4 KiB of values at most, none in the steady state.
    static VALUES: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// `value` copied into shared bytes, without an allocation of its own when it is short. The
/// gateway clones the maps that hold values to send them on; shared bytes make that a
/// reference count, where a plain copy would allocate again to become shareable.
pub fn carve(value: &[u8]) -> Bytes {
    if value.is_empty() {
        return Bytes::new();
    }
    if value.len() > CARVED_VALUE {
        return Bytes::copy_from_slice(value);
    }
    VALUES.with(|values| {
        let mut values = values.borrow_mut();
        if values.capacity() - values.len() < value.len() {
            values.reserve(VALUES_CHUNK);
        }
        values.extend_from_slice(value);
        values.split().freeze()
    })
}

/// The three digits of every status code 100–999, so `:status` is lent without a copy.
static STATUS_DIGITS: [u8; 2700] = status_digits();

const fn status_digits() -> [u8; 2700] {
    let mut out = [0u8; 2700];
    let mut i = 0;
    while i < 900 {
        let code = i + 100;
        out[i * 3] = b'0' + (code / 100) as u8;
        out[i * 3 + 1] = b'0' + (code / 10 % 10) as u8;
        out[i * 3 + 2] = b'0' + (code % 10) as u8;
        i += 1;
    }
    out
}

fn status_bytes(status: http::StatusCode) -> Bytes {
    // `StatusCode` holds 100..=999 only.
    let i = (status.as_u16() as usize).saturating_sub(100).min(899) * 3;
    Bytes::from_static(&STATUS_DIGITS[i..i + 3])
}

/// `http::Method` as bytes, without a copy for the standard methods.
fn method_value(m: &http::Method) -> Value {
    const STANDARD: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    Value::Bytes(match STANDARD.iter().find(|s| **s == m.as_str()) {
        Some(s) => Bytes::from_static(s.as_bytes()),
        None => Bytes::copy_from_slice(m.as_str().as_bytes()),
    })
}

impl HeaderList for Head {
    fn value(&self, name: &str) -> Option<Value> {
        if name.starts_with(':') {
            let found = self
                .pseudo
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name));
            return found.map(|(_, v)| v.clone());
        }
        self.headers.get(name).cloned().map(Value::Header)
    }

    fn value_parsed(&self, name: &HeaderName) -> Option<Value> {
        self.headers.get(name).cloned().map(Value::Header)
    }

    fn count(&self) -> usize {
        let host = match self.hides_host() {
            true => self.headers.get_all(http::header::HOST).iter().count(),
            false => 0,
        };
        self.pseudo.len() + self.headers.len() - host
    }

    fn encode_into(&self, out: &mut [u8]) -> usize {
        map::encode_into(out, || self.iter())
    }

    fn encoded_len(&self) -> usize {
        map::encoded_len(self.iter())
    }

    fn replace(&mut self, name: &str, value: &[u8]) {
        self.changed = true;
        if name.starts_with(':') {
            return self.set_pseudo(name, value, true);
        }
        if let Some(n) = self.name(name) {
            self.store(HeaderOp::Replace, n, value, None);
        }
    }

    fn add(&mut self, name: &str, value: &[u8]) {
        self.changed = true;
        if name.starts_with(':') {
            return self.set_pseudo(name, value, false);
        }
        if self.headers.len() >= MAX_HEADERS {
            self.overflow += 1;
            return;
        }
        if let Some(n) = self.name(name) {
            self.store(HeaderOp::Add, n, value, None);
        }
    }

    fn store_parsed(
        &mut self,
        op: HeaderOp,
        name: HeaderName,
        value: &[u8],
        values: &mut ValueMemo,
    ) {
        self.store(op, name, value, Some(values));
    }

    fn remove(&mut self, name: &str) {
        self.changed = true;
        if name.starts_with(':') {
            self.pseudo_changed |= pseudo_bit(name);
            self.pseudo.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        } else {
            self.framing_changed |= name
                .eq_ignore_ascii_case(http::header::CONTENT_LENGTH.as_str())
                || name.eq_ignore_ascii_case(http::header::TRANSFER_ENCODING.as_str());
            self.headers.remove(name);
        }
    }

    fn set_all(&mut self, pairs: Pairs) {
        self.framing_changed = true;
        let given = |n: &str| pairs.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
        let kept: PseudoList = std::mem::take(&mut self.pseudo)
            .into_iter()
            .filter(|(k, _)| !given(k))
            .collect();
        self.pseudo = kept;
        self.headers.clear();
        for (k, v) in &pairs {
            self.add(k, v);
        }
        self.changed = true;
    }
}

impl HeaderList for Pairs {
    fn value(&self, name: &str) -> Option<Value> {
        self.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| Value::Bytes(Bytes::copy_from_slice(v)))
    }

    fn count(&self) -> usize {
        self.len()
    }

    fn encode_into(&self, out: &mut [u8]) -> usize {
        map::encode_into(out, || self.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    }

    fn encoded_len(&self) -> usize {
        map::encoded_len(self.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    }

    fn replace(&mut self, name: &str, value: &[u8]) {
        match self.iter().position(|(k, _)| k.eq_ignore_ascii_case(name)) {
            Some(i) => {
                self[i].1 = value.to_vec();
                let mut seen = false;
                self.retain(|(k, _)| {
                    !k.eq_ignore_ascii_case(name) || !std::mem::replace(&mut seen, true)
                });
            }
            None => self.push((name.to_ascii_lowercase(), value.to_vec())),
        }
    }

    fn add(&mut self, name: &str, value: &[u8]) {
        self.push((name.to_ascii_lowercase(), value.to_vec()));
    }

    fn remove(&mut self, name: &str) {
        self.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    fn set_all(&mut self, pairs: Pairs) {
        let given = |n: &str| pairs.iter().any(|(k, _)| k == n);
        let mut merged: Pairs = self
            .iter()
            .filter(|(k, _)| k.starts_with(':') && !given(k))
            .cloned()
            .collect();
        merged.extend(pairs.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)));
        *self = merged;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_carved_from_one_buffer_reused_once_free() {
        // A thread of its own: the buffer is per thread, and other tests carve too.
        std::thread::spawn(|| {
            let a = carve(b"user-1");
            let b = carve(b"trace-2");
            assert_eq!((&a[..], &b[..]), (&b"user-1"[..], &b"trace-2"[..]));
            // Side by side in one buffer: no allocation of their own.
            assert_eq!(b.as_ptr() as usize, a.as_ptr() as usize + a.len());
            let start = a.as_ptr() as usize;
            drop((a, b));
            // Fill the buffer; with no earlier value alive it is reused from its start.
            let mut last = carve(&[b'x'; CARVED_VALUE]);
            while last.as_ptr() as usize + 2 * CARVED_VALUE <= start + VALUES_CHUNK {
                last = carve(&[b'x'; CARVED_VALUE]);
            }
            drop(last);
            let again = carve(&[b'y'; CARVED_VALUE]);
            assert_eq!(
                again.as_ptr() as usize,
                start,
                "the free buffer was not reused"
            );
            // A value still alive keeps its bytes when the buffer moves on.
            let kept = carve(b"kept");
            let in_first =
                |v: &Bytes| (start..start + VALUES_CHUNK).contains(&(v.as_ptr() as usize));
            while in_first(&carve(&[b'z'; CARVED_VALUE])) {}
            assert_eq!(&kept[..], b"kept");
            drop(again);
            // Long values and empty ones are not carved.
            assert_eq!(carve(&[b'l'; CARVED_VALUE + 1]).len(), CARVED_VALUE + 1);
            assert!(carve(b"").is_empty());
        })
        .join()
        .unwrap();
    }

    fn request() -> Head {
        let req = http::Request::builder()
            .method("POST")
            .uri("/a?b=c")
            .header("host", "example.com")
            .header("x-one", "1")
            .header("x-two", "2")
            .header("x-two", "3")
            .body(())
            .unwrap();
        Head::request(&mut req.into_parts().0, "http")
    }

    #[test]
    fn every_status_code_is_lent_as_its_digits() {
        for code in 100..=999u16 {
            let status = http::StatusCode::from_u16(code).unwrap();
            let head = Head::response(status, HeaderMap::new());
            let value = head.value(":status").unwrap();
            assert_eq!(value.as_ref(), code.to_string().as_bytes());
        }
    }

    #[test]
    fn a_request_head_lists_pseudo_headers_first_then_the_map() {
        let h = request();
        let pairs: Vec<_> = h
            .iter()
            .map(|(k, v)| (k, std::str::from_utf8(v).unwrap()))
            .collect();
        assert_eq!(
            pairs,
            [
                (":method", "POST"),
                (":path", "/a?b=c"),
                (":authority", "example.com"),
                (":scheme", "http"),
                ("x-one", "1"),
                ("x-two", "2"),
                ("x-two", "3"),
            ]
        );
        // `Host` is the `:authority` above, not a pair of its own (as in Envoy); asked by
        // name it still answers.
        assert_eq!(h.count(), 7);
        assert_eq!(h.get("host"), Some(&b"example.com"[..]));
        assert_eq!(h.encoded_len(), h.encode().len());
        assert_eq!(map::decode(&h.encode()).unwrap().len(), 7);
        assert!(!h.changed());
    }

    #[test]
    fn changes_follow_proxy_wasm_semantics() {
        let mut h = request();
        assert_eq!(h.value("X-Two").unwrap().as_ref(), b"2");
        h.replace("X-Two", b"9");
        assert_eq!(h.get_all("x-two").collect::<Vec<_>>(), [b"9"]);
        h.add("x-new", b"a");
        h.add("x-new", b"b");
        assert_eq!(h.get_all("x-new").count(), 2);
        h.remove("x-one");
        assert_eq!(h.get("x-one"), None);
        h.replace(":path", b"/new");
        assert_eq!(h.pseudo(":path"), Some(&b"/new"[..]));
        assert!(h.changed());
        assert_eq!(h.error(), None);
    }

    #[test]
    fn set_all_keeps_pseudo_headers_it_does_not_name() {
        let mut h = request();
        h.set_all(vec![
            ("X-Only".into(), b"1".to_vec()),
            (":path".into(), b"/p".to_vec()),
        ]);
        assert_eq!(h.pseudo(":method"), Some(&b"POST"[..]));
        assert_eq!(h.pseudo(":path"), Some(&b"/p"[..]));
        assert_eq!(h.headers().len(), 1);
        assert_eq!(h.get("x-only"), Some(&b"1"[..]));
    }

    #[test]
    fn only_the_pseudo_headers_a_plugin_touched_count_as_changed() {
        let mut h = request();
        h.replace("host", b"other.example");
        h.add("x-new", b"1");
        assert!(h.changed());
        for name in [":method", ":path", ":authority", ":scheme", ":status"] {
            assert!(!h.pseudo_changed(name), "{name}");
        }
        // Lent from the request, read as they were received.
        assert_eq!(h.pseudo(":path"), Some(&b"/a?b=c"[..]));
        assert_eq!(h.pseudo(":authority"), Some(&b"example.com"[..]));
        h.replace(":PATH", b"/b");
        HeaderList::remove(&mut h, ":authority");
        assert!(h.pseudo_changed(":path") && h.pseudo_changed(":authority"));
        assert!(!h.pseudo_changed(":method"));
        let mut h = request();
        h.set_all(vec![(":method".into(), b"PUT".to_vec())]);
        assert!(h.pseudo_changed(":method") && !h.pseudo_changed(":path"));
    }

    #[test]
    fn values_of_every_length_are_kept_as_given() {
        let mut h = request();
        let cases = [
            ("x-empty", Vec::new()),
            ("x-short", b"abc".to_vec()),
            ("x-62", vec![b'a'; 62]),
            ("x-63", vec![b'b'; 63]),
            ("x-long", vec![b'c'; 300]),
        ];
        for (name, value) in &cases {
            h.replace(name, value);
        }
        // The map sent on holds the same values (shared, not copied).
        let sent = h.headers().clone();
        for (name, value) in &cases {
            assert_eq!(h.get(name), Some(&value[..]), "{name}");
            assert_eq!(sent.get(*name).unwrap().as_bytes(), &value[..], "{name}");
        }
        assert_eq!(h.error(), None);
        h.replace("x-bad", b"a\nb");
        assert!(h.error().is_some());
    }

    #[test]
    fn what_the_map_cannot_hold_is_recorded_not_lost_silently() {
        let mut h = request();
        h.add("bad name", b"x");
        h.add("x-ok", b"bad\nvalue");
        let e = h.error().unwrap();
        assert!(e.starts_with("invalid header name \"bad name\""), "{e}");
        assert!(e.ends_with("(and 1 more refused)"), "{e}");
        // Distinct names and values of one name alike.
        for name in [None, Some("x-same")] {
            let mut full = request();
            for i in 0..40_000 {
                full.add(name.unwrap_or(&format!("x-{i}")), b"v");
            }
            let e = full.error().unwrap();
            assert_eq!(e, "40004 headers, more than a header map can hold");
            assert!(full.headers().len() <= MAX_HEADERS);
        }
    }

    #[test]
    fn the_name_memo_answers_only_exact_bytes_and_keeps_the_latest() {
        let mut memo = NameMemo::default();
        for i in 0..NameMemo::SIZE + 1 {
            memo.remember(header_name(&format!("x-n{i}")).unwrap());
        }
        // The oldest made room for the newest.
        assert!(memo.find(b"x-n0").is_none());
        assert_eq!(memo.find(b"x-n8").unwrap().as_str(), "x-n8");
        assert_eq!(memo.find(b"x-n1").unwrap().as_str(), "x-n1");
        // Only the exact (lower-case) bytes: anything else is parsed as text.
        assert!(memo.find(b"X-N1").is_none());
        assert!(memo.find(b"x-n").is_none());
        // A parsed name stores what the text would.
        let (mut a, mut b) = (request(), request());
        let mut values = ValueMemo::default();
        a.replace("x-n1", b"1");
        a.add("x-n1", b"2");
        let n1 = memo.find(b"x-n1").unwrap().clone();
        b.store_parsed(HeaderOp::Replace, n1.clone(), b"1", &mut values);
        b.store_parsed(HeaderOp::Add, n1, b"2", &mut values);
        assert_eq!(a.headers(), b.headers());
        assert!(b.changed());
        let n2 = memo.find(b"x-n2").unwrap().clone();
        b.store_parsed(HeaderOp::Add, n2, b"bad\nvalue", &mut values);
        assert_eq!(b.error().unwrap(), "invalid value for header \"x-n2\"");
    }

    #[test]
    fn a_value_set_again_is_shared_from_the_memo_and_a_bad_one_still_refused() {
        let name = header_name("x-v").unwrap();
        let mut values = ValueMemo::default();
        let (mut a, mut b) = (request(), request());
        a.store_parsed(HeaderOp::Replace, name.clone(), b"wasm", &mut values);
        b.store_parsed(HeaderOp::Replace, name.clone(), b"wasm", &mut values);
        // The second request got the first one's value, not a copy.
        let (va, vb) = (&a.headers()["x-v"], &b.headers()["x-v"]);
        assert_eq!(vb.as_bytes(), b"wasm");
        assert_eq!(va.as_bytes().as_ptr(), vb.as_bytes().as_ptr());
        // Other bytes are made afresh; a bad value is never remembered, always refused.
        b.store_parsed(HeaderOp::Add, name.clone(), b"wasm2", &mut values);
        assert_eq!(b.headers().get_all("x-v").iter().count(), 2);
        for _ in 0..2 {
            let mut c = request();
            c.store_parsed(HeaderOp::Replace, name.clone(), b"bad\r\n", &mut values);
            assert_eq!(c.error().unwrap(), "invalid value for header \"x-v\"");
            assert!(c.headers().get("x-v").is_none());
        }
        // Only short values are kept: a long one is made each time.
        let long = vec![b'a'; INLINE_VALUE + 1];
        a.store_parsed(HeaderOp::Replace, name.clone(), &long, &mut values);
        assert!(values.find(&long).is_none());
        assert_eq!(a.headers()["x-v"].as_bytes(), &long[..]);
        // The memo is bounded: the oldest value makes room.
        for i in 0..ValueMemo::SIZE {
            a.store_parsed(
                HeaderOp::Replace,
                name.clone(),
                format!("v{i}").as_bytes(),
                &mut values,
            );
        }
        assert!(values.find(b"wasm").is_none());
        assert!(values.find(b"v7").is_some());
    }

    #[test]
    fn pair_lists_match_names_case_insensitively() {
        let mut p: Pairs = vec![("a".into(), b"1".to_vec()), ("a".into(), b"2".to_vec())];
        p.replace("A", b"3");
        assert_eq!(p, vec![("a".to_string(), b"3".to_vec())]);
        p.add("B", b"4");
        assert_eq!(p.value("b").unwrap().as_ref(), b"4");
        HeaderList::remove(&mut p, "b");
        assert_eq!(p.count(), 1);
    }
}
