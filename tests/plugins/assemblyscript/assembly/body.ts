// Proxy-Wasm test plugin written with the AssemblyScript SDK (@solo-io/proxy-runtime 0.1.8)
// that rewrites bodies. Root id "as_body"; the plugin configuration is ignored (any value).
//   request body:     Pause (the host buffers) until end_of_stream; then appends "+as"
//                     (proxy_set_buffer_bytes(HttpRequestBody, start = body length, size 0)).
//   response headers: adds `x-as-body: on`.
//   response body:    Pause until end_of_stream; then replaces the whole body with its ASCII
//                     upper-cased version (proxy_set_buffer_bytes(HttpResponseBody, 0, length)).
// SDK notes: body callbacks get (body_buffer_length, end_of_stream: bool) from the SDK's
// proxy_on_*_body exports; "Pause" is FilterDataStatusValues.StopIterationAndBuffer. The SDK
// reads buffers (runtime.ts get_buffer_bytes) but has no wrapper to write one, and its
// `proxy_set_buffer_status` declaration is bound to the *get* status import, so the
// proxy_set_buffer_bytes import is declared here.
export * from "@solo-io/proxy-runtime/proxy"; // exports proxy_on_* ABI functions + malloc/free
import {
  RootContext, Context, registerRootContext,
  FilterHeadersStatusValues, FilterDataStatusValues, stream_context,
} from "@solo-io/proxy-runtime";
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

// @ts-ignore: decorator
@external("env", "proxy_set_buffer_bytes")
declare function proxy_set_buffer_bytes(typ: u32, start: u32, size: u32, data: usize, data_size: usize): u32;

function set_buffer(typ: BufferTypeValues, start: u32, size: u32, data: ArrayBuffer): void {
  proxy_set_buffer_bytes(typ as u32, start, size, changetype<usize>(data), data.byteLength);
}

class AsBodyRoot extends RootContext {
  // RootContext.onConfigure of 0.1.8 passes the configuration size as an out-pointer (see
  // index.ts); the configuration is not needed, so the host is not asked for it.
  onConfigure(configuration_size: u32): bool {
    return true;
  }

  createContext(context_id: u32): Context {
    return new AsBody(context_id, this);
  }
}

class AsBody extends Context {
  constructor(context_id: u32, root_context: AsBodyRoot) {
    super(context_id, root_context);
  }

  onRequestBody(body_buffer_length: usize, end_of_stream: bool): FilterDataStatusValues {
    if (!end_of_stream) return FilterDataStatusValues.StopIterationAndBuffer;
    set_buffer(BufferTypeValues.HttpRequestBody, body_buffer_length as u32, 0, String.UTF8.encode("+as"));
    return FilterDataStatusValues.Continue;
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.add("x-as-body", "on");
    return FilterHeadersStatusValues.Continue;
  }

  onResponseBody(body_buffer_length: usize, end_of_stream: bool): FilterDataStatusValues {
    if (!end_of_stream) return FilterDataStatusValues.StopIterationAndBuffer;
    if (body_buffer_length == 0) return FilterDataStatusValues.Continue;
    const body = get_buffer_bytes(BufferTypeValues.HttpResponseBody, 0, body_buffer_length as u32);
    const p = changetype<usize>(body);
    for (let i = 0; i < body.byteLength; i++) {
      const c = load<u8>(p + i);
      if (c >= 0x61 && c <= 0x7a) store<u8>(p + i, c - 0x20);
    }
    set_buffer(BufferTypeValues.HttpResponseBody, 0, body_buffer_length as u32, body);
    return FilterDataStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new AsBodyRoot(context_id); }, "as_body");
