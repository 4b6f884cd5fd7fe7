package telemetry

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// RequestIDHeader is the metadata key a client may set to choose its
// request's id; the server echoes the id used in the response header.
const RequestIDHeader = "x-request-id"

// SpanAttrRequestID is the span attribute holding the request id.
const SpanAttrRequestID = "visionserve.request_id"

// maxRequestIDLen bounds a client-chosen id: it lands in every log line.
const maxRequestIDLen = 128

type requestIDKey struct{}

// WithRequestID returns ctx carrying request id id.
func WithRequestID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, requestIDKey{}, id)
}

// RequestID returns the request id ctx carries, or "".
func RequestID(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey{}).(string)
	return id
}

// NewRequestID returns a random 128-bit id in hex.
func NewRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	return hex.EncodeToString(b[:])
}

// validRequestID accepts what is safe to put in logs and headers as is:
// up to 128 printable ASCII characters other than space and quotes.
func validRequestID(id string) bool {
	if id == "" || len(id) > maxRequestIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; c <= ' ' || c > '~' || c == '"' || c == '\'' || c == '\\' {
			return false
		}
	}
	return true
}

// startRequest gives the call its id: the client's x-request-id when it is
// usable, a new one otherwise. It stores the id in the context, on the
// call's span (which otelgrpc's stats handler started before any
// interceptor runs) and in the response header.
func startRequest(ctx context.Context) context.Context {
	id := ""
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get(RequestIDHeader); len(v) > 0 && validRequestID(v[0]) {
			id = v[0]
		}
	}
	if id == "" {
		id = NewRequestID()
	}
	trace.SpanFromContext(ctx).SetAttributes(attribute.String(SpanAttrRequestID, id))
	// SetHeader fails only once headers were sent, which cannot have
	// happened before the handler ran.
	_ = grpc.SetHeader(ctx, metadata.Pairs(RequestIDHeader, id))
	return WithRequestID(ctx, id)
}

// UnaryServerInterceptor gives every call a request id (see
// RequestIDHeader) and logs one line when it ends, with its method, gRPC
// code and duration: at debug level when it succeeded, info for a client
// error, error for a server fault.
func UnaryServerInterceptor(log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		ctx = startRequest(ctx)
		start := time.Now()
		resp, err := handler(ctx, req)
		logCall(ctx, log, info.FullMethod, start, err)
		return resp, err
	}
}

// StreamServerInterceptor does for streams what UnaryServerInterceptor
// does for unary calls; the whole stream is one request.
func StreamServerInterceptor(log *slog.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		ctx := startRequest(ss.Context())
		start := time.Now()
		err := handler(srv, WithStreamContext(ss, ctx))
		logCall(ctx, log, info.FullMethod, start, err)
		return err
	}
}

// WithStreamContext returns ss with its context replaced by ctx: the one
// way this server's stream interceptors hand a derived context down.
func WithStreamContext(ss grpc.ServerStream, ctx context.Context) grpc.ServerStream {
	return &contextStream{ServerStream: ss, ctx: ctx}
}

type contextStream struct {
	grpc.ServerStream
	ctx context.Context
}

// Context implements grpc.ServerStream.
func (s *contextStream) Context() context.Context { return s.ctx }

func logCall(ctx context.Context, log *slog.Logger, method string, start time.Time, err error) {
	code := status.Code(err)
	level := slog.LevelDebug
	switch code {
	case codes.OK:
	case codes.Internal, codes.Unknown, codes.DataLoss:
		level = slog.LevelError
	default:
		level = slog.LevelInfo
	}
	if !log.Enabled(ctx, level) {
		return
	}
	attrs := []slog.Attr{
		slog.String("method", method),
		slog.String("code", code.String()),
		slog.Duration("duration", time.Since(start)),
	}
	if err != nil {
		attrs = append(attrs, slog.String("err", status.Convert(err).Message()))
	}
	log.LogAttrs(ctx, level, "grpc call", attrs...)
}
