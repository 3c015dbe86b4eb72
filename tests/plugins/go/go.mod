module wasmgate.test/plugins/go

go 1.24
