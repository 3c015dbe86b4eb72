// Proxy-Wasm test plugin written with the AssemblyScript SDK (@solo-io/proxy-runtime 0.1.8).
//   request headers:  adds `x-as-plugin: <plugin configuration string>`
//   response headers: adds `x-as-response: 1`
// Root context registered under root id "as_headers" (the SDK looks the factory up
// by the host's answer to the `plugin_root_id` property).
export * from "@solo-io/proxy-runtime/proxy"; // exports proxy_on_* ABI functions + malloc/free
import {
  RootContext, Context, registerRootContext,
  FilterHeadersStatusValues, stream_context,
} from "@solo-io/proxy-runtime";
// The SDK's own buffer helper (runtime.ts); not re-exported from the package index.
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

class AsHeadersRoot extends RootContext {
  config: string = "";

  // proxy_on_configure(root_id, configuration_size) lands here.
  // NOTE: RootContext.onConfigure in proxy-runtime 0.1.8 passes `configuration_size`
  // as the *return-size pointer* of proxy_get_buffer_bytes (runtime.ts:810), so the
  // host writes a u32 at wasm address == configuration size, and with an empty
  // configuration it reuses a stale buffer pointer. We therefore read the
  // PluginConfiguration buffer with the SDK's get_buffer_bytes helper (correct
  // out-pointers) and skip the host call entirely when the configuration is empty.
  onConfigure(configuration_size: u32): bool {
    if (configuration_size == 0) {
      this.config = "";
      return true;
    }
    const buf = get_buffer_bytes(BufferTypeValues.PluginConfiguration, 0, configuration_size);
    this.config = String.UTF8.decode(buf);
    return true;
  }

  createContext(context_id: u32): Context {
    return new AsHeaders(context_id, this);
  }
}

class AsHeaders extends Context {
  root: AsHeadersRoot;

  constructor(context_id: u32, root_context: AsHeadersRoot) {
    super(context_id, root_context);
    this.root = root_context;
  }

  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.request.add("x-as-plugin", this.root.config);
    return FilterHeadersStatusValues.Continue;
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.add("x-as-response", "1");
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new AsHeadersRoot(context_id); }, "as_headers");
