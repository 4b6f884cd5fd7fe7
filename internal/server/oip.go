package server

import (
	"context"
	"encoding/binary"
	"strconv"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/proto/inference"
)

// Version is what ServerMetadata reports; main sets it from the build.
var Version = "dev"

// oipService implements the KServe v2 / Open Inference Protocol
// inference.GRPCInferenceService.
//
// ModelInfer takes one input tensor per request, in one of three forms:
//   - FP32 [N,3,H,W] or [3,H,W] at the model's input size: preprocessed
//     inputs, given to the engine unchanged;
//   - UINT8 [N,H,W,3] or [H,W,3]: RGB images, resized and normalised as
//     the model's config says;
//   - BYTES [N]: encoded image files (JPEG, PNG, WebP, BMP).
//
// It answers with the model's raw output tensor, FP32, in
// raw_output_contents when the request used raw_input_contents and in
// fp32_contents otherwise.
type oipService struct {
	inference.UnimplementedGRPCInferenceServiceServer
	reg     *model.Registry
	control control
	shm     *shmRegistry
	limits  Limits
	// maxMessageBytes bounds the response too.
	maxMessageBytes int
}

// versionOf is the one version a model serves: its version folder in
// Triton's layout, "1" in the plain layout.
func versionOf(m *model.Model) string {
	if m.Version > 0 {
		return strconv.FormatInt(m.Version, 10)
	}
	return "1"
}

// ServerLive implements GRPCInferenceService: a process that answers is
// live.
func (s *oipService) ServerLive(context.Context, *inference.ServerLiveRequest) (*inference.ServerLiveResponse, error) {
	return &inference.ServerLiveResponse{Live: true}, nil
}

// ServerReady implements GRPCInferenceService.
func (s *oipService) ServerReady(context.Context, *inference.ServerReadyRequest) (*inference.ServerReadyResponse, error) {
	ready, _ := s.reg.Ready()
	return &inference.ServerReadyResponse{Ready: ready}, nil
}

// getModel finds a model by name and version for the metadata calls.
func (s *oipService) getModel(name, version string) (*model.Model, error) {
	if name == "" {
		return nil, invalid("model name is missing")
	}
	m, ok := s.reg.Get(name)
	if !ok {
		return nil, notFound("model %q not found", clip(name))
	}
	if version != "" && version != versionOf(m) {
		return nil, notFound("model %q has no version %q (only %q)", name, clip(version), versionOf(m))
	}
	return m, nil
}

// ModelReady implements GRPCInferenceService: false for a model that is
// known but not Ready (loading, unavailable, unloading) or while the
// server drains; NotFound only for a name the server does not know.
func (s *oipService) ModelReady(_ context.Context, req *inference.ModelReadyRequest) (*inference.ModelReadyResponse, error) {
	m, err := s.getModel(req.GetName(), req.GetVersion())
	if err != nil {
		return nil, toStatus(err)
	}
	return &inference.ModelReadyResponse{Ready: m.Ready() && !s.reg.Draining()}, nil
}

// ModelMetadata implements GRPCInferenceService. It describes the FP32
// preprocessed input; the same input name also takes UINT8 and BYTES
// images (see oipService).
func (s *oipService) ModelMetadata(_ context.Context, req *inference.ModelMetadataRequest) (*inference.ModelMetadataResponse, error) {
	m, err := s.getModel(req.GetName(), req.GetVersion())
	if err != nil {
		return nil, toStatus(err)
	}
	out := m.Output()
	shape := outputShape(m)
	return &inference.ModelMetadataResponse{
		Name:     m.Name,
		Versions: []string{versionOf(m)},
		Platform: platform(backendOf(m)),
		Inputs: []*inference.ModelMetadataResponse_TensorMetadata{{
			Name: m.Input.Name, Datatype: "FP32", Shape: []int64{-1, 3, int64(m.Input.Height), int64(m.Input.Width)},
		}},
		Outputs: []*inference.ModelMetadataResponse_TensorMetadata{{Name: out.Name, Datatype: "FP32", Shape: shape}},
	}, nil
}

// outputShape is the model's output shape with a variable batch: the
// graph's where it fixes it, else what the decoding implies (for YOLOv8
// the anchors of the three detection levels at strides 8, 16 and 32).
func outputShape(m *model.Model) []int64 {
	yolo := m.Config.Output.Decoding == modelrepo.DecodeYOLOv8
	shape := []int64{-1, int64(m.NumClasses)}
	if yolo {
		shape = []int64{-1, int64(4 + m.NumClasses), -1}
	}
	if g := m.Output().Shape; len(g) == len(shape) {
		for i := 1; i < len(g); i++ {
			if g[i] > 0 {
				shape[i] = g[i]
			}
		}
	}
	if yolo && shape[2] < 0 {
		h, w := int64(m.Input.Height), int64(m.Input.Width)
		var anchors int64
		for _, s := range []int64{8, 16, 32} {
			anchors += ((h + s - 1) / s) * ((w + s - 1) / s)
		}
		shape[2] = anchors
	}
	return shape
}

// outputBytes is the size of the raw output of n images.
func outputBytes(m *model.Model, n int) int64 {
	size := int64(4 * n)
	for _, d := range outputShape(m)[1:] {
		size *= max(d, 1)
	}
	return size
}

func platform(backend string) string {
	switch backend {
	case engine.OpenCV:
		return "opencv_onnx"
	default:
		return "onnxruntime_onnx"
	}
}

// ModelInfer implements GRPCInferenceService.
func (s *oipService) ModelInfer(ctx context.Context, req *inference.ModelInferRequest) (*inference.ModelInferResponse, error) {
	if err := ctx.Err(); err != nil {
		return nil, toStatus(err)
	}
	m, err := lookup(s.reg, req.GetModelName(), "")
	if err != nil {
		return nil, toStatus(err)
	}
	defer m.Release()
	if v := req.GetModelVersion(); v != "" && v != versionOf(m) {
		return nil, toStatus(notFound("model %q has no version %q (only %q)", m.Name, clip(v), versionOf(m)))
	}
	out := m.Output()
	for _, o := range req.GetOutputs() {
		if o.GetName() != out.Name {
			return nil, toStatus(invalid("model %q has no output %q (it has %q)", m.Name, clip(o.GetName()), out.Name))
		}
	}
	inputs, err := s.inferInputs(req, m)
	if err != nil {
		return nil, toStatus(err)
	}
	// An answer over the message limit could not be sent: refuse before
	// computing it.
	if size := outputBytes(m, len(inputs)); size > int64(s.maxMessageBytes) {
		return nil, toStatus(invalid("the output of %d images would be %d bytes, over the %d byte message limit (--max-message-bytes); send fewer images per request", len(inputs), size, s.maxMessageBytes))
	}
	outs, err := m.Runner.InferRaw(ctx, inputs)
	if err != nil {
		return nil, toStatus(err)
	}
	resp := &inference.ModelInferResponse{ModelName: m.Name, ModelVersion: versionOf(m), Id: req.GetId()}
	var t engine.Tensor
	for _, o := range outs {
		if o.Name == out.Name || len(outs) == 1 {
			t = o
		}
	}
	requested := req.GetOutputs()
	if len(requested) == 0 {
		requested = []*inference.ModelInferRequest_InferRequestedOutputTensor{{Name: out.Name}}
	}
	// Every output is answered in raw_output_contents, as Triton does,
	// in the order of outputs; one written to shared memory has an empty
	// entry there.
	for _, ro := range requested {
		ot := &inference.ModelInferResponse_InferOutputTensor{Name: out.Name, Datatype: "FP32", Shape: t.Shape}
		var raw []byte
		if k := ro.GetParameters()["classification"].GetInt64Param(); k > 0 {
			if ot, raw, err = classification(m, t, len(inputs), int(k)); err != nil {
				return nil, toStatus(err)
			}
		} else if _, ok := ro.GetParameters()["classification"]; ok {
			return nil, toStatus(invalid("classification must be a positive int64 count"))
		} else {
			// t.Data is this request's own copy of the output rows.
			raw = floatsToLE(t.Data)
		}
		region, off, size, toSHM, err := shmRef(ro.GetParameters())
		if err != nil {
			return nil, toStatus(err)
		}
		if toSHM {
			if uint64(len(raw)) > size {
				return nil, toStatus(invalid("output %q is %d bytes; shared_memory_byte_size is %d", ot.Name, len(raw), size))
			}
			if err := s.shm.use(region, off, uint64(len(raw)), func(b []byte) error { copy(b, raw); return nil }); err != nil {
				return nil, toStatus(err)
			}
			ot.Parameters = ro.GetParameters()
			raw = []byte{}
		}
		resp.Outputs = append(resp.Outputs, ot)
		resp.RawOutputContents = append(resp.RawOutputContents, raw)
	}
	return resp, nil
}

// inferInputs checks the request's one input tensor and splits it into
// images.
func (s *oipService) inferInputs(req *inference.ModelInferRequest, m *model.Model) ([]model.Input, error) {
	ins := req.GetInputs()
	if len(ins) != 1 {
		return nil, invalid("model %q takes exactly one input tensor %q, got %d", m.Name, m.Input.Name, len(ins))
	}
	in := ins[0]
	if in.GetName() != m.Input.Name {
		return nil, invalid("model %q has no input %q (it has %q)", m.Name, clip(in.GetName()), m.Input.Name)
	}
	raws := req.GetRawInputContents()
	if len(raws) > 0 && len(raws) != 1 {
		return nil, invalid("%d raw_input_contents for 1 input", len(raws))
	}
	if len(raws) == 1 && in.GetContents() != nil {
		return nil, invalid("input %q has contents and raw_input_contents; use one", clip(in.GetName()))
	}
	var raw []byte
	if len(raws) == 1 {
		raw = raws[0]
	}
	region, off, size, fromSHM, err := shmRef(in.GetParameters())
	if err != nil {
		return nil, err
	}
	if fromSHM {
		if raw != nil || in.GetContents() != nil {
			return nil, invalid("input %q is in shared memory region %q and in the request; use one", clip(in.GetName()), clip(region))
		}
		if size > uint64(s.maxMessageBytes)*4 {
			return nil, invalid("input %q: %d bytes of shared memory, over 4 × --max-message-bytes", clip(in.GetName()), size)
		}
		// One copy out of the region: the client may reuse it as soon as
		// the answer is back, and the server must not read it after.
		if err := s.shm.use(region, off, size, func(b []byte) error { raw = append([]byte(nil), b...); return nil }); err != nil {
			return nil, err
		}
	}
	shape := in.GetShape()
	for _, d := range shape {
		if d < 1 {
			return nil, invalid("input %q shape %v has a dimension below 1", clip(in.GetName()), clipShape(shape))
		}
	}
	h, w := int64(m.Input.Height), int64(m.Input.Width)
	batched := func(rank int) (n int, one []int64, err error) {
		switch len(shape) {
		case rank:
			return 1, shape, nil
		case rank + 1:
			if shape[0] > int64(s.limits.MaxImagesPerRequest) {
				return 0, nil, invalid("batch of %d images, over the limit of %d (--max-images-per-request)", shape[0], s.limits.MaxImagesPerRequest)
			}
			return int(shape[0]), shape[1:], nil
		}
		return 0, nil, nil
	}
	switch in.GetDatatype() {
	case "FP32":
		n, one, err := batched(3)
		if err != nil {
			return nil, err
		}
		if one == nil || one[0] != 3 || one[1] != h || one[2] != w {
			return nil, invalid("FP32 input shape %v, want [N 3 %d %d] or [3 %d %d]", clipShape(shape), h, w, h, w)
		}
		per := int(3 * h * w)
		var data []float32
		if raw != nil {
			if len(raw) != 4*n*per {
				return nil, invalid("FP32 input of shape %v needs %d raw bytes, got %d", clipShape(shape), 4*n*per, len(raw))
			}
			data = floatsFromLE(raw)
		} else {
			data = in.GetContents().GetFp32Contents()
			if len(data) != n*per {
				return nil, invalid("FP32 input of shape %v needs %d fp32_contents, got %d", clipShape(shape), n*per, len(data))
			}
		}
		out := make([]model.Input, n)
		for i := range out {
			out[i] = model.Input{Tensor: data[i*per : (i+1)*per : (i+1)*per]}
		}
		return out, nil
	case "UINT8":
		n, one, err := batched(3)
		if err != nil {
			return nil, err
		}
		if one == nil {
			return nil, invalid("UINT8 input shape %v, want [N H W 3] or [H W 3] (RGB)", clipShape(shape))
		}
		ih, iw, err := hwcShape(one, int(one[0]*one[1]*3), s.limits.MaxPixels)
		if err != nil {
			return nil, err
		}
		per := ih * iw * 3
		var pix []byte
		if raw != nil {
			if len(raw) != n*per {
				return nil, invalid("UINT8 input of shape %v needs %d raw bytes, got %d", clipShape(shape), n*per, len(raw))
			}
			pix = raw
		} else {
			u := in.GetContents().GetUintContents()
			if len(u) != n*per {
				return nil, invalid("UINT8 input of shape %v needs %d uint_contents, got %d", clipShape(shape), n*per, len(u))
			}
			pix = make([]byte, len(u))
			for i, v := range u {
				if v > 255 {
					return nil, invalid("UINT8 input value %d is %d, over 255", i, v)
				}
				pix[i] = byte(v)
			}
		}
		out := make([]model.Input, n)
		for i := range out {
			out[i] = model.Input{Pixels: pix[i*per : (i+1)*per : (i+1)*per], Height: ih, Width: iw}
		}
		return out, nil
	case "BYTES":
		if len(shape) != 1 {
			return nil, invalid("BYTES input shape %v, want [N] (one encoded image each)", clipShape(shape))
		}
		if shape[0] > int64(s.limits.MaxImagesPerRequest) {
			return nil, invalid("batch of %d images, over the limit of %d (--max-images-per-request)", shape[0], s.limits.MaxImagesPerRequest)
		}
		var files [][]byte
		if raw != nil {
			var err error
			if files, err = splitRawBytes(raw); err != nil {
				return nil, err
			}
		} else {
			files = in.GetContents().GetBytesContents()
		}
		if int64(len(files)) != shape[0] {
			return nil, invalid("BYTES input of shape %v holds %d elements", clipShape(shape), len(files))
		}
		out := make([]model.Input, len(files))
		for i, f := range files {
			img, err := toInput(encodedImage(f), m, s.limits)
			if err != nil {
				return nil, prefixImage(i, err)
			}
			out[i] = img
		}
		return out, nil
	}
	return nil, invalid("input datatype %q not supported (want FP32 [N,3,%d,%d], UINT8 [N,H,W,3] or BYTES [N])", clip(in.GetDatatype()), h, w)
}

// splitRawBytes splits a raw BYTES tensor: each element is a 4-byte
// little-endian length followed by that many bytes.
func splitRawBytes(raw []byte) ([][]byte, error) {
	var out [][]byte
	for len(raw) > 0 {
		if len(raw) < 4 {
			return nil, invalid("raw BYTES input ends inside an element length")
		}
		n := binary.LittleEndian.Uint32(raw)
		raw = raw[4:]
		if uint64(n) > uint64(len(raw)) {
			return nil, invalid("raw BYTES element of %d bytes runs past the end of the input (%d left)", n, len(raw))
		}
		out = append(out, raw[:n:n])
		raw = raw[n:]
	}
	return out, nil
}
