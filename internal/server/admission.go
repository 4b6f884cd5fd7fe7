package server

import (
	"context"
	"crypto/subtle"
	"strings"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"
	"google.golang.org/protobuf/proto"
)

// admission decides whether a call may start, from its headers alone,
// before gRPC reads (and decompresses) its message: grpc-go runs it as
// the transport's InTapHandle. A refused call costs its headers, never
// its body.
//
// It checks, in order: the bearer token (when one is required; health
// checking and reflection stay open), then the server-wide bound on
// unary API calls in progress. Streams are bounded by streamSlots.
type admission struct {
	token string
	limit int64 // most unary API calls in progress; 0: no bound

	calls atomic.Int64
}

// streamingMethods are the API's streaming calls, bounded per stream
// rather than per call.
var streamingMethods = map[string]bool{
	"/" + VisionServiceName + "/StreamClassify":      true,
	"/" + VisionServiceName + "/StreamDetect":        true,
	"/" + InferenceServiceName + "/ModelStreamInfer": true,
}

// tap implements tap.ServerInHandle.
func (a *admission) tap(ctx context.Context, info *tap.Info) (context.Context, error) {
	if isOpenMethod(info.FullMethodName) {
		return ctx, nil
	}
	if a.token != "" {
		if err := checkToken(info.Header, a.token); err != nil {
			return nil, err
		}
	}
	if a.limit <= 0 || streamingMethods[info.FullMethodName] {
		return ctx, nil
	}
	if n := a.calls.Add(1); n > a.limit {
		a.calls.Add(-1)
		return nil, status.Errorf(codes.ResourceExhausted, "server busy: %d calls in progress, the limit is %d (--max-concurrent-calls); retry with backoff", n-1, a.limit)
	}
	// The call's context ends when its stream does, on every path: the
	// handler returned, the message could not be read, the client left.
	context.AfterFunc(ctx, func() { a.calls.Add(-1) })
	return ctx, nil
}

// inProgress is the number of unary API calls admitted and not ended.
func (a *admission) inProgress() int64 { return a.calls.Load() }

// checkToken verifies the "authorization: Bearer <token>" metadata in
// constant time, so the comparison leaks nothing about the token. The
// scheme is case-insensitive (RFC 7235) and may be followed by several
// spaces.
func checkToken(md metadata.MD, token string) error {
	for _, v := range md.Get("authorization") {
		scheme, cred, ok := strings.Cut(v, " ")
		if ok && strings.EqualFold(scheme, "bearer") &&
			subtle.ConstantTimeCompare([]byte(strings.TrimLeft(cred, " ")), []byte(token)) == 1 {
			return nil
		}
	}
	return status.Error(codes.Unauthenticated, "missing or wrong bearer token (authorization: Bearer <token>)")
}

// strictCodec is the protobuf codec with one change: a message that
// does not parse is answered InvalidArgument, as the client's fault,
// rather than grpc-go's Internal. grpc-go turns any codec error into
// Internal, so the codec lets the call go on with an empty message and
// marks it; the first interceptor (malformedUnary, malformedStream)
// refuses marked messages before any handler sees them.
type strictCodec struct{ encoding.CodecV2 }

// malformed holds the messages that did not parse, until an interceptor
// takes them (at once: the codec runs just before it).
var malformed sync.Map // proto.Message → error

func newStrictCodec() strictCodec { return strictCodec{encoding.GetCodecV2("proto")} }

// Unmarshal implements encoding.CodecV2.
func (c strictCodec) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.CodecV2.Unmarshal(data, v)
	m, ok := v.(proto.Message)
	if err == nil || !ok {
		return err
	}
	proto.Reset(m)
	malformed.Store(m, err)
	return nil
}

func malformedErr(err any) error {
	return status.Errorf(codes.InvalidArgument, "malformed request message: %v", err)
}

func malformedUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err, bad := malformed.LoadAndDelete(req); bad {
		return nil, malformedErr(err)
	}
	return handler(ctx, req)
}

func malformedStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return handler(srv, malformedServerStream{ss})
}

type malformedServerStream struct{ grpc.ServerStream }

func (s malformedServerStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if err, bad := malformed.LoadAndDelete(m); bad {
		return malformedErr(err)
	}
	return nil
}
