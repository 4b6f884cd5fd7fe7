package server

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// streamSlots bounds the concurrent streams, in all and per client (the
// host part of the peer address): beyond either limit a new stream is
// refused at once rather than queued, so a flood of clients, or one
// client holding streams open, cannot take memory or starve the others.
type streamSlots struct {
	limit, perClient int // perClient 0: no per-client limit

	mu       sync.Mutex // guards the fields below
	n        int
	byClient map[string]int
}

// acquire takes a slot for client, or returns the status to answer.
func (s *streamSlots) acquire(client string) (release func(), err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.n >= s.limit {
		return nil, status.Errorf(codes.ResourceExhausted, "too many concurrent streams: the limit is %d (--max-streams)", s.limit)
	}
	if s.perClient > 0 && s.byClient[client] >= s.perClient {
		return nil, status.Errorf(codes.ResourceExhausted, "too many concurrent streams from this client: the limit is %d per client (--max-streams-per-client)", s.perClient)
	}
	if s.byClient == nil {
		s.byClient = map[string]int{}
	}
	s.n++
	s.byClient[client]++
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			s.n--
			if s.byClient[client]--; s.byClient[client] <= 0 {
				delete(s.byClient, client)
			}
		})
	}, nil
}

// count is the number of streams being served.
func (s *streamSlots) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// clientHost is the host part of the call's peer address: one client
// for the per-client stream limit, whatever port each connection uses.
func clientHost(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return ""
	}
	if host, _, err := net.SplitHostPort(p.Addr.String()); err == nil {
		return host
	}
	return p.Addr.String()
}

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

// frameQueue holds what the receiver has read and the sender not yet
// taken: at most one pending frame (the newest) and the number of frames
// it replaced. Its memory is one frame, however fast frames come and
// however slowly the client reads the answers.
type frameQueue struct {
	mu      sync.Mutex // guards the fields below
	pending *visionv1.StreamRequest
	first   *visionv1.StreamRequest // the stream's first frame: its model and options hold
	dropped uint64                  // frames replaced since the last take
	last    time.Time               // when the last frame arrived (or the stream began)
	done    bool                    // the receiver has stopped
	err     error                   // why it stopped; nil for the client's end of stream
	wake    chan struct{}
}

func newFrameQueue() *frameQueue {
	return &frameQueue{wake: make(chan struct{}, 1), last: time.Now()}
}

func (q *frameQueue) put(f *visionv1.StreamRequest) {
	q.mu.Lock()
	if q.pending != nil {
		q.dropped++
	}
	if q.first == nil {
		// Only what the stream needs of it: its image may be dropped.
		q.first = &visionv1.StreamRequest{Model: f.GetModel(), Options: f.GetOptions()}
	}
	q.pending, q.last = f, time.Now()
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

// firstFrame is the stream's first frame (model and options only).
func (q *frameQueue) firstFrame() *visionv1.StreamRequest {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.first
}

// take empties the queue: the count of frames dropped and the pending one.
func (q *frameQueue) take() (dropped uint64, next *visionv1.StreamRequest) {
	q.mu.Lock()
	defer q.mu.Unlock()
	dropped, next = q.dropped, q.pending
	q.dropped, q.pending = 0, nil
	return dropped, next
}

// idleFor is how long no frame has arrived.
func (q *frameQueue) idleFor() time.Duration {
	q.mu.Lock()
	defer q.mu.Unlock()
	return time.Since(q.last)
}

// finished reports whether the receiver stopped and every frame it read
// was answered or counted, and why it stopped.
func (q *frameQueue) finished() (bool, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.done && q.pending == nil && q.dropped == 0, q.err
}

// streamState is what the first frame fixes for the whole stream: the
// model's name (each frame acquires the model serving it then, so a
// reload during the stream switches it to the new version) and options.
type streamState struct {
	task modelrepo.Task
	name string
	opts pipeline.Options
}

// stream serves one video stream. The handler goroutine is the only
// sender: it serves one frame at a time, so results leave in order. A
// receiver goroutine reads frames into a frameQueue that keeps only the
// newest pending frame; the frames it replaced are counted in the next
// response's dropped_frames, so nothing is lost silently and nothing
// piles up for a client that does not read.
//
// A stream with no frame for --stream-idle-timeout is ended, the first
// frame included, so that silent streams cannot hold the stream slots.
// The receiver exits when Recv fails, which happens at the latest when
// this handler returns and gRPC ends the stream.
func (s *visionService) stream(st frameStream, task modelrepo.Task) error {
	ctx := st.Context()
	release, err := s.streams.acquire(clientHost(ctx))
	if err != nil {
		return err
	}
	defer release()

	q := newFrameQueue()
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

	state := &streamState{task: task}
	idle := s.limits.StreamIdleTimeout
	if idle <= 0 {
		idle = DefaultStreamIdleTimeout
	}
	timer := time.NewTimer(idle)
	defer timer.Stop()
	for {
		select {
		case <-q.wake:
		case <-timer.C:
			if since := q.idleFor(); since < idle {
				timer.Reset(idle - since)
				continue
			}
			return status.Errorf(codes.DeadlineExceeded, "no frame for %v: idle streams are closed (--stream-idle-timeout)", idle)
		case <-ctx.Done():
			return toStatus(ctx.Err())
		case <-s.draining:
			// Serve what was already taken in, then tell the client to
			// reconnect elsewhere.
			if err := s.serveQueued(ctx, st, q, state); err != nil {
				return err
			}
			if done, rerr := q.finished(); done && rerr == nil {
				return nil // the client had finished too
			}
			return status.Error(codes.Unavailable, "server is shutting down; reconnect")
		}
		if err := s.serveQueued(ctx, st, q, state); err != nil {
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

// serveQueued answers what is in the queue: the newest frame, with the
// count of the frames it replaced. The first frame fixes the stream's
// model and options.
func (s *visionService) serveQueued(ctx context.Context, st frameStream, q *frameQueue, state *streamState) error {
	for {
		dropped, next := q.take()
		if next == nil {
			return nil
		}
		if state.name == "" {
			first := q.firstFrame()
			m, err := lookup(s.reg, first.GetModel(), state.task)
			if err != nil {
				return toStatus(err)
			}
			m.Release()
			opts, err := toOptions(first.GetOptions())
			if err != nil {
				return toStatus(err)
			}
			state.name, state.opts = m.Name, opts
		}
		resp, err := s.serveFrame(ctx, next, state)
		if err != nil {
			return err
		}
		resp.DroppedFrames = dropped
		if err := st.Send(resp); err != nil {
			return streamBroken(ctx, err)
		}
	}
}

// serveFrame runs one frame. A problem with the frame itself is reported
// in its response and the stream goes on; the end of the stream's context
// ends the stream.
func (s *visionService) serveFrame(ctx context.Context, f *visionv1.StreamRequest, state *streamState) (*visionv1.StreamResponse, error) {
	start := time.Now()
	resp := &visionv1.StreamResponse{FrameId: f.GetFrameId(), Timestamp: f.GetTimestamp()}
	fail := func(err error) (*visionv1.StreamResponse, error) {
		st, _ := status.FromError(toStatus(err))
		resp.Error = &visionv1.FrameError{Code: int32(st.Code()), Message: st.Message()}
		return resp, nil
	}
	if name := f.GetModel(); name != "" && name != state.name {
		return fail(invalid("frame names model %q but the stream serves %q; the first frame's model holds for the stream", clip(name), state.name))
	}
	// The model serving the name now: after a reload, the new version;
	// after an unload, NotFound for this frame.
	m, err := lookup(s.reg, state.name, state.task)
	if err != nil {
		return fail(err)
	}
	defer m.Release()
	in, err := toInput(f.GetImage(), m, s.limits)
	if err != nil {
		return fail(err)
	}
	res, err := m.Runner.Infer(ctx, []model.Input{in}, state.opts)
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
	switch st, _ := status.FromError(err); st.Code() {
	case codes.InvalidArgument:
		return err // a frame that is not a StreamRequest (malformedStream)
	case codes.ResourceExhausted:
		// gRPC refused a frame over --max-message-bytes.
		return status.Errorf(codes.ResourceExhausted, "frame refused: %s", st.Message())
	}
	return status.Errorf(codes.Unavailable, "stream broken: %v", err)
}
