package server

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// streamSlots bounds the concurrent streams: beyond the limit a new stream
// is refused at once rather than queued, so a flood of clients cannot take
// memory or starve the streams already running.
type streamSlots struct {
	limit int64
	n     atomic.Int64
}

func (s *streamSlots) acquire() bool {
	if s.n.Add(1) > s.limit {
		s.n.Add(-1)
		return false
	}
	return true
}

func (s *streamSlots) release() { s.n.Add(-1) }

// StreamClassify implements VisionService.
func (s *visionService) StreamClassify(st visionv1.VisionService_StreamClassifyServer) error {
	return s.stream(st, modelrepo.TaskClassify)
}

// StreamDetect implements VisionService.
func (s *visionService) StreamDetect(st visionv1.VisionService_StreamDetectServer) error {
	return s.stream(st, modelrepo.TaskDetect)
}

// frameStream is the part of a bidirectional stream the handler uses.
type frameStream interface {
	Context() context.Context
	Recv() (*visionv1.StreamRequest, error)
	Send(*visionv1.StreamResponse) error
}

// frameQueue holds what the receiver has read and the worker not yet
// taken: at most one pending frame (the newest) plus the frames it
// replaced, which are reported as dropped in the order they came.
type frameQueue struct {
	mu      sync.Mutex // guards the fields below
	pending *visionv1.StreamRequest
	dropped []*visionv1.StreamRequest
	done    bool  // the receiver has stopped
	err     error // why it stopped; nil for the client's end of stream
	wake    chan struct{}
}

func (q *frameQueue) put(f *visionv1.StreamRequest) {
	q.mu.Lock()
	if q.pending != nil {
		q.dropped = append(q.dropped, q.pending)
	}
	q.pending = f
	q.mu.Unlock()
	q.signal()
}

func (q *frameQueue) finish(err error) {
	q.mu.Lock()
	q.done, q.err = true, err
	q.mu.Unlock()
	q.signal()
}

func (q *frameQueue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// take empties the queue: the dropped frames and the pending one.
func (q *frameQueue) take() (dropped []*visionv1.StreamRequest, next *visionv1.StreamRequest) {
	q.mu.Lock()
	defer q.mu.Unlock()
	dropped, next = q.dropped, q.pending
	q.dropped, q.pending = nil, nil
	return dropped, next
}

// stream serves one video stream. The handler goroutine is the only
// sender: it serves one frame at a time, so results leave in order. A
// receiver goroutine reads frames into a frameQueue that keeps only the
// newest pending frame; a replaced frame is answered dropped=true before
// the frame that replaced it, so nothing is lost silently.
//
// The receiver exits when Recv fails, which happens at the latest when
// this handler returns and gRPC ends the stream.
func (s *visionService) stream(st frameStream, task modelrepo.Task) error {
	if !s.streams.acquire() {
		return status.Errorf(codes.ResourceExhausted, "too many concurrent streams: the limit is %d (--max-streams)", s.limits.MaxStreams)
	}
	defer s.streams.release()
	ctx := st.Context()

	first, err := st.Recv()
	if errors.Is(err, io.EOF) {
		return nil
	}
	if err != nil {
		return streamBroken(ctx, err)
	}
	m, err := lookup(s.reg, first.GetModel(), task)
	if err != nil {
		return toStatus(err)
	}
	opts, err := toOptions(first.GetOptions())
	if err != nil {
		return toStatus(err)
	}

	q := &frameQueue{wake: make(chan struct{}, 1)}
	q.put(first)
	go func() {
		for {
			f, err := st.Recv()
			if err != nil {
				if errors.Is(err, io.EOF) {
					err = nil
				}
				q.finish(err)
				return
			}
			q.put(f)
		}
	}()

	for {
		select {
		case <-q.wake:
		case <-ctx.Done():
			return toStatus(ctx.Err())
		case <-s.draining:
			// Serve what was already taken in, then tell the client to
			// reconnect elsewhere.
			if err := s.serveQueued(ctx, st, q, m, opts); err != nil {
				return err
			}
			if done, rerr := q.finished(); done && rerr == nil {
				return nil // the client had finished too
			}
			return status.Error(codes.Unavailable, "server is shutting down; reconnect")
		}
		if err := s.serveQueued(ctx, st, q, m, opts); err != nil {
			return err
		}
		if done, rerr := q.finished(); done {
			if rerr != nil {
				return streamBroken(ctx, rerr)
			}
			return nil
		}
	}
}

// finished reports whether the receiver stopped and every frame it read
// was answered, and why it stopped.
func (q *frameQueue) finished() (bool, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.done && q.pending == nil && len(q.dropped) == 0, q.err
}

// serveQueued answers everything in the queue: dropped frames first, then
// the newest one with its result.
func (s *visionService) serveQueued(ctx context.Context, st frameStream, q *frameQueue, m *model.Model, opts pipeline.Options) error {
	for {
		dropped, next := q.take()
		for _, f := range dropped {
			if err := st.Send(&visionv1.StreamResponse{FrameId: f.GetFrameId(), Timestamp: f.GetTimestamp(), Dropped: true}); err != nil {
				return streamBroken(ctx, err)
			}
		}
		if next == nil {
			return nil
		}
		resp, err := s.serveFrame(ctx, next, m, opts)
		if err != nil {
			return err
		}
		if err := st.Send(resp); err != nil {
			return streamBroken(ctx, err)
		}
	}
}

// serveFrame runs one frame. A problem with the frame itself is reported
// in its response and the stream goes on; the end of the stream's context
// ends the stream.
func (s *visionService) serveFrame(ctx context.Context, f *visionv1.StreamRequest, m *model.Model, opts pipeline.Options) (*visionv1.StreamResponse, error) {
	start := time.Now()
	resp := &visionv1.StreamResponse{FrameId: f.GetFrameId(), Timestamp: f.GetTimestamp()}
	fail := func(err error) (*visionv1.StreamResponse, error) {
		st, _ := status.FromError(toStatus(err))
		resp.Error = &visionv1.FrameError{Code: int32(st.Code()), Message: st.Message()}
		return resp, nil
	}
	if name := f.GetModel(); name != "" && name != m.Name {
		return fail(invalid("frame names model %q but the stream serves %q; the first frame's model holds for the stream", name, m.Name))
	}
	in, err := toInput(f.GetImage(), m, s.limits)
	if err != nil {
		return fail(err)
	}
	res, err := m.Runner.Infer(ctx, []model.Input{in}, opts)
	if ctx.Err() != nil {
		return nil, toStatus(ctx.Err())
	}
	if err != nil {
		return fail(err)
	}
	if len(res) != 1 {
		return fail(errors.New("runner returned no result"))
	}
	resp.Result = toResult(&res[0], time.Since(start))
	return resp, nil
}

// streamBroken is the status of a stream whose Recv or Send failed: the
// client went away or its deadline passed (the context says which), or
// the transport broke. The transport's own status is not passed on.
func streamBroken(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return toStatus(ctx.Err())
	}
	if st, ok := status.FromError(err); ok && st.Code() == codes.ResourceExhausted {
		// gRPC refused a frame over --max-message-bytes.
		return status.Errorf(codes.ResourceExhausted, "frame refused: %s", st.Message())
	}
	return status.Errorf(codes.Unavailable, "stream broken: %v", err)
}
