package server

import (
	"context"
	"math"
	"strconv"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// Limits bound what one request or client may ask for.
type Limits struct {
	// MaxPixels bounds width×height of one image.
	MaxPixels int
	// MaxImagesPerRequest bounds the images of one request.
	MaxImagesPerRequest int
	// MaxStreams bounds the concurrent video streams.
	MaxStreams int
	// MaxStreamsPerClient bounds the concurrent streams of one client
	// (peer host); 0 means no per-client bound.
	MaxStreamsPerClient int
	// StreamIdleTimeout ends a stream that sends no frame for that long;
	// 0 means DefaultStreamIdleTimeout.
	StreamIdleTimeout time.Duration
}

// visionService implements visionserve.v1.VisionService.
type visionService struct {
	visionv1.UnimplementedVisionServiceServer
	reg     *model.Registry
	control control
	limits  Limits
	streams *streamSlots
	// draining is closed when shutdown begins: streams finish the frames
	// they took in and end with Unavailable.
	draining <-chan struct{}
}

// lookup acquires the ready model of the given task ("" for any) that
// serves name now, or returns the error to answer. The caller must
// Release the model: a reload or unload waits for that before closing it,
// so no request is dropped by one.
func lookup(reg *model.Registry, name string, task modelrepo.Task) (*model.Model, error) {
	if name == "" {
		return nil, invalid("model name is missing")
	}
	m, ok := reg.Acquire(name)
	if !ok {
		return nil, notFound("model %q not found", clip(name))
	}
	if st, why := m.State(); st != model.Ready {
		m.Release()
		if why != nil {
			return nil, unavailable("model %q is %s: %v", name, st, why)
		}
		return nil, unavailable("model %q is %s, not ready", name, st)
	}
	if task != "" && m.Task != task {
		m.Release()
		return nil, invalid("model %q is a %s model, not %s", name, m.Task, task)
	}
	return m, nil
}

// Classify implements VisionService.
func (s *visionService) Classify(ctx context.Context, req *visionv1.ClassifyRequest) (*visionv1.ClassifyResponse, error) {
	results, err := s.run(ctx, req.GetModel(), modelrepo.TaskClassify, req.GetImages(), req.GetOptions())
	if err != nil {
		return nil, toStatus(err)
	}
	return &visionv1.ClassifyResponse{Model: req.GetModel(), Results: results}, nil
}

// Detect implements VisionService.
func (s *visionService) Detect(ctx context.Context, req *visionv1.DetectRequest) (*visionv1.DetectResponse, error) {
	results, err := s.run(ctx, req.GetModel(), modelrepo.TaskDetect, req.GetImages(), req.GetOptions())
	if err != nil {
		return nil, toStatus(err)
	}
	return &visionv1.DetectResponse{Model: req.GetModel(), Results: results}, nil
}

func (s *visionService) run(ctx context.Context, name string, task modelrepo.Task, images []*visionv1.Image, o *visionv1.Options) ([]*visionv1.ImageResult, error) {
	start := time.Now()
	// A request whose deadline passed in transit costs nothing more.
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	m, err := lookup(s.reg, name, task)
	if err != nil {
		return nil, err
	}
	defer m.Release()
	opts, err := toOptions(o)
	if err != nil {
		return nil, err
	}
	if len(images) == 0 {
		return nil, invalid("no images in the request")
	}
	if len(images) > s.limits.MaxImagesPerRequest {
		return nil, invalid("%d images in one request, over the limit of %d (--max-images-per-request)", len(images), s.limits.MaxImagesPerRequest)
	}
	inputs := make([]model.Input, len(images))
	for i, img := range images {
		if inputs[i], err = toInput(img, m, s.limits); err != nil {
			return nil, prefixImage(i, err)
		}
	}
	res, err := m.Runner.Infer(ctx, inputs, opts)
	if err != nil {
		return nil, err
	}
	total := time.Since(start)
	out := make([]*visionv1.ImageResult, len(res))
	for i := range res {
		out[i] = toResult(&res[i], total)
	}
	return out, nil
}

// prefixImage names the image of a refusal in a multi-image request.
func prefixImage(i int, err error) error {
	if se, ok := err.(*statusError); ok {
		return &statusError{se.code, "image " + strconv.Itoa(i) + ": " + se.msg}
	}
	return err
}

// toOptions checks the request options; a zero field means the model's
// default.
func toOptions(o *visionv1.Options) (pipeline.Options, error) {
	if o == nil {
		return pipeline.Options{}, nil
	}
	if o.TopK < 0 || o.TopK > modelrepo.MaxTopKAny {
		return pipeline.Options{}, invalid("options.top_k %d out of range (0..%d)", o.TopK, modelrepo.MaxTopKAny)
	}
	if !(o.Confidence >= 0 && o.Confidence <= 1) {
		return pipeline.Options{}, invalid("options.confidence %v out of range [0,1]", o.Confidence)
	}
	if !(o.Iou >= 0 && o.Iou <= 1) {
		return pipeline.Options{}, invalid("options.iou %v out of range [0,1]", o.Iou)
	}
	if o.MaxDetections < 0 || o.MaxDetections > modelrepo.MaxDetectionsAny {
		return pipeline.Options{}, invalid("options.max_detections %d out of range (0..%d)", o.MaxDetections, modelrepo.MaxDetectionsAny)
	}
	return pipeline.Options{TopK: int(o.TopK), Confidence: o.Confidence, IoU: o.Iou, MaxDetections: int(o.MaxDetections)}, nil
}

// toInput checks one tensor image against the limits and the model and
// converts it; encoded images are checked by the runner.
func toInput(img *visionv1.Image, m *model.Model, lim Limits) (model.Input, error) {
	switch src := img.GetSource().(type) {
	case *visionv1.Image_Encoded:
		// The runner reads the header first (pipeline.CheckHeader: format,
		// zero sides, the pixel limit) before any pixel memory is taken.
		return model.Input{Encoded: src.Encoded}, nil
	case *visionv1.Image_Tensor:
		t := src.Tensor
		switch t.GetDatatype() {
		case visionv1.Tensor_DATA_TYPE_FLOAT32:
			data, err := chwTensor(t.GetShape(), t.GetData(), m)
			if err != nil {
				return model.Input{}, err
			}
			return model.Input{Tensor: data}, nil
		case visionv1.Tensor_DATA_TYPE_UINT8:
			h, w, err := hwcShape(t.GetShape(), len(t.GetData()), lim.MaxPixels)
			if err != nil {
				return model.Input{}, err
			}
			return model.Input{Pixels: t.GetData(), Height: h, Width: w}, nil
		default:
			return model.Input{}, invalid("tensor datatype %v not supported (want DATA_TYPE_FLOAT32 [3,H,W] or DATA_TYPE_UINT8 [H,W,3])", t.GetDatatype())
		}
	}
	return model.Input{}, invalid("empty image: set encoded or tensor")
}

// chwTensor checks a preprocessed [3,H,W] FP32 input of the model's size
// and decodes its little-endian bytes.
func chwTensor(shape []int64, raw []byte, m *model.Model) ([]float32, error) {
	h, w := int64(m.Input.Height), int64(m.Input.Width)
	if len(shape) != 3 || shape[0] != 3 || shape[1] != h || shape[2] != w {
		return nil, invalid("FLOAT32 tensor shape %v, want [3 %d %d] (the model's preprocessed input)", clipShape(shape), h, w)
	}
	if want := int(3 * h * w * 4); len(raw) != want {
		return nil, invalid("FLOAT32 tensor of shape %v holds %d bytes, want %d", clipShape(shape), len(raw), want)
	}
	return floatsFromLE(raw), nil
}

// hwcShape checks an [H,W,3] UINT8 image and returns H and W.
func hwcShape(shape []int64, n, maxPixels int) (int, int, error) {
	if len(shape) != 3 || shape[2] != 3 || shape[0] < 1 || shape[1] < 1 {
		return 0, 0, invalid("UINT8 tensor shape %v, want [H W 3] (RGB)", clipShape(shape))
	}
	if shape[0] > math.MaxInt32 || shape[1] > math.MaxInt32 || shape[0]*shape[1] > int64(maxPixels) {
		return 0, 0, invalid("UINT8 image of %dx%d is over the limit of %d pixels: %v", shape[1], shape[0], maxPixels, pipeline.ErrTooManyPixels)
	}
	if want := shape[0] * shape[1] * 3; int64(n) != want {
		return 0, 0, invalid("UINT8 tensor of shape %v holds %d bytes, want %d", clipShape(shape), n, want)
	}
	return int(shape[0]), int(shape[1]), nil
}

func toResult(r *pipeline.Result, total time.Duration) *visionv1.ImageResult {
	out := &visionv1.ImageResult{
		Width:     int32(r.Width),
		Height:    int32(r.Height),
		Backend:   r.Backend,
		BatchSize: int32(r.BatchSize),
		Timings: &visionv1.Timings{
			Queue:       durationpb.New(r.Timings.Queue),
			Decode:      durationpb.New(r.Timings.Decode),
			Preprocess:  durationpb.New(r.Timings.Preprocess),
			Inference:   durationpb.New(r.Timings.Inference),
			Postprocess: durationpb.New(r.Timings.Postprocess),
			Total:       durationpb.New(total),
		},
	}
	for _, c := range r.Classes {
		out.Classes = append(out.Classes, &visionv1.Class{Label: c.Label, Index: int32(c.Index), Score: c.Score})
	}
	for _, d := range r.Detections {
		out.Detections = append(out.Detections, &visionv1.Detection{
			Label: d.Label, Index: int32(d.Index), Score: d.Score,
			Box: &visionv1.Box{X1: d.Box.X1, Y1: d.Box.Y1, X2: d.Box.X2, Y2: d.Box.Y2},
		})
	}
	return out
}

// ListModels implements VisionService.
func (s *visionService) ListModels(context.Context, *visionv1.ListModelsRequest) (*visionv1.ListModelsResponse, error) {
	resp := &visionv1.ListModelsResponse{}
	for _, m := range s.reg.Models() {
		resp.Models = append(resp.Models, modelInfo(m, s.reg.Draining()))
	}
	return resp, nil
}

// ModelInfo implements VisionService.
func (s *visionService) ModelInfo(_ context.Context, req *visionv1.ModelInfoRequest) (*visionv1.ModelInfoResponse, error) {
	if req.GetModel() == "" {
		return nil, toStatus(invalid("model name is missing"))
	}
	m, ok := s.reg.Get(req.GetModel())
	if !ok {
		return nil, toStatus(notFound("model %q not found", clip(req.GetModel())))
	}
	return modelInfo(m, s.reg.Draining()), nil
}

// modelInfo describes m; ready is false while the server drains, as OIP
// ModelReady says.
func modelInfo(m *model.Model, draining bool) *visionv1.ModelInfoResponse {
	task := visionv1.Task_TASK_UNSPECIFIED
	switch m.Task {
	case modelrepo.TaskClassify:
		task = visionv1.Task_TASK_CLASSIFY
	case modelrepo.TaskDetect:
		task = visionv1.Task_TASK_DETECT
	}
	b := m.EffectiveBatching() // what self-tuning chose, else the config
	pref := make([]int32, len(b.PreferredBatchSizes))
	for i, p := range b.PreferredBatchSizes {
		pref[i] = int32(p)
	}
	d := m.Defaults
	st, why := m.State()
	reason := ""
	if why != nil {
		reason = why.Error()
	}
	return &visionv1.ModelInfoResponse{
		Name:        m.Name,
		Task:        task,
		InputName:   m.Input.Name,
		InputWidth:  int32(m.Input.Width),
		InputHeight: int32(m.Input.Height),
		OutputName:  m.Output().Name,
		LabelsCount: int32(len(m.LabelNames)),
		Backend:     backendOf(m),
		Batching: &visionv1.Batching{
			MaxBatchSize:        int32(b.MaxBatchSize),
			MaxQueueDelay:       durationpb.New(b.MaxQueueDelay),
			PreferredBatchSizes: pref,
			QueueSize:           int32(b.QueueSize),
			Instances:           int32(b.Instances),
		},
		Defaults:       &visionv1.Options{TopK: int32(d.TopK), Confidence: d.Confidence, Iou: d.IoU, MaxDetections: int32(d.MaxDetections)},
		Ready:          st == model.Ready && !draining,
		State:          modelStates[st],
		StateReason:    reason,
		SettingSources: settingSources(m),
		Version:        m.Version,
	}
}

// settingSources lists where each setting of m came from.
func settingSources(m *model.Model) map[string]string {
	if len(m.Sources) == 0 {
		return nil
	}
	out := make(map[string]string, len(m.Sources))
	for k, v := range m.Sources {
		out[k] = string(v)
	}
	return out
}

// modelStates maps a model's state to the vision API's.
var modelStates = map[model.State]visionv1.ModelState{
	model.Loading:     visionv1.ModelState_MODEL_STATE_LOADING,
	model.Ready:       visionv1.ModelState_MODEL_STATE_READY,
	model.Unavailable: visionv1.ModelState_MODEL_STATE_UNAVAILABLE,
	model.Unloading:   visionv1.ModelState_MODEL_STATE_UNLOADING,
}

// backendOf names what runs m; "" while it has no engines.
func backendOf(m *model.Model) string {
	st, _ := m.State()
	if m.Runner == nil || st == model.Unavailable {
		return ""
	}
	return m.Runner.Backend()
}

func encodedImage(b []byte) *visionv1.Image {
	return &visionv1.Image{Source: &visionv1.Image_Encoded{Encoded: b}}
}
