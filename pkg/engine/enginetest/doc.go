// Package enginetest holds the integration tests and benchmarks that run
// real and generated models through both CPU engines (ONNX Runtime and
// OpenCV DNN): cross-engine agreement, real accuracy on the shared test
// images and per-engine benchmarks. It has no API: the helpers the tests
// share are in internal/testenv.
package enginetest
