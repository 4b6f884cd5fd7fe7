// Package model owns the life of a served model: loading it on a backend
// (engine choice, probe, fallback), warming it up, self-tuning its
// batcher, running requests on encoded images, pixels or raw tensors,
// its statistics and state, and draining and closing it; and the
// Registry of models that answers readiness for the whole server.
//
// A model's state is LOADING while its engines load and warm up, READY
// while it takes requests, UNAVAILABLE (with the reason) when it could
// not be loaded or warmed up, and UNLOADING while it finishes the
// requests it accepted before its engines are freed.
//
// The gRPC services only translate between their protocol and this
// package; they never reach past it to the pipeline or the batcher.
package model
