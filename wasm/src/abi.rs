//! The Proxy-Wasm ABI host functions (module `env`), plus WASI preview1 under both of its
//! module names (wasmtime-wasi's, with the functions that would block replaced: `wasi`).
//! Every guest pointer and length is checked against guest memory; a bad one is answered
//! with `InvalidMemoryAccess` (as proxy-wasm-cpp-host), never trusted.

use crate::head::{HeaderList, HeaderOp, NameMemo, ValueMemo};
use crate::props::Found;
use crate::state::{CallResponse, Foreign, HostState, LocalReply, Status, Stream};
use http::HeaderName;
use wasmgate_abi::{map, splice};
use wasmtime::{Caller, FuncType, Linker, Memory, Val, ValType};

type C<'a> = Caller<'a, HostState>;
type R = wasmtime::Result<i32>;

/// Largest single read from guest memory (a header set, a body, a local reply).
const MAX_READ: usize = wasmgate_abi::MAX_BUFFER;
/// The largest buffer an instance keeps for the shared-data values it reads.
const SHARED_VALUE_KEPT: usize = 64 << 10;
/// A property path up to this long is read without a heap buffer.
const PATH_ON_STACK: usize = 256;
/// More segments than any property has: such a path is not found.
const MAX_PATH_SEGMENTS: usize = 16;
/// Log lines a VM may write per second before the rest are dropped.
const LOG_PER_SECOND: u32 = 200;

fn ok(s: Status) -> R {
    Ok(s as i32)
}

/// The plugin's memory: the one looked up at instantiation, or, during it (a module's
/// `start` function runs before), the calling instance's export.
pub(crate) fn memory(c: &mut C<'_>) -> Option<Memory> {
    match c.data().memory {
        Some(m) => Some(m),
        None => c
            .get_export("memory")
            .and_then(wasmtime::Extern::into_memory),
    }
}

/// Copies `len` bytes at `ptr` out of guest memory.
fn read(c: &mut C<'_>, ptr: i32, len: i32) -> Result<Vec<u8>, Status> {
    let m = memory(c).ok_or(BAD_MEMORY)?;
    let (p, l) = (ptr as u32 as usize, len as u32 as usize);
    if l > MAX_READ {
        return Err(Status::BadArgument);
    }
    let end = p.checked_add(l).ok_or(BAD_MEMORY)?;
    m.data(&c).get(p..end).map(<[u8]>::to_vec).ok_or(BAD_MEMORY)
}

/// A pointer or length outside the guest's memory.
const BAD_MEMORY: Status = Status::InvalidMemoryAccess;

fn read_str(c: &mut C<'_>, ptr: i32, len: i32) -> Result<String, Status> {
    String::from_utf8(read(c, ptr, len)?).map_err(|_| Status::BadArgument)
}

pub(crate) fn write(c: &mut C<'_>, ptr: i32, bytes: &[u8]) -> Result<(), Status> {
    let m = memory(c).ok_or(BAD_MEMORY)?;
    let p = ptr as u32 as usize;
    let end = p.checked_add(bytes.len()).ok_or(BAD_MEMORY)?;
    m.data_mut(c)
        .get_mut(p..end)
        .ok_or(BAD_MEMORY)?
        .copy_from_slice(bytes);
    Ok(())
}

/// `data` handed to the guest ([`answer_with`]).
fn answer(c: &mut C<'_>, data: &[u8], ret_ptr: i32, ret_len: i32) -> R {
    answer_with(c, data.len(), ret_ptr, ret_len, |dst, _| {
        dst.copy_from_slice(data);
        Ok(())
    })
}

/// Hands the guest `len` bytes and returns the call's status: allocates with its `malloc` (or
/// `proxy_on_memory_allocate`), lets `fill` write straight into that allocation (with the host
/// state at hand, so an answer built from host data needs no buffer of the host's), and writes
/// pointer and size to the out-pointers. A trap in the allocator propagates.
fn answer_with(
    c: &mut C<'_>,
    len: usize,
    ret_ptr: i32,
    ret_len: i32,
    fill: impl FnOnce(&mut [u8], &mut HostState) -> Result<(), Status>,
) -> R {
    if len == 0 {
        // Nothing to hand over: no allocation, a null pointer (as proxy-wasm-cpp-host, whose
        // SDKs read it as "no value").
        let given = write(c, ret_ptr, &0u32.to_le_bytes())
            .and_then(|_| write(c, ret_len, &0u32.to_le_bytes()));
        return ok(given.err().unwrap_or(Status::Ok));
    }
    // Taken out for the call and put back, not cloned: a `TypedFunc` clone registers its
    // type again. (An allocator that called back into a host function that allocates would
    // find none and get `InternalFailure`, not a loop.)
    let Some(alloc) = c.data_mut().alloc.take() else {
        return ok(Status::InternalFailure);
    };
    let r = alloc.call(&mut *c, len as i32);
    c.data_mut().alloc = Some(alloc);
    let p = r?;
    if p == 0 {
        return ok(Status::InternalFailure);
    }
    let Some(m) = memory(c) else {
        return ok(BAD_MEMORY);
    };
    let (mem, state) = m.data_and_store_mut(&mut *c);
    let start = p as u32 as usize;
    let Some(dst) = start
        .checked_add(len)
        .and_then(|end| mem.get_mut(start..end))
    else {
        return ok(BAD_MEMORY);
    };
    let given = fill(dst, state)
        .and_then(|_| write(c, ret_ptr, &(p as u32).to_le_bytes()))
        .and_then(|_| write(c, ret_len, &(len as u32).to_le_bytes()));
    ok(given.err().unwrap_or(Status::Ok))
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(s) => return ok(s),
        }
    };
}

/// Registers every host function on `linker`.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    logging(linker)?;
    buffers(linker)?;
    headers(linker)?;
    properties(linker)?;
    stream_control(linker)?;
    shared(linker)?;
    not_yet(linker)?;
    wasmtime_wasi::p1::add_to_linker_sync(linker, |s: &mut HostState| &mut s.wasi)?;
    crate::wasi::shadow(linker)?;
    linker.alias_module("wasi_snapshot_preview1", "wasi_unstable")?;
    crate::wasi::shadow_unstable(linker)?;
    Ok(())
}

/// A plugin's log message as one error-log line: control characters escaped (`\n`, `\r`,
/// `\xNN`), so that a message can neither forge lines of its own nor make one call count as
/// several lines against the log budget (a Rust panic message spans two).
fn one_line(msg: &str) -> std::borrow::Cow<'_, str> {
    if !msg.chars().any(|c| c != '\t' && escaped(c)) {
        return std::borrow::Cow::Borrowed(msg);
    }
    let mut out = String::with_capacity(msg.len() + 8);
    for c in msg.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push('\t'),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if escaped(c) => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// One line of plugin `name` in the error log at Proxy-Wasm `level`, under the plugin's log
/// rate limit (`gate`): what `proxy_log` and the plugin's stdout and stderr come to.
pub(crate) fn log_line(name: &str, gate: &crate::rate::LogGate, level: i32, text: &[u8]) {
    // The budget first: a line over it costs no conversion.
    let pass = gate.pass(LOG_PER_SECOND);
    if pass == crate::rate::Pass::No {
        return;
    }
    let text = String::from_utf8_lossy(text);
    let msg = one_line(&text);
    if let crate::rate::Pass::Yes { dropped } = pass {
        if dropped > 0 {
            tracing::warn!("{name}: {dropped} log lines dropped (over {LOG_PER_SECOND}/s)");
        }
    }
    match level {
        0 | 1 => tracing::debug!("{name}: {msg}"),
        2 => tracing::info!("{name}: {msg}"),
        3 => tracing::warn!("{name}: {msg}"),
        _ => tracing::error!("{name}: {msg}"),
    }
    if pass == crate::rate::Pass::Last {
        tracing::warn!(
            "{name}: more than {LOG_PER_SECOND} log lines this second; dropping the rest"
        );
    }
}

/// Characters a log line shows escaped: control characters, and the separators and
/// direction overrides that would make a viewer show one line as two, or out of order.
fn escaped(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Resumes the current callback's stream (`bits`: 1 the request, 2 the response), or the
/// stream of the context the plugin made effective.
fn resume(d: &mut HostState, bits: u8) {
    match d.foreign_target() {
        Some(t) => d.foreign.push((t, Foreign::Resume(bits))),
        None => d.resumed |= bits,
    }
}

fn logging(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_log",
        |mut c: C<'_>, level: i32, ptr: i32, len: i32| -> R {
            let msg = tri!(read(&mut c, ptr, len));
            let s = c.data();
            log_line(&s.plugin_name, &s.log_gate, level, &msg);
            ok(Status::Ok)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: C<'_>, ret: i32| -> R {
            let level = c.data().log_level;
            tri!(write(&mut c, ret, &level.to_le_bytes()));
            ok(Status::Ok)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: i32| -> R {
            let ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            tri!(write(&mut c, ret, &ns.to_le_bytes()));
            ok(Status::Ok)
        },
    )?;
    Ok(())
}

/// The bytes a `buffer_type` names, for reading.
fn buffer_of(s: &HostState, kind: i32) -> Option<&[u8]> {
    match kind {
        0 => s.stream.as_ref().map(|st| st.request_body.as_slice()),
        1 => s.stream.as_ref().map(|st| st.response_body.as_slice()),
        4 => s.call_response.as_ref().map(|r| r.body.as_slice()),
        6 => Some(&s.vm_config),
        7 => Some(&s.plugin_config),
        _ => None,
    }
}

/// The ABI's buffer types run from 0 (request body) to 8 (foreign call data): another
/// number is a BadArgument, a known one the host does not hold is NotFound.
fn missing_buffer(kind: i32) -> Status {
    match kind {
        0..=8 => Status::NotFound,
        _ => Status::BadArgument,
    }
}

fn buffers(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut c: C<'_>, kind: i32, ret_len: i32, ret_flags: i32| -> R {
            let Some(len) = buffer_of(c.data(), kind).map(<[u8]>::len) else {
                return ok(missing_buffer(kind));
            };
            tri!(write(&mut c, ret_len, &(len as u32).to_le_bytes()));
            tri!(write(&mut c, ret_flags, &0u32.to_le_bytes()));
            ok(Status::Ok)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, max: i32, ret_ptr: i32, ret_len: i32| -> R {
            let Some(data) = buffer_of(c.data(), kind) else {
                return ok(missing_buffer(kind));
            };
            let start = (start as u32 as usize).min(data.len());
            let end = start.saturating_add(max as u32 as usize).min(data.len());
            // Nothing in range: Ok with a null pointer and no bytes, as cpp-host.
            // Copied straight into the plugin's allocation. Its allocator is plugin code: the
            // buffer is looked up again after it ran, and checked.
            answer_with(&mut c, end - start, ret_ptr, ret_len, |dst, state| {
                let src = buffer_of(state, kind).and_then(|d| d.get(start..end));
                dst.copy_from_slice(src.ok_or(Status::NotFound)?);
                Ok(())
            })
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, size: i32, ptr: i32, len: i32| -> R {
            let data = tri!(read(&mut c, ptr, len));
            let Some(stream) = c.data_mut().stream.as_mut() else {
                return ok(Status::NotFound);
            };
            let buf = match kind {
                0 => stream.request_body.to_mut(),
                1 => stream.response_body.to_mut(),
                _ => return ok(missing_buffer(kind)),
            };
            ok(splice(
                buf,
                start as u32 as usize,
                size as u32 as usize,
                &data,
            ))
        },
    )?;
    Ok(())
}

/// The header list a `map_type` names, during an HTTP callback or a call-out's answer.
fn map_of(s: &mut HostState, map_type: i32) -> Result<&mut dyn HeaderList, Status> {
    map_in(&mut s.stream, &mut s.call_response, map_type)
}

/// [`map_of`] from the two fields that hold header lists, so that a caller may borrow other
/// fields of the state alongside.
fn map_in<'a>(
    stream: &'a mut Option<Box<Stream>>,
    call_response: &'a mut Option<CallResponse>,
    map_type: i32,
) -> Result<&'a mut dyn HeaderList, Status> {
    if let 6 | 7 = map_type {
        let r = call_response.as_mut().ok_or(Status::NotFound)?;
        return Ok(if map_type == 6 {
            &mut r.headers
        } else {
            &mut r.trailers
        });
    }
    // Map types run from 0 (request headers) to 7 (a call-out's answer trailers).
    if !(0..=7).contains(&map_type) {
        return Err(Status::BadArgument);
    }
    let stream = stream.as_mut().ok_or(Status::NotFound)?;
    match map_type {
        0 => Ok(&mut stream.request),
        2 => Ok(stream.response_mut().ok_or(Status::NotFound)?),
        1 => Ok(&mut stream.request_trailers),
        3 => Ok(&mut stream.response_trailers),
        _ => Err(Status::NotFound),
    }
}

/// `len` bytes at `ptr` of guest memory, in place.
fn slice(mem: &[u8], ptr: i32, len: i32) -> Result<&[u8], Status> {
    let (p, l) = (ptr as u32 as usize, len as u32 as usize);
    if l > MAX_READ {
        return Err(Status::BadArgument);
    }
    mem.get(p..p.checked_add(l).ok_or(BAD_MEMORY)?)
        .ok_or(BAD_MEMORY)
}

/// A header name a plugin passed: parsed — from the instance's memo when it passed the same
/// bytes lately, the usual case — or text when it is not a header name (a pseudo-header, or an
/// invalid name, which a list refuses and records, or never holds).
enum Name<'a> {
    Parsed(HeaderName),
    Text(&'a str),
}

impl Name<'_> {
    fn as_str(&self) -> &str {
        match self {
            Name::Parsed(n) => n.as_str(),
            Name::Text(t) => t,
        }
    }
}

/// The name at `raw`: the memo's lookup is inlined into each host call, the parse is not.
#[inline(always)]
fn name_of<'a>(names: &mut NameMemo, raw: &'a [u8]) -> Result<Name<'a>, Status> {
    match names.find(raw) {
        Some(n) => Ok(Name::Parsed(n.clone())),
        None => parse_name(names, raw),
    }
}

fn parse_name<'a>(names: &mut NameMemo, raw: &'a [u8]) -> Result<Name<'a>, Status> {
    let key = std::str::from_utf8(raw).map_err(|_| Status::BadArgument)?;
    let parsed = match key.starts_with(':') {
        true => None,
        false => crate::head::header_name(key),
    };
    Ok(match parsed {
        Some(n) => {
            // The memo finds exact bytes only: a name given in capitals is parsed each time
            // rather than filling the memo with copies of its lower-case form.
            if n.as_str().as_bytes() == raw {
                names.remember(n.clone());
            }
            Name::Parsed(n)
        }
        None => Name::Text(key),
    })
}

/// Runs `f` on the header list `map_type` names, with the name and the value read in place
/// from guest memory (no copy of either on the way) and the instance's memo of values.
fn with_entry<T>(
    c: &mut C<'_>,
    map_type: i32,
    (kp, kl): (i32, i32),
    (vp, vl): (i32, i32),
    f: impl FnOnce(&mut dyn HeaderList, Name<'_>, &[u8], &mut ValueMemo) -> T,
) -> Result<T, Status> {
    let m = memory(c).ok_or(BAD_MEMORY)?;
    let (mem, state) = m.data_and_store_mut(c);
    let raw = slice(mem, kp, kl)?;
    let value = slice(mem, vp, vl)?;
    let name = name_of(&mut state.names, raw)?;
    let list = map_in(&mut state.stream, &mut state.call_response, map_type)?;
    Ok(f(list, name, value, &mut state.values))
}

/// Stores a header in the list `map_type` names: a parsed name goes in parsed, and a value
/// the plugin set lately comes from the instance's memo of values, shared (setting a constant
/// header allocates nothing).
fn store_header(
    c: &mut C<'_>,
    map_type: i32,
    name: (i32, i32),
    value: (i32, i32),
    how: HeaderOp,
) -> Result<(), Status> {
    with_entry(
        c,
        map_type,
        name,
        value,
        |list, name, value, values| match name {
            Name::Parsed(n) => list.store_parsed(how, n, value, values),
            Name::Text(key) => match how {
                HeaderOp::Replace => list.replace(key, value),
                HeaderOp::Add => list.add(key, value),
            },
        },
    )
}

fn headers(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, t: i32, ret_ptr: i32, ret_len: i32| -> R {
            // Encoded straight into the plugin's allocation: no buffer of the host's. A map
            // this callback has none of is an empty one (Envoy's answer), and so is a map
            // without entries: no bytes, a null pointer.
            let len = match map_of(c.data_mut(), t) {
                Ok(m) if m.count() > 0 => m.encoded_len(),
                Ok(_) | Err(Status::NotFound) => 0,
                Err(s) => return ok(s),
            };
            answer_with(&mut c, len, ret_ptr, ret_len, |dst, state| {
                match map_of(state, t)?.encode_into(dst) == len {
                    true => Ok(()),
                    false => Err(Status::InternalFailure),
                }
            })
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, t: i32, ptr: i32, len: i32| -> R {
            let bytes = tri!(read(&mut c, ptr, len));
            let Ok(new) = map::decode(&bytes) else {
                return ok(Status::BadArgument);
            };
            tri!(map_of(c.data_mut(), t)).set_all(new);
            ok(Status::Ok)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut c: C<'_>, t: i32, ret: i32| -> R {
            let size = tri!(map_of(c.data_mut(), t)).byte_size() as u32;
            tri!(write(&mut c, ret, &size.to_le_bytes()));
            ok(Status::Ok)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>, t: i32, kp: i32, kl: i32, ret_ptr: i32, ret_len: i32| -> R {
            let found = tri!(with_entry(
                &mut c,
                t,
                (kp, kl),
                (0, 0),
                |h, n, _, _| match n {
                    Name::Parsed(n) => h.value_parsed(&n),
                    Name::Text(k) => h.value(k),
                }
            ));
            let Some(v) = found else {
                return ok(Status::NotFound);
            };
            answer(&mut c, v.as_ref(), ret_ptr, ret_len)
        },
    )?;
    for (name, how) in [
        ("proxy_replace_header_map_value", HeaderOp::Replace),
        ("proxy_add_header_map_value", HeaderOp::Add),
    ] {
        l.func_wrap(
            "env",
            name,
            move |mut c: C<'_>, t: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> R {
                tri!(store_header(&mut c, t, (kp, kl), (vp, vl), how));
                ok(Status::Ok)
            },
        )?;
    }
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, t: i32, kp: i32, kl: i32| -> R {
            tri!(with_entry(&mut c, t, (kp, kl), (0, 0), |h, n, _, _| h
                .remove(n.as_str())));
            ok(Status::Ok)
        },
    )?;
    Ok(())
}

fn properties(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, pp: i32, pl: i32, ret_ptr: i32, ret_len: i32| -> R {
            // The path is copied to the stack (it is short), so the answer can be written
            // into guest memory while the path is still at hand.
            let mut stack = [0u8; PATH_ON_STACK];
            let heap: Vec<u8>;
            let raw: &[u8] = if pl as u32 as usize <= PATH_ON_STACK {
                let m = tri!(memory(&mut c).ok_or(BAD_MEMORY));
                let src = tri!(slice(m.data(&c), pp, pl));
                stack[..src.len()].copy_from_slice(src);
                &stack[..src.len()]
            } else {
                heap = tri!(read(&mut c, pp, pl));
                &heap
            };
            let mut segments = [""; MAX_PATH_SEGMENTS];
            let mut n = 0;
            for s in raw.split(|b| *b == 0).filter(|s| !s.is_empty()) {
                let Ok(s) = std::str::from_utf8(s) else {
                    continue;
                };
                if n == MAX_PATH_SEGMENTS {
                    return ok(Status::NotFound);
                }
                segments[n] = s;
                n += 1;
            }
            let path = &segments[..n];
            if path.first() == Some(&"response") {
                // The fields the proxy wrote with the answer's head read as sent.
                if let Some(stream) = c.data_mut().stream.as_mut() {
                    stream.response_mut();
                }
            }
            let len = match crate::props::lookup(c.data(), path) {
                None => return ok(Status::NotFound),
                Some(Found::Owned(v)) => return answer(&mut c, &v, ret_ptr, ret_len),
                Some(Found::Borrowed(v)) => v.len(),
            };
            // Looked up again once the plugin's allocator has run (it may call the host).
            answer_with(
                &mut c,
                len,
                ret_ptr,
                ret_len,
                |dst, state| match crate::props::lookup(state, path) {
                    Some(v) if v.as_bytes().len() == len => {
                        dst.copy_from_slice(v.as_bytes());
                        Ok(())
                    }
                    _ => Err(Status::InternalFailure),
                },
            )
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, pp: i32, pl: i32, vp: i32, vl: i32| -> R {
            let path = tri!(read(&mut c, pp, pl));
            let value = tri!(read(&mut c, vp, vl));
            let key = String::from_utf8_lossy(&path)
                .trim_end_matches('\0')
                .replace('\0', ".");
            let Some(stream) = c.data_mut().stream.as_mut() else {
                return ok(Status::NotFound);
            };
            stream.set_props.retain(|(k, _)| *k != key);
            stream.set_props.push((key, value));
            ok(Status::Ok)
        },
    )?;
    Ok(())
}

fn stream_control(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         status: i32,
         dp: i32,
         dl: i32,
         bp: i32,
         bl: i32,
         hp: i32,
         hl: i32,
         _grpc: i32|
         -> R {
            // A final status: an informational one (1xx) would leave the client waiting for
            // the answer after it, and a 101 would switch nothing.
            if !(200..=599).contains(&status) {
                return ok(Status::BadArgument);
            }
            let details = String::from_utf8_lossy(&tri!(read(&mut c, dp, dl))).to_string();
            let body = tri!(read(&mut c, bp, bl));
            let Ok(headers) = map::decode(&tri!(read(&mut c, hp, hl))) else {
                return ok(Status::BadArgument);
            };
            let d = c.data_mut();
            let reply = LocalReply {
                status: status as u16,
                headers,
                body,
                details,
            };
            if let Some(t) = d.foreign_target() {
                d.foreign.push((t, Foreign::Reply(reply)));
                return ok(Status::Ok);
            }
            // A reset is final: the stream is gone, there is nothing left to answer.
            if !d.local_reply.as_ref().is_some_and(LocalReply::is_reset) {
                d.local_reply = Some(reply);
            }
            ok(Status::Ok)
        },
    )?;
    // Resuming applies to the request (0) or the response (1) of the stream whose callback is
    // running (or whose http_call answered), each on its own, as Envoy continues decoding or
    // encoding. The connection types are a network filter's: Ok with nothing to do for
    // downstream, Unimplemented for upstream, as Envoy answers an HTTP filter.
    l.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: C<'_>, t: i32| -> R {
            tri!(stream_type(t));
            match t {
                0 | 1 => resume(c.data_mut(), 1 << t),
                3 => return ok(Status::Unimplemented),
                _ => {}
            }
            ok(Status::Ok)
        },
    )?;
    for (name, bit) in [
        ("proxy_continue_request", 1),
        ("proxy_continue_response", 2),
    ] {
        l.func_wrap("env", name, move |mut c: C<'_>| -> R {
            resume(c.data_mut(), bit);
            ok(Status::Ok)
        })?;
    }
    // The request or response stream: reset, as Envoy resets the HTTP stream (no answer, or
    // the answer cut where it is). The connection types (downstream, upstream) are a network
    // filter's, which an HTTP plugin is not: Ok with nothing done, as Envoy answers an HTTP
    // filter. Outside a request's callback there is no stream to close.
    l.func_wrap("env", "proxy_close_stream", |mut c: C<'_>, t: i32| -> R {
        tri!(stream_type(t));
        if t > 1 {
            return ok(Status::Ok);
        }
        let d = c.data_mut();
        if let Some(t) = d.foreign_target() {
            d.foreign.push((t, Foreign::Reply(LocalReply::reset())));
        } else if d.stream.is_some() {
            d.local_reply = Some(LocalReply::reset());
        }
        ok(Status::Ok)
    })?;
    // A root context whose `proxy_on_done` returned false says it has finished: deleted after
    // this callback. Any other context is not waited for: NotFound, as proxy-wasm-cpp-host.
    l.func_wrap("env", "proxy_done", |mut c: C<'_>| -> R {
        let d = c.data_mut();
        let id = d.effective_context;
        if !d.pending_done.remove(&id) {
            return ok(Status::NotFound);
        }
        d.done_now.push(id);
        ok(Status::Ok)
    })?;
    l.func_wrap("env", "proxy_clear_route_cache", |_c: C<'_>| -> R {
        ok(Status::Ok)
    })?;
    l.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: C<'_>, id: i32| -> R {
            let d = c.data_mut();
            if !d.live_contexts.contains(&(id as u32)) {
                return ok(Status::BadArgument);
            }
            d.give_back_lent();
            d.effective_context = id as u32;
            // Another request's context: the stream lent to this callback is not its, so it
            // is put aside; the header, body and property calls reach that request's stream
            // when it is paused and left with the VM (`parked`), as in Envoy, and find none
            // (NotFound) otherwise rather than change the wrong request. Set back, the
            // callback's own stream is found again.
            if d.foreign_target().is_some() {
                if d.stream.is_some() {
                    d.hidden_stream = d.stream.take();
                }
                if let Some(s) = d.parked.remove(&(id as u32)) {
                    d.stream = Some(s);
                    d.lent = id as u32;
                }
            } else if d.hidden_stream.is_some() {
                d.stream = d.hidden_stream.take();
            }
            ok(Status::Ok)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, ms: i32| -> R {
            let s = c.data_mut();
            // The root context ticks, whichever context set the period (as Envoy).
            let id = s.root_context;
            s.tick_periods.insert(id, ms as u32);
            s.ticks_changed = true;
            if !s.ticks_restarted.contains(&id) {
                s.ticks_restarted.push(id);
            }
            ok(Status::Ok)
        },
    )?;
    http_call(l)
}

/// The ABI's stream types: request, response, downstream, upstream; another is a
/// BadArgument, as proxy-wasm-cpp-host answers.
fn stream_type(t: i32) -> Result<(), Status> {
    match t {
        0..=3 => Ok(()),
        _ => Err(Status::BadArgument),
    }
}

fn http_call(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C<'_>,
         up: i32,
         up_len: i32,
         hp: i32,
         hl: i32,
         bp: i32,
         bl: i32,
         tp: i32,
         tl: i32,
         timeout_ms: i32,
         ret_token: i32|
         -> R {
            let target = tri!(read_str(&mut c, up, up_len));
            let Ok(headers) = map::decode(&tri!(read(&mut c, hp, hl))) else {
                return ok(Status::BadArgument);
            };
            let body = tri!(read(&mut c, bp, bl));
            let Ok(trailers) = map::decode(&tri!(read(&mut c, tp, tl))) else {
                return ok(Status::BadArgument);
            };
            let has = |n: &str| headers.iter().any(|(k, v)| k == n && !v.is_empty());
            if !(has(":method") && has(":path") && has(":authority")) {
                return ok(Status::BadArgument);
            }
            let s = c.data_mut();
            if !s.targets.knows(&target) {
                return ok(Status::BadArgument);
            }
            // Its room among the plugin's call-outs in flight (Envoy's circuit breaker
            // fails a call over its limit too).
            let size = |p: &map::Pairs| p.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
            let bytes = body.len() + size(&headers) + size(&trailers);
            let slot = match s.call_budget.take(bytes) {
                Ok(slot) => std::sync::Arc::new(slot),
                Err(report) => {
                    if let Some(refused) = report {
                        let (calls, held) = s.call_budget.in_flight();
                        tracing::warn!(
                            "{}: {refused} call-outs refused (the last to {target:?}): {calls} \
                             calls holding {held} bytes are in flight (at most {} calls, and \
                             the plugin's memory_limit in bytes); said at most every 10 s",
                            s.plugin_name,
                            crate::state::MAX_CALLS_IN_FLIGHT
                        );
                    }
                    return ok(Status::InternalFailure);
                }
            };
            let token = s.next_token.wrapping_add(1).max(1);
            // The token first: a call whose token the plugin cannot get is not made.
            tri!(write(&mut c, ret_token, &token.to_le_bytes()));
            let s = c.data_mut();
            s.next_token = token;
            s.calls.push(crate::state::HttpCall {
                token,
                context: s.effective_context,
                root: s.root_context,
                target,
                headers,
                body,
                trailers,
                // 0: no time limit of the call's own (Envoy's rule); the target's connect
                // and read timeouts still bound it.
                timeout: (timeout_ms > 0)
                    .then(|| std::time::Duration::from_millis(timeout_ms as u64)),
                slot,
            });
            ok(Status::Ok)
        },
    )?;
    Ok(())
}

/// Shared data, queues and metrics: gateway-wide, in shared memory (see [`crate::shared`]).
fn shared(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use crate::shared::with;
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>, kp: i32, kl: i32, ret_ptr: i32, ret_len: i32, ret_cas: i32| -> R {
            // The key is read in place and the value copied into the instance's buffer, kept
            // from call to call: a read allocates nothing on the host's side.
            let mut value = std::mem::take(&mut c.data_mut().shared_value);
            let found = match memory(&mut c).ok_or(BAD_MEMORY) {
                Ok(m) => {
                    slice(m.data(&c), kp, kl).and_then(|key| with(|s| s.get_into(key, &mut value)))
                }
                Err(e) => Err(e),
            };
            let r = match found {
                Err(status) => ok(status),
                Ok(None) => ok(Status::NotFound),
                Ok(Some(cas)) => match write(&mut c, ret_cas, &cas.to_le_bytes()) {
                    Err(status) => ok(status),
                    Ok(()) => answer(&mut c, &value, ret_ptr, ret_len),
                },
            };
            // A large value is not kept for the instance's life.
            if value.capacity() <= SHARED_VALUE_KEPT {
                c.data_mut().shared_value = value;
            }
            r
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> R {
            // Key and value are read in place, not copied first.
            let m = tri!(memory(&mut c).ok_or(BAD_MEMORY));
            let data = m.data(&c);
            let key = tri!(slice(data, kp, kl));
            let value = tri!(slice(data, vp, vl));
            tri!(with(|s| s.set(key, value, cas as u32)));
            ok(Status::Ok)
        },
    )?;
    queues(l)?;
    metrics(l)
}

fn queues(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use crate::shared::{shm, with};
    l.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C<'_>, np: i32, nl: i32, ret: i32| -> R {
            let name = tri!(read_str(&mut c, np, nl));
            let token = tri!(with(|s| s.register_queue("", &name)));
            let s = c.data_mut();
            // `proxy_on_queue_ready` goes to the root context (as Envoy).
            let ctx = s.root_context;
            if !s.queue_regs.contains(&(token, ctx)) {
                s.queue_regs.push((token, ctx));
                s.queues_changed = true;
            }
            tri!(write(&mut c, ret, &token.to_le_bytes()));
            ok(Status::Ok)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, _vp: i32, _vl: i32, np: i32, nl: i32, ret: i32| -> R {
            // One vm_id space: the vm_id the plugin names is not part of the key.
            let name = tri!(read_str(&mut c, np, nl));
            let Some(token) = shm().and_then(|s| s.resolve_queue("", &name)) else {
                return ok(Status::NotFound);
            };
            tri!(write(&mut c, ret, &token.to_le_bytes()));
            ok(Status::Ok)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: C<'_>, token: i32, vp: i32, vl: i32| -> R {
            let value = tri!(read(&mut c, vp, vl));
            let dropped = tri!(with(|s| s.enqueue(token as u32, &value)));
            crate::shared::dropped_from_queue(token as u32, dropped);
            ok(Status::Ok)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, token: i32, ret_ptr: i32, ret_len: i32| -> R {
            match tri!(with(|s| s.dequeue(token as u32))) {
                Some(v) => answer(&mut c, &v, ret_ptr, ret_len),
                None => ok(Status::Empty),
            }
        },
    )?;
    Ok(())
}

fn metrics(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use crate::shared::with;
    use wasmgate_shared::plugin_shm::MetricKind;
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, kind: i32, np: i32, nl: i32, ret: i32| -> R {
            let kind = match kind {
                0 => MetricKind::Counter,
                1 => MetricKind::Gauge,
                2 => MetricKind::Histogram,
                _ => return ok(Status::BadArgument),
            };
            let name = tri!(read_str(&mut c, np, nl));
            let id = tri!(with(|s| s.define_metric(kind, &name)));
            tri!(write(&mut c, ret, &id.to_le_bytes()));
            ok(Status::Ok)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |_c: C<'_>, id: i32, delta: i64| -> R {
            tri!(with(|s| s.increment(id as u32, delta)));
            ok(Status::Ok)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_record_metric",
        |_c: C<'_>, id: i32, value: i64| -> R {
            tri!(with(|s| s.record(id as u32, value as u64)));
            ok(Status::Ok)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, ret: i32| -> R {
            let v = tri!(with(|s| s.get_metric(id as u32)));
            tri!(write(&mut c, ret, &(v as u64).to_le_bytes()));
            ok(Status::Ok)
        },
    )?;
    Ok(())
}

/// gRPC call-outs and foreign functions, which wasmgate does not provide: linked so that every
/// SDK's modules load, answering with a failure status each SDK handles without trapping
/// (InternalFailure where the SDKs accept no other error, NotFound elsewhere).
fn not_yet(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use Status::{InternalFailure, NotFound};
    const I: ValType = ValType::I32;
    let stubs: [(&str, &[ValType], Status); 6] = [
        ("proxy_grpc_call", &[I; 12], InternalFailure),
        ("proxy_grpc_stream", &[I; 9], InternalFailure),
        ("proxy_grpc_send", &[I; 4], NotFound),
        ("proxy_grpc_cancel", &[I; 1], NotFound),
        ("proxy_grpc_close", &[I; 1], NotFound),
        ("proxy_call_foreign_function", &[I; 6], NotFound),
    ];
    // The status of the last gRPC call, as Envoy keeps it (code 0 and no message until one
    // answers): always that, with no gRPC calls. Answered Ok, as Envoy answers it: the Rust
    // SDK's `get_grpc_status` panics on any other status.
    l.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: C<'_>, code_ptr: i32, msg_ptr: i32, msg_len: i32| -> R {
            tri!(write(&mut c, code_ptr, &0u32.to_le_bytes()));
            answer(&mut c, &[], msg_ptr, msg_len)
        },
    )?;
    for (name, params, status) in stubs {
        stub(l, "env", name, params, move |_| status as i32)?;
    }
    Ok(())
}

/// Defines `module::name`, taking `params` and answering the i32 `answer` makes of them.
pub(crate) fn stub(
    l: &mut Linker<HostState>,
    module: &str,
    name: &str,
    params: &[ValType],
    answer: impl Fn(&[Val]) -> i32 + Send + Sync + 'static,
) -> wasmtime::Result<()> {
    let ty = FuncType::new(l.engine(), params.iter().cloned(), [ValType::I32]);
    l.func_new(module, name, ty, move |_, args, out| {
        out[0] = Val::I32(answer(args));
        Ok(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn log_messages_stay_on_one_line() {
        assert_eq!(one_line("plain\ttext"), "plain\ttext");
        assert_eq!(
            one_line("panicked at src/lib.rs:9:5:\nboom\r\u{1b}[31m"),
            "panicked at src/lib.rs:9:5:\\nboom\\r\\x1b[31m"
        );
        assert_eq!(one_line("a\u{2028}b\u{202e}c"), "a\\u{2028}b\\u{202e}c");
    }
}
