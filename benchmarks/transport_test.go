package benchmarks

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/internal/server"
	"github.com/visionserve/visionserve/pkg/model"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// echoVision answers Classify without looking at the image: what is left of
// a served call is gRPC itself, protobuf and HTTP/2 on loopback.
type echoVision struct {
	visionv1.UnimplementedVisionServiceServer
}

func (echoVision) Classify(_ context.Context, r *visionv1.ClassifyRequest) (*visionv1.ClassifyResponse, error) {
	return &visionv1.ClassifyResponse{Model: r.GetModel(), Results: make([]*visionv1.ImageResult, len(r.GetImages()))}, nil
}

// BenchmarkTransport is the floor under BenchmarkOverhead's added p50: one
// client calls, one at a time, over a 127.0.0.1 TCP listener, carrying the
// classifier's test image (the same bytes and options as the served
// benchmarks). "bare" is a gRPC server whose Classify answers at once;
// "server" is the real server (interceptors, tracing, metrics hooks,
// validation) with no models, so every call is refused NotFound after the
// whole message was received. Their p50 is what any served call pays on
// this machine before any image work.
func BenchmarkTransport(b *testing.B) {
	m, err := loadModel("mobilenetv3_large")
	if err != nil {
		skipOrFail(b, err)
	}
	img := testImage(m)
	req := &visionv1.ClassifyRequest{Model: "absent", Images: []*visionv1.Image{{Source: &visionv1.Image_Encoded{Encoded: img}}}}
	run := func(b *testing.B, addr string) {
		conn, err := grpc.NewClient(addr, append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, windowDialOptions()...)...)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		client := visionv1.NewVisionServiceClient(conn)
		measure(b, 1, 1, func(ctx context.Context) error {
			_, err := client.Classify(ctx, req)
			if status.Code(err) == codes.NotFound {
				return nil // the real server without models
			}
			return err
		})
		b.ReportMetric(float64(len(img))/(1<<10), "image-KiB")
	}
	b.Run("bare", func(b *testing.B) {
		srv := grpc.NewServer(append(windowServerOptions(), grpc.MaxRecvMsgSize(64<<20))...)
		visionv1.RegisterVisionServiceServer(srv, echoVision{})
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		done := make(chan struct{})
		go func() { defer close(done); _ = srv.Serve(lis) }()
		defer func() { srv.Stop(); <-done }()
		run(b, lis.Addr().String())
	})
	b.Run("server", func(b *testing.B) {
		srv, err := server.New(server.Options{
			Registry:        model.NewRegistry(model.RegistryOptions{}),
			Limits:          server.Limits{MaxPixels: 40_000_000, MaxImagesPerRequest: 64, MaxStreams: 64},
			MaxMessageBytes: 64 << 20,
			Logger:          discard,
			ServerOptions:   windowServerOptions(),
		})
		if err != nil {
			b.Fatal(err)
		}
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- srv.Serve(lis) }()
		defer func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = srv.Shutdown(ctx, time.Second)
			<-done
		}()
		run(b, lis.Addr().String())
	})
}
