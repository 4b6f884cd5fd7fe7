package metrics

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/proto/inference"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// UnaryServerInterceptor counts the inference calls of both APIs
// (Classify, Detect, ModelInfer) by model, backend and status code, keeps
// the in-flight gauge, and observes each image's stage timings from the
// response, so the handlers need no metrics code. Calls that carry no
// images (ListModels, ModelInfo, health) pass through uncounted.
func (m *Metrics) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		model, images, ok := inferenceRequest(req)
		if m == nil || !ok {
			return handler(ctx, req)
		}
		// The label is resolved once so the in-flight increment and
		// decrement land on the same series even if the model finishes
		// loading meanwhile.
		label, _ := m.labels(model)
		m.inflight.WithLabelValues(label).Inc()
		defer m.inflight.WithLabelValues(label).Dec()

		start := time.Now()
		resp, err := handler(ctx, req)
		elapsed := time.Since(start)
		if err == nil {
			if r, ok := resp.(interface {
				GetResults() []*visionv1.ImageResult
			}); ok {
				for _, res := range r.GetResults() {
					m.ObserveImage(model, protoTimings(res.GetTimings()))
				}
			}
		}
		m.ObserveRequest(model, status.Code(err).String(), images, elapsed)
		return resp, err
	}
}

// StreamServerInterceptor does for StreamClassify and StreamDetect what
// UnaryServerInterceptor does for unary calls, frame by frame: a frame is
// in flight from its receipt until a response answers it or counts it
// in dropped_frames; a served frame counts as one OK request of one
// image, a dropped frame counts in StreamFramesDropped, and frames still
// unanswered when the stream ends count as one request of its code. The
// in-flight gauge returns exactly to where it was on every path: a frame
// the stream's receiver reads after the handler returned is not counted.
func (m *Metrics) StreamServerInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if m == nil {
			return handler(srv, ss)
		}
		w := &frameStream{ServerStream: ss, m: m}
		err := handler(srv, w)
		w.finish(err)
		return err
	}
}

// frameStream watches the frames of one stream go in and out.
type frameStream struct {
	grpc.ServerStream
	m *Metrics

	mu      sync.Mutex // guards the fields below
	model   string     // from the first frame; later frames may omit it
	label   string     // model label value, resolved at the first frame
	pending int        // frames received and not yet answered or dropped
	last    time.Time  // when the newest frame came: the one a response serves
	done    bool       // the handler returned: nothing more is counted
}

// RecvMsg implements grpc.ServerStream.
func (s *frameStream) RecvMsg(msg any) error {
	if err := s.ServerStream.RecvMsg(msg); err != nil {
		return err
	}
	req, ok := msg.(*visionv1.StreamRequest)
	if !ok {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return nil
	}
	if s.label == "" {
		s.model = req.GetModel()
		s.label, _ = s.m.labels(s.model)
	}
	s.pending++
	s.last = time.Now()
	// Changed under s.mu, so that finish cannot settle between the
	// count and the gauge.
	s.m.inflight.WithLabelValues(s.label).Inc()
	return nil
}

// SendMsg implements grpc.ServerStream.
func (s *frameStream) SendMsg(msg any) error {
	err := s.ServerStream.SendMsg(msg)
	resp, ok := msg.(*visionv1.StreamResponse)
	if !ok {
		return err
	}
	s.mu.Lock()
	answered := min(s.pending, 1+int(min(resp.GetDroppedFrames(), uint64(s.pending))))
	if s.done || answered == 0 {
		// A response to no frame we saw; nothing to account.
		s.mu.Unlock()
		return err
	}
	s.pending -= answered
	model, label, last := s.model, s.label, s.last
	s.m.inflight.WithLabelValues(label).Sub(float64(answered))
	s.mu.Unlock()
	if answered > 1 {
		s.m.StreamFramesDropped(model, answered-1)
	}
	if fe := resp.GetError(); fe != nil {
		s.m.ObserveRequest(model, codes.Code(fe.GetCode()).String(), 1, 0)
	} else if resp.GetResult() != nil {
		total := time.Since(last)
		if t := resp.GetResult().GetTimings().GetTotal(); t != nil {
			total = t.AsDuration()
		}
		s.m.ObserveImage(model, protoTimings(resp.GetResult().GetTimings()))
		s.m.ObserveRequest(model, "OK", 1, total)
	}
	return err
}

// finish settles the frames left unanswered when the handler returned,
// and stops counting.
func (s *frameStream) finish(err error) {
	s.mu.Lock()
	pending, model, label := s.pending, s.model, s.label
	s.pending, s.done = 0, true
	if pending > 0 {
		s.m.inflight.WithLabelValues(label).Sub(float64(pending))
	}
	s.mu.Unlock()
	if err != nil && label != "" {
		s.m.ObserveRequest(model, status.Code(err).String(), pending, 0)
	}
}

// inferenceRequest says whether req is an inference call and which model
// and how many images it names.
func inferenceRequest(req any) (model string, images int, ok bool) {
	switch r := req.(type) {
	case *visionv1.ClassifyRequest:
		return r.GetModel(), len(r.GetImages()), true
	case *visionv1.DetectRequest:
		return r.GetModel(), len(r.GetImages()), true
	case *inference.ModelInferRequest:
		// The batch dimension of the first input is the image count.
		if in := r.GetInputs(); len(in) > 0 && len(in[0].GetShape()) > 0 && in[0].GetShape()[0] > 0 {
			images = int(in[0].GetShape()[0])
		}
		return r.GetModelName(), images, true
	}
	return "", 0, false
}

func protoTimings(t *visionv1.Timings) Timings {
	return Timings{
		Queue:       t.GetQueue().AsDuration(),
		Decode:      t.GetDecode().AsDuration(),
		Preprocess:  t.GetPreprocess().AsDuration(),
		Inference:   t.GetInference().AsDuration(),
		Postprocess: t.GetPostprocess().AsDuration(),
	}
}
