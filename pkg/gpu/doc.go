// Package gpu runs models on NVIDIA GPUs through ONNX Runtime's CUDA and
// TensorRT execution providers, and answers the questions around that:
// which GPUs there are (NVML, loaded at run time), whether a provider really
// works on them (a one-node probe run), which backend --backend auto should
// take, and how much GPU memory each model takes (measured around session
// creation and at each warm-up batch size, checked against a budget).
//
// Engines keep batch inputs and outputs in page-locked host memory from
// cudaHostAlloc and bind them to the session with ONNX Runtime's IoBinding,
// once per batch size, so a steady-state batch allocates nothing and the
// host-to-device copy runs by DMA. CUDA, NVML and ONNX Runtime are all found
// with dlopen: binaries link only glibc and run where none of them is
// installed, and the package does not import OpenCV (pkg/pipeline does), so
// its test binaries run on a GPU machine with only the ONNX Runtime and CUDA
// libraries. Where CUDA is absent the same code runs as its no-GPU twin: the
// CPU execution provider with ordinary host memory, which is how the tests
// exercise the binding path without a GPU.
//
// See README.md for running the GPU tests and benchmarks on a GPU machine.
package gpu
