// go_headers: a Proxy-Wasm test plugin built with the standard Go toolchain (GOOS=wasip1
// GOARCH=wasm, -buildmode=c-shared: a WASI reactor exporting _initialize), written against the
// raw ABI with //go:wasmexport and //go:wasmimport, standard library only. This is how the
// current Go SDK (github.com/proxy-wasm/proxy-wasm-go-sdk) builds plugins, so the gateway sees
// the module a Go SDK plugin is: the Go runtime (GC, scheduler) and its WASI imports, the
// proxy_abi_version_0_2_0 marker the SDK exports, and proxy_on_memory_allocate. Like the SDK's
// proxywasm package, it imports fmt, and with it os, whose initialisation asks WASI about
// stdin/stdout/stderr (fd_fdstat_get) when the module starts.
//
// Configuration: a plain string (the route's `conf`).
//   - request: sets `x-go-conf: <conf>` and `x-go-path: <:path>`. A request with
//     `x-go-deny: yes` is answered 403 `denied by go\n` (proxy_send_local_response, Pause).
//     A request with `x-go-panic: yes` makes the plugin panic: the Go runtime writes the
//     message to stderr (WASI fd_write on fd 2) and aborts (a trap): a plugin fault.
//   - response: sets `x-go-plugin: <conf>` and `x-go-status-seen: <:status>`.
//   - logs (info): `go_headers <conf>: on_configure`, and `go_headers <conf>: on_log <path>
//     <status>` for an instance's first 1,000 requests, then for every 1,000th with the Go
//     heap's figures (a load test stays within the host's 200 lines/s log budget).
//
// Each request also makes garbage (a map of every request header, strings, fmt) so that the
// Go GC runs under load.
package main

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"strings"
	"unsafe"
)

func main() {}

// ---- host functions -------------------------------------------------------------------

//go:wasmimport env proxy_log
func proxyLog(level uint32, msg unsafe.Pointer, msgLen uint32) uint32

//go:wasmimport env proxy_get_buffer_bytes
func proxyGetBufferBytes(bufferType, start, maxSize uint32, retPtr, retLen unsafe.Pointer) uint32

//go:wasmimport env proxy_get_header_map_value
func proxyGetHeaderMapValue(mapType uint32, key unsafe.Pointer, keyLen uint32, retPtr, retLen unsafe.Pointer) uint32

//go:wasmimport env proxy_get_header_map_pairs
func proxyGetHeaderMapPairs(mapType uint32, retPtr, retLen unsafe.Pointer) uint32

//go:wasmimport env proxy_replace_header_map_value
func proxyReplaceHeaderMapValue(mapType uint32, key unsafe.Pointer, keyLen uint32, val unsafe.Pointer, valLen uint32) uint32

//go:wasmimport env proxy_send_local_response
func proxySendLocalResponse(status uint32, details unsafe.Pointer, detailsLen uint32, body unsafe.Pointer, bodyLen uint32, headers unsafe.Pointer, headersLen uint32, grpcStatus int32) uint32

const (
	statusOK       = 0
	statusNotFound = 1

	logInfo = 2

	actionContinue = 0
	actionPause    = 1

	bufferPluginConfiguration = 7

	mapRequestHeaders  = 0
	mapResponseHeaders = 2
)

// ---- memory handed to the host --------------------------------------------------------

// Buffers given to the host by proxy_on_memory_allocate stay reachable here until the code
// that made the host call takes them back (take), so a GC between the allocation and the
// read cannot free them.
var handedOut = map[uintptr][]byte{}

//go:wasmexport proxy_on_memory_allocate
func proxyOnMemoryAllocate(size uint32) *byte {
	if size == 0 {
		size = 1
	}
	buf := make([]byte, size)
	handedOut[uintptr(unsafe.Pointer(&buf[0]))] = buf
	return &buf[0]
}

// take returns (and forgets) the buffer the host filled at ptr, as a string (no copy).
func take(ptr uint32, size uint32) string {
	if ptr == 0 || size == 0 {
		return ""
	}
	buf, ok := handedOut[uintptr(ptr)]
	if !ok || uint32(len(buf)) < size {
		panic(fmt.Sprintf("go_headers: the host returned memory (%#x, %d bytes) it did not get from proxy_on_memory_allocate", ptr, size))
	}
	delete(handedOut, uintptr(ptr))
	return unsafe.String(&buf[0], size)
}

func ptr(s string) (unsafe.Pointer, uint32) {
	if len(s) == 0 {
		return nil, 0
	}
	return unsafe.Pointer(unsafe.StringData(s)), uint32(len(s))
}

// logInfof is the SDK's proxywasm.LogInfof.
func logInfof(format string, args ...any) {
	p, n := ptr(fmt.Sprintf(format, args...))
	proxyLog(logInfo, p, n)
}

func pluginConfiguration(size uint32) (string, uint32) {
	var rp, rl uint32
	st := proxyGetBufferBytes(bufferPluginConfiguration, 0, size, unsafe.Pointer(&rp), unsafe.Pointer(&rl))
	return take(rp, rl), st
}

func headerValue(mapType uint32, name string) (string, bool) {
	var rp, rl uint32
	k, kl := ptr(name)
	switch st := proxyGetHeaderMapValue(mapType, k, kl, unsafe.Pointer(&rp), unsafe.Pointer(&rl)); st {
	case statusOK:
		return take(rp, rl), true
	case statusNotFound:
		return "", false
	default:
		panic(fmt.Sprintf("go_headers: proxy_get_header_map_value %q: status %d", name, st))
	}
}

func setHeader(mapType uint32, name, value string) {
	k, kl := ptr(name)
	v, vl := ptr(value)
	if st := proxyReplaceHeaderMapValue(mapType, k, kl, v, vl); st != statusOK {
		panic(fmt.Sprintf("go_headers: proxy_replace_header_map_value %q: status %d", name, st))
	}
}

// headerPairs decodes the serialized map: u32 count, count×(u32 key len, u32 value len), then
// each key and each value followed by a NUL.
func headerPairs(mapType uint32) [][2]string {
	var rp, rl uint32
	if st := proxyGetHeaderMapPairs(mapType, unsafe.Pointer(&rp), unsafe.Pointer(&rl)); st != statusOK {
		panic(fmt.Sprintf("go_headers: proxy_get_header_map_pairs: status %d", st))
	}
	raw := []byte(take(rp, rl))
	if len(raw) < 4 {
		return nil
	}
	n := int(binary.LittleEndian.Uint32(raw))
	out := make([][2]string, 0, n)
	pos := 4 + 8*n
	for i := 0; i < n; i++ {
		kl := int(binary.LittleEndian.Uint32(raw[4+8*i:]))
		vl := int(binary.LittleEndian.Uint32(raw[8+8*i:]))
		k := string(raw[pos : pos+kl])
		pos += kl + 1
		v := string(raw[pos : pos+vl])
		pos += vl + 1
		out = append(out, [2]string{k, v})
	}
	return out
}

func encodePairs(pairs [][2]string) []byte {
	b := make([]byte, 4+8*len(pairs))
	binary.LittleEndian.PutUint32(b, uint32(len(pairs)))
	for i, p := range pairs {
		binary.LittleEndian.PutUint32(b[4+8*i:], uint32(len(p[0])))
		binary.LittleEndian.PutUint32(b[8+8*i:], uint32(len(p[1])))
	}
	for _, p := range pairs {
		b = append(b, p[0]...)
		b = append(b, 0)
		b = append(b, p[1]...)
		b = append(b, 0)
	}
	return b
}

// ---- contexts -------------------------------------------------------------------------

type rootContext struct {
	conf string
}

type httpContext struct {
	root   *rootContext
	path   string
	status string
}

var (
	roots   = map[uint32]*rootContext{}
	streams = map[uint32]*httpContext{}
	logs    uint64 // proxy_on_log calls of this instance
)

//go:wasmexport proxy_abi_version_0_2_0
func proxyABIVersion() {}

//go:wasmexport proxy_on_context_create
func proxyOnContextCreate(contextID, parentID uint32) {
	if parentID == 0 {
		roots[contextID] = &rootContext{}
		return
	}
	root, ok := roots[parentID]
	if !ok {
		panic(fmt.Sprintf("go_headers: http context %d under unknown root %d", contextID, parentID))
	}
	streams[contextID] = &httpContext{root: root}
}

//go:wasmexport proxy_on_vm_start
func proxyOnVMStart(rootID, vmConfSize uint32) uint32 {
	logInfof("go_headers: on_vm_start (%s %s/%s)", runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return 1
}

//go:wasmexport proxy_on_configure
func proxyOnConfigure(rootID, confSize uint32) uint32 {
	root, ok := roots[rootID]
	if !ok {
		return 0
	}
	conf, st := pluginConfiguration(confSize)
	if st != statusOK || conf == "" {
		logInfof("go_headers: no configuration (status %d)", st)
		return 0
	}
	root.conf = strings.Clone(conf)
	logInfof("go_headers %s: on_configure (%d bytes)", root.conf, confSize)
	return 1
}

var denyHeaders = encodePairs([][2]string{{"content-type", "text/plain"}, {"x-go-denied", "1"}})

//go:wasmexport proxy_on_request_headers
func proxyOnRequestHeaders(contextID, numHeaders, endOfStream uint32) uint32 {
	ctx := streams[contextID]

	// Garbage: a map of every request header, keys lower-cased, and a summary string.
	all := map[string]string{}
	var sb strings.Builder
	for _, kv := range headerPairs(mapRequestHeaders) {
		all[strings.ToLower(kv[0])] = kv[1]
		fmt.Fprintf(&sb, "%s=%q;", kv[0], kv[1])
	}
	if len(all) != int(numHeaders) || sb.Len() == 0 {
		logInfof("go_headers %s: %d distinct headers of %d", ctx.root.conf, len(all), numHeaders)
	}

	path, _ := headerValue(mapRequestHeaders, ":path")
	ctx.path = strings.Clone(path)
	if deny, _ := headerValue(mapRequestHeaders, "x-go-deny"); deny == "yes" {
		body, bl := ptr("denied by go\n")
		det, dl := ptr("go_headers_denied")
		proxySendLocalResponse(403, det, dl, body, bl, unsafe.Pointer(&denyHeaders[0]), uint32(len(denyHeaders)), -1)
		return actionPause
	}
	if p, _ := headerValue(mapRequestHeaders, "x-go-panic"); p == "yes" {
		panic("go_headers: asked to panic on " + ctx.path)
	}
	setHeader(mapRequestHeaders, "x-go-conf", ctx.root.conf)
	setHeader(mapRequestHeaders, "x-go-path", ctx.path)
	return actionContinue
}

//go:wasmexport proxy_on_response_headers
func proxyOnResponseHeaders(contextID, numHeaders, endOfStream uint32) uint32 {
	ctx := streams[contextID]
	status, _ := headerValue(mapResponseHeaders, ":status")
	ctx.status = strings.Clone(status)
	setHeader(mapResponseHeaders, "x-go-plugin", ctx.root.conf)
	setHeader(mapResponseHeaders, "x-go-status-seen", ctx.status)
	return actionContinue
}

//go:wasmexport proxy_on_log
func proxyOnLog(contextID uint32) {
	ctx, ok := streams[contextID]
	if !ok {
		return
	}
	logs++
	switch {
	case logs <= 1000:
		logInfof("go_headers %s: on_log %s %s", ctx.root.conf, ctx.path, ctx.status)
	case logs%1000 == 0:
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		logInfof("go_headers %s: on_log %s %s (request %d of this instance: heap_alloc=%d heap_sys=%d sys=%d num_gc=%d contexts=%d handed_out=%d)",
			ctx.root.conf, ctx.path, ctx.status, logs, m.HeapAlloc, m.HeapSys, m.Sys, m.NumGC, len(streams), len(handedOut))
	}
}

//go:wasmexport proxy_on_done
func proxyOnDone(contextID uint32) uint32 {
	if root, ok := roots[contextID]; ok && root.conf != "" {
		logInfof("go_headers %s: plugin context on_done", root.conf)
	}
	return 1
}

//go:wasmexport proxy_on_delete
func proxyOnDelete(contextID uint32) {
	delete(streams, contextID)
	delete(roots, contextID)
}
