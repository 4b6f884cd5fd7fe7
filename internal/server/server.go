// Package server is visionserve's gRPC serving layer: the vision API
// (visionserve.v1.VisionService), the KServe v2 / Open Inference Protocol
// (inference.GRPCInferenceService), gRPC health checking and reflection,
// the request limits and the authentication interceptors. It translates
// between the protocols and package model, which owns the served models
// and the readiness that health checking reports.
//
// Health checking (grpc.health.v1) and reflection stay open when a bearer
// token is required: probes and grpcurl must work without secrets, and
// neither reveals more than the service names.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/internal/telemetry"
	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/proto/inference"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// DefaultStreamIdleTimeout ends a stream that sends no frame for a
// minute, unless Limits say otherwise.
const DefaultStreamIdleTimeout = time.Minute

// Service names as health checking knows them.
const (
	VisionServiceName    = "visionserve.v1.VisionService"
	InferenceServiceName = "inference.GRPCInferenceService"
)

// Options configure a Server.
type Options struct {
	// Registry holds the models served and answers readiness, which
	// health checking follows; the Server closes it on Shutdown.
	Registry *model.Registry
	// Limits bound requests and streams.
	Limits Limits
	// MaxMessageBytes bounds a received message; gRPC refuses a bigger
	// one with ResourceExhausted before reading it.
	MaxMessageBytes int
	// AuthToken, when set, is the bearer token API calls must carry.
	AuthToken string
	// MaxConcurrentCalls bounds the unary API calls in progress; beyond
	// it a call is refused with ResourceExhausted before its message is
	// read. 0 means no bound.
	MaxConcurrentCalls int
	// TLS, when set, serves TLS (mTLS when it requires client certs).
	TLS *tls.Config
	// Logger gets the server's log lines; slog.Default() when nil.
	Logger *slog.Logger
	// UnaryInterceptors and StreamInterceptors run after the server's own
	// (recovery, authentication): the place for metrics and tracing.
	UnaryInterceptors  []grpc.UnaryServerInterceptor
	StreamInterceptors []grpc.StreamServerInterceptor
	// ServerOptions are added to the grpc.Server's (a stats handler, say).
	ServerOptions []grpc.ServerOption
	// Control loads and unloads models on request (Triton's repository
	// extension, the vision API's LoadModel and UnloadModel); nil for a
	// fixed set of models. ControlMode is its --model-control-mode.
	Control     *model.Controller
	ControlMode string
}

// Server is the gRPC server with every service registered.
type Server struct {
	grpc    *grpc.Server
	health  *health.Server
	reg     *model.Registry
	admit   *admission
	streams *streamSlots
	shm     *shmRegistry
	oip     *oipService
	vision  *visionService
	// maxMessageBytes bounds a REST body as it bounds a gRPC message.
	maxMessageBytes int
	log             *slog.Logger
	draining        chan struct{}
	drain           sync.Once
}

// New builds the server; it listens once Serve is called. Health checking
// follows the registry's readiness: SERVING exactly while it is ready.
func New(opts Options) (*Server, error) {
	if opts.Registry == nil {
		return nil, errors.New("server: no registry")
	}
	if opts.MaxMessageBytes <= 0 {
		return nil, errors.New("server: MaxMessageBytes must be positive")
	}
	lim := opts.Limits
	if lim.MaxPixels <= 0 || lim.MaxImagesPerRequest <= 0 || lim.MaxStreams <= 0 {
		return nil, fmt.Errorf("server: limits must be positive: %+v", lim)
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	s := &Server{health: health.NewServer(), reg: opts.Registry, log: log, draining: make(chan struct{})}

	// Recovery first, then authentication, so that nothing else runs for
	// an unauthenticated caller; then the caller's (metrics, tracing).
	// Authentication and the bound on calls in progress run in the
	// transport, before a message is read (admission.go); then recovery,
	// the refusal of malformed messages, the client's fairness key, and
	// the caller's interceptors (metrics, tracing).
	s.admit = &admission{token: opts.AuthToken, limit: int64(opts.MaxConcurrentCalls)}
	unary := []grpc.UnaryServerInterceptor{recoverUnary(log), malformedUnary, clientUnary}
	stream := []grpc.StreamServerInterceptor{recoverStream(log), malformedStream, clientStream}
	unary = append(unary, opts.UnaryInterceptors...)
	stream = append(stream, opts.StreamInterceptors...)
	sopts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(opts.MaxMessageBytes),
		grpc.MaxSendMsgSize(opts.MaxMessageBytes),
		grpc.InTapHandle(s.admit.tap),
		grpc.ForceServerCodecV2(newStrictCodec()),
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(stream...),
		// Clients may keep idle connections open with pings, but not
		// flood the server with them.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	}
	if opts.TLS != nil {
		sopts = append(sopts, grpc.Creds(credentials.NewTLS(opts.TLS)))
	}
	sopts = append(sopts, opts.ServerOptions...)
	s.grpc = grpc.NewServer(sopts...)

	s.streams = &streamSlots{limit: lim.MaxStreams, perClient: lim.MaxStreamsPerClient}
	ctl := control{ctl: opts.Control, mode: opts.ControlMode}
	s.vision = &visionService{
		reg: opts.Registry, control: ctl, limits: lim, streams: s.streams, draining: s.draining,
	}
	visionv1.RegisterVisionServiceServer(s.grpc, s.vision)
	s.shm = newSHMRegistry()
	s.oip = &oipService{reg: opts.Registry, control: ctl, shm: s.shm, limits: lim, maxMessageBytes: opts.MaxMessageBytes}
	inference.RegisterGRPCInferenceServiceServer(s.grpc, s.oip)
	s.maxMessageBytes = opts.MaxMessageBytes
	healthpb.RegisterHealthServer(s.grpc, s.health)
	reflection.Register(s.grpc)
	// One readiness, the registry's, drives health checking; /readyz
	// and OIP ServerReady read the same, so none can disagree.
	opts.Registry.Watch(func(ready bool, _ string) {
		st := healthpb.HealthCheckResponse_NOT_SERVING
		if ready {
			st = healthpb.HealthCheckResponse_SERVING
		}
		for _, name := range HealthServices {
			s.health.SetServingStatus(name, st)
		}
	})
	return s, nil
}

// HealthServices are the names health checking answers for; "" is the
// server as a whole.
var HealthServices = []string{"", VisionServiceName, InferenceServiceName}

// Serve accepts connections on lis until Shutdown; it returns nil after a
// Shutdown.
func (s *Server) Serve(lis net.Listener) error {
	if err := s.grpc.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	return nil
}

// Shutdown stops the server without losing accepted work, in this order:
//  1. the registry drains, so /readyz and health checking say not ready
//     and load balancers and probes stop sending new calls;
//  2. streams are told to finish the frames they took in and end;
//  3. GracefulStop stops accepting and waits for the calls in flight, at
//     most grace; after that Stop cancels what is left;
//  4. the registry drains every batcher (each accepted image is finished)
//     and frees the engine sessions.
//
// It is safe to call more than once; later calls only wait.
func (s *Server) Shutdown(ctx context.Context, grace time.Duration) error {
	var err error
	s.drain.Do(func() {
		s.reg.Drain()
		s.health.Shutdown()
		close(s.draining)
		stopped := make(chan struct{})
		go func() {
			s.grpc.GracefulStop()
			close(stopped)
		}()
		timer := time.NewTimer(grace)
		defer timer.Stop()
		select {
		case <-stopped:
		case <-timer.C:
			s.log.Warn("grace period over; cancelling the calls still running", "grace", grace)
			s.grpc.Stop()
			<-stopped
		case <-ctx.Done():
			s.grpc.Stop()
			<-stopped
		}
		err = s.reg.Close(ctx)
		s.shm.close() // no call runs any more: unmap what clients registered
	})
	return err
}

// isOpenMethod reports whether a method is served without a token: health
// checking and reflection.
func isOpenMethod(fullMethod string) bool {
	return strings.HasPrefix(fullMethod, "/grpc.health.v1.Health/") ||
		strings.HasPrefix(fullMethod, "/grpc.reflection.")
}

func recoverUnary(log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
		defer func() {
			if p := recover(); p != nil {
				log.Error("panic in handler", "method", info.FullMethod, "panic", p, "stack", string(debug.Stack()))
				err = status.Error(codes.Internal, "internal error")
			}
		}()
		return handler(ctx, req)
	}
}

func recoverStream(log *slog.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
		defer func() {
			if p := recover(); p != nil {
				log.Error("panic in stream handler", "method", info.FullMethod, "panic", p, "stack", string(debug.Stack()))
				err = status.Error(codes.Internal, "internal error")
			}
		}()
		return handler(srv, ss)
	}
}

// clientUnary and clientStream name each call's client for the models'
// batchers, which share their queues fairly between connections.
func clientUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	return handler(withClient(ctx), req)
}

func clientStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return handler(srv, telemetry.WithStreamContext(ss, withClient(ss.Context())))
}

func withClient(ctx context.Context) context.Context {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return model.WithClient(ctx, p.Addr.String())
	}
	return ctx
}
