// Package batcher is the dynamic batcher of a served model and its
// self-tuning: a bounded queue shared fairly between clients (deficit
// round robin over fairness keys), one worker per engine instance that
// packs queued images into a batch buffer and runs it, a pure policy that
// decides when a batch is released (full, a preferred size, the queue
// delay, a request's deadline), the warm-up measurement that picks the
// batch sizes worth running, and the latency controller that adapts the
// policy online to a p99 target.
//
// It does not know the payload: an Item fills its own slot of the batch
// and keeps its own result (Triton's dynamic batch scheduler works the
// same way). It links no native code, so it builds and is tested without
// OpenCV or ONNX Runtime.
package batcher
