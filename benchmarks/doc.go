// Package benchmarks is visionserve's benchmark suite and its results.
//
// `go test -bench . ./benchmarks` (or `make bench`) measures the generated
// models (yolov8s, resnet50, mobilenetv3_large under models/) on every
// backend this machine has, at three levels:
//
//   - BenchmarkEngine: a preprocessed batch through the engine session;
//   - BenchmarkPipeline: encoded image in, results out, in process (the
//     synchronous pipelinetest.Runner, and the server's batcher-backed runner
//     at several concurrencies);
//   - BenchmarkServe: end to end over gRPC on a real loopback TCP listener
//     at several client concurrencies.
//
// BenchmarkBatching sweeps fixed batcher configurations against the
// self-tuned one. Every benchmark reports images/s, p50 and p99 latency
// and allocations; a missing model or backend skips with a message naming
// it. Each is quick at -benchtime=1x (CI); engines and servers are shared
// between sub-benchmarks and closed when the run ends.
//
// RESULTS.md holds the measured figures and how they were taken;
// results/<date>-<machine>/ holds load-sweep reports of cmd/loadsweep.
package benchmarks
